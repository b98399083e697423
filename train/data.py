"""Offline text and synthetic tasks as packed, sharded, resumable batches.

Pipeline, per batch row:

1. **Corpus**: the ``*.py`` files of the running interpreter's standard library (default),
   or any directory or glob of text files. Files are split into ``train`` and ``validation`` by
   a hash of their relative path and written once as ``array_record`` shards by a TensorFlow
   Datasets builder that needs no TensorFlow (:class:`LocalText`).
2. **Tokens**: bytes, plus ``PAD=256``, ``BOS=257``, ``EOS=258`` (vocabulary 259). Each document
   becomes ``BOS bytes EOS``.
3. **Rows**: the global batch has ``batch_size`` rows; row ``r`` is its own stream of the
   documents ``r, r + R, r + 2R, ...`` of a seeded shuffle (reshuffled every epoch), packed by
   concatenate-then-split (``grain.experimental.ConcatThenSplitIterDataset``) into sequences of
   ``seq_len + 1`` tokens. Each process reads only the rows its devices hold, so the data (and
   hence the losses) do not depend on the number of processes.
4. **Document boundaries**: NSA has no segment masking, so documents packed into one row still
   see each other through attention. What separates them: every document starts with ``BOS``
   and ends with ``EOS``; RoPE positions restart at 0 at every document (and at every split
   point); targets that lie in another document than their input (the token after a boundary)
   are left out of the loss.
5. **Tasks** (optional): passkey retrieval, multi-query associative recall and long-range copy
   examples (:mod:`train.tasks`) replace each row's next sequence with probability
   ``task_fraction``, drawn independently per row and step.

State: :class:`BatchIterator` is a ``grain.DatasetIterator``; ``get_state()`` / ``set_state()``
restore the exact position of every row stream, so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import sysconfig
import zlib
from collections.abc import Sequence

import grain
import numpy as np

from train import tasks as tasks_lib
from train.config import DataConfig

PAD, BOS, EOS = 256, 257, 258
VOCAB_SIZE = 259
KEYS = ("inputs", "inputs_segment_ids", "inputs_positions")


def encode(data: bytes | np.ndarray) -> np.ndarray:
    """``BOS bytes EOS`` as ``int32`` tokens."""
    raw = np.frombuffer(bytes(data), np.uint8) if not isinstance(data, np.ndarray) else data
    out = np.empty(raw.size + 2, np.int32)
    out[0], out[-1] = BOS, EOS
    out[1:-1] = raw
    return out


def decode(tokens: Sequence[int]) -> str:
    """Text of the byte tokens in ``tokens`` (special tokens dropped)."""
    return bytes(int(t) for t in tokens if 0 <= int(t) < 256).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# Corpus files


def stdlib_dir() -> str:
    """The running interpreter's standard library directory."""
    return sysconfig.get_paths()["stdlib"]


def corpus_files(cfg: DataConfig) -> list[tuple[str, str]]:
    """``(relative path, absolute path)`` of every corpus file, sorted, capped at ``max_files``.

    Raises:
      ValueError: when the corpus names no existing file.
    """
    if cfg.corpus == "stdlib" or os.path.isdir(cfg.corpus):
        root = stdlib_dir() if cfg.corpus == "stdlib" else cfg.corpus
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in cfg.exclude_dirs)
            for name in filenames:
                if name.endswith(tuple(cfg.suffixes)):
                    path = os.path.join(dirpath, name)
                    found.append((os.path.relpath(path, root), path))
    else:
        paths = sorted(p for p in glob.glob(os.path.expanduser(cfg.corpus), recursive=True)
                       if os.path.isfile(p))
        base = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]) if (
            paths) else ""
        found = [(os.path.relpath(p, base), p) for p in paths]
    found.sort()
    if cfg.max_files is not None:
        found = found[: cfg.max_files]
    if not found:
        raise ValueError(f"DataConfig.corpus={cfg.corpus!r} matches no file with suffixes "
                         f"{cfg.suffixes}")
    return found


def split_files(files: list[tuple[str, str]], fraction: float):
    """``(train, validation)`` by a CRC of the relative path; both non-empty when possible."""
    val = [f for f in files if zlib.crc32(f[0].encode()) % 10_000 < fraction * 10_000]
    if not val and len(files) > 1:
        val = [files[-1]]
    train = [f for f in files if f not in val]
    if not train:
        raise ValueError(f"the corpus has {len(files)} file(s): too few to hold some out for "
                         "validation")
    return train, val


# --------------------------------------------------------------------------------------------
# TensorFlow Datasets builder (no TensorFlow needed)


