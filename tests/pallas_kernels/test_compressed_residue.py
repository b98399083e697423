"""The compressed branch as causal attention over residue classes (the cuDNN path's layout),
checked on CPU with a plain causal attention in place of cuDNN: outputs, lse and gradients
against the compressed reference, for several block geometries (``l - 1`` a multiple of ``d``
or not, ``l = d``, ``d = 1``), any T (multiples of ``d`` or not, shorter than ``l``), and G in
{1, 3, 4, 16}."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.compressed import gpu as compressed_gpu
from pallas_kernels.compressed import reference as compressed_ref
from tests.pallas_kernels.suite import _normal
from tests.tolerances import assert_close


def _causal(q, k, v, scale):
    """Causal attention (row ``i`` sees keys ``j <= i``) with grouped heads and its lse."""
    b, length, n, _ = q.shape
    kh = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, length, kh, n // kh, -1)
    s = jnp.einsum("bikgd,bjkd->bkgij", qg, k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    mask = jnp.tril(jnp.ones((length, length), bool))
    s = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # [B, K, G, L]
    o = jnp.einsum("bkgij,bjkd->bikgd", jnp.exp(s - lse[..., None]), v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, length, n)
    return o.reshape(b, length, n, -1).astype(q.dtype), lse


@pytest.mark.parametrize("l,d", [(32, 16), (16, 16), (8, 4), (12, 4), (9, 4), (5, 2), (1, 1),
                                 (3, 1)])
def test_one_causal_shift_for_every_residue(l, d):  # noqa: E741
    """Query ``t = (l - 1) + u*d + r`` sees exactly the tokens ``i <= u`` for every residue
    ``r`` (the visibility rule ``i*d + l - 1 <= t`` checked by enumeration)."""
    for t in range(l - 1, l - 1 + 6 * d):
        u = (t - (l - 1)) // d
        visible = [i for i in range(t + 1) if i * d + l - 1 <= t]
        assert visible == list(range(u + 1)), (l, d, t)
    assert not [i for i in range(l) if i * d + l - 1 <= l - 2]  # earlier queries see none


CASES = [
    # (B, T, N, K, Dk, Dv, l, d)
    (1, 160, 16, 1, 32, 32, 32, 16),  # the paper's l, d; G = 16; T a multiple of d
    (2, 150, 8, 2, 16, 24, 32, 16),  # G = 4, T off d, Dk != Dv
    (1, 77, 4, 4, 16, 16, 16, 16),  # G = 1, l = d
    (1, 45, 6, 2, 8, 8, 12, 4),  # G = 3, l = 3d
    (1, 50, 4, 2, 8, 8, 9, 4),  # l - 1 a multiple of d
    (1, 20, 4, 1, 8, 8, 32, 16),  # T < l: no compressed token
    (1, 33, 4, 2, 8, 8, 32, 16),  # one compressed token, visible to the last two queries
    (1, 47, 4, 1, 8, 8, 32, 16),  # T - (l - 1) a multiple of d: the last row full
    (1, 40, 4, 2, 8, 8, 1, 1),  # l = d = 1: every query its own row
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_residue_layout_matches_reference(case, dtype):
    b, t, n, kh, dk, dv, l, d = case  # noqa: E741
    c = max(0, (t - l) // d + 1)
    ks = jax.random.split(jax.random.key(t + 7 * n), 4)
    q = _normal(ks[0], (b, t, n, dk), dtype)
    k_cmp = _normal(ks[1], (b, c, kh, dk), dtype)
    v_cmp = _normal(ks[2], (b, c, kh, dv), dtype)
    ct = _normal(ks[3], (b, t, n, dv), jnp.float32)
    scale = dk ** -0.5
    fn = functools.partial(compressed_gpu.residue_causal_attention, block_size=l, stride=d,
                           scale=scale, attend=_causal, length_multiple=8)
    ref = functools.partial(compressed_ref.compressed_attention, block_size=l, stride=d,
                            scale=scale)

    def run(f):
        def loss(q, k, v):
            o, lse = f(q, k, v)
            return jnp.sum(o.astype(jnp.float32) * ct), (o, lse)
        (_, (o, lse)), g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
            q, k_cmp, v_cmp)
        return o, lse, g

    o, lse, grads = run(fn)
    o_r, lse_r, grads_r = run(ref)
    what = f"residue layout {case} {jnp.dtype(dtype)}"
    assert o.shape == o_r.shape and o.dtype == o_r.dtype and lse.shape == lse_r.shape
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_r), err_msg=what)
    empty = ~np.isfinite(np.asarray(lse_r))
    assert not np.asarray(o, np.float32)[empty].any(), what + ": rows that see nothing are 0"
    fin = ~empty
    assert_close(np.asarray(lse)[fin], np.asarray(lse_r)[fin], dtype, what + " lse")
    assert_close(o, o_r, dtype, what + " output")
    if c:
        for name, g, g_r in zip("qkv", grads, grads_r, strict=True):
            assert_close(g, g_r, dtype, f"{what} d{name}")
    for g in grads:
        assert np.isfinite(np.asarray(g, np.float32)).all(), what + ": finite gradients"


def test_cudnn_path_falls_back_off_gpu():
    """Interpreted (or unsupported) inputs take the banded kernels: the same results."""
    ks = jax.random.split(jax.random.key(0), 3)
    q = _normal(ks[0], (1, 70, 4, 16), jnp.float32)
    k_cmp = _normal(ks[1], (1, 3, 2, 16), jnp.float32)
    v_cmp = _normal(ks[2], (1, 3, 2, 16), jnp.float32)
    kw = dict(block_size=32, stride=16)
    o, lse = compressed_gpu.compressed_attention_cudnn(q, k_cmp, v_cmp, interpret=True, **kw)
    o_r, lse_r = compressed_ref.compressed_attention(q, k_cmp, v_cmp, **kw)
    assert_close(o, o_r, jnp.float32, "fallback output")
    fin = np.isfinite(np.asarray(lse_r))
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    assert_close(np.asarray(lse)[fin], np.asarray(lse_r)[fin], jnp.float32, "fallback lse")
