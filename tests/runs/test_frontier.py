"""The static frontier and the best fixed schedule (esper_jax.runs.frontier, experiments.frontier)
on hand-made numbers; the end-to-end run on a smoke run is slow."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from esper_jax.env.controllers import Schedule, parse_schedules, schedule_name
from esper_jax.runs import frontier as fr
from esper_jax.runs.plots import plot_frontier
from experiments import frontier as frontier_cli


def test_lower_envelope_keeps_what_no_cheaper_network_beats():
    compute = np.array([4.0, 1.0, 2.0, 8.0, 2.0])
    loss = np.array([2.0, 3.0, 3.5, 2.5, 2.5])
    assert fr.lower_envelope(compute, loss).tolist() == [1, 4, 0]


def test_interpolation_is_linear_in_log_compute_and_flat_outside():
    c, l = np.array([1.0, 100.0]), np.array([3.0, 1.0])
    assert fr.interpolate_log(np.array([10.0]), c, l)[0] == pytest.approx(2.0)
    assert fr.interpolate_log(np.array([0.1, 1e4]), c, l).tolist() == [3.0, 1.0]
    assert fr.compute_to_reach(2.0, c, l) == (pytest.approx(10.0), "interpolated")
    assert fr.compute_to_reach(0.5, c, l) == (100.0, "below_frontier")
    assert fr.compute_to_reach(3.5, c, l) == (1.0, "above_frontier")
    assert fr.compute_to_reach(3.0, c, l) == (1.0, "interpolated")  # the cheapest network itself


def test_gap_is_paired_per_env_at_each_envs_compute():
    frontier_compute = np.array([1.0, 100.0])
    frontier_losses = np.array([[3.0, 3.2, 2.8], [1.0, 1.2, 0.8]])   # [K, N]
    loss = np.array([1.9, 2.1, 1.7])
    compute = np.array([10.0, 10.0, 10.0])                          # the frontier is at 2.0, 2.2, 1.8 there
    gap = fr.frontier_gap(loss, compute, frontier_losses, frontier_compute)
    assert gap["minus_frontier_ci"]["mean"] == pytest.approx(-0.1)
    assert gap["minus_frontier_ci"]["better"] == 3 and gap["minus_frontier_ci"]["half_width"] == pytest.approx(0, abs=1e-9)
    # the mean frontier (3.0 at 1, 1.0 at 100 FLOPs) reaches 1.9 at 10 ** 1.1 FLOPs; this controller used 10
    assert gap["compute_ratio"] == pytest.approx(10 / 10 ** 1.1)
    assert gap["frontier_compute_to_reach_how"] == "interpolated" and gap["compute_within_frontier_range"]


def test_gap_at_mean_compute_compares_one_static_network_for_every_env():
    """An adaptive controller, cheap on env 0 and costly on env 1: per env it is level with the
    frontier at its own compute; against the one network at its mean compute it is better on both
    (that network is too large for env 0 and too small for env 1)."""
    frontier_compute = np.array([1.0, 100.0])
    frontier_losses = np.array([[1.0, 3.0], [1.4, 1.0]])   # env 0 overfits the large network
    loss, compute = np.array([1.0, 1.0]), np.array([1.0, 100.0])
    gap = fr.frontier_gap(loss, compute, frontier_losses, frontier_compute)
    assert gap["minus_frontier_ci"]["mean"] == pytest.approx(0.0)
    # at the mean compute 50.5 (log fraction t = log(50.5)/log(100)) the frontier is 1 + 0.4t and 3 - 2t
    t = np.log(50.5) / np.log(100.0)
    assert gap["frontier_loss_at_mean_compute"] == pytest.approx(np.mean([1.0 + 0.4 * t, 3.0 - 2.0 * t]))
    assert gap["minus_frontier_at_mean_compute_ci"]["better"] == 2


def _rows():
    rows = {
        "small": {"kind": fr.STATIC_NETWORK, "final_val_loss_per_env": [2.0, 2.2], "flops_per_env": [1e6, 1e6],
                  "lr_scale": 1.0},
        "large": {"kind": fr.STATIC_NETWORK, "final_val_loss_per_env": [1.5, 1.7], "flops_per_env": [1e8, 1e8],
                  "lr_scale": 2.0},
        "wasteful": {"kind": fr.STATIC_NETWORK, "final_val_loss_per_env": [2.1, 2.3], "flops_per_env": [1e7, 1e7],
                     "lr_scale": 0.5},
        "policy": {"kind": "controller", "final_val_loss_per_env": [1.6, 1.8], "flops_per_env": [1e7, 1e7]},
    }
    for r in rows.values():
        r["flops"] = float(np.mean(r["flops_per_env"]))
    return rows


def test_payload_markdown_and_plot(tmp_path):
    payload = fr.frontier_payload(_rows(), envs=2, run_seed=0, task="cifar10", data_label="SYNTHETIC data",
                                  synthetic=True, host_params=100, static_check=0.0)
    assert payload["frontier"]["networks"] == ["small", "large"]
    policy = payload["rows"]["policy"]
    assert policy["minus_frontier_ci"]["mean"] == pytest.approx(1.7 - 1.85) and not policy["on_frontier"]
    assert payload["rows"]["wasteful"]["minus_frontier_ci"]["mean"] == pytest.approx(2.2 - 1.85)
    text = fr.markdown(payload)
    assert "SYNTHETIC" in text and "| policy | controller |" in text and "| small | static network, lr x1 * |" in text
    json.dumps(payload)
    path = plot_frontier(payload, str(tmp_path / "frontier.png"), note="SYNTHETIC data")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000 and path.endswith("frontier.png")
    with pytest.raises(ValueError, match="static network"):
        fr.frontier_payload({"policy": _rows()["policy"]}, envs=2, run_seed=0, task="t", data_label="d",
                            synthetic=False, host_params=1)


def test_final_architecture_is_the_most_common_blended_set():
    B, T = 3, 2
    timeline = {"slots": ["r0c0", "r1c0"], "blueprints": ["norm", "conv_heavy"],
                "stage": [[[0, 0], [B, T]], [[0, 0], [B, 0]], [[0, 0], [0, 0]]],
                "blueprint": [[[-1, -1], [1, 0]], [[-1, -1], [1, -1]], [[-1, -1], [-1, -1]]]}
    assert fr.final_architecture(timeline) == (("r0c0", "conv_heavy"),)


def test_multi_seed_schedules_parse_and_the_second_round_of_the_sweep():
    seeds = parse_schedules("conv_heavy@r2c0@e0+depthwise@r1c0@e2")
    assert [s.slot for s in seeds] == ["r2c0", "r1c0"] and seeds[1].epoch == 2
    assert schedule_name(seeds) == "conv_heavy@r2c0@e0+depthwise@r1c0@e2"
    with pytest.raises(ValueError, match="slot of its own"):
        parse_schedules("norm@r0c0+depthwise@r0c0")
    ranked = [(Schedule(b, s),) for b, s in (("a", "r0"), ("b", "r1"), ("c", "r0"), ("d", "r2"), ("e", "r1"))]
    second = fr.later_and_pairs(ranked, episode_epochs=9)
    assert [schedule_name(s) for s in second[:3]] == ["a@r0@e3", "b@r1@e3", "c@r0@e3"]
    pairs = [schedule_name(s) for s in second[3:]]
    assert pairs == ["a@r0@e0+b@r1@e0", "a@r0@e0+d@r2@e0", "b@r1@e0+c@r0@e0", "b@r1@e0+d@r2@e0", "c@r0@e0+d@r2@e0"]


def test_best_schedules_read_back_and_a_bad_file_is_one_line(tmp_path):
    assert fr.read_best_schedules(tmp_path) == {}
    seeds = [{"blueprint": "norm", "slot": "r0c0", "epoch": 0, "blend_style": "linear", "tempo_epochs": 3}]
    cal = {"schedules": {"norm@r0c0@e0": {"seeds": seeds}}, "best_fixed_1": "norm@r0c0@e0", "best_fixed_2": "norm@r0c0@e0"}
    (tmp_path / fr.CALIBRATION_FILE).write_text(json.dumps(cal))
    assert fr.read_best_schedules(tmp_path)["best_fixed_2"] == (Schedule("norm", "r0c0"),)
    (tmp_path / fr.CALIBRATION_FILE).write_text("{}")
    with pytest.raises(ValueError, match="experiments.frontier"):
        fr.read_best_schedules(tmp_path)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert frontier_cli.main(["--run-dir", str(tmp_path)]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert frontier_cli.main(["--run-dir", str(tmp_path), "--lr-scales", "1,-2"]) == 2
    err = capsys.readouterr().err
    assert "--lr-scales" in err and len(err.strip().splitlines()) == 1
    assert frontier_cli.main(["--run-dir", str(tmp_path), "--widths", "x"]) == 2
    assert "--widths must be comma-separated numbers" in capsys.readouterr().err
    assert frontier_cli.parse_multiples("0.5,1", "--x") == (0.5, 1.0)
    assert math.isclose(frontier_cli.parse_multiples(None, "--x", fr.LR_SCALES)[0], 0.5)


def test_evaluate_needs_a_calibration_for_the_best_fixed_schedules():
    from experiments.evaluate import parse_controllers

    with pytest.raises(ValueError, match="experiments.frontier"):
        parse_controllers("policy,best_fixed_2", fixed=())
    assert parse_controllers(None, fixed=("best_fixed_1", "best_fixed_2"))[-2:] == ("best_fixed_1", "best_fixed_2")


@pytest.mark.slow
def test_a_two_seed_schedule_plants_in_order_and_a_built_in_seed_is_computed_from_the_start():
    """Compiles a tiny env's episode (~1 min)."""
    import jax

    from esper_jax.data import load_image_dataset
    from esper_jax.env.controllers import make_plan_controller, make_scripted_controller
    from esper_jax.env.environment import MorphogeneticEnv, make_env_config, make_env_data
    from esper_jax.env.tasks import get_task
    from esper_jax.lattice.hosts import CNNHost
    from esper_jax.lattice.lifecycle import GateConfig, Stage
    from esper_jax.runs.evaluation import Evaluator

    config = make_env_config(get_task("cifar10"), ("r0c0", "r1c0"), GateConfig(min_training_epochs=1, auto_advance=True),
                             blueprints=("conv_small", "norm"), host=CNNHost(base_width=4, num_blocks=2, pool_blocks=1),
                             episode_epochs=8, steps_per_epoch=2, batch_size=16, val_size=32)
    env = MorphogeneticEnv(config)
    data = make_env_data(config, load_image_dataset("cifar10", "synthetic", n_train=128, n_test=32))
    seeds = parse_schedules("conv_small@r1c0@e0+norm@r0c0@e1")
    menu = make_plan_controller(env, ((), seeds))  # plans of different lengths: the static one is padding only
    evaluator = Evaluator(env, 2, ("static",), scripted={
        "two": make_scripted_controller(env, seeds), "plan 0": lambda key, state: menu(key, state, jax.numpy.int32(0)),
        "plan 1": lambda key, state: menu(key, state, jax.numpy.int32(1))})
    out = evaluator.run("two", data, jax.random.key(0))
    assert out.germinated.sum(axis=1).tolist() == [2, 2]
    np.testing.assert_array_equal(evaluator.run("plan 1", data, jax.random.key(0)).op, out.op)
    np.testing.assert_array_equal(evaluator.run("plan 0", data, jax.random.key(0)).op,
                                  evaluator.run("static", data, jax.random.key(0)).op)
    first = [int(np.argmax(out.blueprint[0, :, s] >= 0)) for s in (1, 0)]   # epoch each slot got its seed
    assert first[0] < first[1]
    # a static network with conv_small built in at r1c0 at twice the host's rate: computed from the first epoch
    scaled = fr.with_lr_scale(env)
    built = Evaluator(scaled, 2, ("static",), prepare=fr.prepare_members(scaled, np.full(2, 2.0), (("r1c0", "conv_small"),)))
    out = built.run("static", data, jax.random.key(0))
    assert np.all(out.trained_stage[:, :, 1] == int(Stage.FOSSILIZED)) and np.all(out.trained_stage[:, :, 0] == 0)
    assert np.all(out.params_added > 0) and np.all(np.isfinite(out.final_val_loss))


