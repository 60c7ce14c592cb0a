"""The run directory's rows and summary (:mod:`esper_jax.runs.rundir`), without training: a
diverged member is named, never the best, and a damaged JSON file is one line naming it."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from esper_jax.runs.config import RunConfigError
from esper_jax.runs.load import RunHandle
from esper_jax.runs.rundir import diverged_members, metric_rows, read_json, summarize_run
from esper_jax.runs.settings import resolve_config, resolve_settings


def population_rows(nonfinite, returns):
    """Rows of a population from per-member, per-update ``nonfinite`` flags and returns."""
    nonfinite, returns = np.asarray(nonfinite), np.asarray(returns, np.float64)
    population, updates = nonfinite.shape
    metrics = {"update": np.tile(np.arange(1, updates + 1), (population, 1)),
               "env_steps": np.tile(np.arange(1, updates + 1) * 10, (population, 1)),
               "mean_return": returns, "nonfinite": nonfinite}
    return metric_rows(metrics)


def test_a_diverged_member_is_named_and_never_best():
    config = resolve_config(resolve_settings({"task": "cifar10", "population": 3, "learning_rate": "1e-3,3e-4,1e-4"},
                                             "smoke"))
    # member 1 has the best returns but diverged at update 2; member 2 diverged at update 3
    rows = population_rows([[0, 0, 0], [0, 1, 1], [0, 0, 1]], [[1.0, 1.0, 1.0], [5.0, np.nan, np.nan], [2.0, 2.0, np.nan]])
    assert [r["nonfinite"] for r in rows] == [0, 1, 2]  # how many members are not finite
    assert diverged_members(rows, 3) == {1: 2, 2: 3}
    summary = summarize_run(config, rows)
    assert summary["best_member"] == 0 and summary["diverged"] == {"1": 2, "2": 3}
    assert [m["diverged_at"] for m in summary["members"]] == [None, 2, 3]
    assert summary["members"][1]["score"] is None


def test_every_member_diverged_means_no_best():
    config = resolve_config(resolve_settings({"task": "cifar10"}, "smoke"))
    rows = metric_rows({"update": np.array([[1, 2]]), "env_steps": np.array([[14, 28]]),
                        "mean_return": np.array([[1.0, np.nan]]), "nonfinite": np.array([[0, 1]])})
    summary = summarize_run(config, rows)
    assert summary["best_member"] is None and summary["diverged"] == {"0": 2}


def test_damaged_json_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "summary.json"
    path.write_bytes(b'{"best_member": 0,')
    with pytest.raises(RunConfigError, match="summary.json is damaged"):
        read_json(path)
    path.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(RunConfigError, match="summary.json is damaged"):
        read_json(path)
    path.write_text(json.dumps({"ok": 1}))
    assert read_json(path) == {"ok": 1}


def test_a_non_finite_policy_is_recognized():
    finite = types.SimpleNamespace(params={"w": np.ones(3)}, obs_stats={"mean": np.zeros(2)})
    broken = types.SimpleNamespace(params={"w": np.array([1.0, np.nan, 0.0])}, obs_stats={"mean": np.zeros(2)})
    handle = types.SimpleNamespace(member_state=lambda m: (finite, broken)[m])
    assert RunHandle.policy_is_finite(handle, 0) and not RunHandle.policy_is_finite(handle, 1)


def test_language_model_rows_report_perplexity_not_accuracy():
    import math

    from esper_jax.runs.rundir import language_model_rows

    rows = population_rows([[0, 0], [0, 0]], [[1.0, 2.0], [3.0, 4.0]])
    for row in rows:
        row["mean_final_val_loss"] = 2.0
        row["mean_final_val_accuracy"] = 0.0
        for m, entry in enumerate(row["members"]):
            entry["mean_final_val_loss"] = 1.0 + 2.0 * m
    out = language_model_rows(rows)
    assert out[0]["mean_final_val_perplexity"] == pytest.approx(math.exp(2.0))
    assert [m["mean_final_val_perplexity"] for m in out[0]["members"]] == pytest.approx([math.exp(1.0), math.exp(3.0)])
    assert out[0]["mean_final_val_accuracy"] is None and out[0]["members"][0]["mean_final_val_accuracy"] is None
    assert language_model_rows([{"update": 1, "mean_final_val_loss": None}])[0]["mean_final_val_perplexity"] is None


def read_scalars(folder) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the TensorBoard event files in ``folder`` (TFRecord framing:
    length, its CRC, the Event bytes, their CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_scalars_are_the_rows(tmp_path):
    pytest.importorskip("tensorboardX")
    from esper_jax.runs.tensorboard import TENSORBOARD_DIR, ScalarWriter

    rows = population_rows([[0, 0], [0, 0]], [[1.0, 2.0], [3.0, np.nan]])
    with ScalarWriter(tmp_path) as writer:
        writer.write(rows)
    scalars = read_scalars(tmp_path / TENSORBOARD_DIR)
    assert scalars["mean_return"] == {1: 2.0, 2: 2.0}  # the member mean (the NaN member left out)
    assert scalars["member_0/mean_return"] == {1: 1.0, 2: 2.0}
    assert scalars["member_1/mean_return"] == {1: 3.0}  # a non-finite value is not written
    assert scalars["env_steps"] == {1: 10.0, 2: 20.0} and "update" not in scalars
