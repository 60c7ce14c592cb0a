"""On-device PPO for the morphogenetic environment, in PureJaxRL's structure.

``make_train(config, env, updates_per_chunk)`` returns a :class:`Trainer` of pure functions.
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

Recurrent policies: minibatches are sets of whole environment sequences, replayed from the
carry the rollout started with, with the carry reset at the same episode starts as in the
rollout. MLP policies: minibatches are shuffled individual steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from esper_jax.rl import normalize
from esper_jax.env.actions import HEADS, ActionMasks, ActionSpace, FactoredAction, action_masks
from esper_jax.rl.policy import RECURRENT_KINDS, Policy, evaluate_actions, evaluate_actions_raw, sample_action

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
    recurrent: str = "none"      # "none" | "lstm" | "gru"
    normalize_obs: bool = True
    normalize_advantages: bool = True  # per minibatch
    bootstrap_on_done: bool = False    # see the module docstring
    adam_eps: float = 1e-5

    def __post_init__(self):
        for name in ("num_envs", "update_epochs", "num_minibatches", "hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.rollout_steps < 0:
            raise ValueError(f"rollout_steps must be >= 0 (0 = one episode), got {self.rollout_steps}")
        if self.recurrent not in RECURRENT_KINDS:
            raise ValueError(f"recurrent must be one of {', '.join(RECURRENT_KINDS)}, got {self.recurrent!r}")
        if not 0.0 < self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"need 0 < gamma <= 1 and 0 <= gae_lambda <= 1, got {self.gamma}, {self.gae_lambda}")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl must be positive or None, got {self.target_kl}")
        for name in ("clip_eps", "max_grad_norm", "learning_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


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


class Trainer(NamedTuple):
    init: Callable                # (key, hyper, data) -> RunnerState
    train_chunk: Callable         # (runner, data) -> (runner, metrics {name: [updates_per_chunk]})
    act: Callable                 # (params, obs_stats, obs, masks, carry, key, deterministic=False,
                                  #  episode_start=None) -> (FactoredAction, carry)
    init_carry: Callable          # (num_envs) -> carry
    policy: Policy
    masks: Callable               # (env_state with leaves [N, ...]) -> ActionMasks with leaves [N, ...]
    rollout_steps: int
    updates_per_chunk: int
    config: PPOConfig
    rollout: Callable             # (runner, data, key) -> (runner, Transition [T, N], finished {name: [T, N]},
                                  #  last_value [N]): one rollout without learning (tests, diagnostics)


# Per-env values recorded at every step; averaged over the steps where an episode ended.
FINISHED_FIELDS = ("return", "val_loss", "val_accuracy", "germinated", "fossilized", "pruned", "rollbacks")
_LOSS_AUX = ("policy_loss", "value_loss", "approx_kl", "clip_fraction")
_INT_METRICS = ("update", "env_steps", "episodes", "minibatch_updates", "kl_stopped")

METRIC_NAMES = (
    "update", "env_steps", "mean_return", "mean_final_val_loss", "mean_final_val_accuracy", "policy_loss",
    "value_loss", "approx_kl", "clip_fraction", "explained_variance", *(f"entropy_{h}" for h in HEADS),
    "germinated", "fossilized", "pruned", "rollbacks", "episodes", "minibatch_updates", "kl_stopped",
)


# ---------------------------------------------------------------------------- pure pieces


def tree_select(pred: jax.Array, on_true, on_false):
    """Leafwise ``where``; ``pred`` is a scalar or ``[N]`` matching the leaves' leading axis."""
    def sel(a, b):
        p = jnp.reshape(pred, jnp.shape(pred) + (1,) * (jnp.ndim(a) - jnp.ndim(pred)))
        return jnp.where(p, a, b)

    return jax.tree.map(sel, on_true, on_false)


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
    rate lives in the optimizer state."""
    clip_state, adam_state = runner.opt_state
    adam_state = adam_state._replace(hyperparams={**adam_state.hyperparams, "learning_rate": hyper.learning_rate})
    return runner.replace(opt_state=(clip_state, adam_state), hyper=hyper)


def population_masks(env, env_state) -> ActionMasks:
    """Masks for every member of an environment population (leaves ``[N, ...]``). An env may
    provide its own ``population_masks(state)``; otherwise they come from its lattice."""
    own = getattr(env, "population_masks", None)
    if own is not None:
        return own(env_state)
    return jax.vmap(lambda l: action_masks(env.lattice, l, env.config.actions))(env_state.train.lattice)


def _action_space(env) -> ActionSpace:
    return getattr(env, "action_space", None) or ActionSpace.for_lattice(env.lattice)


def _masked_mean(x, weight):
    total = jnp.sum(weight)
    return jnp.where(total > 0, jnp.sum(x * weight) / jnp.maximum(total, 1e-8), jnp.mean(x))


# ---------------------------------------------------------------------------- the trainer


def make_train(config: PPOConfig, env, updates_per_chunk: int) -> Trainer:
    if updates_per_chunk <= 0:
        raise ValueError(f"updates_per_chunk must be positive, got {updates_per_chunk}")
    num_envs = config.num_envs
    episode = env.config.episode_epochs
    steps = config.rollout_steps or episode
    # Envs start together and every episode has the same length, so when a rollout is a whole
    # number of episodes the resets happen at known steps: a condition on the step index is
    # unbatched even under a vmap over learners, so the reset stays a real conditional.
    aligned = steps % episode == 0
    if config.recurrent != "none":
        if num_envs % config.num_minibatches:
            raise ValueError(f"a recurrent policy splits minibatches by environment: num_envs ({num_envs}) "
                             f"must be a multiple of num_minibatches ({config.num_minibatches})")
    elif (steps * num_envs) % config.num_minibatches:
        raise ValueError(f"rollout_steps x num_envs ({steps} x {num_envs}) must be a multiple of "
                         f"num_minibatches ({config.num_minibatches})")

    policy = Policy.make(_action_space(env).head_sizes(), config.hidden_size, config.recurrent)
    # Only `update` is used from this one: it reads the learning rate from the optimizer state.
    tx = make_optimizer(config, config.learning_rate)
    obs_size = env.observation_size
    recurrent = config.recurrent != "none"

    def norm(stats, obs):
        return normalize.apply(stats, obs) if config.normalize_obs else obs

    def init(key: jax.Array, hyper: Hyperparams, data) -> RunnerState:
        k_net, k_env, k_run = jax.random.split(key, 3)
        obs, env_state = env.population_reset(jax.random.split(k_env, num_envs), data)
        params = policy.init(k_net, obs_size)
        return RunnerState(
            params=params, opt_state=make_optimizer(config, hyper.learning_rate).init(ravel_pytree(params)[0]),
            obs_stats=normalize.init(obs_size), env_state=env_state, obs=obs,
            policy_carry=policy.initial_carry(num_envs), key=k_run, update=jnp.zeros((), jnp.int32), hyper=hyper,
            episode_start=jnp.ones((num_envs,), bool), episode_return=jnp.zeros((num_envs,), jnp.float32),
        )

    # ------------------------------------------------------------------ rollout

    def rollout(runner: RunnerState, data, key):
        params = runner.params

        def step(carry, t):
            stats, env_state, obs, pcarry, start, ep_return, key = carry
            key, k_act, k_env, k_reset = jax.random.split(key, 4)
            if config.normalize_obs:
                stats = normalize.update(stats, obs)
            nobs = norm(stats, obs)
            masks = population_masks(env, env_state)
            pcarry, logits, value = policy.apply(params, pcarry, nobs, start)
            action = sample_action(k_act, logits, masks)
            log_prob, _, _ = evaluate_actions(logits, masks, action)
            next_obs, next_state, reward, done, info = env.population_step(
                jax.random.split(k_env, num_envs), env_state, action, data)
            reward = reward.astype(jnp.float32)
            if config.bootstrap_on_done:
                _, _, final_value = policy.apply(params, pcarry, norm(stats, next_obs), jnp.zeros_like(done))
            else:
                final_value = jnp.zeros_like(value)
            ep_return = ep_return + reward
            # One stacked array rather than a dict: one scan output to write instead of seven.
            finished = jnp.stack([jnp.asarray(v, jnp.float32) for v in (
                ep_return, info["val_loss"], info["val_accuracy"], next_state.germinated.sum(-1),
                next_state.fossilized.sum(-1), next_state.pruned.sum(-1), next_state.rollbacks)], axis=-1)

            def reset(operand):
                next_obs, next_state = operand
                reset_obs, reset_state = env.population_reset(jax.random.split(k_reset, num_envs), data)
                return tree_select(done, (reset_obs, reset_state), (next_obs, next_state))

            any_reset = (t + 1) % episode == 0 if aligned else jnp.any(done)
            next_obs, next_state = jax.lax.cond(any_reset, reset, lambda operand: operand, (next_obs, next_state))
            transition = Transition(nobs, start, action, masks, log_prob, value, reward, done, final_value)
            carry = (stats, next_state, next_obs, pcarry, done, jnp.where(done, 0.0, ep_return), key)
            return carry, (transition, finished)

        carry = (runner.obs_stats, runner.env_state, runner.obs, runner.policy_carry, runner.episode_start,
                 runner.episode_return, key)
        carry, (traj, finished) = jax.lax.scan(step, carry, jnp.arange(steps))
        stats, env_state, obs, pcarry, start, ep_return, _ = carry
        _, _, last_value = policy.apply(params, pcarry, norm(stats, obs), start)
        runner = runner.replace(obs_stats=stats, env_state=env_state, obs=obs, policy_carry=pcarry,
                                episode_start=start, episode_return=ep_return)
        return runner, traj, {name: finished[..., i] for i, name in enumerate(FINISHED_FIELDS)}, last_value

    # ------------------------------------------------------------------ loss and update

    def loss_fn(params, batch, ent_coef):
        if recurrent:
            _, logits, values = policy.unroll(params, batch["carry"], batch["obs"], batch["episode_start"])
        else:
            _, logits, values = policy.apply(params, (), batch["obs"], batch["episode_start"])
        log_prob, raw, rel = evaluate_actions_raw(logits, batch["masks"], batch["action"])
        entropies = {h: rel[..., i] * raw[h] for i, h in enumerate(HEADS)}
        log_ratio = log_prob - batch["log_prob"]
        ratio = jnp.exp(log_ratio)
        adv = batch["advantages"]
        if config.normalize_advantages:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        policy_loss = -jnp.mean(jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - config.clip_eps, 1 + config.clip_eps) * adv))
        value_loss = 0.5 * jnp.mean(jnp.square(values - batch["returns"]))
        entropy = sum(entropies.values()).mean()
        loss = policy_loss + config.vf_coef * value_loss - ent_coef * entropy
        approx_kl = jnp.mean((ratio - 1.0) - log_ratio)
        clip_fraction = jnp.mean((jnp.abs(ratio - 1.0) > config.clip_eps).astype(jnp.float32))
        # One vector (fewer scan outputs): the losses of _LOSS_AUX, then per head the entropy
        # summed over the samples where the head mattered, their count, and the plain mean entropy
        # (for heads that never mattered in a rollout); `learn` combines them.
        aux = jnp.concatenate([
            jnp.stack([policy_loss, value_loss, approx_kl, clip_fraction]),
            jnp.stack([jnp.sum(entropies[h]) for h in HEADS]),
            jnp.sum(rel.reshape(-1, len(HEADS)), axis=0),
            jnp.stack([jnp.mean(raw[h]) for h in HEADS]),
        ])
        return loss, aux

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch_step(carry, batch, ent_coef, unravel):
        flat, opt_state, stopped = carry
        (_, aux), grads = grad_fn(unravel(flat), batch, ent_coef)
        if config.target_kl is not None:
            stopped = stopped | (aux[_LOSS_AUX.index("approx_kl")] > KL_STOP_FACTOR * config.target_kl)
        updates, new_opt_state = tx.update(ravel_pytree(grads)[0], opt_state, flat)
        flat, opt_state = tree_select(stopped, (flat, opt_state), (flat + updates, new_opt_state))
        return (flat, opt_state, stopped), (aux, ~stopped)

    def learn(params, opt_state, batch, key, ent_coef):
        """Shuffled minibatch epochs over a rollout batch (leaves ``[T, N, ...]``; ``batch["carry"]``
        ``[N, ...]`` for recurrent policies). Returns ``(params, opt_state, metrics)``.

        The optimizer works on the parameters raveled into one vector: one Adam update and one
        select instead of one per layer, which cut the compile time of a chunk noticeably."""
        flat, unravel = ravel_pytree(params)

        def epoch(carry, key):
            if recurrent:
                # Whole environment sequences: shuffle and split the env axis.
                perm = jax.random.permutation(key, num_envs)
                split = lambda x, axis: jnp.moveaxis(
                    jnp.take(x, perm, axis=axis).reshape(
                        x.shape[:axis] + (config.num_minibatches, -1) + x.shape[axis + 1:]), axis, 0)
                carry_mb = jax.tree.map(lambda x: split(x, 0), batch["carry"])
                minibatches = jax.tree.map(lambda x: split(x, 1), {k: v for k, v in batch.items() if k != "carry"})
                minibatches["carry"] = carry_mb
            else:
                samples = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
                perm = jax.random.permutation(key, steps * num_envs)
                minibatches = jax.tree.map(
                    lambda x: jnp.take(x, perm, axis=0).reshape((config.num_minibatches, -1) + x.shape[1:]), samples)
            return jax.lax.scan(lambda c, mb: minibatch_step(c, mb, ent_coef, unravel), carry, minibatches)

        keys = jax.random.split(key, config.update_epochs)
        (flat, opt_state, stopped), (aux, applied) = jax.lax.scan(epoch, (flat, opt_state, jnp.asarray(False)), keys)
        params = unravel(flat)
        weight = applied.astype(jnp.float32)
        aux = aux.reshape(-1, aux.shape[-1])
        weight = weight.reshape(-1)
        metrics = {k: _masked_mean(aux[:, i], weight) for i, k in enumerate(_LOSS_AUX)}
        n, nh = len(_LOSS_AUX), len(HEADS)
        for i, h in enumerate(HEADS):
            # Mean over the samples where the head mattered; its plain mean if it never did.
            relevant = jnp.sum(aux[:, n + nh + i] * weight)
            metrics[f"entropy_{h}"] = jnp.where(
                relevant > 0, jnp.sum(aux[:, n + i] * weight) / jnp.maximum(relevant, 1.0),
                _masked_mean(aux[:, n + 2 * nh + i], weight))
        metrics["minibatch_updates"] = jnp.sum(applied).astype(jnp.int32)
        metrics["kl_stopped"] = stopped.astype(jnp.int32)
        return params, opt_state, metrics

    # ------------------------------------------------------------------ one update, a chunk

    def update_step(runner: RunnerState, data):
        key, k_rollout, k_learn = jax.random.split(runner.key, 3)
        start_carry = runner.policy_carry
        runner, traj, finished, last_value = rollout(runner, data, k_rollout)
        advantages, returns = compute_gae(
            traj.reward, traj.value, traj.done, last_value, config.gamma, config.gae_lambda,
            traj.final_value if config.bootstrap_on_done else None)
        batch = {"obs": traj.obs, "episode_start": traj.episode_start, "action": traj.action, "masks": traj.masks,
                 "log_prob": traj.log_prob, "advantages": advantages, "returns": returns}
        if recurrent:
            batch["carry"] = start_carry
        params, opt_state, learn_metrics = learn(runner.params, runner.opt_state, batch, k_learn,
                                                 runner.hyper.ent_coef)
        update = runner.update + 1
        done = traj.done.astype(jnp.float32)
        episodes = jnp.sum(done)
        # Episode statistics average over the episodes that ended in this rollout (NaN if none did).
        per_episode = lambda x: jnp.where(episodes > 0, jnp.sum(x.astype(jnp.float32) * done) / episodes, jnp.nan)
        metrics = {
            "update": update, "env_steps": update * (steps * num_envs),
            "mean_return": per_episode(finished["return"]),
            "mean_final_val_loss": per_episode(finished["val_loss"]),
            "mean_final_val_accuracy": per_episode(finished["val_accuracy"]),
            "explained_variance": explained_variance(traj.value, returns),
            **{name: per_episode(finished[name]) for name in ("germinated", "fossilized", "pruned", "rollbacks")},
            "episodes": episodes.astype(jnp.int32),
            **learn_metrics,
        }
        runner = runner.replace(params=params, opt_state=opt_state, key=key, update=update)
        # Two stacked vectors (exact int32 counters, float32 statistics) instead of 27 scalars.
        ints = jnp.stack([jnp.asarray(metrics[k], jnp.int32) for k in _INT_METRICS])
        floats = jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in METRIC_NAMES if k not in _INT_METRICS])
        return runner, (ints, floats)

    def train_chunk(runner: RunnerState, data):
        runner, (ints, floats) = jax.lax.scan(lambda r, _: update_step(r, data), runner, None, length=updates_per_chunk)
        float_names = [k for k in METRIC_NAMES if k not in _INT_METRICS]
        metrics = {**{k: ints[:, i] for i, k in enumerate(_INT_METRICS)},
                   **{k: floats[:, i] for i, k in enumerate(float_names)}}
        return runner, {k: metrics[k] for k in METRIC_NAMES}

    def act(params, obs_stats, obs, masks, carry, key, deterministic: bool = False, episode_start=None):
        """The trained policy on a batch of observations (raw, ``[N, D]``); ``episode_start``
        (``[N]`` bool) resets the recurrent carry of those envs first."""
        if episode_start is None:
            episode_start = jnp.zeros(obs.shape[:1], bool)
        carry, logits, _ = policy.apply(params, carry, norm(obs_stats, obs), episode_start)
        return sample_action(key, logits, masks, deterministic), carry

    return Trainer(init=init, train_chunk=train_chunk, act=act, init_carry=policy.initial_carry, policy=policy,
                   masks=lambda env_state: population_masks(env, env_state), rollout_steps=steps,
                   updates_per_chunk=updates_per_chunk, config=config, rollout=rollout)
