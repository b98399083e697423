"""Block selection on GPU: scores (spec Eq. 8-10) and top-n fused in one Pallas-Triton kernel.

One program owns ``block_q`` queries and one KV group. It walks the compressed tokens in chunks
of ``block_c`` (``block_c / r'`` selection blocks, ``r' = l'/d``) up to the last block its
queries may select, and for each chunk:

1. recomputes the compressed probabilities ``p = exp(q k_cmp^T * scale - lse)`` of every head
   of the group (Eq. 8) and sums them over the group (Eq. 10);
2. maps tokens to selection blocks with the overlap weights of the spec (Eq. 9, corrected), as
   a small matrix product with a constant ``[block_c, block_c/r']`` weight matrix; the last
   ``r - 1`` tokens of a chunk also feed the first block of the next chunk (a carried term);
3. merges the chunk's scores into a running top-n kept in registers: repeatedly the chunk's
   best block (ties to the lower index) replaces the list's worst entry (ties: the higher
   index goes) while it is strictly better. Blocks arrive in ascending order, so this keeps
   exactly the ``n`` best under "score descending, index ascending", as ``lax.top_k`` does,
   of the scores as this kernel rounds them: they are summed in another order than the
   reference's (dots, the carried term added last), so blocks whose scores tie exactly in real
   arithmetic (uniform probabilities, say) can be separated in the last bit and a higher index
   can win where the reference takes the lower.

Forced blocks (0, ``t//l'``, ``t//l' - 1``) score ``+inf``, blocks after ``t//l'`` ``-inf``;
slots left at ``-inf`` come out as ``-1``. The ``[B, T, K, T/l']`` score array never
reaches HBM. Probabilities and scores are float32; float32 inputs use full-precision dots.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from pallas_kernels import tuned_block_sizes
from pallas_kernels.common import LOG2E, check_int32_extent, default_scale
from pallas_kernels.selection.reference import NUM_FORCED, check_geometry, overlap_tables

BIG_INT = 1 << 30
# Debug switch for the merge loop ("dynamic" the default; "static" for bisecting, "one" a
# timing probe that merges one block a chunk and gives wrong indices).
_VARIANT = os.environ.get("NSA_SELECTION_MERGE", "dynamic")
SMEM_BUDGET = 160 * 1024  # bytes of tiles per program (the H200 allows 227 KiB)



def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the selection kernel.

    Attributes:
      block_q: queries per program (power of two >= 16).
      block_c: compressed tokens per step (power of two; raised to ``16 * l'/d`` if smaller).
      num_warps, num_stages: Triton launch parameters.
      overlap_tf32x3: map token probabilities to block scores with tensor-core ``tf32x3`` dots
        (about float32 accuracy) instead of full-precision float32 dots; interpreted runs keep
        float32, since the CPU has no ``tf32x3``.
      pack_heads: stack the ``G`` heads of a group as rows of one tile (``block_q / G``
        positions x ``G`` heads per program): the queries are loaded once, one dot a chunk
        scores every head, and the running top-n has one row per position. Needs ``G`` a power
        of two; other groups use the per-head loop.
      heavy_first: launch the query blocks from the last (the longest walk) to the first:
        15.2 ms against 15.8 ms at 64k on the H200 (commit b87e531). Unrolling the per-head
        loop was tried too and dropped: Triton then pipelines every head's query load and
        asks for 290-580 KiB of shared memory.
      exp2: compute each probability as ``2 ** (s log2(e) - lse log2(e))`` (Triton's ``ex2``, one
        instruction) rather than ``exp(s - lse)`` (libdevice's ``expf``, a range reduction
        around the same instruction). Both round differently in the last bits only.
      fill_first_chunk: when ``top_n`` equals the blocks of a chunk (``block_c * d / l'``; 16
        for the paper's sizes with 64-token chunks), chunk 0's blocks fill the empty top-n list
        directly (every candidate that is not ``-inf`` would enter it, one merge round each)
        instead of through up to ``top_n`` merge rounds. The same selected set; the slots'
        order differs. Other sizes ignore it.
    """

    block_q: int = 64
    block_c: int = 64
    num_warps: int = 4
    num_stages: int = 2
    overlap_tf32x3: bool = False
    pack_heads: bool = False
    heavy_first: bool = True
    exp2: bool = True
    fill_first_chunk: bool = False

    def __post_init__(self):
        for f in ("block_q", "block_c"):
            val = getattr(self, f)
            if val < 16 or val & (val - 1):
                raise ValueError(f"BlockSizes.{f}={val} must be a power of two >= 16")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"{self.num_warps=} and {self.num_stages=} must be >= 1")


