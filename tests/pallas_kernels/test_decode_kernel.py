"""The Pallas-Triton decode kernels (interpret mode on CPU) against the XLA decode twin.

The twin itself is checked against the full-sequence forward in
``tests/nsa_jax/test_decode.py``, so kernel = twin = forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode import gpu
from pallas_kernels.decode import reference as ref
from tests.tolerances import assert_close

GEOM = dict(cmp_block_size=8, cmp_stride=4, slc_block_size=16, top_n=4, window_size=16)


def _inputs(seed, b, n, kh, dk, dv, s_len, c, dtype):
    ks = jax.random.split(jax.random.key(seed), 8)

    def normal(i, shape):
        return jax.random.normal(ks[i], shape, jnp.float32).astype(dtype)

    return (normal(0, (b, n, dk)), normal(1, (b, c, kh, dk)), normal(2, (b, c, kh, dv)),
            normal(3, (b, s_len, kh, dk)), normal(4, (b, s_len, kh, dv)),
            normal(5, (b, s_len, kh, dk)), normal(6, (b, s_len, kh, dv)),
            jax.nn.sigmoid(jax.random.normal(ks[7], (b, n, 3))))


@pytest.mark.parametrize(
    "n,kh,dk,dv,block_k,fuse,dtype",
    [
        (8, 2, 16, 32, 16, True, jnp.float32),  # G = 4 padded to 16; several splits per branch
        (16, 1, 32, 16, 64, False, jnp.float32),  # MQA, G = 16; one tile per split; 3 launches
        (8, 2, 32, 32, 16, True, jnp.bfloat16),
    ],
)
def test_decode_kernel_matches_twin(n, kh, dk, dv, block_k, fuse, dtype):
    s_len, c = 64, 64
    # Lengths: a single token (no compressed token yet), block-unaligned, and a full cache.
    seq_lens = jnp.asarray([1, 7, 30, 64], jnp.int32)
    args = (*_inputs(n + dk, len(seq_lens), n, kh, dk, dv, s_len, c, dtype), seq_lens)
    sizes = gpu.BlockSizes(block_k=block_k, target_programs=64, fuse_sparse=fuse)
    o_ref, idx_ref = ref.decode_attention(*args, **GEOM)
    o, idx = gpu.decode_attention(*args, **GEOM, block_sizes=sizes, interpret=True)
    assert o.dtype == o_ref.dtype and o.shape == o_ref.shape
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(idx_ref), -1))
    assert_close(o, o_ref, dtype, f"decode kernel G={n // kh} block_k={block_k} fuse={fuse}")


def test_decode_kernel_reads_the_window_from_a_ring():
    """A window ring of 32 slots (position p in slot p % 32) gives the full buffer's result."""
    seq_lens = jnp.asarray([1, 7, 30, 64], jnp.int32)
    q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates = _inputs(
        5, len(seq_lens), 8, 2, 16, 16, 64, 64, jnp.float32)
    ring = 32
    slots = np.arange(ring)
    last = np.asarray(seq_lens)[:, None] - 1
    pos = np.maximum(last - np.mod(last - slots[None, :], ring), 0)  # [B, ring] newest position
    rows = np.arange(len(seq_lens))[:, None]
    k_ring, v_ring = k_swa[rows, pos], v_swa[rows, pos]
    full = (q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, seq_lens)
    ringed = (q, k_cmp, v_cmp, k_slc, v_slc, k_ring, v_ring, gates, seq_lens)
    o_ref, _ = ref.decode_attention(*full, **GEOM)
    o_twin, _ = ref.decode_attention(*ringed, **GEOM)
    assert_close(o_twin, o_ref, jnp.float32, "twin with a window ring")
    for fuse in (True, False):
        sizes = gpu.BlockSizes(block_k=16, target_programs=64, fuse_sparse=fuse)
        o, _ = gpu.decode_attention(*ringed, **GEOM, block_sizes=sizes, interpret=True)
        assert_close(o, o_ref, jnp.float32, f"kernel with a window ring, fuse={fuse}")


def test_split_range_covers_each_key_once():
    lo = jnp.asarray([0, 5, 17, 3, 9], jnp.int32)
    hi = jnp.asarray([63, 40, 17, 2, 70], jnp.int32)  # the fourth range is empty
    for splits in (1, 3, 8):
        lo_s, hi_s = gpu.split_range(lo, hi, splits, 16)
        for r in range(lo.shape[0]):
            covered = [p for a, z in zip(np.asarray(lo_s[r]), np.asarray(hi_s[r]), strict=True)
                       for p in range(a, z + 1)]
            assert covered == list(range(int(lo[r]), int(hi[r]) + 1)), (r, splits)
            starts = np.asarray(lo_s[r])[np.asarray(hi_s[r]) >= np.asarray(lo_s[r])]
            # Every non-empty piece starts inside the range or on a tile boundary.
            assert all(s == int(lo[r]) or s % 16 == 0 for s in starts)


def test_unsupported_head_dim_raises_not_implemented():
    args = (*_inputs(0, 1, 4, 1, 24, 24, 64, 64, jnp.float32), jnp.asarray([10], jnp.int32))
    with pytest.raises(NotImplementedError, match="head dims"):
        gpu.decode_attention(*args, **GEOM, interpret=True)
