"""``benchmarks/train.py``'s interleaved timing on CPU: the configurations it builds, the
tables it restores, the records and the Markdown it writes, and its argument errors."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import train as bench
from nsa_jax import config as config_mod
from nsa_jax import ops
from pallas_kernels import tuned_block_sizes


def _run(tmp_path, monkeypatch, *extra):
    out = tmp_path / "train.json"
    argv = ["train.py", "--preset", "tiny", "--seq-lens", "64", "--attentions", "nsa,full",
            "--interleave", "2", "--reps", "1", "--warmup", "0", "--out", str(out), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    return json.loads(out.read_text()), (tmp_path / "train.md").read_text()


def test_interleaved_rounds_variants_and_policies(tmp_path, monkeypatch):
    before = {t: dict(getattr(tuned_block_sizes, t)) for t in ("SELECTED", "SELECTION")}
    policies, names = dict(ops.REMAT_POLICIES), config_mod.REMAT_POLICY_NAMES
    try:
        res, md = _run(tmp_path, monkeypatch, "--set", "model.remat=true",
                       "--remat-policy", "lean=nsa_selection",
                       "--variant", "v=SELECTION.num_stages=2;model.remat_policy=lean")
        assert "lean" in ops.REMAT_POLICIES and "lean" in config_mod.REMAT_POLICY_NAMES
    finally:
        ops.REMAT_POLICIES.clear()
        ops.REMAT_POLICIES.update(policies)
        config_mod.REMAT_POLICY_NAMES = names
    # The variant's tile override was undone once it compiled.
    assert {t: getattr(tuned_block_sizes, t) for t in before} == before
    recs = {r["name"]: r for r in res["records"]}
    assert set(recs) == {"train_nsa", "train_full", "train_v"}
    for r in recs.values():
        assert len(r["rounds_ms"]) == 2 and r["reps"] == 2 and r["ms"] > 0
        assert r["min_ms"] <= r["ms"] <= r["max_ms"]
    full = recs["train_full"]["rounds_ms"]
    for name in ("train_nsa", "train_v"):
        rec = recs[name]
        assert rec["rounds_ratio"] == pytest.approx(
            [f / x for f, x in zip(full, rec["rounds_ms"], strict=True)])
    assert "rounds_ratio" not in recs["train_full"]
    assert recs["train_v"]["tuned"] == {"SELECTION.num_stages": 2}
    assert recs["train_v"]["set"] == ["model.remat_policy=lean"]
    assert res["variants"] == {"v": ["SELECTION.num_stages=2", "model.remat_policy=lean"]}
    assert "train_v at 64" in md and "Interleaved rounds" in md


@pytest.mark.parametrize("extra, message", [
    (["--variant", "v=SELECTED.num_warps=1"], "--variant needs --interleave"),
    (["--interleave", "2", "--variant", "novalue"], "must look like NAME=ITEM"),
    (["--interleave", "2", "--remat-policy", "attention_out=nsa_selection"],
     "must look like NAME=NAME1"),
])
def test_bad_arguments(tmp_path, monkeypatch, extra, message):
    argv = ["train.py", "--preset", "tiny", "--out", str(tmp_path / "t.json"), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=message):
        bench.main()
