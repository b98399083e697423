"""AdamW with linear warm-up, cosine decay and global-norm gradient clipping (optax)."""

from __future__ import annotations

import jax
import optax

from train.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """0 -> ``learning_rate`` linearly over ``warmup_steps``, then cosine to ``min_lr_ratio``."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def decay_mask(params):
    """Weight decay on matrices and larger tensors only (not norm scales or biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimiser of a run of ``total_steps`` steps."""
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                             eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
