"""Seed lifecycle: stages, Esper's transition table, gates, and pure transitions.

The lifecycle works on :class:`SlotStatus`, a pytree of per-slot arrays (shape ``[S]``).
Every transition is a pure function ``(status, request...) -> (status, applied)``; a request
that is not valid returns the input status unchanged, bit for bit, with ``applied=False``.
All stage changes go through :func:`_enter_stage`, so a stage is entered the same way
whether a controller asked for it or the per-epoch :func:`tick` moved it through a gate.

Seed parameters are not here: :mod:`esper_jax.lattice.grid` owns them and calls these functions.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from esper_jax.lattice import blending
from esper_jax.trees import select


class Stage(enum.IntEnum):
    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2
    BLENDING = 3
    HOLDING = 4
    FOSSILIZED = 5
    PRUNED = 6
    EMBARGOED = 7
    RESETTING = 8


NUM_STAGES = len(Stage)

# The single source of truth for which stage may follow which (Esper's table).
TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.DORMANT: frozenset({Stage.GERMINATED}),
    Stage.GERMINATED: frozenset({Stage.TRAINING, Stage.PRUNED}),
    Stage.TRAINING: frozenset({Stage.BLENDING, Stage.PRUNED}),
    Stage.BLENDING: frozenset({Stage.HOLDING, Stage.PRUNED}),
    Stage.HOLDING: frozenset({Stage.FOSSILIZED, Stage.PRUNED}),
    Stage.FOSSILIZED: frozenset(),
    Stage.PRUNED: frozenset({Stage.EMBARGOED}),
    Stage.EMBARGOED: frozenset({Stage.RESETTING}),
    Stage.RESETTING: frozenset({Stage.DORMANT}),
}

# The forward path a seed takes when things go well; ADVANCE follows it through a gate.
HAPPY_PATH: dict[Stage, Stage] = {
    Stage.GERMINATED: Stage.TRAINING,
    Stage.TRAINING: Stage.BLENDING,
    Stage.BLENDING: Stage.HOLDING,
    Stage.HOLDING: Stage.FOSSILIZED,
}

LIVE_STAGES = (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING)
# Stages whose seed is computed in the forward pass and receives gradients.
COMPUTED_STAGES = (Stage.TRAINING, Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED)
# Stages whose seed output is blended into the host's forward value.
BLENDED_STAGES = (Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED)

_VALID = np.zeros((NUM_STAGES, NUM_STAGES), bool)
for _src, _dsts in TRANSITIONS.items():
    for _dst in _dsts:
        _VALID[_src, _dst] = True
# NumPy tables, made device arrays where used: a device array at import would start JAX's backend
# before a run over several processes can initialize its multi-process runtime.
VALID_TRANSITIONS = _VALID
_HAPPY = np.full((NUM_STAGES,), -1, np.int32)
for _src, _dst in HAPPY_PATH.items():
    _HAPPY[_src] = _dst
_HAPPY_NEXT = _HAPPY


def is_valid_transition(src, dst) -> jax.Array:
    return jnp.asarray(VALID_TRANSITIONS)[src, dst]


def in_stages(stage: jax.Array, stages) -> jax.Array:
    return jnp.isin(stage, jnp.asarray([int(s) for s in stages], jnp.int32))


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Gate thresholds (Esper's defaults) and lifecycle timing, in one place.

    ``min_improvement`` and ``min_contribution`` are in the units the environment records
    (accuracy points for classification tasks, loss for language modelling).
    """

    min_training_epochs: int = 10          # G2
    require_healthy_gradients: bool = True  # G2
    min_seed_grad_norm: float = 1e-8        # G2: a seed that gets no gradient is not learning
    max_seed_grad_norm: float = 1e3         # G2: exploding seed gradients
    min_improvement: float | None = None    # G2 strict: improvement since germination
    min_contribution: float = 0.0           # G5: counterfactual contribution must exceed this
    min_holding_epochs: int = 1             # G5: contribution measured at least once while holding
    embargo_epochs: int = 5                 # cool-down after a prune
    auto_advance: bool = False              # tick() advances through G1, G2, G3 by itself

    @classmethod
    def permissive(cls, **overrides) -> "GateConfig":
        return dataclasses.replace(cls(min_training_epochs=3, require_healthy_gradients=False, auto_advance=True), **overrides)

    @classmethod
    def strict(cls, **overrides) -> "GateConfig":
        return dataclasses.replace(cls(min_improvement=0.5, min_contribution=0.5, min_holding_epochs=2), **overrides)


