"""The kernel suite on the compiled Pallas-Triton kernels (needs a CUDA GPU), plus larger shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gpu_backend
from pallas_kernels.compressed import reference as compressed_ref
from pallas_kernels.decode import gpu as decode_gpu
from pallas_kernels.decode import reference as decode_ref
from pallas_kernels.selection import gpu as selection_gpu
from pallas_kernels.selection import reference as selection_ref
from pallas_kernels.sliding_window import gpu as swa_gpu
from pallas_kernels.sliding_window import reference as swa_ref
from tests.pallas_kernels.suite import DEFAULT_CASES, Case, KernelSuite, _normal
from tests.tolerances import assert_close

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
    # The 125M model's heads (16 query heads on one KV head, D=64: the selected kernels' tiles
    # for small heads) with the paper's blocks, T off every block multiple.
    Case(b=1, t=2100, n=16, kh=1, dk=64, dv=64, cmp_block_size=32, cmp_stride=16,
         slc_block_size=64, top_n=16, window_size=512),
)


class TestTritonGpu(KernelSuite):
    """Every stage compiled for the GPU against its pure-jnp twin, f32 and bf16."""

    cases = DEFAULT_CASES + LARGER_CASES
    jit = True

    @staticmethod
    def make_backend():
        return gpu_backend.make_backend(interpret=False)


@pytest.mark.parametrize("variant", [dict(), dict(pack_heads=True, block_q=128),
                                     dict(heavy_first=False), dict(fill_first_chunk=True)],
                         ids=["per_head", "packed", "light_first", "fill_first_chunk"])
@pytest.mark.parametrize("tf32x3", [False, True], ids=["ieee", "tf32x3"])
def test_select_blocks_long_sequence(tf32x3, variant):
    """Fused top-n at 8k tokens (many chunks per program, most seen whole) matches the
    reference exactly, with full-precision and with tf32x3 block-score dots, per head, with the
    heads packed, launched lightest first, and with chunk 0 filling the empty list (n = 16 is
    one 64-token chunk's blocks here, so the option takes effect)."""
    case = Case(b=1, t=8192, n=16, kh=1, dk=128, dv=128, cmp_block_size=32, cmp_stride=16,
                slc_block_size=64, top_n=16)
    ks = jax.random.split(jax.random.key(5), 3)
    c = case.num_cmp
    q = _normal(ks[0], (case.b, case.t, case.n, case.dk), jnp.float32)
    k_cmp = _normal(ks[1], (case.b, c, case.kh, case.dk), jnp.float32)
    v_cmp = _normal(ks[2], (case.b, c, case.kh, case.dv), jnp.float32)
    _, lse = compressed_ref.compressed_attention(q, k_cmp, v_cmp, block_size=32, stride=16)
    kw = dict(seq_len=case.t, cmp_block_size=32, cmp_stride=16, slc_block_size=64, top_n=16)
    sizes = selection_gpu.BlockSizes(overlap_tf32x3=tf32x3, **variant)
    idx = np.sort(np.asarray(selection_gpu.select_blocks(q, k_cmp, lse, block_sizes=sizes,
                                                         **kw)), -1)
    ref = np.sort(np.asarray(selection_ref.select_blocks(q, k_cmp, lse, **kw)), -1)
    np.testing.assert_array_equal(idx, ref)


@pytest.mark.parametrize("window", ["cudnn", "pallas"])
def test_window_paths_at_paper_shape(window):
    """Both GPU window paths (cuDNN output + banded lse, and the banded kernel alone) against the
    twin at the paper's head size in bf16, outputs, lse and gradients."""
    ks = jax.random.split(jax.random.key(7), 4)
    b, t, n, kh, d, w = 1, 1500, 16, 2, 128, 512
    q = _normal(ks[0], (b, t, n, d), jnp.bfloat16)
    k = _normal(ks[1], (b, t, kh, d), jnp.bfloat16)
    v = _normal(ks[2], (b, t, kh, d), jnp.bfloat16)
    ct = _normal(ks[3], (b, t, n, d), jnp.float32)
    fn = {"cudnn": swa_gpu.sliding_window_attention_cudnn,
          "pallas": swa_gpu.sliding_window_attention}[window]

    def run(f):
        def loss(q, k, v):
            o, lse = f(q, k, v, window_size=w)
            return jnp.sum(o.astype(jnp.float32) * ct), (o, lse)
        (_, (o, lse)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
        return o, lse, grads

    o, lse, grads = run(fn)
    o_r, lse_r, grads_r = run(swa_ref.sliding_window_attention)
    assert_close(o, o_r, jnp.bfloat16, f"{window} window output")
    assert_close(lse, lse_r, jnp.bfloat16, f"{window} window lse")
    for name, g, g_r in zip("qkv", grads, grads_r, strict=True):
        assert_close(g, g_r, jnp.bfloat16, f"{window} window d{name}")


@pytest.mark.parametrize("t", [1500, 4096], ids=["t1500", "t4096"])
@pytest.mark.parametrize("path", ["cudnn", "pallas"])
def test_compressed_paths_at_paper_shape(path, t):
    """Both GPU compressed paths (cuDNN over the residue classes, and the banded kernels)
    against the twin at the paper's geometry and 16 heads per group in bf16: outputs, lse,
    the rows that see nothing, and gradients."""
    from pallas_kernels.compressed import gpu as compressed_gpu

    ks = jax.random.split(jax.random.key(11), 4)
    b, n, kh, d = 1, 32, 2, 128
    c = (t - 32) // 16 + 1
    q = _normal(ks[0], (b, t, n, d), jnp.bfloat16)
    k_cmp = _normal(ks[1], (b, c, kh, d), jnp.bfloat16)
    v_cmp = _normal(ks[2], (b, c, kh, d), jnp.bfloat16)
    ct = _normal(ks[3], (b, t, n, d), jnp.float32)
    # min_rows=0: the cuDNN path at these lengths too (its default starts at 2048 rows).
    fn = {"cudnn": functools.partial(compressed_gpu.compressed_attention_cudnn, min_rows=0),
          "pallas": compressed_gpu.compressed_attention}[path]
    kw = dict(block_size=32, stride=16)

    def run(f):
        def loss(q, k, v):
            o, lse = f(q, k, v, **kw)
            return jnp.sum(o.astype(jnp.float32) * ct), (o, lse)
        (_, (o, lse)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
            q, k_cmp, v_cmp)
        return o, lse, grads

    o, lse, grads = run(fn)
    o_r, lse_r, grads_r = run(compressed_ref.compressed_attention)
    fin = np.isfinite(np.asarray(lse_r))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
    assert not np.asarray(o, np.float32)[~fin].any(), f"{path}: rows that see nothing are 0"
    assert_close(o, o_r, jnp.bfloat16, f"{path} compressed output")
    assert_close(np.asarray(lse)[fin], np.asarray(lse_r)[fin], jnp.bfloat16,
                 f"{path} compressed lse")
    for name, g, g_r in zip("qkv", grads, grads_r, strict=True):
        assert_close(g, g_r, jnp.bfloat16, f"{path} compressed d{name}")


def _paper_selection(q, k):
    """NSA's own selection (the twins, mean compression) at the paper's geometry."""
    from nsa_jax.compression import compress

    k_cmp = compress(k, {}, kind="mean", block_size=32, stride=16)
    _, lse = compressed_ref.compressed_attention(q, k_cmp, k_cmp, block_size=32, stride=16)
    return selection_ref.select_blocks(q, k_cmp, lse, seq_len=q.shape[1], cmp_block_size=32,
                                       cmp_stride=16, slc_block_size=64, top_n=16)


def _check_selected_against_twin(q, k, v, idx, ct, what, **kw):
    """The compiled selected attention with ``kw`` against its twin (bf16): output, lse and
    the gradients of q, k and v; returns the twin's output."""
    from pallas_kernels.selected import gpu as selected_gpu
    from pallas_kernels.selected import reference as selected_ref

    def run(f):
        (o, lse), vjp = jax.vjp(f, q, k, v)
        return o, lse, vjp((ct, jnp.zeros_like(lse)))

    o, lse_o, grads = jax.jit(lambda: run(lambda q, k, v: selected_gpu.selected_attention(
        q, k, v, idx, block_size=64, **kw)))()
    o_r, lse_r, grads_r = jax.jit(lambda: run(lambda q, k, v: selected_ref.selected_attention(
        q, k, v, idx, block_size=64)))()
    assert_close(o, o_r, jnp.bfloat16, f"{what} output")
    assert_close(lse_o, lse_r, jnp.bfloat16, f"{what} lse")
    for name, g, g_r in zip("qkv", grads, grads_r, strict=True):
        assert_close(g, g_r, jnp.bfloat16, f"{what} d{name}")
    return o_r


@pytest.mark.parametrize("t", [1500, 4096], ids=["t1500", "t4096"])
def test_selected_forced_band_at_paper_shape(t):
    """The selected branch with its forced blocks as a band (``BlockSizes.forced_band``) on
    NSA's own selection at the paper's geometry, 16 heads per group, bf16: output, lse and
    gradients against the twin."""
    from pallas_kernels.selected import gpu as selected_gpu

    ks = jax.random.split(jax.random.key(17), 4)
    b, n, kh, d = 1, 32, 2, 128
    q = _normal(ks[0], (b, t, n, d), jnp.bfloat16)
    k = _normal(ks[1], (b, t, kh, d), jnp.bfloat16)
    v = _normal(ks[2], (b, t, kh, d), jnp.bfloat16)
    ct = _normal(ks[3], (b, t, n, d), jnp.bfloat16)
    _check_selected_against_twin(q, k, v, _paper_selection(q, k), ct, "band",
                                 block_sizes=selected_gpu.BlockSizes(forced_band=True),
                                 forced_included=True)


@pytest.mark.parametrize("per_step", [2, 4])
def test_selected_blocks_per_step_at_paper_shape(per_step):
    """The forward and ``dq`` walks gathering ``per_step`` selected blocks a step
    (``BlockSizes.blocks_per_step``) on NSA's own selection at the paper's geometry, with one
    slot per row emptied, bf16: output, lse and gradients against the twin; and the folded
    forward against the twin followed by the gated sum."""
    from pallas_kernels.common import combine_outputs
    from pallas_kernels.selected import gpu as selected_gpu

    ks = jax.random.split(jax.random.key(19), 7)
    b, t, n, kh, d = 1, 1500, 32, 2, 128
    q = _normal(ks[0], (b, t, n, d), jnp.bfloat16)
    k = _normal(ks[1], (b, t, kh, d), jnp.bfloat16)
    v = _normal(ks[2], (b, t, kh, d), jnp.bfloat16)
    ct = _normal(ks[3], (b, t, n, d), jnp.bfloat16)
    idx = np.asarray(_paper_selection(q, k))
    drop = np.random.default_rng(per_step).integers(0, idx.shape[-1], idx.shape[:-1])
    own = (np.arange(t) // 64)[None, :, None, None]
    idx = jnp.asarray(np.where((np.arange(idx.shape[-1]) == drop[..., None]) & (idx != own),
                               -1, idx))
    sizes = selected_gpu.BlockSizes(blocks_per_step=per_step)
    what = f"blocks_per_step={per_step}"
    o_r = _check_selected_against_twin(q, k, v, idx, ct, what, block_sizes=sizes)
    gates = jax.nn.sigmoid(_normal(ks[4], (b, t, n, 3), jnp.float32))
    o_cmp = _normal(ks[5], (b, t, n, d), jnp.bfloat16)
    o_swa = _normal(ks[6], (b, t, n, d), jnp.bfloat16)
    folded = jax.jit(lambda: selected_gpu.selected_attention_combined(
        q, k, v, idx, gates, o_cmp, o_swa, block_size=64, block_sizes=sizes))()
    assert_close(folded, combine_outputs(gates, o_cmp, o_r, o_swa), jnp.bfloat16,
                 f"{what} folded forward")


@pytest.mark.parametrize("t", [1500, 4096], ids=["t1500", "t4096"])
def test_nsa_fold_reads_cudnn_compressed_rows(t):
    """The whole NSA forward on the GPU backend with the cuDNN compressed path forced at short
    lengths (``min_rows=0``): the folded kernel reads cuDNN's output rows in place
    (``cmp_first = l - 1``), against the reference at the paper's geometry in bf16; and the
    gradients through the same backend."""
    import dataclasses

    from nsa_jax import NSAConfig, nsa_attention, registry
    from pallas_kernels.compressed import gpu as compressed_gpu

    base = gpu_backend.make_backend()
    cmp = functools.partial(compressed_gpu.compressed_attention_cudnn, min_rows=0)
    rows = functools.partial(compressed_gpu.compressed_attention_cudnn_rows, min_rows=0)
    rows.pairs_with = cmp
    registry.register_backend(dataclasses.replace(
        base, name="gpu-cudnn-rows-short", platforms=(), compressed_attention=cmp,
        compressed_attention_rows=rows))
    cfg = NSAConfig(cmp_kind="mean")  # l=32, d=16, l'=64, n=16, w=512
    ks = jax.random.split(jax.random.key(23), 5)
    b, n, kh, d = 1, 32, 2, 128
    q = _normal(ks[0], (b, t, n, d), jnp.bfloat16)
    k = _normal(ks[1], (b, t, kh, d), jnp.bfloat16)
    v = _normal(ks[2], (b, t, kh, d), jnp.bfloat16)
    gates = jax.nn.sigmoid(_normal(ks[3], (b, t, n, 3), jnp.float32)).astype(jnp.bfloat16)
    ct = _normal(ks[4], (b, t, n, d), jnp.bfloat16)

    def run(impl):
        return lambda q, k, v, g: nsa_attention(q, k, v, g, None, config=cfg,
                                                implementation=impl)

    jaxpr = str(jax.make_jaxpr(run("gpu-cudnn-rows-short"))(q, k, v, gates))
    assert "nsa_slc_fwd_combined" in jaxpr
    out = jax.jit(run("gpu-cudnn-rows-short"))(q, k, v, gates)
    out_r = jax.jit(run("reference"))(q, k, v, gates)
    assert_close(out, out_r, jnp.bfloat16, f"fold on cuDNN rows T={t} output")
    grads = jax.jit(lambda *a: jax.vjp(run("gpu-cudnn-rows-short"), *a)[1](ct))(q, k, v, gates)
    grads_r = jax.jit(lambda *a: jax.vjp(run("reference"), *a)[1](ct))(q, k, v, gates)
    for name, g, g_r in zip(("dq", "dk", "dv", "dgates"), grads, grads_r, strict=True):
        assert_close(g, g_r, jnp.bfloat16, f"fold on cuDNN rows T={t} {name}")


@pytest.mark.parametrize("impl,low_memory", [
    ("pallas_triton_all_pallas", True), ("pallas_triton", True),
    ("pallas_triton_all_pallas", "window"), ("pallas_triton_all_pallas", "compressed,window"),
    ("pallas_triton", "selected")])
def test_nsa_low_memory_backward(impl, low_memory):
    """``low_memory`` (the branch-by-branch backward; every branch recomputed, or some) on
    the compiled kernels at the paper's geometry in bf16, T off the block multiples: output
    and gradients against the reference, on the all-Pallas backend (the low-memory
    configurations) and the default."""
    from nsa_jax import NSAConfig, nsa_attention

    cfg = NSAConfig(cmp_kind="mean")  # l=32, d=16, l'=64, n=16, w=512
    t, b, n, kh, d = 2500, 1, 32, 2, 128
    ks = jax.random.split(jax.random.key(29), 5)
    q = _normal(ks[0], (b, t, n, d), jnp.bfloat16)
    k = _normal(ks[1], (b, t, kh, d), jnp.bfloat16)
    v = _normal(ks[2], (b, t, kh, d), jnp.bfloat16)
    gates = jax.nn.sigmoid(_normal(ks[3], (b, t, n, 3), jnp.float32)).astype(jnp.bfloat16)
    ct = _normal(ks[4], (b, t, n, d), jnp.bfloat16)

    def run(impl, low_memory):
        return lambda q, k, v, g: nsa_attention(q, k, v, g, None, config=cfg,
                                                implementation=impl, low_memory=low_memory)

    def out_and_grads(fn):
        return jax.jit(lambda *a: (lambda o, vjp: (o, vjp(ct)))(*jax.vjp(fn, *a)))(
            q, k, v, gates)

    out, grads = out_and_grads(run(impl, low_memory))
    out_r, grads_r = out_and_grads(run("reference", False))
    assert_close(out, out_r, jnp.bfloat16, f"{impl} low_memory={low_memory} output")
    for name, g, g_r in zip(("dq", "dk", "dv", "dgates"), grads, grads_r, strict=True):
        assert_close(g, g_r, jnp.bfloat16, f"{impl} low_memory={low_memory} {name}")


def test_decode_at_the_int32_offset_limit():
    """Raw caches of exactly 2**31 elements (batch 64 x 64k tokens x 4 heads x 128, 4 GiB each
    in bf16), the largest the decode kernels' int32 offsets address: the kernel chain equals
    the twin on every row, the last rows (the highest offsets) full and partly filled."""
    b, s, kh, d, n, w = 64, 1 << 16, 4, 128, 64, 512
    c = (s - 32) // 16 + 1
    ks = jax.random.split(jax.random.key(13), 8)
    bf = jnp.bfloat16
    q = jax.random.normal(ks[0], (b, n, d), bf)
    k_cmp = jax.random.normal(ks[1], (b, 4096, kh, d), bf)
    v_cmp = jax.random.normal(ks[2], (b, 4096, kh, d), bf)
    k_slc = jax.random.normal(ks[3], (b, s, kh, d), bf)
    v_slc = jax.random.normal(ks[4], (b, s, kh, d), bf)
    k_swa = jax.random.normal(ks[5], (b, w, kh, d), bf)
    v_swa = jax.random.normal(ks[6], (b, w, kh, d), bf)
    gates = jax.nn.sigmoid(jax.random.normal(ks[7], (b, n, 3)))
    lens = np.full((b,), s, np.int32)
    lens[:4] = [1, 33, 4097, 40000]  # the first rows short
    lens[-2] = s - 70  # the second-to-last row in the middle of a selection block
    lens = jnp.asarray(lens)
    assert c <= 4096 and k_slc.size == 1 << 31
    geom = dict(cmp_block_size=32, cmp_stride=16, slc_block_size=64, top_n=16, window_size=w)
    args = (q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, lens)
    o, idx = jax.jit(functools.partial(decode_gpu.decode_attention, **geom))(*args)
    o_r, idx_r = jax.jit(functools.partial(decode_ref.decode_attention, **geom))(*args)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(idx_r), -1))
    for r in (0, 1, 2, 3, b - 2, b - 1):
        assert_close(o[r], o_r[r], bf, f"decode row {r} of {b} (length {int(lens[r])})")
    assert_close(o, o_r, bf, "decode, every row")
