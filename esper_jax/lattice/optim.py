"""The optimizers host and seeds train with: Esper's SGD (momentum 0.9, weight decay 5e-4,
gradients clipped at 1.0) or AdamW (the same clipping), at a chosen learning rate and schedule."""

from __future__ import annotations

import math
from typing import Literal

import optax

LRSchedule = Literal["constant", "cosine"]
LR_SCHEDULES: tuple[LRSchedule, ...] = ("constant", "cosine")
OptimizerKind = Literal["sgd", "adamw"]
OPTIMIZERS: tuple[OptimizerKind, ...] = ("sgd", "adamw")


def _rate(learning_rate: float, schedule: LRSchedule, total_steps: int | None) -> float | optax.Schedule:
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning rate must be a positive number, got {learning_rate}")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if schedule == "cosine":
        if not total_steps or total_steps <= 0:
            raise ValueError("a cosine schedule needs the number of steps it decays over")
        return optax.cosine_decay_schedule(learning_rate, total_steps)
    return learning_rate


def sgd_optimizer(learning_rate: float = 0.01, schedule: LRSchedule = "constant",
                  total_steps: int | None = None) -> optax.GradientTransformation:
    """Esper's optimizer for host and seeds: SGD, momentum 0.9, weight decay 5e-4, gradients
    clipped at 1.0. ``schedule="cosine"`` decays the rate to 0 over ``total_steps`` (one episode):
    the final loss then measures what the network can do rather than where SGD noise left it.
    Measured on synthetic CIFAR-10: the paired difference between a growth schedule and static
    over held-out envs had a standard deviation of about 0.45 at a constant rate of 0.05 (32x32,
    1,000 steps) and of 0.01-0.02 with the cosine decay (16x16, 600 steps), so a few envs suffice
    to tell a good growth decision from a bad one."""
    rate = _rate(learning_rate, schedule, total_steps)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(5e-4), optax.sgd(rate, momentum=0.9))


def adamw_optimizer(learning_rate: float = 3e-3, schedule: LRSchedule = "constant",
                    total_steps: int | None = None) -> optax.GradientTransformation:
    """AdamW (optax's defaults: betas 0.9/0.999, decoupled weight decay 1e-4 times the rate),
    gradients clipped at 1.0 as SGD's are: the usual optimizer of transformers, for language-model
    hosts and their seeds. Neither is better everywhere. Training the tiny 2-layer width-64
    TinyStories host alone on synthetic bytes (batches of 16 x 32 tokens, cosine rate, weight decay
    0 in this measurement): after 400 steps SGD at 0.3 reached validation loss 3.30 without
    attention and 3.42 with it, AdamW at 3e-3 3.25 and 3.76; after 2,000 steps AdamW 3.06 and 2.13.
    On the TinyStories proof problem both make growth pay (see the proof preset)."""
    rate = _rate(learning_rate, schedule, total_steps)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(rate, weight_decay=1e-4))


def inner_optimizer(kind: OptimizerKind, learning_rate: float, schedule: LRSchedule = "constant",
                   total_steps: int | None = None) -> optax.GradientTransformation:
    """The optimizer ``kind`` (:data:`OPTIMIZERS`) at ``learning_rate`` under ``schedule``."""
    if kind == "sgd":
        return sgd_optimizer(learning_rate, schedule, total_steps)
    if kind == "adamw":
        return adamw_optimizer(learning_rate, schedule, total_steps)
    raise ValueError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")
