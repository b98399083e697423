"""Compressed-branch attention on GPU: the banded Pallas-Triton kernels with strided keys.

Compressed token ``i`` covers raw tokens ``[i*d, i*d + l)`` and becomes visible to query ``t``
once its block is complete, ``i*d + l - 1 <= t``. That is banded attention with key positions
``i*d + (l-1)`` and no lower edge, so this module reuses the flash kernels of
``sliding_window/gpu.py`` (forward, ``dq`` and atomics-free ``dk/dv``), which walk only the
key blocks a query block can see (``C/2`` of ``C`` on average).

A query with no visible token gets output 0 and log-sum-exp ``-inf``; when the sequence has
no compressed token at all (``T < l``) the kernels are not launched.

``compressed_attention_cudnn`` (the GPU default where it applies) runs the same function as
one causal attention in cuDNN, by splitting the queries by residue. Counted from the first
query that sees a token, ``t = (l - 1) + u*d + r`` with ``0 <= r < d``, query ``t`` sees
exactly the tokens ``i <= u``, whatever its residue ``r``: ordinary causal attention between
the query rows ``u`` and the tokens, with the ``d`` residues of a row as extra heads (the keys
repeated per residue, so grouped-query attention maps each of them to its KV head). Queries
and tokens are padded to one length, which makes top-left and bottom-right causal alignment
the same mask; the first ``l - 1`` queries see nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float

from pallas_kernels import tuned_block_sizes
from pallas_kernels.common import QUERY_ROWS_NAME, default_scale, rows_to_every_query
from pallas_kernels.sliding_window.gpu import BlockSizes, banded_attention, check_qkv

__all__ = ["BlockSizes", "compressed_attention", "compressed_attention_cudnn",
           "compressed_attention_cudnn_rows", "residue_causal_attention", "residue_causal_rows"]


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
CausalAttention = Callable[..., tuple[Array, Array]]


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
    """Compressed attention through one causal attention call ``attend``, for the spec's
    token count ``C = (T - l) // d + 1`` (with fewer tokens, real rows would see padding).

    ``attend(q [B, L, N', Dk], k [B, L, K', Dk], v [B, L, K', Dv], scale)`` must return the
    causal attention (row ``i`` sees keys ``j <= i``, ``N' / K'`` query heads per KV head) and
    its log-sum-exp ``[B, L, N']``. Gradients flow through ``attend``'s output only, as for
    the kernels' ``lse``.
    """
    o, lse, first = residue_causal_rows(q, k_cmp, v_cmp, block_size=block_size, stride=stride,
                                        scale=scale, attend=attend,
                                        length_multiple=length_multiple)
    return rows_to_every_query(o, first, q.shape[1]), lse


def residue_causal_rows(
    q: Float[Array, "B T N H"],
    k_cmp: Float[Array, "B C K H"],
    v_cmp: Float[Array, "B C K Hv"],
    *,
    block_size: int,
    stride: int,
    scale: float,
    attend: CausalAttention,
    length_multiple: int = 128,
) -> tuple[Float[Array, "B R N Hv"], Float[Array, "B T N"], int]:
    """:func:`residue_causal_attention` without the last copy: ``(o_rows, lse, first)`` with
    ``o_rows [B, R, N, Dv]`` ``attend``'s output reshaped (no copy), row ``j`` the output of
    query ``first + j`` for ``j < T - first`` and padding after (``R >= T - first``; the
    queries before ``first`` see no token: output 0); ``lse [B, T, N]`` for every query."""
    b, t, n, dk = q.shape
    c, dv = k_cmp.shape[1], v_cmp.shape[-1]
    d = stride
    first = block_size - 1  # the first query that sees a token (when there is one)
    if c == 0 or t <= first:
        return (jnp.zeros((b, t, n, dv), q.dtype), jnp.full((b, t, n), -jnp.inf, jnp.float32), 0)
    # Rows u of d queries each, t = first + u*d + r; the last real row is u = C - 1, so real
    # rows see real tokens only. One length for rows and tokens, a multiple of length_multiple.
    rows = -(-(t - first) // d)
    length = -(-max(rows, c) // length_multiple) * length_multiple
    qr = checkpoint_name(
        jnp.pad(q[:, first:], [(0, 0), (0, length * d - (t - first)), (0, 0), (0, 0)]),
        QUERY_ROWS_NAME)
    o, lse = attend(qr.reshape(b, length, d * n, dk), _per_residue(k_cmp, length, d),
                    _per_residue(v_cmp, length, d), scale)
    o = o.reshape(b, length * d, n, dv).astype(q.dtype)
    lse = lse.reshape(b, length * d, n)[:, : t - first].astype(jnp.float32)
    return o, jnp.pad(lse, [(0, 0), (first, 0), (0, 0)], constant_values=-jnp.inf), first


def _per_residue(x, length: int, nr: int):
    """``[B, C, K, D] -> [B, length, nr*K, D]``: the tokens (zero-padded) once per residue."""
    b, c, kh, dim = x.shape
    x = jnp.pad(x, [(0, 0), (0, length - c), (0, 0), (0, 0)])
    return jnp.broadcast_to(x[:, :, None], (b, length, nr, kh, dim)).reshape(
        b, length, nr * kh, dim)


def _cudnn_causal(q, k, v, scale):
    """cuDNN's causal flash attention with its log-sum-exp (jax's cuDNN module: the public
    ``jax.nn.dot_product_attention`` does not return it). Its backward ignores the
    log-sum-exp's cotangent."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attn

    o, lse = cudnn_attn.dot_product_attention(
        q, k, v, scale=scale, mask_type=cudnn_attn.MaskType.CAUSAL, qkv_layout="BTNH",
        return_residual=True)
    return o, jnp.swapaxes(lse, 1, 2)  # [B, N, L] -> [B, L, N]


def cudnn_compressed_supported(q, k_cmp, v_cmp) -> bool:
    """Whether the cuDNN path takes these inputs: 16-bit floats and equal head dims of at most
    128, a multiple of 8 (what was measured)."""
    d = q.shape[-1]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and k_cmp.dtype == v_cmp.dtype == q.dtype
            and k_cmp.shape[-1] == v_cmp.shape[-1] == d and d % 8 == 0 and d <= 128)


# Query rows per residue (``T / d``) from which the cuDNN path is used. On the H200 (B=1, 64
# query heads, 4 KV heads, D=128, bf16; docs/results/kernels_a6fd260.md and
# kernels_64k_38422fd.md) the banded kernels were faster at 8k and 16k tokens (512 and 1024
# rows: NSA forward 3.62 against 3.91 ms, 7.46 against 7.59 ms), the two equal in the forward
# at 32k (2048 rows) with cuDNN 0.75 ms faster forward+backward, and cuDNN faster at 64k
# (forward 42.68 against 43.74 ms, forward+backward 114.4 against 120.8 ms).
CUDNN_MIN_ROWS = 2048


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
    min_rows: int = CUDNN_MIN_ROWS,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """The GPU default for the compressed branch: cuDNN's causal flash attention over the
    residue classes (:func:`residue_causal_attention`) where it applies and the sequence has
    at least ``min_rows * stride`` tokens, else the banded kernels (same signature as
    :func:`compressed_attention`)."""
    o, lse, first = compressed_attention_cudnn_rows(
        q, k_cmp, v_cmp, block_size=block_size, stride=stride, scale=scale,
        block_sizes=block_sizes, interpret=interpret, min_rows=min_rows)
    return rows_to_every_query(o, first, q.shape[1]), lse


def compressed_attention_cudnn_rows(
    q: Float[Array, "B T N H"],
    k_cmp: Float[Array, "B C K H"],
    v_cmp: Float[Array, "B C K Hv"],
    *,
    block_size: int,
    stride: int,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    min_rows: int = CUDNN_MIN_ROWS,
) -> tuple[Float[Array, "B R N Hv"], Float[Array, "B T N"], int]:
    """:func:`compressed_attention_cudnn` as ``(o_rows, lse, first)``: the output rows of
    queries ``first`` on, with the cuDNN path's own layout read in place (no copy to every
    query; ``first = l - 1``), or every query's (``first = 0``) on the banded kernels. For a
    consumer that takes such rows (``selected.gpu.selected_attention_combined``)."""
    check_qkv(q, k_cmp, v_cmp, "compressed_attention")
    if block_size < 1 or stride < 1:
        raise ValueError(f"compressed_attention: block_size={block_size} and stride={stride} "
                         "must be >= 1")
    kw = dict(block_size=block_size, stride=stride, scale=scale, block_sizes=block_sizes)
    # The residue layout relies on the spec's token count C = (T - l) // d + 1: the last real
    # query row then sees exactly token C - 1, and no padding token.
    spec_c = max((q.shape[1] - block_size) // stride + 1, 0)
    if not (interpret or k_cmp.shape[1] == 0 or k_cmp.shape[1] != spec_c
            or -(-q.shape[1] // stride) < min_rows
            or not cudnn_compressed_supported(q, k_cmp, v_cmp)):
        try:
            return residue_causal_rows(q, k_cmp, v_cmp, block_size=int(block_size),
                                       stride=int(stride),
                                       scale=default_scale(q.shape[-1], scale),
                                       attend=_cudnn_causal)
        except NotImplementedError:  # a shape jax's cuDNN path refuses: the banded kernels
            pass
    return (*compressed_attention(q, k_cmp, v_cmp, interpret=interpret, **kw), 0)
