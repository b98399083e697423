"""The Pallas-Triton decode kernels against the XLA decode twin: in interpret mode on CPU,
compiled for the device on a GPU (the same tests, ``INTERPRET`` below).

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
from pallas_kernels.selection import reference as sel_ref
from tests.tolerances import assert_close

# Compiled kernels where there is a GPU, the Pallas interpreter elsewhere.
INTERPRET = jax.default_backend() != "gpu"

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
    "n,kh,dk,dv,block_k,fuse,select,dtype",
    [
        # G = 4 padded to 16; several splits per branch; the select kernel merges o_cmp.
        (8, 2, 16, 32, 16, True, {}, jnp.float32),
        # MQA, G = 16; one tile per split; 3 launches; selection chunks of 16 tokens.
        (16, 1, 32, 16, 64, False, dict(select_chunk=16), jnp.float32),
        (8, 2, 32, 32, 16, True, {}, jnp.bfloat16),
        # XLA merges o_cmp (more splits than select_merge_splits), the kernel selects.
        (8, 2, 16, 32, 16, True, dict(select_merge_splits=0), jnp.float32),
        (8, 2, 16, 32, 16, True, dict(select_kernel=False), jnp.float32),  # XLA selects
        # A 256-token cache in 16-token select chunks: 4 select programs per KV group, each
        # merging 16 of o_cmp's 64 columns; then 2 programs (32 columns each).
        (8, 2, 16, 64, 16, True, dict(select_chunk=16, select_splits=4), jnp.float32),
        (16, 1, 32, 64, 32, True, dict(select_chunk=16, select_splits=2), jnp.bfloat16),
        # Two selected blocks per sparse program; then all four slots and four empty ones.
        (8, 2, 16, 32, 16, True, dict(sparse_slots=2), jnp.float32),
        (8, 2, 32, 32, 16, True, dict(sparse_slots=8, select_chunk=16, select_splits=4),
         jnp.bfloat16),
        # Few programs wanted: the automatic choice puts 4 selected blocks in each program.
        (8, 2, 16, 32, 16, True, dict(target_programs=8), jnp.float32),
        # The combine kernel merging the compressed splits itself (no merge programs in the
        # sparse launch); then merge programs of 32 columns each.
        (8, 2, 16, 32, 16, True, dict(sparse_merge_cols=0), jnp.float32),
        (8, 2, 16, 64, 16, True, dict(sparse_merge_cols=32, select_chunk=16, select_splits=4),
         jnp.bfloat16),
        # The fused launch with XLA's merges and gates instead of the combine kernel.
        (8, 2, 16, 32, 16, True, dict(combine_kernel=False), jnp.float32),
        (16, 1, 32, 16, 16, True, dict(combine_kernel=False, sparse_slots=2), jnp.bfloat16),
    ],
)
def test_decode_kernel_matches_twin(n, kh, dk, dv, block_k, fuse, select, dtype):
    s_len = 256 if select.get("select_splits") else 64
    c = 64
    # Lengths: a single token (no compressed token yet), block-unaligned, and a full cache.
    seq_lens = jnp.asarray([1, 7, 30, 64] if s_len == 64 else [1, 30, 140, 256], jnp.int32)
    args = (*_inputs(n + dk, len(seq_lens), n, kh, dk, dv, s_len, c, dtype), seq_lens)
    sizes = gpu.BlockSizes(**{"block_k": block_k, "target_programs": 64, "fuse_sparse": fuse,
                              **select})
    o_ref, idx_ref = ref.decode_attention(*args, **GEOM)
    o, idx = gpu.decode_attention(*args, **GEOM, block_sizes=sizes, interpret=INTERPRET)
    assert o.dtype == o_ref.dtype and o.shape == o_ref.shape
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(idx_ref), -1))
    assert_close(o, o_ref, dtype, f"decode kernel G={n // kh} block_k={block_k} fuse={fuse} "
                 f"{select}")


def _select_inputs(seed, b, kh, g, gp, mc, c, seq_lens, geom, *, ties, dv=16):
    """Logits ``[B, K, Gp, C]`` (NaN in the rows past ``G`` and at invisible tokens, which must
    not count) and split partials ``m, l [B, K, Mc, Gp]``, ``o [B, K, Mc, Gp, 16]``.

    With ``ties`` the merged log-sum-exp is exactly 0 and every logit is 0 or -1000, so each
    probability is exactly 1 or 0 and every block score a small integer: any summation order
    gives the same floats, and equal scores are real ties that only the index may break.
    """
    ks = jax.random.split(jax.random.key(seed), 5)
    if ties:
        s = jnp.where(jax.random.bernoulli(ks[0], 0.3, (b, kh, gp, c)), 0.0, -1000.0)
        m = jnp.zeros((b, kh, mc, gp))
        l = jnp.zeros((b, kh, mc, gp)).at[:, :, 0].set(1.0)  # noqa: E741
    else:
        s = 3.0 * jax.random.normal(ks[0], (b, kh, gp, c))
        m = jax.random.normal(ks[1], (b, kh, mc, gp))
        l = jax.random.uniform(ks[2], (b, kh, mc, gp), minval=0.5, maxval=2.0)  # noqa: E741
        # An empty split: nothing to merge from it.
        m, l = m.at[:, :, -1].set(-1e30), l.at[:, :, -1].set(0.0)  # noqa: E741
    o = jax.random.normal(ks[3], (b, kh, mc, gp, dv))
    n_vis = ref.num_visible_cmp(seq_lens, geom["cmp_block_size"], geom["cmp_stride"])
    visible = jnp.arange(c)[None, :] < n_vis[:, None]  # [B, C]
    keep = visible[:, None, None, :] & (jnp.arange(gp) < g)[None, None, :, None]
    return jnp.where(keep, s, jnp.nan), m, l, o


_SELECT_CASES = [
    # l=8, d=4, l'=16 (the paper's ratios); C=80 is not a multiple of the 32-token chunk.
    (1, dict(cmp_block_size=8, cmp_stride=4, slc_block_size=16, top_n=8), 80, 300, 32, False,
     1),
    (4, dict(cmp_block_size=8, cmp_stride=4, slc_block_size=16, top_n=8), 64, 256, 16, True,
     1),
    # G = 3: a padded row inside the kernel's power-of-two tile.
    (3, dict(cmp_block_size=8, cmp_stride=4, slc_block_size=16, top_n=7), 64, 256, 32, True,
     1),
    # l=16, d=4, l'=32: three tokens of each block reach into the next; more slots than
    # the short sequences have blocks.
    (16, dict(cmp_block_size=16, cmp_stride=4, slc_block_size=32, top_n=6), 80, 320, 64,
     True, 1),
    (16, dict(cmp_block_size=16, cmp_stride=4, slc_block_size=32, top_n=5), 80, 320, 16,
     False, 1),
    # l = l' = d: block scores are the token probabilities themselves.
    (4, dict(cmp_block_size=4, cmp_stride=4, slc_block_size=4, top_n=5), 48, 48, 16, True,
     1),
    # Several programs per KV group, each proposing its own top-n over a run of chunks.
    (4, dict(cmp_block_size=8, cmp_stride=4, slc_block_size=16, top_n=8), 64, 256, 16, True,
     4),
    (1, dict(cmp_block_size=8, cmp_stride=4, slc_block_size=16, top_n=8), 80, 300, 16, False,
     2),
    (16, dict(cmp_block_size=16, cmp_stride=4, slc_block_size=32, top_n=6), 80, 320, 16,
     True, 8),
    (4, dict(cmp_block_size=4, cmp_stride=4, slc_block_size=4, top_n=5), 48, 48, 16, True,
     4),
]


@pytest.mark.parametrize("g,geom,c,s_len,chunk,ties,splits", _SELECT_CASES)
def test_select_kernel_matches_select_from_logits(g, geom, c, s_len, chunk, ties, splits):
    # Lengths: no compressed token yet, the first ones, across block and chunk boundaries.
    lp = geom["slc_block_size"]
    seq_lens = jnp.asarray(sorted({1, 9, lp + 1, 2 * lp, 3 * lp + 5, s_len // 2 + 3, s_len}),
                           jnp.int32)
    b, kh, gp, mc = len(seq_lens), 2, max(16, g), 4
    s, m, l, o = _select_inputs(g + c + chunk, b, kh, g, gp, mc, c, seq_lens, geom,  # noqa: E741
                                ties=ties, dv=16 * splits)  # each program merges 16 columns
    nb = -(-s_len // lp)
    idx, lse, o_cmp, scores = gpu.select_top_n(
        s, m, l, seq_lens, group_size=g, num_blocks=nb, o_p=o, chunk=chunk, splits=splits,
        interpret=INTERPRET, **geom)
    o_ref, lse_ref = gpu.merge_partials(o[:, :, :, :g], m[..., :g], l[..., :g])
    idx_ref = ref.select_from_logits(s[:, :, :g], lse_ref, seq_lens, num_blocks=nb, **geom)
    assert idx.shape == idx_ref.shape and idx.dtype == jnp.int32
    # The block scores of every valid block, from the twin's expressions.
    visible = jnp.arange(c)[None, :] < ref.num_visible_cmp(
        seq_lens, geom["cmp_block_size"], geom["cmp_stride"])[:, None]
    p = jnp.where(visible[:, None, None, :], jnp.exp(jnp.minimum(s[:, :, :g] - jnp.where(
        jnp.isfinite(lse_ref), lse_ref, 0.0)[..., None], 0.0)), 0.0)  # [B, K, G, C]
    scores_ref = sel_ref.block_scores_from_probs(
        p.reshape(b, 1, kh * g, c), kh, nb, **{k: geom[k] for k in
                                               ("cmp_block_size", "cmp_stride", "slc_block_size")}
    )[:, 0]  # [B, K, J]
    for i, n in enumerate(np.asarray(seq_lens)):
        cur = (n - 1) // lp
        np.testing.assert_allclose(scores[i, :, :cur + 1], scores_ref[i, :, :cur + 1],
                                   rtol=0 if ties else 1e-6, atol=0 if ties else 1e-6)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(idx_ref), -1))
    if ties:  # equal scores: even the slot order is the twin's (forced, then score, then index)
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(idx_ref))
        assert (np.asarray(idx_ref)[:, :, 3:] >= 0).any(), "no slot chosen by score"
    assert_close(lse, lse_ref, jnp.float32, "merged lse")
    assert_close(o_cmp, o_ref, jnp.float32, "merged o_cmp")


@pytest.mark.parametrize("case", [0, 3, 6, 8])
def test_select_kernel_rounds_of_argmax_match_the_ranking(case, monkeypatch):
    """Programs with more blocks than ``RANK_TOPN_MAX`` take the top-n by rounds of argmax
    instead of ranking every block: the same slots (here with the ranking switched off)."""
    monkeypatch.setattr(gpu, "RANK_TOPN_MAX", 0)
    values = _SELECT_CASES[case]
    test_select_kernel_matches_select_from_logits(*values)


def test_select_kernel_validates_its_inputs():
    geom = dict(cmp_block_size=8, cmp_stride=4, slc_block_size=16, top_n=4, num_blocks=4)
    s, m = jnp.zeros((1, 1, 16, 64)), jnp.zeros((1, 1, 2, 16))
    lens = jnp.asarray([10], jnp.int32)
    with pytest.raises(ValueError, match="group_size=17"):
        gpu.select_top_n(s, m, m, lens, group_size=17, interpret=INTERPRET, **geom)
    with pytest.raises(ValueError, match=r"m_p.shape=\(1, 1, 2, 8\)"):
        gpu.select_top_n(s, m[..., :8], m[..., :8], lens, group_size=4, interpret=INTERPRET, **geom)
    with pytest.raises(ValueError, match="l=8, d=3"):
        gpu.select_top_n(s, m, m, lens, group_size=4, interpret=INTERPRET,
                         **{**geom, "cmp_stride": 3})
    with pytest.raises(NotImplementedError, match="l'/d=6"):
        gpu.select_top_n(s, m, m, lens, group_size=4, interpret=INTERPRET,
                         **{**geom, "slc_block_size": 24})
    with pytest.raises(ValueError, match="chunk must be a power of two >= 16, got 8"):
        gpu.select_top_n(s, m, m, lens, group_size=4, chunk=8, interpret=INTERPRET, **geom)
    with pytest.raises(ValueError, match=r"num_cmp=65 must lie in \[0, Cp=64\]"):
        gpu.select_top_n(s, m, m, lens, group_size=4, num_cmp=65, interpret=INTERPRET, **geom)
    with pytest.raises(ValueError, match="select_chunk must be a power of two >= 16, got 48"):
        gpu.BlockSizes(select_chunk=48)
    with pytest.raises(ValueError, match="select_merge_splits"):
        gpu.BlockSizes(select_merge_splits=-1)
    with pytest.raises(ValueError, match="splits must be >= 1, got 0"):
        gpu.select_top_n(s, m, m, lens, group_size=4, splits=0, interpret=INTERPRET, **geom)
    # Two programs cannot share Dv = 33 columns equally (a column would never be written).
    o = jnp.zeros((1, 1, 2, 16, 33))
    with pytest.raises(ValueError, match="cannot split Dv=33"):
        gpu.select_top_n(s, m, m, lens, group_size=4, o_p=o, chunk=16, splits=2,
                         interpret=INTERPRET, **{**geom, "num_blocks": 16})
    with pytest.raises(ValueError, match="sparse_slots must be 0 or a power of two, got 3"):
        gpu.BlockSizes(sparse_slots=3)
    with pytest.raises(ValueError, match="select_splits must be >= 0"):
        gpu.BlockSizes(select_splits=-1)


def test_decode_stages_agree_with_the_whole_chain():
    """The benchmark's prefixes: the compressed stage's XLA merge equals the select kernel's
    fused one, and the selection stage picks the chain's blocks."""
    seq_lens = jnp.asarray([1, 30, 64], jnp.int32)
    args = (*_inputs(3, len(seq_lens), 8, 2, 16, 16, 64, 64, jnp.float32), seq_lens)
    kw = dict(**GEOM, block_sizes=gpu.BlockSizes(block_k=16, target_programs=32),
              interpret=INTERPRET)
    cmp = gpu.decode_stages(*args, upto="cmp", **kw)
    sel = gpu.decode_stages(*args, upto="select", **kw)
    _, idx_ref = ref.decode_attention(*args, **GEOM)
    assert_close(sel["o_cmp"], cmp["o_cmp"], jnp.float32, "o_cmp: fused vs XLA merge")
    np.testing.assert_array_equal(np.sort(np.asarray(sel["indices"]), -1),
                                  np.sort(np.asarray(idx_ref), -1))
    with pytest.raises(ValueError, match="upto='slc'"):
        gpu.decode_stages(*args, upto="slc", **kw)


