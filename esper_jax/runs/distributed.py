"""Several processes, one population: JAX's multi-process runtime for a training run.

A run over several processes (one per host, or several on one host) is one program: every
process builds the same run, the ``("pop", "env")`` mesh of :class:`~esper_jax.runs.population.Placement`
spans the devices of all of them, and each process computes its own shards. Process 0 is the
*writer*: it alone takes the run directory's lock and writes ``config.json``, ``metrics.jsonl``,
``summary.json`` and TensorBoard events; Orbax checkpoints are written by all processes together
(each its own shards) and restored the same way.

This module owns

* :class:`DistributedSpec`: who the processes are, from command-line options or the environment
  variables ``JAX_COORDINATOR_ADDRESS`` (JAX's own), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``;
  or, with ``auto``, whatever cluster JAX detects (SLURM, Open MPI, Kubernetes, Cloud TPU);
* :func:`initialize`, which starts the runtime with a bounded wait: JAX itself aborts the process
  with a C++ stack trace when the coordinator cannot be reached, so a watchdog ends the process
  first with one line saying what to check;
* the few collectives the training loop needs: :func:`is_writer`, :func:`fetch` (the metrics of
  every member, on every process), :func:`agree` (process 0's decision, on every process) and
  :func:`barrier`.

With one process every function here is the single-process behaviour (no collectives).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
from typing import Any, Mapping

import jax
import numpy as np

from esper_jax.runs.config import RunConfigError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
AUTO = "auto"
DEFAULT_TIMEOUT_S = 120
# JAX's own deadline is set past the watchdog's, so that the watchdog's line is what the user sees.
_JAX_GRACE_S = 30


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """The processes of a run. ``coordinator`` None: one process; ``"auto"``: JAX detects the
    cluster and its processes; else ``host:port`` with ``num_processes`` and ``process_id``."""

    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    timeout_s: int = DEFAULT_TIMEOUT_S

    @property
    def multi_process(self) -> bool:
        return self.coordinator is not None

    @classmethod
    def from_options(cls, coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, timeout_s: int | None = None,
                     environ: Mapping[str, str] = os.environ) -> "DistributedSpec":
        """Options first, then the environment variables; a partial or inconsistent description is
        a :class:`RunConfigError` naming what is missing."""
        coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
        num_processes = num_processes if num_processes is not None else _env_int(environ, ENV_NUM_PROCESSES)
        process_id = process_id if process_id is not None else _env_int(environ, ENV_PROCESS_ID)
        timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        if timeout_s <= 0:
            raise RunConfigError(f"--coordinator-timeout must be a positive number of seconds, got {timeout_s}")
        if coordinator is None:
            if num_processes not in (None, 1) or process_id not in (None, 0):
                raise RunConfigError(f"--num-processes/--process-id need --coordinator HOST:PORT (or ${ENV_COORDINATOR}); "
                                     f"use --coordinator=auto on a cluster JAX detects (SLURM, Open MPI, Kubernetes)")
            return cls(timeout_s=timeout_s)
        if coordinator == AUTO:
            return cls(AUTO, num_processes or 0, process_id or 0, timeout_s)
        _split_address(coordinator)
        if num_processes is None or process_id is None:
            raise RunConfigError(f"--coordinator {coordinator}: also give --num-processes N and --process-id I (or "
                                 f"${ENV_NUM_PROCESSES} and ${ENV_PROCESS_ID}), the same N on every process and "
                                 f"I = 0..N-1, process 0 on the coordinator's host")
        if num_processes < 1:
            raise RunConfigError(f"--num-processes must be at least 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise RunConfigError(f"--process-id {process_id} is not in 0..{num_processes - 1} "
                                 f"(--num-processes {num_processes})")
        return cls(coordinator, num_processes, process_id, timeout_s)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise RunConfigError(f"${name} must be an integer, got {text!r}") from None


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RunConfigError(f"--coordinator {address!r}: expected HOST:PORT, e.g. 10.0.0.1:12345 "
                             f"(the host of process 0 and a free port on it)")
    return host.strip("[]"), int(port)


def _reachable(address: str) -> bool:
    host, port = _split_address(address)
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def _port_in_use(address: str) -> str | None:
    """Why the coordinator (process 0) cannot listen on the address's port, or None if it can."""
    _, port = _split_address(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            return error.strerror or str(error)
    return None


def _timeout_message(spec: DistributedSpec) -> str:
    if spec.coordinator == AUTO:
        return (f"error: the processes of the cluster did not all join within {spec.timeout_s} s "
                f"(--coordinator=auto); check that every process was started, or raise --coordinator-timeout")
    if spec.process_id != 0 and not _reachable(spec.coordinator):
        return (f"error: cannot reach the coordinator at {spec.coordinator} within {spec.timeout_s} s (this is "
                f"process {spec.process_id}); start process 0 on that host first, check the address and port, or "
                f"raise --coordinator-timeout")
    return (f"error: not all {spec.num_processes} processes joined the coordinator at {spec.coordinator} within "
            f"{spec.timeout_s} s (this is process {spec.process_id}); start every process with the same --coordinator "
            f"and --num-processes and its own --process-id 0..{spec.num_processes - 1}, or raise --coordinator-timeout")


def initialize(spec: DistributedSpec) -> None:
    """Start JAX's multi-process runtime for ``spec`` (nothing for one process). Must run before
    anything touches a device. A wait past ``spec.timeout_s`` ends the process with exit status 2
    and one line on stderr; nothing has been written by then."""
    if not spec.multi_process:
        return
    if spec.coordinator != AUTO and spec.process_id == 0:
        busy = _port_in_use(spec.coordinator)
        if busy is not None:
            raise RunConfigError(f"--coordinator {spec.coordinator}: process 0 cannot listen on that port ({busy}); "
                                 f"choose a free port")

    def give_up() -> None:
        print(_timeout_message(spec), file=sys.stderr, flush=True)
        os._exit(2)  # the main thread is blocked inside JAX's C++ client: only a process exit ends it

    watchdog = threading.Timer(spec.timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        if spec.coordinator == AUTO:
            jax.distributed.initialize(initialization_timeout=spec.timeout_s + _JAX_GRACE_S)
        else:
            jax.distributed.initialize(spec.coordinator, spec.num_processes, spec.process_id,
                                       initialization_timeout=spec.timeout_s + _JAX_GRACE_S)
    except (RuntimeError, ValueError) as error:  # e.g. no cluster detected under "auto"
        raise RunConfigError(f"cannot start the multi-process runtime: {' '.join(str(error).split())}") from None
    finally:
        watchdog.cancel()


# ---------------------------------------------------------------------------- collectives


def process_count() -> int:
    return jax.process_count()


def is_writer() -> bool:
    """Whether this process writes the run directory's files (process 0)."""
    return jax.process_index() == 0


def fetch(tree: Any) -> Any:
    """``tree`` (arrays sharded over the devices of every process) as NumPy arrays, whole, on every
    process. One process: a plain ``device_get``."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def agree(value: int) -> int:
    """Process 0's ``value`` on every process (a decision only the writer can make, such as
    "the run directory was refused")."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def barrier(name: str) -> None:
    """Every process reaches ``name`` before any goes on (e.g. process 0 has written a file the
    others read next)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
