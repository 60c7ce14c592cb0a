"""The PPO learner (esper_jax.rl.ppo).

Most tests drive the learner with ``BanditEnv``, a few-line environment with the same population
API as ``MorphogeneticEnv`` (state-dependent masks, episodes of fixed length, a reward that
pays for one op): it compiles in seconds, so rollout, GAE, minibatch epochs, KL stopping,
chunking and populations are all checked on it. The real morphogenetic environment (the TINY
configuration of the plan) runs in one module-scoped compiled chunk, in slow tests only (its
compilation takes ~40 s; the default suite meets the real env through the CLI's end-to-end runs,
tests/experiments/test_ppo_cli.py), as do the real-env chunking, population and recurrent checks.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from esper_jax.rl import normalize
from esper_jax.env.actions import ActionMasks, ActionSpace, Op
from esper_jax.rl.policy import evaluate_actions, masked_logits
from esper_jax.rl.ppo import (
    METRIC_NAMES, Hyperparams, PPOConfig, compute_gae, explained_variance, group_keys, make_train, relative_to_group,
    set_hyperparams,
)

from tests.conftest import assert_close_across_programs

# ---------------------------------------------------------------------------- a cheap stand-in env


@struct.dataclass
class BanditState:
    epoch: jax.Array       # [N]
    bias: jax.Array        # [N] per-episode observation offset, so observations vary
    germinated: jax.Array  # [N, NB]
    fossilized: jax.Array
    pruned: jax.Array
    rollbacks: jax.Array   # [N]


@dataclasses.dataclass(frozen=True)
class BanditConfig:
    episode_epochs: int


class BanditEnv:
    """Reward 1 for a GERMINATE, 0 for anything else. Masks depend on the state: FOSSILIZE is
    never valid, PRUNE only at slot 2 after the first epoch, GERMINATE only at slots whose
    parity matches the epoch, ADVANCE at slot ``epoch % 3``; blueprint 0 only at even epochs."""

    observation_size = 4
    action_space = ActionSpace(num_slots=3, num_blueprints=2)

    def __init__(self, episode_epochs: int = 4):
        self.config = BanditConfig(episode_epochs)
        self.episode_epochs = episode_epochs

    def _observe(self, state):
        e = state.epoch.astype(jnp.float32) / self.config.episode_epochs
        return jnp.stack([e, state.bias, jnp.ones_like(e), e * state.bias], axis=-1)

    def population_reset(self, keys, data):
        n = keys.shape[0]
        bias = jax.vmap(lambda k: jax.random.normal(k))(keys)
        zeros = jnp.zeros((n, 2), jnp.int32)
        state = BanditState(jnp.zeros(n, jnp.int32), bias, zeros, zeros, zeros, jnp.zeros(n, jnp.int32))
        return self._observe(state), state

    def population_masks(self, state) -> ActionMasks:
        n = state.epoch.shape[0]
        slots = jnp.arange(3)
        e = state.epoch[:, None]
        wait = jnp.ones((n, 3), bool)
        germinate = (slots + e) % 2 == 0
        advance = slots == e % 3
        alpha = jnp.ones((n, 3), bool)
        prune = (slots == 2) & (e >= 1)
        fossilize = jnp.zeros((n, 3), bool)
        slot_given_op = jnp.stack([wait, germinate, advance, alpha, prune, fossilize], axis=1)
        ones = lambda k: jnp.ones((n, k), bool)
        return ActionMasks(op=slot_given_op.any(-1), slot_given_op=slot_given_op,
                           blueprint=jnp.stack([state.epoch % 2 == 0, jnp.ones(n, bool)], -1), blend=ones(7), tempo=ones(3),
                           alpha_target=ones(3))

    def population_step(self, keys, state, action, data):
        valid = jax.vmap(ActionMasks.is_valid)(self.population_masks(state), action)
        germinate = valid & (action.op == Op.GERMINATE)
        reward = germinate.astype(jnp.float32)
        epoch = state.epoch + 1
        state = state.replace(epoch=epoch, germinated=state.germinated + germinate[:, None] * jax.nn.one_hot(
            action.blueprint, 2, dtype=jnp.int32), rollbacks=state.rollbacks + (~valid).astype(jnp.int32))
        info = {"val_loss": 1.0 - state.germinated.sum(-1) / self.config.episode_epochs,
                "val_accuracy": jnp.zeros(epoch.shape), "germinated": state.germinated.sum(-1),
                "fossilized": state.fossilized.sum(-1), "pruned": state.pruned.sum(-1), "rollbacks": state.rollbacks}
        return self._observe(state), state, reward, epoch >= self.config.episode_epochs, info


DATA = jnp.zeros((1,))


def bandit_config(**overrides) -> PPOConfig:
    base = dict(num_envs=4, update_epochs=2, num_minibatches=2, hidden_size=16)
    return PPOConfig(**{**base, **overrides})


def tree_allclose(a, b, rtol, atol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def assert_population_matches_members(trainer, init, chunk, keys, hyper, data, rtol, metrics_atol, params_atol):
    """One chunk of a vmapped population of learners equals each member run alone (``init``/``chunk``
    are the trainer's jitted single-learner functions). Returns the population and its metrics."""
    population = jax.jit(jax.vmap(trainer.init, in_axes=(0, 0, None)))(keys, hyper, data)
    population, pop_metrics = jax.jit(jax.vmap(trainer.train_chunk, in_axes=(0, None)))(population, data)
    for m in range(keys.shape[0]):
        single = init(keys[m], Hyperparams.make(hyper.learning_rate[m], hyper.ent_coef[m]), data)
        single, metrics = chunk(single, data)
        member = lambda t: jax.tree.map(lambda x: x[m], t)
        tree_allclose(member(pop_metrics), metrics, rtol=rtol, atol=metrics_atol)
        tree_allclose(member(population.params), single.params, rtol=rtol, atol=params_atol)
    return population, pop_metrics


def germinate_probability(trainer, runner, env):
    """Mean probability of GERMINATE under the policy at fresh episodes' first observations."""
    obs, state = env.population_reset(jax.random.split(jax.random.key(99), 16), DATA)
    nobs = normalize.apply(runner.obs_stats, obs)
    _, logits, _ = trainer.policy.apply(runner.params, trainer.init_carry(16), nobs, jnp.ones(16, bool))
    masks = env.population_masks(state)
    return float(jax.nn.softmax(masked_logits(logits["op"], masks.op))[:, Op.GERMINATE].mean())


# ---------------------------------------------------------------------------- GAE


def gae_numpy(rewards, values, dones, last_value, gamma, lam, final_values=None):
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            if dones[t, n]:
                next_v = 0.0 if final_values is None else final_values[t, n]
                running = 0.0
            else:
                next_v = values[t + 1, n] if t + 1 < T else last_value[n]
            delta = rewards[t, n] + gamma * next_v - values[t, n]
            running = delta + gamma * lam * running
            adv[t, n] = running
    return adv, adv + values


@pytest.mark.parametrize("bootstrap", [False, True])
def test_gae_matches_numpy_reference(bootstrap):
    rng = np.random.default_rng(0)
    T, N = 9, 5
    rewards = rng.normal(size=(T, N)).astype(np.float32)
    values = rng.normal(size=(T, N)).astype(np.float32)
    dones = rng.random((T, N)) < 0.25
    dones[-1, 0] = True
    last_value = rng.normal(size=N).astype(np.float32)
    final = rng.normal(size=(T, N)).astype(np.float32) if bootstrap else None
    adv, ret = jax.jit(compute_gae, static_argnums=(4, 5))(
        rewards, values, dones, last_value, 0.97, 0.9, None if final is None else jnp.asarray(final))
    ref_adv, ref_ret = gae_numpy(rewards, values, dones, last_value, 0.97, 0.9, final)
    np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-5, atol=1e-5)


