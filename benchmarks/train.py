"""Training throughput of the ~125M NSA model, and a multi-GPU loss check.

Throughput (``--mode throughput``): one full training step (forward, backward, AdamW update;
bf16 compute, f32 master weights, remat) of the ``nsa_125m`` preset with ``attention`` in
``nsa``, ``full`` and ``window``, at 8k, 32k and 64k tokens, batch 1, on one device, all in the
same run. Tokens are random (the step's cost does not depend on them). Reports the median step
time of 10 timed steps after 2 warm-up steps, tokens/s, and model TFLOP/s:

    6 * parameters * T  +  12 * layers * T * keys_per_query * heads * head_dim

where keys per query (causal average) is ``T/2`` for full attention, ``~w`` for the window and
the spec's cost model ``T/(2d) + n*l' + w`` for NSA (remat's extra forward is not counted).

Multi-GPU (``--mode multi_gpu``): a small model trained 6 steps on synthetic batches on one
device and on 2 devices with data-parallel and FSDP meshes; the losses must match.

Writes ``docs/results/train.json`` / ``train_multi_gpu.json`` (schema of
``shared/BENCHMARKS.md``) and, with ``--report``, a Markdown table next to the JSON.
Needs only jax, flax, optax (no grain / TFDS): it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import configs  # noqa: E402
from nsa_jax import registry, sharding  # noqa: E402
from nsa_jax.config import ModelConfig  # noqa: E402
from train import optim, step  # noqa: E402
from train.config import apply_overrides  # noqa: E402


def _commit() -> str:
    if os.environ.get("NSA_COMMIT"):
        return os.environ["NSA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def keys_per_query(model: ModelConfig, seq_len: int) -> float:
    """Causal average keys attended per query."""
    if model.attention == "full":
        return (seq_len + 1) / 2
    w = model.nsa.window_size
    if model.attention == "window":
        return w - w * (w - 1) / (2 * seq_len) if seq_len >= w else (seq_len + 1) / 2
    return model.nsa.keys_per_query(seq_len)


def step_flops(model: ModelConfig, num_params: int, seq_len: int, batch: int) -> float:
    attn = 12 * model.num_layers * keys_per_query(model, seq_len) * model.num_heads * (
        model.head_dim + model.value_dim) / 2
    return batch * seq_len * (6 * num_params + attn)


def synthetic_batch(key, batch: int, seq_len: int, vocab: int) -> dict:
    tokens = jax.random.randint(key, (batch, seq_len + 1), 0, 256, dtype=jnp.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32),
                                          (batch, seq_len)),
            "weights": jnp.ones((batch, seq_len), jnp.float32)}


def build(model: ModelConfig, optim_cfg, mesh, *, grad_accum: int = 1):
    """Sharded initial state and the jitted train step for ``model`` on ``mesh``."""
    if model.attention == "nsa" and mesh.size > 1:
        model = model.replace(implementation=step.sharded_backend(mesh, model.implementation))
    fns = step.ModelFns.create(model)
    tx = optim.make_optimizer(optim_cfg, 1000)
    schedule = optim.learning_rate_schedule(optim_cfg, 1000)

    def init(key):
        params = fns.init(key)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}

    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = step.state_shardings(abstract, mesh)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    batch_sharding = NamedSharding(mesh, sharding.batch_spec(2))
    train_step = jax.jit(step.make_train_step(fns, tx, schedule, grad_accum=grad_accum,
                                              mesh=mesh),
                         in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
                         donate_argnums=(0,))
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract["params"]))
    return state, train_step, batch_sharding, num_params


def header(name: str, model: ModelConfig) -> dict:
    nsa = dataclasses.asdict(model.nsa)
    return {"benchmark": name, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "commit": _commit(),
            "backend": jax.default_backend(),
            "nsa_implementation": [b.name for b in registry.resolve(model.implementation)],
            "nsa_config": {k: nsa[k] for k in ("cmp_block_size", "cmp_stride",
                                                "slc_block_size", "slc_top_n", "window_size")},
            "records": []}


def throughput(args) -> None:
    preset = apply_overrides(configs.get_config(args.preset), args.set)
    result = header("train", preset.model)
    result["model"] = dataclasses.asdict(preset.model)
    result["overrides"] = list(args.set)
    result["tuned"] = dict(args.tuned_applied)  # --tuned kernel tile overrides
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    if args.interleave:
        result["variants"] = {name: items for name, items in args.variants}
        for seq_len in args.seq_lens:
            interleaved(preset, mesh, seq_len, args, result)
        return
    t_start = time.time()
    for seq_len in args.seq_lens:
        for attention in args.attentions:
            model = preset.model.replace(attention=attention)
            rec = shape_record(f"train_{attention}", model, seq_len, args.batch)
            if time.time() - t_start > args.budget_s:
                rec["skipped"] = f"time budget of {args.budget_s} s spent"
                result["records"].append(rec)
                continue
            try:
                rec.update(time_one(model, preset.optim, mesh, seq_len, args))
            except Exception as err:  # noqa: BLE001 - an OOM at 64k is a result too
                rec["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            print(json.dumps(rec), flush=True)
            result["records"].append(rec)
            write(result, args.out)
    write(result, args.out)


def shape_record(name: str, model: ModelConfig, seq_len: int, batch: int) -> dict:
    """A record's name and shape fields."""
    return {"name": name, "pass": "train_step", "B": batch, "T": seq_len,
            "HQ": model.num_heads, "HKV": model.num_kv_heads, "Dk": model.head_dim,
            "Dv": model.value_dim, "dtype": model.dtype, "layers": model.num_layers,
            "d_model": model.d_model}


