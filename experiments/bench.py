"""Benchmarks: ``python -m experiments.bench [--quick] [--json PATH] [--only conv,lattice,population]``.

Every figure that matters is a ratio of timings taken in this one process, in interleaved
rounds (machines are noisy). Prints a table and writes JSON.

Sections:
* ``conv``: the convolution formulation (``esper_jax.ops``): lax vs im2col for one host
  training step and for a vmapped population of 8 host steps.
* ``lattice``: one training step of the baseline CNN host (3 slots, batch 128) alone, with all
  slots DORMANT, and with one live conv_light seed in TRAINING.
* ``population``: a population of 8 members in one step vs a loop of 8 jitted single steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp

from esper_jax import ops
from esper_jax.hosts import CNNHost
from esper_jax.lifecycle import Stage
from esper_jax.model import MorphogeneticModel
from esper_jax.training import make_host_train_step, make_train_step

SECTIONS = ("conv", "lattice", "population")


def _stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


class Timer:
    """Times several candidates in interleaved rounds; reports the median seconds per call."""

    def __init__(self, rounds: int, calls: int):
        self.rounds, self.calls = rounds, calls
        self.candidates: dict[str, Callable[[], object]] = {}
        self.compile_seconds: dict[str, float] = {}

    def add(self, name: str, run: Callable[[], object]):
        start = time.perf_counter()
        jax.block_until_ready(run())  # first call: compile
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


def _batch(batch: int, members: int | None = None):
    shape = (batch, 32, 32, 3) if members is None else (members, batch, 32, 32, 3)
    x = jax.random.normal(jax.random.key(1), shape)
    y = (jnp.arange(batch) % 10) if members is None else jnp.tile(jnp.arange(batch) % 10, (members, 1))
    return x, y


def _with_live_seed(model: MorphogeneticModel, state, slot: int, blueprint: str, key):
    lattice, applied = model.lattice.germinate(state.lattice, slot, model.lattice.blueprint_index(blueprint), 0, 0, key)
    assert bool(applied)
    status = lattice.status.replace(stage=lattice.status.stage.at[slot].set(Stage.TRAINING))
    return state.replace(lattice=lattice.replace(status=status))


def bench_conv(args) -> dict:
    host = CNNHost.baseline()
    x, y = _batch(args.batch)
    xs, ys = _batch(args.batch, 8)
    results = {}
    timer = Timer(args.rounds, args.calls)
    previous = os.environ.get("ESPER_CONV_IMPL")
    try:
        for impl in ops.CONV_IMPLS:
            os.environ["ESPER_CONV_IMPL"] = impl  # read at trace time
            init, step = make_host_train_step(host)
            params, opt = init(jax.random.key(0))
            single = jax.jit(step)
            members = _stack([init(jax.random.key(i)) for i in range(8)])
            population = jax.jit(jax.vmap(step))
            timer.add(f"{impl}: one member", lambda s=single, p=params, o=opt: s(p, o, x, y))
            timer.add(f"{impl}: vmap 8 (per member)", lambda s=population, m=members: s(m[0], m[1], xs, ys))
    finally:
        if previous is None:
            os.environ.pop("ESPER_CONV_IMPL", None)
        else:
            os.environ["ESPER_CONV_IMPL"] = previous
    times = timer.run()
    for impl in ops.CONV_IMPLS:
        times[f"{impl}: vmap 8 (per member)"] /= 8
    results["seconds"] = times
    results["compile_seconds"] = timer.compile_seconds
    results["im2col_over_lax_single"] = times["im2col: one member"] / times["lax: one member"]
    results["im2col_over_lax_vmap8"] = times["im2col: vmap 8 (per member)"] / times["lax: vmap 8 (per member)"]
    results["chosen"] = ops.DEFAULT_CONV_IMPL
    return results


def bench_lattice(args) -> dict:
    model = MorphogeneticModel.build(CNNHost.baseline())
    train = make_train_step(model)
    x, y = _batch(args.batch)
    host_init, host_step = make_host_train_step(model.host)
    params, opt = host_init(jax.random.key(0))
    dormant = train.init(jax.random.key(0))
    live = _with_live_seed(model, dormant, 1, "conv_light", jax.random.key(7))
    host_step, step = jax.jit(host_step), jax.jit(train.step)
    timer = Timer(args.rounds, args.calls)
    timer.add("plain host", lambda: host_step(params, opt, x, y))
    timer.add("all slots dormant", lambda: step(dormant, x, y))
    timer.add("one live conv_light seed", lambda: step(live, x, y))
    times = timer.run()
    return {
        "seconds": times,
        "compile_seconds": timer.compile_seconds,
        "dormant_overhead": times["all slots dormant"] / times["plain host"],
        "live_seed_over_plain_host": times["one live conv_light seed"] / times["plain host"],
    }


def bench_population(args) -> dict:
    model = MorphogeneticModel.build(CNNHost.baseline())
    train = make_train_step(model)
    n = 8
    xs, ys = _batch(args.batch, n)
    step, population_step = jax.jit(train.step), jax.jit(train.population_step)
    results, timer = {}, Timer(args.rounds, max(1, args.calls // 2))
    for label, live in (("dormant", False), ("one live seed each", True)):
        members = [train.init(jax.random.key(i)) for i in range(n)]
        if live:
            members = [_with_live_seed(model, m, i % 3, "conv_light", jax.random.key(100 + i)) for i, m in enumerate(members)]
        stacked = _stack(members)

        def loop(members=members):
            return [step(m, xs[i], ys[i]) for i, m in enumerate(members)]

        timer.add(f"{label}: loop of {n}", loop)
        timer.add(f"{label}: population of {n}", lambda s=stacked: population_step(s, xs, ys))
    times = timer.run()
    results["seconds_per_member"] = {k: v / n for k, v in times.items()}
    results["compile_seconds"] = timer.compile_seconds
    for label in ("dormant", "one live seed each"):
        results[f"vmap_over_loop_n8[{label}]"] = times[f"{label}: population of {n}"] / times[f"{label}: loop of {n}"]
    return results


def _environment() -> dict:
    return {
        "device": str(jax.devices()[0]),
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "conv_impl": ops.conv_impl(),
    }


def _print_table(name: str, result: dict):
    print(f"\n## {name}")
    for key, value in result.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                unit = "s" if "compile" in key else "ms"
                shown = v if unit == "s" else v * 1e3
                print(f"  {key:<22} {sub:<36} {shown:10.2f} {unit}")
        elif isinstance(value, float):
            print(f"  {key:<59} {value:10.3f}")
        else:
            print(f"  {key:<59} {value!s:>10}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    parser.add_argument("--json", default="benchmarks/results/bench.json", help="where to write the JSON results")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.batch <= 0:
        print("error: --batch must be positive", file=sys.stderr)
        return 2
    args.rounds, args.calls = (3, 2) if args.quick else (7, 4)
    output = {"environment": _environment(), "batch": args.batch, "quick": args.quick}
    for section in sections:
        output[section] = globals()[f"bench_{section}"](args)
        _print_table(section, output[section])
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(output, f, indent=2)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
