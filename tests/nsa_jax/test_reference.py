"""The pure-jnp reference NSA against the independent NumPy oracle: outputs, selection, grads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from pallas_kernels.selection.reference import selection_scores, top_n_blocks
from tests.nsa_jax.helpers import Case, make_inputs, nsa_jit, run_oracle
from tests.tolerances import RTOL, assert_close, rel_err

CASES = [
    Case("G1_T100_mlp", n=2, kh=2),
    Case("G2_T31_linear_shared", t=31, n=4, kh=2, top_n=3, w=8, kind="linear",
         kv_mode="shared"),
    Case("G4_T257_B2_mean", b=2, t=257, n=8, kh=2, l=16, d=8, lp=32, top_n=5, w=40,
         kind="mean"),
    Case("G16_T100_mqa", n=16, kh=1, kv_mode="shared"),
    Case("T1", t=1, n=4, kh=2),
    Case("T6_no_cmp_token", t=6, n=4, kh=2),
    Case("l_eq_lp_eq_d", t=50, l=8, d=8, lp=8, top_n=3, w=5),
    Case("Dk8_Dv12", t=60, dk=8, dv=12, kind="linear"),
    Case("paper_ratios_T300", t=300, n=2, kh=1, l=32, d=16, lp=64, top_n=4, w=64),
]
DTYPES = [jnp.float32, jnp.bfloat16]


def _call(case: Case, inputs: dict, **kw):
    args = {k: v for k, v in inputs.items() if k not in ("q", "k", "v", "gates", "cmp_params")}
    return nsa_jit(inputs["q"], inputs["k"], inputs["v"], inputs["gates"],
                         inputs["cmp_params"], config=case.config, implementation="reference",
                         **args, **kw)


def _assert_selection_near_optimal(idx, scores, t_len, lp, slack):
    """Every chosen non-forced block scores within ``slack`` of every valid block left out."""
    b, t, kh, _ = idx.shape
    for bb in range(b):
        for tt in range(t_len):
            cur = tt // lp
            forced = {0, cur, cur - 1} - {-1}
            for h in range(kh):
                chosen = {int(j) for j in idx[bb, tt, h] if j >= 0}
                assert forced <= chosen, f"forced blocks missing at t={tt}: {chosen}"
                free = [j for j in chosen if j not in forced]
                left = [j for j in range(cur + 1) if j not in chosen]
                if free and left:
                    worst = min(scores[bb, tt, h, j] for j in free)
                    best_left = max(scores[bb, tt, h, j] for j in left)
                    assert worst >= best_left - slack, (
                        f"t={tt} h={h}: chose score {worst} over {best_left}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_matches_oracle(case: Case, dtype):
    inputs = make_inputs(case, dtype, seed=len(case.name))
    out, aux = _call(case, inputs, return_aux=True)
    assert out.dtype == dtype and out.shape == (case.b, case.t, case.n, case.dv)
    idx = np.asarray(aux.indices)
    assert idx.shape == (case.b, case.t, case.kh, case.top_n) and idx.dtype == np.int32

    ora = run_oracle(case, inputs)
    if dtype == jnp.float32:
        np.testing.assert_array_equal(np.sort(idx, -1), np.sort(ora["indices"], -1))
    else:
        _assert_selection_near_optimal(idx, ora["scores"], case.t, case.lp, slack=2e-2)
        ora = run_oracle(case, inputs, indices=idx)  # same blocks, compare the arithmetic

    for name in ("k_cmp", "v_cmp"):
        if ora[name].size:
            assert_close(getattr(aux, name), ora[name], dtype, name)
    fin = np.isfinite(ora["lse_cmp"])
    np.testing.assert_array_equal(np.isfinite(np.asarray(aux.lse_cmp)), fin)
    if fin.any():
        assert_close(np.asarray(aux.lse_cmp)[fin], ora["lse_cmp"][fin], dtype, "lse_cmp")
    for name in ("o_cmp", "o_slc", "o_swa"):
        if np.any(ora[name]):
            assert_close(getattr(aux, name), ora[name], dtype, name)
        else:
            assert not np.asarray(getattr(aux, name), np.float32).any(), f"{name} must be 0"
    assert_close(out, ora["out"], dtype, "out")


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[8]], ids=lambda c: c.name)
def test_selection_scores_match_oracle(case: Case):
    inputs = make_inputs(case, jnp.float32, seed=3)
    _, aux = _call(case, inputs, return_aux=True)
    scores = selection_scores(inputs["q"], aux.k_cmp, aux.lse_cmp, cmp_block_size=case.l,
                              cmp_stride=case.d, slc_block_size=case.lp)
    ora = run_oracle(case, inputs)
    assert_close(scores, ora["scores"], jnp.float32, "scores")


# ----------------------------------------------------------------------------------------------
# Gradients: the reference's VJP against central differences of the float64 oracle, along
# random directions, with the selection held fixed (the spec: no gradient through the choice).

GRAD_CASES = [
    Case("grad_separate_mlp", t=40, n=4, kh=2, dk=4, dv=6, l=8, d=4, lp=8, top_n=3, w=8),
    Case("grad_shared_linear", t=37, n=4, kh=1, dk=4, dv=4, l=8, d=4, lp=16, top_n=3, w=12,
         kind="linear", kv_mode="shared"),
    Case("grad_G1_mean_B2", b=2, t=29, n=2, kh=2, dk=4, dv=4, l=4, d=4, lp=4, top_n=4, w=6,
         kind="mean"),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.name)
def test_gradients_match_oracle_finite_differences(case: Case):
    inputs = make_inputs(case, jnp.float32, seed=5)
    ct = np.asarray(jax.random.normal(jax.random.key(9), (case.b, case.t, case.n, case.dv)))
    _, aux = _call(case, inputs, return_aux=True)
    idx = np.asarray(aux.indices)

    def loss_ref(inp):
        return jnp.sum(_call(case, inp) * ct)

    grads = jax.grad(loss_ref)(inputs)

    def loss_oracle(inp):
        return float(np.sum(run_oracle(case, inp, indices=idx)["out"] * ct))

    rng = np.random.default_rng(0)
    eps = 1e-4
    flat, treedef = jax.tree.flatten(inputs)
    gflat = jax.tree.leaves(grads)
    assert len(gflat) == len(flat)
    analytic, numeric = [], []
    for i, (x, g) in enumerate(zip(flat, gflat, strict=True)):
        for _ in range(2):
            u = rng.standard_normal(x.shape)
            u /= np.linalg.norm(u)
            # Float64 NumPy arrays all the way into the oracle: no rounding to f32.
            plus = [np.asarray(y, np.float64) for y in flat]
            minus = list(plus)
            plus[i] = plus[i] + eps * u
            minus[i] = minus[i] - eps * u
            fp = loss_oracle(jax.tree.unflatten(treedef, plus))
            fm = loss_oracle(jax.tree.unflatten(treedef, minus))
            numeric.append((fp - fm) / (2 * eps))
            analytic.append(float(np.sum(np.asarray(g, np.float64) * u)))
    analytic, numeric = np.array(analytic), np.array(numeric)
    err = rel_err(analytic, numeric)
    assert err < RTOL[jnp.dtype(jnp.float32)], (
        f"directional derivatives differ: rel err {err:.2e}\n{analytic}\n{numeric}")
    # Every input must receive gradient (nothing silently detached).
    for name, g in grads.items():
        norm = sum(float(np.linalg.norm(np.asarray(x))) for x in jax.tree.leaves(g))
        assert norm > 0 or (name == "cmp_params" and case.kind == "mean"), f"{name}: zero grad"


def test_gradients_check_grads_fp32():
    """``jax.test_util.check_grads`` (reverse mode) on a tiny fp32 case, all inputs at once."""
    case = Case("check_grads", t=24, n=2, kh=1, dk=4, dv=4, l=4, d=2, lp=4, top_n=3, w=5)
    inputs = make_inputs(case, jnp.float32, seed=1)
    names = ("q", "k", "v", "gates", "k_slc", "v_slc", "k_swa", "v_swa")

    def f(*arrays):
        inp = dict(inputs, **dict(zip(names, arrays, strict=True)))
        return _call(case, inp)

    jtu.check_grads(f, tuple(inputs[n] for n in names), order=1, modes=("rev",),
                              eps=1e-3, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("case", [GRAD_CASES[0], GRAD_CASES[1]], ids=lambda c: c.name)
def test_bf16_gradients_track_fp32(case: Case):
    """bf16 inputs give the fp32 gradients (tied to the oracle above) within the bf16 tolerance."""
    inputs32 = make_inputs(case, jnp.float32, seed=7)
    inputs16 = {k: (v.astype(jnp.bfloat16) if k in ("q", "k", "v", "k_slc", "v_slc", "k_swa",
                                                     "v_swa") else v)
                for k, v in inputs32.items()}
    # The bf16 selection fixes the blocks for both runs, so only arithmetic differs.
    ct = jax.random.normal(jax.random.key(2), (case.b, case.t, case.n, case.dv))
    g16 = jax.grad(lambda inp: jnp.sum(_call(case, inp).astype(jnp.float32) * ct))(inputs16)
    up = jax.tree.map(lambda x: x.astype(jnp.float32), inputs16)
    g32 = jax.grad(lambda inp: jnp.sum(_call(case, inp) * ct))(up)
    for name in ("q", "k", "v", "gates"):
        assert_close(g16[name], g32[name], jnp.bfloat16, f"grad {name}")
    # One relative error over all phi parameters: the key bias b2 has an exactly-zero gradient
    # (softmax is shift-invariant), so a per-leaf ratio would measure rounding against zero.
    def flat(tree):
        return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])

    assert_close(flat(g16["cmp_params"]), flat(g32["cmp_params"]), jnp.bfloat16,
                 "grad cmp_params")


def test_top_k_ties_go_to_lower_index():
    scores = jnp.zeros((1, 1, 1, 10))  # all equal
    idx = top_n_blocks(scores, 9 * 16, slc_block_size=16, top_n=5)
    # Forced: 0, 9, 8; then the two lowest remaining indices.
    assert sorted(np.asarray(idx)[0, 0, 0].tolist()) == [0, 1, 2, 8, 9]
