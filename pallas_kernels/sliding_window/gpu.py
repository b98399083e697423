"""Sliding-window attention on GPU: Pallas-Triton flash kernels that skip out-of-band blocks.

The kernels here compute *banded* attention, of which the sliding window and the compressed
branch are both instances. Key ``i`` sits at position ``p_i = i * key_stride + key_offset`` and
query ``t`` sees it iff ``t - window < p_i <= t``:

* sliding window: ``key_stride=1, key_offset=0, window=w``;
* compressed tokens: ``key_stride=d, key_offset=l-1, window=None`` (no lower edge).

Layout is sequence-first: ``q [B, T, N, Dk]``, ``k [B, S, K, Dk]``, ``v [B, S, K, Dv]`` with
``G = N / K`` query heads per KV head. Each forward program owns ``block_q`` queries of one
head and walks only the key blocks inside the band (a loop bound, not a mask over all blocks).
The backward has a ``dq`` kernel with the same walk and an atomics-free ``dk/dv`` kernel that
owns ``block_k_dkv`` keys of one KV head and walks the ``G`` heads and the query blocks that
can see them. Logits, softmax and accumulators are float32; float32 inputs use full-precision
dots (no tf32). Head dims that are not powers of two and sequences that are not multiples of
the tiles are zero-padded in the wrapper (padded keys are masked, padded queries dropped).

Rows that see no key (``t < key_offset``) give output 0 and log-sum-exp ``-inf``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float

from pallas_kernels import tuned_block_sizes
from pallas_kernels.common import LOG2E, check_int32_extent, default_scale

MASK_VALUE = -1e30
# Bytes of shared memory one program's tiles may take (the H200 allows 227 KiB per block).
SMEM_BUDGET = 160 * 1024
# Query blocks one compressed-key dk/dv program walks at most (per head) before splitting.
MAX_Q_BLOCKS_PER_PROGRAM = 32
MAX_DKV_SPLITS = 64  # programs one compressed-key block's queries are split over, at most
DKV_TARGET_PROGRAMS = 512  # busy compressed-key dk/dv programs to aim for (about 4 per SM)


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the banded kernels (powers of two, at least 16).

    Attributes:
      block_q, block_k: queries per forward/dq program, keys per loop step.
      block_q_dkv, block_k_dkv: queries per loop step, keys per dk/dv program.
      num_warps, num_stages: Triton launch parameters of the forward and dq kernels.
      num_warps_bwd, num_stages_bwd: those of the dk/dv kernel.
      mask_edges_only: build the visibility mask only on the blocks at the band's edges and run
        the blocks every query of the tile sees fully without it (three loops instead of one).
      dkv_q_blocks: without a lower edge (compressed tokens), query blocks of ``block_q_dkv``
        one dk/dv program walks per head before the range is split over more programs
        (``0``: ``MAX_Q_BLOCKS_PER_PROGRAM``); their float32 partials are added in XLA.
    """

    block_q: int = 64
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2
    mask_edges_only: bool = False
    dkv_q_blocks: int = 0

    def __post_init__(self):
        for f in ("block_q", "block_k", "block_q_dkv", "block_k_dkv"):
            val = getattr(self, f)
            if val < 16 or val & (val - 1):
                raise ValueError(f"BlockSizes.{f}={val} must be a power of two >= 16")
        for f in ("num_warps", "num_warps_bwd", "num_stages", "num_stages_bwd"):
            if getattr(self, f) < 1:
                raise ValueError(f"BlockSizes.{f}={getattr(self, f)} must be >= 1")
        if self.dkv_q_blocks < 0:
            raise ValueError(f"BlockSizes.dkv_q_blocks={self.dkv_q_blocks} must be >= 0")

    def clamp(self, t: int, s: int, itemsize: int = 2, dkp: int = 128,
              dvp: int = 128) -> BlockSizes:
        """Shrinks the tiles to short sequences (``t`` queries, ``s`` keys) and to the shared
        memory of one program (wide heads, float32), keeping them >= 16."""
        tq, ts = max(16, _pow2(t)), max(16, _pow2(s))
        bq, bk = min(self.block_q, tq), min(self.block_k, ts)
        bqd, bkd = min(self.block_q_dkv, tq), min(self.block_k_dkv, ts)

        def fit(a, b, stages, elems):
            """Over budget (``elems(a, b, stages)`` tile elements): drop pipeline stages down to
            two first, then halve the larger tile (``a`` on a tie), keeping both >= 16."""
            def over():
                return itemsize * elems(a, b, stages) > SMEM_BUDGET

            while over() and stages > 2:
                stages -= 1
            while over() and max(a, b) > 16:
                a, b = (a // 2, b) if a >= b and a > 16 else (a, max(16, b // 2))
            return a, b, stages

        # Forward/dq: the query tile stays resident, key/value tiles stream through the stages.
        bq, bk, st = fit(bq, bk, self.num_stages, lambda a, b, n: a * dkp + n * b * (dkp + dvp))
        # dk/dv: the key/value tile stays resident, query/dO tiles stream.
        bqd, bkd, stb = fit(bqd, bkd, self.num_stages_bwd,
                            lambda a, b, n: (b + n * a) * (dkp + dvp))
        return dataclasses.replace(self, block_q=bq, block_k=bk, block_q_dkv=bqd,
                                   block_k_dkv=bkd, num_stages=st, num_stages_bwd=stb)


@dataclasses.dataclass(frozen=True)
class BandConfig:
    """Static description of one banded attention call (hashable: a ``nondiff`` argument)."""

    key_stride: int
    key_offset: int
    window: int | None
    scale: float
    t: int  # true number of queries
    s: int  # true number of keys
    block_sizes: BlockSizes
    interpret: bool
    name: str

    @property
    def window_or_inf(self) -> int:
        return (1 << 30) if self.window is None else self.window


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, trans_a=False, trans_b=False, precision=None):
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _band_mask(cfg: BandConfig, t_pos, k_idx, keys_first: bool = False):
    """Visibility of key indices ``k_idx`` to queries ``t_pos``.

    ``[len(t_pos), len(k_idx)]``, or ``[len(k_idx), len(t_pos)]`` with ``keys_first``.
    """
    p = k_idx * cfg.key_stride + cfg.key_offset
    if keys_first:
        p, kk, tt = p[:, None], k_idx[:, None], t_pos[None, :]
    else:
        p, kk, tt = p[None, :], k_idx[None, :], t_pos[:, None]
    mask = (p <= tt) & (kk < cfg.s)
    if cfg.window is not None:
        mask &= p > tt - cfg.window
    return mask


