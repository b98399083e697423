"""Kernel benchmark: NSA through the Pallas-Triton backend next to cuDNN dense attention.

Protocol (``shared/BENCHMARKS.md``): bf16 random-normal inputs, fresh per shape; a correctness
check against the pure-jnp reference at a small size first; then, per sequence length, the
median of ``--reps`` timed repetitions after warm-up (compilation excluded) of

* ``nsa`` fwd / bwd / fwdbwd (mean-pooling ``phi``, given gates, shared K/V),
* the NSA forward stages ``nsa/compressed`` (``phi`` + compressed attention), ``nsa/topn``,
  ``nsa/selected``, ``nsa/window``, ``nsa/combine``, ``nsa/selected_combined`` (selected and
  combine in one kernel, as the forward alone runs them),
* ``cudnn_dense`` (causal, GQA) and ``cudnn_window`` (``w``) fwd / bwd / fwdbwd,

with achieved TFLOP/s (useful FLOPs: masked work not counted). ``bwd`` is the VJP applied to
saved residuals. Writes ``kernels.json`` (schema of ``BENCHMARKS.md``), ``kernels.md`` and
``kernels.png`` under ``--out``.

    python benchmarks/kernels.py --out docs/results --seq 8192 16384 32768 65536
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*[Tt]riton.*", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nsa_jax import NSAConfig, nsa_attention  # noqa: E402
from nsa_jax.compression import compress  # noqa: E402
from nsa_jax.config import low_memory_branches  # noqa: E402
from nsa_jax.ops import combine_branches  # noqa: E402
from pallas_kernels import gpu_backend, tuned_block_sizes  # noqa: E402
from pallas_kernels.compressed import gpu as cmp_gpu  # noqa: E402
from pallas_kernels.selected import gpu as slc_gpu  # noqa: E402
from pallas_kernels.selection import gpu as sel_gpu  # noqa: E402
from pallas_kernels.sliding_window import gpu as swa_gpu  # noqa: E402

# The GPU backend with the banded Pallas kernels for the compressed branch (cuDNN is the
# default), for the same-run comparison.
BANDED_CMP = "pallas_triton_banded_cmp"
# The default GPU backend with the selected branch's forced blocks as a band (off by default
# until measured), for ``--band``.
FORCED_BAND = "pallas_triton_forced_band"
# The default GPU backend with the window stage on a second GPU stream, for ``--streams``.
STREAMED = ("pallas_triton_window_stream",)
# Every stage on the Pallas kernels (no cuDNN, so no cuDNN backward workspace): with
# low_memory, the configurations that aim at the memory target.
ALL_PALLAS = "pallas_triton_all_pallas"
# ``--low-memory`` modes: "none" (all-Pallas, no recompute), "all" (all-Pallas, every branch
# recomputed), "cudnn" (the default chain, every branch recomputed) or branch names
# ("window", "compressed,window": all-Pallas, those branches recomputed).
LOW_MEMORY_DEFAULT_MODES = ("all", "none", "cudnn")


def low_memory_run(mode: str) -> tuple[str, str, bool | str]:
    """(record name, backend, low_memory) of a ``--low-memory`` mode."""
    if mode == "none":
        return "nsa_all_pallas", ALL_PALLAS, False
    if mode == "all":
        return "nsa_low_memory", ALL_PALLAS, True
    if mode == "cudnn":
        return "nsa_low_memory_cudnn", "pallas_triton", True
    branches = low_memory_branches(mode)  # raises on an unknown name
    return "nsa_low_memory_" + "_".join(branches), ALL_PALLAS, ",".join(branches)

CFG = NSAConfig(cmp_block_size=32, cmp_stride=16, slc_block_size=64, slc_top_n=16,
                window_size=512, cmp_kind="mean", kv_mode="shared")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def timeit(fn, *args, reps: int) -> dict:
    """Median/min/max milliseconds of ``fn(*args)`` after two warm-up calls; ``first_ms`` is
    the first call (compilation included)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = (time.perf_counter() - t0) * 1e3
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return dict(ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                first_ms=first)


def memory(jitted, *args) -> dict:
    """XLA's buffer assignment for one compiled call (bytes): arguments, outputs, temporaries;
    ``peak_bytes`` is their sum, what the call needs on the device at most."""
    ma = jitted.lower(*args).compile().memory_analysis()
    out = dict(argument_bytes=int(ma.argument_size_in_bytes),
               output_bytes=int(ma.output_size_in_bytes), temp_bytes=int(ma.temp_size_in_bytes))
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
    return out


def inputs(key, b, t, hq, hkv, dk, dv, dtype=jnp.bfloat16):
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (b, t, hq, dk), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, dk), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, dv), jnp.float32).astype(dtype)
    gates = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, hq, 3), jnp.float32))
    ct = jax.random.normal(ks[4], (b, t, hq, dv), jnp.float32).astype(dtype)
    return q, k, v, gates.astype(dtype), ct


# ------------------------------------------------------------------------------------------
# FLOP models (useful work only)
# ------------------------------------------------------------------------------------------
def flops(t, hq, dk, dv, cfg=CFG, b=1):
    l, d, lp, n, w = (cfg.cmp_block_size, cfg.cmp_stride,  # noqa: E741 (the paper's symbols)
                      cfg.slc_block_size, cfg.slc_top_n, cfg.window_size)
    pos = np.arange(t, dtype=np.float64)
    vis_cmp = np.maximum(0, np.floor((pos - l + 1) / d) + 1).sum()  # compressed keys seen
    vis_slc = np.minimum(n * lp, pos + 1).sum()  # selected keys (upper bound: full blocks)
    vis_swa = np.minimum(w, pos + 1).sum()
    per_key = 2 * b * hq * (dk + dv)  # QK^T and PV per query-key pair
    out = {
        "cmp": per_key * vis_cmp,
        "topn": 2 * b * hq * dk * vis_cmp,  # scores recomputed (QK^T only)
        "slc": per_key * vis_slc,
        "swa": per_key * vis_swa,
        "dense": per_key * t * (t + 1) / 2,
    }
    out["nsa"] = out["cmp"] + out["topn"] + out["slc"] + out["swa"]
    return out


# ------------------------------------------------------------------------------------------
# Functions under test
# ------------------------------------------------------------------------------------------
def nsa_fn(impl, low_memory: bool | str = False):
    def f(q, k, v, gates):
        return nsa_attention(q, k, v, gates, None, config=CFG, implementation=impl,
                             low_memory=low_memory)
    return f


def cudnn_dense(q, k, v, gates=None):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def cudnn_window(q, k, v, gates=None):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                        local_window_size=(CFG.window_size - 1, 0))


def fwd_bwd(fn):
    def f(q, k, v, gates, ct):
        out, vjp = jax.vjp(fn, q, k, v, gates)
        return out, vjp(ct)
    return jax.jit(f)


