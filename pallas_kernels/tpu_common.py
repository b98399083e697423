"""Masked flash attention as Mosaic (TPU) Pallas kernels: the machinery the three TPU branch
kernels (sliding window, compressed, selected) share.


Layout inside the kernels. A query tile is ``tq`` consecutive tokens times the ``G`` query heads
of one KV group, ``R = tq * G`` rows ordered ``(token, head)``, so every row of a tile reads the
same K/V blocks and the MXU sees ``R >= 128`` rows even for ``G = 16``. ``R`` is a multiple of
128 so that the per-row log-sum-exp and ``delta`` travel lane-dense as ``[1, R]`` blocks.

* queries, outputs: ``[B, K, Tp * G, Hp]`` (``Tp``: ``T`` padded to ``tq``; ``Hp``: head dim
  padded to 128 with zeros, which changes no dot product);
* keys, values: ``[B, K, Sp, Hp]`` (``Sp``: keys padded to the key block);
* log-sum-exp and ``delta = rowsum(dO * O)``: ``[B, K, 1, Tp * G]``.

Three kernels, each driven by a *schedule* (which query tile and key block a grid step visits,
and whether it computes or only holds its buffers so nothing is re-fetched):

* ``_fwd_kernel``: query tile outer, key blocks inner, online softmax in f32 VMEM scratch;
* ``_bwd_dq_kernel``: the same order, recomputing probabilities from the log-sum-exp;
* ``_bwd_dkv_kernel``: key block outer, the query tiles that see it inner, computing
  ``S^T = K Q^T`` so the row statistics stay lane-dense. Steps that share a key block are
  consecutive and accumulate in VMEM; no atomics.

A branch supplies the schedule and a mask ``(token, key position, key block) -> bool`` from
its own ``tpu.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from pallas_kernels.common import MASK_VALUE, default_scale

NUM_LANES = 128
NT_DIMS = (((1,), (1,)), ((), ()))  # x @ y.T
NN_DIMS = (((1,), (0,)), ((), ()))  # x @ y


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def idiv(x, m: int):
    """``x // m`` for non-negative ``x``: numpy, or traced inside a kernel or an index map.

    Traced, it is a truncating division: floor division lowers through ``sign``, whose Mosaic
    rule needs the TPU generation at lowering time.
    """
    if isinstance(x, jax.Array):
        return lax.div(x, jnp.asarray(m, x.dtype))
    return x // m


def tile_tokens(group_size: int, min_rows: int) -> int:
    """Tokens per query tile: the fewest with ``tq * G`` a multiple of 128 and ``>= min_rows``."""
    base = NUM_LANES // math.gcd(group_size, NUM_LANES)
    return base * max(1, -(-min_rows // (base * group_size)))


def pad_head_dim(d: int) -> int:
    return round_up(d, NUM_LANES)


# ------------------------------------------------------------------------------------------------
# Layout changes (plain XLA, outside the kernels).


def to_rows(x: Float[Array, "B T N H"], kh: int, tq: int, hp: int) -> Float[Array, "B K R Hp"]:
    """``[B, T, N, H] -> [B, K, Tp*G, Hp]``, rows ordered ``(token, head of the group)``."""
    b, t, n, d = x.shape
    g = n // kh
    x = x.reshape(b, t, kh, g, d).transpose(0, 2, 1, 3, 4)  # [B, K, T, G, H]
    x = jnp.pad(x, [(0, 0), (0, 0), (0, round_up(t, tq) - t), (0, 0), (0, hp - d)])
    return x.reshape(b, kh, -1, hp)  # [B, K, Tp*G, Hp]


def from_rows(x: Float[Array, "B K R Hp"], t: int, n: int, d: int) -> Float[Array, "B T N H"]:
    """Inverse of :func:`to_rows`."""
    b, kh, rows, hp = x.shape
    g = n // kh
    x = x.reshape(b, kh, rows // g, g, hp)[:, :, :t, :, :d]  # [B, K, T, G, H]
    return x.transpose(0, 2, 1, 3, 4).reshape(b, t, n, d)


def stat_to_rows(x: Float[Array, "B T N"], kh: int, tq: int) -> Float[Array, "B K 1 R"]:
    """Per-row statistics ``[B, T, N] -> [B, K, 1, Tp*G]`` (lane-dense)."""
    b, t, n = x.shape
    x = x.reshape(b, t, kh, n // kh).transpose(0, 2, 1, 3)  # [B, K, T, G]
    x = jnp.pad(x, [(0, 0), (0, 0), (0, round_up(t, tq) - t), (0, 0)])
    return x.reshape(b, kh, 1, -1)


def stat_from_rows(x: Float[Array, "B K 1 R"], t: int, n: int) -> Float[Array, "B T N"]:
    b, kh, _, rows = x.shape
    g = n // kh
    x = x.reshape(b, kh, rows // g, g)[:, :, :t]  # [B, K, T, G]
    return x.transpose(0, 2, 1, 3).reshape(b, t, n)


def to_keys(x: Float[Array, "B S K H"], block: int, hp: int) -> Float[Array, "B K Sp Hp"]:
    """``[B, S, K, H] -> [B, K, Sp, Hp]`` with ``Sp`` a multiple of ``block``."""
    s, d = x.shape[1], x.shape[3]
    x = jnp.pad(x, [(0, 0), (0, round_up(max(s, 1), block) - s), (0, 0), (0, hp - d)])
    return x.transpose(0, 2, 1, 3)


def from_keys(x: Float[Array, "B K Sp Hp"], s: int, d: int) -> Float[Array, "B S K H"]:
    return x[:, :, :s, :d].transpose(0, 2, 1, 3)


# ------------------------------------------------------------------------------------------------
# Schedules and shared kernel bodies.


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes every kernel of one call shares.

    Attributes:
      g: query heads per KV group ``G``.
      tq: tokens per query tile (``R = tq * G`` rows).
      bk: keys per key block.
      scale: logit scale.
    """

    g: int
    tq: int
    bk: int
    scale: float

    @property
    def rows(self) -> int:
        return self.tq * self.g


