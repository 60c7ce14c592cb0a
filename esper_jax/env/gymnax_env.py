"""The growth environment as a gymnax environment: :class:`GrowthGymnaxEnv` wraps a
:class:`~esper_jax.env.environment.MorphogeneticEnv` (one training run, an epoch per step) in
gymnax's ``Environment`` interface, so JAX RL code written for gymnax (PureJaxRL and the like)
trains a growth controller unchanged: ``reset(key, params)``, ``step(key, state, action, params)``
with gymnax's auto-reset, ``action_space``/``observation_space``, under ``jax.jit`` and ``jax.vmap``.

gymnax is an optional extra (``pip install -e ".[gymnax]"``) and is imported only here. The
adapter follows the interface of the gymnax installed (:data:`GYMNAX_INTERFACE`), so code written
for either runs unchanged:

* gymnax >= 1.0: ``step`` returns ``obs, state, reward, terminated, truncated, info`` (gymnax's
  ``info`` adds ``terminated``, ``truncated`` and ``final_observation``); ``is_terminated``;
* gymnax 0.0.x (0.0.9, which PureJaxRL's scripts and the libraries of gymnax algorithms are
  written against): ``step`` returns ``obs, state, reward, done, info``, ``done`` being the end of
  the training run or gymnax's time limit (``max_steps_in_episode``), whichever comes first;
  ``is_terminal``.

* :class:`EnvParams` holds the dataset on device (:class:`~esper_jax.env.environment.EnvData`) and
  ``max_steps_in_episode`` (the env's ``episode_epochs``). Pass it explicitly to ``reset``/``step``
  under ``jit``: ``default_params`` would bake the dataset into the program as a constant.
* An episode ends with ``terminated`` after ``episode_epochs`` steps (the training run is over; the
  reward pays the final loss then, so there is nothing to bootstrap), which is also gymnax's time
  limit (``truncated``) unless ``max_steps_in_episode`` is set lower.
* Two action encodings (``encoding``):

  - ``"factored"``: a ``spaces.Dict`` of one ``spaces.Discrete`` per head of
    :data:`~esper_jax.env.actions.HEADS` (op, slot, blueprint, blend, tempo, alpha_target); an
    action is a mapping from head name to int (what ``Dict.sample`` returns) or a
    :class:`~esper_jax.env.actions.FactoredAction` (what ``Dict.contains`` can check: gymnax reads
    its entries as attributes).
  - ``"flat"``: one ``spaces.Discrete(n)``, n the product of the head sizes, for algorithms with a
    single categorical head. Index ``i`` decodes mixed-radix in head order, the op the most
    significant digit and alpha_target the least:
    ``i = ((((op*S + slot)*NB + blueprint)*NBS + blend)*NT + tempo)*NA + alpha_target``
    (``numpy.ravel_multi_index`` over the head sizes; :meth:`GrowthGymnaxEnv.flat_index` encodes,
    :meth:`GrowthGymnaxEnv.factored` decodes). Heads an op does not use are ignored, so many indices
    mean the same action.

  In both, an action the masks forbid (or out of range) runs as WAIT, the seed lattice's rule for a
  masked-out action; ``info["valid"]`` says whether the action taken was legal.
* ``info`` carries the inner env's info (losses, ``applied``, ``added_params``...), gymnax's
  ``terminated``/``truncated``/``final_observation``, and the legal actions **in the state
  returned** (after an auto-reset, the fresh episode's): ``info["masks"]``, the per-head
  :class:`~esper_jax.env.actions.ActionMasks` (the slot mask is given per op), and for ``"flat"``
  ``info["flat_mask"]``, a ``[n]`` bool vector (n = 9072 for the CNN host's three default slots and
  all eight CNN blueprints: 9 KB a step, cheap). After ``reset`` use
  :meth:`GrowthGymnaxEnv.action_masks` / :meth:`GrowthGymnaxEnv.flat_action_mask` on the state.

gymnax's auto-reset computes a fresh environment at every step and selects it where an episode
ended (``Environment.step``): here that costs a host initialization and one validation pass per
step, next to the epoch of training the step runs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
from flax import struct

from esper_jax.data.datasets import OptionalDependencyError
from esper_jax.env.actions import HEADS, ActionMasks, FactoredAction
from esper_jax.env.environment import EnvData, MorphogeneticEnv
from esper_jax.env.environment import EnvState as GrowthState
from esper_jax.env.observations import LOSS_HISTORY
from esper_jax.trees import select

try:
    from gymnax.environments import environment as gymnax_environment
    from gymnax.environments import spaces
except ImportError:
    raise OptionalDependencyError('esper_jax.env.gymnax_env needs gymnax: pip install -e ".[gymnax]"') from None

# Which interface the installed gymnax has: 1.0 split ``done`` into ``terminated`` and ``truncated``.
GYMNAX_INTERFACE: Literal["0.0", "1.0"] = "1.0" if hasattr(gymnax_environment.Environment, "is_truncated") else "0.0"

Encoding = Literal["factored", "flat"]
ENCODINGS: tuple[str, ...] = get_args(Encoding)

_FLOAT_MAX = float(jnp.finfo(jnp.float32).max)
_INT_MAX = int(jnp.iinfo(jnp.int32).max)


def check_encoding(encoding: str) -> Encoding:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown action encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    return encoding  # type: ignore[return-value]


@struct.dataclass(kw_only=True)
class EnvParams(gymnax_environment.EnvParams):
    """gymnax's env params: the dataset on device, and the episode length."""

    data: EnvData


