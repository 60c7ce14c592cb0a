"""Deciding once per episode: a learner that picks one plan from a menu at the episode's first
observation and has it carried out to the end (``PPOConfig.plans``; ``--plans`` on the command line).

A plan is a fixed growth schedule (``conv_heavy@r2c0@e0``, ``a@r2c0@e0+b@r1c0@e10``) or ``static``
(grow nothing); :func:`esper_jax.env.controllers.make_plan_controller` carries out whichever one an
env was given. The policy sees the first observation of the episode (the drawn problem, the
training set's size among it, and the untrained host's losses) and chooses where, what and when to
grow for the whole episode, in one categorical decision. With ``plan_inputs="problem"`` it sees only
the observation's features of the drawn problem (:data:`PROBLEM_FEATURES`): at the first observation the
untrained host's losses differ between envs by their initialization alone, and a policy may fit them.
With ``plan_head="fixed"`` the policy has one logit per plan of the menu; with ``"scorer"`` one network
scores each plan from its description (:mod:`esper_jax.env.descriptors`: what it grows, where, when and
at what cost relative to the host; :mod:`esper_jax.rl.scorer`), so its parameters fit any menu and host.

Why: the per-epoch learner (:mod:`esper_jax.rl.ppo`) decides "germinate or not" afresh at every epoch,
and on the growth problem the decision that pays is made per problem (grow ``conv_heavy`` early on a
large training set, nothing on a small one). Over eight CIFAR runs it settled on one answer for
every problem, although its critic told the problems apart: one transition in thirty is a first
decision, and with problem groups it is learned from only when the partners chose differently
(README, "The SEAL op"). Here every transition is that decision.

Learning: a contextual bandit with PPO's clipped objective. Each update resets ``num_envs`` envs
(fresh problems, in groups of ``group_size`` that share their problem, host initialization and
batches, as in :func:`esper_jax.rl.ppo.group_keys`), samples one plan per env, runs the episodes to
their end and learns from each env's undiscounted episode return (what the per-epoch learner's
rewards add up to: the loss improvement, the terminal term and the price of compute). The advantage
is the return minus the mean of the group's other members (leave-one-out, unbiased; a group whose
members chose the same plan learns nothing from it) or, without groups, minus the critic's value of
the first observation; normalized over the update's envs (not per minibatch: a minibatch holds a
handful of envs). Then ``update_epochs`` epochs of ``num_minibatches`` shuffled minibatch steps with
PPO's clip, value loss, entropy bonus and KL stop, as the per-epoch learner. ``gamma`` and
``gae_lambda`` do not enter (one decision, the whole return), and so do not ``rollout_steps``
(always one episode), kickstarting or a recurrent torso: :class:`~esper_jax.rl.ppo.PPOConfig`
refuses them with plans.

Several tasks in one run (``--mix``, :class:`TaskMenu`): with the scorer head, whose parameters do not
depend on the menu or the host, each update also resets ``num_envs`` envs of every other task, each
task's policy choosing from its own menu, and learns from all of them in one batch. One compiled
program holds every task's host (the CNN's and the transformer's episodes run one after the other
inside the update), so the update sees every task at once rather than alternating between programs
(which would let the policy drift toward the task of the last chunk between checkpoints) and a
resumed run is exact as for one task. The returns are standardized per task before the advantages
and the critic's targets are made of them (a task whose returns are larger would otherwise drown the
others' choices); the observation's statistics are shared (the drawn problem is on each family's own
[0, 1] scale). The metrics of the run's own task keep their names; another task's are prefixed with
its name (``tinystories/mean_final_val_loss``). Evaluation, ``act`` and ``episodes`` concern the
run's own task; another task is evaluated through :mod:`esper_jax.runs.transfer`.

The learner state (:class:`PlanState`) holds exactly the learner fields the checkpoints restore
(params, optimizer state, observation statistics, key, update, hyperparameters): nothing of the
envs outlives an update. Populations, checkpoints, resume and evaluation work as for the per-epoch
learner.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import distrax
import jax
import jax.numpy as jnp
from flax import struct
from jax.flatten_util import ravel_pytree

from esper_jax.env.controllers import make_plan_controller, parse_plan, plan_names
from esper_jax.env.descriptors import plan_features
from esper_jax.env.environment import MorphogeneticEnv
from esper_jax.rl import normalize
from esper_jax.rl.policy import Policy
from esper_jax.rl.scorer import CandidatePolicy
from esper_jax.rl.ppo import (Hyperparams, PPOConfig, clipped_surrogate, explained_variance, group_keys,
                              kl_stopped_step, make_optimizer, relative_to_group)

PLAN_HEAD = "plan"
# The observation's features of the drawn problem (esper_jax.env.problems), what the policy sees with
# plan_inputs="problem": known before anything trains, unlike the untrained host's losses, which at the
# first observation differ between envs by their initialization alone.
PROBLEM_FEATURES = ("train_set_size",)


def input_features(config: PPOConfig, env: MorphogeneticEnv) -> tuple[int, ...]:
    """The indices of the observation the plan policy sees (``config.plan_inputs``)."""
    names = env.feature_names()
    if config.plan_inputs == "observation":
        return tuple(range(len(names)))
    chosen = tuple(names.index(f) for f in PROBLEM_FEATURES if f in names)
    if not chosen:
        raise ValueError("--plan-inputs problem shows the policy the drawn problem, and this run's envs all train on "
                         "one problem: give a family (--train-fraction LOW:HIGH), or --plan-inputs observation")
    return chosen


@struct.dataclass
class PlanState:
    """Everything needed to continue training (what a checkpoint saves)."""

    params: Any
    opt_state: Any
    obs_stats: normalize.RunningStats
    key: jax.Array
    update: jax.Array            # int32: updates done
    hyper: Hyperparams


class PlanEpisodes(NamedTuple):
    """One episode per env, each carried out under one plan (leaves ``[N]``; ``obs`` ``[N, D]``)."""

    obs: jax.Array               # the first observation, normalized as the policy saw it
    plan: jax.Array              # int32 index into the menu
    log_prob: jax.Array          # of the plan, under the policy that chose it
    value: jax.Array             # the critic's value of the first observation
    episode_return: jax.Array    # undiscounted
    final_val_loss: jax.Array
    final_val_accuracy: jax.Array
    germinated: jax.Array        # seeds, all blueprints
    fossilized: jax.Array
    pruned: jax.Array
    rollbacks: jax.Array


class TaskMenu(NamedTuple):
    """Another task the learner also trains on (``--mix``): its name, its menu of plans and its env."""

    label: str
    plans: tuple[str, ...]
    env: MorphogeneticEnv


class TaskMetrics(NamedTuple):
    """One update's episodes of one task (scalars; ``chosen`` ``[M]``: the share of envs per plan of
    its menu)."""

    mean_return: jax.Array
    mean_final_val_loss: jax.Array
    mean_final_val_accuracy: jax.Array
    germinated: jax.Array
    fossilized: jax.Array
    pruned: jax.Array
    rollbacks: jax.Array
    chosen: jax.Array


class PlanMetrics(NamedTuple):
    """One update's metrics (scalars; a chunk stacks them ``[updates_per_chunk]``), named as the
    per-epoch learner's where they mean the same: the learner's, and each task's episodes (``tasks``:
    the run's own first, then a mixed run's others)."""

    update: jax.Array
    env_steps: jax.Array
    episodes: jax.Array
    policy_loss: jax.Array
    value_loss: jax.Array
    approx_kl: jax.Array
    clip_fraction: jax.Array
    explained_variance: jax.Array
    entropy: jax.Array           # of the plan distribution, mean over the update's first observations
    minibatch_updates: jax.Array
    kl_stopped: jax.Array
    nonfinite: jax.Array
    tasks: tuple                 # TaskMetrics per task

    def columns(self, names: Sequence[str],
                others: Sequence[tuple[str, Sequence[str]]] = ()) -> dict[str, jax.Array]:
        """Flat columns: the run's own task's unprefixed (``plan_NAME`` per plan of ``names``), each
        other task's (``others``: its name and menu) prefixed with its name."""
        out = {name: value for name, value in zip(self._fields, self) if name != "tasks"}
        for (prefix, menu), task in zip((("", names),) + tuple((f"{label}/", m) for label, m in others), self.tasks):
            out.update({prefix + name: value for name, value in zip(task._fields, task) if name != "chosen"})
            out.update({f"{prefix}plan_{name}": task.chosen[..., i] for i, name in enumerate(menu)})
        return out