@functools.cache
def _builder_class():
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS logs every custom config

    class LocalText(tfds.core.GeneratorBasedBuilder):
        """Local text files as ``{"bytes": uint8[None], "path": str}`` examples.

        The file list and caps are part of the config name, so another corpus or cap gets its
        own prepared copy; preparing twice is a no-op.
        """

        VERSION = tfds.core.Version("1.0.0")
        # No checksums or metadata files ship next to this module; without this, TFDS looks for
        # them through ``importlib_resources``, which is not a dependency.
        code_path = None

        def __init__(self, *, train_files, val_files, max_file_bytes, **kwargs):
            self._files = {"train": train_files, "validation": val_files}
            self._max_file_bytes = max_file_bytes
            super().__init__(**kwargs)

        def _info(self):
            features = tfds.features.FeaturesDict({
                "bytes": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
                "path": tfds.features.Text(),
            })
            return tfds.core.DatasetInfo(builder=self, features=features,
                                         description="Local text files, one example per file.")

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(files)
                    for split, files in self._files.items()}

        def _generate_examples(self, files):
            for rel, path in files:
                with open(path, "rb") as f:
                    data = f.read(self._max_file_bytes) if self._max_file_bytes else f.read()
                yield rel, {"bytes": np.frombuffer(data, np.uint8), "path": rel}

    return LocalText


def corpus_fingerprint(cfg: DataConfig, files: list[tuple[str, str]]) -> str:
    """A short hash of the file list, sizes and caps: the prepared copy's config name."""
    h = hashlib.sha256()
    for rel, path in files:
        h.update(f"{rel}\0{os.path.getsize(path)}\0".encode())
    h.update(f"{cfg.max_file_bytes}\0{cfg.validation_fraction}".encode())
    return h.hexdigest()[:12]


