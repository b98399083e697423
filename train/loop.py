"""The training loop: mesh, data, sharded state, jitted step, evaluation, checkpoints, logs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from nsa_jax import sharding
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import eval as eval_lib
from train import optim, step
from train.config import TrainConfig


@dataclasses.dataclass
class RunResult:
    """What a run did: per-step losses (of the steps this call ran), evaluations, paths."""

    losses: dict[int, float]
    first_step: int
    last_step: int
    evals: dict[int, dict[str, float]]
    output_dir: str
    checkpoint_dir: str
    tensorboard_dir: str
    tokens_per_s: float
    wall_s: float
    unigram_loss: float
    num_params: int


def local_rows(batch_sharding: NamedSharding, num_rows: int) -> list[int]:
    """Global batch rows held by this process's devices (a contiguous range)."""
    index_map = batch_sharding.addressable_devices_indices_map((num_rows, 1))
    rows = sorted({r for idx in index_map.values() for r in range(*idx[0].indices(num_rows))})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(f"this process's batch rows {rows} are not contiguous; use a mesh whose "
                         "batch axes follow process order")
    return rows


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _prepare_corpus(cfg: TrainConfig) -> data_lib.Corpus:
    if jax.process_index() == 0:
        data_lib.prepare(cfg.data)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("nsa_train_prepare_data")
    return data_lib.Corpus.load(cfg.data)