@dataclasses.dataclass(frozen=True)
class QSchedule:
    """Grid ``(B, K, tiles, steps)``: query tile outer, key blocks inner.

    Each function takes the four grid indices then the scalar-prefetch refs.

    Attributes:
      grid: the grid; ``steps`` may be a traced scalar (a dynamic grid bound).
      q_tile: the query tile of a step (its global index).
      kv_block: the key block whose keys a step masks against (meaningful when active).
      kv_fetch: the key block to hold in VMEM; equal to the previous step's when inactive, so
        an inactive step costs no copy.
      active: whether the step computes.
    """

    grid: tuple[int, int, int, int]
    q_tile: Callable
    kv_block: Callable
    kv_fetch: Callable
    active: Callable


@dataclasses.dataclass(frozen=True)
class KVSchedule:
    """Grid ``(B, K, outer, steps)`` (or ``(B, K, steps)``): key block outer, query tiles inner.

    Attributes:
      grid: the grid; its last entry may be a traced scalar (a dynamic grid bound).
      kv_block: the key block a step accumulates into.
      q_tile: the query tile to hold (repeats the previous one when inactive).
      active: whether the step computes.
      first, last: whether the step starts / ends its key block's run of steps.
    """

    grid: tuple[int, ...]
    kv_block: Callable
    q_tile: Callable
    active: Callable
    first: Callable
    last: Callable


# mask_fn(tok, key_pos, kv_block, extra_refs, transposed) -> bool array, where ``tok`` and
# ``key_pos`` are int32 arrays of the score block's shape ([R, bk], or [bk, R] transposed).
MaskFn = Callable[..., jax.Array]


