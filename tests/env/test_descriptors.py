"""Choices described by what they are (:mod:`esper_jax.env.descriptors`): the plans of a CNN and of a
transformer in one feature space. Nothing here compiles (FLOPs are counted from shapes)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from esper_jax.env.controllers import parse_plan
from esper_jax.env.descriptors import PLAN_FEATURES, SEED_FEATURES, plan_features, slot_features
from esper_jax.env.environment import MorphogeneticEnv, make_env_config
from esper_jax.env.tasks import get_task
from esper_jax.lattice.blueprints import get_blueprint
from esper_jax.lattice.hosts import CNNHost, TransformerHost

EPOCHS = 10


@functools.cache
def cnn_env() -> MorphogeneticEnv:
    host = CNNHost(base_width=4, image_size=16)
    return MorphogeneticEnv(make_env_config(get_task("cifar10"), ("r0c0", "r1c0", "r2c0"), host=host,
                                            blueprints=("norm", "depthwise", "conv_heavy"), episode_epochs=EPOCHS,
                                            batch_size=8))


@functools.cache
def transformer_env() -> MorphogeneticEnv:
    host = TransformerHost(vocab_size=64, d_model=32, num_heads=2, num_layers=2, block_size=8)
    return MorphogeneticEnv(make_env_config(get_task("tinystories", block_size=8), ("r0c0", "r0c1", "r1c0"),
                                            host=host, blueprints=("norm", "attention", "depth"),
                                            episode_epochs=EPOCHS, batch_size=8))


def column(name: str) -> int:
    return PLAN_FEATURES.index(name)


def test_plans_of_two_hosts_are_described_in_one_space():
    """A CNN's and a transformer's menus give rows of one width; static is all zeros; a seed's row
    names its blueprint's role, its cost relative to its own host (a bigger blueprint costs more),
    where its slot is and when it is planted."""
    cnn = plan_features(cnn_env(), [parse_plan(p) for p in ("static", "conv_heavy@r2c0@e0", "depthwise@r2c0@e5",
                                                              "norm@r0c0@e0")])
    story = plan_features(transformer_env(), [parse_plan(p) for p in ("static", "depth@r1c0@e0", "attention@r0c1@e0")])
    assert cnn.shape == (4, len(PLAN_FEATURES)) and story.shape == (3, len(PLAN_FEATURES)) and cnn.dtype == np.float32
    assert not cnn[0].any() and not story[0].any()
    assert (cnn[1:, column("seeds")] == 1).all()
    for row, role in ((cnn[1], "depth"), (cnn[2], "context"), (cnn[3], "normalization"), (story[1], "depth"),
                      (story[2], "context")):
        roles = [name for name in SEED_FEATURES if name.startswith("role_") and row[column(name)] == 1]
        assert roles == [f"role_{role}"], (row, role)
    assert get_blueprint("transformer", "depth").role == "depth" and get_blueprint("cnn", "conv_heavy").role == "depth"
    for cost in ("param_cost", "compute_cost"):
        assert cnn[1, column(cost)] > cnn[2, column(cost)] > cnn[3, column(cost)] > 0
        assert story[1, column(cost)] > story[2, column(cost)] > 0
    assert cnn[2, column("start")] == pytest.approx(0.5) and cnn[1, column("start")] == 0
    # slots: the last injection point is at depth 1, the first at 0; a transformer's beside-attention point is parallel
    assert cnn[1, column("slot_depth")] == 1 and cnn[3, column("slot_depth")] == 0
    assert story[2, column("slot_parallel")] == 1 and story[1, column("slot_parallel")] == 0
    assert slot_features(cnn_env())["r0c0"][1] == pytest.approx(0.25)  # 4 of the widest 16 channels


def test_a_plan_is_the_sum_of_its_seeds_in_any_order():
    env = cnn_env()
    one, other, both, swapped = plan_features(env, [parse_plan(p) for p in (
        "conv_heavy@r2c0@e0", "depthwise@r1c0@e3", "conv_heavy@r2c0@e0+depthwise@r1c0@e3",
        "depthwise@r1c0@e3+conv_heavy@r2c0@e0")])
    np.testing.assert_allclose(both, one + other, rtol=1e-6)
    np.testing.assert_array_equal(both, swapped)
    assert both[column("seeds")] == 2


def test_a_seed_the_env_does_not_have_is_refused():
    with pytest.raises(ValueError, match="not one of this env's"):
        plan_features(cnn_env(), [parse_plan("depth@r0c0@e0")])
    with pytest.raises(ValueError, match="not one of this env's"):
        plan_features(cnn_env(), [parse_plan("norm@r1c1@e0")])