def _key_block_range(cfg: BandConfig, q0, block_q: int, block_k: int):
    """Key blocks ``[lo, hi)`` that queries ``q0 .. q0+block_q-1`` may see."""
    st, off = cfg.key_stride, cfg.key_offset
    if cfg.window is None:
        lo = jnp.int32(0)
    else:
        first = jnp.maximum(q0 - cfg.window - off + st, 0)  # numerator of the first visible key
        lo = lax.div(lax.div(first, st), block_k)
    last = jnp.maximum(q0 + block_q - 1 - off + st, 0)
    n_keys = jnp.minimum(lax.div(last, st), cfg.s)  # keys visible to the block's last query
    hi = lax.div(n_keys + block_k - 1, block_k)
    return lo, hi


def _full_key_blocks(cfg: BandConfig, q0, block_q: int, block_k: int, lo, hi):
    """Key blocks ``[f_lo, f_hi)`` inside ``[lo, hi)`` that every query ``q0 .. q0+block_q-1``
    sees whole (no mask needed)."""
    st, off = cfg.key_stride, cfg.key_offset
    seen_by_first = jnp.minimum(lax.div(jnp.maximum(q0 - off + st, 0), st), cfg.s)
    f_hi = lax.div(seen_by_first, block_k)
    if cfg.window is None:
        f_lo = lo
    else:
        x = q0 + block_q - 1 - cfg.window - off  # keys must sit after this (offset removed)
        first = jnp.where(x >= 0, lax.div(jnp.maximum(x, 0), st) + 1, 0)
        f_lo = lax.div(first + block_k - 1, block_k)
    f_lo = jnp.clip(f_lo, lo, hi)
    return f_lo, jnp.clip(f_hi, f_lo, hi)


