"""Every Mosaic kernel, forward and backward, lowers for TPU at the paper's shapes.

Lowering runs the Pallas-to-Mosaic lowering on CPU (no execution), which enforces Mosaic's
block-shape rules. Shapes: ``T`` = 8k and 64k, ``HQ = 64``, ``HKV = 4``, ``D = 128`` (and the
paper's ``Dk = 192, Dv = 128`` at 8k), bf16, ``l = 32``, ``d = 16``, ``l' = 64``, ``n = 16``,
``w = 512``. The tests also check, from the
traced kernels, that every call's scalar-prefetched tables fit the scalar-memory budget and its
double-buffered blocks plus scratch fit the smallest VMEM (v4's 16 MiB).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.compressed import tpu as cmp_tpu
from pallas_kernels.selected import tpu as slc_tpu
from pallas_kernels.sliding_window import tpu as swa_tpu
from tests.pallas_kernels.lowering import fwd_and_bwd, pallas_eqns

B, HQ, HKV, D = 1, 64, 4, 128
L_CMP, D_CMP, L_SLC, TOP_N, WINDOW = 32, 16, 64, 16, 512
DTYPE = jnp.bfloat16
SMEM_BYTES = 1 << 20  # scalar memory per core, v4 and newer
VMEM_BYTES_V4 = 16 << 20  # the smallest VMEM of v4, v5e, v5p, v6e


def _sds(*shape, dtype=DTYPE):
    return jax.ShapeDtypeStruct(shape, dtype)


def _stage(name: str, t: int, dk: int = D, dv: int = D):
    """``(function of the differentiable inputs, their shapes)`` for one branch at length t."""
    q = _sds(B, t, HQ, dk)
    kv = (_sds(B, t, HKV, dk), _sds(B, t, HKV, dv))
    if name == "sliding_window":
        return (lambda q, k, v: swa_tpu.sliding_window_attention(
            q, k, v, window_size=WINDOW, scale=None)), (q, *kv)
    if name == "compressed":
        c = (t - L_CMP) // D_CMP + 1
        return (lambda q, k, v: cmp_tpu.compressed_attention(
            q, k, v, block_size=L_CMP, stride=D_CMP, scale=None)), (
            q, _sds(B, c, HKV, dk), _sds(B, c, HKV, dv))
    idx = _sds(B, t, HKV, TOP_N, dtype=jnp.int32)
    return (lambda q, k, v, idx: slc_tpu.selected_attention(
        q, k, v, idx, block_size=L_SLC, scale=None)), (q, *kv, idx)


def _block_bytes(block_mapping) -> int:
    shape = tuple(getattr(d, "block_size", 1) for d in block_mapping.block_shape)
    return _nbytes(shape, block_mapping.array_aval.dtype)


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * jnp.dtype(dtype).itemsize


@pytest.mark.parametrize("t,dk,dv", [(8192, D, D), (65536, D, D), (8192, 192, 128)])
@pytest.mark.parametrize("branch", ["sliding_window", "compressed", "selected"])
def test_lowers_for_tpu(branch, t, dk, dv):
    """The brief's shapes (D = 128) at 8k and 64k, and the paper's Dk = 192, Dv = 128 (padded
    to 256 inside the kernels) at 8k."""
    fn, args = _stage(branch, t, dk, dv)
    f = fwd_and_bwd(fn, 3)
    traced = jax.jit(f).trace(*args)
    eqns = pallas_eqns(traced.jaxpr.jaxpr)
    names = {e.params["name"] for e in eqns}
    prefix = {"sliding_window": "nsa_sliding_window", "compressed": "nsa_compressed",
              "selected": "nsa_selected"}[branch]
    assert {f"{prefix}_fwd", f"{prefix}_bwd_dq", f"{prefix}_bwd_dkv"} <= names, names

    for eqn in eqns:
        gm = eqn.params["grid_mapping"]
        what = f"{eqn.params['name']} at T={t}"
        # Scalar-prefetched tables (the first operands) must fit scalar memory with room to
        # spare for the kernel's own scalars.
        scalars = eqn.invars[:gm.num_index_operands]
        smem = sum(_nbytes(v.aval.shape, v.aval.dtype) for v in scalars)
        assert smem <= SMEM_BYTES // 2, f"{what}: {smem} bytes of scalar tables"
        # Every blocked operand is double-buffered in VMEM, plus the scratch buffers.
        vmem = sum(2 * _block_bytes(bm) for bm in gm.block_mappings)
        for v in eqn.params["jaxpr"].invars[len(eqn.invars) + len(eqn.outvars):]:
            vmem += _nbytes(v.aval.shape, v.aval.dtype)  # scratch
        assert vmem <= VMEM_BYTES_V4 // 2, f"{what}: {vmem} bytes of VMEM"

    text = traced.lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") >= len(eqns), f"{branch} at T={t}"
