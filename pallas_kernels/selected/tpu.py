"""Selected-branch attention as Mosaic (TPU) Pallas kernels.

Each query token ``t`` and KV group attends the ``n`` key blocks of ``l'`` keys its group
selected (``indices [B, T, K, n]``, ``-1`` for an empty slot), causally inside its current
block. On TPU the MXU needs ``>= 128`` query rows, so a tile is ``tq`` tokens x the ``G`` heads
of a group (``R = tq * G`` rows) and each token keeps its own selection by masking:

* forward and dQ (query tile outer): the tile visits the *union* of its tokens' blocks, at most
  ``U = min(tq * n, ceil(S / l'))`` key blocks; a row keeps a key iff its token selected the
  block and the key is not in its future. The union of each tile (sorted, padded by repeating
  the last block so padding steps copy nothing) and its size are scalar-prefetched and drive
  the K/V index maps; the step axis is a dynamic grid bound, the largest union of the call.
* dK/dV (key block outer, no atomics): the inverse index. Every (tile, key block) pair of the
  unions is sorted by key block; a grid step visits one pair, and the steps of one key block are
  consecutive, accumulating dK and dV in VMEM; the step axis ends at the call's last real pair.

Scalar memory (1 MiB per core) bounds the prefetched tables: a call carries at most
``BlockSizes.smem_table_bytes`` of them, and longer sequences are split into several calls
(query tiles for the forward and dQ, runs of pairs for dK/dV, which add into the same f32
accumulators through input/output aliasing). Per-row selections travel as ``int32 [R, n]``
blocks (``[n, R]`` for dK/dV) in VMEM.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels.common import default_scale
from pallas_kernels.tpu_common import (
    Geometry,
    KVSchedule,
    QSchedule,
    bwd_delta,
    flash_bwd_dkv,
    flash_bwd_dq,
    flash_fwd,
    from_rows,
    pad_head_dim,
    round_up,
    settle,
    stat_from_rows,
    tile_tokens,
    to_keys,
    to_rows,
)

_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and scalar-memory budget of the selected kernels.

    Attributes:
      min_rows: least query rows per tile (``tq * G``, rounded up to a multiple of 128).
      smem_table_bytes: most bytes of scalar-prefetched tables one ``pallas_call`` carries.
    """

    min_rows: int = 128
    smem_table_bytes: int = 512 * 1024

    def __post_init__(self):
        if self.min_rows < 1:
            raise ValueError(f"{self.min_rows=} must be positive")
        if self.smem_table_bytes < 16:
            raise ValueError(f"{self.smem_table_bytes=} is too small for any table")


@dataclasses.dataclass(frozen=True)
class _SlcConfig:
    geom: Geometry  # geom.bk = l'
    seq_len: int  # S, keys
    num_tiles: int
    union_size: int  # U
    tiles_per_call: int
    pairs_per_call: int
    interpret: Any


def _selected_mask(seq_len: int):
    def mask(tok, key_pos, kv_block, extra_refs, transposed):
        sel = (extra_refs[0][...] == kv_block).astype(jnp.float32)  # [R, n] or [n, R]
        row_sel = jnp.max(sel, axis=0 if transposed else 1, keepdims=True) > 0.0
        return row_sel & (key_pos <= tok) & (key_pos < seq_len)
    return mask


# ------------------------------------------------------------------------------------------------
# Index tables (plain XLA).


