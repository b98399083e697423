"""Training configuration: frozen, keyword-only dataclasses, validated on construction.

A :class:`TrainConfig` holds everything a run needs: the model (:class:`nsa_jax.ModelConfig`),
the data, the optimiser, the device mesh, checkpointing and evaluation. Presets live in
``configs/`` (``configs.get_config(name)``); the command line changes single fields with
``--set section.field=value`` through :func:`apply_overrides`, the one override path.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, get_args, get_origin

from nsa_jax.config import ModelConfig, NSAConfig

TASKS: tuple[str, ...] = ("passkey", "mqar", "copy")


def _positive_int(owner: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{name} must be an int >= {low}, got {name}={value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the text comes from and how it is cut into training rows.

    Attributes:
      corpus: ``"stdlib"`` (the ``*.py`` files of the running interpreter's standard library,
        read in place, never downloaded or committed), a directory (searched recursively for
        ``suffixes``) or a glob pattern of text files.
      suffixes: file name endings kept when ``corpus`` is ``"stdlib"`` or a directory.
      exclude_dirs: directory names skipped while searching (the stdlib's test suite by default).
      max_files: keep only the first ``max_files`` files in sorted order (``None``: all).
      max_file_bytes: truncate each file to this many bytes (``None``: whole files).
      validation_fraction: share of files held out for evaluation, chosen by a hash of the
        relative path (stable across machines and file counts).
      data_dir: where the prepared ``array_record`` shards are written (TFDS layout).
      tasks: synthetic long-context tasks mixed into training rows (``passkey``, ``mqar``,
        ``copy``).
      task_fraction: expected share of training rows drawn from ``tasks``.
    """

    corpus: str = "stdlib"
    suffixes: tuple[str, ...] = (".py",)
    exclude_dirs: tuple[str, ...] = ("test", "tests", "idlelib", "site-packages", "__pycache__")
    max_files: int | None = None
    max_file_bytes: int | None = None
    validation_fraction: float = 0.05
    data_dir: str = "data/tfds"
    tasks: tuple[str, ...] = ()
    task_fraction: float = 0.0

    def __post_init__(self):
        if not self.corpus:
            raise ValueError("DataConfig.corpus must name 'stdlib', a directory or a glob")
        if self.max_files is not None:
            _positive_int("DataConfig", "max_files", self.max_files)
        if self.max_file_bytes is not None:
            _positive_int("DataConfig", "max_file_bytes", self.max_file_bytes)
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"DataConfig.validation_fraction must be in (0, 1), got "
                             f"validation_fraction={self.validation_fraction!r}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"DataConfig.tasks={self.tasks!r} has unknown tasks {unknown}; "
                             f"choose from {TASKS}")
        if not 0.0 <= self.task_fraction <= 1.0:
            raise ValueError(f"DataConfig.task_fraction must be in [0, 1], got "
                             f"task_fraction={self.task_fraction!r}")
        if self.task_fraction > 0 and not self.tasks:
            raise ValueError(f"DataConfig.task_fraction={self.task_fraction} needs at least one "
                             f"task in DataConfig.tasks (choose from {TASKS})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, and global-norm gradient clipping.

    Attributes:
      learning_rate: peak learning rate, reached after ``warmup_steps``.
      warmup_steps: linear warm-up from 0.
      min_lr_ratio: the cosine ends at ``learning_rate * min_lr_ratio`` at the last step.
      b1, b2, eps: Adam moments.
      weight_decay: decoupled weight decay, applied to matrices only (not norms or biases).
      grad_clip: clip gradients to this global norm (``0``: no clipping).
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"OptimConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        _positive_int("OptimConfig", "warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got "
                             f"{self.min_lr_ratio!r}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"OptimConfig.{name} must be in [0, 1), got "
                                 f"{getattr(self, name)!r}")
        if self.weight_decay < 0 or self.grad_clip < 0 or not self.eps > 0:
            raise ValueError(f"OptimConfig needs weight_decay >= 0, grad_clip >= 0, eps > 0; got "
                             f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip}, "
                             f"eps={self.eps}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh with named axes ``(data, fsdp, tensor)``.

    Attributes:
      data: data-parallel replicas (parameters replicated, batch split); ``-1`` takes all
        devices the other axes leave.
      fsdp: fully sharded data parallel (batch split and parameters sharded along ``embed``).
      tensor: tensor parallel (heads, MLP hidden and vocabulary split).
      shard_attention: run the attention stages per shard inside ``jax.shard_map`` (batch over
        ``data`` and ``fsdp``, heads over ``tensor``), as custom kernels require.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    shard_attention: bool = True

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1
                                                                          and value != -1):
                raise ValueError(f"MeshConfig.{name} must be a positive int or -1, got "
                                 f"{name}={value!r}")
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise ValueError(f"only one mesh axis may be -1, got data={self.data}, "
                             f"fsdp={self.fsdp}, tensor={self.tensor}")

    def shape(self, num_devices: int) -> dict[str, int]:
        """Axis sizes for ``num_devices`` devices; raises ``ValueError`` if they do not fit."""
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        fixed = 1
        for value in sizes.values():
            fixed *= value if value != -1 else 1
        for name, value in sizes.items():
            if value == -1:
                if num_devices % fixed:
                    raise ValueError(f"mesh axes fsdp={self.fsdp}, tensor={self.tensor}, "
                                     f"data={self.data} do not divide {num_devices} devices")
                sizes[name] = num_devices // fixed
        total = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
        if total != num_devices:
            raise ValueError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x "
                             f"tensor={sizes['tensor']} = {total} devices, but {num_devices} "
                             "are available")
        return sizes


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpointing.

    Attributes:
      every_steps: save every this many steps (and at the last step); ``0`` disables saving.
      max_to_keep: keep the newest this many checkpoints.
      async_save: write checkpoints in the background while training continues.
      resume: continue from the newest checkpoint in the run directory when there is one.
    """

    every_steps: int = 500
    max_to_keep: int = 3
    async_save: bool = True
    resume: bool = True

    def __post_init__(self):
        _positive_int("CheckpointConfig", "every_steps", self.every_steps, allow_zero=True)
        _positive_int("CheckpointConfig", "max_to_keep", self.max_to_keep)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Periodic evaluation on held-out text and the passkey task.

    Attributes:
      every_steps: evaluate every this many steps (and at the end); ``0`` disables it.
      batches: held-out batches per evaluation (loss and bits per byte).
      passkey_examples: passkey examples per evaluation, at the training sequence length
        (``0``: skip).
    """

    every_steps: int = 500
    batches: int = 4
    passkey_examples: int = 8

    def __post_init__(self):
        _positive_int("EvalConfig", "every_steps", self.every_steps, allow_zero=True)
        _positive_int("EvalConfig", "batches", self.batches)
        _positive_int("EvalConfig", "passkey_examples", self.passkey_examples, allow_zero=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run.

    Attributes:
      name: preset name (for logs).
      model: the language model.
      data: corpus and tasks.
      optim: optimiser and schedule.
      mesh: device mesh.
      checkpoint: checkpointing.
      eval: evaluation.
      steps: optimiser steps.
      batch_size: global rows per optimiser step (over all devices and micro-batches).
      seq_len: tokens per row ``T``.
      grad_accum: micro-batches per step; gradients are summed over them before the update.
      seed: parameter initialisation and data order.
      output_dir: run directory: checkpoints, TensorBoard events, the resolved config.
      log_every: steps between progress-bar and TensorBoard updates.
      embed_init_std: rescale the initial token embedding to this standard deviation;
        ``None`` keeps the model's own init.
    """

    name: str = "custom"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 1024
    grad_accum: int = 1
    seed: int = 0
    output_dir: str = "runs/custom"
    log_every: int = 10
    embed_init_std: float | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            _positive_int("TrainConfig", name, getattr(self, name))
        _positive_int("TrainConfig", "seed", self.seed, allow_zero=True)
        if self.embed_init_std is not None and not self.embed_init_std > 0:
            raise ValueError(f"TrainConfig.embed_init_std must be > 0 or None, got "
                             f"{self.embed_init_std!r}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"TrainConfig.seq_len must be an int >= 2, got "
                             f"seq_len={self.seq_len!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by "
                             f"grad_accum={self.grad_accum}")
        if self.model.vocab_size < 259:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} is too small for byte "
                             "tokens (256 bytes + PAD, BOS, EOS = 259)")
        for part, cls in (("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig),
                          ("mesh", MeshConfig), ("checkpoint", CheckpointConfig),
                          ("eval", EvalConfig)):
            if not isinstance(getattr(self, part), cls):
                raise TypeError(f"TrainConfig.{part} must be a {cls.__name__}, got "
                                f"{type(getattr(self, part)).__name__}")

    def validate_for_devices(self, num_devices: int, num_processes: int = 1) -> dict[str, int]:
        """Checks the config against the devices; returns the mesh axis sizes.

        Raises:
          ValueError: naming the values, when the mesh does not fit the devices, the batch does
            not split over the data axes, micro-batches or processes, or the heads do not split
            over the tensor axis.
        """
        sizes = self.mesh.shape(num_devices)
        batch_shards = sizes["data"] * sizes["fsdp"]
        micro = self.batch_size // self.grad_accum
        if micro % batch_shards:
            raise ValueError(
                f"micro-batch of batch_size={self.batch_size} / grad_accum={self.grad_accum} = "
                f"{micro} rows is not divisible by the batch-sharding axes data={sizes['data']} "
                f"x fsdp={sizes['fsdp']} = {batch_shards}")
        if self.batch_size % num_processes:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by "
                             f"{num_processes} processes")
        tp = sizes["tensor"]
        if self.mesh.shard_attention and (self.model.num_kv_heads % tp
                                          or self.model.num_heads % tp):
            raise ValueError(
                f"tensor={tp} must divide model.num_heads={self.model.num_heads} and "
                f"model.num_kv_heads={self.model.num_kv_heads} when attention runs per shard "
                "(mesh.shard_attention=True)")
        return sizes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict (tuples become lists)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
}


def from_dict(cls: type, values: dict[str, Any]):
    """Rebuilds a (nested) config dataclass from :meth:`TrainConfig.to_dict` output."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        value = values[field.name]
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = from_dict(kind, value)
        elif get_origin(kind) is tuple or tuple in get_args(kind):
            value = None if value is None else tuple(value)
        kwargs[field.name] = value
    return cls(**kwargs)


def _parse_value(text: str, kind: Any, where: str) -> Any:
    """Parses ``text`` as a value of type annotation ``kind``."""
    origin, args = get_origin(kind), get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse_value(text, arg, where)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError(f"{where}: cannot parse {text!r} as {kind}: {'; '.join(errors)}")
    if origin is Literal:
        if text not in args:
            raise ValueError(f"{where}: {text!r} is not one of {args}")
        return text
    if origin is tuple:
        items = [s.strip() for s in text.strip("()[]").split(",") if s.strip()]
        item_kind = args[0] if args else str
        return tuple(_parse_value(s, item_kind, where) for s in items)
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}: {text!r} is not a bool (true/false)")
    if kind is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ValueError(f"{where}: {text!r} is not an int") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where}: {text!r} is not a float") from None
    if kind is str:
        return text
    raise TypeError(f"{where}: fields of type {kind} cannot be set from the command line")