def _row_tokens(shape: tuple[int, int], axis: int, g: int) -> jax.Array:
    """Tile-local token index ``row // G`` of every element of a score block."""
    r = lax.broadcasted_iota(jnp.int32, shape, axis)
    if g & (g - 1) == 0:
        return r >> (g.bit_length() - 1)
    # Exact for rows < 2**20: (r + 1/2) / G is never within f32 rounding of an integer.
    return ((r.astype(jnp.float32) + 0.5) * (1.0 / g)).astype(jnp.int32)


def _scores(q, k, geom: Geometry, mask_fn, extra_refs, tile, kv_block, transposed: bool):
    """Scaled, masked logits ``[R, bk]`` (``[bk, R]`` when ``transposed``) and the mask."""
    if transposed:
        s = lax.dot_general(k, q, NT_DIMS, preferred_element_type=jnp.float32)  # [bk, R]
        tok_axis, key_axis = 1, 0
    else:
        s = lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32)  # [R, bk]
        tok_axis, key_axis = 0, 1
    tok = tile * geom.tq + _row_tokens(s.shape, tok_axis, geom.g)
    key_pos = kv_block * geom.bk + lax.broadcasted_iota(jnp.int32, s.shape, key_axis)
    mask = mask_fn(tok, key_pos, kv_block, extra_refs, transposed)
    return jnp.where(mask, s * geom.scale, MASK_VALUE), mask


