"""``nsa_attention``: the public functional NSA, dispatched stage by stage through the registry.

With ``implementation="reference"`` (the default off GPU/TPU until kernels are registered) this
is the exact pure-jnp NSA of ``shared/NSA_SPEC.md``: it never builds a ``[T, T]`` array, so it
doubles as the XLA fallback on every backend.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from nsa_jax import registry
from nsa_jax.compression import PHI_HIDDEN_NAME, compress, expected_param_shapes
from nsa_jax.config import LOW_MEMORY_BRANCHES, REMAT_POLICY_NAMES, NSAConfig, low_memory_branches
from pallas_kernels.common import QUERY_ROWS_NAME, combine_outputs, rows_to_every_query

# The selected blocks' name for ``jax.checkpoint`` policies.
SELECTION_NAME = "nsa_selection"
# The compressed keys and values (phi's outputs), and phi's hidden pre-activation.
COMPRESSED_NAME = "nsa_compressed"
PHI_NAMES = (COMPRESSED_NAME, PHI_HIDDEN_NAME)
# The NSA layer's gates (``[B, T, N, 3]`` float32, after the sigmoid).
GATES_NAME = "nsa_gates"
# The name of an attention layer's output (the heads, before the output projection), given by
# every attention layer of the model (NSA, dense, window) alike.
ATTENTION_OUT_NAME = "attention_out"
# What a rematerialised block keeps (``ModelConfig.remat_policy``), every other activation
# being recomputed in the backward pass:
# - "attention_out" (the default): the attention output (``[T, N, Dv]``, which the output
#   projection's weight gradient reads: NSA's gated sum of three branch outputs is not
#   recomputed for it; a dense layer reruns its attention for the softmax statistics all the
#   same) and NSA's intermediate results outside its attention kernels: the selection (a few
#   int32 per query: the top-n is not rerun), phi's outputs and hidden pre-activation (``T/d``
#   compressed tokens: phi's first matmul is not rerun), the gates (``[T, N, 3]`` float32: the
#   gate projection is not rerun) and, on the cuDNN compressed path, its shifted copy of the
#   queries (``[T, N, Dk]``: not copied again). The attention kernels' own residuals (branch
#   outputs and log-sum-exps) are recomputed, as a dense layer's are;
# - "selection": the selection alone;
# - "nothing": nothing.
REMAT_POLICIES = {
    "attention_out": jax.checkpoint_policies.save_only_these_names(
        SELECTION_NAME, *PHI_NAMES, GATES_NAME, QUERY_ROWS_NAME, ATTENTION_OUT_NAME),
    "selection": jax.checkpoint_policies.save_only_these_names(SELECTION_NAME),
    "nothing": jax.checkpoint_policies.nothing_saveable,
}
assert tuple(REMAT_POLICIES) == REMAT_POLICY_NAMES


class NSAAux(NamedTuple):
    """Intermediate results of one NSA call (for inspection, tests and decoding)."""

    o_cmp: Float[Array, "B T N Hv"]
    o_slc: Float[Array, "B T N Hv"]
    o_swa: Float[Array, "B T N Hv"]
    lse_cmp: Float[Array, "B T N"]
    indices: Int[Array, "B T K M"]
    k_cmp: Float[Array, "B C K H"]
    v_cmp: Float[Array, "B C K Hv"]


def _check_array(name: str, x, ndim: int) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got {name}.shape={tuple(x.shape)}")


def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got {name}.dtype={x.dtype}")


def validate_inputs(
    q, k, v, gates, cmp_params, config: NSAConfig, k_slc, v_slc, k_swa, v_swa
) -> None:
    """Raises ``ValueError``/``TypeError`` naming the offending values; returns nothing."""
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
    _check_array("q", q, 4)
    _check_float("q", q)
    b, t, n, dk = q.shape
    if t < 1:
        raise ValueError(f"empty sequence: q.shape={tuple(q.shape)} has T={t}; NSA needs T >= 1")
    if b < 1 or n < 1 or dk < 1:
        raise ValueError(f"q.shape={tuple(q.shape)} has an empty batch, head or feature axis")
    pairs = {"": (k, v), "_slc": (k_slc, v_slc), "_swa": (k_swa, v_swa)}
    dv = None
    for suffix, (kk, vv) in pairs.items():
        kn, vn = f"k{suffix}", f"v{suffix}"
        if kk is None and vv is None and suffix:
            continue
        if (kk is None) != (vv is None):
            raise ValueError(f"{kn} and {vn} must be given together")
        _check_array(kn, kk, 4)
        _check_array(vn, vv, 4)
        for name, x in ((kn, kk), (vn, vv)):
            _check_float(name, x)
            if x.dtype != q.dtype:
                raise TypeError(f"dtypes differ: q.dtype={q.dtype} but {name}.dtype={x.dtype}")
        if kk.shape[:3] != vv.shape[:3]:
            raise ValueError(f"{kn}.shape={tuple(kk.shape)} and {vn}.shape={tuple(vv.shape)} "
                             "differ in batch, length or heads")
        if kk.shape[0] != b or kk.shape[1] != t:
            raise ValueError(f"q.shape={tuple(q.shape)} and {kn}.shape={tuple(kk.shape)} differ "
                             "in batch or sequence length")
        if kk.shape[3] != dk:
            raise ValueError(f"head dims differ: q.shape={tuple(q.shape)} has Dk={dk} but "
                             f"{kn}.shape={tuple(kk.shape)} has {kk.shape[3]}")
        kh = kk.shape[2]
        if kh < 1 or n % kh:
            raise ValueError(f"query heads must be a multiple of KV heads: q.shape="
                             f"{tuple(q.shape)} has N={n}, {kn}.shape={tuple(kk.shape)} has K={kh}")
        if suffix and kh != k.shape[2]:
            raise ValueError(f"{kn} has {kh} KV heads but k has {k.shape[2]}")
        if dv is None:
            dv = vv.shape[3]
        elif vv.shape[3] != dv:
            raise ValueError(f"value head dims differ: v has Dv={dv} but {vn} has {vv.shape[3]}")
    _check_array("gates", gates, 4)
    _check_float("gates", gates)
    if tuple(gates.shape) != (b, t, n, 3):
        raise ValueError(f"gates must be [B, T, N, 3]={(b, t, n, 3)}, got gates.shape="
                         f"{tuple(gates.shape)}")
    _validate_cmp_params(cmp_params, config, k.shape[2], dk, dv)


def _validate_cmp_params(cmp_params, config: NSAConfig, kh: int, dk: int, dv: int) -> None:
    if config.cmp_kind == "mean" and cmp_params is None:
        return
    if not isinstance(cmp_params, dict) or set(cmp_params) != {"k", "v"}:
        raise TypeError(f"cmp_params must be a dict with keys 'k' and 'v' for cmp_kind="
                        f"{config.cmp_kind!r}, got {type(cmp_params).__name__}")
    for part, dim in (("k", dk), ("v", dv)):
        want = expected_param_shapes(config.cmp_kind, num_kv_heads=kh,
                                     block_size=config.cmp_block_size, head_dim=dim)
        got = cmp_params[part]
        if set(got) != set(want):
            raise ValueError(f"cmp_params[{part!r}] must have keys {sorted(want)} for cmp_kind="
                             f"{config.cmp_kind!r}, got {sorted(got)}")
        for key, shape in want.items():
            actual = tuple(got[key].shape)
            if len(actual) != len(shape) or any(
                s is not None and s != a for s, a in zip(shape, actual, strict=True)
            ):
                raise ValueError(f"cmp_params[{part!r}][{key!r}].shape={actual}, expected "
                                 f"{shape} (None = any) for l={config.cmp_block_size}, "
                                 f"K={kh}, D={dim}")


def nsa_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K Hv"],
    gates: Float[Array, "B T N 3"],
    cmp_params: dict | None = None,
    *,
    config: NSAConfig = NSAConfig(),
    k_slc: Float[Array, "B T K H"] | None = None,
    v_slc: Float[Array, "B T K Hv"] | None = None,
    k_swa: Float[Array, "B T K H"] | None = None,
    v_swa: Float[Array, "B T K Hv"] | None = None,
    implementation: str | None = None,
    return_aux: bool = False,
    low_memory: bool | str | tuple[str, ...] = False,
) -> Float[Array, "B T N Hv"] | tuple[Float[Array, "B T N Hv"], NSAAux]:
    """Native Sparse Attention over one causal sequence per batch entry.

    ``o = g_cmp * Attn_cmp + g_slc * Attn_slc + g_swa * Attn_swa`` (spec "Output").

    Args:
      q: queries ``[B, T, N, Dk]`` (RoPE already applied), query ``t`` at position ``t``.
      k: the compressed branch's raw keys ``[B, T, K, Dk]`` (all branches' when ``k_slc`` /
        ``k_swa`` are not given, i.e. ``kv_mode="shared"``).
      v: the compressed branch's raw values ``[B, T, K, Dv]``.
      gates: branch gates ``[B, T, N, 3]`` in order (cmp, slc, swa), already through a sigmoid.
      cmp_params: ``{"k": ..., "v": ...}`` parameters of ``phi`` (see ``compression.py``);
        may be ``None`` for ``cmp_kind="mean"``.
      config: block sizes, top-n, window and compression kind.
      k_slc, v_slc: the selected branch's keys/values (default ``k``, ``v``).
      k_swa, v_swa: the sliding-window branch's keys/values (default ``k``, ``v``).
      implementation: a registered backend name (``"reference"``, kernel backends); ``None``
        picks the platform's default. Stages a backend lacks run on the reference.
      return_aux: also return the branch outputs, selection and compressed keys.
      low_memory: keep only the inputs and the selection for the backward pass, which then
        recomputes the branches one at a time (``_branchwise``): forward, gate gradient and
        backward of one branch, then the next, ordered by optimisation barriers, so that one
        branch's output and cotangent are live at a time instead of three. It costs a second
        forward of the three attention branches. A branch name, comma-separated names or a
        sequence of them (from ``"selected"``, ``"compressed"``, ``"window"``) recompute only
        those: the others keep their residuals from the forward, and the backward takes them
        first. Ignored with ``return_aux``.

    Returns:
      ``[B, T, N, Dv]`` in ``q.dtype`` (and :class:`NSAAux` when ``return_aux``).
    """
    validate_inputs(q, k, v, gates, cmp_params, config, k_slc, v_slc, k_swa, v_swa)
    recompute = low_memory_branches(low_memory)
    k_slc, v_slc = (k, v) if k_slc is None else (k_slc, v_slc)
    k_swa, v_swa = (k, v) if k_swa is None else (k_swa, v_swa)
    chain = registry.resolve(implementation)
    cfg = config
    params = cmp_params or {"k": {}, "v": {}}
    geom = dict(kind=cfg.cmp_kind, block_size=cfg.cmp_block_size, stride=cfg.cmp_stride)
    # Named so that a rematerialised block can keep them (``C = T/d`` tokens: a few MiB a
    # layer) and not recompute phi in the backward pass (``REMAT_POLICIES``).
    k_cmp = checkpoint_name(compress(k, params["k"], **geom), COMPRESSED_NAME)  # [B, C, K, Dk]
    v_cmp = checkpoint_name(compress(v, params["v"], **geom), COMPRESSED_NAME)  # [B, C, K, Dv]
    if recompute and not return_aux:
        return _branchwise(chain, cfg, q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates,
                           recompute=recompute)
    out, indices, branches = _branches(chain, cfg, q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa,
                                       gates, fold_allowed=not return_aux)
    if return_aux:
        o_cmp, o_slc, o_swa, lse_cmp = branches
        return out, NSAAux(o_cmp, o_slc, o_swa, lse_cmp, indices, k_cmp, v_cmp)
    return out


def _stage_kwargs(cfg: NSAConfig, seq_len: int) -> dict[str, dict]:
    """The static keyword arguments of each stage call, by stage name."""
    scale = cfg.softmax_scale
    return {
        "compressed_attention": dict(block_size=cfg.cmp_block_size, stride=cfg.cmp_stride,
                                     scale=scale),
        "select_blocks": dict(seq_len=seq_len, cmp_block_size=cfg.cmp_block_size,
                              cmp_stride=cfg.cmp_stride, slc_block_size=cfg.slc_block_size,
                              top_n=cfg.slc_top_n, scale=scale),
        # The selection always holds the forced blocks when there are slots for them (spec), a
        # promise the selected-attention kernels may use to share their loads.
        "selected_attention": dict(block_size=cfg.slc_block_size, scale=scale,
                                   forced_included=cfg.slc_top_n >= 3),
        "sliding_window_attention": dict(window_size=cfg.window_size, scale=scale),
    }


def _branches(chain, cfg: NSAConfig, q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, *,
              fold_allowed: bool):
    """The three branches and their gated sum from the compressed keys on:
    ``(out, indices, (o_cmp, o_slc, o_swa, lse_cmp))``, the last ``None`` when the gated sum
    was folded into the selected kernel (only with ``fold_allowed``)."""
    kw = _stage_kwargs(cfg, q.shape[1])
    # A backend may fold the gated sum into its selected-attention kernel (one pass over the
    # outputs fewer when no gradient is taken); only the backend whose selected attention
    # runs is asked, and only a fold made for that selected attention is used. The fold can
    # read the compressed branch's output rows in place (``compressed_attention_rows``).
    fold = None if not fold_allowed else _paired(chain, "selected_attention",
                                                 "selected_attention_combined")
    cmp_rows = None if fold is None else _paired(chain, "compressed_attention",
                                                 "compressed_attention_rows")
    o_cmp_rows, cmp_first = None, 0
    if cmp_rows is not None:
        try:
            o_cmp_rows, lse_cmp, cmp_first = cmp_rows(q, k_cmp, v_cmp,
                                                      **kw["compressed_attention"])
        except NotImplementedError:
            pass
    if o_cmp_rows is None:
        o_cmp, lse_cmp = registry.call_stage(chain, "compressed_attention", q, k_cmp, v_cmp,
                                             **kw["compressed_attention"])
    else:
        o_cmp = None  # padded to every query only if the fold does not run
    indices = registry.call_stage(chain, "select_blocks", q, k_cmp, lse_cmp,
                                  **kw["select_blocks"])
    # Named so that a rematerialised block can keep the selection (a few int32 per query) and
    # skip recomputing the top-n in the backward pass (``REMAT_POLICIES``).
    indices = checkpoint_name(jax.lax.stop_gradient(indices), SELECTION_NAME)
    o_swa, _ = registry.call_stage(chain, "sliding_window_attention", q, k_swa, v_swa,
                                   **kw["sliding_window_attention"])
    slc_kw = kw["selected_attention"]
    if fold is not None:
        try:
            if o_cmp_rows is not None:
                return fold(q, k_slc, v_slc, indices, gates, o_cmp_rows, o_swa,
                            cmp_first=cmp_first, **slc_kw), indices, None
            return fold(q, k_slc, v_slc, indices, gates, o_cmp, o_swa, **slc_kw), indices, None
        except NotImplementedError:
            pass
    if o_cmp is None:
        o_cmp = rows_to_every_query(o_cmp_rows, cmp_first, q.shape[1])
    o_slc, _ = registry.call_stage(chain, "selected_attention", q, k_slc, v_slc, indices,
                                   **slc_kw)
    out = combine_branches(gates, o_cmp, o_slc, o_swa)
    return out, indices, (o_cmp, o_slc, o_swa, lse_cmp)


def _branchwise(chain, cfg: NSAConfig, q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, *,
                recompute: tuple[str, ...] = LOW_MEMORY_BRANCHES):
    """NSA's attention and gated sum (from the compressed keys on) with a backward pass that
    takes the branches one after another and recomputes those in ``recompute``
    (``nsa_attention(..., low_memory=...)``).

    The forward keeps its inputs, the selection and, for each branch not in ``recompute``,
    that stage's residuals (its output among them). With every branch recomputed, or with no
    gradient taken, it is :func:`_branches` (the gated sum folded where the backend can);
    otherwise the kept branches run under ``jax.vjp``, and the gated sum is folded only when
    the selected branch is recomputed (the fold does not return that branch's output).

    The backward takes the kept branches first (their residuals die early), then the
    recomputed ones, each in the order selected, compressed, window. For each it has the
    stage's output and vjp (kept, or from rerunning the stage's forward under ``jax.vjp``),
    takes the gate's gradient ``sum(dO * o_b)`` and the branch cotangent ``g_b * dO`` (the
    autodiff of ``combine_branches``, in float32), runs the stage's backward and adds its
    query gradient to the running sum. An ``optimization_barrier`` passes the next branch's
    operands (``dO`` among them) together with the gradients so far, so XLA starts a branch
    only after the previous one's gradients exist, and never holds the three branch outputs
    or cotangents at once. The stages are the chain's, with their own gradients; the result
    equals the default path's up to the order of the ``dq`` sum.
    """
    kw = _stage_kwargs(cfg, q.shape[1])
    kept = tuple(b for b in LOW_MEMORY_BRANCHES if b not in recompute)
    slot_of = {"compressed": 0, "selected": 1, "window": 2}

    def stage(name, *static):
        return lambda q, k, v: registry.call_stage(chain, name, q, k, v, *static, **kw[name])

    def operands(branch, res):
        """(stage function, q, keys, values) of ``branch`` from the residuals."""
        q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, _, indices = res
        if branch == "selected":
            return stage("selected_attention", indices), q, k_slc, v_slc
        if branch == "compressed":
            return stage("compressed_attention"), q, k_cmp, v_cmp
        return stage("sliding_window_attention"), q, k_swa, v_swa

    def forward(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates):
        """``(out, residuals)``: the kept branches' outputs and vjps by name."""
        if not kept:
            out, indices, _ = _branches(chain, cfg, q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa,
                                        gates, fold_allowed=True)
            return out, ((q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, indices), {})
        saved = {}

        def run(branch, fn, qb, kb, vb):
            if branch in kept:
                (o_b, lse_b), vjp = jax.vjp(fn, qb, kb, vb)
                saved[branch] = (o_b, lse_b, vjp)  # lse_b: the vjp's own residual
                return o_b, lse_b
            return fn(qb, kb, vb)

        o_cmp, lse_cmp = run("compressed", stage("compressed_attention"), q, k_cmp, v_cmp)
        indices = registry.call_stage(chain, "select_blocks", q, k_cmp, lse_cmp,
                                      **kw["select_blocks"])
        indices = checkpoint_name(jax.lax.stop_gradient(indices), SELECTION_NAME)
        o_swa, _ = run("window", stage("sliding_window_attention"), q, k_swa, v_swa)
        res = (q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, indices)
        fold = None if "selected" in kept else _paired(chain, "selected_attention",
                                                       "selected_attention_combined")
        if fold is not None:
            try:
                return fold(q, k_slc, v_slc, indices, gates, o_cmp, o_swa,
                            **kw["selected_attention"]), (res, saved)
            except NotImplementedError:
                pass
        o_slc, _ = run("selected", stage("selected_attention", indices), q, k_slc, v_slc)
        return combine_branches(gates, o_cmp, o_slc, o_swa), (res, saved)

    @jax.custom_vjp
    def attend(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates):
        # Without a gradient nothing is kept: the default forward (the gated sum folded).
        return _branches(chain, cfg, q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates,
                         fold_allowed=True)[0]

    def attend_bwd(residuals, do):
        res, saved = residuals
        gates = res[7]
        dq, dkv, dgates, done = None, {}, [None] * 3, None
        for branch in kept + recompute:
            slot = slot_of[branch]
            if branch in saved:
                o_b, lse_b, vjp = saved[branch]
                (dob, gb, o_b), _ = jax.lax.optimization_barrier(((do, gates, o_b), done))
            else:
                # Start only once the previous branch's gradients exist (and, for the first
                # recomputed one, once the cotangent does: the recompute is then no copy of the
                # forward's kernels that XLA could merge with them, keeping their outputs live
                # in between).
                fn, q, k, v = operands(branch, res)
                (qb, kb, vb, dob, gb), _ = jax.lax.optimization_barrier(
                    ((q, k, v, do, gates), done))
                (o_b, lse_b), vjp = jax.vjp(fn, qb, kb, vb)
            do32 = dob.astype(jnp.float32)
            dg = jnp.sum(do32 * o_b.astype(jnp.float32), axis=-1)
            do_b = (gb[..., slot].astype(jnp.float32)[..., None] * do32).astype(o_b.dtype)
            # The gate's gradient before the branch's backward kernels, so that the branch
            # output is not kept alive through them for a reduction scheduled late.
            do_b, dgates[slot] = jax.lax.optimization_barrier((do_b, dg))
            dqb, dkb, dvb = vjp((do_b, jnp.zeros_like(lse_b)))
            dq = dqb if dq is None else dq + dqb
            dkv[slot] = (dkb, dvb)
            done = (dq, dkb, dvb)
        dg = jnp.stack(dgates, axis=-1).astype(gates.dtype)
        return (dq, *dkv[0], *dkv[1], *dkv[2], dg)

    attend.defvjp(forward, attend_bwd)
    return attend(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates)


def _paired(chain, stage: str, extra: str):
    """``extra`` of the backend that runs ``stage`` (the first in the chain that supplies
    it), if that backend made it for that very stage function (its ``pairs_with``)."""
    backend = next(b for b in chain if getattr(b, stage) is not None)
    fn = getattr(backend, extra)
    return fn if fn is not None and getattr(fn, "pairs_with", None) is getattr(backend, stage) \
        else None


def combine_branches(
    gates: Float[Array, "B T N 3"],
    o_cmp: Float[Array, "B T N Hv"],
    o_slc: Float[Array, "B T N Hv"],
    o_swa: Float[Array, "B T N Hv"],
) -> Float[Array, "B T N Hv"]:
    """``sum_b gates[..., b] * o_b``, accumulated in f32, returned in the branches' dtype."""
    return combine_outputs(gates, o_cmp, o_slc, o_swa)
