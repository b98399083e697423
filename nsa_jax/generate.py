"""Autoregressive generation with a KV cache: prefill once, then one jitted decode step per token.

The whole generation is one ``jax.jit`` program: the prompt's prefill, then a ``lax.scan`` over
the new tokens whose body (one :meth:`NSATransformer.decode` step and the sampling) is traced
and compiled once, whatever ``max_new_tokens`` is. Calls with the same shapes and sampling
settings reuse the compiled program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int


def sample_logits(
    logits: Float[Array, "B V"],
    rng: jax.Array,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
) -> Int[Array, " B"]:
    """Greedy (``temperature == 0``), temperature or top-k sampling of one token per row."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1] the k-th largest logit
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    nnx.jit, static_argnames=("max_new_tokens", "max_len", "temperature", "top_k")
)
def _generate(model, prompt, lengths, rng, *, max_new_tokens: int, max_len: int,
              temperature: float, top_k: int | None):
    b = prompt.shape[0]
    cache = model.init_cache(b, max_len)
    logits, cache = model.prefill(prompt, cache, lengths)  # [B, T, V]
    last = logits[jnp.arange(b), lengths - 1]  # [B, V] each prompt's final position
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k)
    first = sample(last, jax.random.fold_in(rng, 0))

    def step(carry, i):
        tokens, cache = carry
        logits, cache = model.decode(tokens, cache)  # [B, V]
        nxt = sample(logits, jax.random.fold_in(rng, i))
        return (nxt, cache), nxt

    steps = jnp.arange(1, max_new_tokens, dtype=jnp.int32)
    _, rest = jax.lax.scan(step, (first, cache), steps)  # rest [max_new - 1, B]
    return jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, max_new]


def generate(
    model,
    prompt: Int[Array, "B T"],
    max_new_tokens: int,
    *,
    prompt_lengths: Int[Array, " B"] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
    max_len: int | None = None,
) -> Int[Array, "B M"]:
    """Continues each prompt by ``max_new_tokens`` tokens.

    Args:
      model: an :class:`~nsa_jax.NSATransformer` (any attention kind).
      prompt: token ids ``[B, T]``, right-padded where ``prompt_lengths`` is shorter.
      max_new_tokens: tokens to generate per sequence (``>= 1``).
      prompt_lengths: ``int32 [B]`` true prompt lengths in ``[1, T]`` (default ``T``).
      temperature: ``0`` for greedy decoding, else the softmax temperature.
      top_k: sample among the ``top_k`` most likely tokens only (``None``: all).
      rng: a PRNG key for sampling (default ``jax.random.key(0)``).
      max_len: cache length (default ``T + max_new_tokens``).

    Returns:
      ``int32 [B, max_new_tokens]`` generated tokens; sequence ``b`` continues
      ``prompt[b, :prompt_lengths[b]]``.
    """
    if prompt.ndim != 2:
        raise ValueError(f"prompt must be [B, T], got prompt.shape={tuple(prompt.shape)}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"prompt must hold integer token ids, got prompt.dtype={prompt.dtype}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (
            max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got temperature={temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got top_k={top_k!r}")
    b, t = prompt.shape
    need = t + max_new_tokens
    max_len = need if max_len is None else max_len
    if max_len < need:
        raise ValueError(f"max_len={max_len} is smaller than prompt length {t} plus "
                         f"max_new_tokens={max_new_tokens}")
    if prompt_lengths is None:
        lengths = jnp.full((b,), t, jnp.int32)
    else:
        lengths = jnp.asarray(prompt_lengths)
        if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"prompt_lengths must be integers of shape ({b},), got shape "
                             f"{tuple(lengths.shape)} dtype {lengths.dtype}")
        if int(lengths.min()) < 1 or int(lengths.max()) > t:
            raise ValueError(f"prompt_lengths must lie in [1, {t}], got {lengths.tolist()}")
        lengths = lengths.astype(jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(model, prompt, lengths, rng, max_new_tokens=max_new_tokens,
                     max_len=max_len, temperature=float(temperature), top_k=top_k)
