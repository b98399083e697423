"""Flax NNX layers: the NSA attention layer, a dense/window baseline, and a Linen bridge.

``NativeSparseAttention`` reads like the paper: project queries, per-branch keys and values,
rotate queries and keys (RoPE), compute three sigmoid gates per head from the layer input, run
:func:`nsa_jax.nsa_attention` (kernels or reference, chosen by the registry), project out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jaxtyping import Array, Float, Int

from nsa_jax.cache import (
    NSACache,
    append,
    check_decode,
    check_prefill,
    dense_decode_attention,
    nsa_decode_attention,
    write_prefill,
)
from nsa_jax.compression import init_compression_params
from nsa_jax.config import NSAConfig
from nsa_jax.ops import nsa_attention
from nsa_jax.rope import apply_rope

BRANCHES = ("cmp", "slc", "swa")


def default_positions(x: jax.Array) -> Int[Array, "B T"]:
    """``[0, 1, ..., T-1]`` for every batch entry."""
    b, t = x.shape[:2]
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


class Compressor(nnx.Module):
    """Parameters of ``phi`` for keys and values, one set per KV head."""

    def __init__(self, config: NSAConfig, num_kv_heads: int, k_dim: int, v_dim: int, *,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kind = config.cmp_kind
        self.names: dict[str, tuple[str, ...]] = {}
        for part, dim in (("k", k_dim), ("v", v_dim)):
            params = init_compression_params(
                rngs.params(), kind=config.cmp_kind, num_kv_heads=num_kv_heads,
                block_size=config.cmp_block_size, head_dim=dim, hidden=config.cmp_mlp_hidden,
                dtype=param_dtype,
            )
            self.names[part] = tuple(sorted(params))
            for name, value in params.items():
                setattr(self, f"{part}_{name}", nnx.Param(value))

    def params(self) -> dict:
        """The ``{"k": {...}, "v": {...}}`` pytree that :func:`nsa_attention` takes."""
        return {part: {n: getattr(self, f"{part}_{n}")[...] for n in names}
                for part, names in self.names.items()}


class NativeSparseAttention(nnx.Module):
    """NSA self-attention for ``[B, T, D]`` inputs (Flax NNX).

    Args:
      d_model: input and output width ``D``.
      num_heads: query heads ``N``.
      num_kv_heads: key/value heads ``K`` (``N % K == 0``; ``G = N/K`` heads share a selection).
      head_dim: ``Dk``.
      v_head_dim: ``Dv`` (default ``Dk``).
      config: the NSA block sizes, top-n, window, compression kind and ``kv_mode``.
      rope_theta: RoPE base; ``None`` disables RoPE.
      implementation: NSA backend name (``None``: the platform default).
      dtype: compute dtype (``None``: the input's).
      param_dtype: parameter storage dtype.
      rngs: NNX random streams.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 v_head_dim: int | None = None, config: NSAConfig = NSAConfig(),
                 rope_theta: float | None = 10_000.0, implementation: str | None = None,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        self.config = config
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim or head_dim
        self.rope_theta = rope_theta
        self.implementation = implementation
        self.dtype = dtype
        self.kv_branches = BRANCHES if config.kv_mode == "separate" else ("shared",)
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d_model, num_heads * head_dim, **lin)
        kv_width = num_kv_heads * (head_dim + self.v_head_dim)
        self.kv_proj = nnx.Linear(d_model, len(self.kv_branches) * kv_width, **lin)
        # Gates start near 0.5 for every branch (zero bias).
        self.gate_proj = nnx.Linear(d_model, 3 * num_heads, use_bias=True, dtype=jnp.float32,
                                    param_dtype=param_dtype, rngs=rngs)
        self.compressor = Compressor(config, num_kv_heads, head_dim, self.v_head_dim,
                                     param_dtype=param_dtype, rngs=rngs)
        self.o_proj = nnx.Linear(num_heads * self.v_head_dim, d_model, **lin)

    def project(
        self, x: Float[Array, "B T D"], positions: Int[Array, "B T"]
    ) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]], jax.Array]:
        """Queries ``[B, T, N, Dk]``, ``{branch: (k, v)}`` and gates ``[B, T, N, 3]``."""
        b, t, _ = x.shape
        n, kh, dk, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        if self.dtype is not None:
            x = x.astype(self.dtype)
        q = self.q_proj(x).reshape(b, t, n, dk)  # [B, T, N, Dk]
        kv = self.kv_proj(x).reshape(b, t, len(self.kv_branches), kh, dk + dv)  # [B,T,nbr,K,Dk+Dv]
        if self.rope_theta is not None:
            q = apply_rope(q, positions, self.rope_theta)
        branches = {}
        for i, name in enumerate(self.kv_branches):
            k_i, v_i = kv[:, :, i, :, :dk], kv[:, :, i, :, dk:]  # [B, T, K, Dk], [B, T, K, Dv]
            if self.rope_theta is not None:
                k_i = apply_rope(k_i, positions, self.rope_theta)
            branches[name] = (k_i, v_i)
        gates = jax.nn.sigmoid(self.gate_proj(x.astype(jnp.float32))).reshape(b, t, n, 3)
        return q, branches, gates

    def attend(self, q, branches, gates, *, return_aux: bool = False):
        """Runs NSA on projected inputs; returns ``[B, T, N, Dv]`` (and aux)."""
        if "shared" in branches:
            k, v = branches["shared"]
            extra = {}
        else:
            k, v = branches["cmp"]
            extra = dict(k_slc=branches["slc"][0], v_slc=branches["slc"][1],
                         k_swa=branches["swa"][0], v_swa=branches["swa"][1])
        return nsa_attention(q, k, v, gates, self.compressor.params(), config=self.config,
                             implementation=self.implementation, return_aux=return_aux, **extra)

    def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"] | None = None,
                 *, return_aux: bool = False):
        """NSA self-attention of ``x`` (positions default to ``0..T-1``)."""
        if x.ndim != 3:
            raise ValueError(f"x must be [B, T, D], got x.shape={tuple(x.shape)}")
        b, t, _ = x.shape
        positions = default_positions(x) if positions is None else positions
        q, branches, gates = self.project(x, positions)
        res = self.attend(q, branches, gates, return_aux=return_aux)
        o, aux = res if return_aux else (res, None)
        y = self.o_proj(o.reshape(b, t, self.num_heads * self.v_head_dim))  # [B, T, D]
        return (y, aux) if return_aux else y

    # Decoding ---------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_len: int, *, dtype=None) -> NSACache:
        """An empty :class:`NSACache` for ``batch_size`` sequences of up to ``max_len`` tokens."""
        return NSACache.create(
            batch_size, max_len, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            v_head_dim=self.v_head_dim, branches=self.kv_branches, config=self.config,
            dtype=dtype or self.dtype or jnp.float32,
        )

    def prefill(
        self, x: Float[Array, "B T D"], cache: NSACache, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], NSACache]:
        """The full-sequence forward of a prompt, also filling an empty ``cache``.

        Args:
          x: prompts ``[B, T, D]`` at positions ``0..T-1``, right-padded where shorter.
          cache: an empty cache from :meth:`init_cache`.
          lengths: ``int32 [B]`` true prompt lengths (default ``T``); outputs past a
            sequence's length are those of its padding.

        Returns:
          ``(y [B, T, D], cache)``; ``y`` is exactly ``self(x)``.
        """
        if x.ndim != 3:
            raise ValueError(f"x must be [B, T, D], got x.shape={tuple(x.shape)}")
        lengths = check_prefill(cache, x, lengths)
        b, t, _ = x.shape
        q, branches, gates = self.project(x, default_positions(x))
        o, aux = self.attend(q, branches, gates, return_aux=True)
        y = self.o_proj(o.reshape(b, t, self.num_heads * self.v_head_dim))  # [B, T, D]
        return y, write_prefill(cache, branches, lengths, aux.k_cmp, aux.v_cmp)

    def decode(
        self, x: Float[Array, "B D"], cache: NSACache
    ) -> tuple[Float[Array, "B D"], NSACache]:
        """One new token per sequence at position ``cache.lengths``; returns ``(y [B, D], cache)``.

        ``y`` equals the full-sequence forward's output at that position.
        """
        if x.ndim != 2:
            raise ValueError(f"x must be [B, D] (one token per sequence), got "
                             f"x.shape={tuple(x.shape)}")
        check_decode(cache, x)
        b = x.shape[0]
        q, branches, gates = self.project(x[:, None], cache.lengths[:, None])
        kv = {name: (k[:, 0], v[:, 0]) for name, (k, v) in branches.items()}
        cache = append(cache, kv, cmp_params=self.compressor.params(), config=self.config)
        o = nsa_decode_attention(q[:, 0], gates[:, 0], cache, config=self.config,
                                 implementation=self.implementation)  # [B, N, Dv]
        return self.o_proj(o.reshape(b, self.num_heads * self.v_head_dim)), cache