@struct.dataclass
class SlotStatus:
    """Per-slot lifecycle bookkeeping; every field has shape ``[num_slots]``."""

    stage: jax.Array            # int32 Stage
    blueprint: jax.Array        # int32 index into the topology's blueprints; -1 when empty
    blend_style: jax.Array      # int32 index into blending.BLEND_STYLES
    tempo: jax.Array            # int32 blending duration in epochs
    alpha: jax.Array            # float32 blend weight the forward uses
    alpha_start: jax.Array      # float32 alpha when the current schedule began
    alpha_target: jax.Array     # float32 where the current schedule ends
    alpha_step: jax.Array       # int32 schedule epochs done
    alpha_steps: jax.Array      # int32 schedule length in epochs
    pruning: jax.Array          # bool: a ramped prune is lowering alpha to 0
    epochs_in_stage: jax.Array  # int32
    seed_age: jax.Array         # int32 epochs since germination
    embargo: jax.Array          # int32 cool-down epochs left
    contribution: jax.Array     # float32 last counterfactual contribution
    contribution_measured: jax.Array  # bool
    improvement: jax.Array      # float32 task metric improvement since germination
    seed_grad_norm: jax.Array   # float32 last gradient norm of the seed
    host_grad_norm: jax.Array   # float32 last gradient norm of the host at that slot

    @property
    def num_slots(self) -> int:
        return self.stage.shape[-1]


def init_status(num_slots: int) -> SlotStatus:
    # int(): jnp.full of an IntEnum (Stage) gives a weak-typed array, and a weak-typed fresh
    # status would make every jitted function compile once more for the first real transition.
    i = lambda v: jnp.full((num_slots,), int(v), jnp.int32)
    f = lambda v: jnp.full((num_slots,), v, jnp.float32)
    b = lambda v: jnp.full((num_slots,), v, bool)
    return SlotStatus(
        stage=i(Stage.DORMANT), blueprint=i(-1), blend_style=i(0), tempo=i(blending.TEMPOS[0]),
        alpha=f(0.0), alpha_start=f(0.0), alpha_target=f(0.0), alpha_step=i(0), alpha_steps=i(0),
        pruning=b(False), epochs_in_stage=i(0), seed_age=i(0), embargo=i(0),
        contribution=f(0.0), contribution_measured=b(False), improvement=f(0.0),
        seed_grad_norm=f(0.0), host_grad_norm=f(0.0),
    )


def _slot_mask(status: SlotStatus, slot) -> jax.Array:
    return jnp.arange(status.num_slots) == slot


