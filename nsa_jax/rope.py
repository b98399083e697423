"""Rotary position embedding (rotate-half convention), applied before NSA compresses keys."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def rope_frequencies(head_dim: int, theta: float) -> Float[Array, " half"]:
    """Inverse frequencies ``theta^(-2i/H)`` for ``i < H/2``."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got head_dim={head_dim}")
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(
    x: Float[Array, "B T N H"], positions: Int[Array, "B T"], theta: float = 10_000.0
) -> Float[Array, "B T N H"]:
    """Rotates feature pairs ``(x[..., i], x[..., i + H/2])`` by ``position * freq_i``."""
    h = x.shape[-1]
    freqs = rope_frequencies(h, theta)  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : h // 2], xf[..., h // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
