"""A first look at NSA: build a small NSATransformer, run forward and backward at a length where
the paper's configuration is sparse, and show what the selection did.

    python -m nsa_jax.demo [--seq-len 8192] [--layers 2]

Runs on CPU in about a minute; no downloads (the input is bytes of this file, repeated).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.config import ModelConfig, NSAConfig
from nsa_jax.model import NSATransformer


def keys_visited(indices: np.ndarray, seq_len: int, cfg: NSAConfig) -> float:
    """Mean keys one query reads over the three branches, counted from the real selection."""
    t = np.arange(seq_len)
    n_cmp = np.where(t >= cfg.cmp_block_size - 1,
                     (t - cfg.cmp_block_size + 1) // cfg.cmp_stride + 1, 0)
    n_win = np.minimum(t + 1, cfg.window_size)
    lp = cfg.slc_block_size
    idx = indices[0, :, 0, :]  # [T, M] for batch 0, KV head 0
    starts = idx * lp
    per_block = np.clip(t[:, None] - starts + 1, 0, lp)
    n_slc = np.where(idx >= 0, per_block, 0).sum(-1)
    return float(np.mean(n_cmp + n_slc + n_win))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)

    nsa = NSAConfig()  # the paper's: l=32, d=16, l'=64, n=16, w=512
    cfg = ModelConfig(d_model=128, num_layers=args.layers, num_heads=8, num_kv_heads=2,
                      head_dim=32, mlp_hidden=352, nsa=nsa)
    model = NSATransformer(cfg, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"backend: {jax.default_backend()}  |  NSATransformer: {args.layers} layers, "
          f"{n_params / 1e6:.2f}M parameters, attention=nsa")
    print(f"NSA config: l={nsa.cmp_block_size} d={nsa.cmp_stride} l'={nsa.slc_block_size} "
          f"n={nsa.slc_top_n} w={nsa.window_size} phi={nsa.cmp_kind} kv_mode={nsa.kv_mode}")

    text = open(__file__, "rb").read()
    reps = -(-(args.seq_len + 1) // len(text))
    data = np.frombuffer((text * reps)[: args.seq_len + 1], np.uint8).astype(np.int32)
    tokens = jnp.asarray(data[None, :-1])
    targets = jnp.asarray(data[None, 1:])

    @nnx.jit
    def loss_and_grad(model):
        def loss_fn(m):
            logp = jax.nn.log_softmax(m(tokens))
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
        return nnx.value_and_grad(loss_fn)(model)

    start = time.perf_counter()
    loss, grads = loss_and_grad(model)
    jax.block_until_ready(grads)
    elapsed = time.perf_counter() - start
    gnorm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(nnx.state(grads)))))
    print(f"forward + backward at T={args.seq_len}: loss {float(loss):.3f} (ln 259 = "
          f"{np.log(259):.3f} at init), grad norm {gnorm:.3f}, {elapsed:.1f} s incl. compile")

    # Look inside the first layer: which blocks did queries pick?
    layer = model.blocks[0].attn
    x = model.blocks[0].attn_norm(model.embed(tokens))
    _, aux = nnx.jit(lambda layer, x: layer(x, return_aux=True))(layer, x)
    idx = np.asarray(aux.indices)
    print("\nselected blocks (layer 0, KV head 0; forced: 0, current, previous):")
    for t in sorted({min(args.seq_len - 1, p) for p in (100, 1000, args.seq_len // 2,
                                                         args.seq_len - 1)}):
        row = sorted(int(j) for j in idx[0, t, 0] if j >= 0)
        print(f"  t={t:6d} (block {t // nsa.slc_block_size:4d}): {row}")

    visited = keys_visited(idx, args.seq_len, nsa)
    dense = (args.seq_len + 1) / 2
    print(f"\nkeys visited per query (mean over t): NSA {visited:.0f} vs dense causal {dense:.0f}"
          f"  ->  {dense / visited:.1f}x fewer")
    model_est = nsa.keys_per_query(args.seq_len)
    print(f"spec cost model T/(2d) + n*l' + w = {model_est:.0f} "
          f"(dense T/2 = {args.seq_len / 2:.0f}, {args.seq_len / 2 / model_est:.1f}x); "
          f"at T=65536: {nsa.keys_per_query(65536):.0f} vs 32768 "
          f"({32768 / nsa.keys_per_query(65536):.1f}x)")


if __name__ == "__main__":
    main()
