"""Benchmarks: ``python -m experiments.bench [--quick] [--json PATH] [--only conv,lattice,population,env]``.

Every figure that matters is a ratio of timings taken in this one process, in interleaved
rounds (machines are noisy). Prints a table and writes JSON.

Sections:
* ``conv``: the convolution formulation (``esper_jax.ops``): lax vs im2col for one host
  training step and for a vmapped population of 8 host steps.
* ``lattice``: one training step of the baseline CNN host (3 slots, batch 128) alone, with all
  slots DORMANT, and with one live conv_light seed in TRAINING.
* ``population``: a population of 8 members in one step vs a loop of 8 jitted single steps.
* ``env``: inner-environment throughput on the baseline CNN cifar10 task with SYNTHETIC data:
  for N environments, the jitted ``env.population_step`` vs N calls of the jitted single
  ``env.step``, with every slot DORMANT and with one live conv_light seed in TRAINING per
  environment (slot i mod 3); env steps/s and host-training images/s; and the first-call
  compile time (lower + compile) of the env step. Run it alone with
  ``python -m experiments.bench --only env --json benchmarks/results/env_cpu.json``.
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
import numpy as np

from esper_jax import ops
from esper_jax.blueprints import blueprint_index
from esper_jax.hosts import CNNHost
from esper_jax.lifecycle import Stage
from esper_jax.model import MorphogeneticModel
from esper_jax.training import make_host_train_step, make_train_step

SECTIONS = ("conv", "lattice", "population", "env")
ENV_SCENARIOS = ("dormant", "live")


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


def _compile(fn, *args) -> tuple[Callable, dict]:
    """Lower and compile ``fn`` for ``args``: the compiled callable, the wall seconds each took,
    and this process's CPU seconds (on a shared, busy machine wall time overstates what an idle
    one would take; XLA:CPU compiles mostly on one thread, so there CPU ~ wall)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done, cpu_done = time.perf_counter(), time.process_time()
    return compiled, {"lower": lowered_at - start, "compile": done - lowered_at, "total": done - start,
                      "cpu_total": cpu_done - cpu_start}


def _members(tree, n: int) -> list:
    """The members of a population pytree as separate device pytrees (NumPy slicing compiles nothing)."""
    host = jax.tree.map(np.asarray, tree)
    return [jax.tree.map(lambda a, i=i: jax.device_put(a[i]), host) for i in range(n)]


