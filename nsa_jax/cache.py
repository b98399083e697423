"""The NSA KV cache and the decode-time attention of the NNX layers.

:class:`NSACache` is a pytree of fixed-size buffers, so a decode step has one static shape and
is compiled once for a whole generation. Per layer it holds:

- ``k[name]``, ``v[name]``: raw keys ``[B, S_name, K, Dk]`` and values ``[B, S_name, K, Dv]`` of
  each key branch the layer's ``kv_mode`` has (``"cmp"``, ``"slc"``, ``"swa"`` for
  ``"separate"``; ``"shared"``; ``"dense"`` for the dense and sliding-window baselines). Position
  ``p`` lives in slot ``p % S_name``. The selected, shared and dense sets span the whole sequence
  (``S_name = S``); with separate keys the compressed branch's set only needs its last ``l``
  tokens and the window's its last ``w``, so those two are ring buffers of
  :func:`ring_size` slots, which keeps a separate-KV cache near the size of a shared one.
- ``k_cmp``, ``v_cmp``: the compressed tokens completed so far ``[B, C, K, D]`` (slot ``i`` is
  compressed token ``i``); empty (``C = 0``) for the baselines.
- ``lengths``: ``int32 [B]`` tokens in the cache per sequence; sequences may differ.

Appending the token at position ``t`` writes its raw keys and values at position ``t``; when that
completes a compressed block (``t + 1 >= l`` and ``(t + 1 - l) % d == 0``) it runs ``phi`` on
that one block and writes compressed token ``(t + 1 - l) // d``. Slots past a sequence's length
hold stale values that are masked and overwritten before they become visible, which is what
lets a right-padded batch of prompts share one prefill.
"""

from __future__ import annotations

import importlib
import math
import warnings

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

from nsa_jax.compression import compress
from nsa_jax.config import NSAConfig, num_cmp_tokens
from pallas_kernels.common import HIGHEST, default_scale, masked_attention
from pallas_kernels.decode import reference as decode_reference

# Raw caches are padded to a multiple of this (and of l'), so kernels tile them evenly.
CACHE_ALIGN = 64

# Decode-attention implementations by name; strings are imported on first use. Names not listed
# here (training-only backends) decode with the reference.
_DECODE_IMPLS: dict[str, object] = {
    "reference": decode_reference.decode_attention,
    "pallas_triton": "pallas_kernels.decode.gpu:decode_attention",
}
_DECODE_DEFAULTS: dict[str, str] = {"gpu": "pallas_triton"}


