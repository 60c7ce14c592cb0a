"""On-device PPO for the morphogenetic environment, in PureJaxRL's structure.

``make_train(config, env, updates_per_chunk, teacher=None)`` returns a :class:`Trainer` of pure functions.
``train_chunk`` runs ``updates_per_chunk`` PPO updates in one ``lax.scan``; each update is

1. a rollout: ``lax.scan`` over ``rollout_steps`` steps of the explicit-population environment
   (``env.population_step`` on ``num_envs`` members). Observations are normalized with running
   statistics updated from every observation the rollout sees. Environments whose episode ended
   are reset inside the scan with fresh keys (the environment never resets itself);
2. GAE by a reverse ``lax.scan``;
3. ``update_epochs`` epochs of shuffled minibatch updates, each a ``lax.scan``. With
   ``target_kl`` set, an update whose minibatch KL (measured before its step, as in
   Stable-Baselines3) exceeds ``1.5 * target_kl`` is masked out together with every later one of
   that update: no Python control flow on traced values.

Everything from the rollout to the parameter update is inside one jitted program with no
host round trip. The learning rate (inside ``optax.inject_hyperparams``) and the entropy
coefficient are traced per-learner values (:class:`Hyperparams`), so a population of learners
is ``jax.vmap(trainer.init, in_axes=(0, 0, None))`` and
``jax.vmap(trainer.train_chunk, in_axes=(0, None))``.

End of an episode. The environment's ``done`` comes from a fixed horizon
(``epoch >= episode_epochs``) that is part of the task: the observation holds the epoch
fraction and the reward pays its terminal term on the last epoch, so the state after the last
epoch has no future and GAE treats ``done`` as terminal by default (``bootstrap_on_done=False``).
``bootstrap_on_done=True`` treats it as a time-limit truncation instead and bootstraps with the
value of the final observation (computed in the rollout, before the reset). A rollout that
stops in the middle of episodes (``rollout_steps`` not a multiple of the episode) is always
bootstrapped from the value of the next observation.

Kickstarting (``kickstart_coef`` > 0, with a ``teacher``: Schmitt et al. 2018, "Kickstarting deep
reinforcement learning"). The teacher (a controller, e.g. the best fixed schedule chosen on
calibration envs) also labels every state of the policy's own rollouts with its action, and the
loss adds ``kickstart_coef`` x -log pi(teacher's action) over the heads relevant to that action.
Why: on the growth problem, PPO started from a behaviour-cloned teacher (:mod:`esper_jax.rl.imitation`)
drifted away from it within 40 updates, to a policy worse than the teacher on the held-out envs;
with the distillation term the policy departs from the teacher only where the advantage outweighs
it, per state. The coefficient is constant over the run.

Problem groups (``group_size`` G > 1). The envs come in groups of G that share everything but the
policy's own sampling: the reset key (so the drawn problem, the host's initialization) and every
step key (so the batches, augmentation and governor). Each env's reward is then counted, for
learning only, relative to the mean reward of the other G - 1 envs of its group at the same step
(the leave-one-out baseline of RLOO, Kool et al. 2019; GRPO's group baseline, Shao et al. 2024).
The others' rewards do not depend on this env's actions, so the policy gradient stays unbiased,
and what the env-to-env spread of the problems adds to every return cancels: two envs of a
group that act alike earn exactly zero. Why: on the growth problem the value of a per-problem
decision (grow on large training sets only) is a few hundredths of loss, while the final loss of
one problem differs from another's by tenths, and the critic left most of that spread in the
advantages (explained variance 0.3 to 0.7 over the kickstarted CIFAR runs' last ten updates).
Measured since: pairs (G = 2) did not change what the CIFAR and MNIST runs learned (README,
"Problem groups"). Episode returns in the metrics stay the env's own. Costs: G envs per problem,
so a population of N envs sees N / G problems per update.

Recurrent policies: minibatches are sets of whole environment sequences, replayed from the
carry the rollout started with, with the carry reset at the same episode starts as in the
rollout. MLP policies: minibatches are shuffled individual steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from esper_jax.rl import normalize
from esper_jax.env.actions import HEADS, ActionMasks, ActionSpace, FactoredAction
from esper_jax.env.controllers import plan_names
from esper_jax.trees import select
from esper_jax.rl.policy import (
    RECURRENT_KINDS, Policy, Recurrent, evaluate_actions, evaluate_actions_raw, masked_logits, sample_action,
)

PlanInputs = Literal["observation", "problem"]
PLAN_INPUTS: tuple[PlanInputs, ...] = ("observation", "problem")
# How the plan policy scores the menu: one logit per entry of this menu ("fixed"), or one network
# that scores each plan from its task-independent description ("scorer": esper_jax.rl.scorer).
PlanHead = Literal["fixed", "scorer"]
PLAN_HEADS: tuple[PlanHead, ...] = ("fixed", "scorer")

# A minibatch whose KL before its step exceeds this multiple of target_kl stops the update
# (Stable-Baselines3's rule).
KL_STOP_FACTOR = 1.5


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Static learner configuration; defaults from Esper's PPO (Adam 3e-4, gamma 0.995, lambda 0.98, clip 0.2,
    value coefficient 0.5, max grad norm 5, target KL 0.015)."""

    num_envs: int = 4
    rollout_steps: int = 0       # 0 = the env's episode_epochs (one whole episode per update)
    update_epochs: int = 4
    num_minibatches: int = 4
    gamma: float = 0.995
    gae_lambda: float = 0.98
    clip_eps: float = 0.2
    vf_coef: float = 0.5
    max_grad_norm: float = 5.0
    target_kl: float | None = 0.015
    learning_rate: float = 3e-4  # default value of Hyperparams.learning_rate
    ent_coef: float = 0.05       # default value of Hyperparams.ent_coef
    hidden_size: int = 128
    recurrent: Recurrent = "none"
    normalize_obs: bool = True
    normalize_advantages: bool = True  # per minibatch
    bootstrap_on_done: bool = False    # see the module docstring
    adam_eps: float = 1e-5
    kickstart_coef: float = 0.0        # weight of -log pi(teacher's action) (see the module docstring); 0 = off
    group_size: int = 1                # envs per problem group (see the module docstring); 1 = off
    # Decide once per episode: the menu of plans (fixed schedules and/or "static") the learner of
    # esper_jax.rl.plans chooses among at each episode's first observation; () = this per-epoch learner.
    plans: tuple[str, ...] = ()
    # What the plan policy sees: the whole first observation, or only its features of the drawn problem
    # (known before anything trains; esper_jax.rl.plans.PROBLEM_FEATURES).
    plan_inputs: PlanInputs = "observation"
    plan_head: PlanHead = "fixed"

    def __post_init__(self):
        object.__setattr__(self, "plans", tuple(self.plans))  # JSON gives a list
        if self.plans:
            self._check_plans()
        elif self.plan_inputs != "observation":
            raise ValueError("--plan-inputs chooses what the plan policy sees: give the menu with --plans, or leave it out")
        elif self.plan_head != "fixed":
            raise ValueError("--plan-head chooses how the plan policy scores its menu: give the menu with --plans, "
                             "or leave it out")
        for name in ("num_envs", "update_epochs", "num_minibatches", "hidden_size", "group_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_envs % self.group_size:
            raise ValueError(f"--group-size {self.group_size} splits the {self.num_envs} envs into groups that share "
                             f"a problem: give a number of envs (--envs) that is a multiple of it")
        if self.rollout_steps < 0:
            raise ValueError(f"rollout_steps must be >= 0 (0 = one episode), got {self.rollout_steps}")
        if self.recurrent not in RECURRENT_KINDS:
            raise ValueError(f"recurrent must be one of {', '.join(RECURRENT_KINDS)}, got {self.recurrent!r}")
        # Values that cannot be right are refused here, not discovered as NaN losses later.
        for name, low, high, low_open in LEARNER_RANGES:
            value = getattr(self, name)
            if name == "target_kl" and value is None:
                continue
            inside = isinstance(value, (int, float)) and math.isfinite(value) and (
                value > low if low_open else value >= low) and value <= high
            if not inside:
                bounds = f"{'>' if low_open else '>='} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a finite number {bounds}, got {value!r}")

    def _check_plans(self) -> None:
        try:
            names = plan_names(self.plans)
        except ValueError as error:
            raise ValueError(f"--plans: {error}") from None
        if len(names) < 2:
            raise ValueError(f"--plans needs two plans or more to choose among, got {', '.join(names) or 'none'}")
        if len(set(names)) != len(names):
            raise ValueError(f"--plans names a plan twice: {', '.join(names)}")
        if self.num_envs % self.num_minibatches:
            raise ValueError(f"--plans learns from minibatches of envs, one decision each: --envs ({self.num_envs}) "
                             f"must be a multiple of --minibatches ({self.num_minibatches})")
        if self.plan_inputs not in PLAN_INPUTS:
            raise ValueError(f"--plan-inputs must be one of {', '.join(PLAN_INPUTS)}, got {self.plan_inputs!r}")
        if self.plan_head not in PLAN_HEADS:
            raise ValueError(f"--plan-head must be one of {', '.join(PLAN_HEADS)}, got {self.plan_head!r}")
        refused = {"rollout_steps": self.rollout_steps != 0, "recurrent": self.recurrent != "none",
                   "kickstart_coef": self.kickstart_coef > 0}
        for name, given in refused.items():
            if given:
                raise ValueError(f"--plans decides once per episode from its first observation and learns from the "
                                 f"whole episode's return: --{name.replace('_', '-')} does not apply; leave it out")