def speed_fields(model: ModelConfig, num_params: int, seq_len: int, batch: int,
                 step_s: float) -> dict:
    """Tokens/s, model TFLOP/s and keys per query of a step that took ``step_s`` seconds."""
    return {"tokens_per_s": batch * seq_len / step_s,
            "tflops": step_flops(model, num_params, seq_len, batch) / step_s / 1e12,
            "keys_per_query": keys_per_query(model, seq_len)}


def compiled(model, optim_cfg, mesh, seq_len, args):
    """``(state, train_step, batch, num_params, compile_s)`` after the first step (tracing and
    compiling) and ``--warmup`` more."""
    state, train_step, batch_sharding, num_params = build(model, optim_cfg, mesh)
    batch = jax.device_put(synthetic_batch(jax.random.key(1), args.batch, seq_len,
                                           model.vocab_size), batch_sharding)
    t0 = time.time()
    state, m = train_step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.time() - t0
    for _ in range(args.warmup):
        state, m = train_step(state, batch)
    jax.block_until_ready(m)
    return state, train_step, batch, num_params, compile_s


def time_one(model, optim_cfg, mesh, seq_len, args) -> dict:
    state, train_step, batch, num_params, compile_s = compiled(model, optim_cfg, mesh,
                                                               seq_len, args)
    times = []
    reps = args.reps
    for i in range(reps):
        t0 = time.perf_counter()
        state, m = train_step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
        if i == 1 and times[-1] > args.slow_step_s:  # very slow steps: fewer repetitions
            reps = max(3, reps // 3)
        if len(times) >= reps:
            break
    med = statistics.median(times)
    loss = float(m["loss"])
    del state
    return {"ms": med * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
            "reps": len(times), **speed_fields(model, num_params, seq_len, args.batch, med),
            "params": num_params, "compile_s": compile_s, "loss": loss}


class _Tuned:
    """Context manager: ``--tuned``-style items applied to the tile tables, then restored."""

    def __init__(self, items):
        self.items = list(items)

    def __enter__(self):
        from pallas_kernels import tuned_block_sizes
        self.saved = {t: dict(getattr(tuned_block_sizes, t)) for t in tuned_classes()}
        return apply_tuned(self.items)

    def __exit__(self, *exc):
        from pallas_kernels import tuned_block_sizes
        for table, entry in self.saved.items():
            setattr(tuned_block_sizes, table, entry)


def interleaved(preset, mesh, seq_len, args, result) -> None:
    """Times every configuration in round-robin rounds, all compiled first.

    The configurations are ``args.attentions`` with the preset, then each ``--variant`` (an NSA
    model with its own tile or ``model.*`` overrides). A round times ``--reps`` consecutive
    steps of each configuration in turn, so slow drifts of the device (clocks, temperature)
    reach all of them alike. Each record keeps the median of every round; ``rounds_ratio``
    of a record is, per round, full attention's median over its own (when ``full`` runs).
    """
    configs_ = [(a, a, [], []) for a in args.attentions]
    for name, items in args.variants:
        model_items = [i for i in items if i.startswith("model.")]
        configs_.append((name, "nsa", [i for i in items if i not in model_items], model_items))
    runs = []
    for name, attention, tuned_items, model_items in configs_:
        model = apply_overrides(preset, model_items).model.replace(attention=attention)
        with _Tuned(tuned_items) as applied:  # traced and compiled with the tiles applied
            state, train_step, batch, num_params, compile_s = compiled(
                model, preset.optim, mesh, seq_len, args)
        print(f"compiled {name} ({attention}) in {compile_s:.0f} s", flush=True)
        runs.append({"name": name, "attention": attention, "model": model, "state": state,
                     "step": train_step, "batch": batch, "params": num_params,
                     "compile_s": compile_s, "tuned": applied, "set": model_items,
                     "rounds": []})
    for r in range(args.interleave):
        for run in runs:
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                run["state"], m = run["step"](run["state"], run["batch"])
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t0)
            run["rounds"].append(statistics.median(times) * 1e3)
            run["loss"] = float(m["loss"])
        print(f"round {r}: " + ", ".join(f"{x['name']} {x['rounds'][-1]:.2f}" for x in runs),
              flush=True)
    full = next((x for x in runs if x["attention"] == "full" and not x["set"]), None)
    for run in runs:
        model = run["model"]
        med = statistics.median(run["rounds"])
        rec = {**shape_record(f"train_{run['name']}", model, seq_len, args.batch), "ms": med,
               "min_ms": min(run["rounds"]), "max_ms": max(run["rounds"]),
               "reps": args.reps * args.interleave, "rounds_ms": run["rounds"],
               **speed_fields(model, run["params"], seq_len, args.batch, med * 1e-3),
               "params": run["params"], "compile_s": run["compile_s"], "loss": run["loss"],
               "tuned": run["tuned"], "set": run["set"]}
        if full is not None and run is not full:
            ratios = [f / x for f, x in zip(full["rounds"], run["rounds"], strict=True)]
            rec["rounds_ratio"] = ratios
            rec["ratio_vs_full"] = full_med_ratio = statistics.median(full["rounds"]) / med
            print(f"{run['name']}: {med:.2f} ms, {full_med_ratio:.3f}x full "
                  f"(rounds {min(ratios):.3f}-{max(ratios):.3f})", flush=True)
        print(json.dumps({k: v for k, v in rec.items() if k != "rounds_ms"}), flush=True)
        result["records"].append(rec)
    del runs
    write(result, args.out)


