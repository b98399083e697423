"""Properties the spec implies, checked on the reference without the oracle."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig, nsa_attention
from nsa_jax.compression import init_compression_params
from pallas_kernels.compressed.reference import compressed_attention
from pallas_kernels.selected.reference import selected_attention
from pallas_kernels.sliding_window.reference import sliding_window_attention
from tests.nsa_jax.helpers import Case, dense_causal, make_inputs, nsa_jit
from tests.tolerances import assert_close


def _call(case, inputs, **kw):
    extra = {k: v for k, v in inputs.items() if k not in ("q", "k", "v", "gates", "cmp_params")}
    return nsa_jit(inputs["q"], inputs["k"], inputs["v"], inputs["gates"],
                         inputs["cmp_params"], config=case.config, **extra, **kw)


def test_all_gates_zero_gives_zero():
    case = Case("zero_gates", t=70)
    inputs = make_inputs(case, jnp.float32)
    inputs["gates"] = jnp.zeros_like(inputs["gates"])
    out = _call(case, inputs)
    assert np.all(np.asarray(out) == 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_selected_branch_is_full_attention_when_everything_is_selected(dtype):
    # n * l' >= T: every block is selected, so the branch is plain causal attention.
    case = Case("all_selected", t=61, n=4, kh=2, lp=16, top_n=4, kv_mode="shared")
    inputs = make_inputs(case, dtype)
    _, aux = _call(case, inputs, return_aux=True)
    ref = dense_causal(np.asarray(inputs["q"], np.float32), np.asarray(inputs["k"], np.float32),
                       np.asarray(inputs["v"], np.float32))
    assert_close(aux.o_slc, ref, dtype, "o_slc vs causal attention")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_window_branch_is_full_attention_when_window_covers_sequence(dtype):
    case = Case("wide_window", t=45, w=45, kv_mode="shared")
    inputs = make_inputs(case, dtype)
    _, aux = _call(case, inputs, return_aux=True)
    ref = dense_causal(np.asarray(inputs["q"], np.float32), np.asarray(inputs["k"], np.float32),
                       np.asarray(inputs["v"], np.float32))
    assert_close(aux.o_swa, ref, dtype, "o_swa vs causal attention")


def test_selection_invariants():
    """Forced blocks always there, no duplicates, -1 exactly when blocks run out."""
    case = Case("invariants", b=2, t=200, n=8, kh=2, lp=16, top_n=6)
    _, aux = _call(case, make_inputs(case, jnp.float32), return_aux=True)
    idx = np.asarray(aux.indices)
    for t in range(case.t):
        cur = t // case.lp
        n_valid = min(cur + 1, case.top_n)
        for row in idx[:, t].reshape(-1, case.top_n):
            chosen = [int(j) for j in row if j >= 0]
            assert len(chosen) == len(set(chosen)), f"duplicate at t={t}: {row}"
            assert len(chosen) == n_valid, f"t={t}: {row} should hold {n_valid} blocks"
            assert {0, cur, max(cur - 1, 0)} <= set(chosen), f"forced missing at t={t}: {row}"
            assert all(j <= cur for j in chosen), f"future block at t={t}: {row}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_no_nan_forward_or_backward_without_compressed_tokens(dtype):
    # T < l: the compressed branch is empty for every query; nothing may be NaN.
    case = Case("empty_cmp", t=7, l=8, d=4, lp=16, top_n=3)
    inputs = make_inputs(case, dtype)
    out, aux = _call(case, inputs, return_aux=True)
    assert np.all(np.asarray(aux.o_cmp, np.float32) == 0)
    assert np.all(np.isneginf(np.asarray(aux.lse_cmp)))
    grads = jax.grad(lambda inp: jnp.sum(_call(case, inp).astype(jnp.float32)))(inputs)
    for leaf in jax.tree.leaves((out, grads)):
        assert not np.isnan(np.asarray(leaf, np.float32)).any()


def test_no_nan_with_extreme_logits():
    case = Case("extreme", t=90)
    inputs = make_inputs(case, jnp.float32)
    inputs["q"] = inputs["q"] * 300.0  # saturates every softmax
    out = _call(case, inputs)
    grads = jax.grad(lambda inp: jnp.sum(_call(case, inp)))(inputs)
    for leaf in jax.tree.leaves((out, grads)):
        assert np.isfinite(np.asarray(leaf)).all()


def test_chunking_does_not_change_results():
    """The twins' query chunk size is a memory knob only."""
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (2, 53, 4, 8))
    k = jax.random.normal(ks[1], (2, 53, 2, 8))
    v = jax.random.normal(ks[2], (2, 53, 2, 8))
    for chunk in (1, 7, 64):
        o1, l1 = sliding_window_attention(q, k, v, window_size=9, chunk_size=chunk)
        o2, l2 = sliding_window_attention(q, k, v, window_size=9, chunk_size=53)
        assert_close(o1, o2, jnp.float32, f"window chunk {chunk}")
        assert_close(l1, l2, jnp.float32, f"window lse chunk {chunk}")
        kc, vc = k[:, :12], v[:, :12]
        o1, _ = compressed_attention(q, kc, vc, block_size=8, stride=4, chunk_size=chunk)
        o2, _ = compressed_attention(q, kc, vc, block_size=8, stride=4, chunk_size=53)
        assert_close(o1, o2, jnp.float32, f"compressed chunk {chunk}")
        idx = jnp.broadcast_to(jnp.array([0, -1, 1, 2], jnp.int32), (2, 53, 2, 4))
        o1, _ = selected_attention(q, k, v, idx, block_size=16, chunk_size=chunk)
        o2, _ = selected_attention(q, k, v, idx, block_size=16, chunk_size=53)
        assert_close(o1, o2, jnp.float32, f"selected chunk {chunk}")


