"""Decoding equals the full-sequence forward: the decode contract of ``NSA_SPEC.md``.

Small blocks (``l=8, d=4, l'=16, n=4, w=16``) so that short sequences cross every compression,
selection and window boundary; right-padded batches whose sequences have different lengths,
a prompt of a single token included.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nsa_jax
from nsa_jax import ModelConfig, NativeSparseAttention, NSACache, NSAConfig, NSATransformer
from nsa_jax.compression import init_compression_params
from nsa_jax.generate import sample_logits
from pallas_kernels.decode import reference as decode_ref
from tests.tolerances import assert_close

SMALL = NSAConfig(cmp_block_size=8, cmp_stride=4, slc_block_size=16, slc_top_n=4,
                  window_size=16)
PROMPT_LENS = (1, 12, 33)  # right-padded to 33; each sequence then decodes DECODE_STEPS tokens
DECODE_STEPS = 33


@nnx.jit
def _forward(module, x):
    return module(x)


def _cmp_params(key, kind, kh, size, dk, dv):
    if kind == "mean":
        return None
    kk, kv = jax.random.split(key)
    return {"k": init_compression_params(kk, kind=kind, num_kv_heads=kh, block_size=size,
                                         head_dim=dk),
            "v": init_compression_params(kv, kind=kind, num_kv_heads=kh, block_size=size,
                                         head_dim=dv)}


@pytest.mark.parametrize("kind", ["mlp", "mean", "linear"])
def test_decode_reference_matches_forward_at_every_position(kind):
    """The XLA decode twin, fed caches built from the whole sequence, equals ``nsa_attention``.

    All ``T`` positions go in one call, as a batch of ``T`` queries with lengths ``1..T``, so the
    masking of cache slots past a query's position is exercised at every position.
    """
    cfg = SMALL.replace(cmp_kind=kind)
    t, n, kh, dk, dv = 70, 8, 2, 16, 8
    ks = jax.random.split(jax.random.key(3), 6)
    q = jax.random.normal(ks[0], (1, t, n, dk))
    k = jax.random.normal(ks[1], (1, t, kh, dk))
    v = jax.random.normal(ks[2], (1, t, kh, dv))
    gates = jax.nn.sigmoid(jax.random.normal(ks[3], (1, t, n, 3)))
    params = _cmp_params(ks[4], kind, kh, cfg.cmp_block_size, dk, dv)
    out, aux = jax.jit(lambda *a: nsa_jax.nsa_attention(*a, config=cfg, return_aux=True))(
        q, k, v, gates, params)

    def per_query(x):  # [1, ...] -> [T, ...] the same cache for every query
        return jnp.broadcast_to(x, (t, *x.shape[1:]))

    o, idx = jax.jit(decode_ref.decode_attention, static_argnames=(
        "cmp_block_size", "cmp_stride", "slc_block_size", "top_n", "window_size"))(
        q[0], per_query(aux.k_cmp), per_query(aux.v_cmp), per_query(k), per_query(v),
        per_query(k), per_query(v), gates[0], jnp.arange(1, t + 1, dtype=jnp.int32),
        cmp_block_size=cfg.cmp_block_size, cmp_stride=cfg.cmp_stride,
        slc_block_size=cfg.slc_block_size, top_n=cfg.slc_top_n, window_size=cfg.window_size,
    )
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1),
                                  np.sort(np.asarray(aux.indices[0]), -1))
    assert_close(o, out[0], jnp.float32, f"decode twin vs forward ({kind})")


# Prompts longer than the separate-KV ring buffers (64 slots here), one right-padded past them.
LONG_PROMPT_LENS = (80, 47)
LONG_DECODE_STEPS = 20


def _layer_case(kind, kv_mode, dtype, prompt_lens, steps, seed=0):
    cfg = SMALL.replace(cmp_kind=kind, kv_mode=kv_mode)
    layer = NativeSparseAttention(32, 8, 2, 16, v_head_dim=8, config=cfg, dtype=dtype,
                                  rngs=nnx.Rngs(seed))
    b, p = len(prompt_lens), max(prompt_lens)
    x = jax.random.normal(jax.random.key(seed + 1), (b, p + steps, 32)).astype(dtype)
    return layer, x


def _decode_layer(layer, x, prompt_lens, steps):
    """Prefills the padded prompts, then decodes; returns the prefill and per-step outputs."""
    lengths = jnp.asarray(prompt_lens, jnp.int32)
    b, p = len(prompt_lens), max(prompt_lens)
    cache = layer.init_cache(b, x.shape[1])
    y_pre, cache = nnx.jit(lambda m, x, c, n: m.prefill(x, c, n))(layer, x[:, :p], cache, lengths)
    step = nnx.jit(lambda m, x, c: m.decode(x, c))
    rows = jnp.arange(b)
    ys = []
    for s in range(steps):
        y, cache = step(layer, x[rows, lengths + s], cache)
        ys.append(y)
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(lengths) + steps)
    return y_pre, jnp.stack(ys, axis=1)  # [B, P, D], [B, steps, D]


@pytest.mark.parametrize(
    "kind,kv_mode,dtype,long",
    [("mlp", "separate", jnp.float32, False), ("mean", "shared", jnp.float32, False),
     ("linear", "separate", jnp.float32, False), ("mlp", "shared", jnp.bfloat16, False),
     ("mlp", "separate", jnp.float32, True)],
)
def test_layer_decode_matches_forward(kind, kv_mode, dtype, long):
    prompt_lens, steps = ((LONG_PROMPT_LENS, LONG_DECODE_STEPS) if long
                          else (PROMPT_LENS, DECODE_STEPS))
    layer, x = _layer_case(kind, kv_mode, dtype, prompt_lens, steps)
    ref = _forward(layer, x)  # [B, T, D] the full-sequence forward
    y_pre, y_dec = _decode_layer(layer, x, prompt_lens, steps)
    for b, n in enumerate(prompt_lens):
        assert_close(y_pre[b, :n], ref[b, :n], dtype, f"prefill of sequence {b}")
        want = ref[b, n:n + steps]
        assert_close(y_dec[b], want, dtype, f"decode of sequence {b}")
        if dtype == jnp.float32:  # tight at every single position, not only on average
            for s in range(steps):
                assert_close(y_dec[b, s], want[s], dtype, f"sequence {b} position {n + s}")


def test_separate_kv_cache_keeps_rings_for_the_compressed_and_window_keys():
    cfg = NSAConfig(kv_mode="separate")  # l=32, w=512, l'=64
    layer = NativeSparseAttention(64, 4, 2, 16, config=cfg, rngs=nnx.Rngs(0))
    cache = layer.init_cache(2, 65536)
    shapes = {name: buf.shape for name, buf in cache.k.items()}
    assert shapes == {"cmp": (2, 64, 2, 16), "slc": (2, 65536, 2, 16), "swa": (2, 512, 2, 16)}
    assert cache.max_len == 65536 and cache.k_cmp.shape == (2, 4096, 2, 16)


def test_cache_appends_compressed_tokens_exactly_when_blocks_complete():
    """After each step the compressed cache equals phi over the complete blocks, and no more."""
    cfg = SMALL.replace(cmp_kind="mlp", kv_mode="separate")
    layer = NativeSparseAttention(16, 2, 1, 8, config=cfg, rngs=nnx.Rngs(5))
    x = jax.random.normal(jax.random.key(6), (1, 30, 16))
    cache = layer.init_cache(1, 30)
    _, cache = layer.prefill(x[:, :3], cache)
    step = nnx.jit(lambda m, x, c: m.decode(x, c))
    raw_len = 3
    for t in range(3, 30):
        before = np.asarray(cache.k_cmp)
        _, cache = step(layer, x[:, t], cache)
        raw_len = t + 1
        done = cfg.num_cmp_tokens(raw_len)
        new = (raw_len >= cfg.cmp_block_size
               and (raw_len - cfg.cmp_block_size) % cfg.cmp_stride == 0)
        after = np.asarray(cache.k_cmp)
        changed = np.flatnonzero(np.any(after != before, axis=(0, 2, 3)))
        assert list(changed) == ([done - 1] if new else []), f"t={t}: slots {changed} changed"
    _, branches, _ = layer.project(x, jnp.arange(30)[None])
    k_full = nsa_jax.compression.compress(
        branches["cmp"][0], layer.compressor.params()["k"], kind="mlp",
        block_size=cfg.cmp_block_size, stride=cfg.cmp_stride)
    done = cfg.num_cmp_tokens(30)
    assert_close(cache.k_cmp[:, :done], k_full, jnp.float32, "incremental phi")


def _model(attention, dtype="float32"):
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, mlp_hidden=64, attention=attention, nsa=SMALL, dtype=dtype)
    return NSATransformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("attention", ["nsa", "full", "window"])
def test_model_decode_matches_forward(attention):
    model = _model(attention)
    b, p = len(PROMPT_LENS), max(PROMPT_LENS)
    lengths = jnp.asarray(PROMPT_LENS, jnp.int32)
    tokens = jax.random.randint(jax.random.key(2), (b, p + DECODE_STEPS), 0, 64)
    ref = _forward(model, tokens)  # [B, T, V]
    cache = model.init_cache(b, tokens.shape[1])
    assert all(isinstance(c, NSACache) for c in cache)
    logits_pre, cache = nnx.jit(lambda m, t, c, n: m.prefill(t, c, n))(
        model, tokens[:, :p], cache, lengths)
    step = nnx.jit(lambda m, t, c: m.decode(t, c))
    rows = jnp.arange(b)
    outs = []
    for s in range(DECODE_STEPS):
        logits, cache = step(model, tokens[rows, lengths + s], cache)
        outs.append(logits)
    outs = jnp.stack(outs, axis=1)  # [B, steps, V]
    for i, n in enumerate(PROMPT_LENS):
        assert_close(logits_pre[i, :n], ref[i, :n], jnp.float32, f"{attention} prefill {i}")
        assert_close(outs[i], ref[i, n:n + DECODE_STEPS], jnp.float32, f"{attention} decode {i}")


def test_generate_greedy_is_deterministic_and_follows_the_forward():
    model = _model("nsa")
    lengths = jnp.asarray([4, 19], jnp.int32)
    prompt = jax.random.randint(jax.random.key(4), (2, 19), 0, 64)
    prompt = jnp.where(jnp.arange(19)[None] < lengths[:, None], prompt, 0)
    new = 12
    out1 = nsa_jax.generate(model, prompt, new, prompt_lengths=lengths)
    out2 = nsa_jax.generate(model, prompt, new, prompt_lengths=lengths,
                            rng=jax.random.key(99))
    assert out1.shape == (2, new) and out1.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))
    top1 = nsa_jax.generate(model, prompt, new, prompt_lengths=lengths, temperature=1.0,
                            top_k=1, rng=jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(top1))
    for i, n in enumerate(np.asarray(lengths)):
        seq = jnp.concatenate([prompt[i, :n], out1[i]])[None]  # [1, n + new]
        logits = _forward(model, seq)[0, n - 1:n - 1 + new]  # the forward's next-token rows
        np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1)), np.asarray(out1[i]))


def test_generate_sampling_respects_top_k_and_compiles_the_step_once(monkeypatch):
    model = _model("nsa")
    traces = []
    original = NSATransformer.decode

    def counting_decode(self, tokens, cache):
        traces.append(tokens.shape)
        return original(self, tokens, cache)

    monkeypatch.setattr(NSATransformer, "decode", counting_decode)
    prompt = jax.random.randint(jax.random.key(8), (2, 9), 0, 64)
    new, k = 10, 3
    runs = [nsa_jax.generate(model, prompt, new, temperature=0.8, top_k=k,
                             rng=jax.random.key(seed)) for seed in range(3)]
    # One trace of the step serves every token of every call with these shapes.
    assert len(traces) == 1, f"decode step traced {len(traces)} times"
    assert len({tuple(np.asarray(r).ravel()) for r in runs}) > 1, "rng does not change samples"
    for out in runs:
        for i in range(2):
            seq = jnp.concatenate([prompt[i], out[i]])[None]
            logits = _forward(model, seq)[0, 8:8 + new]  # [new, V]
            rank = (logits > jnp.take_along_axis(logits, out[i][:, None], -1)).sum(-1)
            assert int(rank.max()) < k, f"sampled a token outside the top {k}"


def test_sample_logits_greedy_and_top_k():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.0]])
    assert int(sample_logits(logits, jax.random.key(0))[0]) == 1
    draws = jax.vmap(lambda r: sample_logits(logits, r, temperature=1.0, top_k=2))(
        jax.random.split(jax.random.key(1), 200))
    assert set(np.asarray(draws).ravel().tolist()) == {1, 3}


def test_bad_arguments_raise_value_errors():
    model = _model("nsa")
    cache = model.init_cache(2, 16)
    with pytest.raises(ValueError, match="prompt length"):
        model.prefill(jnp.zeros((2, 70), jnp.int32), cache)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model.prefill(jnp.zeros((3, 4), jnp.int32), cache)
    with pytest.raises(ValueError, match="lengths must lie"):
        model.prefill(jnp.zeros((2, 4), jnp.int32), cache, jnp.asarray([0, 4]))
    with pytest.raises(TypeError, match="integers"):
        model.decode(jnp.zeros((2,), jnp.float32), cache)
    with pytest.raises(ValueError, match="max_new_tokens"):
        nsa_jax.generate(model, jnp.zeros((2, 4), jnp.int32), 0)
    with pytest.raises(ValueError, match="max_len"):
        nsa_jax.generate(model, jnp.zeros((2, 4), jnp.int32), 8, max_len=10)


def test_layer_decode_through_the_triton_kernel_matches_forward(monkeypatch):
    """The GPU decode chain (Pallas interpret mode) inside the layer equals the forward."""
    from nsa_jax import cache as cache_lib
    from pallas_kernels.decode import gpu

    kernel = functools.partial(gpu.decode_attention, interpret=True,
                               block_sizes=gpu.BlockSizes(block_k=16, target_programs=16))
    calls = []

    def chain(implementation):
        calls.append(implementation)
        return [kernel]

    monkeypatch.setattr(cache_lib, "_decode_chain", chain)
    cfg = SMALL.replace(cmp_kind="mlp", kv_mode="separate")
    layer = NativeSparseAttention(32, 4, 2, 16, config=cfg, rngs=nnx.Rngs(3))
    lengths = jnp.asarray([2, 60], jnp.int32)  # the second wraps the 64-slot window ring
    steps = 12
    x = jax.random.normal(jax.random.key(4), (2, 60 + steps, 32))
    ref = _forward(layer, x)
    cache = layer.init_cache(2, x.shape[1])
    assert cache.k["swa"].shape[1] == 64 < cache.max_len
    _, cache = layer.prefill(x[:, :60], cache, lengths)
    step = nnx.jit(lambda m, x, c: m.decode(x, c))
    ys = []
    for s in range(steps):
        y, cache = step(layer, x[jnp.arange(2), lengths + s], cache)
        ys.append(y)
    assert calls, "the decode chain was not consulted"
    ys = jnp.stack(ys, axis=1)
    for b, n in enumerate(np.asarray(lengths)):
        assert_close(ys[b], ref[b, n:n + steps], jnp.float32, f"kernel decode of sequence {b}")


def test_decode_dispatch_prefers_the_kernel_and_ends_with_the_reference():
    from nsa_jax import cache as cache_lib
    from pallas_kernels.decode import gpu

    ref_fn = decode_ref.decode_attention
    assert cache_lib._decode_chain("pallas_triton") == [gpu.decode_attention, ref_fn]
    assert cache_lib._decode_chain("reference") == [ref_fn]
    assert cache_lib._decode_chain("pallas_mosaic") == [ref_fn]  # no TPU decode kernel yet
    if jax.default_backend() == "cpu":
        assert cache_lib._decode_chain(None) == [ref_fn]