def _full_query_blocks(cfg: BandConfig, i0, block_k: int, block_q: int, lo, hi):
    """Query blocks ``[f_lo, f_hi)`` inside ``[lo, hi)`` whose queries all see every key
    ``i0 .. i0+block_k-1`` (no mask needed)."""
    st, off = cfg.key_stride, cfg.key_offset
    p_last = (i0 + block_k - 1) * st + off
    f_lo = lax.div(p_last + block_q - 1, block_q)
    f_lo = jnp.where(i0 + block_k <= cfg.s, f_lo, hi)  # a block with padding keys: masked
    if cfg.window is None:
        f_hi = hi
    else:
        f_hi = lax.div(i0 * st + off + cfg.window, block_q)
    f_lo = jnp.clip(f_lo, lo, hi)
    return f_lo, jnp.clip(f_hi, f_lo, hi)


def _loop(lo, hi, body, carry, full=None):
    """``fori_loop(lo, hi, body(masked=True))``, or with ``full = (f_lo, f_hi)`` three loops:
    masked edges around an unmasked middle."""
    if full is None:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=True), carry)
    f_lo, f_hi = full
    carry = lax.fori_loop(lo, f_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(f_lo, f_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(f_hi, hi, functools.partial(body, masked=True), carry)


# ------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------
def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: BandConfig):
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_k
    q0 = pl.program_id(0) * bq
    q = q_ref[...]  # [bq, Dk]
    prec = _precision(q.dtype)
    dv = v_ref.shape[-1]
    t_pos = q0 + jnp.arange(bq, dtype=jnp.int32)
    qk_scale = cfg.scale * LOG2E  # work in base 2

    def body(j, carry, masked: bool):
        acc, m, den = carry
        k = k_ref[pl.ds(j * bk, bk), :]  # [bk, Dk]
        v = v_ref[pl.ds(j * bk, bk), :]  # [bk, Dv]
        s = _dot(q, k, trans_b=True, precision=prec) * qk_scale  # [bq, bk]
        if masked:
            mask = _band_mask(cfg, t_pos, j * bk + jnp.arange(bk, dtype=jnp.int32))
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if masked:
            p = jnp.where(mask, p, 0.0)
        den = den * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, precision=prec)
        return acc, m_new, den

    lo, hi = _key_block_range(cfg, q0, bq, bk)
    full = (_full_key_blocks(cfg, q0, bq, bk, lo, hi) if cfg.block_sizes.mask_edges_only
            else None)
    acc = jnp.zeros((bq, dv), jnp.float32)
    m = jnp.full((bq,), MASK_VALUE, jnp.float32)
    den = jnp.zeros((bq,), jnp.float32)
    acc, m, den = _loop(lo, hi, body, (acc, m, den), full)
    seen = den > 0
    o_ref[...] = (acc / jnp.where(seen, den, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(jnp.where(seen, den, 1.0))) / LOG2E, -jnp.inf)


