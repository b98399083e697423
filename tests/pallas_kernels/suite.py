"""One kernel test suite, subclassed per backend (GPU, TPU interpret, GPU interpret on CPU).

A subclass names the backend under test and may narrow the shapes:

    class TestTritonInterpret(KernelSuite):
        @staticmethod
        def make_backend():
            return gpu_backend.make_backend(interpret=True)

Every stage the backend implements is compared with its pure-jnp twin (the reference, itself
tested against the NumPy oracle in ``tests/nsa_jax``): outputs, log-sum-exps and the gradients of
every differentiable input, by relative error against the tolerance table. Stages the backend
leaves as ``None`` are skipped with a reason, never counted as passing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig, nsa_attention, registry
from nsa_jax.compression import init_compression_params
from tests.tolerances import RTOL, assert_close


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape: ``B, T, N, K, Dk, Dv`` and the NSA block geometry."""

    b: int
    t: int
    n: int
    kh: int
    dk: int
    dv: int
    cmp_block_size: int = 16
    cmp_stride: int = 8
    slc_block_size: int = 16
    top_n: int = 4
    window_size: int = 32

    @property
    def id(self) -> str:
        return (f"B{self.b}T{self.t}N{self.n}K{self.kh}d{self.dk}x{self.dv}"
                f"_l{self.cmp_block_size}d{self.cmp_stride}s{self.slc_block_size}"
                f"n{self.top_n}w{self.window_size}")

    def nsa_config(self, cmp_kind: str = "mean") -> NSAConfig:
        """The case's block geometry as an ``NSAConfig``."""
        return NSAConfig(cmp_block_size=self.cmp_block_size, cmp_stride=self.cmp_stride,
                         slc_block_size=self.slc_block_size, slc_top_n=self.top_n,
                         window_size=self.window_size, cmp_kind=cmp_kind)

    @property
    def num_cmp(self) -> int:
        if self.t < self.cmp_block_size:
            return 0
        return (self.t - self.cmp_block_size) // self.cmp_stride + 1


