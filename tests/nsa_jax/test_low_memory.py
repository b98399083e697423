"""``nsa_attention(..., low_memory=True)``: the branch-by-branch backward computes the same
function and gradients as the default path, on the reference and on the Triton kernels in
interpret mode, and its compiled program holds less at once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import nsa_attention, registry
from pallas_kernels import common, gpu_backend
from tests.nsa_jax.helpers import Case, make_inputs
from tests.pallas_kernels.lowering import pallas_eqns
from tests.tolerances import assert_close

CASES = [
    Case("G2_T100_mlp_separate", n=4, kh=2),
    Case("G16_T70_mean_shared", t=70, n=16, kh=1, kind="mean", kv_mode="shared"),
    Case("Dk8_Dv12_T45_linear", t=45, dk=8, dv=12, kind="linear"),
    Case("T6_no_cmp_token", t=6, n=4, kh=2),
]


def _loss_and_grads(inputs, config, implementation, low_memory):
    keys = [k for k in ("q", "k", "v", "gates", "cmp_params", "k_slc", "v_slc", "k_swa",
                        "v_swa") if k in inputs]
    ct = jax.random.normal(jax.random.key(7), inputs["q"].shape[:3] + inputs["v"].shape[-1:])

    def loss(*args):
        kw = dict(zip(keys, args, strict=True))
        out = nsa_attention(**kw, config=config, implementation=implementation,
                            low_memory=low_memory)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(keys))), has_aux=True))
    (_, out), grads = fn(*[inputs[k] for k in keys])
    return out, dict(zip(keys, grads, strict=True))


def _assert_grads_match(grads_lm, grads, dtype):
    """Every gradient of the low-memory path against the default's: f32 to 2e-5 (the order
    of the dq sum differs), bf16 within the suite's tolerance."""
    for name in grads:
        for a, b in zip(jax.tree.leaves(grads_lm[name]), jax.tree.leaves(grads[name]), strict=True):
            if dtype == jnp.float32:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5,
                                           atol=2e-6, err_msg=name)
            else:
                assert_close(a, b, dtype, what=f"d{name}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_low_memory_matches_default_reference(case, dtype):
    inputs = make_inputs(case, dtype)
    out, grads = _loss_and_grads(inputs, case.config, "reference", False)
    out_lm, grads_lm = _loss_and_grads(inputs, case.config, "reference", True)
    # The forward is the same computation; only the order of the dq sum differs.
    np.testing.assert_array_equal(np.asarray(out_lm), np.asarray(out))
    _assert_grads_match(grads_lm, grads, dtype)


# Partial recomputes: the named branches are recomputed, the others keep their residuals.
PARTIAL = ["window", "compressed,window", ("selected",), "selected,compressed"]


@pytest.mark.parametrize("low_memory", PARTIAL, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_partial_recompute_matches_default_reference(case, dtype, low_memory):
    inputs = make_inputs(case, dtype)
    out, grads = _loss_and_grads(inputs, case.config, "reference", False)
    out_lm, grads_lm = _loss_and_grads(inputs, case.config, "reference", low_memory)
    if dtype == jnp.float32:
        # The kept branches' outputs come from their stages under jax.vjp, fused differently.
        np.testing.assert_allclose(np.asarray(out_lm), np.asarray(out), rtol=1e-6, atol=1e-7)
    else:
        assert_close(out_lm, out, dtype, what="o")
    _assert_grads_match(grads_lm, grads, dtype)


@pytest.mark.parametrize("bad", ["windows", ("window", "dense"), 3])
def test_low_memory_rejects_unknown_branches(bad):
    case = CASES[0]
    inputs = make_inputs(case, jnp.float32)
    with pytest.raises((ValueError, TypeError), match="low_memory"):
        nsa_attention(**inputs, config=case.config, implementation="reference", low_memory=bad)


def test_low_memory_branch_names():
    from nsa_jax.config import ModelConfig, low_memory_branches

    assert low_memory_branches(False) == low_memory_branches(None) == ()
    assert low_memory_branches(True) == ("selected", "compressed", "window")
    assert low_memory_branches("window, compressed") == ("compressed", "window")
    assert low_memory_branches(["window"]) == ("window",)
    with pytest.raises(ValueError, match="'swa'"):
        ModelConfig(low_memory="swa")


@pytest.fixture(scope="module")
def interpret_backend():
    backend = gpu_backend.make_backend(interpret=True, name="low_memory_test_interpret",
                                       window="pallas", compressed="pallas")
    registry.register_backend(backend)  # platforms=(): no platform's default changes
    return backend.name


# (low_memory, dtype, kernel launches in the forward and backward traced together): the kept
# branches run once, the recomputed ones twice; the fold runs only when the selected branch
# is recomputed.
KERNEL_RUNS = [
    (True, jnp.float32, dict(nsa_cmp_fwd=2, nsa_swa_fwd=2, nsa_slc_fwd=1, nsa_slc_fwd_combined=1)),
    (True, jnp.bfloat16, dict(nsa_cmp_fwd=2, nsa_swa_fwd=2, nsa_slc_fwd=1,
                              nsa_slc_fwd_combined=1)),
    ("window", jnp.bfloat16, dict(nsa_cmp_fwd=1, nsa_swa_fwd=2, nsa_slc_fwd=1,
                                  nsa_slc_fwd_combined=0)),
    ("selected", jnp.bfloat16, dict(nsa_cmp_fwd=1, nsa_swa_fwd=1, nsa_slc_fwd=1,
                                    nsa_slc_fwd_combined=1)),
    ("compressed,window", jnp.bfloat16, dict(nsa_cmp_fwd=2, nsa_swa_fwd=2, nsa_slc_fwd=1,
                                             nsa_slc_fwd_combined=0)),
]


@pytest.mark.parametrize("low_memory,dtype,counts", KERNEL_RUNS,
                         ids=[f"{r[0]}-{jnp.dtype(r[1]).name}" for r in KERNEL_RUNS])
def test_low_memory_on_the_kernels(interpret_backend, low_memory, dtype, counts):
    """The Triton kernels (interpreted; the banded compressed and window kernels, as a
    low-memory run on a GPU would use) under the branch-by-branch backward, every branch
    recomputed or some, against the default path on the same kernels, with the kernels each
    one runs."""
    case = Case("G4_T90", t=90, n=8, kh=2, dk=16, dv=16)
    inputs = make_inputs(case, dtype, seed=3)
    extra = {k: inputs[k] for k in ("k_slc", "v_slc", "k_swa", "v_swa")}
    grad_fn = jax.grad(lambda q, k, v, g, p: nsa_attention(
        q, k, v, g, p, config=case.config, implementation=interpret_backend,
        low_memory=low_memory, **extra).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3))
    jaxpr = jax.make_jaxpr(grad_fn)(inputs["q"], inputs["k"], inputs["v"], inputs["gates"],
                                    inputs["cmp_params"])
    names = [e.params["name"] for e in pallas_eqns(jaxpr.jaxpr)]
    assert {n: names.count(n) for n in counts} == counts, names
    out, grads = _loss_and_grads(inputs, case.config, interpret_backend, False)
    out_lm, grads_lm = _loss_and_grads(inputs, case.config, interpret_backend, low_memory)
    assert_close(out_lm, out, dtype, what="o")
    for name in grads:
        for a, b in zip(jax.tree.leaves(grads_lm[name]), jax.tree.leaves(grads[name]), strict=True):
            assert_close(a, b, dtype, what=f"d{name}")


def test_low_memory_holds_less(monkeypatch):
    """XLA's buffer assignment for one forward+backward on CPU (reference stages, their query
    chunks made small so that the branches' tensors are not lost among the chunks' buffers):
    the branch-by-branch backward needs fewer temporary bytes than the default path, which
    holds the three branch outputs and cotangents together. (6.4 MB less here, 1.5 of the
    4.2 MB branch tensors; the reference's own per-chunk residuals make up the rest. The
    memory that counts, the GPU kernels' at 64k, is measured by ``benchmarks/kernels.py``.)"""
    monkeypatch.setattr(common.auto_chunk_size, "__defaults__", (1 << 16,))
    case = Case("T2048", t=2048, n=8, kh=2, dk=64, dv=64, l=32, d=16, lp=64, top_n=8, w=128,
                kind="mean")
    inputs = make_inputs(case, jnp.float32)
    inputs.pop("cmp_params")

    def temp_bytes(low_memory):
        def loss(q, k, v, gates):
            return jnp.sum(nsa_attention(q, k, v, gates, config=case.config,
                                         implementation="reference", low_memory=low_memory))

        args = [inputs[k] for k in ("q", "k", "v", "gates")]
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    branch_bytes = 2048 * 8 * 64 * 4  # one [T, N, Dv] float32 tensor
    default, lean = temp_bytes(False), temp_bytes(True)
    assert lean <= default - branch_bytes, (lean, default, branch_bytes)


def test_low_memory_is_ignored_with_aux():
    case = CASES[0]
    inputs = make_inputs(case, jnp.float32)
    out, aux = nsa_attention(**inputs, config=case.config, implementation="reference",
                             return_aux=True, low_memory=True)
    assert aux.indices.shape[:3] == (case.b, case.t, case.kh)
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(nsa_attention(**inputs, config=case.config,
                                                  implementation="reference")))