def _enter_stage(status: SlotStatus, mask: jax.Array, new_stage: jax.Array, gates: GateConfig) -> SlotStatus:
    """Move the masked slots into ``new_stage`` (scalar or ``[S]``) with that stage's entry effects."""
    new_stage = jnp.broadcast_to(jnp.asarray(new_stage, jnp.int32), status.stage.shape)
    s = status
    entering = lambda stage: mask & (new_stage == stage)

    blend_in = entering(Stage.BLENDING)
    s = s.replace(
        alpha_start=jnp.where(blend_in, s.alpha, s.alpha_start),
        alpha_target=jnp.where(blend_in, 1.0, s.alpha_target),
        alpha_step=jnp.where(blend_in, 0, s.alpha_step),
        alpha_steps=jnp.where(blend_in, s.tempo, s.alpha_steps),
    )
    hold = entering(Stage.HOLDING)
    # The schedule is complete on entering HOLDING: the reported alpha is the target it reached.
    s = s.replace(
        alpha=jnp.where(hold, s.alpha_target, s.alpha),
        contribution_measured=jnp.where(hold, False, s.contribution_measured),
    )
    gone = entering(Stage.PRUNED)
    s = s.replace(
        alpha=jnp.where(gone, 0.0, s.alpha),
        alpha_target=jnp.where(gone, 0.0, s.alpha_target),
        alpha_step=jnp.where(gone, 0, s.alpha_step),
        alpha_steps=jnp.where(gone, 0, s.alpha_steps),
        pruning=jnp.where(gone, False, s.pruning),
        contribution=jnp.where(gone, 0.0, s.contribution),
        contribution_measured=jnp.where(gone, False, s.contribution_measured),
    )
    s = s.replace(embargo=jnp.where(entering(Stage.EMBARGOED), gates.embargo_epochs, s.embargo))
    cleared = entering(Stage.DORMANT)
    blank = init_status(s.num_slots)
    s = select(cleared, blank, s)
    return s.replace(
        stage=jnp.where(mask, new_stage, s.stage),
        epochs_in_stage=jnp.where(mask, 0, s.epochs_in_stage),
    )


# ---------------------------------------------------------------------------- gates


def gradients_healthy(status: SlotStatus, gates: GateConfig) -> jax.Array:
    finite = jnp.isfinite(status.seed_grad_norm) & jnp.isfinite(status.host_grad_norm)
    if not gates.require_healthy_gradients:
        return finite
    in_range = (status.seed_grad_norm > gates.min_seed_grad_norm) & (status.seed_grad_norm < gates.max_seed_grad_norm)
    return finite & in_range


def gate_g1(status: SlotStatus, gates: GateConfig) -> jax.Array:
    """GERMINATED → TRAINING: the seed exists (parameters were initialized at germination)."""
    return status.stage == Stage.GERMINATED


def gate_g2(status: SlotStatus, gates: GateConfig) -> jax.Array:
    """TRAINING → BLENDING: trained long enough, healthy gradients, (strict) improvement."""
    ok = (status.stage == Stage.TRAINING) & (status.epochs_in_stage >= gates.min_training_epochs)
    ok &= gradients_healthy(status, gates)
    if gates.min_improvement is not None:
        ok &= status.improvement >= gates.min_improvement
    return ok


def gate_g3(status: SlotStatus, gates: GateConfig) -> jax.Array:
    """BLENDING → HOLDING: the alpha schedule reached its target."""
    return (status.stage == Stage.BLENDING) & ~status.pruning & (status.alpha_step >= status.alpha_steps)


def gate_g5(status: SlotStatus, gates: GateConfig) -> jax.Array:
    """HOLDING → FOSSILIZED: a measured, positive counterfactual contribution."""
    return (
        (status.stage == Stage.HOLDING)
        & ~status.pruning
        & status.contribution_measured
        & (status.contribution > gates.min_contribution)
        & (status.epochs_in_stage >= gates.min_holding_epochs)
    )


def gates_passed(status: SlotStatus, gates: GateConfig) -> jax.Array:
    """Per slot: does the gate out of the current stage along the happy path pass?"""
    return gate_g1(status, gates) | gate_g2(status, gates) | gate_g3(status, gates) | gate_g5(status, gates)


# ---------------------------------------------------------------------------- requests


