"""The morphogenetic forward: host segments with the lattice's seeds at the injection points.

The forward is written once, over an explicit population axis ``P`` (host parameters,
lattice states and inputs all lead with it); :meth:`MorphogeneticModel.apply` is the same
code with ``P = 1``. Why: under ``vmap``, ``lax.cond``/``switch`` turn into ``select`` and
every blueprint of every slot is computed for every member. With the population axis
explicit, the model's :class:`~esper_jax.lattice.strategy.PopulationStrategy` decides how the
members run (one after another, or batched with a blueprint computed only when some member uses
it) and skips the lattice altogether while no member computes any slot.

Per member and slot, by stage; ``h`` is the host activation at the slot and ``r`` the
blueprint's residual of what the seed reads (see :mod:`esper_jax.lattice.blending`): ``h``
itself, or at a ``parallel`` point (:class:`~esper_jax.lattice.slots.SlotSpec`) the input of the
host segment that ends there, with the same stop-gradients as below:

* TRAINING: the seed reads ``stop_gradient(h)`` and joins straight-through,
  ``out = h + (s - stop_gradient(s))`` with ``s = blend(sg(h), r, 1)``: the forward value is the
  host's, the seed gets gradients, the host gets none through the seed.
* BLENDING, HOLDING: ``blend(h, r, alpha·gate)``; the seed reads ``sg(h)`` when
  ``isolate_blending`` (CNN default) and ``h`` otherwise (transformer default: co-adapt).
* FOSSILIZED: ``blend(h, r(h), alpha)``, part of the host.
* any other stage, or a slot in ``disabled``: ``out = h``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from esper_jax.lattice import blending, lifecycle
from esper_jax.lattice.hosts.base import Host, slot_config_for
from esper_jax.lattice.grid import GATE, Lattice, LatticeState
from esper_jax.lattice.lifecycle import GateConfig, Stage
from esper_jax.lattice.strategy import PopulationStrategy, over_members
from esper_jax.trees import add_axis, expand_to


@dataclasses.dataclass(frozen=True)
class MorphogeneticModel:
    host: Host
    lattice: Lattice
    isolate_blending: bool
    # How a population runs (mapped or batched members, how seeds are dispatched, whether the
    # dormant lattice is skipped): see PopulationStrategy.for_backend for the measured choice.
    strategy: PopulationStrategy = PopulationStrategy()

    @classmethod
    def build(cls, host: Host, slot_ids=None, gates: GateConfig = GateConfig(), isolate_blending: bool | None = None,
              seed_optimizer=None, blueprints: tuple[str, ...] = (),
              strategy: PopulationStrategy | None = None) -> "MorphogeneticModel":
        slots = slot_config_for(host, host.default_slots if slot_ids is None else slot_ids)
        extra = {} if seed_optimizer is None else {"seed_optimizer": seed_optimizer}
        lattice = Lattice(slots, gates, blueprint_names=tuple(blueprints or ()), **extra)
        if isolate_blending is None:
            isolate_blending = host.topology == "cnn"  # Esper: CNN seeds stay isolated, transformer seeds co-adapt
        return cls(host, lattice, isolate_blending, strategy or PopulationStrategy.for_backend())

    def init(self, key: jax.Array):
        host_key, lattice_key = jax.random.split(key)
        return self.host.init(host_key), self.lattice.init(lattice_key)

    # ------------------------------------------------------------------ forward

    def apply(self, host_params, lattice_state: LatticeState, x: jax.Array, disabled: jax.Array | None = None):
        """One member: ``x`` is a batch; ``disabled`` (``[S]`` bool) forces those slots to identity."""
        disabled = None if disabled is None else disabled[None]
        out = self.population_apply(add_axis(host_params), add_axis(lattice_state), x[None], disabled)
        return out[0]

    def population_apply(self, host_params, lattice_state: LatticeState, x: jax.Array, disabled: jax.Array | None = None,
                         shared_input: bool = False):
        """A population: every argument leads with the member axis ``P``, except ``x`` when
        ``shared_input`` (one batch, e.g. the validation set, seen by every member)."""
        def batched(params, state, member_x, off):
            inputs = x if shared_input else member_x
            if not self.lattice.slots.slot_ids:
                return self.population_forward(params, state, inputs, off, shared_input)
            # While no member computes any slot, the lattice is not in the program's path at all.
            # Per-slot conds alone left the dormant step 1.22x the plain host (their operands,
            # cotangent buffers and copies); with this outer cond it was 1.09x (baseline CNN,
            # batch 128, XLA:CPU). The training step puts the same cond around the whole gradient
            # instead, so that neither branch carries the other's residuals.
            forward = lambda with_slots: lambda p, l, h: self.population_forward(p, l, h, off, shared_input, with_slots)
            return self.strategy.unless_dormant(self.computes_any_slot(state, off), forward(True), forward(False),
                                                params, state, inputs)

        return self.strategy.run(batched, (host_params, lattice_state, None if shared_input else x, disabled))

    def computes_any_slot(self, lattice_state: LatticeState, disabled: jax.Array | None = None) -> jax.Array:
        """Whether any member computes any of its slots (a scalar): if not, the model is its host."""
        computed = lifecycle.in_stages(lattice_state.status.stage, lifecycle.COMPUTED_STAGES)
        if disabled is not None:
            computed &= ~disabled
        return jnp.any(computed)

    def population_forward(self, host_params, lattice_state: LatticeState, x: jax.Array, disabled: jax.Array | None = None,
                           shared_input: bool = False, with_slots: bool = True):
        """The forward with the members batched (``vmap``) and no skipping: the host with its
        slots, or (``with_slots=False``) the host alone. Same arguments as :meth:`population_apply`."""
        slot_ids = self.lattice.slots.slot_ids

        def stem_and_first_segment(p, a):
            # One call: under vmap a shared input stays unbatched until the first segment reads
            # it (a stem vmapped alone would copy the validation batch per member); the stem's
            # output, needed only by a parallel first point, is dropped by XLA otherwise.
            stemmed = self.host.stem(p, a)
            return stemmed, self.host.segment(p, 0, stemmed)

        for index, point in enumerate(self.host.injection_points):
            if index == 0:
                segment_input, h = over_members(stem_and_first_segment, host_params, x,
                                                in_axes=(0, None) if shared_input else (0, 0))
            else:
                segment_input = h
                h = over_members(lambda p, a, i=index: self.host.segment(p, i, a), host_params, h)
            if with_slots and point.slot_id in slot_ids:
                s = slot_ids.index(point.slot_id)
                off = None if disabled is None else disabled[:, s]
                h = self.apply_slot(lattice_state, s, h, off, source=segment_input if point.parallel else None)
        return over_members(self.host.head, host_params, h)

    def apply_slot(self, state: LatticeState, s: int, h: jax.Array, disabled: jax.Array | None = None,
                   source: jax.Array | None = None) -> jax.Array:
        """Slot ``s`` for a population; ``h`` is ``[P, B, ...]``. The seed reads ``source`` (a
        parallel point's segment input, same shape) or, when it is ``None``, ``h`` itself; its
        residual is blended into ``h`` either way."""
        st = state.status
        stage = st.stage[:, s]
        computed = lifecycle.in_stages(stage, lifecycle.COMPUTED_STAGES)
        if disabled is not None:
            computed &= ~disabled

        def active(h, source):
            training = stage == Stage.TRAINING
            blended = lifecycle.in_stages(stage, lifecycle.BLENDED_STAGES)
            isolated = training | (blended & (stage != Stage.FOSSILIZED) & self.isolate_blending)
            seed_in = jnp.where(expand_to(isolated, source), jax.lax.stop_gradient(source), source)
            units = self.lattice.unit_params(state, s)
            r = self.strategy.seed_residual(self.lattice.blueprints, units, seed_in, st.blueprint[:, s], computed)

            op = blending.blend_op_of(st.blend_style[:, s])
            gating = computed & (op == blending.OP_GATE) & (stage == Stage.BLENDING)
            gate_fn = lambda: over_members(blending.gate_value, units[GATE], seed_in)
            gate_shape = jax.eval_shape(gate_fn)
            gate = jax.lax.cond(jnp.any(gating), gate_fn, lambda: jnp.ones(gate_shape.shape, gate_shape.dtype))
            alpha = expand_to(st.alpha[:, s], h)
            weight = alpha * jnp.where(expand_to(gating, h), gate, 1.0)
            op = expand_to(jnp.where(op == blending.OP_GATE, blending.OP_ADD, op), h)

            full = blending.blend(jax.lax.stop_gradient(h), r, 1.0, op)
            straight_through = h + (full - jax.lax.stop_gradient(full))
            blended_out = blending.blend(h, r, weight, op)
            out = jnp.where(expand_to(training & computed, h), straight_through, h)
            return jnp.where(expand_to(blended & computed, h), blended_out, out)

        # Branch bodies are rematerialized (jax.checkpoint here and on each blueprint branch). Why:
        # under reverse-mode a lax.cond returns the union of both branches' residuals, so a skipped
        # (dormant) branch still wrote zero-filled copies of every blueprint's intermediates; with
        # checkpointing the residuals are only the branch inputs. Measured on the baseline CNN
        # step: all-dormant overhead 4.4x -> 1.4x of the plain host. The skipped branch still
        # writes one zero-filled copy of the branch input; a hand-written VJP without it (inputs
        # as residuals, the backward in a cond of its own) measured the same within noise.
        if source is None:  # one operand: the stream point's seed reads h itself
            return jax.lax.cond(jnp.any(computed), jax.checkpoint(lambda h: active(h, h)), lambda h: h, h)
        return jax.lax.cond(jnp.any(computed), jax.checkpoint(active), lambda h, source: h, h, source)

    # ------------------------------------------------------------------ losses

    def loss(self, host_params, lattice_state: LatticeState, x, y, disabled=None) -> jax.Array:
        return self.host.loss(self.apply(host_params, lattice_state, x, disabled), y)

    def population_losses(self, host_params, lattice_state: LatticeState, x, y, disabled=None) -> jax.Array:
        """Per-member mean loss, shape ``[P]``."""
        return over_members(self.host.loss, self.population_apply(host_params, lattice_state, x, disabled), y)
