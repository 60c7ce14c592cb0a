"""The seed lattice: per-slot lifecycle status plus every slot's seed parameters and their
optimizer state, as one pytree per inner environment.

Shapes never depend on the lifecycle: each slot pre-allocates parameters for every blueprint
of its topology (and a small blend gate). Germinating re-initializes the chosen blueprint's
parameters in that slot, and its gate, and resets their optimizer moments; parameters of
blueprints not in use never change. Each (slot, blueprint) unit has its own optimizer state,
as each seed has its own optimizer in Esper.

:class:`Lattice` is a frozen, hashable spec; its methods are pure functions of the state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from esper_jax import blending, lifecycle
from esper_jax.blueprints import blueprint_index, blueprints_for
from esper_jax.lifecycle import GateConfig, SlotStatus, Stage
from esper_jax.slots import SlotConfig

GATE = "gate"


@struct.dataclass
class LatticeState:
    status: SlotStatus
    params: tuple[dict[str, Any], ...]     # per slot: blueprint name (and "gate") → parameters
    opt_state: tuple[dict[str, Any], ...]  # per slot: same keys → optimizer state


def default_seed_optimizer() -> optax.GradientTransformation:
    """Esper's per-seed optimizer: SGD, lr 0.01, momentum 0.9, weight decay 5e-4, clip at 1.0."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))


def _where(mask, new, old):
    return jax.tree.map(lambda n, o: jnp.where(mask, n, o), new, old)


@dataclasses.dataclass(frozen=True)
class Lattice:
    slots: SlotConfig
    gates: GateConfig = GateConfig()
    seed_optimizer: optax.GradientTransformation = dataclasses.field(default_factory=default_seed_optimizer)

    @property
    def topology(self) -> str:
        return self.slots.topology

    @property
    def blueprints(self):
        return blueprints_for(self.topology)

    @property
    def num_blueprints(self) -> int:
        return len(self.blueprints)

    def blueprint_index(self, name: str) -> int:
        return blueprint_index(self.topology, name)

    def _fresh_slot(self, key: jax.Array, dim: int) -> dict[str, Any]:
        keys = jax.random.split(key, self.num_blueprints)
        params = {bp.name: bp.init(k, dim) for bp, k in zip(self.blueprints, keys)}
        params[GATE] = blending.init_gate(dim)
        return params

    def init(self, key: jax.Array) -> LatticeState:
        keys = jax.random.split(key, self.slots.num_slots)
        params = tuple(self._fresh_slot(k, spec.dim) for k, spec in zip(keys, self.slots.slots))
        opt_state = tuple({name: self.seed_optimizer.init(p) for name, p in slot.items()} for slot in params)
        return LatticeState(status=lifecycle.init_status(self.slots.num_slots), params=params, opt_state=opt_state)

    # ------------------------------------------------------------------ requests

    def germinate(self, state: LatticeState, slot, blueprint, blend_style, tempo_index, key: jax.Array):
        status, applied = lifecycle.germinate(
            state.status, slot, blueprint, blend_style, tempo_index, self.num_blueprints, self.gates
        )
        keys = jax.random.split(key, self.slots.num_slots)
        params, opt_state = [], []
        for s, (spec, k) in enumerate(zip(self.slots.slots, keys)):
            fresh = self._fresh_slot(k, spec.dim)
            here = applied & (jnp.asarray(slot) == s)
            slot_params, slot_opt = {}, {}
            for name, old in state.params[s].items():
                reset = here & ((name == GATE) | (blueprint == self._index_of(name)))
                slot_params[name] = _where(reset, fresh[name], old)
                slot_opt[name] = _where(reset, self.seed_optimizer.init(fresh[name]), state.opt_state[s][name])
            params.append(slot_params)
            opt_state.append(slot_opt)
        return LatticeState(status, tuple(params), tuple(opt_state)), applied

    def _index_of(self, name: str) -> int:
        return -1 if name == GATE else self.blueprint_index(name)

    def advance(self, state: LatticeState, slot):
        status, applied = lifecycle.advance(state.status, slot, self.gates)
        return state.replace(status=status), applied

    def set_alpha_target(self, state: LatticeState, slot, target):
        status, applied = lifecycle.set_alpha_target(state.status, slot, target, self.gates)
        return state.replace(status=status), applied

    def prune(self, state: LatticeState, slot, ramp=False):
        status, applied = lifecycle.prune(state.status, slot, self.gates, ramp)
        return state.replace(status=status), applied

    def fossilize(self, state: LatticeState, slot):
        status, applied = lifecycle.fossilize(state.status, slot, self.gates)
        return state.replace(status=status), applied

    def tick(self, state: LatticeState) -> LatticeState:
        return state.replace(status=lifecycle.tick(state.status, self.gates))

    def record_measurements(self, state: LatticeState, **measurements) -> LatticeState:
        return state.replace(status=lifecycle.record_measurements(state.status, **measurements))

    # ------------------------------------------------------------------ training

    def trainable(self, state: LatticeState) -> tuple[dict[str, jax.Array], ...]:
        """Per slot and unit: does it learn this step? The seed of a computed stage does;
        the gate only while its seed is BLENDING with the gate op."""
        st = state.status
        computed = lifecycle.in_stages(st.stage, lifecycle.COMPUTED_STAGES)
        gating = (st.stage == Stage.BLENDING) & (blending.blend_op_of(st.blend_style) == blending.OP_GATE)
        masks = []
        for s in range(self.slots.num_slots):
            slot_masks = {name: computed[s] & (st.blueprint[s] == self._index_of(name)) for name in state.params[s] if name != GATE}
            slot_masks[GATE] = gating[s]
            masks.append(slot_masks)
        return tuple(masks)

    def apply_gradients(self, state: LatticeState, grads) -> LatticeState:
        """One optimizer step for the units that are learning; every other unit is untouched."""
        masks = self.trainable(state)
        params, opt_state = [], []
        for s in range(self.slots.num_slots):
            slot_params, slot_opt = {}, {}
            for name, p in state.params[s].items():
                updates, new_opt = self.seed_optimizer.update(grads[s][name], state.opt_state[s][name], p)
                slot_params[name] = _where(masks[s][name], optax.apply_updates(p, updates), p)
                slot_opt[name] = _where(masks[s][name], new_opt, state.opt_state[s][name])
            params.append(slot_params)
            opt_state.append(slot_opt)
        return state.replace(params=tuple(params), opt_state=tuple(opt_state))

    def seed_grad_norms(self, state: LatticeState, grads) -> jax.Array:
        """Gradient norm of each slot's learning seed (0 where none learns), shape ``[S]``."""
        masks = self.trainable(state)
        norms = []
        for s in range(self.slots.num_slots):
            sq = sum(
                jnp.where(masks[s][name], optax.tree_utils.tree_norm(grads[s][name], squared=True), 0.0)
                for name in state.params[s] if name != GATE
            )
            norms.append(jnp.sqrt(sq))
        return jnp.stack(norms)

    def live_param_count(self, state: LatticeState) -> jax.Array:
        """Parameters added by seeds that are computed in the forward (live or fossilized)."""
        st = state.status
        computed = lifecycle.in_stages(st.stage, lifecycle.COMPUTED_STAGES)
        sizes = jnp.asarray([[bp.num_params(spec.dim) for bp in self.blueprints] for spec in self.slots.slots], jnp.int32)
        per_slot = jnp.where(computed, sizes[jnp.arange(self.slots.num_slots), jnp.clip(st.blueprint, 0)], 0)
        return per_slot.sum()
