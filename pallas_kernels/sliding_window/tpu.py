"""Sliding-window attention as Mosaic (TPU) Pallas kernels.

Query ``t`` attends keys ``[t - w + 1, t]``. The flash-attention kernels, layout and schedules
are in ``pallas_kernels/tpu_common.py``; this module supplies the window's mask and schedules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from pallas_kernels.tpu_common import (
    BandBlockSizes,
    Geometry,
    KVSchedule,
    MaskFn,
    QSchedule,
    band_attention,
    from_rows,
    idiv,
    prepare_rows,
    stat_from_rows,
)

# ------------------------------------------------------------------------------------------------
# The sliding window.


# Tile sizes of the sliding-window kernels.
BlockSizes = BandBlockSizes


@dataclasses.dataclass(frozen=True)
class _WindowConfig:
    window: int
    geom: Geometry
    seq_len: int
    num_tiles: int
    num_key_blocks: int
    interpret: Any
    name: ClassVar[str] = "nsa_sliding_window"

    def mask(self) -> MaskFn:
        return _window_mask(self.window, self.seq_len)

    def q_schedule(self, b: int, kh: int) -> QSchedule:
        return _window_q_schedule(self, b, kh)

    def kv_schedule(self, b: int, kh: int) -> KVSchedule:
        return _window_kv_schedule(self, b, kh)


def _window_mask(w: int, seq_len: int) -> MaskFn:
    def mask(tok, key_pos, kv_block, extra_refs, transposed):
        del kv_block, extra_refs, transposed
        return (key_pos <= tok) & (key_pos > tok - w) & (key_pos < seq_len)
    return mask


def _window_q_schedule(cfg: _WindowConfig, b: int, kh: int) -> QSchedule:
    tq, bk, w = cfg.geom.tq, cfg.geom.bk, cfg.window
    tiles = np.arange(cfg.num_tiles)
    lo = np.maximum(tiles * tq - w + 1, 0) // bk
    hi = np.minimum((tiles * tq + tq - 1) // bk, cfg.num_key_blocks - 1)
    steps = int(np.max(hi - lo + 1))
    nkb = cfg.num_key_blocks

    def lo_of(i):
        return idiv(jnp.maximum(i * tq - w + 1, 0), bk)

    def hi_of(i):
        return jnp.minimum(idiv(i * tq + tq - 1, bk), nkb - 1)

    return QSchedule(
        grid=(b, kh, cfg.num_tiles, steps),
        q_tile=lambda bi, hi, i, j: i,
        kv_block=lambda bi, hi, i, j: lo_of(i) + j,
        kv_fetch=lambda bi, hi, i, j: jnp.minimum(lo_of(i) + j, hi_of(i)),
        active=lambda bi, hi, i, j: lo_of(i) + j <= hi_of(i),
    )


def _window_kv_schedule(cfg: _WindowConfig, b: int, kh: int) -> KVSchedule:
    tq, bk, w = cfg.geom.tq, cfg.geom.bk, cfg.window
    nt = cfg.num_tiles
    blocks = np.arange(cfg.num_key_blocks)
    lo = blocks * bk // tq
    hi = np.minimum((blocks * bk + bk - 1 + w - 1) // tq, nt - 1)
    steps = int(np.max(hi - lo + 1))

    def lo_of(kb):
        return idiv(kb * bk, tq)

    def hi_of(kb):
        return jnp.minimum(idiv(kb * bk + bk - 1 + w - 1, tq), nt - 1)

    return KVSchedule(
        grid=(b, kh, cfg.num_key_blocks, steps),
        kv_block=lambda bi, hi, kb, j: kb,
        q_tile=lambda bi, hi, kb, j: jnp.minimum(lo_of(kb) + j, hi_of(kb)),
        active=lambda bi, hi, kb, j: lo_of(kb) + j <= hi_of(kb),
        first=lambda bi, hi, kb, j: j == 0,
        last=lambda bi, hi, kb, j: j == steps - 1,
    )


def sliding_window_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K Hv"],
    *,
    window_size: int,
    scale: float | None = None,
    chunk_size: int | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: Any = None,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """Causal attention over the last ``window_size`` keys of each query, on TPU.

    Args:
      q: queries ``[B, T, N, Dk]``.
      k: keys ``[B, T, K, Dk]``.
      v: values ``[B, T, K, Dv]``.
      window_size: ``w``; query ``t`` sees keys ``[max(0, t - w + 1), t]``.
      scale: logit scale, ``1/sqrt(Dk)`` by default.
      chunk_size: accepted for signature parity with the reference; tiling is fixed by
        ``block_sizes``.
      block_sizes: tile sizes (defaults: :class:`BlockSizes`).
      interpret: ``None`` to compile for TPU, or ``pltpu.InterpretParams`` to simulate.

    Returns:
      ``(o, lse)``: ``o [B, T, N, Dv]`` in ``q.dtype``, ``lse [B, T, N]`` in f32.
    """
    del chunk_size
    b, t, n, _ = q.shape
    kh, dv = k.shape[2], v.shape[-1]
    if n % kh:
        raise ValueError(f"query heads must be a multiple of KV heads: {q.shape=}, {k.shape=}")
    if window_size < 1:
        raise ValueError(f"{window_size=} must be positive")
    q_rows, k_keys, v_keys, geom = prepare_rows(q, k, v, block_sizes or BlockSizes(), scale)
    cfg = _WindowConfig(window=window_size, geom=geom, seq_len=t,
                        num_tiles=q_rows.shape[2] // geom.rows,
                        num_key_blocks=k_keys.shape[2] // geom.bk, interpret=interpret)
    o_rows, lse = band_attention(q_rows, k_keys, v_keys, cfg)
    return from_rows(o_rows, t, n, dv), stat_from_rows(lse, t, n)
