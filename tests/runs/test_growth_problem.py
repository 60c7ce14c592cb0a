"""The controller's problem is not empty: a seed can finish its lifecycle within an episode of
every shipped preset, and growing one changes how the host ends up."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.lattice import blending, lifecycle
from esper_jax.env.controllers import HeuristicConfig, Schedule, make_scripted_controller
from esper_jax.data import load_image_dataset
from esper_jax.env.environment import MorphogeneticEnv, make_env_config, make_env_data
from esper_jax.runs.evaluation import Evaluator
from esper_jax.lattice.hosts import CNNHost
from esper_jax.lattice.lifecycle import GateConfig, Stage
from esper_jax.runs.settings import PRESETS, resolve_config, resolve_settings
from esper_jax.env.tasks import get_task

from tests.conftest import assert_close_across_programs


def epochs_to_fossilize(gates: GateConfig, tempo_epochs: int, germinate_at: int = 0, limit: int = 100) -> int | None:
    """Epochs from the start of an episode until a seed germinated at ``germinate_at`` is
    FOSSILIZED, taking the fastest path the gates allow, in the environment's order within an
    epoch (action, then measurements, then the lifecycle tick). The seed is healthy and helps."""
    status = lifecycle.init_status(1)
    for epoch in range(limit):
        if epoch == germinate_at:
            status, _ = lifecycle.germinate(status, 0, 0, 0, blending.tempo_index(tempo_epochs), 1, gates)
        elif lifecycle.gate_g5(status, gates)[0]:
            status, _ = lifecycle.fossilize(status, 0, gates)
        elif lifecycle.gates_passed(status, gates)[0]:
            status, _ = lifecycle.advance(status, 0, gates)
        if int(status.stage[0]) == Stage.FOSSILIZED:
            return epoch + 1
        one = jnp.ones((1,), jnp.float32)
        status = lifecycle.record_measurements(status, contribution=0.1 * one, improvement=one, seed_grad_norm=one,
                                               host_grad_norm=one)
        status = lifecycle.tick(status, gates)
    return None


# The presets whose problem is calibrated for learning: a seed planted anywhere in the first third
# of an episode can still be fossilized. The smoke preset is a short look at the pipeline; in it
# only a seed planted at epoch 0 can finish its lifecycle.
LEARNING_PRESETS = ("default", "proof", "full")


@pytest.mark.parametrize("task", ["cifar10", "tinystories"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_seed_can_be_fossilized_within_every_presets_episode(preset, task):
    env = resolve_config(resolve_settings({"task": task}, preset)).env
    gates = GateConfig(min_training_epochs=env.min_training_epochs, auto_advance=env.auto_advance)
    episode = env.episode_epochs
    tempo = min(blending.TEMPOS)
    assert epochs_to_fossilize(gates, tempo) <= episode
    late = epochs_to_fossilize(gates, tempo, germinate_at=episode // 3)
    assert (late <= episode) == (preset in LEARNING_PRESETS)
    # the heuristic's own tempo, scaled like the gates, fits too
    assert epochs_to_fossilize(gates, HeuristicConfig.scaled(gates).tempo_epochs) <= episode


def test_the_default_presets_cnn_lifecycle_takes_a_small_part_of_its_episode():
    # In a 10-epoch episode a seed planted at epoch 0 was fossilized only at epoch 6, and every grower
    # gained less than with the same batches cut into 30 epochs (settings.py, "CIFAR: 30 epochs of 10
    # batches"): the CNN side's lifecycle takes at most a quarter of its episode. (The transformer side
    # stays at 10 x 60: cut finer, growing depth hurt it.)
    env = resolve_config(resolve_settings({"task": "cifar10"}, "default")).env
    gates = GateConfig(min_training_epochs=env.min_training_epochs, auto_advance=env.auto_advance)
    assert epochs_to_fossilize(gates, min(blending.TEMPOS)) <= env.episode_epochs / 4
    assert env.episode_epochs * env.steps_per_epoch == 300
    transformer = resolve_config(resolve_settings({"task": "tinystories"}, "default")).env
    assert (transformer.episode_epochs, transformer.steps_per_epoch) == (10, 60)


def test_fastest_lifecycle_matches_the_gates():
    # germinate; G1 opens the first of G2's epochs in TRAINING; G2 opens the first of tempo epochs
    # of blending; G3 opens one epoch of holding; G5 fossilizes
    for g2, tempo in ((1, 3), (2, 3), (1, 5), (10, 5)):
        assert epochs_to_fossilize(GateConfig(min_training_epochs=g2), tempo) == 1 + g2 + tempo + 1 + 1
        # gates passing by themselves at an epoch's end is as fast as asking at the next one's start
        assert epochs_to_fossilize(GateConfig(min_training_epochs=g2, auto_advance=True), tempo) == 1 + g2 + tempo + 1 + 1


def test_heuristic_timing_scales_with_the_gates():
    assert HeuristicConfig.scaled(GateConfig(min_training_epochs=10)) == HeuristicConfig()  # Esper's clock
    fast = HeuristicConfig.scaled(GateConfig(min_training_epochs=1))
    assert (fast.warmup_epochs, fast.plateau_window, fast.min_epochs_before_prune, fast.tempo_epochs) == (0, 1, 1, 3)
    assert fast.plateau_min_delta == pytest.approx(0.1)


@functools.cache
def _growth_env():
    """A tiny env where a seed can be fossilized: one block of width 4, one slot, G2 after one
    epoch, 7-epoch episodes of 3 batches of 16."""
    config = make_env_config(
        get_task("cifar10"), ("r0c0",), GateConfig(min_training_epochs=1), blueprints=("conv_small", "norm"),
        host=CNNHost(base_width=4, num_blocks=1, pool_blocks=1, image_size=16), episode_epochs=7, steps_per_epoch=3,
        batch_size=16, val_size=32, host_lr=0.05, host_lr_schedule="cosine", data_label="SYNTHETIC data")
    env = MorphogeneticEnv(config)
    dataset = load_image_dataset("cifar10", "synthetic", n_train=256, n_test=64)
    from esper_jax.data.datasets import downsample_images
    return env, make_env_data(config, downsample_images(dataset, 16))


@pytest.mark.cross_program
def test_a_scripted_grower_ends_with_a_different_host_than_static():
    env, data = _growth_env()
    schedule = Schedule("conv_small", "r0c0", epoch=0)
    evaluator = Evaluator(env, 2, ("static",), scripted={schedule.name: make_scripted_controller(env, schedule)})
    key = jax.random.key(3)
    static, grown = evaluator.run("static", data, key), evaluator.run(schedule.name, data, key)
    assert np.all(static.final_stage == Stage.DORMANT) and np.all(grown.final_stage == Stage.FOSSILIZED)
    assert np.all(grown.fossilized.sum(axis=1) == 1) and np.all(grown.params_added > 0)
    # Same envs, same batches: before the seed blends in, both runs train the same host, but not
    # with the same code. Static's lattice stays dormant, so its host runs in the model's skipped-
    # lattice branch; the grower's seed, TRAINING in epoch 1 and BLENDING at alpha 0 in epoch 2, puts
    # it in the lattice branch, another compilation of the same host (issue 23: 1 rounding step at epoch 2
    # on an AMD EPYC, also at epoch 1 with the guard's 128-bit vectors). 8 steps leave room
    # for two epochs of training carrying one; once alpha rises the loss moves by 9e-4 and more.
    assert_close_across_programs(grown.val_loss[:, :3], static.val_loss[:, :3], ulps=8)
    assert np.all(np.abs(grown.final_val_loss - static.final_val_loss) > 1e-6)
