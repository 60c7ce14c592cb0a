"""Run a population of inner environments under a rule-based controller and report the outcome.

    python -m experiments.heuristic --task=cifar10 [--data=synthetic] [--envs N]
        [--episode-epochs E] [--seed S] [--controller=heuristic|random|static|all]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from esper_jax.env.controllers import CONTROLLERS, make_controller
from esper_jax.data import SYNTHETIC, DatasetNotFoundError, load_image_dataset, load_token_dataset
from esper_jax.env.environment import MorphogeneticEnv, make_env_config, make_env_data
from esper_jax.lattice.hosts.base import slot_config_for
from esper_jax.lattice.slots import parse_slot_list
from esper_jax.env.tasks import TASK_NAMES, get_task
from experiments.cli import positive


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run rule-based controllers over a population of growing networks.")
    parser.add_argument("--task", required=True, help=f"one of {', '.join(TASK_NAMES)}")
    parser.add_argument("--host-variant", default=None, help="cifar: baseline|impaired|pointwise; tinystories: base|tiny")
    parser.add_argument("--data", default="auto", help="auto (real data from the data dir), synthetic, or a data directory")
    parser.add_argument("--data-dir", default=None, help="where datasets live (default $ESPER_DATA or ./data)")
    parser.add_argument("--tokenizer", default="gpt2", help="tinystories: gpt2 or byte")
    parser.add_argument("--controller", default="all", help=f"one of {', '.join(CONTROLLERS)} or all")
    parser.add_argument("--envs", type=positive, default=4)
    parser.add_argument("--episode-epochs", type=positive, default=12)
    parser.add_argument("--steps-per-epoch", type=positive, default=20)
    parser.add_argument("--batch-size", type=positive, default=128)
    parser.add_argument("--val-size", type=positive, default=512)
    parser.add_argument("--slots", default=None, help="comma-separated slot ids, e.g. r0c0,r1c0,r2c0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    return parser


def load_dataset(task, args):
    if task.kind == "classification":
        kwargs = {"n_train": 10_000, "n_test": max(args.val_size, 1000)} if args.data == SYNTHETIC else {}
        return load_image_dataset(task.name, args.data, data_dir=args.data_dir, seed=args.seed, **kwargs)
    kwargs = {"n_train_tokens": 400_000, "n_val_tokens": 40_000} if args.data == SYNTHETIC else {}
    return load_token_dataset("tinystories", args.data, tokenizer=args.tokenizer, data_dir=args.data_dir, seed=args.seed, **kwargs)


def run_controller(env: MorphogeneticEnv, name: str, data, seed: int, envs: int):
    controller = make_controller(name, env)
    epochs = env.config.episode_epochs

    @jax.jit
    def episode(key):
        reset_key, run_key = jax.random.split(key)
        obs, state = env.population_reset(jax.random.split(reset_key, envs), data)

        def epoch(state, key):
            act_key, step_key = jax.random.split(key)
            action = jax.vmap(controller)(jax.random.split(act_key, envs), state)
            obs, state, reward, done, info = env.population_step(jax.random.split(step_key, envs), state, action, data)
            return state, reward

        state, rewards = jax.lax.scan(epoch, state, jax.random.split(run_key, epochs))
        return state, rewards

    start = time.perf_counter()
    state, rewards = jax.block_until_ready(episode(jax.random.key(seed)))
    seconds = time.perf_counter() - start
    added = np.asarray(jax.vmap(env.lattice.live_param_count)(state.train.lattice))
    blueprints = [b.name for b in env.lattice.blueprints]
    per_blueprint = lambda counts: {b: int(c) for b, c in zip(blueprints, np.asarray(counts).sum(axis=0)) if c}
    return {
        "controller": name,
        "final_val_loss": float(np.mean(state.val_loss)),
        "final_val_loss_per_env": np.asarray(state.val_loss).round(4).tolist(),
        "final_val_accuracy": float(np.mean(state.val_accuracy)) if env.config.task.has_accuracy else None,
        "host_params": env.host_param_count,
        "mean_params_added": float(added.mean()),
        "mean_return": float(np.asarray(rewards).sum(axis=0).mean()),
        "rollbacks": int(np.asarray(state.rollbacks).sum()),
        "germinated": per_blueprint(state.germinated),
        "fossilized": per_blueprint(state.fossilized),
        "pruned": per_blueprint(state.pruned),
        "seconds_including_compile": seconds,
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        task = get_task(args.task, args.host_variant)
        names = CONTROLLERS if args.controller == "all" else (args.controller,)
        for name in names:
            if name not in CONTROLLERS:
                raise ValueError(f"unknown controller {name!r}; choose one of {', '.join(CONTROLLERS)} or all")
        dataset = load_dataset(task, args)
        if task.kind == "language_model":
            task = get_task(task.name, args.host_variant, vocab_size=dataset.vocab_size, block_size=64)
        slots = None
        if args.slots:
            slots = parse_slot_list(args.slots)
            slot_config_for(task.make_host(), slots)  # rejects slots the host lacks, with the valid ones listed
        label = "SYNTHETIC data" if dataset.synthetic else f"real data from {dataset.source}"
        config = make_env_config(task, slots, episode_epochs=args.episode_epochs, steps_per_epoch=args.steps_per_epoch,
                                 batch_size=args.batch_size, val_size=args.val_size, data_label=label)
    except (ValueError, FileNotFoundError, DatasetNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    env = MorphogeneticEnv(config)
    data = make_env_data(config, dataset)
    print(f"task {task.name} ({task.host_variant} host, {env.host_param_count} parameters) on {label}; "
          f"{args.envs} envs x {args.episode_epochs} epochs x {args.steps_per_epoch} batches of {args.batch_size}")
    results = [run_controller(env, name, data, args.seed, args.envs) for name in names]
    header = f"{'controller':<10} {'val loss':>9} {'val acc':>8} {'+params':>9} {'return':>8}  germinated / fossilized / pruned"
    print(header)
    for r in results:
        acc = f"{r['final_val_accuracy']:.3f}" if r["final_val_accuracy"] is not None else "-"
        print(f"{r['controller']:<10} {r['final_val_loss']:9.4f} {acc:>8} {r['mean_params_added']:9.0f} {r['mean_return']:8.3f}  "
              f"{r['germinated']} / {r['fossilized']} / {r['pruned']}")
    if dataset.synthetic:
        print("NOTE: these results are on SYNTHETIC data, not the real dataset.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"task": task.name, "data": label, "synthetic": dataset.synthetic, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
