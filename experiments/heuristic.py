"""Run rule-based controllers over a population of inner environments and report the outcome.

    python -m experiments.heuristic --task=cifar10 [--preset=smoke|default|proof|full] [--seed S]
        [--controller=heuristic|random|static|all] [--json PATH] [any experiments.ppo setting: --envs N,
        --episode-epochs E, --data synthetic, --slots ..., --host-lr ...]

The environment is built as a training run would build it, by the same settings under the same
names as ``experiments.ppo`` (a preset gives them all, explicit options override it), and every
controller plays the same envs with the same initial weights and batches: the held-out envs
``experiments.evaluate`` uses for a run with this seed, so the numbers are comparable with a
trained policy's. ``--envs`` is how many. Exit codes: 0 done, 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from esper_jax.env.controllers import CONTROLLERS
from esper_jax.runs import evaluation as ev
from esper_jax.runs.build import build
from esper_jax.runs.config import RunConfigError
from esper_jax.runs.loop import USER_ERRORS
from esper_jax.runs.settings import resolve_config, resolve_settings, without_learner
from experiments.cli import Parser, add_env_settings, add_task_and_preset, given_settings

OWN_OPTIONS = ("controller", "json")


def build_parser() -> Parser:
    parser = Parser(prog="python -m experiments.heuristic",
                    description="Run rule-based controllers over a population of growing networks, configured like "
                                "experiments.ppo (a preset, then explicit options).",
                    argument_default=argparse.SUPPRESS)
    g = parser.add_argument_group("run")
    add_task_and_preset(g, "(required)")
    g.add_argument("--seed", type=int, help="run seed: the envs are its held-out stream (default 0)")
    g.add_argument("--controller", default="all", help=f"one of {', '.join(CONTROLLERS)} or all")
    g.add_argument("--json", default=None, help="also write the results as JSON here (and a .md table beside it)")
    add_env_settings(parser)
    return parser


def parse_controllers(text: str) -> tuple[str, ...]:
    names = CONTROLLERS if text == "all" else tuple(n.strip() for n in text.split(","))
    for name in names:
        if name not in CONTROLLERS:
            raise RunConfigError(f"--controller: unknown controller {name!r}; choose from {', '.join(CONTROLLERS)} or all")
    return names


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        names = parse_controllers(args.controller)
        json_path = Path(args.json) if args.json else None
        if json_path is not None and not json_path.parent.is_dir():  # before the run, not after it
            raise RunConfigError(f"--json {json_path}: directory {json_path.parent} does not exist")
        explicit = given_settings(args, OWN_OPTIONS)
        if "task" not in explicit:
            raise RunConfigError("--task is required, e.g. --task=cifar10 (add --preset=proof for the proof problem)")
        preset = explicit.pop("preset", None)
        built = build(resolve_config(resolve_settings(without_learner(explicit), preset)))
    except USER_ERRORS as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    env, config = built.env, built.config
    envs, cfg = config.ppo.num_envs, env.config
    print(f"task {config.task} ({config.host_variant} host, {env.host_param_count} parameters; preset "
          f"{config.preset}) on {built.data_label}; {envs} envs x {cfg.episode_epochs} epochs x {cfg.steps_per_epoch} "
          f"batches of {cfg.batch_size}")
    evaluator = ev.Evaluator(env, envs, names)
    key = ev.held_out_key(config.seed)
    started = time.perf_counter()
    results = {}
    for name in names:
        results[name] = evaluator.run(name, built.env_data, key)
        print(f"  {name}: final val loss {np.mean(results[name].final_val_loss):.4f}", flush=True)
    payload = ev.evaluation_payload(env, results, run_seed=config.seed, task=config.task, data_label=built.data_label,
                                    synthetic=built.synthetic)
    payload["wall_seconds"] = time.perf_counter() - started
    table = ev.markdown_table(payload)
    print(table)
    if json_path is not None:
        ev.write_json_and_markdown(json_path, payload, table)
        print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