@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_model_with_low_memory(remat):
    """``ModelConfig.low_memory`` reaches every NSA layer: the model's loss and gradients
    equal the default's (float32, reference stages), with and without remat."""
    from flax import nnx

    from nsa_jax import ModelConfig, NSATransformer
    from nsa_jax.config import NSAConfig

    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_hidden=64, remat=remat, implementation="reference",
                      nsa=NSAConfig(cmp_block_size=8, cmp_stride=4, slc_block_size=16,
                                    slc_top_n=3, window_size=16))
    tokens = jax.random.randint(jax.random.key(2), (2, 50), 0, 259)

    def loss_and_grads(config):
        model = NSATransformer(config, rngs=nnx.Rngs(0))
        assert all(layer.attn.low_memory == config.low_memory for layer in model.blocks)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    l0, g0 = loss_and_grads(cfg)
    for low_memory in (True, "window"):
        l1, g1 = loss_and_grads(cfg.replace(low_memory=low_memory))
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)


SHARDED_SCRIPT = """
import json, jax, numpy as np
import configs
from benchmarks import train as bench
from nsa_jax import sharding
preset = configs.get_config("tiny")
mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])
out = {}
for low_memory in (False, True, "window"):
    model = preset.model.replace(low_memory=low_memory)
    state, step, batch_sharding, _ = bench.build(model, preset.optim, mesh)
    batch = jax.device_put(bench.synthetic_batch(jax.random.key(1), 8, 128, model.vocab_size),
                           batch_sharding)
    losses = []
    for _ in range(4):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    out[str(low_memory)] = losses
print("RESULT " + json.dumps(out))
"""


