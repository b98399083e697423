"""A micro model and a small slice of the stdlib corpus, shared by the training tests."""

from __future__ import annotations

import dataclasses

from nsa_jax.config import ModelConfig, NSAConfig
from train.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    MeshConfig,
    OptimConfig,
    TrainConfig,
)

MICRO_NSA = NSAConfig(cmp_block_size=8, cmp_stride=4, slc_block_size=8, slc_top_n=3,
                      window_size=16)


def micro_config(output_dir: str, data_dir: str, **changes) -> TrainConfig:
    """One layer, width 32, 4 query / 2 KV heads, 64 tokens, 8 rows: compiles in seconds."""
    cfg = TrainConfig(
        name="micro",
        model=ModelConfig(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                          mlp_hidden=64, attention="nsa", nsa=MICRO_NSA),
        data=DataConfig(max_files=24, max_file_bytes=4096, data_dir=data_dir),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
        mesh=MeshConfig(),
        checkpoint=CheckpointConfig(every_steps=0, resume=False, async_save=True),
        eval=EvalConfig(every_steps=0, batches=1, passkey_examples=0),
        steps=4,
        batch_size=8,
        seq_len=64,
        output_dir=output_dir,
        log_every=1,
    )
    return dataclasses.replace(cfg, **changes)
