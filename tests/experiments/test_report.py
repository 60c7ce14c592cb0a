"""``python -m experiments.report``: plots from a run directory, and its errors.

The run directories are generated here: a ``metrics.jsonl`` like the learner's (one learner, or
a population with per-member rows) and an ``evaluation.json`` built by
``esper_jax.runs.evaluation.evaluation_payload`` from hand-written episodes, so nothing compiles.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from esper_jax.env.environment import MorphogeneticEnv, make_env_config
from esper_jax.runs.evaluation import EpisodeOutput, evaluation_payload, write_evaluation
from esper_jax.lattice.hosts import CNNHost, TransformerHost
from esper_jax.lattice.lifecycle import Stage
from esper_jax.env.tasks import get_task
from esper_jax.runs.rundir import write_json
from esper_jax.runs.settings import resolve_config, resolve_settings
from experiments import report

HEADS = ("op", "slot", "blueprint", "blend", "tempo", "alpha_target")
D, G, T, B, H, F, P, E = (int(s) for s in (Stage.DORMANT, Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING,
                                            Stage.HOLDING, Stage.FOSSILIZED, Stage.PRUNED, Stage.EMBARGOED))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _episode(rng, grow: bool) -> EpisodeOutput:
    """Two envs, six epochs, two slots. With ``grow``: env 0 grows a conv_small seed to
    FOSSILIZED in r0c0 and prunes a norm seed in r0c1; env 1 stays empty."""
    stage = np.full((2, 6, 2), D)
    blueprint = np.full((2, 6, 2), -1)
    germinated = np.zeros((2, 2), int)
    fossilized = np.zeros((2, 2), int)
    pruned = np.zeros((2, 2), int)
    if grow:
        stage[0, :, 0] = [G, T, B, H, F, F]
        blueprint[0, :, 0] = 0
        stage[0, 2:5, 1] = [G, E, E]
        blueprint[0, 2:5, 1] = 1
        germinated[0] = [1, 1]
        fossilized[0, 0] = pruned[0, 1] = 1
    val_loss = 2.3 - 0.05 * np.arange(6)[None] + 0.1 * rng.random((2, 6))
    return EpisodeOutput(
        final_val_loss=val_loss[:, -1], final_val_accuracy=rng.random(2), params_added=np.array([120 if grow else 0, 0]),
        episode_return=rng.normal(size=2), rollbacks=np.zeros(2, int), germinated=germinated, fossilized=fossilized,
        pruned=pruned, final_stage=stage[:, -1], final_blueprint=blueprint[:, -1], stage=stage, trained_stage=stage, blueprint=blueprint,
        val_loss=val_loss, val_accuracy=rng.random((2, 6)), op=np.zeros((2, 6), int), applied=np.ones((2, 6), bool),
        train_fraction=np.ones(2), label_noise=np.zeros(2),
    )


@pytest.fixture(scope="module")
def env():
    config = make_env_config(get_task("cifar10"), ("r0c0", "r0c1"), blueprints=("conv_small", "norm"),
                             host=CNNHost(base_width=4, num_blocks=1, pool_blocks=1), episode_epochs=6)
    return MorphogeneticEnv(config)


def _metric_row(rng, update: int, accuracy: bool) -> dict:
    row = {"update": update, "env_steps": 12 * update, "mean_return": float(rng.normal()),
           "mean_final_val_loss": float(2.3 - 0.01 * update), "approx_kl": float(rng.random() * 0.02),
           "explained_variance": float(rng.random()), "germinated": 1.0, "fossilized": 0.5, "pruned": 0.25,
           "mean_final_val_accuracy": float(rng.random()) if accuracy else None}
    row.update({f"entropy_{h}": float(rng.random()) for h in HEADS})
    return row


def make_run(path, env, *, members: int = 1, evaluation: bool = True, accuracy: bool = True, updates: int = 12):
    rng = np.random.default_rng(0)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for u in range(1, updates + 1):
            row = _metric_row(rng, u, accuracy)
            if members > 1:
                row["members"] = [_metric_row(rng, u, accuracy) for _ in range(members)]
            f.write(json.dumps(row) + "\n")
    rates = ",".join(repr(3e-4 * (m + 1)) for m in range(members))
    config = resolve_config(resolve_settings({"task": "cifar10", "population": members, "learning_rate": rates}, "smoke"))
    write_json(os.path.join(path, "config.json"), config.to_json())
    if evaluation:
        episodes = {name: _episode(rng, grow=name != "static") for name in ("policy", "heuristic", "random", "static")}
        payload = evaluation_payload(env, episodes, run_seed=0, task="cifar10", data_label="SYNTHETIC data",
                                     synthetic=True, run_dir=str(path))
        write_evaluation(str(path), payload)
    return str(path)


def assert_png(path: str, min_side: int = 300):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", head[16:24])
    assert min_side <= width <= 5000 and min_side <= height <= 5000, (path, width, height)
    assert os.path.getsize(path) > 10_000, path


def test_population_report(tmp_path, env, capsys):
    run = make_run(tmp_path / "run", env, members=3)
    assert report.main(["--run-dir", run]) == 0
    out = capsys.readouterr().out
    expected = ["learning_curves.png", "entropy.png", "evaluation.png", "evaluation_val_loss.png",
                *(f"timeline_{c}.png" for c in ("policy", "heuristic", "random", "static"))]
    assert sorted(os.listdir(os.path.join(run, "plots"))) == sorted(expected)
    for name in expected:
        assert os.path.join(run, "plots", name) in out
        assert_png(os.path.join(run, "plots", name))


def test_language_model_report_plots_efficiency(tmp_path, env, capsys):
    """evaluation.json with an efficiency section (a language-model run's) adds efficiency.png:
    final loss against parameter-seconds, the large static reference among the controllers."""
    from esper_jax.runs import efficiency as eff

    run = make_run(tmp_path / "run", env)
    path = os.path.join(run, "evaluation.json")
    with open(path) as f:
        payload = json.load(f)
    rng = np.random.default_rng(1)
    episodes = {name: _episode(rng, grow=name != "static") for name in payload["controllers"]}
    task = get_task("tinystories", vocab_size=17, block_size=8)
    lm_env, large_env = (MorphogeneticEnv(make_env_config(
        task, ("r0c0", "r1c0"), blueprints=("norm", "lora"), episode_epochs=6,
        host=TransformerHost(vocab_size=17, d_model=8, num_heads=2, num_layers=layers, block_size=8)))
        for layers in (2, 4))
    seconds = {name: 1.0 + i for i, name in enumerate(episodes)}
    payload["efficiency"] = eff.efficiency_section(lm_env, episodes, seconds, large_env, _episode(rng, grow=False), 5.0)
    write_json(path, payload)
    assert report.main(["--run-dir", run]) == 0
    out = capsys.readouterr().out
    assert os.path.join(run, "plots", "efficiency.png") in out
    assert_png(os.path.join(run, "plots", "efficiency.png"))


def test_curves_only_while_training(tmp_path, env, capsys):
    """--no-eval needs no evaluation.json; a half-written last row (a run still writing) is
    skipped; a language model's null accuracy just drops that panel."""
    run = make_run(tmp_path / "run", env, evaluation=False, accuracy=False)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"update": 13, "mean_ret')
    assert report.main(["--run-dir", run, "--no-eval"]) == 0
    assert sorted(os.listdir(os.path.join(run, "plots"))) == ["entropy.png", "learning_curves.png"]
    for name in ("entropy.png", "learning_curves.png"):
        assert_png(os.path.join(run, "plots", name))


def _fails(capsys, argv, *fragments):
    assert report.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_inputs(tmp_path, env, capsys):
    _fails(capsys, ["--run-dir", str(tmp_path / "nowhere")], "does not exist", "experiments.ppo")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["--run-dir", str(empty)], "metrics.jsonl", "experiments.ppo")
    run = make_run(tmp_path / "run", env, evaluation=False)
    _fails(capsys, ["--run-dir", run], "evaluation.json", "python -m experiments.evaluate --run-dir")
    assert not os.path.exists(os.path.join(run, "plots"))


def test_damaged_config_or_evaluation_is_one_line_naming_it(tmp_path, env, capsys):
    run = make_run(tmp_path / "run", env, members=2)
    evaluation = os.path.join(run, "evaluation.json")
    with open(evaluation, "w") as f:
        f.write('{"controllers": {')
    _fails(capsys, ["--run-dir", run], "evaluation.json is damaged")
    with open(os.path.join(run, "config.json"), "w") as f:
        f.write("\x00\x01 not json")
    _fails(capsys, ["--run-dir", run, "--no-eval"], "config.json is damaged")


def test_corrupt_metrics(tmp_path, env, capsys):
    run = make_run(tmp_path / "run", env, evaluation=False)
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    lines[3] = "{not json"
    open(os.path.join(run, "metrics.jsonl"), "w").write("\n".join(lines) + "\n")
    _fails(capsys, ["--run-dir", run, "--no-eval"], "line 4 is not JSON")
    open(os.path.join(run, "metrics.jsonl"), "w").write("")
    _fails(capsys, ["--run-dir", run, "--no-eval"], "no complete rows")


def test_command_line_error_exit(tmp_path):
    """The module entry point: exit status 2 and one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "experiments.report", "--run-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "metrics.jsonl" in proc.stderr, proc.stderr