def prepare(cfg: DataConfig):
    """Builds (once) the ``array_record`` shards of the corpus; returns the TFDS builder."""
    import tensorflow_datasets as tfds

    files = corpus_files(cfg)
    train, val = split_files(files, cfg.validation_fraction)
    label = "stdlib" if cfg.corpus == "stdlib" else "files"
    name = f"{label}_{corpus_fingerprint(cfg, files)}"
    builder = _builder_class()(
        train_files=train, val_files=val, max_file_bytes=cfg.max_file_bytes,
        config=tfds.core.BuilderConfig(name=name), data_dir=os.path.abspath(cfg.data_dir),
        file_format="array_record")
    if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        tfds.disable_progress_bar()
        builder.download_and_prepare()
    return builder


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Random-access ``train`` / ``validation`` sources and their sizes."""

    train: object
    validation: object
    data_dir: str
    train_bytes: int

    @classmethod
    def load(cls, cfg: DataConfig) -> Corpus:
        builder = prepare(cfg)
        info = builder.info
        train_bytes = int(info.splits["train"].num_bytes)
        return cls(train=builder.as_data_source(split="train"),
                   validation=builder.as_data_source(split="validation"),
                   data_dir=builder.data_dir, train_bytes=train_bytes)


def unigram_entropy(source, max_docs: int = 2000) -> float:
    """Entropy (nats per token) of the byte + EOS unigram distribution of ``source``.

    The baseline a model beats by learning anything beyond token frequencies.
    """
    counts = np.zeros(VOCAB_SIZE, np.float64)
    for i in range(min(len(source), max_docs)):
        tokens = encode(source[i]["bytes"])[1:]  # BOS is never a target
        counts += np.bincount(tokens, minlength=VOCAB_SIZE)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------------------------
# Row streams and batches


def _text_row(source, *, row: int, num_rows: int, seq_len: int, seed: int, shuffle: bool):
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None)[row::num_rows]
    ds = ds.map(lambda ex: {"inputs": encode(ex["bytes"])})
    return grain.experimental.ConcatThenSplitIterDataset(
        ds.to_iter_dataset(), length_struct={"inputs": seq_len + 1})


class RowMixIterator(grain.DatasetIterator):
    """One row's stream drawing each element from tasks with probability ``fraction``.

    The draw for element ``k`` of row ``r`` depends only on ``(seed, r, k)``, so rows mix
    independently (a step holds text and task rows side by side) and the stream resumes
    exactly from its state.
    """

    def __init__(self, text: grain.DatasetIterator, tasks: grain.DatasetIterator, *,
                 fraction: float, seed: int, row: int):
        super().__init__()
        self._text, self._tasks = text, tasks
        self._fraction, self._seed, self._row = fraction, seed, row
        self._index = 0

    def __next__(self) -> dict[str, np.ndarray]:
        u = np.random.default_rng([self._seed, self._row, self._index]).random()
        self._index += 1
        return next(self._tasks) if u < self._fraction else next(self._text)

    def get_state(self) -> dict:
        return {"index": self._index, "text": self._text.get_state(),
                "tasks": self._tasks.get_state()}

    def set_state(self, state: dict) -> None:
        self._index = int(state["index"])
        self._text.set_state(state["text"])
        self._tasks.set_state(state["tasks"])


def row_iterator(source, cfg: DataConfig, *, row: int, num_rows: int, seq_len: int, seed: int,
                 shuffle: bool = True, with_tasks: bool = True) -> grain.DatasetIterator:
    """The iterator of one batch row: packed text, optionally mixed with task examples."""
    text = iter(_text_row(source, row=row, num_rows=num_rows, seq_len=seq_len, seed=seed,
                          shuffle=shuffle))
    if not (with_tasks and cfg.tasks and cfg.task_fraction > 0):
        return text
    task_ds = tasks_lib.task_dataset(cfg.tasks, seq_len=seq_len, seed=seed + 1)
    task_it = iter(task_ds.repeat(None)[row::num_rows].map(tasks_lib.as_packed)
                   .to_iter_dataset())
    return RowMixIterator(text, task_it, fraction=cfg.task_fraction, seed=seed + 2, row=row)


class BatchIterator(grain.DatasetIterator):
    """Stacks one element of each local row stream into a batch of numpy arrays.

    Yields ``{"inputs", "inputs_segment_ids", "inputs_positions"}``, each ``int32 [R_local,
    T + 1]``, for the global rows ``rows`` of every step.
    """

    def __init__(self, row_iterators: Sequence[grain.DatasetIterator], rows: Sequence[int]):
        super().__init__()
        self._rows = tuple(rows)
        self._iters = list(row_iterators)

    @property
    def rows(self) -> tuple[int, ...]:
        return self._rows

    def __next__(self) -> dict[str, np.ndarray]:
        elems = [next(it) for it in self._iters]
        return {k: np.stack([np.asarray(e[k], np.int32) for e in elems]) for k in KEYS}

    def get_state(self) -> dict:
        return {"rows": list(self._rows), "streams": [it.get_state() for it in self._iters]}

    def set_state(self, state: dict) -> None:
        if list(state["rows"]) != list(self._rows):
            raise ValueError(f"iterator state is for rows {state['rows']}, this iterator reads "
                             f"rows {list(self._rows)}: batch size or process layout changed")
        for it, s in zip(self._iters, state["streams"], strict=True):
            it.set_state(s)


class StateSnapshot(grain.DatasetIterator):
    """A frozen ``get_state()`` for checkpointing while the live iterator moves on."""

    def __init__(self, state: dict):
        super().__init__()
        self._state = state

    def __next__(self):
        raise StopIteration

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        self._state = state


def make_batches(source, cfg: DataConfig, *, rows: Sequence[int], num_rows: int, seq_len: int,
                 seed: int, shuffle: bool = True, with_tasks: bool = True) -> BatchIterator:
    """A :class:`BatchIterator` over global rows ``rows`` of a ``num_rows``-row batch."""
    if not rows:
        raise ValueError("a batch iterator needs at least one row")
    if max(rows) >= num_rows or min(rows) < 0:
        raise ValueError(f"rows {min(rows)}..{max(rows)} outside a batch of {num_rows} rows")
    iterators = [row_iterator(source, cfg, row=r, num_rows=num_rows, seq_len=seq_len, seed=seed,
                              shuffle=shuffle, with_tasks=with_tasks) for r in rows]
    return BatchIterator(iterators, rows)


def model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Splits packed ``[B, T+1]`` rows into model inputs and next-token targets.

    Returns:
      ``tokens``, ``positions``, ``targets`` (``int32 [B, T]``) and ``weights`` (``float32
      [B, T]``: 1 where the target is a real token of the same document as its input).
    """
    seq, seg, pos = (batch[k] for k in KEYS)
    weights = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0) & (seq[:, 1:] != PAD)
    return {"tokens": seq[:, :-1], "positions": pos[:, :-1], "targets": seq[:, 1:],
            "weights": weights.astype(np.float32)}


__all__ = [
    "BOS",
    "BatchIterator",
    "Corpus",
    "EOS",
    "PAD",
    "StateSnapshot",
    "VOCAB_SIZE",
    "corpus_files",
    "decode",
    "encode",
    "make_batches",
    "model_inputs",
    "prepare",
    "row_iterator",
    "split_files",
    "unigram_entropy",
]