def time_passes(fn, args, ct, reps):
    """fwd, bwd (VJP on saved residuals), fwdbwd timings of ``fn(q, k, v, gates)``."""
    res = {"fwd": timeit(jax.jit(fn), *args, reps=reps)}
    _, vjp = jax.vjp(fn, *args)
    res["bwd"] = timeit(jax.jit(lambda f, c: f(c)), vjp, ct, reps=reps)
    del vjp
    res["fwdbwd"] = timeit(fwd_bwd(fn), *args, ct, reps=reps)
    return res


CMP_KW = dict(block_size=CFG.cmp_block_size, stride=CFG.cmp_stride)


def stage_fns(t):
    """The NSA forward split into its stages, each jitted alone (inputs from the previous)."""
    geom = dict(kind="mean", block_size=CFG.cmp_block_size, stride=CFG.cmp_stride)

    def cmp_stage(q, k, v):  # the GPU default (cuDNN over the residue classes where it applies)
        k_cmp, v_cmp = compress(k, {}, **geom), compress(v, {}, **geom)
        o, lse = gpu_backend.BACKEND.compressed_attention(
            q, k_cmp, v_cmp, block_size=CFG.cmp_block_size, stride=CFG.cmp_stride)
        return o, lse, k_cmp

    def topn_stage(q, k_cmp, lse):
        return sel_gpu.select_blocks(q, k_cmp, lse, seq_len=t, cmp_block_size=CFG.cmp_block_size,
                                     cmp_stride=CFG.cmp_stride, slc_block_size=CFG.slc_block_size,
                                     top_n=CFG.slc_top_n)

    def slc_stage(q, k, v, idx):
        return slc_gpu.selected_attention(q, k, v, idx, block_size=CFG.slc_block_size)[0]

    def swa_stage(q, k, v):  # the GPU default (cuDNN's output where it applies)
        return gpu_backend.BACKEND.sliding_window_attention(q, k, v,
                                                            window_size=CFG.window_size)[0]

    return (jax.jit(cmp_stage), jax.jit(topn_stage), jax.jit(slc_stage), jax.jit(swa_stage),
            jax.jit(combine_branches))


# ------------------------------------------------------------------------------------------
def check(key, band: bool = False, streams: bool = False,
          low_memory: tuple[str, ...] = ()) -> list[str]:
    """Small-size agreement of the GPU backend with the reference: outputs and gradients."""
    lines, ok = [], True
    q, k, v, gates, ct = inputs(key, 1, 2000, 16, 1, 128, 128)
    o_ref, vjp_ref = jax.vjp(jax.jit(nsa_fn("reference")), q, k, v, gates)
    runs = [(impl, False) for impl in (("pallas_triton", BANDED_CMP)
                                       + ((FORCED_BAND,) if band else ())
                                       + (STREAMED if streams else ()))]
    runs += [low_memory_run(m)[1:] for m in low_memory]
    for impl, lean in runs:
        o, vjp = jax.vjp(jax.jit(nsa_fn(impl, lean)), q, k, v, gates)
        # "fwd": the forward alone, which may run other kernels (the folded combination)
        errs = {"out": rel_err(o, o_ref),
                "fwd": rel_err(jax.jit(nsa_fn(impl, lean))(q, k, v, gates), o_ref)}
        for nm, a, r in zip("q k v gates".split(), vjp(ct), vjp_ref(ct), strict=True):
            errs["d" + nm] = rel_err(a, r)
        tag = "" if lean is False else " low_memory" + ("" if lean is True else f"={lean}")
        lines.append(f"check nsa {impl}{tag} T=2000 N=16 K=1 bf16: "
                     + ", ".join(f"{a}={b:.2e}" for a, b in errs.items()))
        ok = ok and all(e < 2e-2 for e in errs.values())
    # The two compressed paths at the benchmark's heads (16 per group), against each other.
    q, k, v, _, ct = inputs(key, 1, 16384, 64, 4, 128, 128)
    geom = dict(kind="mean", block_size=CFG.cmp_block_size, stride=CFG.cmp_stride)
    kc, vc = compress(k, {}, **geom), compress(v, {}, **geom)
    kw = dict(block_size=CFG.cmp_block_size, stride=CFG.cmp_stride)
    res = []
    for f in (functools.partial(cmp_gpu.compressed_attention_cudnn, min_rows=0),
              cmp_gpu.compressed_attention):
        (o, lse), vjp = jax.vjp(jax.jit(lambda *a, f=f: f(*a, **kw)), q, kc, vc)
        res.append((o, np.asarray(lse), *vjp((ct, jnp.zeros_like(lse)))))
    fin = np.isfinite(res[1][1])
    same_empty = bool((np.isfinite(res[0][1]) == fin).all())
    errs = [rel_err(res[0][0], res[1][0]), rel_err(res[0][1][fin], res[1][1][fin])]
    errs += [rel_err(a, b) for a, b in zip(res[0][2:], res[1][2:], strict=True)]
    lines.append("check compressed cudnn vs banded T=16384 N=64 K=4 bf16: o, lse, dq, dk, dv "
                 + " ".join(f"{e:.2e}" for e in errs) + f", empty rows equal {same_empty}")
    ok = ok and same_empty and max(errs) < 2e-2
    lines.append("check " + ("PASSED" if ok else "FAILED"))
    return lines


def smoke_one(stage: str, dtype_name: str) -> None:
    """One stage, forward and VJP, at a small awkward shape against the reference."""
    from pallas_kernels.compressed import reference as cmp_ref
    from pallas_kernels.selected import reference as slc_ref
    from pallas_kernels.selection import reference as sel_ref
    from pallas_kernels.sliding_window import reference as swa_ref
    from tests.pallas_kernels.suite import Case, random_indices
    dtype = jnp.dtype(dtype_name)
    case = Case(b=1, t=1000, n=16, kh=2, dk=128, dv=128, cmp_block_size=32, cmp_stride=16,
                slc_block_size=64, top_n=16, window_size=128)
    q, k, v, _, _ = inputs(jax.random.key(1), case.b, case.t, case.n, case.kh, case.dk,
                           case.dv, dtype)
    c = case.num_cmp
    kc, vc = k[:, :c], v[:, :c]
    if stage == "sel":
        _, lse = cmp_ref.compressed_attention(q, kc, vc, block_size=32, stride=16)
        kw = dict(seq_len=case.t, cmp_block_size=32, cmp_stride=16, slc_block_size=64, top_n=16)
        a = np.sort(np.asarray(sel_gpu.select_blocks(q, kc, lse, **kw)), -1)
        r = np.sort(np.asarray(sel_ref.select_blocks(q, kc, lse, **kw)), -1)
        print(f"smoke sel {dtype_name}: rows differing {(a != r).any(-1).sum()} of "
              f"{a.shape[1] * a.shape[2]}", flush=True)
        return
    if stage == "cmp":
        fns = (lambda *x: cmp_gpu.compressed_attention(*x, block_size=32, stride=16),
               lambda *x: cmp_ref.compressed_attention(*x, block_size=32, stride=16))
        args = (q, kc, vc)
    elif stage == "swa":
        fns = (lambda *x: swa_gpu.sliding_window_attention(*x, window_size=128),
               lambda *x: swa_ref.sliding_window_attention(*x, window_size=128))
        args = (q, k, v)
    else:
        idx = jnp.asarray(random_indices(np.random.default_rng(0), case))
        fns = (lambda *x: slc_gpu.selected_attention(*x, idx, block_size=64),
               lambda *x: slc_ref.selected_attention(*x, idx, block_size=64))
        args = (q, k, v)
    outs = []
    for fn in fns:
        (o, lse), vjp = jax.vjp(jax.jit(fn), *args)
        ct = jax.random.normal(jax.random.key(3), o.shape, jnp.float32).astype(dtype)
        outs.append((o, lse, *vjp((ct, jnp.zeros_like(lse)))))
    fin = np.isfinite(np.asarray(outs[1][1]))
    errs = [rel_err(outs[0][0], outs[1][0]),
            rel_err(np.asarray(outs[0][1])[fin], np.asarray(outs[1][1])[fin])]
    errs += [rel_err(a, b) for a, b in zip(outs[0][2:], outs[1][2:], strict=True)]
    print(f"smoke {stage} {dtype_name}: o, lse, dq, dk, dv rel err " +
          " ".join(f"{e:.1e}" for e in errs), flush=True)


