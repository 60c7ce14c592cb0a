"""Rule-based controllers: pure ``(key, EnvState) -> FactoredAction`` functions, jittable and
vmappable, taking only actions their masks allow.

* :func:`heuristic_controller`: Esper's Tamiyo heuristic: fossilize a seed whose measured
  contribution is positive, prune one that hurts, advance through passing gates, and
  germinate (rotating through blueprints) when validation loss plateaus; its timing is scaled
  to the episode the same way as the gates (:meth:`HeuristicConfig.scaled`).
* :func:`random_controller`: uniform over valid ops, then over valid slots and options.
* :func:`static_controller`: always WAIT, the never-grow baseline.
* :func:`make_scripted_controller`: a fixed growth :class:`Schedule` (this blueprint, in this
  slot, at this epoch; then advance whenever the gates allow and fossilize when G5 passes). A
  set of them measures the headroom a controller has: how much better (or worse) than static
  the right (or a wrong) growth decision ends.
* :func:`make_plan_controller`: a menu of such schedules ("plans", ``static`` among them) in one
  controller that carries out the plan it is given (a traced index): what a learner that decides
  once per episode (:mod:`esper_jax.rl.plans`) acts through.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from esper_jax.lattice import blending
from esper_jax.env.actions import ActionMasks, FactoredAction, Op
from esper_jax.env.environment import EnvState, MorphogeneticEnv
from esper_jax.lattice.lifecycle import GateConfig, Stage
from esper_jax.env.observations import LOSS_HISTORY

CONTROLLERS = ("heuristic", "random", "static")


# Esper's G2 (epochs in TRAINING before blending): the clock the heuristic's timing was set against.
ESPER_MIN_TRAINING_EPOCHS = 10


@dataclasses.dataclass(frozen=True)
class HeuristicConfig:
    """Esper's heuristic, at Esper's timing by default; :meth:`scaled` fits it to a shorter clock."""

    warmup_epochs: int = 3            # let the host train before growing
    plateau_window: int = 3           # recent epochs compared against the ones before
    plateau_min_delta: float = 0.01   # a loss drop smaller than this is a plateau
    prune_contribution: float = -0.01 # a blended seed whose removal lowers the loss by more is pruned
    prune_improvement: float = -2.0   # a training seed this far behind since germination is pruned
    min_epochs_before_prune: int = 3
    blueprints: tuple[str, ...] = ()  # rotation order; empty = every blueprint except noop
    blend_style: str = "linear"
    tempo_epochs: int = 5

    @classmethod
    def scaled(cls, gates: GateConfig, **overrides) -> "HeuristicConfig":
        """Esper's rules with their timing scaled the way the gates were: by ``f = G2 /
        Esper's G2``. Durations (warmup, plateau window, prune age, blend tempo) shrink by ``f``;
        the plateau threshold, a loss drop per epoch, grows by ``1/f``, since the same learning
        curve passes in ``f`` times as many epochs. With Esper's G2 this is Esper's heuristic."""
        f = min(1.0, gates.min_training_epochs / ESPER_MIN_TRAINING_EPOCHS)
        base = cls()
        tempo = min(blending.TEMPOS, key=lambda t: abs(t - base.tempo_epochs * f))
        scaled = cls(warmup_epochs=round(base.warmup_epochs * f), plateau_window=max(1, round(base.plateau_window * f)),
                     plateau_min_delta=base.plateau_min_delta / f,
                     min_epochs_before_prune=max(1, round(base.min_epochs_before_prune * f)), tempo_epochs=tempo)
        return dataclasses.replace(scaled, **overrides)


def _first(mask: jax.Array) -> jax.Array:
    return jnp.argmax(mask).astype(jnp.int32)


def make_heuristic_controller(env: MorphogeneticEnv, config: HeuristicConfig | None = None):
    """Esper's heuristic; by default (``config=None``) with its timing scaled to the env's gates."""
    lattice = env.lattice
    config = config or HeuristicConfig.scaled(lattice.gates)
    names = config.blueprints or tuple(b.name for b in lattice.blueprints if not b.is_noop)
    rotation = jnp.asarray([lattice.blueprint_index(n) for n in names], jnp.int32)
    blend = blending.blend_style_index(config.blend_style)
    tempo = blending.tempo_index(config.tempo_epochs)
    window = config.plateau_window
    if not 0 < window < LOSS_HISTORY:
        raise ValueError(f"plateau_window must be in [1, {LOSS_HISTORY - 1}]")

    def controller(key: jax.Array, state: EnvState) -> FactoredAction:
        del key  # deterministic
        masks = env.masks(state)
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
        masks: ActionMasks = env.masks(state)
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


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One seed: germinate ``blueprint`` in ``slot`` at ``epoch`` (or as soon after as the masks
    allow), advance whenever the gates allow, fossilize as soon as G5 passes."""

    blueprint: str
    slot: str
    epoch: int = 0
    blend_style: str = "linear"
    tempo_epochs: int = 3

    @property
    def name(self) -> str:
        return f"{self.blueprint}@{self.slot}@e{self.epoch}"

    @classmethod
    def parse(cls, text: str, **defaults) -> "Schedule":
        """``blueprint@slot@eEPOCH`` (``@eEPOCH`` optional), e.g. ``conv_heavy@r0c0@e1``."""
        parts = text.strip().split("@")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"schedule {text!r} is not blueprint@slot[@eEPOCH], e.g. conv_heavy@r0c0@e1")
        epoch = defaults.pop("epoch", 0)
        if len(parts) == 3:
            if not parts[2].startswith("e") or not parts[2][1:].isdigit():
                raise ValueError(f"schedule {text!r} is not blueprint@slot[@eEPOCH]: the epoch is written e<number>, "
                                 "e.g. conv_heavy@r0c0@e1")
            epoch = int(parts[2][1:])
        return cls(parts[0], parts[1], epoch, **defaults)


