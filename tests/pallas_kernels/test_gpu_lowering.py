"""Every Pallas-Triton kernel, forward and backward, lowers to Triton IR for an H200.

Lowering runs on CPU against an abstract ``NVIDIA H200`` device: Pallas turns each kernel into
a Triton module (``__gpu$xla.gpu.triton`` custom calls), which rejects the operations and
shapes Triton lacks (non-power-of-two arrays, unsupported gathers, ``sort``). It does not run
Triton's own compiler (PTX, shared-memory fit); ``test_gpu.py`` does that on the device.
Shapes: the paper configuration (``HQ = 64``, ``HKV = 4``, ``l = 32``, ``d = 16``, ``l' = 64``,
``n = 16``, ``w = 512``) in bf16 at T = 8k and 64k with D = 128, and Dk = 192 / Dv = 128 at 8k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels.compressed import gpu as cmp_gpu
from pallas_kernels.decode import gpu as dec_gpu
from pallas_kernels.selected import gpu as slc_gpu
from pallas_kernels.selection import gpu as sel_gpu
from pallas_kernels.sliding_window import gpu as swa_gpu
from tests.pallas_kernels.lowering import fwd_and_bwd, pallas_eqns

B, HQ, HKV = 1, 64, 4
L_CMP, D_CMP, L_SLC, TOP_N, WINDOW = 32, 16, 64, 16, 512
DTYPE = jnp.bfloat16
H200 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
    device_kind="NVIDIA H200", num_cores=132, platform="gpu"))
TRITON_CALL = "__gpu$xla.gpu.triton"


def _sds(*shape, dtype=DTYPE):
    return jax.ShapeDtypeStruct(shape, dtype)


def _lower(f, *args) -> tuple[list[str], str]:
    with jax.sharding.use_abstract_mesh(H200):
        traced = jax.jit(f).trace(*args)
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    names = [e.params["name"] for e in pallas_eqns(traced.jaxpr.jaxpr)]
    return names, text


SHAPES = [(8192, 128, 128), (65536, 128, 128), (8192, 192, 128)]


@pytest.mark.parametrize("t,dk,dv", SHAPES)
@pytest.mark.parametrize("branch", ["sliding_window", "compressed", "selected"])
def test_attention_kernels_lower_for_h200(branch, t, dk, dv):
    q = _sds(B, t, HQ, dk)
    if branch == "sliding_window":
        fn = lambda q, k, v: swa_gpu.sliding_window_attention(  # noqa: E731
            q, k, v, window_size=WINDOW)
        args, prefix = (q, _sds(B, t, HKV, dk), _sds(B, t, HKV, dv)), "nsa_swa"
    elif branch == "compressed":
        c = (t - L_CMP) // D_CMP + 1
        fn = lambda q, k, v: cmp_gpu.compressed_attention(  # noqa: E731
            q, k, v, block_size=L_CMP, stride=D_CMP)
        args, prefix = (q, _sds(B, c, HKV, dk), _sds(B, c, HKV, dv)), "nsa_cmp"
    else:
        fn = lambda q, k, v, idx: slc_gpu.selected_attention(  # noqa: E731
            q, k, v, idx, block_size=L_SLC)
        args = (q, _sds(B, t, HKV, dk), _sds(B, t, HKV, dv),
                _sds(B, t, HKV, TOP_N, dtype=jnp.int32))
        prefix = "nsa_slc"
    names, text = _lower(fwd_and_bwd(fn), *args)
    assert {f"{prefix}_fwd", f"{prefix}_bwd_dq", f"{prefix}_bwd_dkv"} <= set(names), names
    assert text.count(TRITON_CALL) >= len(names), (branch, t, names)


@pytest.mark.parametrize("t,dk,dv", SHAPES + [(8000, 128, 128)])
def test_selected_forced_band_lowers_for_h200(t, dk, dv):
    """The band path (``BlockSizes.forced_band`` with the caller's ``forced_included``): the
    band and scored kernels of the forward and ``dq``, and the unchanged ``dk/dv``, at the
    paper's shapes and a length off ``l'`` (padded tiles)."""
    fn = lambda q, k, v, idx: slc_gpu.selected_attention(  # noqa: E731
        q, k, v, idx, block_size=L_SLC, forced_included=True,
        block_sizes=slc_gpu.BlockSizes(forced_band=True))
    names, text = _lower(fwd_and_bwd(fn), _sds(B, t, HQ, dk), _sds(B, t, HKV, dk),
                         _sds(B, t, HKV, dv), _sds(B, t, HKV, TOP_N, dtype=jnp.int32))
    assert {"nsa_slc_fwd_band", "nsa_slc_fwd_scored", "nsa_slc_bwd_dq_band",
            "nsa_slc_bwd_dq_scored", "nsa_slc_bwd_dkv"} <= set(names), names
    assert "nsa_slc_fwd" not in names and "nsa_slc_bwd_dq" not in names, names
    assert text.count(TRITON_CALL) >= len(names), (t, names)


@pytest.mark.parametrize("t,dk,dv", SHAPES + [(8002, 128, 128)])
def test_selected_combined_lowers_for_h200(t, dk, dv):
    """The selected kernel with NSA's gated sum folded in (the forward without gradients)."""
    fn = lambda q, k, v, idx, g, oc, ow: slc_gpu.selected_attention_combined(  # noqa: E731
        q, k, v, idx, g, oc, ow, block_size=L_SLC, forced_included=True)
    names, text = _lower(fn, _sds(B, t, HQ, dk), _sds(B, t, HKV, dk), _sds(B, t, HKV, dv),
                         _sds(B, t, HKV, TOP_N, dtype=jnp.int32),
                         _sds(B, t, HQ, 3, dtype=jnp.float32), _sds(B, t, HQ, dv),
                         _sds(B, t, HQ, dv))
    assert names == ["nsa_slc_fwd_combined"], names
    assert text.count(TRITON_CALL) >= 1, (t, names)
    # The compressed output as the rows of queries l - 1 on (the cuDNN path's, in place).
    first = L_CMP - 1
    fn = lambda q, k, v, idx, g, oc, ow: slc_gpu.selected_attention_combined(  # noqa: E731
        q, k, v, idx, g, oc, ow, block_size=L_SLC, forced_included=True, cmp_first=first)
    names, _ = _lower(fn, _sds(B, t, HQ, dk), _sds(B, t, HKV, dk), _sds(B, t, HKV, dv),
                      _sds(B, t, HKV, TOP_N, dtype=jnp.int32),
                      _sds(B, t, HQ, 3, dtype=jnp.float32), _sds(B, t - first, HQ, dv),
                      _sds(B, t, HQ, dv))
    assert names == ["nsa_slc_fwd_combined"], names


@pytest.mark.parametrize("t,dk,dv", SHAPES)
def test_selected_combined_backward_lowers_for_h200(t, dk, dv):
    """The folded forward's gradients: the gated sum's backward kernel (``nsa_gate_bwd``, the
    compressed output as rows of queries l - 1 on) before the selected ``dq`` and ``dk/dv``."""
    first = L_CMP - 1
    fn = lambda q, k, v, idx, g, oc, ow: slc_gpu.selected_attention_combined(  # noqa: E731
        q, k, v, idx, g, oc, ow, block_size=L_SLC, forced_included=True, cmp_first=first)
    names, text = _lower(jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(),
                                  argnums=(0, 1, 2, 4, 5, 6)),
                         _sds(B, t, HQ, dk), _sds(B, t, HKV, dk), _sds(B, t, HKV, dv),
                         _sds(B, t, HKV, TOP_N, dtype=jnp.int32),
                         _sds(B, t, HQ, 3, dtype=jnp.float32), _sds(B, t - first, HQ, dv),
                         _sds(B, t, HQ, dv))
    assert {"nsa_gate_bwd", "nsa_slc_bwd_dq", "nsa_slc_bwd_dkv"} <= set(names), names
    assert text.count(TRITON_CALL) >= len(names), (t, names)