def multi_gpu(args) -> None:
    if jax.device_count() < 2:
        raise SystemExit(f"--mode multi_gpu needs 2 devices, found {jax.device_count()}")
    model = ModelConfig(d_model=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=32,
                        mlp_hidden=704, attention="nsa", dtype="float32",
                        nsa=configs.SHORT_NSA)
    optim_cfg = configs.get_config("tiny").optim
    result = header("train_multi_gpu", model)
    seq_len, batch, steps = args.check_seq_len, 4, 6
    batches = [synthetic_batch(jax.random.key(10 + i), batch, seq_len, model.vocab_size)
               for i in range(steps)]
    layouts = {"1 device": ({"data": 1, "fsdp": 1, "tensor": 1}, 1),
               "data=2": ({"data": 2, "fsdp": 1, "tensor": 1}, 2),
               "fsdp=2": ({"data": 1, "fsdp": 2, "tensor": 1}, 2),
               "tensor=2": ({"data": 1, "fsdp": 1, "tensor": 2}, 2)}
    losses, step_ms = {}, {}
    for name, (shape, n) in layouts.items():
        mesh = sharding.make_mesh(shape, devices=jax.devices()[:n])
        state, train_step, batch_sharding, _ = build(model, optim_cfg, mesh)
        out = []
        for b in batches:
            state, m = train_step(state, jax.device_put(b, batch_sharding))
            out.append(float(m["loss"]))
        losses[name] = out
        rel = float(np.max(np.abs(np.array(out) / np.array(losses["1 device"]) - 1)))
        # Strong scaling: the same global batch, step time after the steps above (compiled).
        placed = jax.device_put(batches[0], batch_sharding)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            state, m = train_step(state, placed)
            jax.block_until_ready(m["loss"])
            times.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(times)
        eff = (step_ms["1 device"] / (n * ms)) if "1 device" in step_ms else 1.0
        step_ms[name] = ms
        result["records"].append({"name": "train_nsa", "pass": "train_step", "mesh": name,
                                  "devices": n, "B": batch, "T": seq_len, "losses": out,
                                  "max_rel_diff_vs_1_device": rel, "ms": ms,
                                  "tokens_per_s": batch * seq_len / (ms * 1e-3),
                                  "strong_scaling_efficiency": eff})
        print(name, out, f"max rel diff {rel:.2e}", f"{ms:.2f} ms/step",
              f"efficiency {eff:.2f}", flush=True)
        write(result, args.out)  # after every layout: a run cut short keeps what it measured
    write(result, args.out)


