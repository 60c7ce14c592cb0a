"""A mixed run end to end (``--mix``: one policy on CIFAR-10's and TinyStories' envs in every update),
through ``python -m experiments.ppo`` and ``experiments.evaluate`` subprocesses. In a file of its own:
the suite distributes tests by file (``--dist loadfile``), and ``test_ppo_cli.py`` is already the
longest one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from esper_jax.runs.config import read_config
from esper_jax.runs.rundir import write_json
from esper_jax.runs.settings import resolve_config, resolve_settings
from tests.experiments.test_ppo_cli import REPO, cli_run


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla-cache")


def test_a_mixed_run_trains_one_policy_on_both_tasks_and_resumes_exactly(tmp_path, cache):
    """A mixed run (here the smoke preset's CIFAR-10 and TinyStories hosts, each with a menu of its
    own, written as a configuration: the smoke preset has no menus) trains one scorer policy on both
    tasks' envs in each update: the other task's metrics carry its name, and a run stopped after
    update 2 and resumed ends with the same rows, byte for byte. Evaluated on the other task, the
    report says the policy trained there."""
    learner = {"plan_head": "scorer", "plan_inputs": "problem", "train_fraction": "0.25:1", "num_minibatches": 1,
               "group_size": 2, "updates": 4, "checkpoint_every": 2, "keep_checkpoints": 2}
    cifar = resolve_config(resolve_settings({"task": "cifar10", "plans": "static,norm@r0c0@e1", **learner}, "smoke"))
    story = resolve_config(resolve_settings({"task": "tinystories", "plans": "static,lora@r0c0@e0,norm@r0c0@e2",
                                             **learner}, "smoke"))
    runs = {name: tmp_path / name for name in ("whole", "stopped")}
    for run_dir in runs.values():
        run_dir.mkdir()
        write_json(run_dir / "config.json", cifar.replace(mix=(story,)).to_json())
    whole = cli_run([f"--resume={runs['whole']}", "--no-progress"], cache)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "mixed with tinystories on SYNTHETIC data" in whole.stdout
    for updates in (2, 4):
        part = cli_run([f"--resume={runs['stopped']}", f"--updates={updates}", "--no-progress"], cache)
        assert part.returncode == 0, part.stderr[-3000:]
    rows = (runs["whole"] / "metrics.jsonl").read_text()
    assert rows == (runs["stopped"] / "metrics.jsonl").read_text()
    first = json.loads(rows.splitlines()[0])
    assert first["env_steps"] == 2 * (7 + 7)  # both tasks' episodes in each update
    assert {"tinystories/mean_final_val_loss", "tinystories/plan_lora@r0c0@e0", "plan_norm@r0c0@e1"} <= set(first)
    assert first["tinystories/mean_final_val_loss"] > 2 * first["mean_final_val_loss"]  # bytes vs 10 classes
    assert read_config(runs["whole"]).mix[0].data.label == "SYNTHETIC data"
    evaluated = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--run-dir={runs['whole']}", "--envs=2",
                                "--task=tinystories", "--controllers=policy,static", "--no-efficiency"],
                               cwd=REPO, capture_output=True, text=True, timeout=900)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    evaluation = json.loads((runs["whole"] / "transfer-tinystories.json").read_text())
    assert evaluation["policy"]["first_decision"]["plans"] == ["static", "lora@r0c0@e0", "norm@r0c0@e2"]
    assert evaluation["transferred_from"]["mix"][0]["task"] == "tinystories"
    assert "**Trained on a mix**" in evaluated.stdout and "Zero-shot" not in evaluated.stdout
