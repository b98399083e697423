"""The logical-axis rules table applied to model parameters and optimiser state."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

import configs
from nsa_jax import sharding
from train import optim, step


def abstract_state():
    cfg = configs.get_config("tiny")
    fns = step.ModelFns.create(cfg.model)
    tx = optim.make_optimizer(cfg.optim, 10)

    def init(key):
        params = fns.init(key)
        return {"params": params, "opt_state": tx.init(params)}

    return jax.eval_shape(init, jax.random.key(0))


def test_rules_shard_params_by_logical_axis():
    state = abstract_state()
    mesh = {"data": 1, "fsdp": 2, "tensor": 2}
    specs, notes = sharding.param_partition_specs(state["params"], mesh)
    block = specs["blocks"][0]
    assert block["attn"]["q_proj"]["kernel"] == P("fsdp", "tensor")
    assert block["attn"]["o_proj"]["kernel"] == P("tensor", "fsdp")
    assert block["mlp"]["down"]["kernel"] == P("tensor", "fsdp")
    assert block["attn_norm"]["scale"] == P(None)
    assert all(all(e is None for e in s) for s in block["attn"]["compressor"].values())
    # 259 byte tokens do not split over tensor=2: replicated, and reported
    assert specs["embed"]["embedding"] == P(None, "fsdp")
    assert "embed/embedding" in notes and "not divisible" in notes["embed/embedding"][0]


def test_axes_of_size_one_are_not_named():
    specs, notes = sharding.param_partition_specs(abstract_state()["params"],
                                                  {"data": 8, "fsdp": 1, "tensor": 1})
    assert all(s == P(*([None] * len(s))) for s in jax.tree.leaves(
        specs, is_leaf=lambda x: isinstance(x, P)))
    assert not notes


def test_optimizer_moments_shard_like_their_parameters():
    state = abstract_state()
    mesh = {"data": 1, "fsdp": 2, "tensor": 2}
    specs, _ = sharding.param_partition_specs(state, mesh)
    flat = {sharding.path_string(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, P))}
    q = [s for path, s in flat.items() if path.endswith("blocks/1/attn/q_proj/kernel")]
    assert len(q) == 3 and all(s == P("fsdp", "tensor") for s in q)  # param, mu, nu
    counts = [s for path, s in flat.items() if path.endswith("count")]
    assert counts and all(s == P() for s in counts)


def test_unknown_logical_axis_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="logical axis 'sequence' has no rule"):
        sharding.logical_to_spec(("sequence",), (8,), {"data": 2})
