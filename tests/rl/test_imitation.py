"""Warm start by imitation (esper_jax.rl.imitation), on the bandit stand-in env of test_ppo.

The teacher germinates (blueprint 1) in the first half of each 4-epoch episode, at slot
``epoch % 2``, and advances slot ``epoch % 3`` in the second: a rule the policy must read from its
observation (the epoch fraction), worth exactly 2 per episode (one per GERMINATE).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.env.actions import ActionMasks, FactoredAction, Op
from esper_jax.rl.imitation import ImitationConfig, make_imitation
from esper_jax.rl.ppo import Hyperparams, make_train
from tests.rl.test_ppo import DATA, BanditEnv, bandit_config


def teacher(keys, state) -> FactoredAction:
    first_half = state.epoch < 2
    full = lambda value: jnp.full(state.epoch.shape, value, jnp.int32)
    return FactoredAction(op=jnp.where(first_half, Op.GERMINATE, Op.ADVANCE).astype(jnp.int32),
                          slot=jnp.where(first_half, state.epoch % 2, state.epoch % 3).astype(jnp.int32),
                          blueprint=full(1), blend=full(0), tempo=full(0), alpha_target=full(0))


@pytest.fixture(scope="module")
def imitated():
    env = BanditEnv(episode_epochs=4)
    config = bandit_config(learning_rate=1e-2)
    trainer = make_train(config, env, 2)
    imitate = jax.jit(make_imitation(trainer, teacher, ImitationConfig(rounds=3, epochs=20)))
    runner = jax.jit(trainer.init)(jax.random.key(0), Hyperparams.default(config), DATA)
    after, metrics = imitate(runner, DATA)
    return env, config, trainer, imitate, runner, after, metrics


def test_the_teachers_actions_are_valid_and_its_episodes_are_what_the_rollout_saw(imitated):
    env, *_ = imitated
    _, state = env.population_reset(jax.random.split(jax.random.key(1), 4), DATA)
    for _ in range(4):
        action = teacher(None, state)
        assert bool(jnp.all(jax.vmap(ActionMasks.is_valid)(env.population_masks(state), action)))
        _, state, _, _, _ = env.population_step(None, state, action, DATA)
    *_, metrics = imitated
    # The teacher acted in every round, not the policy: each episode earned its 2 GERMINATE rewards.
    np.testing.assert_array_equal(np.asarray(metrics.mean_return), [2.0, 2.0, 2.0])


def test_the_policy_learns_to_act_as_the_teacher_does(imitated):
    env, config, trainer, imitate, runner, after, metrics = imitated
    nll, agreement = np.asarray(metrics.nll), np.asarray(metrics.agreement)
    assert nll[-1] < 0.5 * nll[0], nll        # the teacher's actions became likely
    assert agreement[-1] == 1.0, agreement     # and the policy's greedy action is the teacher's, every step
    assert np.asarray(metrics.value_loss)[-1] < 0.05, metrics.value_loss  # the value learned the teacher's returns
    # Greedy on fresh episodes (not the ones it was fitted on), the imitated policy is the teacher.
    act = jax.jit(trainer.act, static_argnums=6)
    obs, state = env.population_reset(jax.random.split(jax.random.key(7), 4), DATA)
    for _ in range(4):
        action, _ = act(after.params, after.obs_stats, obs, env.population_masks(state), (), jax.random.key(0), True)
        expected = teacher(None, state)
        for head in ("op", "slot"):
            np.testing.assert_array_equal(np.asarray(getattr(action, head)), np.asarray(getattr(expected, head)))
        obs, state, _, _, _ = env.population_step(None, state, action, DATA)


def test_imitation_is_part_of_initialization(imitated):
    env, config, trainer, imitate, runner, after, metrics = imitated
    assert int(after.update) == 0
    assert float(after.obs_stats.count) == float(runner.obs_stats.count) + 3 * 4 * 4  # 3 rounds x 4 envs x 4 steps
    # Fresh Adam moments for PPO, at the learner's own learning rate.
    fresh = jax.tree.leaves(runner.opt_state)
    for a, b in zip(jax.tree.leaves(after.opt_state), fresh):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # One compiled program run twice gives the same bits; PPO trains on from the imitated state.
    again, metrics2 = imitate(runner, DATA)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 (after.params, metrics), (again.params, metrics2))
    trained, ppo_metrics = jax.jit(trainer.train_chunk)(after, DATA)
    np.testing.assert_array_equal(np.asarray(ppo_metrics.update), [1, 2])
    assert np.all(np.isfinite(np.asarray(ppo_metrics.policy_loss)))


def test_bad_imitation_settings_are_refused():
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        ImitationConfig(rounds=0)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        ImitationConfig(epochs=-1)
    trainer = make_train(bandit_config(recurrent="gru"), BanditEnv(), 1)
    with pytest.raises(ValueError, match="recurrent"):
        make_imitation(trainer, teacher, ImitationConfig())


def waiting_teacher(keys, state) -> FactoredAction:
    """Never grows: the bandit pays only for GERMINATE, so this teacher earns nothing."""
    zero = jnp.zeros(state.epoch.shape, jnp.int32)
    return FactoredAction(op=zero, slot=zero, blueprint=zero + 1, blend=zero, tempo=zero, alpha_target=zero)


def test_kickstarting_holds_the_policy_to_its_teacher_against_the_reward():
    """PPO alone learns to germinate (the bandit's only reward); with a large distillation weight
    toward a teacher that always waits, the same learner stays with the teacher."""
    env = BanditEnv(episode_epochs=4)
    germinated, nll = {}, {}
    for coef in (0.0, 5.0):
        config = bandit_config(learning_rate=3e-2, kickstart_coef=coef)
        trainer = make_train(config, env, 12, teacher=waiting_teacher)
        runner = jax.jit(trainer.init)(jax.random.key(0), Hyperparams.default(config), DATA)
        _, metrics = jax.jit(trainer.train_chunk)(runner, DATA)
        germinated[coef] = np.asarray(metrics.germinated)
        nll[coef] = np.asarray(metrics.teacher_nll)
    assert np.all(np.isnan(nll[0.0]))                 # no teacher's loss without kickstarting
    assert nll[5.0][-1] < 0.5 * nll[5.0][0], nll[5.0]  # the teacher's actions became likely
    assert germinated[0.0][-3:].mean() > germinated[0.0][:3].mean() + 0.5, germinated[0.0]
    assert germinated[5.0][-3:].mean() < germinated[5.0][:3].mean(), germinated[5.0]


def test_kickstarting_needs_a_teacher():
    with pytest.raises(ValueError, match="kickstart_coef 0.5 distills a teacher"):
        make_train(bandit_config(kickstart_coef=0.5), BanditEnv(), 1)
    with pytest.raises(ValueError, match="kickstart_coef"):
        bandit_config(kickstart_coef=-1.0)
