"""``make_gymnax_env`` (:mod:`esper_jax.runs.gymnax_env`): a run's env and params from a task and a
preset, built as ``experiments.ppo`` builds them. Nothing here compiles (``jax.eval_shape``)."""

from __future__ import annotations

import jax
import pytest

pytest.importorskip("gymnax")

from gymnax.environments import spaces  # noqa: E402

from esper_jax.env.actions import HEADS  # noqa: E402
from esper_jax.env.gymnax_env import GrowthGymnaxEnv  # noqa: E402
from esper_jax.runs.config import RunConfigError  # noqa: E402
from esper_jax.runs.gymnax_env import make_gymnax_env  # noqa: E402


def test_a_preset_gives_the_env_and_its_params():
    env, params = make_gymnax_env("cifar10", "smoke", "factored", episode_epochs=3)
    assert isinstance(env, GrowthGymnaxEnv) and env.encoding == "factored"
    assert params.max_steps_in_episode == 3 == env.env.episode_epochs
    assert "SYNTHETIC" in env.env.config.data_label  # the smoke preset's data
    space = env.action_space(params)
    assert isinstance(space, spaces.Dict) and list(space.spaces) == list(HEADS)
    # the smoke preset: one slot, two blueprints
    assert space.spaces["slot"].n == 1 and space.spaces["blueprint"].n == 2
    obs, state = jax.eval_shape(env.reset, jax.random.key(0), params)
    assert obs.shape == env.observation_space(params).shape and state.inner.epoch.shape == ()


@pytest.mark.parametrize("call, message", [
    (lambda: make_gymnax_env("cifar10", "smoke", "onehot"), "unknown action encoding 'onehot'"),
    (lambda: make_gymnax_env("cifar10", "smoke", episodes=3), "unknown settings: episodes"),
    (lambda: make_gymnax_env("mnist", "smoke"), "unknown task"),
], ids=["encoding", "setting", "task"])
def test_bad_input_is_one_line(call, message):
    with pytest.raises(RunConfigError, match=message) as error:
        call()
    assert "\n" not in str(error.value)
