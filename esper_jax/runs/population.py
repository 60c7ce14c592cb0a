"""Hyperparameter populations: who the members are, and where they run.

This module owns

* the **sweep grammar** of ``--lr``/``--ent-coef``/``--seeds`` (:func:`parse_sweep`,
  :func:`resolve_members`): one value for every member, a comma list with one value per member,
  or a range drawn per member (``log:LO:HI`` log-uniform, ``lin:LO:HI`` uniform) from a NumPy
  generator seeded by the run seed, so the same flags always give the same members;
* stacking members' hyperparameters into the learner's ``Hyperparams`` with a leading
  population axis (:func:`stack_hyperparams`);
* **sharding** (:class:`Placement`): a ``("pop", "env")`` device mesh over the available devices,
  the population axis split first and the environment axis with what is left, and the
  ``NamedSharding`` of every leaf of the learner state. With one device nothing is sharded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from esper_jax.runs.config import Member, RunConfigError

RANGE_KINDS = ("log", "lin")
SWEEP_HELP = ("one value, a comma list with one value per member, or a range drawn per member: "
              "log:LO:HI (log-uniform) or lin:LO:HI (uniform)")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A parsed sweep value: explicit ``values`` or a range ``kind:low:high``."""

    values: tuple[float, ...] = ()
    kind: str = ""
    low: float = 0.0
    high: float = 0.0

    @property
    def is_range(self) -> bool:
        return bool(self.kind)

    def draw(self, count: int, rng: np.random.Generator) -> tuple[float, ...]:
        if not self.is_range:
            return self.values * count if len(self.values) == 1 else self.values
        u = rng.uniform(size=count)
        if self.kind == "log":
            return tuple(float(v) for v in np.exp(np.log(self.low) + u * (np.log(self.high) - np.log(self.low))))
        return tuple(float(v) for v in self.low + u * (self.high - self.low))


def parse_sweep(name: str, text: str | float | Sequence[float], positive: bool = True,
                maximum: float = math.inf) -> Sweep:
    """``"3e-4"``, ``"1e-4,3e-4"``, ``"log:1e-4:1e-3"`` or ``"lin:0.01:0.1"`` (or numbers), each
    value finite, positive (or non-negative) and at most ``maximum``."""
    if isinstance(text, (int, float)):
        text = repr(float(text))
    elif not isinstance(text, str):
        text = ",".join(repr(float(v)) for v in text)
    text = text.strip()
    try:
        if ":" in text:
            kind, low, high = text.split(":")
            if kind not in RANGE_KINDS:
                raise ValueError
            sweep = Sweep(kind=kind, low=float(low), high=float(high))
            bounds = (sweep.low, sweep.high)
        else:
            sweep = Sweep(values=tuple(float(v) for v in text.split(",")))
            bounds = sweep.values
    except ValueError:
        raise ValueError(f"--{name}: cannot read {text!r}; give {SWEEP_HELP}") from None
    if not all(math.isfinite(v) for v in bounds):
        raise ValueError(f"--{name}: values must be finite, got {text!r}")
    if positive and not all(v > 0 for v in bounds):
        raise ValueError(f"--{name}: values must be positive, got {text!r}")
    if not positive and not all(v >= 0 for v in bounds):
        raise ValueError(f"--{name}: values must be non-negative, got {text!r}")
    if not all(v <= maximum for v in bounds):
        raise ValueError(f"--{name}: values must be at most {maximum:g}, got {text!r}")
    if sweep.is_range and not sweep.low < sweep.high:
        raise ValueError(f"--{name}: a range needs LO < HI, got {text!r}")
    return sweep


def parse_seeds(text: str | Sequence[int]) -> tuple[int, ...]:
    if not isinstance(text, str):
        return tuple(int(s) for s in text)
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--seeds: cannot read {text!r}; give comma-separated integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: duplicate seeds in {text!r}")
    return seeds


def population_size(population: int | None, sweeps: dict[str, Sweep], seeds: tuple[int, ...] | None) -> int:
    """``--population`` if given, else the longest explicit list (ranges need ``--population``)."""
    lengths = {name: len(s.values) for name, s in sweeps.items() if not s.is_range}
    if seeds is not None:
        lengths["seeds"] = len(seeds)
    size = population if population is not None else max([1, *lengths.values()])
    for name, length in lengths.items():
        if length not in (1, size) or (name == "seeds" and length != size):
            raise ValueError(f"--{name.replace('_', '-')} lists {length} values but the population has {size} "
                             f"members; give one value or exactly {size}")
    return size


