"""The optimiser: clip → Adam/AdamW/RMSProp on a warm-up + cosine schedule, in optax.MultiSteps.

MultiSteps calls the inner chain once per ``grad_accum_steps`` micro-steps with the mean of their
gradients, so the schedule's count (and ``num_train_steps``) is in real optimiser updates.
"""
from __future__ import annotations

import optax


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then cosine decay to 1% of it at ``num_train_steps``."""
    warmup = min(config.warmup_steps, max(config.num_train_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.num_train_steps, warmup + 1), end_value=config.learning_rate * 0.01)


def _optimizer(config, schedule) -> optax.GradientTransformation:
    if config.optimizer == "adam":
        return optax.adam(schedule)
    if config.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        return optax.rmsprop(schedule)
    raise ValueError(f"optimizer must be 'adam', 'adamw' or 'rmsprop', got {config.optimizer!r}")


def create_optimizer(config) -> optax.MultiSteps:
    """The full optimiser for ``config``; its state holds the accumulated gradients."""
    if config.grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be ≥ 1, got {config.grad_accum_steps}")
    clip = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm > 0 else []
    inner = optax.chain(*clip, _optimizer(config, learning_rate_schedule(config)))
    return optax.MultiSteps(inner, every_k_schedule=config.grad_accum_steps)
