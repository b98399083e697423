"""Synthetic long-context tasks as byte-token rows: passkey, associative recall, long-range copy.

Each example is one sequence of exactly ``seq_len + 1`` tokens (``BOS`` first, ``PAD`` after the
end) with an ``answer_mask`` marking the tokens a model must predict to solve the task. Greedy
exact match equals "every teacher-forced argmax on the answer is right", so one forward pass
scores a batch. Examples depend only on ``(seed, index)``: the datasets are random-access and
deterministic.
"""

from __future__ import annotations

import grain
import numpy as np

PAD, BOS, EOS = 256, 257, 258

OPENER = (b"There is an important info hidden inside a lot of irrelevant text. Find it and "
          b"memorize it. I will quiz you about the important information there.\n")
FILLER = (b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          b"again. ")
QUESTION = b"\nWhat is the pass key? The pass key is "
LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
DIGITS = np.frombuffer(b"0123456789", np.uint8)


def _bytes(b: bytes) -> np.ndarray:
    return np.frombuffer(b, np.uint8).astype(np.int32)


def _finish(parts: list[tuple[np.ndarray, bool]], length: int, task: str) -> dict:
    """Concatenates ``(tokens, is_answer)`` parts after ``BOS`` and pads to ``length``."""
    tokens = np.full(length, PAD, np.int32)
    answer = np.zeros(length, bool)
    tokens[0], at = BOS, 1
    for part, is_answer in parts:
        end = at + part.size
        if end > length:
            raise ValueError(f"{task} example needs {end} tokens, more than seq_len + 1 = "
                             f"{length}; use a longer sequence")
        tokens[at:end] = part
        answer[at:end] = is_answer
        at = end
    return {"tokens": tokens, "answer_mask": answer, "length": at}


def passkey(rng: np.random.Generator, length: int, depth: float | None = None) -> dict:
    """The needle-in-a-haystack test: a 5-digit pass key hidden at ``depth`` of the filler."""
    key = str(rng.integers(10_000, 100_000)).encode()
    needle = b" The pass key is " + key + b". Remember it. " + key + b" is the pass key. "
    fixed = len(OPENER) + len(needle) + len(QUESTION) + len(key) + 1
    room = length - 1 - fixed
    if room < 0:
        raise ValueError(f"passkey needs at least {fixed + 1} tokens, got seq_len + 1 = {length}")
    filler = (FILLER * (room // len(FILLER) + 1))[:room]
    depth = rng.random() if depth is None else depth
    cut = int(round(depth * room))
    return _finish([(_bytes(OPENER + filler[:cut] + needle + filler[cut:] + QUESTION), False),
                    (_bytes(key), True), (np.array([EOS], np.int32), False)], length, "passkey")


def mqar(rng: np.random.Generator, length: int, num_pairs: int = 8) -> dict:
    """Multi-query associative recall: ``key=value;`` pairs, filler, then keys queried again."""
    keys = rng.choice(LETTERS, size=(num_pairs, 3)).astype(np.int32)
    values = rng.choice(DIGITS, size=(num_pairs, 3)).astype(np.int32)
    eq, semi, space = ord("="), ord(";"), ord(" ")
    head = [np.concatenate([k, [eq], v, [semi]]) for k, v in zip(keys, values, strict=True)]
    order = rng.permutation(num_pairs)
    queries = []
    for i in order:
        queries.append((np.concatenate([[space], keys[i], [eq]]), False))
        queries.append((values[i], True))
    used = sum(h.size for h in head) + sum(q.size for q, _ in queries) + 2
    room = length - used - 1
    if room < 0:
        raise ValueError(f"mqar with {num_pairs} pairs needs more than seq_len + 1 = {length}")
    filler = rng.choice(LETTERS, size=room).astype(np.int32)
    return _finish([(np.concatenate(head), False), (filler, False), *queries,
                    (np.array([EOS], np.int32), False)], length, "mqar")


def copy(rng: np.random.Generator, length: int) -> dict:
    """Long-range copy: random letters, ``|``, then the same letters again (the answer)."""
    n = (length - 3) // 2
    if n < 1:
        raise ValueError(f"copy needs seq_len + 1 >= 5, got {length}")
    seq = rng.choice(LETTERS, size=n).astype(np.int32)
    return _finish([(seq, False), (np.array([ord("|")], np.int32), False), (seq, True)],
                   length, "copy")


GENERATORS = {"passkey": passkey, "mqar": mqar, "copy": copy}


def example(task: str, seq_len: int, seed: int, index: int, **kwargs) -> dict:
    """Example ``index`` of ``task`` with ``seq_len + 1`` tokens (deterministic)."""
    rng = np.random.default_rng([seed, zlib_id(task), index])
    return GENERATORS[task](rng, seq_len + 1, **kwargs)


def zlib_id(task: str) -> int:
    return sum(task.encode()) * 7919


def task_dataset(tasks: tuple[str, ...], *, seq_len: int, seed: int) -> grain.MapDataset:
    """Element ``i`` is example ``i`` of a task drawn uniformly from ``tasks`` by ``(seed, i)``."""
    tasks = tuple(tasks)

    def make(i):
        pick = int(np.random.default_rng([seed, int(i)]).integers(len(tasks)))
        return example(tasks[pick], seq_len, seed, int(i))

    return grain.MapDataset.range(2**40).map(make)


def as_packed(ex: dict) -> dict:
    """A task example in the packed-row layout of :mod:`train.data` (one segment, then PAD)."""
    n = ex["length"]
    seg = np.zeros_like(ex["tokens"])
    seg[:n] = 1
    pos = np.where(seg > 0, np.arange(seg.size, dtype=np.int32), 0).astype(np.int32)
    return {"inputs": ex["tokens"], "inputs_segment_ids": seg, "inputs_positions": pos}


def batch(task: str, *, num: int, seq_len: int, seed: int, **kwargs) -> dict[str, np.ndarray]:
    """``num`` examples stacked: ``tokens`` ``[num, T+1]`` and ``answer_mask`` ``[num, T+1]``."""
    exs = [example(task, seq_len, seed, i, **kwargs) for i in range(num)]
    return {"tokens": np.stack([e["tokens"] for e in exs]),
            "answer_mask": np.stack([e["answer_mask"] for e in exs])}
