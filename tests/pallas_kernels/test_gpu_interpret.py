"""The kernel suite on the Pallas-Triton GPU kernels, run by the Pallas interpreter on CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gpu_backend
from pallas_kernels.compressed import reference as compressed_ref
from pallas_kernels.selection import gpu as selection_gpu
from pallas_kernels.selection import reference as selection_ref
from tests.pallas_kernels.suite import DEFAULT_CASES, Case, KernelSuite, _normal


class TestTritonInterpret(KernelSuite):
    """Every stage of the GPU backend against its pure-jnp twin, f32 and bf16."""

    cases = DEFAULT_CASES

    @staticmethod
    def make_backend():
        return gpu_backend.make_backend(interpret=True)


def _check_top_n(case, *, seed, dtype=jnp.float32, num_cmp=None, block_sizes=None):
    """The fused top-n kernel (interpreted) against the reference on random inputs: the same
    block set for every query and KV group. ``num_cmp`` shortens the compressed cache."""
    ks = jax.random.split(jax.random.key(seed), 3)
    c = case.num_cmp if num_cmp is None else num_cmp
    q = _normal(ks[0], (case.b, case.t, case.n, case.dk), dtype)
    k_cmp = _normal(ks[1], (case.b, c, case.kh, case.dk), dtype)
    v_cmp = _normal(ks[2], (case.b, c, case.kh, case.dv), dtype)
    _, lse = compressed_ref.compressed_attention(q, k_cmp, v_cmp, block_size=case.cmp_block_size,
                                                 stride=case.cmp_stride)
    kw = dict(seq_len=case.t, cmp_block_size=case.cmp_block_size, cmp_stride=case.cmp_stride,
              slc_block_size=case.slc_block_size, top_n=case.top_n)
    idx = selection_gpu.select_blocks(q, k_cmp, lse, block_sizes=block_sizes, interpret=True,
                                      **kw)
    ref = selection_ref.select_blocks(q, k_cmp, lse, **kw)
    assert idx.shape == ref.shape == (case.b, case.t, case.kh, case.top_n)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(ref), -1))


@pytest.mark.parametrize("case", [
    # The paper's geometry (r = 2, r' = 4: overlap weights 1, 2, 2, 2, 1), several chunks.
    Case(b=1, t=300, n=4, kh=1, dk=16, dv=16, cmp_block_size=32, cmp_stride=16,
         slc_block_size=64, top_n=4),
    # l = l' = d: scores are the compressed probabilities themselves; more blocks than slots.
    Case(b=1, t=200, n=2, kh=2, dk=16, dv=16, cmp_block_size=16, cmp_stride=16,
         slc_block_size=16, top_n=5),
], ids=lambda c: c.id)
def test_select_blocks_geometries(case):
    """Fused top-n agrees with the reference on block geometries the default cases miss."""
    _check_top_n(case, seed=case.t)


@pytest.mark.parametrize("packed", [False, True], ids=["per_head", "packed"])
def test_select_blocks_natural_exp(packed):
    """``BlockSizes(exp2=False)`` (libdevice ``expf`` instead of base-2 exponentials) selects
    the reference's blocks too, per head and head-packed, in float32 and bf16."""
    case = _LONG_WALKS[0]
    sizes = dict(block_c=16, pack_heads=True, block_q=16) if packed else {}
    for dtype in (jnp.float32, jnp.bfloat16):
        _check_top_n(case, seed=11, dtype=dtype,
                     block_sizes=selection_gpu.BlockSizes(exp2=False, **sizes))


_LONG_WALKS = [
    # The paper's geometry: a chunk is 64 compressed tokens (1024 positions), so from position
    # 1055 on the leading chunks are seen whole and skip the visibility mask.
    Case(b=1, t=1400, n=4, kh=1, dk=16, dv=16, cmp_block_size=32, cmp_stride=16,
         slc_block_size=64, top_n=6),
    # l = d = l' = 16 in 16-token chunks (256 positions): many unmasked chunks, G = 2, batch 2.
    Case(b=2, t=700, n=4, kh=2, dk=16, dv=16, cmp_block_size=16, cmp_stride=16,
         slc_block_size=16, top_n=5),
]


@pytest.mark.parametrize("case", _LONG_WALKS, ids=lambda c: c.id)
@pytest.mark.parametrize("sizes", [
    dict(),
    dict(block_c=16, heavy_first=False),
    dict(block_c=16, block_q=32),
    dict(block_c=16, pack_heads=True, block_q=16),
], ids=["default", "light_first", "small_tiles", "packed"])
@pytest.mark.parametrize("short", [False, True], ids=["full_cmp", "short_cmp"])
def test_select_blocks_long_walks(case, sizes, short):
    """Query blocks that walk chunks seen whole (no visibility mask) and then the masked tail
    agree exactly with the reference, in both launch orders, with smaller tiles, and
    head-packed; also with fewer compressed tokens than the sequence has (``short``), whose
    missing tokens fall inside chunks the mask-free loop would otherwise take whole."""
    _check_top_n(case, seed=case.t, num_cmp=case.num_cmp - (37 if short else 0),
                 block_sizes=selection_gpu.BlockSizes(**sizes))


_FILL_CASES = [
    # The paper's geometry with n = 16 = a 64-token chunk's blocks; two chunks, and a short
    # sequence inside chunk 0.
    Case(b=1, t=1400, n=4, kh=1, dk=16, dv=16, cmp_block_size=32, cmp_stride=16,
         slc_block_size=64, top_n=16),
    Case(b=1, t=300, n=4, kh=1, dk=16, dv=16, cmp_block_size=32, cmp_stride=16,
         slc_block_size=64, top_n=16),
    # l = d = l' = 16, 16-token chunks: many chunks, G = 2, batch 2.
    Case(b=2, t=700, n=4, kh=2, dk=16, dv=16, cmp_block_size=16, cmp_stride=16,
         slc_block_size=16, top_n=16),
]