def _fwd_kernel(*refs, sched: QSchedule, geom: Geometry, mask_fn: MaskFn, n_scalar: int,
                n_extra: int):
    scalars = refs[:n_scalar]
    q_ref, k_ref, v_ref = refs[n_scalar:n_scalar + 3]
    extra = refs[n_scalar + 3:n_scalar + 3 + n_extra]
    o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[n_scalar + 3 + n_extra:]
    ids = tuple(pl.program_id(a) for a in range(4))
    step = ids[3]

    @pl.when(step == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(sched.active(*ids, *scalars))
    def _compute():
        tile, kv_block = sched.q_tile(*ids, *scalars), sched.kv_block(*ids, *scalars)
        s, mask = _scores(q_ref[...], k_ref[...], geom, mask_fn, extra, tile, kv_block, False)
        m_prev = m_scr[...]  # [R, 128], lane-replicated
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.where(mask, jnp.exp(s - m_next[:, :1]), 0.0)  # [R, bk]
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        pv = lax.dot_general(p.astype(v.dtype), v, NN_DIMS, preferred_element_type=jnp.float32)
        acc_scr[...] = acc_scr[...] * alpha[:, :1] + pv
        m_scr[...] = m_next

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        l = l_scr[...]
        seen = l > 0.0  # rows with no visible key: output 0, log-sum-exp -inf
        inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
        o_ref[...] = (acc_scr[...] * inv[:, :1]).astype(o_ref.dtype)
        lse = jnp.where(seen, m_scr[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        lse_ref[...] = lse.T[:1, :]  # [128, R] -> lane-dense [1, R]


def _stat_col(ref) -> jax.Array:
    """A ``[1, R]`` statistic block as an ``[R, 1]`` column."""
    return jnp.expand_dims(ref[0], -1)


def _finite(lse):
    # Empty rows carry -inf; their probabilities are masked to 0 anyway.
    return jnp.where(lse == -jnp.inf, 0.0, lse)


def _bwd_dq_kernel(*refs, sched: QSchedule, geom: Geometry, mask_fn: MaskFn, n_scalar: int,
                   n_extra: int):
    scalars = refs[:n_scalar]
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[n_scalar:n_scalar + 6]
    extra = refs[n_scalar + 6:n_scalar + 6 + n_extra]
    dq_ref, dq_scr = refs[n_scalar + 6 + n_extra:]
    ids = tuple(pl.program_id(a) for a in range(4))
    step = ids[3]

    @pl.when(step == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(sched.active(*ids, *scalars))
    def _compute():
        tile, kv_block = sched.q_tile(*ids, *scalars), sched.kv_block(*ids, *scalars)
        k = k_ref[...]
        s, mask = _scores(q_ref[...], k, geom, mask_fn, extra, tile, kv_block, False)
        p = jnp.where(mask, jnp.exp(s - _finite(_stat_col(lse_ref))), 0.0)  # [R, bk]
        v = v_ref[...]
        dp = lax.dot_general(do_ref[...].astype(v.dtype), v, NT_DIMS,
                             preferred_element_type=jnp.float32)  # [R, bk]
        ds = p * (dp - _stat_col(delta_ref))
        dq_scr[...] += lax.dot_general(ds.astype(k.dtype), k, NN_DIMS,
                                       preferred_element_type=jnp.float32)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * geom.scale).astype(dq_ref.dtype)


def _bwd_dkv_kernel(*refs, sched: KVSchedule, geom: Geometry, mask_fn: MaskFn, n_scalar: int,
                    n_extra: int, accumulate: bool):
    scalars = refs[:n_scalar]
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[n_scalar:n_scalar + 6]
    rest = refs[n_scalar + 6:]
    extra, rest = rest[:n_extra], rest[n_extra:]
    if accumulate:
        dk_in_ref, dv_in_ref, *rest = rest
    dk_ref, dv_ref, dk_scr, dv_scr = rest
    ids = tuple(pl.program_id(a) for a in range(len(sched.grid)))

    @pl.when(sched.first(*ids, *scalars))
    def _init():
        if accumulate:  # continue the sums an earlier call left in the aliased buffers
            dk_scr[...] = dk_in_ref[...].astype(jnp.float32)
            dv_scr[...] = dv_in_ref[...].astype(jnp.float32)
        else:
            dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
            dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(sched.active(*ids, *scalars))
    def _compute():
        tile, kv_block = sched.q_tile(*ids, *scalars), sched.kv_block(*ids, *scalars)
        q = q_ref[...]
        s, mask = _scores(q, k_ref[...], geom, mask_fn, extra, tile, kv_block, True)
        p = jnp.where(mask, jnp.exp(s - _finite(lse_ref[...])), 0.0)  # [bk, R]
        do = do_ref[...]
        dv_scr[...] += lax.dot_general(p.astype(do.dtype), do, NN_DIMS,
                                       preferred_element_type=jnp.float32)
        v = v_ref[...]
        dp = lax.dot_general(v, do.astype(v.dtype), NT_DIMS,
                             preferred_element_type=jnp.float32)  # [bk, R]
        # Scaled here, not at the end, so sums continued from an earlier call stay consistent.
        ds = p * (dp - delta_ref[...]) * geom.scale
        dk_scr[...] += lax.dot_general(ds.astype(q.dtype), q, NN_DIMS,
                                       preferred_element_type=jnp.float32)

    @pl.when(sched.last(*ids, *scalars))
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers shared by the branches.


def _compiler_params(n_parallel: int, n_dims: int) -> pltpu.CompilerParams:
    sem = ("parallel",) * n_parallel + ("arbitrary",) * (n_dims - n_parallel)
    return pltpu.CompilerParams(dimension_semantics=sem)


def flash_fwd(
    q_rows, k_keys, v_keys, *, sched: QSchedule, geom: Geometry, mask_fn: MaskFn, name: str,
    scalars: Sequence[jax.Array] = (), extras: Sequence[tuple[jax.Array, pl.BlockSpec]] = (),
    interpret: Any = None,
):
    """Forward over one schedule: ``(o_rows [B, K, tiles*R, Hv], lse [B, K, 1, tiles*R])``.

    Outputs cover the schedule's tiles ``0..tiles-1`` (grid axis 2), while queries are read at
    ``sched.q_tile``, so a long sequence can be split into several calls.
    """
    b, kh, _, hp = q_rows.shape
    hvp = v_keys.shape[-1]
    r, bk = geom.rows, geom.bk
    n_tiles = sched.grid[2]

    def q_map(bi, hi, i, j, *s):
        return bi, hi, sched.q_tile(bi, hi, i, j, *s), 0

    def kv_map(bi, hi, i, j, *s):
        return bi, hi, sched.kv_fetch(bi, hi, i, j, *s), 0

    in_specs = [
        pl.BlockSpec((None, None, r, hp), q_map),
        pl.BlockSpec((None, None, bk, hp), kv_map),
        pl.BlockSpec((None, None, bk, hvp), kv_map),
        *[spec for _, spec in extras],
    ]
    out_specs = [
        pl.BlockSpec((None, None, r, hvp), lambda bi, hi, i, j, *s: (bi, hi, i, 0)),
        pl.BlockSpec((None, None, 1, r), lambda bi, hi, i, j, *s: (bi, hi, 0, i)),
    ]
    kernel = functools.partial(_fwd_kernel, sched=sched, geom=geom, mask_fn=mask_fn,
                               n_scalar=len(scalars), n_extra=len(extras))
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars), grid=sched.grid, in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((r, NUM_LANES), jnp.float32),
                            pltpu.VMEM((r, NUM_LANES), jnp.float32),
                            pltpu.VMEM((r, hvp), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, kh, n_tiles * r, hvp), q_rows.dtype),
                   jax.ShapeDtypeStruct((b, kh, 1, n_tiles * r), jnp.float32)],
        compiler_params=_compiler_params(3, 4),
        interpret=interpret,
        name=f"{name}_fwd",
    )(*scalars, q_rows, k_keys, v_keys, *[x for x, _ in extras])


