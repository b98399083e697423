"""Runs the micro config with given mesh layouts in a fresh process; prints losses as JSON.

``python -m tests.train.worker OUT DATA LAYOUTS [--coordinator H:P --num-processes N
--process-id I]``, where ``LAYOUTS`` is JSON: a list of ``[data, fsdp, tensor]``. Run with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` to get N CPU devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("data_dir")
    parser.add_argument("layouts")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpoint_every", type=int, default=0)
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args()
    if args.coordinator:
        from train import cli

        cli.initialize_distributed(argparse.Namespace(
            coordinator=args.coordinator, num_processes=args.num_processes,
            process_id=args.process_id, distributed=False))
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    from tests.train.helpers import micro_config
    from train import loop
    from train.config import CheckpointConfig, MeshConfig

    results = {}
    for data, fsdp, tensor in json.loads(args.layouts):
        name = f"{data}x{fsdp}x{tensor}"
        cfg = micro_config(os.path.join(args.out, name), args.data_dir, steps=args.steps)
        cfg = dataclasses.replace(
            cfg, mesh=MeshConfig(data=data, fsdp=fsdp, tensor=tensor),
            checkpoint=CheckpointConfig(every_steps=args.checkpoint_every, max_to_keep=2,
                                        resume=bool(args.checkpoint_every)))
        res = loop.run(cfg, progress="none", tensorboard=False)
        results[name] = [res.losses[s] for s in sorted(res.losses)]
    print("RESULT " + json.dumps({"process": jax.process_index(),
                                  "devices": jax.device_count(), "losses": results}), flush=True)


if __name__ == "__main__":
    main()
