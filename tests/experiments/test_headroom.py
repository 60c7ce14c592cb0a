"""``python -m experiments.headroom``: scripted growth schedules against static on held-out envs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from esper_jax.env.controllers import Schedule, controller_name, parse_controller
from esper_jax.lattice.lifecycle import Stage
from experiments import headroom


def test_schedule_names_round_trip_and_bad_ones_are_refused():
    schedule = Schedule.parse("conv_heavy@r2c0@e3", tempo_epochs=5)
    assert (schedule.blueprint, schedule.slot, schedule.epoch, schedule.tempo_epochs) == ("conv_heavy", "r2c0", 3, 5)
    assert Schedule.parse(schedule.name) == Schedule("conv_heavy", "r2c0", 3)
    assert Schedule.parse("norm@r0c0").epoch == 0
    for bad in ("norm", "norm@", "norm@r0c0@3", "norm@r0c0@ex", "a@b@e1@c"):
        with pytest.raises(ValueError, match="blueprint@slot"):
            Schedule.parse(bad)


def test_a_controller_is_a_name_or_a_schedule():
    assert parse_controller(" heuristic ") == "heuristic"
    seeds = parse_controller("conv_heavy@r2c0+norm@r0c0@e4")
    assert seeds == (Schedule("conv_heavy", "r2c0", 0), Schedule("norm", "r0c0", 4))
    assert controller_name(seeds) == "conv_heavy@r2c0@e0+norm@r0c0@e4"
    assert controller_name(parse_controller("static")) == "static"
    with pytest.raises(ValueError, match=r"blueprint@slot.*or a controller \(heuristic, random, static\)"):
        parse_controller("heuristc")


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    cases = [
        (["--task=cifar10", "--preset=smoke", "--schedules=conv_heavy@r0c0"], "not enabled"),
        (["--task=cifar10", "--preset=smoke", "--schedules=norm@r9c0"], "r9c0"),
        (["--task=cifar10", "--preset=smoke", "--schedules=norm@r0c0@e99"], "outside the episode"),
        (["--task=cifar10", "--preset=nope"], "unknown preset"),
        ([f"--run-dir={tmp_path}"], "not a run directory"),
        ([f"--run-dir={tmp_path}", "--host-lr=0.1"], "drop --host-lr"),
        (["--task=cifar10", "--preset=smoke", "--slots=r9c9"], "r9c9"),
        (["--task=cifar10", "--preset=smoke", f"--json={tmp_path}/missing/h.json"], "does not exist"),
        (["--task=cifar10", "--preset=smoke", "--strata=width:2"], "--strata must be DIM:N"),
        (["--task=cifar10", "--preset=smoke", "--strata=label_noise:0"], "--strata must be DIM:N"),
        (["--task=cifar10", "--preset=smoke", "--built-in=norm@r0c0@e2"], "without @eEPOCH"),
        (["--task=cifar10", "--preset=smoke", "--built-in=conv_heavy@r0c0"], "not enabled"),
        (["--task=cifar10", "--preset=smoke", "--built-in=norm@r0c0+conv_small@r0c0"], "slot of its own"),
    ]
    for argv, expected in cases:
        assert headroom.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_:  # an option argparse refuses: the same one line
        headroom.main(["--task=cifar10", "--envs=0"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err == "error: argument --envs: must be positive, got 0"


@pytest.mark.slow  # ~14 s of compiling and running schedules; the default suite keeps the argument checks
def test_headroom_runs_schedules_against_static_on_the_held_out_envs(tmp_path, capsys):
    out = tmp_path / "headroom.json"
    argv = ["--task=cifar10", "--preset=smoke", "--envs=3", "--schedules=conv_small@r0c0@e0,norm@r0c0@e1",
            "--built-in=conv_small@r0c0", f"--json={out}"]
    assert headroom.main(argv) == 0
    payload = json.loads(out.read_text())
    assert payload["synthetic"] and payload["schedules"] == ["conv_small@r0c0@e0", "norm@r0c0@e1"]
    assert list(payload["controllers"]) == ["static", "heuristic", "conv_small@r0c0@e0", "norm@r0c0@e1",
                                            "built_in:conv_small@r0c0"]
    # the built-in network: fossilized from the start in every env, computed in every epoch (as grown, but longer)
    built_in, grown = payload["controllers"]["built_in:conv_small@r0c0"], payload["controllers"]["conv_small@r0c0@e0"]
    assert payload["built_in"] == {"built_in:conv_small@r0c0": ["conv_small@r0c0"]}
    assert (np.asarray(payload["timelines"]["built_in:conv_small@r0c0"]["stage"]) == Stage.FOSSILIZED).all()
    assert built_in["compute"]["flops"] > grown["compute"]["flops"] > payload["controllers"]["static"]["compute"]["flops"]
    assert built_in["final_val_loss_minus_static_ci"]["mean"] != 0.0
    assert payload["held_out"]["num_envs"] == 3 and "0x45564c31" in payload["held_out"]["derivation"]
    ci = grown["final_val_loss_minus_static_ci"]
    assert ci["n"] == 3 and ci["low"] <= ci["mean"] <= ci["high"] and grown["germinated"]["conv_small"] == 3
    assert payload["controllers"]["static"]["final_val_loss_minus_static_ci"]["mean"] == 0.0
    table = (tmp_path / "headroom.md").read_text()
    assert "SYNTHETIC" in table and "conv_small@r0c0@e0" in table and "[95% CI]" in table
    assert "conv_small@r0c0@e0" in capsys.readouterr().out


@pytest.mark.slow  # ~15 s of compiling and running schedules
def test_strata_of_a_problem_family_on_the_calibration_envs(tmp_path):
    out = tmp_path / "strata.json"
    argv = ["--task=cifar10", "--preset=smoke", "--envs=4", "--schedules=conv_small@r0c0@e0", "--stream=calibration",
            "--train-fraction=0.05:1", "--compute-weight=1", "--strata=train_fraction:2", f"--json={out}"]
    assert headroom.main(argv) == 0
    payload = json.loads(out.read_text())
    assert "calibration stream" in payload["held_out"]["derivation"] and payload["stream"] == "calibration"
    fractions = payload["held_out"]["problems"]["train_fraction"]
    assert len(set(fractions)) == 4 and all(0.05 <= f <= 1 for f in fractions)
    bins = payload["strata"]["bins"]
    assert sorted(i for b in bins for i in b["envs"]) == [0, 1, 2, 3]
    grown = payload["controllers"]["conv_small@r0c0@e0"]["compute"]["flops"]
    assert grown > payload["controllers"]["static"]["compute"]["flops"]
    assert "best by priced loss" in (tmp_path / "strata.md").read_text()
