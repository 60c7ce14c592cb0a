"""The typed configuration of a training run, and its one JSON form (``config.json``).

A :class:`RunConfig` is everything needed to rebuild a run: the task and the host actually used,
the data source, the inner environment (:class:`EnvSpec`), the learner (``PPOConfig``), the
members of the population, the run's length and checkpoints, the further tasks a mixed run also
trains on (``--mix``, each a :class:`RunConfig` of its own), and the command-line options it was
resolved from (kept so that ``--resume`` can compare options given again). A built-in host is
written as its fields; a user's own (:class:`~esper_jax.lattice.hosts.FlaxHost`) as the import path
it came from (``module:function``), its input and a digest of its parameters' shapes, and is rebuilt
by importing that path again: the code must still be importable, and still build the same network. Every section is
a frozen dataclass; :meth:`RunConfig.to_json`/:meth:`RunConfig.from_json` are the only place the
JSON layout is spelled, and :func:`read_config` turns a missing, damaged or foreign file into one
clear line (:class:`RunConfigError`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from esper_jax.data import SYNTHETIC
from esper_jax.data.augment import Augment
from esper_jax.env.problems import ProblemFamily
from esper_jax.env.rewards import RewardKind
from esper_jax.env.tasks import LANGUAGE_MODEL_TASKS, TaskKind
from esper_jax.lattice.hosts import CNNHost, FlaxHost, HostImportError, TransformerHost, import_host
from esper_jax.lattice.optim import LRSchedule, OptimizerKind
from esper_jax.lattice.slots import Topology
from esper_jax.rl.ppo import PPOConfig

CONFIG_VERSION = 1
CONFIG_FILE = "config.json"

Host = CNNHost | TransformerHost | FlaxHost
# The host variant a run with a user's own host (--host) records: the task's variants name built-in hosts.
USER_HOST_VARIANT = "user"


class RunConfigError(ValueError):
    """A configuration or run directory the user has to fix; the message is one line."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the run's data comes from. ``label`` says so in every output: "SYNTHETIC data", or
    the real data's origin (filled in when the data is loaded). ``fingerprint``: for a user's own
    image dataset (``images``, ``tfds:NAME``), the digest of its arrays when the run started
    (:func:`~esper_jax.data.datasets.image_fingerprint`), so that a resumed or evaluated run refuses
    data that changed since."""

    source: str                      # "auto" (the data dir), "synthetic", a directory, or (images) the .npz file
    data_dir: str | None = None
    tokenizer: str | None = None     # language-model tasks: "gpt2" | "byte"
    synthetic_train: int | None = None
    synthetic_test: int | None = None
    label: str | None = None
    fingerprint: str | None = None

    @property
    def synthetic(self) -> bool:
        return self.source == SYNTHETIC


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """The inner environment. Defaults are what a configuration written before a setting existed
    ran at."""

    episode_epochs: int
    steps_per_epoch: int
    batch_size: int
    val_size: int
    slots: tuple[str, ...]
    blueprints: tuple[str, ...]
    reward: RewardKind = "loss"
    min_training_epochs: int = 10    # Esper's G2, the lifecycle default, before the setting existed
    rent_weight: float = 0.05
    max_concurrent_training: int = 1
    min_prune_age: int = 1
    auto_advance: bool = False
    host_lr: float = 0.01
    host_lr_schedule: LRSchedule = "constant"
    seed_lr: float = 0.01
    optimizer: OptimizerKind = "sgd"  # host and seeds
    block_size: int | None = None    # language-model tasks: tokens per training window
    # the problem family each env draws from (esper_jax.env.problems); the default is one problem
    train_fraction: tuple[float, float] = (1.0, 1.0)
    label_noise: tuple[float, float] = (0.0, 0.0)
    compute_weight: float = 0.0      # the reward's price of compute (esper_jax.env.rewards.compute_price)
    augment: Augment = "crop_flip"   # image tasks' training augmentation (EnvConfig.augment)
    seal: bool = False               # the SEAL op: no more germinations this episode (esper_jax.env.actions)

    @property
    def problems(self) -> ProblemFamily:
        """The problem family the run's envs draw from."""
        return ProblemFamily(self.train_fraction, self.label_noise)


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """Imitation before PPO (:mod:`esper_jax.rl.imitation`): ``teacher`` is a controller's name
    (heuristic, random, static) or a fixed schedule (``blueprint@slot@eN[+...]``)."""

    teacher: str
    rounds: int
    epochs: int


@dataclasses.dataclass(frozen=True)
class Member:
    """One learner of a population: its own learning rate, entropy coefficient and seed."""

    learning_rate: float
    ent_coef: float
    seed: int


