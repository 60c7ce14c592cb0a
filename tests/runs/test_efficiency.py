"""The efficiency question (esper_jax.runs.efficiency): the large static reference, parameters x
seconds from the recorded timelines, the JSON section and its Markdown, and the command line's
flag. Nothing here compiles an episode except the slow end-to-end test (a smoke TinyStories run
trained, evaluated and reported)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from esper_jax.env.environment import MorphogeneticEnv, make_env_config
from esper_jax.env.tasks import get_task
from esper_jax.lattice.hosts import TransformerHost
from esper_jax.lattice.lifecycle import Stage
from esper_jax.runs import efficiency as eff
from esper_jax.runs.build import build
from esper_jax.runs.evaluation import EpisodeOutput, paired_ci
from esper_jax.runs.rundir import write_json
from esper_jax.runs.settings import resolve_config, resolve_settings

D, G, T, B, H, F, P = (int(s) for s in (Stage.DORMANT, Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING,
                                         Stage.HOLDING, Stage.FOSSILIZED, Stage.PRUNED))


def _config(task: str, **explicit):
    return resolve_config(resolve_settings({"task": task, **explicit}, "smoke"))


@pytest.fixture(scope="module")
def built():
    """The smoke TinyStories run's env (a 1-layer transformer of width 32 on synthetic bytes);
    nothing compiled."""
    return build(_config("tinystories"))


def test_the_large_static_host_has_twice_the_layers_and_nothing_else_changed(built):
    config = built.config
    large = eff.large_static_config(config)
    assert large.host.num_layers == 2 * config.host.num_layers == 2
    same = lambda c: {**dataclasses.asdict(c.host), "num_layers": None}
    assert same(large) == same(config)  # width, heads, vocabulary, block size, MLP ratio
    assert large.env == config.env and large.task == config.task and large.members == config.members

    env = eff.large_static_env(built)
    host = env.model.host
    assert (host.num_layers, host.d_model, host.num_heads, host.vocab_size, host.block_size) == (
        2, built.env.model.host.d_model, 2, built.env.model.host.vocab_size, built.env.model.host.block_size)
    # The run's slots, in a host that has more of them.
    assert env.lattice.slots.slot_ids == built.env.lattice.slots.slot_ids == ("r0c0",)
    # One more pre-norm block: 2 LayerNorms (4d), qkv (3d^2 + 3d), proj (d^2 + d), MLP (8d^2 + 5d).
    d = host.d_model
    assert env.host_param_count - built.env.host_param_count == 12 * d * d + 13 * d
    # The same task and data: the reference reads the run's EnvData.
    assert env.config.task == built.env.config.task and env.config.data_label == built.env.config.data_label

    with pytest.raises(ValueError, match="language-model runs"):
        eff.large_static_config(_config("cifar10"))


def test_parameters_and_param_seconds_by_hand():
    """Two envs, three epochs, two slots; seeds of 10/100 parameters (blueprints 0/1) at slot 0
    and 20/200 at slot 1; a host of 1000."""
    sizes = np.array([[10, 100], [20, 200]])
    stage = np.array([[[G, D], [T, G], [F, P]],      # env 0: blueprint 1 at slot 0, blueprint 0 at slot 1, pruned
                      [[D, D], [D, D], [D, D]]])     # env 1: nothing
    blueprint = np.array([[[1, -1], [1, 0], [1, 0]],
                          [[-1, -1], [-1, -1], [-1, -1]]])
    params = eff.parameter_timeline(stage, blueprint, sizes, 1000)
    # A GERMINATED seed counts; a PRUNED one no longer does.
    np.testing.assert_array_equal(params, [[1100, 1120, 1100], [1000, 1000, 1000]])

    summary = {"final_val_loss": 2.0, "final_val_loss_std": 0.1, "final_val_loss_per_env": [1.9, 2.1],
               "final_val_perplexity": 7.39, "params_added": 0.0}
    row = eff.efficiency_row(summary, params, seconds=6.0)  # 2 s per epoch
    assert row["param_epochs_per_env"] == [3320, 3000]
    assert row["param_seconds_per_env"] == [6640, 6000]
    assert row["param_seconds"] == 6320 and row["param_seconds_std"] == 320
    assert row["mean_params_per_env"] == pytest.approx([3320 / 3, 1000])
    assert row["mean_params"] == pytest.approx(6320 / 6)
    assert row["seconds_per_episode"] == 6.0 and row["seconds_per_epoch"] == 2.0
    assert row["final_val_loss"] == 2.0 and "params_added" not in row


def test_episodes_are_timed_in_interleaved_rounds():
    calls = []

    def episode(name, value):
        def run():
            calls.append(name)
            return value + len(calls)  # a later round would return something else
        return run

    outputs, seconds = eff.time_episodes({"a": episode("a", 0), "b": episode("b", 100)}, rounds=3)
    assert calls == ["a", "b"] * 3
    assert outputs == {"a": 1, "b": 102}  # the first round's
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
    with pytest.raises(ValueError, match="rounds"):
        eff.time_episodes({"a": episode("a", 0)}, rounds=0)


def _episode(stage, blueprint, final_loss) -> EpisodeOutput:
    n, e, s = stage.shape
    zeros = np.zeros((n, 2), int)
    return EpisodeOutput(
        final_val_loss=np.asarray(final_loss, np.float32), final_val_accuracy=np.zeros(n), params_added=np.zeros(n, int),
        episode_return=np.zeros(n), rollbacks=np.zeros(n, int), germinated=zeros, fossilized=zeros, pruned=zeros,
        final_stage=stage[:, -1], final_blueprint=blueprint[:, -1], stage=stage, trained_stage=stage, blueprint=blueprint,
        val_loss=np.zeros((n, e)), val_accuracy=np.zeros((n, e)), op=np.zeros((n, e), int),
        applied=np.ones((n, e), bool), train_fraction=np.ones(n), label_noise=np.zeros(n))


def _env(num_layers: int) -> MorphogeneticEnv:
    task = get_task("tinystories", vocab_size=17, block_size=8)
    host = TransformerHost(vocab_size=17, d_model=8, num_heads=2, num_layers=num_layers, block_size=8)
    return MorphogeneticEnv(make_env_config(task, ("r0c0",), blueprints=("norm", "lora"), host=host, episode_epochs=2))


def test_section_rows_paired_differences_and_markdown():
    """Hand-made episodes of a tiny transformer and one with twice its layers (nothing compiled)."""
    env, big_env = _env(1), _env(2)
    sizes = eff.seed_sizes(env.lattice)
    empty = np.full((3, 2, 1), D), np.full((3, 2, 1), -1)
    grown = np.array([[[G], [T]], [[D], [D]], [[T], [F]]]), np.array([[[0], [0]], [[-1], [-1]], [[1], [1]]])
    results = {"heuristic": _episode(*grown, [2.0, 2.2, 2.1]), "static": _episode(*empty, [2.1, 2.2, 2.3])}
    reference = _episode(*empty, [2.05, 2.25, 2.2])
    section = eff.efficiency_section(env, results, {"heuristic": 3.0, "static": 2.0}, big_env, reference, 4.0,
                                     timing_rounds=3)
    rows = section["controllers"]
    assert list(rows) == ["heuristic", "static", eff.LARGE_STATIC]
    host = env.host_param_count
    expected = (host * 2 + sizes[0, 0] * 2 + host * 2 + host * 2 + sizes[0, 1] * 2) / 3 * (3.0 / 2)
    assert rows["heuristic"]["param_seconds"] == pytest.approx(expected)
    assert rows["static"]["param_seconds"] == pytest.approx(host * 2.0)
    assert rows[eff.LARGE_STATIC]["param_seconds"] == pytest.approx(big_env.host_param_count * 4.0)
    assert rows[eff.LARGE_STATIC]["mean_params"] == big_env.host_param_count > host
    ci = rows["heuristic"][f"final_val_loss_minus_{eff.LARGE_STATIC}_ci"]
    assert ci == paired_ci(np.float32([2.0, 2.2, 2.1]).astype(np.float64) - np.float32([2.05, 2.25, 2.2]))
    assert ci["better"] == 3 and rows[eff.LARGE_STATIC][f"final_val_loss_minus_{eff.LARGE_STATIC}_ci"]["mean"] == 0
    assert section["reference"]["host_params"] == big_env.host_param_count and section["timing_rounds"] == 3
    assert section["reference"]["host"] == {**section["reference"]["run_host"], "num_layers": 2}
    json.dumps(section)  # JSON-ready

    payload = {"synthetic": True, "held_out": {"num_envs": 3}, "efficiency": section}
    text = eff.markdown_section(payload)
    assert "## Efficiency" in text and "SYNTHETIC" in text and "median of 3" in text
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert set(lines) == {"| controller", "| heuristic", "| static", f"| {eff.LARGE_STATIC}"}
    assert f"{ci['mean']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}] (3/3)" in lines["| heuristic"]
    assert lines[f"| {eff.LARGE_STATIC}"].endswith("| 0 |")
    assert eff.markdown_section({"synthetic": False, "held_out": {"num_envs": 3}}) == ""


# ---------------------------------------------------------------------------- the command line


def test_efficiency_is_for_language_model_runs_only(tmp_path, capsys):
    from experiments import evaluate

    assert evaluate.efficiency_enabled(None, "language_model") is True
    assert evaluate.efficiency_enabled(False, "language_model") is False
    assert evaluate.efficiency_enabled(None, "classification") is False  # image runs: unchanged
    assert evaluate.efficiency_enabled(False, "classification") is False
    write_json(tmp_path / "config.json", _config("cifar10").to_json())
    for extra, fragment in ((["--efficiency"], "--efficiency is for language-model runs"),
                            (["--timing-rounds", "3"], "--timing-rounds")):
        assert evaluate.main(["--run-dir", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err, err


@pytest.mark.slow
def test_train_evaluate_report_a_language_model(tmp_path, capsys):
    """End to end (~2-3 min on 2 cores): a smoke TinyStories run trains, is evaluated with the
    efficiency question, and reported with efficiency.png."""
    from esper_jax.runs.loop import train
    from experiments import evaluate, report

    run_dir = tmp_path / "run"
    train(_config("tinystories", updates=2, checkpoint_every=2), run_dir, progress=False, log=lambda line: None)
    capsys.readouterr()
    assert evaluate.main(["--run-dir", str(run_dir), "--envs", "2", "--timing-rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "## Efficiency" in out and f"| {eff.LARGE_STATIC} |" in out
    loaded = json.loads((run_dir / "evaluation.json").read_text())
    section = loaded["efficiency"]
    assert list(section["controllers"]) == ["policy", "heuristic", "random", "static", eff.LARGE_STATIC]
    assert section["reference"]["host"]["num_layers"] == 2 and section["reference"]["run_host"]["num_layers"] == 1
    for name, row in section["controllers"].items():
        assert row["seconds_per_episode"] > 0 and row["param_seconds"] > 0, name
        assert row["final_val_loss"] == pytest.approx(
            loaded["controllers"][name]["final_val_loss"] if name != eff.LARGE_STATIC else row["final_val_loss"])
    assert section["controllers"]["static"]["mean_params"] == loaded["host_params"]
    assert "## Efficiency" in (run_dir / "evaluation.md").read_text()
    assert report.main(["--run-dir", str(run_dir)]) == 0
    assert (run_dir / "plots" / "efficiency.png").is_file()