def flash_bwd_dq(
    q_rows, k_keys, v_keys, do_rows, lse, delta, *, sched: QSchedule, geom: Geometry,
    mask_fn: MaskFn, name: str, scalars: Sequence[jax.Array] = (),
    extras: Sequence[tuple[jax.Array, pl.BlockSpec]] = (), interpret: Any = None,
):
    """dQ over one query-outer schedule: ``[B, K, tiles*R, Hp]`` (scale applied)."""
    b, kh, _, hp = q_rows.shape
    hvp = v_keys.shape[-1]
    r, bk = geom.rows, geom.bk
    n_tiles = sched.grid[2]

    def q_map(bi, hi, i, j, *s):
        return bi, hi, sched.q_tile(bi, hi, i, j, *s), 0

    def stat_map(bi, hi, i, j, *s):
        return bi, hi, 0, sched.q_tile(bi, hi, i, j, *s)

    def kv_map(bi, hi, i, j, *s):
        return bi, hi, sched.kv_fetch(bi, hi, i, j, *s), 0

    in_specs = [
        pl.BlockSpec((None, None, r, hp), q_map),
        pl.BlockSpec((None, None, bk, hp), kv_map),
        pl.BlockSpec((None, None, bk, hvp), kv_map),
        pl.BlockSpec((None, None, r, hvp), q_map),
        pl.BlockSpec((None, None, 1, r), stat_map),
        pl.BlockSpec((None, None, 1, r), stat_map),
        *[spec for _, spec in extras],
    ]
    kernel = functools.partial(_bwd_dq_kernel, sched=sched, geom=geom, mask_fn=mask_fn,
                               n_scalar=len(scalars), n_extra=len(extras))
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars), grid=sched.grid, in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, r, hp), lambda bi, hi, i, j, *s: (bi, hi, i, 0)),
            scratch_shapes=[pltpu.VMEM((r, hp), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((b, kh, n_tiles * r, hp), q_rows.dtype),
        compiler_params=_compiler_params(3, 4),
        interpret=interpret,
        name=f"{name}_bwd_dq",
    )(*scalars, q_rows, k_keys, v_keys, do_rows, lse, delta, *[x for x, _ in extras])


def flash_bwd_dkv(
    q_rows, k_keys, v_keys, do_rows, lse, delta, *, sched: KVSchedule, geom: Geometry,
    mask_fn: MaskFn, name: str, scalars: Sequence[jax.Array] = (),
    extras: Sequence[tuple[jax.Array, pl.BlockSpec]] = (),
    accumulate_into: tuple[jax.Array, jax.Array] | None = None, interpret: Any = None,
):
    """dK, dV over one key-outer schedule, each ``[B, K, Sp, H(v)p]`` (scale applied).

    With ``accumulate_into=(dk, dv)`` (f32), the kernel adds its sums to those arrays in place
    (aliased), so a schedule too long for scalar memory can be split over several calls.
    """
    b, kh, _, hp = q_rows.shape
    sp, hvp = k_keys.shape[2], v_keys.shape[-1]
    r, bk = geom.rows, geom.bk

    def q_map(*a):
        return a[0], a[1], sched.q_tile(*a), 0

    def stat_map(*a):
        return a[0], a[1], 0, sched.q_tile(*a)

    def kv_map(*a):
        return a[0], a[1], sched.kv_block(*a), 0

    in_specs = [
        pl.BlockSpec((None, None, r, hp), q_map),
        pl.BlockSpec((None, None, bk, hp), kv_map),
        pl.BlockSpec((None, None, bk, hvp), kv_map),
        pl.BlockSpec((None, None, r, hvp), q_map),
        pl.BlockSpec((None, None, 1, r), stat_map),
        pl.BlockSpec((None, None, 1, r), stat_map),
        *[spec for _, spec in extras],
    ]
    args = [*scalars, q_rows, k_keys, v_keys, do_rows, lse, delta, *[x for x, _ in extras]]
    aliases = {}
    if accumulate_into is not None:
        in_specs += [pl.BlockSpec((None, None, bk, hp), kv_map),
                     pl.BlockSpec((None, None, bk, hvp), kv_map)]
        aliases = {len(args): 0, len(args) + 1: 1}
        args += list(accumulate_into)
        out_dtype = jnp.float32
    else:
        out_dtype = k_keys.dtype
    kernel = functools.partial(_bwd_dkv_kernel, sched=sched, geom=geom, mask_fn=mask_fn,
                               n_scalar=len(scalars), n_extra=len(extras),
                               accumulate=accumulate_into is not None)
    n_dims = len(sched.grid)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars), grid=sched.grid, in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, None, bk, hp), kv_map),
                       pl.BlockSpec((None, None, bk, hvp), kv_map)],
            scratch_shapes=[pltpu.VMEM((bk, hp), jnp.float32),
                            pltpu.VMEM((bk, hvp), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, kh, sp, hp), out_dtype),
                   jax.ShapeDtypeStruct((b, kh, sp, hvp), out_dtype)],
        input_output_aliases=aliases,
        compiler_params=_compiler_params(2 if accumulate_into is not None else 3, n_dims),
        interpret=interpret,
        name=f"{name}_bwd_dkv",
    )(*args)


