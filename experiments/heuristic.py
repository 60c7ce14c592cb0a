"""Run rule-based controllers over a population of inner environments and report the outcome.

    python -m experiments.heuristic --task=cifar10 [--data=synthetic] [--envs N]
        [--episode-epochs E] [--seed S] [--controller=heuristic|random|static|all] [--json PATH]

The environment is built as a training run would build it (the ``default`` preset's settings,
with the options given here), and every controller plays the same envs with the same initial
weights and batches: the held-out envs ``experiments.evaluate`` uses for a run with this seed, so
the numbers are comparable with a trained policy's. Exit codes: 0 done, 2 bad input (one line).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from esper_jax.env.controllers import CONTROLLERS
from esper_jax.env.tasks import TASK_NAMES
from esper_jax.runs import evaluation as ev
from esper_jax.runs.build import build
from esper_jax.runs.config import RunConfigError
from esper_jax.runs.loop import USER_ERRORS
from esper_jax.runs.settings import resolve_config, resolve_settings
from experiments.cli import Parser, positive


def build_parser() -> Parser:
    parser = Parser(prog="python -m experiments.heuristic",
                    description="Run rule-based controllers over a population of growing networks.")
    parser.add_argument("--task", required=True, help=f"one of {', '.join(TASK_NAMES)}")
    parser.add_argument("--host-variant", default=None, help="cifar: baseline|impaired|pointwise; tinystories: base|tiny|pointwise")
    parser.add_argument("--data", default="auto", help="auto (real data from the data dir), synthetic, or a data directory")
    parser.add_argument("--data-dir", default=None, help="where datasets live (default $ESPER_DATA or ./data)")
    parser.add_argument("--tokenizer", default=None, help="tinystories: gpt2 or byte (default gpt2)")
    parser.add_argument("--controller", default="all", help=f"one of {', '.join(CONTROLLERS)} or all")
    parser.add_argument("--envs", type=positive, default=4)
    parser.add_argument("--episode-epochs", type=positive, default=12)
    parser.add_argument("--steps-per-epoch", type=positive, default=20)
    parser.add_argument("--batch-size", type=positive, default=128)
    parser.add_argument("--val-size", type=positive, default=512)
    parser.add_argument("--slots", default=None, help="comma-separated slot ids, e.g. r0c0,r1c0,r2c0")
    parser.add_argument("--seed", type=int, default=0, help="run seed: the envs are its held-out stream")
    parser.add_argument("--json", default=None, help="also write the results as JSON here (and a .md table beside it)")
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
        explicit = {"task": args.task, "host_variant": args.host_variant, "data": args.data, "data_dir": args.data_dir,
                    "tokenizer": args.tokenizer, "envs": args.envs, "episode_epochs": args.episode_epochs,
                    "steps_per_epoch": args.steps_per_epoch, "batch_size": args.batch_size, "val_size": args.val_size,
                    "slots": args.slots, "seed": args.seed,
                    "num_minibatches": 1}  # no learner runs here: its minibatch split must not refuse an env count
        built = build(resolve_config(resolve_settings(explicit)))
    except USER_ERRORS as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    env, config = built.env, built.config
    print(f"task {config.task} ({config.host_variant} host, {env.host_param_count} parameters) on {built.data_label}; "
          f"{args.envs} envs x {args.episode_epochs} epochs x {args.steps_per_epoch} batches of {args.batch_size}")
    evaluator = ev.Evaluator(env, args.envs, names)
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
