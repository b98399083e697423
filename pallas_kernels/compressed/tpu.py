"""Compressed-branch attention as Mosaic (TPU) Pallas kernels.

Query ``t`` sees compressed token ``i`` iff ``i*d + l - 1 <= t``: a causal mask in which the
visible prefix grows by one compressed token every ``d`` queries. The kernels are the shared
masked flash attention of ``pallas_kernels/tpu_common.py`` with

* forward and dQ: query tile (``tq`` tokens x ``G`` heads) outer, blocks of ``block_k``
  compressed tokens inner, steps past the tile's last visible block skipped (their buffers
  held, so nothing is copied);
* dK/dV: compressed block outer, the query tiles from the first one that sees the block to the
  end inner.

The grid is static (no scalar prefetch): every index is arithmetic in the grid position.
Queries that see no compressed token get output 0 and log-sum-exp ``-inf``, with zero
gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
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

# Tile sizes of the compressed-attention kernels (``block_k``: compressed tokens per block).
BlockSizes = BandBlockSizes


@dataclasses.dataclass(frozen=True)
class _CmpConfig:
    block_size: int  # l
    stride: int  # d
    num_cmp: int  # C
    geom: Geometry
    num_tiles: int
    num_key_blocks: int
    interpret: Any
    name: ClassVar[str] = "nsa_compressed"

    def mask(self) -> MaskFn:
        return _cmp_mask(self)

    def q_schedule(self, b: int, kh: int) -> QSchedule:
        return _q_schedule(self, b, kh)

    def kv_schedule(self, b: int, kh: int) -> KVSchedule:
        return _kv_schedule(self, b, kh)


def _cmp_mask(cfg: _CmpConfig):
    l, d, c = cfg.block_size, cfg.stride, cfg.num_cmp

    def mask(tok, key_pos, kv_block, extra_refs, transposed):
        del kv_block, extra_refs, transposed
        return (key_pos * d + l - 1 <= tok) & (key_pos < c)
    return mask


def _last_block(cfg: _CmpConfig, i):
    """Last key block tile ``i`` sees (meaningful when it sees any); numpy or traced ``i``."""
    tq, l, d, bk = cfg.geom.tq, cfg.block_size, cfg.stride, cfg.geom.bk
    mx = jnp.maximum if isinstance(i, jax.Array) else np.maximum
    mn = jnp.minimum if isinstance(i, jax.Array) else np.minimum
    return mn(idiv(mx(i * tq + tq - l, 0), d * bk), cfg.num_key_blocks - 1)


def _q_schedule(cfg: _CmpConfig, b: int, kh: int) -> QSchedule:
    tq, l = cfg.geom.tq, cfg.block_size
    steps = int(_last_block(cfg, np.arange(cfg.num_tiles)).max()) + 1

    def sees_any(i):
        return i * tq + tq >= l

    return QSchedule(
        grid=(b, kh, cfg.num_tiles, steps),
        q_tile=lambda bi, hi, i, j: i,
        kv_block=lambda bi, hi, i, j: j,
        kv_fetch=lambda bi, hi, i, j: jnp.minimum(j, _last_block(cfg, i)),
        active=lambda bi, hi, i, j: sees_any(i) & (j <= _last_block(cfg, i)),
    )


def _kv_schedule(cfg: _CmpConfig, b: int, kh: int) -> KVSchedule:
    tq, l, d, bk = cfg.geom.tq, cfg.block_size, cfg.stride, cfg.geom.bk
    nt = cfg.num_tiles

    def first_tile(cb):  # the first tile with a query that sees compressed token cb * bk
        return idiv(cb * bk * d + l - 1, tq)

    steps = nt - first_tile(0)
    return KVSchedule(
        grid=(b, kh, cfg.num_key_blocks, steps),
        kv_block=lambda bi, hi, cb, j: cb,
        q_tile=lambda bi, hi, cb, j: jnp.minimum(first_tile(cb) + j, nt - 1),
        active=lambda bi, hi, cb, j: first_tile(cb) + j <= nt - 1,
        first=lambda bi, hi, cb, j: j == 0,
        last=lambda bi, hi, cb, j: j == steps - 1,
    )


def compressed_attention(
    q: Float[Array, "B T N H"],
    k_cmp: Float[Array, "B C K H"],
    v_cmp: Float[Array, "B C K Hv"],
    *,
    block_size: int,
    stride: int,
    scale: float | None = None,
    chunk_size: int | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: Any = None,
) -> tuple[Float[Array, "B T N Hv"], Float[Array, "B T N"]]:
    """Attention of every query over the compressed keys it may see, on TPU.

    Args:
      q: queries ``[B, T, N, Dk]``.
      k_cmp: compressed keys ``[B, C, K, Dk]``; token ``i`` covers raw ``[i*d, i*d + l)``.
      v_cmp: compressed values ``[B, C, K, Dv]``.
      block_size: ``l``.
      stride: ``d``.
      scale: logit scale, ``1/sqrt(Dk)`` by default.
      chunk_size: accepted for signature parity with the reference; tiling is fixed by
        ``block_sizes``.
      block_sizes: tile sizes (defaults: :class:`BlockSizes`).
      interpret: ``None`` to compile for TPU, or ``pltpu.InterpretParams`` to simulate.

    Returns:
      ``(o, lse)``: ``o [B, T, N, Dv]`` in ``q.dtype`` and ``lse [B, T, N]`` in f32.
    """
    del chunk_size
    b, t, n, _ = q.shape
    c, kh, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[-1]
    if n % kh:
        raise ValueError(f"query heads must be a multiple of KV heads: {q.shape=}, "
                         f"{k_cmp.shape=}")
    if block_size < 1 or stride < 1:
        raise ValueError(f"{block_size=} and {stride=} must be positive")
    if c == 0:  # no complete block anywhere in the sequence
        return jnp.zeros((b, t, n, dv), q.dtype), jnp.full((b, t, n), -jnp.inf, jnp.float32)
    q_rows, k_keys, v_keys, geom = prepare_rows(q, k_cmp, v_cmp, block_sizes or BlockSizes(),
                                                scale)
    cfg = _CmpConfig(block_size=block_size, stride=stride, num_cmp=c, geom=geom,
                     num_tiles=q_rows.shape[2] // geom.rows,
                     num_key_blocks=k_keys.shape[2] // geom.bk, interpret=interpret)
    o_rows, lse = band_attention(q_rows, k_keys, v_keys, cfg)
    return from_rows(o_rows, t, n, dv), stat_from_rows(lse, t, n)
