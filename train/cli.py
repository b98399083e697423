"""Command line: ``python -m train --config tiny --set train.steps=200 --set model.attention=full``.

Everything is checked (preset, overrides, mesh against the devices) before anything compiles.
"""

from __future__ import annotations

import argparse
import sys

import configs
from train.config import TrainConfig, apply_overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsa-train",
        description="Train an NSA language model (see docs/training.md).")
    parser.add_argument("--config", default="tiny",
                        help=f"preset name: one of {sorted(configs.PRESETS)} (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE",
                        help="change one field, e.g. --set train.steps=200 --set "
                             "model.attention=full --set model.nsa.window_size=128; repeatable")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON and exit")
    parser.add_argument("--no-progress", action="store_true",
                        help="log lines instead of a progress bar")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (auto-detects SLURM, Open MPI, "
                             "Kubernetes and TPU pods)")
    parser.add_argument("--coordinator", help="host:port of process 0 (multi-process runs)")
    parser.add_argument("--num-processes", type=int, help="number of processes")
    parser.add_argument("--process-id", type=int, help="index of this process")
    return parser


def resolve_config(preset: str, overrides: list[str]) -> TrainConfig:
    """The preset with overrides applied; ``ValueError`` with a clear message when invalid."""
    return apply_overrides(configs.get_config(preset), overrides)


def initialize_distributed(args) -> None:
    """Joins the processes of a multi-process run (before any other JAX call)."""
    import jax

    if args.coordinator or args.num_processes or args.process_id is not None:
        if not (args.coordinator and args.num_processes and args.process_id is not None):
            raise ValueError("--coordinator, --num-processes and --process-id go together; got "
                             f"coordinator={args.coordinator!r}, num_processes="
                             f"{args.num_processes!r}, process_id={args.process_id!r}")
        # CPU processes exchange data through gloo (no effect on GPU or TPU collectives). Set
        # before initialize: asking for the backend first would start it single-process.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args.config, args.overrides)
    except (ValueError, TypeError) as err:
        print(f"nsa-train: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    try:
        initialize_distributed(args)
        import jax

        cfg.validate_for_devices(jax.device_count(), jax.process_count())
    except ValueError as err:
        print(f"nsa-train: error: {err}", file=sys.stderr)
        return 2

    from train import loop

    loop.run(cfg, progress="lines" if args.no_progress else "bar")
    return 0
