"""Self-checks of the NSA oracle against facts derived by hand from the spec.

None of these compares the oracle with another NSA implementation: each test pins one
rule of ``NSA_SPEC.md`` to a value that can be worked out on paper, or to plain causal
attention where NSA must reduce to it.
"""

import math

import numpy as np
import pytest

from tests.oracle import (
    compress_oracle,
    nsa_oracle,
    selection_scores_oracle,
    top_n_oracle,
)


def _inputs(seed, bsz, seq_len, num_q, num_kv, dim_k, dim_v):
    """Random q, k, v and gates (gates in [0, 1])."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((bsz, seq_len, num_q, dim_k))
    k = rng.standard_normal((bsz, seq_len, num_kv, dim_k))
    v = rng.standard_normal((bsz, seq_len, num_kv, dim_v))
    gates = rng.uniform(size=(bsz, seq_len, num_q, 3))
    return q, k, v, gates


def _causal_attention(q, k, v, scale):
    """Dense causal softmax attention with GQA head sharing, vectorised. [B, T, N, Dv]."""
    group = q.shape[2] // k.shape[2]
    # np.repeat maps query head h to KV head h // G, the spec's grouping.
    kk, vv = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("btnd,bsnd->bnts", q, kk) * scale
    seq_len = q.shape[1]
    logits = np.where(np.tril(np.ones((seq_len, seq_len), dtype=bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnts,bsnd->btnd", p / p.sum(-1, keepdims=True), vv)


def _mlp_params(rng, num_kv, block, dim, hidden):
    return {
        "pos": rng.standard_normal((num_kv, block, dim)),
        "w1": rng.standard_normal((num_kv, block * dim, hidden)) / math.sqrt(block * dim),
        "b1": rng.standard_normal((num_kv, hidden)),
        "w2": rng.standard_normal((num_kv, hidden, dim)) / math.sqrt(hidden),
        "b2": rng.standard_normal((num_kv, dim)),
    }


def _linear_params(rng, num_kv, block, dim):
    return {
        "w": rng.standard_normal((num_kv, block * dim, dim)) / math.sqrt(block * dim),
        "b": rng.standard_normal((num_kv, dim)),
    }


# --------------------------------------------------------------------------------------
# Selection scores: the overlap mapping of Eq. 9 (with the paper's index error fixed).
# --------------------------------------------------------------------------------------


def test_overlap_weights_paper_config():
    """l=32, d=16, l'=64: block j collects tokens 4j-1..4j+3 with weights 1, 2, 2, 2, 1."""
    lc, dc, ls = 32, 16, 64
    seq_len, num_kv, group = 256, 2, 2
    num_cmp = (seq_len - lc) // dc + 1  # 15
    num_slc = seq_len // ls  # 4
    # Expected weight of compressed token i on block j, written from the stated pattern.
    expected = np.zeros((num_cmp, num_slc))
    for j in range(num_slc):
        for offset, weight in zip(range(-1, 4), (1, 2, 2, 2, 1), strict=True):
            i = 4 * j + offset
            if 0 <= i < num_cmp:
                expected[i, j] = weight
    # Query row i carries a one-hot p_cmp on compressed token i, on head 1 (group 0) only,
    # so row i of the scores is the weight row of token i. The mapping itself does not look
    # at causality, so any row may hold any one-hot.
    p_cmp = np.zeros((1, seq_len, num_kv * group, num_cmp))
    for i in range(num_cmp):
        p_cmp[0, i, 1, i] = 1.0
    s = selection_scores_oracle(p_cmp, num_kv_heads=num_kv, cmp_block_size=lc,
                                cmp_stride=dc, slc_block_size=ls)
    assert s.shape == (1, seq_len, num_kv, num_slc)
    np.testing.assert_array_equal(s[0, :num_cmp, 0], expected)
    np.testing.assert_array_equal(s[0, :, 1], 0.0)
    np.testing.assert_array_equal(s[0, num_cmp:], 0.0)