# The learner's real-valued settings: (name, low, high, low bound excluded). Adam with a learning
# rate above 1, a discount above 1, a clip range of 1 or more, or a negative value coefficient
# only diverges; a zero Adam epsilon divides by zero on a zero gradient.
LEARNER_RANGES = (
    ("learning_rate", 0.0, 1.0, True), ("ent_coef", 0.0, math.inf, False), ("gamma", 0.0, 1.0, True),
    ("gae_lambda", 0.0, 1.0, False), ("clip_eps", 0.0, 1.0, True), ("vf_coef", 0.0, math.inf, False),
    ("max_grad_norm", 0.0, math.inf, True), ("target_kl", 0.0, math.inf, True), ("adam_eps", 0.0, 1.0, True),
    ("kickstart_coef", 0.0, math.inf, False),
)


@struct.dataclass
class Hyperparams:
    """Per-learner values, traced (so a population vmaps over them)."""

    learning_rate: jax.Array
    ent_coef: jax.Array

    @classmethod
    def default(cls, config: PPOConfig) -> "Hyperparams":
        return cls.make(config.learning_rate, config.ent_coef)

    @classmethod
    def make(cls, learning_rate, ent_coef) -> "Hyperparams":
        """Scalars, or arrays with a leading population axis."""
        return cls(jnp.asarray(learning_rate, jnp.float32), jnp.asarray(ent_coef, jnp.float32))


