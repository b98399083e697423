"""``NSATransformer``: a decoder-only LM (RMSNorm, SwiGLU, GQA, RoPE) with NSA attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from nsa_jax.config import ModelConfig
from nsa_jax.layers import CausalSelfAttention, NativeSparseAttention, default_positions


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
                                              implementation=cfg.implementation, **common)
        else:
            window = cfg.nsa.window_size if cfg.attention == "window" else None
            self.attn = CausalSelfAttention(*heads, window_size=window, **common)
        self.mlp_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype,
                                    param_dtype=pdtype, rngs=rngs)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden, dtype=dtype, param_dtype=pdtype, rngs=rngs)

    def __call__(self, x, positions):
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.mlp(self.mlp_norm(x))


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
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got tokens.shape={tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integers, got tokens.dtype={tokens.dtype}")
        positions = default_positions(tokens) if positions is None else positions
        x = self.embed(tokens)  # [B, T, D]
        for block in self.blocks:
            if self.config.remat:
                x = nnx.remat(lambda blk, h, pos: blk(h, pos))(block, x, positions)
            else:
                x = block(x, positions)
        x = self.final_norm(x)
        if self.config.tie_embeddings:
            logits = self.embed.attend(x)  # [B, T, V]
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)
