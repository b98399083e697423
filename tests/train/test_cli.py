"""The command line end to end: preset, overrides, training, evaluation, checkpoint, summary."""

from __future__ import annotations

import json
import os

from train import cli

MICRO = ["model.d_model=32", "model.num_layers=1", "model.num_heads=4", "model.num_kv_heads=2",
         "model.head_dim=8", "model.mlp_hidden=64", "model.nsa.cmp_block_size=8",
         "model.nsa.cmp_stride=4", "model.nsa.slc_block_size=8", "model.nsa.slc_top_n=3",
         "model.nsa.window_size=16", "train.seq_len=64", "train.batch_size=8", "train.steps=2",
         "data.max_files=24", "data.max_file_bytes=4096", "eval.every_steps=2",
         "eval.batches=1", "eval.passkey_examples=0", "checkpoint.every_steps=2"]


def test_cli_trains_evaluates_checkpoints_and_summarises(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--config", "tiny", "--no-progress"]
    for item in [*MICRO, f"data.data_dir={tmp_path / 'tfds'}", f"train.output_dir={out}"]:
        args += ["--set", item]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "config tiny:" in text and '"d_model": 32' in text  # the resolved config, echoed
    assert "step 2/2: loss" in text and "eval at step 2: loss" in text
    assert "vs unigram baseline" in text and f"checkpoints: {out}" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_step"] == 2 and set(summary["losses"]) == {"1", "2"}
    assert json.loads((out / "config.json").read_text())["model"]["d_model"] == 32
    assert os.listdir(out / "checkpoints") == ["2"]
    assert cli.main(args) == 0  # again: resumes at the end, nothing to train
    assert "nothing to train" in capsys.readouterr().out
