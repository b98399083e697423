"""Compressed-branch attention in pure jnp: the twin of the compressed kernels.

Query ``t`` sees compressed token ``i`` iff its whole block is in the past,
``i*d + l - 1 <= t``. A query that sees none gets output 0 and log-sum-exp ``-inf``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels.common import (
    HIGHEST,
    auto_chunk_size,
    default_scale,
    map_query_chunks,
    masked_attention,
)


def compressed_attention(
    q: Float[Array, "B T N H"],
    k_cmp: Float[Array, "B C K H"],
    v_cmp: Float[Array, "B C K Hv"],
    *,
    block_size: int,
    stride: int,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """Attention of every query over the compressed keys it may see.

    Args:
      q: queries ``[B, T, N, Dk]``.
      k_cmp: compressed keys ``[B, C, K, Dk]``; token ``i`` covers raw ``[i*d, i*d + l)``.
      v_cmp: compressed values ``[B, C, K, Dv]``.
      block_size: ``l``.
      stride: ``d``.
      scale: logit scale, ``1/sqrt(Dk)`` by default.
      chunk_size: queries per chunk (memory knob only; the result does not depend on it).

    Returns:
      ``(o, lse)``: ``o [B, T, N, Dv]`` in ``q.dtype`` and ``lse [B, T, N]`` in f32.
    """
    b, t, n, dk = q.shape
    c, kh, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    g = n // kh
    scale = default_scale(dk, scale)
    if c == 0:  # no complete block yet anywhere in the sequence
        return jnp.zeros((b, t, n, dv), q.dtype), jnp.full((b, t, n), -jnp.inf, jnp.float32)
    kf = k_cmp.astype(jnp.float32)
    vf = v_cmp.astype(jnp.float32)
    last_pos = jnp.arange(c, dtype=jnp.int32) * stride + block_size - 1  # [C]

    def body(t0, q_c):
        tc = q_c.shape[1]
        qg = q_c.astype(jnp.float32).reshape(b, tc, kh, g, dk)  # [B, c, K, G, Dk]
        s = jnp.einsum("btkgd,bskd->btkgs", qg, kf, precision=HIGHEST) * scale
        pos = t0 + jnp.arange(tc, dtype=jnp.int32)  # [c]
        mask = (last_pos[None, :] <= pos[:, None])[None, :, None, None, :]  # [1, c, 1, 1, C]
        o, lse = masked_attention(s, mask, vf, "btkgs,bskd->btkgd")
        return o.reshape(b, tc, n, dv).astype(q.dtype), lse.reshape(b, tc, n)

    chunk = chunk_size or auto_chunk_size(t, b * n * c)
    o, lse = map_query_chunks(body, t, chunk, q)
    return o, lse


def compressed_probs(
    q: Float[Array, "B T N H"],
    k_cmp: Float[Array, "B C K H"],
    lse: Float[Array, "B T N"],
    t0: jax.Array | int,
    *,
    block_size: int,
    stride: int,
    scale: float | None = None,
) -> Float[Array, "B T N C"]:
    """The compressed branch's softmax probabilities for queries ``t0, t0+1, ...``.

    Recomputed from the logits and the branch's log-sum-exp, as a fused kernel would; 0 where a
    compressed token is not visible (and for queries that see none).
    """
    b, t, n, dk = q.shape
    c, kh = k_cmp.shape[1], k_cmp.shape[2]
    scale = default_scale(dk, scale)
    qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, dk)
    s = jnp.einsum(
        "btkgd,bskd->btkgs", qg, k_cmp.astype(jnp.float32), precision=HIGHEST
    ).reshape(b, t, n, c) * scale
    pos = t0 + jnp.arange(t, dtype=jnp.int32)
    last_pos = jnp.arange(c, dtype=jnp.int32) * stride + block_size - 1
    mask = (last_pos[None, :] <= pos[:, None])[None, :, None, :]  # [1, T, 1, C]
    safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]
    return jnp.where(mask, jnp.exp(jnp.minimum(s - safe_lse, 0.0)), 0.0)
