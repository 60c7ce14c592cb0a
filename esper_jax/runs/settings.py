"""Run settings and presets, resolved into a :class:`~esper_jax.runs.config.RunConfig`.

A run is described by flat *settings*, the command line's options (:data:`DEFAULTS`): a preset
(:data:`PRESETS`) replaces some of them, explicit options replace the preset's
(:func:`resolve_settings`). :func:`resolve_config` checks them all, without loading data or
compiling anything, and builds the typed configuration (a user's own image dataset, ``images`` or
``tfds:NAME``, gives the host its input size, channels and classes: only its labels and metadata
are read here). ``--host MODULE:FUNCTION`` grows a user's own network instead of the task's host
(:func:`~esper_jax.lattice.hosts.flax_host.import_host`): it is imported and checked against the
data's images and classes by ``jax.eval_shape`` here, before any data is loaded or anything
compiled. :func:`check_resume_settings` compares the options given with ``--resume`` with those
the run was resolved from.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from esper_jax.data import AUTO, IMAGES, SYNTHETIC, describe_image_dataset, is_user_image_dataset, user_image_location
from esper_jax.data.augment import AUGMENTS
from esper_jax.env.controllers import CONTROLLERS, controller_name, parse_controller, parse_plan, plan_names
from esper_jax.env.problems import ProblemFamily
from esper_jax.env.rewards import REWARD_KINDS
from esper_jax.env.tasks import LANGUAGE_MODEL_TASKS, TASK_NAMES, TaskConfig, get_task, host_variants
from esper_jax.lattice import ops
from esper_jax.lattice.blueprints.registry import blueprint_names
from esper_jax.lattice.hosts import FlaxHost, HostImportError, host_forward, import_host
from esper_jax.lattice.hosts.base import slot_config_for
from esper_jax.lattice.optim import LR_SCHEDULES, OPTIMIZERS
from esper_jax.lattice.slots import parse_slot_list, split_slot_list
from esper_jax.rl import ppo as ppo_lib
from esper_jax.runs.config import USER_HOST_VARIANT, DataSpec, EnvSpec, RunConfig, RunConfigError, WarmStart
from esper_jax.runs.population import parse_seeds, parse_sweep, resolve_members

MAX_SEED = 2**32 - 1


_PPO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ppo_lib.PPOConfig)}
# The inner environment's defaults are EnvSpec's (also what a configuration written before a
# setting existed ran at), except G2's below.
_ENV_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EnvSpec) if f.default is not dataclasses.MISSING}

# Flat settings with their defaults. ``None`` means "the task's or host's own" (variant, slots,
# blueprints) or "derived" (population size from the sweeps, seeds from --seed).
DEFAULTS: dict[str, Any] = {
    "task": None,
    "host_variant": None,
    "data": "auto",
    "data_dir": None,
    "tokenizer": "gpt2",
    # Language-model tasks: tokens per training window; the TinyStories design's context of 256.
    "block_size": 256,
    "synthetic_train": 10_000,   # synthetic data only: examples (images) or tokens (x100 for text)
    "synthetic_test": 1_000,
    "host": None,                # a user's own network, MODULE:FUNCTION (--host); None: the task's host
    "host_fields": {},           # the task's host's field overrides, per topology (presets only)
    "envs": 4,
    "updates": 24,
    "episode_epochs": 8,
    "steps_per_epoch": 8,
    "batch_size": 128,
    "val_size": 256,
    "slots": None,
    "blueprints": None,
    "reward": _ENV_DEFAULTS["reward"],
    # parameter rent per epoch: rent_weight * log1p(added / host parameters)
    "rent_weight": _ENV_DEFAULTS["rent_weight"],
    # the reward's price of compute beyond the host's, per host-episode of FLOPs (0: compute is free)
    "compute_weight": _ENV_DEFAULTS["compute_weight"],
    # the problem family: each env trains on a fraction of the training set (log-uniform in the
    # range) with a fraction of its labels replaced by noise (uniform in the range)
    "train_fraction": list(_ENV_DEFAULTS["train_fraction"]),
    "label_noise": list(_ENV_DEFAULTS["label_noise"]),
    "augment": _ENV_DEFAULTS["augment"],  # image tasks: crop_flip, crop (no mirroring: digits) or none
    "image_size": None,          # CNN tasks: input resolution, a divisor of the data's (None: the data's own)
    "host_lr": _ENV_DEFAULTS["host_lr"],  # host learning rate (Esper's 0.01)
    "host_lr_schedule": _ENV_DEFAULTS["host_lr_schedule"],  # or "cosine": decayed to 0 over each episode
    "seed_lr": _ENV_DEFAULTS["seed_lr"],  # every seed's learning rate (Esper's 0.01)
    "optimizer": _ENV_DEFAULTS["optimizer"],  # host's and seeds': Esper's SGD, or AdamW
    "max_concurrent_training": _ENV_DEFAULTS["max_concurrent_training"],  # seeds GERMINATED/TRAINING at once (Esper: 1)
    "min_prune_age": _ENV_DEFAULTS["min_prune_age"],  # epochs a seed lives before it may be pruned (a fair trial)
    # G2's minimum epochs in TRAINING. Esper's 10 is longer than these episodes: a seed could never
    # blend, hold and be fossilized within one, and every controller would end with the same host.
    "min_training_epochs": 2,
    # The lifecycle's mechanical gates (G1-G3) pass by themselves at the end of an epoch, so the
    # controller decides where, what and when to grow and whether to prune or fossilize, but does
    # not have to learn to request each stage change (Esper's controller does not either).
    "auto_advance": _ENV_DEFAULTS["auto_advance"],
    # the SEAL op: the controller may end an episode's germination in one action (esper_jax.env.actions)
    "seal": _ENV_DEFAULTS["seal"],
    "seed": 0,
    "checkpoint_every": 4,
    "keep_checkpoints": 3,
    "population": None,
    "learning_rate": _PPO_DEFAULTS["learning_rate"],
    "ent_coef": _PPO_DEFAULTS["ent_coef"],
    "seeds": None,
    # warm start: imitate a teacher (a controller's name or a fixed schedule) before PPO; None: PPO from scratch
    "imitate": None,
    "imitation_rounds": 4,       # teacher rollouts, each costing one PPO update's rollout
    "imitation_epochs": 32,      # minibatch epochs over each round's rollout
    # further tasks the plan learner trains on in the same updates, TASK[=DATA] comma-separated (--mix)
    "mix": None,
    **{name: value for name, value in _PPO_DEFAULTS.items() if name not in ("num_envs", "learning_rate", "ent_coef")},
}

LANGUAGE_MODEL_SETTINGS = ("tokenizer", "block_size")

PPO_SETTINGS = tuple(name for name in _PPO_DEFAULTS if name not in ("num_envs", "learning_rate", "ent_coef"))


@dataclasses.dataclass(frozen=True)
class Preset:
    description: str
    settings: dict[str, Any]


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        "a check that everything runs (under 2 minutes on a 2-core CPU including compilation): a one-block "
        "CNN host of width 4 (or a one-layer transformer of width 32 on bytes), one slot, two blueprints, synthetic data, "
        "2 envs x 7-epoch episodes (the shortest in which a seed can be fossilized) of 2 batches of 16, 4 updates",
        {
            "data": SYNTHETIC, "synthetic_train": 512, "synthetic_test": 64, "block_size": 16, "tokenizer": "byte",
            "host_fields": {"cnn": {"base_width": 4, "num_blocks": 1, "pool_blocks": 1},
                            "transformer": {"d_model": 32, "num_heads": 2, "num_layers": 1}},
            "slots": {"cnn": "r0c0", "transformer": "r0c0"},
            "blueprints": {"cnn": "conv_small,norm", "transformer": "norm,lora"},
            "envs": 2, "updates": 4, "episode_epochs": 7, "min_training_epochs": 1, "steps_per_epoch": 2, "batch_size": 16, "val_size": 32,
            "checkpoint_every": 2, "num_minibatches": 2, "update_epochs": 2, "hidden_size": 32,
        },
    ),
    # Why the default preset's problem looks like this (SYNTHETIC CIFAR-10, 16 calibration envs, final val loss
    # minus static's on the same env, mean [95% CI]; python -m experiments.headroom --stream calibration --strata):
    # * Training on 5-100% of the set, every schedule at epoch 0: conv_heavy@r2c0 -0.025 [-0.031, -0.018] (16/16)
    #   at 1.8x static's FLOPs, the rest within +-0.008; one schedule was best in both halves of the family.
    # * Training on 0.5-100%: below 8% (100-1600 images) static is best (conv_heavy@r2c0 hurts there: the grown
    #   network memorizes), above it conv_heavy@r2c0 -0.039 [-0.056, -0.023] (8/8). The best fixed schedule differs
    #   between strata, and an env's train-validation gap shows which stratum it is in.
    # * compute_weight 2 priced conv_heavy@r2c0's +0.8 static episodes at 0.032 of loss, more than it gains; at 1
    #   (0.016) growing there pays on the large-set envs only.
    # * TinyStories (tiny transformer with attention, width 32, SYNTHETIC bytes), 16 calibration envs: at 30 batches
    #   per epoch static ends at 3.578 and no schedule moves it by more than 0.009; at 60 (the preset) static ends at
    #   3.211, depth@r1c0@e0 -0.100 [-0.125, -0.075] (16/16), depth@r0c0@e0 -0.065, mlp_small@r0c0@e0 -0.023,
    #   attention@r0c1@e0 +0.006: growth decides the outcome, though depth@r1c0 is best in both halves of the family.
    # * CIFAR: 30 epochs of 10 batches, not 10 of 30: the same batches, but the lifecycle
    #   counts in epochs (G2 after 1, blending over at least 3, holding 1), so in 10-epoch episodes a seed
    #   germinated at epoch 0 is blended only from epoch 3 and fossilized at 6. Real MNIST digits, 8 calibration
    #   envs, host lr 0.3, the same envs and initial seed weights (experiments.headroom --built-in), 10 x 30 ->
    #   30 x 10: static 1.163 -> 1.134, conv_heavy@r2c0 grown at epoch 0 1.000 -> 0.844, built in 0.886 -> 0.745,
    #   depthwise@r2c0 grown 1.004 -> 0.989, built in 1.020 -> 1.054, the heuristic 1.163 -> 1.019: growing
    #   gains more, though conv_heavy grown still ends 0.10 above it built in.
    # * TinyStories stays at 10 epochs of 60 batches: cut into 30 of 20 (16 calibration envs), static ends at 3.221,
    #   depth@r1c0@e0 at 3.481 and depth@r0c0@e0 at 3.457 (-0.100 and -0.065 below static at 10 x 60): a depth block
    #   planted in the untrained transformer, trained behind it for 20 batches and blended in over 60, hurts it;
    #   planted at epoch 10 it gains -0.064 [-0.076, -0.051] (16/16), built in from the start -0.113.
    "default": Preset(
        "growth that has to pay for itself, sized for a 2-core CPU (CIFAR: about 15 minutes alone, 23 beside another "
        "job; TinyStories: 38 beside one or two; a GPU when JAX sees one): a host "
        "weak by capacity (CIFAR: the baseline's 3x3 CNN at half its width, base width 4, on 16x16 images; TinyStories: "
        "the tiny transformer with attention at width 32), 5 blueprints, 3 slots; every env draws its own problem "
        "(training on a log-uniform 0.5-100% of the training set, 0-20% of its labels noisy), so that no fixed schedule "
        "is best for every env; the reward prices compute (--compute-weight 1: a static host's episode of extra FLOPs "
        "costs as much as 0.02 of final loss) instead of parameters; 30-epoch episodes of 10 batches (TinyStories: 10 of "
        "60), host lr cosine-decayed. The learner decides once per episode, from the drawn problem alone, among a menu "
        "of plans: static and the calibration's best schedules for the host (--plans none: a decision every epoch); "
        "8 envs in problem groups of 2, 80 updates (TinyStories: 40)",
        {
            "synthetic_train": {"cnn": 20_000, "transformer": 10_000}, "synthetic_test": 1_000,
            "tokenizer": {"transformer": "byte"}, "block_size": {"transformer": 16},
            "host_variant": {"cnn": "baseline", "transformer": "tiny"}, "image_size": {"cnn": 16},
            "host_fields": {"cnn": {"base_width": 4}, "transformer": {"d_model": 32}},
            "slots": {"transformer": "r0c1,r0c0,r1c0"},
            "blueprints": {"cnn": "norm,attention,depthwise,conv_light,conv_heavy",
                           "transformer": "norm,lora,attention,mlp_small,depth"},
            "train_fraction": [0.005, 1.0], "label_noise": [0.0, 0.2], "compute_weight": 1.0, "rent_weight": 0.0,
            "envs": 8, "updates": {"cnn": 80, "transformer": 40}, "episode_epochs": {"cnn": 30, "transformer": 10},
            "steps_per_epoch": {"cnn": 10, "transformer": 60},
            "batch_size": {"cnn": 64, "transformer": 32}, "val_size": {"cnn": 512, "transformer": 128},
            "min_training_epochs": 1, "auto_advance": True, "min_prune_age": 4,
            "optimizer": {"transformer": "adamw"}, "host_lr": {"cnn": 0.1, "transformer": 3e-3},
            "host_lr_schedule": "cosine", "seed_lr": {"cnn": 0.05, "transformer": 3e-3}, "checkpoint_every": 4,
            "num_minibatches": 2, "hidden_size": 64, "learning_rate": 1e-3, "ent_coef": 0.05,
            # The learner that decides once per episode from the drawn problem (README "Does growth pay on the
            # `default` preset?"): each menu holds static and the calibration's best schedules for the topology
            # (calibration/cifar-30x10, calibration/tinystories-steps60 in results/default-cpu); envs in pairs
            # that share a problem (--group-size 2). `--plans none` gives the per-epoch learner instead.
            "plans": {"cnn": "static,conv_heavy@r2c0@e0,conv_heavy@r2c0@e10,depthwise@r2c0@e0",
                      "transformer": "static,depth@r1c0@e0,depth@r0c0@e0,mlp_small@r0c0@e0"},
            "plan_inputs": "problem", "group_size": 2,
        },
    ),
    # Why the proof preset's inner problem looks like this (synthetic CIFAR-10, 8 paired envs from a
    # calibration key that is not the held-out stream, final val loss minus static's, mean and 95% CI):
    # * The baseline host (3x3 kernels) at 16x16, 10 epochs x 60 batches of 64, lr 0.2 cosine, ends at
    #   2.075 (accuracy 0.26) and no seed moves it by more than 0.008: it is not short of what seeds add.
    # * The pointwise host (same widths, 1x1 kernels) at lr 0.1 cosine ends at 2.193 (accuracy 0.19,
    #   from 2.30 and 0.10 untrained): conv_heavy at r2c0 -0.104 +- 0.016 (8/8 envs), at r1c0 -0.036 +-
    #   0.006 (8/8), at r0c0 -0.006 +- 0.008; norm at r2c0 +0.003 +- 0.002 (worse in 7/8); conv_light,
    #   depthwise, attention within +-0.001. Where and what to grow decides the outcome.
    # * lr 0.3 ends worse (2.200); 32x32 images with batches of 32 end the same (2.196) at 1.8x the time.
    # * A cosine-decayed host rate: the paired differences' spread fell from about 0.45 (constant 0.05 at
    #   32x32) to 0.01-0.02, so 16 envs can tell a schedule from static.
    # * G2 after 1 epoch and blend tempo 3: the fastest lifecycle takes 7 of the 10 epochs, so a seed
    #   germinated in the first third (epochs 0-3) can be fossilized before the end.
    # On TinyStories (synthetic bytes from an order-2 source: unigram entropy 3.92, bigram 2.93,
    # trigram about 1.1 nats), 8 paired envs from a calibration key, 10 epochs x 60 batches of 32 x 16
    # tokens, AdamW 3e-3 cosine for the host, 3e-3 for seeds:
    # * The position-wise host (no attention: a bigram model) of width 32 ends at 3.243; seeds that
    #   bring context gain: depth at r0c0 -0.129 +- 0.048 (8/8), depth at r1c0 -0.089 +- 0.064 (7/8),
    #   attention at r0c1 -0.072 +- 0.012 (8/8), at r1c0 -0.060 +- 0.021 (8/8); position-wise seeds do
    #   not: mlp_small at r0c0 -0.009 +- 0.002, lora at r1c0 +0.001 +- 0.002. Random -0.013 +- 0.038,
    #   the heuristic +0.004 +- 0.002 (1/8).
    # * AdamW at 1e-2 for both: static 3.192, the spread of paired differences up to +-0.20.
    # * Esper's SGD (host 0.3 cosine, seeds 0.05) on the same problem, 4 envs: static 3.272, attention
    #   at r0c1 -0.258 +- 0.053, depth at r0c0 -0.138 +- 0.051 (4/4 each): growth pays under SGD too.
    #   The preset keeps AdamW, the usual optimizer of transformers, which the proof run used.
    # * The AdamW numbers above were measured before seeds' optimizer step counts became their slot's
    #   own (Adam's count had ticked in every slot from the episode's start and restarted in all of
    #   them at any germination); only static's is unaffected. With the fix, on the held-out envs of
    #   the proof run, one-seed schedules gain more (depth at r0c0 -0.208, README "On TinyStories too").
    "proof": Preset(
        "the learning proof (does a learned controller beat random growth, static and the heuristic?), sized for a 2-core CPU. "
        "CIFAR: the pointwise CNN host (the baseline's widths with 1x1 kernels, so spatial seeds have something to add) on "
        "16x16 images, 5 blueprints; host SGD lr 0.1 cosine-decayed over each 10-epoch episode of 60 batches "
        "of 64, seed lr 0.05 (about 47 minutes). TinyStories: the position-wise transformer host (no attention, so "
        "seeds that bring context have something to add) of width 32 on synthetic bytes, 5 blueprints incl. depth, "
        "AdamW 3e-3 (host cosine-decayed) over 10-epoch episodes of 60 batches of 32 x 16 tokens (about 30 minutes). "
        "Both: 3 slots, G2 after 1 epoch, gates G1-G3 pass by themselves, a seed lives 4 epochs before it may be "
        "pruned, parameter rent 0.01; 8 envs, 64 updates",
        {
            "data": SYNTHETIC, "synthetic_train": {"cnn": 20_000, "transformer": 10_000}, "synthetic_test": 1_000,
            "tokenizer": {"transformer": "byte"},
            "host_variant": {"cnn": "pointwise", "transformer": "pointwise"}, "image_size": {"cnn": 16},
            "host_fields": {"transformer": {"d_model": 32}}, "block_size": {"transformer": 16},
            "slots": {"transformer": "r0c1,r0c0,r1c0"},
            "blueprints": {"cnn": "norm,attention,depthwise,conv_light,conv_heavy",
                           "transformer": "norm,lora,attention,mlp_small,depth"},
            "envs": 8, "updates": 64, "episode_epochs": 10, "steps_per_epoch": 60,
            "batch_size": {"cnn": 64, "transformer": 32}, "val_size": {"cnn": 512, "transformer": 128},
            "min_training_epochs": 1, "auto_advance": True, "min_prune_age": 4, "rent_weight": 0.01,
            "optimizer": {"transformer": "adamw"}, "host_lr": {"cnn": 0.1, "transformer": 3e-3},
            "host_lr_schedule": "cosine", "seed_lr": {"cnn": 0.05, "transformer": 3e-3}, "checkpoint_every": 4,
            "num_minibatches": 2, "hidden_size": 64, "learning_rate": 3e-3, "ent_coef": 0.05,
        },
    ),
    "full": Preset(
        "Esper's scale, for a GPU: every blueprint, 16 envs x 25-epoch episodes of 50 batches of 128, "
        "1000-image validation, 200 updates",
        {
            "envs": 16, "updates": 200, "episode_epochs": 25, "min_training_epochs": 10, "steps_per_epoch": 50, "val_size": 1000,
            "checkpoint_every": 10, "synthetic_train": 50_000, "synthetic_test": 10_000,
        },
    ),
}
DEFAULT_PRESET = "default"
NO_PLANS = "none"  # --plans none: the per-epoch learner where a preset gives a menu

# Settings that may differ when resuming (they do not change what is computed).
RESUME_MAY_CHANGE = ("updates", "keep_checkpoints", "data_dir")
POSITIVE_SETTINGS = ("envs", "updates", "episode_epochs", "steps_per_epoch", "batch_size", "val_size", "min_training_epochs",
                     "max_concurrent_training", "min_prune_age", "imitation_rounds", "imitation_epochs",
                     "checkpoint_every", "keep_checkpoints", "population", "block_size", "synthetic_train",
                     "synthetic_test", "update_epochs", "num_minibatches", "hidden_size")


def _per_topology(value: Any, topology: str, default: Any = None) -> Any:
    """Preset values may be given per topology: ``{"cnn": ..., "transformer": ...}``; a topology
    left out gets ``default``."""
    if isinstance(value, dict) and set(value) <= {"cnn", "transformer"} and value:
        return value.get(topology, default)
    return value


def _canonical(name: str, value: Any) -> Any:
    """A setting in one canonical form, so stored and given values compare equal."""
    if value is None:
        return None
    try:
        if name == "slots":
            return ",".join(parse_slot_list(value)) if isinstance(value, str) else ",".join(value)
        if name == "blueprints":
            names = [b.strip() for b in value.split(",")] if isinstance(value, str) else list(value)
            if not all(names):
                raise RunConfigError(f"--blueprints: empty name in {value!r}; give e.g. norm,conv_small")
            return ",".join(names)
        if name in ("learning_rate", "ent_coef"):
            sweep = parse_sweep(name.replace("_", "-"), value, positive=False)
            if sweep.is_range:
                return f"{sweep.kind}:{sweep.low!r}:{sweep.high!r}"
            return ",".join(repr(v) for v in sweep.values)
        if name == "seeds":
            return ",".join(str(s) for s in parse_seeds(value))
        if name == "imitate" and isinstance(value, str):
            return controller_name(parse_controller(value))
        if name == "plans":
            if _no_plans(value):
                value = DEFAULTS["plans"]
            return ",".join(plan_names(value.split(",") if isinstance(value, str) else value))
        if name in ("train_fraction", "label_noise"):
            return list(getattr(ProblemFamily(**{name: value}), name))
        if name == "mix":
            return ",".join(f"{task}={data}" for task, data in parse_mix(value)) or None
    except RunConfigError:
        raise
    except ValueError as error:
        raise RunConfigError(str(error)) from None
    return value


def parse_mix(value: Any) -> tuple[tuple[str, str], ...]:
    """``--mix``'s tasks: ``TASK[=DATA]`` comma-separated (DATA as --data: auto, synthetic or a path;
    default auto), as (task, data) pairs."""
    if value is None:
        return ()
    if not isinstance(value, str) or not value.strip():
        raise RunConfigError("--mix needs tasks: TASK[=DATA] comma-separated, e.g. --mix tinystories=synthetic")
    pairs = []
    for item in value.split(","):
        task, _, data = item.strip().partition("=")
        if not task.strip() or (_ and not data.strip()):
            raise RunConfigError(f"--mix: {item.strip()!r} is not TASK or TASK=DATA (e.g. tinystories=synthetic)")
        pairs.append((task.strip(), data.strip() or AUTO))
    return tuple(pairs)


def without_learner(explicit: dict[str, Any]) -> dict[str, Any]:
    """``explicit`` for a command that runs the env but no learner (a sweep of fixed controllers, a
    gymnax env): the learner's settings (its minibatch split, problem groups, a preset's menu of plans
    naming the task's slots) must not refuse an env count, slots or episode the command is given."""
    return {**explicit, "num_minibatches": 1, "group_size": 1, "plans": NO_PLANS}