def ring_size(branch: str, max_len: int, config: NSAConfig) -> int:
    """Slots of branch ``branch``'s raw buffer in an NSA cache of ``max_len`` (aligned) tokens.

    The compressed branch reads only the ``l`` newest tokens and the window branch the ``w``
    newest, so with separate keys their buffers are rings of ``l`` (resp. ``w``) slots rounded up
    to the cache alignment; other branches, and rings that would not be shorter, span
    ``max_len``.
    """
    need = {"cmp": config.cmp_block_size, "swa": config.window_size}.get(branch)
    if need is None:
        return max_len
    align = math.lcm(config.slc_block_size, CACHE_ALIGN)
    return min(max_len, -(-need // align) * align)


@struct.dataclass
class NSACache:
    """Decode state of one attention layer (see the module docstring for the layout).

    Attributes:
      k: ``{branch: [B, S, K, Dk]}`` raw keys.
      v: ``{branch: [B, S, K, Dv]}`` raw values.
      k_cmp: ``[B, C, K, Dk]`` compressed keys.
      v_cmp: ``[B, C, K, Dv]`` compressed values.
      lengths: ``int32 [B]`` tokens cached per sequence.
    """

    k: dict[str, Array]
    v: dict[str, Array]
    k_cmp: Array
    v_cmp: Array
    lengths: Array

    @classmethod
    def create(
        cls,
        batch_size: int,
        max_len: int,
        *,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        branches: tuple[str, ...],
        config: NSAConfig | None = None,
        dtype=jnp.float32,
    ) -> NSACache:
        """An empty cache for ``max_len`` tokens per sequence.

        Args:
          batch_size: ``B``.
          max_len: tokens each sequence may reach, prompt included. NSA caches round it up to a
            multiple of ``l'`` and of :data:`CACHE_ALIGN`.
          num_kv_heads, head_dim, v_head_dim: ``K``, ``Dk``, ``Dv`` (default ``Dk``).
          branches: names of the raw key/value sets, e.g. ``("cmp", "slc", "swa")``.
          config: the layer's NSA config; ``None`` for a dense or window baseline (no
            compressed tokens).
          dtype: storage dtype (the layer's compute dtype).
        """
        for name, value in (("batch_size", batch_size), ("max_len", max_len),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if not branches:
            raise ValueError("branches must name at least one key/value set")
        dv = v_head_dim or head_dim
        b, kh = batch_size, num_kv_heads
        sizes = {name: max_len for name in branches}
        c = 0
        if config is not None:
            align = math.lcm(config.slc_block_size, CACHE_ALIGN)
            s = -(-max(max_len, config.cmp_block_size) // align) * align
            c = -(-max(1, num_cmp_tokens(s, config.cmp_block_size, config.cmp_stride))
                  // CACHE_ALIGN) * CACHE_ALIGN
            sizes = {name: ring_size(name, s, config) for name in branches}
        return cls(
            k={name: jnp.zeros((b, sizes[name], kh, head_dim), dtype) for name in branches},
            v={name: jnp.zeros((b, sizes[name], kh, dv), dtype) for name in branches},
            k_cmp=jnp.zeros((b, c, kh, head_dim), dtype),
            v_cmp=jnp.zeros((b, c, kh, dv), dtype),
            lengths=jnp.zeros((b,), jnp.int32),
        )

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        """``S``, the longest sequence the cache holds (the size of its full-length buffers)."""
        return max(x.shape[1] for x in self.k.values())

    def branch(self, name: str) -> tuple[Array, Array]:
        """Raw ``(k, v)`` of branch ``name``, or the shared set when the layer shares one."""
        key = name if name in self.k else "shared"
        return self.k[key], self.v[key]


def check_prefill(cache: NSACache, x: jax.Array, lengths) -> Int[Array, " B"]:
    """Validates a prefill of ``x [B, T, ...]`` into an empty ``cache``; returns the lengths."""
    b, t = x.shape[:2]
    if b != cache.batch_size:
        raise ValueError(f"batch sizes differ: x.shape={tuple(x.shape)} but the cache holds "
                         f"{cache.batch_size} sequences")
    if t < 1 or t > cache.max_len:
        raise ValueError(f"prompt length T={t} (x.shape={tuple(x.shape)}) must be in "
                         f"[1, {cache.max_len}], the cache's max_len")
    if lengths is None:
        return jnp.full((b,), t, jnp.int32)
    lengths = jnp.asarray(lengths)
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers of shape ({b},), got shape "
                         f"{tuple(lengths.shape)} dtype {lengths.dtype}")
    if not isinstance(lengths, jax.core.Tracer):
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > t:
            raise ValueError(f"lengths must lie in [1, T={t}], got min={lo}, max={hi}")
    return lengths.astype(jnp.int32)


def check_decode(cache: NSACache, x: jax.Array) -> None:
    """Validates a decode input ``x [B, ...]`` against ``cache``."""
    if x.shape[0] != cache.batch_size:
        raise ValueError(f"batch sizes differ: x.shape={tuple(x.shape)} but the cache holds "
                         f"{cache.batch_size} sequences")


def write_prefill(
    cache: NSACache,
    kv: dict[str, tuple[Array, Array]],
    lengths: Int[Array, " B"],
    k_cmp: Array | None = None,
    v_cmp: Array | None = None,
) -> NSACache:
    """Stores a prompt's raw ``{branch: (k [B, T, K, Dk], v)}`` and its compressed tokens.

    Slots past each sequence's length receive the padding's keys; they stay masked until
    overwritten. A ring buffer shorter than the prompt keeps each sequence's own last tokens.
    """
    def put(buf, x):
        return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), (0,) * buf.ndim)

    def put_raw(buf, x):  # x [B, T, K, D]
        size, t = buf.shape[1], x.shape[1]
        if size >= t:
            return put(buf, x)
        # Slot r holds the latest position p < length with p % size == r.
        last = lengths[:, None] - 1  # [B, 1]
        pos = last - jnp.mod(last - jnp.arange(size)[None, :], size)  # [B, size]
        taken = x[jnp.arange(x.shape[0])[:, None], jnp.maximum(pos, 0)]  # [B, size, K, D]
        return taken.astype(buf.dtype)

    k = {name: put_raw(cache.k[name], kv[name][0]) for name in cache.k}
    v = {name: put_raw(cache.v[name], kv[name][1]) for name in cache.v}
    new_k_cmp, new_v_cmp = cache.k_cmp, cache.v_cmp
    if k_cmp is not None and k_cmp.shape[1]:
        new_k_cmp, new_v_cmp = put(new_k_cmp, k_cmp), put(new_v_cmp, v_cmp)
    return cache.replace(k=k, v=v, k_cmp=new_k_cmp, v_cmp=new_v_cmp, lengths=lengths)


def append(
    cache: NSACache,
    kv: dict[str, tuple[Float[Array, "B K Dk"], Float[Array, "B K Dv"]]],
    *,
    cmp_params: dict | None = None,
    config: NSAConfig | None = None,
) -> NSACache:
    """Appends one token per sequence, and a compressed token where a block completes.

    Args:
      cache: the layer's cache; its ``lengths`` are the new tokens' positions.
      kv: ``{branch: (k [B, K, Dk], v [B, K, Dv])}`` of the new tokens (RoPE applied).
      cmp_params: ``phi``'s ``{"k": ..., "v": ...}`` parameters (NSA layers).
      config: the NSA config; ``None`` for a baseline layer.

    Returns:
      The cache with the tokens written and ``lengths + 1``.
    """
    b = cache.batch_size
    rows = jnp.arange(b)
    def put_token(buf, x):
        # Full-length buffers drop a token past max_len (the caller sized the cache); ring
        # buffers overwrite their oldest slot.
        slot = cache.lengths if buf.shape[1] == cache.max_len else cache.lengths % buf.shape[1]
        return buf.at[rows, slot].set(x.astype(buf.dtype), mode="drop")

    k = {n: put_token(cache.k[n], kv[n][0]) for n in cache.k}
    v = {n: put_token(cache.v[n], kv[n][1]) for n in cache.v}
    lengths = cache.lengths + 1
    cache = cache.replace(k=k, v=v, lengths=lengths)
    if config is None:
        return cache
    size, stride = config.cmp_block_size, config.cmp_stride
    raw_k, raw_v = cache.branch("cmp")
    pos = jnp.maximum(lengths - size, 0)[:, None] + jnp.arange(size)  # [B, l] the block

    def block(x):  # [B, S_cmp, K, D] -> [B, l, K, D]
        return x[rows[:, None], pos % x.shape[1]]

    params = cmp_params or {"k": {}, "v": {}}
    geom = dict(kind=config.cmp_kind, block_size=size, stride=stride)
    new_k = compress(block(raw_k), params["k"], **geom)[:, 0]  # [B, K, Dk]
    new_v = compress(block(raw_v), params["v"], **geom)[:, 0]  # [B, K, Dv]
    due = (lengths >= size) & ((lengths - size) % stride == 0)  # [B] a block completes now
    slot = jnp.clip((lengths - size) // stride, 0, cache.k_cmp.shape[1] - 1)

    def put(buf, new):
        old = buf[rows, slot]  # [B, K, D]
        return buf.at[rows, slot].set(jnp.where(due[:, None, None], new.astype(buf.dtype), old))

    return cache.replace(k_cmp=put(cache.k_cmp, new_k), v_cmp=put(cache.v_cmp, new_v))


def _decode_chain(implementation: str | None) -> list:
    """Decode implementations to try in order; the reference always comes last."""
    name = implementation
    if name is None:
        name = _DECODE_DEFAULTS.get(jax.default_backend(), "reference")
    chain = []
    entry = _DECODE_IMPLS.get(name)
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module_name), attr)
            _DECODE_IMPLS[name] = entry
        except ImportError as err:
            warnings.warn(f"NSA decode implementation {name!r} unavailable ({err}); "
                          "using the reference", stacklevel=3)
            entry = None
    if entry is not None and entry is not decode_reference.decode_attention:
        chain.append(entry)
    chain.append(decode_reference.decode_attention)
    return chain


def nsa_decode_attention(
    q: Float[Array, "B N Dk"],
    gates: Float[Array, "B N 3"],
    cache: NSACache,
    *,
    config: NSAConfig,
    implementation: str | None = None,
) -> Float[Array, "B N Dv"]:
    """NSA output of each sequence's newest query (already appended to ``cache``).

    ``implementation`` picks the decode kernel by backend name (``"pallas_triton"`` on GPU by
    default, ``"reference"`` for the XLA path); an implementation that raises
    ``NotImplementedError`` for the shapes falls back to the reference.
    """
    k_slc, v_slc = cache.branch("slc")
    k_swa, v_swa = cache.branch("swa")
    args = (q, cache.k_cmp, cache.v_cmp, k_slc, v_slc, k_swa, v_swa, gates, cache.lengths)
    kw = dict(cmp_block_size=config.cmp_block_size, cmp_stride=config.cmp_stride,
              slc_block_size=config.slc_block_size, top_n=config.slc_top_n,
              window_size=config.window_size, scale=config.softmax_scale)
    chain = _decode_chain(implementation)
    for fn in chain:
        try:
            return fn(*args, **kw)[0]
        except NotImplementedError:
            if fn is chain[-1]:
                raise
    raise RuntimeError("unreachable: the reference decode never declines")


def dense_decode_attention(
    q: Float[Array, "B N Dk"],
    cache: NSACache,
    *,
    window_size: int | None = None,
) -> Float[Array, "B N Dv"]:
    """Causal (optionally windowed) attention of each sequence's newest query over its cache."""
    k, v = cache.k["dense"], cache.v["dense"]
    b, n, dk = q.shape
    s_len, kh, dv = k.shape[1], k.shape[2], v.shape[-1]
    qg = q.astype(jnp.float32).reshape(b, kh, n // kh, dk)  # [B, K, G, Dk]
    s = jnp.einsum("bkgd,bskd->bkgs", qg, k.astype(jnp.float32), precision=HIGHEST)
    s = s * default_scale(dk, None)  # [B, K, G, S]
    t = cache.lengths[:, None] - 1  # [B, 1]
    pos = jnp.arange(s_len, dtype=jnp.int32)[None, :]
    mask = pos <= t
    if window_size is not None:
        mask = mask & (pos > t - window_size)
    o, _ = masked_attention(s, mask[:, None, None, :], v.astype(jnp.float32), "bkgs,bskd->bkgd")
    return o.reshape(b, n, dv).astype(q.dtype)
