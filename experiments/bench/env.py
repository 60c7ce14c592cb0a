"""Benchmark section ``env``: inner-environment throughput on the baseline CNN cifar10 task
with SYNTHETIC data.

For each population size N: the jitted ``env.population_step`` vs N calls of the jitted
single ``env.step`` (a loop, as a population would run without vmap), with every slot DORMANT
and with one live conv_light seed in TRAINING per environment (slot i mod 3). Reports env
steps/s, host-training images/s, the first-call compile time (lower + compile) of each
program, and XLA's memory account of each compiled program (peak bytes vs N).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.host import LIVE_BLUEPRINT
from experiments.bench.timing import Timer, compile_timed, memory_of, stack, unstack

SCENARIOS = ("dormant", "live")


def bench_env(args) -> dict:
    from esper_jax.env.actions import FactoredAction, Op
    from esper_jax.data import load_image_dataset
    from esper_jax.env.environment import MorphogeneticEnv, make_env_config, make_env_data
    from esper_jax.env.tasks import get_task
    from esper_jax.lattice.strategy import Execution, PopulationStrategy

    task = get_task("cifar10")
    strategy = None if args.env_execution is None else PopulationStrategy(Execution(args.env_execution))
    config = make_env_config(task, blueprints=args.blueprints, strategy=strategy, episode_epochs=10_000,
                             steps_per_epoch=args.env_steps_per_epoch,
                             batch_size=args.env_batch, val_size=args.env_val_size, data_label="SYNTHETIC data")
    env = MorphogeneticEnv(config)
    dataset = load_image_dataset("cifar10", "synthetic", n_train=4096, n_test=args.env_val_size)
    data = make_env_data(config, dataset)
    num_slots = env.lattice.slots.num_slots
    names = [b.name for b in env.lattice.blueprints]
    live_name = LIVE_BLUEPRINT if LIVE_BLUEPRINT in names else next(n for n in names if n != "noop")
    live_blueprint = env.lattice.blueprint_index(live_name)
    print(f"env: baseline CNN cifar10 ({env.host_param_count} host parameters, slots {', '.join(env.lattice.slots.slot_ids)}, "
          f"{env.lattice.num_blueprints} blueprints) on SYNTHETIC data; {config.steps_per_epoch} batches of "
          f"{config.batch_size} per env step, validation {config.val_size} images (1 pass, plus one per slot with a "
          f"blended seed)", flush=True)

    def stacked(action: FactoredAction, n: int) -> FactoredAction:
        return jax.tree.map(lambda a: jnp.full((n,), a), action)

    single, population = jax.jit(env.step), jax.jit(env.population_step)
    wait1 = FactoredAction.wait()
    results: dict = {"data": "SYNTHETIC data", "task": "cifar10", "host_variant": task.host_variant,
                     "host_params": env.host_param_count, "slots": list(env.lattice.slots.slot_ids), "blueprints": names,
                     "steps_per_epoch": config.steps_per_epoch, "batch_size": config.batch_size,
                     "val_size": config.val_size, "scenarios": list(args.env_scenarios), "live_blueprint": live_name,
                     "rounds": args.env_rounds, "execution": env.model.strategy.execution.value, "compile_seconds": {},
                     "memory_bytes": {}, "sizes": {}}

    # States: population reset for the largest N; smaller populations and the loop's single
    # environments are its leading members, so every candidate steps the very same states.
    results["load_average_at_start"] = os.getloadavg()  # the machine may be shared: record how busy it was
    largest = max(args.env_sizes)
    reset_keys = jax.random.split(jax.random.key(0), largest)
    _, fresh = jax.jit(env.population_reset)(reset_keys, data)
    fresh_members = unstack(fresh, largest)

    # Every program first: the single step and a population step per N.
    step_key = jax.random.key(1)
    jobs = {"env.step N=1": (single, step_key, fresh_members[0], wait1, data)}
    for n in sorted(args.env_sizes):
        if n > 1:
            jobs[f"env.population_step N={n}"] = (population, jnp.stack([jax.random.key(1000 + i) for i in range(n)]),
                                                  stack(fresh_members[:n]), stacked(wait1, n), data)
    compiled_programs = {}
    for name, job in jobs.items():
        compiled, seconds = compiled_programs[name] = compile_timed(*job)
        results["compile_seconds"][name] = seconds
        results["memory_bytes"][name.rsplit("=", 1)[1]] = memory_of(compiled)
        print(f"  compile {name}: lower {seconds['lower']:.1f} s + compile {seconds['compile']:.1f} s "
              f"({seconds['cpu_total']:.1f} s CPU)", flush=True)
    single_compiled = compiled_programs["env.step N=1"][0]

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
        entry = {}
        if n > 1:
            states = {name: stack(ms[:n]) for name, ms in members.items()}
            compiled = compiled_programs[f"env.population_step N={n}"][0]
        for name in args.env_scenarios:
            loop_states = members[name][:n]

            def loop(states=loop_states, keys=key_list):
                return [single_compiled(k, s, wait1, data) for k, s in zip(keys, states)]

            timer.add(f"N={n} {name}: loop", loop, compiled=True)
            if n > 1:
                timer.add(f"N={n} {name}: population", lambda c=compiled, s=states[name], k=keys, w=wait: c(k, s, w, data),
                          compiled=True)
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
    results["population_scaling"] = {
        name: {str(n): results["sizes"][str(n)][name]["population" if n > 1 else "loop"]["env_steps_per_second"]
               for n in sorted(args.env_sizes)}
        for name in args.env_scenarios}
    if "8" in results["sizes"]:
        results["vmap_over_loop_n8"] = {name: results["sizes"]["8"][name]["population_over_loop_time_per_env"]
                                        for name in args.env_scenarios}
    results["memory_growth"] = _memory_growth(results["memory_bytes"])
    return results


def _memory_growth(memory: dict) -> dict | None:
    """Peak bytes per environment for each N, and the exponent of a power-law fit of peak bytes
    against N (1 means linear; quadratic growth would show as 2)."""
    sizes = sorted(int(n) for n, m in memory.items() if m)
    if len(sizes) < 2:
        return None
    peaks = [memory[str(n)]["peak"] for n in sizes]
    temps = [memory[str(n)]["temp_size"] for n in sizes]
    exponent = float(np.polyfit(np.log(sizes), np.log(peaks), 1)[0])
    return {"sizes": sizes, "peak_bytes": peaks, "temp_bytes": temps,
            "peak_bytes_per_env": [p / n for p, n in zip(peaks, sizes)], "peak_vs_n_exponent": exponent}


def print_env_table(result: dict):
    print(f"\n## env ({result['data']}; {result['steps_per_epoch']} x {result['batch_size']} training images and "
          f"{result['val_size']} validation images per env step; {len(result['blueprints'])} blueprints, "
          f"members {result.get('execution', '?')})")
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
        print(f"    {name:<36} {seconds['lower']:6.1f} + {seconds['compile']:6.1f} = {seconds['total']:6.1f} s wall, "
              f"{seconds['cpu_total']:6.1f} s CPU")
    print("  XLA memory account per compiled step (MiB):")
    for n, m in result["memory_bytes"].items():
        if m:
            print(f"    N={n:<4} peak {m['peak'] / 2**20:9.1f}  temporaries {m['temp_size'] / 2**20:9.1f}  "
                  f"per env {m['peak'] / 2**20 / int(n):8.1f}")
    growth = result.get("memory_growth")
    if growth:
        print(f"    peak bytes ~ N^{growth['peak_vs_n_exponent']:.2f}")
