"""Slow, literal float64 oracle of Native Sparse Attention (NSA).

Written line by line from ``NSA_SPEC.md`` with explicit Python loops over batch, query
position, head and block, so that every rule of the spec is visible in one place. It is
meant for tiny sizes only and serves as the ground truth for the vectorised JAX
reference; it deliberately shares no code with it and imports no JAX.

Conventions (all from the spec):

* ``q [B, T, N, Dk]``, ``k [B, T, K, Dk]``, ``v [B, T, K, Dv]``, ``N = G * K``; query head
  ``h`` reads KV head (group) ``h // G``.
* ``l = cmp_block_size``, ``d = cmp_stride``, ``l' = slc_block_size``, ``n = slc_top_n``,
  ``w = window_size``.
* Compressed token ``i`` summarises raw tokens ``[i*d, i*d + l)``; selection block ``j``
  covers raw tokens ``[j*l', (j+1)*l')``.
"""

import math

import numpy as np

_KINDS = ("mean", "linear", "mlp")


def _f64(x):
    """Converts any array-like (NumPy, JAX, bfloat16 included) to a float64 NumPy array."""
    # Going through np.asarray first keeps the source dtype (e.g. ml_dtypes bfloat16),
    # whose astype(float64) is exact, instead of relying on a dtype= conversion path.
    return np.asarray(x).astype(np.float64)


def _silu(z):
    """SiLU written as in the spec, z / (1 + exp(-z)); exp may overflow to inf, giving -0."""
    with np.errstate(over="ignore"):
        return z / (1.0 + np.exp(-z))


def _overlap(a0, a1, b0, b1):
    """Length of the intersection of the half-open intervals [a0, a1) and [b0, b1)."""
    return max(0, min(a1, b1) - max(a0, b0))


def _phi(x_blk, params, kind, h):
    """Compresses one block of one KV head.

    Args:
        x_blk: [l, D] raw keys or values of the block.
        params: compression parameters for this tensor (keys or values), all KV heads.
        kind: "mean", "linear" or "mlp".
        h: KV head index, selects that head's parameters.

    Returns:
        [D_out] the compressed token.
    """
    if kind == "mean":
        return x_blk.mean(axis=0)
    if kind == "linear":
        # Row-major flatten: element (p, c) of the block lands at p * D + c.
        return x_blk.reshape(-1) @ params["w"][h] + params["b"][h]
    # kind == "mlp": intra-block position embedding, then flatten -> hidden -> D.
    y = (x_blk + params["pos"][h]).reshape(-1)
    hid = _silu(y @ params["w1"][h] + params["b1"][h])
    return hid @ params["w2"][h] + params["b2"][h]


