"""``benchmarks/profile_sources.py`` on a hand-written HLO excerpt."""

from __future__ import annotations

import json

from benchmarks import profile_sources

HLO = """HloModule jit_step

FileNames
1 "/x/site-packages/jax/_src/numpy/ufuncs.py"
2 "/repo/nsa_jax/model.py"
FunctionNames
1 "multiply"
2 "SwiGLU.__call__"
FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=34 end_line=34 column=1 end_column=2}
StackFrames
1 {file_location_id=2 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=1}

ENTRY %main {
  %loop_multiply_fusion.35 = bf16[4,8]{1,0} fusion(%a, %b), kind=kLoop, calls=%fused, \
metadata={op_name="jit(step)/jvp()/mul" stack_frame_id=2}
}
"""


def test_names_and_sources(tmp_path, capsys):
    assert profile_sources.hlo_name("loop_multiply_fusion_35") == "loop_multiply_fusion.35"
    assert profile_sources.hlo_name("nsa_slc_fwd") == "nsa_slc_fwd"
    tables = profile_sources._tables(HLO.split("\n"))
    # frame 2 (jax's multiply) is left out; its parent, frame 1, is the project's line
    assert profile_sources.source_stack(2, tables) == ["nsa_jax/model.py:34:SwiGLU.__call__"]
    (tmp_path / "h.txt").write_text(HLO)
    prof = {"targets": {"t": {"kernels": [
        {"kernel": "nsa_slc_fwd", "per_call": 2.0, "us_per_call": 9.0},
        {"kernel": "loop_multiply_fusion_35", "per_call": 3.0, "us_per_call": 5.0}]}}}
    (tmp_path / "p.json").write_text(json.dumps(prof))
    profile_sources.main([str(tmp_path / "h.txt"), str(tmp_path / "p.json"), "t"])
    out = capsys.readouterr().out
    assert "loop_multiply_fusion_35" in out and "bf16[4,8]" in out and "jvp()/mul" in out
    assert "nsa_jax/model.py:34:SwiGLU.__call__" in out and "nsa_slc_fwd" not in out
