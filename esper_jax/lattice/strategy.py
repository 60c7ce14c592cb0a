"""How a population of members runs: one object, chosen once per backend, that the forward, the
training step and the environment step all call instead of each re-checking settings.

A population (of environments, each with its own host and lattice) can run two ways:

* ``Execution.MAPPED``: the members one after another inside the same compiled step
  (``lax.map`` over the one-member program). Every ``lax.cond``/``switch`` stays a real branch
  per member, so each member computes only its own seed's blueprint (one ``lax.switch``).
* ``Execution.BATCHED``: the members batched into wider ops (``vmap`` over an explicit member
  axis). A blueprint's branch is a ``lax.cond`` on whether *any* member uses it and then runs for
  the whole population (one batched call per blueprint in use).

Independently, ``skip_dormant`` takes the whole lattice out of the program's path while no member
computes any slot (``lax.cond`` around the forward, and around forward and backward together in
the training step). It is on except in tests that compare a live model with a dormant one bit
for bit: two different programs agree only to rounding.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from esper_jax.trees import add_axis, drop_axis, expand_to


class Execution(str, enum.Enum):
    MAPPED = "map"
    BATCHED = "vmap"


@dataclasses.dataclass(frozen=True)
class PopulationStrategy:
    execution: Execution = Execution.BATCHED
    skip_dormant: bool = True

    def __post_init__(self):
        object.__setattr__(self, "execution", Execution(self.execution))  # "map"/"vmap" accepted

    @classmethod
    def for_backend(cls, backend: str | None = None) -> "PopulationStrategy":
        """The measured choice, in one place. XLA:CPU runs a vmapped population of hosts slower
        per member than one host (its batched im2col matmuls and 5-d pads), while ``lax.map`` over
        the one-member program runs each member at the one-member speed (baseline CNN host
        training step, 8 members, batch 128: ``python -m experiments.bench --only population``);
        batched seeds were worse still on CPU (an env population step at 2.08x the per-env time
        of single steps when each used blueprint ran for all 8 members, against 1.06x for one
        seed per member: ``--only env``). Accelerators batch: wide ops are what they are for."""
        backend = backend or jax.default_backend()
        return cls(Execution.MAPPED if backend == "cpu" else Execution.BATCHED)

    # ------------------------------------------------------------------ members

    def run(self, batched: Callable, members: tuple, shared: tuple = ()):
        """``batched(*members, *shared)``, where every leaf of ``members`` leads with the member
        axis ``P`` and ``shared`` is the same for every member. Mapped execution calls ``batched``
        on one member at a time (a population of one) and stacks the results."""
        leaves = jax.tree.leaves(members)
        if self.execution is Execution.MAPPED and leaves and leaves[0].shape[0] > 1:
            return jax.lax.map(lambda member: drop_axis(batched(*add_axis(member), *shared)), members)
        return batched(*members, *shared)

    def unless_dormant(self, live: jax.Array, with_slots: Callable, without_slots: Callable, *operands):
        """``with_slots(*operands)``, or with ``skip_dormant`` a real ``lax.cond`` that runs
        ``without_slots`` while ``live`` (a scalar: does any member compute any slot?) is false."""
        if not self.skip_dormant:
            return with_slots(*operands)
        return jax.lax.cond(live, with_slots, without_slots, *operands)

    # ------------------------------------------------------------------ seeds

    def seed_residual(self, blueprints: Sequence, units, seed_in: jax.Array, blueprint: jax.Array,
                      computed: jax.Array) -> jax.Array:
        """Every member's seed residual at one slot (``[P, B, ...]``): ``blueprints`` are the
        lattice's, ``units`` their parameters by name, ``blueprint``/``computed`` per member."""
        if self.execution is Execution.MAPPED:
            return _residual_per_member(blueprints, units, seed_in, blueprint, computed)
        return _residual_shared(blueprints, units, seed_in, blueprint, computed)


def over_members(fn, *args, in_axes=0):
    """``jax.vmap(fn, in_axes)(*args)``, except that a population of one calls ``fn`` on the
    member itself. Why: XLA:CPU ran a vmapped host with a member axis of size 1 about 2x slower
    than the same host unbatched (im2col convolutions, baseline CNN forward, batch 128: 17.2 vs
    9.1 ms), and every single-environment step is a population of one."""
    axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    sizes = {jax.tree.leaves(a)[0].shape[0] for a, ax in zip(args, axes) if ax is not None and jax.tree.leaves(a)}
    if sizes != {1}:
        return jax.vmap(fn, in_axes=tuple(axes))(*args)
    members = [a if ax is None else drop_axis(a) for a, ax in zip(args, axes)]
    return add_axis(fn(*members))


def _residual_shared(blueprints, units, seed_in, blueprint, computed):
    """Each blueprint's branch runs, for the whole population, when any member uses it."""
    r = jnp.zeros_like(seed_in)
    for b, bp in enumerate(blueprints):
        if bp.is_noop:
            continue
        uses = computed & (blueprint == b)
        r_b = jax.lax.cond(
            jnp.any(uses),
            jax.checkpoint(lambda p, x, bp=bp: over_members(bp.apply, p, x)),
            lambda p, x: jnp.zeros_like(x),
            units[bp.name], seed_in,
        )
        r = r + jnp.where(expand_to(uses, seed_in), r_b, 0.0)
    return r


def _residual_per_member(blueprints, units, seed_in, blueprint, computed):
    """A loop over members, each running only its own seed's blueprint (``lax.switch`` inside
    ``lax.map`` stays a real branch): one seed's work per member that has one."""
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
        return add_axis(one_member(drop_axis(operands)))
    return jax.lax.map(one_member, operands)
