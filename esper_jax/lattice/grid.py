"""The seed lattice: per-slot lifecycle status plus every slot's seed parameters and their
optimizer state, as one pytree per inner environment.

Shapes never depend on the lifecycle: each slot pre-allocates parameters for every blueprint
of its topology (and a small blend gate). Germinating re-initializes the chosen blueprint's
parameters in that slot, and its gate, and resets their optimizer moments; parameters of
blueprints not in use never change.

A slot's parameters are stored raveled into one vector; :class:`SlotLayout` views it as named
units (``{blueprint name or "gate": params}``). Why: one optax update per (slot, unit) pytree
gave the baseline CNN ~80 fusions and a 17 s XLA:CPU compile for the optimizer step alone;
on raveled vectors it is 20 fusions and ~1.4 s. It is still one optimizer per seed, as in
Esper: only the learning seed and its gate have non-zero gradients and only their elements
are updated (per-element masks), so global-norm clipping over the slot clips that seed alone.

:class:`Lattice` is a frozen, hashable spec; its methods are pure functions of the state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from esper_jax.lattice import blending, lifecycle, ops
from esper_jax.lattice.blueprints import blueprint_index, blueprints_for
from esper_jax.lattice.lifecycle import GateConfig, SlotStatus, Stage
from esper_jax.lattice.optim import sgd_optimizer
from esper_jax.lattice.slots import SlotConfig

GATE = "gate"


@struct.dataclass
class LatticeState:
    status: SlotStatus
    params: tuple[jax.Array, ...]  # per slot: every unit's parameters raveled, ``[slot_size]``
    opt_state: tuple[Any, ...]     # per slot: seed optimizer state of that vector


def default_seed_optimizer() -> optax.GradientTransformation:
    """Esper's per-seed optimizer: SGD, lr 0.01, momentum 0.9, weight decay 5e-4, clip at 1.0."""
    return sgd_optimizer(0.01)


def _fresh_units(blueprints: tuple, key: jax.Array, dim: int) -> dict[str, Any]:
    # One normal draw for the whole slot, sliced by the initializers (see ops.NormalSource):
    # a threefry draw per initializer made germination and reset compile ~12 s longer.
    source = ops.NormalSource(jax.random.normal(key, (sum(bp.num_params(dim) for bp in blueprints),)))
    units = {bp.name: bp.init(source, dim) for bp in blueprints}
    units[GATE] = blending.init_gate(dim)
    return units


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Static map between a slot's raveled parameter vector and its named units."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    unit_ranges: tuple[tuple[str, int, int], ...]  # (unit name, start, stop), in ravel order
    size: int

    @staticmethod
    @functools.cache
    def of(blueprints: tuple, dim: int) -> "SlotLayout":
        template = jax.eval_shape(lambda k: _fresh_units(blueprints, k, dim), jax.random.key(0))
        leaves, treedef = jax.tree.flatten(template)
        shapes = tuple(tuple(leaf.shape) for leaf in leaves)
        sizes = [math.prod(shape) for shape in shapes]
        offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        ranges, start = [], 0
        for name in sorted(template):  # dicts flatten in sorted key order
            n = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(template[name]))
            ranges.append((name, start, start + n))
            start += n
        return SlotLayout(treedef, shapes, offsets, tuple(ranges), sum(sizes))

    def ravel(self, units: dict) -> jax.Array:
        leaves = jax.tree.leaves(units)
        lead = leaves[0].shape[: leaves[0].ndim - len(self.shapes[0])]
        return jnp.concatenate([leaf.reshape(lead + (-1,)) for leaf in leaves], axis=-1)

    def unravel(self, flat: jax.Array) -> dict:
        """Named units from a raveled vector (leading axes, e.g. a population, are kept)."""
        lead = flat.shape[:-1]
        leaves = [
            flat[..., o:o + math.prod(shape)].reshape(lead + shape) for o, shape in zip(self.offsets, self.shapes)
        ]
        return jax.tree.unflatten(self.treedef, leaves)

    def element_mask(self, unit_mask: dict) -> jax.Array:
        """Expand a per-unit mask (scalars) to the raveled vector."""
        # Broadcasts, not jnp.repeat: its gather made XLA constant-fold for seconds.
        return jnp.concatenate(
            [jnp.broadcast_to(jnp.asarray(unit_mask[name]), (stop - start,)) for name, start, stop in self.unit_ranges]
        )