def test_gae_with_lambda_one_and_no_dones_is_discounted_return_minus_value():
    rewards = jnp.asarray([[1.0], [2.0], [3.0]])
    values = jnp.asarray([[0.5], [0.25], [0.0]])
    adv, ret = compute_gae(rewards, values, jnp.zeros((3, 1), bool), jnp.asarray([4.0]), 0.5, 1.0)
    expected_returns = [1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 4, 2 + 0.5 * 3 + 0.25 * 4, 3 + 0.5 * 4]
    np.testing.assert_allclose(np.asarray(ret[:, 0]), expected_returns, rtol=1e-6)


def test_explained_variance():
    returns = jnp.asarray([1.0, 2.0, 3.0, 4.0])
    assert float(explained_variance(returns, returns)) == pytest.approx(1.0)
    assert float(explained_variance(jnp.full(4, 2.5), returns)) == pytest.approx(0.0)
    assert float(explained_variance(returns, jnp.ones(4))) == 0.0  # constant returns: nothing to explain


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, match", [
    (dict(num_envs=0), "num_envs"), (dict(update_epochs=0), "update_epochs"), (dict(rollout_steps=-1), "rollout_steps"),
    (dict(recurrent="rnn"), "recurrent"), (dict(gamma=0.0), "gamma"), (dict(target_kl=0.0), "target_kl"),
    (dict(group_size=0), "group_size"), (dict(num_envs=6, group_size=4), "multiple"),
])
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**overrides)