@struct.dataclass
class RunnerState:
    """Everything needed to continue training (what a checkpoint saves)."""

    params: Any
    opt_state: Any               # optax chain(clip, inject_hyperparams(adam)) over the raveled parameters;
                                 # holds the learning rate
    obs_stats: normalize.RunningStats
    env_state: Any               # EnvState with leaves [num_envs, ...]
    obs: jax.Array               # [num_envs, D] raw (unnormalized) current observations
    policy_carry: Any            # recurrent carry [num_envs, H] (LSTM: (c, h)); () for the MLP policy
    key: jax.Array
    update: jax.Array            # int32: updates done
    hyper: Hyperparams
    episode_start: jax.Array     # [num_envs] bool: obs is the first of an episode (resets the carry)
    episode_return: jax.Array    # [num_envs] float32: undiscounted return of the running episodes


class PopulationEnv(Protocol):
    """What the learner needs of an environment: an explicit population axis (every leaf leads
    with ``num_envs``), a fixed episode length, factored actions with masks. ``info`` of a step
    holds per-env ``val_loss``, ``val_accuracy`` and the episode's counts so far (``germinated``,
    ``fossilized``, ``pruned``, ``rollbacks``), reported when an episode ends."""

    observation_size: int
    action_space: ActionSpace
    episode_epochs: int

    def population_reset(self, keys: jax.Array, data: Any) -> tuple[jax.Array, Any]: ...

    def population_step(self, keys: jax.Array, state: Any, action: FactoredAction,
                        data: Any) -> tuple[jax.Array, Any, jax.Array, jax.Array, dict[str, jax.Array]]: ...

    def population_masks(self, state: Any) -> ActionMasks: ...


class Transition(NamedTuple):
    obs: jax.Array               # normalized, as the policy saw it
    episode_start: jax.Array
    action: FactoredAction
    masks: ActionMasks
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    done: jax.Array
    final_value: jax.Array       # value of the observation before a reset (used with bootstrap_on_done)
    teacher_action: FactoredAction | None  # what the kickstarting teacher would do here; None without kickstarting


class EpisodeStats(NamedTuple):
    """Per env at every rollout step; averaged over the steps where an episode ended."""

    episode_return: jax.Array
    val_loss: jax.Array
    val_accuracy: jax.Array
    germinated: jax.Array
    fossilized: jax.Array
    pruned: jax.Array
    rollbacks: jax.Array


class Batch(NamedTuple):
    """What the minibatch epochs learn from: the rollout, its advantages and returns, and (for a
    recurrent policy) the carry the rollout started from, leaves ``[N, ...]``; ``()`` otherwise."""

    transition: Transition
    advantages: jax.Array
    returns: jax.Array
    carry: Any


class LossInfo(NamedTuple):
    """One minibatch step's losses, and the per-head entropy parts ``learn`` combines."""

    policy_loss: jax.Array
    value_loss: jax.Array
    approx_kl: jax.Array
    clip_fraction: jax.Array
    teacher_nll: jax.Array        # -log pi(teacher's action), mean over the minibatch (0 without kickstarting)
    head_entropy_sum: jax.Array   # [H]: entropy summed over the samples where the head mattered
    head_relevant: jax.Array      # [H]: how many samples that was
    head_entropy_mean: jax.Array  # [H]: plain mean entropy (for a head that never mattered)


