"""End-to-end inner environment runs at full size (Esper's baseline CIFAR host, three slots,
every CNN blueprint). Marked slow: that environment step takes 1.5-2 minutes to compile on a
2-core CPU, so these run with `pytest -m slow`. The same behaviour on a tiny configuration
(germination applied and counted, finite observations, the governor, the controllers) is in
the default suite: test_env.py and test_controllers.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.env.actions import FactoredAction, Op
from esper_jax.data import load_image_dataset
from esper_jax.env.environment import MorphogeneticEnv, make_env_config, make_env_data
from esper_jax.env.tasks import get_task
from experiments import heuristic

pytestmark = pytest.mark.slow


def test_heuristic_experiment_runs_and_labels_synthetic_data(tmp_path, capsys):
    out = tmp_path / "results.json"
    code = heuristic.main(["--task=cifar10", "--data=synthetic", "--envs", "2", "--episode-epochs", "3",
                           "--steps-per-epoch", "2", "--batch-size", "16", "--val-size", "64",
                           "--controller=static", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed
    results = json.loads(out.read_text())
    assert results["synthetic"] is True and list(results["controllers"]) == ["static"]
    static = results["controllers"]["static"]
    assert static["params_added"] == 0 and not any(static["germinated"].values())
    assert np.isfinite(static["final_val_loss"]) and out.with_suffix(".md").exists()


def test_germinate_action_is_applied_and_observation_stays_finite():
    task = get_task("cifar10")
    config = make_env_config(task, episode_epochs=2, steps_per_epoch=1, batch_size=8, val_size=32)
    env = MorphogeneticEnv(config)
    data = make_env_data(config, load_image_dataset("cifar10", "synthetic", n_train=64, n_test=32))
    obs, state = env.reset(jax.random.key(0), data)
    assert obs.shape == (env.observation_size,)
    action = FactoredAction.make(Op.GERMINATE, slot=1, blueprint=env.lattice.blueprint_index("conv_light"))
    obs, state, reward, done, info = jax.jit(env.step)(jax.random.key(1), state, action, data)
    assert bool(info["applied"]) and int(state.germinated.sum()) == 1
    assert np.all(np.isfinite(np.asarray(obs))) and np.isfinite(float(reward)) and not bool(done)
