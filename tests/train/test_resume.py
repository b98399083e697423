"""Training on one device, checkpoints, exact resume, and a save interrupted mid-way."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.train.helpers import micro_config
from train import loop
from train.config import CheckpointConfig, EvalConfig, TrainConfig, from_dict


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    out = str(tmp_path_factory.mktemp("full"))
    cfg = micro_config(out, data_dir, steps=6,
                       checkpoint=CheckpointConfig(every_steps=3, max_to_keep=2, resume=True),
                       eval=EvalConfig(every_steps=6, batches=1, passkey_examples=0))
    return cfg, loop.run(cfg, progress="none")


def test_loss_falls_and_run_writes_logs(uninterrupted):
    cfg, res = uninterrupted
    losses = [res.losses[s] for s in sorted(res.losses)]
    assert sorted(res.losses) == list(range(1, 7))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert set(res.evals[6]) == {"loss", "bits_per_byte"}
    assert np.isclose(res.evals[6]["bits_per_byte"] * np.log(2), res.evals[6]["loss"], rtol=0.1)
    assert any(f.startswith("events") for f in os.listdir(res.tensorboard_dir))
    assert os.path.exists(os.path.join(res.output_dir, "summary.json"))


def test_checkpoint_holds_state_data_and_config(uninterrupted):
    cfg, res = uninterrupted
    mngr = ocp.CheckpointManager(res.checkpoint_dir)
    assert mngr.all_steps() == [3, 6]  # max_to_keep=2 of saves at 3 and 6
    step_dir = os.path.join(res.checkpoint_dir, "6")
    assert {"config", "data", "state"} <= set(os.listdir(step_dir))
    assert "process_0-of-1.json" in os.listdir(os.path.join(step_dir, "data"))
    saved = mngr.restore(6, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    assert from_dict(TrainConfig, saved) == cfg


def test_resume_continues_exactly(tmp_path, data_dir, uninterrupted):
    cfg_full, full = uninterrupted
    cfg = dataclasses.replace(cfg_full, output_dir=str(tmp_path))
    first = loop.run(cfg, stop_after=3, progress="none")
    assert sorted(first.losses) == [1, 2, 3]
    second = loop.run(cfg, progress="none")  # picks up the step-3 checkpoint
    assert second.first_step == 3 and sorted(second.losses) == [4, 5, 6]
    resumed = first.losses | second.losses
    assert resumed == full.losses  # bit-for-bit: same data, same state, same programs


def test_a_save_killed_midway_loses_nothing_older(tmp_path, data_dir, uninterrupted):
    cfg_full, full = uninterrupted
    cfg = dataclasses.replace(cfg_full, output_dir=str(tmp_path))
    loop.run(cfg, stop_after=3, progress="none")
    ckpt = os.path.join(str(tmp_path), "checkpoints")
    # What a process killed while writing step 6 leaves behind: an unfinished temporary
    # directory with part of the items.
    partial = os.path.join(ckpt, "6.orbax-checkpoint-tmp-1234567890")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "garbage"), "wb") as f:
        f.write(b"\0" * 100)
    assert ocp.CheckpointManager(ckpt).latest_step() == 3
    second = loop.run(cfg, progress="none")
    assert second.first_step == 3
    assert first_equal(second.losses, full.losses)


def first_equal(part: dict, whole: dict) -> bool:
    return all(whole[k] == v for k, v in part.items()) and bool(part)


def test_grad_accumulation_matches_one_big_batch(tmp_path, data_dir, uninterrupted):
    cfg_full, full = uninterrupted
    cfg = dataclasses.replace(cfg_full, output_dir=str(tmp_path), steps=3, grad_accum=2,
                              checkpoint=CheckpointConfig(every_steps=0, resume=False),
                              eval=EvalConfig(every_steps=0, passkey_examples=0))
    res = loop.run(cfg, progress="none", tensorboard=False)
    got = [res.losses[s] for s in (1, 2, 3)]
    want = [full.losses[s] for s in (1, 2, 3)]
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert jax.device_count() >= 1
