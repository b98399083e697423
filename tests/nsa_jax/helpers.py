"""Shared builders for the reference tests: random inputs and the oracle's call for a case."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax import NSAConfig, nsa_attention
from nsa_jax.compression import init_compression_params
from tests.oracle import nsa_oracle


@dataclasses.dataclass(frozen=True)
class Case:
    """A reference-vs-oracle configuration."""

    name: str
    b: int = 1
    t: int = 100
    n: int = 4
    kh: int = 2
    dk: int = 8
    dv: int = 8
    l: int = 8  # noqa: E741 - the paper's symbol
    d: int = 4
    lp: int = 16
    top_n: int = 4
    w: int = 16
    kind: str = "mlp"
    kv_mode: str = "separate"

    @property
    def config(self) -> NSAConfig:
        return NSAConfig(cmp_block_size=self.l, cmp_stride=self.d, slc_block_size=self.lp,
                         slc_top_n=self.top_n, window_size=self.w, cmp_kind=self.kind,
                         kv_mode=self.kv_mode)


# One compiled program per shape instead of op-by-op dispatch: several times faster on CPU.
nsa_jit = jax.jit(nsa_attention, static_argnames=("config", "implementation", "return_aux"))


def make_inputs(case: Case, dtype, seed: int = 0) -> dict:
    """Random inputs for ``nsa_attention``: q, k, v, gates, params (+ per-branch k/v)."""
    ks = jax.random.split(jax.random.key(seed), 12)

    def normal(key, shape):
        return jax.random.normal(key, shape, jnp.float32).astype(dtype)

    b, t = case.b, case.t
    inputs = dict(
        q=normal(ks[0], (b, t, case.n, case.dk)),
        k=normal(ks[1], (b, t, case.kh, case.dk)),
        v=normal(ks[2], (b, t, case.kh, case.dv)),
        gates=jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, case.n, 3))),
    )
    # Non-trivial phi parameters: scale the random part up so "mlp"/"linear" differ from mean.
    params = {}
    for part, dim, key in (("k", case.dk, ks[4]), ("v", case.dv, ks[5])):
        p = init_compression_params(key, kind=case.kind, num_kv_heads=case.kh,
                                    block_size=case.l, head_dim=dim)
        params[part] = {name: x + 0.1 * jax.random.normal(jax.random.fold_in(key, i), x.shape)
                        for i, (name, x) in enumerate(sorted(p.items()))}
    inputs["cmp_params"] = params
    if case.kv_mode == "separate":
        inputs.update(
            k_slc=normal(ks[6], (b, t, case.kh, case.dk)),
            v_slc=normal(ks[7], (b, t, case.kh, case.dv)),
            k_swa=normal(ks[8], (b, t, case.kh, case.dk)),
            v_swa=normal(ks[9], (b, t, case.kh, case.dv)),
        )
    return inputs


def run_oracle(case: Case, inputs: dict, indices=None) -> dict:
    """The NumPy oracle on the same inputs (float64)."""
    np_inputs = jax.tree.map(lambda x: np.asarray(x).astype(np.float64), inputs)
    extra = {k: np_inputs[k] for k in ("k_slc", "v_slc", "k_swa", "v_swa") if k in np_inputs}
    return nsa_oracle(
        np_inputs["q"], np_inputs["k"], np_inputs["v"], np_inputs["gates"],
        np_inputs["cmp_params"], cmp_block_size=case.l, cmp_stride=case.d,
        slc_block_size=case.lp, slc_top_n=case.top_n, window_size=case.w, cmp_kind=case.kind,
        indices=indices, **extra,
    )


def dense_causal(q, k, v, scale=None):
    """Plain causal GQA attention in float64 NumPy: ``[B, T, N, Dv]``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("btnd,bsnd->bnts", q, kk) * scale
    t = q.shape[1]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnts,bsnd->btnd", p / p.sum(-1, keepdims=True), vv)