@struct.dataclass
class EnvState(gymnax_environment.EnvState):
    """gymnax's env state: the inner environment's state and the steps taken (``time``)."""

    inner: GrowthState


class GrowthGymnaxEnv(gymnax_environment.Environment[EnvState, EnvParams]):
    """A :class:`MorphogeneticEnv` with its dataset as a gymnax environment (see the module docstring)."""

    def __init__(self, env: MorphogeneticEnv, data: EnvData, encoding: Encoding = "flat"):
        super().__init__()
        self.env = env
        self.encoding = check_encoding(encoding)
        self.head_sizes: dict[str, int] = env.action_space.head_sizes()
        assert tuple(self.head_sizes) == HEADS, "the flat decoding follows HEADS' order"
        self._default_params = EnvParams(data=data, max_steps_in_episode=env.episode_epochs)

    # ------------------------------------------------------------------ gymnax's interface

    @property
    def default_params(self) -> EnvParams:
        return self._default_params

    @property
    def name(self) -> str:
        return f"EsperGrowth-{self.env.config.task.name}"

    @property
    def num_actions(self) -> int:
        """Distinct actions: the flat space's size, and the number of head combinations."""
        return math.prod(self.head_sizes.values())

    def action_space(self, params: EnvParams | None = None) -> spaces.Discrete | spaces.Dict:
        if self.encoding == "flat":
            return spaces.Discrete(self.num_actions)
        return spaces.Dict({head: spaces.Discrete(size) for head, size in self.head_sizes.items()})

    def observation_space(self, params: EnvParams | None = None) -> spaces.Box:
        # Losses and gradient norms are symlog-scaled but not clipped, so the features are unbounded
        # in principle; gymnax's own envs give such dimensions float32's range.
        return spaces.Box(-_FLOAT_MAX, _FLOAT_MAX, (self.env.observation_size,), jnp.float32)

    def state_space(self, params: EnvParams) -> spaces.Dict:
        """The step count and the inner env's episode bookkeeping. The network's weights and
        optimizer states (``inner.train``, ``inner.snapshot``) are unbounded arrays and left out."""
        epochs = spaces.Discrete(self.env.episode_epochs + 1)
        slots, blueprints = self.env.lattice.slots.num_slots, self.env.lattice.num_blueprints
        loss = lambda *shape: spaces.Box(0.0, _FLOAT_MAX, shape, jnp.float32)
        count = spaces.Box(0, _INT_MAX, (blueprints,), jnp.int32)
        inner = {
            "epoch": epochs, "divergent_epochs": epochs, "rollbacks": epochs,
            "last_op": spaces.Discrete(self.env.action_space.num_ops),
            **{name: loss() for name in ("train_loss", "val_loss", "prev_val_loss", "best_val_loss", "initial_val_loss")},
            "val_accuracy": spaces.Box(0.0, 1.0, (), jnp.float32),
            "loss_history": loss(LOSS_HISTORY),
            "recent_val_losses": loss(self.env.config.governor.history),
            "metric_at_germination": loss(slots),
            "germinated": count, "fossilized": count, "pruned": count,
            **({"sealed": spaces.Discrete(2)} if self.env.config.actions.seal else {}),
        }
        return spaces.Dict({"inner": spaces.Dict(inner), "time": spaces.Discrete(params.max_steps_in_episode + 1)})

    def reset_env(self, key: jax.Array, params: EnvParams) -> tuple[jax.Array, EnvState]:
        obs, inner = self.env.reset(key, params.data)
        return obs, EnvState(time=jnp.zeros((), jnp.int32), inner=inner)

    def step_env(self, key: jax.Array, state: EnvState, action: Any, params: EnvParams):
        """One epoch. The flag returned is ``terminated`` for gymnax 1.0 (whose ``step`` adds the
        time limit as ``truncated``) and 0.0.x's ``done``, the time limit included."""
        taken, valid = self.executed_action(state, action)
        obs, inner, reward, terminated, info = self.env.step(key, state.inner, taken, params.data)
        new = EnvState(time=state.time + 1, inner=inner)
        flag = terminated if GYMNAX_INTERFACE == "1.0" else self.is_terminal(new, params)
        return obs, new, reward, flag, {**info, "valid": valid}

    @functools.partial(jax.jit, static_argnames=("self",))
    def step(self, key: jax.Array, state: EnvState, action: Any, params: EnvParams | None = None):
        """gymnax's step and auto-reset (six values from gymnax 1.0, five from 0.0.x), with the legal
        actions of the state it returns in ``info``."""
        *out, info = super().step(key, state, action, params)
        return (*out, {**info, **self._mask_info(out[1])})

    def get_obs(self, state: EnvState, params: EnvParams | None = None, key: jax.Array | None = None) -> jax.Array:
        return self.env.observe(state.inner)

    def is_terminated(self, state: EnvState, params: EnvParams) -> jax.Array:
        """The training run is over (gymnax 1.0's name)."""
        return state.inner.epoch >= self.env.episode_epochs

    def is_terminal(self, state: EnvState, params: EnvParams) -> jax.Array:
        """The episode is over: the training run, or gymnax's time limit (gymnax 0.0.x's name and meaning)."""
        return self.is_terminated(state, params) | (state.time >= params.max_steps_in_episode)

    # ------------------------------------------------------------------ actions

    def executed_action(self, state: EnvState, action: Any) -> tuple[FactoredAction, jax.Array]:
        """The factored action that runs for ``action`` (of this encoding) in ``state``, and whether
        ``action`` was legal: an illegal or out-of-range one runs as WAIT."""
        requested, in_range = self._decode(action)
        valid = in_range & self.action_masks(state).is_valid(requested)
        return select(valid, requested, FactoredAction.wait()), valid

    def action_masks(self, state: EnvState) -> ActionMasks:
        """The legal actions in ``state``, per head."""
        return self.env.masks(state.inner)

    def flat_action_mask(self, state: EnvState) -> jax.Array:
        """``[num_actions]`` bool: which flat indices are legal in ``state``."""
        masks = self.action_masks(state)
        return jax.vmap(lambda i: masks.is_valid(self.factored(i)))(jnp.arange(self.num_actions, dtype=jnp.int32))

    def factored(self, index: jax.Array) -> FactoredAction:
        """The factored action a flat index stands for (an index out of range is clipped into it)."""
        digits = jnp.unravel_index(jnp.asarray(index, jnp.int32), tuple(self.head_sizes.values()))
        return FactoredAction(**{head: d.astype(jnp.int32) for head, d in zip(HEADS, digits)})

    def flat_index(self, action: FactoredAction) -> jax.Array:
        """The flat index of a factored action (the inverse of :meth:`factored`; a head out of
        range is clipped into it)."""
        digits = tuple(jnp.asarray(getattr(action, head), jnp.int32) for head in HEADS)
        return jnp.ravel_multi_index(digits, tuple(self.head_sizes.values()), mode="clip").astype(jnp.int32)

    def _decode(self, action: Any) -> tuple[FactoredAction, jax.Array]:
        """The factored action an action of this encoding asks for, and whether it is in range
        (``is_valid`` checks the factored heads' ranges itself)."""
        if self.encoding == "flat":
            index = jnp.asarray(action, jnp.int32)
            return self.factored(index), (index >= 0) & (index < self.num_actions)
        if isinstance(action, FactoredAction):
            return action, jnp.asarray(True)
        if not isinstance(action, Mapping) or set(action) != set(HEADS):
            got = sorted(action) if isinstance(action, Mapping) else type(action).__name__
            raise ValueError(f"a factored action is a mapping with exactly the heads {', '.join(HEADS)}; got {got}")
        return FactoredAction(**{head: jnp.asarray(action[head], jnp.int32) for head in HEADS}), jnp.asarray(True)

    def _mask_info(self, state: EnvState) -> dict[str, Any]:
        info: dict[str, Any] = {"masks": self.action_masks(state)}
        if self.encoding == "flat":
            info["flat_mask"] = self.flat_action_mask(state)
        return info
