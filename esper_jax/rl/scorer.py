"""A policy over a variable set of candidates described by features: one score per candidate
from a network shared by all of them, so that its parameters act on any number of candidates and
on any task whose candidates are described alike (:mod:`esper_jax.env.descriptors`).

``(obs [N, D], candidates [M, F], mask [M]) -> (logits [N, M], value [N])``: the observation goes
through a tanh torso to ``z [N, H]``; each pair of an observation and a candidate's features goes
through one MLP, ``[z, c] -> tanh -> tanh -> logit`` (its first layer split in two, so ``z`` is
projected once per observation and ``c`` once per candidate). Both enter that first layer linearly:
a first version squashed the candidate through its own tanh before adding it to the observation's
projection, and on SYNTHETIC CIFAR the observation's term drowned the candidates' wherever it was
large (a near-uniform choice on the large training sets after 80 updates; README "One gardener for
every host"). Masked candidates (padding, or choices a task does not offer) get the same large
negative logit as masked actions of the factored policy (:data:`esper_jax.rl.policy.MASKED_LOGIT`):
exactly zero probability and no NaN in the entropy. The value reads the observation alone. Nothing
in the parameters' shapes depends on ``M`` or on the order of the candidates: permuting them
permutes the logits.

Initialization as the factored policy's (:func:`esper_jax.rl.policy.orthogonal_params`): the
read-out at scale 0.01 gives a near-uniform initial choice over the candidates left unmasked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from esper_jax.rl.policy import masked_logits, orthogonal_params


class _Scorer(nn.Module):
    hidden_size: int

    @nn.compact
    def __call__(self, obs, candidates, mask):
        z = obs
        for i in range(2):
            z = nn.tanh(nn.Dense(self.hidden_size, name=f"torso_{i}")(z))
        c = nn.Dense(self.hidden_size, use_bias=False, name="torso_candidate")(candidates)
        joint = nn.tanh(nn.Dense(self.hidden_size, name="torso_joint")(z)[:, None, :] + c[None, :, :])
        joint = nn.tanh(nn.Dense(self.hidden_size, name="torso_score")(joint))
        logits = nn.Dense(1, name="head_candidate")(joint)[..., 0]
        value = nn.Dense(1, name="value")(z)[..., 0]
        return masked_logits(logits, mask[None, :]), value


@dataclasses.dataclass(frozen=True)
class CandidatePolicy:
    """The scorer's pure functions: :meth:`init` and :meth:`apply`."""

    hidden_size: int = 64

    def init(self, key: jax.Array, observation_size: int, candidate_size: int) -> Any:
        shapes = jax.eval_shape(_Scorer(self.hidden_size).init, jax.random.key(0),
                                jnp.zeros((1, observation_size)), jnp.zeros((1, candidate_size)), jnp.ones((1,), bool))
        return orthogonal_params(key, shapes)

    def apply(self, params, obs: jax.Array, candidates: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(logits [N, M], value [N])`` for ``obs [N, D]``, ``candidates [M, F]``, ``mask [M]`` bool."""
        return _Scorer(self.hidden_size).apply(params, obs, candidates, mask)