def test_scores_equal_group_sum_when_l_equals_lprime_equals_d():
    """l = l' = d: p_slc = p_cmp, so s is p_cmp summed over the G heads of each group."""
    bsz, seq_len, num_kv, group, blk = 2, 13, 2, 3, 4
    q, k, v, gates = _inputs(0, bsz, seq_len, num_kv * group, num_kv, 5, 3)
    res = nsa_oracle(q, k, v, gates, {}, cmp_block_size=blk, cmp_stride=blk,
                     slc_block_size=blk, slc_top_n=3, window_size=4, cmp_kind="mean")
    p = res["p_cmp"]  # [B, T, N, C]; C = 3 complete blocks, Jn = 4 selection blocks
    assert p.shape == (bsz, seq_len, num_kv * group, 3)
    assert res["scores"].shape == (bsz, seq_len, num_kv, 4)
    summed = p.reshape(bsz, seq_len, num_kv, group, 3).sum(axis=3)
    np.testing.assert_allclose(res["scores"][..., :3], summed, rtol=0, atol=1e-15)
    # The last, incomplete block has no compressed token at all.
    np.testing.assert_array_equal(res["scores"][..., 3], 0.0)


@pytest.mark.parametrize("lc,dc,ls", [(32, 16, 64), (4, 2, 8), (4, 4, 4), (6, 2, 6)])
def test_scores_total_mass(lc, dc, ls):
    """Every compressed token's overlap weights sum to l/d, so sum_j s = G*l/d once visible."""
    seq_len, num_kv, group = 70, 1, 2
    q, k, v, gates = _inputs(1, 1, seq_len, num_kv * group, num_kv, 4, 4)
    res = nsa_oracle(q, k, v, gates, {}, cmp_block_size=lc, cmp_stride=dc,
                     slc_block_size=ls, slc_top_n=3, window_size=8, cmp_kind="mean")
    total = res["scores"].sum(axis=-1)[0, :, 0]
    expected = np.where(np.arange(seq_len) >= lc - 1, group * lc / dc, 0.0)
    np.testing.assert_allclose(total, expected, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------
# Top-n selection.
# --------------------------------------------------------------------------------------


def test_top_n_hand_example_with_tie():
    """t=27, l'=4: current block 6, forced {0, 5, 6}; one free slot, tie 2 vs 4 -> 2."""
    scores = np.zeros((1, 28, 1, 7))
    scores[0, 27, 0] = [9.0, 0.3, 0.7, 0.1, 0.7, 9.0, 0.0]
    idx = top_n_oracle(scores, slc_block_size=4, slc_top_n=4)
    assert idx[0, 27, 0].tolist() == [0, 2, 5, 6]
    idx = top_n_oracle(scores, slc_block_size=4, slc_top_n=5)
    assert idx[0, 27, 0].tolist() == [0, 2, 4, 5, 6]
    # Forced blocks win even with the lowest scores.
    scores[0, 27, 0] = [-1.0, 5.0, 4.0, 3.0, 2.0, -1.0, -1.0]
    idx = top_n_oracle(scores, slc_block_size=4, slc_top_n=4)
    assert idx[0, 27, 0].tolist() == [0, 1, 5, 6]
    # t=5 (block 1): valid {0, 1}, both forced, then padding.
    assert idx[0, 5, 0].tolist() == [0, 1, -1, -1]
    # t=0: only block 0 exists.
    assert idx[0, 0, 0].tolist() == [0, -1, -1, -1]


@pytest.mark.parametrize("seq_len,ls,n", [(1, 4, 3), (37, 4, 3), (37, 4, 5), (50, 8, 16)])
def test_top_n_invariants(seq_len, ls, n):
    """Forced blocks present, no duplicates, sorted, -1 padding iff fewer valid blocks."""
    bsz, num_kv, group = 2, 2, 2
    q, k, v, gates = _inputs(2, bsz, seq_len, num_kv * group, num_kv, 4, 4)
    res = nsa_oracle(q, k, v, gates, {}, cmp_block_size=4, cmp_stride=2, slc_block_size=ls,
                     slc_top_n=n, window_size=4, cmp_kind="mean")
    idx = res["indices"]
    assert idx.shape == (bsz, seq_len, num_kv, n) and idx.dtype == np.int64
    for b in range(bsz):
        for t in range(seq_len):
            cur = t // ls
            num_valid = cur + 1
            for g in range(num_kv):
                row = idx[b, t, g].tolist()
                chosen = [j for j in row if j >= 0]
                assert chosen == sorted(set(chosen))
                assert row[len(chosen):] == [-1] * (n - len(chosen))
                assert len(chosen) == min(n, num_valid)
                assert all(0 <= j <= cur for j in chosen)
                assert {0, cur, max(cur - 1, 0)} <= set(chosen)


# --------------------------------------------------------------------------------------
# Outputs: gates and reductions to plain causal attention.
# --------------------------------------------------------------------------------------


def test_zero_gates_give_zero_output():
    q, k, v, gates = _inputs(3, 2, 20, 4, 2, 6, 5)
    res = nsa_oracle(q, k, v, np.zeros_like(gates), {}, cmp_block_size=4, cmp_stride=2,
                     slc_block_size=4, slc_top_n=3, window_size=5, cmp_kind="mean")
    np.testing.assert_array_equal(res["out"], 0.0)


def test_gated_sum():
    q, k, v, gates = _inputs(4, 1, 18, 4, 2, 6, 5)
    res = nsa_oracle(q, k, v, gates, {}, cmp_block_size=4, cmp_stride=2,
                     slc_block_size=4, slc_top_n=3, window_size=5, cmp_kind="mean")
    expected = (gates[..., 0:1] * res["o_cmp"] + gates[..., 1:2] * res["o_slc"]
                + gates[..., 2:3] * res["o_swa"])
    np.testing.assert_allclose(res["out"], expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("group", [1, 3, 16])
def test_full_window_and_full_selection_are_causal_attention(group):
    """w >= T reduces the window branch, and n*l' >= T the selected branch, to dense causal
    attention over that branch's own keys and values."""
    bsz, seq_len, num_kv, dim_k, dim_v = 2, 11, 1 if group == 16 else 2, 6, 3
    q, k, v, gates = _inputs(5, bsz, seq_len, num_kv * group, num_kv, dim_k, dim_v)
    rng = np.random.default_rng(6)
    k_slc, k_swa = (rng.standard_normal(k.shape) for _ in range(2))
    v_slc, v_swa = (rng.standard_normal(v.shape) for _ in range(2))
    scale = 0.37
    res = nsa_oracle(q, k, v, gates, {}, cmp_block_size=4, cmp_stride=2, slc_block_size=4,
                     slc_top_n=3, window_size=seq_len, cmp_kind="mean", scale=scale,
                     k_slc=k_slc, v_slc=v_slc, k_swa=k_swa, v_swa=v_swa)
    np.testing.assert_allclose(res["o_slc"], _causal_attention(q, k_slc, v_slc, scale),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res["o_swa"], _causal_attention(q, k_swa, v_swa, scale),
                               rtol=1e-12, atol=1e-12)


def test_window_of_one_returns_own_value():
    """w = 1: the only key is the query's own position, so o_swa[t, h] = v[t, h // G]."""
    q, k, v, gates = _inputs(7, 2, 9, 4, 2, 4, 3)
    res = nsa_oracle(q, k, v, gates, {}, cmp_block_size=2, cmp_stride=1, slc_block_size=2,
                     slc_top_n=3, window_size=1, cmp_kind="mean")
    np.testing.assert_allclose(res["o_swa"], np.repeat(v, 2, axis=2), rtol=0, atol=1e-15)


def test_unit_mean_compression_is_causal_attention():
    """l = d = 1 with mean pooling: k_cmp = k and every token i <= t is visible."""
    q, k, v, gates = _inputs(8, 1, 7, 4, 2, 5, 3)
    res = nsa_oracle(q, k, v, gates, {}, cmp_block_size=1, cmp_stride=1, slc_block_size=1,
                     slc_top_n=3, window_size=2, cmp_kind="mean")
    np.testing.assert_allclose(res["k_cmp"], k, rtol=0, atol=0)
    np.testing.assert_allclose(res["o_cmp"], _causal_attention(q, k, v, 1 / math.sqrt(5)),
                               rtol=1e-12, atol=1e-12)


def test_fixed_indices_override_top_n():
    """Given indices are used as is; only block 0 -> o_slc attends tokens [0, l') and <= t."""
    bsz, seq_len, num_kv, group, ls = 1, 12, 2, 2, 4
    q, k, v, gates = _inputs(9, bsz, seq_len, num_kv * group, num_kv, 4, 3)
    idx = np.full((bsz, seq_len, num_kv, 3), -1, dtype=np.int64)
    idx[..., 0] = 0
    res = nsa_oracle(q, k, v, gates, {}, cmp_block_size=4, cmp_stride=2, slc_block_size=ls,
                     slc_top_n=3, window_size=ls, cmp_kind="mean", indices=idx)
    np.testing.assert_array_equal(res["indices"], idx)
    # Window w = l' ending at t = l' - 1 covers exactly block 0, so the two branches agree.
    np.testing.assert_allclose(res["o_slc"][:, ls - 1], res["o_swa"][:, ls - 1],
                               rtol=1e-13, atol=1e-13)
    # For later t, attending only block 0 is constant in t for a fixed query.
    q2 = np.broadcast_to(q[:, :1], q.shape)
    res2 = nsa_oracle(q2, k, v, gates, {}, cmp_block_size=4, cmp_stride=2,
                      slc_block_size=ls, slc_top_n=3, window_size=ls, cmp_kind="mean",
                      indices=idx)
    for t in range(ls, seq_len):
        np.testing.assert_allclose(res2["o_slc"][:, t], res2["o_slc"][:, ls - 1],
                                   rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------------------
# Compressed branch: visibility and empty branches.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mean", "linear", "mlp"])
@pytest.mark.parametrize("seq_len", [1, 5, 7])
def test_short_sequence_has_empty_compressed_branch(kind, seq_len):
    """T < l: no compressed token exists, so o_cmp = 0, lse = -inf, and nothing is NaN."""
    lc, num_kv, dim_k, dim_v = 8, 2, 4, 3
    rng = np.random.default_rng(10)
    q, k, v, gates = _inputs(10, 2, seq_len, 4, num_kv, dim_k, dim_v)
    if kind == "mean":
        params = {}
    elif kind == "linear":
        params = {"k": _linear_params(rng, num_kv, lc, dim_k),
                  "v": _linear_params(rng, num_kv, lc, dim_v)}
    else:
        params = {"k": _mlp_params(rng, num_kv, lc, dim_k, 5),
                  "v": _mlp_params(rng, num_kv, lc, dim_v, 5)}
    res = nsa_oracle(q, k, v, gates, params, cmp_block_size=lc, cmp_stride=4,
                     slc_block_size=8, slc_top_n=3, window_size=3, cmp_kind=kind)
    assert res["k_cmp"].shape == (2, 0, num_kv, dim_k)
    assert res["v_cmp"].shape == (2, 0, num_kv, dim_v)
    assert res["p_cmp"].shape == (2, seq_len, 4, 0)
    np.testing.assert_array_equal(res["o_cmp"], 0.0)
    assert np.all(np.isneginf(res["lse_cmp"]))
    np.testing.assert_array_equal(res["scores"], 0.0)
    for name, arr in res.items():
        assert not np.any(np.isnan(arr)), name


def test_compressed_visibility_pattern():
    """Query t sees token i iff i*d + l - 1 <= t; early queries are empty, never NaN."""
    lc, dc, seq_len = 6, 2, 17
    q, k, v, gates = _inputs(11, 1, seq_len, 2, 1, 4, 4)
    res = nsa_oracle(q, k, v, gates, {}, cmp_block_size=lc, cmp_stride=dc, slc_block_size=6,
                     slc_top_n=3, window_size=3, cmp_kind="mean")
    num_cmp = (seq_len - lc) // dc + 1
    assert res["p_cmp"].shape[-1] == num_cmp
    for t in range(seq_len):
        visible = res["p_cmp"][0, t, 0] > 0
        assert visible.tolist() == [i * dc + lc - 1 <= t for i in range(num_cmp)]
        row_sum = res["p_cmp"][0, t].sum(-1)
        if t < lc - 1:
            np.testing.assert_array_equal(row_sum, 0.0)
            assert np.all(np.isneginf(res["lse_cmp"][0, t]))
            np.testing.assert_array_equal(res["o_cmp"][0, t], 0.0)
        else:
            np.testing.assert_allclose(row_sum, 1.0, rtol=1e-14)
            assert np.all(np.isfinite(res["lse_cmp"][0, t]))
    assert not np.any(np.isnan(res["out"]))


def test_lse_matches_logits():
    """lse_cmp is log sum exp of the scaled logits over the visible compressed tokens."""
    lc, dc, seq_len, scale = 4, 2, 9, 0.5
    q, k, v, gates = _inputs(12, 1, seq_len, 1, 1, 3, 2)
    res = nsa_oracle(q, k, v, gates, {}, cmp_block_size=lc, cmp_stride=dc, slc_block_size=4,
                     slc_top_n=3, window_size=3, cmp_kind="mean", scale=scale)
    t = seq_len - 1  # C = 3 tokens, whose blocks end at 3, 5, 7: all visible at t = 8
    kc = np.stack([k[0, i * dc:i * dc + lc, 0].mean(0) for i in range(3)])
    logits = kc @ q[0, t, 0] * scale
    np.testing.assert_allclose(res["lse_cmp"][0, t, 0], np.log(np.exp(logits).sum()),
                               rtol=1e-13)


# --------------------------------------------------------------------------------------
# Compression functions.
# --------------------------------------------------------------------------------------


def test_compress_mean_by_hand():
    x = np.arange(2 * 10 * 1 * 2, dtype=np.float64).reshape(2, 10, 1, 2)
    out = compress_oracle(x, {}, kind="mean", block_size=4, stride=2)
    assert out.shape == (2, 4, 1, 2)  # (10 - 4) // 2 + 1 blocks
    # Block i covers rows 2i..2i+3, whose mean row index is 2i + 1.5.
    for b in range(2):
        for i in range(4):
            np.testing.assert_allclose(out[b, i, 0], x[b, 2 * i, 0] + 1.5 * 2)


def test_compress_linear_averaging_weights_equal_mean():
    """linear with w = [I/l; ...; I/l] (stacked l times) and b = 0 is mean pooling; this also
    pins the row-major flatten order p*D + c."""
    lc, dc, dim, num_kv = 4, 2, 3, 2
    x = np.random.default_rng(13).standard_normal((1, 11, num_kv, dim))
    w = np.tile(np.eye(dim) / lc, (lc, 1))  # [l*D, D]; row p*D + c maps to output c
    params = {"w": np.stack([w] * num_kv), "b": np.zeros((num_kv, dim))}
    lin = compress_oracle(x, params, kind="linear", block_size=lc, stride=dc)
    mean = compress_oracle(x, {}, kind="mean", block_size=lc, stride=dc)
    np.testing.assert_allclose(lin, mean, rtol=1e-14, atol=1e-14)
    # Picking only row position p = 1 (weights at rows D..2D-1) returns the block's 2nd row.
    w_pick = np.zeros((lc * dim, dim))
    w_pick[dim:2 * dim] = np.eye(dim)
    params = {"w": np.stack([w_pick] * num_kv), "b": np.ones((num_kv, dim))}
    out = compress_oracle(x, params, kind="linear", block_size=lc, stride=dc)
    for i in range(out.shape[1]):
        np.testing.assert_allclose(out[0, i], x[0, i * dc + 1] + 1.0, rtol=1e-14)


def test_compress_mlp_hand_facts():
    """mlp with w2 = 0 returns b2; with pos = 0, w1 = 0, b1 = z it returns silu(z) @ w2 + b2."""
    lc, dim, hidden, num_kv = 4, 3, 5, 2
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 9, num_kv, dim))
    params = _mlp_params(rng, num_kv, lc, dim, hidden)
    params["w2"] = np.zeros_like(params["w2"])
    out = compress_oracle(x, params, kind="mlp", block_size=lc, stride=2)
    np.testing.assert_array_equal(out, np.broadcast_to(params["b2"], out.shape))

    z = np.array([-3.0, -0.5, 0.0, 0.5, 3.0])
    silu = z * (1.0 / (1.0 + np.exp(-z)))
    params = _mlp_params(rng, num_kv, lc, dim, hidden)
    params["w1"] = np.zeros_like(params["w1"])
    params["b1"] = np.stack([z] * num_kv)
    out = compress_oracle(x, params, kind="mlp", block_size=lc, stride=2)
    for h in range(num_kv):
        np.testing.assert_allclose(out[:, :, h], np.broadcast_to(
            silu @ params["w2"][h] + params["b2"][h], out[:, :, h].shape), rtol=1e-14)

    # Hidden unit 0 reads only flat index 1*D + 0, i.e. block row 1, channel 0, after the
    # position embedding is added; w2 copies it to output channel 2.
    params = _mlp_params(rng, num_kv, lc, dim, hidden)
    params["w1"] = np.zeros_like(params["w1"])
    params["w1"][:, 1 * dim + 0, 0] = 1.0
    params["b1"] = np.zeros_like(params["b1"])
    params["w2"] = np.zeros_like(params["w2"])
    params["w2"][:, 0, 2] = 1.0
    out = compress_oracle(x, params, kind="mlp", block_size=lc, stride=2)
    for h in range(num_kv):
        for i in range(out.shape[1]):
            y = x[:, i * 2 + 1, h, 0] + params["pos"][h, 1, 0]
            np.testing.assert_allclose(out[:, i, h, 2], y / (1.0 + np.exp(-y))
                                       + params["b2"][h, 2], rtol=1e-14)


# --------------------------------------------------------------------------------------
# Shapes, edge cases and argument checks.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mean", "linear", "mlp"])
@pytest.mark.parametrize("bsz,seq_len,num_kv,group,dim_k,dim_v,lc,dc,ls,n,w", [
    (1, 1, 1, 1, 4, 4, 4, 2, 4, 3, 2),      # T = 1
    (2, 23, 2, 2, 5, 3, 4, 2, 8, 3, 5),     # T not a multiple, Dk != Dv, B > 1
    (1, 18, 1, 16, 4, 2, 4, 2, 4, 4, 3),    # G = 16 (MQA)
    (1, 13, 3, 1, 3, 4, 2, 2, 2, 5, 4),     # G = 1, l = l' = d
])
def test_shapes_and_finiteness(kind, bsz, seq_len, num_kv, group, dim_k, dim_v, lc, dc, ls,
                               n, w):
    rng = np.random.default_rng(15)
    num_q = num_kv * group
    q, k, v, gates = _inputs(15, bsz, seq_len, num_q, num_kv, dim_k, dim_v)
    if kind == "mean":
        params = {}
    elif kind == "linear":
        params = {"k": _linear_params(rng, num_kv, lc, dim_k),
                  "v": _linear_params(rng, num_kv, lc, dim_v)}
    else:
        params = {"k": _mlp_params(rng, num_kv, lc, dim_k, 6),
                  "v": _mlp_params(rng, num_kv, lc, dim_v, 6)}
    res = nsa_oracle(q, k, v, gates, params, cmp_block_size=lc, cmp_stride=dc,
                     slc_block_size=ls, slc_top_n=n, window_size=w, cmp_kind=kind)
    num_cmp = max(0, (seq_len - lc) // dc + 1)
    num_slc = -(-seq_len // ls)
    expected_shapes = {
        "out": (bsz, seq_len, num_q, dim_v), "o_cmp": (bsz, seq_len, num_q, dim_v),
        "o_slc": (bsz, seq_len, num_q, dim_v), "o_swa": (bsz, seq_len, num_q, dim_v),
        "lse_cmp": (bsz, seq_len, num_q), "k_cmp": (bsz, num_cmp, num_kv, dim_k),
        "v_cmp": (bsz, num_cmp, num_kv, dim_v), "p_cmp": (bsz, seq_len, num_q, num_cmp),
        "scores": (bsz, seq_len, num_kv, num_slc), "indices": (bsz, seq_len, num_kv, n),
    }
    assert set(res) == set(expected_shapes)
    for name, shape in expected_shapes.items():
        assert res[name].shape == shape, name
        assert not np.any(np.isnan(res[name])), name
    assert res["indices"].dtype == np.int64
    for name in ("out", "o_cmp", "o_slc", "o_swa", "k_cmp", "v_cmp", "p_cmp", "scores"):
        assert res[name].dtype == np.float64 and np.all(np.isfinite(res[name])), name


def test_bfloat16_jax_inputs_are_accepted():
    jnp = pytest.importorskip("jax.numpy")
    q, k, v, gates = _inputs(16, 1, 6, 2, 1, 4, 4)
    cast = [jnp.asarray(a, dtype=jnp.bfloat16) for a in (q, k, v, gates)]
    res = nsa_oracle(*cast, {}, cmp_block_size=2, cmp_stride=2, slc_block_size=2,
                     slc_top_n=3, window_size=2, cmp_kind="mean")
    ref = nsa_oracle(*(np.asarray(a).astype(np.float64) for a in cast), {}, cmp_block_size=2,
                     cmp_stride=2, slc_block_size=2, slc_top_n=3, window_size=2,
                     cmp_kind="mean")
    assert res["out"].dtype == np.float64
    np.testing.assert_array_equal(res["out"], ref["out"])


@pytest.mark.parametrize("override", [
    {"cmp_stride": 3},                       # does not divide l = 4
    {"slc_block_size": 6, "cmp_stride": 4},  # stride 4 does not divide l' = 6
    {"slc_top_n": 2},                        # cannot hold 3 forced blocks at T = 12
    {"window_size": 0},
    {"cmp_kind": "max"},
])
def test_bad_arguments_raise(override):
    q, k, v, gates = _inputs(17, 1, 12, 2, 1, 4, 4)
    kwargs = dict(cmp_block_size=4, cmp_stride=2, slc_block_size=4, slc_top_n=3,
                  window_size=2, cmp_kind="mean")
    kwargs.update(override)
    with pytest.raises(ValueError):
        nsa_oracle(q, k, v, gates, {}, **kwargs)


def test_bad_shapes_raise():
    q, k, v, gates = _inputs(18, 1, 8, 3, 2, 4, 4)  # N = 3 is not a multiple of K = 2
    with pytest.raises(ValueError):
        nsa_oracle(q, k, v, gates, {}, cmp_block_size=4, cmp_stride=2, slc_block_size=4,
                   slc_top_n=3, window_size=2, cmp_kind="mean")
    q, k, v, gates = _inputs(18, 1, 0, 2, 1, 4, 4)  # T = 0
    with pytest.raises(ValueError):
        nsa_oracle(q, k, v, gates, {}, cmp_block_size=4, cmp_stride=2, slc_block_size=4,
                   slc_top_n=3, window_size=2, cmp_kind="mean")
