"""Rewards for the controller: the per-step scalar the inner environment hands to the learner.

This module owns :class:`RewardConfig` (all reward weights, one static, hashable config),
:class:`RewardSignals` (what the environment measured this step) and three reward kinds:

* ``"loss"`` — the loss-primary reward (Esper's Phase 2 design): a normalized, clipped loss delta (asymmetric
  if ``regression_penalty_scale`` < 1; symmetric by default, so that it telescopes), per-slot
  stage bonuses (zero by default), a terminal bonus for the improvement normalized by the task's
  achievable range, and parameter rent;
* ``"contribution"`` — Esper's contribution-based reward: the measured counterfactual
  contribution of blended seeds, potential-based stage shaping (PBRS), the terminal bonus and
  rent;
* ``"sparse"`` — the ablation: zero except at the terminal step (terminal bonus minus rent).

:func:`compute_reward` dispatches on ``config.kind`` (static) and always subtracts the
governor penalty when the governor rolled this step back. The loss and contribution kinds also
charge a *compute price*: ``compute_weight`` times the step's training compute beyond the host's,
in units of the host's whole episode (:func:`compute_price`), so that an episode's return is its
loss improvement minus ``compute_weight`` x the compute its growth cost (the issue "Learned growth
that pays": the objective is final loss plus lambda x training compute). Every function is pure ``jnp``:
jit- and vmap-able, with no Python control flow on traced values. Non-finite losses are read
as the worst case the clipping allows, so the reward is always a finite float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from esper_jax.lattice.lifecycle import BLENDED_STAGES, NUM_STAGES, Stage, in_stages

RewardKind = Literal["loss", "contribution", "sparse"]
REWARD_KINDS: tuple[RewardKind, ...] = ("loss", "contribution", "sparse")


def _per_stage(values: dict[Stage, float]) -> tuple[float, ...]:
    return tuple(float(values.get(stage, 0.0)) for stage in Stage)


# The loss-primary design keeps Phase 1's stage bonuses but gives no values; these were ours. They rise along
# the happy path (no stage on it is a trap) and FOSSILIZED keeps HOLDING's bonus (so a policy does
# not learn to hold seeds forever). They are not the default: measured on the proof preset's
# held-out envs, the heuristic earned 0.6 more return than static from them while ending with a
# worse network (+0.001 val loss), so a policy maximizing return would learn to farm them. Kept
# for ablations.
HAPPY_PATH_STAGE_BONUS = _per_stage({
    Stage.GERMINATED: 0.01,
    Stage.TRAINING: 0.02,
    Stage.BLENDING: 0.03,
    Stage.HOLDING: 0.04,
    Stage.FOSSILIZED: 0.04,
})
# The default: no stage bonus. A seed's value shows in the loss it improves.
DEFAULT_STAGE_BONUS = _per_stage({})

# Esper's PBRS potentials; stages off the happy path have potential 0.
DEFAULT_STAGE_POTENTIALS = _per_stage({
    Stage.GERMINATED: 1.0,
    Stage.TRAINING: 2.0,
    Stage.BLENDING: 3.5,
    Stage.HOLDING: 5.5,
    Stage.FOSSILIZED: 6.0,
})


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Reward weights. Frozen and hashable: it is passed to jitted code as static config.

    Loss-valued fields (``baseline_loss``, ``target_loss``, ``typical_loss_delta_std``) are
    task-specific; :func:`esper_jax.env.environment.make_env_config` fills them from the task.
    """

    kind: RewardKind = "loss"
    # loss-primary
    loss_delta_weight: float = 5.0
    max_loss_delta: float = 5.0             # clip of the normalized delta
    # Regressions cost this fraction of an equal improvement. The loss-primary design forgives half of a
    # regression (e.g. right after grafting); 1.0 makes the loss terms telescope, so the return
    # rises exactly as the final loss falls. With 0.5 an oscillating loss earns reward while
    # ending where it started, which pays a controller for making training noisy.
    regression_penalty_scale: float = 1.0
    typical_loss_delta_std: float = 0.1     # normalizes loss deltas and contributions
    baseline_loss: float = 2.3
    target_loss: float = 0.3
    terminal_loss_weight: float = 1.0
    stage_bonus: tuple[float, ...] = DEFAULT_STAGE_BONUS  # per Stage, per slot, per step
    # contribution-based (Esper)
    contribution_weight: float = 1.0
    max_contribution: float = 3.0           # clip, in typical-loss-delta units
    pbrs_coef: float = 0.3
    gamma: float = 0.995
    stage_potentials: tuple[float, ...] = DEFAULT_STAGE_POTENTIALS
    # shared
    rent_weight: float = 0.05               # per step: rent_weight * log1p(added_params / host_params)
    # per step: compute_weight * (this step's FLOPs beyond the host's) / (the host's episode FLOPs)
    compute_weight: float = 0.0
    governor_penalty: float = 1.0           # subtracted when the governor rolled back this step

    def __post_init__(self):
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"unknown reward kind {self.kind!r}; valid kinds are: {', '.join(REWARD_KINDS)}")
        for name in ("stage_bonus", "stage_potentials"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != NUM_STAGES:
                raise ValueError(f"{name} needs one value per Stage ({NUM_STAGES}), got {len(values)}")
            # Lists would make the config unhashable (and so unusable as static config).
            object.__setattr__(self, name, values)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            values = value if isinstance(value, tuple) else (value,)
            if field.name != "kind" and not all(math.isfinite(v) for v in values):
                raise ValueError(f"{field.name} must be finite, got {value!r}")
        # These signs are what makes the reward monotone in improvement and contribution.
        for name in ("loss_delta_weight", "max_loss_delta", "regression_penalty_scale", "terminal_loss_weight",
                     "contribution_weight", "max_contribution", "rent_weight", "compute_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.kind == "sparse" and self.compute_weight > 0:
            raise ValueError("compute_weight prices each step's compute, and the sparse reward is zero before the last "
                             "step: use the loss or contribution reward, or compute_weight 0")
        if self.typical_loss_delta_std <= 0:
            raise ValueError(f"typical_loss_delta_std must be positive, got {self.typical_loss_delta_std}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.achievable_range <= 0:
            raise ValueError(
                f"achievable_range = baseline_loss - target_loss must be positive, got "
                f"{self.baseline_loss} - {self.target_loss} = {self.achievable_range}"
            )

    @property
    def achievable_range(self) -> float:
        return self.baseline_loss - self.target_loss


@struct.dataclass
class RewardSignals:
    """What the environment measured this step (one env; vmap for a batch). Per-slot: ``[S]``."""

    val_loss: jax.Array               # after this step
    prev_val_loss: jax.Array          # before this step
    stage_before: jax.Array           # int32 [S]
    stage_after: jax.Array            # int32 [S]
    contribution: jax.Array           # float32 [S]: loss without the seed - loss with it (positive helps)
    contribution_measured: jax.Array  # bool [S]
    added_params: jax.Array           # parameters added by live/fossilized seeds (scalar or [S], summed)
    host_params: jax.Array            # host parameter count (> 0)
    is_terminal: jax.Array            # bool: last epoch of the episode
    rolled_back: jax.Array            # bool: the governor rolled back this step
    # this step's FLOPs beyond the host's, as a fraction of the host's episode FLOPs (0 without growth)
    seed_compute: jax.Array = 0.0


_F32_MAX = float(jnp.finfo(jnp.float32).max)


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------------------- components


def stage_potential(stages: jax.Array, config: RewardConfig) -> jax.Array:
    """Φ(s): the sum over slots of each slot's stage potential."""
    return jnp.sum(jnp.asarray(config.stage_potentials, jnp.float32)[jnp.asarray(stages, jnp.int32)], axis=-1)


def pbrs_shaping(stage_before: jax.Array, stage_after: jax.Array, config: RewardConfig) -> jax.Array:
    """Potential-based shaping ``pbrs_coef * (γ Φ(after) - Φ(before))`` (Ng et al. 1999): its
    discounted sum over an episode telescopes to ``pbrs_coef * (γ^T Φ_T - Φ_0)``, so it speeds
    up learning without changing which policy is optimal."""
    return config.pbrs_coef * (config.gamma * stage_potential(stage_after, config) - stage_potential(stage_before, config))


def _stage_bonus(stages: jax.Array, config: RewardConfig) -> jax.Array:
    return jnp.sum(jnp.asarray(config.stage_bonus, jnp.float32)[jnp.asarray(stages, jnp.int32)], axis=-1)


def _loss_delta_term(signals: RewardSignals, config: RewardConfig) -> jax.Array:
    """``-clip((val - prev)/std) * weight``, regressions scaled by regression_penalty_scale."""
    val, prev = _f32(signals.val_loss), _f32(signals.prev_val_loss)
    normalized = (val - prev) / config.typical_loss_delta_std
    # A non-finite loss after the step is the worst case: a full clipped regression. A
    # non-finite loss before it (only possible right after such a step, which was already
    # charged) says nothing about this step's change: no delta reward either way.
    normalized = jnp.where(jnp.isfinite(prev), normalized, 0.0)
    normalized = jnp.where(jnp.isfinite(val), normalized, config.max_loss_delta)
    clipped = jnp.clip(normalized, -config.max_loss_delta, config.max_loss_delta)
    # Asymmetric when regression_penalty_scale < 1: regressions are forgiven in part.
    clipped = jnp.where(clipped > 0, clipped * config.regression_penalty_scale, clipped)
    return -clipped * config.loss_delta_weight


def _terminal_improvement(signals: RewardSignals, config: RewardConfig) -> jax.Array:
    """``clamp((baseline - val)/achievable_range, 0, 1) * terminal_loss_weight`` at the terminal
    step, 0 before; normalizing by the achievable range makes it comparable across tasks."""
    val = _f32(signals.val_loss)
    normalized = jnp.clip((config.baseline_loss - val) / config.achievable_range, 0.0, 1.0)
    normalized = jnp.where(jnp.isfinite(val), normalized, 0.0)  # non-finite: no improvement
    return jnp.where(jnp.asarray(signals.is_terminal, bool), normalized * config.terminal_loss_weight, 0.0)


def parameter_rent(added, host, rent_weight: float):
    """``rent_weight * log1p(added / host)``, per step. log1p keeps small seeds cheap and the
    cost of large ones growing slowly (Esper's scaling); it is 0 with no added parameters.
    The reward charges it each step; evaluation charges the same rent to a finished episode."""
    return rent_weight * jnp.log1p(jnp.asarray(added) / host)


def _rent(signals: RewardSignals, config: RewardConfig) -> jax.Array:
    """:func:`parameter_rent` of the step's signals, robust to non-finite counts."""
    added = jnp.sum(jnp.nan_to_num(_f32(signals.added_params), nan=0.0, posinf=_F32_MAX, neginf=0.0))
    added = jnp.clip(added, 0.0, _F32_MAX)
    # A host count below one parameter (or non-finite) would blow the ratio up: floor it at 1.
    host = jnp.maximum(jnp.nan_to_num(_f32(signals.host_params), nan=1.0, posinf=_F32_MAX, neginf=1.0), 1.0)
    return parameter_rent(added, host, config.rent_weight)


def compute_price(signals: RewardSignals, config: RewardConfig) -> jax.Array:
    """``compute_weight * seed_compute``: what this step's compute beyond the host's costs. Summed
    over an episode it is ``compute_weight`` x (episode FLOPs / the static host's - 1), so lambda = 1
    trades one unit of terminal reward for doubling the static host's compute. Non-finite counts
    are charged nothing rather than poisoning the return (they cannot arise from a count)."""
    extra = jnp.nan_to_num(_f32(signals.seed_compute), nan=0.0, posinf=0.0, neginf=0.0)
    return config.compute_weight * jnp.maximum(extra, 0.0)


def _contribution_term(signals: RewardSignals, config: RewardConfig) -> jax.Array:
    """Summed measured contribution of blended seeds, in typical-loss-delta units (contributions
    arrive in loss units, as small as the loss deltas), clipped to ±max_contribution.

    Each slot is clipped before the sum as well, so one non-finite slot cannot poison the sum;
    a NaN contribution counts as the worst case."""
    m = config.max_contribution
    c = _f32(signals.contribution) / config.typical_loss_delta_std
    c = jnp.clip(jnp.nan_to_num(c, nan=-m, posinf=m, neginf=-m), -m, m)
    counted = jnp.asarray(signals.contribution_measured, bool) & in_stages(signals.stage_after, BLENDED_STAGES)
    total = jnp.clip(jnp.sum(jnp.where(counted, c, 0.0), axis=-1), -m, m)
    return config.contribution_weight * total


# ---------------------------------------------------------------------------- reward kinds


def loss_primary_reward(signals: RewardSignals, config: RewardConfig) -> jax.Array:
    """The loss-primary reward (without the governor penalty)."""
    return (
        _loss_delta_term(signals, config)
        + _stage_bonus(signals.stage_after, config)
        + _terminal_improvement(signals, config)
        - _rent(signals, config)
        - compute_price(signals, config)
    )


def contribution_reward(signals: RewardSignals, config: RewardConfig) -> jax.Array:
    """Esper's contribution-based reward (without the governor penalty)."""
    return (
        _contribution_term(signals, config)
        + pbrs_shaping(signals.stage_before, signals.stage_after, config)
        + _terminal_improvement(signals, config)
        - _rent(signals, config)
        - compute_price(signals, config)
    )


def sparse_reward(signals: RewardSignals, config: RewardConfig) -> jax.Array:
    """Terminal-only reward for ablations: 0 before the last step (rent included there)."""
    terminal = _terminal_improvement(signals, config) - _rent(signals, config)
    return jnp.where(jnp.asarray(signals.is_terminal, bool), terminal, 0.0)


_REWARD_FNS = {"loss": loss_primary_reward, "contribution": contribution_reward, "sparse": sparse_reward}


def compute_reward(signals: RewardSignals, config: RewardConfig) -> jax.Array:
    """The reward of one step: ``config.kind``'s reward minus the governor penalty on rollback.

    The kind is chosen in Python (the config is static), so only one kind is traced."""
    reward = _REWARD_FNS[config.kind](signals, config)
    reward = reward - config.governor_penalty * jnp.asarray(signals.rolled_back, jnp.float32)
    return jnp.asarray(reward, jnp.float32)


__all__ = [
    "REWARD_KINDS",
    "DEFAULT_STAGE_BONUS",
    "DEFAULT_STAGE_POTENTIALS",
    "HAPPY_PATH_STAGE_BONUS",
    "RewardConfig",
    "RewardSignals",
    "stage_potential",
    "pbrs_shaping",
    "parameter_rent",
    "compute_price",
    "loss_primary_reward",
    "contribution_reward",
    "sparse_reward",
    "compute_reward",
]
