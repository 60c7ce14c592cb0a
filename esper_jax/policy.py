"""The actor-critic: a shared torso, factored masked categorical heads and a value head.

Heads: op, slot, blueprint, blend, tempo, alpha_target (``actions.HEADS``). An action is sampled
op first, then the other heads; the slot is sampled under the mask of the sampled op
(``ActionMasks.slot_given_op[op]``). The log-probability of an action and the entropy are sums
over the heads *relevant to its op* (``actions.RELEVANT_HEADS``): the other heads are still
sampled (an action needs every field) but contribute exactly zero, so they receive no gradient
and do not enter the PPO ratio or the KL. Log-probabilities, entropies and modes come from
``distrax.Categorical`` over masked logits (sampling is the equivalent Gumbel-max, see
:func:`sample_action`); a masked entry gets a large negative logit rather than ``-inf`` so that
``0 * log 0`` terms in the entropy stay 0 instead of NaN.

The torso is an MLP (tanh), optionally followed by an LSTM or GRU cell (``flax.linen``); the
recurrent carry is reset to zeros for every environment whose observation starts an episode
(``episode_start``), inside the network, so a rollout and the replay of that rollout in the
update give the same outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esper_jax.actions import HEADS, NUM_OPS, RELEVANT_HEADS, ActionMasks, FactoredAction, Op

RECURRENT_KINDS = ("none", "lstm", "gru")
MASKED_LOGIT = -1e9

# [NUM_OPS, len(HEADS)]: 1 where a head matters for an op.
HEAD_RELEVANCE = np.array([[float(h in RELEVANT_HEADS[Op(o)]) for h in HEADS] for o in range(NUM_OPS)], np.float32)


def masked_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, logits, MASKED_LOGIT)


def head_masks(masks: ActionMasks, op: jax.Array) -> dict[str, jax.Array]:
    """Per-head masks with the slot mask taken under ``op`` (leaves ``[..., n]``)."""
    slot = jnp.take_along_axis(masks.slot_given_op, op[..., None, None].astype(jnp.int32), axis=-2)[..., 0, :]
    return {"op": masks.op, "slot": slot, "blueprint": masks.blueprint, "blend": masks.blend, "tempo": masks.tempo,
            "alpha_target": masks.alpha_target}


def distributions(logits: dict[str, jax.Array], masks: ActionMasks, op: jax.Array) -> dict[str, distrax.Categorical]:
    """One masked categorical per head; the slot head conditioned on ``op``."""
    per_head = head_masks(masks, op)
    return {h: distrax.Categorical(logits=masked_logits(logits[h], per_head[h])) for h in HEADS}


def relevance(op: jax.Array) -> jax.Array:
    """``[..., len(HEADS)]`` float: which heads count for each sampled op."""
    return jnp.asarray(HEAD_RELEVANCE)[op]


def sample_action(key: jax.Array, logits: dict[str, jax.Array], masks: ActionMasks,
                  deterministic: bool = False) -> FactoredAction:
    """Sample (or take the mode of) every head; the op first, then the rest under its masks.

    Sampling is Gumbel-max over the masked logits with *one* uniform draw for all heads: an
    exact categorical sample per head, but one PRNG call instead of one per head, which cut the
    compile time of this function about sixfold on XLA:CPU (every threefry call is inlined)."""
    op_logits = masked_logits(logits["op"], masks.op)
    if deterministic:
        op = distrax.Categorical(logits=op_logits).mode()
        dists = distributions(logits, masks, op)
        fields = {"op": op, **{h: dists[h].mode() for h in HEADS[1:]}}
    else:
        widths = [logits[h].shape[-1] for h in HEADS]
        u = jax.random.uniform(key, op_logits.shape[:-1] + (sum(widths),), minval=jnp.finfo(jnp.float32).tiny,
                               maxval=1.0)
        gumbel = -jnp.log(-jnp.log(u))
        offsets = np.cumsum([0] + widths)
        noise = {h: gumbel[..., offsets[i]:offsets[i + 1]] for i, h in enumerate(HEADS)}
        op = jnp.argmax(op_logits + noise["op"], axis=-1)
        per_head = head_masks(masks, op)
        fields = {"op": op, **{h: jnp.argmax(masked_logits(logits[h], per_head[h]) + noise[h], axis=-1)
                               for h in HEADS[1:]}}
    return FactoredAction(**{h: fields[h].astype(jnp.int32) for h in HEADS})


def head_entropies(logits: dict[str, jax.Array], masks: ActionMasks, op: jax.Array) -> dict[str, jax.Array]:
    """Each head's entropy under its mask (the slot head under ``op``), not weighted by relevance."""
    return {h: d.entropy() for h, d in distributions(logits, masks, op).items()}