@pytest.mark.parametrize("per_step", [2, 4])
@pytest.mark.parametrize("t,dk,dv", [(65536, 128, 128), (8002, 192, 128)])
def test_selected_blocks_per_step_lowers_for_h200(t, dk, dv, per_step):
    """Forward, ``dq`` and the folded forward gathering several blocks a step
    (``BlockSizes.blocks_per_step``): a gather of rows by an index vector."""
    sizes = slc_gpu.BlockSizes(blocks_per_step=per_step)
    fn = lambda q, k, v, idx: slc_gpu.selected_attention(  # noqa: E731
        q, k, v, idx, block_size=L_SLC, block_sizes=sizes)
    args = (_sds(B, t, HQ, dk), _sds(B, t, HKV, dk), _sds(B, t, HKV, dv),
            _sds(B, t, HKV, TOP_N, dtype=jnp.int32))
    names, text = _lower(fwd_and_bwd(fn), *args)
    assert {"nsa_slc_fwd", "nsa_slc_bwd_dq", "nsa_slc_bwd_dkv"} <= set(names), names
    assert text.count(TRITON_CALL) >= len(names), (t, names)
    folded = lambda q, k, v, idx, g, oc, ow: slc_gpu.selected_attention_combined(  # noqa: E731
        q, k, v, idx, g, oc, ow, block_size=L_SLC, block_sizes=sizes)
    names, _ = _lower(folded, *args, _sds(B, t, HQ, 3, dtype=jnp.float32), _sds(B, t, HQ, dv),
                      _sds(B, t, HQ, dv))
    assert names == ["nsa_slc_fwd_combined"], names


