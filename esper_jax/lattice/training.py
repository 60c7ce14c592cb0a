"""Training steps for a morphogenetic model: one member, or a population with an explicit
leading axis. Host and seeds have separate optimizers (Esper: SGD with momentum for each,
clipped separately); the seed optimizer lives in the :class:`~esper_jax.lattice.grid.Lattice`.

``init``/``step`` pairs of pure functions in the optax style; nothing here syncs with the host.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax
from flax import struct

from esper_jax.lattice.hosts.base import Host, host_forward
from esper_jax.lattice.grid import LatticeState
from esper_jax.lattice.optim import sgd_optimizer
from esper_jax.lattice.model import MorphogeneticModel
from esper_jax.lattice.strategy import over_members
from esper_jax.trees import add_axis, drop_axis


def default_host_optimizer(learning_rate: float = 0.01) -> optax.GradientTransformation:
    """Esper's host optimizer: SGD, momentum 0.9, weight decay 5e-4, gradients clipped at 1.0."""
    return sgd_optimizer(learning_rate)


@struct.dataclass
class TrainState:
    host_params: Any
    host_opt_state: Any
    lattice: LatticeState


class StepMetrics(NamedTuple):
    loss: jax.Array            # mean training loss of the batch
    host_grad_norm: jax.Array  # global norm of the host gradient (before clipping)
    seed_grad_norm: jax.Array  # per slot, ``[S]``: norm of the learning seed's gradient


class TrainStep(NamedTuple):
    init: Callable[[jax.Array], TrainState]
    step: Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, StepMetrics]]
    population_step: Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, StepMetrics]]


def make_train_step(model: MorphogeneticModel, host_optimizer: optax.GradientTransformation | None = None) -> TrainStep:
    host_optimizer = host_optimizer or default_host_optimizer()
    lattice = model.lattice

    def init(key: jax.Array) -> TrainState:
        host_params, lattice_state = model.init(key)
        return TrainState(host_params, host_optimizer.init(host_params), lattice_state)

    def population_step(state: TrainState, x: jax.Array, y: jax.Array):
        """All arguments lead with the population axis; members never mix (the summed loss's
        gradient with respect to one member's parameters is that member's gradient). Mapped
        members run their whole step (forward, backward, update) in turn: mapping inside the
        forward instead would stack every member's activations for the backward pass."""
        return model.strategy.run(batched_step, (state, x, y))

    def batched_step(state: TrainState, x: jax.Array, y: jax.Array):

        def gradients(with_slots: bool):
            def total_loss(host_params, seed_params):
                lattice_state = state.lattice.replace(params=seed_params)
                logits = model.population_forward(host_params, lattice_state, x, with_slots=with_slots)
                losses = over_members(model.host.loss, logits, y)
                return losses.sum(), losses

            (_, losses), grads = jax.value_and_grad(total_loss, argnums=(0, 1), has_aux=True)(
                state.host_params, state.lattice.params)
            return losses, grads

        if lattice.slots.slot_ids:
            # The host alone while no member computes a slot (its seed gradients are zeros). The
            # cond wraps forward and backward together: around the forward only, the backward
            # would carry both branches' residuals, zero-filled for the branch not taken.
            losses, (host_grads, seed_grads) = model.strategy.unless_dormant(
                model.computes_any_slot(state.lattice), lambda: gradients(True), lambda: gradients(False))
        else:
            losses, (host_grads, seed_grads) = gradients(True)
        updates, host_opt_state = jax.vmap(host_optimizer.update)(host_grads, state.host_opt_state, state.host_params)
        host_params = jax.vmap(optax.apply_updates)(state.host_params, updates)
        seed_norms = jax.vmap(lattice.seed_grad_norms)(state.lattice, seed_grads)
        new_lattice = jax.vmap(lattice.apply_gradients)(state.lattice, seed_grads)
        metrics = StepMetrics(losses, jax.vmap(optax.tree_utils.tree_norm)(host_grads), seed_norms)
        return TrainState(host_params, host_opt_state, new_lattice), metrics

    def step(state: TrainState, x: jax.Array, y: jax.Array):
        new_state, metrics = batched_step(add_axis(state), x[None], y[None])
        return drop_axis(new_state), drop_axis(metrics)

    return TrainStep(init, step, population_step)


def make_host_train_step(host: Host, host_optimizer: optax.GradientTransformation | None = None):
    """The plain host with no lattice at all: the reference the lattice's overhead is measured against."""
    host_optimizer = host_optimizer or default_host_optimizer()

    def init(key):
        params = host.init(key)
        return params, host_optimizer.init(params)

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: host.loss(host_forward(host, p, x), y))(params)
        updates, opt_state = host_optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return init, step