def smoke_all(stages=("cmp", "swa", "sel", "slc"), merges=("dynamic",)) -> None:
    """Every stage and dtype in its own process, so one crash does not hide the others."""
    import subprocess
    jobs = [(s, d, m) for s in stages for d in ("bfloat16", "float32")
            for m in (merges if s == "sel" else ("dynamic",))]
    procs = []
    for s, d, m in jobs:
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", NSA_SELECTION_MERGE=m)
        procs.append((s, d, m, subprocess.Popen(
            [sys.executable, __file__, "--smoke-one", s, d], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)))
    for s, d, m, p in procs:
        out, _ = p.communicate()
        lines = [x for x in out.splitlines() if x.strip() and "Warning" not in x
                 and "deprecat" not in x.lower()]
        tail = [x for x in lines if x.startswith("smoke")] or lines[-4:]
        print(f"--- {s} {d} {m} rc={p.returncode}\n" + "\n".join(tail), flush=True)


def grad_of(f):
    """``f``'s input gradients under its own output as cotangent (forward + backward)."""
    def g(*x):
        o, vjp = jax.vjp(lambda *y: f(*y)[0], *x)
        return vjp(o)
    return g


def run_variants(args, records, table):
    """Tile variants of each stage at the largest length (forward and backward)."""
    t = max(args.seq)
    hq, hkv, d = args.variant_heads
    q, k, v, gates, ct = inputs(jax.random.key(99), 1, t, hq, hkv, d, d)
    k_cmp, v_cmp, lse, idx = _paper_selection(q, k, v, t)

    def variant(name, fn, *a):
        try:
            r = timeit(jax.jit(fn), *a, reps=args.reps)
        except Exception as err:  # a tile that does not compile: report and go on
            print(f"variant {name}: {type(err).__name__}: {str(err)[:200]}", flush=True)
            return
        pas = "fwdbwd" if "bwd" in name else "fwd"
        records.append(dict(name="variant/" + name, **{"pass": pas}, T=t, HQ=hq, HKV=hkv, Dk=d,
                            Dv=d, **r))
        table.append((f"variant {name}", t, r["ms"]))
        print(f"variant {name:60s} {r['ms']:8.3f} ms", flush=True)

    groups = set(args.variant_groups)

    def chosen(group, variants):
        return variants if group in groups else ()

    for bq, bk, nw, st, edges, with_swa in chosen("banded", args.banded_variants):
        bs = swa_gpu.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bk, block_k_dkv=bq,
                                num_warps=nw, num_warps_bwd=nw, num_stages=st,
                                num_stages_bwd=st, mask_edges_only=edges)
        swa = lambda q, k, v, bs=bs: swa_gpu.sliding_window_attention(  # noqa: E731
            q, k, v, window_size=512, block_sizes=bs)
        cmpf = lambda q, k, v, bs=bs: cmp_gpu.compressed_attention(  # noqa: E731
            q, k, v, block_size=32, stride=16, block_sizes=bs)
        tag = f"bq{bq} bk{bk} w{nw} s{st}" + (" edges" if edges else "")
        if with_swa:
            variant(f"swa fwd {tag}", lambda *a, f=swa: f(*a)[0], q, k, v)
            variant(f"swa fwd+bwd {tag}", grad_of(swa), q, k, v)
        variant(f"cmp fwd {tag}", lambda *a, f=cmpf: f(*a)[0], q, k_cmp, v_cmp)
        variant(f"cmp fwd+bwd {tag}", grad_of(cmpf), q, k_cmp, v_cmp)
    if "selected" in groups:  # the forced blocks as a band, forward and forward+backward
        band_bs = slc_gpu.BlockSizes(**{**tuned_block_sizes.SELECTED, "forced_band": True})
        for tag, bs in (("per-query", None), ("forced band", band_bs)):
            slc = lambda q, k, v, bs=bs: slc_gpu.selected_attention(  # noqa: E731
                q, k, v, idx, block_size=64, block_sizes=bs, forced_included=True)
            variant(f"slc fwd {tag}", lambda *a, f=slc: f(*a)[0], q, k, v)
            variant(f"slc fwd+bwd {tag}", grad_of(slc), q, k, v)
    for nw, e in chosen("selected", args.selected_variants):
        bs = slc_gpu.BlockSizes(entries_per_chunk=e, num_warps=nw, num_warps_bwd=nw)
        slc = lambda q, k, v, bs=bs: slc_gpu.selected_attention(  # noqa: E731
            q, k, v, idx, block_size=64, block_sizes=bs)
        variant(f"slc fwd w{nw}", lambda *a, f=slc: f(*a)[0], q, k, v)
        variant(f"slc fwd+bwd w{nw} e{e}", grad_of(slc), q, k, v)
    # Forward and dq launch parameters (dk/dv kept at the table's): fewer pipeline stages
    # leave shared memory for more programs per SM.
    for nw, st in chosen("selected", args.selected_launch_variants):
        bs = slc_gpu.BlockSizes(**{**tuned_block_sizes.SELECTED, "num_warps": nw,
                                   "num_stages": st})
        slc = lambda q, k, v, bs=bs: slc_gpu.selected_attention(  # noqa: E731
            q, k, v, idx, block_size=64, block_sizes=bs)
        variant(f"slc fwd w{nw} s{st}", lambda *a, f=slc: f(*a)[0], q, k, v)
        variant(f"slc fwd+bwd w{nw} s{st} (dq)", grad_of(slc), q, k, v)
    # Several selected blocks gathered a step in the forward and dq walks (blocks_per_step),
    # with their launch parameters; the folded forward (NSA's gated sum in the kernel) too.
    if "steps" in groups:  # stand-ins for the other two branches' outputs
        o_other = [jax.random.normal(kk, ct.shape, ct.dtype)
                   for kk in jax.random.split(jax.random.key(6), 2)]
    for per_step, nw, st in chosen("steps", args.step_variants):
        bs = slc_gpu.BlockSizes(**{**tuned_block_sizes.SELECTED, "blocks_per_step": per_step,
                                   "num_warps": nw, "num_stages": st})
        slc = lambda q, k, v, bs=bs: slc_gpu.selected_attention(  # noqa: E731
            q, k, v, idx, block_size=64, block_sizes=bs)
        folded = lambda q, k, v, g, oc, ow, bs=bs: (  # noqa: E731
            slc_gpu.selected_attention_combined(q, k, v, idx, g, oc, ow, block_size=64,
                                                block_sizes=bs, forced_included=True))
        tag = f"step{per_step} w{nw} s{st}"
        variant(f"slc fwd {tag}", lambda *a, f=slc: f(*a)[0], q, k, v)
        variant(f"slc fwd folded {tag}", folded, q, k, v, gates, *o_other)
        variant(f"slc fwd+bwd {tag} (dq)", grad_of(slc), q, k, v)
    # The selected branch's dk/dv tilings, timed as its forward+backward.
    for e, per_step, nw, st in chosen("dkv", args.dkv_variants):
        bs = slc_gpu.BlockSizes(**{**tuned_block_sizes.SELECTED, "entries_per_chunk": e,
                                   "entries_per_step": per_step, "num_warps_bwd": nw,
                                   "num_stages_bwd": st})
        slc = lambda q, k, v, bs=bs: slc_gpu.selected_attention(  # noqa: E731
            q, k, v, idx, block_size=64, block_sizes=bs)
        variant(f"slc fwd+bwd dkv e{e} step{per_step} w{nw} s{st}", grad_of(slc), q, k, v)
    # The chunk sum with several programs per key block (block 0 has T / e chunks).
    for splits in chosen("dkv", args.sum_split_variants):
        bs = slc_gpu.BlockSizes(**{**tuned_block_sizes.SELECTED, "sum_splits": splits})
        slc = lambda q, k, v, bs=bs: slc_gpu.selected_attention(  # noqa: E731
            q, k, v, idx, block_size=64, block_sizes=bs)
        variant(f"slc fwd+bwd dkv sum splits{splits}", grad_of(slc), q, k, v)
    for kw in chosen("selection", args.selection_variants):
        kw = dict(kw)
        merge = kw.pop("merge", "dynamic")
        bs = sel_gpu.BlockSizes(**{**tuned_block_sizes.SELECTION, **kw})
        tag = (f"{'packed rows' if bs.pack_heads else 'bq'}{bs.block_q} bc{bs.block_c} "
               f"w{bs.num_warps} s{bs.num_stages}" + (" tf32x3" if bs.overlap_tf32x3 else "")
               + ("" if bs.heavy_first else " light-first") + ("" if bs.exp2 else " expf")
               + (" fill-first-chunk" if bs.fill_first_chunk else ""))
        if merge != "dynamic":  # a timing probe only: "one" merges one block a chunk
            tag += f" merge={merge}"
        old_merge, sel_gpu._VARIANT = sel_gpu._VARIANT, merge  # read when the kernel traces
        try:
            variant(f"topn {tag}", lambda q, kc, lse, bs=bs: sel_gpu.select_blocks(
                q, kc, lse, seq_len=t, cmp_block_size=32, cmp_stride=16, slc_block_size=64,
                top_n=16, block_sizes=bs), q, k_cmp, lse)
        finally:
            sel_gpu._VARIANT = old_merge