# Small enough for interpret mode, with T off every block multiple and G in {1, 4, 16}.
DEFAULT_CASES = (
    Case(b=1, t=77, n=2, kh=2, dk=32, dv=32),  # G = 1
    Case(b=2, t=100, n=8, kh=2, dk=32, dv=16),  # G = 4, Dk != Dv, batch 2
    Case(b=1, t=70, n=16, kh=1, dk=16, dv=16),  # G = 16 (MQA)
    Case(b=1, t=12, n=4, kh=1, dk=16, dv=16),  # T < l: no compressed token at all
)
DTYPES = (jnp.float32, jnp.bfloat16)


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def random_indices(rng: np.random.Generator, case: Case) -> np.ndarray:
    """Valid selections with the forced blocks, random others, ``-1`` slots, shuffled order."""
    nb = -(-case.t // case.slc_block_size)
    out = np.full((case.b, case.t, case.kh, case.top_n), -1, np.int32)
    for b in range(case.b):
        for t in range(case.t):
            cur = t // case.slc_block_size
            for h in range(case.kh):
                forced = sorted({0, cur, max(cur - 1, 0)})
                others = [j for j in range(min(cur + 1, nb)) if j not in forced]
                rng.shuffle(others)
                # Leave some slots empty even when more blocks are valid.
                take = rng.integers(0, max(0, case.top_n - len(forced)) + 1)
                chosen = forced + others[:take]
                row = np.array(chosen + [-1] * (case.top_n - len(chosen)), np.int32)
                rng.shuffle(row)
                out[b, t, h] = row
    return out


class KernelSuite:
    """Base class: subclasses set :meth:`make_backend` (and may override ``cases``/``dtypes``)."""

    cases: tuple[Case, ...] = DEFAULT_CASES
    dtypes: tuple = DTYPES
    # Compile each stage call (and its VJP) as one program: on a GPU, op-by-op dispatch of the
    # wrappers' XLA ops costs a compilation per op and shape. The interpreters run eagerly.
    jit: bool = False

    @staticmethod
    def make_backend() -> registry.Backend:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------
    def _backend_stage(self, stage: str):
        fn = getattr(self.make_backend(), stage)
        if fn is None:
            pytest.skip(f"backend does not implement {stage}")
        return self._maybe_jit(fn)

    def _maybe_jit(self, fn):
        if not self.jit:
            return fn

        def jitted(*args, **kw):  # keyword arguments are static (block sizes, scale)
            return jax.jit(lambda *a: fn(*a, **kw))(*args)
        return jitted

    def pytest_generate_tests(self, metafunc):
        """One test item per (case, dtype) of the subclass, so that each can be selected with
        ``-k`` and bounded by a per-test timeout on the device."""
        if "case_dtype" in metafunc.fixturenames:
            params = [(c, d) for c in self.cases for d in self.dtypes]
            metafunc.parametrize("case_dtype", params,
                                 ids=[f"{c.id}-{jnp.dtype(d).name}" for c, d in params])

    def _vjp_check(self, fn, ref_fn, args, diff_argnums, dtype, what):
        """Compares outputs and the VJPs w.r.t. ``diff_argnums`` under a random cotangent."""
        def pick(f):
            def g(*diff):
                full = list(args)
                for i, x in zip(diff_argnums, diff, strict=True):
                    full[i] = x
                return f(*full)
            return g

        diff = [args[i] for i in diff_argnums]
        wrap = jax.jit if self.jit else (lambda f: f)
        o, vjp = jax.vjp(wrap(lambda *d: pick(fn)(*d)[0]), *diff)
        o_ref, vjp_ref = jax.vjp(wrap(lambda *d: pick(ref_fn)(*d)[0]), *diff)
        assert o.dtype == o_ref.dtype, f"{what}: output dtype {o.dtype} != {o_ref.dtype}"
        assert_close(o, o_ref, dtype, f"{what} output")
        ct = _normal(jax.random.key(7), o.shape, o.dtype)
        grads, grads_ref = vjp(ct), vjp_ref(ct)
        for i, gk, gr in zip(diff_argnums, grads, grads_ref, strict=True):
            leaves, leaves_ref = jax.tree.leaves(gk), jax.tree.leaves(gr)
            assert len(leaves) == len(leaves_ref), f"{what}: grad {i} structure differs"
            total = np.sqrt(sum(np.sum(np.asarray(r, np.float64) ** 2) for r in leaves_ref))
            for j, (a, r) in enumerate(zip(leaves, leaves_ref, strict=True)):
                assert not np.isnan(np.asarray(a, np.float32)).any(), f"{what}: NaN in grad {i}"
                ref_norm = np.linalg.norm(np.asarray(r, np.float64))
                if len(leaves) > 1 and ref_norm <= 1e-4 * total:
                    # Zero in exact arithmetic (e.g. phi's key bias: softmax is shift-invariant):
                    # both sides hold rounding noise, so require noise-level, not equal noise.
                    norm = np.linalg.norm(np.asarray(a, np.float64))
                    tol = RTOL[jnp.dtype(dtype)] * total
                    assert norm <= tol, f"{what} grad {i} leaf {j}: {norm:.2e} > {tol:.2e}"
                else:
                    assert_close(a, r, dtype, f"{what} grad of arg {i} leaf {j}")

    # ----------------------------------------------------------------------------------------
    def test_compressed_attention(self, case_dtype):
        fn = self._backend_stage("compressed_attention")
        ref = self._maybe_jit(registry.REFERENCE.compressed_attention)
        case, dtype = case_dtype
        ks = jax.random.split(jax.random.key(case.t), 3)
        c = case.num_cmp
        q = _normal(ks[0], (case.b, case.t, case.n, case.dk), dtype)
        k_cmp = _normal(ks[1], (case.b, c, case.kh, case.dk), dtype)
        v_cmp = _normal(ks[2], (case.b, c, case.kh, case.dv), dtype)
        kw = dict(block_size=case.cmp_block_size, stride=case.cmp_stride, scale=None)
        o, lse = fn(q, k_cmp, v_cmp, **kw)
        o_ref, lse_ref = ref(q, k_cmp, v_cmp, **kw)
        what = f"compressed {case.id} {jnp.dtype(dtype)}"
        np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_ref), err_msg=what)
        fin = np.isfinite(np.asarray(lse_ref))
        assert_close(np.asarray(lse)[fin], np.asarray(lse_ref)[fin], dtype, what + " lse")
        if c:
            self._vjp_check(lambda *a, kw=kw: fn(*a, **kw), lambda *a, kw=kw: ref(*a, **kw),
                            (q, k_cmp, v_cmp), (0, 1, 2), dtype, what)
        else:
            assert not np.asarray(o, np.float32).any(), what + ": empty branch must be 0"

    def test_select_blocks(self, case_dtype):
        fn = self._backend_stage("select_blocks")
        ref = self._maybe_jit(registry.REFERENCE.select_blocks)
        cmp_ref = self._maybe_jit(registry.REFERENCE.compressed_attention)
        case, dtype = case_dtype
        ks = jax.random.split(jax.random.key(case.t + 1), 3)
        c = case.num_cmp
        q = _normal(ks[0], (case.b, case.t, case.n, case.dk), dtype)
        k_cmp = _normal(ks[1], (case.b, c, case.kh, case.dk), dtype)
        v_cmp = _normal(ks[2], (case.b, c, case.kh, case.dv), dtype)
        _, lse = cmp_ref(q, k_cmp, v_cmp, block_size=case.cmp_block_size,
                         stride=case.cmp_stride, scale=None)
        kw = dict(seq_len=case.t, cmp_block_size=case.cmp_block_size,
                  cmp_stride=case.cmp_stride, slc_block_size=case.slc_block_size,
                  top_n=case.top_n, scale=None)
        idx = np.sort(np.asarray(fn(q, k_cmp, lse, **kw)), axis=-1)
        idx_ref = np.sort(np.asarray(ref(q, k_cmp, lse, **kw)), axis=-1)
        np.testing.assert_array_equal(idx, idx_ref, err_msg=f"select {case.id} {dtype}")

    def test_selected_attention(self, case_dtype):
        fn = self._backend_stage("selected_attention")
        ref = self._maybe_jit(registry.REFERENCE.selected_attention)
        case, dtype = case_dtype
        rng = np.random.default_rng(case.t)
        ks = jax.random.split(jax.random.key(case.t + 2), 3)
        q = _normal(ks[0], (case.b, case.t, case.n, case.dk), dtype)
        k = _normal(ks[1], (case.b, case.t, case.kh, case.dk), dtype)
        v = _normal(ks[2], (case.b, case.t, case.kh, case.dv), dtype)
        idx = jnp.asarray(random_indices(rng, case))
        kw = dict(block_size=case.slc_block_size, scale=None)
        what = f"selected {case.id} {jnp.dtype(dtype)}"
        _, lse = fn(q, k, v, idx, **kw)
        _, lse_ref = ref(q, k, v, idx, **kw)
        assert_close(lse, lse_ref, dtype, what + " lse")
        self._vjp_check(lambda q, k, v, idx=idx, kw=kw: fn(q, k, v, idx, **kw),
                        lambda q, k, v, idx=idx, kw=kw: ref(q, k, v, idx, **kw),
                        (q, k, v), (0, 1, 2), dtype, what)

    def test_sliding_window_attention(self, case_dtype):
        fn = self._backend_stage("sliding_window_attention")
        ref = self._maybe_jit(registry.REFERENCE.sliding_window_attention)
        case, dtype = case_dtype
        ks = jax.random.split(jax.random.key(case.t + 3), 3)
        q = _normal(ks[0], (case.b, case.t, case.n, case.dk), dtype)
        k = _normal(ks[1], (case.b, case.t, case.kh, case.dk), dtype)
        v = _normal(ks[2], (case.b, case.t, case.kh, case.dv), dtype)
        kw = dict(window_size=case.window_size, scale=None)
        what = f"window {case.id} {jnp.dtype(dtype)}"
        _, lse = fn(q, k, v, **kw)
        _, lse_ref = ref(q, k, v, **kw)
        assert_close(lse, lse_ref, dtype, what + " lse")
        self._vjp_check(lambda *a, kw=kw: fn(*a, **kw), lambda *a, kw=kw: ref(*a, **kw),
                        (q, k, v), (0, 1, 2), dtype, what)

    def test_full_nsa_matches_reference(self):
        """The whole NSA through this backend (stages it lacks fall back) vs the reference."""
        backend = self.make_backend()
        name = f"under-test-{backend.name}"
        registry.register_backend(dataclasses.replace(backend, name=name, platforms=()))
        case = self.cases[1]
        cfg = case.nsa_config("mlp")
        for dtype in self.dtypes:
            ks = jax.random.split(jax.random.key(11), 8)
            q = _normal(ks[0], (case.b, case.t, case.n, case.dk), dtype)
            k = _normal(ks[1], (case.b, case.t, case.kh, case.dk), dtype)
            v = _normal(ks[2], (case.b, case.t, case.kh, case.dv), dtype)
            gates = jax.nn.sigmoid(_normal(ks[3], (case.b, case.t, case.n, 3), jnp.float32))
            params = {
                "k": init_compression_params(ks[4], kind="mlp", num_kv_heads=case.kh,
                                             block_size=case.cmp_block_size, head_dim=case.dk),
                "v": init_compression_params(ks[5], kind="mlp", num_kv_heads=case.kh,
                                             block_size=case.cmp_block_size, head_dim=case.dv),
            }

            def run(impl, q, k, v, gates, params):
                return nsa_attention(q, k, v, gates, params, config=cfg, implementation=impl)

            self._vjp_check(lambda *a: (run(name, *a),), lambda *a: (run("reference", *a),),
                            (q, k, v, gates, params), (0, 1, 2, 3, 4), dtype,
                            f"nsa {backend.name} {jnp.dtype(dtype)}")
            # Without differentiation a backend may run another forward (the GPU backend folds
            # the gated sum into its selected-attention kernel): check that one as well.
            wrap = jax.jit if self.jit else (lambda f: f)
            args = (q, k, v, gates, params)
            o = wrap(functools.partial(run, name))(*args)
            o_ref = wrap(functools.partial(run, "reference"))(*args)
            assert o.dtype == o_ref.dtype
            assert_close(o, o_ref, dtype, f"nsa {backend.name} {jnp.dtype(dtype)} forward alone")