def _no_plans(value: Any) -> bool:
    """``--plans none``: the per-epoch learner."""
    return isinstance(value, str) and value.strip() == NO_PLANS


def resolve_settings(explicit: dict[str, Any], preset: str | None = None) -> dict[str, Any]:
    """Defaults, then the preset's values, then the explicit ones (``None`` values are ignored)."""
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise RunConfigError(f"unknown preset {name!r}; valid presets are: {', '.join(PRESETS)}")
    settings = dict(DEFAULTS)
    settings.update(PRESETS[name].settings)
    settings.update({k: v for k, v in explicit.items() if v is not None})
    settings["preset"] = name
    unknown = set(settings) - set(DEFAULTS) - {"preset"}
    if unknown:
        raise RunConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    if settings["task"] is not None and settings["task"] not in LANGUAGE_MODEL_TASKS:
        for name in LANGUAGE_MODEL_SETTINGS:
            if explicit.get(name) is not None:  # a preset sets them for every task; an explicit one is a mistake
                raise RunConfigError(f"--{name.replace('_', '-')} applies to language-model tasks only "
                                     f"({', '.join(LANGUAGE_MODEL_TASKS)})")
    if settings["task"] in LANGUAGE_MODEL_TASKS and explicit.get("augment") is not None:
        raise RunConfigError(f"--augment applies to image tasks only; {settings['task']} trains on token windows")
    if settings["imitate"] is None:
        for name in ("imitation_rounds", "imitation_epochs"):
            if explicit.get(name) is not None:
                raise RunConfigError(f"--{name.replace('_', '-')} sets how the learner imitates a teacher before "
                                     f"PPO: give the teacher with --imitate, or leave it out")
        if settings["kickstart_coef"]:
            raise RunConfigError("--kickstart-coef weighs the teacher's actions during PPO: give the teacher with "
                                 "--imitate, or leave it out")
    if _no_plans(explicit.get("plans")):
        settings["plans"] = DEFAULTS["plans"]  # the per-epoch learner, whatever the preset's menu
        if explicit.get("plan_inputs") is None:
            settings["plan_inputs"] = DEFAULTS["plan_inputs"]
    elif settings["plans"] and explicit.get("plans") is None:
        # The preset's learner decides once per episode; these options belong to the per-epoch one.
        for flag, per_epoch in (("imitate", explicit.get("imitate") is not None),
                                ("recurrent", explicit.get("recurrent") not in (None, "none")),
                                ("rollout_steps", bool(explicit.get("rollout_steps"))),
                                ("seal", bool(explicit.get("seal")))):
            if per_epoch:
                raise RunConfigError(f"--{flag.replace('_', '-')} is an option of the per-epoch learner, and the "
                                     f"{settings['preset']} preset's decides once per episode among plans (--plans): "
                                     f"add --plans none")
    if settings["host"] is not None:
        if explicit.get("host_variant") is not None:
            raise RunConfigError("--host grows your own network and --host-variant chooses among the built-in ones: "
                                 "give one of them")
        # A preset's host variant, field overrides and resolution are made for the task's own host;
        # a user's host takes its input size from itself or the data (or an explicit --image-size).
        settings.update(host_variant=None, host_fields={}, image_size=explicit.get("image_size"))
        if explicit.get("plans") is None:  # so are its menus of plans, which name the built-in hosts' slots
            settings.update(plans=DEFAULTS["plans"], plan_inputs=explicit.get("plan_inputs") or DEFAULTS["plan_inputs"])
    return settings



