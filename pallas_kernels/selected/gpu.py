"""Selected-branch attention on GPU: the paper's group-centric Pallas-Triton kernels.

One forward program owns one query position ``t`` and one KV head: the ``G`` query heads of the
group form the rows of a ``[G, Dk]`` tile, and each of the ``n`` selected key blocks of ``l'``
tokens is loaded once and shared by all of them (NSA paper, section 3.4). Empty (``-1``) slots
are masked out; the current block is masked causally (key position ``<= t``).

Backward, without atomics:

* ``dq``: the forward's grid again, recomputing the probabilities from the saved log-sum-exp.
* ``dk/dv``: an inverted index, built in XLA from the selection (sort of ``(block, query)``
  pairs), lists for each key block the queries that selected it, cut into chunks of at most
  ``entries_per_chunk`` queries so that block 0 (chosen by every query) is spread over many
  programs. Each program accumulates one chunk's ``dk/dv`` for its block in registers and
  writes it to a per-chunk buffer; a second kernel adds each block's (consecutive) chunks.

``G`` below 16 or not a power of two is padded to one (zero queries, dropped afterwards), as
are head dims; ``l'`` must be a power of two of at least 16 (else ``NotImplementedError``, and
the registry falls back to the reference).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from pallas_kernels import tuned_block_sizes
from pallas_kernels.common import (
    LOG2E,
    check_int32_extent,
    combine_outputs,
    default_scale,
    rows_to_every_query,
)
from pallas_kernels.selection.reference import NUM_FORCED
from pallas_kernels.sliding_window.gpu import check_qkv

MASK_VALUE = -1e30


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Launch parameters of the selected-attention kernels.

    Attributes:
      entries_per_chunk: queries per ``dk/dv`` program (a power of two).
      entries_per_step: queries whose rows (``Gp`` heads each) one ``dk/dv`` step gathers into
        a ``[entries_per_step * Gp, D]`` tile (a power of two, at most ``entries_per_chunk``).
      num_warps, num_stages: Triton parameters of the forward and ``dq`` kernels.
      num_warps_bwd, num_stages_bwd: those of the ``dk/dv`` kernel.
      forced_band: when the caller promises that every row's indices hold its forced blocks
        (``forced_included=True``, as NSA's selection does), attend those three blocks (0,
        ``t//l'``, ``t//l' - 1``) in a band kernel over a tile of ``l'`` queries that all share
        them, and only the scored blocks in the per-query kernel, which starts from the band's
        output and log-sum-exp; ``dq`` likewise. Off by default: timed on the H200 no faster
        than the per-query kernel (``docs/gpu_kernels.md``).
      sum_splits: programs per key block in the pass that adds up a block's ``dk/dv`` chunk
        partials (a power of two), each over every ``sum_splits``-th chunk, their sums added in
        XLA. Block 0, which every query selects, has ``T / entries_per_chunk`` chunks, and
        with one program its serial sum is the pass's tail. 1 (the default): one program a
        block writes the result directly.
      blocks_per_step: selected blocks one step of the forward and ``dq`` walks gathers into a
        ``[blocks_per_step * l', D]`` key (and value) tile (a power of two; clamped to the
        padded slots): fewer, larger steps, more loads in flight per program. The band path
        keeps one block a step.
      gate_bwd_kernel: in the backward of ``selected_attention_combined``, one kernel
        (``nsa_gate_bwd``, one program per query and KV head) takes the gated sum's
        cotangent apart: each branch's output cotangent (the compressed one in its rows
        layout), the gates' cotangents and the selected ``dq``/``dk``/``dv`` passes' row
        sums ``delta``, reading the cotangent and the three outputs once. ``False``: XLA's
        fusions of the sum's vjp, which read the cotangent once per fusion.
      gate_bwd_num_warps: Triton warps of that kernel.
    """

    entries_per_chunk: int = 256
    entries_per_step: int = 4
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2
    forced_band: bool = False
    blocks_per_step: int = 1
    sum_splits: int = 1
    gate_bwd_kernel: bool = True
    gate_bwd_num_warps: int = 1

    def __post_init__(self):
        for f in ("entries_per_chunk", "entries_per_step", "blocks_per_step", "sum_splits"):
            e = getattr(self, f)
            if e < 1 or e & (e - 1):
                raise ValueError(f"BlockSizes.{f}={e} must be a power of two")
        for f in ("num_warps", "num_warps_bwd", "num_stages", "num_stages_bwd",
                  "gate_bwd_num_warps"):
            if getattr(self, f) < 1:
                raise ValueError(f"BlockSizes.{f}={getattr(self, f)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class _Config:
    block_size: int
    scale: float
    g: int  # true heads per group (the kernels see the padded count)
    block_sizes: BlockSizes
    interpret: bool
    band: bool = False  # the forced blocks as a band (forced_band and forced_included)
    slots: int = 0  # the caller's n (the kernels see it padded to a power of two)

    @property
    def n_scored(self) -> int:
        """Slots left for scored blocks once the forced ones are out (the band path)."""
        return max(self.slots - NUM_FORCED, 0)


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, trans_a=False, trans_b=False, precision=None):
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


# ------------------------------------------------------------------------------------------
# Forward and dq: one program per (query, KV head)
# ------------------------------------------------------------------------------------------
def _softmax_step(carry, q, k, v, mask_fn, qk_scale, prec):
    """One key block into the online softmax ``(acc, m, den)`` (base 2); ``mask_fn()`` gives
    the visible keys (built after the logits, as the kernels always have)."""
    acc, m, den = carry
    s = _dot(q, k, trans_b=True, precision=prec) * qk_scale  # [rows, l']
    mask = mask_fn()
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
    den = den * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, precision=prec)
    return acc, m_new, den


def _dq_step(dq, q, do, k, v, lse, delta, mask_fn, qk_scale, prec):
    """One key block's (unscaled) ``dq`` term, the probabilities recomputed from ``lse``
    (base 2)."""
    s = _dot(q, k, trans_b=True, precision=prec) * qk_scale  # [rows, l']
    mask = mask_fn()
    p = jnp.where(mask, jnp.exp2(jnp.minimum(s - lse[:, None], 0.0)), 0.0)
    dp = _dot(do, v, trans_b=True, precision=prec)  # [rows, l']
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, precision=prec)


def _slot_mask(jc, j, t, bs):
    """Keys of block ``jc`` visible to query ``t`` (none for an empty slot ``j < 0``)."""
    key_pos = jc * bs + jnp.arange(bs, dtype=jnp.int32)
    return ((key_pos <= t) & (j >= 0))[None, :]


def _step_blocks(idx_ref, k_ref, v_ref, step, per_step: int, t, bs: int):
    """Keys and values of slots ``step * per_step ...`` (``per_step`` of them) as one
    ``[per_step * l', D]`` tile each, and a function giving their visibility ``[1, R]`` to query
    ``t`` (causal; an empty ``-1`` slot's rows, read from block 0, are invisible)."""
    if per_step == 1:
        j = idx_ref[step]
        jc = jnp.maximum(j, 0)
        return (k_ref[pl.ds(jc * bs, bs), :], v_ref[pl.ds(jc * bs, bs), :],
                lambda: _slot_mask(jc, j, t, bs))
    r = jnp.arange(per_step * bs, dtype=jnp.int32)
    which, rows, live = r // bs, r % bs, jnp.zeros(r.shape, jnp.bool_)
    for i in range(per_step):  # the step's slots, read as scalars
        j = idx_ref[step * per_step + i]
        rows = jnp.where(which == i, rows + jnp.maximum(j, 0) * bs, rows)
        live = jnp.where(which == i, j >= 0, live)
    return k_ref[rows], v_ref[rows], lambda: ((rows <= t) & live)[None, :]


