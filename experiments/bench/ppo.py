"""Benchmark section ``ppo``: end-to-end PPO (rollout + update) environment steps per second and
the first-call compile time of one PPO update, for the run presets of :mod:`esper_jax.runs.run`.

One "update" is one call of the learner's ``train_chunk`` with one update per chunk: a rollout
of ``rollout_steps`` steps of every env, GAE, and the minibatch epochs. Env steps per second
count the environment steps of the rollout (``rollout_steps x num_envs``) per wall second of
the whole update, learning included.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from esper_jax.rl import ppo as ppo_lib
from esper_jax.runs import settings as run_settings
from esper_jax.runs.build import build
from esper_jax.data import SYNTHETIC
from experiments.bench.timing import Timer, compile_timed


def _built(preset: str, task: str):
    # Synthetic data for every preset (labelled in the results): throughput depends on shapes, not
    # values, and a benchmark must not need the real dataset on disk.
    settings = run_settings.resolve_settings({"task": task, "checkpoint_every": 1, "data": SYNTHETIC}, preset)
    return build(run_settings.resolve_config(settings))


def bench_preset(preset: str, task: str, rounds: int, calls: int) -> dict:
    built = _built(preset, task)
    trainer = built.trainer
    hyper = ppo_lib.Hyperparams.default(built.ppo_config)
    runner = jax.jit(trainer.init)(jax.random.key(0), hyper, built.env_data)
    jax.block_until_ready(runner)
    chunk, seconds = compile_timed(jax.jit(trainer.train_chunk), runner, built.env_data)
    learner = "plans" if built.ppo_config.plans else "per-epoch"  # the default preset's decides once per episode
    print(f"  compile one PPO update ({preset} preset, {learner} learner): lower {seconds['lower']:.1f} s + compile "
          f"{seconds['compile']:.1f} s ({seconds['cpu_total']:.1f} s CPU)", flush=True)
    state = {"runner": runner}

    def one_update():
        state["runner"], metrics = chunk(state["runner"], built.env_data)
        return metrics

    timer = Timer(rounds, calls)
    timer.add("update", one_update)  # a first call outside the timing (allocations, caches)
    per_update = timer.run()["update"]
    env_steps = trainer.rollout_steps * built.ppo_config.num_envs
    env = built.config.env
    return {
        "preset": preset, "task": task, "data": built.data_label, "learner": learner,
        "num_envs": built.ppo_config.num_envs, "rollout_steps": trainer.rollout_steps,
        "steps_per_epoch": env.steps_per_epoch, "batch_size": env.batch_size, "val_size": env.val_size,
        "blueprints": [b.name for b in built.env.lattice.blueprints],
        "compile_seconds": seconds,
        "seconds_per_update": per_update,
        "env_steps_per_update": env_steps,
        "env_steps_per_second": env_steps / per_update,
        # host training images per wall second of the whole update (rollout and learning)
        "train_images_per_second": env_steps * env.steps_per_epoch * env.batch_size / per_update,
    }


def bench_ppo(args) -> dict:
    start = time.perf_counter()
    out = {"presets": {}}
    for preset in args.ppo_presets:
        print(f"ppo: {preset} preset on cifar10", flush=True)
        # The bigger presets take many seconds per update: two rounds of one update are plenty.
        rounds, calls = (args.rounds, args.calls) if preset == "smoke" else (min(args.rounds, 2), 1)
        out["presets"][preset] = bench_preset(preset, "cifar10", rounds, calls)
    out["seconds"] = time.perf_counter() - start
    return out


def print_ppo_table(result: dict):
    print("\n## ppo (end to end: rollout + GAE + minibatch epochs; one update per call)")
    print(f"  {'preset':<8} {'envs':>4} {'steps':>5} {'data':<15} {'compile s':>9} {'s/update':>9} {'env steps/s':>12}"
          f" {'train img/s':>12}")
    for name, r in result["presets"].items():
        print(f"  {name:<8} {r['num_envs']:>4} {r['rollout_steps']:>5} {r['data']:<15} {r['compile_seconds']['total']:9.1f} "
              f"{r['seconds_per_update']:9.3f} {r['env_steps_per_second']:12.2f} {r['train_images_per_second']:12.0f}")