@pytest.mark.parametrize("t,dk,dv", [(65536, 128, 128), (8002, 192, 128)])
def test_selected_dkv_sum_splits_lowers_for_h200(t, dk, dv):
    """The ``dk/dv`` chunk sum with several programs per key block
    (``BlockSizes.sum_splits``)."""
    sizes = slc_gpu.BlockSizes(sum_splits=8)
    fn = lambda q, k, v, idx: slc_gpu.selected_attention(  # noqa: E731
        q, k, v, idx, block_size=L_SLC, block_sizes=sizes)
    names, text = _lower(fwd_and_bwd(fn), _sds(B, t, HQ, dk), _sds(B, t, HKV, dk),
                         _sds(B, t, HKV, dv), _sds(B, t, HKV, TOP_N, dtype=jnp.int32))
    assert {"nsa_slc_bwd_dkv", "nsa_slc_bwd_dkv_sum_split"} <= set(names), names
    assert "nsa_slc_bwd_dkv_sum" not in names, names
    assert text.count(TRITON_CALL) >= len(names), (t, names)


def test_window_stream_lowers_for_h200():
    """The window stage on a second GPU stream (``make_backend(window_stream=1)``; the banded
    window kernel, which lowers without a device): its kernels sit in a call annotated for
    stream 1, forward and backward."""
    from pallas_kernels import gpu_backend

    backend = gpu_backend.make_backend(window="pallas", window_stream=1)
    t = 8192
    fn = lambda q, k, v: backend.sliding_window_attention(  # noqa: E731
        q, k, v, window_size=WINDOW)
    names, text = _lower(fwd_and_bwd(fn), _sds(B, t, HQ, 128), _sds(B, t, HKV, 128),
                         _sds(B, t, HKV, 128))
    assert {"nsa_swa_fwd", "nsa_swa_bwd_dq", "nsa_swa_bwd_dkv"} <= set(names), names
    assert text.count('_xla_stream_annotation = "1"') >= 2, "forward and backward on stream 1"


@pytest.mark.parametrize("packed", [False, True], ids=["per_head", "packed"])
@pytest.mark.parametrize("tf32x3", [False, True], ids=["ieee", "tf32x3"])
@pytest.mark.parametrize("t", [8192, 65536])
def test_selection_kernel_lowers_for_h200(t, tf32x3, packed):
    c = (t - L_CMP) // D_CMP + 1
    sizes = sel_gpu.BlockSizes(overlap_tf32x3=tf32x3, pack_heads=packed,
                               block_q=128 if packed else 64)
    fn = lambda q, kc, lse: sel_gpu.select_blocks(  # noqa: E731
        q, kc, lse, seq_len=t, cmp_block_size=L_CMP, cmp_stride=D_CMP,
        slc_block_size=L_SLC, top_n=TOP_N, block_sizes=sizes)
    names, text = _lower(fn, _sds(B, t, HQ, 128), _sds(B, c, HKV, 128),
                         _sds(B, t, HQ, dtype=jnp.float32))
    assert names == ["nsa_sel_topn_packed" if packed else "nsa_sel_topn"], names
    assert text.count(TRITON_CALL) == 1


