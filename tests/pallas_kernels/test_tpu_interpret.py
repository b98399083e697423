"""The Mosaic (TPU) kernels, run on CPU in Pallas' TPU interpret mode.

Interpret mode simulates TPU memory spaces, DMAs and semaphores. Every kernel here runs with
``detect_races=True`` (checked after each test), ``uninitialized_memory="nan"`` (a read of
memory no one wrote poisons the result) and a ``random_seed`` that draws the order in which the
grid's parallel dimensions are visited. One simulated core: with two, the interpreter runs each
core's steps as concurrent XLA executions whose callbacks dispatch more XLA work, which can
exhaust a 2-core host's thread pool and hang. The shared suite compares
outputs, log-sum-exps and gradients with the pure-jnp twins; the tests below add several seeds,
schedules spanning several key blocks, and selections whose index tables are split over several
calls.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from nsa_jax import registry
from pallas_kernels import tpu_backend
from pallas_kernels.compressed import tpu as cmp_tpu
from pallas_kernels.selected import tpu as slc_tpu
from pallas_kernels.sliding_window import tpu as swa_tpu
from tests.pallas_kernels.suite import Case, KernelSuite, random_indices
from tests.tolerances import assert_close


def interpret_params(seed: int) -> pltpu.InterpretParams:
    return pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan",
                                 random_seed=seed)


# Head dims 128 or padded to it, T off every tile multiple; query tiles are 128 rows
# (tq = 128 / G tokens), so each case spans several tiles with a partial last one.
TPU_CASES = (
    Case(b=1, t=200, n=2, kh=2, dk=128, dv=128, window_size=40),  # G = 1: 2 tiles, 2 key blocks
    Case(b=2, t=100, n=8, kh=2, dk=64, dv=128),  # G = 4: 4 tiles, Dk != Dv (padded), batch 2
    Case(b=1, t=90, n=16, kh=1, dk=128, dv=128, top_n=5),  # G = 16 (MQA): 12 tiles of 8 tokens
    Case(b=1, t=12, n=4, kh=1, dk=16, dv=16),  # T < l: the compressed branch is empty
)


@pytest.fixture(autouse=True)
def _no_races():
    """Fresh interpreter state per test; fails the test if any kernel it ran had a race."""
    pltpu.reset_tpu_interpret_mode_state()
    yield
    state = interpret_pallas_call.races
    found = state is not None and state.races_found
    pltpu.reset_tpu_interpret_mode_state()
    assert not found, "the TPU interpreter detected a race"


def _ran_race_detection():
    assert interpret_pallas_call.races is not None, "no kernel ran under race detection"


class TestMosaicInterpret(KernelSuite):
    """The shared suite on the Mosaic backend (``select_blocks`` is left to the reference)."""

    cases = TPU_CASES

    @staticmethod
    def make_backend() -> registry.Backend:
        return tpu_backend.make_backend(interpret=interpret_params(0))


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _qkv(case: Case, dtype, seed: int, s_len: int | None = None):
    ks = jax.random.split(jax.random.key(seed), 4)
    s_len = s_len or case.t
    q = _normal(ks[0], (case.b, case.t, case.n, case.dk), dtype)
    k = _normal(ks[1], (case.b, s_len, case.kh, case.dk), dtype)
    v = _normal(ks[2], (case.b, s_len, case.kh, case.dv), dtype)
    return q, k, v, ks[3]


def _check_vjp(fn, ref, args, dtype, key, what):
    """Outputs, log-sum-exps and the gradients of every input under random cotangents for both
    outputs (the log-sum-exp's cotangent too, where it is finite)."""
    (o, lse), vjp = jax.vjp(fn, *args)
    (o_ref, lse_ref), vjp_ref = jax.vjp(ref, *args)
    fin = np.isfinite(np.asarray(lse_ref))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin, err_msg=what)
    assert_close(o, o_ref, dtype, f"{what} output")
    assert_close(np.asarray(lse)[fin], np.asarray(lse_ref)[fin], dtype, f"{what} lse")
    k1, k2 = jax.random.split(key)
    ct = (_normal(k1, o.shape, o.dtype),
          jnp.where(jnp.asarray(fin), jax.random.normal(k2, lse.shape), 0.0))
    for i, (g, g_ref) in enumerate(zip(vjp(ct), vjp_ref(ct), strict=True)):
        assert not np.isnan(np.asarray(g, np.float32)).any(), f"{what}: NaN in grad {i}"
        assert_close(g, g_ref, dtype, f"{what} grad of arg {i}")
    _ran_race_detection()


