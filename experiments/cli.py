"""Argument parsing shared by the command-line entry points: the one-line-error parser, and the
run settings every command that builds an environment takes under the same names
(``experiments.ppo``, ``experiments.heuristic``, ``experiments.headroom``)."""

from __future__ import annotations

import argparse
import typing

from esper_jax.data.augment import AUGMENTS
from esper_jax.env.rewards import REWARD_KINDS
from esper_jax.env.tasks import TASK_NAMES
from esper_jax.lattice.optim import LR_SCHEDULES, OPTIMIZERS
from esper_jax.runs import settings as run_settings


class Parser(argparse.ArgumentParser):
    """Bad options end with one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message}\n")


def positive(text: str) -> int:
    """An argparse type: a positive integer, with a one-line error otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_task_and_preset(group, task_note: str = "") -> None:
    """``--task`` and ``--preset`` (a preset gives a whole configuration; explicit options override it)."""
    note = f" {task_note}" if task_note else ""
    group.add_argument("--task", help=f"one of {', '.join(TASK_NAMES)}{note}; images: your own .npz file "
                       "(--data=PATH.npz), tfds:NAME: a dataset tensorflow-datasets has prepared")
    group.add_argument("--preset", help=f"one of {', '.join(run_settings.PRESETS)} (default: "
                       f"{run_settings.DEFAULT_PRESET})")