def test_make_train_rejects_minibatches_that_do_not_divide_the_batch():
    env = BanditEnv(3)
    with pytest.raises(ValueError, match="num_minibatches"):
        make_train(PPOConfig(num_envs=3, num_minibatches=2), env, 1)
    with pytest.raises(ValueError, match="num_minibatches"):
        make_train(PPOConfig(num_envs=2, num_minibatches=4, recurrent="gru"), env, 1)
    with pytest.raises(ValueError, match="updates_per_chunk"):
        make_train(PPOConfig(), env, 0)


# ---------------------------------------------------------------------------- the learner on BanditEnv


@pytest.fixture(scope="module")
def bandit_runs():
    """One configuration compiled once: init, chunks of 1 and 2 updates, a bare rollout. The
    learning rate and entropy coefficient are traced, so tests vary them without recompiling."""
    env = BanditEnv(3)
    config = bandit_config(rollout_steps=6, target_kl=None)
    one, two = make_train(config, env, 1), make_train(config, env, 2)
    init = jax.jit(one.init)
    return env, config, one, two, init, jax.jit(one.train_chunk), jax.jit(two.train_chunk)


def test_policy_learns_the_rewarded_op(bandit_runs):
    env, config, one, two, init, chunk1, chunk2 = bandit_runs
    runner = init(jax.random.key(0), Hyperparams.make(1e-2, 0.0), DATA)
    before = germinate_probability(one, runner, env)
    history = []
    for _ in range(5):
        runner, metrics = chunk2(runner, DATA)
        history.append(metrics)
    metrics = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *history)
    after = germinate_probability(one, runner, env)
    returns = metrics.mean_return
    # GERMINATE starts as one of 4-5 valid ops; an episode can germinate at most 3 times.
    assert before < 0.3
    assert after > before + 0.3, (before, after)
    assert returns[-3:].mean() > returns[:3].mean() + 0.5, returns
    np.testing.assert_allclose(metrics.germinated, returns)  # one germination = reward 1


