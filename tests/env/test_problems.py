"""The problem family (esper_jax.env.problems) and the compute price of the reward, each on its own
and inside the tiny env: the batches an env draws come from its problem's part of the training
set with its problem's noisy labels, and the env's per-epoch compute beyond the host's is
``runs.compute``'s count. Only one batch sampler is compiled."""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.env_rig import tiny_env
from esper_jax.env.environment import MorphogeneticEnv
from esper_jax.env.observations import global_feature_names
from esper_jax.env.problems import ProblemFamily, draw_problem, noisy_targets, problem_size, train_count
from esper_jax.env.rewards import RewardConfig
from esper_jax.lattice.lifecycle import Stage
from esper_jax.runs import compute as cp


def test_draws_fall_in_the_family_and_depend_on_the_key_alone():
    family = ProblemFamily((0.05, 0.5), (0.1, 0.3))
    problems = jax.vmap(lambda k: draw_problem(family, k))(jax.random.split(jax.random.key(0), 400))
    fraction, noise = np.asarray(problems.train_fraction), np.asarray(problems.label_noise)
    assert fraction.min() >= 0.05 and fraction.max() <= 0.5 and noise.min() >= 0.1 and noise.max() <= 0.3
    # log-uniform: about half the draws below the geometric mean of the range
    assert 0.4 < np.mean(fraction < np.sqrt(0.05 * 0.5)) < 0.6
    again = draw_problem(family, jax.random.key(7))
    assert float(again.train_fraction) == float(draw_problem(family, jax.random.key(7)).train_fraction)
    single = draw_problem(ProblemFamily(0.25, 0.2), jax.random.key(3))
    assert (float(single.train_fraction), float(single.label_noise)) == (0.25, np.float32(0.2))


def test_train_count_rounds_up_and_keeps_a_minimum():
    problem = draw_problem(ProblemFamily(0.01), jax.random.key(0))
    assert int(train_count(problem, 1000)) == 10
    assert int(train_count(problem, 50, minimum=18)) == 18


def test_noisy_targets_replace_the_drawn_fraction_the_same_way_every_time():
    problem = draw_problem(ProblemFamily(1.0, 0.4), jax.random.key(1))
    ids = jnp.arange(4000)
    labels = ids % 10
    noisy = np.asarray(noisy_targets(problem, ids, labels, 10))
    changed = np.mean(noisy != np.asarray(labels))
    assert 0.33 < changed < 0.39  # 0.4 replaced, a tenth of them by their own class
    again = np.asarray(noisy_targets(problem, ids[::-1], labels[::-1], 10))[::-1]
    np.testing.assert_array_equal(noisy, again)  # a target's fate is its id's, not its place in the batch
    clean = noisy_targets(draw_problem(ProblemFamily(1.0, 0.0), jax.random.key(1)), ids, labels, 10)
    np.testing.assert_array_equal(np.asarray(clean), np.asarray(labels))


@pytest.mark.parametrize("flag, value", [("train_fraction", "0:1"), ("train_fraction", 1.5),
                                         ("label_noise", "0.3:0.1"), ("label_noise", "a:b")])
def test_a_bad_range_is_refused_naming_its_flag(flag, value):
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} must be a number or a range"):
        ProblemFamily(**{flag: value})


def test_the_default_family_is_trivial_and_a_drawn_one_is_not():
    assert ProblemFamily().trivial and not ProblemFamily((0.1, 1.0)).trivial and ProblemFamily(label_noise=0.1).noisy


