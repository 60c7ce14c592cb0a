"""Slot ids on the morphogenetic grid (``r{row}c{col}``) and the static slot configuration.

Slots are addressed by canonical ids only. Legacy names from Esper (``early``, ``mid``,
``late``) and malformed ids are errors whose message names the canonical form, so a
typo never silently selects another slot. Which id a legacy name meant depends on the host's
layout; :func:`esper_jax.lattice.hosts.base.slot_config_for` names it for the host at hand.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Literal

_SLOT_ID = re.compile(r"r(0|[1-9][0-9]*)c(0|[1-9][0-9]*)")  # used with fullmatch: "$" would accept "r0c0\n"
LEGACY_NAMES = ("early", "mid", "late")

Topology = Literal["cnn", "transformer"]
TOPOLOGIES: tuple[Topology, ...] = ("cnn", "transformer")


def format_slot_id(row: int, col: int) -> str:
    """Canonical id of the slot at (row, col)."""
    if isinstance(row, bool) or isinstance(col, bool) or not isinstance(row, int) or not isinstance(col, int):
        raise TypeError(f"slot coordinates must be integers, got row={row!r}, col={col!r}")
    if row < 0 or col < 0:
        raise ValueError(f"slot coordinates must be non-negative, got row={row}, col={col}")
    return f"r{row}c{col}"


def parse_slot_id(slot_id: str) -> tuple[int, int]:
    """(row, col) of a canonical slot id; ``ValueError`` naming the canonical form otherwise."""
    if not isinstance(slot_id, str):
        raise ValueError(f"slot id must be a string like 'r0c0', got {slot_id!r}")
    match = _SLOT_ID.fullmatch(slot_id)
    if match is None:
        stripped = slot_id.strip().lower()
        if stripped in LEGACY_NAMES:
            hint = "legacy slot names are not supported; use the host's canonical ids r{row}c{col}"
        else:
            hint = "use the canonical form r{row}c{col}, e.g. r0c0, r0c1, r1c0"
        raise ValueError(f"invalid slot id {slot_id!r}: {hint} (use r0c0 for the first slot)")
    return int(match.group(1)), int(match.group(2))


def validate_slot_id(slot_id: str) -> str:
    """Return ``slot_id`` unchanged if canonical, else raise ``ValueError``."""
    parse_slot_id(slot_id)
    return slot_id


def is_valid_slot_id(slot_id: object) -> bool:
    return isinstance(slot_id, str) and _SLOT_ID.fullmatch(slot_id) is not None


def slot_sort_key(slot_id: str) -> tuple[int, int]:
    """Row-major ordering key: r0c0 < r0c1 < r0c10 < r1c0."""
    return parse_slot_id(slot_id)


def sort_slot_ids(slot_ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(slot_ids, key=slot_sort_key))


def split_slot_list(text: str) -> list[str]:
    """The words of a CLI value like ``"r0c0,r0c1"`` (commas or spaces), as given: not validated."""
    return [part.strip() for part in text.replace(" ", ",").split(",") if part.strip()]


def parse_slot_list(text: str) -> tuple[str, ...]:
    """Parse a CLI value like ``"r0c0,r0c1"`` into validated, row-major sorted ids."""
    ids = split_slot_list(text)
    if not ids:
        raise ValueError("no slot ids given: use e.g. --slots r0c0,r0c1")
    for slot_id in ids:
        validate_slot_id(slot_id)
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate slot ids in {text!r}")
    return sort_slot_ids(ids)


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    """One injection point: its id, the feature width there, and the host topology.

    ``parallel`` says what a seed there reads. ``False``: the activation at the point, its
    residual added to it (a new stage in depth). ``True``: the input of the host segment that
    ends at the point, its residual joining that segment's output, so the seed runs beside the
    segment and widens it (extra attention heads beside a transformer layer's attention).
    """

    slot_id: str
    dim: int
    topology: Topology
    parallel: bool = False

    def __post_init__(self):
        validate_slot_id(self.slot_id)
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {self.topology!r}; expected one of {TOPOLOGIES}")
        if self.dim <= 0:
            raise ValueError(f"slot {self.slot_id}: dim must be positive, got {self.dim}")
        if not isinstance(self.parallel, bool):
            raise TypeError(f"slot {self.slot_id}: parallel must be True or False, got {self.parallel!r}")


@dataclasses.dataclass(frozen=True)
class SlotConfig:
    """Static, hashable description of the active slots, in row-major (action-space) order.

    ``execution_order`` is the order the forward pass visits the slots; it comes from the
    host's injection points and may differ from the row-major action order.
    """

    slots: tuple[SlotSpec, ...]
    execution_order: tuple[str, ...]

    def __post_init__(self):
        ids = tuple(s.slot_id for s in self.slots)
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate slot ids: {ids}")
        if ids != sort_slot_ids(ids):
            raise ValueError(f"slots must be in row-major order {sort_slot_ids(ids)}, got {ids}")
        if sorted(self.execution_order) != sorted(ids):
            raise ValueError(f"execution order {self.execution_order} must list exactly the slots {ids}")
        if len({s.topology for s in self.slots}) > 1:
            raise ValueError("all slots of one model share the host's topology")

    @property
    def slot_ids(self) -> tuple[str, ...]:
        return tuple(s.slot_id for s in self.slots)

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def topology(self) -> str:
        return self.slots[0].topology

    def index(self, slot_id: str) -> int:
        validate_slot_id(slot_id)
        try:
            return self.slot_ids.index(slot_id)
        except ValueError:
            raise ValueError(f"slot {slot_id} is not configured; available slots: {', '.join(self.slot_ids)}") from None

    def spec(self, slot_id: str) -> SlotSpec:
        return self.slots[self.index(slot_id)]
