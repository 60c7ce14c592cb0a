"""Timing, compiling and memory helpers shared by the benchmark sections.

Every figure that matters is a ratio of timings taken in one process, in interleaved rounds,
because a shared 2-core machine is noisy: candidates that are compared run alternately, and
the median over rounds is reported.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


class Timer:
    """Times several candidates in interleaved rounds; reports the median seconds per call."""

    def __init__(self, rounds: int, calls: int):
        self.rounds, self.calls = rounds, calls
        self.candidates: dict[str, Callable[[], object]] = {}
        self.compile_seconds: dict[str, float] = {}

    def add(self, name: str, run: Callable[[], object], compiled: bool = False):
        """``compiled``: ``run`` calls programs compiled beforehand (``compile_timed``), so the
        first call, which would otherwise compile them and be timed as such, is skipped."""
        if not compiled:
            start = time.perf_counter()
            jax.block_until_ready(run())
            self.compile_seconds[name] = time.perf_counter() - start
        self.candidates[name] = run

    def run(self) -> dict[str, float]:
        samples = {name: [] for name in self.candidates}
        for _ in range(self.rounds):
            for name, run in self.candidates.items():
                start = time.perf_counter()
                for _ in range(self.calls):
                    out = run()
                jax.block_until_ready(out)
                samples[name].append((time.perf_counter() - start) / self.calls)
        return {name: statistics.median(s) for name, s in samples.items()}


def compile_timed(fn, *args) -> tuple[Callable, dict]:
    """Lower and compile the jitted ``fn`` for ``args``: the compiled callable, the wall seconds
    each phase took, and this process's CPU seconds (on a busy machine wall time overstates
    what an idle one would take; XLA:CPU compiles mostly on one thread, so there CPU ~ wall)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done, cpu_done = time.perf_counter(), time.process_time()
    return compiled, {"lower": lowered_at - start, "compile": done - lowered_at, "total": done - start,
                      "cpu_total": cpu_done - cpu_start}


def memory_of(compiled) -> dict | None:
    """XLA's own account of a compiled program's buffers, in bytes (None where the backend
    gives none). ``peak`` is arguments + outputs + temporaries - aliased, an upper bound on
    what one call holds at once."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if analysis is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {name.replace("_in_bytes", ""): int(getattr(analysis, name, 0) or 0) for name in fields}
    out["peak"] = out["argument_size"] + out["output_size"] + out["temp_size"] - out["alias_size"]
    return out


def flops_of(compiled) -> float | None:
    """Floating-point operations of one call of a compiled program, as XLA counts them."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def max_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def unstack(tree, n: int) -> list:
    """The members of a population pytree as separate device pytrees (NumPy slicing compiles nothing)."""
    host = jax.tree.map(np.asarray, tree)
    return [jax.tree.map(lambda a, i=i: jax.device_put(a[i]), host) for i in range(n)]


def image_batch(batch: int, members: int | None = None, image_size: int = 32, channels: int = 3, classes: int = 10):
    """A fixed random batch (benchmarks need shapes, not data)."""
    shape = (batch, image_size, image_size, channels)
    if members is not None:
        shape = (members,) + shape
    x = jax.random.normal(jax.random.key(1), shape)
    y = jnp.arange(batch) % classes
    if members is not None:
        y = jnp.tile(y, (members, 1))
    return x, y