@pytest.mark.parametrize("case", _FILL_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("sizes", [dict(), dict(heavy_first=False),
                                   dict(pack_heads=True, block_q=16)],
                         ids=["default", "light_first", "packed"])
def test_select_blocks_fill_first_chunk(case, sizes):
    """``fill_first_chunk`` (chunk 0's blocks fill the empty top-n list without merge rounds,
    where n equals a chunk's blocks) selects the reference's blocks exactly, and really
    changes the kernel."""
    rp = case.slc_block_size // case.cmp_stride
    sizes = dict(block_c=16 * rp, **sizes)
    fill = selection_gpu.BlockSizes(fill_first_chunk=True, **sizes)
    _check_top_n(case, seed=case.t + 5, block_sizes=fill)
    q = jnp.zeros((case.b, case.t, case.n, case.dk))
    kc = jnp.zeros((case.b, case.num_cmp, case.kh, case.dk))
    lse = jnp.zeros((case.b, case.t, case.n))
    kw = dict(seq_len=case.t, cmp_block_size=case.cmp_block_size, cmp_stride=case.cmp_stride,
              slc_block_size=case.slc_block_size, top_n=case.top_n, interpret=True)
    jaxprs = [str(jax.make_jaxpr(lambda q, kc, lse, bs=bs: selection_gpu.select_blocks(
        q, kc, lse, block_sizes=bs, **kw))(q, kc, lse))
        for bs in (fill, selection_gpu.BlockSizes(**sizes))]
    assert jaxprs[0] != jaxprs[1]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_compressed_dkv_split(monkeypatch, dtype):
    """The compressed-key dk/dv pass split over programs (float32 partials, summed) agrees with
    the reference; long sequences take this path, the suite's short ones do not."""
    from pallas_kernels.compressed import gpu as compressed_gpu
    from pallas_kernels.sliding_window import gpu as sliding_window_gpu
    from tests.tolerances import assert_close

    monkeypatch.setattr(sliding_window_gpu, "MAX_Q_BLOCKS_PER_PROGRAM", 1)
    b, t, n, kh, dk, dv, l, d = 1, 150, 4, 2, 32, 16, 16, 8
    c = (t - l) // d + 1
    ks = jax.random.split(jax.random.key(3), 4)
    q = _normal(ks[0], (b, t, n, dk), dtype)
    k_cmp = _normal(ks[1], (b, c, kh, dk), dtype)
    v_cmp = _normal(ks[2], (b, c, kh, dv), dtype)
    small = sliding_window_gpu.BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16)

    def fn(*a):
        return compressed_gpu.compressed_attention(*a, block_size=l, stride=d,
                                                   block_sizes=small, interpret=True)[0]

    def ref(*a):
        return compressed_ref.compressed_attention(*a, block_size=l, stride=d)[0]

    o, vjp = jax.vjp(fn, q, k_cmp, v_cmp)
    o_ref, vjp_ref = jax.vjp(ref, q, k_cmp, v_cmp)
    assert_close(o, o_ref, dtype, "compressed output")
    ct = _normal(ks[3], o.shape, o.dtype)
    for name, g, r in zip(("q", "k_cmp", "v_cmp"), vjp(ct), vjp_ref(ct), strict=True):
        assert_close(g, r, dtype, f"compressed grad of {name} (split dk/dv)")


@pytest.mark.parametrize("branch,t,tiles,geom", [
    # window smaller than, equal to, and not a multiple of the tiles; T off every multiple
    ("window", 150, (16, 16), dict(window_size=40)),
    ("window", 150, (32, 16), dict(window_size=16)),
    ("window", 97, (16, 32), dict(window_size=33)),
    ("window", 64, (16, 16), dict(window_size=200)),  # w > T: plain causal
    # compressed keys: stride 8 / 16, key offset l-1, rows that see nothing
    ("compressed", 150, (16, 16), dict(block_size=16, stride=8)),
    ("compressed", 133, (32, 16), dict(block_size=32, stride=16)),
    ("compressed", 90, (16, 32), dict(block_size=16, stride=16)),
], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_banded_mask_edges_only(branch, t, tiles, geom, dtype):
    """The banded kernels with the mask built only on edge blocks (``mask_edges_only``) equal
    the reference: outputs, lse and all gradients, for windows and compressed keys, with tiles
    that make every kind of block (skipped, edge, full) appear."""
    from pallas_kernels.compressed import gpu as compressed_gpu
    from pallas_kernels.sliding_window import gpu as sliding_window_gpu
    from pallas_kernels.sliding_window import reference as sliding_window_ref
    from tests.tolerances import assert_close

    bq, bk = tiles
    sizes = sliding_window_gpu.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bk,
                                          block_k_dkv=bq, mask_edges_only=True)
    b, n, kh, dk, dv = 1, 4, 2, 32, 16
    ks = jax.random.split(jax.random.key(t + bq), 4)
    q = _normal(ks[0], (b, t, n, dk), dtype)
    if branch == "window":
        s = t
        fn = lambda *a: sliding_window_gpu.sliding_window_attention(  # noqa: E731
            *a, block_sizes=sizes, interpret=True, **geom)
        ref = lambda *a: sliding_window_ref.sliding_window_attention(*a, **geom)  # noqa: E731
    else:
        s = (t - geom["block_size"]) // geom["stride"] + 1
        fn = lambda *a: compressed_gpu.compressed_attention(  # noqa: E731
            *a, block_sizes=sizes, interpret=True, **geom)
        ref = lambda *a: compressed_ref.compressed_attention(*a, **geom)  # noqa: E731
    k = _normal(ks[1], (b, s, kh, dk), dtype)
    v = _normal(ks[2], (b, s, kh, dv), dtype)
    (o, lse), vjp = jax.vjp(fn, q, k, v)
    (o_ref, lse_ref), vjp_ref = jax.vjp(ref, q, k, v)
    what = f"{branch} T={t} tiles={tiles} {geom} {jnp.dtype(dtype)}"
    assert_close(o, o_ref, dtype, what + " output")
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_ref), err_msg=what)
    fin = np.isfinite(np.asarray(lse_ref))
    assert_close(np.asarray(lse)[fin], np.asarray(lse_ref)[fin], dtype, what + " lse")
    ct = (_normal(ks[3], o.shape, o.dtype), jnp.zeros_like(lse))
    for name, g, r in zip("qkv", vjp(ct), vjp_ref(ct), strict=True):
        assert_close(g, r, dtype, f"{what} d{name}")


