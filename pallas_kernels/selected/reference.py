"""Selected-branch attention in pure jnp: the twin of the group-centric selected kernels.

All ``G`` query heads of a KV group at one position read the same ``n`` key blocks of ``l'``
tokens. Inside a block, keys after the query are masked (the current block is causal);
``-1`` slots are skipped. One softmax spans all selected keys of the query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.common import (
    HIGHEST,
    auto_chunk_size,
    default_scale,
    map_query_chunks,
    masked_attention,
)


def selected_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K Hv"],
    indices: Int[Array, "B T K M"],
    *,
    block_size: int,
    scale: float | None = None,
    chunk_size: int | None = None,
    forced_included: bool = False,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """Attention of each query over the key blocks its group selected.

    Args:
      q: queries ``[B, T, N, Dk]``; query ``t`` sits at position ``t``.
      k: keys ``[B, S, K, Dk]`` with ``S >= T`` (positions ``0..S-1``).
      v: values ``[B, S, K, Dv]``.
      indices: ``int32 [B, T, K, n]`` selected block indices, ``-1`` for an empty slot. A block
        must appear at most once per row.
      block_size: ``l'``.
      scale: logit scale, ``1/sqrt(Dk)`` by default.
      chunk_size: queries per chunk (memory knob only).
      forced_included: that every row holds its query's forced blocks (a promise kernels may
        use to share their loads; the function is the same, and this twin ignores it).

    Returns:
      ``(o, lse)``: ``o [B, T, N, Dv]`` in ``q.dtype``, ``lse [B, T, N]`` in f32.
    """
    del forced_included
    b, t, n, dk = q.shape
    s_len, kh, dv = k.shape[1], k.shape[2], v.shape[-1]
    g, m = n // kh, indices.shape[-1]
    scale = default_scale(dk, scale)
    nb = -(-s_len // block_size)
    pad = [(0, 0), (0, nb * block_size - s_len), (0, 0), (0, 0)]
    # [B, K, J, l', D]: blocks as a leading axis to gather from.
    kb = jnp.pad(k.astype(jnp.float32), pad).reshape(b, nb, block_size, kh, dk)
    vb = jnp.pad(v.astype(jnp.float32), pad).reshape(b, nb, block_size, kh, dv)
    kb, vb = kb.transpose(0, 3, 1, 2, 4), vb.transpose(0, 3, 1, 2, 4)

    def one_group(q_tgd, idx_tm, kb_j, vb_j, pos):
        # q_tgd [c, G, Dk], idx_tm [c, M], kb_j [J, l', Dk], vb_j [J, l', Dv], pos [c]
        safe = jnp.maximum(idx_tm, 0)
        k_sel = kb_j[safe]  # [c, M, l', Dk]
        v_sel = vb_j[safe]  # [c, M, l', Dv]
        s = jnp.einsum("tgd,tmld->tgml", q_tgd, k_sel, precision=HIGHEST) * scale
        key_pos = safe[:, :, None] * block_size + jnp.arange(block_size)  # [c, M, l']
        mask = (idx_tm[:, :, None] >= 0) & (key_pos <= pos[:, None, None])
        tc = s.shape[0]
        o, lse = masked_attention(
            s.reshape(tc, g, m * block_size),
            mask.reshape(tc, 1, m * block_size),
            v_sel.reshape(tc, m * block_size, dv),
            "tgs,tsd->tgd",
        )
        return o, lse  # [c, G, Dv], [c, G]

    per_head = jax.vmap(one_group, in_axes=(1, 1, 0, 0, None), out_axes=(1, 1))  # over K
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0, None))  # over B

    def body(t0, q_c, idx_c):
        tc = q_c.shape[1]
        qg = q_c.astype(jnp.float32).reshape(b, tc, kh, g, dk)
        pos = t0 + jnp.arange(tc, dtype=jnp.int32)
        o, lse = per_batch(qg, idx_c, kb, vb, pos)  # [B, c, K, G, Dv], [B, c, K, G]
        return o.reshape(b, tc, n, dv).astype(q.dtype), lse.reshape(b, tc, n)

    chunk = chunk_size or auto_chunk_size(t, b * kh * m * block_size * max(dk, dv))
    o, lse = map_query_chunks(body, t, chunk, q, indices)
    return o, lse