@pytest.mark.parametrize("seed", [1, 2])
def test_all_branches_other_seeds(seed):
    """Each kernel, forward and backward, under other seeds (order of the parallel steps); the
    second seed uses G = 3, whose 384-row tiles take the non-power-of-two row-to-token path."""
    case = (Case(b=1, t=150, n=8, kh=2, dk=128, dv=64, window_size=48),
            Case(b=1, t=150, n=6, kh=2, dk=128, dv=64, window_size=48))[seed - 1]
    ip = interpret_params(seed)
    dtype = (jnp.float32, jnp.bfloat16)[seed % 2]
    ref = registry.REFERENCE
    q, k, v, key = _qkv(case, dtype, seed)
    kw = dict(window_size=case.window_size, scale=None)
    _check_vjp(lambda *a: swa_tpu.sliding_window_attention(*a, **kw, interpret=ip),
               lambda *a: ref.sliding_window_attention(*a, **kw), (q, k, v), dtype, key,
               f"window seed {seed}")
    c = case.num_cmp
    kw = dict(block_size=case.cmp_block_size, stride=case.cmp_stride, scale=None)
    _check_vjp(lambda *a: cmp_tpu.compressed_attention(*a, **kw, interpret=ip),
               lambda *a: ref.compressed_attention(*a, **kw), (q, k[:, :c], v[:, :c]), dtype,
               key, f"compressed seed {seed}")
    idx = jnp.asarray(random_indices(np.random.default_rng(seed), case))
    kw = dict(block_size=case.slc_block_size, scale=None)
    _check_vjp(lambda *a: slc_tpu.selected_attention(*a, idx, **kw, interpret=ip),
               lambda *a: ref.selected_attention(*a, idx, **kw), (q, k, v), dtype, key,
               f"selected seed {seed}")


def test_several_key_blocks_per_tile():
    """Windows and compressed prefixes spanning several 128-key blocks, with skipped steps."""
    case = Case(b=1, t=1100, n=1, kh=1, dk=128, dv=128, window_size=300)
    ip = interpret_params(3)
    ref = registry.REFERENCE
    q, k, v, key = _qkv(case, jnp.float32, 3)
    kw = dict(window_size=case.window_size, scale=None)
    _check_vjp(lambda *a: swa_tpu.sliding_window_attention(*a, **kw, interpret=ip),
               lambda *a: ref.sliding_window_attention(*a, **kw), (q, k, v), jnp.float32, key,
               "window w=300 over 9 key blocks")
    c = case.num_cmp  # 136 compressed tokens: 2 key blocks
    kw = dict(block_size=case.cmp_block_size, stride=case.cmp_stride, scale=None)
    _check_vjp(lambda *a: cmp_tpu.compressed_attention(*a, **kw, interpret=ip),
               lambda *a: ref.compressed_attention(*a, **kw), (q, k[:, :c], v[:, :c]),
               jnp.float32, key, "compressed over 2 key blocks")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_selected_tables_split_over_calls(dtype):
    """A scalar-memory budget so small that the forward and dQ run as several calls over query
    tiles and dK/dV as several calls adding into aliased accumulators; keys longer than queries
    (``S > T``); rows, and a whole tile, whose every slot is ``-1``."""
    case = Case(b=2, t=70, n=8, kh=2, dk=128, dv=128, slc_block_size=16, top_n=4)
    q, k, v, key = _qkv(case, dtype, 4, s_len=90)
    idx = random_indices(np.random.default_rng(4), case)
    # Queries that select nothing (output 0, lse -inf, no NaN), filling all of tile 1 (tokens
    # 32..63) so that its union is empty.
    idx[0, 30:64, 1] = -1
    idx = jnp.asarray(idx)
    bs = slc_tpu.BlockSizes(smem_table_bytes=400)
    ip = interpret_params(4)
    kw = dict(block_size=case.slc_block_size, scale=None)
    _check_vjp(lambda *a: slc_tpu.selected_attention(*a, idx, **kw, block_sizes=bs,
                                                     interpret=ip),
               lambda *a: registry.REFERENCE.selected_attention(*a, idx, **kw), (q, k, v),
               dtype, key, "selected with split tables")


