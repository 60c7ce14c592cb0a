"""``python -m experiments.widening``: the run's host widened mid-episode against the narrow and wide
static networks (and the run's frontier on the held-out stream), on a smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from esper_jax.runs.config import read_config
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
    # narrow host's own row there is matched exactly
    frontier = {"frontier": {"networks": ["host_w4", "host_w8"], "flops": [rows["narrow"]["flops"], rows["wide"]["flops"]]},
                "held_out": {"num_envs": 2},
                "rows": {"host_w4": {"lr_scale": 1.0, "final_val_loss_per_env": rows["narrow"]["final_val_loss_per_env"]},
                         "host_w8": {"lr_scale": 0.5, "final_val_loss_per_env": rows["wide"]["final_val_loss_per_env"]}}}
    args = widening.build_parser().parse_args(argv)
    config = read_config(run_dir)
    fresh_rows = {name: {k: v for k, v in row.items() if k in ("widen_at", "final_val_loss_per_env", "final_val_loss",
                                                               "flops", "flops_per_env", "seconds")}
                  for name, row in rows.items()}
    payload = widening.widening_payload(fresh_rows, first["curves"], frontier, names=("host_w4", "host_w8"), args=args,
                                        config=config, data_label="SYNTHETIC data", synthetic=True, scales=(1.0, 0.5))
    assert payload["narrow_reproduced_max_abs_difference"] == 0.0
    for row in payload["rows"].values():
        np.testing.assert_allclose(row["minus_frontier_ci"]["mean"], row["minus_line_ci"]["mean"], atol=1e-12)
    assert "minus frontier at its compute" in widening.markdown(payload)

    write_json(run_dir / "frontier.json", frontier)  # learning rates from it; its envs are the held-out ones
    try:
        assert widening.main(argv[:-1] + ["--envs=3", f"--json={out}"]) == 2
        assert "the frontier's 2 held-out envs" in capsys.readouterr().err
    finally:
        (run_dir / "frontier.json").unlink()