def run_selected_parts(args, records, table):
    """The selected branch's passes timed apart at the largest length, for dK/dV tilings:
    forward, ``dq``, the inverted index alone, ``dk/dv`` (index + kernel + chunk sum). The
    default tiling's dK/dV is also checked against the reference at 16k first."""
    from pallas_kernels.selected import reference as slc_ref
    t = 16384
    q, k, v, _, ct = inputs(jax.random.key(7), 1, t, 64, 4, 128, 128)
    idx = _paper_selection(q, k, v, t)[3]
    outs = []
    for f in (slc_gpu.selected_attention, slc_ref.selected_attention):
        o, vjp = jax.vjp(lambda q, k, v, f=f: f(q, k, v, idx, block_size=64)[0], q, k, v)
        outs.append((o, *vjp(ct)))
    errs = [rel_err(a, b) for a, b in zip(outs[0], outs[1], strict=True)]
    line = (f"check selected T={t} G=16 bf16 vs reference: o, dq, dk, dv rel err "
            + " ".join(f"{e:.2e}" for e in errs) + (" OK" if max(errs) < 2e-2 else " FAILED"))
    print(line, flush=True)
    table.append((line, t, 0.0))
    del q, k, v, ct, idx, outs

    t = max(args.seq)
    q, k, v, _, ct = inputs(jax.random.key(99), 1, t, 64, 4, 128, 128)
    idx = _paper_selection(q, k, v, t)[3]
    o, lse = slc_gpu.selected_attention(q, k, v, idx, block_size=64)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    delta = jnp.einsum("btnd,btnd->btn", o.astype(jnp.float32), ct.astype(jnp.float32))
    variants = [dict(entries_per_chunk=e, entries_per_step=s, num_warps_bwd=w, num_stages_bwd=st)
                for e, s, w, st in args.dkv_variants]
    for i, kw in enumerate(variants):
        bs = slc_gpu.BlockSizes(**{**tuned_block_sizes.SELECTED, **kw})
        cfg = slc_gpu._Config(block_size=64, scale=128 ** -0.5, g=16, block_sizes=bs,
                              interpret=False)
        parts = {}
        # Every array is an argument (a closed-over 1 GiB cotangent would become a constant).
        if i == 0:
            parts["fwd"] = lambda q, k, v, idx, ct, lse, delta, cfg=cfg: slc_gpu._fwd(
                q, k, v, idx, cfg)
            parts["dq"] = lambda q, k, v, idx, ct, lse, delta, cfg=cfg: slc_gpu._bwd_dq(
                q, k, v, idx, ct, lse, delta, cfg)
            parts["invert"] = lambda q, k, v, idx, ct, lse, delta, cfg=cfg: slc_gpu._invert(
                idx, t // 64, cfg)
        parts["dkv"] = lambda q, k, v, idx, ct, lse, delta, cfg=cfg: slc_gpu._bwd_dkv(
            q, k, v, idx, ct, lse, delta, cfg)
        tag = " ".join(f"{a}={b}" for a, b in kw.items())
        for part, fn in parts.items():
            try:
                r = timeit(jax.jit(fn), q, k, v, idx, ct, lse, delta, reps=args.reps)
            except Exception as err:
                print(f"slc part {part} {tag}: {type(err).__name__}: {str(err)[:300]}",
                      flush=True)
                continue
            records.append(dict(name=f"variant/slc_{part}", **{"pass": "part"}, T=t, **r,
                                block_sizes=kw if part == "dkv" else {}))
            table.append((f"slc {part} {tag}", t, r["ms"]))
            print(f"slc part {part:7s} {tag:75s} {r['ms']:9.3f} ms "
                  f"(first call {r['first_ms'] / 1e3:.1f} s)", flush=True)


def _paper_selection(q, k, v, t):
    """Compressed keys/values, the compressed branch's lse and the top-n of the paper config."""
    geom = dict(kind="mean", block_size=CFG.cmp_block_size, stride=CFG.cmp_stride)
    k_cmp, v_cmp = compress(k, {}, **geom), compress(v, {}, **geom)
    _, lse = cmp_gpu.compressed_attention(q, k_cmp, v_cmp, block_size=CFG.cmp_block_size,
                                          stride=CFG.cmp_stride)
    idx = sel_gpu.select_blocks(q, k_cmp, lse, seq_len=t, cmp_block_size=CFG.cmp_block_size,
                                cmp_stride=CFG.cmp_stride, slc_block_size=CFG.slc_block_size,
                                top_n=CFG.slc_top_n)
    return k_cmp, v_cmp, lse, idx


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--commit", default=os.environ.get("NSA_COMMIT", "unknown"))
    ap.add_argument("--dk192", type=int, default=16384,
                    help="T for the Dk=192, Dv=128 run (0: skip)")
    ap.add_argument("--variants", action="store_true", help="also time tile variants")
    ap.add_argument("--variant-groups", nargs="+", default=["banded", "selected", "selection"],
                    choices=["banded", "selected", "selection", "dkv", "steps"],
                    help="which stages' variants --variants times")
    ap.add_argument("--skip-main", action="store_true", help="only the check and the variants")
    ap.add_argument("--no-stages", action="store_true",
                    help="skip the per-stage timings (NSA and dense as a whole only)")
    ap.add_argument("--variant-heads", type=lambda x: tuple(int(y) for y in x.split(",")),
                    default=(64, 4, 128), metavar="HQ,HKV,D",
                    help="heads and head dim of the variant timings (16,1,64: the 125M model)")
    ap.add_argument("--band", action="store_true",
                    help="also time NSA with the selected branch's forced blocks as a band")
    ap.add_argument("--streams", action="store_true",
                    help="also time NSA with the window stage on a second GPU stream")
    ap.add_argument("--banded-cmp", action=argparse.BooleanOptionalAction, default=True,
                    help="also time NSA with the banded compressed kernels (same run)")
    ap.add_argument("--low-memory", nargs="*", metavar="MODE",
                    help="also check, time and measure the memory of NSA with the "
                         "branch-by-branch backward: 'all' (all-Pallas, every branch "
                         "recomputed), 'none' (all-Pallas, no recompute), 'cudnn' (default "
                         "chain, every branch recomputed; memory only) or branch names "
                         "('window', 'compressed,window': all-Pallas, those recomputed); no "
                         f"MODE: {' '.join(LOW_MEMORY_DEFAULT_MODES)}")
    ap.add_argument("--slc-parts", action="store_true",
                    help="time the selected branch's passes apart, over dK/dV tilings")
    ap.add_argument("--from-log", help="write the result files from a printed log of a run")
    ap.add_argument("--device", default="NVIDIA H200", help="device of the --from-log run")
    ap.add_argument("--log-reason", default="the run ended before writing its files",
                    help="why the result files come from the log (with --from-log)")
    ap.add_argument("--smoke", nargs="*", help="only the per-stage smoke checks (stages)")
    ap.add_argument("--merges", nargs="*", default=["dynamic"], help=argparse.SUPPRESS)
    ap.add_argument("--smoke-one", nargs=2, metavar=("STAGE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke_one:
        smoke_one(*args.smoke_one)
        return
    if args.from_log:
        records, checks = records_from_log(args.from_log)
        write_results(args, args.device, checks, records,
                      source=f"parsed from the printed log of the run ({args.log_reason}); "
                             "medians as printed, min/max not recorded")
        return
    if args.smoke is not None:
        smoke_all(tuple(args.smoke) or ("cmp", "swa", "sel", "slc"), tuple(args.merges))
        return
    # (block_q, block_k, num_warps, num_stages, mask_edges_only, also the window); first = tuned
    args.banded_variants = [(128, 64, 8, 3, True, True), (128, 64, 8, 2, True, True),
                            (128, 64, 8, 3, True, False), (128, 128, 8, 2, True, False),
                            (64, 64, 4, 2, True, False), (64, 64, 4, 3, True, False),
                            (128, 32, 4, 3, True, False), (128, 64, 4, 3, True, False)]
    args.selected_variants = [(2, 256), (8, 1024)]
    args.selected_launch_variants = [(4, 1), (2, 1), (2, 2), (1, 1), (1, 2), (4, 3)]
    # BlockSizes fields over the tuned SELECTION entry (the first is the default itself);
    # "merge" picks the merge loop ("one" is a timing probe with wrong indices).
    # (exp2=False, heavy_first=False, block_c=128, block_q=128 with 8 warps: measured slower at
    # 0e82fad and b87e531; one stage, 8 warps with one, block_q=32: at 140746f; docs/gpu_kernels.md)
    # (fill_first_chunk: 10.59 against 10.53 ms at fb636a6; num_stages=2: 12.84, block_q=128
    # with 8 warps: 12.07, docs/results/kernels_fb636a6.md)
    args.selection_variants = [
        {}, dict(merge="one"), dict(num_stages=4), dict(num_warps=8),
        dict(num_warps=8, num_stages=4), dict(block_c=128), dict(block_c=32, num_stages=4)]
    # (blocks_per_step, num_warps, num_stages) of the selected forward and dq; first = default
    args.step_variants = [(1, 2, 2), (2, 2, 2), (2, 4, 2), (4, 4, 2), (2, 4, 3), (4, 4, 3),
                          (4, 8, 2), (2, 2, 3)]
    args.sum_split_variants = [2, 4, 8, 16]  # BlockSizes.sum_splits (the default is 1)
    # (entries_per_chunk, entries_per_step, num_warps_bwd, num_stages_bwd); first = default
    args.dkv_variants = [(256, 4, 4, 2), (512, 4, 4, 2), (256, 4, 8, 2), (256, 8, 8, 2),
                         (512, 8, 8, 3), (256, 2, 4, 2), (1024, 4, 8, 2)]
    os.makedirs(args.out, exist_ok=True)

    dev = jax.devices()[0]
    print(f"device {dev.device_kind}, jax {jax.__version__}", flush=True)
    if args.low_memory is not None:
        args.low_memory = tuple(args.low_memory) or LOW_MEMORY_DEFAULT_MODES
        for mode in args.low_memory:
            low_memory_run(mode)  # an unknown mode fails before anything compiles
    summary = check(jax.random.key(0), band=args.band, streams=args.streams,
                    low_memory=args.low_memory or ())
    print("\n".join(summary), flush=True)

    records, table = [], []
    hq, hkv = 64, 4
    shapes = [] if args.skip_main else [(t, 128, 128) for t in args.seq]
    if args.dk192 and not args.skip_main:
        shapes.append((args.dk192, 192, 128))
    for t, dk, dv in shapes:
        q, k, v, gates, ct = inputs(jax.random.key(t + dk), 1, t, hq, hkv, dk, dv)
        base = dict(B=1, T=t, HQ=hq, HKV=hkv, Dk=dk, Dv=dv, dtype="bfloat16")
        fl = flops(t, hq, dk, dv)
        bwd_factor = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}

        def add(name, pas, r, f=None, base=base, t=t, dk=dk, bwd_factor=bwd_factor):
            rec = dict(name=name, **{"pass": pas}, **base, **r)
            if f:
                rec["tflops"] = f * bwd_factor.get(pas, 1.0) / (r["ms"] * 1e-3) / 1e12
            records.append(rec)
            tf = f"{rec['tflops']:7.1f}" if "tflops" in rec else "       "
            print(f"T={t:6d} Dk={dk} {name:16s} {pas:7s} {r['ms']:9.3f} ms {tf} TFLOP/s",
                  flush=True)
            return rec

        nsa = nsa_fn("pallas_triton")
        for pas, r in time_passes(nsa, (q, k, v, gates), ct, args.reps).items():
            add("nsa", pas, r, fl["nsa"])
        if args.band:  # the same NSA with the forced blocks as a band, same run
            for pas, r in time_passes(nsa_fn(FORCED_BAND), (q, k, v, gates), ct,
                                      args.reps).items():
                add("nsa_forced_band", pas, r, fl["nsa"])
        if args.banded_cmp:  # the same NSA with the banded compressed kernels, same run
            for pas, r in time_passes(nsa_fn(BANDED_CMP), (q, k, v, gates), ct,
                                      args.reps).items():
                add("nsa_banded_cmp", pas, r, fl["nsa"])
        for impl in STREAMED if args.streams else ():  # stages on other streams, same run
            for pas, r in time_passes(nsa_fn(impl), (q, k, v, gates), ct, args.reps).items():
                add("nsa_" + impl.removeprefix("pallas_triton_"), pas, r, fl["nsa"])
        for mode in args.low_memory or ():  # the branch-by-branch backward
            if mode == "cudnn":
                continue  # memory only (the cuDNN workspace stays)
            name, impl, lean = low_memory_run(mode)
            for pas, r in time_passes(nsa_fn(impl, lean), (q, k, v, gates), ct,
                                      args.reps).items():
                add(name, pas, r, fl["nsa"])
        mem_fns = [("nsa", nsa), ("cudnn_dense", cudnn_dense)]
        if args.banded_cmp:
            mem_fns.append(("nsa_banded_cmp", nsa_fn(BANDED_CMP)))
        for mode in args.low_memory or ():
            name, impl, lean = low_memory_run(mode)
            mem_fns.append((name, nsa_fn(impl, lean)))
        for name, fn in mem_fns:
            try:
                records.append(dict(name=name, **{"pass": "memory"}, **base,
                                    **memory(fwd_bwd(fn), q, k, v, gates, ct)))
                print(f"T={t:6d} Dk={dk} {name:16s} memory  {records[-1]}", flush=True)
            except Exception as err:
                print(f"memory {name} T={t}: {type(err).__name__}: {str(err)[:200]}", flush=True)
        for name, fn, f in (("cudnn_dense", cudnn_dense, fl["dense"]),
                            ("cudnn_window", cudnn_window, fl["swa"])):
            try:
                for pas, r in time_passes(fn, (q, k, v, gates), ct, args.reps).items():
                    add(name, pas, r, f)
            except Exception as err:  # cuDNN may reject a shape (e.g. Dk != Dv)
                print(f"{name} T={t} Dk={dk}: {type(err).__name__}: {str(err)[:300]}")
        if not args.no_stages:
            cmp_s, topn_s, slc_s, swa_s, comb_s = stage_fns(t)
            o_cmp, lse, k_cmp = cmp_s(q, k, v)
            idx = topn_s(q, k_cmp, lse)
            o_slc, o_swa = slc_s(q, k, v, idx), swa_s(q, k, v)
            add("nsa/compressed", "fwd", timeit(cmp_s, q, k, v, reps=args.reps), fl["cmp"])
            add("nsa/topn", "fwd", timeit(topn_s, q, k_cmp, lse, reps=args.reps), fl["topn"])
            add("nsa/selected", "fwd", timeit(slc_s, q, k, v, idx, reps=args.reps), fl["slc"])
            add("nsa/window", "fwd", timeit(swa_s, q, k, v, reps=args.reps), fl["swa"])
            add("nsa/combine", "fwd", timeit(comb_s, gates, o_cmp, o_slc, o_swa, reps=args.reps))
            # The selected stage with the combination folded in (what the forward alone runs).
            add("nsa/selected_combined", "fwd", timeit(
                jax.jit(lambda q, k, v, idx, g, oc, ow: slc_gpu.selected_attention_combined(
                    q, k, v, idx, g, oc, ow, block_size=CFG.slc_block_size, forced_included=True)),
                q, k, v, idx, gates, o_cmp, o_swa, reps=args.reps), fl["slc"])
            # Each attention stage forward + backward (cotangent: its own output).
            v_cmp = compress(v, {}, kind="mean", block_size=CFG.cmp_block_size,
                             stride=CFG.cmp_stride)
            add("nsa/compressed_banded", "fwd", timeit(
                jax.jit(lambda q, kc, vc: cmp_gpu.compressed_attention(q, kc, vc, **CMP_KW)),
                q, k_cmp, v_cmp, reps=args.reps), fl["cmp"])
            add("nsa/compressed_cudnn", "fwd", timeit(
                jax.jit(lambda q, kc, vc: cmp_gpu.compressed_attention_cudnn(q, kc, vc, min_rows=0,
                                                                             **CMP_KW)),
                q, k_cmp, v_cmp, reps=args.reps), fl["cmp"])
            for name, fn, a, f in (
                ("nsa/compressed", lambda q, kc, vc: gpu_backend.BACKEND.compressed_attention(
                    q, kc, vc, **CMP_KW), (q, k_cmp, v_cmp), fl["cmp"]),
                ("nsa/compressed_cudnn", lambda q, kc, vc: cmp_gpu.compressed_attention_cudnn(
                    q, kc, vc, min_rows=0, **CMP_KW), (q, k_cmp, v_cmp), fl["cmp"]),
                ("nsa/compressed_banded", lambda q, kc, vc: cmp_gpu.compressed_attention(
                    q, kc, vc, **CMP_KW), (q, k_cmp, v_cmp), fl["cmp"]),
                ("nsa/selected", lambda q, k, v, idx=idx: slc_gpu.selected_attention(
                    q, k, v, idx, block_size=CFG.slc_block_size), (q, k, v), fl["slc"]),
                ("nsa/window", lambda q, k, v: gpu_backend.BACKEND.sliding_window_attention(
                    q, k, v, window_size=CFG.window_size), (q, k, v), fl["swa"]),
                ("nsa/window_banded", lambda q, k, v: swa_gpu.sliding_window_attention(
                    q, k, v, window_size=CFG.window_size), (q, k, v), fl["swa"]),
            ):
                add(name, "fwdbwd", timeit(jax.jit(grad_of(fn)), *a, reps=args.reps), f)
            del o_cmp, lse, k_cmp, v_cmp, idx, o_slc, o_swa
        del q, k, v, gates, ct
        write_results(args, dev.device_kind, summary, records, quiet=True)  # after every shape

    if args.slc_parts:
        run_selected_parts(args, records, table)
        write_results(args, dev.device_kind, summary, records, quiet=True)
    if args.variants:
        run_variants(args, records, table)

    write_results(args, dev.device_kind, summary, records)


def write_results(args, device: str, checks: list[str], records: list[dict], source: str = "",
                  quiet: bool = False):
    """``kernels.json``, ``kernels.md`` and ``kernels.png`` under ``args.out``."""
    doc = {
        "benchmark": "kernels", "device": device, "jax": jax.__version__,
        "date": datetime.date.today().isoformat(), "commit": args.commit,
        "nsa_config": dict(cmp_block_size=CFG.cmp_block_size, cmp_stride=CFG.cmp_stride,
                           slc_block_size=CFG.slc_block_size, slc_top_n=CFG.slc_top_n,
                           window_size=CFG.window_size, cmp_kind="mean", kv_mode="shared"),
        "reps": args.reps,
        "check": checks,
        "block_sizes": {"sliding_window": tuned_block_sizes.SLIDING_WINDOW,
                        "compressed": tuned_block_sizes.COMPRESSED,
                        "selected": tuned_block_sizes.SELECTED,
                        "selection": tuned_block_sizes.SELECTION},
        "records": records,
    }
    if source:
        doc["source"] = source
    with open(os.path.join(args.out, "kernels.json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    write_markdown(doc, os.path.join(args.out, "kernels.md"))
    try:
        plot(doc, os.path.join(args.out, "kernels.png"))
    except Exception as err:  # matplotlib missing: the JSON and table still stand
        print(f"plot skipped: {err}")
    if not quiet:
        print(open(os.path.join(args.out, "kernels.md")).read())


def records_from_log(path: str) -> tuple[list[dict], list[str]]:
    """Records (and check lines) from this script's printed table, for a run cut short.

    Each line ``T= 65536 Dk=128 nsa fwd 56.724 ms 174.0 TFLOP/s`` becomes a record; the medians
    keep the printed precision and min/max are not known.
    """
    import ast
    import re
    pat = re.compile(r"T=\s*(\d+) Dk=(\d+) (\S+)\s+(\S+)\s+([\d.]+) ms\s*([\d.]+)?")
    recs, checks = [], []
    for line in open(path):
        if line.startswith("check"):
            checks.append(line.strip())
        if " memory " in line and "{" in line:  # a printed memory record
            recs.append(ast.literal_eval(line[line.index("{"):].strip()))
            continue
        m = pat.match(line.strip())
        if m:
            t, dk, name, pas, ms, tf = m.groups()
            rec = dict(name=name, **{"pass": pas}, B=1, T=int(t), HQ=64, HKV=4, Dk=int(dk),
                       Dv=128, dtype="bfloat16", ms=float(ms))
            if tf:
                rec["tflops"] = float(tf)
            recs.append(rec)
    return recs, checks


def _get(recs, name, pas, t, dk=128):
    for r in recs:
        if r["name"] == name and r["pass"] == pas and r["T"] == t and r.get("Dk", dk) == dk:
            return r
    return None


def write_markdown(doc, path):
    recs = doc["records"]
    lines = ["# Kernel benchmark: NSA (Pallas-Triton) vs cuDNN dense attention",
             "",
             f"{doc['device']}, jax {doc['jax']}, {doc['date']}, commit {doc['commit']}. "
             "B=1, HQ=64, HKV=4, bf16; NSA l=32, d=16, l'=64, n=16, w=512, mean-pooling phi. "
             f"Median ms of {doc.get('reps', 10)} after warm-up; ratio = cuDNN dense / NSA, "
             "same run.",
             "", "| T | Dk/Dv | pass | NSA ms | cuDNN dense ms | ratio | cuDNN window ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["T"], r.get("Dk", 128), r.get("Dv", 128)) for r in recs
                   if r["name"] == "nsa"})
    for t, dk, dv in keys:
        for pas in ("fwd", "bwd", "fwdbwd"):
            n, c, w = (_get(recs, nm, pas, t, dk) for nm in ("nsa", "cudnn_dense", "cudnn_window"))
            ratio = f"{c['ms'] / n['ms']:.2f}x" if (n and c) else "-"
            lines.append(f"| {t} | {dk}/{dv} | {pas} | {n['ms']:.2f} | "
                         f"{c['ms'] if c else float('nan'):.2f} | {ratio} | "
                         f"{w['ms'] if w else float('nan'):.2f} |")
    lines += ["", "NSA forward by stage (ms, TFLOP/s of useful work):", "",
              "| T | compressed | top-n | selected | window | combine | selected + combine "
              "(one kernel) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for t, dk, _ in keys:
        cells = []
        for st in ("compressed", "topn", "selected", "window", "combine", "selected_combined"):
            r = _get(recs, "nsa/" + st, "fwd", t, dk)
            cells.append("-" if r is None else
                         f"{r['ms']:.2f}" + (f" ({r['tflops']:.0f})" if "tflops" in r else ""))
        lines.append(f"| {t}{'' if dk == 128 else f' (Dk={dk})'} | " + " | ".join(cells) + " |")
    lines += ["", "Attention stages forward + backward (ms, TFLOP/s of useful work; bwd counted "
              "as 2.5x fwd):",
              "", "| T | compressed | selected | window | window (banded kernel) |",
              "| --- | --- | --- | --- | --- |"]
    for t, dk, _ in keys:
        cells = []
        for st in ("compressed", "selected", "window", "window_banded"):
            r = _get(recs, "nsa/" + st, "fwdbwd", t, dk)
            cells.append("-" if r is None else f"{r['ms']:.2f} ({r['tflops']:.0f})")
        lines.append(f"| {t}{'' if dk == 128 else f' (Dk={dk})'} | " + " | ".join(cells) + " |")
    mem = [r for r in recs if r["pass"] == "memory"]
    if mem:
        lines += ["", "Device memory of one forward+backward call (XLA buffer assignment: "
                  "arguments + outputs + temporaries, GiB):", "",
                  "| T | Dk/Dv | NSA | cuDNN dense | NSA - dense | selection indices |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for t, dk, dv in keys:
            n, c = (_get(recs, nm, "memory", t, dk) for nm in ("nsa", "cudnn_dense"))
            if not (n and c):
                continue
            idx_bytes = t * 4 * doc["nsa_config"]["slc_top_n"] * 4
            gib = 2.0 ** 30
            lines.append(f"| {t} | {dk}/{dv} | {n['peak_bytes'] / gib:.2f} | "
                         f"{c['peak_bytes'] / gib:.2f} | "
                         f"{(n['peak_bytes'] - c['peak_bytes']) / gib:+.3f} | "
                         f"{idx_bytes / gib:.3f} |")
    def pass_cells(name, t, dk):  # ms (ratio to cuDNN dense) of fwd, bwd, fwdbwd
        cells = []
        for pas in ("fwd", "bwd", "fwdbwd"):
            r, c = (_get(recs, nm, pas, t, dk) for nm in (name, "cudnn_dense"))
            cells.append("-" if r is None else f"{r['ms']:.2f}" + (
                f" ({c['ms'] / r['ms']:.2f}x)" if c else ""))
        return cells

    lean = sorted({r["name"] for r in recs if r["name"] == "nsa_all_pallas"
                   or r["name"].startswith("nsa_low_memory")})
    if lean:
        lines += ["", "The branch-by-branch backward (`low_memory`; `nsa_all_pallas`: the "
                  "all-Pallas backend without it, `nsa_low_memory`: every branch recomputed, "
                  "`nsa_low_memory_<branches>`: those recomputed, all on all-Pallas unless "
                  "`_cudnn`; same run; ms, ratio to cuDNN dense; memory GiB, dense's in the "
                  "last column):", "",
                  "| T | Dk/Dv | configuration | fwd | bwd | fwdbwd | memory | dense memory |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for t, dk, dv in keys:
            c = _get(recs, "cudnn_dense", "memory", t, dk)
            for name in lean:
                m = _get(recs, name, "memory", t, dk)
                cells = pass_cells(name, t, dk)
                if m is None and cells == ["-"] * 3:
                    continue
                cells.append("-" if m is None else f"{m['peak_bytes'] / 2.0 ** 30:.2f}")
                cells.append("-" if c is None else f"{c['peak_bytes'] / 2.0 ** 30:.2f}")
                lines.append(f"| {t} | {dk}/{dv} | `{name}` | " + " | ".join(cells) + " |")
    banded = [k for k in keys if _get(recs, "nsa_banded_cmp", "fwd", k[0], k[1])]
    if banded:
        lines += ["", "The same NSA with the banded compressed kernels instead of cuDNN's "
                  "(`pallas_triton_banded_cmp`, same run; ms, ratio to cuDNN dense; memory GiB):",
                  "", "| T | Dk/Dv | fwd | bwd | fwdbwd | memory | compressed fwd cuDNN / banded "
                  "| compressed fwdbwd cuDNN / banded |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for t, dk, dv in banded:
            cells = pass_cells("nsa_banded_cmp", t, dk)
            m = _get(recs, "nsa_banded_cmp", "memory", t, dk)
            cells.append("-" if m is None else f"{m['peak_bytes'] / 2.0 ** 30:.2f}")
            for pas in ("fwd", "fwdbwd"):
                ra, rb = (_get(recs, nm, pas, t, dk)
                          for nm in ("nsa/compressed_cudnn", "nsa/compressed_banded"))
                if ra is None and pas == "fwdbwd":
                    # Runs before the cuDNN fwd+bwd was timed on its own (38422fd, a6fd260):
                    # the default then took cuDNN at every length.
                    ra = _get(recs, "nsa/compressed", pas, t, dk)
                cells.append(f"{ra['ms']:.2f} / {rb['ms']:.2f}" if ra and rb else "-")
            lines.append(f"| {t} | {dk}/{dv} | " + " | ".join(cells) + " |")
    for name, what in (("nsa_window_stream", "the window stage on a second GPU stream "
                        "(`make_backend(window_stream=1)`"),):
        streamed = [k for k in keys if _get(recs, name, "fwd", k[0], k[1])]
        if streamed:
            lines += ["", f"The same NSA with {what}, same run; ms, ratio to cuDNN dense):", "",
                      "| T | Dk/Dv | fwd | bwd | fwdbwd |", "| --- | --- | --- | --- | --- |"]
            for t, dk, dv in streamed:
                lines.append(f"| {t} | {dk}/{dv} | " + " | ".join(pass_cells(name, t, dk))
                             + " |")
    band = [k for k in keys if _get(recs, "nsa_forced_band", "fwd", k[0], k[1])]
    if band:
        lines += ["", "The same NSA with the selected branch's forced blocks as a band "
                  "(`BlockSizes.forced_band`, same run; ms, ratio to cuDNN dense):", "",
                  "| T | Dk/Dv | fwd | bwd | fwdbwd |", "| --- | --- | --- | --- | --- |"]
        for t, dk, dv in band:
            lines.append(f"| {t} | {dk}/{dv} | " + " | ".join(pass_cells("nsa_forced_band", t, dk))
                         + " |")
    var = [r for r in recs if r["name"].startswith("variant/")]
    if var:
        heads = sorted({(r.get("HQ", 64), r.get("HKV", 4), r.get("Dk", 128)) for r in var})
        lines += ["", "Tile variants (ms; " + ", ".join(
            f"HQ={a}, HKV={b}, D={c}" for a, b, c in heads) + f", T={var[0]['T']}):", ""]
        lines += [f"- {r['name'][8:]}: {r['ms']:.3f}" for r in var]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def plot(doc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = doc["records"]
    ts = sorted({r["T"] for r in recs if r["name"] == "nsa" and r.get("Dk", 128) == 128})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for pas, style in (("fwd", "-"), ("fwdbwd", "--")):
        for name, color in (("nsa", "C0"), ("cudnn_dense", "C1"), ("cudnn_window", "C2")):
            ys = [(_get(recs, name, pas, t) or {}).get("ms", np.nan) for t in ts]
            axes[0].plot(ts, ys, style, color=color, marker="o", label=f"{name} {pas}")
    axes[0].set(xscale="log", yscale="log", xlabel="T", ylabel="ms", title="time (lower is better)")
    axes[0].legend(fontsize=7)
    bottom = np.zeros(len(ts))
    for i, st in enumerate(("compressed", "topn", "selected", "window", "combine")):
        ys = np.array([(_get(recs, "nsa/" + st, "fwd", t) or {}).get("ms", 0.0) for t in ts])
        axes[1].bar([str(t) for t in ts], ys, bottom=bottom, label=st, color=f"C{i}")
        bottom += ys
    axes[1].set(xlabel="T", ylabel="ms", title="NSA forward by stage")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"NSA vs cuDNN, {doc['device']}, B=1 HQ=64 HKV=4 D=128 bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