def germinate(status: SlotStatus, slot, blueprint, blend_style, tempo_index, num_blueprints: int, gates: GateConfig):
    """Plant a seed of ``blueprint`` in an empty (DORMANT) slot."""
    slot = jnp.asarray(slot, jnp.int32)
    in_range = (slot >= 0) & (slot < status.num_slots)
    ok = in_range & (status.stage[jnp.clip(slot, 0, status.num_slots - 1)] == Stage.DORMANT)
    ok &= (blueprint >= 0) & (blueprint < num_blueprints)
    ok &= (blend_style >= 0) & (blend_style < len(blending.BLEND_STYLES))
    ok &= (tempo_index >= 0) & (tempo_index < len(blending.TEMPOS))
    mask = _slot_mask(status, slot)
    new = status.replace(
        blueprint=jnp.where(mask, blueprint, status.blueprint),
        blend_style=jnp.where(mask, blend_style, status.blend_style),
        tempo=jnp.where(mask, blending.tempo_epochs(tempo_index), status.tempo),
        seed_age=jnp.where(mask, 0, status.seed_age),
        improvement=jnp.where(mask, 0.0, status.improvement),
        seed_grad_norm=jnp.where(mask, 0.0, status.seed_grad_norm),
        host_grad_norm=jnp.where(mask, 0.0, status.host_grad_norm),
    )
    new = _enter_stage(new, mask, Stage.GERMINATED, gates)
    return select(ok, new, status), ok


def _slot_value(array, slot):
    return array[jnp.clip(slot, 0, array.shape[-1] - 1)]


def advance(status: SlotStatus, slot, gates: GateConfig):
    """Move one step along the happy path if the gate out of the current stage passes."""
    slot = jnp.asarray(slot, jnp.int32)
    in_range = (slot >= 0) & (slot < status.num_slots)
    ok = in_range & _slot_value(gates_passed(status, gates), slot)
    target = jnp.asarray(_HAPPY_NEXT)[_slot_value(status.stage, slot)]
    new = _enter_stage(status, _slot_mask(status, slot), target, gates)
    return select(ok, new, status), ok


def fossilize(status: SlotStatus, slot, gates: GateConfig):
    """Keep a HOLDING seed for good; needs G5."""
    slot = jnp.asarray(slot, jnp.int32)
    in_range = (slot >= 0) & (slot < status.num_slots)
    ok = in_range & _slot_value(gate_g5(status, gates), slot)
    new = _enter_stage(status, _slot_mask(status, slot), Stage.FOSSILIZED, gates)
    return select(ok, new, status), ok


def set_alpha_target(status: SlotStatus, slot, target, gates: GateConfig):
    """Start a new schedule from the current alpha toward ``target`` in (0, 1] over the seed's tempo."""
    slot = jnp.asarray(slot, jnp.int32)
    target = jnp.asarray(target, jnp.float32)
    in_range = (slot >= 0) & (slot < status.num_slots)
    stage = _slot_value(status.stage, slot)
    ok = in_range & ((stage == Stage.BLENDING) | (stage == Stage.HOLDING)) & ~_slot_value(status.pruning, slot)
    ok &= jnp.isfinite(target) & (target > 0.0) & (target <= 1.0)
    ok &= target != _slot_value(status.alpha_target, slot)
    mask = _slot_mask(status, slot)
    new = status.replace(
        alpha_start=jnp.where(mask, status.alpha, status.alpha_start),
        alpha_target=jnp.where(mask, target, status.alpha_target),
        alpha_step=jnp.where(mask, 0, status.alpha_step),
        alpha_steps=jnp.where(mask, status.tempo, status.alpha_steps),
    )
    return select(ok, new, status), ok


