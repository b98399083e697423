"""Bad input raises a ValueError/TypeError at the public boundary that names the values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from nsa_jax import ModelConfig, NSAConfig, nsa_attention

CFG = NSAConfig(cmp_block_size=8, cmp_stride=4, slc_block_size=16, slc_top_n=4, window_size=16,
                cmp_kind="mean")


def _inputs(b=1, t=40, n=4, kh=2, dk=8, dv=8, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 4)
    return dict(
        q=jax.random.normal(ks[0], (b, t, n, dk)).astype(dtype),
        k=jax.random.normal(ks[1], (b, t, kh, dk)).astype(dtype),
        v=jax.random.normal(ks[2], (b, t, kh, dv)).astype(dtype),
        gates=jnp.full((b, t, n, 3), 0.5),
    )


def _run(**kw):
    inp = _inputs()
    inp.update(kw)
    return nsa_attention(inp.pop("q"), inp.pop("k"), inp.pop("v"), inp.pop("gates"), None,
                         config=inp.pop("config", CFG), **inp)


def test_valid_inputs_run():
    assert _run().shape == (1, 40, 4, 8)


@pytest.mark.parametrize("name,shape", [("q", (40, 4, 8)), ("k", (1, 40, 2, 8, 1)),
                                        ("v", (1, 40, 16))])
def test_wrong_rank(name, shape):
    with pytest.raises(ValueError, match=rf"{name} must have rank 4.*{name}\.shape"):
        _run(**{name: jnp.zeros(shape)})


def test_query_heads_not_multiple_of_kv_heads():
    inp = _inputs(n=5, kh=2)
    with pytest.raises(ValueError, match=r"multiple of KV heads.*N=5.*K=2"):
        _run(q=inp["q"], gates=jnp.full((1, 40, 5, 3), 0.5))


def test_mismatched_head_dims():
    with pytest.raises(ValueError, match=r"head dims differ.*Dk=8.*has 16"):
        _run(k=jnp.zeros((1, 40, 2, 16)))
    with pytest.raises(ValueError, match=r"value head dims differ: v has Dv=8 but v_slc has 4"):
        _run(k_slc=jnp.zeros((1, 40, 2, 8)), v_slc=jnp.zeros((1, 40, 2, 4)))


def test_mismatched_lengths_and_batches():
    with pytest.raises(ValueError, match=r"differ in batch or sequence length"):
        _run(k=jnp.zeros((1, 39, 2, 8)), v=jnp.zeros((1, 39, 2, 8)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_dtype(dtype):
    with pytest.raises(TypeError, match=r"q must be a floating-point array.*q\.dtype"):
        _run(q=jnp.zeros((1, 40, 4, 8), dtype))


def test_mismatched_dtypes():
    with pytest.raises(TypeError, match=r"q.dtype=float32 but k.dtype=bfloat16"):
        _run(k=jnp.zeros((1, 40, 2, 8), jnp.bfloat16))


def test_gates_shape():
    with pytest.raises(ValueError, match=r"gates must be \[B, T, N, 3\]"):
        _run(gates=jnp.zeros((1, 40, 4, 2)))


def test_empty_sequence():
    with pytest.raises(ValueError, match=r"empty sequence.*T=0"):
        inp = _inputs(t=1)
        _run(q=inp["q"][:, :0], k=inp["k"][:, :0], v=inp["v"][:, :0],
             gates=inp["gates"][:, :0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cmp_block_size=30, cmp_stride=16), r"cmp_stride must divide cmp_block_size"),
        (dict(slc_block_size=72, cmp_stride=16, cmp_block_size=32),
         r"cmp_stride must divide slc_block_size.*72"),
        (dict(cmp_block_size=64, slc_block_size=32), r"must not exceed slc_block_size"),
        (dict(slc_top_n=2), r"slc_top_n=2 is smaller than the 3 forced blocks"),
        (dict(window_size=0), r"window_size must be >= 1"),
        (dict(cmp_kind="max"), r"cmp_kind='max' is not one of"),
        (dict(kv_mode="tied"), r"kv_mode='tied' is not one of"),
    ],
)
def test_bad_block_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NSAConfig(**kwargs)


def test_non_integer_block_size():
    with pytest.raises(TypeError, match=r"cmp_block_size must be an int"):
        NSAConfig(cmp_block_size=32.0)


def test_compression_params_checked():
    cfg = NSAConfig(cmp_block_size=8, cmp_stride=4, slc_block_size=16, slc_top_n=4,
                    cmp_kind="linear")
    with pytest.raises(TypeError, match=r"cmp_params must be a dict with keys 'k' and 'v'"):
        _run(config=cfg)
    bad = {"k": {"w": jnp.zeros((2, 64, 8)), "b": jnp.zeros((2, 8))},
           "v": {"w": jnp.zeros((2, 63, 8)), "b": jnp.zeros((2, 8))}}
    inp = _inputs()
    with pytest.raises(ValueError, match=r"cmp_params\['v'\]\['w'\].shape=\(2, 63, 8\)"):
        nsa_attention(inp["q"], inp["k"], inp["v"], inp["gates"], bad, config=cfg)


def test_unknown_implementation():
    with pytest.raises(ValueError, match=r"unknown NSA implementation 'fastest'"):
        _run(implementation="fastest")


def test_model_config_errors():
    with pytest.raises(ValueError, match=r"num_heads=6 is not a multiple of num_kv_heads=4"):
        ModelConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"attention='sparse' is not one of"):
        ModelConfig(attention="sparse")