@dataclasses.dataclass(frozen=True)
class _Config:
    l: int  # noqa: E741  (the paper's symbol)
    d: int
    lp: int
    top_n: int
    scale: float
    g: int
    num_cmp: int  # C, the true number of compressed tokens
    num_blocks: int  # selection blocks of the key sequence
    block_q: int
    block_c: int
    num_chunks: int
    interpret: bool
    num_warps: int
    num_stages: int
    overlap_tf32x3: bool = False
    heavy_first: bool = True
    exp2: bool = False
    fill_first_chunk: bool = False

    @property
    def logit_scale(self) -> float:
        """The dot's factor: the softmax scale, times ``log2(e)`` for base-2 exponentials."""
        return self.scale * LOG2E if self.exp2 else self.scale

    def probs(self, s, lse):
        """``exp(min(s - lse, 0))`` in the kernel's base (``s`` and ``lse`` already in it)."""
        return (jnp.exp2 if self.exp2 else jnp.exp)(jnp.minimum(s - lse, 0.0))


def _precisions(cfg: _Config, dtype):
    """Dot precisions: the logits' (full float32 for float32 inputs) and the block scores'."""
    prec = lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    hi_prec = (lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if cfg.overlap_tf32x3
               else lax.Precision.HIGHEST)
    return prec, hi_prec


def _row_block(cfg: _Config):
    """The query block of this program. The grid is ``(B * K, query blocks)`` with the first
    axis launched fastest, and with ``heavy_first`` programs run from the last block: a query
    block's work grows with its position (it walks every earlier chunk), and launching the
    long ones last would leave most of the GPU idle while they finish."""
    i = pl.program_id(1)
    return pl.num_programs(1) - 1 - i if cfg.heavy_first else i