def write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def report(path: str) -> None:
    """Writes a Markdown table next to the JSON file of a throughput run."""
    with open(path) as f:
        res = json.load(f)
    lines = [f"# Training throughput: {res['device']}, jax {res['jax']}, {res['date']}", "",
             f"Commit `{res['commit'][:10]}`; NSA stages run on "
             f"`{' -> '.join(res['nsa_implementation'])}`; NSA config "
             f"`{res['nsa_config']}`.", ""]
    if res.get("note"):
        lines += [res["note"], ""]
    if res.get("overrides") or res.get("tuned"):
        lines += ["Overrides: " + ", ".join([f"`--set {o}`" for o in res.get("overrides", [])]
                                            + [f"`--tuned {k}={v}`"
                                               for k, v in res.get("tuned", {}).items()]), ""]
    if res["benchmark"] == "train":
        lines += ["| attention | T | ms / step | tokens/s | model TFLOP/s | keys / query | "
                  "compile s |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in res["records"]:
            if "ms" in r:
                lines.append(f"| {r['name']} | {r['T']} | {r['ms']:.1f} | "
                             f"{r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | "
                             f"{r['keys_per_query']:.0f} | {r['compile_s']:.0f} |")
            else:
                lines.append(f"| {r['name']} | {r['T']} | {r.get('error') or r.get('skipped')}"
                             " | | | | |")
        paired = [r for r in res["records"] if r.get("rounds_ratio")]
        if paired:
            lines += ["", "Interleaved rounds (full attention's median step over each "
                      "configuration's, per round):", ""]
            for r in paired:
                lines.append(f"- {r['name']} at {r['T']}: {r['ratio_vs_full']:.3f}x "
                             f"(median of {len(r['rounds_ratio'])} rounds; rounds "
                             f"{min(r['rounds_ratio']):.3f}-{max(r['rounds_ratio']):.3f})"
                             + (f", tiles {r['tuned']}" if r.get("tuned") else "")
                             + (f", {r['set']}" if r.get("set") else ""))
    else:
        lines += ["| mesh | devices | losses | max rel. diff vs 1 device |",
                  "| --- | --- | --- | --- |"]
        for r in res["records"]:
            lines.append(f"| {r['mesh']} | {r['devices']} | "
                         f"{', '.join(f'{x:.5f}' for x in r['losses'])} | "
                         f"{r['max_rel_diff_vs_1_device']:.2e} |")
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def register_policies(items: list[str]) -> None:
    """Adds ``NAME=CHECKPOINT_NAME[,...]`` remat policies (``jax.checkpoint_policies.
    save_only_these_names``) to the model's table, for this process only."""
    from nsa_jax import config as config_mod
    from nsa_jax import ops

    for item in items:
        name, sep, names = item.partition("=")
        if not sep or not name or not names or name in ops.REMAT_POLICIES:
            raise SystemExit(f"--remat-policy {item!r} must look like NAME=NAME1[,NAME2] with "
                             f"a new NAME (taken: {sorted(ops.REMAT_POLICIES)})")
        ops.REMAT_POLICIES[name] = jax.checkpoint_policies.save_only_these_names(
            *[n.strip() for n in names.split(",")])
        config_mod.REMAT_POLICY_NAMES = (*config_mod.REMAT_POLICY_NAMES, name)
        print(f"remat policy {name} keeps {names}", flush=True)


def tuned_classes() -> dict:
    """The tables of ``pallas_kernels.tuned_block_sizes`` by name, with their ``BlockSizes``."""
    from pallas_kernels.selected import gpu as slc_gpu
    from pallas_kernels.selection import gpu as sel_gpu
    from pallas_kernels.sliding_window import gpu as swa_gpu

    return {"SELECTED": slc_gpu.BlockSizes, "SELECTED_SMALL_HEADS": slc_gpu.BlockSizes,
            "SELECTION": sel_gpu.BlockSizes, "COMPRESSED": swa_gpu.BlockSizes,
            "SLIDING_WINDOW": swa_gpu.BlockSizes}


def apply_tuned(items: list[str]) -> dict:
    """Applies ``--tuned TABLE.FIELD=VALUE`` overrides to ``pallas_kernels.tuned_block_sizes``
    (read when the kernels are traced, so before anything compiles); returns them. A value is
    an integer, ``true`` or ``false``; the field must be one of the table's ``BlockSizes``."""
    from pallas_kernels import tuned_block_sizes

    classes = tuned_classes()
    done = {}
    for item in items:
        key, _, val = item.partition("=")
        table, _, field = key.partition(".")
        if table not in classes:
            raise SystemExit(f"--tuned {item!r}: TABLE must be one of {sorted(classes)}")
        fields = {f.name for f in dataclasses.fields(classes[table])}
        if field not in fields:
            raise SystemExit(f"--tuned {item!r}: {table} has no field {field!r}; fields: "
                             f"{sorted(fields)}")
        low = val.strip().lower()
        if low in ("true", "false"):
            parsed = low == "true"
        else:
            try:
                parsed = int(val)
            except ValueError:
                raise SystemExit(f"--tuned {item!r}: VALUE must be an integer, true or "
                                 "false") from None
        setattr(tuned_block_sizes, table, {**getattr(tuned_block_sizes, table), field: parsed})
        done[f"{table}.{field}"] = parsed
        print(f"tuned {table}.{field} = {parsed!r}", flush=True)
    return done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("throughput", "multi_gpu"), default="throughput")
    p.add_argument("--preset", default="nsa_125m")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="throughput: override a preset field, e.g. model.num_kv_heads=1")
    p.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")],
                   default=[8192, 32768, 65536])
    p.add_argument("--attentions", type=lambda s: s.split(","), default=["nsa", "full", "window"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--check-seq-len", type=int, default=1024, help="multi_gpu: tokens per row")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--slow-step-s", type=float, default=2.0,
                   help="steps slower than this are timed fewer times (at least 3)")
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="skip the remaining shapes once this much time has passed")
    p.add_argument("--tuned", action="append", default=[], metavar="TABLE.FIELD=VALUE",
                   help="override an entry of pallas_kernels.tuned_block_sizes (an integer or "
                        "true/false), e.g. SELECTED.num_stages=1, for timing a tiling")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="throughput: compile every configuration first, then time them in "
                        "ROUNDS round-robin rounds of --reps steps each")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ITEM[;ITEM]",
                   help="with --interleave: one more NSA configuration; each ITEM is a tile "
                        "override TABLE.FIELD=VALUE (as --tuned) or model.FIELD=VALUE")
    p.add_argument("--remat-policy", action="append", default=[],
                   metavar="NAME=CHECKPOINT_NAME[,...]",
                   help="register a remat policy that keeps these checkpoint names, for "
                        "timing it (--set or --variant model.remat_policy=NAME)")
    p.add_argument("--out", default=None)
    p.add_argument("--report", metavar="JSON", help="only write the Markdown table of JSON")
    args = p.parse_args()
    if args.tuned and args.out is None and not args.report:
        raise SystemExit("--tuned needs --out: a run with overridden tiles must not replace "
                         "the committed docs/results/train.json")
    args.variants = []
    for spec in args.variant:
        name, sep, items = spec.partition("=")
        if not sep or not name or not items:
            raise SystemExit(f"--variant {spec!r} must look like NAME=ITEM[;ITEM...]")
        args.variants.append((name, [i.strip() for i in items.split(";") if i.strip()]))
    if args.variants and not args.interleave:
        raise SystemExit("--variant needs --interleave ROUNDS")
    if args.variants and args.out is None and not args.report:
        raise SystemExit("--variant needs --out: variant runs must not replace the committed "
                         "docs/results/train.json")
    register_policies(args.remat_policy)
    args.tuned_applied = apply_tuned(args.tuned)
    if args.report:
        report(args.report)
        return
    default = "train.json" if args.mode == "throughput" else "train_multi_gpu.json"
    args.out = args.out or os.path.join("docs", "results", default)
    (throughput if args.mode == "throughput" else multi_gpu)(args)
    report(args.out)


if __name__ == "__main__":
    main()