def _per_step(cfg: _Config, m_slots: int) -> int:
    return min(cfg.block_sizes.blocks_per_step, m_slots)


def _forced_blocks(cur):
    """The forced blocks of selection block ``cur`` and whether each is attended: 0 always,
    ``cur - 1`` from ``cur >= 2`` and ``cur`` from ``cur >= 1`` (no block twice)."""
    return ((0, None), (cur - 1, cur >= 2), (cur, cur >= 1))


def _band_mask(jc, ok, t, bs):
    """Keys of block ``jc`` visible to the tile's queries ``t`` (causal; ``ok`` gates it)."""
    key_pos = jc * bs + jnp.arange(bs, dtype=jnp.int32)
    mask = key_pos[None, :] <= t[:, None]
    return mask if ok is None else mask & ok


def _fwd_kernel(idx_ref, q_ref, k_ref, v_ref, *refs, cfg: _Config, n_loop: int | None = None):
    """One (query, KV head): online softmax over its slots. With ``n_loop`` (the band path)
    over the first ``n_loop`` scored slots, starting from the band's output and log-sum-exp
    (``refs[0]``, ``refs[1]``) instead of an empty softmax."""
    o_ref, lse_ref = refs[-2:]
    acc, m, den = _query_walk(idx_ref, q_ref, k_ref, v_ref, refs, cfg, n_loop)
    seen = den > 0
    o_ref[...] = (acc / jnp.where(seen, den, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(jnp.where(seen, den, 1.0))) / LOG2E, -jnp.inf)


def _fwd_combined_kernel(idx_ref, q_ref, k_ref, v_ref, g_cmp_ref, g_slc_ref, g_swa_ref,
                         o_cmp_ref, o_swa_ref, out_ref, *, cfg: _Config, cmp_first: int):
    """``_fwd_kernel``'s walk, its output gated with the other two branches' (NSA's
    combination, ``common.combine_outputs``) before the one store. The selected output is
    rounded to the input dtype first, as the two-step path stores it. ``o_cmp_ref`` holds the
    compressed output of query ``max(t - cmp_first, 0)`` of its rows; queries before
    ``cmp_first`` have none (0)."""
    acc, _, den = _query_walk(idx_ref, q_ref, k_ref, v_ref, (), cfg, None)
    o_slc = (acc / jnp.where(den > 0, den, 1.0)[:, None]).astype(q_ref.dtype)
    o_slc = o_slc.astype(jnp.float32)
    o_cmp = o_cmp_ref[...].astype(jnp.float32)
    if cmp_first:
        o_cmp = jnp.where(pl.program_id(0) >= cmp_first, o_cmp, 0.0)
    out = (g_cmp_ref[...][:, None] * o_cmp
           + g_slc_ref[...][:, None] * o_slc
           + g_swa_ref[...][:, None] * o_swa_ref[...].astype(jnp.float32))
    out_ref[...] = out.astype(out_ref.dtype)


def _query_walk(idx_ref, q_ref, k_ref, v_ref, refs, cfg: _Config, n_loop: int | None):
    """The online softmax ``(acc, m, den)`` of one (query, KV head) over its slots (see
    ``_fwd_kernel``; ``refs[:2]`` the band's output and lse when ``n_loop`` is given)."""
    bs = cfg.block_size
    t = pl.program_id(0)
    q = q_ref[...]  # [Gp, Dk]
    prec = _precision(q.dtype)
    qk_scale = cfg.scale * LOG2E
    m_slots = idx_ref.shape[0]
    per_step = 1 if n_loop is not None else _per_step(cfg, m_slots)

    def body(step, carry):
        k, v, mask_fn = _step_blocks(idx_ref, k_ref, v_ref, step, per_step, t, bs)
        return _softmax_step(carry, q, k, v, mask_fn, qk_scale, prec)

    gp, dv = q.shape[0], v_ref.shape[-1]
    if n_loop is None:
        acc = jnp.zeros((gp, dv), jnp.float32)
        m = jnp.full((gp,), MASK_VALUE, jnp.float32)
        den = jnp.zeros((gp,), jnp.float32)
        acc, m, den = lax.fori_loop(0, m_slots // per_step, body, (acc, m, den))
    else:
        m = refs[1][...] * LOG2E
        carry = (refs[0][...].astype(jnp.float32), m, jnp.ones(m.shape, jnp.float32))
        acc, m, den = lax.fori_loop(0, n_loop, body, carry)
    return acc, m, den


def _band_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
    """The forced blocks of one tile of ``l'`` queries (one selection block ``cur``) and one
    query head (``_forced_blocks``), each loaded once for the whole tile."""
    bs = cfg.block_size
    cur = pl.program_id(0)
    q = q_ref[...]  # [l', Dk]
    prec = _precision(q.dtype)
    qk_scale = cfg.scale * LOG2E
    t = cur * bs + jnp.arange(bs, dtype=jnp.int32)
    carry = (jnp.zeros((bs, v_ref.shape[-1]), jnp.float32),
             jnp.full((bs,), MASK_VALUE, jnp.float32), jnp.zeros((bs,), jnp.float32))
    for blk, ok in _forced_blocks(cur):
        jc = jnp.maximum(blk, 0)
        k = k_ref[pl.ds(jc * bs, bs), :]  # [l', Dk]
        v = v_ref[pl.ds(jc * bs, bs), :]  # [l', Dv]
        carry = _softmax_step(carry, q, k, v,
                              lambda jc=jc, ok=ok: _band_mask(jc, ok, t, bs), qk_scale, prec)
    acc, m, den = carry
    # Key 0 is visible to every query, so ``den >= 1`` here.
    o_ref[...] = (acc / den[:, None]).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(den)) / LOG2E


def _band_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Config):
    """``dq`` over the forced blocks of one tile of ``l'`` queries and one query head (as
    ``_band_kernel`` walks them), unscaled float32: the scored kernel adds to it."""
    bs = cfg.block_size
    cur = pl.program_id(0)
    q = q_ref[...]  # [l', Dk]
    do = do_ref[...]  # [l', Dv]
    prec = _precision(q.dtype)
    lse = lse_ref[...] * LOG2E
    delta = delta_ref[...]
    qk_scale = cfg.scale * LOG2E
    t = cur * bs + jnp.arange(bs, dtype=jnp.int32)
    dq = jnp.zeros(q.shape, jnp.float32)
    for blk, ok in _forced_blocks(cur):
        jc = jnp.maximum(blk, 0)
        k = k_ref[pl.ds(jc * bs, bs), :]
        v = v_ref[pl.ds(jc * bs, bs), :]
        dq = _dq_step(dq, q, do, k, v, lse, delta, lambda jc=jc, ok=ok: _band_mask(jc, ok, t, bs),
                      qk_scale, prec)
    dq_ref[...] = dq