def compress_oracle(x, params, *, kind, block_size, stride):
    """Compresses raw keys or values into one token per complete block.

    Args:
        x: [B, T, K, D] raw keys or values.
        params: dict of parameters for ``kind``; ignored for "mean" (may be {} or None).
            "linear": {"w": [K, l*D, D], "b": [K, D]}.
            "mlp": {"pos": [K, l, D], "w1": [K, l*D, Hm], "b1": [K, Hm],
            "w2": [K, Hm, D], "b2": [K, D]}.
        kind: "mean", "linear" or "mlp".
        block_size: l, raw tokens per compressed token.
        stride: d, distance between the starts of consecutive blocks; must divide l.

    Returns:
        [B, C, K, D] float64, C = max(0, (T - l) // d + 1). Token i summarises raw tokens
        [i*d, i*d + l) of each KV head.

    Raises:
        ValueError: on an unknown kind, a non-4D input or inconsistent block sizes.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown compression kind {kind!r}, expected one of {_KINDS}")
    if block_size < 1 or stride < 1 or block_size % stride != 0:
        raise ValueError(f"need block_size >= 1, stride >= 1, stride | block_size; "
                         f"got block_size={block_size}, stride={stride}")
    x = _f64(x)
    if x.ndim != 4:
        raise ValueError(f"x must be [B, T, K, D], got shape {x.shape}")
    params = {} if params is None else {name: _f64(p) for name, p in params.items()}
    bsz, seq_len, num_kv, _ = x.shape
    num_cmp = max(0, (seq_len - block_size) // stride + 1)

    # Output width: D for "mean"; the last weight's width for the learned kinds.
    if kind == "mean":
        d_out = x.shape[-1]
    elif kind == "linear":
        d_out = params["w"].shape[-1]
    else:
        d_out = params["w2"].shape[-1]

    out = np.zeros((bsz, num_cmp, num_kv, d_out), dtype=np.float64)
    for b in range(bsz):
        for i in range(num_cmp):
            start = i * stride
            for h in range(num_kv):
                x_blk = x[b, start:start + block_size, h, :]
                out[b, i, h] = _phi(x_blk, params, kind, h)
    return out


def _attend(q_vec, keys, vals, scale):
    """One softmax attention of a single query over an explicit list of keys.

    Args:
        q_vec: [Dk] query.
        keys: [S, Dk] keys (S may be 0).
        vals: [S, Dv] values.
        scale: logit scale.

    Returns:
        (out [Dv], lse scalar, probs [S]). For S == 0: zeros, -inf and an empty array,
        the spec's definition of an empty branch.
    """
    if keys.shape[0] == 0:
        return np.zeros(vals.shape[-1], dtype=np.float64), -np.inf, np.zeros(0)
    logits = (keys @ q_vec) * scale
    m = logits.max()
    e = np.exp(logits - m)
    total = e.sum()
    probs = e / total
    return probs @ vals, m + math.log(total), probs


def selection_scores_oracle(p_cmp, *, num_kv_heads, cmp_block_size, cmp_stride,
                            slc_block_size):
    """Maps compressed-branch probabilities to per-group selection-block scores.

    p_slc[t, h, j] = sum_i p_cmp[t, h, i] * overlap([i*d, i*d+l), [j*l', (j+1)*l')) / d,
    then s[t, g, j] = sum of p_slc[t, h, j] over the G query heads h of group g.

    Args:
        p_cmp: [B, T, N, C] compressed-branch softmax probabilities (0 where not visible).
        num_kv_heads: K; N must be a multiple of it.
        cmp_block_size: l.
        cmp_stride: d.
        slc_block_size: l'.

    Returns:
        [B, T, K, Jn] float64 scores, Jn = ceil(T / l').
    """
    p_cmp = _f64(p_cmp)
    bsz, seq_len, num_q, num_cmp = p_cmp.shape
    if num_q % num_kv_heads != 0:
        raise ValueError(f"N={num_q} is not a multiple of K={num_kv_heads}")
    group = num_q // num_kv_heads
    num_slc = -(-seq_len // slc_block_size)
    lc, dc, ls = cmp_block_size, cmp_stride, slc_block_size

    scores = np.zeros((bsz, seq_len, num_kv_heads, num_slc), dtype=np.float64)
    for b in range(bsz):
        for t in range(seq_len):
            for h in range(num_q):
                g = h // group
                for j in range(num_slc):
                    p_slc = 0.0
                    for i in range(num_cmp):
                        ov = _overlap(i * dc, i * dc + lc, j * ls, (j + 1) * ls)
                        p_slc += p_cmp[b, t, h, i] * ov / dc
                    scores[b, t, g, j] += p_slc
    return scores


def top_n_oracle(scores, *, slc_block_size, slc_top_n):
    """Chooses the selection blocks of every query and group.

    Valid blocks for query t are j <= t // l'. Block 0, the current block t // l' and the
    previous block t // l' - 1 are forced (when they exist) and count inside n; the other
    slots take the highest-scoring remaining valid blocks, ties to the lower index.

    Args:
        scores: [B, T, K, Jn] selection scores s.
        slc_block_size: l'.
        slc_top_n: n, slots per query and group, forced blocks included.

    Returns:
        [B, T, K, n] int64: the chosen block indices sorted ascending, then -1 padding.
    """
    scores = _f64(scores)
    bsz, seq_len, num_kv, _ = scores.shape
    n = slc_top_n
    indices = np.full((bsz, seq_len, num_kv, n), -1, dtype=np.int64)
    for b in range(bsz):
        for t in range(seq_len):
            cur = t // slc_block_size
            valid = list(range(cur + 1))
            forced = {0, cur}
            if cur - 1 >= 0:
                forced.add(cur - 1)
            if len(forced) > n:
                raise ValueError(f"slc_top_n={n} cannot hold the {len(forced)} forced blocks")
            for g in range(num_kv):
                s = scores[b, t, g]
                others = [j for j in valid if j not in forced]
                # Highest score first; equal scores keep the lower block index first.
                others.sort(key=lambda j, s=s: (-s[j], j))
                chosen = sorted(forced | set(others[:n - len(forced)]))
                indices[b, t, g, :len(chosen)] = chosen
    return indices


def nsa_oracle(q, k, v, gates, cmp_params, *, cmp_block_size, cmp_stride, slc_block_size,
               slc_top_n, window_size, cmp_kind, scale=None, k_slc=None, v_slc=None,
               k_swa=None, v_swa=None, indices=None):
    """Full NSA forward pass, literally per the spec, in float64.

    Args:
        q: [B, T, N, Dk] queries.
        k: [B, T, K, Dk] raw keys of the compressed branch.
        v: [B, T, K, Dv] raw values of the compressed branch.
        gates: [B, T, N, 3] branch gates in [0, 1], order (cmp, slc, swa).
        cmp_params: {"k": params for keys, "v": params for values}; see
            ``compress_oracle``. Ignored for cmp_kind "mean" (may be {} or None).
        cmp_block_size: l.
        cmp_stride: d, must divide l and l'.
        slc_block_size: l'.
        slc_top_n: n, selected blocks per query and group, forced blocks included.
        window_size: w, the window covers keys [t - w + 1, t].
        cmp_kind: "mean", "linear" or "mlp".
        scale: logit scale of all three branches; default 1 / sqrt(Dk).
        k_slc: [B, T, K, Dk] keys of the selected branch; default k.
        v_slc: [B, T, K, Dv] values of the selected branch; default v.
        k_swa: [B, T, K, Dk] keys of the window branch; default k.
        v_swa: [B, T, K, Dv] values of the window branch; default v.
        indices: optional [B, T, K, n] integer block indices (-1 = empty slot) used
            instead of the computed top-n; scores are still computed and returned.

    Returns:
        dict of float64 arrays (indices int64):
            "out", "o_cmp", "o_slc", "o_swa": [B, T, N, Dv];
            "lse_cmp": [B, T, N] (-inf where no compressed token is visible);
            "k_cmp": [B, C, K, Dk]; "v_cmp": [B, C, K, Dv];
            "p_cmp": [B, T, N, C] (0 where not visible);
            "scores": [B, T, K, Jn], Jn = ceil(T / l');
            "indices": [B, T, K, n].

    Raises:
        ValueError: on inconsistent shapes or block sizes.
    """
    q, k, v, gates = _f64(q), _f64(k), _f64(v), _f64(gates)
    k_slc = k if k_slc is None else _f64(k_slc)
    v_slc = v if v_slc is None else _f64(v_slc)
    k_swa = k if k_swa is None else _f64(k_swa)
    v_swa = v if v_swa is None else _f64(v_swa)

    # --- argument checks: only what would otherwise give a silently wrong answer ---
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k, v must be 4D [B, T, heads, D]")
    bsz, seq_len, num_q, dim_k = q.shape
    num_kv = k.shape[2]
    dim_v = v.shape[3]
    if seq_len < 1:
        raise ValueError(f"T must be >= 1, got {seq_len}")
    if num_kv < 1 or num_q % num_kv != 0:
        raise ValueError(f"N={num_q} is not a multiple of K={num_kv}")
    if k.shape != (bsz, seq_len, num_kv, dim_k):
        raise ValueError(f"k shape {k.shape} does not match q {q.shape}")
    if v.shape[:3] != (bsz, seq_len, num_kv):
        raise ValueError(f"v shape {v.shape} does not match k {k.shape}")
    for name, arr, ref in (("k_slc", k_slc, k), ("v_slc", v_slc, v),
                           ("k_swa", k_swa, k), ("v_swa", v_swa, v)):
        if arr.shape != ref.shape:
            raise ValueError(f"{name} shape {arr.shape} != {ref.shape}")
    if gates.shape != (bsz, seq_len, num_q, 3):
        raise ValueError(f"gates must be {(bsz, seq_len, num_q, 3)}, got {gates.shape}")
    lc, dc, ls, n, w = cmp_block_size, cmp_stride, slc_block_size, slc_top_n, window_size
    if min(lc, dc, ls, n, w) < 1:
        raise ValueError("block sizes, stride, slc_top_n and window_size must be >= 1")
    if lc % dc != 0 or ls % dc != 0:
        raise ValueError(f"stride {dc} must divide cmp_block_size {lc} and "
                         f"slc_block_size {ls}")
    num_slc = -(-seq_len // ls)
    # The most forced blocks any query can have is min(3, Jn); they must fit in n.
    if n < min(3, num_slc):
        raise ValueError(f"slc_top_n={n} cannot hold the forced blocks (need "
                         f">= {min(3, num_slc)} for T={seq_len})")
    if scale is None:
        scale = 1.0 / math.sqrt(dim_k)
    group = num_q // num_kv

    # --- compressed keys and values ---
    if cmp_kind not in _KINDS:
        raise ValueError(f"unknown compression kind {cmp_kind!r}, expected one of {_KINDS}")
    cmp_params = {} if cmp_params is None else cmp_params
    if cmp_kind != "mean" and not {"k", "v"} <= set(cmp_params):
        raise ValueError(f'cmp_kind {cmp_kind!r} needs cmp_params {{"k": ..., "v": ...}}')
    params_k, params_v = cmp_params.get("k", {}), cmp_params.get("v", {})
    k_cmp = compress_oracle(k, params_k, kind=cmp_kind, block_size=lc, stride=dc)
    v_cmp = compress_oracle(v, params_v, kind=cmp_kind, block_size=lc, stride=dc)
    num_cmp = k_cmp.shape[1]

    # --- compressed branch ---
    o_cmp = np.zeros((bsz, seq_len, num_q, dim_v), dtype=np.float64)
    lse_cmp = np.full((bsz, seq_len, num_q), -np.inf, dtype=np.float64)
    p_cmp = np.zeros((bsz, seq_len, num_q, num_cmp), dtype=np.float64)
    for b in range(bsz):
        for t in range(seq_len):
            # A compressed token is visible once its whole block lies in the past.
            visible = [i for i in range(num_cmp) if i * dc + lc - 1 <= t]
            for h in range(num_q):
                g = h // group
                keys = np.array([k_cmp[b, i, g] for i in visible]).reshape(-1, dim_k)
                vals = np.array([v_cmp[b, i, g] for i in visible]).reshape(-1, dim_v)
                out, lse, probs = _attend(q[b, t, h], keys, vals, scale)
                o_cmp[b, t, h] = out
                lse_cmp[b, t, h] = lse
                for pos, i in enumerate(visible):
                    p_cmp[b, t, h, i] = probs[pos]

    # --- selection scores and top-n ---
    scores = selection_scores_oracle(p_cmp, num_kv_heads=num_kv, cmp_block_size=lc,
                                     cmp_stride=dc, slc_block_size=ls)
    if indices is None:
        indices = top_n_oracle(scores, slc_block_size=ls, slc_top_n=n)
    else:
        indices = np.asarray(indices).astype(np.int64)
        if indices.shape != (bsz, seq_len, num_kv, n):
            raise ValueError(f"indices must be {(bsz, seq_len, num_kv, n)}, "
                             f"got {indices.shape}")

    # --- selected branch ---
    o_slc = np.zeros((bsz, seq_len, num_q, dim_v), dtype=np.float64)
    for b in range(bsz):
        for t in range(seq_len):
            for h in range(num_q):
                g = h // group
                # A set: each block is attended at most once even if listed twice.
                blocks = sorted({int(j) for j in indices[b, t, g] if j >= 0})
                positions = [p for j in blocks for p in range(j * ls, (j + 1) * ls)
                             if p <= t and p < seq_len]
                keys = k_slc[b, positions, g, :].reshape(-1, dim_k)
                vals = v_slc[b, positions, g, :].reshape(-1, dim_v)
                o_slc[b, t, h] = _attend(q[b, t, h], keys, vals, scale)[0]

    # --- sliding-window branch ---
    o_swa = np.zeros((bsz, seq_len, num_q, dim_v), dtype=np.float64)
    for b in range(bsz):
        for t in range(seq_len):
            positions = list(range(max(0, t - w + 1), t + 1))
            for h in range(num_q):
                g = h // group
                keys = k_swa[b, positions, g, :]
                vals = v_swa[b, positions, g, :]
                o_swa[b, t, h] = _attend(q[b, t, h], keys, vals, scale)[0]

    # --- gated sum ---
    out = np.zeros((bsz, seq_len, num_q, dim_v), dtype=np.float64)
    for b in range(bsz):
        for t in range(seq_len):
            for h in range(num_q):
                g_cmp, g_slc, g_swa = gates[b, t, h]
                out[b, t, h] = g_cmp * o_cmp[b, t, h] + g_slc * o_slc[b, t, h] \
                    + g_swa * o_swa[b, t, h]

    return {
        "out": out,
        "o_cmp": o_cmp,
        "o_slc": o_slc,
        "o_swa": o_swa,
        "lse_cmp": lse_cmp,
        "k_cmp": k_cmp,
        "v_cmp": v_cmp,
        "p_cmp": p_cmp,
        "scores": scores,
        "indices": indices,
    }