def test_train_chunk_metrics_and_state(bandit_runs):
    env, config, one, two, init, chunk1, chunk2 = bandit_runs
    runner = init(jax.random.key(0), Hyperparams.default(config), DATA)
    after, metrics = chunk2(runner, DATA)
    assert set(metrics.columns()) == set(METRIC_NAMES)
    for name, value in metrics.columns().items():
        assert value.shape == (2,), name
        # Without kickstarting there is no teacher's loss to report.
        assert np.all(np.isnan(value) if name == "teacher_nll" else np.isfinite(np.asarray(value))), name
    np.testing.assert_array_equal(np.asarray(metrics.update), [1, 2])
    np.testing.assert_array_equal(np.asarray(metrics.env_steps), [6 * 4, 12 * 4])
    np.testing.assert_array_equal(np.asarray(metrics.episodes), [8, 8])  # 2 episodes of 3 per env per rollout
    assert int(after.update) == 2 and float(after.obs_stats.count) == 12 * 4
    assert not np.allclose(np.asarray(after.obs_stats.mean), 0.0)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), runner.params, after.params))
    assert all(changed)  # every parameter moved (BanditEnv makes every head matter sometimes)
    # No target KL: every minibatch of every epoch applies.
    np.testing.assert_array_equal(np.asarray(metrics.minibatch_updates), [4, 4])
    np.testing.assert_array_equal(np.asarray(metrics.kl_stopped), [0, 0])
    # Episodes are complete at the end of each rollout: envs were reset, returns restarted.
    np.testing.assert_array_equal(np.asarray(after.env_state.epoch), 0)
    assert bool(jnp.all(after.episode_start)) and float(jnp.abs(after.episode_return).max()) == 0.0
    assert int(after.env_state.rollbacks.sum()) == 0  # BanditEnv counts invalid actions here
    np.testing.assert_array_equal(np.asarray(metrics.nonfinite), [0, 0])


def test_a_diverged_learner_is_flagged_on_device(bandit_runs):
    """Parameters that stopped being finite are reported by the update's own metrics (the
    training loop reads them once per chunk); a healthy learner beside it is not flagged."""
    env, config, one, two, init, chunk1, chunk2 = bandit_runs
    runner = init(jax.random.key(0), Hyperparams.default(config), DATA)
    poisoned = runner.replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), runner.params))
    _, metrics = chunk2(poisoned, DATA)
    np.testing.assert_array_equal(np.asarray(metrics.nonfinite), [1, 1])


def test_rollout_actions_are_valid_and_log_probs_replay(bandit_runs):
    env, config, one, two, init, chunk1, chunk2 = bandit_runs
    runner = init(jax.random.key(1), Hyperparams.default(config), DATA)
    _, traj, finished, last_value = jax.jit(one.rollout)(runner, DATA, jax.random.key(5))
    flat = lambda t: jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), t)
    assert bool(jnp.all(jax.vmap(ActionMasks.is_valid)(flat(traj.masks), flat(traj.action))))
    ops = np.asarray(traj.action.op)
    assert not np.any(ops == Op.FOSSILIZE) and len(np.unique(ops)) >= 3
    np.testing.assert_array_equal(np.asarray(traj.done)[:, 0], [False, False, True] * 2)
    np.testing.assert_array_equal(np.asarray(traj.episode_start)[:, 0], [True, False, False] * 2)
    # The update recomputes exactly the log-probs the rollout sampled with.
    _, logits, values = one.policy.apply(runner.params, (), flat(traj.obs), flat(traj.episode_start))
    log_prob, _, _ = evaluate_actions(logits, flat(traj.masks), flat(traj.action))
    np.testing.assert_allclose(np.asarray(log_prob), np.asarray(flat(traj.log_prob)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(values), np.asarray(flat(traj.value)), rtol=1e-5, atol=1e-5)


@pytest.mark.cross_program
def test_same_key_same_results_and_chunks_compose(bandit_runs):
    env, config, one, two, init, chunk1, chunk2 = bandit_runs
    runner = init(jax.random.key(2), Hyperparams.default(config), DATA)
    a, ma = chunk2(runner, DATA)
    b, mb = chunk2(runner, DATA)
    # the same program twice: bit for bit
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), ma, mb)
    # Two chunks of one update continue where one chunk of two goes: the same keys and counts
    # exactly, and, as a scan of one update and a scan of two are two programs (issue 23), metrics
    # and parameters to rounding. 64 steps of a leaf's largest value (~8e-6) leave room for two
    # Adam updates carrying a difference (the slow real-env check allows 1e-5); a chunk that did
    # not continue (another key, a reset optimizer) is off by orders of magnitude more.
    r1, m1 = chunk1(runner, DATA)
    r2, m2 = chunk1(r1, DATA)
    stitched = jax.tree.map(lambda x, y: np.concatenate([np.asarray(x), np.asarray(y)]), m1, m2)
    assert_close_across_programs(stitched, jax.tree.map(np.asarray, ma), ulps=64, err_msg="metrics")
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(r2.key)), np.asarray(jax.random.key_data(a.key)))
    assert_close_across_programs(r2.params, a.params, ulps=64, err_msg="params")


