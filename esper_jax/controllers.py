"""Rule-based controllers: pure ``(key, EnvState) -> FactoredAction`` functions, jittable and
vmappable, taking only actions their masks allow.

* :func:`heuristic_controller`: Esper's Tamiyo heuristic: fossilize a seed whose measured
  contribution is positive, prune one that hurts, advance through passing gates, and
  germinate (rotating through blueprints) when validation loss plateaus.
* :func:`random_controller`: uniform over valid ops, then over valid slots and options.
* :func:`static_controller`: always WAIT, the never-grow baseline.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from esper_jax import blending
from esper_jax.actions import ActionMasks, FactoredAction, Op, action_masks
from esper_jax.env import EnvState, MorphogeneticEnv
from esper_jax.lifecycle import Stage
from esper_jax.observations import LOSS_HISTORY

CONTROLLERS = ("heuristic", "random", "static")


@dataclasses.dataclass(frozen=True)
class HeuristicConfig:
    warmup_epochs: int = 3            # let the host train before growing
    plateau_window: int = 3           # recent epochs compared against the ones before
    plateau_min_delta: float = 0.01   # a loss drop smaller than this is a plateau
    prune_contribution: float = -0.01 # a blended seed whose removal lowers the loss by more is pruned
    prune_improvement: float = -2.0   # a training seed this far behind since germination is pruned
    min_epochs_before_prune: int = 3
    blueprints: tuple[str, ...] = ()  # rotation order; empty = every blueprint except noop
    blend_style: str = "linear"
    tempo_epochs: int = 5


def _first(mask: jax.Array) -> jax.Array:
    return jnp.argmax(mask).astype(jnp.int32)


def make_heuristic_controller(env: MorphogeneticEnv, config: HeuristicConfig = HeuristicConfig()):
    lattice = env.lattice
    names = config.blueprints or tuple(b.name for b in lattice.blueprints if not b.is_noop)
    rotation = jnp.asarray([lattice.blueprint_index(n) for n in names], jnp.int32)
    blend = blending.blend_style_index(config.blend_style)
    tempo = blending.tempo_index(config.tempo_epochs)
    window = config.plateau_window
    if not 0 < window < LOSS_HISTORY:
        raise ValueError(f"plateau_window must be in [1, {LOSS_HISTORY - 1}]")

    def controller(key: jax.Array, state: EnvState) -> FactoredAction:
        del key  # deterministic
        masks = action_masks(lattice, state.train.lattice, env.config.actions)
        st = state.train.lattice.status
        history = state.loss_history
        plateau = history[-window:].min() > history[:-window].min() - config.plateau_min_delta
        fossilize = masks.slot_given_op[Op.FOSSILIZE]
        old_enough = st.epochs_in_stage >= config.min_epochs_before_prune
        hurts = st.contribution_measured & (st.contribution < config.prune_contribution) & (st.stage != Stage.TRAINING)
        lagging = (st.stage == Stage.TRAINING) & (st.improvement < config.prune_improvement)
        prune = masks.slot_given_op[Op.PRUNE] & old_enough & (hurts | lagging)
        advance = masks.slot_given_op[Op.ADVANCE] & (st.stage != Stage.HOLDING)  # HOLDING leaves by FOSSILIZE
        germinate = masks.slot_given_op[Op.GERMINATE] & plateau & (state.epoch >= config.warmup_epochs)
        choices = [(fossilize, Op.FOSSILIZE), (prune, Op.PRUNE), (advance, Op.ADVANCE), (germinate, Op.GERMINATE)]
        op, slot = jnp.asarray(Op.WAIT, jnp.int32), jnp.asarray(0, jnp.int32)
        for mask, candidate in reversed(choices):  # earlier entries take priority
            take = mask.any()
            op = jnp.where(take, jnp.int32(candidate), op)
            slot = jnp.where(take, _first(mask), slot)
        blueprint = rotation[jnp.sum(state.germinated) % rotation.shape[0]]
        return FactoredAction.make(op, slot, blueprint, blend, tempo, 2)

    return controller


def _uniform(key: jax.Array, mask: jax.Array) -> jax.Array:
    logits = jnp.where(mask, 0.0, -jnp.inf)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def make_random_controller(env: MorphogeneticEnv):
    def controller(key: jax.Array, state: EnvState) -> FactoredAction:
        masks: ActionMasks = action_masks(env.lattice, state.train.lattice, env.config.actions)
        keys = jax.random.split(key, 6)
        op = _uniform(keys[0], masks.op)
        return FactoredAction.make(
            op, _uniform(keys[1], masks.slot_given_op[op]), _uniform(keys[2], masks.blueprint),
            _uniform(keys[3], masks.blend), _uniform(keys[4], masks.tempo), _uniform(keys[5], masks.alpha_target),
        )

    return controller


def make_static_controller(env: MorphogeneticEnv):
    def controller(key: jax.Array, state: EnvState) -> FactoredAction:
        return FactoredAction.wait()

    return controller


def make_controller(name: str, env: MorphogeneticEnv) -> Callable[[jax.Array, EnvState], FactoredAction]:
    if name == "heuristic":
        return make_heuristic_controller(env)
    if name == "random":
        return make_random_controller(env)
    if name == "static":
        return make_static_controller(env)
    raise ValueError(f"unknown controller {name!r}; choose one of {', '.join(CONTROLLERS)}")
