"""A/B of two versions of the decode kernels in one process, interleaved, next to dense decoding.

Two copies of ``pallas_kernels/decode/gpu.py`` (this checkout's and an older one, e.g. from
``git show REV:pallas_kernels/decode/gpu.py > /tmp/gpu_old.py``) are timed in alternating
rounds with ``benchmarks/decode.py``'s dependent-step harness, with dense decoding (XLA and
cuDNN) in the same rounds, so drift between processes does not enter the comparison. Each
version is first checked against the XLA decode path; then the kernels' GPU time per step is
profiled at 8k / batch 1 (``benchmarks/profile.py``'s method).

    python benchmarks/decode_ab.py --old /tmp/gpu_old.py --out DIR

Writes ``DIR/ab.json`` and prints one line per shape and per profile.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import decode as dec  # noqa: E402
from benchmarks import profile as prof  # noqa: E402
from pallas_kernels.decode import gpu as gpu_new  # noqa: E402
from pallas_kernels.decode import reference  # noqa: E402


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def nsa_fn(mod, interpret: bool):
    return lambda q, *rest: mod.decode_attention(q, *rest, **dec.NSA, interpret=interpret)[0]


def check(mods: dict, contexts, interpret: bool) -> bool:
    ok_all = True
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        for c_len in contexts:
            args = list(dec.make_nsa_set(jax.random.key(1), 3, c_len, dtype))
            args[-1] = jnp.asarray([c_len, c_len // 2 - 24, 37], jnp.int32)  # unequal lengths
            o_ref, i_ref = jax.jit(functools.partial(reference.decode_attention, **dec.NSA))(*args)
            for name, mod in mods.items():
                o, i = jax.jit(functools.partial(mod.decode_attention, **dec.NSA,
                                                 interpret=interpret))(*args)
                err = dec.rel_err(o, o_ref)
                same = bool((np.sort(np.asarray(i), -1) == np.sort(np.asarray(i_ref), -1)).all())
                ok = err <= tol and same
                ok_all &= ok
                print(f"check {name} {jnp.dtype(dtype).name} ctx={c_len}: rel err {err:.2e} "
                      f"indices {'same' if same else 'DIFFER'} -> {'OK' if ok else 'FAIL'}",
                      flush=True)
    return ok_all


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="path of the other copy of gpu.py")
    parser.add_argument("--shapes", default="8192:1,16384:1,65536:32", help="CTX:B,...")
    parser.add_argument("--steps", type=int, default=50, help="dependent steps per timed loop")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--runs", type=int, default=4, help="timed loops per op and round")
    parser.add_argument("--profile-ctx", type=int, default=8192, help="0: no profile")
    parser.add_argument("--check-ctx", default="2048,8192",
                        help="contexts of the check against the XLA path")
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit", default=os.environ.get("NSA_COMMIT", "unknown"))
    parser.add_argument("--interpret", action="store_true", help="CPU smoke test only")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    mods = {"old": load_module(args.old, "gpu_old_copy"), "new": gpu_new}
    ok = check(mods, [int(x) for x in args.check_ctx.split(",")], args.interpret)
    res = {"benchmark": "decode_ab", "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, "commit": args.commit, "old": args.old, "checks_ok": ok,
           "steps": args.steps, "rounds": args.rounds, "runs": args.runs, "rows": [],
           "profile": {}}
    key = jax.random.key(0)

    def timed(loop, sets):
        out = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            jax.block_until_ready(loop(sets))
            out.append((time.perf_counter() - t0) * 1e6 / (args.steps * len(sets)))
        return out

    for ctx, b in (tuple(int(v) for v in x.split(":")) for x in args.shapes.split(",")):
        n_sets = dec.num_sets(b, ctx)
        dsets = tuple(dec.make_dense_set(jax.random.fold_in(key, i), b, ctx)
                      for i in range(n_sets))
        nsets = tuple(dec.make_nsa_set(jax.random.fold_in(key, 100 + i), b, ctx)
                      for i in range(n_sets))
        loops = {}
        for impl in ("xla", "cudnn"):
            loop = dec.dependent_loop(functools.partial(dec.dense_fn, implementation=impl),
                                      args.steps)
            try:
                jax.block_until_ready(loop(dsets))
                loops["dense_" + impl] = (loop, dsets)
            except Exception as err:  # cuDNN may refuse a shape, and is absent on CPU
                print(f"dense {impl}: {type(err).__name__}", flush=True)
        for name, mod in mods.items():
            loop = dec.dependent_loop(nsa_fn(mod, args.interpret), args.steps)
            jax.block_until_ready(loop(nsets))
            loops[name] = (loop, nsets)
        times = {k: [] for k in loops}
        for r in range(args.rounds):
            for k in (list(loops) if r % 2 == 0 else list(loops)[::-1]):
                times[k] += timed(*loops[k])
        med = {k: statistics.median(v) for k, v in times.items()}  # us per step
        dense = min(v for k, v in med.items() if k.startswith("dense"))
        row = {"context": ctx, "B": b, "us": med, "dense_best_us": dense,
               **{f"speedup_{k}": dense / med[k] for k in mods}}
        res["rows"].append(row)
        print(f"ctx={ctx} B={b} " + " ".join(f"{k}={v:.2f}" for k, v in med.items()) + " us | "
              + " ".join(f"{k} {dense / med[k]:.3f}x" for k in mods), flush=True)
        del dsets, nsets, loops
        with open(os.path.join(args.out, "ab.json"), "w") as f:
            json.dump(res, f, indent=1)

    if args.profile_ctx:
        ctx = args.profile_ctx
        sets = tuple(dec.make_nsa_set(jax.random.fold_in(key, 100 + i), 1, ctx)
                     for i in range(4))
        dsets = tuple(dec.make_dense_set(jax.random.fold_in(key, i), 1, ctx) for i in range(4))
        targets = {k: (dec.dependent_loop(nsa_fn(m, args.interpret), args.steps), sets)
                   for k, m in mods.items()}
        targets["dense_xla"] = (dec.dependent_loop(
            functools.partial(dec.dense_fn, implementation="xla"), args.steps), dsets)
        for name in ("old", "new", "dense_xla", "new", "old"):
            loop, s = targets[name]
            rec = prof.profile(loop, (s,), 10)
            calls = args.steps * len(s)
            ks = {r["kernel"]: r["us_per_call"] / calls for r in rec["kernels"]}
            res["profile"].setdefault(name, []).append(
                {"wall_us": rec["wall_us_per_call"] / calls,
                 "kernels_us": rec["kernels_us_per_call"] / calls, "kernels": ks})
            print(f"profile ctx={ctx} B=1 {name}: wall {rec['wall_us_per_call'] / calls:.2f} us, "
                  f"kernels {rec['kernels_us_per_call'] / calls:.2f} us | "
                  + " ".join(f"{k}={v:.2f}" for k, v in
                             sorted(ks.items(), key=lambda x: -x[1])[:6]), flush=True)
        with open(os.path.join(args.out, "ab.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