def test_selected_steps_follow_the_unions():
    """The dynamic grid bound: when every tile's union holds at most 2 blocks, the forward runs 2
    key steps per tile, not the table width ``U``."""
    case = Case(b=1, t=90, n=16, kh=1, dk=128, dv=128, slc_block_size=16, top_n=4)
    q, k, v, _ = _qkv(case, jnp.float32, 6)
    idx = np.full((1, case.t, 1, case.top_n), -1, np.int32)
    cur = np.arange(case.t) // case.slc_block_size
    idx[0, :, 0, 0] = 0
    idx[0, :, 0, 1] = np.where(cur > 0, cur, -1)  # block 0 and the current block
    idx = jnp.asarray(idx)
    points = []

    def record(token, grid_point, core):
        points.append(tuple(int(x) for x in grid_point))
        return token

    ip = dataclasses.replace(interpret_params(6), grid_point_recorder=record)
    o, lse = slc_tpu.selected_attention(q, k, v, idx, block_size=16, interpret=ip)
    o_ref, lse_ref = registry.REFERENCE.selected_attention(q, k, v, idx, block_size=16)
    assert_close(o, o_ref, jnp.float32, "selected output")
    assert_close(lse, lse_ref, jnp.float32, "selected lse")
    tiles = -(-case.t // 8)  # G = 16: 8 tokens per tile; U would be min(8 * 4, 6) = 6
    assert len(points) == tiles * 2, (len(points), tiles)
    assert max(p[3] for p in points) == 1


def test_selected_tables():
    """The union and inverse-index tables against a direct construction."""
    rng = np.random.default_rng(5)
    case = Case(b=2, t=37, n=4, kh=3, dk=8, dv=8, slc_block_size=8, top_n=3)
    idx = random_indices(rng, case)
    tq, nb = 8, 5
    union, count = slc_tpu.tile_unions(jnp.asarray(idx), tq, nb)
    union, count = np.asarray(union), np.asarray(count)
    nt = union.shape[2]
    pairs = []
    for b in range(case.b):
        for h in range(case.kh):
            for i in range(nt):
                rows = idx[b, i * tq:(i + 1) * tq, h].ravel()
                want = sorted({int(j) for j in rows if j >= 0})
                assert count[b, h, i] == len(want)
                assert list(union[b, h, i, :len(want)]) == want
                assert (union[b, h, i, len(want):] == (want[-1] if want else 0)).all()
                pairs += [(b, h, j, i) for j in want]
    blocks, tiles, valid, n_real = (np.asarray(x) for x in slc_tpu.block_pairs(
        jnp.asarray(union), jnp.asarray(count), nt, nt * nb + 3))
    for b in range(case.b):
        for h in range(case.kh):
            want = sorted((j, i) for bb, hh, j, i in pairs if (bb, hh) == (b, h))
            n = len(want)
            assert valid[b, h].sum() == n == n_real[b, h] and valid[b, h, :n].all()
            assert list(zip(blocks[b, h, :n], tiles[b, h, :n], strict=True)) == want
            assert (blocks[b, h, n:] == want[-1][0]).all()  # padding repeats: no re-fetch
            assert (tiles[b, h, n:] == want[-1][1]).all()


def test_unsupported_block_size_falls_back():
    """A selection block below the sublane tile raises NotImplementedError, which the registry
    turns into a fallback to the reference."""
    q = jnp.zeros((1, 20, 2, 16), jnp.bfloat16)
    k = jnp.zeros((1, 20, 2, 16), jnp.bfloat16)
    idx = jnp.zeros((1, 20, 2, 2), jnp.int32)
    with pytest.raises(NotImplementedError):
        slc_tpu.selected_attention(q, k, k, idx, block_size=8, interpret=interpret_params(0))
    chain = (tpu_backend.make_backend(interpret=interpret_params(0)), registry.REFERENCE)
    o, _ = registry.call_stage(chain, "selected_attention", q, k, k, idx, block_size=8,
                               scale=None)
    assert o.shape == (1, 20, 2, 16)


def test_backend_shape():
    assert tpu_backend.BACKEND.name == "pallas_mosaic"
    assert tpu_backend.BACKEND.platforms == ("tpu",)
    assert tpu_backend.BACKEND.select_blocks is None  # the XLA reference selects
    assert registry.get_backend("pallas_mosaic").name == "pallas_mosaic"


def test_race_detector_is_live():
    """The interpreter settings above do catch a race (a read of a buffer a DMA is writing), so
    the absence of reports elsewhere means something."""

    def racy(x_hbm, o_ref, buf, sem):
        copy = pltpu.make_async_copy(x_hbm.at[pl.ds(0, 8)], buf, sem.at[0])
        copy.start()
        o_ref[...] = buf[...]
        copy.wait()

    f = pl.pallas_call(
        racy, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec(memory_space=pltpu.VMEM),
        scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32), pltpu.SemaphoreType.DMA((1,))],
        interpret=interpret_params(0))
    jax.block_until_ready(f(jnp.ones((16, 128), jnp.float32)))
    assert interpret_pallas_call.races.races_found
    pltpu.reset_tpu_interpret_mode_state()