def run(cfg: TrainConfig, *, stop_after: int | None = None, progress: str = "bar",
        tensorboard: bool = True) -> RunResult:
    """Trains ``cfg`` (resuming from its run directory when allowed); returns a summary.

    Args:
      cfg: the resolved configuration.
      stop_after: stop (and checkpoint) after this global step, as if interrupted there.
      progress: on process 0, ``"bar"`` (a progress bar), ``"lines"`` (a log line every
        ``log_every`` steps) or ``"none"``.
      tensorboard: write TensorBoard event files under ``<output_dir>/tb``.
    """
    if progress not in ("bar", "lines", "none"):
        raise ValueError(f"progress={progress!r} is not one of ('bar', 'lines', 'none')")
    t_start = time.time()
    sizes = cfg.validate_for_devices(jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh(sizes)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            f.write(cfg.to_json())
    _log(f"config {cfg.name}:\n{cfg.to_json()}")
    _log(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} in "
         f"{jax.process_count()} process(es); mesh {sizes}")

    corpus = _prepare_corpus(cfg)
    unigram = data_lib.unigram_entropy(corpus.train)
    _log(f"data: {len(corpus.train)} train / {len(corpus.validation)} validation documents "
         f"({corpus.train_bytes / 1e6:.1f} MB prepared) in {corpus.data_dir}; unigram "
         f"baseline {unigram:.3f} nats/token")

    model_cfg = cfg.model
    if cfg.mesh.shard_attention and model_cfg.attention == "nsa" and mesh.size > 1:
        model_cfg = model_cfg.replace(
            implementation=step.sharded_backend(mesh, model_cfg.implementation))
    fns = step.ModelFns.create(model_cfg)
    schedule = optim.learning_rate_schedule(cfg.optim, cfg.steps)
    tx = optim.make_optimizer(cfg.optim, cfg.steps)

    def init_state(key):
        params = fns.init(key, embed_std=cfg.embed_init_std)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

    key = jax.random.key(cfg.seed)
    abstract = jax.eval_shape(init_state, key)
    shardings = step.state_shardings(abstract, mesh)
    _, notes = sharding.param_partition_specs(abstract["params"], sizes)
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract["params"]))
    _log(f"model: {num_params / 1e6:.2f}M parameters, attention={cfg.model.attention}"
         + (f"; replicated (not divisible): {sorted(notes)}" if notes else ""))

    b, t, accum = cfg.batch_size, cfg.seq_len, cfg.grad_accum
    batch_sharding = NamedSharding(mesh, sharding.batch_spec(2))
    rows = local_rows(batch_sharding, b)
    eval_rows_n = b // accum
    eval_rows = local_rows(batch_sharding, eval_rows_n)

    def put_with(num_rows):
        def put(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
            return {k: jax.make_array_from_process_local_data(batch_sharding, v,
                                                              (num_rows, *v.shape[1:]))
                    for k, v in batch.items()}
        return put

    put, put_eval = put_with(b), put_with(eval_rows_n)
    train_iter = data_lib.make_batches(corpus.train, cfg.data, rows=rows, num_rows=b,
                                       seq_len=t, seed=cfg.seed)

    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    mngr = None
    if cfg.checkpoint.every_steps or cfg.checkpoint.resume:
        mngr = ckpt_lib.manager(ckpt_dir, max_to_keep=cfg.checkpoint.max_to_keep,
                                async_save=cfg.checkpoint.async_save)
    existing = mngr.latest_step() if mngr is not None else None
    if existing is not None and not cfg.checkpoint.resume:
        raise ValueError(f"{ckpt_dir} already holds checkpoints up to step {existing}; resume "
                         "with checkpoint.resume=true or choose another train.output_dir")
    latest = existing if cfg.checkpoint.resume else None
    if latest is not None:
        target = ckpt_lib.abstract_with_shardings(abstract, shardings)
        state, _ = ckpt_lib.restore(mngr, latest, target, train_iter)
        _log(f"resumed from step {latest} in {ckpt_dir}")
    else:
        state = jax.jit(init_state, out_shardings=shardings)(key)
    first = int(jax.device_get(state["step"]))
    if first >= cfg.steps:
        _log(f"{ckpt_dir} is already at step {first} of train.steps={cfg.steps}: nothing to "
             "train (raise train.steps or choose another train.output_dir)")

    replicated = NamedSharding(mesh, PartitionSpec())
    train_step = jax.jit(
        step.make_train_step(fns, tx, schedule, grad_accum=accum, mesh=mesh),
        in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
        donate_argnums=(0,))
    eval_step = jax.jit(step.make_eval_step(fns), out_shardings=replicated)

    writer = None
    tb_dir = os.path.join(cfg.output_dir, "tb")
    if tensorboard and jax.process_index() == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(tb_dir)

    def evaluate(at: int) -> dict[str, float]:
        res = eval_lib.held_out(eval_step, state["params"], corpus.validation, cfg,
                                rows=eval_rows, num_rows=eval_rows_n, put=put_eval,
                                batches=cfg.eval.batches)
        if cfg.eval.passkey_examples:
            try:
                res.update(eval_lib.passkey(eval_step, state["params"], cfg, rows=eval_rows,
                                            num_rows=eval_rows_n, put=put_eval,
                                            examples=cfg.eval.passkey_examples))
            except ValueError:  # the passkey prompt does not fit in seq_len
                pass
        if writer is not None:
            for k, v in res.items():
                writer.add_scalar(f"eval/{k}", v, at)
        return res

    last = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = None
    if progress == "bar" and jax.process_index() == 0 and sys.stderr is not None:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=first, unit="step", dynamic_ncols=True,
                   desc=cfg.name, mininterval=1.0)
    losses: dict[int, float] = {}
    pending: list[tuple[int, dict]] = []
    evals: dict[int, dict[str, float]] = {}
    tokens_per_step = b * t
    t_loop, timed_steps, t_mark, steps_mark = None, 0, None, 0
    paused_s = 0.0  # evaluation time, left out of tokens/s

    def flush(s_now: int):
        nonlocal t_mark, steps_mark
        if not pending:
            return
        host = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, host, strict=True):
            losses[s] = float(m["loss"])
        now, rate = time.time(), 0.0
        if t_mark is not None and s_now > steps_mark:
            rate = (s_now - steps_mark) * tokens_per_step / (now - t_mark)
            t_mark, steps_mark = now, s_now
        m = host[-1]
        if bar is not None:
            bar.set_postfix(loss=f"{float(m['loss']):.3f}", tok_s=f"{rate:,.0f}",
                            refresh=False)
        elif progress == "lines" and jax.process_index() == 0:
            print(f"step {s_now}/{cfg.steps}: loss {float(m['loss']):.3f}, "
                  f"{rate:,.0f} tokens/s", flush=True)
        if writer is not None:
            for s_i, m_i in zip([s for s, _ in pending], host, strict=True):
                writer.add_scalar("train/loss", float(m_i["loss"]), s_i)
            writer.add_scalar("train/grad_norm", float(m["grad_norm"]), s_now)
            writer.add_scalar("train/learning_rate", float(m["learning_rate"]), s_now)
            if rate:
                writer.add_scalar("train/tokens_per_s", rate, s_now)
        pending.clear()

    for s in range(first, last):
        batch = put(data_lib.model_inputs(next(train_iter)))
        state, metrics = train_step(state, batch)
        pending.append((s + 1, metrics))
        if s == first:  # the first step compiles: time the rest
            jax.block_until_ready(metrics)
            t_loop, t_mark, steps_mark = time.time(), time.time(), s + 1
        else:
            timed_steps += 1
        done = s + 1
        if done % cfg.log_every == 0 or done == last:
            flush(done)
        if bar is not None:
            bar.update(1)
        if cfg.eval.every_steps and (done % cfg.eval.every_steps == 0 or done == cfg.steps):
            flush(done)
            t_eval = time.time()
            evals[done] = evaluate(done)
            paused_s += time.time() - t_eval
            if t_mark is not None:
                t_mark += time.time() - t_eval
            line = f"eval at step {done}: " + ", ".join(f"{k} {v:.4f}"
                                                        for k, v in evals[done].items())
            if bar is not None:
                bar.write(line)
            elif progress == "lines":
                _log(line)
        if mngr is not None and cfg.checkpoint.every_steps and (
                done % cfg.checkpoint.every_steps == 0 or done == last):
            ckpt_lib.save(mngr, done, state, train_iter.get_state(), cfg.to_dict(),
                          force=True)
    flush(last)
    if bar is not None:
        bar.close()
    if t_loop is not None and timed_steps:
        jax.block_until_ready(state["step"])
        tokens_per_s = timed_steps * tokens_per_step / (time.time() - t_loop - paused_s)
    else:
        tokens_per_s = 0.0
    if mngr is not None:
        mngr.wait_until_finished()
        mngr.close()
    if writer is not None:
        writer.close()
    result = RunResult(losses=losses, first_step=first, last_step=last, evals=evals,
                       output_dir=os.path.abspath(cfg.output_dir),
                       checkpoint_dir=os.path.abspath(ckpt_dir),
                       tensorboard_dir=os.path.abspath(tb_dir), tokens_per_s=tokens_per_s,
                       wall_s=time.time() - t_start, unigram_loss=unigram,
                       num_params=num_params)
    _summary(result)
    return result


def _summary(r: RunResult) -> None:
    if jax.process_index() != 0:
        return
    lines = [f"trained steps {r.first_step}..{r.last_step} in {r.wall_s:.0f} s "
             f"({r.tokens_per_s:,.0f} tokens/s, compilation and evaluation excluded)"]
    if r.losses:
        tail = [r.losses[s] for s in sorted(r.losses)[-10:]]
        lines.append(f"train loss {np.mean(tail):.3f} nats/token (mean of the last "
                     f"{len(tail)} steps) vs unigram baseline {r.unigram_loss:.3f}")
    if r.evals:
        s = max(r.evals)
        lines.append(f"eval at step {s}: " + ", ".join(f"{k} {v:.4f}"
                                                       for k, v in r.evals[s].items()))
    lines.append(f"checkpoints: {r.checkpoint_dir}")
    lines.append(f"TensorBoard: tensorboard --logdir {r.tensorboard_dir}")
    print("\n".join(lines), flush=True)
    with open(os.path.join(r.output_dir, "summary.json"), "w") as f:
        json.dump(dataclasses.asdict(r) | {"losses": {str(k): v for k, v in r.losses.items()}},
                  f, indent=2, default=_json_default)


def _json_default(x: Any):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))
