"""The blueprint registry: one decorated definition adds a blueprint, and the action space
of each topology is derived from what is registered.

A blueprint maps a host activation ``h`` to a *residual* ``r`` (see :mod:`esper_jax.lattice.blending`)
and must return exactly zero at germination so that planting a seed never shocks the host.

Each blueprint names its *role*, what it adds to a host whatever the host (:data:`ROLES`), so that a
controller can tell blueprints of different hosts apart by what they do rather than by their names
(:mod:`esper_jax.env.descriptors`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, get_args

import jax
import numpy as np

from esper_jax.lattice.slots import TOPOLOGIES, Topology

Params = Any

# What a blueprint adds: normalization; context (mixing across positions or channels' global
# statistics: attention, a spatial kernel beside the host's); width (a wider layer beside the host's);
# depth (a new nonlinear stage); adapter (a low-rank update of the activation); other.
Role = Literal["normalization", "context", "width", "depth", "adapter", "other"]
ROLES: tuple[Role, ...] = get_args(Role)

# Names used for other per-slot trainable units, so no blueprint may take them.
RESERVED_NAMES = frozenset({"gate"})


@dataclasses.dataclass(frozen=True)
class Blueprint:
    name: str
    topology: Topology
    description: str
    init: Callable[[jax.Array, int], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    role: Role = "other"

    def num_params(self, dim: int) -> int:
        """Exact parameter count at width ``dim`` (derived from ``init``, never hand-written)."""
        return _count_params(self, dim)

    @property
    def is_noop(self) -> bool:
        return self.num_params(4) == 0


@functools.cache
def _count_params(blueprint: Blueprint, dim: int) -> int:
    # Cached: the forward asks for it while tracing, and eval_shape re-traces ``init``.
    shapes = jax.eval_shape(lambda key: blueprint.init(key, dim), jax.random.key(0))
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)))


_REGISTRY: dict[str, dict[str, Blueprint]] = {topology: {} for topology in TOPOLOGIES}


def register_blueprint(name: str, topology: str, description: str = "", role: Role = "other"):
    """Class decorator: the class provides ``init(key, dim)`` and ``apply(params, h)`` as staticmethods;
    ``role`` says what it adds (:data:`ROLES`)."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; expected one of {TOPOLOGIES}")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} for blueprint {name!r}; roles are: {', '.join(ROLES)}")
    if name in RESERVED_NAMES:
        raise ValueError(f"blueprint name {name!r} is reserved")

    def decorator(cls):
        if name in _REGISTRY[topology]:
            raise ValueError(f"blueprint {topology}:{name} is already registered")
        _REGISTRY[topology][name] = Blueprint(name, topology, description or (cls.__doc__ or "").strip(), cls.init,
                                              cls.apply, role)
        return cls

    return decorator


def blueprints_for(topology: str) -> tuple[Blueprint, ...]:
    """Blueprints of a topology in registration order: the blueprint head's action order."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; expected one of {TOPOLOGIES}")
    _load_builtin()
    return tuple(_REGISTRY[topology].values())


def blueprint_names(topology: str) -> tuple[str, ...]:
    return tuple(b.name for b in blueprints_for(topology))


def blueprint_index(topology: str, name: str) -> int:
    """Index of ``name`` in the topology's action order; a clear error for the wrong topology."""
    names = blueprint_names(topology)
    if name in names:
        return names.index(name)
    owners = [t for t in TOPOLOGIES if name in _REGISTRY[t]]
    if owners:
        raise ValueError(
            f"blueprint {name!r} is a {owners[0]} blueprint and is not valid for a {topology} host; "
            f"{topology} blueprints are: {', '.join(names)}"
        )
    raise ValueError(f"unknown blueprint {name!r}; {topology} blueprints are: {', '.join(names)}")


def get_blueprint(topology: str, name: str) -> Blueprint:
    return blueprints_for(topology)[blueprint_index(topology, name)]


def _load_builtin():
    # Importing the modules runs their decorators; deferred to avoid an import cycle.
    from esper_jax.lattice.blueprints import cnn, transformer  # noqa: F401