def evaluate_actions(logits: dict[str, jax.Array], masks: ActionMasks, action: FactoredAction):
    """``(log_prob [...], entropies {head: [...]}, relevance [..., len(HEADS)])``.

    ``log_prob`` and each head's entropy are already multiplied by the head's relevance to the
    action's op; the policy entropy is ``sum(entropies.values())``."""
    log_prob, raw, rel = evaluate_actions_raw(logits, masks, action)
    return log_prob, {h: rel[..., i] * raw[h] for i, h in enumerate(HEADS)}, rel


def evaluate_actions_raw(logits: dict[str, jax.Array], masks: ActionMasks, action: FactoredAction):
    """Like :func:`evaluate_actions` but the entropies are not weighted by relevance (one set of
    distributions serves the loss and the per-head metrics)."""
    dists = distributions(logits, masks, action.op)
    rel = relevance(action.op)
    log_prob = jnp.zeros(action.op.shape, jnp.float32)
    for i, h in enumerate(HEADS):
        log_prob = log_prob + rel[..., i] * dists[h].log_prob(getattr(action, h))
    return log_prob, {h: d.entropy() for h, d in dists.items()}, rel


class ActorCritic(nn.Module):
    """``(carry, obs [N, D], episode_start [N]) -> (carry, {head: logits [N, n]}, value [N])``."""

    head_sizes: tuple[tuple[str, int], ...]
    hidden_size: int = 128
    recurrent: str = "none"

    @nn.compact
    def __call__(self, carry, obs, episode_start):
        ortho = nn.initializers.orthogonal
        x = obs
        for i in range(2):
            x = nn.tanh(nn.Dense(self.hidden_size, kernel_init=ortho(np.sqrt(2)), name=f"torso_{i}")(x))
        if self.recurrent != "none":
            carry = jax.tree.map(lambda c: jnp.where(episode_start[:, None], jnp.zeros_like(c), c), carry)
            cell = nn.OptimizedLSTMCell(self.hidden_size, name="lstm") if self.recurrent == "lstm" else \
                nn.GRUCell(self.hidden_size, name="gru")
            carry, x = cell(carry, x)
        # Small output scale: the initial policy is near-uniform over the valid actions.
        logits = {name: nn.Dense(size, kernel_init=ortho(0.01), name=f"head_{name}")(x) for name, size in self.head_sizes}
        value = nn.Dense(1, kernel_init=ortho(1.0), name="value")(x)[..., 0]
        return carry, logits, value


@dataclasses.dataclass(frozen=True)
class Policy:
    """The network plus its carry conventions; every method is a pure function."""

    head_sizes: tuple[tuple[str, int], ...]
    hidden_size: int = 128
    recurrent: str = "none"

    def __post_init__(self):
        if self.recurrent not in RECURRENT_KINDS:
            raise ValueError(f"recurrent must be one of {', '.join(RECURRENT_KINDS)}, got {self.recurrent!r}")
        if tuple(h for h, _ in self.head_sizes) != HEADS:
            raise ValueError(f"head_sizes must name the heads {HEADS} in order")

    @classmethod
    def make(cls, head_sizes: dict[str, int], hidden_size: int = 128, recurrent: str = "none") -> "Policy":
        return cls(tuple((h, int(head_sizes[h])) for h in HEADS), hidden_size, recurrent)

    @property
    def network(self) -> ActorCritic:
        return ActorCritic(self.head_sizes, self.hidden_size, self.recurrent)

    def initial_carry(self, num_envs: int) -> Any:
        """Zeros for LSTM ``(c, h)`` / GRU ``h``; the empty tuple for the MLP policy."""
        zeros = lambda: jnp.zeros((num_envs, self.hidden_size), jnp.float32)
        if self.recurrent == "lstm":
            return (zeros(), zeros())
        if self.recurrent == "gru":
            return zeros()
        return ()

    def init(self, key: jax.Array, observation_size: int) -> Any:
        obs = jnp.zeros((1, observation_size), jnp.float32)
        return self.network.init(key, self.initial_carry(1), obs, jnp.ones((1,), bool))

    def apply(self, params, carry, obs, episode_start):
        return self.network.apply(params, carry, obs, episode_start)

    def unroll(self, params, carry, obs, episode_start):
        """Run a sequence (``obs [T, N, D]``, ``episode_start [T, N]``) from ``carry``:
        ``(carry, logits [T, N, n], values [T, N])``."""
        def step(c, inputs):
            c, logits, value = self.apply(params, c, *inputs)
            return c, (logits, value)

        carry, (logits, values) = jax.lax.scan(step, carry, (obs, episode_start))
        return carry, logits, values
