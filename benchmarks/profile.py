"""Per-kernel GPU time of NSA decode steps, attention passes and training steps.

Each target is jitted, warmed up, then run ``--reps`` times under ``jax.profiler``; the trace's
GPU kernel events are summed by kernel name and divided by the calls, so the table says where
one call's device time goes (launch gaps are the difference between ``wall`` and ``kernels``).

Targets (``--targets``, comma-separated):

- ``decode:CTX:B[:VARIANT]``: one decode step of ``benchmarks/decode.py`` (``VARIANT`` a key
  of ``decode.SWEEP`` or of ``DECODE_VARIANTS`` below);
- ``dense:CTX:B:IMPL``: the dense decode step of ``benchmarks/decode.py`` (``xla`` or
  ``cudnn``);
- ``attn:T:HQ:HKV:D:PASS``: ``nsa_attention`` on the Pallas-Triton backend, batch 1, bf16,
  the paper's blocks, ``PASS`` ``fwd`` or ``fwdbwd``;
- ``train:T:ATTENTION``: one step of the ``nsa_125m`` training benchmark (batch 1).

    python benchmarks/profile.py --targets decode:8192:1,attn:32768:16:1:64:fwdbwd --out DIR

Writes ``DIR/profile.json``; prints one table per target.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import sys
import tempfile
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*[Tt]riton.*", category=DeprecationWarning)

import jax  # noqa: E402

from benchmarks import decode as dec  # noqa: E402
from pallas_kernels.decode import gpu  # noqa: E402

# Decode tilings beyond decode.SWEEP, by name.
DECODE_VARIANTS: dict[str, gpu.BlockSizes] = {
    "rounds_topn": gpu.BlockSizes(),  # the default tiling, top-n by rounds of argmax
    "cmp_bk32": gpu.BlockSizes(cmp_block_k=32),
    "cmp_bk128": gpu.BlockSizes(cmp_block_k=128),
    "cmp_stages3": gpu.BlockSizes(cmp_num_stages=3),
    "cmp_stages4": gpu.BlockSizes(cmp_num_stages=4),
    "cmp_splits2": gpu.BlockSizes(cmp_splits=2),
    "cmp_splits8": gpu.BlockSizes(cmp_splits=8),
    "cmp_bk128_stages3": gpu.BlockSizes(cmp_block_k=128, cmp_num_stages=3),
    "cmp_bk32_stages4": gpu.BlockSizes(cmp_block_k=32, cmp_num_stages=4),
    "cmp_bk32_warps2_stages4": gpu.BlockSizes(cmp_block_k=32, cmp_num_warps=2, cmp_num_stages=4),
}


def kernel_table(trace_dir: str, calls: int) -> tuple[list[dict], dict]:
    """GPU kernel events of the newest trace under ``trace_dir``, summed by name per call."""
    from jax.profiler import ProfileData

    path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
               key=os.path.getmtime)
    data = ProfileData.from_file(path)
    per_name = collections.defaultdict(lambda: [0, 0.0])
    lines_seen = {}
    first, last = None, None
    for plane in data.planes:
        if "GPU" not in plane.name:
            continue
        for line in plane.lines:
            events = list(line.events)
            lines_seen[f"{plane.name}/{line.name}"] = len(events)
            if not line.name.startswith("Stream"):
                continue
            for e in events:
                per_name[e.name][0] += 1
                per_name[e.name][1] += e.duration_ns
                first = e.start_ns if first is None else min(first, e.start_ns)
                last = e.end_ns if last is None else max(last, e.end_ns)
    rows = [{"kernel": name, "per_call": n / calls, "us_per_call": ns / calls / 1e3}
            for name, (n, ns) in per_name.items()]
    rows.sort(key=lambda r: -r["us_per_call"])
    span = {"lines": lines_seen,
            "gpu_span_us_per_call": (last - first) / calls / 1e3 if first is not None else None}
    return rows, span


def profile(fn, args, reps: int) -> dict:
    """Warm-up, wall time of ``reps`` calls, then the same calls under the profiler."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    wall = (time.perf_counter() - t0) * 1e6 / reps
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        rows, span = kernel_table(tmp, reps)
    total = sum(r["us_per_call"] for r in rows)
    return {"wall_us_per_call": wall, "kernels_us_per_call": total, "kernels": rows, **span}


def decode_target(ctx: int, b: int, variant: str | None, steps: int):
    sizes = None
    if variant:
        sizes = DECODE_VARIANTS.get(variant) or dec.SWEEP[variant]
    sets = tuple(dec.make_nsa_set(jax.random.fold_in(jax.random.key(0), 100 + i), b, ctx)
                 for i in range(dec.num_sets(b, ctx)))
    loop = dec.dependent_loop(functools.partial(dec.nsa_kernel_fn, block_sizes=sizes), steps)

    if variant == "rounds_topn":  # compiled now, with the ranking switched off
        saved, gpu.RANK_TOPN_MAX = gpu.RANK_TOPN_MAX, 0
        try:
            loop = loop.lower(sets).compile()
        finally:
            gpu.RANK_TOPN_MAX = saved
    return loop, (sets,), steps * len(sets)


def dense_target(ctx: int, b: int, impl: str, steps: int):
    sets = tuple(dec.make_dense_set(jax.random.fold_in(jax.random.key(0), i), b, ctx)
                 for i in range(dec.num_sets(b, ctx)))
    loop = dec.dependent_loop(functools.partial(dec.dense_fn, implementation=impl), steps)
    return loop, (sets,), steps * len(sets)


