"""Block selection in pure jnp: importance scores (spec Eq. 8-10) and the top-n.

Selection block ``j`` covers raw tokens ``[j*l', (j+1)*l')``. Its score for a query sums the
compressed probabilities of every compressed token whose block overlaps it, weighted by the
overlap length in units of ``d`` (with ``l=32, d=16, l'=64``: tokens ``4j-1..4j+3`` with weights
``1,2,2,2,1``), then over the ``G`` heads of the KV group. The paper's printed Eq. 9 indexes
``4j-4..4j``; that is an error and is not followed.

Top-n: block 0, the current block ``t//l'`` and the previous one are forced; the other slots
take the best-scoring valid blocks, ties to the lower index; unused slots hold ``-1``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from pallas_kernels.common import auto_chunk_size, map_query_chunks
from pallas_kernels.compressed.reference import compressed_probs

NUM_FORCED = 3  # block 0, the current block and the previous block


def overlap_weights(cmp_block_size: int, cmp_stride: int, slc_block_size: int) -> np.ndarray:
    """Weights of the compressed tokens ``j*r' - r + 1 + o`` (``o = 0..r'+r-2``) for block ``j``.

    With ``r = l/d`` and ``r' = l'/d``, compressed token ``i`` overlaps block ``j`` by
    ``min(i + r, (j+1) r') - max(i, j r')`` strides; the value depends on ``i - j r'`` only.
    """
    r, rp = cmp_block_size // cmp_stride, slc_block_size // cmp_stride
    e = np.arange(rp + r - 1) - (r - 1)  # i - j*r'
    return (np.minimum(e + r, rp) - np.maximum(e, 0)).astype(np.float32)



def check_geometry(what: str, cmp_block_size: int, cmp_stride: int, slc_block_size: int) -> None:
    """``ValueError`` naming ``l, d, l'`` unless ``d | l``, ``d | l'`` and ``l <= l'``."""
    l, d, lp = cmp_block_size, cmp_stride, slc_block_size  # noqa: E741 (the paper's symbols)
    if min(l, d, lp) < 1 or l % d or lp % d or l > lp:
        raise ValueError(f"{what}: need d | l, d | l' and l <= l'; got l={l}, d={d}, l'={lp}")


