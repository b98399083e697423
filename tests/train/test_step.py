"""The train step itself: bf16 compute keeps f32 master weights; the schedule's shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from nsa_jax import sharding
from tests.train.helpers import micro_config
from train import optim, step
from train.config import OptimConfig


def test_bf16_compute_updates_f32_master_weights():
    cfg = micro_config("unused", "unused")
    model = cfg.model.replace(dtype="bfloat16", param_dtype="float32")
    fns = step.ModelFns.create(model)
    tx = optim.make_optimizer(cfg.optim, 10)
    schedule = optim.learning_rate_schedule(cfg.optim, 10)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    params = fns.init(jax.random.key(0))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    before = jax.tree.map(np.asarray, params)
    train_step = jax.jit(step.make_train_step(fns, tx, schedule, grad_accum=1, mesh=mesh),
                         out_shardings=(None, NamedSharding(mesh, PartitionSpec())))
    tokens = jax.random.randint(jax.random.key(1), (8, 65), 0, 256)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": jnp.broadcast_to(jnp.arange(64), (8, 64)),
             "weights": jnp.ones((8, 64), jnp.float32)}
    state, metrics = train_step(state, batch)
    state, metrics = train_step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 2
    leaves = jax.tree.leaves(state["params"])
    assert all(x.dtype == jnp.float32 for x in leaves)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state["params"],
                         before)
    assert min(jax.tree.leaves(moved)) > 0  # every parameter received an update


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lr = optim.learning_rate_schedule(cfg, 100)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    assert float(lr(50)) < 1e-3
    np.testing.assert_allclose(float(lr(100)), 1e-4, rtol=1e-5)
    mask = optim.decay_mask({"w": jnp.ones((2, 2)), "scale": jnp.ones(2)})
    assert mask == {"w": True, "scale": False}