class UpdateMetrics(NamedTuple):
    """One PPO update's metrics (each a scalar; a chunk stacks them ``[updates_per_chunk]``)."""

    update: jax.Array
    env_steps: jax.Array
    mean_return: jax.Array              # episode statistics: means over the episodes that ended
    mean_final_val_loss: jax.Array      # in the update's rollout (NaN if none did)
    mean_final_val_accuracy: jax.Array
    germinated: jax.Array
    fossilized: jax.Array
    pruned: jax.Array
    rollbacks: jax.Array
    episodes: jax.Array
    policy_loss: jax.Array              # learning: means over the minibatch steps applied
    value_loss: jax.Array
    approx_kl: jax.Array
    clip_fraction: jax.Array
    explained_variance: jax.Array
    teacher_nll: jax.Array              # kickstarting: mean -log pi(teacher's action); NaN without it
    entropy: jax.Array                  # [H]: per head, over the samples where the head mattered
    minibatch_updates: jax.Array
    kl_stopped: jax.Array
    nonfinite: jax.Array                # 1 when the learner's parameters or losses are no longer finite

    def columns(self) -> dict[str, jax.Array]:
        """Flat named columns, one per metric (``entropy`` becomes ``entropy_<head>``)."""
        out = {name: value for name, value in zip(self._fields, self) if name != "entropy"}
        out.update({f"entropy_{h}": self.entropy[..., i] for i, h in enumerate(HEADS)})
        return out


METRIC_NAMES = tuple(name for name in UpdateMetrics._fields if name != "entropy") + tuple(f"entropy_{h}" for h in HEADS)


class Trainer(NamedTuple):
    init: Callable                # (key, hyper, data) -> RunnerState
    train_chunk: Callable         # (runner, data) -> (runner, UpdateMetrics with leaves [updates_per_chunk])
    act: Callable                 # (params, obs_stats, obs, masks, carry, key, deterministic=False,
                                  #  episode_start=None) -> (FactoredAction, carry)
    op_distribution: Callable     # (params, obs_stats, obs, masks, carry, episode_start=None) ->
                                  #  (P(op) [N, num_ops], value [N])
    init_carry: Callable          # (num_envs) -> carry
    policy: Policy
    masks: Callable               # (env_state with leaves [N, ...]) -> ActionMasks with leaves [N, ...]
    rollout_steps: int
    updates_per_chunk: int
    config: PPOConfig
    rollout: Callable             # (runner, data, key, teacher=None) -> (runner, Transition [T, N],
                                  #  EpisodeStats [T, N], last_value [N]): one rollout without learning
                                  #  (tests, diagnostics, a teacher's episodes for imitation)


# ---------------------------------------------------------------------------- pure pieces


def compute_gae(rewards, values, dones, last_value, gamma: float, gae_lambda: float, final_values=None):
    """Generalized advantage estimation over ``[T, N]`` arrays by a reverse scan.

    ``values[t]`` is V(obs_t), ``last_value`` V of the observation after the last step.
    ``dones[t]`` ends the episode after step t; the next value is then 0 (terminal) or, when
    ``final_values`` is given, ``final_values[t]`` (time-limit truncation: V of the final
    observation). Either way the advantage does not flow back across an episode boundary.
    Returns ``(advantages, returns = advantages + values)``."""
    dones = dones.astype(jnp.float32)
    next_values = jnp.concatenate([values[1:], last_value[None]], axis=0)
    after_done = jnp.zeros_like(values) if final_values is None else final_values
    next_values = jnp.where(dones > 0, after_done, next_values)
    deltas = rewards + gamma * next_values - values

    def back(advantage, inputs):
        delta, done = inputs
        advantage = delta + gamma * gae_lambda * (1.0 - done) * advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(back, jnp.zeros_like(last_value), (deltas, dones), reverse=True)
    return advantages, advantages + values


