"""Pytree helpers shared by every layer: a population axis of one added or dropped, one member
taken, and a leafwise select on a leading-axis predicate. This module imports nothing of the
package, so any layer may use it."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def add_axis(tree):
    """Every leaf with a leading axis of size one (one member as a population of one)."""
    return jax.tree.map(lambda leaf: leaf[None], tree)


def drop_axis(tree):
    """The only member of a population of one."""
    return jax.tree.map(lambda leaf: leaf[0], tree)


def take(tree, index):
    """Member ``index`` of a pytree whose leaves lead with the population axis."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


def select(pred: jax.Array, on_true, on_false):
    """Leafwise ``where``; ``pred`` is a scalar or has the leading axes of the leaves (e.g. ``[P]``
    per member or ``[S]`` per slot), broadcast over the rest."""
    def pick(a, b):
        p = jnp.reshape(pred, jnp.shape(pred) + (1,) * (jnp.ndim(a) - jnp.ndim(pred)))
        return jnp.where(p, a, b)

    return jax.tree.map(pick, on_true, on_false)


def expand_to(values: jax.Array, like: jax.Array) -> jax.Array:
    """``values`` (e.g. ``[P]`` per member) with trailing axes of size one up to ``like``'s rank,
    ready to broadcast against it."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))
