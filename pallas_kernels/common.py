"""Pieces shared by the kernels and their pure-jnp twins: query chunking, a masked softmax,
the default scale and the int32 extent check of the GPU kernels.

The twins never build a ``[T, T]`` array: they walk the queries in chunks (``lax.map`` over a
rematerialised body), so memory is ``O(chunk * keys_per_query)`` in the forward and the
backward alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

# Masked logits get this instead of -inf, so no inf - inf ever produces a NaN.
MASK_VALUE = -1e30
HIGHEST = jax.lax.Precision.HIGHEST

# Elements of the largest per-chunk intermediate the twins aim for (f32: 256 MiB).
DEFAULT_CHUNK_BUDGET = 1 << 26
# The name of the cuDNN compressed path's shifted copy of the queries (``[B, R*d, N, Dk]``,
# ``compressed.gpu.residue_causal_rows``) for ``jax.checkpoint`` policies.
QUERY_ROWS_NAME = "nsa_cmp_query_rows"


INT32_LIMIT = 1 << 31
# exp(x) = 2 ** (x * LOG2E): the kernels work in base 2 (one ex2 instruction per exponential).
LOG2E = math.log2(math.e)


def _check_int32(what: str, max_elements: int, bound: str, shapes) -> None:
    for name, shape in shapes.items():
        if math.prod(shape) > max_elements:
            raise NotImplementedError(
                f"{what}: {name} of shape {tuple(shape)} has {math.prod(shape)} elements, "
                f"past the int32 offsets of the Triton kernels ({bound})")


def check_int32_extent(what: str, **shapes: tuple[int, ...]) -> None:
    """``NotImplementedError`` (the registry then falls back to the reference) when an array
    the Pallas-Triton kernels address, as padded for them, holds ``2**31`` or more elements:
    Triton computes element offsets in int32."""
    _check_int32(what, INT32_LIMIT - 1, "< 2**31", shapes)


def check_int32_offsets(what: str, **shapes: tuple[int, ...]) -> None:
    """``check_int32_extent`` for kernels that form no offset past an array's last element
    (every load and store in range, none masked past the end): the largest offset is then
    ``n - 1``, so an array of up to ``2**31`` elements is addressable; more are refused."""
    _check_int32(what, INT32_LIMIT, "at most 2**31", shapes)


def combine_outputs(gates, o_cmp, o_slc, o_swa):
    """NSA's gated sum ``sum_b gates[..., b] * o_b`` (gates ``[..., 3]`` in the order cmp, slc,
    swa), accumulated in f32 and returned in ``o_cmp.dtype``."""
    g = gates.astype(jnp.float32)[..., None]  # [..., 3, 1]
    out = (g[..., 0, :] * o_cmp.astype(jnp.float32) + g[..., 1, :] * o_slc.astype(jnp.float32)
           + g[..., 2, :] * o_swa.astype(jnp.float32))
    return out.astype(o_cmp.dtype)


def rows_to_every_query(rows, first: int, t: int):
    """``[B, T, ...]`` per-query outputs from ``rows [B, R, ...]`` holding those of queries
    ``first`` on (row ``j`` is query ``first + j``'s, ``R >= T - first``, later rows ignored);
    the queries before ``first`` get 0."""
    rows = rows[:, : t - first] if rows.shape[1] != t - first else rows
    if not first:
        return rows
    return jnp.pad(rows, [(0, 0), (first, 0)] + [(0, 0)] * (rows.ndim - 2))


def default_scale(head_dim: int, scale: float | None) -> float:
    """``1/sqrt(Dk)`` unless the caller gave a scale."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def auto_chunk_size(seq_len: int, elems_per_query: int, budget: int = DEFAULT_CHUNK_BUDGET) -> int:
    """Largest power-of-two query chunk whose intermediate stays within ``budget`` elements."""
    chunk = max(1, budget // max(1, elems_per_query))
    chunk = 1 << (chunk.bit_length() - 1)
    return max(1, min(chunk, seq_len))


def map_query_chunks(
    body: Callable[..., tuple[jax.Array, ...]],
    seq_len: int,
    chunk_size: int,
    *per_query: jax.Array,
) -> tuple[jax.Array, ...]:
    """Runs ``body(t0, *chunks)`` over query chunks and stitches the outputs back together.

    Args:
      body: ``(t0, *chunks) -> tuple of [B, c, ...]`` arrays, where ``t0`` is the first query
        position of the chunk (a traced int32) and each chunk is ``[B, c, ...]``.
      seq_len: ``T``, the length of axis 1 of every array in ``per_query``.
      chunk_size: ``c``; the last chunk is padded with zeros and the padding dropped again.
      *per_query: arrays laid out ``[B, T, ...]``.

    Returns:
      The body's outputs, each ``[B, T, ...]``.
    """
    c = max(1, min(chunk_size, seq_len))
    n_chunks = -(-seq_len // c)
    pad = n_chunks * c - seq_len

    def split(x):  # [B, T, ...] -> [n_chunks, B, c, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(x.shape[0], n_chunks, c, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def merge(y):  # [n_chunks, B, c, ...] -> [B, T, ...]
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape(y.shape[0], n_chunks * c, *y.shape[3:])[:, :seq_len]

    if n_chunks == 1:
        outs = body(jnp.int32(0), *[jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
                                    for x in per_query])
        return tuple(y[:, :seq_len] for y in outs)

    starts = jnp.arange(n_chunks, dtype=jnp.int32) * c
    step = jax.checkpoint(lambda args: body(args[0], *args[1:]))
    outs = jax.lax.map(step, (starts, *[split(x) for x in per_query]))
    return tuple(merge(y) for y in outs)


def masked_attention(
    s: jax.Array, mask: jax.Array, v: jax.Array, v_spec: str
) -> tuple[jax.Array, jax.Array]:
    """Softmax over the last axis of ``s`` restricted to ``mask``, then a weighted sum of ``v``.

    Rows with nothing visible give output 0 and log-sum-exp ``-inf``, with finite gradients.

    Args:
      s: f32 scaled logits ``[..., S]``.
      mask: bool, broadcastable to ``s``.
      v: values, contracted with the probabilities by ``einsum(f"{s_spec},{v_spec}")``.
      v_spec: einsum spec ``"<s axes>,<v axes>-><out axes>"``.

    Returns:
      ``(o, lse)``: ``o`` from the einsum (f32) and ``lse`` of shape ``s.shape[:-1]``.
    """
    s = jnp.where(mask, s, MASK_VALUE)
    # The shift cancels out of the softmax, so it carries no gradient.
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    has_any = denom > 0
    p = p / jnp.where(has_any, denom, 1.0)
    o = jnp.einsum(v_spec, p, v, precision=HIGHEST)
    lse = jnp.where(has_any, m + jnp.log(jnp.where(has_any, denom, 1.0)), -jnp.inf)
    return o, lse[..., 0]
