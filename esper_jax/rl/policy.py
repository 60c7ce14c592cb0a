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
from typing import Any, Literal

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esper_jax.env.actions import HEADS, NUM_OPS, RELEVANT_HEADS, ActionMasks, FactoredAction, Op

Recurrent = Literal["none", "lstm", "gru"]
RECURRENT_KINDS: tuple[Recurrent, ...] = ("none", "lstm", "gru")
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
    recurrent: Recurrent = "none"

    @nn.compact
    def __call__(self, carry, obs, episode_start):
        # Parameters come from Policy.init (orthogonal kernels, zero biases), not from these
        # layers' own initializers.
        x = obs
        for i in range(2):
            x = nn.tanh(nn.Dense(self.hidden_size, name=f"torso_{i}")(x))
        if self.recurrent != "none":
            carry = jax.tree.map(lambda c: jnp.where(episode_start[:, None], jnp.zeros_like(c), c), carry)
            cell = nn.OptimizedLSTMCell(self.hidden_size, name="lstm") if self.recurrent == "lstm" else \
                nn.GRUCell(self.hidden_size, name="gru")
            carry, x = cell(carry, x)
        logits = {name: nn.Dense(size, name=f"head_{name}")(x) for name, size in self.head_sizes}
        value = nn.Dense(1, name="value")(x)[..., 0]
        return carry, logits, value


def _orthogonal_sizes(shape) -> tuple[int, int]:
    """The (tall) matrix an orthogonal kernel of ``shape`` is cut from; (0, 0) for a bias."""
    if len(shape) < 2:
        return (0, 0)
    rows, cols = int(np.prod(shape[:-1])), int(shape[-1])
    return (max(rows, cols), min(rows, cols))


def _kernel_scale(module: str) -> float:
    if module.startswith("torso"):
        return float(np.sqrt(2.0))
    if module.startswith("head_"):
        return 0.01  # a near-uniform initial policy over the valid actions
    return 1.0       # value head, recurrent cell


def orthogonal_params(key: jax.Array, shapes: Any) -> Any:
    """Parameters of a ``flax.linen`` network from its shapes (``jax.eval_shape`` of its ``init``):
    orthogonal kernels scaled by the layer's role (:func:`_kernel_scale`, from its name: ``torso*``,
    ``head_*``, the rest), zero biases, cut from one normal draw (see :meth:`Policy.init`)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [_orthogonal_sizes(leaf.shape) for _, leaf in paths]
    noise = jax.random.normal(key, (sum(r * c for r, c in sizes if c),), jnp.float32)
    leaves, offset = [], 0
    for (path, leaf), (rows, cols) in zip(paths, sizes):
        names = [getattr(p, "key", str(p)) for p in path]
        if names[-1] != "kernel":
            leaves.append(jnp.zeros(leaf.shape, leaf.dtype))
            continue
        a = noise[offset:offset + rows * cols].reshape(rows, cols)
        offset += rows * cols
        q, r = jnp.linalg.qr(a)
        q = q * jnp.sign(jnp.diag(r))[None, :]
        if leaf.shape[0] < leaf.shape[-1]:
            q = q.T
        leaves.append((_kernel_scale(names[1]) * q).reshape(leaf.shape).astype(leaf.dtype))
    return jax.tree.unflatten(treedef, leaves)


@dataclasses.dataclass(frozen=True)
class Policy:
    """The network plus its carry conventions; every method is a pure function. The factored
    action's heads (:meth:`make`) for the per-epoch learner; one ``plan`` head for the learner that
    decides once per episode (:mod:`esper_jax.rl.plans`)."""

    head_sizes: tuple[tuple[str, int], ...]
    hidden_size: int = 128
    recurrent: Recurrent = "none"

    def __post_init__(self):
        if self.recurrent not in RECURRENT_KINDS:
            raise ValueError(f"recurrent must be one of {', '.join(RECURRENT_KINDS)}, got {self.recurrent!r}")
        names = [h for h, _ in self.head_sizes]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"head_sizes must name one head or more, each once; got {names}")

    @classmethod
    def make(cls, head_sizes: dict[str, int], hidden_size: int = 128, recurrent: Recurrent = "none") -> "Policy":
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
        """Orthogonal kernels (scale sqrt(2) for the torso, 0.01 for the action heads, 1 for the
        value head and the recurrent cell), zero biases.

        Drawn here from *one* normal sample for the whole network rather than through
        ``network.init``, whose per-layer PRNG calls are each inlined by XLA: this made the
        learner's init compile about ten times faster, and the result is the same distribution
        (orthogonalization of an i.i.d. normal matrix, as ``nn.initializers.orthogonal``)."""
        obs = jnp.zeros((1, observation_size), jnp.float32)
        shapes = jax.eval_shape(self.network.init, jax.random.key(0), self.initial_carry(1), obs, jnp.ones((1,), bool))
        return orthogonal_params(key, shapes)

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
