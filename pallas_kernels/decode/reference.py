"""NSA decode attention in pure jnp: one new query per sequence, read from a KV cache.

The twin of the GPU decode kernels (``gpu.py``) and the XLA decode path on every platform.
For the query at position ``t = seq_lens - 1`` (its own key and value already in the cache) it
computes exactly what the full-sequence forward computes at row ``t``:

- the compressed branch over the compressed tokens ``i`` with ``i*d + l - 1 <= t``;
- the selection scores from that branch's own probabilities, summed over the group, and the
  top-n blocks (forced block 0, current and previous block, ties to the lower index);
- the selected branch over the chosen blocks, causal inside the current block;
- the sliding window over keys ``[t - w + 1, t]``;
- the gated sum of the three branches.

Cache layout is sequence-first like the training path: raw keys ``[B, S, K, Dk]`` with slot
``s`` holding position ``s`` (the window's keys may instead be a ring of ``S' >= w`` slots,
position ``p`` in slot ``p % S'``); compressed keys ``[B, C, K, Dk]`` with slot ``i`` holding
compressed token ``i``. Slots past a sequence's length may hold anything finite; they are
masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.common import HIGHEST, default_scale, masked_attention
from pallas_kernels.selection.reference import block_scores_from_probs, top_n_blocks


def num_visible_cmp(seq_lens: Int[Array, " B"], block_size: int, stride: int) -> Int[Array, " B"]:
    """Compressed tokens complete after ``seq_lens`` raw tokens: ``max(0, (L - l)//d + 1)``."""
    return jnp.where(seq_lens >= block_size, (seq_lens - block_size) // stride + 1, 0)


def select_from_logits(
    s_cmp: Float[Array, "B K G C"],
    lse_cmp: Float[Array, "B K G"],
    seq_lens: Int[Array, " B"],
    *,
    num_blocks: int,
    cmp_block_size: int,
    cmp_stride: int,
    slc_block_size: int,
    top_n: int,
) -> Int[Array, "B K M"]:
    """Top-n selection blocks of one query per sequence from its compressed-branch logits.

    Args:
      s_cmp: scaled logits of the compressed branch ``[B, K, G, C]`` (any value where masked).
      lse_cmp: the branch's log-sum-exp ``[B, K, G]`` (``-inf`` where nothing is visible).
      seq_lens: tokens in the cache, the query's own included ``[B]``.
      num_blocks: ``J``, selection blocks in the raw cache.
      cmp_block_size, cmp_stride, slc_block_size: ``l``, ``d``, ``l'``.
      top_n: ``n``.

    Returns:
      ``int32 [B, K, n]`` block indices, ``-1`` for unused slots.
    """
    b, kh, g, c = s_cmp.shape
    visible = jnp.arange(c, dtype=jnp.int32)[None, :] < num_visible_cmp(
        seq_lens, cmp_block_size, cmp_stride)[:, None]  # [B, C]
    # The same expression as the training path's probabilities (compressed_probs).
    safe_lse = jnp.where(jnp.isfinite(lse_cmp), lse_cmp, 0.0)[..., None]
    p = jnp.where(visible[:, None, None, :], jnp.exp(jnp.minimum(s_cmp - safe_lse, 0.0)), 0.0)
    p = p.reshape(b, 1, kh * g, c)  # [B, 1, N, C]
    scores = block_scores_from_probs(
        p, kh, num_blocks, cmp_block_size=cmp_block_size, cmp_stride=cmp_stride,
        slc_block_size=slc_block_size,
    )  # [B, 1, K, J]

    def one(scores_1kj, t):
        return top_n_blocks(scores_1kj[None], t, slc_block_size=slc_block_size, top_n=top_n)[0]

    return jax.vmap(one)(scores, seq_lens - 1)[:, 0]  # [B, K, n]


def combine_gated(
    gates: Float[Array, "B N 3"],
    o_cmp: Float[Array, "B N Hv"],
    o_slc: Float[Array, "B N Hv"],
    o_swa: Float[Array, "B N Hv"],
    dtype,
) -> Float[Array, "B N Hv"]:
    """``sum gates * o`` in f32, each branch first rounded to ``dtype`` as the forward does."""
    g = gates.astype(jnp.float32)[..., None]  # [B, N, 3, 1]
    def rounded(o):
        return o.astype(dtype).astype(jnp.float32)

    out = g[:, :, 0] * rounded(o_cmp) + g[:, :, 1] * rounded(o_slc) + g[:, :, 2] * rounded(o_swa)
    return out.astype(dtype)


def check_decode_args(what: str, q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, seq_lens,
                      window_size: int) -> None:
    """``ValueError`` naming the shapes when the decode arguments do not fit together."""
    shapes = dict(q=q.shape, k_cmp=k_cmp.shape, v_cmp=v_cmp.shape, k_slc=k_slc.shape,
                  v_slc=v_slc.shape, k_swa=k_swa.shape, v_swa=v_swa.shape, gates=gates.shape,
                  seq_lens=seq_lens.shape)
    listed = ", ".join(f"{k}={v}" for k, v in shapes.items())
    if q.ndim != 3 or any(x.ndim != 4 for x in (k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa)):
        raise ValueError(f"{what}: need q [B, N, Dk] and caches [B, S, K, D]; got {listed}")
    b, n, dk = q.shape
    kh = k_cmp.shape[2]
    if any(x.shape[0] != b or x.shape[2] != kh for x in (k_cmp, v_cmp, k_slc, v_slc, k_swa,
                                                          v_swa)):
        raise ValueError(f"{what}: every cache must be [B={b}, S, K, D] with the same K; "
                         f"got {listed}")
    if kh == 0 or n % kh:
        raise ValueError(f"{what}: N={n} query heads must be a multiple of K={kh} KV heads")
    if k_cmp.shape[3] != dk or k_slc.shape[3] != dk or k_swa.shape[3] != dk:
        raise ValueError(f"{what}: keys must have Dk={dk} (q's); got {listed}")
    dv = v_cmp.shape[3]
    if v_slc.shape[3] != dv or v_swa.shape[3] != dv:
        raise ValueError(f"{what}: values must share one Dv; got {listed}")
    if (k_cmp.shape[1] != v_cmp.shape[1] or k_slc.shape[1] != v_slc.shape[1]
            or k_swa.shape[1] != v_swa.shape[1]):
        raise ValueError(f"{what}: keys and values of a branch need the same slots; got {listed}")
    if gates.shape != (b, n, 3):
        raise ValueError(f"{what}: gates must be [B, N, 3]={(b, n, 3)}, got {gates.shape}")
    if seq_lens.shape != (b,) or not jnp.issubdtype(seq_lens.dtype, jnp.integer):
        raise ValueError(f"{what}: seq_lens must be integer [B]={(b,)}, got "
                         f"{seq_lens.shape} {seq_lens.dtype}")
    s_swa = k_swa.shape[1]
    if s_swa != k_slc.shape[1] and s_swa < window_size:
        raise ValueError(f"{what}: a window ring of S'={s_swa} slots cannot hold w="
                         f"{window_size} tokens (S' must be S={k_slc.shape[1]} or >= w)")


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
) -> tuple[Float[Array, "B N Hv"], Int[Array, "B K M"]]:
    """NSA output of the newest query of each sequence, from the cache.

    Args:
      q: the new queries ``[B, N, Dk]`` (RoPE applied), at positions ``seq_lens - 1``.
      k_cmp, v_cmp: compressed keys/values ``[B, C, K, Dk]``, ``[B, C, K, Dv]``; slots
        ``>= num_visible_cmp(seq_lens)`` are ignored.
      k_slc, v_slc: the selected branch's raw keys/values ``[B, S, K, D*]``.
      k_swa, v_swa: the window branch's raw keys/values ``[B, S', K, D*]``, position ``p`` in
        slot ``p % S'``: the whole sequence (``S' = S``) or a ring of ``S' >= w`` slots.
      gates: branch gates ``[B, N, 3]`` (cmp, slc, swa), after the sigmoid.
      seq_lens: ``int32 [B]`` tokens in the cache, the new one included (``1 <= L <= S``).
      cmp_block_size, cmp_stride, slc_block_size, top_n, window_size: ``l, d, l', n, w``.
      scale: logit scale of every branch (``1/sqrt(Dk)`` by default).

    Returns:
      ``(o, indices)``: ``o [B, N, Dv]`` in ``q.dtype`` and the selected blocks
      ``int32 [B, K, n]`` (``-1`` for unused slots).
    """
    check_decode_args("decode_attention", q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates,
                      seq_lens, window_size)
    b, n, dk = q.shape
    c, kh, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    g = n // kh
    scale = default_scale(dk, scale)
    t = seq_lens.astype(jnp.int32) - 1  # [B] position of the query
    qg = q.astype(jnp.float32).reshape(b, kh, g, dk)  # [B, K, G, Dk]

    # Compressed branch.
    s_cmp = jnp.einsum("bkgd,bckd->bkgc", qg, k_cmp.astype(jnp.float32), precision=HIGHEST)
    s_cmp = s_cmp * scale  # [B, K, G, C]
    n_cmp = num_visible_cmp(t + 1, cmp_block_size, cmp_stride)  # [B]
    mask = (jnp.arange(c, dtype=jnp.int32)[None, :] < n_cmp[:, None])[:, None, None, :]
    o_cmp, lse_cmp = masked_attention(s_cmp, mask, v_cmp.astype(jnp.float32),
                                      "bkgc,bckd->bkgd")  # [B, K, G, Dv], [B, K, G]

    # Selection.
    s_len = k_slc.shape[1]
    num_blocks = -(-s_len // slc_block_size)
    indices = select_from_logits(
        s_cmp, lse_cmp, t + 1, num_blocks=num_blocks, cmp_block_size=cmp_block_size,
        cmp_stride=cmp_stride, slc_block_size=slc_block_size, top_n=top_n,
    )  # [B, K, n]

    # Selected branch: gather the chosen blocks' keys straight from the cache.
    b_ix = jnp.arange(b)[:, None, None, None]  # [B, 1, 1, 1]
    k_ix = jnp.arange(kh)[None, :, None, None]  # [1, K, 1, 1]
    safe = jnp.maximum(indices, 0)
    key_pos = safe[..., None] * slc_block_size + jnp.arange(slc_block_size)  # [B, K, n, l']
    gather_pos = jnp.minimum(key_pos, s_len - 1)
    k_sel = k_slc[b_ix, gather_pos, k_ix].astype(jnp.float32)  # [B, K, n, l', Dk]
    v_sel = v_slc[b_ix, gather_pos, k_ix].astype(jnp.float32)  # [B, K, n, l', Dv]
    m_keys = top_n * slc_block_size
    s_slc = jnp.einsum("bkgd,bkmld->bkgml", qg, k_sel, precision=HIGHEST) * scale
    mask = (indices[..., None] >= 0) & (key_pos <= t[:, None, None, None])  # [B, K, n, l']
    o_slc, _ = masked_attention(
        s_slc.reshape(b, kh, g, m_keys), mask.reshape(b, kh, 1, m_keys),
        v_sel.reshape(b, kh, m_keys, dv), "bkgs,bksd->bkgd",
    )

    # Sliding window: the last w positions; position p sits in slot p % S' (S' >= w).
    start = jnp.maximum(t - window_size + 1, 0)  # [B]
    pos = start[:, None] + jnp.arange(window_size, dtype=jnp.int32)  # [B, w]
    slot = pos % k_swa.shape[1]
    k_win = k_swa[jnp.arange(b)[:, None], slot].astype(jnp.float32)  # [B, w, K, Dk]
    v_win = v_swa[jnp.arange(b)[:, None], slot].astype(jnp.float32)  # [B, w, K, Dv]
    s_swa = jnp.einsum("bkgd,bskd->bkgs", qg, k_win, precision=HIGHEST) * scale
    mask = (pos <= t[:, None]) & (pos > t[:, None] - window_size)  # [B, W]
    o_swa, _ = masked_attention(s_swa, mask[:, None, None, :], v_win, "bkgs,bskd->bkgd")

    o = combine_gated(gates, o_cmp.reshape(b, n, dv), o_slc.reshape(b, n, dv),
                      o_swa.reshape(b, n, dv), q.dtype)
    return o, indices
