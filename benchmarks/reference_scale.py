"""The pure-jnp reference at scale on an accelerator: does it run fwd+bwd at 64k, how long, how
much memory, and does it agree with the CPU reference.

    python benchmarks/reference_scale.py --out DIR [--seq-lens 16384 65536]

The reference is the exact XLA fallback, not the fast path: its times are recorded to show what
a user gets without kernels, next to cuDNN dense attention timed in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nsa_jax import NSAConfig, nsa_attention  # noqa: E402
from nsa_jax.compression import init_compression_params  # noqa: E402


def _inputs(t, n, kh, dk, dv, dtype, cfg, seed=0):
    ks = jax.random.split(jax.random.key(seed), 12)
    q = jax.random.normal(ks[0], (1, t, n, dk), dtype)
    kv = [jax.random.normal(ks[i], (1, t, kh, dk if i % 2 else dv), dtype) for i in range(1, 7)]
    gates = jax.nn.sigmoid(jax.random.normal(ks[7], (1, t, n, 3)))
    params = {p: init_compression_params(ks[8 + i], kind=cfg.cmp_kind, num_kv_heads=kh,
                                         block_size=cfg.cmp_block_size, head_dim=dim)
              for i, (p, dim) in enumerate((("k", dk), ("v", dv)))}
    return q, kv, gates, params


def _nsa(cfg, impl):
    def f(q, kv, gates, params):
        return nsa_attention(q, kv[0], kv[1], gates, params, config=cfg, k_slc=kv[2],
                             v_slc=kv[3], k_swa=kv[4], v_swa=kv[5], implementation=impl)
    return f


def _time(fn, *args, reps):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times)), float(min(times)), float(max(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    cfg = NSAConfig()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}  jax {jax.__version__}", flush=True)
    records = []

    # 1. The accelerator's reference agrees with the CPU's (f32, HIGHEST precision everywhere).
    q, kv, gates, params = _inputs(1024, 16, 4, 64, 64, jnp.float32, cfg, seed=1)
    out_acc = np.asarray(jax.jit(_nsa(cfg, "reference"))(q, kv, gates, params))
    cpu = jax.devices("cpu")[0]
    on_cpu = jax.device_put((q, kv, gates, params), cpu)
    out_cpu = np.asarray(jax.jit(_nsa(cfg, "reference"))(*on_cpu))
    err = float(np.linalg.norm(out_acc - out_cpu) / np.linalg.norm(out_cpu))
    print(f"reference {dev.platform} vs cpu at T=1024 f32: rel err {err:.2e}", flush=True)
    assert err < 1e-5, err

    n, kh, d = 64, 4, 128
    for t in args.seq_lens:
        q, kv, gates, params = _inputs(t, n, kh, d, d, jnp.bfloat16, cfg)
        fwd = jax.jit(_nsa(cfg, "reference"))

        def loss(q, kv, gates, params):
            return jnp.sum(_nsa(cfg, "reference")(q, kv, gates, params).astype(jnp.float32))

        fwdbwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        base = dict(B=1, T=t, HQ=n, HKV=kh, Dk=d, Dv=d, dtype="bfloat16")
        for name, fn, pass_ in (("nsa_reference", fwd, "fwd"),
                                ("nsa_reference", fwdbwd, "fwdbwd")):
            ms, lo, hi = _time(fn, q, kv, gates, params, reps=args.reps)
            records.append(dict(name=name, **{"pass": pass_}, **base, ms=ms, min_ms=lo,
                                max_ms=hi))
            print(f"T={t:6d} {name:14s} {pass_:7s} {ms:10.2f} ms", flush=True)
        vals = jax.block_until_ready(fwdbwd(q, kv, gates, params))
        finite = all(bool(jnp.isfinite(x.astype(jnp.float32)).all())
                     for x in jax.tree.leaves(vals))
        print(f"T={t:6d} fwd+bwd outputs and gradients finite: {finite}", flush=True)
        assert finite
        if dev.platform == "gpu":
            kd = jax.random.normal(jax.random.key(3), (1, t, kh, d), jnp.bfloat16)

            def dense(q, k, v):
                return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                    implementation="cudnn")

            ms, lo, hi = _time(jax.jit(dense), q, kd, kd, reps=args.reps)
            records.append(dict(name="cudnn_dense", **{"pass": "fwd"}, **base, ms=ms,
                                min_ms=lo, max_ms=hi))
            print(f"T={t:6d} cudnn_dense    fwd     {ms:10.2f} ms", flush=True)
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            print(f"peak device memory so far: {stats['peak_bytes_in_use'] / 2**30:.1f} GiB")

    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                      stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):  # the device copy has no git metadata
        sha = os.environ.get("NSA_COMMIT", "unknown")
    result = {
        "benchmark": "reference_scale", "device": dev.device_kind, "jax": jax.__version__,
        "date": datetime.date.today().isoformat(), "commit": sha,
        "nsa_config": dict(cmp_block_size=cfg.cmp_block_size, cmp_stride=cfg.cmp_stride,
                           slc_block_size=cfg.slc_block_size, slc_top_n=cfg.slc_top_n,
                           window_size=cfg.window_size),
        "reference_vs_cpu_rel_err": err, "records": records,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "reference_scale.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n| T | pass | name | ms |\n| --- | --- | --- | --- |")
    for r in records:
        print(f"| {r['T']} | {r['pass']} | {r['name']} | {r['ms']:.1f} |")


if __name__ == "__main__":
    main()
