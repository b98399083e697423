"""Sharded training on 8 CPU devices (each mesh layout) and on two processes joined by
``jax.distributed``: the losses match one device.

The devices are faked with ``XLA_FLAGS`` in subprocesses, so other tests keep their device
count.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.train.helpers import micro_config
from train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUTS = [[8, 1, 1], [1, 8, 1], [2, 2, 2]]  # [data, fsdp, tensor]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def single_device(tmp_path_factory, data_dir):
    cfg = micro_config(str(tmp_path_factory.mktemp("one")), data_dir, steps=2)
    res = loop.run(cfg, progress="none", tensorboard=False)
    return [res.losses[s] for s in sorted(res.losses)]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _result(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"worker printed no result:\n{stdout[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _worker(out, data_dir, layouts, *extra):
    return [sys.executable, "-m", "tests.train.worker", str(out), data_dir, json.dumps(layouts),
            "--steps", "2",
            *extra]


def test_each_mesh_layout_on_8_devices_matches_one_device(tmp_path, data_dir, single_device):
    proc = subprocess.run(_worker(tmp_path, data_dir, LAYOUTS), env=_env(8), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = _result(proc.stdout)
    assert res["devices"] == 8
    for name, losses in res["losses"].items():
        np.testing.assert_allclose(losses, single_device, rtol=1e-4, err_msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path, data_dir, single_device):
    coordinator = f"127.0.0.1:{_free_port()}"
    layouts = [[2, 2, 1]]  # data over processes and devices, fsdp inside each process
    procs = [subprocess.Popen(
        _worker(tmp_path, data_dir, layouts, "--checkpoint_every", "1", "--coordinator",
                coordinator, "--num-processes", "2", "--process-id", str(i)),
        env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-5000:]
        outs.append(_result(out))
    assert sorted(o["process"] for o in outs) == [0, 1]
    for o in outs:
        assert o["devices"] == 4
        np.testing.assert_allclose(o["losses"]["2x2x1"], single_device, rtol=1e-4)
    data_files = os.listdir(os.path.join(tmp_path, "2x2x1", "checkpoints", "2", "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_files)