# Overrides of pallas_kernels.tuned_block_sizes tables for attn targets, by name.
ATTN_VARIANTS = {
    "cmp_dkvq16": {"COMPRESSED": dict(dkv_q_blocks=16)},
    "cmp_dkvq8": {"COMPRESSED": dict(dkv_q_blocks=8)},
    "cmp_dkvq4": {"COMPRESSED": dict(dkv_q_blocks=4)},
    "cmp_dkvk64_q8": {"COMPRESSED": dict(block_k_dkv=64, dkv_q_blocks=8)},
    "slc_s3": {"SELECTED": dict(num_stages=3)},
    "slc_s4": {"SELECTED": dict(num_stages=4)},
    "slc_w2_s3": {"SELECTED": dict(num_warps=2, num_stages=3)},
    "slc_w2_s4": {"SELECTED": dict(num_warps=2, num_stages=4)},
    "slc_w8_s3": {"SELECTED": dict(num_warps=8, num_stages=3)},
}


def attn_target(t: int, hq: int, hkv: int, d: int, pas: str, variant: str | None = None):
    from benchmarks import kernels as kb
    from pallas_kernels import tuned_block_sizes

    if variant:  # the tables are read when the kernels are traced: compile under the override
        saved = {}
        for table, upd in ATTN_VARIANTS[variant].items():
            saved[table] = getattr(tuned_block_sizes, table)
            setattr(tuned_block_sizes, table, {**saved[table], **upd})
        try:
            fn, args, calls = attn_target(t, hq, hkv, d, pas)
            return fn.lower(*args).compile(), args, calls
        finally:
            for table, val in saved.items():
                setattr(tuned_block_sizes, table, val)

    q, k, v, gates, ct = kb.inputs(jax.random.key(0), 1, t, hq, hkv, d, d)
    fn = kb.nsa_fn("pallas_triton")
    if pas == "fwd":
        return jax.jit(fn), (q, k, v, gates), 1
    if pas == "fwdbwd":
        return kb.fwd_bwd(fn), (q, k, v, gates, ct), 1
    raise ValueError(f"attn pass must be fwd or fwdbwd, got {pas!r}")


def train_target(t: int, attention: str):
    import configs
    from benchmarks import train as tb
    from nsa_jax import sharding

    preset = configs.get_config("nsa_125m")
    model = preset.model.replace(attention=attention)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    state, train_step, batch_sharding, _ = tb.build(model, preset.optim, mesh)
    batch = jax.device_put(tb.synthetic_batch(jax.random.key(1), 1, t, model.vocab_size),
                           batch_sharding)
    holder = {"state": state}

    def run(batch):  # the step donates its state: keep the newest
        holder["state"], m = train_step(holder["state"], batch)
        return m

    return run, (batch,), 1


def build_target(spec: str):
    kind, *rest = spec.split(":")
    if kind == "decode":
        ctx, b = int(rest[0]), int(rest[1])
        return decode_target(ctx, b, rest[2] if len(rest) > 2 else None, steps=10)
    if kind == "dense":
        return dense_target(int(rest[0]), int(rest[1]), rest[2], steps=10)
    if kind == "attn":
        t, hq, hkv, d = (int(x) for x in rest[:4])
        return attn_target(t, hq, hkv, d, rest[4], rest[5] if len(rest) > 5 else None)
    if kind == "train":
        return train_target(int(rest[0]), rest[1])
    raise ValueError(f"unknown target kind {kind!r} in {spec!r}")


def short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", required=True)
    parser.add_argument("--reps", type=int, default=5, help="profiled calls per target")
    parser.add_argument("--top", type=int, default=25, help="kernels printed per target")
    parser.add_argument("--out", default=None)
    parser.add_argument("--commit", default=os.environ.get("NSA_COMMIT", "unknown"))
    parser.add_argument("--interpret", action="store_true",
                        help="decode kernels in interpret mode (CPU smoke test; no GPU table)")
    args = parser.parse_args(argv)
    dec.INTERPRET = args.interpret
    result = {"benchmark": "profile", "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "commit": args.commit, "targets": {}}
    for spec in args.targets.split(","):
        try:
            fn, fargs, calls_per_fn = build_target(spec)
            rec = profile(fn, fargs, args.reps)
            for key in ("wall_us_per_call", "kernels_us_per_call"):
                rec[key] /= calls_per_fn
            for r in rec["kernels"]:
                r["per_call"] /= calls_per_fn
                r["us_per_call"] /= calls_per_fn
            if rec.get("gpu_span_us_per_call"):
                rec["gpu_span_us_per_call"] /= calls_per_fn
            result["targets"][spec] = rec
            print(f"\n== {spec}: wall {rec['wall_us_per_call']:.1f} us, kernels "
                  f"{rec['kernels_us_per_call']:.1f} us, GPU span "
                  f"{rec.get('gpu_span_us_per_call') or 0:.1f} us per call", flush=True)
            if not rec["kernels"]:
                print(f"   no kernel events; trace lines: {rec['lines']}", flush=True)
            for r in rec["kernels"][:args.top]:
                print(f"   {r['us_per_call']:9.2f} us  x{r['per_call']:5.2f}  "
                      f"{short(r['kernel'])}", flush=True)
        except Exception:
            traceback.print_exc()
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "profile.json"), "w") as f:
                json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
