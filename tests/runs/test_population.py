"""Hyperparameter populations: the sweep grammar, members, placement on devices, and (slow) a
population sharded over 4 fake CPU devices against the same population on one device.

Sharded and single-device programs are compiled differently (each device holds one member, so
batched matmuls become unbatched ones), so their float results agree to rounding, not bit for bit:
after two updates the per-member metrics differ by ~1e-5 relative. The comparison uses a
tolerance for floats and is exact for counts (germinated, fossilized, episodes, env steps...).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from esper_jax.runs.load import load_run
from esper_jax.runs.settings import resolve_settings
from esper_jax.runs.population import Placement, parse_seeds, parse_sweep, resolve_members, stack_hyperparams
from esper_jax.rl.ppo import Hyperparams, PPOConfig

REPO = Path(__file__).resolve().parents[2]


def test_sweeps_and_members():
    assert parse_sweep("lr", "3e-4").values == (3e-4,)
    assert parse_sweep("lr", "1e-4, 3e-4").values == (1e-4, 3e-4)
    sweep = parse_sweep("lr", "log:1e-4:1e-2")
    assert sweep.is_range and (sweep.kind, sweep.low, sweep.high) == ("log", 1e-4, 1e-2)
    for bad, match in (("abc", "cannot read"), ("exp:1:2", "cannot read"), ("-1", "positive"),
                       ("lin:2:1", "LO < HI"), ("nan", "finite")):
        with pytest.raises(ValueError, match=match):
            parse_sweep("lr", bad)
    assert parse_sweep("ent-coef", "0", positive=False).values == (0.0,)
    with pytest.raises(ValueError, match="duplicate"):
        parse_seeds("1,1")

    # lists set the population size; single values are shared; seeds default to seed + i
    members = resolve_members(None, parse_sweep("lr", "1e-3,3e-4,1e-4"), parse_sweep("e", "0.05", False), seed=10)
    assert [m.learning_rate for m in members] == [1e-3, 3e-4, 1e-4]
    assert [m.ent_coef for m in members] == [0.05] * 3 and [m.seed for m in members] == [10, 11, 12]
    # ranges are drawn per member, reproducibly from the run seed, inside the range
    draw = lambda seed: resolve_members(4, parse_sweep("lr", "log:1e-4:1e-2"), parse_sweep("e", "lin:0:0.1", False),
                                        seed=seed)
    assert draw(0) == draw(0) and draw(0) != draw(1)
    assert all(1e-4 <= m.learning_rate <= 1e-2 and 0 <= m.ent_coef <= 0.1 for m in draw(0))
    assert len({m.learning_rate for m in draw(0)}) == 4
    assert [m.seed for m in resolve_members(2, parse_sweep("lr", "1e-3"), parse_sweep("e", "0", False), 0,
                                               seeds=(7, 3))] == [7, 3]
    with pytest.raises(ValueError, match="lists 2 values but the population has 3"):
        resolve_members(3, parse_sweep("lr", "1e-3,1e-4"), parse_sweep("e", "0", False), 0)
    with pytest.raises(ValueError, match="--seeds lists 1 values"):
        resolve_members(2, parse_sweep("lr", "1e-3"), parse_sweep("e", "0", False), 0, seeds=(5,))

    hyper = stack_hyperparams(Hyperparams.default(PPOConfig()), members)
    np.testing.assert_allclose(np.asarray(hyper.learning_rate), [1e-3, 3e-4, 1e-4], rtol=1e-6)
    assert hyper.learning_rate.dtype == np.float32 and hyper.ent_coef.shape == (3,)


def test_placement_on_one_device():
    placement = Placement.for_devices(4, 8)
    if len(jax.devices()) == 1:
        assert placement.mesh is None and placement.state_shardings({"x": np.zeros(3)}) is None
        assert placement.describe().startswith("one device")


def cli(args, cache: Path, devices: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if devices:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return subprocess.run([sys.executable, "-m", "experiments.ppo", *args, f"--compile-cache={cache}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1200)


def assert_rows_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, float) and isinstance(y, float):
            assert y == pytest.approx(x, rel=1e-3, abs=1e-6), name
        else:
            assert x == y, name


@pytest.mark.slow
def test_population_sharded_over_four_devices_matches_one_device(tmp_path):
    """P=2 learners with their own learning rates and seeds, 2 envs each: on 4 fake CPU devices the
    population axis is split 2 ways and the env axis 2 ways; the metrics match one device."""
    cache = tmp_path / "cache"
    args = ["--task=cifar10", "--preset=smoke", "--population=2", "--lr=1e-3,3e-4", "--ent-coef=0.05,0.01",
            "--updates=2", "--checkpoint-every=2", "--no-progress"]
    one = cli([*args, f"--run-dir={tmp_path / 'one'}"], cache)
    assert one.returncode == 0, one.stderr[-3000:]
    four = cli([*args, f"--run-dir={tmp_path / 'four'}"], cache, devices=4)
    assert four.returncode == 0, four.stderr[-3000:]
    assert "4 devices: population axis split 2 ways, env axis 2 ways" in four.stdout
    assert "one device" in one.stdout

    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "four")}
    assert [r["update"] for r in rows["one"]] == [1, 2]
    for r1, r4 in zip(rows["one"], rows["four"]):
        assert len(r1["members"]) == 2
        for m1, m4 in zip(r1["members"], r4["members"]):
            assert_rows_close(m1, m4)
        # the top-level values are the member means
        assert r1["mean_return"] == pytest.approx(np.mean([m["mean_return"] for m in r1["members"]]))
        # 2 envs x one smoke episode per update
        per_update = 2 * resolve_settings({"task": "cifar10"}, "smoke")["episode_epochs"]
        assert r1["env_steps"] == r1["members"][0]["env_steps"] == per_update * r1["update"]
    # the members really differ: their own hyperparameters and seeds
    assert rows["one"][-1]["members"][0]["mean_return"] != rows["one"][-1]["members"][1]["mean_return"]

    config = json.loads((tmp_path / "four" / "config.json").read_text())
    assert config["population"] == 2 and [m["learning_rate"] for m in config["members"]] == [1e-3, 3e-4]
    assert [m["ent_coef"] for m in config["members"]] == [0.05, 0.01] and [m["seed"] for m in config["members"]] == [0, 1]
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "four")}
    for summary in summaries.values():
        assert summary["population"] == 2 and len(summary["members"]) == 2 and summary["complete"]
        scores = [m["score"] for m in summary["members"]]
        assert summary["best_member"] == int(np.argmax(scores))
    assert summaries["one"]["best_member"] == summaries["four"]["best_member"]
    assert f"best member: {summaries['four']['best_member']}" in four.stdout

    # a checkpoint written from 4 devices restores on this process's devices, population axis kept
    handle = load_run(tmp_path / "four")
    assert handle.step == 2 and handle.population == 2
    assert handle.state.update.tolist() == [2, 2] and handle.state.obs_stats.count.shape == (2,)
    assert handle.state.env_state is None  # evaluation restores the learner, not its training envs
    np.testing.assert_allclose(np.asarray(handle.state.hyper.learning_rate), [1e-3, 3e-4], rtol=1e-6)
