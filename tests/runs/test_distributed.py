"""Several processes, one population: who the processes are, bad descriptions as one line each,
a bounded wait for a coordinator that is not there, and (slow) two CPU processes on localhost
training and resuming a population whose metrics match one process's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from experiments import ppo as ppo_cli
from esper_jax.runs import distributed
from esper_jax.runs.config import RunConfigError
from esper_jax.runs.distributed import DistributedSpec
from esper_jax.runs.population import Placement

from tests.runs.test_population import assert_rows_close

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_spec_from_options_and_environment():
    assert not DistributedSpec.from_options(environ={}).multi_process
    spec = DistributedSpec.from_options("10.0.0.1:1234", 4, 3, environ={})
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("10.0.0.1:1234", 4, 3)
    env = {"JAX_COORDINATOR_ADDRESS": "host:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert DistributedSpec.from_options(environ=env) == DistributedSpec("host:99", 2, 1)
    assert DistributedSpec.from_options(process_id=0, environ=env).process_id == 0  # options win
    assert DistributedSpec.from_options("auto", environ={}).coordinator == "auto"


@pytest.mark.parametrize("options, environ, match", [
    (("h:1", None, 0), {}, "also give --num-processes N and --process-id I"),
    (("h:1", 2, 2), {}, r"--process-id 2 is not in 0..1"),
    (("nohost", 2, 0), {}, "expected HOST:PORT"),
    (("h:99999", 2, 0), {}, "expected HOST:PORT"),
    ((None, 2, 1), {}, "need --coordinator HOST:PORT"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     r"\$JAX_NUM_PROCESSES must be an integer"),
])
def test_spec_errors_name_what_is_missing(options, environ, match):
    with pytest.raises(RunConfigError, match=match):
        DistributedSpec.from_options(*options, environ=environ)


def test_coordinator_port_in_use_is_one_line():
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RunConfigError, match=f"process 0 cannot listen on that port"):
            distributed.initialize(DistributedSpec(f"127.0.0.1:{port}", 2, 0, 5))


def test_several_processes_need_a_run_dir(capsys):
    assert ppo_cli.main(["--task=cifar10", "--preset=smoke", "--coordinator=127.0.0.1:1", "--num-processes=2",
                         "--process-id=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs --run-dir DIR, the same directory on every process" in err


def test_placement_refuses_a_process_without_a_shard():
    devices = [types.SimpleNamespace(id=i, process_index=i) for i in range(2)]
    with pytest.raises(RunConfigError, match="population axis, then the env axis, split over all 2"):
        Placement.for_devices(1, 1, devices)


def run_cli(args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.ppo", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("process_id, message", [
    (1, "cannot reach the coordinator at"),             # nobody listens there
    pytest.param(0, "not all 2 processes joined the coordinator",  # the coordinator waits for a process never started
                 marks=pytest.mark.slow),
])
def test_an_absent_peer_is_a_bounded_wait_and_one_line(tmp_path, process_id, message):
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    result = run_cli(["--task=cifar10", "--preset=smoke", f"--run-dir={run_dir}", "--compile-cache=off",
                      f"--coordinator=127.0.0.1:{free_port()}", "--num-processes=2", f"--process-id={process_id}",
                      "--coordinator-timeout=3"])
    seconds = time.perf_counter() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "raise --coordinator-timeout" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line, no C++ stack trace
    assert seconds < 45  # bounded: the 3 s wait plus starting Python and JAX
    assert not run_dir.exists()  # nothing written


def test_importing_the_command_line_leaves_the_backend_unstarted():
    """``jax.distributed.initialize`` must come before the backend starts; a device array made at
    import (a module-level table) would start it."""
    code = ("import experiments.ppo, experiments.evaluate, experiments.heuristic, experiments.report\n"
            "from jax._src import xla_bridge\nassert not xla_bridge._backends, 'backend started at import'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def two_processes(args: list[str], timeout: int = 1200) -> list[subprocess.CompletedProcess]:
    port = free_port()
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2"}
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.ppo", *args], cwd=REPO, text=True,
                              env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_processes_train_and_resume_like_one(tmp_path):
    """Two CPU processes (the coordinator on 127.0.0.1, described by the environment variables)
    train a population of 2, one member each; resumed over two processes, the run's metrics match
    one process's uninterrupted run to the tolerance of the single-process sharding test."""
    cache = tmp_path / "cache"
    common = ["--task=cifar10", "--preset=smoke", "--population=2", "--lr=1e-3,3e-4", "--checkpoint-every=1",
              "--no-progress", f"--compile-cache={cache}"]
    one = run_cli([*common, "--updates=3", f"--run-dir={tmp_path / 'one'}"], timeout=1200)
    assert one.returncode == 0, one.stderr[-3000:]

    two_dir = tmp_path / "two"
    first = two_processes([*common, "--updates=2", f"--run-dir={two_dir}"])
    for result in first:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "2 devices of 2 processes: population axis split 2 ways" in first[0].stdout
    # process 1 computes and checkpoints; process 0 alone speaks and writes (Gloo's own line aside)
    assert "update 1/2" not in first[1].stdout and "run directory" not in first[1].stdout
    resumed = two_processes([f"--resume={two_dir}", "--updates=3", "--no-progress", f"--compile-cache={cache}"])
    for result in resumed:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from the checkpoint at update 2 of 3" in resumed[0].stdout

    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")}
    assert [r["update"] for r in rows["two"]] == [1, 2, 3]
    for r1, r2 in zip(rows["one"], rows["two"]):
        for m1, m2 in zip(r1["members"], r2["members"]):
            assert_rows_close(m1, m2)
    summary = json.loads((two_dir / "summary.json").read_text())
    assert summary["complete"] and summary["population"] == 2
    assert summary["best_member"] == json.loads((tmp_path / "one" / "summary.json").read_text())["best_member"]
    assert sorted(p.name for p in (two_dir / "checkpoints").iterdir() if p.name.isdigit())[-1] == "3"