class CausalSelfAttention(nnx.Module):
    """Dense causal (``window_size=None``) or sliding-window attention with GQA and RoPE.

    Uses ``jax.nn.dot_product_attention``: cuDNN on GPU for bf16/fp16, XLA elsewhere.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 v_head_dim: int | None = None, window_size: int | None = None,
                 rope_theta: float | None = 10_000.0, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim or head_dim
        self.window_size, self.rope_theta, self.dtype = window_size, rope_theta, dtype
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d_model, num_heads * head_dim, **lin)
        self.kv_proj = nnx.Linear(d_model, num_kv_heads * (head_dim + self.v_head_dim), **lin)
        self.o_proj = nnx.Linear(num_heads * self.v_head_dim, d_model, **lin)

    def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"] | None = None):
        b, t, _ = x.shape
        n, kh, dk, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        positions = default_positions(x) if positions is None else positions
        if self.dtype is not None:
            x = x.astype(self.dtype)
        q = self.q_proj(x).reshape(b, t, n, dk)
        kv = self.kv_proj(x).reshape(b, t, kh, dk + dv)
        k, v = kv[..., :dk], kv[..., dk:]
        if self.rope_theta is not None:
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)
        o = dense_attention(q, k, v, window_size=self.window_size)
        return self.o_proj(o.reshape(b, t, n * dv))

    # Decoding ---------------------------------------------------------------------------------

    def _project_qkv(self, x, positions):
        """``q [B, T, N, Dk]``, ``k [B, T, K, Dk]``, ``v [B, T, K, Dv]`` as in ``__call__``."""
        b, t, _ = x.shape
        n, kh, dk, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim
        if self.dtype is not None:
            x = x.astype(self.dtype)
        q = self.q_proj(x).reshape(b, t, n, dk)
        kv = self.kv_proj(x).reshape(b, t, kh, dk + dv)
        k, v = kv[..., :dk], kv[..., dk:]
        if self.rope_theta is not None:
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)
        return q, k, v

    def init_cache(self, batch_size: int, max_len: int, *, dtype=None) -> NSACache:
        """An empty cache (one ``"dense"`` key/value set, no compressed tokens)."""
        return NSACache.create(
            batch_size, max_len, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            v_head_dim=self.v_head_dim, branches=("dense",), config=None,
            dtype=dtype or self.dtype or jnp.float32,
        )

    def prefill(
        self, x: Float[Array, "B T D"], cache: NSACache, lengths: Int[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B T D"], NSACache]:
        """The forward of right-padded prompts ``x [B, T, D]``, also filling an empty ``cache``."""
        if x.ndim != 3:
            raise ValueError(f"x must be [B, T, D], got x.shape={tuple(x.shape)}")
        lengths = check_prefill(cache, x, lengths)
        b, t, _ = x.shape
        q, k, v = self._project_qkv(x, default_positions(x))
        o = dense_attention(q, k, v, window_size=self.window_size)
        y = self.o_proj(o.reshape(b, t, self.num_heads * self.v_head_dim))
        return y, write_prefill(cache, {"dense": (k, v)}, lengths)

    def decode(
        self, x: Float[Array, "B D"], cache: NSACache
    ) -> tuple[Float[Array, "B D"], NSACache]:
        """One new token per sequence at position ``cache.lengths``: ``(y [B, D], cache)``."""
        if x.ndim != 2:
            raise ValueError(f"x must be [B, D] (one token per sequence), got "
                             f"x.shape={tuple(x.shape)}")
        check_decode(cache, x)
        b = x.shape[0]
        q, k, v = self._project_qkv(x[:, None], cache.lengths[:, None])
        cache = append(cache, {"dense": (k[:, 0], v[:, 0])})
        o = dense_decode_attention(q[:, 0], cache, window_size=self.window_size)  # [B, N, Dv]
        return self.o_proj(o.reshape(b, self.num_heads * self.v_head_dim)), cache


def dense_attention(q, k, v, *, window_size: int | None = None):
    """Causal attention (optionally windowed) through ``jax.nn.dot_product_attention``."""
    dv = v.shape[-1]
    impl = None
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        impl = "cudnn"
    if dv > q.shape[-1]:
        raise NotImplementedError(f"dense baseline needs Dv <= Dk, got {q.shape=} {v.shape=}")
    if dv < q.shape[-1]:  # dot_product_attention wants one head dim: zero-pad the values
        v = jnp.pad(v, [(0, 0)] * 3 + [(0, q.shape[-1] - dv)])
    window = None if window_size is None else (window_size - 1, 0)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                     implementation=impl)
    return o[..., :dv]


class NativeSparseAttentionLinen(nn.Module):
    """The NNX layer wrapped for Linen projects (``flax.nnx.bridge.to_linen``).

    Attributes mirror :class:`NativeSparseAttention`'s constructor arguments.
    """

    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None
    config: NSAConfig = NSAConfig()
    rope_theta: float | None = 10_000.0
    implementation: str | None = None

    @nn.compact
    def __call__(self, x, positions=None):
        layer = nnx.bridge.to_linen(
            NativeSparseAttention, self.d_model, self.num_heads, self.num_kv_heads,
            self.head_dim, v_head_dim=self.v_head_dim, config=self.config,
            rope_theta=self.rope_theta, implementation=self.implementation, name="nsa",
        )
        return layer(x, positions)
