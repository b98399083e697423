"""NSA decode attention on GPU: Pallas kernels lowered to Triton, split flash-decoding style.

One new query per sequence reads only what NSA needs: the compressed keys, the ``n`` selected
blocks and the window. A decode step is a short chain:

1. ``nsa_decode_cmp`` (grid ``B x K x Mc``): program ``(b, k, j)`` attends the ``G`` query heads
   of KV group ``k`` over the ``j``-th share of sequence ``b``'s visible compressed tokens and
   writes a partial softmax (unnormalised output, running max, running sum) plus the scaled
   logits. Splitting the compressed tokens ``Mc`` ways is what fills the GPU at batch 1.
2. XLA: merge the partials into ``o_cmp`` and the log-sum-exp; turn the logits into the
   branch's probabilities, group-summed block scores and the top-n blocks (the twin's code).
3. ``nsa_decode_sparse`` (grid ``B x K x (n + Mw)``): programs ``j < n`` attend the selected
   block in slot ``j`` (causal inside the current block; ``-1`` slots do nothing), programs
   ``j >= n`` a share of the window ``[t - w + 1, t]``. With ``fuse_sparse=False`` these are
   two launches, ``nsa_decode_slc`` and ``nsa_decode_swa``.
4. XLA: merge each branch's partials, gate and sum.

Every program walks whole tiles of ``block_k`` keys aligned to multiples of ``block_k`` inside an
inclusive key range ``[lo, hi]`` computed per program in step 2, masking keys outside it, so
no load starts at an unaligned or out-of-bounds slot.

Layout: ``q [B, N, Dk]``, raw caches ``[B, S, K, D]`` (the window's may be a ring of
``S' >= w`` slots), compressed caches ``[B, C, K, D]``: the twin's. Limits (else
``NotImplementedError``, and callers fall back to the twin): ``Dk`` and ``Dv`` powers of two
``>= 16``; ``S``, ``S'`` and ``l'`` multiples of a power of two ``>= 16``; ``C`` a multiple of
16. Query heads per group are padded to a power of two ``>= 16``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from pallas_kernels.common import MASK_VALUE, check_int32_extent, default_scale
from pallas_kernels.decode.reference import combine_gated, num_visible_cmp, select_from_logits


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the decode kernels.

    Attributes:
      block_k: keys per tile (upper bound; the largest power of two dividing the cache is used).
      target_programs: programs to aim for per kernel (about two per SM of an H100/H200).
      num_warps, num_stages: Triton launch parameters.
      fuse_sparse: attend the selected blocks and the window in one launch (a ``lax.cond`` per
        program picks the key set) rather than two.
    """

    block_k: int = 64
    target_programs: int = 264
    num_warps: int = 4
    num_stages: int = 2
    fuse_sparse: bool = True

    def __post_init__(self):
        if self.block_k < 16 or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k must be a power of two >= 16, got {self.block_k}")
        if self.target_programs < 1:
            raise ValueError(f"target_programs must be >= 1, got {self.target_programs}")


def _pow2_divisor(x: int, cap: int) -> int:
    """Largest power of two dividing ``x``, at most ``cap``."""
    p = x & -x if x else cap
    return min(p, cap)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# Kernels ---------------------------------------------------------------------------------------