@dataclasses.dataclass(frozen=True)
class RunConfig:
    task: str
    host_variant: str
    host: Host
    data: DataSpec
    env: EnvSpec
    ppo: PPOConfig
    members: tuple[Member, ...]
    preset: str
    preset_description: str
    updates: int
    checkpoint_every: int
    keep_checkpoints: int
    seed: int
    # The command-line options as resolved for this task (canonical forms), compared with the
    # options given again on --resume.
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    warm_start: WarmStart | None = None
    # Further tasks the learner trains on in the same updates (--mix): each one's configuration under
    # the run's preset, sharing the run's learner settings (esper_jax.rl.plans.TaskMenu).
    mix: tuple["RunConfig", ...] = ()

    @property
    def topology(self) -> Topology:
        return self.host.topology

    @property
    def kind(self) -> TaskKind:
        """A language-model task's or a classification's: the task decides, not the host's topology
        (a user's transformer host may classify images)."""
        return "language_model" if self.task in LANGUAGE_MODEL_TASKS else "classification"

    @property
    def population(self) -> int:
        return len(self.members)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "task": self.task,
            "host_variant": self.host_variant,
            "host": _host_json(self.host),
            "data": {**dataclasses.asdict(self.data), "synthetic": self.data.synthetic},
            "preset": self.preset,
            "preset_description": self.preset_description,
            "env": {**dataclasses.asdict(self.env), "slots": list(self.env.slots),
                    "blueprints": list(self.env.blueprints)},
            "ppo": dataclasses.asdict(self.ppo),
            "population": self.population,
            "members": [dataclasses.asdict(m) for m in self.members],
            "updates": self.updates,
            "checkpoint_every": self.checkpoint_every,
            "keep_checkpoints": self.keep_checkpoints,
            "seed": self.seed,
            "settings": dict(self.options),
            "warm_start": None if self.warm_start is None else dataclasses.asdict(self.warm_start),
            "mix": [task.to_json() for task in self.mix],
        }

    @classmethod
    def from_json(cls, value: Any) -> "RunConfig":
        """The configuration of ``to_json``'s form; :class:`RunConfigError` names what is wrong."""
        if not isinstance(value, dict):
            raise RunConfigError("the configuration is not a JSON object")
        if value.get("version") != CONFIG_VERSION:
            raise RunConfigError(f"the configuration has version {value.get('version')!r}; this code reads "
                                 f"version {CONFIG_VERSION}")
        try:
            host = _host_from_json(dict(value["host"]))
            data = {k: v for k, v in value["data"].items() if k != "synthetic"}
            env = dict(value["env"])
            env.update(slots=tuple(env["slots"]), blueprints=tuple(env["blueprints"]))
            env.update({name: tuple(env[name]) for name in ("train_fraction", "label_noise") if name in env})
            known = {f.name for f in dataclasses.fields(EnvSpec)}
            warm_start = value.get("warm_start")  # absent from configurations written before it existed
            return cls(
                task=value["task"], host_variant=value["host_variant"], host=host,
                data=DataSpec(**data), env=EnvSpec(**{k: v for k, v in env.items() if k in known}),
                ppo=PPOConfig(**value["ppo"]), members=tuple(Member(**m) for m in value["members"]),
                preset=value["preset"], preset_description=value.get("preset_description", ""),
                updates=value["updates"], checkpoint_every=value["checkpoint_every"],
                keep_checkpoints=value["keep_checkpoints"], seed=value["seed"], options=dict(value.get("settings", {})),
                warm_start=None if warm_start is None else WarmStart(**warm_start),
                mix=tuple(cls.from_json(task) for task in value.get("mix", [])),  # absent before --mix existed
            )
        except RunConfigError:
            raise
        except KeyError as error:
            raise RunConfigError(f"the configuration lacks {error.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise RunConfigError(f"the configuration is not valid: {' '.join(str(error).split())}") from None


def _host_json(host: Host) -> dict[str, Any]:
    if not isinstance(host, FlaxHost):
        return {"topology": host.topology, **{f.name: getattr(host, f.name) for f in dataclasses.fields(host) if f.init}}
    if host.source is None:
        raise RunConfigError("a FlaxHost made in code cannot be written into config.json: a run rebuilds a user's host "
                             "from its import path; make it with import_host('module:function') (or --host)")
    return {"topology": host.topology, "import": host.source, "example_shape": list(host.example_shape),
            "input_dtype": host.input_dtype, "parameters": host.parameter_digest}


def _host_from_json(fields: dict[str, Any]) -> Host:
    """The host of ``to_json``'s form: a built-in host from its fields, a user's by importing it
    again, refused unless it still builds the network the run recorded."""
    topology = fields.pop("topology")
    if "import" not in fields:
        return {"cnn": CNNHost, "transformer": TransformerHost}[topology](**fields)
    path, shape = fields["import"], tuple(fields["example_shape"])
    try:
        host = import_host(path, shape)
    except HostImportError as error:
        raise RunConfigError(f"the run's host cannot be rebuilt: {error}") from None
    recorded = (topology, shape, fields.get("input_dtype", "float32"), fields["parameters"])
    now = (host.topology, host.example_shape, host.input_dtype, host.parameter_digest)
    if now != recorded:
        what = [name for name, a, b in zip(("topology", "input shape", "input dtype", "parameters"), now, recorded)
                if a != b]
        raise RunConfigError(f"{path} now builds a different host than the run's (its {', '.join(what)} changed: "
                             f"{host.describe()}); restore the code the run started with, or start a new run")
    return host


def read_config(run_dir: str | Path) -> RunConfig:
    """The configuration of the run in ``run_dir``, or one line saying why there is none."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunConfigError(f"{run_dir} is not a run directory ({CONFIG_FILE} is missing)")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunConfigError(f"{path} is damaged (not valid JSON: {error}); restore it from a copy, or start a "
                             f"new run") from None
    except OSError as error:
        raise RunConfigError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return RunConfig.from_json(value)
    except RunConfigError as error:
        raise RunConfigError(f"{path}: {error}") from None
