"""The NNX layer, its Linen bridge and NSATransformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax import (
    ModelConfig,
    NativeSparseAttention,
    NativeSparseAttentionLinen,
    NSAConfig,
    NSATransformer,
    nsa_attention,
)
from nsa_jax.rope import apply_rope

SMALL = NSAConfig(cmp_block_size=8, cmp_stride=4, slc_block_size=16, slc_top_n=4, window_size=16)
# Jitted calls: one compile per shape instead of op-by-op dispatch (several times faster on CPU).
apply = nnx.jit(lambda module, *args: module(*args))


def grad_of(loss):
    return nnx.jit(nnx.grad(loss))


MODEL = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_hidden=64, nsa=SMALL)


@pytest.mark.parametrize("kv_mode", ["separate", "shared"])
@pytest.mark.parametrize("kind", ["mlp", "mean", "linear"])
def test_layer_runs_and_every_parameter_gets_gradient(kv_mode, kind):
    cfg = SMALL.replace(kv_mode=kv_mode, cmp_kind=kind)
    layer = NativeSparseAttention(32, 4, 2, 8, v_head_dim=12, config=cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 50, 32))
    y = apply(layer, x)
    assert y.shape == (2, 50, 32) and np.isfinite(np.asarray(y)).all()
    expected_kv = (3 if kv_mode == "separate" else 1) * 2 * (8 + 12)
    assert layer.kv_proj.kernel[...].shape == (32, expected_kv)

    grads = grad_of(lambda m: jnp.mean(m(x) ** 2))(layer)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
        name = jax.tree_util.keystr(path)
        if name.endswith("k_b2']") or "k_b2" in name:
            continue  # softmax is shift-invariant: a bias on every compressed key has no gradient
        assert float(jnp.linalg.norm(g)) > 0, f"no gradient reaches {name}"


def test_layer_matches_functional_nsa():
    """The layer is projections + RoPE + gates around nsa_attention, nothing hidden."""
    layer = NativeSparseAttention(32, 4, 2, 8, config=SMALL, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, 40, 32))
    pos = jnp.arange(40)[None]
    q = apply_rope(layer.q_proj(x).reshape(1, 40, 4, 8), pos)
    kv = layer.kv_proj(x).reshape(1, 40, 3, 2, 16)
    ks = [apply_rope(kv[:, :, i, :, :8], pos) for i in range(3)]
    vs = [kv[:, :, i, :, 8:] for i in range(3)]
    gates = jax.nn.sigmoid(layer.gate_proj(x)).reshape(1, 40, 4, 3)
    o = nsa_attention(q, ks[0], vs[0], gates, layer.compressor.params(), config=SMALL,
                      k_slc=ks[1], v_slc=vs[1], k_swa=ks[2], v_swa=vs[2])
    expected = layer.o_proj(o.reshape(1, 40, 32))
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_linen_bridge_init_apply_and_grad():
    module = NativeSparseAttentionLinen(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                        config=SMALL)
    x = jax.random.normal(jax.random.key(3), (2, 33, 32))
    variables = module.init(jax.random.key(0), x)
    y = module.apply(variables, x)
    assert y.shape == (2, 33, 32)
    grads = jax.grad(lambda v: jnp.sum(module.apply(v, x) ** 2))(variables)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # Same parameters, same output: apply is a pure function of the variables.
    np.testing.assert_array_equal(module.apply(variables, x), y)


@pytest.mark.parametrize("attention", ["nsa", "full", "window"])
def test_transformer_forward_backward(attention):
    cfg = MODEL.replace(attention=attention)
    model = NSATransformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 70), 0, cfg.vocab_size)
    logits = apply(model, tokens)
    assert logits.shape == (2, 70, cfg.vocab_size) and logits.dtype == jnp.float32

    def loss(m):
        lp = jax.nn.log_softmax(m(tokens[:, :-1]))
        return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(nnx.state(grads)))


@pytest.mark.parametrize("attention", ["nsa", "full", "window"])
def test_transformer_is_causal(attention):
    model = NSATransformer(MODEL.replace(attention=attention), rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(4), (1, 60), 0, 259)
    changed = tokens.at[:, 41:].set((tokens[:, 41:] + 7) % 259)
    a, b = np.asarray(apply(model, tokens)), np.asarray(apply(model, changed))
    np.testing.assert_allclose(a[:, :41], b[:, :41], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 41:], b[:, 41:])


def test_remat_and_bf16_compute():
    tokens = jax.random.randint(jax.random.key(5), (2, 40), 0, 259)
    base = NSATransformer(MODEL, rngs=nnx.Rngs(0))
    remat = NSATransformer(MODEL.replace(remat=True), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(apply(base, tokens), apply(remat, tokens), rtol=1e-5, atol=1e-5)
    g1 = grad_of(lambda m: jnp.mean(m(tokens)))(base)
    g2 = grad_of(lambda m: jnp.mean(m(tokens)))(remat)
    for a, b in zip(jax.tree.leaves(nnx.state(g1)), jax.tree.leaves(nnx.state(g2)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    bf16 = NSATransformer(MODEL.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    out = apply(bf16, tokens)
    params = jax.tree.leaves(nnx.state(bf16, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params), "master weights stay f32"
    ref = np.asarray(apply(base, tokens))
    rel = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
    assert rel < 5e-2, f"bf16 compute drifted {rel:.3e} from f32"


def _count_primitive(jaxpr, name: str) -> int:
    """Equations of primitive ``name`` in a jaxpr, nested jaxprs (remat, scan, jit) included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    count += _count_primitive(sub, name)
    return count