# ---------------------------------------------------------------------------- resolved configuration


def _build_host(task: TaskConfig, overrides: dict[str, Any], data: str | None = None):
    """The task's host with ``overrides``; ``data`` names a user's own dataset, whose images the
    host takes, in the message when it cannot."""
    try:
        return task.make_host(**overrides)
    except (TypeError, ValueError) as error:
        if data is not None:
            size = overrides.get("image_size", task.image_size)
            raise RunConfigError(f"the {task.host_variant} {task.topology} host cannot take the images of {data} at "
                                 f"{size}x{size}: {error}") from None
        raise RunConfigError(f"host overrides {overrides} are not valid for the {task.topology} host: {error}") from None


def _user_host(path: str, task: TaskConfig, image_size: int | None, data: str) -> FlaxHost:
    """The host ``--host`` names, checked against the data by ``jax.eval_shape`` (nothing is
    computed or compiled): images of the data's channels at a size that divides the data's
    (``image_size`` if given), and logits ``[batch, classes]`` for the data's classes."""
    native, channels, classes = task.image_size, task.in_channels, task.num_classes
    holds = f"{data} holds {native}x{native}x{channels} images of {classes} classes"
    try:
        host = import_host(path, (image_size or native, image_size or native, channels))
    except HostImportError as error:
        raise RunConfigError(str(error)) from None
    try:
        size, host_channels = host.image_size, host.in_channels
    except ValueError as error:
        raise RunConfigError(f"--host {path}: {error}; {holds}") from None
    if host_channels != channels or native % size:
        raise RunConfigError(f"--host {path} takes {size}x{size}x{host_channels} images, but {holds}: a host takes "
                             f"the data's channels at a size that divides {native} ({_divisors(native)})")
    if image_size is not None and image_size != size:
        raise RunConfigError(f"--image-size {image_size} does not match --host {path}, which takes {size}x{size} "
                             f"images: leave --image-size out (the host's input decides the resolution)")
    batch = jax.ShapeDtypeStruct(host.input_shape(2), host.input_dtype)
    try:
        out = jax.eval_shape(lambda x: host_forward(host, host.init(jax.random.key(0)), x), batch)
    except Exception as error:  # the user's modules: whatever they raise, in one line
        raise RunConfigError(f"--host {path} fails on a batch of {list(batch.shape)} images: "
                             f"{' '.join(f'{type(error).__name__}: {error}'.split())}") from None
    if tuple(out.shape) != (2, classes):
        raise RunConfigError(f"--host {path} gives {list(out.shape)} outputs for a batch of 2 images, but {holds}: "
                             f"its head must give logits [batch, {classes}]")
    return host