def tile_unions(idx_btkm: Int[Array, "B T K M"], tq: int, union_size: int):
    """Each query tile's sorted distinct key blocks.

    Args:
      idx_btkm: selections ``int32 [B, T, K, n]``, ``-1`` for empty slots.
      tq: tokens per tile.
      union_size: ``U``, the table width (at least the largest possible union).

    Returns:
      ``(union [B, K, tiles, U], count [B, K, tiles])``: blocks in ascending order, the slots
      past ``count`` repeating the last block (0 for an empty tile).
    """
    b, t, kh, m = idx_btkm.shape
    tp = round_up(t, tq)
    x = jnp.pad(idx_btkm, [(0, 0), (0, tp - t), (0, 0), (0, 0)], constant_values=-1)
    x = x.transpose(0, 2, 1, 3).reshape(b, kh, tp // tq, tq * m)  # [B, K, tiles, tq*n]
    x = jnp.sort(jnp.where(x < 0, _INT32_MAX, x), axis=-1)
    prev = jnp.concatenate([jnp.full_like(x[..., :1], -1), x[..., :-1]], axis=-1)
    new = (x != prev) & (x != _INT32_MAX)
    count = jnp.sum(new, axis=-1, dtype=jnp.int32)  # [B, K, tiles]
    x = jnp.sort(jnp.where(new, x, _INT32_MAX), axis=-1)[..., :union_size]
    last = jnp.take_along_axis(x, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    last = jnp.where(count[..., None] > 0, last, 0)
    slot = jnp.arange(union_size, dtype=jnp.int32)
    return jnp.where(slot < count[..., None], x, last).astype(jnp.int32), count


def block_pairs(union, count, num_tiles: int, total: int):
    """The inverse index: every (key block, tile) pair of the unions, sorted by key block.

    Args:
      union, count: from :func:`tile_unions`.
      num_tiles: tiles per sequence.
      total: table length per ``(b, k)`` (at least ``tiles * U``).

    Returns:
      ``(block, tile, valid)``, each ``int32 [B, K, total]``, entries past the real pairs
      repeating the last real one with ``valid = 0``; and the number of real pairs ``[B, K]``.
    """
    b, kh, nt, u = union.shape
    tile = jnp.broadcast_to(jnp.arange(nt, dtype=jnp.int32)[:, None], (nt, u))
    real = jnp.arange(u, dtype=jnp.int32) < count[..., None]  # [B, K, tiles, U]
    key = jnp.where(real, union * nt + tile, _INT32_MAX).reshape(b, kh, nt * u)
    key = jnp.sort(key, axis=-1)
    key = jnp.pad(key, [(0, 0), (0, 0), (0, total - nt * u)], constant_values=_INT32_MAX)
    n_real = jnp.sum(real, axis=(2, 3), dtype=jnp.int32)[..., None]  # [B, K, 1]
    last = jnp.take_along_axis(key, jnp.maximum(n_real - 1, 0), axis=-1)
    last = jnp.where(n_real > 0, last, 0)
    pos = jnp.arange(total, dtype=jnp.int32)
    valid = pos < n_real
    key = jnp.where(valid, key, last)
    return key // nt, key % nt, valid.astype(jnp.int32), n_real[..., 0]


def _expand_rows(idx_btkm, g: int, tq: int):
    """``[B, T, K, n] -> [B, K, Tp*G, n]``: each token's selection repeated for its G rows."""
    b, t, kh, m = idx_btkm.shape
    x = jnp.pad(idx_btkm, [(0, 0), (0, round_up(t, tq) - t), (0, 0), (0, 0)],
                constant_values=-1)
    x = jnp.broadcast_to(x.transpose(0, 2, 1, 3)[:, :, :, None, :], (b, kh, x.shape[1], g, m))
    return x.reshape(b, kh, -1, m)


# ------------------------------------------------------------------------------------------------
# Kernel calls.


def _q_schedule(cfg: _SlcConfig, b: int, kh: int, i0: int, n_tiles: int, count) -> QSchedule:
    """Tiles ``i0 .. i0 + n_tiles - 1``; the step axis is as long as the largest union among
    them (a dynamic grid bound), not the worst case ``U``."""
    u = cfg.union_size
    steps = jnp.maximum(jnp.max(count[:, :, i0:i0 + n_tiles]), 1).astype(jnp.int32)

    def off(bi, hi, i):
        return (bi * kh + hi) * n_tiles + i

    def block(bi, hi, i, j, union_ref, count_ref):
        return union_ref[off(bi, hi, i) * u + j]

    return QSchedule(
        grid=(b, kh, n_tiles, steps),
        q_tile=lambda bi, hi, i, j, *s: i0 + i,
        kv_block=block,
        kv_fetch=block,
        active=lambda bi, hi, i, j, union_ref, count_ref: j < count_ref[off(bi, hi, i)],
    )


def _kv_schedule(cfg: _SlcConfig, b: int, kh: int, p0: int, n_real) -> KVSchedule:
    """Pairs ``p0 .. p0 + pairs_per_call - 1`` of every ``(b, k)``; the step axis stops after
    the last real pair of the call (a dynamic grid bound)."""
    p_c = cfg.pairs_per_call
    size = b * kh * p_c
    steps = jnp.maximum(jnp.max(jnp.clip(n_real - p0, 0, p_c)), 1).astype(jnp.int32)

    def off(bi, hi, p):
        return (bi * kh + hi) * p_c + p

    def block(bi, hi, p, block_ref, tile_ref, valid_ref):
        return block_ref[off(bi, hi, p)]

    def first(bi, hi, p, block_ref, tile_ref, valid_ref):
        o = off(bi, hi, p)
        return (p == 0) | (block_ref[jnp.maximum(o - 1, 0)] != block_ref[o])

    def last(bi, hi, p, block_ref, tile_ref, valid_ref):
        o = off(bi, hi, p)
        # Called in the kernel body only, where the dynamic grid bound is known.
        is_end = p == pl.num_programs(2) - 1
        return is_end | (block_ref[jnp.minimum(o + 1, size - 1)] != block_ref[o])

    return KVSchedule(
        grid=(b, kh, steps),
        kv_block=block,
        q_tile=lambda bi, hi, p, block_ref, tile_ref, valid_ref: tile_ref[off(bi, hi, p)],
        active=lambda bi, hi, p, block_ref, tile_ref, valid_ref: valid_ref[off(bi, hi, p)] > 0,
        first=first,
        last=last,
    )


def _chunks(total: int, per_call: int):
    return [(s, min(per_call, total - s)) for s in range(0, total, per_call)]


@functools.partial(jax.jit, static_argnums=6)  # one compiled kernel per config and shape
def _fwd_rows(q_rows, k_keys, v_keys, idx_rows, union, count, cfg: _SlcConfig):
    b, kh = q_rows.shape[:2]
    r, m = cfg.geom.rows, idx_rows.shape[-1]
    mask = _selected_mask(cfg.seq_len)
    outs = []
    for i0, nc in _chunks(cfg.num_tiles, cfg.tiles_per_call):
        spec = pl.BlockSpec((None, None, r, m), lambda bi, hi, i, j, *s, i0=i0: (bi, hi, i0 + i, 0))
        outs.append(flash_fwd(
            q_rows, k_keys, v_keys, sched=_q_schedule(cfg, b, kh, i0, nc, count), geom=cfg.geom,
            mask_fn=mask, name="nsa_selected", interpret=cfg.interpret,
            scalars=(union[:, :, i0:i0 + nc].reshape(-1), count[:, :, i0:i0 + nc].reshape(-1)),
            extras=[(idx_rows, spec)]))
    if len(outs) == 1:
        return outs[0]
    return (jnp.concatenate([o for o, _ in outs], axis=2),
            jnp.concatenate([lse for _, lse in outs], axis=3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _slc_rows(q_rows, k_keys, v_keys, idx_rows, union, count, cfg: _SlcConfig):
    return settle(_fwd_rows(q_rows, k_keys, v_keys, idx_rows, union, count, cfg), cfg.interpret)


def _slc_rows_fwd(q_rows, k_keys, v_keys, idx_rows, union, count, cfg):
    o_rows, lse = settle(_fwd_rows(q_rows, k_keys, v_keys, idx_rows, union, count, cfg),
                         cfg.interpret)
    return (o_rows, lse), (q_rows, k_keys, v_keys, idx_rows, union, count, o_rows, lse)


def _slc_rows_bwd(cfg, res, cts):
    return settle(_bwd(cfg, res, cts), cfg.interpret)


@functools.partial(jax.jit, static_argnums=0)
def _bwd(cfg, res, cts):
    q_rows, k_keys, v_keys, idx_rows, union, count, o_rows, lse = res
    do_rows, dlse = cts
    b, kh = q_rows.shape[:2]
    r, m = cfg.geom.rows, idx_rows.shape[-1]
    delta = bwd_delta(o_rows, do_rows, dlse)
    common = dict(geom=cfg.geom, mask_fn=_selected_mask(cfg.seq_len), name="nsa_selected",
                  interpret=cfg.interpret)

    dqs = []
    for i0, nc in _chunks(cfg.num_tiles, cfg.tiles_per_call):
        spec = pl.BlockSpec((None, None, r, m), lambda bi, hi, i, j, *s, i0=i0: (bi, hi, i0 + i, 0))
        dqs.append(flash_bwd_dq(
            q_rows, k_keys, v_keys, do_rows, lse, delta,
            sched=_q_schedule(cfg, b, kh, i0, nc, count),
            scalars=(union[:, :, i0:i0 + nc].reshape(-1), count[:, :, i0:i0 + nc].reshape(-1)),
            extras=[(idx_rows, spec)], **common))
    dq = dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=2)

    p_c = cfg.pairs_per_call
    total = round_up(cfg.num_tiles * cfg.union_size, p_c)
    blocks, tiles, valid, n_real = block_pairs(union, count, cfg.num_tiles, total)
    idx_cols = jnp.swapaxes(idx_rows, 2, 3)  # [B, K, n, Tp*G]
    dk = jnp.zeros(k_keys.shape, jnp.float32)
    dv = jnp.zeros(v_keys.shape, jnp.float32)
    for p0, _ in _chunks(total, p_c):
        sched = _kv_schedule(cfg, b, kh, p0, n_real)
        spec = pl.BlockSpec((None, None, m, r), lambda bi, hi, p, *s, sched=sched: (
            bi, hi, 0, sched.q_tile(bi, hi, p, *s)))
        tables = tuple(x[:, :, p0:p0 + p_c].reshape(-1) for x in (blocks, tiles, valid))
        dk, dv = flash_bwd_dkv(q_rows, k_keys, v_keys, do_rows, lse, delta, sched=sched,
                               scalars=tables, extras=[(idx_cols, spec)],
                               accumulate_into=(dk, dv), **common)
    return (dq, dk.astype(k_keys.dtype), dv.astype(v_keys.dtype), None, None, None)


_slc_rows.defvjp(_slc_rows_fwd, _slc_rows_bwd)


def selected_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K Hv"],
    indices: Int[Array, "B T K M"],
    *,
    block_size: int,
    scale: float | None = None,
    chunk_size: int | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: Any = None,
    forced_included: bool = False,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """Attention of each query over the key blocks its group selected, on TPU.

    Args:
      q: queries ``[B, T, N, Dk]``; query ``t`` sits at position ``t``.
      k: keys ``[B, S, K, Dk]`` with ``S >= T``.
      v: values ``[B, S, K, Dv]``.
      indices: ``int32 [B, T, K, n]`` selected blocks, ``-1`` for an empty slot, each block at
        most once per row. No gradient.
      block_size: ``l'``; a multiple of 8 (16 for 16-bit inputs), the sublane tile of a key
        block. Other sizes raise ``NotImplementedError`` (the registry falls back).
      scale: logit scale, ``1/sqrt(Dk)`` by default.
      chunk_size: accepted for signature parity with the reference; tiling is fixed by
        ``block_sizes``.
      block_sizes: tile sizes and scalar-memory budget (defaults: :class:`BlockSizes`).
      interpret: ``None`` to compile for TPU, or ``pltpu.InterpretParams`` to simulate.
      forced_included: accepted for signature parity (the GPU kernel may use it); ignored.

    Returns:
      ``(o, lse)``: ``o [B, T, N, Dv]`` in ``q.dtype``, ``lse [B, T, N]`` in f32.
    """
    del chunk_size, forced_included
    b, t, n, dk = q.shape
    s_len, kh, dv = k.shape[1], k.shape[2], v.shape[-1]
    m = indices.shape[-1]
    if n % kh:
        raise ValueError(f"query heads must be a multiple of KV heads: {q.shape=}, {k.shape=}")
    if indices.shape[:3] != (b, t, kh):
        raise ValueError(f"{indices.shape=} must be [B, T, K, n] for {q.shape=}, {k.shape=}")
    sublanes = 8 * 4 // jnp.dtype(q.dtype).itemsize
    if block_size % sublanes:
        raise NotImplementedError(
            f"{block_size=} is not a multiple of {sublanes}, the sublane tile of {q.dtype}")
    bs = block_sizes or BlockSizes()
    g = n // kh
    tq = tile_tokens(g, bs.min_rows)
    geom = Geometry(g=g, tq=tq, bk=block_size, scale=default_scale(dk, scale))
    hp, hvp = pad_head_dim(dk), pad_head_dim(dv)
    q_rows = to_rows(q, kh, tq, hp)
    k_keys, v_keys = to_keys(k, block_size, hp), to_keys(v, block_size, hvp)
    num_tiles = q_rows.shape[2] // geom.rows
    union_size = min(tq * m, k_keys.shape[2] // block_size)
    idx = jax.lax.stop_gradient(indices).astype(jnp.int32)
    union, count = tile_unions(idx, tq, union_size)
    tiles_per_call = max(1, bs.smem_table_bytes // (4 * b * kh * (union_size + 1)))
    pairs_per_call = max(1, bs.smem_table_bytes // (4 * 3 * b * kh))
    cfg = _SlcConfig(
        geom=geom, seq_len=s_len, num_tiles=num_tiles, union_size=union_size,
        tiles_per_call=min(tiles_per_call, num_tiles),
        pairs_per_call=min(pairs_per_call, num_tiles * union_size),
        interpret=interpret,
    )
    o_rows, lse = _slc_rows(q_rows, k_keys, v_keys, _expand_rows(idx, g, tq), union, count, cfg)
    return from_rows(o_rows, t, n, dv), stat_from_rows(lse, t, n)