def resolve_members(population: int | None, learning_rate: Sweep, ent_coef: Sweep, seed: int,
                    seeds: tuple[int, ...] | None = None) -> tuple[Member, ...]:
    """One :class:`~esper_jax.runs.config.Member` per member. Default seeds: ``seed + i``
    (so member 0 of a population is the same learner as a single run with ``--seed``)."""
    size = population_size(population, {"lr": learning_rate, "ent_coef": ent_coef}, seeds)
    rng = np.random.default_rng(seed)  # ranges are drawn in a fixed order: learning rates, then entropy
    lrs = learning_rate.draw(size, rng)
    ents = ent_coef.draw(size, rng)
    seeds = tuple(seed + i for i in range(size)) if seeds is None else seeds
    return tuple(Member(float(lr), float(ent), int(s)) for lr, ent, s in zip(lrs, ents, seeds))


def stack_hyperparams(default_hyper, members):
    """The learner's ``Hyperparams`` with a leading population axis: its defaults for every field
    the members (objects with the fields they set as attributes) do not set, the members'
    learning rate and entropy coefficient."""
    def column(name, default):
        values = [getattr(m, name, default) for m in members]
        return np.asarray(values, dtype=np.asarray(default).dtype)

    fields = {f.name: column(f.name, getattr(default_hyper, f.name)) for f in dataclasses.fields(default_hyper)}
    return default_hyper.replace(**{k: jax.device_put(v) for k, v in fields.items()})


# ---------------------------------------------------------------------------- sharding

# Fields of the learner state whose leaves carry the environment axis right after the population axis.
ENV_AXIS_FIELDS = ("env_state", "obs", "policy_carry", "episode_start", "episode_return")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a population runs: ``mesh`` is None on one device (nothing sharded)."""

    mesh: Mesh | None
    num_envs: int

    @classmethod
    def for_devices(cls, population: int, num_envs: int, devices: Sequence[Any] | None = None) -> "Placement":
        """Split the population axis over as many devices as divide it, then the env axis over what
        is left. (Axes that do not divide evenly are not split: shards must have equal size.)"""
        devices = list(jax.devices() if devices is None else devices)
        pop = math.gcd(population, len(devices))
        env = math.gcd(num_envs, len(devices) // pop)
        processes = len({d.process_index for d in devices})
        if processes > 1 and pop * env != len(devices):
            # A process holding no shard would have nothing to compute and nothing to checkpoint.
            raise RunConfigError(
                f"{processes} processes with {len(devices)} devices in all cannot share a population of {population} "
                f"x {num_envs} envs (it splits over {pop * env} of them); choose --population and --envs so that the "
                f"population axis, then the env axis, split over all {len(devices)}, e.g. --population {len(devices)}")
        if pop * env == 1:
            return cls(None, num_envs)
        return cls(Mesh(np.asarray(devices[:pop * env]).reshape(pop, env), ("pop", "env")), num_envs)

    @property
    def shape(self) -> dict[str, int]:
        return dict(self.mesh.shape) if self.mesh is not None else {"pop": 1, "env": 1}

    def describe(self) -> str:
        if self.mesh is None:
            return f"one device ({jax.devices()[0].platform})"
        shape = self.shape
        processes = len({d.process_index for d in self.mesh.devices.flat})
        where = f" of {processes} processes" if processes > 1 else ""
        return (f"{shape['pop'] * shape['env']} devices{where}: population axis split {shape['pop']} ways, "
                f"env axis {shape['env']} ways")

    def replicated(self):
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    def population(self):
        """Sharding of per-member inputs (keys, hyperparameters): split on the population axis."""
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec("pop"))

    def state_shardings(self, abstract_state):
        """A ``NamedSharding`` per leaf of a population learner state (None on one device)."""
        if self.mesh is None:
            return None
        env_split = self.shape["env"] > 1

        def spec(path, leaf):
            field = getattr(path[0], "name", None) if path else None
            if env_split and field in ENV_AXIS_FIELDS and leaf.ndim >= 2 and leaf.shape[1] == self.num_envs:
                return NamedSharding(self.mesh, PartitionSpec("pop", "env"))
            return NamedSharding(self.mesh, PartitionSpec("pop"))

        return jax.tree_util.tree_map_with_path(spec, abstract_state)

    def put(self, tree, sharding):
        return tree if sharding is None else jax.device_put(tree, sharding)

    def with_shardings(self, abstract_state):
        """``abstract_state`` (ShapeDtypeStructs) with the shardings this placement gives it."""
        shardings = self.state_shardings(abstract_state)
        if shardings is None:
            return abstract_state
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
