"""Sliding-window attention in pure jnp: the twin of the window kernels.

Query ``t`` attends keys ``[max(0, t - w + 1), t]``: ``w`` keys, itself included.
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


def sliding_window_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K Hv"],
    *,
    window_size: int,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """Causal attention restricted to the last ``window_size`` keys of each query.

    Args:
      q: queries ``[B, T, N, Dk]``.
      k: keys ``[B, T, K, Dk]``.
      v: values ``[B, T, K, Dv]``.
      window_size: ``w``.
      scale: logit scale, ``1/sqrt(Dk)`` by default.
      chunk_size: queries per chunk (memory knob only).

    Returns:
      ``(o, lse)``: ``o [B, T, N, Dv]`` in ``q.dtype``, ``lse [B, T, N]`` in f32.
    """
    b, t, n, dk = q.shape
    kh, dv = k.shape[2], v.shape[-1]
    g = n // kh
    scale = default_scale(dk, scale)
    w = min(window_size, t)
    # A chunk of c queries computes c * (c + w - 1) logits for c * w useful ones: keep c near w.
    near_w = max(64, 1 << (w - 1).bit_length())
    chunk = chunk_size or min(auto_chunk_size(t, b * n * (2 * w)), near_w)
    c = max(1, min(chunk, t))
    span = c + w - 1  # keys any query of a chunk may see
    n_chunks = -(-t // c)
    # Pad w-1 keys in front (never visible) and enough behind for the last chunk's slice.
    back = n_chunks * c - t
    kp = jnp.pad(k.astype(jnp.float32), [(0, 0), (w - 1, back), (0, 0), (0, 0)])
    vp = jnp.pad(v.astype(jnp.float32), [(0, 0), (w - 1, back), (0, 0), (0, 0)])

    def body(t0, q_c):
        tc = q_c.shape[1]
        qg = q_c.astype(jnp.float32).reshape(b, tc, kh, g, dk)
        k_c = jax.lax.dynamic_slice_in_dim(kp, t0, span, axis=1)  # keys t0-w+1 .. t0+c-1
        v_c = jax.lax.dynamic_slice_in_dim(vp, t0, span, axis=1)
        s = jnp.einsum("btkgd,bskd->btkgs", qg, k_c, precision=HIGHEST) * scale
        q_pos = t0 + jnp.arange(tc, dtype=jnp.int32)[:, None]  # [c, 1]
        k_pos = t0 - (w - 1) + jnp.arange(span, dtype=jnp.int32)[None, :]  # [1, span]
        mask = (k_pos >= 0) & (k_pos <= q_pos) & (k_pos > q_pos - w)
        o, lse = masked_attention(s, mask[None, :, None, None, :], v_c, "btkgs,bskd->btkgd")
        return o.reshape(b, tc, n, dv).astype(q.dtype), lse.reshape(b, tc, n)

    o, lse = map_query_chunks(body, t, c, q)
    return o, lse