def add_env_settings(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The task-and-data and environment settings of a run, by their ``experiments.ppo`` names
    (``skip``: options the command defines otherwise). The parser must use
    ``argument_default=argparse.SUPPRESS`` so that only options given reach
    :func:`esper_jax.runs.settings.resolve_settings` (the preset fills in the rest)."""
    d = run_settings.DEFAULTS
    parser = _Skipping(parser, skip)
    g = parser.add_argument_group("task and data")
    g.add_argument("--host-variant", help="image tasks: baseline|impaired|pointwise; tinystories: base|tiny|pointwise")
    g.add_argument("--host", metavar="MODULE:FUNCTION",
                   help="image tasks: grow your own flax.linen network instead of the task's host; FUNCTION takes no "
                        "arguments and returns a FlaxHost or (stem, segments, head) modules, with an injection point "
                        "after each segment (e.g. examples.my_host:make_host, run from the repository root)")
    g.add_argument("--data", help="auto (the real dataset from the data dir), synthetic, or a data directory "
                   "(default auto; the smoke preset uses synthetic); --task=images: the .npz file (x_train, y_train, "
                   "x_test, y_test); --task=tfds:NAME: tfds' data directory (default DATA_DIR/tensorflow_datasets)")
    g.add_argument("--data-dir", help="where datasets live (default $ESPER_DATA or ./data)")
    g.add_argument("--tokenizer", help="tinystories: gpt2 or byte (default gpt2)")
    g.add_argument("--block-size", type=positive, help=f"tinystories: tokens per training window, the host's context "
                   f"length (default {d['block_size']}, the design's; the smoke preset uses 16)")

    g = parser.add_argument_group("environment")
    g.add_argument("--envs", type=positive, help=f"inner environments per learner (default {d['envs']})")
    g.add_argument("--episode-epochs", type=positive, help=f"host epochs per episode (default {d['episode_epochs']})")
    g.add_argument("--steps-per-epoch", type=positive, help=f"batches per epoch (default {d['steps_per_epoch']})")
    g.add_argument("--batch-size", type=positive, help=f"host batch size (default {d['batch_size']})")
    g.add_argument("--val-size", type=positive, help=f"validation examples (default {d['val_size']})")
    g.add_argument("--slots", help="comma-separated slot ids, e.g. r0c0,r1c0 (default: the host's own)")
    g.add_argument("--blueprints", help="comma-separated blueprints the run may grow, e.g. norm,conv_light "
                   "(default: the preset's subset)")
    g.add_argument("--reward", choices=REWARD_KINDS, help="reward kind (default loss)")
    g.add_argument("--image-size", type=positive, help="image tasks: input resolution, a divisor of the images' "
                   "size; the data is downsampled to it (default the images' own, 32 for CIFAR; the proof preset uses 16)")
    g.add_argument("--augment", choices=AUGMENTS,
                   help=f"image tasks: training augmentation, random shifts and mirrors (crop_flip), shifts only (crop: "
                        f"for digits or text, which mirroring changes) or none (default {d['augment']})")
    g.add_argument("--optimizer", choices=OPTIMIZERS,
                   help=f"what host and seeds train with: Esper's SGD (momentum 0.9) or AdamW (default {d['optimizer']}; "
                        "the TinyStories proof preset: adamw)")
    g.add_argument("--host-lr", type=float, help=f"host learning rate (default {d['host_lr']}, Esper's)")
    g.add_argument("--host-lr-schedule", choices=LR_SCHEDULES,
                   help=f"host learning rate over an episode: constant, or cosine decay to 0 (default {d['host_lr_schedule']})")
    g.add_argument("--seed-lr", type=float, help=f"seed learning rate (default {d['seed_lr']}, Esper's)")
    g.add_argument("--max-concurrent-training", type=positive,
                   help="seeds that may be germinated or training at once (default 1, Esper's rule; more lets the "
                        "policy learn coordination from outcomes)")
    g.add_argument("--rent-weight", type=float,
                   help=f"parameter rent per epoch, rent_weight * log1p(added / host parameters) (default {d['rent_weight']}; "
                        "the proof preset: 0.01)")
    g.add_argument("--compute-weight", type=float,
                   help="the reward's price of compute: compute_weight x (an epoch's FLOPs beyond the host's) / (the "
                        "host's episode FLOPs), per epoch (default 0: compute is free; loss and contribution rewards)")
    g.add_argument("--train-fraction",
                   help="problem family: each env trains on a fraction of the training set drawn log-uniformly from "
                        "LOW:HIGH, e.g. 0.05:1 (default 1: the whole set)")
    g.add_argument("--label-noise",
                   help="problem family: each env replaces a fraction of its training labels (tokens), drawn uniformly "
                        "from LOW:HIGH, e.g. 0:0.3, by random ones, fixed per example (default 0)")
    g.add_argument("--min-prune-age", type=positive,
                   help="epochs a seed lives before it may be pruned (default 1; the proof preset: 4, so a seed is "
                        "blended in before it is judged)")
    g.add_argument("--auto-advance", action=argparse.BooleanOptionalAction,
                   help="gates G1-G3 pass by themselves at the end of an epoch (default off; the proof preset: on)")
    g.add_argument("--seal", action=argparse.BooleanOptionalAction,
                   help="the op head gets SEAL: no more germinations this episode, one action instead of waiting at "
                        "every epoch (the seeds already planted go on; default off, the six ops of earlier runs)")
    g.add_argument("--min-training-epochs", type=positive,
                   help=f"G2: epochs a seed trains before it may blend (Esper: 10; default {d['min_training_epochs']}, "
                        "so that a seed can be fossilized within an episode)")



class _Skipping:
    """A parser (or argument group) whose ``add_argument_group(...).add_argument`` ignores the
    options named in ``skip``."""

    def __init__(self, target, skip: tuple[str, ...]):
        self._target, self._skip = target, skip

    def add_argument_group(self, *args, **kwargs):
        return _Skipping(self._target.add_argument_group(*args, **kwargs), self._skip)

    def add_argument(self, *flags, **kwargs):
        if not any(flag in self._skip for flag in flags):
            self._target.add_argument(*flags, **kwargs)


def given_settings(args: argparse.Namespace, own: tuple[str, ...]) -> dict:
    """The run settings given on the command line (a parser with ``argument_default=SUPPRESS``
    keeps only what was given), less the command's ``own`` options."""
    return {k: v for k, v in vars(args).items() if k not in own}
