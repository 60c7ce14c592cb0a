"""On-device PPO for the morphogenetic environment (PureJaxRL structure).

API skeleton; the implementation follows in the next commit. See /tmp/plan/SPEC.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    num_envs: int = 4
    rollout_steps: int = 0
    update_epochs: int = 4
    num_minibatches: int = 4
    gamma: float = 0.995
    gae_lambda: float = 0.98
    clip_eps: float = 0.2
    vf_coef: float = 0.5
    max_grad_norm: float = 5.0
    target_kl: float | None = 0.015
    learning_rate: float = 3e-4
    ent_coef: float = 0.05
    hidden_size: int = 128
    recurrent: str = "none"
    normalize_obs: bool = True


@struct.dataclass
class Hyperparams:
    learning_rate: jax.Array
    ent_coef: jax.Array

    @classmethod
    def default(cls, config: PPOConfig) -> "Hyperparams":
        return cls(jnp.asarray(config.learning_rate, jnp.float32), jnp.asarray(config.ent_coef, jnp.float32))


@struct.dataclass
class RunnerState:
    params: Any
    opt_state: Any
    obs_stats: Any
    env_state: Any
    obs: jax.Array
    policy_carry: Any
    key: jax.Array
    update: jax.Array
    hyper: Hyperparams
    episode_start: jax.Array
    episode_return: jax.Array


class Trainer(NamedTuple):
    init: Callable
    train_chunk: Callable
    act: Callable
    init_carry: Callable


def make_train(config: PPOConfig, env, updates_per_chunk: int) -> Trainer:
    raise NotImplementedError("skeleton: implementation in progress")