def _masked(element_mask: jax.Array, new, old):
    """Select ``new`` where the mask holds in every optimizer-state leaf shaped like the raveled
    parameters; other leaves (a step count, such as Adam's bias correction reads) take ``new`` only
    where the mask holds anywhere: a slot's count restarts when its seed does and ticks only while
    it learns, so germinating or training one slot never moves another's."""
    size = element_mask.shape[0]
    anywhere = element_mask.any()
    return jax.tree.map(lambda n, o: jnp.where(element_mask, n, o) if n.shape == (size,) else jnp.where(anywhere, n, o),
                        new, old)


@dataclasses.dataclass(frozen=True)
class Lattice:
    """``blueprint_names`` selects which of the topology's blueprints this run may grow, in
    action order; empty means all of them. Why a subset: every enabled blueprint adds a
    ``lax.cond`` branch per slot (forward, backward and init) to the compiled step, so a run that
    needs three blueprints should not compile eight."""

    slots: SlotConfig
    gates: GateConfig = GateConfig()
    seed_optimizer: optax.GradientTransformation = dataclasses.field(default_factory=default_seed_optimizer)
    blueprint_names: tuple[str, ...] = ()

    def __post_init__(self):
        names = tuple(self.blueprint_names)
        for name in names:
            blueprint_index(self.topology, name)  # unknown or wrong-topology names get a clear error
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate blueprints in {names}")
        object.__setattr__(self, "blueprint_names", names)

    @property
    def topology(self) -> str:
        return self.slots.topology

    @property
    def blueprints(self):
        every = blueprints_for(self.topology)
        if not self.blueprint_names:
            return every
        by_name = {bp.name: bp for bp in every}
        return tuple(by_name[name] for name in self.blueprint_names)

    @property
    def num_blueprints(self) -> int:
        return len(self.blueprints)

    def blueprint_index(self, name: str) -> int:
        """Index of ``name`` in this lattice's blueprint head."""
        blueprint_index(self.topology, name)
        names = tuple(bp.name for bp in self.blueprints)
        if name not in names:
            raise ValueError(f"blueprint {name!r} is not enabled in this run; enabled blueprints are: {', '.join(names)}")
        return names.index(name)

    def layout(self, s: int) -> SlotLayout:
        return SlotLayout.of(self.blueprints, self.slots.slots[s].dim)

    def unit_params(self, state: LatticeState, s: int) -> dict[str, Any]:
        """Slot ``s``'s parameters as ``{unit name: params}`` (keeps leading population axes)."""
        return self.layout(s).unravel(state.params[s])

    def with_unit_params(self, state: LatticeState, s: int, units: dict[str, Any]) -> LatticeState:
        params = list(state.params)
        params[s] = self.layout(s).ravel(units)
        return state.replace(params=tuple(params))

    def init(self, key: jax.Array) -> LatticeState:
        keys = jax.random.split(key, self.slots.num_slots)
        params = tuple(
            self.layout(s).ravel(_fresh_units(self.blueprints, k, spec.dim))
            for s, (k, spec) in enumerate(zip(keys, self.slots.slots))
        )
        opt_state = tuple(self.seed_optimizer.init(p) for p in params)
        return LatticeState(status=lifecycle.init_status(self.slots.num_slots), params=params, opt_state=opt_state)

    # ------------------------------------------------------------------ requests

    def germinate(self, state: LatticeState, slot, blueprint, blend_style, tempo_index, key: jax.Array):
        status, applied = lifecycle.germinate(
            state.status, slot, blueprint, blend_style, tempo_index, self.num_blueprints, self.gates
        )
        keys = jax.random.split(key, self.slots.num_slots)
        params, opt_state = [], []
        for s, (spec, k) in enumerate(zip(self.slots.slots, keys)):
            layout = self.layout(s)
            fresh = layout.ravel(_fresh_units(self.blueprints, k, spec.dim))
            here = applied & (jnp.asarray(slot) == s)
            reset = layout.element_mask(
                {name: here & ((name == GATE) | (blueprint == self._index_of(name))) for name, _, _ in layout.unit_ranges}
            )
            params.append(jnp.where(reset, fresh, state.params[s]))
            opt_state.append(_masked(reset, self.seed_optimizer.init(fresh), state.opt_state[s]))
        return LatticeState(status, tuple(params), tuple(opt_state)), applied

    def build_in(self, state: LatticeState, slot: int, blueprint, key: jax.Array) -> LatticeState:
        """A fresh ``blueprint`` seed at ``slot`` that is part of the network from the start:
        FOSSILIZED at alpha 1 (linear blend), so it is computed, blended and trained with the
        host from the first batch. How a static network with a grown architecture built in is
        made (the frontier of :mod:`esper_jax.runs.frontier`); not a lifecycle transition."""
        state, _ = self.germinate(state, slot, blueprint, 0, 0, key)
        here = jnp.arange(self.slots.num_slots) == slot
        st = state.status
        one = jnp.where(here, 1.0, st.alpha)
        return state.replace(status=st.replace(stage=jnp.where(here, int(Stage.FOSSILIZED), st.stage), alpha=one,
                                               alpha_start=one, alpha_target=one))

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
            names = [name for name, _, _ in self.layout(s).unit_ranges if name != GATE]
            slot_masks = {name: computed[s] & (st.blueprint[s] == self._index_of(name)) for name in names}
            slot_masks[GATE] = gating[s]
            masks.append(slot_masks)
        return tuple(masks)

    def apply_gradients(self, state: LatticeState, grads: tuple[jax.Array, ...]) -> LatticeState:
        """One optimizer step for the units that are learning; every other unit is untouched.
        ``grads`` has the structure of ``state.params`` (one raveled vector per slot)."""
        masks = self.trainable(state)
        params, opt_state = [], []
        for s in range(self.slots.num_slots):
            learning = self.layout(s).element_mask(masks[s])
            grad = jnp.where(learning, grads[s], 0.0)
            updates, new_opt = self.seed_optimizer.update(grad, state.opt_state[s], state.params[s])
            params.append(jnp.where(learning, state.params[s] + updates, state.params[s]))
            opt_state.append(_masked(learning, new_opt, state.opt_state[s]))
        return state.replace(params=tuple(params), opt_state=tuple(opt_state))

    def seed_grad_norms(self, state: LatticeState, grads: tuple[jax.Array, ...]) -> jax.Array:
        """Gradient norm of each slot's learning seed (0 where none learns), shape ``[S]``."""
        masks = self.trainable(state)
        norms = []
        for s in range(self.slots.num_slots):
            seed_only = {name: jnp.where(name == GATE, False, m) for name, m in masks[s].items()}
            learning = self.layout(s).element_mask(seed_only)
            norms.append(jnp.sqrt(jnp.sum(jnp.where(learning, grads[s] ** 2, 0.0))))
        return jnp.stack(norms)

    def live_param_count(self, state: LatticeState) -> jax.Array:
        """Parameters added by seeds that are computed in the forward (live or fossilized)."""
        st = state.status
        computed = lifecycle.in_stages(st.stage, lifecycle.COMPUTED_STAGES)
        sizes = jnp.asarray([[bp.num_params(spec.dim) for bp in self.blueprints] for spec in self.slots.slots], jnp.int32)
        per_slot = jnp.where(computed, sizes[jnp.arange(self.slots.num_slots), jnp.clip(st.blueprint, 0)], 0)
        return per_slot.sum()