def _divisors(size: int) -> str:
    return ", ".join(str(d) for d in range(size, 0, -1) if size % d == 0)


def _check_image_size(image_size: Any, native: int, preset: str, topology: str) -> None:
    """``--image-size``, when given: a positive divisor of the images' size ``native``."""
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or native % image_size:
        from_preset = _per_topology(PRESETS[preset].settings.get("image_size"), topology) == image_size
        given = f" (the {preset} preset's; choose one with --image-size)" if from_preset else ""
        raise RunConfigError(f"--image-size must divide {native}, the images' size ({_divisors(native)}), "
                             f"got {image_size!r}{given}")


def _check_number(name: str, value: Any, allow_zero: bool) -> None:
    """A real-valued setting: a finite number, positive (or non-negative with ``allow_zero``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise RunConfigError(f"--{name.replace('_', '-')} must be a {kind} number, got {value!r}")


def resolve_config(settings: dict[str, Any]) -> RunConfig:
    """Validate ``settings`` and build the run's typed configuration.

    Everything that can be checked without the dataset is checked here (task, preset, counts,
    slots against the host, blueprints against the topology, reward, PPO settings, members), so a
    mistake costs no data loading and no compilation. Language-model hosts get their vocabulary
    from the dataset later (:func:`build`)."""
    s = dict(settings)
    try:
        ops.conv_impl()  # ESPER_CONV_IMPL, read when programs are traced: check it before any is
    except ValueError as error:
        raise RunConfigError(str(error)) from None
    if s["task"] is None:
        raise RunConfigError(f"--task is required; valid tasks are: {', '.join(TASK_NAMES)}")
    try:
        host_variants(s["task"])  # an unknown task is named before anything is read
        user_data = is_user_image_dataset(s["task"])
        # A user's own images give the host its input and classes (labels and metadata are read, not images).
        image = describe_image_dataset(s["task"], s["data"], data_dir=s["data_dir"]) if user_data else None
        base = get_task(s["task"], image=image)
        location = str(user_image_location(s["task"], s["data"], s["data_dir"])) if user_data else None
        user_host = None
        if s["host"] is not None:
            if base.kind != "classification":
                raise RunConfigError(f"--host grows your own network on an image classification task ("
                                     f"{', '.join(t for t in TASK_NAMES if t not in LANGUAGE_MODEL_TASKS)}); "
                                     f"{s['task']} grows the built-in transformer")
            image_size = _per_topology(s["image_size"], base.topology)
            _check_image_size(image_size, base.image_size, s["preset"], base.topology)
            user_host = _user_host(s["host"], base, image_size, s["task"] if location is None else
                                   location if s["task"] == IMAGES else f"{s['task']} in {location}")
        # Per-topology preset values follow the host's topology (a user's transformer host on images
        # takes the transformer's blueprints and optimizer).
        topology = base.topology if user_host is None else user_host.topology
        s = {name: _per_topology(value, topology, DEFAULTS.get(name)) for name, value in s.items()}
        for name in POSITIVE_SETTINGS:
            value = s[name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise RunConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        task = get_task(s["task"], None if user_host else s["host_variant"], block_size=s["block_size"], image=image)
        image_size = s["image_size"]
        host_overrides = dict(s["host_fields"] or {})
        if image_size is not None and user_host is None:
            if task.kind != "classification":
                raise RunConfigError("--image-size applies to image tasks only (cifar10, cifar100, images, tfds:NAME)")
            _check_image_size(image_size, task.image_size, s["preset"], topology)
            host_overrides["image_size"] = image_size
        # The user's file or tfds directory is recorded absolute, to be found again from anywhere; tfds'
        # default directory stays "auto" (the data directory's, which --data-dir may move on resume).
        data_source = location if user_data and str(s["data"]) != AUTO else str(s["data"])
        host = user_host or _build_host(task, host_overrides, None if location is None else
                                        location if s["task"] == IMAGES else f"{s['task']} in {location}")
        _check_number("host_lr", s["host_lr"], allow_zero=False)
        _check_number("seed_lr", s["seed_lr"], allow_zero=False)
        _check_number("rent_weight", s["rent_weight"], allow_zero=True)
        _check_number("compute_weight", s["compute_weight"], allow_zero=True)
        problems = ProblemFamily(s["train_fraction"], s["label_noise"])  # ValueError names the flag
        if s["compute_weight"] and s["reward"] == "sparse":
            raise RunConfigError("--compute-weight prices each epoch's compute, and the sparse reward is zero before "
                                 "the last epoch: use --reward loss or contribution, or leave --compute-weight out")
        if s["optimizer"] not in OPTIMIZERS:
            raise RunConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {s['optimizer']!r}")
        if s["augment"] not in AUGMENTS:
            raise RunConfigError(f"--augment must be one of {', '.join(AUGMENTS)}, got {s['augment']!r}")
        if s["host_lr_schedule"] not in LR_SCHEDULES:
            raise RunConfigError(f"--host-lr-schedule must be one of {', '.join(LR_SCHEDULES)}, "
                                 f"got {s['host_lr_schedule']!r}")
        slots_value = s["slots"]
        for name, value in (("slots", slots_value), ("blueprints", s["blueprints"])):
            if isinstance(value, str) and not value.strip():  # given, but empty: not "the default"
                raise RunConfigError(f"--{name} is empty; list at least one (e.g. --{name} "
                                     f"{'r0c0' if name == 'slots' else 'norm,conv_small'}) or leave it out")
        # A slot the host lacks, or a legacy name: the message names the host's own ids.
        words = split_slot_list(slots_value) if isinstance(slots_value, str) else list(slots_value or ())
        slots = slot_config_for(host, words).slot_ids if slots_value else host.default_slots
        bp_value = s["blueprints"]
        blueprints = tuple(_canonical("blueprints", bp_value).split(",")) if bp_value else blueprint_names(topology)
        valid = blueprint_names(topology)
        for bp in blueprints:
            if bp not in valid:
                raise RunConfigError(f"blueprint {bp!r} is not valid for the {topology} host; "
                                     f"{topology} blueprints are: {', '.join(valid)}")
        if len(set(blueprints)) != len(blueprints):
            raise RunConfigError(f"duplicate blueprints in {','.join(blueprints)}")
        if s["reward"] not in REWARD_KINDS:
            raise RunConfigError(f"unknown reward {s['reward']!r}; valid rewards are: {', '.join(REWARD_KINDS)}")
        lr = parse_sweep("lr", s["learning_rate"], maximum=1.0)  # Adam above 1 only diverges
        ent = parse_sweep("ent-coef", s["ent_coef"], positive=False)
        seeds = parse_seeds(s["seeds"]) if s["seeds"] is not None else None
        if isinstance(s["seed"], bool) or not isinstance(s["seed"], int) or not 0 <= s["seed"] <= MAX_SEED:
            raise RunConfigError(f"--seed must be an integer in 0..{MAX_SEED} (seeds are 32-bit), got {s['seed']!r}")
        members = resolve_members(s["population"], lr, ent, s["seed"], seeds)
        for member in members:  # a run's key is jax.random.key(seed): a 32-bit unsigned seed
            if not 0 <= member.seed <= MAX_SEED:
                flag = "--seeds" if seeds is not None else "--seed"
                raise RunConfigError(f"{flag}: member seed {member.seed} is outside 0..{MAX_SEED} "
                                     f"(seeds are 32-bit; --seed S gives members S, S+1, ...)")
        ppo_fields = {name: s[name] for name in PPO_SETTINGS}
        try:
            ppo_fields["plans"] = _check_plans(s["plans"], slots, blueprints, s["episode_epochs"])
        except RunConfigError as error:
            if s["plans"] != _per_topology(PRESETS[s["preset"]].settings.get("plans"), topology):
                raise
            raise RunConfigError(f"the {s['preset']} preset's {error} (its menu is made for the task's own slots, "
                                 f"blueprints and episode): give your own --plans MENU, or --plans none") from None
        ppo_fields.update(num_envs=s["envs"], learning_rate=members[0].learning_rate, ent_coef=members[0].ent_coef)
        ppo_config = ppo_lib.PPOConfig(**ppo_fields)  # validates the PPO settings
        warm_start = None
        if s["imitate"] is not None and ppo_config.plans:
            raise RunConfigError("--imitate warm-starts the per-epoch learner; --plans learns its choice from scratch: "
                                 "give one of them")
        if s["seal"] and ppo_config.plans:
            raise RunConfigError("--seal gives the per-epoch learner's op head SEAL; --plans decides once per episode "
                                 "and never acts per epoch: give one of them")
        if s["imitate"] is not None:
            if ppo_config.recurrent != "none":
                raise RunConfigError("--imitate fits a feed-forward policy step by step; it cannot warm-start "
                                     "--recurrent " + ppo_config.recurrent)
            teacher = _check_teacher(s["imitate"], slots, blueprints, s["episode_epochs"])
            s["imitate"] = teacher
            warm_start = WarmStart(teacher, s["imitation_rounds"], s["imitation_epochs"])
    except RunConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise RunConfigError(str(error)) from None
    synthetic = data_source == SYNTHETIC
    language_model = task.kind == "language_model"
    variant = task.host_variant if user_host is None else USER_HOST_VARIANT
    augment = "none" if language_model else s["augment"]  # token windows are never augmented
    options = {**s, "data": data_source, "image_size": None if language_model else host.image_size,
               "augment": augment,
               "slots": list(slots), "blueprints": list(blueprints), "host_fields": s["host_fields"] or {},
               "host_variant": variant, "population": len(members), "seeds": [m.seed for m in members]}
    config = RunConfig(
        task=task.name, host_variant=variant, host=host,
        data=DataSpec(source=data_source, data_dir=None if s["data_dir"] is None else str(s["data_dir"]),
                      tokenizer=s["tokenizer"] if language_model else None,
                      synthetic_train=s["synthetic_train"] if synthetic else None,
                      synthetic_test=s["synthetic_test"] if synthetic else None,
                      label="SYNTHETIC data" if synthetic else None),  # the real data's origin: filled in by train()
        env=EnvSpec(episode_epochs=s["episode_epochs"], steps_per_epoch=s["steps_per_epoch"], batch_size=s["batch_size"],
                    val_size=s["val_size"], slots=tuple(slots), blueprints=tuple(blueprints), reward=s["reward"],
                    min_training_epochs=s["min_training_epochs"], rent_weight=float(s["rent_weight"]),
                    max_concurrent_training=s["max_concurrent_training"], min_prune_age=s["min_prune_age"],
                    auto_advance=bool(s["auto_advance"]), host_lr=float(s["host_lr"]),
                    host_lr_schedule=s["host_lr_schedule"], seed_lr=float(s["seed_lr"]),
                    optimizer=s["optimizer"],
                    block_size=s["block_size"] if language_model else None,
                    train_fraction=problems.train_fraction, label_noise=problems.label_noise,
                    compute_weight=float(s["compute_weight"]), augment=augment, seal=bool(s["seal"])),
        ppo=ppo_config, members=tuple(members), preset=s["preset"], preset_description=PRESETS[s["preset"]].description,
        updates=s["updates"], checkpoint_every=s["checkpoint_every"], keep_checkpoints=s["keep_checkpoints"],
        seed=s["seed"], options={k: _canonical(k, v) for k, v in sorted(options.items())}, warm_start=warm_start,
    )
    return config.replace(mix=_resolve_mix(config, s)) if s["mix"] is not None else config


def _resolve_mix(config: RunConfig, s: dict[str, Any]) -> tuple[RunConfig, ...]:
    """``--mix``'s tasks, each resolved under the run's preset with the run's learner settings: one
    policy learns from every task's envs (:class:`esper_jax.rl.plans.TaskMenu`), so it must be one
    whose inputs and parameters do not depend on the task. The run's explicit environment settings
    (slots, episode, host) are its own task's; each other task takes the preset's."""
    ppo = config.ppo
    if not ppo.plans or ppo.plan_head != "scorer" or ppo.plan_inputs != "problem":
        raise RunConfigError("--mix trains one policy on several tasks' envs, which only a plan policy that sees the "
                             "drawn problem and scores each task's own menu can act on: give --plan-head scorer and "
                             "--plan-inputs problem with a menu of plans (the default preset's, or --plans)")
    learner = {name: s[name] for name in PPO_SETTINGS if name != "plans"}
    learner.update(envs=s["envs"], learning_rate=s["learning_rate"], ent_coef=s["ent_coef"], seed=s["seed"])
    tasks, seen = [], {config.task}
    for task, data in parse_mix(s["mix"]):
        if task in seen:
            what = "the run's own task" if task == config.task else "given twice"
            raise RunConfigError(f"--mix: {task} is {what}; each task enters a run once")
        seen.add(task)
        topology = "transformer" if task in LANGUAGE_MODEL_TASKS else "cnn"  # the preset's built-in hosts
        if not _per_topology(PRESETS[s["preset"]].settings.get("plans"), topology):
            raise RunConfigError(f"--mix {task}: the {s['preset']} preset has no menu of plans for the {task} host "
                                 f"(each task of a mix takes its menu from the preset): use --preset {DEFAULT_PRESET}")
        try:
            tasks.append(resolve_config(resolve_settings({"task": task, "data": data, **learner}, s["preset"])))
        except RunConfigError as error:
            raise RunConfigError(f"--mix {task}: {error}") from None
    return tuple(tasks)


def _check_teacher(text: Any, slots: tuple[str, ...], blueprints: tuple[str, ...], episode_epochs: int) -> str:
    """``--imitate``'s teacher in its canonical form: a controller's name, or a fixed schedule whose
    slots, blueprints and epochs this run has."""
    if not isinstance(text, str) or not text.strip():
        raise RunConfigError(f"--imitate needs a teacher: {', '.join(CONTROLLERS)}, or a schedule "
                             f"blueprint@slot@eN (e.g. conv_heavy@r2c0@e0), got {text!r}")
    try:
        teacher = parse_controller(text)
    except ValueError as error:
        raise RunConfigError(f"--imitate: {error}") from None
    _check_seeds(f"--imitate {text}", () if isinstance(teacher, str) else teacher, slots, blueprints, episode_epochs)
    return controller_name(teacher)


def _check_seeds(what: str, seeds, slots: tuple[str, ...], blueprints: tuple[str, ...], episode_epochs: int) -> None:
    """A schedule's seeds must name this run's slots and blueprints and an epoch of its episode."""
    for seed in seeds:
        if seed.slot not in slots:
            raise RunConfigError(f"{what}: slot {seed.slot} is not one of the run's slots ({', '.join(slots)})")
        if seed.blueprint not in blueprints:
            raise RunConfigError(f"{what}: blueprint {seed.blueprint} is not one of the run's blueprints "
                                 f"({', '.join(blueprints)})")
        if seed.epoch >= episode_epochs:
            raise RunConfigError(f"{what}: epoch {seed.epoch} is outside the episode's 0..{episode_epochs - 1}")


def _check_plans(value: Any, slots: tuple[str, ...], blueprints: tuple[str, ...],
                 episode_epochs: int) -> tuple[str, ...]:
    """``--plans``' menu (comma-separated, or a sequence) as canonical names, each plan ``static`` or a
    schedule whose slots, blueprints and epochs this run has; ``()`` when not given."""
    if value is None or value == () or value == []:
        return ()
    if isinstance(value, str) and not value.strip():
        raise RunConfigError("--plans needs a menu: static and/or schedules, comma-separated, e.g. "
                             "static,conv_heavy@r2c0@e0,conv_heavy@r2c0@e10")
    names = _canonical("plans", value).split(",")
    for name in names:
        _check_seeds(f"--plans: plan {name}", parse_plan(name), slots, blueprints, episode_epochs)
    return tuple(names)


def check_resume_settings(stored: RunConfig, explicit: dict[str, Any]) -> None:
    """Options given with ``--resume`` must agree with the run's configuration, except
    :data:`RESUME_MAY_CHANGE`."""
    base = dict(stored.options)
    # A setting added after the run was written is not among its options; what the run used is its
    # configuration's value (the field's default when the configuration was read).
    base.update({f.name: _canonical(f.name, getattr(stored.env, f.name)) for f in dataclasses.fields(EnvSpec)
                 if f.name not in base})
    base.update({name: _canonical(name, getattr(stored.ppo, name)) for name in PPO_SETTINGS if name not in base})
    warm = stored.warm_start
    base.setdefault("mix", None)  # a run written before --mix existed trained on its own task alone
    base.setdefault("imitate", None if warm is None else warm.teacher)
    base.setdefault("imitation_rounds", DEFAULTS["imitation_rounds"] if warm is None else warm.rounds)
    base.setdefault("imitation_epochs", DEFAULTS["imitation_epochs"] if warm is None else warm.epochs)
    for name, value in explicit.items():
        if value is None or name in RESUME_MAY_CHANGE:
            continue
        given = _canonical(name, value)
        if name not in base:
            raise RunConfigError(f"--resume: unknown setting {name}")
        if given != base[name]:
            flag = "--" + name.replace("_", "-")
            raise RunConfigError(
                f"--resume: {flag}={given} does not match the run's {flag}={base[name]} "
                f"(only {', '.join('--' + n.replace('_', '-') for n in RESUME_MAY_CHANGE)} may change on resume)")


def resume_config(stored: RunConfig, explicit: dict[str, Any]) -> RunConfig:
    """The configuration a resumed run continues with: the stored one, with the options that may
    change on resume (:data:`RESUME_MAY_CHANGE`) taken from ``explicit``; any other option given
    must agree with the stored one (:func:`check_resume_settings`). The members stay those drawn
    when the run started."""
    check_resume_settings(stored, explicit)
    given = {k: explicit[k] for k in RESUME_MAY_CHANGE if explicit.get(k) is not None}
    for name in ("updates", "keep_checkpoints"):
        value = given.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise RunConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    data = stored.data
    if "data_dir" in given:
        data = dataclasses.replace(data, data_dir=str(given["data_dir"]))
    options = {**stored.options, **{k: _canonical(k, v) for k, v in given.items()}}
    return stored.replace(updates=given.get("updates", stored.updates),
                          keep_checkpoints=given.get("keep_checkpoints", stored.keep_checkpoints), data=data,
                          options=options)
