"""Train the seed controller with PPO on device, with Orbax checkpoints and hyperparameter populations.

    python -m experiments.ppo --task=cifar10 [--preset=smoke|default|full] [--data=auto|synthetic|PATH]
    python -m experiments.ppo --task=images --data=PATH.npz | --task=tfds:NAME [--data=DIR] [...]
    python -m experiments.ppo --task=images --data=PATH.npz --host MODULE:FUNCTION [...]
        (your own flax.linen network, e.g. examples.my_host:make_host; see esper_jax.lattice.hosts.flax_host)
        [--envs N] [--updates U] [--population P --lr log:1e-4:1e-3 --ent-coef 0.01,0.05 ...]
        [--run-dir DIR] [--checkpoint-every C] [--keep-checkpoints K]
    python -m experiments.ppo --task=cifar10 --plan-head scorer --mix tinystories=synthetic [...]
        (one policy trained on several tasks' envs; esper_jax.rl.plans)
    python -m experiments.ppo --resume DIR [--updates U]
    python -m experiments.ppo ... --run-dir DIR --coordinator HOST:PORT --num-processes N --process-id I
        (one command per process; see the README's "Several processes")

A preset sets a whole configuration; explicit options override it. Everything is resolved,
written to DIR/config.json and trained by :mod:`esper_jax.runs.loop` (this file only parses flags).
Exit codes: 0 done, 2 bad input (one line on stderr), 3 a learner diverged (its parameters or
losses stopped being finite; the message names the update), 130 interrupted (Ctrl-C; resume with
--resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

from esper_jax.runs import settings as run_settings
from esper_jax.runs.config import RunConfigError, read_config
from esper_jax.runs import distributed
from esper_jax.runs.loop import USER_ERRORS, decided_by_writer, enable_compile_cache, train
from esper_jax.runs.rundir import default_run_dir, fmt, prepare_run_dir
from esper_jax.runs.population import SWEEP_HELP
from esper_jax.rl.ppo import PPOConfig
from experiments.cli import Parser, add_env_settings, add_task_and_preset, positive

DEFAULT_CACHE = os.environ.get("ESPER_JAX_COMPILE_CACHE", str(Path.home() / ".cache" / "esper-jax" / "xla"))

# Help for the learner's settings; flags for PPOConfig fields not listed here are still made,
# from the field's name and type, so every learner setting can be given on the command line.
PPO_HELP = {
    "rollout_steps": "env steps per env per update (0: one whole episode)",
    "update_epochs": "PPO epochs over each rollout",
    "num_minibatches": "minibatches per PPO epoch",
    "gamma": "discount", "gae_lambda": "GAE lambda", "clip_eps": "PPO clip range", "vf_coef": "value loss weight",
    "max_grad_norm": "gradient clipping norm",
    "target_kl": "stop an update's minibatch steps when the KL exceeds 1.5x this ('none': never)",
    "hidden_size": "policy torso width", "recurrent": "none (MLP) | lstm | gru",
    "normalize_obs": "running mean/variance observation normalization",
    "kickstart_coef": "with --imitate: weight of -log pi(the teacher's action) on the policy's own rollouts during "
                      "PPO (kickstarting; default 0, off)",
    "plan_inputs": "with --plans: what the plan policy sees, the whole first observation or only its features of "
                   "the drawn problem (the training set's size), known before anything trains",
    "plan_head": "with --plans: fixed (one logit per plan of the menu) or scorer (one network scores each plan from "
                 "what it grows, where, when and at what cost relative to the host: its parameters act on any "
                 "menu and host)",
    "group_size": "envs per problem group: G envs share each drawn problem, host initialization and batches, and "
                  "each one learns from its reward minus the mean of the others' in its group (leave-one-out "
                  "baseline; default 1, off)",
}


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def optional_float(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _field_type(field: dataclasses.Field):
    hint = typing.get_type_hints(PPOConfig)[field.name]
    args = set(typing.get_args(hint))
    if hint is bool:
        return "bool"
    if hint is int:
        return non_negative
    if hint is float:
        return float
    if hint is str or typing.get_origin(hint) is typing.Literal:
        return str
    if args == {float, type(None)} or (isinstance(hint, types.UnionType) and args == {float, type(None)}):
        return optional_float
    return None  # not settable from the command line (no such field today)


def build_parser() -> argparse.ArgumentParser:
    d = run_settings.DEFAULTS
    parser = Parser(
        prog="python -m experiments.ppo",
        description="Train the seed controller with PPO: a preset gives a whole configuration, explicit options "
                    "override it. Presets: " + "; ".join(f"{n}: {p.description}" for n, p in run_settings.PRESETS.items()),
        argument_default=argparse.SUPPRESS,  # only options given explicitly reach the run settings
    )
    g = parser.add_argument_group("run")
    add_task_and_preset(g, "(required unless --resume)")
    g.add_argument("--run-dir", help="where the run is written (default: runs/TASK-PRESET-TIME); must be empty")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest complete checkpoint; "
                   "other options must match the run's, except --updates, --keep-checkpoints, --data-dir")
    g.add_argument("--updates", type=positive, help=f"PPO updates in all (default {d['updates']})")
    g.add_argument("--checkpoint-every", type=positive, help="updates per jitted chunk; a checkpoint after each "
                   f"(default {d['checkpoint_every']})")
    g.add_argument("--keep-checkpoints", type=positive, help=f"newest checkpoints kept (default {d['keep_checkpoints']})")
    g.add_argument("--seed", type=int, help=f"run seed: member i uses SEED+i unless --seeds (default {d['seed']})")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (a log line per chunk instead)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the per-update metrics as TensorBoard scalars in DIR/tensorboard (needs the "
                        "tensorboard extra; view with: tensorboard --logdir DIR/tensorboard)")
    g.add_argument("--compile-cache", default=DEFAULT_CACHE,
                   help="directory of JAX's persistent compilation cache, or 'off' "
                   f"(default $ESPER_JAX_COMPILE_CACHE or {DEFAULT_CACHE})")

    g = parser.add_argument_group("several processes (JAX's multi-process runtime; one command per process)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's host and a free port there, the same on every process; 'auto': the cluster JAX "
                        f"detects (SLURM, Open MPI, Kubernetes) (default ${distributed.ENV_COORDINATOR}; none: one process)")
    g.add_argument("--num-processes", type=positive,
                   help=f"processes in the run, the same on every process (default ${distributed.ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=non_negative,
                   help=f"this process's id, 0..N-1; 0 writes the run directory (default ${distributed.ENV_PROCESS_ID})")
    g.add_argument("--coordinator-timeout", type=positive,
                   help=f"seconds to wait for every process to join before giving up with an error "
                        f"(default {distributed.DEFAULT_TIMEOUT_S})")

    add_env_settings(parser)

    g = parser.add_argument_group("population (one vmapped program of P learners, sharded over the devices)")
    g.add_argument("--population", type=positive,
                   help="learners trained together (default: the longest --lr/--ent-coef/--seeds list, else 1)")
    g.add_argument("--learning-rate", "--lr", dest="learning_rate",
                   help=f"Adam learning rate: {SWEEP_HELP} (default {d['learning_rate']})")
    g.add_argument("--ent-coef", help=f"entropy coefficient: {SWEEP_HELP} (default {d['ent_coef']})")
    g.add_argument("--seeds", help="comma-separated seed per member (default SEED, SEED+1, ...)")

    g = parser.add_argument_group("warm start (behaviour cloning of a teacher before PPO; esper_jax.rl.imitation)")
    g.add_argument("--imitate", metavar="TEACHER",
                   help="fit the policy and value to a teacher's episodes before PPO: a controller (heuristic, "
                        "random, static) or a fixed schedule blueprint@slot@eN[+...] (e.g. conv_heavy@r2c0@e0); "
                        "choose it on calibration envs (experiments.headroom --stream calibration), never on "
                        "held-out ones (default: none, PPO from its initial policy)")
    g.add_argument("--imitation-rounds", type=positive,
                   help=f"teacher rollouts, each as long as one PPO update's (default {d['imitation_rounds']})")
    g.add_argument("--imitation-epochs", type=positive,
                   help=f"minibatch epochs over each round's rollout (default {d['imitation_epochs']})")

    g = parser.add_argument_group("learner (PPO)")
    for field in dataclasses.fields(PPOConfig):
        if field.name in ("num_envs", "learning_rate", "ent_coef"):
            continue
        kind = _field_type(field)
        if kind is None:
            continue
        flags = ["--" + field.name.replace("_", "-")]
        if field.name == "num_minibatches":
            flags.append("--minibatches")
        help_text = f"{PPO_HELP.get(field.name, field.name.replace('_', ' '))} (default {field.default})"
        if kind == "bool":
            g.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(typing.get_type_hints(PPOConfig)[field.name]) is typing.Literal:
            choices = typing.get_args(typing.get_type_hints(PPOConfig)[field.name])
            g.add_argument(*flags, dest=field.name, choices=choices, help=help_text)
        elif field.name in run_settings.POSITIVE_SETTINGS:
            g.add_argument(*flags, dest=field.name, type=positive, help=help_text)
        else:
            g.add_argument(*flags, dest=field.name, type=kind, help=help_text)
    g.add_argument("--plans", metavar="MENU",
                   help="decide once per episode (esper_jax.rl.plans): at each episode's first observation the policy "
                        "picks one plan of MENU, comma-separated fixed schedules and/or static, e.g. "
                        "static,conv_heavy@r2c0@e0,conv_heavy@r2c0@e10, carried out to the episode's end "
                        "(default: the preset's; the default preset's menu holds static and the calibration's best "
                        "schedules of the task's host; none: the per-epoch learner, a decision every epoch)")
    g.add_argument("--mix", metavar="TASK[=DATA],...",
                   help="also train the policy on these tasks' envs in the same updates (one compiled program; e.g. "
                        "--mix tinystories=synthetic), each under the preset with the preset's menu for its host and "
                        "this run's learner settings; the other environment options apply to --task alone. Needs "
                        "--plan-head scorer and --plan-inputs problem (the default preset's inputs)")
    return parser


def explicit_settings(args: argparse.Namespace) -> dict:
    """The run settings given on the command line (argparse keeps only what was given)."""
    skip = {"resume", "run_dir", "no_progress", "compile_cache", "tensorboard", *DISTRIBUTED_OPTIONS}
    return {k: v for k, v in vars(args).items() if k not in skip}


DISTRIBUTED_OPTIONS = ("coordinator", "num_processes", "process_id", "coordinator_timeout")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    explicit = explicit_settings(args)
    try:
        spec = distributed.DistributedSpec.from_options(*(getattr(args, name, None) for name in DISTRIBUTED_OPTIONS))
        if spec.multi_process and "resume" not in args and "run_dir" not in args:
            raise RunConfigError("a run over several processes needs --run-dir DIR, the same directory on every "
                                 "process (a shared file system across hosts)")
        distributed.initialize(spec)  # before anything touches a device
        if "resume" in args:
            run_dir = Path(args.resume)
            if "run_dir" in args and Path(args.run_dir).absolute() != run_dir.absolute():
                raise RunConfigError("--resume DIR continues the run in DIR; do not give another --run-dir")
            decided_by_writer(lambda: prepare_run_dir(run_dir, resume=True))
            config = run_settings.resume_config(read_config(run_dir), explicit)
        else:
            settings = run_settings.resolve_settings(explicit, explicit.pop("preset", None))
            config = run_settings.resolve_config(settings)
            run_dir = Path(args.run_dir) if "run_dir" in args else default_run_dir(config)
            decided_by_writer(lambda: prepare_run_dir(run_dir, resume=False))
        cache = args.compile_cache
        enable_compile_cache(None if cache == "off" else cache)
        result = train(config, run_dir, resume="resume" in args,
                       progress=not getattr(args, "no_progress", False) and sys.stderr.isatty(),
                       tensorboard=getattr(args, "tensorboard", False))
    except USER_ERRORS as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # one line, even for long advice
        return 2
    if distributed.is_writer():  # over several processes, process 0 reports for all
        report(result)
    if result.interrupted:
        return 130
    return 3 if result.diverged else 0


def report(result) -> None:
    """What a finished (or interrupted, or diverged) run prints: its members and where it stands."""
    summary = result.summary
    print(f"run directory: {result.run_dir}")
    for member in summary["members"]:
        final = member["final"] or {}
        print(f"member {member['member']}: lr {member['learning_rate']:.3g} ent {member['ent_coef']:.3g} "
              f"seed {member['seed']}: score {fmt(member['score'])}, final return "
              f"{fmt(final.get('mean_return'))}, final val loss {fmt(final.get('mean_final_val_loss'))}")
    if summary["best_member"] is not None:
        print(f"best member: {summary['best_member']} ({summary['best_by']})")
    if summary["synthetic"]:
        print("NOTE: these results are on SYNTHETIC data, not the real dataset.")
    if result.interrupted:
        print(interrupted_message(result.run_dir, result.checkpoint), file=sys.stderr)
    elif result.diverged:
        print(diverged_message(result.diverged, summary["population"], result.checkpoint), file=sys.stderr)


def diverged_message(diverged: dict[int, int], population: int, checkpoint: int | None) -> str:
    """Which learners diverged at which update, and what is left."""
    which = "; ".join(f"member {m} at update {u}" for m, u in sorted(diverged.items()))
    if len(diverged) < population:
        return (f"error: learner(s) diverged (parameters or losses not finite): {which}; the other members trained "
                f"on and the best member is chosen among them")
    return (f"error: the learner diverged (parameters or losses not finite): {which}; the checkpoint at update "
            f"{checkpoint} is the last finite one; lower --learning-rate or --max-grad-norm and start a new run")


def interrupted_message(run_dir: Path, checkpoint: int | None) -> str:
    """What an interrupted run has kept, and how to go on."""
    if checkpoint is None:
        return f"interrupted before the first checkpoint was saved; delete {run_dir} and start again"
    resume = f"python -m experiments.ppo --resume {run_dir}"
    if checkpoint == 0:  # only the initial state was saved (e.g. interrupted while compiling)
        return f"interrupted before the first update finished; nothing trained was lost; start it with: {resume}"
    return f"interrupted: updates 1..{checkpoint} are saved; resume with: {resume}"


if __name__ == "__main__":
    sys.exit(main())
