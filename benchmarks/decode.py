"""Decode benchmark: one new token per sequence, NSA decode attention vs dense decoding.

Shapes (``shared/BENCHMARKS.md``): ``HQ=64, HKV=4, Dk=Dv=128``, bf16, the paper's NSA config
(``l=32, d=16, l'=64, n=16, w=512``), contexts 8k/16k/32k/64k, batch 1/8/32/64, every sequence
full (the new query at position ``context - 1``). Timed in the same run:

- ``nsa_decode``: the Pallas-Triton decode chain (``pallas_kernels/decode/gpu.py``);
- ``nsa_decode_xla``: the XLA decode path (``pallas_kernels/decode/reference.py``);
- ``dense_decode``: the best of ``jax.nn.dot_product_attention`` with XLA and with cuDNN;
- ``nsa_decode_stage/<name>`` (``--stages``): cumulative prefixes of the kernel chain
  (``gpu.decode_stages``), so each stage's cost is a difference of two lines: ``cmp`` (the
  compressed kernel and the XLA merge of its splits), ``cmp+select_kernel`` and
  ``cmp+select_xla`` (plus the selection: the ``nsa_decode_select`` kernel, which merges the
  splits itself when there are few, or XLA's merge and top-k), ``full/select_kernel`` and
  ``full/select_xla`` (the whole chain with either selection).

Each op runs inside one jitted ``fori_loop`` of ``--reps`` dependent calls (the next query
depends on the previous output, as decode steps do) cycling over enough independent caches to
exceed the L2 cache; the time per call is the median over timed runs. Dispatching the jitted
loop costs about 0.1 ms of host time per timed run (more for NSA, which passes 9 arrays per
cache, than for dense, which passes 3), so the default of 50 steps a run keeps that under
about 2 us a step; a generation loop runs all its steps inside one jitted call. Effective TB/s
counts the KV bytes each op must read: dense ``B * ctx * HKV * (Dk + Dv) * 2``; NSA the visible
compressed tokens, the ``n * l'`` selected and ``w`` window tokens per KV head.

Run ``python benchmarks/decode.py --out DIR``; it checks the kernel against the XLA path at a
small size first, then writes ``decode.json``, ``decode.md`` and ``decode.png`` under ``DIR``.
The ``--stages`` shapes are timed after the grid whatever ``--budget-s`` says. CPU smoke test of
every code path (interpret mode; the times mean nothing)::

    python benchmarks/decode.py --interpret --contexts 2048 --batches 2 --out /tmp/dec \
        --stages 2048:2 --sweep 2048:2 --xla-nsa-contexts 2048 --check-ctx 1024 --reps 1 --runs 1
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.decode import gpu, reference  # noqa: E402

HQ, HKV, D = 64, 4, 128
NSA = dict(cmp_block_size=32, cmp_stride=16, slc_block_size=64, top_n=16, window_size=512)
NSA_CONFIG = dict(cmp_block_size=32, cmp_stride=16, slc_block_size=64, slc_top_n=16,
                  window_size=512)
CONTEXTS = (8192, 16384, 32768, 65536)
BATCHES = (1, 8, 32, 64)
L2_BYTES = 256 << 20  # cycle over caches until this many bytes are touched per round
# Tilings compared with the default (BlockSizes()) at the --sweep shapes.
SWEEP = {
    "unfused": gpu.BlockSizes(fuse_sparse=False),
    "bk128": gpu.BlockSizes(block_k=128),
    "bk32": gpu.BlockSizes(block_k=32),
    "warps8": gpu.BlockSizes(num_warps=8),
    "xla_select": gpu.BlockSizes(select_kernel=False),
    "sel_chunk64": gpu.BlockSizes(select_chunk=64),
    "sel_xla_merge": gpu.BlockSizes(select_merge_splits=0),
    "sel_one_split": gpu.BlockSizes(select_splits=1),
    "sel_splits4": gpu.BlockSizes(select_splits=4),
    "sel_splits_uncapped": gpu.BlockSizes(select_splits=0),
    "programs132": gpu.BlockSizes(target_programs=132),
    "programs528": gpu.BlockSizes(target_programs=528),
    "stages3": gpu.BlockSizes(num_stages=3),
    "warps2": gpu.BlockSizes(num_warps=2),
    "slots1": gpu.BlockSizes(sparse_slots=1),
    "slots2": gpu.BlockSizes(sparse_slots=2),
    "slots8": gpu.BlockSizes(sparse_slots=8),
    "xla_combine": gpu.BlockSizes(combine_kernel=False),
    "sel_programs528": gpu.BlockSizes(select_programs=528),
    "sel_programs1056": gpu.BlockSizes(select_programs=1056),
    "sel_splits2": gpu.BlockSizes(select_splits=2),
    "slots4": gpu.BlockSizes(sparse_slots=4),
    "cmp_splits4": gpu.BlockSizes(cmp_splits=4),
    "cmp_splits16": gpu.BlockSizes(cmp_splits=16),
    "programs64": gpu.BlockSizes(target_programs=64),
    "sel_chunk256": gpu.BlockSizes(select_chunk=256),
    # One kernel's warps at a time (num_warps=2 or 8 for all of them was slower at 8k / B1).
    "cmp_w2": gpu.BlockSizes(cmp_num_warps=2),
    "cmp_w8": gpu.BlockSizes(cmp_num_warps=8),
    "select_w1": gpu.BlockSizes(select_num_warps=1),
    "select_w2": gpu.BlockSizes(select_num_warps=2),
    "select_w8": gpu.BlockSizes(select_num_warps=8),
    "sparse_w2": gpu.BlockSizes(sparse_num_warps=2),
    "sparse_w8": gpu.BlockSizes(sparse_num_warps=8),
    "combine_w1": gpu.BlockSizes(combine_num_warps=1),
    "combine_w2": gpu.BlockSizes(combine_num_warps=2),
    "combine_w8": gpu.BlockSizes(combine_num_warps=8),
    "stages3_sel528": gpu.BlockSizes(num_stages=3, select_programs=528),
    # The compressed splits merged by the combine kernel / by the sparse kernel at any batch.
    "combine_merges_cmp": gpu.BlockSizes(sparse_merge_cols=0),
    "sparse_merges_cmp": gpu.BlockSizes(sparse_merge_parts=1 << 30),
    # The default again, to read the run's noise off the sweep.
    "default": gpu.BlockSizes(),
}
# --stages: (record name, decode_stages(upto=...), BlockSizes overrides).
STAGE_VARIANTS = (
    ("cmp", "cmp", {}),
    ("cmp+select_kernel", "select", dict(select_kernel=True)),
    ("cmp+select_xla", "select", dict(select_kernel=False)),
    ("cmp+select_one_split", "select", dict(select_splits=1)),
    ("full/select_kernel", "full", dict(select_kernel=True)),
    ("full/select_xla", "full", dict(select_kernel=False)),
)


def num_cmp(ctx: int) -> int:
    size, stride = NSA["cmp_block_size"], NSA["cmp_stride"]
    return 0 if ctx < size else (ctx - size) // stride + 1


def nsa_bytes(b: int, ctx: int) -> int:
    per_token = HKV * 2 * D * 2  # K and V of every KV head, bf16
    tokens = num_cmp(ctx) + min(ctx, NSA["top_n"] * NSA["slc_block_size"]) + min(
        ctx, NSA["window_size"])
    return b * tokens * per_token


def num_sets(b: int, ctx: int) -> int:
    """Independent caches to cycle over: enough that a round touches ``L2_BYTES``, at most 4."""
    return max(1, min(4, math.ceil(L2_BYTES / dense_bytes(b, ctx))))


def dense_bytes(b: int, ctx: int) -> int:
    return b * ctx * HKV * 2 * D * 2


def make_nsa_set(key, b: int, ctx: int, dtype=jnp.bfloat16):
    """``(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, seq_lens)`` with full sequences.

    Laid out as ``NSACache`` lays out separate keys: the window's keys in a ring of ``w`` slots.
    """
    c = -(-num_cmp(ctx) // 64) * 64
    ring = min(ctx, NSA["window_size"])
    ks = jax.random.split(key, 8)

    def normal(i, shape):
        return jax.random.normal(ks[i], shape, dtype)

    return (normal(0, (b, HQ, D)), normal(1, (b, c, HKV, D)), normal(2, (b, c, HKV, D)),
            normal(3, (b, ctx, HKV, D)), normal(4, (b, ctx, HKV, D)),
            normal(5, (b, ring, HKV, D)), normal(6, (b, ring, HKV, D)),
            jax.nn.sigmoid(jax.random.normal(ks[7], (b, HQ, 3))),
            jnp.full((b,), ctx, jnp.int32))


def make_dense_set(key, b: int, ctx: int, dtype=jnp.bfloat16):
    ks = jax.random.split(key, 3)
    return (jax.random.normal(ks[0], (b, HQ, D), dtype),
            jax.random.normal(ks[1], (b, ctx, HKV, D), dtype),
            jax.random.normal(ks[2], (b, ctx, HKV, D), dtype))


INTERPRET = False  # --interpret: run the kernels in Pallas interpret mode (CPU smoke test)


def nsa_kernel_fn(q, *rest, block_sizes=None):
    return gpu.decode_attention(q, *rest, **NSA, block_sizes=block_sizes,
                                interpret=INTERPRET)[0]


def nsa_stage_fn(q, *rest, upto, block_sizes):
    """The chain up to ``upto``, as ``[B, N, Dv]`` that depends on every output of the stage."""
    out = gpu.decode_stages(q, *rest, upto=upto, **NSA, block_sizes=block_sizes,
                            interpret=INTERPRET)
    if upto == "full":
        return out["o"]
    o = out["o_cmp"]  # [B, N, Dv]
    other = out["lse_cmp"] if upto == "cmp" else out["indices"].astype(jnp.float32)  # [B, K, *]
    per_head = jnp.repeat(other.sum(-1), o.shape[1] // other.shape[1], axis=1)  # [B, N]
    return o + 1e-6 * per_head[..., None]


def nsa_xla_fn(q, *rest):
    return reference.decode_attention(q, *rest, **NSA)[0]


def dense_fn(q, k, v, *, implementation):
    o = jax.nn.dot_product_attention(q[:, None], k, v, implementation=implementation)
    return o[:, 0]


def dependent_loop(fn, steps: int):
    """``jit(loop)(sets)``: ``steps`` rounds of ``fn(q, *set[1:])`` over every set, each query
    depending on the previous output (as decode steps do)."""
    def loop(sets):
        def body(_, acc):
            for s in sets:
                q = (s[0].astype(jnp.float32) + 1e-3 * acc).astype(s[0].dtype)
                acc = fn(q, *s[1:]).astype(jnp.float32)
            return acc
        return jax.lax.fori_loop(0, steps, body, jnp.zeros(sets[0][0].shape, jnp.float32))

    return jax.jit(loop)


def time_op(fn, sets, *, reps: int, runs: int) -> dict:
    """Median/min/max ms per call of ``fn(*set)`` over dependent calls cycling through ``sets``."""
    loop = dependent_loop(fn, reps)
    jax.block_until_ready(loop(sets))  # compile and warm up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(sets))
        times.append((time.perf_counter() - t0) * 1e3 / (reps * len(sets)))
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


CHECK_TILINGS = (dict(), dict(fuse_sparse=False), dict(select_kernel=False),
                 dict(sparse_slots=4, select_splits=1), dict(sparse_slots=16, select_splits=4),
                 dict(combine_kernel=False), dict(select_programs=1024))
# At 4x the check context: 32 compressed splits, which the combine kernel merges in tiles.
CHECK_TILINGS_LONG = (dict(cmp_block_k=16, cmp_splits=32),)


def check_correctness(ctx: int) -> list[str]:
    """Kernel vs XLA path at a small size, bf16 and f32; returns lines to print."""
    lines = []
    cases = [(dtype, tol, c_len, tilings)
             for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2))
             for c_len, tilings in ((ctx, CHECK_TILINGS), (4 * ctx, CHECK_TILINGS_LONG))]
    for dtype, tol, c_len, tilings in cases:
        args = list(make_nsa_set(jax.random.key(1), 3, c_len, dtype))
        args[-1] = jnp.asarray([c_len, c_len // 2 - 24, 37], jnp.int32)  # unequal, one tiny
        o_ref, idx_ref = jax.jit(functools.partial(reference.decode_attention, **NSA))(*args)
        for kw in tilings:
            sizes = gpu.BlockSizes(**kw)
            o, idx = jax.jit(functools.partial(gpu.decode_attention, **NSA,
                                               block_sizes=sizes, interpret=INTERPRET))(*args)
            err = rel_err(o, o_ref)
            same = float(np.mean(np.sort(np.asarray(idx), -1) == np.sort(np.asarray(idx_ref), -1)))
            ok = err <= tol and np.isfinite(np.asarray(o, np.float32)).all()
            tag = " ".join(f"{k}={v}" for k, v in kw.items()) or "default"
            lines.append(f"check {jnp.dtype(dtype).name} ctx={c_len} {tag}: "
                         f"rel err {err:.2e} (tol {tol:.0e}), index agreement {same:.4f} -> "
                         f"{'OK' if ok else 'FAIL'}")
    return lines


def render_markdown(result: dict) -> str:
    recs = result["records"]
    by = {(r["name"], r["context"], r["B"]): r for r in recs}
    lines = [
        "# Decode latency per step: NSA vs dense attention",
        "",
        f"Device: {result['device']}; jax {result['jax']}; {result['date']}; commit "
        f"`{result['commit']}`. HQ={HQ}, HKV={HKV}, Dk=Dv={D}, bf16, NSA l=32, d=16, l'=64, "
        "n=16, w=512; every sequence at full context. Median ms per decode step of one "
        f"attention layer over {result.get('runs', '?')} runs of "
        f"{result.get('steps_per_run', '?')} dependent steps in one jitted loop; TB/s counts "
        "the KV bytes each op must read.",
        "",
        "| context | B | dense (best) ms | dense TB/s | NSA kernel ms | NSA TB/s | NSA XLA ms "
        "| speed-up vs dense |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ctx in result["contexts"]:
        for b in result["batches"]:
            dense = by.get(("dense_decode", ctx, b))
            nsa = by.get(("nsa_decode", ctx, b))
            xla = by.get(("nsa_decode_xla", ctx, b))

            def fmt(r, key="ms", spec=".3f"):
                return format(r[key], spec) if r and key in r else "-"

            speed = f"{dense['ms'] / nsa['ms']:.1f}x" if dense and nsa else "-"
            impl = f" ({dense['impl']})" if dense else ""
            lines.append(f"| {ctx // 1024}k | {b} | {fmt(dense)}{impl} | "
                         f"{fmt(dense, 'tbps', '.2f')} | {fmt(nsa)} | {fmt(nsa, 'tbps', '.2f')} | "
                         f"{fmt(xla)} | {speed} |")
    lines.append("")
    stage_rows = sorted({(r["context"], r["B"]) for r in recs
                         if r["name"].startswith("nsa_decode_stage/")})
    if stage_rows:
        names = [v[0] for v in STAGE_VARIANTS]
        lines += ["## Stages (cumulative prefixes of the kernel chain, ms)", "",
                  "| context | B | " + " | ".join(names) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for ctx, b in stage_rows:
            cells = [by.get((f"nsa_decode_stage/{name}", ctx, b)) for name in names]
            lines.append(f"| {ctx // 1024}k | {b} | "
                         + " | ".join(f"{r['ms']:.4f}" if r else "-" for r in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["records"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, b in enumerate(result["batches"]):
        color = f"C{i}"
        for name, style in (("nsa_decode", "-o"), ("dense_decode", "--s")):
            pts = sorted((r["context"], r["ms"]) for r in recs if r["name"] == name and r["B"] == b)
            if pts:
                axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, color=color,
                             label=f"{'NSA' if name == 'nsa_decode' else 'dense'} B={b}")
        ratio = []
        for ctx in result["contexts"]:
            d = [r for r in recs if r["name"] == "dense_decode" and r["B"] == b
                 and r["context"] == ctx]
            n = [r for r in recs if r["name"] == "nsa_decode" and r["B"] == b
                 and r["context"] == ctx]
            if d and n:
                ratio.append((ctx, d[0]["ms"] / n[0]["ms"]))
        if ratio:
            axes[1].plot([p[0] for p in ratio], [p[1] for p in ratio], "-o", color=color,
                         label=f"B={b}")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms per decode step (one layer)")
    axes[0].set_title("Decode latency")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_ylabel("dense ms / NSA ms")
    axes[1].set_title("NSA speed-up over dense decoding")
    fig.suptitle(f"{result['device']}, HQ={HQ}, HKV={HKV}, D={D}, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--reps", type=int, default=50, help="dependent calls per timed run")
    parser.add_argument("--runs", type=int, default=10, help="timed runs (median reported)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip the optional XLA NSA timings after this many seconds")
    parser.add_argument("--xla-nsa-contexts", default="65536",
                        help="contexts at which the XLA decode path is timed too ('' for none)")
    parser.add_argument("--sweep", default="65536:32",
                        help="context:batch pairs at which kernel tilings are compared")
    parser.add_argument("--sweep-variants", default="",
                        help="comma-separated SWEEP names to compare ('' for all)")
    parser.add_argument("--stages", default="65536:1,65536:32,8192:1",
                        help="context:batch pairs at which the chain's prefixes are timed "
                             "('' for none)")
    parser.add_argument("--check-ctx", type=int, default=2048)
    parser.add_argument("--interpret", action="store_true", help="CPU smoke test only")
    args = parser.parse_args(argv)
    global INTERPRET
    INTERPRET = args.interpret
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    xla_contexts = {int(x) for x in args.xla_nsa_contexts.split(",") if x}
    sweep = {tuple(int(v) for v in x.split(":")) for x in args.sweep.split(",") if x}
    sweep_names = {x for x in args.sweep_variants.split(",") if x}
    if unknown := sweep_names - set(SWEEP):
        parser.error(f"unknown --sweep-variants {sorted(unknown)}; known: {sorted(SWEEP)}")
    stages = [tuple(int(v) for v in x.split(":")) for x in args.stages.split(",") if x]
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}, jax {jax.__version__}", flush=True)

    for line in check_correctness(args.check_ctx):
        print(line, flush=True)

    result = {
        "benchmark": "decode", "device": dev.device_kind, "jax": jax.__version__,
        "date": datetime.date.today().isoformat(), "commit": args.commit,
        "nsa_config": NSA_CONFIG, "contexts": contexts, "batches": batches,
        "steps_per_run": args.reps, "runs": args.runs, "records": [],
    }
    base = dict(HQ=HQ, HKV=HKV, Dk=D, Dv=D, dtype="bfloat16")
    table = []

    def save():
        with open(os.path.join(args.out, "decode.json"), "w") as f:
            json.dump(result, f, indent=1)

    key = jax.random.key(0)
    for ctx in contexts:
        for b in batches:
            n_sets = num_sets(b, ctx)
            row = {"context": ctx, "B": b}
            try:
                dense_sets = tuple(make_dense_set(jax.random.fold_in(key, i), b, ctx)
                                   for i in range(n_sets))
                best = None
                for impl in ("xla", "cudnn"):
                    try:
                        t = time_op(functools.partial(dense_fn, implementation=impl), dense_sets,
                                    reps=args.reps, runs=args.runs)
                    except Exception as err:  # cuDNN may refuse a shape
                        print(f"  dense {impl} ctx={ctx} B={b}: {type(err).__name__}: "
                              f"{str(err)[:200]}", flush=True)
                        continue
                    t["tbps"] = dense_bytes(b, ctx) / (t["ms"] * 1e-3) / 1e12
                    result["records"].append({"name": f"dense_decode/{impl}", "pass": "decode",
                                              "B": b, "context": ctx, **base, **t})
                    if best is None or t["ms"] < best["ms"]:
                        best = dict(t, impl=impl)
                del dense_sets
                if best:
                    result["records"].append({"name": "dense_decode", "pass": "decode", "B": b,
                                              "context": ctx, **base, **best})
                    row["dense"] = best["ms"]
                nsa_sets = tuple(make_nsa_set(jax.random.fold_in(key, 100 + i), b, ctx)
                                 for i in range(n_sets))
                t = time_op(nsa_kernel_fn, nsa_sets, reps=args.reps, runs=args.runs)
                t["tbps"] = nsa_bytes(b, ctx) / (t["ms"] * 1e-3) / 1e12
                result["records"].append({"name": "nsa_decode", "pass": "decode", "B": b,
                                          "context": ctx, **base, **t})
                row["nsa"] = t["ms"]
                if ctx in xla_contexts and time.time() - start < args.budget_s:
                    t = time_op(nsa_xla_fn, nsa_sets, reps=args.reps, runs=max(3, args.runs // 2))
                    t["tbps"] = nsa_bytes(b, ctx) / (t["ms"] * 1e-3) / 1e12
                    result["records"].append({"name": "nsa_decode_xla", "pass": "decode",
                                              "B": b, "context": ctx, **base, **t})
                    row["xla"] = t["ms"]
                if (ctx, b) in sweep:
                    for name, sizes in SWEEP.items():
                        if sweep_names and name not in sweep_names:
                            continue
                        if time.time() - start > args.budget_s:
                            break
                        fn = functools.partial(nsa_kernel_fn, block_sizes=sizes)
                        t = time_op(fn, nsa_sets, reps=args.reps, runs=args.runs)
                        t["tbps"] = nsa_bytes(b, ctx) / (t["ms"] * 1e-3) / 1e12
                        result["records"].append({"name": f"nsa_decode/{name}", "pass": "decode",
                                                  "B": b, "context": ctx, **base, **t,
                                                  "block_sizes": str(sizes)})
                        print(f"  sweep {name}: {t['ms']:.4f} ms", flush=True)
                del nsa_sets
            except Exception:
                traceback.print_exc()
            table.append(row)
            print(f"ctx={ctx} B={b} sets={n_sets} {row} t={time.time() - start:.0f}s", flush=True)
            save()

    for ctx, b in stages:
        try:
            n_sets = num_sets(b, ctx)
            nsa_sets = tuple(make_nsa_set(jax.random.fold_in(key, 100 + i), b, ctx)
                             for i in range(n_sets))
            for name, upto, overrides in STAGE_VARIANTS:
                fn = functools.partial(nsa_stage_fn, upto=upto,
                                       block_sizes=gpu.BlockSizes(**overrides))
                t = time_op(fn, nsa_sets, reps=args.reps, runs=args.runs)
                result["records"].append({"name": f"nsa_decode_stage/{name}", "pass": "decode",
                                          "B": b, "context": ctx, **base, **t, "upto": upto,
                                          "block_sizes": str(gpu.BlockSizes(**overrides))})
                print(f"stage ctx={ctx} B={b} {name} {t['ms']:.4f} ms", flush=True)
            del nsa_sets
        except Exception:
            traceback.print_exc()
        save()

    save()
    with open(os.path.join(args.out, "decode.md"), "w") as f:
        f.write(render_markdown(result))
    try:
        plot(result, os.path.join(args.out, "decode.png"))
    except Exception:
        traceback.print_exc()
    print("\ncontext  B   dense_ms  nsa_ms  xla_nsa_ms  speedup")
    for row in table:
        d, n, x = row.get("dense"), row.get("nsa"), row.get("xla")
        sp = f"{d / n:.1f}x" if d and n else "-"
        print(f"{row['context']:>7} {row['B']:>2} {d or float('nan'):9.4f} "
              f"{n or float('nan'):7.4f} {x or float('nan'):10.4f}  {sp}")
    print(f"total {time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