def _bwd_dq_kernel(idx_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                   cfg: _Config, n_loop: int | None = None):
    """``dq`` of one (query, KV head) over its slots; with ``n_loop`` (the band path) over the
    first ``n_loop`` scored slots, starting from the band's unscaled ``dq`` (``refs[0]``)."""
    dq_ref = refs[-1]
    bs = cfg.block_size
    t = pl.program_id(0)
    q = q_ref[...]  # [Gp, Dk]
    do = do_ref[...]  # [Gp, Dv]
    prec = _precision(q.dtype)
    lse = lse_ref[...] * LOG2E  # [Gp]
    delta = delta_ref[...]  # [Gp]
    qk_scale = cfg.scale * LOG2E
    m_slots = idx_ref.shape[0]
    per_step = 1 if n_loop is not None else _per_step(cfg, m_slots)

    def body(step, dq):
        k, v, mask_fn = _step_blocks(idx_ref, k_ref, v_ref, step, per_step, t, bs)
        return _dq_step(dq, q, do, k, v, lse, delta, mask_fn, qk_scale, prec)

    if n_loop is None:
        dq = lax.fori_loop(0, m_slots // per_step, body, jnp.zeros(q.shape, jnp.float32))
    else:
        dq = lax.fori_loop(0, n_loop, body, refs[0][...])
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _per_query_specs(b_k, gp, dkp, dvp, sp, mp):
    """BlockSpecs of the (query, KV head) grid: ``grid = (T, B*K)``."""
    del mp
    def q_map(t, bk):
        return (bk // b_k, t, bk % b_k, 0)

    def kv_map(t, bk):
        return (bk // b_k, 0, bk % b_k, 0)

    return dict(
        idx=lambda m: pl.BlockSpec((None, None, None, m), q_map),
        q=pl.BlockSpec((None, None, gp, dkp), q_map),
        do=pl.BlockSpec((None, None, gp, dvp), q_map),
        k=pl.BlockSpec((None, sp, None, dkp), kv_map),
        v=pl.BlockSpec((None, sp, None, dvp), kv_map),
        row=pl.BlockSpec((None, None, gp), lambda t, bk: (bk // b_k, t, bk % b_k)),
    )


# ------------------------------------------------------------------------------------------
# dk/dv: one program per chunk of an inverted index (key block -> queries that chose it)
# ------------------------------------------------------------------------------------------
def _bwd_dkv_kernel(blk_ref, cnt_ref, tab_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                    delta_ref, dk_ref, dv_ref, *, cfg: _Config, num_heads: int, gp: int,
                    per_step: int):
    """One chunk of the inverted index: ``entries_per_step`` queries (all ``Gp`` heads each) a
    step, their rows gathered from ``q/do [T*N, D]`` into one ``[R, D]`` tile, ``R = E*Gp``."""
    bs = cfg.block_size
    c = pl.program_id(0)
    h = pl.program_id(1) % (num_heads // gp)  # KV head
    j = blk_ref[c]
    jc = jnp.maximum(j, 0)
    count = jnp.where(j >= 0, cnt_ref[c], 0)
    k = k_ref[pl.ds(jc * bs, bs), :]  # [l', Dk]
    v = v_ref[pl.ds(jc * bs, bs), :]  # [l', Dv]
    prec = _precision(k.dtype)
    key_pos = jc * bs + jnp.arange(bs, dtype=jnp.int32)
    qk_scale = cfg.scale * LOG2E
    rows = per_step * gp
    r = jnp.arange(rows, dtype=jnp.int32)
    r_entry, r_head = r // gp, r % gp
    last = tab_ref.shape[0] - 1

    def body(step, carry):
        dk, dv = carry
        e = step * per_step + r_entry  # [R] entry of each row
        valid = e < count
        t = jnp.where(valid, tab_ref[jnp.minimum(e, last)], 0)  # [R] query position
        row = t * num_heads + h * gp + r_head
        q = q_ref[row]  # [R, Dk]
        do = do_ref[row]  # [R, Dv]
        lse = lse_ref[row] * LOG2E  # [R]
        delta = delta_ref[row]  # [R]
        s = _dot(q, k, trans_b=True, precision=prec) * qk_scale  # [R, l']
        mask = valid[:, None] & (key_pos[None, :] <= t[:, None])
        p = jnp.where(mask, jnp.exp2(jnp.minimum(s - lse[:, None], 0.0)), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True, precision=prec)  # [l', Dv]
        dp = _dot(do, v, trans_b=True, precision=prec)  # [R, l']
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True, precision=prec)  # [l', Dk]
        return dk, dv

    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, pl.cdiv(count, per_step), body, (dk, dv))
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


_PACK_LIMIT = 2**31 - 1  # largest packed (block, query) key of the one-operand sort


def _invert_one(idx_tm, num_blocks: int, per_chunk: int, num_chunks: int):
    """Inverted index of one (batch, KV head).

    The ``(block, query)`` pairs are sorted as one packed int32 key where it fits (a single
    sort operand: the GPU's radix sort, instead of a two-key comparison sort), and everything
    else is read off the sorted list with binary searches and gathers: no scatter, so no
    atomics piling up on block 0, which every query selects.

    Args:
      idx_tm: ``int32 [T, M]`` selected blocks, ``-1`` empty.

    Returns:
      ``blk [NC]`` block of each chunk (``-1`` unused), ``cnt [NC]`` queries in it,
      ``tab [NC, E]`` their positions (``-1`` past ``cnt``), and per key block its first chunk
      ``first [nb]`` and number of chunks ``num [nb]`` (a block's chunks are consecutive).
    """
    t, m = idx_tm.shape
    key = jnp.where(idx_tm >= 0, idx_tm, num_blocks).reshape(-1)  # [P], empty slots last
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, m)).reshape(-1)
    if (num_blocks + 1) * t <= _PACK_LIMIT:
        packed = lax.sort(key * t + pos)  # by block, then query
        key, pos = packed // t, packed % t
    else:
        key, pos = lax.sort((key, pos), num_keys=2)
    search = functools.partial(jnp.searchsorted, method="scan_unrolled")
    # Block b's entries are [start[b], start[b + 1]) of the sorted list.
    start = search(key, jnp.arange(num_blocks + 1, dtype=key.dtype)).astype(jnp.int32)
    cnt = start[1:] - start[:-1]
    chunks = -(-cnt // per_chunk)
    ends = jnp.cumsum(chunks)
    chunk_start = ends - chunks
    c = jnp.arange(num_chunks, dtype=jnp.int32)
    blk = search(ends, c, side="right").astype(jnp.int32)  # num_blocks past the last chunk
    used = blk < num_blocks
    b = jnp.minimum(blk, num_blocks - 1)
    skip = (c - chunk_start[b]) * per_chunk  # the block's entries in its earlier chunks
    ccnt = jnp.where(used, jnp.clip(cnt[b] - skip, 0, per_chunk), 0)
    e = start[b][:, None] + skip[:, None] + jnp.arange(per_chunk, dtype=jnp.int32)[None, :]
    tab = jnp.where(jnp.arange(per_chunk)[None, :] < ccnt[:, None],
                    pos[jnp.clip(e, 0, pos.shape[0] - 1)], -1)
    return (jnp.where(used, blk, -1), ccnt, tab, chunk_start.astype(jnp.int32),
            chunks.astype(jnp.int32))


# ------------------------------------------------------------------------------------------
# Wrappers
# ------------------------------------------------------------------------------------------
def _fwd(q, k, v, idx, cfg: _Config):
    """Padded ``q [B, T, K*Gp, Dkp]``, ``k/v [B, Sp, K, D]``, ``idx [B, T, K, Mp]``."""
    b, t, ngp, dkp = q.shape
    sp, kh, dvp = k.shape[1], k.shape[2], v.shape[-1]
    gp = ngp // kh
    specs = _per_query_specs(kh, gp, dkp, dvp, sp, idx.shape[-1])
    bs = cfg.block_sizes
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(t, b * kh),
        in_specs=[specs["idx"](idx.shape[-1]), specs["q"], specs["k"], specs["v"]],
        out_specs=[specs["do"], specs["row"]],
        out_shape=[jax.ShapeDtypeStruct((b, t, ngp, dvp), q.dtype),
                   jax.ShapeDtypeStruct((b, t, ngp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=cfg.interpret,
        name="nsa_slc_fwd",
    )(idx, q, k, v)


def _scored_indices(idx, block_size: int, n_loop: int):
    """Each row's indices without its forced blocks (0, ``t//l'``, ``t//l' - 1``), ascending,
    ``-1`` after them, in ``n_loop = max(n - 3, 0)`` slots (with the forced blocks present, as
    the caller promised, no more remain), padded to a power of two."""
    t = idx.shape[1]
    cur = (jnp.arange(t, dtype=jnp.int32) // block_size)[None, :, None, None]
    forced = (idx == 0) | (idx == cur) | (idx == cur - 1)
    big = jnp.iinfo(jnp.int32).max
    key = jnp.sort(jnp.where(forced | (idx < 0), big, idx), axis=-1)
    scored = jnp.where(key == big, -1, key)[..., :max(n_loop, 1)]
    return _pad_axis(scored, 3, _pow2(scored.shape[-1]), value=-1)


def _band_grid(q, k, cfg: _Config):
    """Shared pieces of the band kernels' calls: grid ``(T_p / l', B * K * Gp)`` (a program per
    tile of ``l'`` queries and query head), the padded length ``T_p``, BlockSpec makers for a
    tile ``[l', D]``, a row ``[l']`` and a whole key sequence of the head's KV head, and the
    compiler parameters."""
    b, t, ngp, _ = q.shape
    sp, kh = k.shape[1], k.shape[2]
    gp = ngp // kh
    bs = cfg.block_size
    tp = -(-t // bs) * bs
    sizes = cfg.block_sizes
    return dict(
        grid=(tp // bs, b * ngp), tp=tp,
        tile=lambda d: pl.BlockSpec((None, bs, None, d),
                                    lambda i, bh: (bh // ngp, i, bh % ngp, 0)),
        row=pl.BlockSpec((None, bs, None), lambda i, bh: (bh // ngp, i, bh % ngp)),
        kv=lambda d: pl.BlockSpec((None, sp, None, d),
                                  lambda i, bh: (bh // ngp, 0, (bh % ngp) // gp, 0)),
        params=plgpu.CompilerParams(num_warps=sizes.num_warps, num_stages=sizes.num_stages))


def _fwd_band(q, k, v, idx, cfg: _Config, scored=None):
    """The forward with the forced blocks as a band (``BlockSizes.forced_band``): the same
    outputs as ``_fwd`` when every row's indices hold its forced blocks."""
    b, t, ngp, dkp = q.shape
    sp, kh, dvp = k.shape[1], k.shape[2], v.shape[-1]
    gp = ngp // kh
    bs = cfg.block_size
    g = _band_grid(q, k, cfg)
    tp, params = g["tp"], g["params"]
    o_band, lse_band = pl.pallas_call(
        functools.partial(_band_kernel, cfg=cfg),
        grid=g["grid"],
        in_specs=[g["tile"](dkp), g["kv"](dkp), g["kv"](dvp)],
        out_specs=[g["tile"](dvp), g["row"]],
        out_shape=[jax.ShapeDtypeStruct((b, tp, ngp, dvp), q.dtype),
                   jax.ShapeDtypeStruct((b, tp, ngp), jnp.float32)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="nsa_slc_fwd_band",
    )(_pad_axis(q, 1, tp), k, v)  # a copy only when T is not a multiple of l'
    if tp != t:
        o_band, lse_band = o_band[:, :t], lse_band[:, :t]
    n_loop = cfg.n_scored
    if scored is None:
        scored = _scored_indices(idx, bs, n_loop)
    if n_loop == 0:
        return o_band, lse_band
    specs = _per_query_specs(kh, gp, dkp, dvp, sp, scored.shape[-1])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, n_loop=n_loop),
        grid=(t, b * kh),
        in_specs=[specs["idx"](scored.shape[-1]), specs["q"], specs["k"], specs["v"],
                  specs["do"], specs["row"]],
        out_specs=[specs["do"], specs["row"]],
        out_shape=[jax.ShapeDtypeStruct((b, t, ngp, dvp), q.dtype),
                   jax.ShapeDtypeStruct((b, t, ngp), jnp.float32)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="nsa_slc_fwd_scored",
    )(scored, q, k, v, o_band, lse_band)


def _bwd(q, k, v, idx, o, lse, do, cfg: _Config, scored=None, delta=None):
    if delta is None:  # the row sums of do * o (given by the gate kernel when it ran)
        delta = jnp.einsum("btnd,btnd->btn", o.astype(jnp.float32), do.astype(jnp.float32))
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    dq = _bwd_dq(q, k, v, idx, do, lse, delta, cfg, scored)
    dk, dv = _bwd_dkv(q, k, v, idx, do, lse, delta, cfg)
    return dq, dk, dv


def _bwd_dq_band(q, k, v, idx, do, lse, delta, cfg: _Config, scored=None):
    """``dq`` with the forced blocks as a band (``BlockSizes.forced_band``): a band kernel per
    tile of ``l'`` queries and head, then the per-query kernel over the scored blocks."""
    b, t, ngp, dkp = q.shape
    sp, kh, dvp = k.shape[1], k.shape[2], v.shape[-1]
    gp = ngp // kh
    bs = cfg.block_size
    g = _band_grid(q, k, cfg)
    tp, params = g["tp"], g["params"]
    dq_band = pl.pallas_call(
        functools.partial(_band_dq_kernel, cfg=cfg),
        grid=g["grid"],
        in_specs=[g["tile"](dkp), g["kv"](dkp), g["kv"](dvp), g["tile"](dvp), g["row"],
                  g["row"]],
        out_specs=g["tile"](dkp),
        out_shape=jax.ShapeDtypeStruct((b, tp, ngp, dkp), jnp.float32),
        compiler_params=params,
        interpret=cfg.interpret,
        name="nsa_slc_bwd_dq_band",
    )(_pad_axis(q, 1, tp), k, v, *(_pad_axis(x, 1, tp) for x in (do, lse, delta)))
    if tp != t:
        dq_band = dq_band[:, :t]
    n_loop = cfg.n_scored
    if scored is None:
        scored = _scored_indices(idx, bs, n_loop)
    if n_loop == 0:
        return (dq_band * cfg.scale).astype(q.dtype)
    specs = _per_query_specs(kh, gp, dkp, dvp, sp, scored.shape[-1])
    return pl.pallas_call(
        functools.partial(_bwd_dq_kernel, cfg=cfg, n_loop=n_loop),
        grid=(t, b * kh),
        in_specs=[specs["idx"](scored.shape[-1]), specs["q"], specs["k"], specs["v"],
                  specs["do"], specs["row"], specs["row"], specs["q"]],
        out_specs=specs["q"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="nsa_slc_bwd_dq_scored",
    )(scored, q, k, v, do, lse, delta, dq_band)


def _bwd_dq(q, k, v, idx, do, lse, delta, cfg: _Config, scored=None):
    if cfg.band:
        return _bwd_dq_band(q, k, v, idx, do, lse, delta, cfg, scored)
    b, t, ngp, dkp = q.shape
    sp, kh, dvp = k.shape[1], k.shape[2], v.shape[-1]
    gp = ngp // kh
    bs = cfg.block_sizes
    specs = _per_query_specs(kh, gp, dkp, dvp, sp, idx.shape[-1])
    return pl.pallas_call(
        functools.partial(_bwd_dq_kernel, cfg=cfg),
        grid=(t, b * kh),
        in_specs=[specs["idx"](idx.shape[-1]), specs["q"], specs["k"], specs["v"],
                  specs["do"], specs["row"], specs["row"]],
        out_specs=specs["q"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=cfg.interpret,
        name="nsa_slc_bwd_dq",
    )(idx, q, k, v, do, lse, delta)


def _chunking(t: int, slots: int, num_blocks: int, sizes: BlockSizes) -> tuple[int, int]:
    """Queries per chunk and number of chunks of the inverted index (a block's last chunk may
    be partial: at most one extra chunk per block)."""
    per_chunk = min(sizes.entries_per_chunk, _pow2(t * slots))
    return per_chunk, -(-(t * slots) // per_chunk) + num_blocks


def _invert(idx, num_blocks: int, cfg: _Config):
    """The inverted index of every (batch, KV head): ``blk, cnt [B, K, NC]``, ``tab [.., E]``,
    ``first, num [B, K, nb]``."""
    t = idx.shape[1]
    per_chunk, nc = _chunking(t, idx.shape[-1], num_blocks, cfg.block_sizes)
    invert = functools.partial(_invert_one, num_blocks=num_blocks, per_chunk=per_chunk,
                               num_chunks=nc)
    return jax.vmap(jax.vmap(invert))(jnp.transpose(idx, (0, 2, 1, 3)))  # over [B, K]


def _bwd_dkv(q, k, v, idx, do, lse, delta, cfg: _Config):
    b, t, ngp, dkp = q.shape
    sp, kh, dvp = k.shape[1], k.shape[2], v.shape[-1]
    gp = ngp // kh
    bsz = cfg.block_size
    nb = sp // bsz
    bs = cfg.block_sizes
    blk, cnt, tab, first, num = _invert(idx, nb, cfg)
    nc, per_chunk = tab.shape[2], tab.shape[3]
    # Gathered rows per step: at most 16 KiB of queries (64 rows of bf16 at D = 128), so wide
    # or float32 heads take fewer entries a step instead of spilling registers.
    row_cap = max(1, (16384 // (max(dkp, dvp) * q.dtype.itemsize)) // gp)
    per_step = min(bs.entries_per_step, per_chunk, _pow2(row_cap + 1) // 2)

    def grp(c, bk):
        return (bk // kh, bk % kh, 0)

    # q/do/lse/delta as rows [T*N]: the kernel gathers the rows of its entries (free reshapes).
    rows2 = lambda x: x.reshape(b, t * ngp, *x.shape[3:])  # noqa: E731
    whole = lambda c, bk: (bk // kh, 0, 0)  # noqa: E731
    dk_part, dv_part = pl.pallas_call(
        functools.partial(_bwd_dkv_kernel, cfg=cfg, num_heads=ngp, gp=gp, per_step=per_step),
        grid=(nc, b * kh),
        in_specs=[
            pl.BlockSpec((None, None, nc), grp),
            pl.BlockSpec((None, None, nc), grp),
            pl.BlockSpec((None, None, None, per_chunk), lambda c, bk: (bk // kh, bk % kh, c, 0)),
            pl.BlockSpec((None, t * ngp, dkp), whole),
            pl.BlockSpec((None, sp, None, dkp), lambda c, bk: (bk // kh, 0, bk % kh, 0)),
            pl.BlockSpec((None, sp, None, dvp), lambda c, bk: (bk // kh, 0, bk % kh, 0)),
            pl.BlockSpec((None, t * ngp, dvp), whole),
            pl.BlockSpec((None, t * ngp), lambda c, bk: (bk // kh, 0)),
            pl.BlockSpec((None, t * ngp), lambda c, bk: (bk // kh, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bsz, dkp), lambda c, bk: (bk, c, 0, 0)),
            pl.BlockSpec((None, None, bsz, dvp), lambda c, bk: (bk, c, 0, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b * kh, nc, bsz, dkp), jnp.float32),
                   jax.ShapeDtypeStruct((b * kh, nc, bsz, dvp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps_bwd,
                                             num_stages=bs.num_stages_bwd),
        interpret=cfg.interpret,
        name="nsa_slc_bwd_dkv",
    )(blk, cnt, tab, rows2(q), k, v, rows2(do), rows2(lse), rows2(delta))

    # Each block's chunks are consecutive: one program per (key block, KV head) adds them.
    # (An XLA segment sum here was a scatter-add whose updates to block 0 serialise.)
    if bs.sum_splits > 1:
        return _sum_chunks_split(first, num, dk_part, dv_part, k, v, cfg)
    table = pl.BlockSpec((None, None, nb), lambda j, bk: (bk // kh, bk % kh, 0))
    return pl.pallas_call(
        _sum_chunks_kernel,
        grid=(nb, b * kh),
        in_specs=[table, table,
                  pl.BlockSpec((None, nc, bsz, dkp), lambda j, bk: (bk, 0, 0, 0)),
                  pl.BlockSpec((None, nc, bsz, dvp), lambda j, bk: (bk, 0, 0, 0))],
        out_specs=[pl.BlockSpec((None, bsz, None, dkp), lambda j, bk: (bk // kh, j, bk % kh, 0)),
                   pl.BlockSpec((None, bsz, None, dvp), lambda j, bk: (bk // kh, j, bk % kh, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=cfg.interpret,
        name="nsa_slc_bwd_dkv_sum",
    )(first, num, dk_part, dv_part)


def _sum_chunks_split(first, num, dk_part, dv_part, k, v, cfg: _Config):
    """The chunk sum with ``sum_splits`` programs per (key block, KV head), program ``p``
    adding chunks ``p, p + P, ...`` of its block; the ``P`` partial sums added in XLA."""
    b, sp, kh, dkp = k.shape
    dvp, bsz, splits = v.shape[-1], cfg.block_size, cfg.block_sizes.sum_splits
    nb, nc = sp // bsz, dk_part.shape[1]
    table = pl.BlockSpec((None, None, nb), lambda j, bk, p: (bk // kh, bk % kh, 0))
    dk_s, dv_s = pl.pallas_call(
        functools.partial(_sum_chunks_kernel, splits=splits),
        grid=(nb, b * kh, splits),
        in_specs=[table, table,
                  pl.BlockSpec((None, nc, bsz, dkp), lambda j, bk, p: (bk, 0, 0, 0)),
                  pl.BlockSpec((None, nc, bsz, dvp), lambda j, bk, p: (bk, 0, 0, 0))],
        out_specs=[pl.BlockSpec((None, None, bsz, dkp), lambda j, bk, p: (bk, p, j, 0)),
                   pl.BlockSpec((None, None, bsz, dvp), lambda j, bk, p: (bk, p, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((b * kh, splits, sp, dkp), jnp.float32),
                   jax.ShapeDtypeStruct((b * kh, splits, sp, dvp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=cfg.interpret,
        name="nsa_slc_bwd_dkv_sum_split",
    )(first, num, dk_part, dv_part)

    def total(x, like):  # [B*K, P, S, D] -> [B, S, K, D]
        x = x.sum(axis=1).reshape(b, kh, sp, x.shape[-1])
        return jnp.transpose(x, (0, 2, 1, 3)).astype(like.dtype)

    return total(dk_s, k), total(dv_s, v)


def _sum_chunks_kernel(first_ref, num_ref, dk_part_ref, dv_part_ref, dk_ref, dv_ref,
                       splits: int = 1):
    j = pl.program_id(0)
    c0 = first_ref[j]
    if splits > 1:  # this program's share: chunks p, p + splits, ... of the block's chunks
        p = pl.program_id(2)
        c0 = c0 + p

    def body(i, carry):
        dk, dv = carry
        if splits > 1:
            c = c0 + i * splits
            return dk + dk_part_ref[c], dv + dv_part_ref[c]
        return dk + dk_part_ref[c0 + i], dv + dv_part_ref[c0 + i]

    zeros = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    n = num_ref[j]
    if splits > 1:
        n = lax.div(jnp.maximum(n - p, 0) + splits - 1, splits)
    dk, dv = lax.fori_loop(0, n, body, zeros)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _forward(q, k, v, idx, cfg: _Config):
    """``(o, lse)`` and, on the band path, the scored indices (kept for the backward's ``dq``,
    so the sort runs once)."""
    if cfg.band:
        scored = _scored_indices(idx, cfg.block_size, cfg.n_scored)
        return _fwd_band(q, k, v, idx, cfg, scored), scored
    return _fwd(q, k, v, idx, cfg), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _selected(q, k, v, idx, cfg: _Config):
    return _forward(q, k, v, idx, cfg)[0]


def _selected_fwd(q, k, v, idx, cfg):
    (o, lse), scored = _forward(q, k, v, idx, cfg)
    return (o, lse), (q, k, v, idx, o, lse, scored)


def _selected_bwd(cfg, res, cts):
    q, k, v, idx, o, lse, scored = res
    do, _ = cts  # no gradient flows back through the log-sum-exp output
    dq, dk, dv = _bwd(q, k, v, idx, o, lse, do.astype(q.dtype), cfg, scored)
    return dq, dk, dv, None


_selected.defvjp(_selected_fwd, _selected_bwd)


def _pad_axis(x, axis: int, size: int, value=0):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _pad_heads(x, kh: int, gp: int):
    """``[B, T, K*G, D] -> [B, T, K*Gp, D]``: each group's heads padded with zero heads."""
    b, t, n, dim = x.shape
    if n // kh == gp:
        return x
    return _pad_axis(x.reshape(b, t, kh, n // kh, dim), 3, gp).reshape(b, t, kh * gp, dim)


def _unpad_heads(x, kh: int, g: int, d: int):
    """The inverse of ``_pad_heads`` (and of the head-dim padding to ``d``) on an output
    ``[B, T, K*Gp, Dp]``."""
    b, t, ngp, dp = x.shape
    return x.reshape(b, t, kh, ngp // kh, dp)[:, :, :, :g, :d].reshape(b, t, kh * g, d)


def _prepare(q, k, v, indices, block_size, scale, block_sizes, interpret, forced_included,
             what: str):
    """Checks and pads the inputs for the kernels (heads per group to ``Gp``, head dims to
    powers of two, keys to whole blocks, slots to a power of two); returns the padded
    ``q, k, v, idx`` and the kernels' config."""
    check_qkv(q, k, v, what)
    b, t, n, dk = q.shape
    s, kh, dv = k.shape[1], k.shape[2], v.shape[-1]
    if indices.ndim != 4 or indices.shape[:3] != (b, t, kh):
        raise ValueError(f"{what}: indices must be [B, T, K, n]={(b, t, kh, '*')}, "
                         f"got {indices.shape=}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"{what}: integer indices expected, got {indices.dtype=}")
    if s < t:
        raise ValueError(f"{what}: keys shorter than queries: {q.shape=}, {k.shape=}")
    if block_size < 16 or block_size & (block_size - 1):
        raise NotImplementedError(f"{what} kernel needs a power-of-two "
                                  f"block_size >= 16, got {block_size}")
    g = n // kh
    gp = max(16, _pow2(g))
    dkp, dvp = max(16, _pow2(dk)), max(16, _pow2(dv))
    sp = -(-s // block_size) * block_size
    mp = _pow2(indices.shape[-1])
    sizes = block_sizes or BlockSizes(**tuned_block_sizes.selected(max(dk, dv)))
    per_chunk, num_chunks = _chunking(t, mp, sp // block_size, sizes)
    check_int32_extent(what, q=(b, t, kh * gp, max(dkp, dvp)),
                       k=(b, sp, kh, max(dkp, dvp)),
                       dkv_partials=(b * kh, num_chunks, block_size, max(dkp, dvp)))
    qp = _pad_axis(_pad_heads(q, kh, gp), 3, dkp)
    kp = _pad_axis(_pad_axis(k, 1, sp), 3, dkp)
    vp = _pad_axis(_pad_axis(v, 1, sp), 3, dvp)
    idx = _pad_axis(indices.astype(jnp.int32), 3, mp, value=-1)
    cfg = _Config(block_size=int(block_size), scale=default_scale(dk, scale), g=g,
                  block_sizes=sizes, interpret=interpret,
                  # The promise cannot hold with fewer slots than forced blocks.
                  band=bool(forced_included and sizes.forced_band
                            and indices.shape[-1] >= NUM_FORCED),
                  slots=int(indices.shape[-1]))
    return qp, kp, vp, idx, cfg


def selected_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K Hv"],
    indices: Int[Array, "B T K M"],
    *,
    block_size: int,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    forced_included: bool = False,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """Attention of each query over the key blocks its group selected; twin of ``reference.py``.

    Args:
      q: queries ``[B, T, N, Dk]``; query ``t`` sits at position ``t``.
      k: keys ``[B, S, K, Dk]`` with ``S >= T``.
      v: values ``[B, S, K, Dv]``.
      indices: ``int32 [B, T, K, n]`` selected blocks, ``-1`` empty, no duplicates in a row.
      block_size: ``l'`` (a power of two >= 16 here).
      scale: logit scale, ``1/sqrt(Dk)`` by default.
      block_sizes: launch parameters; the tuned table by default.
      interpret: run in the Pallas interpreter.
      forced_included: the caller's promise that every row's indices hold the query's forced
        blocks (0, ``t//l'`` and ``t//l' - 1`` where they exist), as NSA's selection does; it
        lets ``BlockSizes.forced_band`` attend them as a band. The function is the same.

    Returns:
      ``(o, lse)``: ``o [B, T, N, Dv]`` in ``q.dtype`` and ``lse [B, T, N]`` in f32.
    """
    qp, kp, vp, idx, cfg = _prepare(q, k, v, indices, block_size, scale, block_sizes,
                                    interpret, forced_included, "selected_attention")
    b, t, n, _ = q.shape
    kh = k.shape[2]
    g, gp = n // kh, qp.shape[2] // kh
    o, lse = _selected(qp, kp, vp, idx, cfg)
    o = _unpad_heads(o, kh, g, v.shape[-1])
    lse = lse.reshape(b, t, kh, gp)[..., :g].reshape(b, t, n)
    return o, lse


# ------------------------------------------------------------------------------------------
# The selected branch with NSA's gated combination folded in (the forward without gradients)
# ------------------------------------------------------------------------------------------
def _fwd_combined(q, k, v, idx, gates, o_cmp, o_swa, cfg: _Config, cmp_first: int):
    """The per-query forward kernel storing ``combine_outputs(gates, o_cmp, o_slc, o_swa)``
    instead of ``o_slc`` (padded operands; ``gates [B, T, K*Gp, 3]``; ``o_cmp`` the rows of
    queries ``cmp_first`` on)."""
    b, t, ngp, dkp = q.shape
    sp, kh, dvp = k.shape[1], k.shape[2], v.shape[-1]
    gp = ngp // kh
    specs = _per_query_specs(kh, gp, dkp, dvp, sp, idx.shape[-1])
    cmp_spec = pl.BlockSpec((None, None, gp, dvp), lambda t, bk: (
        bk // kh, jnp.maximum(t - cmp_first, 0), bk % kh, 0))
    bs = cfg.block_sizes
    g = gates.astype(jnp.float32)
    return pl.pallas_call(
        functools.partial(_fwd_combined_kernel, cfg=cfg, cmp_first=cmp_first),
        grid=(t, b * kh),
        in_specs=[specs["idx"](idx.shape[-1]), specs["q"], specs["k"], specs["v"],
                  specs["row"], specs["row"], specs["row"], cmp_spec, specs["do"]],
        out_specs=specs["do"],
        out_shape=jax.ShapeDtypeStruct((b, t, ngp, dvp), o_cmp.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=cfg.interpret,
        name="nsa_slc_fwd_combined",
    )(idx, q, k, v, g[..., 0], g[..., 1], g[..., 2], o_cmp, o_swa)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _selected_combined(q, k, v, idx, gates, o_cmp, o_swa, cfg: _Config, cmp_first: int):
    return _fwd_combined(q, k, v, idx, gates, o_cmp, o_swa, cfg, cmp_first)


def _selected_combined_fwd(q, k, v, idx, gates, o_cmp, o_swa, cfg, cmp_first):
    # Under differentiation: the selected kernels as ever, the combination in XLA, so the
    # backward has the branch output it needs.
    # The residuals keep o_cmp as given (the compressed stage's own output, which its backward
    # keeps anyway) and pad it to every query again in the backward, where XLA fuses the pad
    # into its readers, rather than keeping a padded copy alive.
    (o_slc, lse), scored = _forward(q, k, v, idx, cfg)
    out = combine_outputs(gates, rows_to_every_query(o_cmp, cmp_first, q.shape[1]), o_slc,
                          o_swa)
    return out, (q, k, v, idx, o_slc, lse, scored, gates, o_cmp, o_swa)


def _gate_bwd_kernel(d_ref, gc_ref, gs_ref, gw_ref, oc_ref, os_ref, ow_ref,
                     dc_ref, ds_ref, dw_ref, dgc_ref, dgs_ref, dgw_ref, delta_ref, *,
                     t_len: int, first: int, rows: int):
    """Program ``p`` (and one KV head): for query ``t = p < T``, the cotangents of the gated
    sum's selected and window outputs and of the three gates, and the selected backward's
    ``delta``; for compressed row ``j = p - first`` in ``[0, rows)``, that row's cotangent
    (query ``p``'s, or 0 for a row past the last query). The sums run in float32 over each
    head's values, the output cotangents are rounded to their outputs' dtypes (the XLA vjp of
    ``common.combine_outputs``), ``delta`` sums the rounded selected cotangent times the
    selected output (what ``_bwd`` computes from them)."""
    p = pl.program_id(0)
    # Loaded once for both parts; a program past the last query reads the last one's (its
    # blocks are clamped) and uses none of it.
    d = d_ref[...].astype(jnp.float32)  # [Gp, Dv]

    @pl.when(p < t_len)
    def _query():
        o_slc = os_ref[...].astype(jnp.float32)
        d_slc = (gs_ref[...][:, None] * d).astype(ds_ref.dtype)
        ds_ref[...] = d_slc
        delta_ref[...] = jnp.sum(d_slc.astype(jnp.float32) * o_slc, axis=1)
        dgs_ref[...] = jnp.sum(d * o_slc, axis=1)
        dw_ref[...] = (gw_ref[...][:, None] * d).astype(dw_ref.dtype)
        dgw_ref[...] = jnp.sum(d * ow_ref[...].astype(jnp.float32), axis=1)
        o_cmp = oc_ref[...].astype(jnp.float32)
        if first:  # queries before ``first`` have no compressed output (their block: row 0)
            o_cmp = jnp.where(p >= first, o_cmp, 0.0)
        dgc_ref[...] = jnp.sum(d * o_cmp, axis=1)

    row = p - first

    @pl.when((row >= 0) & (row < rows))
    def _row():
        d_cmp = gc_ref[...][:, None] * d
        dc_ref[...] = jnp.where(p < t_len, d_cmp, 0.0).astype(dc_ref.dtype)


def _gate_bwd(d_out, gates, o_cmp_rows, o_slc, o_swa, cfg: _Config, cmp_first: int, kh: int):
    """``(d_rows, d_slc, d_swa, d_gates, delta)`` of the gated sum (padded operands:
    ``d_out, o_slc, o_swa [B, T, K*Gp, Dvp]``, ``o_cmp_rows [B, R, K*Gp, Dvp]``, ``gates
    [B, T, K*Gp, 3]``) by ``_gate_bwd_kernel``: one program per query or compressed row and
    KV head, ``max(T, first + R)`` of them a head."""
    b, t, ngp, dvp = d_out.shape
    rows = o_cmp_rows.shape[1]
    gp = ngp // kh
    n_prog = max(t, cmp_first + rows)

    def query_map(p, bk):
        return (bk // kh, jnp.minimum(p, t - 1), bk % kh, 0)

    def row_map(p, bk):
        return (bk // kh, jnp.clip(p - cmp_first, 0, rows - 1), bk % kh, 0)

    def gate_map(p, bk):
        return (bk // kh, jnp.minimum(p, t - 1), bk % kh)

    tile = pl.BlockSpec((None, None, gp, dvp), query_map)
    row_tile = pl.BlockSpec((None, None, gp, dvp), row_map)
    gate = pl.BlockSpec((None, None, gp), gate_map)
    g = gates.astype(jnp.float32)
    sums = jax.ShapeDtypeStruct((b, t, ngp), jnp.float32)
    d_rows, d_slc, d_swa, dg_cmp, dg_slc, dg_swa, delta = pl.pallas_call(
        functools.partial(_gate_bwd_kernel, t_len=t, first=cmp_first, rows=rows),
        grid=(n_prog, b * kh),
        in_specs=[tile, gate, gate, gate, row_tile, tile, tile],
        out_specs=[row_tile, tile, tile, gate, gate, gate, gate],
        out_shape=[jax.ShapeDtypeStruct(o_cmp_rows.shape, o_cmp_rows.dtype),
                   jax.ShapeDtypeStruct(o_slc.shape, o_slc.dtype),
                   jax.ShapeDtypeStruct(o_swa.shape, o_swa.dtype), sums, sums, sums, sums],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.block_sizes.gate_bwd_num_warps,
                                             num_stages=1),
        interpret=cfg.interpret,
        name="nsa_gate_bwd",
    )(d_out, g[..., 0], g[..., 1], g[..., 2], o_cmp_rows, o_slc, o_swa)
    d_gates = jnp.stack([dg_cmp, dg_slc, dg_swa], axis=-1).astype(gates.dtype)
    return d_rows, d_slc, d_swa, d_gates, delta


def _selected_combined_bwd(cfg, cmp_first, res, d_out):
    q, k, v, idx, o_slc, lse, scored, gates, o_cmp_rows, o_swa = res
    rows = o_cmp_rows.shape[1]
    if cfg.block_sizes.gate_bwd_kernel:
        d_rows, d_slc, d_swa, d_gates, delta = _gate_bwd(
            d_out, gates, o_cmp_rows, o_slc, o_swa, cfg, cmp_first, k.shape[2])
        dq, dk, dv = _bwd(q, k, v, idx, o_slc, lse, d_slc.astype(q.dtype), cfg, scored, delta)
        return dq, dk, dv, None, d_gates, d_rows, d_swa
    o_cmp = rows_to_every_query(o_cmp_rows, cmp_first, q.shape[1])
    _, vjp = jax.vjp(combine_outputs, gates, o_cmp, o_slc, o_swa)
    d_gates, d_cmp, d_slc, d_swa = vjp(d_out)
    dq, dk, dv = _bwd(q, k, v, idx, o_slc, lse, d_slc.astype(q.dtype), cfg, scored)
    d_rows = d_cmp[:, cmp_first:]  # the given rows' share; rows past T get none
    d_rows = jnp.pad(d_rows, [(0, 0), (0, rows - d_rows.shape[1]), (0, 0), (0, 0)])
    return dq, dk, dv, None, d_gates, d_rows, d_swa


_selected_combined.defvjp(_selected_combined_fwd, _selected_combined_bwd)


def selected_attention_combined(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K Hv"],
    indices: Int[Array, "B T K M"],
    gates: Float[Array, "B T N 3"],
    o_cmp: Float[Array, "B T N Hv"],
    o_swa: Float[Array, "B T N Hv"],
    *,
    block_size: int,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    forced_included: bool = False,
    cmp_first: int = 0,
) -> Float[Array, "B T N Hv"]:
    """NSA's output ``combine_outputs(gates, o_cmp, selected_attention(...)[0], o_swa)``.

    Evaluated without differentiation, one kernel walks the selected blocks and stores the
    gated sum (the selected output never reaches HBM, and no separate pass reads the three
    outputs back), with the two-step path's roundings (the selected output to the input
    dtype, the sum in float32); the compilers may contract the sum's multiply-adds
    differently, so the last bit can differ. Under differentiation the forward is the
    two-step path (``selected_attention``, whose kernels honour ``block_sizes`` and
    ``forced_included`` as ever, then the sum in XLA), so the gradients are exactly its.

    Args:
      q, k, v, indices, block_size, scale, block_sizes, interpret, forced_included: as for
        :func:`selected_attention`.
      gates: ``[B, T, N, 3]`` branch gates (cmp, slc, swa).
      o_cmp, o_swa: the compressed and window branches' outputs (one dtype): ``o_swa [B, T,
        N, Dv]``; ``o_cmp [B, R, N, Dv]``, the rows of queries ``cmp_first`` on (row ``j``
        is query ``cmp_first + j``'s; ``R >= T - cmp_first``, later rows are ignored).
      cmp_first: queries before it have no compressed output (0), and ``o_cmp`` leaves them
        out (the compressed branch's rows as ``compressed.gpu.compressed_attention_cudnn_rows``
        gives them, read in place rather than padded to every query first).

    Returns:
      ``[B, T, N, Dv]`` in ``o_cmp.dtype``.
    """
    what = "selected_attention_combined"
    b, t, n, _ = q.shape
    dv = v.shape[-1]
    if not 0 <= cmp_first <= t:
        raise ValueError(f"{what}: cmp_first={cmp_first} must be in [0, T={t}]")
    if o_swa.shape != (b, t, n, dv):
        raise ValueError(f"{what}: o_swa must be [B, T, N, Dv]={(b, t, n, dv)}, got "
                         f"o_swa.shape={o_swa.shape}")
    if (o_cmp.ndim != 4 or o_cmp.shape[0] != b or o_cmp.shape[1] < t - cmp_first
            or o_cmp.shape[2:] != (n, dv)):
        raise ValueError(f"{what}: o_cmp must be [B, R >= T - cmp_first, N, Dv] with "
                         f"(B, T - cmp_first, N, Dv)={(b, t - cmp_first, n, dv)}, got "
                         f"o_cmp.shape={o_cmp.shape}")
    if o_swa.dtype != o_cmp.dtype:
        raise ValueError(f"{what}: o_cmp and o_swa must share a dtype, got {o_cmp.dtype=}, "
                         f"{o_swa.dtype=}")
    if gates.shape != (b, t, n, 3):
        raise ValueError(f"{what}: gates must be [B, T, N, 3]={(b, t, n, 3)}, got "
                         f"{gates.shape=}")
    qp, kp, vp, idx, cfg = _prepare(q, k, v, indices, block_size, scale, block_sizes,
                                    interpret, forced_included, what)
    kh = k.shape[2]
    g = n // kh
    gp, dvp = qp.shape[2] // kh, vp.shape[-1]

    if cmp_first == t:  # no query has a compressed row: nothing to read in place
        o_cmp, cmp_first = rows_to_every_query(o_cmp, cmp_first, t), 0
    # Padded heads get zero gates and zero branch outputs, and are dropped afterwards.
    out = _selected_combined(qp, kp, vp, idx, _pad_heads(gates, kh, gp),
                             _pad_axis(_pad_heads(o_cmp, kh, gp), 3, dvp),
                             _pad_axis(_pad_heads(o_swa, kh, gp), 3, dvp), cfg, int(cmp_first))
    return _unpad_heads(out, kh, g, dv)