def overlap_tables(cmp_block_size: int, cmp_stride: int, slc_block_size: int,
                   chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """The overlap weights of one chunk of ``chunk`` compressed tokens (a multiple of ``r'``)
    laid out for kernels that walk the tokens chunk by chunk.

    Returns ``(w_in, w_next)``, both float32 ``[chunk, chunk / r']``: ``w_in[a, b]`` weighs
    chunk token ``a`` for the chunk's block ``b``, ``w_next[a, b]`` for the next chunk's block
    ``b`` (only block 0 and the last ``r - 1`` tokens are non-zero).
    """
    r, rp = cmp_block_size // cmp_stride, slc_block_size // cmp_stride
    w = overlap_weights(cmp_block_size, cmp_stride, slc_block_size)  # o = i - j*r' + r - 1
    a = np.arange(chunk)[:, None]
    bb = np.arange(chunk // rp)[None, :]

    def table(o):
        inside = (o >= 0) & (o < len(w))
        return np.where(inside, w[np.clip(o, 0, len(w) - 1)], 0.0).astype(np.float32)

    return table(a - bb * rp + r - 1), table(a - chunk - bb * rp + r - 1)

def block_scores_from_probs(
    p_cmp: Float[Array, "B T N C"],
    num_kv_heads: int,
    num_blocks: int,
    *,
    cmp_block_size: int,
    cmp_stride: int,
    slc_block_size: int,
) -> Float[Array, "B T K J"]:
    """Group-summed selection scores ``s[b, t, k, j]`` from compressed probabilities."""
    b, t, n, c = p_cmp.shape
    r, rp = cmp_block_size // cmp_stride, slc_block_size // cmp_stride
    # The scores are linear in p, so sum the group's heads first (G times less work).
    p = p_cmp.reshape(b, t, num_kv_heads, n // num_kv_heads, c).sum(axis=3)  # [B, T, K, C]
    # Left-pad by r - 1 so token j*r' - r + 1 + o sits at padded index j*r' + o.
    total = num_blocks * rp + r - 1
    p = jnp.pad(p, [(0, 0), (0, 0), (0, 0), (r - 1, max(0, total - (c + r - 1)))])
    p = p[..., :total]
    w = overlap_weights(cmp_block_size, cmp_stride, slc_block_size)
    scores = jnp.zeros((b, t, num_kv_heads, num_blocks), jnp.float32)
    for o, w_o in enumerate(w):  # r' + r - 1 strided slices (5 for the paper's sizes)
        scores = scores + w_o * p[..., o : o + num_blocks * rp : rp]
    return scores


def top_n_blocks(
    scores: Float[Array, "B T K J"],
    t0: jax.Array | int,
    *,
    slc_block_size: int,
    top_n: int,
) -> Int[Array, "B T K M"]:
    """Forced blocks plus the best-scoring valid blocks; ``-1`` for unused slots.

    Slots come out in descending priority: forced blocks first (ascending index), then the rest
    by score. Ties go to the lower block index (``lax.top_k`` keeps the lower index first).
    """
    b, t, kh, nb = scores.shape
    pos = t0 + jnp.arange(t, dtype=jnp.int32)  # [T]
    cur = (pos // slc_block_size)[:, None]  # [T, 1]
    j = jnp.arange(nb, dtype=jnp.int32)[None, :]  # [1, J]
    valid = (j <= cur)[None, :, None, :]  # [1, T, 1, J]
    forced = ((j == 0) | (j == cur) | (j == cur - 1))[None, :, None, :]
    pri = jnp.where(forced, jnp.inf, scores)
    pri = jnp.where(valid, pri, -jnp.inf)  # [B, T, K, J]
    k = min(top_n, nb)
    vals, idx = jax.lax.top_k(pri, k)
    idx = jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)
    if k < top_n:
        idx = jnp.pad(idx, [(0, 0), (0, 0), (0, 0), (0, top_n - k)], constant_values=-1)
    return idx


def select_blocks(
    q: Float[Array, "B T N H"],
    k_cmp: Float[Array, "B C K H"],
    lse_cmp: Float[Array, "B T N"],
    *,
    seq_len: int | None = None,
    cmp_block_size: int,
    cmp_stride: int,
    slc_block_size: int,
    top_n: int,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> Int[Array, "B T K M"]:
    """Selected block indices per query and KV group, from the compressed branch's own scores.

    Args:
      q: queries ``[B, T, N, Dk]``.
      k_cmp: compressed keys ``[B, C, K, Dk]``.
      lse_cmp: the compressed branch's log-sum-exp ``[B, T, N]`` (``-inf`` for empty rows).
      seq_len: length of the key sequence (defaults to ``T``); fixes the number of blocks.
      cmp_block_size, cmp_stride, slc_block_size: ``l``, ``d``, ``l'``.
      top_n: ``n``, slots per query, forced blocks included.
      scale: logit scale of the compressed branch.
      chunk_size: queries per chunk (memory knob only).

    Returns:
      ``int32 [B, T, K, n]`` block indices, ``-1`` for unused slots. No gradient.
    """
    b, t, n, _ = q.shape
    c, kh = k_cmp.shape[1], k_cmp.shape[2]
    nb = -(-(seq_len or t) // slc_block_size)
    q = jax.lax.stop_gradient(q)
    k_cmp = jax.lax.stop_gradient(k_cmp)
    lse_cmp = jax.lax.stop_gradient(lse_cmp)
    geom = dict(cmp_block_size=cmp_block_size, cmp_stride=cmp_stride, slc_block_size=slc_block_size)

    def body(t0, q_c, lse_c):
        if c == 0:
            scores = jnp.zeros((b, q_c.shape[1], kh, nb), jnp.float32)
        else:
            p = compressed_probs(q_c, k_cmp, lse_c, t0, block_size=cmp_block_size,
                                 stride=cmp_stride, scale=scale)
            scores = block_scores_from_probs(p, kh, nb, **geom)
        return (top_n_blocks(scores, t0, slc_block_size=slc_block_size, top_n=top_n),)

    chunk = chunk_size or auto_chunk_size(t, b * n * max(c, nb))
    (idx,) = map_query_chunks(body, t, chunk, q, lse_cmp)
    return idx


def selection_scores(
    q: Float[Array, "B T N H"],
    k_cmp: Float[Array, "B C K H"],
    lse_cmp: Float[Array, "B T N"],
    *,
    seq_len: int | None = None,
    cmp_block_size: int,
    cmp_stride: int,
    slc_block_size: int,
    scale: float | None = None,
) -> Float[Array, "B T K J"]:
    """The full ``[B, T, K, J]`` score array (for tests and inspection; ``O(T^2/l')`` memory)."""
    t, kh = q.shape[1], k_cmp.shape[2]
    nb = -(-(seq_len or t) // slc_block_size)
    if k_cmp.shape[1] == 0:
        return jnp.zeros((q.shape[0], t, kh, nb), jnp.float32)
    p = compressed_probs(q, k_cmp, lse_cmp, 0, block_size=cmp_block_size, stride=cmp_stride,
                         scale=scale)
    return block_scores_from_probs(p, kh, nb, cmp_block_size=cmp_block_size,
                                   cmp_stride=cmp_stride, slc_block_size=slc_block_size)
