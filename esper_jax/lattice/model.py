"""The morphogenetic forward: host segments with the lattice's seeds at the injection points.

The forward is written once, over an explicit population axis ``P`` (host parameters,
lattice states and inputs all lead with it); :meth:`MorphogeneticModel.apply` is the same
code with ``P = 1``. Why: under ``vmap``, ``lax.cond``/``switch`` turn into ``select`` and
every blueprint of every slot is computed for every member. With the population axis
explicit, each blueprint's branch is a real ``lax.cond`` on *whether any member uses it*,
decided once per population step (a scalar predicate keeps the conditional real under ``vmap``), and a slot nobody uses costs nothing; while
no member computes any slot the lattice is skipped altogether. On CPU the members are not
batched at all (``member_execution="map"``, see :func:`default_member_execution`): each runs
the one-member program in turn inside the same compiled step, where every branch is real.

Per member and slot, by stage (``r`` is the blueprint residual, see :mod:`esper_jax.lattice.blending`):

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


SEED_DISPATCH = ("shared", "per_member")
MEMBER_EXECUTION = ("vmap", "map")


def default_seed_dispatch() -> str:
    """The measured choice, in one place. On XLA:CPU (2 cores, baseline CNN, 8 envs, one live
    conv_light seed each spread over 3 slots; ``python -m experiments.bench --only env``) a
    population step took 2.08x the per-env time of a loop of single steps with "shared" (each
    used blueprint ran for all 8 members) and 1.06x with "per_member"; with every slot dormant
    both are the same program. Accelerators are not measured yet: they keep "shared", whose
    batched calls suit wide hardware better than a loop over members."""
    return "per_member" if jax.default_backend() == "cpu" else "shared"


def default_member_execution() -> str:
    """The measured choice, in one place. XLA:CPU runs a vmapped population of hosts slower per
    member than one host (its batched im2col matmuls and 5-d pads), while lax.map over the
    one-member program runs each member at the one-member speed (baseline CNN host training
    step, 8 members, batch 128: see ``python -m experiments.bench --only population``).
    Accelerators keep "vmap": wide batched ops are what they are for."""
    return "map" if jax.default_backend() == "cpu" else "vmap"


def over_members(fn, *args, in_axes=0):
    """``jax.vmap(fn, in_axes)(*args)``, except that a population of one calls ``fn`` on the
    member itself. Why: XLA:CPU ran a vmapped host with a member axis of size 1 about 2x slower
    than the same host unbatched (im2col convolutions, baseline CNN forward, batch 128: 17.2 vs
    9.1 ms), and every single-environment step is a population of one."""
    axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    sizes = {jax.tree.leaves(a)[0].shape[0] for a, ax in zip(args, axes) if ax is not None and jax.tree.leaves(a)}
    if sizes != {1}:
        return jax.vmap(fn, in_axes=tuple(axes))(*args)
    members = [a if ax is None else jax.tree.map(lambda leaf: leaf[0], a) for a, ax in zip(args, axes)]
    return jax.tree.map(lambda leaf: leaf[None], fn(*members))


def _bcast(per_member: jax.Array, like: jax.Array) -> jax.Array:
    return per_member.reshape(per_member.shape + (1,) * (like.ndim - per_member.ndim))


@dataclasses.dataclass(frozen=True)
class MorphogeneticModel:
    host: Host
    lattice: Lattice
    isolate_blending: bool
    # How a population computes its seeds: "shared" runs a blueprint's branch for every member
    # when any member uses it (one batched call per used blueprint); "per_member" loops over
    # members and runs each one's own blueprint. See default_seed_dispatch for the choice.
    seed_dispatch: str = "shared"
    # Skip the whole lattice while no member computes any slot (see population_apply). Off, the
    # dormant program is the lattice program; tests that compare a live model with a dormant
    # one bit for bit turn it off, since two different programs agree only to rounding.
    skip_dormant_lattice: bool = True
    # How a population's members are run: "vmap" batches them into one set of wider ops; "map"
    # runs the one-member program for each in turn inside the same compiled step (lax.map), so
    # every lax.cond/switch stays a real branch per member. See default_member_execution.
    member_execution: str = "vmap"

    def __post_init__(self):
        if self.member_execution not in MEMBER_EXECUTION:
            raise ValueError(f"member_execution must be one of {', '.join(MEMBER_EXECUTION)}, got {self.member_execution!r}")
        if self.seed_dispatch not in SEED_DISPATCH:
            raise ValueError(f"seed_dispatch must be one of {', '.join(SEED_DISPATCH)}, got {self.seed_dispatch!r}")

    @classmethod
    def build(cls, host: Host, slot_ids=None, gates: GateConfig = GateConfig(), isolate_blending: bool | None = None,
              seed_optimizer=None, blueprints: tuple[str, ...] = (), seed_dispatch: str | None = None,
              skip_dormant_lattice: bool = True, member_execution: str | None = None) -> "MorphogeneticModel":
        slots = slot_config_for(host, host.default_slots if slot_ids is None else slot_ids)
        extra = {} if seed_optimizer is None else {"seed_optimizer": seed_optimizer}
        lattice = Lattice(slots, gates, blueprint_names=tuple(blueprints or ()), **extra)
        if isolate_blending is None:
            isolate_blending = host.topology == "cnn"  # Esper: CNN seeds stay isolated, transformer seeds co-adapt
        return cls(host, lattice, isolate_blending, seed_dispatch or default_seed_dispatch(), skip_dormant_lattice,
                   member_execution or default_member_execution())

    def init(self, key: jax.Array):
        host_key, lattice_key = jax.random.split(key)
        return self.host.init(host_key), self.lattice.init(lattice_key)

    # ------------------------------------------------------------------ forward

    def apply(self, host_params, lattice_state: LatticeState, x: jax.Array, disabled: jax.Array | None = None):
        """One member: ``x`` is a batch; ``disabled`` (``[S]`` bool) forces those slots to identity."""
        add = lambda tree: jax.tree.map(lambda a: a[None], tree)
        disabled = None if disabled is None else disabled[None]
        out = self.population_apply(add(host_params), add(lattice_state), x[None], disabled)
        return out[0]

    def population_apply(self, host_params, lattice_state: LatticeState, x: jax.Array, disabled: jax.Array | None = None,
                         shared_input: bool = False):
        """A population: every argument leads with the member axis ``P``, except ``x`` when
        ``shared_input`` (one batch, e.g. the validation set, seen by every member)."""
        members = jax.tree.leaves(host_params)[0].shape[0]
        if self.member_execution == "map" and members > 1:
            def one_member(args):
                params, state, member_x, off = jax.tree.map(lambda leaf: leaf[None], args)
                member_x = x[None] if shared_input else member_x
                return self.population_apply(params, state, member_x, off)[0]

            return jax.lax.map(one_member, (host_params, lattice_state, None if shared_input else x, disabled))

        if not (self.lattice.slots.slot_ids and self.skip_dormant_lattice):
            return self.population_forward(host_params, lattice_state, x, disabled, shared_input)
        # Whole-population skip: while no member computes any slot, the lattice is not in the
        # program's path at all. Per-slot conds alone left the dormant step 1.22x the plain host
        # (their operands, cotangent buffers and copies); with an outer cond it was 1.09x
        # (baseline CNN, batch 128, XLA:CPU). make_train_step puts the same cond around the whole
        # gradient instead, so that neither branch carries the other's residuals.
        forward = lambda with_slots: lambda p, l, x: self.population_forward(p, l, x, disabled, shared_input, with_slots)
        return jax.lax.cond(self.computes_any_slot(lattice_state, disabled), forward(True), forward(False),
                            host_params, lattice_state, x)

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
        h = x
        for index, point in enumerate(self.host.injection_points):
            in_axes = (0, None) if (index == 0 and shared_input) else (0, 0)
            h = over_members(lambda p, a, i=index: self.host.segment(p, i, a), host_params, h, in_axes=in_axes)
            if with_slots and point.slot_id in slot_ids:
                s = slot_ids.index(point.slot_id)
                off = None if disabled is None else disabled[:, s]
                h = self.apply_slot(lattice_state, s, h, off)
        return over_members(self.host.head, host_params, h)

    def apply_slot(self, state: LatticeState, s: int, h: jax.Array, disabled: jax.Array | None = None) -> jax.Array:
        """Slot ``s`` for a population; ``h`` is ``[P, B, ...]``."""
        st = state.status
        stage = st.stage[:, s]
        computed = lifecycle.in_stages(stage, lifecycle.COMPUTED_STAGES)
        if disabled is not None:
            computed &= ~disabled

        def active(h):
            training = stage == Stage.TRAINING
            blended = lifecycle.in_stages(stage, lifecycle.BLENDED_STAGES)
            isolated = training | (blended & (stage != Stage.FOSSILIZED) & self.isolate_blending)
            seed_in = jnp.where(_bcast(isolated, h), jax.lax.stop_gradient(h), h)
            units = self.lattice.unit_params(state, s)
            if self.seed_dispatch == "per_member":
                r = self._residual_per_member(units, seed_in, st.blueprint[:, s], computed)
            else:
                r = self._residual_shared(units, seed_in, st.blueprint[:, s], computed)

            op = blending.blend_op_of(st.blend_style[:, s])
            gating = computed & (op == blending.OP_GATE) & (stage == Stage.BLENDING)
            gate_fn = lambda: over_members(blending.gate_value, units[GATE], seed_in)
            gate_shape = jax.eval_shape(gate_fn)
            gate = jax.lax.cond(jnp.any(gating), gate_fn, lambda: jnp.ones(gate_shape.shape, gate_shape.dtype))
            alpha = _bcast(st.alpha[:, s], h)
            weight = alpha * jnp.where(_bcast(gating, h), gate, 1.0)
            op = _bcast(jnp.where(op == blending.OP_GATE, blending.OP_ADD, op), h)

            full = blending.blend(jax.lax.stop_gradient(h), r, 1.0, op)
            straight_through = h + (full - jax.lax.stop_gradient(full))
            blended_out = blending.blend(h, r, weight, op)
            out = jnp.where(_bcast(training & computed, h), straight_through, h)
            return jnp.where(_bcast(blended & computed, h), blended_out, out)

        # Branch bodies are rematerialized (jax.checkpoint here and on each blueprint branch). Why:
        # under reverse-mode a lax.cond returns the union of both branches' residuals, so a skipped
        # (dormant) branch still wrote zero-filled copies of every blueprint's intermediates; with
        # checkpointing the residuals are only the branch inputs. Measured on the baseline CNN
        # step: all-dormant overhead 4.4x -> 1.4x of the plain host.
        return jax.lax.cond(jnp.any(computed), jax.checkpoint(active), lambda h: h, h)

    def _residual_shared(self, units, seed_in, blueprint, computed):
        """Each blueprint's branch runs, for the whole population, when any member uses it."""
        r = jnp.zeros_like(seed_in)
        for b, bp in enumerate(self.lattice.blueprints):
            if bp.is_noop:
                continue
            uses = computed & (blueprint == b)
            r_b = jax.lax.cond(
                jnp.any(uses),
                jax.checkpoint(lambda p, x, bp=bp: over_members(bp.apply, p, x)),
                lambda p, x: jnp.zeros_like(x),
                units[bp.name], seed_in,
            )
            r = r + jnp.where(_bcast(uses, seed_in), r_b, 0.0)
        return r

    def _residual_per_member(self, units, seed_in, blueprint, computed):
        """A loop over members, each running only its own seed's blueprint (``lax.switch`` inside
        ``lax.map`` stays a real branch). Work is one seed per member that has one, whatever
        the mix of blueprints across the population; the host around it stays vmapped."""
        blueprints = self.lattice.blueprints
        branches = [lambda u, x: jnp.zeros_like(x)]
        branch_of = []
        for bp in blueprints:
            if bp.is_noop:
                branch_of.append(0)
                continue
            branch_of.append(len(branches))
            branches.append(jax.checkpoint(lambda u, x, bp=bp: bp.apply(u[bp.name], x)))
        branch_of = jnp.asarray(branch_of, jnp.int32)

        def one_member(args):
            member_units, x, b, used = args
            index = jnp.where(used, branch_of[jnp.clip(b, 0, len(blueprints) - 1)], 0)
            return jax.lax.switch(index, branches, member_units, x)

        operands = (units, seed_in, blueprint, computed)
        if seed_in.shape[0] == 1:  # a population of one needs no loop
            return jax.tree.map(lambda leaf: leaf[None], one_member(jax.tree.map(lambda leaf: leaf[0], operands)))
        return jax.lax.map(one_member, operands)

    # ------------------------------------------------------------------ losses

    def loss(self, host_params, lattice_state: LatticeState, x, y, disabled=None) -> jax.Array:
        return self.host.loss(self.apply(host_params, lattice_state, x, disabled), y)

    def population_losses(self, host_params, lattice_state: LatticeState, x, y, disabled=None) -> jax.Array:
        """Per-member mean loss, shape ``[P]``."""
        return over_members(self.host.loss, self.population_apply(host_params, lattice_state, x, disabled), y)