def bench_env(args) -> dict:
    from esper_jax.actions import FactoredAction, Op
    from esper_jax.data import load_image_dataset
    from esper_jax.env import MorphogeneticEnv, make_env_config, make_env_data
    from esper_jax.tasks import get_task

    task = get_task("cifar10")
    config = make_env_config(task, blueprints=args.env_blueprints, seed_dispatch=args.env_seed_dispatch, episode_epochs=10_000,
                             steps_per_epoch=args.env_steps_per_epoch,
                             batch_size=args.env_batch, val_size=args.env_val_size, data_label="SYNTHETIC data")
    env = MorphogeneticEnv(config)
    dataset = load_image_dataset("cifar10", "synthetic", n_train=4096, n_test=args.env_val_size)
    data = make_env_data(config, dataset)
    num_slots = env.lattice.slots.num_slots
    names = [b.name for b in env.lattice.blueprints]
    live_name = "conv_light" if "conv_light" in names else next(n for n in names if n != "noop")
    live_blueprint = env.lattice.blueprint_index(live_name)
    print(f"env: baseline CNN cifar10 ({env.host_param_count} host parameters, slots {', '.join(env.lattice.slots.slot_ids)}, "
          f"{env.lattice.num_blueprints} blueprints) on SYNTHETIC data; {config.steps_per_epoch} batches of "
          f"{config.batch_size} per env step, validation {config.val_size} images x {num_slots + 1} passes", flush=True)

    def stacked(action: FactoredAction, n: int) -> FactoredAction:
        return jax.tree.map(lambda a: jnp.full((n,), a), action)

    single, population = jax.jit(env.step), jax.jit(env.population_step)
    wait1 = FactoredAction.wait()
    results: dict = {"data": "SYNTHETIC data", "task": "cifar10", "host_variant": task.host_variant,
                     "host_params": env.host_param_count, "slots": list(env.lattice.slots.slot_ids),
                     "blueprints": [b.name for b in env.lattice.blueprints],
                     "steps_per_epoch": config.steps_per_epoch, "batch_size": config.batch_size,
                     "val_size": config.val_size, "scenarios": list(args.env_scenarios), "live_blueprint": live_name,
                     "rounds": args.env_rounds, "seed_dispatch": env.model.seed_dispatch, "compile_seconds": {},
                     "sizes": {}}

    # States: population reset for the largest N; smaller populations and the loop's single
    # environments are its leading members, so every candidate steps the very same states.
    results["load_average_at_start"] = os.getloadavg()  # the machine may be shared: record how busy it was
    largest = max(args.env_sizes)
    reset_keys = jax.random.split(jax.random.key(0), largest)
    start = time.perf_counter()
    _, fresh = jax.jit(env.population_reset)(reset_keys, data)
    jax.block_until_ready(fresh)
    results["compile_seconds"][f"population_reset N={largest} (first call)"] = time.perf_counter() - start
    fresh_members = _members(fresh, largest)

    step_key = jax.random.key(1)
    single_compiled, seconds = _compile(single, step_key, fresh_members[0], wait1, data)
    results["compile_seconds"]["env.step N=1"] = seconds
    print(f"  compile env.step (N=1): lower {seconds['lower']:.1f} s + compile {seconds['compile']:.1f} s "
          f"({seconds['cpu_total']:.1f} s CPU)", flush=True)

    def live_member(state, i: int):
        """Germinate the live blueprint at slot i mod S, then advance it to TRAINING (single steps)."""
        slot = i % num_slots
        g = FactoredAction.make(Op.GERMINATE, slot=slot, blueprint=live_blueprint)
        _, state, _, _, info = single_compiled(jax.random.key(100 + i), state, g, data)
        _, state, _, _, info2 = single_compiled(jax.random.key(200 + i), state, FactoredAction.make(Op.ADVANCE, slot=slot), data)
        assert bool(info["applied"]) and bool(info2["applied"]), "could not set up the live seed"
        return jax.tree.map(lambda a: jax.device_put(np.asarray(a)), state)  # strong types, as compiled

    members = {"dormant": fresh_members}
    if "live" in args.env_scenarios:
        members["live"] = [live_member(m, i) for i, m in enumerate(fresh_members)]

    timer = Timer(args.env_rounds, 1)
    for n in sorted(args.env_sizes):
        key_list = [jax.random.key(1000 + i) for i in range(n)]
        keys = jnp.stack(key_list)
        wait = stacked(wait1, n)
        entry = {"compile_seconds": None}
        if n > 1:
            states = {name: _stack(ms[:n]) for name, ms in members.items()}
            compiled, seconds = _compile(population, keys, states["dormant"], wait, data)
            results["compile_seconds"][f"env.population_step N={n}"] = seconds
            entry["compile_seconds"] = seconds
            print(f"  compile env.population_step (N={n}): lower {seconds['lower']:.1f} s + compile "
                  f"{seconds['compile']:.1f} s ({seconds['cpu_total']:.1f} s CPU)", flush=True)
        for name in args.env_scenarios:
            loop_states = members[name][:n]

            def loop(states=loop_states, keys=key_list):
                return [single_compiled(k, s, wait1, data) for k, s in zip(keys, states)]

            timer.add(f"N={n} {name}: loop", loop)
            if n > 1:
                timer.add(f"N={n} {name}: population", lambda c=compiled, s=states[name], k=keys, w=wait: c(k, s, w, data))
        results["sizes"][str(n)] = entry
    print(f"  timing {len(timer.candidates)} candidates in {args.env_rounds} interleaved rounds", flush=True)
    times = timer.run()
    results["load_average_at_end"] = os.getloadavg()

    images_per_env_step = config.steps_per_epoch * config.batch_size
    for n in sorted(args.env_sizes):
        entry = results["sizes"][str(n)]
        for name in args.env_scenarios:
            row = {}
            # N = 1: the population of one is the single step itself (env.step is population_step
            # with a population axis of one), so it is timed once.
            kinds = ("loop", "population") if n > 1 else ("loop",)
            for kind in kinds:
                seconds = times[f"N={n} {name}: {kind}"]
                row[kind] = {"seconds_per_call": seconds, "seconds_per_env_step": seconds / n,
                             "env_steps_per_second": n / seconds,
                             "train_images_per_second": n * images_per_env_step / seconds}
            if n > 1:
                row["population_over_loop_time_per_env"] = row["population"]["seconds_per_env_step"] / row["loop"]["seconds_per_env_step"]
            entry[name] = row
    n8 = results["sizes"].get("8")
    if n8 is not None:
        results["target_n8_population_at_least_as_fast_per_env"] = {
            name: n8[name]["population_over_loop_time_per_env"] <= 1.0 for name in args.env_scenarios}
    results["target_compile_under_60s"] = {k: v["total"] < 60.0 for k, v in results["compile_seconds"].items() if isinstance(v, dict)}
    return results


