"""``benchmarks/decode_ab.py`` end to end on CPU (interpret mode; the times mean nothing)."""

from __future__ import annotations

import json
import warnings

import pytest

from benchmarks import decode_ab
from pallas_kernels.decode import gpu


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ab_of_two_copies_checks_and_times_each(tmp_path, capsys):
    warnings.simplefilter("ignore", DeprecationWarning)
    out = tmp_path / "ab"
    rc = decode_ab.main(["--old", gpu.__file__, "--shapes", "256:1", "--steps", "1",
                         "--rounds", "2", "--runs", "1", "--profile-ctx", "0",
                         "--check-ctx", "256", "--interpret", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count("-> OK") == 4  # two copies, float32 and bfloat16
    res = json.loads((out / "ab.json").read_text())
    assert res["checks_ok"] is True
    (row,) = res["rows"]
    assert (row["context"], row["B"]) == (256, 1)
    assert set(row["us"]) >= {"old", "new", "dense_xla"}
    assert all(v > 0 for v in row["us"].values())
    assert row["speedup_new"] == pytest.approx(row["dense_best_us"] / row["us"]["new"])