def _walk(chunk_scores, q0, n_pos: int, idx_ref, cfg: _Config):
    """The chunk loop both kernels share. ``chunk_scores(c, pending, masked)`` gives chunk
    ``c``'s block scores ``[n_pos, nbc]`` and the carried term for the next chunk; with
    ``masked=False`` (chunks every position sees whole) it may skip the visibility mask.
    Forced blocks score ``+inf``, blocks past a position's current block ``-inf``; each chunk
    is merged into the running top-n, whose ids are written to ``idx_ref``."""
    nbc = cfg.block_c // (cfg.lp // cfg.d)
    n_slots = idx_ref.shape[-1]
    cur = lax.div(q0 + jnp.arange(n_pos, dtype=jnp.int32), cfg.lp)  # current block
    slot_col = jnp.arange(n_slots, dtype=jnp.int32)[None, :]
    blk_col = jnp.arange(nbc, dtype=jnp.int32)[None, :]

    def priorities(score, j):  # forced blocks +inf, blocks no position may select -inf
        valid = (j <= cur[:, None]) & (j < cfg.num_blocks)
        forced = (j == 0) | (j == cur[:, None]) | (j == cur[:, None] - 1)
        return jnp.where(valid, jnp.where(forced, jnp.inf, score), -jnp.inf)

    def chunk_body(c, carry, masked: bool):
        vals, ids, pending = carry
        score, pending = chunk_scores(c, pending, masked)
        j = c * nbc + blk_col  # [1, nbc]
        vals, ids = _merge(priorities(score, j), vals, ids, j, slot_col, cfg, nbc)
        return vals, ids, pending

    # Slots past top_n start at +inf so they are never replaced; they stay -1.
    vals = jnp.where(slot_col < cfg.top_n, -jnp.inf, jnp.inf) + jnp.zeros((n_pos, 1), jnp.float32)
    ids = jnp.full((n_pos, n_slots), -1, jnp.int32)
    pending = jnp.zeros((n_pos, nbc), jnp.float32)
    last_block = lax.div(q0 + n_pos - 1, cfg.lp)
    hi = jnp.minimum(lax.div(last_block, nbc) + 1, cfg.num_chunks)
    # Chunks whose every token the first position already sees (so every position does).
    first_tok = q0 - (cfg.l - 1)
    full = jnp.where(first_tok >= 0, lax.div(lax.div(jnp.maximum(first_tok, 0), cfg.d) + 1,
                                             cfg.block_c), 0)
    full = jnp.minimum(jnp.minimum(full, cfg.num_cmp // cfg.block_c), hi)
    lo = 0
    if cfg.fill_first_chunk and cfg.top_n == nbc == n_slots:
        # Every slot is empty and there are as many as chunk 0's blocks: each of them above
        # -inf would enter in its own merge round, so take them all at once (chunk 0 always
        # runs: the masked form is right for any chunk).
        score, pending = chunk_scores(0, pending, True)
        vals = priorities(score, blk_col)
        ids = jnp.where(vals > -jnp.inf, blk_col + jnp.zeros_like(ids), -1)
        lo = 1
        full = jnp.maximum(full, 1)
    carry = lax.fori_loop(lo, full, functools.partial(chunk_body, masked=False),
                          (vals, ids, pending))
    _, ids, _ = lax.fori_loop(full, hi, functools.partial(chunk_body, masked=True), carry)
    idx_ref[...] = ids


def _kernel(q_ref, kc_ref, lse_ref, w_in_ref, w_next_ref, idx_ref, *, cfg: _Config):
    bq, bc = cfg.block_q, cfg.block_c
    q0 = _row_block(cfg) * bq
    kh = pl.program_id(0) % (q_ref.shape[1] // cfg.g)
    prec, hi_prec = _precisions(cfg, q_ref.dtype)
    t_pos = q0 + jnp.arange(bq, dtype=jnp.int32)  # [bq]
    w_in = w_in_ref[...]  # [bc, nbc]
    w_next = w_next_ref[...]

    def chunk_scores(c, pending, masked):
        kc = kc_ref[pl.ds(c * bc, bc), :]  # [bc, Dk]
        if masked:
            tok = c * bc + jnp.arange(bc, dtype=jnp.int32)
            vis = ((tok[None, :] * cfg.d + cfg.l - 1 <= t_pos[:, None])
                   & (tok[None, :] < cfg.num_cmp))  # [bq, bc]

        def head_body(h, p_sum):
            head = kh * cfg.g + h
            q = q_ref[:, head, :]  # [bq, Dk]
            lse = lse_ref[head, :]  # [bq]
            s = plgpu.dot(q, kc, trans_b=True, precision=prec) * cfg.logit_scale  # [bq, bc]
            p = cfg.probs(s, lse[:, None])
            return p_sum + (jnp.where(vis, p, 0.0) if masked else p)

        p_sum = lax.fori_loop(0, cfg.g, head_body, jnp.zeros((bq, bc), jnp.float32))
        score = plgpu.dot(p_sum, w_in, precision=hi_prec) + pending  # [bq, nbc]
        return score, plgpu.dot(p_sum, w_next, precision=hi_prec)

    _walk(chunk_scores, q0, bq, idx_ref, cfg)


def _merge(pri, vals, ids, j, slot_col, cfg: _Config, nbc: int):
    """Merges one chunk's block priorities ``pri [R, nbc]`` (block ids ``j``) into the running
    top-n ``(vals, ids) [R, slots]``: the chunk's best block (ties to the lower index) replaces
    the list's worst entry (ties: the higher index goes) while it is strictly better."""

    def merge_body(_, state):
        pri, vals, ids = state
        c_max = jnp.max(pri, axis=1)  # [R]
        c_arg = jnp.min(jnp.where(pri == c_max[:, None], j, BIG_INT), axis=1)
        l_min = jnp.min(vals, axis=1)
        at_min = vals == l_min[:, None]
        worst = jnp.max(jnp.where(at_min, ids, -BIG_INT), axis=1)
        slot = jnp.min(jnp.where(at_min & (ids == worst[:, None]), slot_col, BIG_INT), axis=1)
        put = (c_max > l_min)[:, None] & (slot_col == slot[:, None])
        vals = jnp.where(put, c_max[:, None], vals)
        ids = jnp.where(put, c_arg[:, None], ids)
        pri = jnp.where(j == c_arg[:, None], -jnp.inf, pri)
        return pri, vals, ids

    if _VARIANT == "one":  # timing probe: a single round (wrong ids when more blocks qualify)
        _, vals, ids = merge_body(0, (pri, vals, ids))
        return vals, ids
    # Only candidates above the list's current minimum can enter (the minimum only grows), so
    # that many rounds, at most, are needed: usually none in long sequences.
    if _VARIANT == "static":
        rounds = min(cfg.top_n, nbc)
    else:
        above = (pri > jnp.min(vals, axis=1)[:, None]).astype(jnp.int32)
        rounds = jnp.minimum(jnp.max(jnp.sum(above, axis=1)), min(cfg.top_n, nbc))
    _, vals, ids = lax.fori_loop(0, rounds, merge_body, (pri, vals, ids))
    return vals, ids


def _kernel_packed(q_ref, kc_ref, lse_ref, w_in_ref, w_next_ref, idx_ref, *, cfg: _Config):
    """``_kernel`` with the group's heads stacked as rows: ``bt = block_q / G`` positions."""
    g, bc = cfg.g, cfg.block_c
    bt = cfg.block_q // g
    rows = bt * g
    nbc = bc // (cfg.lp // cfg.d)
    q0 = _row_block(cfg) * bt
    prec, hi_prec = _precisions(cfg, q_ref.dtype)
    q = q_ref[...].reshape(rows, q_ref.shape[-1])  # [bt*G, Dk]: position-major rows
    lse = lse_ref[...].reshape(rows)  # [bt*G]
    row_t = q0 + lax.div(jnp.arange(rows, dtype=jnp.int32), g)  # position of each row
    w_in = w_in_ref[...]
    w_next = w_next_ref[...]

    def chunk_scores(c, pending, masked):
        kc = kc_ref[pl.ds(c * bc, bc), :]  # [bc, Dk]
        s = plgpu.dot(q, kc, trans_b=True, precision=prec) * cfg.logit_scale  # [rows, bc]
        p = cfg.probs(s, lse[:, None])
        if masked:
            tok = c * bc + jnp.arange(bc, dtype=jnp.int32)
            vis = ((tok[None, :] * cfg.d + cfg.l - 1 <= row_t[:, None])
                   & (tok[None, :] < cfg.num_cmp))  # [rows, bc]
            p = jnp.where(vis, p, 0.0)
        # Map each head's probabilities to blocks, then sum the group's heads (Eq. 10).
        score = plgpu.dot(p, w_in, precision=hi_prec).reshape(bt, g, nbc).sum(axis=1)
        return (score + pending,
                plgpu.dot(p, w_next, precision=hi_prec).reshape(bt, g, nbc).sum(axis=1))

    _walk(chunk_scores, q0, bt, idx_ref, cfg)


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
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Int[Array, "B T K M"]:
    """Selected block indices per query and KV group; twin of ``selection/reference.py``.

    Args:
      q: queries ``[B, T, N, Dk]``.
      k_cmp: compressed keys ``[B, C, K, Dk]``.
      lse_cmp: the compressed branch's log-sum-exp ``[B, T, N]`` (``-inf`` for empty rows).
      seq_len: key sequence length (defaults to ``T``); fixes the number of blocks.
      cmp_block_size, cmp_stride, slc_block_size: ``l``, ``d``, ``l'``.
      top_n: ``n`` slots per query, forced blocks included (``>= 3``).
      scale: logit scale of the compressed branch.
      block_sizes: tiles; the tuned table by default.
      interpret: run in the Pallas interpreter.

    Returns:
      ``int32 [B, T, K, n]`` block indices in no particular order, ``-1`` for unused slots.
    """
    b, t, n, dk = q.shape
    if k_cmp.ndim != 4 or k_cmp.shape[0] != b or k_cmp.shape[3] != dk:
        raise ValueError(f"select_blocks: {q.shape=} and {k_cmp.shape=} do not match")
    if lse_cmp.shape != (b, t, n):
        raise ValueError(f"select_blocks: lse_cmp must be [B, T, N]={(b, t, n)}, "
                         f"got {lse_cmp.shape=}")
    c, kh = k_cmp.shape[1], k_cmp.shape[2]
    if kh < 1 or n % kh:
        raise ValueError(f"select_blocks: {n=} query heads not a multiple of {kh=} KV heads")
    l, d, lp = cmp_block_size, cmp_stride, slc_block_size  # noqa: E741 (the paper's symbols)
    check_geometry("select_blocks", l, d, lp)
    rp = lp // d
    if rp & (rp - 1) or top_n < NUM_FORCED:
        raise NotImplementedError(f"select_blocks kernel needs l'/d a power of two and top_n >= "
                                  f"{NUM_FORCED}; got l'/d={rp}, top_n={top_n}")
    seq_len = seq_len or t
    nb = -(-seq_len // lp)
    bs = block_sizes or BlockSizes(**tuned_block_sizes.SELECTION)
    g = n // kh
    packed = bs.pack_heads and not g & (g - 1)
    dkp = max(16, _pow2(dk))
    itemsize = jnp.dtype(q.dtype).itemsize
    bc = max(bs.block_c, 16 * rp)

    def fits(rows, stages=None):  # the query tile and its pipelined key chunks in shared memory
        return itemsize * dkp * (rows + (stages or num_stages) * bc) <= SMEM_BUDGET

    # Pipeline stages past two are given up first where even the smallest tile would not fit
    # (wide heads in float32).
    num_stages = bs.num_stages
    while num_stages > 2 and not fits(16, num_stages):
        num_stages -= 1

    if packed:  # block_q rows = (block_q / G) positions x G heads
        rows = max(bs.block_q, 16, g)
        while not fits(rows) and rows > max(16, g):
            rows //= 2
        packed = fits(rows)  # a group too wide for one tile: the per-head kernel instead
    if packed:  # no more positions than the sequence needs, at least 16 rows
        bt = max(min(rows // g, _pow2(t)), -(-16 // g))
        bq = bt * g
    else:
        bq = min(bs.block_q, max(16, _pow2(t)))
        while not fits(bq) and bq > 16:
            bq //= 2  # wide heads in float32: fewer queries per program
        bt = bq
    nbc = bc // rp
    num_chunks = max(-(-nb // nbc), -(-c // bc), 1)
    tp = -(-t // bt) * bt
    nqb = tp // bt  # query blocks

    def row(i):  # the query block of program i (as _row_block has it)
        return nqb - 1 - i if bs.heavy_first else i
    check_int32_extent("select_blocks", q=(b, tp, n, dkp))
    q = jax.lax.stop_gradient(q)
    lse = jax.lax.stop_gradient(lse_cmp).astype(jnp.float32)
    # In base 2 with ``exp2`` (the kernel scales its logits by log2(e) too).
    lse = jnp.where(jnp.isfinite(lse), lse * LOG2E if bs.exp2 else lse, 0.0)
    q = jnp.pad(q, [(0, 0), (0, tp - t), (0, 0), (0, dkp - dk)])
    kc = jnp.pad(jax.lax.stop_gradient(k_cmp),
                 [(0, 0), (0, num_chunks * bc - c), (0, 0), (0, dkp - dk)])
    n_slots = max(_pow2(top_n), 16)
    cfg = _Config(l=l, d=d, lp=lp, top_n=top_n, scale=default_scale(dk, scale), g=g,
                  num_cmp=c, num_blocks=nb, block_q=bq, block_c=bc, num_chunks=num_chunks,
                  interpret=interpret, num_warps=bs.num_warps, num_stages=num_stages,
                  overlap_tf32x3=bs.overlap_tf32x3 and not interpret,
                  heavy_first=bs.heavy_first, exp2=bs.exp2,
                  fill_first_chunk=bs.fill_first_chunk)
    w_in, w_next = (jnp.asarray(w) for w in overlap_tables(l, d, lp, bc))
    kc_spec = pl.BlockSpec((None, num_chunks * bc, None, dkp),
                           lambda bk, i: (bk // kh, 0, bk % kh, 0))
    w_spec = pl.BlockSpec((bc, nbc), lambda bk, i: (0, 0))
    if packed:
        kernel = _kernel_packed
        lse = jnp.pad(lse, [(0, 0), (0, tp - t), (0, 0)]).reshape(b, tp, kh, g)
        q = q.reshape(b, tp, kh, g, dkp)
        q_spec = pl.BlockSpec((None, bt, None, g, dkp),
                              lambda bk, i: (bk // kh, row(i), bk % kh, 0, 0))
        lse_spec = pl.BlockSpec((None, bt, None, g),
                                lambda bk, i: (bk // kh, row(i), bk % kh, 0))
    else:
        kernel = _kernel
        lse = jnp.pad(jnp.swapaxes(lse, 1, 2), [(0, 0), (0, 0), (0, tp - t)])  # [B, N, Tp]
        q_spec = pl.BlockSpec((None, bq, n, dkp), lambda bk, i: (bk // kh, row(i), 0, 0))
        lse_spec = pl.BlockSpec((None, n, bq), lambda bk, i: (bk // kh, 0, row(i)))
    idx = pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=(b * kh, nqb),
        in_specs=[q_spec, kc_spec, lse_spec, w_spec, w_spec],
        out_specs=pl.BlockSpec((None, bt, None, n_slots),
                               lambda bk, i: (bk // kh, row(i), bk % kh, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tp, kh, n_slots), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=num_stages),
        interpret=interpret,
        name="nsa_sel_topn_packed" if packed else "nsa_sel_topn",
    )(q, kc, lse, w_in, w_next)
    return idx[:, :t, :, :top_n]
