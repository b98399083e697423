"""Named training presets, written in Python: ``get_config(name)`` returns a ``TrainConfig``.

=========  ============  =======  =================================================
preset     parameters    seq len  meant for
=========  ============  =======  =================================================
tiny       ~0.6M         256      CPU: the default demo, tests
small      ~29M          2048     one GPU, quick experiments
nsa_125m   ~125M         8192     one GPU; the training benchmark's model
nsa_1b     ~1B           8192     several GPUs (FSDP), TPU slices
=========  ============  =======  =================================================

Change single fields with ``--set`` on the command line (see ``train.config.apply_overrides``).
"""

from __future__ import annotations

from collections.abc import Callable

from nsa_jax.config import ModelConfig, NSAConfig
from train.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    MeshConfig,
    OptimConfig,
    TrainConfig,
)

# The paper's NSA block sizes (l=32, d=16, l'=64, n=16, w=512): sparse from about 8k tokens.
PAPER_NSA = NSAConfig()
# Blocks scaled down so that a 256-token sequence is already sparse (n * l' + w < T).
SHORT_NSA = NSAConfig(cmp_block_size=16, cmp_stride=8, slc_block_size=16, slc_top_n=4,
                      window_size=64)


def tiny() -> TrainConfig:
    """A two-layer byte-level model that learns the stdlib corpus in minutes on two CPU cores."""
    return TrainConfig(
        name="tiny",
        model=ModelConfig(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                          mlp_hidden=384, attention="nsa", nsa=SHORT_NSA),
        data=DataConfig(max_file_bytes=65_536),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=10, min_lr_ratio=0.1,
                          weight_decay=0.01),
        mesh=MeshConfig(),
        checkpoint=CheckpointConfig(every_steps=50, max_to_keep=2),
        eval=EvalConfig(every_steps=50, batches=4, passkey_examples=8),
        steps=150,
        batch_size=16,
        seq_len=256,
        output_dir="runs/tiny",
        log_every=5,
    )


def small() -> TrainConfig:
    """About 29M parameters: 8 layers of width 512, bf16 compute with f32 master weights."""
    return TrainConfig(
        name="small",
        model=ModelConfig(d_model=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                          mlp_hidden=1408, attention="nsa",
                          nsa=NSAConfig(cmp_block_size=32, cmp_stride=16, slc_block_size=64,
                                        slc_top_n=8, window_size=256),
                          dtype="bfloat16", param_dtype="float32"),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=200),
        checkpoint=CheckpointConfig(every_steps=500),
        eval=EvalConfig(every_steps=500, batches=8, passkey_examples=16),
        steps=5000,
        batch_size=32,
        seq_len=2048,
        output_dir="runs/small",
    )


def nsa_125m() -> TrainConfig:
    """About 125M parameters (111M) at 8k tokens with the paper's NSA blocks and its group
    size: 16 query heads share one KV head (``G = 16``, as the paper's 64 query heads share 4),
    since the selection and the selected-attention kernel work per KV group; remat on."""
    return TrainConfig(
        name="nsa_125m",
        model=ModelConfig(d_model=768, num_layers=12, num_heads=16, num_kv_heads=1,
                          head_dim=64, mlp_hidden=3072, attention="nsa", nsa=PAPER_NSA,
                          dtype="bfloat16", param_dtype="float32", remat=True),
        optim=OptimConfig(learning_rate=6e-4, warmup_steps=500),
        checkpoint=CheckpointConfig(every_steps=1000),
        eval=EvalConfig(every_steps=1000, batches=8, passkey_examples=32),
        steps=20_000,
        batch_size=16,
        seq_len=8192,
        output_dir="runs/nsa_125m",
    )


def nsa_1b() -> TrainConfig:
    """About 1B parameters, FSDP over all devices by default; remat on."""
    return TrainConfig(
        name="nsa_1b",
        model=ModelConfig(d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                          head_dim=64, mlp_hidden=5632, attention="nsa", nsa=PAPER_NSA,
                          dtype="bfloat16", param_dtype="float32", remat=True),
        optim=OptimConfig(learning_rate=3e-4, warmup_steps=2000),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(every_steps=1000),
        eval=EvalConfig(every_steps=2000, batches=8, passkey_examples=32),
        steps=100_000,
        batch_size=64,
        seq_len=8192,
        output_dir="runs/nsa_1b",
    )


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "tiny": tiny,
    "small": small,
    "nsa_125m": nsa_125m,
    "nsa_1b": nsa_1b,
}


def get_config(name: str) -> TrainConfig:
    """The preset called ``name``.

    Raises:
      ValueError: for an unknown name, listing the presets.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    return PRESETS[name]()


__all__ = ["PRESETS", "get_config"]