def _menu_rows():
    """_rows() with a plan learner's menu evaluated: static (cheap) is best on env 0, growing on env 1."""
    rows = _rows()
    rows["static"] = {"kind": "controller", "final_val_loss_per_env": [1.9, 2.2], "flops_per_env": [1e6, 1e6]}
    rows["conv_small@r0c0@e0"] = {"kind": "controller", "final_val_loss_per_env": [2.0, 1.6],
                                  "flops_per_env": [1e7, 1e7]}
    for r in rows.values():
        r["flops"] = float(np.mean(r["flops_per_env"]))
    return rows


def test_the_ceiling_of_a_plan_policy_is_its_menus_best_plan_on_each_env():
    """Per env the menu's lowest-loss plan (static on env 0, the growth on env 1), and the plan
    furthest below the frontier at its compute, each against the frontier; plans of the menu the
    rows lack are left out, and a menu with fewer than two is no ceiling."""
    rows = _menu_rows()
    payload = fr.frontier_payload(rows, envs=2, run_seed=0, task="cifar10", data_label="SYNTHETIC data",
                                  synthetic=True, host_params=100, menu=("static", "conv_small@r0c0@e0", "norm@r0c0@e1"))
    ceiling = payload["ceiling"]
    assert ceiling["plans"] == ["static", "conv_small@r0c0@e0"]
    assert ceiling["by_loss"]["final_val_loss"] == pytest.approx((1.9 + 1.6) / 2)
    assert ceiling["by_loss"]["chosen"] == {"static": 1, "conv_small@r0c0@e0": 1}
    assert ceiling["by_loss"]["flops"] == pytest.approx((1e6 + 1e7) / 2)
    # the frontier (small at 1e6, large at 1e8) at 1e6 on env 0 is 2.0; at 1e7 on env 1 it is (2.2 + 1.7) / 2
    assert ceiling["by_loss"]["minus_frontier_ci"]["mean"] == pytest.approx(((1.9 - 2.0) + (1.6 - 1.95)) / 2)
    assert ceiling["by_frontier"]["chosen"] == ceiling["by_loss"]["chosen"]
    assert "The ceiling of a policy over the menu" in fr.markdown(payload)
    assert fr.frontier_payload(rows, envs=2, run_seed=0, task="t", data_label="d", synthetic=False, host_params=1,
                               menu=("static",))["ceiling"] is None