def test_an_env_samples_from_its_problem_with_its_noisy_labels():
    tiny = tiny_env()
    family = ProblemFamily(0.25, 0.5)  # the first 64 of 256 images, half the labels replaced
    env = MorphogeneticEnv(dataclasses.replace(tiny.env.config, problems=family, augment="none"))
    problem = draw_problem(family, jax.random.key(5))
    draws = jax.jit(jax.vmap(lambda k: env._draw_batch(k, tiny.data, problem)))(jax.random.split(jax.random.key(0), 40))
    index = np.asarray(draws.index)
    assert index.max() < 64 and index.max() > 48
    x, y = jax.jit(lambda d: env._make_batch(d, tiny.data, problem))(jax.tree.map(lambda a: a[0], draws))
    truth = np.asarray(tiny.data.train_y)[index[0]]
    expected = np.asarray(noisy_targets(problem, jnp.asarray(index[0]), jnp.asarray(truth), 10))
    np.testing.assert_array_equal(np.asarray(y), expected)
    assert np.any(np.asarray(y) != truth)
    # the images themselves are untouched (normalized by another program: a float tolerance)
    np.testing.assert_allclose(np.asarray(x), np.asarray(env._val_inputs(tiny.data.replace(
        val_x=tiny.data.train_x[index[0]]))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("augment", ["crop_flip", "crop", "none"])
def test_augment_shifts_and_mirrors_as_configured(augment):
    tiny = tiny_env()
    env = MorphogeneticEnv(dataclasses.replace(tiny.env.config, augment=augment))
    problem = draw_problem(ProblemFamily(), jax.random.key(0))
    draw = env._draw_batch(jax.random.key(1), tiny.data, problem)
    flips, offsets = np.asarray(draw.flips), np.asarray(draw.offsets)
    assert flips.any() == (augment == "crop_flip")  # 50% flips over a batch: some, unless mirroring is off
    assert (offsets != offsets[0]).any() == (augment != "none")


def test_an_unknown_augmentation_is_refused():
    with pytest.raises(ValueError, match="augment must be one of crop_flip, crop, none"):
        dataclasses.replace(tiny_env().env.config, augment="mirror")


def test_the_priced_compute_is_the_episode_count_beyond_the_host():
    tiny = tiny_env()
    cfg = tiny.env.config
    env = MorphogeneticEnv(dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, compute_weight=1.0)))
    costs = env.model_costs(tiny.data)
    # two members: one seed TRAINING (computed), one BLENDING (computed and measured); blueprint 0
    stage = jnp.array([[Stage.TRAINING], [Stage.BLENDING]], jnp.int32)
    lattice = types.SimpleNamespace(status=types.SimpleNamespace(stage=stage, blueprint=jnp.zeros((2, 1), jnp.int32)))
    priced = np.asarray(env._seed_compute(lattice, tiny.data))
    steps, epochs = cfg.steps_per_epoch, cfg.episode_epochs
    counted = cp.episode_compute(costs, np.array([[[True]], [[True]]]), np.array([[[False]], [[True]]]),
                                 np.zeros((2, 1, 1), int), steps)
    host_only = cp.episode_compute(costs, np.zeros((2, 1, 1), bool), np.zeros((2, 1, 1), bool),
                                   np.full((2, 1, 1), -1), steps)
    host_episode = epochs * (steps * costs.host_train + costs.host_eval) + costs.host_eval
    np.testing.assert_allclose(priced, (counted.total - host_only.total) / host_episode, rtol=1e-5)
    assert priced[1] > priced[0] > 0


def test_compute_weight_is_refused_with_the_sparse_reward():
    with pytest.raises(ValueError, match="sparse reward"):
        RewardConfig(kind="sparse", compute_weight=1.0)


def test_a_family_of_set_sizes_shows_the_size_and_one_problem_keeps_the_old_layout():
    tiny = tiny_env()
    family = ProblemFamily((0.01, 1.0))
    env = MorphogeneticEnv(dataclasses.replace(tiny.env.config, problems=family))
    globals_ = len(global_feature_names())
    assert env.feature_names() == (tiny.env.feature_names()[:globals_] + ["train_set_size"]
                                   + tiny.env.feature_names()[globals_:])
    assert env.observation_size == tiny.env.observation_size + 1
    assert "train_set_size" not in MorphogeneticEnv(dataclasses.replace(
        tiny.env.config, problems=ProblemFamily(label_noise=0.2))).feature_names()
    sizes = [float(problem_size(family, draw_problem(ProblemFamily(f), jax.random.key(0)))) for f in (1.0, 0.1, 0.01)]
    np.testing.assert_allclose(sizes, [0.0, 0.5, 1.0], atol=1e-6)


def test_a_stratum_is_observed_on_the_training_familys_scale():
    """Evaluated on sets smaller than any it trained on, a controller sees the set's size on the scale
    it learned (above 1 for the smaller sets), and a stratum of whole sets keeps the feature."""
    trained = ProblemFamily((0.01, 1.0), (0.0, 0.2))
    smaller = trained.stratum((0.001, 0.01))
    assert (smaller.train_fraction, smaller.label_noise, smaller.size_scale) == ((0.001, 0.01), (0.0, 0.2), 0.01)
    sizes = [float(problem_size(smaller, draw_problem(ProblemFamily(f), jax.random.key(0)))) for f in (0.1, 0.01, 0.001)]
    np.testing.assert_allclose(sizes, [0.5, 1.0, 1.5], atol=1e-6)
    assert trained.stratum(label_noise=(0.2, 0.4)).label_noise == (0.2, 0.4)
    assert smaller.stratum((0.5, 1.0)).size_scale == 0.01  # a stratum of a stratum keeps the training scale
    tiny = tiny_env()
    whole = trained.stratum((1.0, 1.0))
    assert not whole.subsets and whole.observes_size
    env = MorphogeneticEnv(dataclasses.replace(tiny.env.config, problems=whole))
    assert env.observation_size == MorphogeneticEnv(dataclasses.replace(tiny.env.config, problems=trained)).observation_size
    with pytest.raises(ValueError, match="--train-fraction: this run trained on the whole training set"):
        ProblemFamily(label_noise=0.2).stratum((0.1, 1.0))
    assert ProblemFamily(label_noise=0.2).stratum(label_noise=(0.3, 0.5)).size_scale is None
    with pytest.raises(ValueError, match="size_scale"):
        ProblemFamily((0.1, 1.0), size_scale=1.0)