class PlanTrainer(NamedTuple):
    init: Callable                # (key, hyper, data) -> PlanState
    train_chunk: Callable         # (state, data) -> (state, metrics with leaves [updates_per_chunk])
    act: Callable                 # (params, obs_stats, obs, env_state, carry, key, deterministic=False) ->
                                  #  (FactoredAction, carry): the carry holds each env's plan (-1: not chosen)
    plan_distribution: Callable   # (params, obs_stats, obs) -> (P(plan) [N, M], value [N])
    init_carry: Callable          # (num_envs) -> carry
    episodes: Callable            # (state, data, key, plans=None) -> (obs_stats, PlanEpisodes): one update's
                                  #  episodes without learning; ``plans`` [N] imposes the plans
    policy: Policy | CandidatePolicy
    plans: tuple[str, ...]        # the menu, canonical names
    rollout_steps: int            # env steps per env per update: one episode
    updates_per_chunk: int
    config: PPOConfig


class _Batch(NamedTuple):
    obs: jax.Array
    plan: jax.Array
    log_prob: jax.Array
    advantage: jax.Array
    target: jax.Array            # the return, the critic's target
    task: jax.Array              # int32: which task's menu ``plan`` indexes (0: the run's own)


class _Task(NamedTuple):
    """One task's side of the learner: its env, menu, controller and what the policy sees of it."""

    env: MorphogeneticEnv
    menu: tuple
    controller: Callable
    features: jax.Array          # int32 indices of the observation the policy sees
    candidates: jax.Array | None  # the scorer's description of each plan [M, F]; None with the fixed head


