"""Compressed-branch attention on GPU: the banded Pallas-Triton kernels with strided keys.

Compressed token ``i`` covers raw tokens ``[i*d, i*d + l)`` and becomes visible to query ``t``
once its block is complete, ``i*d + l - 1 <= t``. That is banded attention with key positions
``i*d + (l-1)`` and no lower edge, so this module reuses the flash kernels of
``sliding_window/gpu.py`` (forward, ``dq`` and atomics-free ``dk/dv``), which walk only the
key blocks a query block can see (``C/2`` of ``C`` on average).

A query with no visible token gets output 0 and log-sum-exp ``-inf``; when the sequence has
no compressed token at all (``T < l``) the kernels are not launched.

``compressed_attention_cudnn`` (the GPU default where it applies) runs the same function as
causal attention in cuDNN, by splitting the queries by residue. Query ``t = u*d + r`` sees the
tokens ``i <= u + floor((r - l + 1) / d)``: for a fixed residue ``r`` that is ordinary causal
attention between the query rows ``u`` and the tokens, shifted by a constant. The offset takes
two values over the residues, so two causal calls cover every query: each takes the residues
of one offset as extra heads (the keys repeated per residue, so grouped-query attention maps
each of them to its KV head), drops the rows that see nothing, and pads queries and tokens to
one length, which makes top-left and bottom-right causal alignment the same mask.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels import tuned_block_sizes
from pallas_kernels.common import default_scale
from pallas_kernels.sliding_window.gpu import BlockSizes, banded_attention, check_qkv

__all__ = ["BlockSizes", "CausalAttention", "compressed_attention",
           "compressed_attention_cudnn", "residue_causal_attention"]


def compressed_attention(
    q: Float[Array, "B T N H"],
    k_cmp: Float[Array, "B C K H"],
    v_cmp: Float[Array, "B C K Hv"],
    *,
    block_size: int,
    stride: int,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """Attention of every query over the compressed tokens it may see; twin of ``reference.py``.

    Args:
      q: queries ``[B, T, N, Dk]``.
      k_cmp: compressed keys ``[B, C, K, Dk]``; token ``i`` covers raw ``[i*d, i*d + l)``.
      v_cmp: compressed values ``[B, C, K, Dv]``.
      block_size: ``l``.
      stride: ``d``.
      scale: logit scale, ``1/sqrt(Dk)`` by default.
      block_sizes: tiles; the tuned table by default.
      interpret: run in the Pallas interpreter.

    Returns:
      ``(o, lse)``: ``o [B, T, N, Dv]`` in ``q.dtype`` and ``lse [B, T, N]`` in f32.
    """
    check_qkv(q, k_cmp, v_cmp, "compressed_attention")
    if block_size < 1 or stride < 1:
        raise ValueError(f"compressed_attention: block_size={block_size} and stride={stride} "
                         "must be >= 1")
    b, t, n, _ = q.shape
    c, dv = k_cmp.shape[1], v_cmp.shape[-1]
    if c == 0:
        return jnp.zeros((b, t, n, dv), q.dtype), jnp.full((b, t, n), -jnp.inf, jnp.float32)
    bs = block_sizes or BlockSizes(**tuned_block_sizes.COMPRESSED)
    return banded_attention(q, k_cmp, v_cmp, key_stride=int(stride),
                            key_offset=int(block_size) - 1, window=None,
                            scale=default_scale(q.shape[-1], scale), block_sizes=bs,
                            interpret=interpret, name="cmp")


# ------------------------------------------------------------------------------------------
# The same function as causal attention, split by query residue (cuDNN on GPU)
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CausalAttention:
    """A causal attention (row ``i`` sees keys ``j <= i``; ``N' / K'`` query heads per KV head)
    as two functions on ``q [B, L, N', Dk]``, ``k [B, L, K', Dk]``, ``v [B, L, K', Dv]``:

    * ``fwd(q, k, v, scale) -> (o [B, L, N', Dv], lse [B, L, N'])``;
    * ``bwd(q, k, v, o, lse, do, scale) -> (dq, dk, dv)`` from the forward's ``o`` and ``lse``.
    """

    fwd: Callable
    bwd: Callable


def residue_classes(block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """``(first residue, end residue, rows dropped)`` for each offset class.

    Query ``t = u*d + r`` sees tokens ``i <= u - s_r`` with ``s_r = -floor((r - l + 1) / d)``;
    ``s_r`` is ``s`` for ``r < r*`` and ``s - 1`` from ``r* = l - 1 - (s - 1) d`` on (one class
    when ``r* = d``).
    """
    l, d = block_size, stride  # noqa: E741 (the paper's symbols)
    s = -((1 - l) // d)
    r_star = l - 1 - (s - 1) * d
    classes = [(0, r_star, s)]
    if r_star < d:
        classes.append((r_star, d, s - 1))
    return classes


@dataclasses.dataclass(frozen=True)
class _Residue:
    block_size: int
    stride: int
    scale: float
    attend: CausalAttention
    length_multiple: int

    def classes(self, t: int, c: int):
        """``(r0, r1, s, rows, length)`` of each class: its ``rows`` query rows (``u >= s``)
        see at least token 0 (none when ``rows <= 0`` or ``c = 0``: then ``length = 0`` and
        nothing is computed); rows and tokens are padded to ``length`` (padding rows are
        dropped, padding tokens come after every real row's last visible token), so top-left
        and bottom-right causal alignment agree."""
        u_rows = -(-t // self.stride)
        out = []
        for r0, r1, s in residue_classes(self.block_size, self.stride):
            rows = u_rows - s
            if rows > 0 and c > 0:
                m = self.length_multiple
                out.append((r0, r1, s, rows, -(-max(rows, c) // m) * m))
            else:
                out.append((r0, r1, u_rows, 0, 0))
        return out


def _by_residue(x, d: int):
    """``[B, T, N, D] -> [B, U, d, N, D]`` (``T`` zero-padded to ``U d``)."""
    b, t = x.shape[:2]
    u_rows = -(-t // d)
    x = jnp.pad(x, [(0, 0), (0, u_rows * d - t)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(b, u_rows, d, *x.shape[2:])


def _class_rows(xv, r0, r1, s, rows, length, fill=0.0):
    """Rows ``u >= s`` of residues ``[r0, r1)`` as ``[B, length, (r1-r0)*N, ...]``."""
    b = xv.shape[0]
    x = xv[:, s:, r0:r1].reshape(b, rows, (r1 - r0) * xv.shape[3], *xv.shape[4:])
    return jnp.pad(x, [(0, 0), (0, length - rows)] + [(0, 0)] * (x.ndim - 2),
                   constant_values=fill)


def _per_residue(x, length: int, nr: int):
    """``[B, C, K, D] -> [B, length, nr*K, D]``: the tokens (zero-padded) once per residue."""
    b, c, kh, dim = x.shape
    x = jnp.pad(x, [(0, 0), (0, length - c), (0, 0), (0, 0)])
    return jnp.broadcast_to(x[:, :, None], (b, length, nr, kh, dim)).reshape(
        b, length, nr * kh, dim)


def _assemble(parts, t: int, u_rows: int, n: int, fill):
    """Per-class ``(x [B, length, nr*N, ...], r0, r1, s, rows)`` back to ``[B, T, N, ...]``,
    ``fill`` for the rows no class computes."""
    pieces = []
    b = parts[0][0].shape[0] if parts else 0
    for x, r0, r1, s, rows in parts:
        x = x[:, :rows].reshape(b, rows, r1 - r0, n, *x.shape[3:])
        pieces.append((r0, jnp.pad(x, [(0, 0), (s, 0)] + [(0, 0)] * (x.ndim - 2),
                                   constant_values=fill)))
    pieces.sort(key=lambda p: p[0])
    x = jnp.concatenate([p for _, p in pieces], axis=2)
    return x.reshape(b, u_rows * x.shape[2], *x.shape[3:])[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _residue(q, k_cmp, v_cmp, cfg: _Residue):
    return _residue_fwd(q, k_cmp, v_cmp, cfg)[0]


def _residue_fwd(q, k_cmp, v_cmp, cfg: _Residue):
    b, t, n, _ = q.shape
    c, dv, d = k_cmp.shape[1], v_cmp.shape[-1], cfg.stride
    u_rows = -(-t // d)
    qv = _by_residue(q, d)
    o_parts, l_parts = [], []
    for r0, r1, s, rows, length in cfg.classes(t, c):
        nr = r1 - r0
        if length:
            o, lse = cfg.attend.fwd(_class_rows(qv, r0, r1, s, rows, length),
                                    _per_residue(k_cmp, length, nr),
                                    _per_residue(v_cmp, length, nr), cfg.scale)
        else:  # every row of the class sees nothing: output 0, lse -inf
            o, lse = jnp.zeros((b, 0, nr * n, dv), q.dtype), jnp.zeros((b, 0, nr * n))
        o_parts.append((o.astype(q.dtype), r0, r1, s, rows))
        l_parts.append((lse.astype(jnp.float32), r0, r1, s, rows))
    o = _assemble(o_parts, t, u_rows, n, 0.0)
    lse = _assemble(l_parts, t, u_rows, n, -jnp.inf)
    # The residuals are the inputs and the assembled outputs: the per-class copies are
    # recomputed in the backward (cheap slices), not kept alive between the passes.
    return (o, lse), (q, k_cmp, v_cmp, o, lse)


def _residue_bwd(cfg: _Residue, res, cts):
    q, k_cmp, v_cmp, o, lse = res
    do, _ = cts  # no gradient flows back through the log-sum-exp output, as in the kernels
    b, t, n, dkh = q.shape
    c, kh, d = k_cmp.shape[1], k_cmp.shape[2], cfg.stride
    u_rows = -(-t // d)
    qv, ov, dov = _by_residue(q, d), _by_residue(o, d), _by_residue(do.astype(q.dtype), d)
    lv = _by_residue(jnp.where(jnp.isfinite(lse), lse, 0.0), d)
    dq_parts = []
    dk = jnp.zeros(k_cmp.shape, jnp.float32)
    dv = jnp.zeros(v_cmp.shape, jnp.float32)
    for r0, r1, s, rows, length in cfg.classes(t, c):
        nr = r1 - r0
        if not length:
            dq_parts.append((jnp.zeros((b, 0, nr * n, dkh), q.dtype), r0, r1, s, rows))
            continue
        rc = (r0, r1, s, rows, length)
        dq_c, dk_c, dv_c = cfg.attend.bwd(
            _class_rows(qv, *rc), _per_residue(k_cmp, length, nr),
            _per_residue(v_cmp, length, nr), _class_rows(ov, *rc), _class_rows(lv, *rc),
            _class_rows(dov, *rc), cfg.scale)
        dq_parts.append((dq_c.astype(q.dtype), r0, r1, s, rows))
        dk = dk + dk_c.reshape(b, length, nr, kh, -1)[:, :c].astype(jnp.float32).sum(2)
        dv = dv + dv_c.reshape(b, length, nr, kh, -1)[:, :c].astype(jnp.float32).sum(2)
    dq = _assemble(dq_parts, t, u_rows, n, 0.0)
    return dq, dk.astype(k_cmp.dtype), dv.astype(v_cmp.dtype)


_residue.defvjp(_residue_fwd, _residue_bwd)


def residue_causal_attention(
    q: Float[Array, "B T N H"],
    k_cmp: Float[Array, "B C K H"],
    v_cmp: Float[Array, "B C K Hv"],
    *,
    block_size: int,
    stride: int,
    scale: float,
    attend: CausalAttention,
    length_multiple: int = 128,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """Compressed attention through a causal attention ``attend`` (see :class:`CausalAttention`),
    with its own VJP: the forward keeps only the inputs and the assembled output and lse, and
    the backward rebuilds the per-class inputs (slices) for ``attend.bwd``. No gradient flows
    through the returned ``lse``, as for the kernels'."""
    cfg = _Residue(block_size=int(block_size), stride=int(stride), scale=float(scale),
                   attend=attend, length_multiple=int(length_multiple))
    return _residue(q, k_cmp, v_cmp, cfg)


def _cudnn_fwd(q, k, v, scale):
    """cuDNN's causal flash attention with its log-sum-exp (jax's cuDNN module: the public
    ``jax.nn.dot_product_attention`` does not return it)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attn

    o, lse = cudnn_attn.dot_product_attention(
        q, k, v, scale=scale, mask_type=cudnn_attn.MaskType.CAUSAL, qkv_layout="BTNH",
        return_residual=True)
    return o, jnp.swapaxes(lse, 1, 2)  # [B, N, L] -> [B, L, N]


def _cudnn_bwd(q, k, v, o, lse, do, scale):
    """cuDNN's causal flash-attention backward from the forward's output and lse (the rule
    jax's own VJP of :func:`_cudnn_fwd` applies, with the same static arguments)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attn

    unused = jnp.zeros(0, q.dtype)
    res = (q, k, v) + (unused,) * 7 + (jnp.swapaxes(lse, 1, 2).astype(jnp.float32), o)
    grads = cudnn_attn._dot_product_attention_bwd_rule(
        scale, 42, 0.0, (False, False), cudnn_attn.MaskType.CAUSAL,
        cudnn_attn.AttentionLayout.BTNH.value, None, True, False, res, do)
    return grads[0], grads[1], grads[2]


CUDNN_CAUSAL = CausalAttention(fwd=_cudnn_fwd, bwd=_cudnn_bwd)


def cudnn_compressed_supported(q, k_cmp, v_cmp) -> bool:
    """Whether the cuDNN path takes these inputs: 16-bit floats and equal head dims of at most
    128, a multiple of 8 (what was measured)."""
    d = q.shape[-1]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and k_cmp.dtype == v_cmp.dtype == q.dtype
            and k_cmp.shape[-1] == v_cmp.shape[-1] == d and d % 8 == 0 and d <= 128)


def compressed_attention_cudnn(
    q: Float[Array, "B T N H"],
    k_cmp: Float[Array, "B C K H"],
    v_cmp: Float[Array, "B C K Hv"],
    *,
    block_size: int,
    stride: int,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """The GPU default for the compressed branch: cuDNN's causal flash attention over the
    residue classes (:func:`residue_causal_attention`) where it applies, else the banded
    kernels (same signature as :func:`compressed_attention`)."""
    check_qkv(q, k_cmp, v_cmp, "compressed_attention")
    if block_size < 1 or stride < 1:
        raise ValueError(f"compressed_attention: block_size={block_size} and stride={stride} "
                         "must be >= 1")
    kw = dict(block_size=block_size, stride=stride, scale=scale, block_sizes=block_sizes)
    if interpret or k_cmp.shape[1] == 0 or not cudnn_compressed_supported(q, k_cmp, v_cmp):
        return compressed_attention(q, k_cmp, v_cmp, interpret=interpret, **kw)
    try:
        return residue_causal_attention(
            q, k_cmp, v_cmp, block_size=int(block_size), stride=int(stride),
            scale=default_scale(q.shape[-1], scale), attend=CUDNN_CAUSAL)
    except NotImplementedError:  # a shape jax's cuDNN path refuses: the banded kernels
        return compressed_attention(q, k_cmp, v_cmp, **kw)
