"""What the morphogenetic forward needs from a host: injection points and segment forwards.

A host's forward is ``head(segment_{n-1}(... segment_0(stem(x))))``; injection point ``k``
sits right after ``segment_k``, and a seed there reads either the activation at the point or,
at a ``parallel`` point (:class:`~esper_jax.lattice.slots.SlotSpec`), the input of
``segment_k``. The stem maps the raw input to the first activation (token ids to embeddings)
so that every segment, and so every seed, works on activations. A segment may be the identity
where two points sit at the same place in the forward (a transformer layer's output: the point
beside its MLP, then the point after the layer). Hosts are frozen (hashable) configuration
objects whose methods are pure functions of explicit parameters, so they can be closed over by
``jit``.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

from esper_jax.lattice.slots import SlotConfig, SlotSpec, Topology, sort_slot_ids, validate_slot_id

Params = Any


class Host(Protocol):
    topology: Topology

    def init(self, key: jax.Array) -> Params: ...

    @property
    def injection_points(self) -> tuple[SlotSpec, ...]:
        """Every injection point of this host, in forward execution order."""
        ...

    @property
    def default_slots(self) -> tuple[str, ...]:
        """The slots a run grows in when none are chosen."""
        ...

    def stem(self, params: Params, x: jax.Array) -> jax.Array:
        """The first activation, the input of ``segment_0``."""
        ...

    def segment(self, params: Params, index: int, h: jax.Array) -> jax.Array: ...

    def head(self, params: Params, h: jax.Array) -> jax.Array: ...

    def loss(self, output: jax.Array, targets: jax.Array) -> jax.Array:
        """Mean training loss of one member's batch (a scalar)."""
        ...


def host_forward(host: Host, params: Params, x: jax.Array) -> jax.Array:
    """The host alone, without any slot."""
    h = host.stem(params, x)
    for index in range(len(host.injection_points)):
        h = host.segment(params, index, h)
    return host.head(params, h)


def legacy_slot_ids(host: Host) -> dict[str, str]:
    """What Esper's ``early``/``mid``/``late`` meant on this host: its first, middle and last
    default slot (on the CNN host the residual streams after blocks 0, 1 and 2)."""
    slots = host.default_slots
    return {"early": slots[0], "mid": slots[len(slots) // 2], "late": slots[-1]}


def slot_config_for(host: Host, slot_ids) -> SlotConfig:
    """Validate ``slot_ids`` against the host's injection points and build the slot configuration."""
    points = {p.slot_id: p for p in host.injection_points}
    chosen = []
    legacy = legacy_slot_ids(host)
    for slot_id in slot_ids:
        name = slot_id.strip().lower() if isinstance(slot_id, str) else None
        if name in legacy:
            raise ValueError(f"invalid slot id {slot_id!r}: legacy slot names are not supported; on this "
                             f"{host.topology} host {name} is {legacy[name]} (early, mid, late: "
                             f"{', '.join(legacy.values())})")
        validate_slot_id(slot_id)
        if slot_id not in points:
            raise ValueError(
                f"slot {slot_id} does not exist on this {host.topology} host; "
                f"its injection points are: {', '.join(sort_slot_ids(points))}"
            )
        chosen.append(slot_id)
    ordered = sort_slot_ids(chosen)
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"duplicate slot ids in {list(slot_ids)}")
    execution = tuple(p.slot_id for p in host.injection_points if p.slot_id in ordered)
    return SlotConfig(slots=tuple(points[s] for s in ordered), execution_order=execution)