@pytest.mark.parametrize("select,max_cands", [({}, 64), ({}, 16), (dict(select_kernel=False), 64)])
def test_decode_kernel_with_odd_counts(select, max_cands, monkeypatch):
    """n = 5 blocks in slots of 2 (3 programs, rounded up to 4) and a 40-token window in
    16-token tiles (3 pieces, rounded up to 4): the rounded-up programs attend nothing. The
    sparse kernel merges the 4 select programs' candidates itself, or (at most 16 allowed) XLA
    merges them first."""
    monkeypatch.setattr(gpu, "MAX_SPARSE_CANDIDATES", max_cands)
    geom = dict(cmp_block_size=8, cmp_stride=4, slc_block_size=16, top_n=5, window_size=40)
    seq_lens = jnp.asarray([1, 23, 97, 256], jnp.int32)
    args = (*_inputs(7, len(seq_lens), 8, 2, 16, 32, 256, 64, jnp.float32), seq_lens)
    sizes = gpu.BlockSizes(block_k=16, target_programs=24, sparse_slots=2, select_chunk=16,
                           select_splits=4, **select)
    o_ref, idx_ref = ref.decode_attention(*args, **geom)
    o, idx = gpu.decode_attention(*args, **geom, block_sizes=sizes, interpret=INTERPRET)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(idx_ref), -1))
    assert_close(o, o_ref, jnp.float32, f"decode kernel, n=5, w=40, {select}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_combine_merges_many_compressed_splits(dtype):
    """32 compressed splits (more than the combine kernel merges one by one: it takes them in
    tiles of 16), one 16-column share of Dv per combine program, and G = 3 padded to 16 rows."""
    s_len, c = 2048, 512
    seq_lens = jnp.asarray([1, 9, 700, 2048], jnp.int32)
    args = (*_inputs(11, len(seq_lens), 6, 2, 16, 32, s_len, c, dtype), seq_lens)
    sizes = gpu.BlockSizes(block_k=16, target_programs=64, cmp_splits=32)
    o_ref, idx_ref = ref.decode_attention(*args, **GEOM)
    o, idx = gpu.decode_attention(*args, **GEOM, block_sizes=sizes, interpret=INTERPRET)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(idx_ref), -1))
    assert_close(o, o_ref, dtype, "decode kernel with 32 compressed splits")


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
        o, _ = gpu.decode_attention(*ringed, **GEOM, block_sizes=sizes, interpret=INTERPRET)
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


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_decode_rejects_mismatched_arguments(impl):
    """Shapes that do not fit together raise a ValueError naming them, on both paths."""
    q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates = _inputs(0, 2, 8, 2, 16, 16, 64, 64,
                                                                 jnp.float32)
    lens = jnp.asarray([5, 64], jnp.int32)
    fn = (ref.decode_attention if impl == "reference"
          else lambda *a, **k: gpu.decode_attention(*a, **k, interpret=INTERPRET))
    good = [q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, lens]

    def call(**swap):
        args = list(good)
        names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_swa", "v_swa", "gates", "lens"]
        for name, val in swap.items():
            args[names.index(name)] = val
        return fn(*args, **GEOM)

    with pytest.raises(ValueError, match=r"gates must be \[B, N, 3\]=\(2, 8, 3\), got \(2, 8, 2\)"):
        call(gates=gates[..., :2])
    with pytest.raises(ValueError, match=r"seq_lens must be integer \[B\]=\(2,\)"):
        call(lens=lens[:1])
    with pytest.raises(ValueError, match="keys must have Dk=16"):
        call(k_slc=jnp.zeros((2, 64, 2, 32)))
    with pytest.raises(ValueError, match="every cache must be"):
        call(v_cmp=v_cmp[:1])
    with pytest.raises(ValueError, match="N=8 query heads must be a multiple of K=3"):
        call(**{n: jnp.zeros(x.shape[:2] + (3,) + x.shape[3:]) for n, x in
                (("k_cmp", k_cmp), ("v_cmp", v_cmp), ("k_slc", k_slc), ("v_slc", v_slc),
                 ("k_swa", k_swa), ("v_swa", v_swa))})
    with pytest.raises(ValueError, match="ring of S'=8 slots cannot hold w=16"):
        call(k_swa=k_swa[:, :8], v_swa=v_swa[:, :8])


