"""Interleaved A/B: HEAD's kernels, the new default, the sparse kernel selecting at every shape."""
import functools, json, os, statistics, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, os.getcwd())
import jax, jax.numpy as jnp, numpy as np
from benchmarks import decode as dec, profile as prof
from benchmarks.decode_ab import load_module
from pallas_kernels.decode import gpu, reference
OUT = os.environ["OUT"]
old = load_module(".dev/gpu_head.py", "gpu_head_copy")
ALL = gpu.BlockSizes(sparse_select=1 << 30)
def fn(mod, bs=None):
    return lambda q, *r: mod.decode_attention(q, *r, **dec.NSA, block_sizes=bs)[0]
ok_all = True
for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    for c_len in (2048, 8192, 16384):
        args = list(dec.make_nsa_set(jax.random.key(1), 3, c_len, dtype))
        args[-1] = jnp.asarray([c_len, c_len // 2 - 24, 37], jnp.int32)
        o_ref, i_ref = jax.jit(functools.partial(reference.decode_attention, **dec.NSA))(*args)
        for name, bs in (("default", None), ("own_all", ALL)):
            o, i = jax.jit(functools.partial(gpu.decode_attention, **dec.NSA, block_sizes=bs))(*args)
            err = dec.rel_err(o, o_ref); same = bool((np.asarray(i) == np.asarray(i_ref)).all())
            ok = err <= tol and same; ok_all &= ok
            print(f"check {name} {jnp.dtype(dtype).name} ctx={c_len}: {err:.2e} idx {'same' if same else 'DIFFER'} {'OK' if ok else 'FAIL'}", flush=True)
res = {"rows": [], "profile": {}, "checks_ok": ok_all}
key = jax.random.key(0)
STEPS, RUNS, ROUNDS = 50, 4, int(os.environ.get("ROUNDS", 5))
def timed(loop, sets):
    out = []
    for _ in range(RUNS):
        t0 = time.perf_counter(); jax.block_until_ready(loop(sets))
        out.append((time.perf_counter() - t0) * 1e6 / (STEPS * len(sets)))
    return out
for shape in os.environ.get("SHAPES", "8192:1,16384:1,32768:1,8192:8").split(","):
    ctx, b = map(int, shape.split(":"))
    n = dec.num_sets(b, ctx)
    dsets = tuple(dec.make_dense_set(jax.random.fold_in(key, i), b, ctx) for i in range(n))
    nsets = tuple(dec.make_nsa_set(jax.random.fold_in(key, 100 + i), b, ctx) for i in range(n))
    loops = {}
    for impl in ("xla", "cudnn"):
        loops["dense_" + impl] = (dec.dependent_loop(functools.partial(dec.dense_fn, implementation=impl), STEPS), dsets)
    loops["head"] = (dec.dependent_loop(fn(old), STEPS), nsets)
    loops["new"] = (dec.dependent_loop(fn(gpu), STEPS), nsets)
    if b * 4 * (ctx // 64) > gpu.BlockSizes().sparse_select:
        loops["own_all"] = (dec.dependent_loop(fn(gpu, ALL), STEPS), nsets)
    for k, (l, s) in loops.items():
        jax.block_until_ready(l(s))
    times = {k: [] for k in loops}
    for r in range(ROUNDS):
        for k in (list(loops) if r % 2 == 0 else list(loops)[::-1]):
            times[k] += timed(*loops[k])
    med = {k: statistics.median(v) for k, v in times.items()}
    dense = min(med["dense_xla"], med["dense_cudnn"])
    res["rows"].append({"context": ctx, "B": b, "us": med, "dense_best_us": dense})
    print(f"ctx={ctx} B={b} " + " ".join(f"{k}={v:.2f}" for k, v in med.items()) + " | " +
          " ".join(f"{k} {dense / v:.3f}x" for k, v in med.items() if not k.startswith("dense")), flush=True)
    json.dump(res, open(f"{OUT}/ab_sel.json", "w"), indent=1)
sets = tuple(dec.make_nsa_set(jax.random.fold_in(key, 100 + i), 1, 8192) for i in range(4))
for name, f in (("head", fn(old)), ("new", fn(gpu)), ("head", fn(old)), ("new", fn(gpu))):
    rec = prof.profile(dec.dependent_loop(f, STEPS), (sets,), 10)
    calls = STEPS * 4
    ks = {r["kernel"]: r["us_per_call"] / calls for r in rec["kernels"]}
    res["profile"].setdefault(name, []).append({"wall_us": rec["wall_us_per_call"] / calls, "kernels_us": rec["kernels_us_per_call"] / calls, "kernels": ks})
    print(f"profile {name}: wall {rec['wall_us_per_call'] / calls:.2f} kernels {rec['kernels_us_per_call'] / calls:.2f} | " + " ".join(f"{k}={v:.2f}" for k, v in sorted(ks.items(), key=lambda x: -x[1])[:6]), flush=True)
json.dump(res, open(f"{OUT}/ab_sel.json", "w"), indent=1)