@pytest.mark.parametrize("sizes", [dict(heavy_first=False), dict(fill_first_chunk=True),
                                   dict(fill_first_chunk=True, pack_heads=True, block_q=128)],
                         ids=["light_first", "fill_first_chunk", "fill_first_chunk_packed"])
def test_selection_kernel_options_lower_for_h200(sizes):
    t = 65536
    c = (t - L_CMP) // D_CMP + 1
    fn = lambda q, kc, lse: sel_gpu.select_blocks(  # noqa: E731
        q, kc, lse, seq_len=t, cmp_block_size=L_CMP, cmp_stride=D_CMP, slc_block_size=L_SLC,
        top_n=TOP_N, block_sizes=sel_gpu.BlockSizes(overlap_tf32x3=True, **sizes))
    names, text = _lower(fn, _sds(B, t, HQ, 128), _sds(B, c, HKV, 128),
                         _sds(B, t, HQ, dtype=jnp.float32))
    assert names == ["nsa_sel_topn_packed" if sizes.get("pack_heads") else "nsa_sel_topn"], names
    assert text.count(TRITON_CALL) == 1


@pytest.mark.parametrize("batch,context", [(1, 65536), (32, 8192), (1, 8192)])
def test_decode_kernels_lower_for_h200(batch, context):
    c = context // D_CMP  # the cache holds compressed slots in multiples of 16
    d = 128
    fn = lambda *a: dec_gpu.decode_attention(  # noqa: E731
        *a, cmp_block_size=L_CMP, cmp_stride=D_CMP, slc_block_size=L_SLC, top_n=TOP_N,
        window_size=WINDOW)
    kv = (_sds(batch, context, HKV, d), _sds(batch, context, HKV, d))
    names, text = _lower(fn, _sds(batch, HQ, d), _sds(batch, c, HKV, d), _sds(batch, c, HKV, d),
                         *kv, *kv, _sds(batch, HQ, 3), _sds(batch, dtype=jnp.int32))
    assert names, "decode made no Pallas call"
    assert text.count(TRITON_CALL) >= len(names), names


@pytest.mark.parametrize("branch", ["sliding_window", "compressed"])
def test_banded_edge_masking_lowers_for_h200(branch):
    """The three-loop banded kernels (``mask_edges_only``) lower at the paper's shapes."""
    from pallas_kernels import tuned_block_sizes
    t = 8192
    table = (tuned_block_sizes.SLIDING_WINDOW if branch == "sliding_window"
             else tuned_block_sizes.COMPRESSED)
    sizes = swa_gpu.BlockSizes(**{**table, "mask_edges_only": True})
    q = _sds(B, t, HQ, 128)
    if branch == "sliding_window":
        fn = lambda q, k, v: swa_gpu.sliding_window_attention(  # noqa: E731
            q, k, v, window_size=WINDOW, block_sizes=sizes)
        args = (q, _sds(B, t, HKV, 128), _sds(B, t, HKV, 128))
    else:
        c = (t - L_CMP) // D_CMP + 1
        fn = lambda q, k, v: cmp_gpu.compressed_attention(  # noqa: E731
            q, k, v, block_size=L_CMP, stride=D_CMP, block_sizes=sizes)
        args = (q, _sds(B, c, HKV, 128), _sds(B, c, HKV, 128))
    names, text = _lower(fwd_and_bwd(fn), *args)
    assert len(names) == 3 and text.count(TRITON_CALL) >= 3, names


