"""``NSATransformer``: a decoder-only LM (RMSNorm, SwiGLU, GQA, RoPE) with NSA attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from nsa_jax.cache import NSACache
from nsa_jax.config import ModelConfig
from nsa_jax.layers import CausalSelfAttention, NativeSparseAttention, default_positions
from nsa_jax.ops import REMAT_POLICIES


def _check_tokens(tokens, layout: str) -> None:
    """``tokens`` must be integers with the rank of ``layout`` (``"[B, T]"`` or ``"[B]"``)."""
    if tokens.ndim != layout.count(",") + 1:
        raise ValueError(f"tokens must be {layout}, got tokens.shape={tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integers, got tokens.dtype={tokens.dtype}")


class SwiGLU(nnx.Module):
    """``W_down(silu(W_gate x) * W_up x)``."""

    def __init__(self, d_model: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = nnx.Linear(d_model, hidden, **lin)
        self.up = nnx.Linear(d_model, hidden, **lin)
        self.down = nnx.Linear(hidden, d_model, **lin)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        heads = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        common = dict(v_head_dim=cfg.v_head_dim, rope_theta=cfg.rope_theta, dtype=dtype,
                      param_dtype=pdtype, rngs=rngs)
        self.attn_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype,
                                     param_dtype=pdtype, rngs=rngs)
        if cfg.attention == "nsa":
            self.attn = NativeSparseAttention(*heads, config=cfg.nsa,
                                              implementation=cfg.implementation,
                                              low_memory=cfg.low_memory, **common)
        else:
            window = cfg.nsa.window_size if cfg.attention == "window" else None
            self.attn = CausalSelfAttention(*heads, window_size=window, **common)
        self.mlp_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype,
                                    param_dtype=pdtype, rngs=rngs)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, dtype=dtype, param_dtype=pdtype, rngs=rngs)

    def __call__(self, x, positions):
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.mlp(self.mlp_norm(x))

    def prefill(self, x, cache: NSACache, lengths=None):
        """``__call__`` at positions ``0..T-1`` that also fills the attention cache."""
        a, cache = self.attn.prefill(self.attn_norm(x), cache, lengths)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), cache

    def decode(self, x, cache: NSACache):
        """One token per sequence, ``x [B, D]``; returns ``(x [B, D], cache)``."""
        a, cache = self.attn.decode(self.attn_norm(x), cache)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), cache


class NSATransformer(nnx.Module):
    """Token ids ``[B, T]`` to next-token logits ``[B, T, V]`` (f32).

    Attention is ``cfg.attention``: ``"nsa"``, ``"full"`` or ``"window"``, so the three models
    compared in evaluations differ in nothing else.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        # std 1/sqrt(D): tied output logits start at unit scale (loss near ln V at init).
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                               embedding_init=nnx.initializers.normal(cfg.d_model**-0.5),
                               rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype,
                                      param_dtype=pdtype, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dtype,
                                      param_dtype=pdtype, rngs=rngs)

    def __call__(self, tokens: Int[Array, "B T"],
                 positions: Int[Array, "B T"] | None = None) -> Float[Array, "B T V"]:
        _check_tokens(tokens, "[B, T]")
        positions = default_positions(tokens) if positions is None else positions
        x = self.embed(tokens)  # [B, T, D]
        for block in self.blocks:
            if self.config.remat:
                x = nnx.remat(lambda blk, h, pos: blk(h, pos),
                              policy=REMAT_POLICIES[self.config.remat_policy])(block, x,
                                                                               positions)
            else:
                x = block(x, positions)
        x = self.final_norm(x)
        if self.config.tie_embeddings:
            logits = self.embed.attend(x)  # [B, T, V]
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)

    # Decoding ---------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_len: int) -> tuple[NSACache, ...]:
        """One empty :class:`NSACache` per layer, for sequences of up to ``max_len`` tokens."""
        dtype = jnp.dtype(self.config.dtype)
        return tuple(block.attn.init_cache(batch_size, max_len, dtype=dtype)
                     for block in self.blocks)

    def _check_cache(self, cache) -> None:
        if len(cache) != len(self.blocks):
            raise ValueError(f"got {len(cache)} layer caches for {len(self.blocks)} layers")

    def _logits(self, x):
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.config.tie_embeddings else self.lm_head(x)
        return logits.astype(jnp.float32)

    def prefill(
        self,
        tokens: Int[Array, "B T"],
        cache: tuple[NSACache, ...],
        lengths: Int[Array, " B"] | None = None,
    ) -> tuple[Float[Array, "B T V"], tuple[NSACache, ...]]:
        """Logits of right-padded prompts (``self(tokens)``; see
        :meth:`NativeSparseAttention.prefill` for the last bit) and the filled caches.

        Args:
          tokens: prompts ``[B, T]``; sequence ``b`` is ``tokens[b, :lengths[b]]``.
          cache: empty caches from :meth:`init_cache`.
          lengths: ``int32 [B]`` prompt lengths (default ``T``).
        """
        _check_tokens(tokens, "[B, T]")
        self._check_cache(cache)
        x = self.embed(tokens)  # [B, T, D]
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block.prefill(x, layer_cache, lengths)
            new_cache.append(layer_cache)
        return self._logits(x), tuple(new_cache)

    def decode(
        self, tokens: Int[Array, " B"], cache: tuple[NSACache, ...]
    ) -> tuple[Float[Array, "B V"], tuple[NSACache, ...]]:
        """Next-token logits after appending ``tokens`` (one per sequence) to the caches."""
        _check_tokens(tokens, "[B]")
        self._check_cache(cache)
        x = self.embed(tokens)  # [B, D]
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block.decode(x, layer_cache)
            new_cache.append(layer_cache)
        return self._logits(x), tuple(new_cache)
