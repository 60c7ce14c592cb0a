"""The factored action (op, slot, blueprint, blend style, tempo, alpha target), its per-head
masks computed from the lattice, and applying an action to the lattice.

Masks follow Esper's rules: germinate only into an empty slot and only while no other seed is
GERMINATED or TRAINING; advance only through a passing gate; fossilize only from HOLDING with
G5; prune only a live seed past a minimum age; WAIT is always valid. Which slots are valid
depends on the op, so the slot mask is given per op (``slot_given_op``); a policy samples the
op first, then the slot under that op's mask. A masked-out action is never applied.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
from flax import struct

from esper_jax.lattice import blending, lifecycle
from esper_jax.lattice.grid import Lattice, LatticeState
from esper_jax.lattice.lifecycle import Stage


class Op(enum.IntEnum):
    WAIT = 0
    GERMINATE = 1
    ADVANCE = 2
    SET_ALPHA_TARGET = 3
    PRUNE = 4
    FOSSILIZE = 5


NUM_OPS = len(Op)
ALPHA_TARGETS: tuple[float, ...] = (0.5, 0.75, 1.0)

# Which heads matter for each op; the others are masked out of log-prob, entropy and KL.
HEADS = ("op", "slot", "blueprint", "blend", "tempo", "alpha_target")
RELEVANT_HEADS: dict[Op, tuple[str, ...]] = {
    Op.WAIT: ("op",),
    Op.GERMINATE: ("op", "slot", "blueprint", "blend", "tempo"),
    Op.ADVANCE: ("op", "slot"),
    Op.SET_ALPHA_TARGET: ("op", "slot", "alpha_target"),
    Op.PRUNE: ("op", "slot"),
    Op.FOSSILIZE: ("op", "slot"),
}


@struct.dataclass
class FactoredAction:
    op: jax.Array
    slot: jax.Array
    blueprint: jax.Array
    blend: jax.Array
    tempo: jax.Array
    alpha_target: jax.Array

    @classmethod
    def make(cls, op=Op.WAIT, slot=0, blueprint=0, blend=0, tempo=0, alpha_target=0) -> "FactoredAction":
        i = lambda v: jnp.asarray(v, jnp.int32)
        return cls(i(op), i(slot), i(blueprint), i(blend), i(tempo), i(alpha_target))

    @classmethod
    def wait(cls) -> "FactoredAction":
        return cls.make()


@dataclasses.dataclass(frozen=True)
class ActionConfig:
    min_prune_age: int = 1            # epochs a seed must live before it may be pruned
    ramped_prune: bool = True         # prune by ramping alpha down over the seed's tempo
    max_concurrent_training: int = 1  # Esper: germinate only while no seed is GERMINATED/TRAINING


@dataclasses.dataclass(frozen=True)
class ActionSpace:
    num_slots: int
    num_blueprints: int
    num_blends: int = len(blending.BLEND_STYLES)
    num_tempos: int = len(blending.TEMPOS)
    num_alpha_targets: int = len(ALPHA_TARGETS)

    @classmethod
    def for_lattice(cls, lattice: Lattice) -> "ActionSpace":
        return cls(lattice.slots.num_slots, lattice.num_blueprints)

    def head_sizes(self) -> dict[str, int]:
        return {"op": NUM_OPS, "slot": self.num_slots, "blueprint": self.num_blueprints, "blend": self.num_blends,
                "tempo": self.num_tempos, "alpha_target": self.num_alpha_targets}


@struct.dataclass
class ActionMasks:
    op: jax.Array             # [NUM_OPS] bool
    slot_given_op: jax.Array  # [NUM_OPS, S] bool
    blueprint: jax.Array      # [NB] bool
    blend: jax.Array          # [NBS] bool
    tempo: jax.Array          # [NT] bool
    alpha_target: jax.Array   # [NA] bool

    def is_valid(self, action: FactoredAction) -> jax.Array:
        op = jnp.clip(action.op, 0, NUM_OPS - 1)
        in_range = (action.op >= 0) & (action.op < NUM_OPS)
        slot_ok = _at(self.slot_given_op[op], action.slot)
        germinate_ok = _at(self.blueprint, action.blueprint) & _at(self.blend, action.blend) & _at(self.tempo, action.tempo)
        alpha_ok = _at(self.alpha_target, action.alpha_target)
        ok = jnp.select(
            [op == Op.WAIT, op == Op.GERMINATE, op == Op.SET_ALPHA_TARGET],
            [jnp.asarray(True), slot_ok & germinate_ok, slot_ok & alpha_ok],
            slot_ok,
        )
        return in_range & self.op[op] & ok


def _at(mask: jax.Array, index: jax.Array) -> jax.Array:
    inside = (index >= 0) & (index < mask.shape[-1])
    return inside & mask[jnp.clip(index, 0, mask.shape[-1] - 1)]


def action_masks(lattice: Lattice, state: LatticeState, config: ActionConfig = ActionConfig()) -> ActionMasks:
    st = state.status
    gates = lattice.gates
    training_now = jnp.sum(lifecycle.in_stages(st.stage, (Stage.GERMINATED, Stage.TRAINING)))
    germinate = (st.stage == Stage.DORMANT) & (training_now < config.max_concurrent_training)
    advance = lifecycle.gates_passed(st, gates)
    set_alpha = lifecycle.in_stages(st.stage, (Stage.BLENDING, Stage.HOLDING)) & ~st.pruning
    prune = lifecycle.in_stages(st.stage, lifecycle.LIVE_STAGES) & ~st.pruning & (st.seed_age >= config.min_prune_age)
    fossilize = lifecycle.gate_g5(st, gates)
    wait = jnp.ones_like(germinate)
    slot_given_op = jnp.stack([wait, germinate, advance, set_alpha, prune, fossilize])
    space = ActionSpace.for_lattice(lattice)
    return ActionMasks(
        op=slot_given_op.any(axis=1),
        slot_given_op=slot_given_op,
        blueprint=jnp.ones((space.num_blueprints,), bool),
        blend=jnp.ones((space.num_blends,), bool),
        tempo=jnp.ones((space.num_tempos,), bool),
        alpha_target=jnp.ones((space.num_alpha_targets,), bool),
    )


def apply_action(lattice: Lattice, state: LatticeState, action: FactoredAction, key: jax.Array,
                 config: ActionConfig = ActionConfig()):
    """Apply a valid action; an invalid (masked-out) one changes nothing. Returns (state, applied)."""
    valid = action_masks(lattice, state, config).is_valid(action)
    targets = jnp.asarray(ALPHA_TARGETS, jnp.float32)
    branches = [
        lambda s: (s, jnp.asarray(True)),
        lambda s: lattice.germinate(s, action.slot, action.blueprint, action.blend, action.tempo, key),
        lambda s: lattice.advance(s, action.slot),
        lambda s: lattice.set_alpha_target(s, action.slot, targets[jnp.clip(action.alpha_target, 0, len(ALPHA_TARGETS) - 1)]),
        lambda s: lattice.prune(s, action.slot, ramp=config.ramped_prune),
        lambda s: lattice.fossilize(s, action.slot),
    ]
    op = jnp.where(valid, jnp.clip(action.op, 0, NUM_OPS - 1), Op.WAIT)
    new_state, applied = jax.lax.switch(op, branches, state)
    return new_state, valid & applied
