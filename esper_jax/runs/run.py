"""Training runs: configuration, presets, the run directory, the chunked training loop, ``load_run``.

This module owns what ``python -m experiments.ppo`` does, so that other programs (evaluation,
reports, notebooks) can do the same without the command line:

* **Settings and presets.** A run is described by flat *settings* (:data:`DEFAULTS`): a preset
  (:data:`PRESETS`) replaces some of them, explicit options replace the preset's. The resolved
  configuration (:func:`resolve_config`) is written to ``config.json`` with everything needed to
  rebuild the run: the host actually used, slots, blueprints, data source, PPO config, members.
* **The run directory**: ``config.json``, ``metrics.jsonl`` (one row per
  update; for a population the member mean on top and one entry per member), ``checkpoints/``
  (Orbax, :mod:`esper_jax.runs.checkpoint`), ``summary.json``.
* **The training loop** (:func:`train`): the learner's ``train_chunk`` (``checkpoint_every``
  updates in one jitted ``lax.scan``) runs chunk after chunk; between chunks the metrics rows are
  appended and the state is saved asynchronously. A population of learners is one ``jax.vmap``
  of the learner, sharded over the devices (:mod:`esper_jax.runs.population`).
* **Resume.** ``resume=True`` restores the newest complete checkpoint, drops ``metrics.jsonl``
  rows after it and continues; chunk boundaries stay at multiples of ``checkpoint_every``, so a
  resumed run computes exactly what an uninterrupted one does.
* :func:`load_run` rebuilds env, data and trainer from a run directory and restores its newest
  checkpoint, for evaluation.

Errors a user can cause (bad names, counts, directories, data) are raised as
:class:`RunConfigError`, :class:`~esper_jax.runs.checkpoint.CheckpointError` or the data layer's
errors (see :data:`USER_ERRORS`), with one-line messages, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from esper_jax.lattice import ops
from esper_jax.rl import ppo as ppo_lib
from esper_jax.lattice.blueprints.registry import blueprint_names
from esper_jax.runs.checkpoint import Checkpointer, CheckpointError, has_checkpoint, incomplete_checkpoints
from esper_jax.data import SYNTHETIC, DatasetNotFoundError, load_image_dataset, load_token_dataset
from esper_jax.env.actions import ActionConfig
from esper_jax.data.datasets import (CorruptDatasetError, OptionalDependencyError, TokenizerUnavailableError,
                                     downsample_images)
from esper_jax.lattice.optim import LR_SCHEDULES
from esper_jax.env.environment import EnvData, MorphogeneticEnv, make_env_config, make_env_data
from esper_jax.lattice.lifecycle import GateConfig
from esper_jax.lattice.hosts import CNNHost, TransformerHost
from esper_jax.lattice.hosts.base import slot_config_for
from esper_jax.runs.population import Placement, parse_seeds, parse_sweep, resolve_members, stack_hyperparams
from esper_jax.env.rewards import REWARD_KINDS, RewardConfig
from esper_jax.lattice.slots import parse_slot_list
from esper_jax.env.tasks import TASK_NAMES, TaskConfig, get_task

CONFIG_VERSION = 1
MAX_SEED = 2**32 - 1
CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINT_DIR = "config.json", "metrics.jsonl", "summary.json", "checkpoints"


class RunConfigError(ValueError):
    """A configuration or run directory the user has to fix; the message is one line."""


# Errors that mean "the user asked for something impossible": the command line prints them as
# one line and exits 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (RunConfigError, CheckpointError, DatasetNotFoundError, CorruptDatasetError, OptionalDependencyError,
               TokenizerUnavailableError)

# ---------------------------------------------------------------------------- settings

_PPO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ppo_lib.PPOConfig)}

# Flat settings with their defaults. ``None`` means "the task's or host's own" (variant, slots,
# blueprints) or "derived" (population size from the sweeps, seeds from --seed).
DEFAULTS: dict[str, Any] = {
    "task": None,
    "host_variant": None,
    "data": "auto",
    "data_dir": None,
    "tokenizer": "gpt2",
    "block_size": 64,            # language-model tasks: tokens per training window
    "synthetic_train": 10_000,   # synthetic data only: examples (images) or tokens (x100 for text)
    "synthetic_test": 1_000,
    "host": {},                  # host field overrides, per topology (presets only)
    "envs": 4,
    "updates": 24,
    "episode_epochs": 8,
    "steps_per_epoch": 8,
    "batch_size": 128,
    "val_size": 256,
    "slots": None,
    "blueprints": None,
    "reward": "loss",
    "rent_weight": 0.05,         # parameter rent per epoch: rent_weight * log1p(added / host parameters)
    "image_size": None,          # CNN tasks: input resolution, a divisor of 32 (None: the host's own, 32)
    "host_lr": 0.01,             # host SGD learning rate (Esper's)
    "host_lr_schedule": "constant",  # or "cosine": decayed to 0 over each episode
    "seed_lr": 0.01,             # every seed's SGD learning rate (Esper's)
    "max_concurrent_training": 1,  # seeds that may be GERMINATED/TRAINING at once (Esper: 1)
    "min_prune_age": 1,          # epochs a seed lives before it may be pruned (a fair trial)
    # G2's minimum epochs in TRAINING. Esper's 10 is longer than these episodes: a seed could never
    # blend, hold and be fossilized within one, and every controller would end with the same host.
    "min_training_epochs": 2,
    # The lifecycle's mechanical gates (G1-G3) pass by themselves at the end of an epoch, so the
    # controller decides where, what and when to grow and whether to prune or fossilize, but does
    # not have to learn to request each stage change (Esper's controller does not either).
    "auto_advance": False,
    "seed": 0,
    "checkpoint_every": 4,
    "keep_checkpoints": 3,
    "population": None,
    "learning_rate": _PPO_DEFAULTS["learning_rate"],
    "ent_coef": _PPO_DEFAULTS["ent_coef"],
    "seeds": None,
    **{name: value for name, value in _PPO_DEFAULTS.items() if name not in ("num_envs", "learning_rate", "ent_coef")},
}

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
            "host": {"cnn": {"base_width": 4, "num_blocks": 1, "pool_blocks": 1},
                     "transformer": {"d_model": 32, "num_heads": 2, "num_layers": 1}},
            "slots": {"cnn": "r0c0", "transformer": "r0c0"},
            "blueprints": {"cnn": "conv_small,norm", "transformer": "norm,lora"},
            "envs": 2, "updates": 4, "episode_epochs": 7, "min_training_epochs": 1, "steps_per_epoch": 2, "batch_size": 16, "val_size": 32,
            "checkpoint_every": 2, "num_minibatches": 2, "update_epochs": 2, "hidden_size": 32,
        },
    ),
    "default": Preset(
        "the task's own host with its default slots and four blueprints per topology, 4 envs x 8-epoch "
        "episodes of 8 batches of 128, 24 updates (about 10 minutes on a 2-core CPU; uses a GPU when JAX sees one)",
        {
            "blueprints": {"cnn": "norm,attention,depthwise,conv_light", "transformer": "norm,lora,attention,mlp_small"},
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
    "proof": Preset(
        "the learning proof (does a learned controller beat static and the heuristic?), sized for a 2-core CPU: "
        "the pointwise CNN host (the baseline's widths with 1x1 kernels, so spatial seeds have something to add) on "
        "16x16 images, 3 slots, 5 blueprints; host SGD lr 0.1 cosine-decayed over each 10-epoch episode of 60 batches "
        "of 64, seed lr 0.05, G2 after 1 epoch, gates G1-G3 pass by themselves, a seed lives 4 epochs before it may be "
        "pruned, parameter rent 0.01; 8 envs, 64 updates (about 47 minutes on a "
        "2-core CPU)",
        {
            "data": SYNTHETIC, "synthetic_train": 20_000, "synthetic_test": 1_000,
            "host_variant": {"cnn": "pointwise"}, "image_size": {"cnn": 16},
            "blueprints": {"cnn": "norm,attention,depthwise,conv_light,conv_heavy", "transformer": "norm,lora,attention,mlp_small"},
            "envs": 8, "updates": 64, "episode_epochs": 10, "steps_per_epoch": 60, "batch_size": 64, "val_size": 512,
            "min_training_epochs": 1, "auto_advance": True, "min_prune_age": 4, "rent_weight": 0.01, "host_lr": 0.1,
            "host_lr_schedule": "cosine", "seed_lr": 0.05, "checkpoint_every": 4, "num_minibatches": 2, "hidden_size": 64,
            "learning_rate": 3e-3, "ent_coef": 0.05,
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

# Settings that may differ when resuming (they do not change what is computed).
RESUME_MAY_CHANGE = ("updates", "keep_checkpoints", "data_dir")
POSITIVE_SETTINGS = ("envs", "updates", "episode_epochs", "steps_per_epoch", "batch_size", "val_size", "min_training_epochs",
                     "max_concurrent_training", "min_prune_age",
                     "checkpoint_every", "keep_checkpoints", "population", "block_size", "synthetic_train",
                     "synthetic_test", "update_epochs", "num_minibatches", "hidden_size")


def _per_topology(value: Any, topology: str) -> Any:
    """Preset values may be given per topology: ``{"cnn": ..., "transformer": ...}``."""
    if isinstance(value, dict) and set(value) <= {"cnn", "transformer"} and value:
        return value.get(topology)
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
    except RunConfigError:
        raise
    except ValueError as error:
        raise RunConfigError(str(error)) from None
    return value


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
    return settings


# ---------------------------------------------------------------------------- resolved configuration


def _host_fields(host) -> dict[str, Any]:
    return {f.name: getattr(host, f.name) for f in dataclasses.fields(host) if f.init}


def _build_host(task: TaskConfig, overrides: dict[str, Any]):
    host = task.make_host()
    try:
        return dataclasses.replace(host, **overrides) if overrides else host
    except (TypeError, ValueError) as error:
        raise RunConfigError(f"host overrides {overrides} are not valid for the {task.topology} host: {error}") from None


def _host_from_fields(topology: str, fields: dict[str, Any]):
    return (CNNHost if topology == "cnn" else TransformerHost)(**fields)


def _check_number(name: str, value: Any, allow_zero: bool) -> None:
    """A real-valued setting: a finite number, positive (or non-negative with ``allow_zero``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise RunConfigError(f"--{name.replace('_', '-')} must be a {kind} number, got {value!r}")


def resolve_config(settings: dict[str, Any]) -> dict[str, Any]:
    """Validate ``settings`` and build the JSON-able configuration of ``config.json``.

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
    for name in POSITIVE_SETTINGS:
        value = s[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise RunConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    try:
        topology = get_task(s["task"]).topology
        task = get_task(s["task"], _per_topology(s["host_variant"], topology), block_size=s["block_size"])
        image_size = _per_topology(s["image_size"], topology)
        host_overrides = dict(_per_topology(s["host"], topology) or {})
        if image_size is not None:
            if topology != "cnn":
                raise RunConfigError("--image-size applies to image tasks only (cifar10, cifar100)")
            if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or 32 % image_size:
                raise RunConfigError(f"--image-size must divide 32 (32, 16, 8, ...), got {image_size!r}")
            host_overrides["image_size"] = image_size
        host = _build_host(task, host_overrides)
        _check_number("host_lr", s["host_lr"], allow_zero=False)
        _check_number("seed_lr", s["seed_lr"], allow_zero=False)
        _check_number("rent_weight", s["rent_weight"], allow_zero=True)
        if s["host_lr_schedule"] not in LR_SCHEDULES:
            raise RunConfigError(f"--host-lr-schedule must be one of {', '.join(LR_SCHEDULES)}, "
                                 f"got {s['host_lr_schedule']!r}")
        slots_value = _per_topology(s["slots"], topology)
        for name, value in (("slots", slots_value), ("blueprints", _per_topology(s["blueprints"], topology))):
            if isinstance(value, str) and not value.strip():  # given, but empty: not "the default"
                raise RunConfigError(f"--{name} is empty; list at least one (e.g. --{name} "
                                     f"{'r0c0' if name == 'slots' else 'norm,conv_small'}) or leave it out")
        slots = parse_slot_list(slots_value) if slots_value else host.default_slots
        slot_config_for(host, slots)  # a slot the host lacks: the message lists the host's slots
        bp_value = _per_topology(s["blueprints"], topology)
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
        lr = parse_sweep("lr", s["learning_rate"])
        ent = parse_sweep("ent-coef", s["ent_coef"], positive=False)
        seeds = parse_seeds(s["seeds"]) if s["seeds"] is not None else None
        if isinstance(s["seed"], bool) or not isinstance(s["seed"], int) or not 0 <= s["seed"] <= MAX_SEED:
            raise RunConfigError(f"--seed must be an integer in 0..{MAX_SEED} (seeds are 32-bit), got {s['seed']!r}")
        members = resolve_members(s["population"], lr, ent, s["seed"], seeds)
        for member in members:  # a run's key is jax.random.key(seed): a 32-bit unsigned seed
            if not 0 <= member["seed"] <= MAX_SEED:
                flag = "--seeds" if seeds is not None else "--seed"
                raise RunConfigError(f"{flag}: member seed {member['seed']} is outside 0..{MAX_SEED} "
                                     f"(seeds are 32-bit; --seed S gives members S, S+1, ...)")
        ppo_fields = {name: s[name] for name in PPO_SETTINGS}
        ppo_fields.update(num_envs=s["envs"], learning_rate=members[0]["learning_rate"],
                          ent_coef=members[0]["ent_coef"])
        ppo_config = ppo_lib.PPOConfig(**ppo_fields)  # validates the PPO settings
    except RunConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise RunConfigError(str(error)) from None
    data_source = str(s["data"])
    synthetic = data_source == SYNTHETIC
    return {
        "version": CONFIG_VERSION,
        "task": task.name,
        "host_variant": task.host_variant,
        "host": {"topology": topology, **_host_fields(host)},
        "data": {
            "source": data_source,
            "data_dir": None if s["data_dir"] is None else str(s["data_dir"]),
            "synthetic": synthetic,
            "label": "SYNTHETIC data" if synthetic else None,  # the real data's origin is filled in by train()
            "tokenizer": s["tokenizer"] if task.kind == "language_model" else None,
            "synthetic_train": s["synthetic_train"] if synthetic else None,
            "synthetic_test": s["synthetic_test"] if synthetic else None,
        },
        "preset": s["preset"],
        "preset_description": PRESETS[s["preset"]].description,
        "env": {
            "episode_epochs": s["episode_epochs"], "steps_per_epoch": s["steps_per_epoch"],
            "batch_size": s["batch_size"], "val_size": s["val_size"], "slots": list(slots),
            "blueprints": list(blueprints), "reward": s["reward"], "min_training_epochs": s["min_training_epochs"],
            "rent_weight": float(s["rent_weight"]),
            "max_concurrent_training": s["max_concurrent_training"], "min_prune_age": s["min_prune_age"],
            "auto_advance": bool(s["auto_advance"]),
            "host_lr": float(s["host_lr"]),
            "host_lr_schedule": s["host_lr_schedule"], "seed_lr": float(s["seed_lr"]),
            "block_size": s["block_size"] if task.kind == "language_model" else None,
        },
        "ppo": dataclasses.asdict(ppo_config),
        "population": len(members),
        "members": members,
        "updates": s["updates"],
        "checkpoint_every": s["checkpoint_every"],
        "keep_checkpoints": s["keep_checkpoints"],
        "seed": s["seed"],
        # the flat settings as resolved for this topology, to compare with the options given on --resume
        "settings": {k: _canonical(k, v) for k, v in sorted(
            {**s, "image_size": host.image_size if topology == "cnn" else None, "slots": list(slots), "blueprints": list(blueprints), "host": _per_topology(s["host"], topology) or {},
             "host_variant": task.host_variant, "population": len(members), "seeds": [m["seed"] for m in members]}
            .items())},
    }


def check_resume_settings(stored: dict[str, Any], explicit: dict[str, Any]) -> None:
    """Options given with ``--resume`` must agree with the run's configuration, except
    :data:`RESUME_MAY_CHANGE`."""
    base = stored["settings"]
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


# ---------------------------------------------------------------------------- building a run


@dataclasses.dataclass
class Built:
    """Everything a configuration makes: env, data, learner and where it runs."""

    config: dict[str, Any]
    task: TaskConfig
    env: MorphogeneticEnv
    dataset: Any
    env_data: EnvData
    ppo_config: ppo_lib.PPOConfig
    trainer: ppo_lib.Trainer
    placement: Placement
    data_label: str

    @property
    def population(self) -> int:
        return self.config["population"]

    @property
    def synthetic(self) -> bool:
        return bool(self.dataset.synthetic)


def load_dataset(config: dict[str, Any], data: str | None = None, data_dir: str | None = None):
    """The dataset a configuration names (``data``/``data_dir`` override where it is read from)."""
    try:
        return _load_dataset(config, data, data_dir)
    except (DatasetNotFoundError, CorruptDatasetError):
        raise
    except ValueError as error:  # e.g. --data and --data-dir naming different directories, a bad tokenizer
        raise RunConfigError(str(error)) from None


def _load_dataset(config: dict[str, Any], data: str | None, data_dir: str | None):
    d = config["data"]
    source = data if data is not None else d["source"]
    directory = data_dir if data_dir is not None else d["data_dir"]
    synthetic = source == SYNTHETIC
    if config["host"]["topology"] == "cnn":
        sizes = {"n_train": d["synthetic_train"] or 10_000, "n_test": max(d["synthetic_test"] or 1_000,
                                                                          config["env"]["val_size"])} if synthetic else {}
        dataset = load_image_dataset(config["task"], source, data_dir=directory, **sizes)
        return downsample_images(dataset, config["host"].get("image_size", 32))  # the data follows the host's input
    sizes = {"n_train_tokens": 100 * (d["synthetic_train"] or 10_000),
             "n_val_tokens": 100 * (d["synthetic_test"] or 1_000)} if synthetic else {}
    return load_token_dataset("tinystories", source, tokenizer=d["tokenizer"] or "gpt2", data_dir=directory, **sizes)


def data_label(dataset) -> str:
    return "SYNTHETIC data" if dataset.synthetic else f"real data from {dataset.source}"


def build(config: dict[str, Any], *, data: str | None = None, data_dir: str | None = None,
          devices=None) -> Built:
    """Load the data and build env, learner and placement for a resolved configuration."""
    dataset = load_dataset(config, data, data_dir)
    env_cfg = config["env"]

    def setting(name: str):  # configurations written before a setting existed ran at its default
        return env_cfg.get(name, DEFAULTS[name])
    try:
        if config["host"]["topology"] == "cnn":
            task = get_task(config["task"], config["host_variant"])
        else:
            task = get_task(config["task"], config["host_variant"], vocab_size=dataset.vocab_size,
                            block_size=env_cfg["block_size"])
        host_fields = {k: v for k, v in config["host"].items() if k != "topology"}
        if task.kind == "language_model":  # the vocabulary comes from the dataset's tokenizer
            host_fields.update(vocab_size=dataset.vocab_size)
        host = _host_from_fields(config["host"]["topology"], host_fields)
        label = data_label(dataset)
        env_config = make_env_config(
            task, tuple(env_cfg["slots"]), blueprints=tuple(env_cfg["blueprints"]), host=host,
            episode_epochs=env_cfg["episode_epochs"], steps_per_epoch=env_cfg["steps_per_epoch"],
            batch_size=env_cfg["batch_size"], val_size=env_cfg["val_size"],
            reward=RewardConfig(kind=env_cfg["reward"], rent_weight=setting("rent_weight")),
            # configurations older than the G2 setting ran at Esper's G2, the GateConfig default
            gates=GateConfig(min_training_epochs=env_cfg.get("min_training_epochs", GateConfig().min_training_epochs),
                             auto_advance=setting("auto_advance")),
            actions=ActionConfig(max_concurrent_training=setting("max_concurrent_training"),
                                 min_prune_age=setting("min_prune_age")),
            host_lr=setting("host_lr"), host_lr_schedule=setting("host_lr_schedule"), seed_lr=setting("seed_lr"),
            data_label=label)
        ppo_config = ppo_lib.PPOConfig(**config["ppo"])
        env = MorphogeneticEnv(env_config)
        trainer = ppo_lib.make_train(ppo_config, env, config["checkpoint_every"])
        env_data = make_env_data(env_config, dataset)
    except (ValueError, TypeError) as error:
        raise RunConfigError(str(error)) from None
    placement = Placement.for_devices(config["population"], ppo_config.num_envs, devices)
    env_data = placement.put(env_data, placement.replicated())
    return Built(config, task, env, dataset, env_data, ppo_config, trainer, placement, label)


# ---------------------------------------------------------------------------- population programs


def _add_axis(tree):
    return jax.tree.map(lambda a: a[None], tree)


def _drop_axis(tree):
    return jax.tree.map(lambda a: a[0], tree)


def population_functions(trainer: ppo_lib.Trainer, population: int) -> tuple[Callable, Callable]:
    """``init(seeds[P], hyper[P], data) -> state[P]`` and ``chunk(state[P], data) -> (state, metrics[P, U])``.

    P learners are one ``jax.vmap`` of the learner. For P = 1 the learner runs unbatched and the
    axis is added around it: under ``vmap`` the environment's "compute this blueprint only if some
    env uses it" conditionals become selects that compute every blueprint, which a single learner
    need not pay for."""

    def keys(seeds):
        return jax.vmap(jax.random.key)(seeds)

    if population == 1:
        def init(seeds, hyper, data):
            return _add_axis(trainer.init(keys(seeds)[0], _drop_axis(hyper), data))

        def chunk(state, data):
            return _add_axis(trainer.train_chunk(_drop_axis(state), data))
    else:
        def init(seeds, hyper, data):
            return jax.vmap(trainer.init, in_axes=(0, 0, None))(keys(seeds), hyper, data)

        chunk = jax.vmap(trainer.train_chunk, in_axes=(0, None))
    return init, chunk


@dataclasses.dataclass
class Programs:
    """The compiled population programs of a built run, and the abstract state they produce."""

    init: Callable
    chunk: Callable
    abstract_state: Any          # ShapeDtypeStructs with shardings
    seeds: jax.Array
    hyper: Any


def make_programs(built: Built) -> Programs:
    members = built.config["members"]
    placement = built.placement
    seeds = placement.put(jnp.asarray([m["seed"] for m in members], jnp.uint32), placement.population())
    hyper = placement.put(stack_hyperparams(ppo_lib.Hyperparams.default(built.ppo_config), members),
                          placement.population())
    init, chunk = population_functions(built.trainer, len(members))
    abstract = placement.with_shardings(jax.eval_shape(init, seeds, hyper, built.env_data))
    shardings = placement.state_shardings(abstract)
    if shardings is None:
        init_fn, chunk_fn = jax.jit(init), jax.jit(chunk)
    else:
        init_fn = jax.jit(init, out_shardings=shardings)
        chunk_fn = jax.jit(chunk, out_shardings=(shardings, placement.population()))
    return Programs(init_fn, chunk_fn, abstract, seeds, hyper)


# ---------------------------------------------------------------------------- run directory I/O


def read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def write_json(path: Path, value: Any) -> None:
    """Atomically (write, then rename), so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _json_scalar(value) -> Any:
    value = np.asarray(value)
    if value.dtype == np.bool_:
        return bool(value)
    if np.issubdtype(value.dtype, np.integer):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None  # strict JSON has no NaN


def metric_rows(metrics: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per update from ``{name: [P, U]}``: the member values, and for P > 1 the mean over
    members on top and ``"members"``: one entry per member."""
    names = sorted(metrics, key=lambda n: ({"update": 0, "env_steps": 1}.get(n, 2), n))
    population, updates = np.asarray(metrics["update"]).shape
    rows = []
    for u in range(updates):
        per_member = [{n: _json_scalar(metrics[n][m, u]) for n in names} for m in range(population)]
        if population == 1:
            rows.append(per_member[0])
            continue
        row = {}
        for n in names:
            values = np.asarray(metrics[n][:, u])
            if n in ("update", "env_steps"):  # the same for every member
                row[n] = int(values[0])
            else:
                finite = values[np.isfinite(values.astype(np.float64))]
                row[n] = float(finite.astype(np.float64).mean()) if finite.size else None
        row["members"] = per_member
        rows.append(row)
    return rows


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())  # rows are on disk before the checkpoint that covers them is started


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a row cut short by a kill: it and anything after are not trusted
    return rows


def truncate_rows(path: Path, updates: int) -> None:
    """Keep the rows of updates ``1..updates`` (those a checkpoint covers), drop the rest."""
    rows = read_rows(path)
    kept = rows[:updates]
    if len(kept) < updates or [r["update"] for r in kept] != list(range(1, updates + 1)):
        raise RunConfigError(f"{path} does not hold rows for updates 1..{updates} (the checkpoint's update); "
                             f"the run directory is inconsistent")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in kept:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- summary


def best_window(updates: int) -> int:
    return max(1, math.ceil(updates / 10))


def summarize(config: dict[str, Any], rows: list[dict[str, Any]], **extra) -> dict[str, Any]:
    """Final metrics per member and the best member: the highest mean return over the last tenth
    of the updates (at least one)."""
    population = config["population"]
    per_member = [[r["members"][m] if population > 1 else r for r in rows] for m in range(population)]
    window = best_window(len(rows))
    members, scores = [], []
    for m, member_rows in enumerate(per_member):
        returns = [r.get("mean_return") for r in member_rows[-window:]]
        returns = [v for v in returns if v is not None]
        score = float(np.mean(returns)) if returns else None
        scores.append(-math.inf if score is None else score)
        members.append({"member": m, **config["members"][m], "score": score,
                        "final": member_rows[-1] if member_rows else None})
    best = int(np.argmax(scores)) if rows else None
    return {
        "task": config["task"], "preset": config["preset"], "population": population,
        "synthetic": config["data"]["synthetic"],
        "updates_done": len(rows), "updates": config["updates"],
        "best_member": best, "best_by": f"mean_return averaged over the last {window} update(s)",
        "members": members, **extra,
    }


# ---------------------------------------------------------------------------- training


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    interrupted: bool
    checkpoint: int | None       # newest complete checkpoint (updates done)


def enable_compile_cache(directory: str | os.PathLike[str] | None) -> None:
    """Keep compiled programs on disk (JAX's persistent compilation cache), so that a resumed or
    repeated run skips the compilation (tens of seconds on a CPU). ``None`` leaves it off."""
    if directory is None:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def default_run_dir(config: dict[str, Any]) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config['task']}-{config['preset']}-{stamp}"


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """A fresh run needs an empty (or new) directory; a resumed one needs a run with a checkpoint."""
    if resume:
        if not (run_dir / CONFIG_FILE).exists():
            raise RunConfigError(f"--resume {run_dir}: no run there ({CONFIG_FILE} is missing)")
        if not has_checkpoint(run_dir / CHECKPOINT_DIR):
            partial = " (a save was interrupted before it finished)" if incomplete_checkpoints(
                run_dir / CHECKPOINT_DIR) else ""
            raise RunConfigError(f"--resume {run_dir}: no complete checkpoint to resume from{partial}; "
                                 f"start a new run instead")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise RunConfigError(f"--run-dir {run_dir} exists and is not a directory")
    if run_dir.exists() and any(run_dir.iterdir()):
        hint = (f"; to continue it use --resume {run_dir}" if (run_dir / CONFIG_FILE).exists()
                else "; choose an empty or new directory")
        raise RunConfigError(f"--run-dir {run_dir} is not empty{hint}")


def describe(built: Built, run_dir: Path) -> str:
    c = built.config
    env, ppo = c["env"], built.ppo_config
    host = {k: v for k, v in c["host"].items() if k not in ("topology",)}
    rollout = ppo.rollout_steps or env["episode_epochs"]
    lines = [
        f"task {c['task']} ({c['host_variant']} host variant, {built.env.host_param_count} parameters: "
        f"{c['host']['topology']} {host}) on {built.data_label}",
        f"preset {c['preset']}: {c['preset_description']}",
        f"slots {','.join(env['slots'])}; blueprints {','.join(env['blueprints'])}; reward {env['reward']}",
        f"population {c['population']} x {ppo.num_envs} envs x {env['episode_epochs']}-epoch episodes of "
        f"{env['steps_per_epoch']} batches of {env['batch_size']}; {rollout} env steps per env per update; "
        f"{c['updates']} updates, a checkpoint every {c['checkpoint_every']}",
        f"policy {ppo.recurrent if ppo.recurrent != 'none' else 'mlp'} {ppo.hidden_size}; members "
        + "; ".join(f"{i}: lr {m['learning_rate']:.3g} ent {m['ent_coef']:.3g} seed {m['seed']}"
                    for i, m in enumerate(c["members"][:8]))
        + (f"; ... ({len(c['members'])} in all, see config.json)" if len(c["members"]) > 8 else ""),
        f"devices: {built.placement.describe()}; run directory {run_dir}",
    ]
    if built.synthetic:
        lines.append("NOTE: training on SYNTHETIC data, not the real dataset.")
    return "\n".join(lines)


def _chunk_sizes(done: int, total: int, every: int) -> list[int]:
    """Chunks end at multiples of ``every`` (and at ``total``), wherever the run (re)started."""
    sizes = []
    while done < total:
        n = min(every - done % every, total - done)
        sizes.append(n)
        done += n
    return sizes


def train(config: dict[str, Any], run_dir: str | os.PathLike[str], *, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print) -> RunResult:
    """Train (or continue, ``resume=True``) the run ``config`` in ``run_dir``.

    Ctrl-C (KeyboardInterrupt) is not re-raised: pending saves are finished, the summary of what is
    done is written, and the result says ``interrupted`` and which checkpoint to resume from."""
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume)
    built = build(config)  # user errors (data, names) surface here, before compiling
    checkpoints, metrics_path = run_dir / CHECKPOINT_DIR, run_dir / METRICS_FILE
    started = time.perf_counter()
    programs = make_programs(built)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(checkpoints, keep=config["keep_checkpoints"])
    state = None
    done = 0
    try:
        if resume:
            done, state = ckpt.restore(programs.abstract_state)
            if done > config["updates"]:
                raise RunConfigError(f"--resume {run_dir}: the checkpoint is at update {done}, beyond --updates "
                                     f"{config['updates']}; give a larger --updates to continue")
            truncate_rows(metrics_path, done)  # rows after the checkpoint are computed again
        else:
            metrics_path.touch()
        config["data"]["label"] = built.data_label  # "SYNTHETIC data" or where the real data came from
        config["host"] = {"topology": config["host"]["topology"], **_host_fields(built.env.model.host)}  # + vocabulary
        write_json(run_dir / CONFIG_FILE, config)  # on resume: the new --updates/--keep-checkpoints
    except BaseException:
        ckpt.close()
        raise

    log(describe(built, run_dir))
    if resume:
        log(f"resuming from the checkpoint at update {done} of {config['updates']}" if done < config["updates"] else
            f"the run is complete ({done} updates); give a larger --updates to continue it")
    sizes = _chunk_sizes(done, config["updates"], config["checkpoint_every"])
    interrupted = False
    compile_seconds = train_seconds = 0.0
    steps_run = 0
    bar = None
    saved = done
    try:
        t0 = time.perf_counter()
        if state is None:
            state = programs.init(programs.seeds, programs.hyper, built.env_data)
            ckpt.save(0, state)  # a run stopped during its first chunk can still resume
        compiled = {}
        for n in sorted(set(sizes), reverse=True):
            log(f"compiling {n} update(s) per chunk..." if n == config["checkpoint_every"]
                else f"compiling the last chunk ({n} update(s))...")
            fn = programs.chunk if n == config["checkpoint_every"] else _chunk_program(built, programs, n)
            compiled[n] = fn.lower(programs.abstract_state, built.env_data).compile()
        compile_seconds = time.perf_counter() - t0
        if sizes:
            log(f"initialized and compiled in {compile_seconds:.1f} s; training")
        bar = _progress_bar(config["updates"], done, progress)
        saved = done
        for n in sizes:
            t = time.perf_counter()
            new_state, metrics = compiled[n](state, built.env_data)
            rows = metric_rows(jax.device_get(metrics).columns())  # the one host sync per chunk
            seconds = time.perf_counter() - t
            append_rows(metrics_path, rows)  # on disk before the checkpoint that covers them starts
            state, done = new_state, done + n
            ckpt.save(done, state)  # asynchronous: written while the next chunk trains
            saved = done
            train_seconds += seconds
            steps_run += n * _steps_per_update(built)
            _report(bar, rows[-1], n, n * _steps_per_update(built) / max(seconds, 1e-9), log, done, config["updates"],
                    built.task.has_accuracy)
    except KeyboardInterrupt:
        interrupted = True
        if state is not None and saved != done:  # rows written, save not started: save now
            ckpt.save(done, state)
        truncate_rows(metrics_path, done)  # rows of a chunk cut short are not kept
    finally:
        if bar is not None:
            bar.close()
        ckpt.wait()  # every pending save is on disk before we go on (also on Ctrl-C)
        latest = ckpt.latest_step()
        ckpt.close()
    rows = read_rows(metrics_path)
    summary = summarize(
        config, rows, complete=not interrupted and len(rows) >= config["updates"], checkpoint=latest,
        data=built.data_label, wall_seconds=time.perf_counter() - started, compile_seconds=compile_seconds,
        env_steps=sum(_env_steps(rows[-1], m) for m in range(config["population"])) if rows else 0,
        env_steps_per_second=steps_run / train_seconds if train_seconds else None,
        devices=built.placement.describe())
    write_json(run_dir / SUMMARY_FILE, summary)
    return RunResult(run_dir, summary, interrupted, latest)


def _chunk_program(built: Built, programs: Programs, updates: int):
    """The population chunk program for a chunk of a different length (the last one of a run whose
    ``updates`` is not a multiple of ``checkpoint_every``): a second learner, same state layout."""
    trainer = ppo_lib.make_train(built.ppo_config, built.env, updates)
    _, chunk = population_functions(trainer, built.population)
    shardings = built.placement.state_shardings(programs.abstract_state)
    if shardings is None:
        return jax.jit(chunk)
    return jax.jit(chunk, out_shardings=(shardings, built.placement.population()))


def _steps_per_update(built: Built) -> int:
    rollout = built.ppo_config.rollout_steps or built.config["env"]["episode_epochs"]
    return rollout * built.ppo_config.num_envs * built.population


def _env_steps(row: dict[str, Any], member: int | None = None) -> int:
    """Environment steps of all members (or of one) up to this row."""
    if "members" in row:
        if member is not None:
            return int(row["members"][member]["env_steps"])
        return sum(int(m["env_steps"]) for m in row["members"])
    return int(row["env_steps"])


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="updates", unit="update", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr, smoothing=0.0)


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _report(bar, row: dict[str, Any], n: int, steps_per_second: float, log, done: int, total: int,
            has_accuracy: bool = True) -> None:
    bar.update(n)
    bar.set_postfix({"steps/s": f"{steps_per_second:.1f}", "return": _fmt(row.get("mean_return"))}, refresh=True)
    line = (f"update {done}/{total}: return {_fmt(row.get('mean_return'))}, final val loss "
            f"{_fmt(row.get('mean_final_val_loss'))}, accuracy "
            f"{_fmt(row.get('mean_final_val_accuracy') if has_accuracy else None)}, "
            f"{steps_per_second:.1f} env steps/s; checkpoint {done}")
    if bar.disable:
        log(line)
    else:
        bar.write(line, file=sys.stdout)  # clears the bar (on stderr), prints, redraws it


# ---------------------------------------------------------------------------- loading a run


@dataclasses.dataclass
class RunHandle:
    """A run directory, rebuilt: configuration, env, data, learner, and the restored learner state
    of a checkpoint with its population axis (``state`` leaves ``[P, ...]``)."""

    run_dir: Path
    config: dict[str, Any]
    task: TaskConfig
    env: MorphogeneticEnv
    dataset: Any
    env_data: EnvData
    ppo_config: ppo_lib.PPOConfig
    trainer: ppo_lib.Trainer
    state: Any
    step: int                    # updates done at this checkpoint
    members: list[dict[str, Any]]
    synthetic: bool
    data_label: str
    summary: dict[str, Any] | None

    @property
    def population(self) -> int:
        return len(self.members)

    @property
    def best_member(self) -> int:
        """The summary's best member (member 0 if the run has no summary yet)."""
        best = (self.summary or {}).get("best_member")
        return 0 if best is None else int(best)

    def member_state(self, member: int):
        """The learner state of one member (no population axis)."""
        if not 0 <= member < self.population:
            raise IndexError(f"member {member} out of range: the run has {self.population}")
        return jax.tree.map(lambda a: a[member], self.state)

    def metrics(self) -> list[dict[str, Any]]:
        return read_rows(self.run_dir / METRICS_FILE)


def load_run(run_dir: str | os.PathLike[str], *, step: int | None = None, data: str | None = None,
             data_dir: str | None = None) -> RunHandle:
    """Rebuild a run and restore a checkpoint (default: the newest complete one).

    ``data``/``data_dir`` read the dataset from elsewhere than the run did (e.g. ``data="synthetic"``,
    or the real dataset's directory on another machine). Raises :class:`RunConfigError` or
    :class:`CheckpointError` with a one-line message when the directory is not a usable run."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise RunConfigError(f"{run_dir} is not a run directory ({CONFIG_FILE} is missing)")
    config = read_json(run_dir / CONFIG_FILE)
    if config.get("version") != CONFIG_VERSION:
        raise RunConfigError(f"{run_dir / CONFIG_FILE} has version {config.get('version')}; "
                             f"this code reads version {CONFIG_VERSION}")
    built = build(config, data=data, data_dir=data_dir)
    programs = make_programs(built)
    checkpointer = Checkpointer(run_dir / CHECKPOINT_DIR, read_only=True)
    try:
        restored_step, state = checkpointer.restore(programs.abstract_state, step)
    finally:
        checkpointer.close()
    summary_path = run_dir / SUMMARY_FILE
    return RunHandle(run_dir, config, built.task, built.env, built.dataset, built.env_data, built.ppo_config,
                     built.trainer, state, restored_step, config["members"], built.synthetic, built.data_label,
                     read_json(summary_path) if summary_path.exists() else None)
