"""The model as a pure function of its parameters, and the jitted, sharded train/eval steps.

Parameters and optimiser state are plain nested dicts (``nnx.to_pure_dict``), sharded by the
rules table of :mod:`nsa_jax.sharding`. The training state is ``{"params", "opt_state",
"step"}``; ``train_step(state, batch) -> (state, metrics)`` is jitted with explicit shardings
and donates ``state``.

Attention kernels cannot be partitioned by XLA, so with ``mesh.shard_attention`` each NSA stage
runs per shard inside ``jax.shard_map`` (batch over ``data`` and ``fsdp``, heads over
``tensor``): :func:`sharded_backend` registers a backend that wraps the platform's stage
implementations that way, and the model is built with that backend as its implementation. The
model code is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nsa_jax import registry, sharding
from nsa_jax.config import ModelConfig
from nsa_jax.model import NSATransformer

# Output ranks of each NSA stage (all arrays are [B, T, heads, ...] or [B, T, heads]).
_STAGE_OUT_RANKS = {
    "compressed_attention": (4, 3),
    "select_blocks": 4,
    "selected_attention": (4, 3),
    "sliding_window_attention": (4, 3),
}
_counter = itertools.count()


def _head_spec(rank: int, mesh: Mesh) -> PartitionSpec:
    heads = "tensor" if mesh.shape["tensor"] > 1 else None
    if rank < 3:
        return PartitionSpec()
    return PartitionSpec(sharding.LOGICAL_AXIS_RULES["batch"], None, heads, *([None] * (rank - 3)))


def sharded_backend(mesh: Mesh, implementation: str | None = None) -> str:
    """Registers a backend running each stage of ``implementation`` per shard; returns its name.

    Every array argument and result of a stage is ``[B, T or C, heads, ...]``: batch is split
    over ``(data, fsdp)`` and heads (query and KV heads alike, so GQA groups stay whole) over
    ``tensor``. Inside, the stages of the wrapped chain (kernels with reference fallback) see
    only their shard.
    """
    inner = registry.resolve(implementation)

    def wrap(stage: str):
        out_ranks = _STAGE_OUT_RANKS[stage]
        out_specs = (tuple(_head_spec(r, mesh) for r in out_ranks)
                     if isinstance(out_ranks, tuple) else _head_spec(out_ranks, mesh))

        def run(*args, **kwargs):
            in_specs = tuple(_head_spec(a.ndim, mesh) for a in args)
            body = functools.partial(registry.call_stage, inner, stage, **kwargs)
            return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 check_vma=False)(*args)

        return run

    name = f"sharded_{next(_counter)}"
    backend = registry.Backend(name=name, **{s: wrap(s) for s in registry.STAGES})
    registry.register_backend(backend)
    return name


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """The model split into a static graph and a parameter template."""

    graphdef: Any
    template: Any  # nnx.State of ShapeDtypeStruct
    config: ModelConfig

    @classmethod
    def create(cls, config: ModelConfig) -> ModelFns:
        abstract = nnx.eval_shape(lambda: NSATransformer(config, rngs=nnx.Rngs(0)))
        graphdef, template = nnx.split(abstract, nnx.Param)
        return cls(graphdef, template, config)

    def init(self, key: jax.Array, *, embed_std: float | None = None) -> dict:
        """Fresh parameters (a pure dict) from ``key``.

        Args:
          key: PRNG key.
          embed_std: rescale the token embedding to this standard deviation (``None``: keep
            the model's init).
        """
        model = NSATransformer(self.config, rngs=nnx.Rngs(params=key))
        params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
        if embed_std is not None:
            emb = params["embed"]["embedding"]
            params["embed"]["embedding"] = (emb * embed_std).astype(emb.dtype)
        return params

    def abstract_params(self) -> dict:
        return nnx.to_pure_dict(self.template)

    def apply(self, params: dict, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Logits ``[B, T, V]`` (f32) of ``tokens`` ``[B, T]`` at RoPE ``positions``."""
        state = jax.tree.map(lambda x: x, self.template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)(tokens, positions)


def token_losses(fns: ModelFns, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Per-token cross entropy ``[B, T]`` (nats) and the logits' argmax ``[B, T]``."""
    logits = fns.apply(params, batch["tokens"], batch["positions"])  # [B, T, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return ce, jnp.argmax(logits, axis=-1)


def make_train_step(fns: ModelFns, tx: optax.GradientTransformation, schedule, *,
                    grad_accum: int, mesh: Mesh):
    """``train_step(state, batch) -> (state, metrics)``, not yet jitted.

    ``batch`` holds ``tokens``, ``positions``, ``targets`` (``int32 [B, T]``) and ``weights``
    (``float32 [B, T]``). The loss is the weighted mean over all ``B`` rows; with
    ``grad_accum = A`` the rows ``i::A`` form micro-batch ``i``, gradients of the summed loss
    are accumulated over micro-batches in a ``lax.scan`` and divided by the total weight once,
    so the update does not depend on ``A`` (up to float rounding).
    """
    micro_spec = NamedSharding(mesh, sharding.batch_spec(2))

    def summed_loss(params, mb):
        ce, _ = token_losses(fns, params, mb)
        return (ce * mb["weights"]).sum(), mb["weights"].sum()

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def train_step(state, batch):
        params = state["params"]
        if grad_accum == 1:
            (loss_sum, count), grads = grad_fn(params, batch)
        else:
            def split(x):  # [B, T] -> [A, B/A, T]; row r goes to micro-batch r % A
                b = x.shape[0]
                return x.reshape(b // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

            micro = jax.tree.map(split, batch)

            def body(carry, mb):
                mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, micro_spec), mb)
                (loss_i, count_i), g = grad_fn(params, mb)
                acc_l, acc_c, acc_g = carry
                return (acc_l + loss_i, acc_c + count_i, jax.tree.map(jnp.add, acc_g, g)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (loss_sum, count), grads = (lambda t: ((t[0], t[1]), t[2]))(
                jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zeros), micro)[0])
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1}
        metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state["step"]), "tokens": count}
        return new_state, metrics

    return train_step


def make_eval_step(fns: ModelFns):
    """``eval_step(params, batch)``: summed loss, target and byte counts, answer accuracy.

    ``batch`` may carry ``answer_mask`` ``[B, T]`` (bool as float): then ``correct`` counts the
    rows whose every answer token is the argmax prediction.
    """

    def eval_step(params, batch):
        ce, pred = token_losses(fns, params, batch)
        w = batch["weights"]
        out = {"loss_sum": (ce * w).sum(), "count": w.sum(),
               "bytes": (w * (batch["targets"] < 256)).sum()}
        if "answer_mask" in batch:
            mask = batch["answer_mask"] > 0
            hit = jnp.where(mask, pred == batch["targets"], True).all(axis=-1)
            out["correct"] = (hit & mask.any(axis=-1)).sum()
            out["examples"] = mask.any(axis=-1).sum()
        return out

    return eval_step


def state_shardings(abstract_state, mesh: Mesh):
    """``NamedSharding`` pytree for a state ``{"params", "opt_state", "step"}``."""
    return sharding.named_shardings(abstract_state, mesh)