def parse_schedules(text: str, **defaults) -> tuple[Schedule, ...]:
    """One fixed growth schedule of one or more seeds: ``a@slot@eN+b@slot2@eM`` (``+`` between
    seeds, planted in the order written; each in a slot of its own)."""
    seeds = tuple(Schedule.parse(part, **defaults) for part in text.split("+"))
    slots = [s.slot for s in seeds]
    if len(set(slots)) != len(slots):
        raise ValueError(f"schedule {text!r} plants two seeds in one slot; give each seed a slot of its own")
    return seeds


def schedule_name(seeds: Schedule | Sequence[Schedule]) -> str:
    seeds = (seeds,) if isinstance(seeds, Schedule) else tuple(seeds)
    return "+".join(s.name for s in seeds)


def parse_controller(text: str) -> str | tuple[Schedule, ...]:
    """A controller written as text: one of :data:`CONTROLLERS` by name, or else a fixed schedule
    (:func:`parse_schedules`); a ValueError names both forms. What ``--imitate`` takes."""
    text = text.strip()
    if text in CONTROLLERS:
        return text
    try:
        return parse_schedules(text)
    except ValueError as error:
        raise ValueError(f"{error}, or a controller ({', '.join(CONTROLLERS)})") from None


def controller_name(controller: str | Sequence[Schedule]) -> str:
    """:func:`parse_controller`'s result in its canonical text form."""
    return controller if isinstance(controller, str) else schedule_name(controller)


def parse_plan(text: str) -> tuple[Schedule, ...]:
    """One entry of a menu of plans: ``static`` (grow nothing: no seeds) or a fixed schedule
    (:func:`parse_schedules`)."""
    text = text.strip()
    if text == "static":
        return ()
    try:
        return parse_schedules(text)
    except ValueError as error:
        raise ValueError(f"{error}, or 'static' (grow nothing)") from None


def plan_names(texts: Sequence[str]) -> tuple[str, ...]:
    """A menu of plans in canonical form (``static`` or ``a@slot@eN[+...]``); a ValueError names a bad entry."""
    return tuple(schedule_name(seeds) if seeds else "static" for seeds in map(parse_plan, texts))