def test_nsa_is_causal():
    """Changing the future never changes the past, through all three branches and phi."""
    case = Case("causal", t=80, kind="mlp")
    inputs = make_inputs(case, jnp.float32)
    out = np.asarray(_call(case, inputs))
    cut = 47
    changed = {k: (v.at[:, cut:].set(v[:, cut:] * -3.0 + 1.0) if k != "cmp_params" else v)
               for k, v in inputs.items()}
    out2 = np.asarray(_call(case, changed))
    np.testing.assert_array_equal(out[:, :cut], out2[:, :cut])
    assert not np.allclose(out[:, cut:], out2[:, cut:])


@pytest.mark.slow
def test_reference_forward_backward_16k_on_cpu():
    """The issue's scale check: T=16k, HQ=8, HKV=2, D=64, paper config, fwd + bwd on CPU."""
    b, t, n, kh, d = 1, 16384, 8, 2, 64
    cfg = NSAConfig()  # l=32, d=16, l'=64, n=16, w=512, mlp phi, separate K/V
    ks = jax.random.split(jax.random.key(0), 10)
    q = jax.random.normal(ks[0], (b, t, n, d))
    kv = [jax.random.normal(ks[i], (b, t, kh, d)) for i in range(1, 7)]
    gates = jax.nn.sigmoid(jax.random.normal(ks[7], (b, t, n, 3)))
    params = {p: init_compression_params(ks[8 + i], kind="mlp", num_kv_heads=kh,
                                         block_size=cfg.cmp_block_size, head_dim=d)
              for i, p in enumerate(("k", "v"))}

    @jax.jit
    def loss_and_grads(q, kv, gates, params):
        def loss(q, kv, gates, params):
            out = nsa_attention(q, kv[0], kv[1], gates, params, config=cfg, k_slc=kv[2],
                                v_slc=kv[3], k_swa=kv[4], v_swa=kv[5],
                                implementation="reference")
            return jnp.mean(out**2)
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, kv, gates, params)

    start = time.perf_counter()
    value, grads = jax.block_until_ready(loss_and_grads(q, kv, gates, params))
    elapsed = time.perf_counter() - start
    assert np.isfinite(float(value))
    for leaf in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(leaf)).all()
    assert float(jnp.linalg.norm(grads[0])) > 0
    print(f"16k reference fwd+bwd on CPU: {elapsed:.1f} s (compile included)")
