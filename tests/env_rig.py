"""The tiny inner environment shared by the environment and controller tests.

One environment, one dataset and one set of jitted functions per test session (cached at module
level, so ``test_env.py`` and ``test_controllers.py`` share the compilations): a one-block CNN
host of width 4 with one slot and two blueprints, two batches of 16 per epoch. The population
reset/step compile in ~10-15 s each on an idle 2-core machine; the single-member step, used to
check that a population member steps exactly like one environment, once more.

G2 passes after 2 TRAINING epochs (Esper waits 10) so that short episodes reach BLENDING,
HOLDING and FOSSILIZED; the thresholds are static config and cost no compilation.

Keys are threefry (``jax.random.key``): a population member must match a single run, which
rbg keys do not guarantee under ``vmap``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import numpy as np

from esper_jax.data import load_image_dataset
from esper_jax.env.actions import ActionConfig
from esper_jax.env.environment import EnvData, MorphogeneticEnv, make_env_config, make_env_data
from esper_jax.lattice.hosts import CNNHost
from esper_jax.lattice.lifecycle import GateConfig
from esper_jax.env.tasks import get_task

POPULATION = 2
EPISODE_EPOCHS = 3
TINY_GATES = GateConfig(min_training_epochs=2)


@dataclasses.dataclass(frozen=True)
class TinyEnv:
    env: MorphogeneticEnv
    data: EnvData
    population_reset: Callable  # jitted, keys [POPULATION]
    population_step: Callable   # jitted, keys [POPULATION]
    step: Callable              # jitted single-environment step

    def keys(self, *seeds: int) -> jax.Array:
        return jax.numpy.stack([jax.random.key(s) for s in seeds])


@functools.cache
def tiny_env(seal: bool = False) -> TinyEnv:
    """``seal``: with the SEAL op (a second set of compiled programs, for the tests of it only)."""
    task = get_task("cifar10")
    config = make_env_config(
        task, ("r0c0",), TINY_GATES, blueprints=("conv_small", "norm"),
        host=CNNHost(base_width=4, num_blocks=1, pool_blocks=1),
        episode_epochs=EPISODE_EPOCHS, steps_per_epoch=2, batch_size=16, val_size=32, data_label="SYNTHETIC data",
        actions=ActionConfig(seal=seal),
    )
    env = MorphogeneticEnv(config)
    data = make_env_data(config, load_image_dataset("cifar10", "synthetic", n_train=256, n_test=64))
    return TinyEnv(env, data, jax.jit(env.population_reset), jax.jit(env.population_step), jax.jit(env.step))


def member(tree, index: int):
    """One member of a population pytree, as device arrays (NumPy slicing compiles nothing)."""
    return jax.tree.map(lambda a: jax.device_put(np.asarray(a)[index]), tree)


def stack_members(*trees):
    """A population pytree from single-member pytrees (NumPy stacking compiles nothing)."""
    return jax.tree.map(lambda *a: jax.device_put(np.stack([np.asarray(x) for x in a])), *trees)
