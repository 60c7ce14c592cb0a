"""``python -m experiments.widening``: the run's host widened mid-episode against the narrow and wide
static networks (and the run's frontier on the held-out stream), on a smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from esper_jax.runs.rundir import write_json
from esper_jax.runs.settings import resolve_config, resolve_settings
from experiments import widening


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("widening-run")
    config = resolve_config(resolve_settings({"task": "cifar10"}, "smoke"))  # base width 4, one block, 7 epochs
    write_json(path / "config.json", config.to_json())
    return path


def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys):
    cases = [
        ([f"--run-dir={tmp_path}"], "not a run directory"),
        ([f"--run-dir={run_dir}", "--at=0"], "must be in 1..6"),
        ([f"--run-dir={run_dir}", "--at=7"], "must be in 1..6"),
        ([f"--run-dir={run_dir}", "--at=one"], "--at must be epochs"),
        ([f"--run-dir={run_dir}"], "no learning rate for host_w4, host_w8"),
        ([f"--run-dir={run_dir}", "--lr-scales=1"], "--lr-scales must be NARROW,WIDE"),
        ([f"--run-dir={run_dir}", "--lr-scales=1,-1"], "must be positive"),
        ([f"--run-dir={run_dir}", "--factor=1"], "at least 2"),
        ([f"--run-dir={run_dir}", "--lr-scales=1,1", f"--json={tmp_path}/missing/w.json"], "does not exist"),
    ]
    for argv, expected in cases:
        assert widening.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err, (argv, err)


def test_widening_against_the_line_and_the_frontier(run_dir, tmp_path, capsys):
    out = tmp_path / "held.json"
    argv = [f"--run-dir={run_dir}", "--stream=held-out", "--envs=2", "--at=2,5", "--init=preserve", "--lr-scales=1,0.5"]
    assert widening.main(argv + [f"--json={out}"]) == 0
    first = json.loads(out.read_text())
    rows = first["rows"]
    assert set(rows) == {"narrow", "wide", "widen@e2", "widen@e5"} and first["synthetic"]
    # compute: the narrow host's epochs are the cheaper ones, so widening later costs less
    assert rows["narrow"]["flops"] < rows["widen@e5"]["flops"] < rows["widen@e2"]["flops"] < rows["wide"]["flops"]
    for name in ("narrow", "wide"):  # the line's own ends lie on it
        assert rows[name]["minus_line_ci"]["mean"] == 0.0
    assert len(first["curves"]["widen@e2"]) == 7 and first["curves"]["widen@e2"][:2] == first["curves"]["narrow"][:2]
    assert "SYNTHETIC" in out.with_suffix(".md").read_text() and first["frontier_networks"] is None

    # a frontier made of the same narrow and wide networks: the gap to it is the gap to the line, and the
    # narrow host trained again here is the frontier's run of it exactly (one program, run twice)
    frontier = {"frontier": {"networks": ["host_w4", "host_w8"], "flops": [rows["narrow"]["flops"], rows["wide"]["flops"]]},
                "held_out": {"num_envs": 2},
                "rows": {"host_w4": {"lr_scale": 1.0, "final_val_loss_per_env": rows["narrow"]["final_val_loss_per_env"]},
                         "host_w8": {"lr_scale": 0.5, "final_val_loss_per_env": rows["wide"]["final_val_loss_per_env"]}}}
    write_json(run_dir / "frontier.json", frontier)
    try:
        assert widening.main(argv[:-1] + [f"--json={out}"]) == 0  # learning rates from frontier.json
        second = json.loads(out.read_text())
        assert second["narrow_reproduced_max_abs_difference"] == 0.0
        for name, row in second["rows"].items():
            assert row["final_val_loss_per_env"] == rows[name]["final_val_loss_per_env"]
            np.testing.assert_allclose(row["minus_frontier_ci"]["mean"], row["minus_line_ci"]["mean"], atol=1e-12)
        assert "minus frontier at its compute" in out.with_suffix(".md").read_text()
        assert widening.main(argv[:-1] + ["--envs=3", f"--json={out}"]) == 2
        assert "the frontier's 2 held-out envs" in capsys.readouterr().err
    finally:
        (run_dir / "frontier.json").unlink()
