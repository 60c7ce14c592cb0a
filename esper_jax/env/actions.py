"""The factored action (op, slot, blueprint, blend style, tempo, alpha target), its per-head
masks computed from the lattice, and applying an action to the lattice.

Masks follow Esper's rules: germinate only into an empty slot and only while no other seed is
GERMINATED or TRAINING; advance only through a passing gate; fossilize only from HOLDING with
G5; prune only a live seed past a minimum age; WAIT is always valid. Which slots are valid
depends on the op, so the slot mask is given per op (``slot_given_op``); a policy samples the
op first, then the slot under that op's mask. A masked-out action is never applied.

SEAL (an option of the action space, ``ActionConfig.seal``; off, the op head has the six ops it
always had) ends germination for the rest of the episode in one action: the seeds already planted
go on through their lifecycle, nothing new is planted. Why it exists: deciding "germinate" afresh
every epoch makes *do not grow on this problem* a run of twenty-odd waits, each of which changes
the episode little on its own, while growing is one sample away at every one of them; with SEAL it
is one decision whose consequence the return measures. The sealed flag is the environment's
(``EnvState.sealed``); the masks take it as an argument.
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
    SEAL = 6  # only where ActionConfig.seal: no germination for the rest of the episode


NUM_OPS = len(Op)  # every op; an action space without SEAL has the first NUM_OPS - 1


def op_count(seal: bool) -> int:
    """The op head's size: every op with SEAL, the six before it without."""
    return NUM_OPS if seal else int(Op.SEAL)

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
    Op.SEAL: ("op",),
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
    seal: bool = False                # the SEAL op (module docstring)

    @property
    def num_ops(self) -> int:
        return op_count(self.seal)


@dataclasses.dataclass(frozen=True)
class ActionSpace:
    num_slots: int
    num_blueprints: int
    num_ops: int = op_count(False)
    num_blends: int = len(blending.BLEND_STYLES)
    num_tempos: int = len(blending.TEMPOS)
    num_alpha_targets: int = len(ALPHA_TARGETS)

    @classmethod
    def for_lattice(cls, lattice: Lattice, config: ActionConfig = ActionConfig()) -> "ActionSpace":
        return cls(lattice.slots.num_slots, lattice.num_blueprints, config.num_ops)

    def head_sizes(self) -> dict[str, int]:
        return {"op": self.num_ops, "slot": self.num_slots, "blueprint": self.num_blueprints, "blend": self.num_blends,
                "tempo": self.num_tempos, "alpha_target": self.num_alpha_targets}


@struct.dataclass
class ActionMasks:
    op: jax.Array             # [num_ops] bool
    slot_given_op: jax.Array  # [num_ops, S] bool
    blueprint: jax.Array      # [NB] bool
    blend: jax.Array          # [NBS] bool
    tempo: jax.Array          # [NT] bool
    alpha_target: jax.Array   # [NA] bool

    def is_valid(self, action: FactoredAction) -> jax.Array:
        num_ops = self.op.shape[-1]
        op = jnp.clip(action.op, 0, num_ops - 1)
        in_range = (action.op >= 0) & (action.op < num_ops)
        slot_ok = _at(self.slot_given_op[op], action.slot)
        germinate_ok = _at(self.blueprint, action.blueprint) & _at(self.blend, action.blend) & _at(self.tempo, action.tempo)
        alpha_ok = _at(self.alpha_target, action.alpha_target)
        ok = jnp.select(
            [(op == Op.WAIT) | (op == Op.SEAL), op == Op.GERMINATE, op == Op.SET_ALPHA_TARGET],
            [jnp.asarray(True), slot_ok & germinate_ok, slot_ok & alpha_ok],
            slot_ok,
        )
        return in_range & self.op[op] & ok


def _at(mask: jax.Array, index: jax.Array) -> jax.Array:
    inside = (index >= 0) & (index < mask.shape[-1])
    return inside & mask[jnp.clip(index, 0, mask.shape[-1] - 1)]


def action_masks(lattice: Lattice, state: LatticeState, config: ActionConfig = ActionConfig(),
                 sealed: jax.Array | bool = False) -> ActionMasks:
    """The legal actions; ``sealed``: whether the episode's SEAL was taken (only with ``config.seal``)."""
    st = state.status
    gates = lattice.gates
    training_now = jnp.sum(lifecycle.in_stages(st.stage, (Stage.GERMINATED, Stage.TRAINING)))
    germinate = (st.stage == Stage.DORMANT) & (training_now < config.max_concurrent_training)
    advance = lifecycle.gates_passed(st, gates)
    set_alpha = lifecycle.in_stages(st.stage, (Stage.BLENDING, Stage.HOLDING)) & ~st.pruning
    prune = lifecycle.in_stages(st.stage, lifecycle.LIVE_STAGES) & ~st.pruning & (st.seed_age >= config.min_prune_age)
    fossilize = lifecycle.gate_g5(st, gates)
    wait = jnp.ones_like(germinate)
    rows = [wait, germinate, advance, set_alpha, prune, fossilize]
    if config.seal:
        rows[Op.GERMINATE] = germinate & ~sealed
        rows.append(wait & ~sealed)  # SEAL once; after it, WAIT does what a second SEAL would
    slot_given_op = jnp.stack(rows)
    space = ActionSpace.for_lattice(lattice, config)
    return ActionMasks(
        op=slot_given_op.any(axis=1),
        slot_given_op=slot_given_op,
        blueprint=jnp.ones((space.num_blueprints,), bool),
        blend=jnp.ones((space.num_blends,), bool),
        tempo=jnp.ones((space.num_tempos,), bool),
        alpha_target=jnp.ones((space.num_alpha_targets,), bool),
    )


def apply_action(lattice: Lattice, state: LatticeState, action: FactoredAction, key: jax.Array,
                 config: ActionConfig = ActionConfig(), sealed: jax.Array | bool = False):
    """Apply a valid action; an invalid (masked-out) one changes nothing. Returns (state, applied).
    SEAL leaves the lattice as it is: the environment records it (``EnvState.sealed``)."""
    valid = action_masks(lattice, state, config, sealed).is_valid(action)
    targets = jnp.asarray(ALPHA_TARGETS, jnp.float32)
    unchanged = lambda s: (s, jnp.asarray(True))  # WAIT, and SEAL (which the environment records)
    branches = [
        unchanged,
        lambda s: lattice.germinate(s, action.slot, action.blueprint, action.blend, action.tempo, key),
        lambda s: lattice.advance(s, action.slot),
        lambda s: lattice.set_alpha_target(s, action.slot, targets[jnp.clip(action.alpha_target, 0, len(ALPHA_TARGETS) - 1)]),
        lambda s: lattice.prune(s, action.slot, ramp=config.ramped_prune),
        lambda s: lattice.fossilize(s, action.slot),
        unchanged,
    ]
    op = jnp.where(valid, jnp.clip(action.op, 0, config.num_ops - 1), Op.WAIT)
    new_state, applied = jax.lax.switch(op, branches, state)
    return new_state, valid & applied
