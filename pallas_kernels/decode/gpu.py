"""NSA decode attention on GPU: Pallas kernels lowered to Triton, split flash-decoding style.

One new query per sequence reads only what NSA needs: the compressed keys, the ``n`` selected
blocks and the window. A decode step is a chain of four kernels, each computing its own key
ranges from the query position ``t`` (the sequence's length less one, read in the kernel):

1. ``nsa_decode_cmp`` (grid ``B x K x Mc``): program ``(b, k, j)`` attends the ``G`` query heads
   of KV group ``k`` over the ``j``-th share of sequence ``b``'s visible compressed tokens and
   writes a partial softmax (unnormalised output, running max, running sum) plus the scaled
   logits. Splitting the compressed tokens ``Mc`` ways is what fills the GPU at batch 1.
2. ``nsa_decode_select`` (grid ``B x K x S``): program ``(b, k, s)`` merges the ``Mc`` partial
   log-sum-exps, turns the logits of its run of chunks into the branch's probabilities, sums
   them over the group, maps them to selection-block scores with the overlap weights and
   proposes its top-n (forced blocks first, then score descending, ties to the lower index).
   With ``select_kernel=False`` XLA does this step with the twin's ``select_from_logits``.
3. ``nsa_decode_sparse`` (grid ``B x K x (ns + Mw)``, both counts powers of two): programs
   ``j < ns`` merge the ``S`` proposals (by rank: score descending, then block index, as a
   stable top-k over them; with more than ``MAX_SPARSE_CANDIDATES`` XLA's top-k merges them
   first) and attend the blocks of slots ``jP ... jP + P - 1`` in one softmax (causal inside
   the current block; ``-1`` slots and slots past ``n`` do nothing; ``P = sparse_slots``, more
   at large batches); programs ``j >= ns`` a piece of the window ``[t - w + 1, t]``. With
   few compressed splits in all (``B x K x Mc <= sparse_merge_parts``) ``Dv/16`` more
   programs merge the compressed branch's splits meanwhile, off step 4's critical path.
4. ``nsa_decode_combine`` (grid ``B x K x Dv/Dvs``): merges every branch's partials over a
   share of the columns, rounds each branch to the output dtype and applies the gates.

The kernels issue every load they can before their first arithmetic: a warp issues in order,
so a load written after arithmetic on an earlier load waits for that load.

With ``combine_kernel=False`` XLA does step 4 (and the select kernel merges ``o_cmp`` when it
can); with ``fuse_sparse=False`` the selected blocks and the window are two launches,
``nsa_decode_slc`` and ``nsa_decode_swa``, over key ranges computed in XLA, and XLA does step 4.

Every attention program walks whole tiles of ``block_k`` keys aligned to multiples of
``block_k`` inside an inclusive key range ``[lo, hi]``, masking keys outside it, so no load
starts at an unaligned or out-of-bounds slot.

The select kernel walks the compressed tokens in chunks of ``select_chunk`` (``select_chunk /
r'`` selection blocks, ``r' = l'/d``); program ``s`` takes a run of chunks (a power of two of
them), up to the chunk of the current block. Per chunk it maps the group-summed probabilities
to block scores with a constant ``[chunk, chunk/r']`` weight table (the spec's Eq. 9
overlaps); the last ``r - 1`` tokens of a chunk feed the next chunk's first block through a
carried scalar (a program recomputes it from the chunk before its run); the next chunk's
logits are loaded before this chunk's arithmetic. The scores go to a ``[J']`` scratch output
(``J'`` the run's blocks); after a barrier the program reads them back (a run of one chunk
with ``J' <= RANK_TOPN_MAX`` keeps them in registers instead) and takes its top-n:
with ``J' <= RANK_TOPN_MAX`` by ranking every block at once, otherwise by ``n`` rounds of
argmax (which returns the lowest index among equal maxima, as ``lax.top_k`` orders them); both
give the slots in the twin's order whenever the scores are the twin's to the bit. They can
differ in the last bit: the chunk's first block adds the carried term last, the twin sums in
one fixed order, so blocks whose scores tie exactly in real arithmetic (uniform
probabilities, say) may be separated by rounding and a higher index win, as in the training
kernels. The kernel needs ``r'`` a power of two and ``J' <= MAX_SELECT_BLOCKS``; otherwise XLA
selects.

Sequences must fit the cache (``seq_lens <= S``). Past it the output is undefined, but the
kernels clamp the current block and the selected keys to the cache, so no load leaves it.

Layout: ``q [B, N, Dk]``, raw caches ``[B, S, K, D]`` (the window's may be a ring of
``S' >= w`` slots), compressed caches ``[B, C, K, D]``: the twin's. Limits (else
``NotImplementedError``, and callers fall back to the twin): ``Dk`` and ``Dv`` powers of two
``>= 16``; ``S``, ``S'`` and ``l'`` multiples of a power of two ``>= 16``; ``C`` a multiple of
16. Query heads per group are padded to a power of two ``>= 16``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from pallas_kernels.common import MASK_VALUE, check_int32_offsets, default_scale
from pallas_kernels.decode.reference import (
    check_decode_args,
    combine_gated,
    select_from_logits,
)
from pallas_kernels.selection.reference import check_geometry, overlap_tables

MAX_SELECT_BLOCKS = 4096  # J' the select kernel keeps in registers (l' = 64: 256k tokens)
# Up to this many blocks per program the select kernel ranks all of them at once (a [J', 32]
# comparison a step); beyond, it takes the top-n by n rounds of argmax. On the H200 (commit
# 227c481) ranking took the select kernel from 7.4 to 5.5 us at 64k / batch 1 (J' = 64) but
# from 23 to 44 us at 64k / batch 32 (J' = 256).
RANK_TOPN_MAX = 64
RANK_TILE = 32
# The sparse kernel merges at most this many select candidates itself (S programs x n' each);
# with more, XLA's top-k merges them first. On the H200 (commit acc1582) ranking 256 of them
# took the sparse kernel from 3.2 to 12 us at 64k / batch 1; 64 cost about 0.9 us at 8k.
MAX_SPARSE_CANDIDATES = 64


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the decode kernels.

    Attributes:
      block_k: keys per tile (upper bound; the largest power of two dividing the cache is used).
      target_programs: programs to aim for per kernel (about two per SM of an H100/H200).
      num_warps, num_stages: Triton launch parameters.
      fuse_sparse: attend the selected blocks and the window in one launch (a ``lax.cond`` per
        program picks the key set) rather than two.
      select_kernel: take the top-n blocks in the ``nsa_decode_select`` kernel; ``False`` runs
        the twin's XLA selection (``select_from_logits``) instead.
      select_chunk: compressed tokens per step of the select kernel (a power of two >= 16;
        raised to ``l'/d`` if smaller). At 64k / batch 32 on the H200, 128 took the kernel
        from 23.2 to 20.0 us against 64 (commit a66f854).
      select_merge_splits: without the combine kernel, the select kernel also merges the
        compressed branch's partial outputs into ``o_cmp`` when that kernel used at most this
        many splits (``0``: never); the combine kernel merges them itself.
        With more splits (small batches) XLA merges them, since one program per KV group
        would read every split's ``[G, Dv]`` output alone.
      select_splits: most select programs per (sequence, KV group), each walking a run of
        chunks and proposing its own top-n (fewer where ``target_programs`` asks for fewer;
        ``0``: no cap); rounded up to a power of two. At 64k and batch 1 on the H200, 16
        took 0.048 ms against 0.085 ms for 64 (commit 2e147e7): the merge's top-k grows with
        the proposals.
      sparse_slots: selected blocks one ``nsa_decode_sparse`` program attends in one softmax
        (a power of two; ``0``: as many as leave about ``target_programs`` programs), which
        cuts the partial outputs XLA merges at large batches.
      cmp_block_k, cmp_num_warps, cmp_num_stages: the compressed kernel's own tile and launch
        parameters (``0``: ``block_k``, ``num_warps``, ``num_stages``).
      cmp_splits: programs per (sequence, KV group) of the compressed kernel, a power of two
        (``0``: as many as leave about ``target_programs`` programs).
      select_programs: programs the select kernel aims for (``0``: ``target_programs``); each
        of the ``S`` programs of a (sequence, KV group) walks ``1/S`` of the chunks.
      combine_kernel: with ``fuse_sparse``, one ``nsa_decode_combine`` kernel merges every
        branch's partials and applies the gates; ``False`` leaves that to XLA.
      select_num_warps, sparse_num_warps, combine_num_warps: warps of the select, sparse and
        combine kernels (``0``: ``num_warps``).
      sparse_merge_cols, sparse_merge_parts: with the combine kernel and at most
        ``sparse_merge_parts`` compressed splits in all (``B x K x Mc``), ``Dv /
        sparse_merge_cols`` more programs of the sparse kernel merge the compressed branch's
        split partials, that many columns each, while its other programs attend
        (``sparse_merge_cols`` a power of two; ``0``: the combine kernel merges them). On the
        H200 (commit e55721a, one process, interleaved) this took 8k / batch 1 from 15.50 to
        14.95 us a step and 16k / batch 1 from 21.00 to 20.13 us (the combine kernel from 2.95
        to 2.39 us, the sparse kernel from 3.70 to 3.92 us), but 64k / batch 32 from 148.7 to
        152.8 us: the extra programs then compete with the attention programs.
    """

    block_k: int = 64
    target_programs: int = 264
    num_warps: int = 4
    num_stages: int = 2
    fuse_sparse: bool = True
    select_kernel: bool = True
    select_chunk: int = 128
    select_merge_splits: int = 8
    select_splits: int = 16
    sparse_slots: int = 0
    cmp_block_k: int = 0
    cmp_num_warps: int = 0
    cmp_num_stages: int = 0
    cmp_splits: int = 0
    select_programs: int = 0
    combine_kernel: bool = True
    select_num_warps: int = 0
    sparse_num_warps: int = 0
    combine_num_warps: int = 0
    sparse_merge_cols: int = 16
    sparse_merge_parts: int = 128

    def __post_init__(self):
        if self.block_k < 16 or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k must be a power of two >= 16, got {self.block_k}")
        if self.target_programs < 1:
            raise ValueError(f"target_programs must be >= 1, got {self.target_programs}")
        if self.select_chunk < 16 or self.select_chunk & (self.select_chunk - 1):
            raise ValueError(f"select_chunk must be a power of two >= 16, got {self.select_chunk}")
        if self.select_merge_splits < 0:
            raise ValueError(f"select_merge_splits must be >= 0, got {self.select_merge_splits}")
        if self.select_splits < 0:
            raise ValueError(f"select_splits must be >= 0, got {self.select_splits}")
        for name in ("sparse_slots", "cmp_splits", "cmp_block_k", "sparse_merge_cols"):
            x = getattr(self, name)
            if x < 0 or x & (x - 1):
                raise ValueError(f"{name} must be 0 or a power of two, got {x}")
        if 0 < self.cmp_block_k < 16:
            raise ValueError(f"cmp_block_k must be 0 or a power of two >= 16, got "
                             f"{self.cmp_block_k}")
        for name in ("cmp_num_warps", "cmp_num_stages", "select_programs", "select_num_warps",
                     "sparse_num_warps", "combine_num_warps", "sparse_merge_parts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _pow2_divisor(x: int, cap: int) -> int:
    """Largest power of two dividing ``x``, at most ``cap``."""
    p = x & -x if x else cap
    return min(p, cap)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _prev_pow2(x: int) -> int:
    return 1 << max(0, x.bit_length() - 1)


# Kernels ---------------------------------------------------------------------------------------

def _attend_range(q, k_ref, v_ref, lo, hi, *, scale, block_k, precision, s_ref=None,
                  ring=False, init=None):
    """Online-softmax attention of ``q [Gp, Dk]`` over keys ``[lo, hi]`` of ``k_ref [S, Dk]``.

    With ``ring``, position ``p`` is read from slot ``p % S`` (a tile never wraps: ``S`` is a
    multiple of ``block_k``).

    Returns ``(o [Gp, Dv], m [Gp], l [Gp])`` in f32: unnormalised output, max logit, sum of
    ``exp(s - m)``; an empty range gives ``(0, MASK_VALUE, 0)``, or ``init`` unchanged: with
    ``init`` the softmax continues from an earlier range's state.
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

    if init is None:
        init = (jnp.zeros((gp, dv), jnp.float32), jnp.full((gp,), MASK_VALUE, jnp.float32),
                jnp.zeros((gp,), jnp.float32))
    return jax.lax.fori_loop(0, count, body, init)


def _range_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, **kw):
    o, m_i, l_i = _attend_range(q_ref[...], k_ref, v_ref, lo_ref[()], hi_ref[()], **kw)
    o_ref[...] = o
    m_ref[...] = m_i
    l_ref[...] = l_i


def _split_piece(lo, hi, num_splits, j, block_k):
    """Piece ``j`` of ``split_range(lo, hi, num_splits, block_k)``: the ``j``-th run of whole
    aligned tiles of ``[lo, hi]`` (``(0, -1)`` when empty). Scalars in a kernel, or arrays."""
    first = lo // block_k
    ntiles = jnp.where(hi >= lo, hi // block_k - first + 1, 0)
    per = (ntiles + num_splits - 1) // num_splits
    t0 = j * per
    t1 = jnp.minimum(t0 + per, ntiles)
    empty = t1 <= t0
    lo_s = jnp.maximum(lo, (first + t0) * block_k)
    hi_s = jnp.minimum(hi, (first + t1) * block_k - 1)
    return jnp.where(empty, 0, lo_s), jnp.where(empty, -1, hi_s)


def _num_visible(t, l, d, num_cmp):  # noqa: E741  (the paper's symbol)
    """Compressed tokens query ``t`` sees (the twin's ``num_visible_cmp``), at most ``C``."""
    n = jnp.where(t + 1 >= l, jnp.maximum(t + 1 - l, 0) // d + 1, 0)
    return jnp.minimum(n, num_cmp)


def _cmp_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, s_ref, *, l, d, splits, **kw):  # noqa: E741
    """``nsa_decode_cmp``: program ``j`` attends its share of the visible compressed tokens
    (``split_range`` of ``[0, n_vis - 1]``) and writes their logits."""
    hi = _num_visible(len_ref[()] - 1, l, d, k_ref.shape[0]) - 1
    lo, hi = _split_piece(0, hi, splits, pl.program_id(2), kw["block_k"])
    o, m_i, l_i = _attend_range(q_ref[...], k_ref, v_ref, lo, hi, s_ref=s_ref, **kw)
    o_ref[...] = o
    m_ref[...] = m_i
    l_ref[...] = l_i


def _merged_slots(ids_ref, vals_ref, first, count: int, top_n: int):
    """Blocks of slots ``first .. first + count - 1`` of ``merge_candidates`` over the flat
    candidates ``ids, vals [M]`` (the select programs' lists one after another): each
    candidate's rank is the number of candidates before it, those with a higher score and the
    earlier ones with an equal score, so slot ``r`` holds the candidate of rank ``r``, ``-1``
    if its score is ``-inf`` or ``r >= n``."""
    m = ids_ref.shape[0]
    tile = min(m, RANK_TILE)
    # Every load before the ranking (see _score_loads): the scores and ids, and the scores
    # again as the comparison's tiles (at most MAX_SPARSE_CANDIDATES // RANK_TILE of them).
    vals, ids = vals_ref[...], ids_ref[...]  # [M]
    tiles = [vals_ref[pl.ds(it * tile, tile)] for it in range(m // tile)]  # [tile] each
    pos = jnp.arange(m, dtype=jnp.int32)
    rank = jnp.zeros((m,), jnp.int32)
    for it, vi in enumerate(tiles):
        rank = rank + _ahead(vals, pos, vi, it * tile + jnp.arange(tile, dtype=jnp.int32))
    picked = jnp.where(vals > -jnp.inf, ids, -1)
    out = []
    for s in range(count):
        r = first + s
        blk = jnp.where(rank == r, picked, 0).sum()
        out.append(jnp.where(r < top_n, blk, -1))
    return out


def _sparse_ranges_kernel(len_ref, ids_ref, vals_ref, q_ref, k_slc_ref, v_slc_ref, k_swa_ref,
                          v_swa_ref, *refs, num_slc, num_swa, slots, top_n, lp, window, ordered,
                          merge_cols=0, **kw):
    """``nsa_decode_sparse`` with its blocks and ranges found here: program ``j < num_slc``
    merges the select programs' candidates ``ids, vals [M]`` and attends the blocks of slots
    ``jP .. jP + P - 1`` (``-1``: nothing), each cut at the query ``t``, in one softmax; the
    others piece ``j - num_slc`` of the window ``[t - w + 1, t]``. With ``ordered`` the
    candidates are one list already in slot order (``-1`` unused), read as they are.

    With ``merge_cols`` the compressed branch's split partials ``c_o [Mc, Gp, Dv]``, ``c_m,
    c_l [Mc, Gp]`` come in too, and programs ``j >= num_slc + num_swa`` (whose own partials
    are empty) merge them into ``o_cmp [Gp, Dv]``, ``merge_cols`` columns each: work the
    combine kernel would otherwise do on its critical path, done here beside the selected
    programs, which take longer."""
    if merge_cols:
        c_o_ref, c_m_ref, c_l_ref, o_ref, m_ref, l_ref, oc_ref = refs
    else:
        o_ref, m_ref, l_ref = refs
    # The program id is read outside the branches (the interpreter cannot inside): first when
    # the merge programs need it, else after the query, where the measured kernels read it.
    j = pl.program_id(2) if merge_cols else None
    if merge_cols:
        @pl.when(j >= num_slc + num_swa)
        def _():
            c0 = pl.multiple_of((j - num_slc - num_swa) * merge_cols, merge_cols)
            cols = pl.ds(c0, merge_cols)
            parts = _load_chunks(c_o_ref, c_m_ref, c_l_ref, 0, c_o_ref.shape[0], cols=cols)
            oc_ref[:, cols] = _merge_loaded(*parts)

    t = len_ref[()] - 1  # the query's position
    q = q_ref[...]
    if j is None:
        j = pl.program_id(2)

    def selected():
        carry = None
        if ordered:  # slot r holds ids[r] (the index clamped: slots past n hold nothing)
            blocks = [jnp.where(j * slots + i < top_n,
                                ids_ref[jnp.minimum(j * slots + i, top_n - 1)], -1)
                      for i in range(slots)]
        else:
            blocks = _merged_slots(ids_ref, vals_ref, j * slots, slots, top_n)
        for blk in blocks:
            lo = blk * lp
            lo, hi = (jnp.where(blk >= 0, lo, 0),
                      jnp.where(blk >= 0, jnp.minimum(jnp.minimum(lo + lp - 1, t),
                                                      k_slc_ref.shape[0] - 1), -1))
            carry = _attend_range(q, k_slc_ref, v_slc_ref, lo, hi, init=carry, **kw)
        return carry

    def window_piece():
        lo, hi = _split_piece(jnp.maximum(t - window + 1, 0), t, num_swa, j - num_slc,
                              kw["block_k"])
        return _attend_range(q, k_swa_ref, v_swa_ref, lo, hi, ring=True, **kw)

    o, m_i, l_i = jax.lax.cond(j < num_slc, selected, window_piece)
    o_ref[...] = o
    m_ref[...] = m_i
    l_ref[...] = l_i


def _load_chunks(o_ref, m_ref, l_ref, start: int, count: int, cols=slice(None)):
    """The loads of ``_merge_loaded``: partials ``start .. start + count - 1`` (``count`` a power
    of two) of refs ``o [M, Gp, Dvs]`` (columns ``cols``), ``m, l [M, Gp]``, as up to 16 at a
    time."""
    chunk = min(count, 16)
    starts = range(start, start + count, chunk)
    return ([m_ref[pl.ds(j, chunk), :] for j in starts],  # [chunk, Gp]
            [l_ref[pl.ds(j, chunk), :] for j in starts],
            [o_ref[pl.ds(j, chunk), :, cols] for j in starts])  # [chunk, Gp, Dvs]


def _merge_loaded(ms, ls, os_):
    """``merge_partials`` of loaded chunks (``_load_chunks``): the normalised output
    ``[Gp, Dvs]``, 0 where every partial is empty."""
    m_max = functools.reduce(jnp.maximum, [m.max(axis=0) for m in ms])  # [Gp]
    l_tot, o_tot = None, None
    for m, l_j, o in zip(ms, ls, os_, strict=True):
        a = jnp.exp(m - m_max[None, :])  # [chunk, Gp]
        l_c, o_c = (a * l_j).sum(axis=0), (a[:, :, None] * o).sum(axis=0)
        l_tot = l_c if l_tot is None else l_tot + l_c
        o_tot = o_c if o_tot is None else o_tot + o_c
    return o_tot / jnp.where(l_tot > 0, l_tot, 1.0)[:, None]


def _combine_kernel(*refs, num_slc, num_swa, cmp_merged):
    """``nsa_decode_combine``: merges the compressed kernel's and the sparse kernel's partials
    (``num_slc`` selected, then ``num_swa`` window; powers of two) over this program's columns
    and gates them, each branch first rounded to the output dtype (the twin's
    ``combine_gated``). Every load (the three branches' partials and the gates) is issued
    before the first arithmetic (see ``_score_loads``). With ``cmp_merged`` the compressed
    branch comes merged, ``o_cmp [Gp, Dvs]`` (the sparse kernel's merge programs)."""
    if cmp_merged:
        oc_ref, s_o_ref, s_m_ref, s_l_ref, g_ref, out_ref = refs
        cmp = oc_ref[...]
    else:
        c_o_ref, c_m_ref, c_l_ref, s_o_ref, s_m_ref, s_l_ref, g_ref, out_ref = refs
        cmp = _load_chunks(c_o_ref, c_m_ref, c_l_ref, 0, c_o_ref.shape[0])
    loaded = [cmp, _load_chunks(s_o_ref, s_m_ref, s_l_ref, 0, num_slc),
              _load_chunks(s_o_ref, s_m_ref, s_l_ref, num_slc, num_swa)]
    gates = [g_ref[:, c] for c in range(3)]
    dtype = out_ref.dtype
    out = None
    for i, (g, parts) in enumerate(zip(gates, loaded, strict=True)):
        o = parts if (i == 0 and cmp_merged) else _merge_loaded(*parts)
        gated = g.astype(jnp.float32)[:, None] * o.astype(dtype).astype(jnp.float32)
        out = gated if out is None else out + gated
    out_ref[...] = out.astype(dtype)


@dataclasses.dataclass(frozen=True)
class _SelectGeom:
    """Static shape of one ``nsa_decode_select`` call."""

    l: int  # noqa: E741  (the paper's symbol)
    d: int
    lp: int
    top_n: int
    g: int  # query heads per group: rows of the logits that count
    num_cmp: int  # C, compressed slots in the cache
    num_blocks: int  # J, selection blocks in the raw cache
    chunk: int  # compressed tokens per step
    interpret: bool
    max_splits: int = 1  # programs per (sequence, KV group), at most

    @property
    def rp(self) -> int:
        return self.lp // self.d

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk // self.rp

    @property
    def num_chunks(self) -> int:
        """Chunks holding every selection block of the cache."""
        return -(-self.num_blocks // self.blocks_per_chunk)

    @property
    def chunks_per_split(self) -> int:
        """Chunks one program walks: a power of two, so its score row is one."""
        return _next_pow2(-(-self.num_chunks // max(1, self.max_splits)))

    @property
    def splits(self) -> int:
        """Programs per (sequence, KV group): a power of two (those past the last chunk
        propose nothing), at most ``max_splits`` rounded up to a power of two."""
        return _next_pow2(-(-self.num_chunks // self.chunks_per_split))

    @property
    def score_len(self) -> int:
        """``J'``: the scratch row of block scores of one program, a power of two."""
        return self.chunks_per_split * self.blocks_per_chunk

    @property
    def scores_in_registers(self) -> bool:
        """Whether a program ranks its scores from registers: a run of one chunk, few enough
        blocks to rank at once."""
        return self.chunks_per_split == 1 and self.blocks_per_chunk <= RANK_TOPN_MAX

    @property
    def logits_len(self) -> int:
        """Logit columns the kernel may load: whole chunks up to the last block's."""
        return self.num_chunks * self.chunk


def _cmp_lse(m, l_s):
    """Merges the compressed kernel's split softmaxes (``merge_partials``' expressions) from
    ``m, l [Mc, Gg]``: ``(m_max, safe, has, lse)`` per row, ``safe`` the summed weights (1
    where a row saw nothing, ``has`` false there)."""
    m_max = m.max(axis=0)  # [Gg]
    l_tot = (jnp.exp(m - m_max[None, :]) * l_s).sum(axis=0)  # [Gg]
    has = l_tot > 0
    safe = jnp.where(has, l_tot, 1.0)
    return m_max, safe, has, m_max + jnp.log(safe)


class _ScoreLoads(NamedTuple):
    """What ``_score_run`` reads before its arithmetic (see ``_score_loads``)."""

    n_chunks: jax.Array  # chunks holding blocks up to the current one (clamped to the cache)
    first: jax.Array  # [Gg, bc] logits of chunk c0 (clamped into the row)
    prev: jax.Array  # [Gg, bc] logits of chunk c0 - 1 (clamped), for the carried term


def _load_chunk(s_ref, c, bc):
    start = c * bc if isinstance(c, int) else pl.multiple_of(c * bc, bc)
    return s_ref[:, pl.ds(start, bc)]  # [Gg, bc]


def _score_loads(cur, s_ref, c0, geom: _SelectGeom) -> _ScoreLoads:
    """Issues the logits loads of ``_score_run``'s first chunk and of the chunk before it. A
    warp issues in order, so a load placed after arithmetic on an earlier load waits for that
    load: the kernels issue every load they can before their first arithmetic."""
    # A sequence longer than the cache (a broken contract) must not read past the logits.
    n_chunks = jnp.minimum(cur // geom.blocks_per_chunk + 1, geom.num_chunks)
    # The carried term into chunk c0 comes from chunk c0 - 1, another program's last chunk.
    # (Clamped into the row: a run past the last chunk has no chunk to carry into.)
    prev = jnp.clip(c0 - 1, 0, n_chunks - 1)
    return _ScoreLoads(n_chunks, _load_chunk(s_ref, jnp.minimum(c0, n_chunks - 1), geom.chunk),
                       _load_chunk(s_ref, prev, geom.chunk))


def _score_run(t, s_ref, w_in, w_next, score_ref, shift, c0, run, loads: _ScoreLoads,
               geom: _SelectGeom, in_registers: bool = False):
    """Block scores of chunks ``c0 .. c0 + run - 1`` (cut at the current block's chunk) into
    ``score_ref[(c - c0) nbc ...]``; chunk ``c0``'s first block also gets the carried term of
    chunk ``c0 - 1``. ``w_in [bc, nbc]`` and ``w_next [bc]`` are the spec's overlap weights
    (``selection/reference.py``) inside a chunk and into the next chunk's first block. With
    ``in_registers`` and a run of one chunk, also returns the scores ``[nbc]``."""
    bc, nbc = geom.chunk, geom.blocks_per_chunk
    n_vis = _num_visible(t, geom.l, geom.d, geom.num_cmp)
    rows = jnp.arange(s_ref.shape[0], dtype=jnp.int32)[:, None] < geom.g  # [Gg, 1]
    tok = jnp.arange(bc, dtype=jnp.int32)
    first = jnp.arange(nbc, dtype=jnp.int32) == 0
    n_chunks = loads.n_chunks
    c1 = jnp.minimum(c0 + run, n_chunks)

    def group_probs(c, s):
        vis = rows & ((c * bc + tok) < n_vis)[None, :]  # [Gg, bc]
        # The same expression as the twin's (and the training path's) probabilities.
        p = jnp.where(vis, jnp.exp(jnp.minimum(s - shift, 0.0)), 0.0)
        return p.sum(axis=0)  # [bc]: the group's sum first, as the twin does

    # Loads are clamped to ``n_chunks``. (Clamping to the logits' static width instead, so that
    # no address waits for the length, gave the same results but took the select kernel from
    # 3.70 to 4.12 us at 8k / batch 1 on the H200, commit dc2d94b; 20.1 -> 19.9 us at 64k / 32.)
    def chunk_body(c, carry):
        s, pending = carry
        # In flight during this chunk's maths.
        s_next = _load_chunk(s_ref, jnp.minimum(c + 1, n_chunks - 1), bc)
        p_sum = group_probs(c, s)
        score = (p_sum[:, None] * w_in).sum(axis=0) + jnp.where(first, pending, 0.0)  # [nbc]
        score_ref[pl.ds(pl.multiple_of((c - c0) * nbc, nbc), nbc)] = score
        return s_next, (p_sum * w_next).sum()

    prev = jnp.clip(c0 - 1, 0, n_chunks - 1)
    pending = jnp.where(c0 > 0, (group_probs(prev, loads.prev) * w_next).sum(), 0.0)
    if run == 1 and in_registers:
        # One chunk: its scores stay in registers for the ranking (and are stored for the
        # caller). A program whose chunk lies past the current block's scores the clamped
        # chunk instead: its blocks lie past the current one and rank nowhere.
        score = (group_probs(c0, loads.first)[:, None] * w_in).sum(axis=0) + jnp.where(
            first, pending, 0.0)  # [nbc], chunk_body's expression
        score_ref[pl.ds(0, nbc)] = score
        return score
    jax.lax.fori_loop(c0, c1, chunk_body, (loads.first, pending))
    return None


def _priority(j, score, cur):
    """The slot order's key of block ``j``: forced blocks first, blocks past ``cur`` never."""
    forced = (j == 0) | (j == cur) | (j == cur - 1)
    return jnp.where(j <= cur, jnp.where(forced, jnp.inf, score), -jnp.inf)


def _block_ranks(score_ref, j0, cur, tiles):
    """Every block's rank in the slot order among the ``J'`` blocks of ``score_ref``
    (``j0 + i`` the block of entry ``i``): the blocks before it are those with a higher
    priority and the lower-indexed ones with an equal priority, so valid blocks (priority
    ``> -inf``) hold ranks ``0 .. valid - 1``. Tiles of ``RANK_TILE`` blocks are compared at a
    time, ``tiles`` of them. Returns ``(rank, pri)``."""
    jp = score_ref.shape[0]
    jl = jnp.arange(jp, dtype=jnp.int32)  # local block index
    pri = _priority(j0 + jl, score_ref[...], cur)  # [J']
    tile = min(jp, RANK_TILE)

    def rank_tile(it, rank):
        il = it * tile + jnp.arange(tile, dtype=jnp.int32)
        pri_i = _priority(j0 + il, score_ref[pl.ds(pl.multiple_of(it * tile, tile), tile)], cur)
        return rank + _ahead(pri, jl, pri_i, il)

    return jax.lax.fori_loop(0, tiles, rank_tile, jnp.zeros((jp,), jnp.int32)), pri


def _ahead(pri, jl, pri_i, il):
    """For each entry ``jl`` (priority ``pri``), how many of entries ``il`` (``pri_i``) come
    before it: a higher priority, or an equal one and a lower index (blocks by priority, or
    select candidates by score)."""
    ahead = ((pri_i[None, :] > pri[:, None])
             | ((pri_i[None, :] == pri[:, None]) & (il[None, :] < jl[:, None])))
    return ahead.astype(jnp.int32).sum(axis=1)


def _select_kernel(len_ref, m_ref, l_ref, s_ref, w_in_ref, w_next_ref, *refs, geom: _SelectGeom,
                   merge_o: bool):
    if merge_o:
        o_ref, idx_ref, val_ref, score_ref, lse_ref, oc_ref = refs
    else:
        idx_ref, val_ref, score_ref, lse_ref = refs
    # Every load first (see _score_loads): the length, the split maxima and sums and the
    # weight tables, then the logits, whose addresses wait for the length only.
    t = len_ref[()] - 1  # the query's position
    m, l_s = m_ref[...], l_ref[...]
    w_in, w_next = w_in_ref[...], w_next_ref[...]
    cur = jnp.minimum(t // geom.lp, geom.num_blocks - 1)  # the current block (in the cache)
    split = pl.program_id(2)
    c0 = split * geom.chunks_per_split
    loads = _score_loads(cur, s_ref, c0, geom)

    # 1. Merge the compressed kernel's split softmaxes. With merge_o, program ``split`` merges
    # its own slice of the output's columns.
    m_max, safe, has, lse = _cmp_lse(m, l_s)
    lse_ref[...] = jnp.where(has, lse, -jnp.inf)
    if merge_o:
        o = jnp.zeros(oc_ref.shape, jnp.float32)
        for j in range(o_ref.shape[0]):  # a few splits, unrolled so the loads issue together
            o = o + jnp.exp(m_ref[j, :] - m_max)[:, None] * o_ref[j]  # [Gg, Dv / splits]
        oc_ref[...] = o / safe[:, None]
    shift = jnp.where(has, lse, 0.0)[:, None]  # [Gg, 1]: the twin's finite lse

    # 2. Block scores of this program's run of chunks, into its scratch row (and, for a run of
    # one chunk, kept in registers: no barrier and no reading back).
    scores = _score_run(t, s_ref, w_in, w_next, score_ref, shift, c0, geom.chunks_per_split,
                        loads, geom, in_registers=geom.scores_in_registers)

    # 3. This program's top-n candidates.
    _top_candidates(score_ref, idx_ref, val_ref, c0, cur, geom, scores=scores)


def _top_candidates(score_ref, idx_ref, val_ref, c0, cur, geom: _SelectGeom, scores=None):
    """Writes the top-n of blocks ``j0 .. j0 + J' - 1``, those of chunks ``c0 ...`` (scores in
    ``score_ref [J']``, valid up to ``cur``) to ``idx_ref, val_ref [n']`` in slot order: with
    ``J' <= RANK_TOPN_MAX`` by ranking every block at once, otherwise by ``n`` rounds of
    argmax; slots past the valid blocks stay ``(-1, -inf)``. Each thread reads scores other
    threads wrote: a CTA barrier makes the global writes before it visible after it. With
    ``scores [J']`` given (in registers) they are ranked as they are, with no barrier."""
    if scores is None and not geom.interpret:
        plgpu.debug_barrier()
    j0 = c0 * geom.blocks_per_chunk
    jp = score_ref.shape[0]
    slot = jnp.arange(idx_ref.shape[0], dtype=jnp.int32)
    rounds = jnp.clip(cur + 1 - j0, 0, min(geom.top_n, jp))
    jl = jnp.arange(jp, dtype=jnp.int32)
    if jp <= RANK_TOPN_MAX:
        # Every block's rank at once; slot r takes the block of rank r.
        if scores is None:
            rank, pri = _block_ranks(score_ref, j0, cur, jp // min(jp, RANK_TILE))
        else:
            pri = _priority(j0 + jl, scores, cur)
            rank = _ahead(pri, jl, pri, jl)  # [J', J'] in one comparison
        hit = rank[None, :] == slot[:, None]  # [n', J']: one block per slot
        used = slot < rounds
        ids = jnp.where(used, jnp.where(hit, j0 + jl[None, :], 0).sum(axis=1), -1)
        vals = jnp.where(used, jnp.where(hit, pri[None, :], 0.0).sum(axis=1), -jnp.inf)
    else:
        j = j0 + jl

        def pick(i, carry):
            pri, ids, vals = carry
            best = jnp.argmax(pri).astype(jnp.int32)  # the lowest index among equal maxima
            ids = jnp.where(slot == i, j0 + best, ids)
            vals = jnp.where(slot == i, jnp.max(pri), vals)
            return jnp.where(j == j0 + best, -jnp.inf, pri), ids, vals

        _, ids, vals = jax.lax.fori_loop(0, rounds, pick, (
            _priority(j, score_ref[...], cur), jnp.full(slot.shape, -1, jnp.int32),
            jnp.full(slot.shape, -jnp.inf, jnp.float32)))
    idx_ref[...] = ids
    val_ref[...] = vals


def merge_candidates(ids: Int[Array, "B K S M"], vals: Float[Array, "B K S M"],
                     top_n: int) -> Int[Array, "B K n"]:
    """The ``top_n`` best of the select programs' candidates (``-1`` where fewer are valid),
    in the twin's slot order: score descending, then block index ascending. Programs hold
    ascending block ranges and list equal scores by ascending index, so a stable top-k over
    their concatenation breaks ties by index."""
    b, kh = ids.shape[:2]
    if ids.shape[2] == 1:
        return ids[:, :, 0, :top_n]
    vals, pos = jax.lax.top_k(vals.reshape(b, kh, -1), top_n)
    picked = jnp.take_along_axis(ids.reshape(b, kh, -1), pos, axis=-1)
    return jnp.where(vals > -jnp.inf, picked, -1)


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


def _range_call(lo, hi, qg, k, v, *, scale, block_k, precision, params, interpret, name,
                ring=False):
    """Split attention over the key ranges ``lo, hi [B, K, M]`` (the unfused sparse launches)."""
    b, kh, m = lo.shape
    gp, dk = qg.shape[2:]
    s_len, dv = k.shape[1], v.shape[-1]
    kernel = functools.partial(_range_kernel, scale=scale, block_k=block_k, precision=precision,
                               ring=ring)
    out_specs, out_shape = _partial_specs(gp, dv), _partial_shapes(b, kh, m, gp, dv)
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


def _len_spec():
    return pl.BlockSpec((None,), lambda b, k, j: (b,))


def _cmp_call(lens, qg, k, v, *, l, d, splits, scale, block_k, precision, params, interpret,  # noqa: E741
              logits_len):
    """``nsa_decode_cmp`` over grid ``B x K x splits``: split partials and the logits
    ``[B, K, Gp, logits_len]`` (only visited tiles are written)."""
    b, kh = k.shape[0], k.shape[2]
    gp, dk = qg.shape[2:]
    c, dv = k.shape[1], v.shape[-1]
    kernel = functools.partial(_cmp_kernel, l=l, d=d, splits=splits, scale=scale,
                               block_k=block_k, precision=precision)
    return pl.pallas_call(
        kernel,
        grid=(b, kh, splits),
        in_specs=[_len_spec(), pl.BlockSpec((None, None, gp, dk), lambda b, k, j: (b, k, 0, 0)),
                  _seq_spec(c, dk), _seq_spec(c, dv)],
        out_specs=_partial_specs(gp, dv) + [
            pl.BlockSpec((None, None, gp, logits_len), lambda b, k, j: (b, k, 0, 0))],
        out_shape=_partial_shapes(b, kh, splits, gp, dv) + [
            jax.ShapeDtypeStruct((b, kh, gp, logits_len), jnp.float32)],
        compiler_params=params,
        interpret=interpret,
        name="nsa_decode_cmp",
    )(lens, qg, k, v)


def _sparse_ranges_call(lens, ids, vals, qg, k_slc, v_slc, k_swa, v_swa, *, num_slc, num_swa,
                        slots, top_n, lp, window, ordered, scale, block_k, precision, params,
                        interpret, cmp_parts=None, merge_cols=0):
    """Candidates ``ids, vals [B, K, M]`` (with ``ordered``, one list in slot order):
    ``num_slc`` programs of ``slots`` selected blocks, then ``num_swa`` window pieces; split
    partials ``[B, K, num_slc + num_swa, ...]``. With ``cmp_parts`` (the compressed kernel's
    split partials) ``Dv / merge_cols`` more programs merge them, and ``o_cmp [B, K, Gp, Dv]``
    (float32) comes last (their own partial rows, past ``num_slc + num_swa``, are empty)."""
    b, kh, mcand = ids.shape
    gp, dk = qg.shape[2:]
    dv = v_slc.shape[-1]
    merge = cmp_parts is not None
    m = num_slc + num_swa + (dv // merge_cols if merge else 0)
    kernel = functools.partial(_sparse_ranges_kernel, num_slc=num_slc, num_swa=num_swa,
                               slots=slots, top_n=top_n, lp=lp, window=window, ordered=ordered,
                               merge_cols=merge_cols if merge else 0, scale=scale,
                               block_k=block_k, precision=precision)
    cand_spec = pl.BlockSpec((None, None, mcand), lambda b, k, j: (b, k, 0))
    in_specs = [_len_spec(), cand_spec, cand_spec,
                pl.BlockSpec((None, None, gp, dk), lambda b, k, j: (b, k, 0, 0)),
                _seq_spec(k_slc.shape[1], dk), _seq_spec(v_slc.shape[1], dv),
                _seq_spec(k_swa.shape[1], dk), _seq_spec(v_swa.shape[1], dv)]
    args = [lens, ids, vals, qg, k_slc, v_slc, k_swa, v_swa]
    out_specs, out_shape = _partial_specs(gp, dv), _partial_shapes(b, kh, m, gp, dv)
    if merge:
        mc = cmp_parts[0].shape[2]
        in_specs += [pl.BlockSpec((None, None, mc, gp, dv), lambda b, k, j: (b, k, 0, 0, 0)),
                     pl.BlockSpec((None, None, mc, gp), lambda b, k, j: (b, k, 0, 0)),
                     pl.BlockSpec((None, None, mc, gp), lambda b, k, j: (b, k, 0, 0))]
        args += list(cmp_parts)
        out_specs = out_specs + [pl.BlockSpec((None, None, gp, dv), lambda b, k, j: (b, k, 0, 0))]
        out_shape = out_shape + [jax.ShapeDtypeStruct((b, kh, gp, dv), jnp.float32)]
    return pl.pallas_call(
        kernel,
        grid=(b, kh, m),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name="nsa_decode_sparse",
    )(*args)


def _combine_call(cmp_parts, sparse_parts, gates, *, num_slc, num_swa, col_splits, dtype,
                  params, interpret):
    """``nsa_decode_combine`` over grid ``B x K x col_splits``: ``o [B, K, Gp, Dv]``. The
    compressed branch comes as split partials ``(o, m, l)`` or merged, ``[B, K, Gp, Dv]``."""
    s_o, s_m, s_l = sparse_parts
    b, kh, ms, gp, dv = s_o.shape
    dvs = dv // col_splits
    cmp_merged = not isinstance(cmp_parts, tuple)

    def parts_specs(m):
        return [pl.BlockSpec((None, None, m, gp, dvs), lambda b, k, c: (b, k, 0, 0, c)),
                pl.BlockSpec((None, None, m, gp), lambda b, k, c: (b, k, 0, 0)),
                pl.BlockSpec((None, None, m, gp), lambda b, k, c: (b, k, 0, 0))]

    cols_spec = pl.BlockSpec((None, None, gp, dvs), lambda b, k, c: (b, k, 0, c))
    if cmp_merged:
        cmp_specs, cmp_args = [cols_spec], [cmp_parts]
    else:
        cmp_specs, cmp_args = parts_specs(cmp_parts[0].shape[2]), list(cmp_parts)
    return pl.pallas_call(
        functools.partial(_combine_kernel, num_slc=num_slc, num_swa=num_swa,
                          cmp_merged=cmp_merged),
        grid=(b, kh, col_splits),
        in_specs=cmp_specs + parts_specs(ms) + [
            pl.BlockSpec((None, None, gp, gates.shape[-1]), lambda b, k, c: (b, k, 0, 0))],
        out_specs=cols_spec,
        out_shape=jax.ShapeDtypeStruct((b, kh, gp, dv), dtype),
        compiler_params=params,
        interpret=interpret,
        name="nsa_decode_combine",
    )(*cmp_args, s_o, s_m, s_l, gates)


def _select_call(lens, m_p, l_p, s_cmp, o_p, *, geom: _SelectGeom, params):
    """``nsa_decode_select`` over grid ``B x K x S`` (``S = geom.splits``): per program the
    candidate indices and scores ``[B, K, S, n']`` (``merge_candidates`` takes the top-n of
    them), the block scores ``[B, K, S * J']``, the lse ``[B, K, Gg]`` and, when ``o_p`` is
    given, ``o_cmp [B, K, Gg, Dv]`` (program ``s`` merges columns ``s Dv/S ...``); ``n'`` the
    power of two at or above ``max(n, 16)``, ``Gg`` at or above ``G``."""
    b, kh, mc = m_p.shape[:3]
    gg, cp = _next_pow2(geom.g), s_cmp.shape[-1]
    n_slots = max(16, _next_pow2(geom.top_n))
    ns = geom.splits
    merge_o = o_p is not None
    in_specs = [
        pl.BlockSpec((None,), lambda b, k, s: (b,)),  # seq_lens
        pl.BlockSpec((None, None, mc, gg), lambda b, k, s: (b, k, 0, 0)),  # m
        pl.BlockSpec((None, None, mc, gg), lambda b, k, s: (b, k, 0, 0)),  # l
        pl.BlockSpec((None, None, gg, cp), lambda b, k, s: (b, k, 0, 0)),  # logits
        pl.BlockSpec((geom.chunk, geom.blocks_per_chunk), lambda b, k, s: (0, 0)),  # w_in
        pl.BlockSpec((geom.chunk,), lambda b, k, s: (0,)),  # w_next (next chunk's first block)
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, n_slots), lambda b, k, s: (b, k, s, 0)),  # indices
        pl.BlockSpec((None, None, None, n_slots), lambda b, k, s: (b, k, s, 0)),  # their scores
        pl.BlockSpec((None, None, None, geom.score_len), lambda b, k, s: (b, k, s, 0)),  # scratch
        pl.BlockSpec((None, None, gg), lambda b, k, s: (b, k, 0)),  # lse
    ]
    out_shape = [jax.ShapeDtypeStruct((b, kh, ns, n_slots), jnp.int32),
                 jax.ShapeDtypeStruct((b, kh, ns, n_slots), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, ns, geom.score_len), jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, gg), jnp.float32)]
    w_in, w_next = overlap_tables(geom.l, geom.d, geom.lp, geom.chunk)
    args = [lens, m_p, l_p, s_cmp, jnp.asarray(w_in), jnp.asarray(w_next[:, 0])]
    if merge_o:
        dv = o_p.shape[-1]
        dvs = dv // ns  # each program's columns
        in_specs.append(pl.BlockSpec((None, None, mc, gg, dvs), lambda b, k, s: (b, k, 0, 0, s)))
        out_specs.append(pl.BlockSpec((None, None, gg, dvs), lambda b, k, s: (b, k, 0, s)))
        out_shape.append(jax.ShapeDtypeStruct((b, kh, gg, dv), jnp.float32))
        args.append(o_p)
    out = pl.pallas_call(
        functools.partial(_select_kernel, geom=geom, merge_o=merge_o),
        grid=(b, kh, ns),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=geom.interpret,
        name="nsa_decode_select",
    )(*args)
    ids, vals, scores, lse = out[:4]
    return ids, vals, scores.reshape(b, kh, -1), lse, out[4] if merge_o else None


def _can_merge_o(dv: int, splits: int) -> bool:
    """Whether ``splits`` select programs can each merge ``Dv / splits >= 16`` of the output's
    columns (``splits`` must divide ``Dv``: a remainder column would never be written)."""
    return dv % splits == 0 and dv // splits >= 16


# Glue ------------------------------------------------------------------------------------------

def split_range(lo: Int[Array, "*R"], hi: Int[Array, "*R"], num_splits: int,
                block_k: int) -> tuple[Int[Array, "*R M"], Int[Array, "*R M"]]:
    """Splits inclusive key ranges ``[lo, hi]`` into ``num_splits`` runs of whole aligned tiles.

    Empty pieces come out as ``(0, -1)``.
    """
    j = jnp.arange(num_splits, dtype=jnp.int32)
    lo_s, hi_s = _split_piece(lo[..., None], hi[..., None], num_splits, j, block_k)
    return lo_s.astype(jnp.int32), hi_s.astype(jnp.int32)


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


def _check_geometry(what, cmp_block_size, cmp_stride, slc_block_size, top_n):
    check_geometry(what, cmp_block_size, cmp_stride, slc_block_size)
    if top_n < 1:
        raise ValueError(f"{what}: top_n must be >= 1, got {top_n}")


def _select_unsupported(geom: _SelectGeom) -> str | None:
    """Why the select kernel cannot take this geometry (``None``: it can)."""
    if geom.rp & (geom.rp - 1):
        return f"l'/d={geom.rp} is not a power of two"
    if geom.score_len > MAX_SELECT_BLOCKS:
        return f"{geom.score_len} selection blocks exceed MAX_SELECT_BLOCKS={MAX_SELECT_BLOCKS}"
    return None


class Selection(NamedTuple):
    """What ``select_top_n`` returns.

    Attributes:
      indices: ``int32 [B, K, n]`` selected blocks in the twin's slot order, ``-1`` unused.
      lse: merged log-sum-exp of the compressed branch ``[B, K, G]``.
      o_cmp: merged compressed output ``[B, K, G, Dv]`` (``None`` unless ``o_p`` was given).
      scores: group-summed block scores ``[B, K, J']`` before forcing (the kernel's scratch);
        only blocks ``j <= t // l'`` of each sequence are defined.
    """

    indices: Int[Array, "B K M"]
    lse: Float[Array, "B K G"]
    o_cmp: Float[Array, "B K G Hv"] | None
    scores: Float[Array, "B K J"]


def select_top_n(
    s_cmp: Float[Array, "B K Gp Cp"],
    m_p: Float[Array, "B K Mc Gp"],
    l_p: Float[Array, "B K Mc Gp"],
    seq_lens: Int[Array, " B"],
    *,
    group_size: int,
    num_blocks: int,
    cmp_block_size: int,
    cmp_stride: int,
    slc_block_size: int,
    top_n: int,
    num_cmp: int | None = None,
    o_p: Float[Array, "B K Mc Gp Hv"] | None = None,
    chunk: int = 128,
    splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> Selection:
    """The ``nsa_decode_select`` kernel on its own: the twin's ``merge_partials`` and
    ``select_from_logits`` of the compressed kernel's outputs.

    Args:
      s_cmp: scaled logits of the compressed branch ``[B, K, Gp, Cp]``, ``Gp >= G`` (rows past
        ``G`` and columns of invisible tokens may hold anything, NaN included).
      m_p, l_p: split maxima and sums of the compressed softmax ``[B, K, Mc, Gp]``.
      seq_lens: tokens in the cache, the query's own included ``[B]``.
      group_size: ``G``, query heads per KV group.
      num_blocks: ``J``, selection blocks in the raw cache.
      cmp_block_size, cmp_stride, slc_block_size, top_n: ``l``, ``d``, ``l'``, ``n``.
      num_cmp: ``C``, compressed slots of the cache (``Cp`` by default); later columns never
        count.
      o_p: split outputs ``[B, K, Mc, Gp, Dv]`` to merge into ``o_cmp`` as well (``None``: not).
      chunk: compressed tokens per step (a power of two; raised to ``l'/d`` if smaller).
      splits: most programs per (sequence, KV group), rounded up to a power of two; each walks
        a run of chunks and proposes its own top-n, and a stable top-k merges the proposals.
        With ``o_p``, the programs launched must divide ``Dv`` into slices of at least 16
        columns (each merges its slice).
      num_warps, num_stages: Triton launch parameters.
      interpret: run in the Pallas interpreter.

    Returns:
      A ``Selection``: indices, lse, ``o_cmp`` and the block scores.
    """
    what = "select_top_n"
    _check_geometry(what, cmp_block_size, cmp_stride, slc_block_size, top_n)
    if (s_cmp.ndim != 4 or m_p.ndim != 4 or m_p.shape != l_p.shape
            or m_p.shape[:2] + m_p.shape[3:] != s_cmp.shape[:3]):
        raise ValueError(f"{what}: need s_cmp [B, K, Gp, Cp] and m_p, l_p [B, K, Mc, Gp]; got "
                         f"{s_cmp.shape=}, {m_p.shape=}, {l_p.shape=}")
    b, kh, mc, gp = m_p.shape
    if seq_lens.shape != (b,):
        raise ValueError(f"{what}: seq_lens must be [B]={(b,)}, got {seq_lens.shape=}")
    if not 1 <= group_size <= gp:
        raise ValueError(f"{what}: group_size={group_size} must lie in [1, Gp={gp}]")
    if o_p is not None and (o_p.ndim != 5 or o_p.shape[:4] != m_p.shape):
        raise ValueError(f"{what}: o_p must be [B, K, Mc, Gp, Dv] with {m_p.shape=}, "
                         f"got {o_p.shape=}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"{what}: chunk must be a power of two >= 16, got {chunk}")
    if splits < 1:
        raise ValueError(f"{what}: splits must be >= 1, got {splits}")
    if num_cmp is not None and not 0 <= num_cmp <= s_cmp.shape[-1]:
        raise ValueError(f"{what}: num_cmp={num_cmp} must lie in [0, Cp={s_cmp.shape[-1]}] "
                         f"({s_cmp.shape=})")
    geom = _SelectGeom(
        l=cmp_block_size, d=cmp_stride, lp=slc_block_size, top_n=top_n, g=group_size,
        num_cmp=s_cmp.shape[-1] if num_cmp is None else num_cmp, num_blocks=num_blocks,
        chunk=max(chunk, slc_block_size // cmp_stride), interpret=interpret, max_splits=splits)
    why = _select_unsupported(geom)
    if why:
        raise NotImplementedError(f"{what}: {why}")
    if o_p is not None and not _can_merge_o(o_p.shape[-1], geom.splits):
        raise ValueError(f"{what}: {geom.splits} select programs cannot split Dv="
                         f"{o_p.shape[-1]} into equal slices of 16 or more columns; lower "
                         "splits")
    # Powers of two for Triton: pad the splits (empty ones), the rows and the columns.
    gg, mcp = _next_pow2(group_size), _next_pow2(mc)
    rows, cols = max(gp, gg) - gp, max(0, geom.logits_len - s_cmp.shape[-1])
    if mcp > mc or rows:
        m_p = jnp.pad(m_p, [(0, 0), (0, 0), (0, mcp - mc), (0, rows)], constant_values=MASK_VALUE)
        l_p = jnp.pad(l_p, [(0, 0), (0, 0), (0, mcp - mc), (0, rows)])
        if o_p is not None:
            o_p = jnp.pad(o_p, [(0, 0), (0, 0), (0, mcp - mc), (0, rows), (0, 0)])
    if rows or cols:
        s_cmp = jnp.pad(s_cmp, [(0, 0), (0, 0), (0, rows), (0, cols)])
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    ids, vals, scores, lse, o_cmp = _select_call(
        seq_lens.astype(jnp.int32), m_p.astype(jnp.float32), l_p.astype(jnp.float32),
        s_cmp.astype(jnp.float32), None if o_p is None else o_p.astype(jnp.float32),
        geom=geom, params=params)
    g = group_size
    return Selection(merge_candidates(ids, vals, top_n), lse[:, :, :g],
                     None if o_cmp is None else o_cmp[:, :, :g], scores)


STAGES = ("cmp", "select", "full")


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
    out = decode_stages(
        q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, seq_lens, upto="full",
        cmp_block_size=cmp_block_size, cmp_stride=cmp_stride, slc_block_size=slc_block_size,
        top_n=top_n, window_size=window_size, scale=scale, block_sizes=block_sizes,
        interpret=interpret)
    return out["o"], out["indices"]


def decode_stages(
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
    upto: str,
    cmp_block_size: int,
    cmp_stride: int,
    slc_block_size: int,
    top_n: int,
    window_size: int,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> dict[str, Array]:
    """The decode chain up to a stage, so a benchmark can time each prefix.

    ``upto`` is one of ``STAGES``:

    - ``"cmp"``: the compressed kernel and the XLA merge of its splits: ``o_cmp [B, N, Dv]``
      (float32) and ``lse_cmp [B, K, G]``;
    - ``"select"``: the compressed kernel and the selection (``nsa_decode_select``, which merges
      the splits itself when it can, or XLA's merge and ``select_from_logits``): ``o_cmp`` and
      ``indices [B, K, n]``;
    - ``"full"``: the whole chain, ``o [B, N, Dv]`` in ``q.dtype`` and ``indices``.
    """
    if upto not in STAGES:
        raise ValueError(f"upto={upto!r} is not one of {STAGES}")
    bs = block_sizes or BlockSizes()
    _check_geometry("decode_attention", cmp_block_size, cmp_stride, slc_block_size, top_n)
    check_decode_args("decode_attention", q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates,
                      seq_lens, window_size)
    b, n, dk = q.shape
    c, kh, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    g = n // kh
    for name, d in (("Dk", dk), ("Dv", dv)):
        if d < 16 or d & (d - 1):
            raise NotImplementedError(
                f"decode kernel needs power-of-two head dims >= 16: {name}={d}")
    block_kc = _pow2_divisor(c, bs.cmp_block_k or bs.block_k)
    if c == 0 or block_kc < 16:
        raise NotImplementedError(f"compressed cache length C={c} is not a multiple of 16")
    s_slc, s_swa = k_slc.shape[1], k_swa.shape[1]
    # Every offset the decode kernels form lies inside its array (whole tiles of caches whose
    # lengths the tiles divide; no masked loads past the end): 2**31 elements still fit.
    check_int32_offsets("decode_attention", k_slc=k_slc.shape, k_swa=k_swa.shape,
                        v_slc=v_slc.shape, v_swa=v_swa.shape)
    block_k = _pow2_divisor(slc_block_size, bs.block_k)
    block_k = min(block_k, _pow2_divisor(s_slc, bs.block_k), _pow2_divisor(s_swa, bs.block_k))
    if block_k < 16:
        raise NotImplementedError(f"l'={slc_block_size}, S={s_slc}, S'={s_swa} share no "
                                  "power-of-two tile >= 16")
    scale = default_scale(dk, scale)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    def params_for(warps=0, stages=0):  # a kernel's own launch (0: num_warps, num_stages)
        return plgpu.CompilerParams(num_warps=warps or bs.num_warps,
                                    num_stages=stages or bs.num_stages)

    params = params_for()

    common = dict(scale=scale, precision=precision, params=params, interpret=interpret)
    num_blocks = -(-s_slc // slc_block_size)
    per_row = b * kh
    geom = _SelectGeom(
        l=cmp_block_size, d=cmp_stride, lp=slc_block_size, top_n=top_n, g=g, num_cmp=c,
        num_blocks=num_blocks, chunk=max(bs.select_chunk, slc_block_size // cmp_stride),
        interpret=interpret,
        max_splits=min(_next_pow2(-(-(bs.select_programs or bs.target_programs) // per_row)),
                       bs.select_splits or 1 << 30))
    if not bs.select_kernel or _select_unsupported(geom):
        geom = None  # XLA selects
    combine = bs.fuse_sparse and bs.combine_kernel

    gp = max(16, _next_pow2(g))
    qg = jnp.pad(q.reshape(b, kh, g, dk), [(0, 0), (0, 0), (0, gp - g), (0, 0)])  # [B,K,Gp,Dk]
    # The kernels take the lengths (the query at position t = length - 1) as they are: no XLA
    # op per step computes t for them.
    lens = seq_lens.astype(jnp.int32)  # [B]
    t = lens - 1  # for the XLA glue of the paths without the fused kernels

    # 1. Compressed branch, split over the compressed tokens (a power of two of splits, so the
    # select kernel reads all their maxima and sums in one tile).
    mc = min(bs.cmp_splits or _next_pow2(-(-bs.target_programs // per_row)),
             _prev_pow2(c // block_kc))
    logits_len = max(c, geom.logits_len) if geom else c
    cmp_params = params_for(bs.cmp_num_warps, bs.cmp_num_stages)
    o_p, m_p, l_p, s_cmp = _cmp_call(
        lens, qg, k_cmp, v_cmp, l=cmp_block_size, d=cmp_stride, splits=mc, block_k=block_kc,
        logits_len=logits_len, **dict(common, params=cmp_params))
    cmp_parts = (o_p, m_p, l_p)

    def merge_cmp():
        return merge_partials(o_p[:, :, :, :g], m_p[..., :g], l_p[..., :g])  # [B,K,G,Dv], [B,K,G]

    if upto == "cmp":
        o_cmp, lse_cmp = merge_cmp()
        return {"o_cmp": o_cmp.reshape(b, n, dv), "lse_cmp": lse_cmp}

    # 2. Selection from the branch's own probabilities. (With the combine kernel, that kernel
    # merges o_cmp; the selection stage alone merges it in XLA.)
    if geom is not None:
        merge_o = (not combine and mc <= bs.select_merge_splits
                   and _can_merge_o(dv, geom.splits))
        cand_ids, cand_vals, _, _, o_cmp = _select_call(
            lens, m_p, l_p, s_cmp, o_p if merge_o else None, geom=geom,
            params=params_for(bs.select_num_warps))
        indices = merge_candidates(cand_ids, cand_vals, top_n)  # [B, K, n]
        o_cmp = o_cmp[:, :, :g] if merge_o else None
    else:
        o_cmp, lse_cmp = merge_cmp()
        indices = select_from_logits(
            s_cmp[:, :, :g], lse_cmp, t + 1, num_blocks=num_blocks,
            cmp_block_size=cmp_block_size, cmp_stride=cmp_stride,
            slc_block_size=slc_block_size, top_n=top_n,
        )  # [B, K, n]
        cand_ids = cand_vals = None
    if upto == "select":
        if o_cmp is None:
            o_cmp = merge_cmp()[0]
        return {"o_cmp": o_cmp.reshape(b, n, dv), "indices": indices}

    # 3. Selected blocks and the window (one launch, or one each): ``mw`` window pieces and
    # ``P`` selected blocks a program, as few as keep about target_programs programs busy.
    mw = max(1, min(-(-window_size // block_k) + 1, -(-bs.target_programs // per_row)))
    slots = bs.sparse_slots or max(1, min(_next_pow2(top_n),
                                          _prev_pow2(top_n * per_row // bs.target_programs)))
    ns = -(-top_n // slots)  # programs for the selected blocks
    if bs.fuse_sparse:
        # The sparse programs merge the select programs' candidates and compute their ranges
        # themselves; both groups of programs are rounded up to powers of two (the extra ones
        # attend nothing), so the combine kernel merges each group in whole tiles.
        ns_p, mw_p = _next_pow2(ns), _next_pow2(mw)
        if cand_ids is not None:
            cand_ids, cand_vals = cand_ids.reshape(b, kh, -1), cand_vals.reshape(b, kh, -1)
        if cand_ids is None or cand_ids.shape[-1] > MAX_SPARSE_CANDIDATES:
            # The merged indices as the candidates of one program (XLA selected, or too many
            # proposals to merge in the kernel): slot order by descending score (-slot), -1
            # unused.
            n_pad = max(16, _next_pow2(top_n))
            cand_ids = jnp.pad(indices, [(0, 0), (0, 0), (0, n_pad - top_n)],
                               constant_values=-1)
            cand_vals = jnp.where(cand_ids >= 0, -jnp.arange(n_pad, dtype=jnp.float32),
                                  -jnp.inf)
        ordered = cand_ids.shape[-1] == max(16, _next_pow2(top_n))
        # With the combine kernel and few splits to merge (small batches), Dv /
        # sparse_merge_cols more sparse programs merge the compressed branch's splits, off the
        # combine kernel's critical path.
        merge_cols = (min(bs.sparse_merge_cols, dv)
                      if combine and per_row * mc <= bs.sparse_merge_parts else 0)
        parts = _sparse_ranges_call(
            lens, cand_ids, cand_vals, qg, k_slc, v_slc, k_swa, v_swa, num_slc=ns_p,
            num_swa=mw_p, slots=slots, top_n=top_n, lp=slc_block_size, window=window_size,
            block_k=block_k, ordered=ordered, cmp_parts=cmp_parts if merge_cols else None,
            merge_cols=merge_cols, **dict(common, params=params_for(bs.sparse_num_warps)))
        if merge_cols:
            *parts, o_cmp_merged = parts
            cmp_parts = o_cmp_merged
        if combine:
            # 4. One kernel merges every branch over a share of the columns and gates them.
            gates_g = gates.reshape(b, kh, g, 3)
            if gp > g:
                gates_g = jnp.pad(gates_g, [(0, 0), (0, 0), (0, gp - g), (0, 0)])
            col_splits = max(1, min(dv // 16, _next_pow2(-(-bs.target_programs // per_row))))
            o = _combine_call(cmp_parts, tuple(parts), gates_g, num_slc=ns_p, num_swa=mw_p,
                              col_splits=col_splits, dtype=q.dtype,
                              params=params_for(bs.combine_num_warps),
                              interpret=interpret)
            return {"o": o[:, :, :g].reshape(b, n, dv), "indices": indices}
        parts_slc = tuple(x[:, :, :ns_p] for x in parts)
        parts_swa = tuple(x[:, :, ns_p:] for x in parts)
    else:
        # Two launches over key ranges computed in XLA.
        lo_s = indices * slc_block_size
        hi_s = jnp.minimum(jnp.minimum(lo_s + slc_block_size - 1, t[:, None, None]), s_slc - 1)
        lo_s, hi_s = jnp.where(indices >= 0, lo_s, 0), jnp.where(indices >= 0, hi_s, -1)
        lo_w = jnp.broadcast_to(jnp.maximum(t - window_size + 1, 0)[:, None], (b, kh))
        lo_w, hi_w = split_range(lo_w, jnp.broadcast_to(t[:, None], (b, kh)), mw, block_k)
        kw = dict(block_k=block_k, **common)
        parts_slc = _range_call(lo_s, hi_s, qg, k_slc, v_slc, name="nsa_decode_slc", **kw)
        parts_swa = _range_call(lo_w, hi_w, qg, k_swa, v_swa, name="nsa_decode_swa", ring=True,
                                **kw)
    if o_cmp is None:
        o_cmp = merge_cmp()[0]
    o_slc, _ = merge_partials(*(x[:, :, :, :g] for x in parts_slc))
    o_swa, _ = merge_partials(*(x[:, :, :, :g] for x in parts_swa))

    # 4. Gates (XLA).
    o = combine_gated(gates, o_cmp.reshape(b, n, dv), o_slc.reshape(b, n, dv),
                      o_swa.reshape(b, n, dv), q.dtype)
    return {"o": o, "indices": indices}