def test_population_members_equal_single_runs(bandit_runs):
    env, config, one, two, init, chunk1, chunk2 = bandit_runs
    keys = jnp.stack([jax.random.key(10), jax.random.key(11)])
    hyper = Hyperparams.make([1e-3, 3e-2], [0.0, 0.1])
    population, pop_metrics = assert_population_matches_members(
        one, init, chunk1, keys, hyper, DATA, rtol=1e-4, metrics_atol=1e-5, params_atol=1e-6)
    # The members really had different hyperparameters.
    lr = population.opt_state[1].hyperparams["learning_rate"]
    np.testing.assert_allclose(np.asarray(lr), [1e-3, 3e-2])
    assert not np.allclose(np.asarray(pop_metrics.approx_kl[0]), np.asarray(pop_metrics.approx_kl[1]))


def test_set_hyperparams_changes_the_learning_rate(bandit_runs):
    env, config, one, two, init, chunk1, chunk2 = bandit_runs
    runner = init(jax.random.key(3), Hyperparams.default(config), DATA)
    frozen = set_hyperparams(runner, Hyperparams.make(0.0, config.ent_coef))
    after, _ = chunk1(frozen, DATA)
    tree_allclose(after.params, runner.params, rtol=0, atol=0)  # learning rate 0: nothing moves
    assert float(after.hyper.learning_rate) == 0.0


@pytest.mark.parametrize("kind", ["gru", pytest.param("lstm", marks=pytest.mark.slow)])
def test_recurrent_unaligned_rollouts_replay_exactly_and_target_kl_stops(kind):
    """Rollouts of 5 steps over episodes of 3: resets happen mid-rollout (the ``jnp.any(done)``
    path) and episodes span rollouts, so an update starts from a non-zero carry.

    Minibatches of whole env sequences are replayed from the rollout's start carry with the
    recorded episode starts. With a learning rate of 0 every minibatch is measured at the
    rollout's parameters, so the KL is exactly the replay error: ~0 only if the replay reproduces
    the rollout, carry and resets included (test_policy checks that the reset itself matters).
    With a real learning rate, a tiny target KL stops each update early, by masks."""
    env = BanditEnv(3)
    config = bandit_config(num_envs=2, rollout_steps=5, update_epochs=3, num_minibatches=2, recurrent=kind,
                           bootstrap_on_done=True, target_kl=1e-6)
    trainer = make_train(config, env, 3)
    chunk = jax.jit(trainer.train_chunk)
    runner = jax.jit(trainer.init)(jax.random.key(6), Hyperparams.make(0.0, 0.05), DATA)
    frozen, metrics = chunk(runner, DATA)
    # Episodes end at global steps 3, 6, 9, 12, 15: rollout 1-5 ends one per env, 6-10 two, 11-15 two.
    np.testing.assert_array_equal(np.asarray(metrics.episodes), [2, 4, 4])
    np.testing.assert_array_equal(np.asarray(frozen.env_state.epoch), [0, 0])
    assert np.all(np.asarray(metrics.approx_kl) < 1e-7), metrics.approx_kl
    assert np.all(np.asarray(metrics.clip_fraction) == 0)
    np.testing.assert_array_equal(np.asarray(metrics.minibatch_updates), [6, 6, 6])
    tree_allclose(frozen.params, runner.params, rtol=0, atol=0)

    learning, metrics = chunk(set_hyperparams(runner, Hyperparams.make(3e-2, 0.05)), DATA)
    for name, value in metrics.columns().items():
        assert name == "teacher_nll" or np.all(np.isfinite(np.asarray(value))), name
    # The first minibatch is measured at the rollout's parameters (KL ~ 0) and applies; a later
    # one exceeds 1.5 * target_kl, and it and every one after it are masked out.
    updates = np.asarray(metrics.minibatch_updates)
    assert np.all(updates >= 1) and np.all(updates < 6), updates
    np.testing.assert_array_equal(np.asarray(metrics.kl_stopped), [1, 1, 1])
    assert jax.tree.structure(learning.policy_carry) == jax.tree.structure(trainer.init_carry(2))
    assert all(float(jnp.abs(c).max()) > 0 for c in jax.tree.leaves(learning.policy_carry))