@pytest.mark.parametrize("case,rows,dtype", [
    (Case(b=1, t=77, n=2, kh=2, dk=32, dv=32), 64, jnp.float32),  # G = 1
    (Case(b=2, t=100, n=8, kh=2, dk=32, dv=16), 64, jnp.bfloat16),  # G = 4, batch 2
    (Case(b=1, t=70, n=16, kh=1, dk=16, dv=16), 128, jnp.float32),  # G = 16
    (Case(b=1, t=12, n=4, kh=1, dk=16, dv=16), 64, jnp.float32),  # no compressed token
    (Case(b=1, t=130, n=8, kh=1, dk=16, dv=16, top_n=6), 16, jnp.float32),  # 2 positions a tile
    (Case(b=1, t=600, n=16, kh=1, dk=32, dv=32, cmp_block_size=32, cmp_stride=16,
          slc_block_size=64, top_n=16), 128, jnp.bfloat16),  # paper geometry, many chunks
], ids=lambda x: getattr(x, "id", str(x)))
def test_select_blocks_packed_heads(case, rows, dtype):
    """The head-packed top-n kernel (``pack_heads``: positions x heads as rows, one running
    top-n per position) agrees exactly with the reference."""
    _check_top_n(case, seed=case.t + case.n, dtype=dtype,
                 block_sizes=selection_gpu.BlockSizes(block_q=rows, pack_heads=True))


def test_banded_tiles_clamp_stages_before_tiles():
    """Over the shared-memory budget, the banded tiles first give up pipeline stages (down to
    two) and only then halve; short sequences shrink the tiles to the sequence."""
    from pallas_kernels.sliding_window import gpu as sliding_window_gpu

    bs = sliding_window_gpu.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=128,
                                       num_stages=3, num_stages_bwd=3)
    assert bs.clamp(65536, 4096, 2, 128, 128) == bs  # 128-wide bf16 heads fit as they are
    wide = bs.clamp(16384, 1024, 2, 256, 128)  # Dk = 192 padded to 256
    assert (wide.block_q, wide.block_k, wide.num_stages) == (128, 64, 2)
    assert (wide.block_q_dkv, wide.block_k_dkv, wide.num_stages_bwd) == (64, 64, 2)
    f32 = bs.clamp(65536, 4096, 4, 128, 128)
    assert (f32.block_q, f32.block_k, f32.num_stages) == (64, 64, 2)
    short = bs.clamp(40, 20, 2, 128, 128)
    assert (short.block_q, short.block_k, short.block_q_dkv, short.block_k_dkv) == (64, 32, 64, 32)


# ------------------------------------------------------------------------------------------
# Selected attention with the forced blocks as a band (BlockSizes.forced_band)
# ------------------------------------------------------------------------------------------
def _nsa_indices(case, q, k, seed):
    """Indices as NSA's selection makes them (forced blocks included), from the reference, with
    each row's slots shuffled (the kernels may not rely on an order)."""
    from nsa_jax.compression import compress

    geom = dict(kind="mean", block_size=case.cmp_block_size, stride=case.cmp_stride)
    k_cmp = compress(k, {}, **geom)
    _, lse = compressed_ref.compressed_attention(q, k_cmp, k_cmp, block_size=case.cmp_block_size,
                                                 stride=case.cmp_stride)
    idx = np.asarray(selection_ref.select_blocks(
        q, k_cmp, lse, seq_len=case.t, cmp_block_size=case.cmp_block_size,
        cmp_stride=case.cmp_stride, slc_block_size=case.slc_block_size, top_n=case.top_n))
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.permuted(idx, axis=-1))


def _case_qkv(case, ks, dtype):
    """Random ``q [B, T, N, Dk]``, ``k [B, T, K, Dk]``, ``v [B, T, K, Dv]`` from keys ``ks[:3]``."""
    return (_normal(ks[0], (case.b, case.t, case.n, case.dk), dtype),
            _normal(ks[1], (case.b, case.t, case.kh, case.dk), dtype),
            _normal(ks[2], (case.b, case.t, case.kh, case.dv), dtype))