def prune(status: SlotStatus, slot, gates: GateConfig, ramp=False):
    """Remove a live seed: at once, or (``ramp``) by lowering alpha to 0 over its tempo first.

    A seed that is not blended in yet (alpha 0) is pruned at once either way.
    """
    slot = jnp.asarray(slot, jnp.int32)
    in_range = (slot >= 0) & (slot < status.num_slots)
    ok = in_range & in_stages(_slot_value(status.stage, slot), LIVE_STAGES) & ~_slot_value(status.pruning, slot)
    mask = _slot_mask(status, slot)
    ramped = jnp.asarray(ramp) & (_slot_value(status.alpha, slot) > 0.0)
    now = _enter_stage(status, mask, Stage.PRUNED, gates)
    ramping = status.replace(
        pruning=jnp.where(mask, True, status.pruning),
        alpha_start=jnp.where(mask, status.alpha, status.alpha_start),
        alpha_target=jnp.where(mask, 0.0, status.alpha_target),
        alpha_step=jnp.where(mask, 0, status.alpha_step),
        alpha_steps=jnp.where(mask, status.tempo, status.alpha_steps),
    )
    new = jax.tree.map(lambda r, n: jnp.where(ramped, r, n), ramping, now)
    return select(ok, new, status), ok


# ---------------------------------------------------------------------------- per epoch


def tick(status: SlotStatus, gates: GateConfig) -> SlotStatus:
    """End of an epoch: step alpha schedules, count epochs, run cool-downs and (optionally) gates.

    Each slot changes stage at most once per tick.
    """
    s = status
    scheduled = in_stages(s.stage, (Stage.BLENDING, Stage.HOLDING)) & (s.alpha_step < s.alpha_steps)
    step = jnp.where(scheduled, s.alpha_step + 1, s.alpha_step)
    alpha = blending.scheduled_alpha(s.alpha_start, s.alpha_target, step, s.alpha_steps, s.blend_style)
    s = s.replace(alpha_step=step, alpha=jnp.where(scheduled, alpha, s.alpha))

    occupied = s.stage != Stage.DORMANT
    s = s.replace(
        epochs_in_stage=jnp.where(occupied, s.epochs_in_stage + 1, s.epochs_in_stage),
        seed_age=jnp.where(in_stages(s.stage, LIVE_STAGES + (Stage.FOSSILIZED,)), s.seed_age + 1, s.seed_age),
        embargo=jnp.where(s.stage == Stage.EMBARGOED, jnp.maximum(s.embargo - 1, 0), s.embargo),
    )

    ramp_done = s.pruning & (s.alpha_step >= s.alpha_steps)
    next_stage = jnp.full_like(s.stage, -1)
    next_stage = jnp.where(s.stage == Stage.RESETTING, Stage.DORMANT, next_stage)
    next_stage = jnp.where((s.stage == Stage.EMBARGOED) & (s.embargo == 0), Stage.RESETTING, next_stage)
    next_stage = jnp.where(s.stage == Stage.PRUNED, Stage.EMBARGOED, next_stage)
    if gates.auto_advance:
        auto = gate_g1(s, gates) | gate_g2(s, gates) | gate_g3(s, gates)
        next_stage = jnp.where(auto, jnp.asarray(_HAPPY_NEXT)[s.stage], next_stage)
    next_stage = jnp.where(ramp_done, Stage.PRUNED, next_stage)
    return _enter_stage(s, next_stage >= 0, next_stage, gates)


# ---------------------------------------------------------------------------- measurements


def record_measurements(status: SlotStatus, *, contribution=None, contribution_measured=None, improvement=None,
                        seed_grad_norm=None, host_grad_norm=None) -> SlotStatus:
    """Store what the environment measured this epoch. Slots without a live seed keep zeros."""
    has_seed = in_stages(status.stage, LIVE_STAGES + (Stage.FOSSILIZED,))
    updates = {}
    if contribution is not None:
        measured = has_seed if contribution_measured is None else (contribution_measured & has_seed)
        updates["contribution"] = jnp.where(measured, contribution, status.contribution)
        updates["contribution_measured"] = status.contribution_measured | measured
    for name, value in (("improvement", improvement), ("seed_grad_norm", seed_grad_norm), ("host_grad_norm", host_grad_norm)):
        if value is not None:
            updates[name] = jnp.where(has_seed, jnp.asarray(value, jnp.float32), getattr(status, name))
    return status.replace(**updates)