def test_act_samples_valid_actions_and_mode_is_deterministic(bandit_runs):
    env, config, one, two, init, chunk1, chunk2 = bandit_runs
    runner = init(jax.random.key(9), Hyperparams.default(config), DATA)
    obs, state = env.population_reset(jax.random.split(jax.random.key(1), 6), DATA)
    masks = env.population_masks(state)
    act = jax.jit(one.act, static_argnums=6)
    a, carry = act(runner.params, runner.obs_stats, obs, masks, one.init_carry(6), jax.random.key(0), False)
    assert bool(jnp.all(jax.vmap(ActionMasks.is_valid)(masks, a))) and carry == ()
    m1, _ = act(runner.params, runner.obs_stats, obs, masks, (), jax.random.key(0), True)
    m2, _ = act(runner.params, runner.obs_stats, obs, masks, (), jax.random.key(1), True)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), m1, m2)


# ---------------------------------------------------------------------------- the real environment


def tiny_env():
    from esper_jax.data import load_image_dataset
    from esper_jax.env.environment import MorphogeneticEnv, make_env_config, make_env_data
    from esper_jax.lattice.hosts import CNNHost
    from esper_jax.env.tasks import get_task

    task = get_task("cifar10")
    config = make_env_config(task, ("r0c0",), blueprints=("conv_small", "norm"),
                             host=CNNHost(base_width=4, num_blocks=1, pool_blocks=1), episode_epochs=3,
                             steps_per_epoch=2, batch_size=16, val_size=32, data_label="SYNTHETIC data")
    env = MorphogeneticEnv(config)
    data = make_env_data(config, load_image_dataset("cifar10", "synthetic", n_train=256, n_test=64))
    return env, data


TINY_PPO = PPOConfig(num_envs=2, update_epochs=2, num_minibatches=2, hidden_size=16)


@pytest.fixture(scope="module")
def tiny():  # ~40 s of compilation: the tests that use it are slow (the CLI's end-to-end runs cover the real env)
    env, data = tiny_env()
    trainer = make_train(TINY_PPO, env, 2)
    init, chunk = jax.jit(trainer.init), jax.jit(trainer.train_chunk)
    runner = init(jax.random.key(0), Hyperparams.default(TINY_PPO), data)
    after, metrics = chunk(runner, data)
    return env, data, trainer, init, chunk, runner, after, metrics