def make_train(config: PPOConfig, env: MorphogeneticEnv, updates_per_chunk: int,
               others: Sequence[TaskMenu] = ()) -> PlanTrainer:
    """The learner's pure functions for the menu ``config.plans``; ``others``: further tasks it
    trains on in the same updates (a mixed run: ``train_chunk`` then takes a tuple of every task's
    data, the run's own first)."""
    if updates_per_chunk <= 0:
        raise ValueError(f"updates_per_chunk must be positive, got {updates_per_chunk}")
    if not config.plans:
        raise ValueError("this learner chooses among plans: give PPOConfig.plans (--plans)")
    if others and config.plan_head != "scorer":
        raise ValueError("a learner of several tasks scores each task's menu from its plans' descriptions: give "
                         "--plan-head scorer (a fixed head has one logit per plan of one menu)")
    scorer = config.plan_head == "scorer"

    def task_side(task_env: MorphogeneticEnv, plans: Sequence[str]) -> _Task:
        menu = tuple(parse_plan(p) for p in plans)
        return _Task(task_env, menu, jax.vmap(make_plan_controller(task_env, menu)),
                     jnp.asarray(input_features(config, task_env), jnp.int32),
                     jnp.asarray(plan_features(task_env, menu)) if scorer else None)

    tasks = (task_side(env, config.plans),) + tuple(task_side(o.env, o.plans) for o in others)
    own = tasks[0]
    names = plan_names(config.plans)
    other_menus = tuple((o.label, plan_names(o.plans)) for o in others)
    num_envs = config.num_envs
    tx = make_optimizer(config, config.learning_rate)  # only `update`: the rate is read from the state
    obs_size = int(own.features.shape[0])
    if any(int(t.features.shape[0]) != obs_size for t in tasks):
        raise ValueError("the tasks of a mixed run must show the policy the same features (--plan-inputs problem)")
    # The plan head: init(key) -> params, and each task's logits_and_value(params, obs) -> ([N, M], [N]).
    if scorer:
        policy = CandidatePolicy(config.hidden_size)
        init_params = lambda key: policy.init(key, obs_size, own.candidates.shape[1])

        def logits_and_value(task: _Task, params, obs):
            return policy.apply(params, obs, task.candidates, jnp.ones((task.candidates.shape[0],), bool))
    else:
        policy = Policy(((PLAN_HEAD, len(own.menu)),), config.hidden_size)
        init_params = lambda key: policy.init(key, obs_size)

        def logits_and_value(task: _Task, params, obs):
            _, logits, value = policy.apply(params, (), obs, jnp.ones(obs.shape[:1], bool))
            return logits[PLAN_HEAD], value

    def inputs(task: _Task, obs):  # the features the policy sees
        return jnp.take(obs, task.features, axis=-1)

    def norm(stats, x):
        return normalize.apply(stats, x) if config.normalize_obs else x

    def joined(parts):  # every task's envs in one batch (one task: its arrays as they are)
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    def env_keys(key):
        return group_keys(key, num_envs, config.group_size)

    def evaluate(params, obs, task: _Task = own):
        logits, value = logits_and_value(task, params, obs)
        return distrax.Categorical(logits=logits), value

    if others:
        # A batch of several tasks' envs: each task's menu padded to the longest, the padding masked
        # (probability exactly 0), and each env's logits those of its own task's menu.
        longest = max(len(t.menu) for t in tasks)
        padded = jnp.stack([jnp.pad(t.candidates, ((0, longest - len(t.menu)), (0, 0))) for t in tasks])
        offered = jnp.stack([jnp.arange(longest) < len(t.menu) for t in tasks])

        def evaluate_batch(params, obs, task):
            scored = [policy.apply(params, obs, padded[t], offered[t]) for t in range(len(tasks))]
            logits = jnp.take_along_axis(jnp.stack([logits for logits, _ in scored]), task[None, :, None], axis=0)[0]
            return distrax.Categorical(logits=logits), scored[0][1]  # the value reads the observation alone
    else:
        def evaluate_batch(params, obs, task):
            return evaluate(params, obs)

    def init(key: jax.Array, hyper: Hyperparams, data) -> PlanState:
        del data  # the learner keeps nothing of the envs
        k_net, k_run = jax.random.split(key)
        params = init_params(k_net)
        return PlanState(params=params, opt_state=make_optimizer(config, hyper.learning_rate).init(ravel_pytree(params)[0]),
                         obs_stats=normalize.init(obs_size), key=k_run, update=jnp.zeros((), jnp.int32), hyper=hyper)

    def play(task: _Task, params, stats, x, env_state, data, k_plan, k_steps, plans=None) -> PlanEpisodes:
        """One episode per env of ``task`` from its reset ``env_state``, each under the plan the policy
        samples from the observation's features ``x`` (or the plans given)."""
        nobs = norm(stats, x)
        dist, value = evaluate(params, nobs, task)
        plan = dist.sample(seed=k_plan).astype(jnp.int32) if plans is None else jnp.asarray(plans, jnp.int32)
        no_keys = jax.random.split(k_plan, num_envs)  # the plan controller is deterministic

        def epoch(carry, k):
            env_state, ret = carry
            action = task.controller(no_keys, env_state, plan)
            _, env_state, reward, _, _ = task.env.population_step(env_keys(k), env_state, action, data)
            return (env_state, ret + reward.astype(jnp.float32)), None

        (env_state, ret), _ = jax.lax.scan(epoch, (env_state, jnp.zeros((num_envs,), jnp.float32)),
                                           jax.random.split(k_steps, task.env.episode_epochs))
        count = lambda x: jnp.sum(x, axis=-1).astype(jnp.float32)
        return PlanEpisodes(
            obs=nobs, plan=plan, log_prob=dist.log_prob(plan), value=value, episode_return=ret,
            final_val_loss=env_state.val_loss, final_val_accuracy=env_state.val_accuracy,
            germinated=count(env_state.germinated), fossilized=count(env_state.fossilized),
            pruned=count(env_state.pruned), rollbacks=env_state.rollbacks.astype(jnp.float32))

    def observe(stats, x):
        return normalize.update(stats, x) if config.normalize_obs else stats

    def episodes(state: PlanState, data, key, plans=None):
        """One update's episodes of the run's own task (``data``: its data alone)."""
        k_reset, k_plan, k_steps = jax.random.split(key, 3)
        obs, env_state = own.env.population_reset(env_keys(k_reset), data)
        x = inputs(own, obs)
        stats = observe(state.obs_stats, x)
        return stats, play(own, state.params, stats, x, env_state, data, k_plan, k_steps, plans)

    def every_task_episodes(state: PlanState, data, key):
        """One update's episodes of every task (``data``: the run's own task's, or a mixed run's tuple,
        the run's own first); the observation's statistics updated with every task's first
        observations at once. For one task, what :func:`episodes` computes."""
        datas = data if others else (data,)
        keys = [jax.random.split(key if t == 0 else jax.random.fold_in(key, t), 3) for t in range(len(tasks))]
        resets = [task.env.population_reset(env_keys(k[0]), d) for task, k, d in zip(tasks, keys, datas)]
        xs = [inputs(task, obs) for task, (obs, _) in zip(tasks, resets)]
        stats = observe(state.obs_stats, joined(xs))
        return stats, tuple(play(task, state.params, stats, x, env_state, d, k[1], k[2])
                            for task, x, (_, env_state), d, k in zip(tasks, xs, resets, datas, keys))

    def loss_fn(params, batch: _Batch, ent_coef):
        dist, value = evaluate_batch(params, batch.obs, batch.task)
        policy_loss, approx_kl, clip_fraction = clipped_surrogate(dist.log_prob(batch.plan), batch.log_prob,
                                                                  batch.advantage, config.clip_eps)
        value_loss = 0.5 * jnp.mean(jnp.square(value - batch.target))
        loss = policy_loss + config.vf_coef * value_loss - ent_coef * dist.entropy().mean()
        return loss, (policy_loss, value_loss, approx_kl, clip_fraction)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    batch_envs = num_envs * len(tasks)

    def learn(state: PlanState, batch: _Batch, key):
        """``update_epochs`` epochs of shuffled minibatch steps (sets of envs), stopped for the rest
        of the update once a minibatch's KL before its step exceeds ``1.5 x target_kl``."""
        flat, unravel = ravel_pytree(state.params)

        def step(carry, minibatch):
            flat, opt_state, stopped = carry
            (_, info), grads = grad_fn(unravel(flat), minibatch, state.hyper.ent_coef)
            flat, opt_state, stopped = kl_stopped_step(config, tx, flat, opt_state, stopped, grads, info[2])
            return (flat, opt_state, stopped), (info, ~stopped)

        def epoch(carry, key):
            perm = jax.random.permutation(key, batch_envs)
            split = lambda x: jnp.take(x, perm, axis=0).reshape((config.num_minibatches, -1) + x.shape[1:])
            return jax.lax.scan(step, carry, jax.tree.map(split, batch))

        (flat, opt_state, stopped), (info, applied) = jax.lax.scan(
            epoch, (flat, state.opt_state, jnp.asarray(False)), jax.random.split(key, config.update_epochs))
        weight = applied.reshape(-1).astype(jnp.float32)
        total = jnp.maximum(weight.sum(), 1.0)
        means = tuple(jnp.sum(x.reshape(-1) * weight) / total for x in info)
        return unravel(flat), opt_state, means, jnp.sum(applied).astype(jnp.int32), stopped.astype(jnp.int32)

    def standardized(x):
        return (x - x.mean()) / (x.std() + 1e-8)

    def returns(ep: PlanEpisodes):
        """What the learner learns from: the episode's return, in a mixed run standardized over the
        task's envs of the update (one task's returns may be ten times another's; the critic,
        which sees the drawn problem and not the task, predicts them on one scale)."""
        return standardized(ep.episode_return) if others else ep.episode_return

    def advantages(ret, value):
        """The return ``ret`` against its group's (or the critic's ``value``), normalized over the task's envs."""
        advantage = relative_to_group(ret, config.group_size) if config.group_size > 1 else ret - value
        if config.normalize_advantages:
            advantage = standardized(advantage)
        return advantage

    def task_metrics(task: _Task, ep: PlanEpisodes) -> TaskMetrics:
        mean = lambda x: jnp.mean(x.astype(jnp.float32))
        return TaskMetrics(mean(ep.episode_return), mean(ep.final_val_loss), mean(ep.final_val_accuracy),
                           mean(ep.germinated), mean(ep.fossilized), mean(ep.pruned), mean(ep.rollbacks),
                           jnp.mean(jax.nn.one_hot(ep.plan, len(task.menu)), axis=0))

    def update_step(state: PlanState, data):
        key, k_episodes, k_learn = jax.random.split(state.key, 3)
        stats, eps = every_task_episodes(state, data, k_episodes)
        rets = [returns(ep) for ep in eps]
        batch = _Batch(joined([ep.obs for ep in eps]), joined([ep.plan for ep in eps]),
                       joined([ep.log_prob for ep in eps]),
                       joined([advantages(ret, ep.value) for ret, ep in zip(rets, eps)]), joined(rets),
                       joined([jnp.full((num_envs,), t, jnp.int32) for t in range(len(eps))]))
        params, opt_state, (policy_loss, value_loss, approx_kl, clip_fraction), applied, stopped = learn(
            state.replace(obs_stats=stats), batch, k_learn)
        update = state.update + 1
        ep = eps[0]
        metrics = PlanMetrics(
            update=update, env_steps=update * sum(t.env.episode_epochs * num_envs for t in tasks),
            episodes=jnp.asarray(num_envs, jnp.int32), policy_loss=policy_loss,
            value_loss=value_loss, approx_kl=approx_kl, clip_fraction=clip_fraction,
            explained_variance=explained_variance(ep.value, ep.episode_return),
            entropy=evaluate(state.params, ep.obs)[0].entropy().mean(), minibatch_updates=applied,
            kl_stopped=stopped,
            nonfinite=(~(jnp.all(jnp.isfinite(ravel_pytree(params)[0])) & jnp.isfinite(policy_loss)
                         & jnp.isfinite(value_loss))).astype(jnp.int32),
            tasks=tuple(task_metrics(t, e) for t, e in zip(tasks, eps)),
        )
        return state.replace(params=params, opt_state=opt_state, obs_stats=stats, key=key, update=update), metrics

    def train_chunk(state: PlanState, data):
        state, metrics = jax.lax.scan(lambda s, _: update_step(s, data), state, None, length=updates_per_chunk)
        return state, _Columns(metrics, names, other_menus)

    def plan_distribution(params, obs_stats, obs):
        dist, value = evaluate(params, norm(obs_stats, inputs(own, obs)))
        return dist.probs, value

    def act(params, obs_stats, obs, env_state, carry, key, deterministic: bool = False):
        """Each env's plan is chosen at the first call (its carry is -1) from that observation and
        kept; the plan controller acts."""
        k_plan, k_act = jax.random.split(key)
        dist, _ = evaluate(params, norm(obs_stats, inputs(own, obs)))
        choice = dist.mode() if deterministic else dist.sample(seed=k_plan)
        plan = jnp.where(carry < 0, choice.astype(jnp.int32), carry)
        return own.controller(jax.random.split(k_act, obs.shape[0]), env_state, plan), plan

    def init_carry(n: int) -> jax.Array:
        return jnp.full((n,), -1, jnp.int32)

    return PlanTrainer(init=init, train_chunk=train_chunk, act=act, plan_distribution=plan_distribution,
                       init_carry=init_carry, episodes=episodes, policy=policy, plans=names,
                       rollout_steps=env.episode_epochs, updates_per_chunk=updates_per_chunk, config=config)


@struct.dataclass
class _Columns:
    """A chunk's metrics with the menus' names, so the training loop reads them like the per-epoch
    learner's (``metrics.columns()``)."""

    metrics: PlanMetrics
    names: tuple[str, ...] = struct.field(pytree_node=False)
    others: tuple[tuple[str, tuple[str, ...]], ...] = struct.field(pytree_node=False, default=())

    def columns(self) -> dict[str, jax.Array]:
        return self.metrics.columns(self.names, self.others)