def _attend_range(q, k_ref, v_ref, lo, hi, *, scale, block_k, precision, s_ref=None,
                  ring=False):
    """Online-softmax attention of ``q [Gp, Dk]`` over keys ``[lo, hi]`` of ``k_ref [S, Dk]``.

    With ``ring``, position ``p`` is read from slot ``p % S`` (a tile never wraps: ``S`` is a
    multiple of ``block_k``).

    Returns ``(o [Gp, Dv], m [Gp], l [Gp])`` in f32: unnormalised output, max logit, sum of
    ``exp(s - m)``; an empty range gives ``(0, MASK_VALUE, 0)``.
    """
    gp, dv = q.shape[0], v_ref.shape[-1]
    first = lo // block_k
    count = jnp.where(hi >= lo, hi // block_k - first + 1, 0)

    def body(i, carry):
        o, m_i, l_i = carry
        start = pl.multiple_of((first + i) * block_k, block_k)
        slot = pl.multiple_of(start % k_ref.shape[0], block_k) if ring else start
        k = k_ref[pl.ds(slot, block_k), :]  # [BK, Dk]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # [Gp, BK]
        pos = start + jnp.arange(block_k, dtype=jnp.int32)
        valid = ((pos >= lo) & (pos <= hi))[None, :]  # [1, BK]
        s = jnp.where(valid, s, MASK_VALUE)
        if s_ref is not None:
            s_ref[:, pl.ds(start, block_k)] = s
        m_new = jnp.maximum(m_i, s.max(axis=1))  # every tile holds a valid key: m_new is real
        alpha = jnp.exp(m_i - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)  # [Gp, BK]
        v = v_ref[pl.ds(slot, block_k), :]  # [BK, Dv]
        o = alpha[:, None] * o + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return o, m_new, alpha * l_i + p.sum(axis=1)

    init = (jnp.zeros((gp, dv), jnp.float32), jnp.full((gp,), MASK_VALUE, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    return jax.lax.fori_loop(0, count, body, init)


def _range_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *s_ref, **kw):
    s_ref = s_ref[0] if s_ref else None  # the logits output, when asked for
    o, m_i, l_i = _attend_range(q_ref[...], k_ref, v_ref, lo_ref[()], hi_ref[()], s_ref=s_ref,
                                **kw)
    o_ref[...] = o
    m_ref[...] = m_i
    l_ref[...] = l_i


def _sparse_kernel(lo_ref, hi_ref, q_ref, k_slc_ref, v_slc_ref, k_swa_ref, v_swa_ref,
                   o_ref, m_ref, l_ref, *, num_slc, **kw):
    q, lo, hi = q_ref[...], lo_ref[()], hi_ref[()]
    o, m_i, l_i = jax.lax.cond(
        pl.program_id(2) < num_slc,
        lambda: _attend_range(q, k_slc_ref, v_slc_ref, lo, hi, **kw),
        lambda: _attend_range(q, k_swa_ref, v_swa_ref, lo, hi, ring=True, **kw),
    )
    o_ref[...] = o
    m_ref[...] = m_i
    l_ref[...] = l_i


# pallas_call wrappers --------------------------------------------------------------------------

def _partial_specs(gp, dv):
    return [
        pl.BlockSpec((None, None, None, gp, dv), lambda b, k, j: (b, k, j, 0, 0)),  # o
        pl.BlockSpec((None, None, None, gp), lambda b, k, j: (b, k, j, 0)),  # m
        pl.BlockSpec((None, None, None, gp), lambda b, k, j: (b, k, j, 0)),  # l
    ]


def _partial_shapes(b, kh, m, gp, dv):
    return [jax.ShapeDtypeStruct((b, kh, m, gp, dv), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, m, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, m, gp), jnp.float32)]


def _range_spec():
    return pl.BlockSpec((None, None, None), lambda b, k, j: (b, k, j))


def _seq_spec(s_len, d):
    """The whole sequence of one (batch, KV head): a pointer the kernel walks with ``pl.ds``."""
    return pl.BlockSpec((None, s_len, None, d), lambda b, k, j: (b, 0, k, 0))


def _range_call(lo, hi, qg, k, v, *, with_logits, scale, block_k, precision, params,
                interpret, name, ring=False):
    b, kh, m = lo.shape
    gp, dk = qg.shape[2:]
    s_len, dv = k.shape[1], v.shape[-1]
    kernel = functools.partial(_range_kernel, scale=scale, block_k=block_k, precision=precision,
                               ring=ring)
    out_specs, out_shape = _partial_specs(gp, dv), _partial_shapes(b, kh, m, gp, dv)
    if with_logits:
        out_specs.append(pl.BlockSpec((None, None, gp, s_len), lambda b, k, j: (b, k, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, kh, gp, s_len), jnp.float32))
    return pl.pallas_call(
        kernel,
        grid=(b, kh, m),
        in_specs=[_range_spec(), _range_spec(),
                  pl.BlockSpec((None, None, gp, dk), lambda b, k, j: (b, k, 0, 0)),
                  _seq_spec(s_len, dk), _seq_spec(s_len, dv)],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(lo, hi, qg, k, v)


def _sparse_call(lo, hi, qg, k_slc, v_slc, k_swa, v_swa, *, num_slc, scale, block_k,
                 precision, params, interpret):
    b, kh, m = lo.shape
    gp, dk = qg.shape[2:]
    dv = v_slc.shape[-1]
    kernel = functools.partial(_sparse_kernel, num_slc=num_slc, scale=scale, block_k=block_k,
                               precision=precision)
    return pl.pallas_call(
        kernel,
        grid=(b, kh, m),
        in_specs=[_range_spec(), _range_spec(),
                  pl.BlockSpec((None, None, gp, dk), lambda b, k, j: (b, k, 0, 0)),
                  _seq_spec(k_slc.shape[1], dk), _seq_spec(v_slc.shape[1], dv),
                  _seq_spec(k_swa.shape[1], dk), _seq_spec(v_swa.shape[1], dv)],
        out_specs=_partial_specs(gp, dv),
        out_shape=_partial_shapes(b, kh, m, gp, dv),
        compiler_params=params,
        interpret=interpret,
        name="nsa_decode_sparse",
    )(lo, hi, qg, k_slc, v_slc, k_swa, v_swa)


# Glue ------------------------------------------------------------------------------------------

def split_range(lo: Int[Array, "*R"], hi: Int[Array, "*R"], num_splits: int,
                block_k: int) -> tuple[Int[Array, "*R M"], Int[Array, "*R M"]]:
    """Splits inclusive key ranges ``[lo, hi]`` into ``num_splits`` runs of whole aligned tiles.

    Empty pieces come out as ``(0, -1)``.
    """
    first = lo // block_k
    ntiles = jnp.where(hi >= lo, hi // block_k - first + 1, 0)
    per = (ntiles + num_splits - 1) // num_splits
    j = jnp.arange(num_splits, dtype=jnp.int32)
    t0 = j * per[..., None]
    t1 = jnp.minimum(t0 + per[..., None], ntiles[..., None])
    lo_s = jnp.maximum(lo[..., None], (first[..., None] + t0) * block_k)
    hi_s = jnp.minimum(hi[..., None], (first[..., None] + t1) * block_k - 1)
    empty = t1 <= t0
    return jnp.where(empty, 0, lo_s).astype(jnp.int32), jnp.where(empty, -1, hi_s).astype(jnp.int32)


def merge_partials(o, m_i, l_i):
    """Merges split softmaxes along axis 2: ``o [B, K, M, G, Dv]``, ``m_i, l_i [B, K, M, G]``.

    Returns the normalised output ``[B, K, G, Dv]`` and log-sum-exp ``[B, K, G]`` (``-inf``
    where every split was empty).
    """
    m_max = m_i.max(axis=2, keepdims=True)
    alpha = jnp.exp(m_i - m_max)  # [B, K, M, G]
    l_tot = (alpha * l_i).sum(axis=2)
    o_tot = (alpha[..., None] * o).sum(axis=2)
    has = l_tot > 0
    safe = jnp.where(has, l_tot, 1.0)
    return o_tot / safe[..., None], jnp.where(has, m_max[:, :, 0] + jnp.log(safe), -jnp.inf)


def decode_attention(
    q: Float[Array, "B N H"],
    k_cmp: Float[Array, "B C K H"],
    v_cmp: Float[Array, "B C K Hv"],
    k_slc: Float[Array, "B S K H"],
    v_slc: Float[Array, "B S K Hv"],
    k_swa: Float[Array, "B S K H"],
    v_swa: Float[Array, "B S K Hv"],
    gates: Float[Array, "B N 3"],
    seq_lens: Int[Array, " B"],
    *,
    cmp_block_size: int,
    cmp_stride: int,
    slc_block_size: int,
    top_n: int,
    window_size: int,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[Float[Array, "B N Hv"], Int[Array, "B K M"]]:
    """NSA output of the newest query of each sequence; the signature of the twin in
    ``reference.py`` plus ``block_sizes`` and ``interpret`` (run the kernels on CPU).

    Returns:
      ``(o [B, N, Dv] in q.dtype, indices int32 [B, K, n])``.
    """
    bs = block_sizes or BlockSizes()
    b, n, dk = q.shape
    c, kh, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    g = n // kh
    for name, d in (("Dk", dk), ("Dv", dv)):
        if d < 16 or d & (d - 1):
            raise NotImplementedError(
                f"decode kernel needs power-of-two head dims >= 16: {name}={d}")
    block_kc = _pow2_divisor(c, bs.block_k)
    if c == 0 or block_kc < 16:
        raise NotImplementedError(f"compressed cache length C={c} is not a multiple of 16")
    s_slc, s_swa = k_slc.shape[1], k_swa.shape[1]
    check_int32_extent("decode_attention", k_slc=k_slc.shape, k_swa=k_swa.shape,
                       v_slc=v_slc.shape, v_swa=v_swa.shape)
    block_k = _pow2_divisor(slc_block_size, bs.block_k)
    block_k = min(block_k, _pow2_divisor(s_slc, bs.block_k), _pow2_divisor(s_swa, bs.block_k))
    if block_k < 16:
        raise NotImplementedError(f"l'={slc_block_size}, S={s_slc}, S'={s_swa} share no "
                                  "power-of-two tile >= 16")
    scale = default_scale(dk, scale)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    params = plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)
    common = dict(scale=scale, precision=precision, params=params, interpret=interpret)

    gp = max(16, _next_pow2(g))
    qg = jnp.pad(q.reshape(b, kh, g, dk), [(0, 0), (0, 0), (0, gp - g), (0, 0)])  # [B,K,Gp,Dk]
    t = seq_lens.astype(jnp.int32) - 1  # [B]

    # 1. Compressed branch, split over the compressed tokens.
    per_row = b * kh
    mc = min(_next_pow2(-(-bs.target_programs // per_row)), c // block_kc)
    hi_c = jnp.broadcast_to((num_visible_cmp(t + 1, cmp_block_size, cmp_stride) - 1)[:, None],
                            (b, kh))
    lo_c, hi_c = split_range(jnp.zeros_like(hi_c), hi_c, mc, block_kc)  # [B, K, Mc]
    o_p, m_p, l_p, s_cmp = _range_call(lo_c, hi_c, qg, k_cmp, v_cmp, with_logits=True,
                                       block_k=block_kc, name="nsa_decode_cmp", **common)
    o_cmp, lse_cmp = merge_partials(o_p[:, :, :, :g], m_p[..., :g], l_p[..., :g])

    # 2. Selection from the branch's own probabilities.
    indices = select_from_logits(
        s_cmp[:, :, :g], lse_cmp, t + 1, num_blocks=-(-s_slc // slc_block_size),
        cmp_block_size=cmp_block_size, cmp_stride=cmp_stride, slc_block_size=slc_block_size,
        top_n=top_n,
    )  # [B, K, n]

    # 3. Selected blocks and the window (one launch, or one each).
    lo_s = indices * slc_block_size
    hi_s = jnp.minimum(lo_s + slc_block_size - 1, t[:, None, None])
    lo_s, hi_s = jnp.where(indices >= 0, lo_s, 0), jnp.where(indices >= 0, hi_s, -1)
    mw = max(1, min(-(-window_size // block_k) + 1, -(-bs.target_programs // per_row)))
    lo_w = jnp.broadcast_to(jnp.maximum(t - window_size + 1, 0)[:, None], (b, kh))
    lo_w, hi_w = split_range(lo_w, jnp.broadcast_to(t[:, None], (b, kh)), mw, block_k)
    if bs.fuse_sparse:
        lo_all = jnp.concatenate([lo_s, lo_w], axis=2)  # [B, K, n + Mw]
        hi_all = jnp.concatenate([hi_s, hi_w], axis=2)
        o_p, m_p, l_p = _sparse_call(lo_all, hi_all, qg, k_slc, v_slc, k_swa, v_swa,
                                     num_slc=top_n, block_k=block_k, **common)
        parts_slc = (o_p[:, :, :top_n], m_p[:, :, :top_n], l_p[:, :, :top_n])
        parts_swa = (o_p[:, :, top_n:], m_p[:, :, top_n:], l_p[:, :, top_n:])
    else:
        kw = dict(with_logits=False, block_k=block_k, **common)
        parts_slc = _range_call(lo_s, hi_s, qg, k_slc, v_slc, name="nsa_decode_slc", **kw)
        parts_swa = _range_call(lo_w, hi_w, qg, k_swa, v_swa, name="nsa_decode_swa", ring=True,
                                **kw)
    o_slc, _ = merge_partials(*(x[:, :, :, :g] for x in parts_slc))
    o_swa, _ = merge_partials(*(x[:, :, :, :g] for x in parts_swa))

    # 4. Gates.
    o = combine_gated(gates, o_cmp.reshape(b, n, dv), o_slc.reshape(b, n, dv),
                      o_swa.reshape(b, n, dv), q.dtype)
    return o, indices
