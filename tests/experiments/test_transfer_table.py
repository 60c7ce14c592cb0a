"""``experiments.transfer_table``: policies evaluated on one target's held-out envs, paired per env
with static, random, the heuristic, the target's own policy and its frontier (hand-made files)."""

from __future__ import annotations

import json

import pytest

from esper_jax.runs import frontier as fr
from experiments import transfer_table


def _evaluation(policy, static=(2.0, 3.0), **others):
    controllers = {"policy": {"final_val_loss_per_env": list(policy), "compute": {"flops_per_env": [1e7, 1e7]}},
                   "static": {"final_val_loss_per_env": list(static)}}
    controllers.update({name: {"final_val_loss_per_env": list(v)} for name, v in others.items()})
    return {"controllers": controllers}


def _write(path, payload):
    path.write_text(json.dumps(payload))
    return path


def test_rows_are_paired_per_env_with_every_reference(tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    _write(target / "evaluation.json", _evaluation((1.8, 2.9)))
    row = lambda kind, losses, flops: {"kind": kind, "final_val_loss_per_env": losses, "flops_per_env": [flops] * 2,
                                       "flops": flops}
    rows = {"static": row(fr.STATIC_NETWORK, [2.0, 3.0], 1e6), "large": row(fr.STATIC_NETWORK, [1.0, 2.0], 1e8),
            "best_fixed_2": row("fixed schedule", [1.9, 2.7], 2e7)}
    _write(target / "frontier.json", fr.frontier_payload(rows, envs=2, run_seed=0, task="t", data_label="d",
                                                         synthetic=True, host_params=1))
    mine = _write(tmp_path / "mine.json", _evaluation((1.5, 2.5), random=(2.1, 3.1), heuristic=(1.9, 3.3)))
    other = _write(tmp_path / "other.json", _evaluation((1.6, 2.4)))
    out = tmp_path / "table.json"
    assert transfer_table.main(["--target-run", str(target), "--rows", f"mine={mine}, other={other}",
                                "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert [r["row"] for r in table] == ["mine", "other"]
    assert table[0]["minus_static"]["mean"] == pytest.approx(-0.5)
    assert table[1]["minus_random"]["mean"] == pytest.approx(((1.6 - 2.1) + (2.4 - 3.1)) / 2)  # mine's random
    assert table[0]["minus_heuristic"]["mean"] == pytest.approx(((1.5 - 1.9) + (2.5 - 3.3)) / 2)
    assert table[0]["minus_target_policy"]["mean"] == pytest.approx(((1.5 - 1.8) + (2.5 - 2.9)) / 2)
    assert table[0]["minus_best_fixed"]["mean"] == pytest.approx(((1.5 - 1.9) + (2.5 - 2.7)) / 2)
    # the frontier (1e6 -> 1e8, linear in log compute) at 1e7 is halfway: 1.5 and 2.5
    assert table[0]["minus_frontier"]["mean"] == pytest.approx(0.0)
    assert "| mine | 2.0000 | 0.0 |" in capsys.readouterr().out


def test_other_envs_or_a_missing_controller_are_one_line(tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    _write(target / "evaluation.json", _evaluation((1.8, 2.9)))
    mine = _write(tmp_path / "mine.json", _evaluation((1.5, 2.5), random=(2.1, 3.1), heuristic=(1.9, 3.3)))
    elsewhere = _write(tmp_path / "elsewhere.json", _evaluation((1.5, 2.5), static=(2.0, 3.5)))
    for rows, message in ((f"mine={mine},x={elsewhere}", "holds other envs"), (f"x={elsewhere}", "no row file ran"),
                          (f"{mine}", "is not LABEL=FILE")):
        assert transfer_table.main(["--target-run", str(target), "--rows", rows]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