def settle(out, interpret):
    """Returns ``out`` once computed when the kernels are interpreted (a no-op under tracing).

    The TPU interpreter runs a kernel through host callbacks that dispatch more XLA work on the
    CPU client. If the caller dispatches a computation that depends on an interpreted kernel
    still in flight, the callbacks' work can queue behind it and both wait forever; finishing
    each interpreted call before returning rules that out.
    """
    if interpret is None or interpret is False:
        return out
    return jax.block_until_ready(out)


def bwd_delta(o_rows, do_rows, dlse_rows):
    """``delta = rowsum(dO * O) - dlse`` as ``[B, K, 1, rows]``.

    With the log-sum-exp an output too, ``dL/ds = p * (dp - rowsum(dO * O) + dlse)``.
    """
    delta = jnp.sum(o_rows.astype(jnp.float32) * do_rows.astype(jnp.float32), axis=-1)
    return delta[:, :, None, :] - dlse_rows


# ------------------------------------------------------------------------------------------------
# Branches whose schedule is fixed by shapes alone (sliding window, compressed tokens).


@dataclasses.dataclass(frozen=True)
class BandBlockSizes:
    """Tile sizes of a statically scheduled branch.

    Attributes:
      min_rows: least query rows per tile (``tq * G``, rounded up to a multiple of 128).
      block_k: keys per key block (a multiple of 128).
    """

    min_rows: int = 128
    block_k: int = 128

    def __post_init__(self):
        if self.min_rows < 1:
            raise ValueError(f"{self.min_rows=} must be positive")
        if self.block_k < NUM_LANES or self.block_k % NUM_LANES:
            raise ValueError(f"{self.block_k=} must be a positive multiple of {NUM_LANES}")