def test_lengths_past_the_cache_stay_inside_it():
    """``seq_lens > S`` breaks the contract (the output is undefined) but no block past the
    cache may be chosen: the kernels would read outside the raw keys on the GPU."""
    seq_lens = jnp.asarray([64, 100], jnp.int32)  # a full cache of 64 slots, then 36 past it
    args = (*_inputs(2, 2, 8, 2, 16, 16, 64, 64, jnp.float32), seq_lens)
    for sizes in (gpu.BlockSizes(block_k=16), gpu.BlockSizes(block_k=16, combine_kernel=False)):
        o, idx = gpu.decode_attention(*args, **GEOM, block_sizes=sizes, interpret=INTERPRET)
        idx = np.asarray(idx)
        assert ((idx >= -1) & (idx < 64 // GEOM["slc_block_size"])).all(), idx
        assert np.isfinite(np.asarray(o)).all()


def test_unsupported_head_dim_raises_not_implemented():
    args = (*_inputs(0, 1, 4, 1, 24, 24, 64, 64, jnp.float32), jnp.asarray([10], jnp.int32))
    with pytest.raises(NotImplementedError, match="head dims"):
        gpu.decode_attention(*args, **GEOM, interpret=INTERPRET)


def test_decode_accepts_caches_of_exactly_2_pow_31_elements():
    """The decode kernels form no offset past a cache's last element, so a raw cache of 2**31
    elements (64k tokens x 4 heads x 128 at batch 64) is taken and one more batch row is
    refused with a message naming the shape; checked on shapes only (no 4 GiB arrays). The
    compiled kernels at that size are checked against the twin in ``test_gpu.py``."""
    def trace(b):
        s, c, w, kh, d, n = 1 << 16, 4096, 512, 4, 128, 64
        sds = jax.ShapeDtypeStruct
        raw = sds((b, s, kh, d), jnp.bfloat16)
        return jax.eval_shape(
            lambda *a: gpu.decode_attention(*a, cmp_block_size=32, cmp_stride=16,
                                            slc_block_size=64, top_n=16, window_size=w),
            sds((b, n, d), jnp.bfloat16), sds((b, c, kh, d), jnp.bfloat16),
            sds((b, c, kh, d), jnp.bfloat16), raw, raw, sds((b, w, kh, d), jnp.bfloat16),
            sds((b, w, kh, d), jnp.bfloat16), sds((b, n, 3), jnp.float32),
            sds((b,), jnp.int32))

    o, idx = trace(64)
    assert o.shape == (64, 64, 128) and idx.shape == (64, 4, 16)
    with pytest.raises(NotImplementedError, match=r"k_slc of shape \(65, 65536, 4, 128\)"):
        trace(65)
