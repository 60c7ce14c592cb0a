"""A run's growth environment as a gymnax environment in one call, the way ``gymnax.make`` gives
an env and its params: the task, preset and settings are resolved and built exactly as
``experiments.ppo`` resolves and builds them (:func:`~esper_jax.runs.settings.resolve_settings`,
:func:`~esper_jax.runs.settings.resolve_config`, :func:`~esper_jax.runs.build.build`), then wrapped
in :class:`~esper_jax.env.gymnax_env.GrowthGymnaxEnv`. Needs the ``gymnax`` extra."""

from __future__ import annotations

from typing import Any

from esper_jax.env.gymnax_env import Encoding, EnvParams, GrowthGymnaxEnv, check_encoding
from esper_jax.runs.build import build
from esper_jax.runs.config import RunConfigError
from esper_jax.runs.settings import resolve_config, resolve_settings, without_learner


def make_gymnax_env(task: str, preset: str = "smoke", encoding: Encoding = "flat",
                    **settings: Any) -> tuple[GrowthGymnaxEnv, EnvParams]:
    """``(env, params)`` for ``task`` under ``preset``; ``settings`` are ``experiments.ppo``'s
    options by their setting names (``episode_epochs=4``, ``blueprints="norm,lora"``,
    ``data="synthetic"``...). A bad task, preset, setting or encoding raises
    :class:`~esper_jax.runs.config.RunConfigError` with one line saying what is wrong, before any
    data is loaded."""
    try:
        check_encoding(encoding)
    except ValueError as error:
        raise RunConfigError(str(error)) from None
    built = build(resolve_config(resolve_settings(without_learner({"task": task, **settings}), preset)))
    env = GrowthGymnaxEnv(built.env, built.env_data, encoding)
    return env, env.default_params