def _fwd(q, k, v, cfg: BandConfig):
    """Padded inputs in, padded ``o [B, Tp, N, Dv]`` and ``lse [B, N, Tp]`` out."""
    b, tp, n, dk = q.shape
    sp, kh, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = n // kh
    bs = cfg.block_sizes
    grid = (tp // bs.block_q, b * n)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, bs.block_q, None, dk), lambda i, bh: (bh // n, i, bh % n, 0)),
            pl.BlockSpec((None, sp, None, dk), lambda i, bh: (bh // n, 0, (bh % n) // g, 0)),
            pl.BlockSpec((None, sp, None, dv), lambda i, bh: (bh // n, 0, (bh % n) // g, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bs.block_q, None, dv), lambda i, bh: (bh // n, i, bh % n, 0)),
            pl.BlockSpec((None, None, bs.block_q), lambda i, bh: (bh // n, bh % n, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, n, dv), q.dtype),
            jax.ShapeDtypeStruct((b, n, tp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=cfg.interpret,
        name=f"nsa_{cfg.name}_fwd",
    )(q, k, v)


# ------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------
def _bwd_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg):
    bq, bk = cfg.block_sizes.block_q, cfg.block_sizes.block_k
    q0 = pl.program_id(0) * bq
    q = q_ref[...]  # [bq, Dk]
    do = do_ref[...]  # [bq, Dv]
    prec = _precision(q.dtype)
    lse = lse_ref[...] * LOG2E  # [bq], base 2, finite (empty rows were set to 0)
    delta = delta_ref[...]  # [bq]
    t_pos = q0 + jnp.arange(bq, dtype=jnp.int32)
    qk_scale = cfg.scale * LOG2E

    def body(j, dq, masked: bool):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _dot(q, k, trans_b=True, precision=prec) * qk_scale  # [bq, bk]
        p = jnp.exp2(jnp.minimum(s - lse[:, None], 0.0))
        if masked:
            mask = _band_mask(cfg, t_pos, j * bk + jnp.arange(bk, dtype=jnp.int32))
            p = jnp.where(mask, p, 0.0)
        dp = _dot(do, v, trans_b=True, precision=prec)  # [bq, bk]
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, precision=prec)

    lo, hi = _key_block_range(cfg, q0, bq, bk)
    full = (_full_key_blocks(cfg, q0, bq, bk, lo, hi) if cfg.block_sizes.mask_edges_only
            else None)
    dq = _loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32), full)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _bwd_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                    cfg: BandConfig, g: int, num_q_blocks: int, split_size: int):
    bq, bk = cfg.block_sizes.block_q_dkv, cfg.block_sizes.block_k_dkv
    i0 = pl.program_id(0) * bk
    kh = pl.program_id(1) % (q_ref.shape[1] // g)
    k = k_ref[...]  # [bk, Dk]
    v = v_ref[...]  # [bk, Dv]
    prec = _precision(k.dtype)
    k_idx = i0 + jnp.arange(bk, dtype=jnp.int32)
    qk_scale = cfg.scale * LOG2E
    # Queries that can see a key of this block: [p_first, p_last + window).
    t_first = i0 * cfg.key_stride + cfg.key_offset
    q_lo = lax.div(t_first, bq)
    if cfg.window is None:
        q_hi = jnp.int32(num_q_blocks)
    else:
        t_last = (i0 + bk - 1) * cfg.key_stride + cfg.key_offset + cfg.window - 1
        q_hi = jnp.minimum(lax.div(t_last, bq) + 1, num_q_blocks)
    # This program's share of the query blocks (a long band is split over programs).
    split = pl.program_id(2)
    q_lo = jnp.maximum(q_lo, split * split_size)
    q_hi = jnp.minimum(q_hi, (split + 1) * split_size)

    full = (_full_query_blocks(cfg, i0, bk, bq, q_lo, q_hi)
            if cfg.block_sizes.mask_edges_only else None)

    def head_body(h, carry):
        head = kh * g + h

        def body(i, carry, masked: bool):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q = q_ref[rows, head, :]  # [bq, Dk]
            do = do_ref[rows, head, :]  # [bq, Dv]
            lse = lse_ref[head, rows] * LOG2E  # [bq]
            delta = delta_ref[head, rows]  # [bq]
            t_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)
            s = _dot(k, q, trans_b=True, precision=prec) * qk_scale  # [bk, bq]
            p = jnp.exp2(jnp.minimum(s - lse[None, :], 0.0))
            if masked:
                p = jnp.where(_band_mask(cfg, t_pos, k_idx, keys_first=True), p, 0.0)
            dv = dv + _dot(p.astype(do.dtype), do, precision=prec)  # [bk, Dv]
            dp = _dot(v, do, trans_b=True, precision=prec)  # [bk, bq]
            ds = p * (dp - delta[None, :])
            dk = dk + _dot(ds.astype(q.dtype), q, precision=prec)  # [bk, Dk]
            return dk, dv

        return _loop(q_lo, q_hi, body, carry, full)

    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, g, head_body, (dk, dv))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd(q, k, v, o, lse, do, cfg: BandConfig):
    """Padded tensors in (``lse [B, N, Tp]``), padded ``dq, dk, dv`` out."""
    b, tp, n, dk = q.shape
    sp, kh, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = n // kh
    bs = cfg.block_sizes
    delta = jnp.einsum("btnd,btnd->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    params = plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)
    dq = pl.pallas_call(
        functools.partial(_bwd_dq_kernel, cfg=cfg),
        grid=(tp // bs.block_q, b * n),
        in_specs=[
            pl.BlockSpec((None, bs.block_q, None, dk), lambda i, bh: (bh // n, i, bh % n, 0)),
            pl.BlockSpec((None, sp, None, dk), lambda i, bh: (bh // n, 0, (bh % n) // g, 0)),
            pl.BlockSpec((None, sp, None, dv), lambda i, bh: (bh // n, 0, (bh % n) // g, 0)),
            pl.BlockSpec((None, bs.block_q, None, dv), lambda i, bh: (bh // n, i, bh % n, 0)),
            pl.BlockSpec((None, None, bs.block_q), lambda i, bh: (bh // n, bh % n, i)),
            pl.BlockSpec((None, None, bs.block_q), lambda i, bh: (bh // n, bh % n, i)),
        ],
        out_specs=pl.BlockSpec((None, bs.block_q, None, dk), lambda i, bh: (bh // n, i, bh % n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name=f"nsa_{cfg.name}_bwd_dq",
    )(q, k, v, do, lse, delta)
    # Without a lower edge (compressed tokens) a key block is seen by every later query: split
    # that range over programs and add the float32 partials, rather than one long serial loop.
    nq = tp // bs.block_q_dkv
    # Split further while fewer than DKV_TARGET_PROGRAMS programs would have work (causal: about
    # half of them): at 32k with one KV head and D = 64 (the 125M model's shape) 16 splits left
    # 136 busy programs and took 1.60 ms, 64 splits 1.10 ms (H200, commit 227c481).
    per_program = bs.dkv_q_blocks or MAX_Q_BLOCKS_PER_PROGRAM
    busy_per_split = max(1, (sp // bs.block_k_dkv) * b * kh // 2)
    n_split = max(nq // per_program, -(-DKV_TARGET_PROGRAMS // busy_per_split))
    n_split = 1 if cfg.window is not None else max(1, min(MAX_DKV_SPLITS, nq, n_split))
    split_size = -(-nq // n_split)
    n_split = -(-nq // split_size)  # no split left without query blocks

    def kv_map(j, bk, sp_):
        return (sp_ * b + bk // kh, j, bk % kh, 0)

    def full_map(j, bk, sp_):
        return (bk // kh, 0, 0, 0)

    dk_, dv_ = pl.pallas_call(
        functools.partial(_bwd_dkv_kernel, cfg=cfg, g=g, num_q_blocks=nq, split_size=split_size),
        grid=(sp // bs.block_k_dkv, b * kh, n_split),
        in_specs=[
            pl.BlockSpec((None, tp, n, dk), full_map),
            pl.BlockSpec((None, bs.block_k_dkv, None, dk),
                         lambda j, bk, sp_: (bk // kh, j, bk % kh, 0)),
            pl.BlockSpec((None, bs.block_k_dkv, None, dv),
                         lambda j, bk, sp_: (bk // kh, j, bk % kh, 0)),
            pl.BlockSpec((None, tp, n, dv), full_map),
            pl.BlockSpec((None, n, tp), lambda j, bk, sp_: (bk // kh, 0, 0)),
            pl.BlockSpec((None, n, tp), lambda j, bk, sp_: (bk // kh, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bs.block_k_dkv, None, dk), kv_map),
            pl.BlockSpec((None, bs.block_k_dkv, None, dv), kv_map),
        ],
        out_shape=[jax.ShapeDtypeStruct((n_split * b, sp, kh, dk), jnp.float32),
                   jax.ShapeDtypeStruct((n_split * b, sp, kh, dv), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps_bwd,
                                             num_stages=bs.num_stages_bwd),
        interpret=cfg.interpret,
        name=f"nsa_{cfg.name}_bwd_dkv",
    )(q, k, v, do, lse, delta)
    dk_ = dk_.reshape(n_split, b, sp, kh, dk).sum(0).astype(k.dtype)
    dv_ = dv_.reshape(n_split, b, sp, kh, dv).sum(0).astype(v.dtype)
    return dq, dk_, dv_


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _banded(q, k, v, cfg: BandConfig):
    return _fwd(q, k, v, cfg)


def _banded_fwd(q, k, v, cfg):
    o, lse = _fwd(q, k, v, cfg)
    return (o, lse), (q, k, v, o, lse)


def _banded_bwd(cfg, res, cts):
    q, k, v, o, lse = res
    do, _ = cts  # no gradient flows back through the log-sum-exp output
    return _bwd(q, k, v, o, lse, do.astype(q.dtype), cfg)


_banded.defvjp(_banded_fwd, _banded_bwd)


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def banded_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K Hv"],
    *,
    key_stride: int,
    key_offset: int,
    window: int | None,
    scale: float,
    block_sizes: BlockSizes,
    interpret: bool,
    name: str,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """Attention where query ``t`` sees key ``i`` iff ``t - window < i*stride + offset <= t``.

    Args:
      q: queries ``[B, T, N, Dk]``.
      k: keys ``[B, S, K, Dk]`` (``N % K == 0``).
      v: values ``[B, S, K, Dv]``.
      key_stride, key_offset: key ``i`` sits at position ``i * key_stride + key_offset``.
      window: band width, or ``None`` for no lower edge.
      scale: logit scale.
      block_sizes: tiles (clamped to short sequences here).
      interpret: run the kernels in the Pallas interpreter (CPU tests).
      name: branch name for the ``pallas_call`` names (``nsa_<name>_fwd`` ...).

    Returns:
      ``(o, lse)``: ``o [B, T, N, Dv]`` in ``q.dtype`` and ``lse [B, T, N]`` in f32.
    """
    b, t, n, dk = q.shape
    s, dv = k.shape[1], v.shape[-1]
    dkp, dvp = max(16, _pow2(dk)), max(16, _pow2(dv))
    bs = block_sizes.clamp(t, s, jnp.dtype(q.dtype).itemsize, dkp, dvp)
    tq = max(bs.block_q, bs.block_q_dkv)
    tk = max(bs.block_k, bs.block_k_dkv)
    tp, sp = -(-t // tq) * tq, -(-s // tk) * tk
    check_int32_extent(f"banded attention ({name})", q=(b, tp, n, max(dkp, dvp)),
                       k=(b, sp, k.shape[2], max(dkp, dvp)))
    qp = _pad_axis(_pad_axis(q, 1, tp), 3, dkp)
    kp = _pad_axis(_pad_axis(k, 1, sp), 3, dkp)
    vp = _pad_axis(_pad_axis(v, 1, sp), 3, dvp)
    cfg = BandConfig(key_stride=key_stride, key_offset=key_offset, window=window,
                     scale=float(scale), t=t, s=s, block_sizes=bs, interpret=interpret,
                     name=name)
    o, lse = _banded(qp, kp, vp, cfg)
    return o[:, :t, :, :dv], jnp.swapaxes(lse, 1, 2)[:, :t]


def check_qkv(q, k, v, what: str) -> None:
    """``ValueError`` naming the shapes unless ``q, k, v`` form a valid GQA triple."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{what}: expected rank-4 inputs, got {q.shape=}, {k.shape=}, {v.shape=}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{what}: incompatible shapes {q.shape=}, {k.shape=}, {v.shape=}")
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(f"{what}: query heads {q.shape[2]} not a multiple of KV heads "
                         f"{k.shape[2]} ({q.shape=}, {k.shape=})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{what}: dtypes differ: {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"{what}: floating inputs expected, got {q.dtype=}")


def sliding_window_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K Hv"],
    *,
    window_size: int,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """Causal attention over keys ``[max(0, t - w + 1), t]``; twin of ``reference.py``.

    Args:
      q: queries ``[B, T, N, Dk]``.
      k: keys ``[B, T, K, Dk]``.
      v: values ``[B, T, K, Dv]``.
      window_size: ``w >= 1``.
      scale: logit scale, ``1/sqrt(Dk)`` by default.
      block_sizes: tiles; the tuned table by default.
      interpret: run in the Pallas interpreter.

    Returns:
      ``(o, lse)``: ``o [B, T, N, Dv]`` in ``q.dtype`` and ``lse [B, T, N]`` in f32.
    """
    check_qkv(q, k, v, "sliding_window_attention")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"sliding_window_attention: {q.shape=} and {k.shape=} differ in length")
    if window_size < 1:
        raise ValueError(f"window_size={window_size} must be >= 1")
    bs = block_sizes or BlockSizes(**tuned_block_sizes.SLIDING_WINDOW)
    return banded_attention(q, k, v, key_stride=1, key_offset=0, window=int(window_size),
                            scale=default_scale(q.shape[-1], scale), block_sizes=bs,
                            interpret=interpret, name="swa")


def cudnn_window_supported(q, k, v) -> bool:
    """Whether cuDNN's windowed flash attention takes these inputs (what was measured: 16-bit
    floats, equal head dims of at most 128, a multiple of 8, as many keys as queries; jax's
    cuDNN path refuses odd lengths for training)."""
    d = q.shape[-1]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and k.shape[-1] == v.shape[-1] == d
            and d % 8 == 0 and d <= 128 and q.shape[1] == k.shape[1] and q.shape[1] % 2 == 0)


def sliding_window_attention_cudnn(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K Hv"],
    *,
    window_size: int,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """The GPU default window: cuDNN's windowed flash attention where it applies, else the
    banded kernel (same signature as :func:`sliding_window_attention`).

    cuDNN computes the output and its gradient (at 64k it measured 2.2x faster forward and 1.7x
    faster forward+backward than the banded kernel, ``docs/results/kernels.md``). It returns no
    log-sum-exp, so ``lse`` comes from the banded forward kernel on gradient-stopped inputs; NSA
    discards the window's ``lse``, and under ``jit`` that kernel is then removed as dead code.
    """
    check_qkv(q, k, v, "sliding_window_attention")
    if interpret or not cudnn_window_supported(q, k, v):
        return sliding_window_attention(q, k, v, window_size=window_size, scale=scale,
                                        block_sizes=block_sizes, interpret=interpret)
    if window_size < 1:
        raise ValueError(f"window_size={window_size} must be >= 1")
    scale = default_scale(q.shape[-1], scale)
    band = (int(window_size) - 1, 0) if window_size < q.shape[1] else None  # else: causal
    try:
        o = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                         local_window_size=band, implementation="cudnn")
    except NotImplementedError:  # a shape jax's cuDNN path refuses: the banded kernel instead
        return sliding_window_attention(q, k, v, window_size=window_size, scale=scale,
                                        block_sizes=block_sizes)
    _, lse = sliding_window_attention(*(lax.stop_gradient(x) for x in (q, k, v)),
                                      window_size=window_size, scale=scale,
                                      block_sizes=block_sizes)
    return o, lse