def test_low_memory_on_a_sharded_mesh():
    """Training steps of the tiny preset on 8 CPU devices (data, fsdp and tensor axes of 2,
    the NSA stages inside ``shard_map``) give the same losses with ``low_memory=True`` and
    ``low_memory="window"``."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    assert res["False"][0] != res["False"][-1]  # the steps train
    np.testing.assert_allclose(res["True"], res["False"], rtol=1e-6)
    np.testing.assert_allclose(res["window"], res["False"], rtol=1e-6)


@pytest.mark.parametrize("low_memory,fwd_runs", [
    (True, dict(compressed=2, selected=2, sliding_window=2)),
    ("window", dict(compressed=1, selected=1, sliding_window=2))], ids=["all", "window"])
def test_low_memory_on_the_tpu_kernels(low_memory, fwd_runs):
    """The Mosaic kernels (TPU interpret mode with race detection) under the branch-by-branch
    backward (every branch recomputed, or the window only), against the default path on the
    same kernels, f32."""
    import dataclasses

    from jax.experimental.pallas import tpu as pltpu

    from pallas_kernels import tpu_backend

    backend = dataclasses.replace(
        tpu_backend.make_backend(interpret=pltpu.InterpretParams(detect_races=True)),
        name="low_memory_test_tpu_interpret", platforms=())
    registry.register_backend(backend)
    case = Case("G4_T80", t=80, n=8, kh=2, dk=64, dv=64, kind="mean")
    inputs = make_inputs(case, jnp.float32, seed=5)
    extra = {k: inputs[k] for k in ("k_slc", "v_slc", "k_swa", "v_swa")}
    grad_fn = jax.grad(lambda q, k, v, g: nsa_attention(
        q, k, v, g, None, config=case.config, implementation=backend.name,
        low_memory=low_memory, **extra).sum(), argnums=(0, 1, 2, 3))
    jaxpr = jax.make_jaxpr(grad_fn)(inputs["q"], inputs["k"], inputs["v"], inputs["gates"])
    names = [e.params["name"] for e in pallas_eqns(jaxpr.jaxpr)]
    for branch, runs in fwd_runs.items():  # the kernels ran: forward once, or twice if rerun
        assert names.count(f"nsa_{branch}_fwd") == runs and f"nsa_{branch}_bwd_dq" in names, \
            names
    out, grads = _loss_and_grads(inputs, case.config, backend.name, False)
    out_lm, grads_lm = _loss_and_grads(inputs, case.config, backend.name, low_memory)
    np.testing.assert_allclose(np.asarray(out_lm), np.asarray(out), rtol=1e-6, atol=1e-6)
    for name in grads:
        for a, b in zip(jax.tree.leaves(grads_lm[name]), jax.tree.leaves(grads[name]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6,
                                       err_msg=name)


def test_low_memory_under_remat_keeps_the_selection():
    """Under a rematerialised block the default policy keeps the low-memory path's selection
    too (a name on the custom VJP's residual): one ``top_k`` per layer, as without it."""
    from flax import nnx

    from nsa_jax import NSATransformer
    from tests.nsa_jax.test_layers import MODEL, _count_primitive

    tokens = jax.random.randint(jax.random.key(5), (1, 40), 0, 259)
    for cfg in (MODEL.replace(remat=True, low_memory=True), MODEL.replace(low_memory=True),
                MODEL.replace(remat=True, low_memory="window")):
        graphdef, params, rest = nnx.split(NSATransformer(cfg, rngs=nnx.Rngs(0)), nnx.Param,
                                           ...)
        grads = jax.grad(lambda p, t, g=graphdef, r=rest: jnp.mean(nnx.merge(g, p, r)(t)))
        jaxpr = jax.make_jaxpr(grads)(params, tokens).jaxpr
        assert _count_primitive(jaxpr, "top_k") == cfg.num_layers, cfg


def test_low_memory_from_the_command_line():
    """``--set model.low_memory=...`` takes a bool or branch names, and rejects others."""
    from train.config import TrainConfig, apply_overrides

    base = TrainConfig()
    assert apply_overrides(base, ["model.low_memory=window"]).model.low_memory == "window"
    assert apply_overrides(base, ["model.low_memory=true"]).model.low_memory is True
    assert apply_overrides(
        base, ["model.low_memory=compressed,window"]).model.low_memory == "compressed,window"
    with pytest.raises(ValueError, match="low_memory"):
        apply_overrides(base, ["model.low_memory=dense"])