def test_remat_keeps_the_selection():
    """A rematerialised NSA block saves its selected blocks: the backward pass reruns the
    block's other computations but not the top-n (one ``top_k`` per layer, as without remat;
    the checkpoint policy saving nothing would give two)."""
    tokens = jax.random.randint(jax.random.key(5), (1, 40), 0, 259)

    def top_ks(cfg):
        model = NSATransformer(cfg, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def grads(params, t):
            return jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(t)))(params)

        return _count_primitive(jax.make_jaxpr(grads)(params, tokens).jaxpr, "top_k")

    layers = MODEL.num_layers
    assert top_ks(MODEL) == layers
    assert top_ks(MODEL.replace(remat=True)) == layers
    assert top_ks(MODEL.replace(remat=True, remat_policy="selection")) == layers
    assert top_ks(MODEL.replace(remat=True, remat_policy="nothing")) == 2 * layers


@pytest.mark.parametrize("attention", ["nsa", "full", "window"])
def test_remat_keeps_the_attention_output(attention):
    """A rematerialised block keeps its attention output (the output projection's input, which
    that projection's weight gradient reads), for every attention kind alike: the backward
    pass does not recompute NSA's gated sum for it. The residuals' names say so."""
    from jax._src.ad_checkpoint import saved_residuals

    from nsa_jax.ops import ATTENTION_OUT_NAME

    cfg = MODEL.replace(remat=True, attention=attention)
    tokens = jax.random.randint(jax.random.key(5), (1, 40), 0, 259)
    graphdef, params, rest = nnx.split(NSATransformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    res = saved_residuals(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens)), params)
    named = [aval.shape for aval, src in res if f"named '{ATTENTION_OUT_NAME}'" in src]
    n, dv = cfg.num_heads, cfg.value_dim
    assert named == [(1, 40, n, dv)] * cfg.num_layers, (named, [src for _, src in res])
    lean = cfg.replace(remat_policy="selection")
    graphdef, params, rest = nnx.split(NSATransformer(lean, rngs=nnx.Rngs(0)), nnx.Param, ...)
    res = saved_residuals(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens)), params)
    assert not [src for _, src in res if ATTENTION_OUT_NAME in src]


