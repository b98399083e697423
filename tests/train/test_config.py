"""Presets, the override path and config validation."""

from __future__ import annotations

import dataclasses

import pytest

import configs
from train import cli
from train.config import MeshConfig, TrainConfig, apply_overrides, from_dict


@pytest.mark.parametrize("name", sorted(configs.PRESETS))
def test_presets_build_and_round_trip(name):
    cfg = configs.get_config(name)
    assert cfg.name == name
    assert from_dict(TrainConfig, cfg.to_dict()) == cfg


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*tiny"):
        configs.get_config("huge")


def test_overrides_parse_by_type():
    cfg = apply_overrides(configs.get_config("tiny"), [
        "model.attention=full", "train.steps=200", "optim.learning_rate=1e-3",
        "checkpoint.async_save=false", "model.nsa.window_size=32", "data.max_files=none",
        "data.tasks=passkey,copy", "data.task_fraction=0.5", "model.nsa.cmp_kind=mean",
        "mesh.data=-1"])
    assert cfg.model.attention == "full" and cfg.steps == 200
    assert cfg.optim.learning_rate == 1e-3 and cfg.checkpoint.async_save is False
    assert cfg.model.nsa.window_size == 32 and cfg.data.max_files is None
    assert cfg.data.tasks == ("passkey", "copy") and cfg.model.nsa.cmp_kind == "mean"
    assert isinstance(cfg.steps, int) and isinstance(cfg.optim.learning_rate, float)


@pytest.mark.parametrize("override, message", [
    ("model.atention=full", r"unknown config field 'model.atention'.*attention"),
    ("train.stepz=3", r"unknown config field 'train.stepz'"),
    ("modle.d_model=3", r"unknown section 'modle'"),
    ("train.steps=many", r"'many' is not an int"),
    ("checkpoint.async_save=maybe", r"not a bool"),
    ("model.attention=sparse", r"attention='sparse' is not one of"),
    ("model.nsa.cmp_kind=max", r"'max' is not one of"),
    ("model.nsa=3", r"is a section"),
    ("train.steps", r"must look like section.field=value"),
    ("train.batch_size=6", r"batch_size=6 is not divisible by grad_accum=4"),
])
def test_bad_overrides_name_the_problem(override, message):
    base = apply_overrides(configs.get_config("tiny"), ["train.grad_accum=4"]) if (
        "batch_size" in override) else configs.get_config("tiny")
    with pytest.raises(ValueError, match=message):
        apply_overrides(base, [override])


def test_mesh_and_batch_checked_against_devices():
    cfg = configs.get_config("tiny")  # batch 16, 4 query / 2 KV heads
    assert cfg.validate_for_devices(8) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match=r"micro-batch .* 16 rows is not divisible .* 3"):
        dataclasses.replace(cfg, mesh=MeshConfig(data=3)).validate_for_devices(3)
    with pytest.raises(ValueError, match=r"tensor=4 must divide .*num_kv_heads=2"):
        dataclasses.replace(cfg, mesh=MeshConfig(data=2, tensor=4)).validate_for_devices(8)
    with pytest.raises(ValueError, match=r"= 4 devices, but 8 are available"):
        dataclasses.replace(cfg, mesh=MeshConfig(data=2, fsdp=2)).validate_for_devices(8)
    with pytest.raises(ValueError, match=r"do not divide 6 devices"):
        dataclasses.replace(cfg, mesh=MeshConfig(data=-1, tensor=4)).validate_for_devices(6)
    with pytest.raises(ValueError, match=r"only one mesh axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)


def test_cli_rejects_bad_config_before_compiling(capsys):
    assert cli.main(["--config", "tiny", "--set", "model.nope=1"]) == 2
    assert "unknown config field 'model.nope'" in capsys.readouterr().err
    assert cli.main(["--config", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert cli.main(["--config", "tiny", "--set", "mesh.data=1", "--set", "mesh.tensor=7"]) == 2
    assert "tensor=7" in capsys.readouterr().err


def test_cli_print_config_echoes_overrides(capsys):
    assert cli.main(["--config", "small", "--set", "train.steps=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert '"steps": 7' in out and '"name": "small"' in out