def make_plan_controller(env: MorphogeneticEnv, plans: Sequence[Sequence[Schedule]]):
    """Several fixed schedules in one controller: ``(key, state, plan) -> FactoredAction`` carries out
    ``plans[plan]`` (``plan`` a traced int, so one compiled program serves every choice; a plan with
    no seeds waits, as static does). Each epoch: fossilize a seed of the plan whose G5 passed, else
    advance one the gates allow (not out of HOLDING, which leaves by FOSSILIZE), else plant the plan's
    next seed (in order, each at its epoch or as soon after as the masks allow)."""
    plans = tuple(tuple(p) for p in plans)
    if not plans:
        raise ValueError("a menu of plans needs at least one plan")
    lattice = env.lattice
    for seeds in plans:
        for s in seeds:
            if not 0 <= s.epoch < env.config.episode_epochs:
                raise ValueError(f"schedule {s.name}: epoch {s.epoch} is outside the episode's "
                                 f"0..{env.config.episode_epochs - 1}")
    width = max(1, *(len(p) for p in plans))

    def table(value, fill=0):  # [plans, width], each plan's seeds padded with `fill`
        return jnp.asarray([[value(s) for s in p] + [fill] * (width - len(p)) for p in plans], jnp.int32)

    slots_table = table(lambda s: lattice.slots.index(s.slot))
    blueprints_table = table(lambda s: lattice.blueprint_index(s.blueprint))
    blends_table = table(lambda s: blending.blend_style_index(s.blend_style))
    tempos_table = table(lambda s: blending.tempo_index(s.tempo_epochs))
    epochs_table = table(lambda s: s.epoch)
    counts = jnp.asarray([len(p) for p in plans], jnp.int32)

    def controller(key: jax.Array, state: EnvState, plan: jax.Array) -> FactoredAction:
        del key  # deterministic
        masks = env.masks(state)
        slots, blueprints, epochs = slots_table[plan], blueprints_table[plan], epochs_table[plan]
        count = counts[plan]
        seed = jnp.arange(width) < count                # the plan's seeds; the rest is padding
        stage = state.train.lattice.status.stage[slots]
        planted = jnp.sum(state.germinated)           # seeds are planted in order
        nxt = jnp.clip(planted, 0, width - 1)
        germinate = ((planted < count) & masks.slot_given_op[Op.GERMINATE][slots[nxt]]
                     & (state.epoch >= epochs[nxt]))
        fossilize = masks.slot_given_op[Op.FOSSILIZE][slots] & seed
        advance = masks.slot_given_op[Op.ADVANCE][slots] & (stage != Stage.HOLDING) & seed
        first = lambda mask: jnp.argmax(mask)
        op = jnp.where(fossilize.any(), Op.FOSSILIZE,
                       jnp.where(advance.any(), Op.ADVANCE, jnp.where(germinate, Op.GERMINATE, Op.WAIT)))
        k = jnp.where(fossilize.any(), first(fossilize), jnp.where(advance.any(), first(advance), nxt))
        return FactoredAction.make(op, slots[k], blueprints[k], blends_table[plan][k], tempos_table[plan][k], 2)

    return controller


def make_scripted_controller(env: MorphogeneticEnv, schedule: Schedule | Sequence[Schedule]):
    """A fixed schedule of one seed or several (planted in order, each at its epoch or as soon
    after as the masks allow): the menu of :func:`make_plan_controller` with this one plan."""
    seeds = (schedule,) if isinstance(schedule, Schedule) else tuple(schedule)
    if not seeds:
        raise ValueError("a schedule needs at least one seed")
    plan = make_plan_controller(env, (seeds,))
    only = jnp.zeros((), jnp.int32)

    def controller(key: jax.Array, state: EnvState) -> FactoredAction:
        return plan(key, state, only)

    return controller


def make_controller(name: str | Sequence[Schedule], env: MorphogeneticEnv) -> Callable[[jax.Array, EnvState], FactoredAction]:
    """A controller by name, or a fixed schedule's (as :func:`parse_controller` returns them)."""
    if not isinstance(name, str):
        return make_scripted_controller(env, name)
    if name == "heuristic":
        return make_heuristic_controller(env)
    if name == "random":
        return make_random_controller(env)
    if name == "static":
        return make_static_controller(env)
    raise ValueError(f"unknown controller {name!r}; choose one of {', '.join(CONTROLLERS)}")