def test_remat_keeps_the_compressed_tokens_and_gates():
    """The default remat policy keeps phi's outputs (the compressed keys and values), the MLP
    phi's hidden pre-activation and the gates, so the backward pass reruns neither phi's
    first matmul nor the gate projection; the selection-only policy keeps none of them.
    Gradients are those of the block without remat."""
    from jax._src.ad_checkpoint import saved_residuals

    from nsa_jax.compression import PHI_HIDDEN_NAME
    from nsa_jax.ops import COMPRESSED_NAME, GATES_NAME

    cfg = MODEL.replace(remat=True, attention="nsa")
    assert cfg.nsa.cmp_kind == "mlp"
    tokens = jax.random.randint(jax.random.key(5), (1, 40), 0, 259)
    nsa = cfg.nsa
    c = (40 - nsa.cmp_block_size) // nsa.cmp_stride + 1
    kh, dk, dv = cfg.num_kv_heads, cfg.head_dim, cfg.value_dim

    def residuals_and_grads(config):
        graphdef, params, rest = nnx.split(NSATransformer(config, rngs=nnx.Rngs(0)),
                                           nnx.Param, ...)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens))  # noqa: E731
        return saved_residuals(loss, params), jax.grad(loss)(params)

    res, grads = residuals_and_grads(cfg)
    cmp_shapes = sorted(aval.shape for aval, src in res if f"named '{COMPRESSED_NAME}'" in src)
    assert cmp_shapes == sorted([(1, c, kh, dk), (1, c, kh, dv)] * cfg.num_layers), cmp_shapes
    hidden = [aval.shape for aval, src in res if f"named '{PHI_HIDDEN_NAME}'" in src]
    assert len(hidden) == 2 * cfg.num_layers and all(s[:3] == (1, c, kh) for s in hidden)
    gates = [aval.shape for aval, src in res if f"named '{GATES_NAME}'" in src]
    assert gates == [(1, 40, cfg.num_heads, 3)] * cfg.num_layers, gates
    lean, lean_grads = residuals_and_grads(cfg.replace(remat_policy="selection"))
    assert not [src for _, src in lean
                if COMPRESSED_NAME in src or PHI_HIDDEN_NAME in src or GATES_NAME in src]
    _, plain = residuals_and_grads(cfg.replace(remat=False))
    for a, b in ((grads, plain), (lean_grads, plain)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_remat_keeps_the_cudnn_query_rows():
    """The cuDNN compressed path's shifted copy of the queries is kept by the default policy
    (checked on CPU with a jnp causal attention in cuDNN's place), not by the lean one."""
    from jax._src.ad_checkpoint import saved_residuals

    from nsa_jax.ops import REMAT_POLICIES
    from pallas_kernels.common import QUERY_ROWS_NAME
    from pallas_kernels.compressed.gpu import residue_causal_rows

    def attend(q, k, v, scale):  # causal, GQA, with the log-sum-exp: cuDNN's contract
        g = q.shape[2] // k.shape[2]
        kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        s = jnp.einsum("bqnd,bknd->bnqk", q, kk) * scale
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1)
        o = jnp.einsum("bnqk,bknd->bqnd", jnp.exp(s - lse[..., None]), vv)
        return o, jnp.swapaxes(lse, 1, 2)

    t, l, d = 100, 8, 4
    q = jax.random.normal(jax.random.key(0), (1, t, 4, 8))
    kc = jax.random.normal(jax.random.key(1), (1, (t - l) // d + 1, 2, 8))

    def loss(q, policy):
        f = jax.checkpoint(lambda q: residue_causal_rows(
            q, kc, kc, block_size=l, stride=d, scale=0.3, attend=attend)[0].sum(),
            policy=REMAT_POLICIES[policy])
        return f(q)

    res = saved_residuals(lambda q: loss(q, "attention_out"), q)
    assert [src for _, src in res if f"named '{QUERY_ROWS_NAME}'" in src]
    res = saved_residuals(lambda q: loss(q, "selection"), q)
    assert not [src for _, src in res if QUERY_ROWS_NAME in src]


def test_token_errors():
    model = NSATransformer(MODEL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\]"):
        model(jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match=r"tokens must be integers"):
        model(jnp.zeros((1, 3), jnp.float32))