def test_int32_extent_guard():
    """Arrays past 2**31 elements (Triton's int32 offsets) are refused with a message naming the
    shape, before any kernel is built; the registry then runs the reference instead."""
    from nsa_jax import registry
    t = 1 << 18  # 256k tokens x 64 heads x 128 = 2**31 elements
    q, kv = _sds(B, t, HQ, 128), _sds(B, t, HKV, 128)
    idx = _sds(B, t, HKV, TOP_N, dtype=jnp.int32)
    with pytest.raises(NotImplementedError, match=r"q of shape \(1, 262144, 64, 128\)"):
        jax.eval_shape(lambda q, k, v, i: slc_gpu.selected_attention(q, k, v, i, block_size=64),
                       q, kv, kv, idx)
    with pytest.raises(NotImplementedError, match="int32"):
        jax.eval_shape(lambda q, k, v: swa_gpu.sliding_window_attention(
            q, k, v, window_size=WINDOW), q, kv, kv)
    # The dK/dV chunk partials can pass the limit while q and k do not (long keys, one head).
    t2, s2 = 65536, (1 << 24) - 64
    with pytest.raises(NotImplementedError, match="dkv_partials"):
        jax.eval_shape(lambda q, k, v, i: slc_gpu.selected_attention(q, k, v, i, block_size=64),
                       _sds(1, t2, 16, 128), _sds(1, s2, 1, 128), _sds(1, s2, 1, 128),
                       _sds(1, t2, 1, TOP_N, dtype=jnp.int32))
    chain = (registry.get_backend("pallas_triton"), registry.REFERENCE)
    out = jax.eval_shape(lambda q, k, v, i: registry.call_stage(
        chain, "selected_attention", q, k, v, i, block_size=64), q, kv, kv, idx)
    assert out[0].shape == (B, t, HQ, 128)  # traced through the reference


def test_packed_selection_falls_back_for_groups_too_wide_for_a_tile():
    """``pack_heads`` with a group whose rows cannot fit one tile's shared memory (128 heads of
    256 float32 dims) lowers the per-head kernel rather than failing to compile."""
    t, n = 1024, 128
    c = (t - L_CMP) // D_CMP + 1
    sizes = sel_gpu.BlockSizes(pack_heads=True, block_q=128)
    fn = lambda q, kc, lse: sel_gpu.select_blocks(  # noqa: E731
        q, kc, lse, seq_len=t, cmp_block_size=L_CMP, cmp_stride=D_CMP,
        slc_block_size=L_SLC, top_n=TOP_N, block_sizes=sizes)
    f32 = jnp.float32
    names, _ = _lower(fn, _sds(1, t, n, 256, dtype=f32), _sds(1, c, 1, 256, dtype=f32),
                      _sds(1, t, n, dtype=f32))
    assert names == ["nsa_sel_topn"], names


@pytest.mark.parametrize("low_memory,cmp_fwd,swa_fwd,slc_fwd,folded", [
    (True, 2, 2, 1, 1), ("window", 1, 2, 1, 0), ("compressed,window", 2, 2, 1, 0)])
def test_low_memory_nsa_lowers_for_h200(low_memory, cmp_fwd, swa_fwd, slc_fwd, folded):
    """``nsa_attention(..., low_memory=...)`` on the all-Pallas GPU backend at 64k: the
    forward folds the gated sum into the selected kernel when that branch is recomputed, the
    backward reruns the recomputed branches' forward kernels (the top-n runs once) between
    optimisation barriers, and every kernel lowers."""
    from nsa_jax import NSAConfig, nsa_attention

    t = 65536
    cfg = NSAConfig(cmp_block_size=L_CMP, cmp_stride=D_CMP, slc_block_size=L_SLC,
                    slc_top_n=TOP_N, window_size=WINDOW, cmp_kind="mean")

    def loss(q, k, v, g):
        o = nsa_attention(q, k, v, g, None, config=cfg, low_memory=low_memory,
                          implementation="pallas_triton_all_pallas")
        return o.astype(jnp.float32).sum()

    names, text = _lower(jax.grad(loss, argnums=(0, 1, 2, 3)), _sds(B, t, HQ, 128),
                         _sds(B, t, HKV, 128), _sds(B, t, HKV, 128), _sds(B, t, HQ, 3))
    counts = {n: names.count(n) for n in set(names)}
    assert counts.get("nsa_sel_topn") == 1, counts
    assert (counts.get("nsa_cmp_fwd"), counts.get("nsa_swa_fwd"), counts.get("nsa_slc_fwd"),
            counts.get("nsa_slc_fwd_combined", 0)) == (cmp_fwd, swa_fwd, slc_fwd, folded), counts
    assert {"nsa_slc_bwd_dq", "nsa_slc_bwd_dkv", "nsa_swa_bwd_dq", "nsa_swa_bwd_dkv"} <= set(
        names), counts
    assert text.count("optimization_barrier") >= 2