@pytest.mark.slow
def test_real_env_chunk_runs_with_finite_metrics(tiny):
    env, data, trainer, init, chunk, runner, after, metrics = tiny
    assert set(metrics.columns()) == set(METRIC_NAMES)
    for name, value in metrics.columns().items():
        assert value.shape == (2,) and (name == "teacher_nll" or np.all(np.isfinite(np.asarray(value)))), name
    np.testing.assert_array_equal(np.asarray(metrics.update), [1, 2])
    np.testing.assert_array_equal(np.asarray(metrics.env_steps), [6, 12])
    np.testing.assert_array_equal(np.asarray(metrics.episodes), [2, 2])
    assert np.all(np.asarray(metrics.mean_final_val_loss) > 0)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), runner.params, after.params)["params"]
    # Torso, value and op head always learn; option heads only when their ops were sampled.
    for layer in ("torso_0", "torso_1", "value", "head_op"):
        assert changed[layer]["kernel"], layer
    # Envs were reset at the episode end, inside the rollout.
    np.testing.assert_array_equal(np.asarray(after.env_state.epoch), [0, 0])
    assert float(after.obs_stats.count) == 12


@pytest.mark.slow
def test_real_env_same_key_same_metrics(tiny):
    env, data, trainer, init, chunk, runner, after, metrics = tiny
    again, metrics2 = chunk(runner, data)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), metrics, metrics2)
    other, metrics3 = chunk(init(jax.random.key(1), Hyperparams.default(TINY_PPO), data), data)
    assert not np.array_equal(np.asarray(metrics.mean_final_val_loss), np.asarray(metrics3.mean_final_val_loss))


@pytest.mark.slow
def test_real_env_chunks_compose_and_population_matches_members(tiny):
    env, data, trainer, init, chunk, runner, after, metrics = tiny
    one = make_train(TINY_PPO, env, 1)
    chunk1 = jax.jit(one.train_chunk)
    r1, m1 = chunk1(runner, data)
    r2, m2 = chunk1(r1, data)
    stitched = jax.tree.map(lambda x, y: np.concatenate([np.asarray(x), np.asarray(y)]), m1, m2)
    tree_allclose(stitched, metrics, rtol=1e-5, atol=1e-6)
    tree_allclose(r2.params, after.params, rtol=1e-5, atol=1e-6)

    keys = jnp.stack([jax.random.key(0), jax.random.key(3)])
    hyper = Hyperparams.make([3e-4, 3e-3], [0.05, 0.01])
    assert_population_matches_members(trainer, init, chunk, keys, hyper, data, rtol=1e-3, metrics_atol=1e-4,
                                      params_atol=1e-5)


@pytest.mark.slow
def test_real_env_recurrent_policy_runs():
    env, data = tiny_env()
    config = dataclasses.replace(TINY_PPO, recurrent="lstm")
    trainer = make_train(config, env, 2)
    runner = jax.jit(trainer.init)(jax.random.key(0), Hyperparams.default(config), data)
    runner, metrics = jax.jit(trainer.train_chunk)(runner, data)
    for name, value in metrics.columns().items():
        assert name == "teacher_nll" or np.all(np.isfinite(np.asarray(value))), name
    assert jax.tree.structure(runner.policy_carry) == jax.tree.structure(trainer.init_carry(2))


class KeyRecordingBandit(BanditEnv):
    """The bandit, recording every reset and step key it is given (as key data rows)."""

    def __init__(self, log: list, **kwargs):
        super().__init__(**kwargs)
        self.log = log

    def _record(self, keys):
        jax.debug.callback(lambda data: self.log.extend(map(tuple, np.asarray(data).reshape(-1, 2))),
                           jax.random.key_data(keys))

    def population_reset(self, keys, data):
        self._record(keys)
        return super().population_reset(keys, data)

    def population_step(self, keys, state, action, data):
        self._record(keys)
        return super().population_step(keys, state, action, data)


