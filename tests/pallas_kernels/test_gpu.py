"""The kernel suite on the compiled Pallas-Triton kernels (needs a CUDA GPU), plus larger shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gpu_backend
from pallas_kernels.compressed import reference as compressed_ref
from pallas_kernels.selection import gpu as selection_gpu
from pallas_kernels.selection import reference as selection_ref
from tests.pallas_kernels.suite import DEFAULT_CASES, Case, KernelSuite, _normal

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu",
                       reason="compiled Pallas-Triton kernels need jax.default_backend() == 'gpu'"),
]

LARGER_CASES = (
    # The paper's block geometry and heads per group, T off every block multiple.
    Case(b=1, t=1500, n=32, kh=2, dk=128, dv=128, cmp_block_size=32, cmp_stride=16,
         slc_block_size=64, top_n=16, window_size=512),
    # Dk != Dv with Dk not a power of two (192/128, as in the paper), G = 4.
    Case(b=2, t=700, n=8, kh=2, dk=192, dv=128, cmp_block_size=32, cmp_stride=16,
         slc_block_size=64, top_n=8, window_size=128),
    # G = 3: neither a power of two nor 16.
    Case(b=1, t=333, n=6, kh=2, dk=64, dv=64, cmp_block_size=32, cmp_stride=16,
         slc_block_size=64, top_n=4, window_size=64),
)


class TestTritonGpu(KernelSuite):
    """Every stage compiled for the GPU against its pure-jnp twin, f32 and bf16."""

    cases = DEFAULT_CASES + LARGER_CASES

    @staticmethod
    def make_backend():
        return gpu_backend.make_backend(interpret=False)


def test_select_blocks_long_sequence():
    """Fused top-n at 8k tokens (many chunks per program) matches the reference exactly."""
    case = Case(b=1, t=8192, n=16, kh=1, dk=128, dv=128, cmp_block_size=32, cmp_stride=16,
                slc_block_size=64, top_n=16)
    ks = jax.random.split(jax.random.key(5), 3)
    c = case.num_cmp
    q = _normal(ks[0], (case.b, case.t, case.n, case.dk), jnp.float32)
    k_cmp = _normal(ks[1], (case.b, c, case.kh, case.dk), jnp.float32)
    v_cmp = _normal(ks[2], (case.b, c, case.kh, case.dv), jnp.float32)
    _, lse = compressed_ref.compressed_attention(q, k_cmp, v_cmp, block_size=32, stride=16)
    kw = dict(seq_len=case.t, cmp_block_size=32, cmp_stride=16, slc_block_size=64, top_n=16)
    idx = np.sort(np.asarray(selection_gpu.select_blocks(q, k_cmp, lse, **kw)), -1)
    ref = np.sort(np.asarray(selection_ref.select_blocks(q, k_cmp, lse, **kw)), -1)
    np.testing.assert_array_equal(idx, ref)