def prepare_rows(q, k, v, block_sizes: BandBlockSizes, scale: float | None):
    """Kernel layout of ``q [B,T,N,Dk]``, ``k [B,S,K,Dk]``, ``v [B,S,K,Dv]`` and its geometry.

    Returns:
      ``(q_rows [B,K,R,Hp], k_keys [B,K,Sp,Hp], v_keys [B,K,Sp,Hvp], geom)``.
    """
    n, dk = q.shape[2], q.shape[3]
    kh, dv = k.shape[2], v.shape[-1]
    g = n // kh
    tq = tile_tokens(g, block_sizes.min_rows)
    geom = Geometry(g=g, tq=tq, bk=block_sizes.block_k, scale=default_scale(dk, scale))
    hp, hvp = pad_head_dim(dk), pad_head_dim(dv)
    q_rows = to_rows(q, kh, tq, hp)
    k_keys = to_keys(k, block_sizes.block_k, hp)
    v_keys = to_keys(v, block_sizes.block_k, hvp)
    return q_rows, k_keys, v_keys, geom


# A band config is a hashable (frozen dataclass) with ``name``, ``geom``, ``interpret`` and the
# methods ``mask() -> MaskFn``, ``q_schedule(b, kh) -> QSchedule`` and
# ``kv_schedule(b, kh) -> KVSchedule``; the branch supplies those, this part is shared.


# Jitted with the static config so that repeated calls (the primal and the VJP's forward, or
# eager calls in tests) reuse one compiled kernel.
@functools.partial(jax.jit, static_argnums=3)
def _band_fwd_rows(q_rows, k_keys, v_keys, cfg):
    b, kh = q_rows.shape[:2]
    return flash_fwd(q_rows, k_keys, v_keys, sched=cfg.q_schedule(b, kh), geom=cfg.geom,
                     mask_fn=cfg.mask(), name=cfg.name, interpret=cfg.interpret)


@functools.partial(jax.jit, static_argnums=0)
def _band_bwd_rows(cfg, res, cts):
    q_rows, k_keys, v_keys, o_rows, lse = res
    do_rows, dlse = cts
    b, kh = q_rows.shape[:2]
    delta = bwd_delta(o_rows, do_rows, dlse)
    common = dict(geom=cfg.geom, mask_fn=cfg.mask(), name=cfg.name, interpret=cfg.interpret)
    dq = flash_bwd_dq(q_rows, k_keys, v_keys, do_rows, lse, delta,
                      sched=cfg.q_schedule(b, kh), **common)
    dk, dv = flash_bwd_dkv(q_rows, k_keys, v_keys, do_rows, lse, delta,
                           sched=cfg.kv_schedule(b, kh), **common)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def band_attention(q_rows, k_keys, v_keys, cfg):
    """``(o_rows, lse)`` of a statically scheduled branch, differentiable in q, k and v."""
    return settle(_band_fwd_rows(q_rows, k_keys, v_keys, cfg), cfg.interpret)


def _band_attention_fwd(q_rows, k_keys, v_keys, cfg):
    o_rows, lse = settle(_band_fwd_rows(q_rows, k_keys, v_keys, cfg), cfg.interpret)
    return (o_rows, lse), (q_rows, k_keys, v_keys, o_rows, lse)


def _band_attention_bwd(cfg, res, cts):
    return settle(_band_bwd_rows(cfg, res, cts), cfg.interpret)


band_attention.defvjp(_band_attention_fwd, _band_attention_bwd)
