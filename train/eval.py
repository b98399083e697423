"""Evaluation: held-out loss and bits per byte, and passkey retrieval accuracy."""

from __future__ import annotations

import math

import jax
import numpy as np

from train import data as data_lib
from train import tasks


def held_out(eval_step, params, source, cfg, *, rows, num_rows, put, batches: int) -> dict:
    """Loss (nats per token) and bits per byte over ``batches`` held-out batches.

    The validation rows are read in file order from the start every time, so evaluations of
    different steps (and runs) see the same text.
    """
    it = data_lib.make_batches(source, cfg.data, rows=rows, num_rows=num_rows,
                               seq_len=cfg.seq_len, seed=cfg.seed, shuffle=False,
                               with_tasks=False)
    loss_sum = count = nbytes = 0.0
    for _ in range(batches):
        out = eval_step(params, put(data_lib.model_inputs(next(it))))
        loss_sum += float(out["loss_sum"])
        count += float(out["count"])
        nbytes += float(out["bytes"])
    return {"loss": loss_sum / max(count, 1.0),
            "bits_per_byte": loss_sum / max(nbytes, 1.0) / math.log(2)}


def passkey(eval_step, params, cfg, *, rows, num_rows, put, examples: int) -> dict:
    """Share of passkey examples (at the training length) whose 5 digits are all predicted."""
    rounds = -(-examples // num_rows)
    correct = total = 0
    for r in range(rounds):
        ex = [tasks.example("passkey", cfg.seq_len, 12345, r * num_rows + i) for i in rows]
        seq = np.stack([e["tokens"] for e in ex])
        ans = np.stack([e["answer_mask"] for e in ex])
        seg = (seq != data_lib.PAD).astype(np.int32)
        pos = np.broadcast_to(np.arange(seq.shape[1], dtype=np.int32), seq.shape)
        batch = data_lib.model_inputs({"inputs": seq, "inputs_segment_ids": seg,
                                       "inputs_positions": pos})
        batch["answer_mask"] = ans[:, 1:].astype(np.float32)
        out = eval_step(params, put(batch))
        correct += int(out["correct"])
        total += int(out["examples"])
    return {"passkey_accuracy": correct / max(total, 1)}


def host_float(x) -> float:
    return float(jax.device_get(x))