_BAND_CASES = [
    # G = 16, T a multiple of l', n = 8 (5 scored slots)
    Case(b=1, t=128, n=16, kh=1, dk=32, dv=32, cmp_block_size=16, cmp_stride=8,
         slc_block_size=16, top_n=8),
    # G = 4, T off l', Dk != Dv, batch 2
    Case(b=2, t=90, n=8, kh=2, dk=32, dv=16, cmp_block_size=16, cmp_stride=8,
         slc_block_size=16, top_n=6),
    # G = 1, n = 3: only forced blocks, no scored slot
    Case(b=1, t=70, n=2, kh=2, dk=16, dv=16, cmp_block_size=16, cmp_stride=8,
         slc_block_size=16, top_n=3),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", _BAND_CASES, ids=lambda c: c.id)
def test_selected_forced_band(case, dtype):
    """The band path (forced blocks attended per tile of l' queries, the scored ones per query
    starting from the band's softmax; ``dq`` likewise) against the reference: output, lse and
    gradients; and the band kernels are really what runs."""
    from pallas_kernels.selected import gpu as selected_gpu
    from pallas_kernels.selected import reference as selected_ref
    from tests.tolerances import assert_close

    ks = jax.random.split(jax.random.key(case.t + case.n), 4)
    q, k, v = _case_qkv(case, ks, dtype)
    ct = _normal(ks[3], (case.b, case.t, case.n, case.dv), jnp.float32)
    idx = _nsa_indices(case, q, k, seed=case.t)
    sizes = selected_gpu.BlockSizes(forced_band=True)
    kw = dict(block_size=case.slc_block_size)

    def band(q, k, v):
        return selected_gpu.selected_attention(q, k, v, idx, block_sizes=sizes, interpret=True,
                                               forced_included=True, **kw)

    def ref(q, k, v):
        return selected_ref.selected_attention(q, k, v, idx, **kw)

    jaxpr = str(jax.make_jaxpr(lambda *a: jax.vjp(band, *a)[1](
        (ct.astype(dtype), jnp.zeros(ct.shape[:3]))))(q, k, v))
    assert "nsa_slc_fwd_band" in jaxpr and "nsa_slc_bwd_dq_band" in jaxpr
    # With n = 3 every slot is forced: the band alone, no per-query kernel.
    scored = "nsa_slc_fwd_scored" in jaxpr and "nsa_slc_bwd_dq_scored" in jaxpr
    assert scored == (case.top_n > 3), (case.top_n, scored)
    outs = []
    for f in (band, ref):
        (o, lse), vjp = jax.vjp(f, q, k, v)
        outs.append((o, lse, *vjp((ct.astype(o.dtype), jnp.zeros_like(lse)))))
    what = f"forced band {case.id} {jnp.dtype(dtype)}"
    assert_close(outs[0][0], outs[1][0], dtype, what + " output")
    assert_close(outs[0][1], outs[1][1], dtype, what + " lse")
    for name, a, r in zip(("dq", "dk", "dv"), outs[0][2:], outs[1][2:], strict=True):
        assert_close(a, r, dtype, f"{what} {name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", _BAND_CASES, ids=lambda c: c.id)
def test_selected_attention_combined(case, dtype):
    """The selected kernel with NSA's gated sum folded in equals the reference branch followed
    by the sum (``combine_outputs``), without differentiation (the folded kernel runs) and
    in its gradients w.r.t. q, k, v, the gates and the other two outputs (the two-step path
    runs); G 16, 4 and 1 (padded heads), T off l', Dk != Dv."""
    from pallas_kernels.common import combine_outputs
    from pallas_kernels.selected import gpu as selected_gpu
    from pallas_kernels.selected import reference as selected_ref
    from tests.tolerances import assert_close

    ks = jax.random.split(jax.random.key(case.t + 7), 7)
    q, k, v = _case_qkv(case, ks, dtype)
    o_cmp = _normal(ks[3], (case.b, case.t, case.n, case.dv), dtype)
    o_swa = _normal(ks[4], (case.b, case.t, case.n, case.dv), dtype)
    gates = jax.nn.sigmoid(_normal(ks[5], (case.b, case.t, case.n, 3), jnp.float32))
    ct = _normal(ks[6], (case.b, case.t, case.n, case.dv), dtype)
    idx = _nsa_indices(case, q, k, seed=case.t + 1)
    kw = dict(block_size=case.slc_block_size)

    def fused(q, k, v, gates, o_cmp, o_swa):
        return selected_gpu.selected_attention_combined(
            q, k, v, idx, gates, o_cmp, o_swa, interpret=True, forced_included=True, **kw)

    def ref(q, k, v, gates, o_cmp, o_swa):
        return combine_outputs(gates, o_cmp, selected_ref.selected_attention(q, k, v, idx, **kw)[0],
                               o_swa)

    args = (q, k, v, gates, o_cmp, o_swa)
    assert "nsa_slc_fwd_combined" in str(jax.make_jaxpr(fused)(*args))
    grad_jaxpr = str(jax.make_jaxpr(lambda *a: jax.vjp(fused, *a)[1](ct))(*args))
    assert "nsa_slc_fwd_combined" not in grad_jaxpr and "nsa_slc_bwd_dq" in grad_jaxpr
    assert "nsa_gate_bwd" in grad_jaxpr  # the gated sum's backward kernel (the default)
    what = f"combined {case.id} {jnp.dtype(dtype)}"
    out, out_ref = fused(*args), ref(*args)
    assert out.dtype == out_ref.dtype == dtype
    assert_close(out, out_ref, dtype, what + " output")
    o_d, vjp = jax.vjp(fused, *args)
    o_r, vjp_r = jax.vjp(ref, *args)
    assert_close(o_d, o_r, dtype, what + " output under vjp")
    for name, a, r in zip(("dq", "dk", "dv", "dgates", "do_cmp", "do_swa"), vjp(ct), vjp_r(ct),
                          strict=True):
        assert_close(a, r, dtype, f"{what} {name}")


@pytest.mark.parametrize("per_step", [2, 4, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", _BAND_CASES, ids=lambda c: c.id)
def test_selected_blocks_per_step(case, dtype, per_step):
    """Forward and ``dq`` walks gathering several selected blocks a step
    (``BlockSizes.blocks_per_step``; 16 is clamped to the padded slots) against the reference:
    output, lse and gradients, shuffled slots with empty ones among them; and the folded
    forward with the same walk. The kernels differ from the one-block walk."""
    from pallas_kernels.common import combine_outputs
    from pallas_kernels.selected import gpu as selected_gpu
    from pallas_kernels.selected import reference as selected_ref
    from tests.tolerances import assert_close

    ks = jax.random.split(jax.random.key(case.t + per_step), 7)
    q, k, v = _case_qkv(case, ks, dtype)
    ct = _normal(ks[3], (case.b, case.t, case.n, case.dv), jnp.float32)
    # Empty one slot per row at a random position (-1), except the query's own block (which
    # keeps every row's softmax non-empty): empty slots anywhere in a step.
    idx = np.asarray(_nsa_indices(case, q, k, seed=case.t + 3))
    rng = np.random.default_rng(per_step)
    drop = rng.integers(0, idx.shape[-1], idx.shape[:-1])
    own = (np.arange(case.t) // case.slc_block_size)[None, :, None, None]
    hit = (np.arange(idx.shape[-1]) == drop[..., None]) & (idx != own)
    idx = jnp.asarray(np.where(hit, -1, idx))
    sizes = selected_gpu.BlockSizes(blocks_per_step=per_step)
    kw = dict(block_size=case.slc_block_size)

    def gathered(q, k, v):
        return selected_gpu.selected_attention(q, k, v, idx, block_sizes=sizes, interpret=True,
                                               **kw)

    def one(q, k, v):
        return selected_gpu.selected_attention(q, k, v, idx, interpret=True, **kw,
                                               block_sizes=selected_gpu.BlockSizes())

    def ref(q, k, v):
        return selected_ref.selected_attention(q, k, v, idx, **kw)

    def vjp_jaxpr(f):
        return str(jax.make_jaxpr(lambda *a: jax.vjp(f, *a)[1](
            (ct.astype(dtype), jnp.zeros(ct.shape[:3]))))(q, k, v))

    assert vjp_jaxpr(gathered) != vjp_jaxpr(one)
    outs = []
    for f in (gathered, ref):
        (o, lse), vjp = jax.vjp(f, q, k, v)
        outs.append((o, lse, *vjp((ct.astype(o.dtype), jnp.zeros_like(lse)))))
    what = f"blocks_per_step={per_step} {case.id} {jnp.dtype(dtype)}"
    assert_close(outs[0][0], outs[1][0], dtype, what + " output")
    assert_close(outs[0][1], outs[1][1], dtype, what + " lse")
    for name, a, r in zip(("dq", "dk", "dv"), outs[0][2:], outs[1][2:], strict=True):
        assert_close(a, r, dtype, f"{what} {name}")
    gates = jax.nn.sigmoid(_normal(ks[4], (case.b, case.t, case.n, 3), jnp.float32))
    o_cmp = _normal(ks[5], (case.b, case.t, case.n, case.dv), dtype)
    o_swa = _normal(ks[6], (case.b, case.t, case.n, case.dv), dtype)
    folded = selected_gpu.selected_attention_combined(q, k, v, idx, gates, o_cmp, o_swa,
                                                      block_sizes=sizes, interpret=True, **kw)
    assert_close(folded, combine_outputs(gates, o_cmp, outs[1][0], o_swa), dtype,
                 what + " folded forward")


@pytest.mark.parametrize("splits", [2, 4, 64])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", _BAND_CASES[:2], ids=lambda c: c.id)
def test_selected_dkv_sum_splits(case, dtype, splits):
    """``dk/dv`` with each block's chunk partials added by ``sum_splits`` programs (every
    ``sum_splits``-th chunk each; 64 leaves most programs without a chunk) against the
    reference, with 4-query chunks so that block 0 has many; and the split kernel runs."""
    from pallas_kernels.selected import gpu as selected_gpu
    from pallas_kernels.selected import reference as selected_ref
    from tests.tolerances import assert_close

    ks = jax.random.split(jax.random.key(case.t + splits), 4)
    q, k, v = _case_qkv(case, ks, dtype)
    ct = _normal(ks[3], (case.b, case.t, case.n, case.dv), dtype)
    idx = _nsa_indices(case, q, k, seed=splits)
    sizes = selected_gpu.BlockSizes(entries_per_chunk=4, sum_splits=splits)
    kw = dict(block_size=case.slc_block_size)

    def split(q, k, v):
        return selected_gpu.selected_attention(q, k, v, idx, block_sizes=sizes, interpret=True,
                                               **kw)[0]

    def ref(q, k, v):
        return selected_ref.selected_attention(q, k, v, idx, **kw)[0]

    jaxpr = str(jax.make_jaxpr(lambda *a: jax.vjp(split, *a)[1](ct))(q, k, v))
    assert "nsa_slc_bwd_dkv_sum_split" in jaxpr
    got, want = jax.vjp(split, q, k, v)[1](ct), jax.vjp(ref, q, k, v)[1](ct)
    for name, a, r in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert_close(a, r, dtype, f"sum_splits={splits} {case.id} {jnp.dtype(dtype)} {name}")


def _inverted_index_oracle(idx, num_blocks, per_chunk, num_chunks):
    """Per key block, its queries in ascending order, cut into chunks of ``per_chunk``."""
    blk, cnt = np.full(num_chunks, -1), np.zeros(num_chunks, np.int64)
    tab = np.full((num_chunks, per_chunk), -1)
    first, num = np.zeros(num_blocks, np.int64), np.zeros(num_blocks, np.int64)
    c = 0
    for b in range(num_blocks):
        queries = [t for t in range(idx.shape[0]) if b in idx[t]]
        first[b] = c
        for i in range(0, len(queries), per_chunk):
            part = queries[i:i + per_chunk]
            blk[c], cnt[c], tab[c, :len(part)] = b, len(part), part
            c += 1
        num[b] = c - first[b]
    return blk, cnt, tab, first, num


@pytest.mark.parametrize("packed", [True, False], ids=["packed_sort", "two_key_sort"])
@pytest.mark.parametrize("t,m,nb,per_chunk", [(300, 8, 7, 4), (1000, 16, 16, 64), (77, 4, 5, 1),
                                              (300, 16, 5, 256), (1, 4, 1, 2)])
def test_inverted_index(monkeypatch, t, m, nb, per_chunk, packed):
    """The ``dk/dv`` pass's inverted index (block -> chunks of the queries that selected it)
    against a loop over blocks: causal rows with shuffled, partly empty slots; the packed
    one-operand sort and the two-key sort it falls back to past int32."""
    from pallas_kernels.selected import gpu as selected_gpu

    if not packed:
        monkeypatch.setattr(selected_gpu, "_PACK_LIMIT", 0)
    rng = np.random.default_rng(t + m)
    idx = np.full((t, m), -1, np.int32)
    for i in range(t):
        cur = min(i * nb // t, nb - 1)
        pick = rng.choice(cur + 1, size=min(int(rng.integers(0, m + 1)), cur + 1), replace=False)
        idx[i, :len(pick)] = pick
        rng.shuffle(idx[i])
    counts = np.bincount(idx[idx >= 0], minlength=nb)
    num_chunks = int(np.sum(-(-counts // per_chunk))) + 3  # spare chunks stay unused
    got = selected_gpu._invert_one(jnp.asarray(idx), nb, per_chunk, num_chunks)
    want = _inverted_index_oracle(idx, nb, per_chunk, num_chunks)
    for name, g, w in zip(("blk", "cnt", "tab", "first", "num"), got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), w, err_msg=name)


def test_selected_attention_combined_rejects_bad_operands():
    """Mismatched branch outputs or gates raise a ValueError naming the shapes."""
    from pallas_kernels.selected import gpu as selected_gpu

    b, t, n, kh, d = 1, 32, 4, 1, 16
    q = jnp.zeros((b, t, n, d))
    k = jnp.zeros((b, t, kh, d))
    idx = jnp.zeros((b, t, kh, 3), jnp.int32)
    o = jnp.zeros((b, t, n, d))
    g = jnp.zeros((b, t, n, 3))
    kw = dict(block_size=16, interpret=True)
    with pytest.raises(ValueError, match=r"o_swa must be \[B, T, N, Dv\]"):
        selected_gpu.selected_attention_combined(q, k, k, idx, g, o, o[:, :, :2], **kw)
    with pytest.raises(ValueError, match="gates must be"):
        selected_gpu.selected_attention_combined(q, k, k, idx, g[..., :2], o, o, **kw)
    with pytest.raises(ValueError, match="share a dtype"):
        selected_gpu.selected_attention_combined(q, k, k, idx, g, o, o.astype(jnp.bfloat16),
                                                 **kw)


def test_nsa_uses_the_combined_kernel_only_without_gradients():
    """``nsa_attention`` on the GPU backend (interpreted) runs the folded kernel for a plain
    forward, the two-step path under differentiation and with ``return_aux``, and never pairs
    one backend's folded kernel with another's selected attention."""
    import dataclasses

    from nsa_jax import nsa_attention, registry

    case = DEFAULT_CASES[1]
    backend = gpu_backend.make_backend(interpret=True)
    registry.register_backend(dataclasses.replace(backend, name="combined-jaxpr", platforms=()))
    # Selected attention from the reference, everything else (the folded kernel too) here.
    registry.register_backend(dataclasses.replace(backend, name="combined-no-slc",
                                                  platforms=(), selected_attention=None))
    cfg = case.nsa_config()
    q = jnp.zeros((case.b, case.t, case.n, case.dk))
    k = jnp.zeros((case.b, case.t, case.kh, case.dk))
    gates = jnp.zeros((case.b, case.t, case.n, 3))

    def run(impl, **kw):
        return lambda q, k: nsa_attention(q, k, k, gates, None, config=cfg, implementation=impl,
                                          **kw)

    assert "nsa_slc_fwd_combined" in str(jax.make_jaxpr(run("combined-jaxpr"))(q, k))
    grad = str(jax.make_jaxpr(jax.grad(lambda q, k: run("combined-jaxpr")(q, k).sum()))(q, k))
    assert "nsa_slc_fwd_combined" not in grad and "nsa_slc_fwd" in grad
    aux = str(jax.make_jaxpr(run("combined-jaxpr", return_aux=True))(q, k))
    assert "nsa_slc_fwd_combined" not in aux and "nsa_slc_fwd" in aux
    no_slc = str(jax.make_jaxpr(run("combined-no-slc"))(q, k))
    assert "nsa_slc_fwd" not in no_slc
    # A copy with another selected attention keeps the old fold: it is not used.
    other = dataclasses.replace(backend, name="combined-other-slc", platforms=(),
                                selected_attention=lambda *a, **kw: backend.selected_attention(
                                    *a, **kw))
    registry.register_backend(other)
    other_jaxpr = str(jax.make_jaxpr(run("combined-other-slc"))(q, k))
    assert "nsa_slc_fwd_combined" not in other_jaxpr and "nsa_slc_fwd" in other_jaxpr


@pytest.mark.parametrize("gate_kernel", [True, False], ids=["gate_kernel", "gate_xla"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cmp_first", [1, 31, 90], ids=lambda f: f"first{f}")
def test_selected_attention_combined_reads_compressed_rows(cmp_first, dtype, gate_kernel):
    """The folded kernel given the compressed output as the rows of queries ``cmp_first`` on
    (earlier queries have none) equals the reference followed by the sum with those rows
    padded by zeros: output, and gradients of q, k, v, the gates, the rows and ``o_swa``
    (the rows' gradient is the padded one's tail, 0 on rows past ``T - cmp_first``, which the
    kernel must ignore). ``cmp_first = T`` leaves no real row."""
    from pallas_kernels.common import combine_outputs
    from pallas_kernels.selected import gpu as selected_gpu
    from pallas_kernels.selected import reference as selected_ref
    from tests.tolerances import assert_close

    case = _BAND_CASES[1]  # G = 4, T = 90 off l', Dk != Dv, batch 2
    ks = jax.random.split(jax.random.key(cmp_first), 7)
    q, k, v = _case_qkv(case, ks, dtype)
    # Three rows past T - cmp_first: padding the kernel must ignore (gradient 0).
    rows = _normal(ks[3], (case.b, case.t - cmp_first + 3, case.n, case.dv), dtype)
    o_swa = _normal(ks[4], (case.b, case.t, case.n, case.dv), dtype)
    gates = jax.nn.sigmoid(_normal(ks[5], (case.b, case.t, case.n, 3), jnp.float32))
    ct = _normal(ks[6], (case.b, case.t, case.n, case.dv), dtype)
    idx = _nsa_indices(case, q, k, seed=cmp_first)
    kw = dict(block_size=case.slc_block_size)

    sizes = selected_gpu.BlockSizes(gate_bwd_kernel=gate_kernel)

    def fused(q, k, v, gates, rows, o_swa):
        return selected_gpu.selected_attention_combined(
            q, k, v, idx, gates, rows, o_swa, interpret=True, cmp_first=cmp_first,
            block_sizes=sizes, **kw)

    def ref(q, k, v, gates, rows, o_swa):
        o_cmp = jnp.pad(rows[:, : case.t - cmp_first], [(0, 0), (cmp_first, 0), (0, 0), (0, 0)])
        return combine_outputs(gates, o_cmp, selected_ref.selected_attention(q, k, v, idx, **kw)[0],
                               o_swa)

    args = (q, k, v, gates, rows, o_swa)
    what = f"combined rows from {cmp_first} {jnp.dtype(dtype)} {gate_kernel=}"
    grad_jaxpr = str(jax.make_jaxpr(lambda *a: jax.vjp(fused, *a)[1](ct))(*args))
    assert ("nsa_gate_bwd" in grad_jaxpr) == gate_kernel
    assert_close(fused(*args), ref(*args), dtype, what + " output")
    _, vjp = jax.vjp(fused, *args)
    _, vjp_r = jax.vjp(ref, *args)
    for name, a, r in zip(("dq", "dk", "dv", "dgates", "drows", "do_swa"), vjp(ct), vjp_r(ct),
                          strict=True):
        assert a.shape == r.shape, (name, a.shape, r.shape)
        if a.size:
            assert_close(a, r, dtype, f"{what} {name}")


def test_selected_attention_combined_rejects_bad_rows():
    from pallas_kernels.selected import gpu as selected_gpu

    b, t, n, kh, d = 1, 40, 4, 1, 16
    q, o = jnp.zeros((b, t, n, d)), jnp.zeros((b, t, n, d))
    k = jnp.zeros((b, t, kh, d))
    idx = jnp.zeros((b, t, kh, 4), jnp.int32)
    g = jnp.zeros((b, t, n, 3))
    call = functools.partial(selected_gpu.selected_attention_combined, block_size=16,
                             interpret=True)
    with pytest.raises(ValueError, match=r"o_cmp must be \[B, R >= T - cmp_first, N, Dv\] "
                                         r"with \(B, T - cmp_first, N, Dv\)=\(1, 9, 4, 16\), "
                                         r"got o_cmp.shape=\(1, 8, 4, 16\)"):
        call(q, k, k, idx, g, o[:, :8], o, cmp_first=31)
    with pytest.raises(ValueError, match=r"o_cmp must be .* got o_cmp.shape=\(1, 40, 3, 16\)"):
        call(q, k, k, idx, g, o[:, :, :3], o, cmp_first=31)
    with pytest.raises(ValueError, match="cmp_first=41 must be in"):
        call(q, k, k, idx, g, o[:, :0], o, cmp_first=41)


def test_nsa_reads_the_compressed_rows_in_place():
    """``nsa_attention`` on a backend whose compressed stage offers its output rows
    (``compressed_attention_rows``, here the cuDNN path's layout with a plain causal attention
    in place of cuDNN) hands them to the folded kernel with ``cmp_first = l - 1``: the forward
    and the gradients equal the reference; a rows function made for another compressed
    attention is not used."""
    import dataclasses

    from nsa_jax import nsa_attention, registry
    from pallas_kernels.common import default_scale
    from pallas_kernels.compressed import gpu as compressed_gpu
    from tests.pallas_kernels.test_compressed_residue import _causal
    from tests.tolerances import assert_close

    case = Case(b=2, t=150, n=8, kh=2, dk=32, dv=16, cmp_block_size=32, cmp_stride=16,
                slc_block_size=32, top_n=4, window_size=64)
    backend = gpu_backend.make_backend(interpret=True)
    seen = []

    def rows(q, k_cmp, v_cmp, *, block_size, stride, scale):
        out = compressed_gpu.residue_causal_rows(
            q, k_cmp, v_cmp, block_size=block_size, stride=stride, attend=_causal,
            scale=default_scale(q.shape[-1], scale), length_multiple=8)
        seen.append(out[2])
        return out

    def fold(*a, cmp_first=0, **kw):
        seen.append(("fold", cmp_first))
        return backend.selected_attention_combined(*a, cmp_first=cmp_first, **kw)

    rows.pairs_with = backend.compressed_attention
    fold.pairs_with = backend.selected_attention
    registry.register_backend(dataclasses.replace(
        backend, name="rows-in-place", platforms=(), compressed_attention_rows=rows,
        selected_attention_combined=fold))
    cfg = case.nsa_config()
    ks = jax.random.split(jax.random.key(3), 4)
    q, k, v = _case_qkv(case, ks, jnp.float32)
    gates = jax.nn.sigmoid(_normal(ks[3], (case.b, case.t, case.n, 3), jnp.float32))

    def run(impl):
        return lambda q, k, v, g: nsa_attention(q, k, v, g, None, config=cfg,
                                                implementation=impl)

    out = run("rows-in-place")(q, k, v, gates)
    assert seen == [31, ("fold", 31)], seen
    assert_close(out, run("reference")(q, k, v, gates), jnp.float32, "rows in place output")
    grads = jax.grad(lambda *a: run("rows-in-place")(*a).sum(), (0, 1, 2, 3))(q, k, v, gates)
    grads_r = jax.grad(lambda *a: run("reference")(*a).sum(), (0, 1, 2, 3))(q, k, v, gates)
    for name, a, r in zip(("dq", "dk", "dv", "dgates"), grads, grads_r, strict=True):
        assert_close(a, r, jnp.float32, f"rows in place {name}")
    # Made for another compressed attention: the stage runs as ever, the fold gets every row.
    seen.clear()
    registry.register_backend(dataclasses.replace(
        backend, name="rows-other-cmp", platforms=(), compressed_attention_rows=rows,
        selected_attention_combined=fold,
        compressed_attention=lambda *a, **kw: backend.compressed_attention(*a, **kw)))
    run("rows-other-cmp")(q, k, v, gates)
    assert seen == [("fold", 0)], seen


def test_window_on_another_stream():
    """``make_backend(window_stream=1)``: NSA's forward and gradients
    equal the reference (the stream annotation changes where a stage runs, not what it
    computes), and the lowered stages, forward and backward, carry XLA's stream annotation."""
    import dataclasses

    from nsa_jax import nsa_attention, registry
    from tests.tolerances import assert_close

    case = DEFAULT_CASES[1]
    backend = gpu_backend.make_backend(interpret=True, window_stream=1)
    registry.register_backend(dataclasses.replace(backend, name="window-stream", platforms=()))
    cfg = case.nsa_config()
    ks = jax.random.split(jax.random.key(29), 4)
    q, k, v = _case_qkv(case, ks, jnp.float32)
    gates = jax.nn.sigmoid(_normal(ks[3], (case.b, case.t, case.n, 3), jnp.float32))

    def run(impl):
        return lambda *a: nsa_attention(*a, None, config=cfg, implementation=impl)

    args = (q, k, v, gates)
    assert_close(run("window-stream")(*args), run("reference")(*args), jnp.float32,
                 "window stream output")
    grads = jax.grad(lambda *a: run("window-stream")(*a).sum(), (0, 1, 2, 3))(*args)
    grads_r = jax.grad(lambda *a: run("reference")(*a).sum(), (0, 1, 2, 3))(*args)
    for name, a, r in zip(("dq", "dk", "dv", "dgates"), grads, grads_r, strict=True):
        assert_close(a, r, jnp.float32, f"window stream {name}")
    fwd = jax.jit(run("window-stream")).lower(*args).as_text()
    assert '_xla_stream_annotation = "1"' in fwd
    bwd = jax.jit(jax.grad(lambda *a: run("window-stream")(*a).sum())).lower(*args).as_text()
    mark = '_xla_stream_annotation = "1"'
    assert bwd.count(mark) > fwd.count(mark)
    with pytest.raises(ValueError, match="stream=0 must be >= 1"):
        gpu_backend.make_backend(interpret=True, window_stream=0)


def test_selected_forced_band_needs_the_promise():
    """Without ``forced_included`` (or with fewer than 3 slots) the band option changes
    nothing: the per-query kernel runs (indices without forced blocks stay correct)."""
    from pallas_kernels.selected import gpu as selected_gpu

    case = _BAND_CASES[0]
    q = jnp.zeros((1, case.t, case.n, case.dk))
    k = jnp.zeros((1, case.t, case.kh, case.dk))
    idx = jnp.zeros((1, case.t, case.kh, case.top_n), jnp.int32)
    sizes = selected_gpu.BlockSizes(forced_band=True)
    jaxpr = str(jax.make_jaxpr(lambda q, k: selected_gpu.selected_attention(
        q, k, k, idx, block_size=16, block_sizes=sizes, interpret=True))(q, k))
    assert "nsa_slc_fwd_band" not in jaxpr and "nsa_slc_fwd" in jaxpr
    # With fewer slots than forced blocks the promise cannot hold: the per-query kernel.
    jaxpr = str(jax.make_jaxpr(lambda q, k: selected_gpu.selected_attention(
        q, k, k, idx[..., :2], block_size=16, block_sizes=sizes, interpret=True,
        forced_included=True))(q, k))
    assert "nsa_slc_fwd_band" not in jaxpr and "nsa_slc_fwd" in jaxpr


class _ForcedBandSuite(KernelSuite):
    """The GPU backend with the forced-blocks band (not collected as a class: only its NSA test
    runs, below)."""

    cases = DEFAULT_CASES

    @staticmethod
    def make_backend():
        return gpu_backend.make_backend(interpret=True, forced_band=True,
                                        name="pallas_triton_forced_band_interpret")


def test_full_nsa_with_forced_band():
    """``nsa_attention`` gives the selected kernels its promise that the forced blocks are
    selected, so the band kernels run under differentiation, and the whole NSA (outputs and
    gradients of q, k, v,
    gates and the compression MLP) still matches the reference, f32 and bf16."""
    import dataclasses

    from nsa_jax import nsa_attention, registry

    suite = _ForcedBandSuite()
    suite.test_full_nsa_matches_reference()
    backend = suite.make_backend()
    registry.register_backend(dataclasses.replace(backend, name="band-jaxpr", platforms=()))
    case = suite.cases[1]
    cfg = case.nsa_config()
    q = jnp.zeros((case.b, case.t, case.n, case.dk))
    k = jnp.zeros((case.b, case.t, case.kh, case.dk))
    gates = jnp.zeros((case.b, case.t, case.n, 3))
    # Under differentiation (a plain forward folds the gated sum into the per-query kernel).
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda q, k: nsa_attention(
        q, k, k, gates, None, config=cfg, implementation="band-jaxpr").sum()))(q, k))
    assert "nsa_slc_fwd_band" in jaxpr and "nsa_slc_fwd_scored" in jaxpr