def group_keys(key: jax.Array, num_envs: int, group_size: int) -> jax.Array:
    """``num_envs`` keys for a population in groups of ``group_size`` consecutive envs that share
    theirs: ``jax.random.split(key, num_envs)`` when the group size is 1."""
    return jnp.repeat(jax.random.split(key, num_envs // group_size), group_size, axis=0)


def relative_to_group(rewards: jax.Array, group_size: int) -> jax.Array:
    """Rewards ``[..., N]`` minus the mean of the other ``group_size - 1`` envs of each env's group
    (groups of consecutive envs on the last axis); unchanged when the group size is 1."""
    if group_size == 1:
        return rewards
    grouped = rewards.reshape(rewards.shape[:-1] + (-1, group_size))
    others = (grouped.sum(-1, keepdims=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(rewards.shape)


def explained_variance(values, returns):
    """``1 - Var(returns - values) / Var(returns)``; 0 when the returns are constant."""
    var_y = jnp.var(returns)
    return jnp.where(var_y > 1e-8, 1.0 - jnp.var(returns - values) / jnp.maximum(var_y, 1e-8), 0.0)


def make_optimizer(config: PPOConfig, learning_rate) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam with the learning rate as an injected (traced) value."""
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate, eps=config.adam_eps))


def set_hyperparams(runner: RunnerState, hyper: Hyperparams) -> RunnerState:
    """Change a learner's hyperparameters (e.g. for population-based training); the learning
    rate lives in the optimizer state, where optax finds it by name."""
    opt_state = optax.tree_utils.tree_set(runner.opt_state, learning_rate=hyper.learning_rate)
    return runner.replace(opt_state=opt_state, hyper=hyper)


def _masked_mean(x, weight):
    total = jnp.sum(weight)
    return jnp.where(total > 0, jnp.sum(x * weight) / jnp.maximum(total, 1e-8), jnp.mean(x))


def _per_episode(x: jax.Array, done: jax.Array, episodes: jax.Array) -> jax.Array:
    """The mean of ``x`` over the steps where an episode ended (NaN if none did)."""
    return jnp.where(episodes > 0, jnp.sum(x.astype(jnp.float32) * done) / episodes, jnp.nan)


def clipped_surrogate(log_prob, old_log_prob, advantages, clip_eps: float):
    """PPO's clipped policy loss and its diagnostics: ``(loss, approx_kl, clip_fraction)``, means over the
    samples (the KL estimate is ``(r - 1) - log r``, Schulman's low-variance one)."""
    log_ratio = log_prob - old_log_prob
    ratio = jnp.exp(log_ratio)
    loss = -jnp.mean(jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * advantages))
    return (loss, jnp.mean((ratio - 1.0) - log_ratio),
            jnp.mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)))


def kl_stopped_step(config: PPOConfig, tx: optax.GradientTransformation, flat, opt_state, stopped, grads, approx_kl):
    """One Adam step on the raveled parameters, skipped (and every later one of the update with it) once a
    minibatch's KL before its step exceeds ``KL_STOP_FACTOR x target_kl``: ``(flat, opt_state, stopped)``."""
    if config.target_kl is not None:
        stopped = stopped | (approx_kl > KL_STOP_FACTOR * config.target_kl)
    updates, new_opt_state = tx.update(ravel_pytree(grads)[0], opt_state, flat)
    flat, opt_state = select(stopped, (flat, opt_state), (flat + updates, new_opt_state))
    return flat, opt_state, stopped


def ppo_loss(policy: Policy, config: PPOConfig, params, batch: Batch, ent_coef) -> tuple[jax.Array, LossInfo]:
    """The clipped PPO objective on one minibatch: policy loss + ``vf_coef`` x value loss -
    ``ent_coef`` x the entropy of the heads that mattered for each sampled action."""
    traj = batch.transition
    if config.recurrent != "none":
        _, logits, values = policy.unroll(params, batch.carry, traj.obs, traj.episode_start)
    else:
        _, logits, values = policy.apply(params, (), traj.obs, traj.episode_start)
    log_prob, raw, rel = evaluate_actions_raw(logits, traj.masks, traj.action)
    entropies = jnp.stack([raw[h] for h in HEADS], axis=-1)       # [..., H]
    relevant_entropies = rel * entropies
    adv = batch.advantages
    if config.normalize_advantages:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    policy_loss, approx_kl, clip_fraction = clipped_surrogate(log_prob, traj.log_prob, adv, config.clip_eps)
    value_loss = 0.5 * jnp.mean(jnp.square(values - batch.returns))
    entropy = relevant_entropies.sum(-1).mean()
    loss = policy_loss + config.vf_coef * value_loss - ent_coef * entropy
    teacher_nll = jnp.zeros(())
    if config.kickstart_coef > 0:
        teacher_log_prob, _, _ = evaluate_actions_raw(logits, traj.masks, traj.teacher_action)
        teacher_nll = -jnp.mean(teacher_log_prob)
        loss = loss + config.kickstart_coef * teacher_nll
    info = LossInfo(
        policy_loss=policy_loss, value_loss=value_loss, approx_kl=approx_kl, clip_fraction=clip_fraction,
        teacher_nll=teacher_nll,
        head_entropy_sum=relevant_entropies.reshape(-1, len(HEADS)).sum(0),
        head_relevant=rel.reshape(-1, len(HEADS)).sum(0),
        head_entropy_mean=entropies.reshape(-1, len(HEADS)).mean(0),
    )
    return loss, info


def shuffled_minibatches(config: PPOConfig, batch: Batch, key: jax.Array) -> Batch:
    """The rollout batch (leaves ``[T, N, ...]``, carry ``[N, ...]``) shuffled and split into
    ``num_minibatches`` along a new leading axis: whole environment sequences for a recurrent
    policy (its carry replays them), single steps for an MLP."""
    if config.recurrent != "none":
        num_envs = batch.advantages.shape[1]
        perm = jax.random.permutation(key, num_envs)
        split = lambda axis: lambda x: jnp.moveaxis(jnp.take(x, perm, axis=axis).reshape(
            x.shape[:axis] + (config.num_minibatches, -1) + x.shape[axis + 1:]), axis, 0)
        steps_major = jax.tree.map(split(1), batch._replace(carry=()))
        return steps_major._replace(carry=jax.tree.map(split(0), batch.carry))
    perm = jax.random.permutation(key, batch.advantages.size)
    flat = lambda x: jnp.take(x.reshape((-1,) + x.shape[2:]), perm, axis=0).reshape(
        (config.num_minibatches, -1) + x.shape[2:])
    return jax.tree.map(flat, batch)


# ---------------------------------------------------------------------------- the trainer


def make_train(config: PPOConfig, env: PopulationEnv, updates_per_chunk: int, teacher: Callable | None = None) -> Trainer:
    """The learner's pure functions. ``teacher`` (``(keys [N], env_state) -> FactoredAction [N]``) labels
    the rollouts for kickstarting; it is required when ``config.kickstart_coef`` > 0 and unused otherwise."""
    if updates_per_chunk <= 0:
        raise ValueError(f"updates_per_chunk must be positive, got {updates_per_chunk}")
    if config.kickstart_coef > 0 and teacher is None:
        raise ValueError(f"kickstart_coef {config.kickstart_coef} distills a teacher's actions: give the teacher "
                         "(--imitate TEACHER), or kickstart_coef 0")
    labeler = teacher if config.kickstart_coef > 0 else None
    num_envs = config.num_envs
    episode = env.episode_epochs
    steps = config.rollout_steps or episode
    # Envs start together and every episode has the same length, so when a rollout is a whole
    # number of episodes the resets happen at known steps: a condition on the step index is
    # unbatched even under a vmap over learners, so the reset stays a real conditional.
    aligned = steps % episode == 0
    recurrent = config.recurrent != "none"
    if recurrent:
        if num_envs % config.num_minibatches:
            raise ValueError(f"a recurrent policy splits minibatches by environment: num_envs ({num_envs}) "
                             f"must be a multiple of num_minibatches ({config.num_minibatches})")
    elif (steps * num_envs) % config.num_minibatches:
        raise ValueError(f"rollout_steps x num_envs ({steps} x {num_envs}) must be a multiple of "
                         f"num_minibatches ({config.num_minibatches})")

    policy = Policy.make(env.action_space.head_sizes(), config.hidden_size, config.recurrent)
    # Only `update` is used from this one: it reads the learning rate from the optimizer state.
    tx = make_optimizer(config, config.learning_rate)
    obs_size = env.observation_size

    def norm(stats, obs):
        return normalize.apply(stats, obs) if config.normalize_obs else obs

    def env_keys(key):  # the envs' reset and step keys: shared within a problem group
        return group_keys(key, num_envs, config.group_size)

    def init(key: jax.Array, hyper: Hyperparams, data) -> RunnerState:
        k_net, k_env, k_run = jax.random.split(key, 3)
        obs, env_state = env.population_reset(env_keys(k_env), data)
        params = policy.init(k_net, obs_size)
        return RunnerState(
            params=params, opt_state=make_optimizer(config, hyper.learning_rate).init(ravel_pytree(params)[0]),
            obs_stats=normalize.init(obs_size), env_state=env_state, obs=obs,
            policy_carry=policy.initial_carry(num_envs), key=k_run, update=jnp.zeros((), jnp.int32), hyper=hyper,
            episode_start=jnp.ones((num_envs,), bool), episode_return=jnp.zeros((num_envs,), jnp.float32),
        )

    # ------------------------------------------------------------------ rollout

    class RolloutCarry(NamedTuple):
        obs_stats: normalize.RunningStats
        env_state: Any
        obs: jax.Array
        policy_carry: Any
        episode_start: jax.Array
        episode_return: jax.Array
        key: jax.Array

    def rollout(runner: RunnerState, data, key, teacher: Callable | None = None):
        """One rollout; with a ``teacher`` (``(keys [N], env_state) -> FactoredAction [N]``) the teacher
        acts instead of the policy (warm start by imitation, :mod:`esper_jax.rl.imitation`), and
        ``log_prob`` is the policy's log-probability of the teacher's action. When kickstarting, the
        trainer's teacher labels each state (``teacher_action``)."""
        params = runner.params

        def step(carry: RolloutCarry, t):
            key, k_act, k_env, k_reset = jax.random.split(carry.key, 4)
            stats = normalize.update(carry.obs_stats, carry.obs) if config.normalize_obs else carry.obs_stats
            nobs = norm(stats, carry.obs)
            masks = env.population_masks(carry.env_state)
            pcarry, logits, value = policy.apply(params, carry.policy_carry, nobs, carry.episode_start)
            if teacher is None:
                action = sample_action(k_act, logits, masks)
            else:
                action = teacher(jax.random.split(k_act, num_envs), carry.env_state)
            if labeler is None:
                teacher_action = None
            elif teacher is not None:  # a teacher that acts is the one to follow
                teacher_action = action
            else:
                teacher_action = labeler(jax.random.split(jax.random.fold_in(k_act, 1), num_envs), carry.env_state)
            log_prob, _, _ = evaluate_actions(logits, masks, action)
            next_obs, next_state, reward, done, info = env.population_step(
                env_keys(k_env), carry.env_state, action, data)
            reward = reward.astype(jnp.float32)
            if config.bootstrap_on_done:
                _, _, final_value = policy.apply(params, pcarry, norm(stats, next_obs), jnp.zeros_like(done))
            else:
                final_value = jnp.zeros_like(value)
            episode_return = carry.episode_return + reward
            stats_now = EpisodeStats(episode_return, info["val_loss"], info["val_accuracy"], info["germinated"],
                                     info["fossilized"], info["pruned"], info["rollbacks"])

            def reset(operand):
                next_obs, next_state = operand
                reset_obs, reset_state = env.population_reset(env_keys(k_reset), data)
                return select(done, (reset_obs, reset_state), (next_obs, next_state))

            any_reset = (t + 1) % episode == 0 if aligned else jnp.any(done)
            next_obs, next_state = jax.lax.cond(any_reset, reset, lambda operand: operand, (next_obs, next_state))
            transition = Transition(nobs, carry.episode_start, action, masks, log_prob, value, reward, done, final_value,
                                    teacher_action)
            carry = RolloutCarry(stats, next_state, next_obs, pcarry, done, jnp.where(done, 0.0, episode_return), key)
            return carry, (transition, stats_now)

        carry = RolloutCarry(runner.obs_stats, runner.env_state, runner.obs, runner.policy_carry,
                             runner.episode_start, runner.episode_return, key)
        carry, (traj, episode_stats) = jax.lax.scan(step, carry, jnp.arange(steps))
        _, _, last_value = policy.apply(params, carry.policy_carry, norm(carry.obs_stats, carry.obs),
                                        carry.episode_start)
        runner = runner.replace(obs_stats=carry.obs_stats, env_state=carry.env_state, obs=carry.obs,
                                policy_carry=carry.policy_carry, episode_start=carry.episode_start,
                                episode_return=carry.episode_return)
        return runner, traj, episode_stats, last_value

    # ------------------------------------------------------------------ loss and update

    grad_fn = jax.value_and_grad(functools.partial(ppo_loss, policy, config), has_aux=True)

    def learn(params, opt_state, batch: Batch, key, ent_coef):
        """``update_epochs`` epochs of shuffled minibatch steps over a rollout batch. The
        optimizer works on the parameters raveled into one vector: one Adam update and one select
        instead of one per layer, which cut the compile time of a chunk noticeably. Returns
        ``(params, opt_state, losses averaged over the applied steps, steps applied, kl_stopped)``."""
        flat, unravel = ravel_pytree(params)

        def minibatch_step(carry, minibatch):
            flat, opt_state, stopped = carry
            (_, info), grads = grad_fn(unravel(flat), minibatch, ent_coef)
            flat, opt_state, stopped = kl_stopped_step(config, tx, flat, opt_state, stopped, grads, info.approx_kl)
            return (flat, opt_state, stopped), (info, ~stopped)

        def epoch(carry, key):
            return jax.lax.scan(minibatch_step, carry, shuffled_minibatches(config, batch, key))

        keys = jax.random.split(key, config.update_epochs)
        (flat, opt_state, stopped), (info, applied) = jax.lax.scan(epoch, (flat, opt_state, jnp.asarray(False)), keys)
        weight = applied.reshape(-1).astype(jnp.float32)
        info = jax.tree.map(lambda x: x.reshape((weight.shape[0],) + x.shape[2:]), info)
        mean = lambda x: _masked_mean(x, weight)
        # Per head: the mean over the samples where it mattered; its plain mean if it never did.
        relevant = jnp.sum(info.head_relevant * weight[:, None], axis=0)
        entropy = jnp.where(relevant > 0, jnp.sum(info.head_entropy_sum * weight[:, None], axis=0)
                            / jnp.maximum(relevant, 1.0), jax.vmap(mean, in_axes=1)(info.head_entropy_mean))
        losses = (mean(info.policy_loss), mean(info.value_loss), mean(info.approx_kl), mean(info.clip_fraction), entropy,
                  mean(info.teacher_nll))
        return unravel(flat), opt_state, losses, jnp.sum(applied).astype(jnp.int32), stopped.astype(jnp.int32)

    # ------------------------------------------------------------------ one update, a chunk

    def update_step(runner: RunnerState, data):
        key, k_rollout, k_learn = jax.random.split(runner.key, 3)
        start_carry = runner.policy_carry
        runner, traj, episode_stats, last_value = rollout(runner, data, k_rollout)
        advantages, returns = compute_gae(
            relative_to_group(traj.reward, config.group_size), traj.value, traj.done, last_value, config.gamma, config.gae_lambda,
            traj.final_value if config.bootstrap_on_done else None)
        batch = Batch(traj, advantages, returns, start_carry if recurrent else ())
        params, opt_state, (policy_loss, value_loss, approx_kl, clip_fraction, entropy, teacher_nll), applied, stopped = learn(
            runner.params, runner.opt_state, batch, k_learn, runner.hyper.ent_coef)
        update = runner.update + 1
        done = traj.done.astype(jnp.float32)
        episodes = jnp.sum(done)
        per_episode = lambda x: _per_episode(x, done, episodes)
        metrics = UpdateMetrics(
            update=update, env_steps=update * (steps * num_envs),
            mean_return=per_episode(episode_stats.episode_return), mean_final_val_loss=per_episode(episode_stats.val_loss),
            mean_final_val_accuracy=per_episode(episode_stats.val_accuracy),
            germinated=per_episode(episode_stats.germinated), fossilized=per_episode(episode_stats.fossilized),
            pruned=per_episode(episode_stats.pruned), rollbacks=per_episode(episode_stats.rollbacks),
            episodes=episodes.astype(jnp.int32), policy_loss=policy_loss, value_loss=value_loss, approx_kl=approx_kl,
            clip_fraction=clip_fraction, explained_variance=explained_variance(traj.value, returns),
            teacher_nll=teacher_nll if labeler is not None else jnp.full((), jnp.nan), entropy=entropy,
            minibatch_updates=applied, kl_stopped=stopped,
            # Checked on device every update, read by the training loop once per chunk: a learner
            # that diverged is reported, never saved or chosen as if it were healthy.
            nonfinite=(~(jnp.all(jnp.isfinite(ravel_pytree(params)[0])) & jnp.isfinite(policy_loss)
                         & jnp.isfinite(value_loss))).astype(jnp.int32),
        )
        return runner.replace(params=params, opt_state=opt_state, key=key, update=update), metrics

    def train_chunk(runner: RunnerState, data):
        return jax.lax.scan(lambda r, _: update_step(r, data), runner, None, length=updates_per_chunk)

    def act(params, obs_stats, obs, masks, carry, key, deterministic: bool = False, episode_start=None):
        """The trained policy on a batch of observations (raw, ``[N, D]``); ``episode_start``
        (``[N]`` bool) resets the recurrent carry of those envs first."""
        if episode_start is None:
            episode_start = jnp.zeros(obs.shape[:1], bool)
        carry, logits, _ = policy.apply(params, carry, norm(obs_stats, obs), episode_start)
        return sample_action(key, logits, masks, deterministic), carry

    def op_distribution(params, obs_stats, obs, masks, carry, episode_start=None):
        """On a batch of raw observations, as ``act`` sees them: ``[N, num_ops]``, the policy's
        probability of each op (the first of its factored choices; a masked op gets 0), and ``[N]``,
        the critic's value."""
        if episode_start is None:
            episode_start = jnp.zeros(obs.shape[:1], bool)
        _, logits, value = policy.apply(params, carry, norm(obs_stats, obs), episode_start)
        return jax.nn.softmax(masked_logits(logits["op"], masks.op), axis=-1), value

    return Trainer(init=init, train_chunk=train_chunk, act=act, op_distribution=op_distribution,
                   init_carry=policy.initial_carry, policy=policy,
                   masks=env.population_masks, rollout_steps=steps, updates_per_chunk=updates_per_chunk, config=config,
                   rollout=rollout)
