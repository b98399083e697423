"""The compression function ``phi``: one key (or value) per block of ``l`` raw tokens.

Compressed token ``i`` summarises raw tokens ``[i*d, i*d + l)``; only complete blocks exist.
Parameters are per KV head and shared over positions. Layout of the parameter pytree:

- ``"mean"``: ``{}``.
- ``"linear"``: ``{"w": [K, l*D, D], "b": [K, D]}`` applied to the row-major flattened block.
- ``"mlp"`` (the paper's): ``{"pos": [K, l, D], "w1": [K, l*D, Hm], "b1": [K, Hm],
  "w2": [K, Hm, D], "b2": [K, D]}``; ``silu((x + pos).flatten() @ w1 + b1) @ w2 + b2``.

Keys and values use separate parameter sets: ``{"k": ..., "v": ...}``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float

from nsa_jax.config import CMP_KINDS, num_cmp_tokens

# f32 matmuls at full precision (no TF32 on GPU): phi is part of the exact reference.
HIGHEST = jax.lax.Precision.HIGHEST
# The name of the MLP phi's pre-activation (``[B, C, K, Hm]`` float32, a few MiB a layer) for
# ``jax.checkpoint`` policies: kept, the backward pass does not rerun phi's first matmul.
PHI_HIDDEN_NAME = "nsa_phi_hidden"


def block_view(
    x: Float[Array, "B S K H"], block_size: int, stride: int
) -> Float[Array, "B C L K H"]:
    """Overlapping blocks ``x[:, i*d : i*d + l]`` stacked on a new axis, for every complete block.

    Built from ``l/d`` shifted strided views, so nothing is gathered element by element.
    """
    b, s, kh, h = x.shape
    c = num_cmp_tokens(s, block_size, stride)
    r = block_size // stride
    if c == 0:
        return jnp.zeros((b, 0, block_size, kh, h), x.dtype)
    # [B, C+r-1, d, K, H]: the sequence cut into stride-long chunks.
    chunks = x[:, : (c + r - 1) * stride].reshape(b, c + r - 1, stride, kh, h)
    # Block i is chunks i, i+1, ..., i+r-1 laid end to end.
    return jnp.concatenate([chunks[:, j : j + c] for j in range(r)], axis=2)  # [B, C, L, K, H]


def _block_means(x: Float[Array, "B S K H"], block_size: int, stride: int
                 ) -> Float[Array, "B C K H"]:
    """Mean of every complete block in f32, from the sums of its ``l/d`` stride-long chunks:
    ``x`` is read once, and the ``[B, C, L, K, H]`` block view is never built (at 64k tokens
    that view in f32 is 256 MiB per tensor)."""
    b, s, kh, h = x.shape
    c = num_cmp_tokens(s, block_size, stride)
    r = block_size // stride
    if c == 0:
        return jnp.zeros((b, 0, kh, h), jnp.float32)
    chunks = x[:, : (c + r - 1) * stride].reshape(b, c + r - 1, stride, kh, h)
    sums = chunks.astype(jnp.float32).sum(axis=2)  # [B, C+r-1, K, H]
    total = sums[:, :c]
    for j in range(1, r):
        total = total + sums[:, j : j + c]
    return total / block_size


def compress(
    x: Float[Array, "B S K H"],
    params: dict,
    *,
    kind: str,
    block_size: int,
    stride: int,
) -> Float[Array, "B C K H"]:
    """Applies ``phi`` to every complete block of ``x``; returns ``x.dtype``, computed in f32."""
    if kind not in CMP_KINDS:
        raise ValueError(f"compression kind={kind!r} is not one of {CMP_KINDS}")
    if kind == "mean":
        return _block_means(x, block_size, stride).astype(x.dtype)
    blocks = block_view(x, block_size, stride).astype(jnp.float32)  # [B, C, L, K, H]
    b, c, l, kh, h = blocks.shape
    if kind == "linear":
        flat = blocks.transpose(0, 1, 3, 2, 4).reshape(b, c, kh, l * h)  # [B, C, K, L*H]
        w = params["w"].astype(jnp.float32)
        out = jnp.einsum("bckf,kfh->bckh", flat, w, precision=HIGHEST)
        out = out + params["b"].astype(jnp.float32)
    else:  # "mlp"
        pos = params["pos"].astype(jnp.float32).transpose(1, 0, 2)  # [L, K, H]
        flat = (blocks + pos).transpose(0, 1, 3, 2, 4).reshape(b, c, kh, l * h)  # [B, C, K, L*H]
        hid = jnp.einsum("bckf,kfm->bckm", flat, params["w1"].astype(jnp.float32),
                         precision=HIGHEST)
        hid = checkpoint_name(hid + params["b1"].astype(jnp.float32), PHI_HIDDEN_NAME)
        hid = jax.nn.silu(hid)  # [B, C, K, Hm]
        out = jnp.einsum("bckm,kmh->bckh", hid, params["w2"].astype(jnp.float32),
                         precision=HIGHEST)
        out = out + params["b2"].astype(jnp.float32)
    return out.astype(x.dtype)


def init_compression_params(
    key: jax.Array,
    *,
    kind: str,
    num_kv_heads: int,
    block_size: int,
    head_dim: int,
    hidden: int | None = None,
    dtype=jnp.float32,
) -> dict:
    """Initial ``phi`` parameters for one of keys or values.

    ``"linear"`` and ``"mlp"`` start close to mean pooling plus a small random part, so a fresh
    layer's compressed keys are meaningful summaries from the first step.
    """
    if kind not in CMP_KINDS:
        raise ValueError(f"compression kind={kind!r} is not one of {CMP_KINDS}")
    kh, l, h = num_kv_heads, block_size, head_dim
    if kind == "mean":
        return {}
    k1, k2, k3 = jax.random.split(key, 3)
    if kind == "linear":
        mean_w = jnp.tile(jnp.eye(h) / l, (l, 1))  # [L*H, H]: averages the L positions
        noise = jax.random.normal(k1, (kh, l * h, h)) / math.sqrt(l * h) * 0.1
        return {"w": (mean_w[None] + noise).astype(dtype), "b": jnp.zeros((kh, h), dtype)}
    hm = hidden or h
    return {
        "pos": (jax.random.normal(k1, (kh, l, h)) * 0.02).astype(dtype),
        "w1": (jax.random.normal(k2, (kh, l * h, hm)) / math.sqrt(l * h)).astype(dtype),
        "b1": jnp.zeros((kh, hm), dtype),
        "w2": (jax.random.normal(k3, (kh, hm, h)) / math.sqrt(hm)).astype(dtype),
        "b2": jnp.zeros((kh, h), dtype),
    }


def expected_param_shapes(
    kind: str, *, num_kv_heads: int, block_size: int, head_dim: int
) -> dict[str, tuple[int, ...]] | None:
    """Shapes a ``phi`` parameter dict must have (``None`` for the hidden width, any size)."""
    kh, l, h = num_kv_heads, block_size, head_dim
    if kind == "mean":
        return {}
    if kind == "linear":
        return {"w": (kh, l * h, h), "b": (kh, h)}
    return {
        "pos": (kh, l, h),
        "w1": (kh, l * h, None),
        "b1": (kh, None),
        "w2": (kh, None, h),
        "b2": (kh, h),
    }
