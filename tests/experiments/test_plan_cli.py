"""The plan learner end to end (a run that decides once per episode: exact resume, evaluation on a
stratum it never trained on, zero-shot evaluation of a scorer policy on another task), through
``python -m experiments.ppo`` and ``experiments.evaluate`` subprocesses. In a file of its own: the
suite distributes tests by file (``--dist loadfile``), and ``test_ppo_cli.py`` is the longest one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from esper_jax.runs.rundir import write_json
from esper_jax.runs.settings import resolve_config, resolve_settings
from tests.experiments.test_ppo_cli import REPO, TINY, cli_run


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla-cache")


def test_a_plan_run_resumes_exactly_and_evaluates(tmp_path, cache):
    """A run of the learner that decides once per episode goes through the same loop: metrics with the
    share of each plan, exact resume (two updates then two more write what four in one go do), and
    ``experiments.evaluate`` drives its policy and reports its first decision as the plan's distribution,
    here on a stratum of sets smaller than any it trained on, written beside the run's own evaluation."""
    plans = [*TINY, "--plans=static,norm@r0c0@e1", "--minibatches=1", "--group-size=2", "--train-fraction=0.25:1"]
    whole = cli_run([*plans, f"--run-dir={tmp_path / 'whole'}"], cache)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "deciding once per episode among 2 plans (static, norm@r0c0@e1) from its first observation, in problem groups of 2" in whole.stdout
    halves = cli_run([*plans, "--updates=2", f"--run-dir={tmp_path / 'halves'}"], cache)
    assert halves.returncode == 0, halves.stderr[-3000:]
    resumed = cli_run([f"--resume={tmp_path / 'halves'}", "--updates=4", "--no-progress"], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert (tmp_path / "halves" / "metrics.jsonl").read_text() == rows
    first = json.loads(rows.splitlines()[0])
    assert first["plan_static"] + first["plan_norm@r0c0@e1"] == pytest.approx(1.0) and first["episodes"] == 2
    evaluated = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--run-dir={tmp_path / 'whole'}",
                                "--envs=2", "--controllers=policy,static", "--train-fraction=0.05:0.25"], cwd=REPO,
                               capture_output=True, text=True, timeout=900)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert not (tmp_path / "whole" / "evaluation.json").exists()
    evaluation = json.loads((tmp_path / "whole" / "evaluation-train_fraction-0.05-0.25.json").read_text())
    problems = evaluation["held_out"]["problems"]
    assert problems["trained_on"] == {"train_fraction": [0.25, 1.0], "label_noise": [0.0, 0.0]}
    assert all(0.05 <= f <= 0.25 for f in problems["train_fraction"]) and "observed on the scale of a smallest 0.25" in problems["family"]
    assert "A stratum, not the run's family" in evaluated.stdout
    decision = evaluation["policy"]["first_decision"]
    assert decision["plans"] == ["static", "norm@r0c0@e1"] and len(decision["probabilities"]) == 2
    chosen = [int(np.argmax(p)) for p in decision["probabilities"]]
    assert [sum(g.values()) for g in [evaluation["controllers"]["policy"]["germinated"]]] == [chosen.count(1)]
    assert "its plan for the episode" in evaluated.stdout


def test_a_scorer_policy_evaluates_zero_shot_on_another_task(tmp_path, cache):
    """A plan policy trained on CIFAR-10 that sees the drawn problem and scores plans from their
    descriptions acts on TinyStories' envs and menu (another run's configuration, here written
    without training): the other controllers run there too, the results go beside the run's own,
    and they say where the policy trained. What cannot act there is refused in one line."""
    source = tmp_path / "cifar"
    trained = cli_run([*TINY, "--updates=2", "--plans=static,norm@r0c0@e1", "--minibatches=1", "--group-size=2",
                       "--train-fraction=0.25:1", "--plan-inputs=problem", "--plan-head=scorer",
                       f"--run-dir={source}"], cache)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "each scored from its description" in trained.stdout
    target = tmp_path / "stories"
    target.mkdir()
    config = resolve_config(resolve_settings({"task": "tinystories", "plans": "static,lora@r0c0@e0,norm@r0c0@e2",
                                              "num_minibatches": 1, "train_fraction": "0.25:1",
                                              "plan_inputs": "problem", "seed": 4}, "smoke"))
    write_json(target / "config.json", config.to_json())
    evaluate = [sys.executable, "-m", "experiments.evaluate", f"--run-dir={source}", "--envs=2"]
    evaluated = subprocess.run([*evaluate, f"--target-run={target}", "--controllers=policy,static",
                                "--no-efficiency"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert not (source / "evaluation.json").exists() and not (target / "transfer-stories.json").exists()
    evaluation = json.loads((source / "transfer-stories.json").read_text())
    assert evaluation["task"] == "tinystories" and evaluation["held_out"]["run_seed"] == 4
    assert evaluation["transferred_from"]["task"] == "cifar10" and evaluation["transferred_from"]["plan_head"] == "scorer"
    assert evaluation["policy"]["first_decision"]["plans"] == ["static", "lora@r0c0@e0", "norm@r0c0@e2"]
    assert set(evaluation["controllers"]) == {"policy", "static"}
    assert "Zero-shot transfer" in evaluated.stdout and "Zero-shot transfer" in (source / "transfer-stories.md").read_text()
    (target / "evaluation.json").write_text("{")  # the target's own evaluation, damaged
    for extra, message in ((["--task=tinystories", "--data=synthetic"], "has no menu of plans"),
                           ([f"--target-run={target}", "--train-fraction=0.05:0.25"], "drop them"),
                           ([f"--target-run={target}"], "evaluation.json is damaged")):
        refused = subprocess.run([*evaluate, *extra], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and message in refused.stderr, refused.stderr