def _print_env_table(result: dict):
    print(f"\n## env ({result['data']}; {result['steps_per_epoch']} x {result['batch_size']} training images and "
          f"{result['val_size']} validation images per env step)")
    print(f"  {'N':>3} {'state':<8} {'how':<11} {'s/call':>8} {'env steps/s':>12} {'train img/s':>12} {'pop/loop per env':>17}")
    for n, entry in result["sizes"].items():
        for name in result["scenarios"]:
            row = entry[name]
            for kind in ("loop", "population"):
                if kind not in row:
                    continue
                r = row[kind]
                ratio = f"{row['population_over_loop_time_per_env']:.3f}" if kind == "population" else ""
                print(f"  {n:>3} {name:<8} {kind:<11} {r['seconds_per_call']:8.3f} {r['env_steps_per_second']:12.2f} "
                      f"{r['train_images_per_second']:12.0f} {ratio:>17}")
    print("  first-call compile (lower + compile):")
    for name, seconds in result["compile_seconds"].items():
        if isinstance(seconds, dict):
            print(f"    {name:<36} {seconds['lower']:6.1f} + {seconds['compile']:6.1f} = {seconds['total']:6.1f} s wall, "
                  f"{seconds['cpu_total']:6.1f} s CPU")
        else:
            print(f"    {name:<36} {seconds:6.1f} s (trace + compile + run)")


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
    if name == "env":
        return _print_env_table(result)
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
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Only the environment throughput section: python -m experiments.bench --only env "
               "--json benchmarks/results/env_cpu.json")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    parser.add_argument("--json", default="benchmarks/results/bench.json", help="where to write the JSON results")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of {', '.join(SECTIONS)} (e.g. --only env)")
    parser.add_argument("--batch", type=int, default=128, help="batch size of the conv, lattice and population sections")
    parser.add_argument("--env-sizes", default="1,8,32", help="env section: population sizes N (comma-separated)")
    parser.add_argument("--env-scenarios", default=",".join(ENV_SCENARIOS),
                        help=f"env section: lattice states to time, of {', '.join(ENV_SCENARIOS)}")
    parser.add_argument("--env-steps-per-epoch", type=int, default=4, help="env section: training batches per env step")
    parser.add_argument("--env-batch", type=int, default=64, help="env section: training batch size")
    parser.add_argument("--env-val-size", type=int, default=128, help="env section: validation images")
    parser.add_argument("--env-rounds", type=int, default=3, help="env section: interleaved timing rounds")
    parser.add_argument("--env-blueprints", default="",
                        help="env section: comma-separated blueprint subset (default: every CNN blueprint, as the task has)")
    parser.add_argument("--env-seed-dispatch", default=None, choices=("shared", "per_member"),
                        help="env section: how the population computes its seeds (default: the backend's, "
                             "esper_jax.model.default_seed_dispatch)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    for name in ("batch", "env_steps_per_epoch", "env_batch", "env_val_size", "env_rounds"):
        if getattr(args, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    try:
        args.env_sizes = sorted({int(n) for n in args.env_sizes.split(",") if n.strip()})
    except ValueError:
        args.env_sizes = []
    if not args.env_sizes or min(args.env_sizes) <= 0:
        print("error: --env-sizes must be positive integers, e.g. 1,8,32", file=sys.stderr)
        return 2
    args.env_blueprints = tuple(b.strip() for b in args.env_blueprints.split(",") if b.strip())
    for name in args.env_blueprints:
        try:
            blueprint_index("cnn", name)
        except ValueError as error:
            print(f"error: --env-blueprints: {error}", file=sys.stderr)
            return 2
    args.env_scenarios = tuple(s.strip() for s in args.env_scenarios.split(",") if s.strip())
    bad = [s for s in args.env_scenarios if s not in ENV_SCENARIOS]
    if bad or not args.env_scenarios:
        print(f"error: unknown --env-scenarios {', '.join(bad) or '(none)'}; choose from {', '.join(ENV_SCENARIOS)}",
              file=sys.stderr)
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