def _set_path(obj, path: list[str], text: str, full: str):
    """Returns a copy of dataclass ``obj`` with the field at ``path`` parsed from ``text``."""
    names = [f.name for f in dataclasses.fields(obj)]
    head = path[0]
    if head not in names:
        raise ValueError(f"unknown config field {full!r}: {type(obj).__name__} has no field "
                         f"{head!r}; fields are {names}")
    kind = typing.get_type_hints(type(obj))[head]
    if len(path) == 1:
        if dataclasses.is_dataclass(kind):
            raise ValueError(f"{full!r} is a section ({kind.__name__}); set one of its fields, "
                             f"e.g. {full}.{dataclasses.fields(kind)[0].name}=...")
        value = _parse_value(text, kind, full)
    else:
        child = getattr(obj, head)
        if not dataclasses.is_dataclass(child):
            raise ValueError(f"unknown config field {full!r}: {head!r} is not a section")
        value = _set_path(child, path[1:], text, full)
    return dataclasses.replace(obj, **{head: value})


def apply_overrides(config: TrainConfig, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
    """Applies ``section.field=value`` overrides, parsed by each field's type.

    ``train.<field>`` names a top-level :class:`TrainConfig` field (``train.steps=200``); the
    other sections are ``model`` (with ``model.nsa``), ``data``, ``optim``, ``mesh``,
    ``checkpoint`` and ``eval``. ``none`` sets an optional field to ``None``; tuples are
    comma-separated.

    Raises:
      ValueError: for a malformed override, an unknown section or field, or a value that does
        not parse or does not validate.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value")
        path = key.split(".")
        if path[0] == "train":
            path = path[1:]
        elif path[0] not in SECTIONS:
            raise ValueError(f"override {item!r}: unknown section {path[0]!r}; sections are "
                             f"{['train', *SECTIONS]}")
        if not path:
            raise ValueError(f"override {item!r} names no field")
        try:
            config = _set_path(config, path, text.strip(), key)
        except TypeError as err:
            raise ValueError(f"override {item!r}: {err}") from err
    return config


__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "MeshConfig",
    "ModelConfig",
    "NSAConfig",
    "OptimConfig",
    "TASKS",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
]