def test_rerender_recomputes_from_the_rows_and_compares_with_the_best_fixed_schedule(tmp_path, capsys):
    from esper_jax.runs.rundir import write_json
    from esper_jax.runs.settings import resolve_config, resolve_settings

    rows = _menu_rows()
    rows["best_fixed_2"] = {"kind": "fixed schedule", "final_val_loss_per_env": [1.7, 1.8], "flops_per_env": [2e7, 2e7],
                            "flops": 2e7}
    payload = fr.frontier_payload(rows, envs=2, run_seed=0, task="cifar10", data_label="SYNTHETIC data",
                                  synthetic=True, host_params=100)
    assert payload["rows"]["policy"]["minus_best_fixed_2_ci"]["mean"] == pytest.approx(-0.05)
    assert payload["ceiling"] is None  # no menu given
    (tmp_path / "frontier.json").write_text(json.dumps(payload))
    config = resolve_config(resolve_settings({"task": "cifar10", "plans": "static,conv_small@r0c0@e0"}, "smoke"))
    write_json(tmp_path / "config.json", config.to_json())  # the run's menu: the ceiling is added
    assert frontier_cli.main(["--run-dir", str(tmp_path), "--rerender"]) == 0
    assert "minus best_fixed_2" in (tmp_path / "frontier.md").read_text()
    rerendered = json.loads((tmp_path / "frontier.json").read_text())
    assert rerendered["frontier"] == payload["frontier"] and rerendered["ceiling"]["plans"] == list(config.ppo.plans)
    capsys.readouterr()
    (tmp_path / "frontier.json").write_text("{}")
    assert frontier_cli.main(["--run-dir", str(tmp_path), "--rerender"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_user_host_has_no_family_and_is_refused_in_one_line():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="--host"):
        fr.check_family(SimpleNamespace(host=object(), topology="cnn"))