def test_held_out_stream_never_replays_a_training_environment():
    """Every reset and step key training draws (two run seeds, three updates of four envs) is
    disjoint from the held-out episode keys of either run seed."""
    from esper_jax.runs.evaluation import episode_keys, held_out_key

    log: list = []
    env = KeyRecordingBandit(log, episode_epochs=4)
    config = bandit_config()
    trainer = make_train(config, env, 3)
    init, chunk = jax.jit(trainer.init), jax.jit(trainer.train_chunk)  # compiled once for both seeds
    for seed in (0, 1):
        jax.block_until_ready(chunk(init(jax.random.key(seed), Hyperparams.default(config), DATA), DATA))
    training = set(log)
    assert len(training) >= 2 * 4 * (1 + 3 * 4)  # resets and steps of every update were seen
    first_resets = jax.random.split(jax.random.split(jax.random.key(0), 3)[1], 4)  # what init draws
    assert {tuple(row) for row in np.asarray(jax.random.key_data(first_resets))} <= training  # the log sees them
    for seed in (0, 1):
        resets, steps, _ = episode_keys(held_out_key(seed), 16, 4)
        held_out = {tuple(row) for k in (resets, steps) for row in np.asarray(jax.random.key_data(k)).reshape(-1, 2)}
        assert len(held_out) == 16 * 5 and not held_out & training


# ---------------------------------------------------------------------------- problem groups


def test_relative_to_group_is_the_leave_one_out_baseline():
    rewards = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    for group in (2, 3):
        relative = np.asarray(relative_to_group(jnp.asarray(rewards), group))
        for n in range(6):
            first = n - n % group
            others = [j for j in range(first, first + group) if j != n]
            np.testing.assert_allclose(relative[:, n], rewards[:, n] - rewards[:, others].mean(-1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(relative.reshape(5, -1, group).sum(-1), 0.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(relative_to_group(jnp.asarray(rewards), 1)), rewards)
    keys = np.asarray(jax.random.key_data(group_keys(jax.random.key(0), 6, 3)))
    assert (keys[0] == keys[2]).all() and (keys[3] == keys[5]).all() and not (keys[0] == keys[3]).all()
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(group_keys(jax.random.key(0), 6, 1))),
                                  np.asarray(jax.random.key_data(jax.random.split(jax.random.key(0), 6))))


class ProblemRewardBandit(KeyRecordingBandit):
    """Pays each step ten times the episode's problem (its ``bias``, drawn from the reset key) whatever
    the action: all of its return is env-to-env spread, none of it the policy's doing. Records its keys."""

    def population_step(self, keys, state, action, data):
        obs, next_state, _, done, info = super().population_step(keys, state, action, data)
        return obs, next_state, 10.0 * state.bias, done, info


def test_groups_share_their_problems_and_learn_from_rewards_relative_to_them():
    """Envs of a group draw the same problems and get the same step keys (all resets and steps of
    two updates, as recorded), and learn from their reward relative to their group's: on a reward
    that is all problem, grouped value targets are exactly zero (the critic's loss is its own
    outputs' square, under 1), while ungrouped they are the spread itself (tens)."""
    value_loss = {}
    for group in (2, 1):
        log: list = []
        config = bandit_config(num_envs=4, group_size=group, rollout_steps=6)
        trainer = make_train(config, ProblemRewardBandit(log, episode_epochs=3), 2)
        runner, metrics = jax.jit(trainer.train_chunk)(
            trainer.init(jax.random.key(0), Hyperparams.default(config), DATA), DATA)
        value_loss[group] = float(metrics.value_loss[0])
        if group == 2:
            rows = np.asarray(log).reshape(-1, 4, 2)  # every call: 4 envs' keys
            assert len(rows) == 1 + 2 * (6 + 2)       # init's reset; per update six steps and two resets
            np.testing.assert_array_equal(rows[:, 0], rows[:, 1])
            np.testing.assert_array_equal(rows[:, 2], rows[:, 3])
            assert not (rows[:, 0] == rows[:, 2]).all(-1).any()
            bias = np.asarray(runner.env_state.bias)
            np.testing.assert_array_equal(bias[::2], bias[1::2])
    assert value_loss[2] < 1.0 and value_loss[1] > 10.0, value_loss
