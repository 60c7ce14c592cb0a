"""Warm start by imitation: fit a PPO learner's policy and value function to a teacher
controller's episodes before PPO begins (behaviour cloning).

Why: a PPO learner starts from a near-uniform policy, and a growth decision pays only when a
whole sequence of them is right (the right blueprint, in the right slot, early enough, then not
pruned for the epochs it needs to blend in). Six learning runs on the growth problem (CIFAR,
real MNIST digits, TinyStories) each settled on a cheap blueprint before they met the one that
pays. A teacher chosen on calibration envs (for example the best fixed schedule there, never
one chosen on held-out envs) puts the learner where that schedule is; PPO then has to learn
only where to depart from it, per env.

``make_imitation(trainer, teacher, config)`` returns ``imitate(runner, data) -> (runner,
ImitationMetrics with leaves [rounds])``, one pure function. Each round is one rollout of the
trainer's envs in which the teacher acts (observation statistics update as in PPO's rollouts),
then ``epochs`` epochs of shuffled minibatch Adam steps on

    -log pi(teacher's action | obs)  +  vf_coef * 0.5 (V(obs) - return)^2  -  ent_coef * entropy,

the log-probability over the heads relevant to the teacher's op, the returns the teacher's
discounted returns (GAE with lambda 1). Afterwards the optimizer state is made afresh: PPO starts
from the imitated parameters with new Adam moments and the learner's own learning rate. The
update counter stays at 0: imitation is part of the learner's initialization.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from esper_jax.env.actions import HEADS, FactoredAction
from esper_jax.rl.policy import Policy, evaluate_actions, relevance, sample_action
from esper_jax.rl.ppo import (Batch, PPOConfig, RunnerState, Trainer, compute_gae, make_optimizer,
                              shuffled_minibatches)

# (keys [N], env_state with leaves [N, ...]) -> FactoredAction [N]
Teacher = Callable[[jax.Array, object], FactoredAction]


@dataclasses.dataclass(frozen=True)
class ImitationConfig:
    rounds: int = 4    # teacher rollouts (each the trainer's num_envs episodes, the cost of one PPO update's)
    epochs: int = 32   # minibatch epochs over each round's rollout

    def __post_init__(self):
        for name in ("rounds", "epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"imitation {name} must be a positive integer, got {getattr(self, name)!r}")


class ImitationMetrics(NamedTuple):
    """One round's (a call stacks them ``[rounds]``)."""

    nll: jax.Array                  # mean -log pi of the teacher's actions, before the round's steps
    agreement: jax.Array            # fraction of the round's steps where the policy's most likely action
                                    # is the teacher's on every relevant head, after the round's steps
    value_loss: jax.Array           # 0.5 (V - return)^2 after the round's steps
    mean_return: jax.Array          # the teacher's episodes
    mean_final_val_loss: jax.Array


def imitation_loss(policy: Policy, config: PPOConfig, params, batch: Batch, ent_coef) -> jax.Array:
    """Behaviour cloning of the batch's actions plus value regression on its returns, minus PPO's
    entropy bonus. (The bonus does not keep a deterministic teacher's actions uncertain: on real
    MNIST, 4 rounds of 32 epochs took -log p of them to 0.003 per step.)"""
    traj = batch.transition
    _, logits, values = policy.apply(params, (), traj.obs, traj.episode_start)
    log_prob, entropies, _ = evaluate_actions(logits, traj.masks, traj.action)
    value_loss = 0.5 * jnp.mean(jnp.square(values - batch.returns))
    entropy = jnp.mean(sum(entropies.values()))
    return -jnp.mean(log_prob) + config.vf_coef * value_loss - ent_coef * entropy


def agreement(policy: Policy, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """``(fraction of steps whose greedy action matches the batch's on its relevant heads, value loss)``."""
    traj = batch.transition
    _, logits, values = policy.apply(params, (), traj.obs, traj.episode_start)
    greedy = sample_action(jax.random.key(0), logits, traj.masks, deterministic=True)  # the key is unused
    same = jnp.stack([getattr(greedy, h) == getattr(traj.action, h) for h in HEADS], axis=-1)
    matched = jnp.all(same | (relevance(traj.action.op) == 0), axis=-1)
    return jnp.mean(matched.astype(jnp.float32)), 0.5 * jnp.mean(jnp.square(values - batch.returns))


def make_imitation(trainer: Trainer, teacher: Teacher, imitation: ImitationConfig) -> Callable:
    """``imitate(runner, data) -> (runner, ImitationMetrics [rounds])`` for ``trainer``'s learner."""
    config = trainer.config
    if config.recurrent != "none":
        raise ValueError("imitation fits a feed-forward policy step by step; a recurrent policy would need its "
                         "sequences replayed: use recurrent='none' or no teacher")
    # The learning rate is read from the optimizer state (optax.inject_hyperparams), as in PPO's update.
    tx = make_optimizer(config, config.learning_rate)
    grad_fn = jax.grad(functools.partial(imitation_loss, trainer.policy, config))
    fit_config = dataclasses.replace(config, update_epochs=imitation.epochs)

    def fit(params, opt_state, batch: Batch, key, ent_coef):
        flat, unravel = ravel_pytree(params)

        def minibatch_step(carry, minibatch):
            flat, opt_state = carry
            grads = grad_fn(unravel(flat), minibatch, ent_coef)
            updates, opt_state = tx.update(ravel_pytree(grads)[0], opt_state, flat)
            return (flat + updates, opt_state), None

        def epoch(carry, key):
            return jax.lax.scan(minibatch_step, carry, shuffled_minibatches(fit_config, batch, key))[0], None

        (flat, opt_state), _ = jax.lax.scan(epoch, (flat, opt_state), jax.random.split(key, imitation.epochs))
        return unravel(flat), opt_state

    def imitate(runner: RunnerState, data) -> tuple[RunnerState, ImitationMetrics]:
        def one_round(state: tuple[RunnerState, object], _):
            runner, opt_state = state
            key, k_rollout, k_fit = jax.random.split(runner.key, 3)
            runner, traj, episode_stats, last_value = trainer.rollout(runner, data, k_rollout, teacher)
            # lambda 1: the returns are the teacher's discounted returns (bootstrapped by the value only
            # where a rollout stops inside an episode).
            advantages, returns = compute_gae(traj.reward, traj.value, traj.done, last_value, config.gamma, 1.0)
            batch = Batch(traj, advantages, returns, ())
            params, opt_state = fit(runner.params, opt_state, batch, k_fit, runner.hyper.ent_coef)
            agreed, value_loss = agreement(trainer.policy, params, batch)
            done = traj.done.astype(jnp.float32)
            episodes = jnp.maximum(jnp.sum(done), 1.0)
            metrics = ImitationMetrics(
                nll=-jnp.mean(traj.log_prob), agreement=agreed, value_loss=value_loss,
                mean_return=jnp.sum(episode_stats.episode_return * done) / episodes,
                mean_final_val_loss=jnp.sum(episode_stats.val_loss * done) / episodes)
            return (runner.replace(params=params, key=key), opt_state), metrics

        (runner, _), metrics = jax.lax.scan(one_round, (runner, runner.opt_state), None, length=imitation.rounds)
        fresh = make_optimizer(config, runner.hyper.learning_rate).init(ravel_pytree(runner.params)[0])
        return runner.replace(opt_state=fresh), metrics

    return imitate
