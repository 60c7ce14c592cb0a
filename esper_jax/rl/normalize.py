"""Running mean/variance observation normalizer, as pure ``init``/``update``/``apply`` functions.

The statistics live in the learner state (``RunnerState.obs_stats``) so that they are saved and
restored with everything else, and vmapped with a population of learners. ``update`` merges a
batch with Chan et al.'s parallel formula, so the statistics after any sequence of batches equal
the mean and (population, ``ddof=0``) variance of all the rows seen, whatever the batch sizes.
Before any update the normalizer is the identity up to the ``epsilon`` (mean 0, variance 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class RunningStats:
    mean: jax.Array   # [D]
    var: jax.Array    # [D] population variance of the rows seen
    count: jax.Array  # float32 scalar: rows seen


def init(size: int) -> RunningStats:
    return RunningStats(jnp.zeros((size,), jnp.float32), jnp.ones((size,), jnp.float32), jnp.zeros((), jnp.float32))


def update(stats: RunningStats, batch: jax.Array) -> RunningStats:
    """Merge the rows of ``batch`` (any leading shape, last axis ``D``)."""
    x = jnp.asarray(batch, jnp.float32).reshape(-1, stats.mean.shape[-1])
    n = jnp.float32(x.shape[0])
    batch_mean = x.mean(axis=0)
    batch_var = x.var(axis=0)
    total = stats.count + n
    delta = batch_mean - stats.mean
    mean = stats.mean + delta * (n / total)
    # With count 0 the prior (var 1) gets weight 0, so the first batch's statistics are exact.
    m2 = stats.var * stats.count + batch_var * n + jnp.square(delta) * stats.count * n / total
    return RunningStats(mean, m2 / total, total)


def apply(stats: RunningStats, x: jax.Array, clip: float = 10.0, epsilon: float = 1e-8) -> jax.Array:
    """``(x - mean) / sqrt(var + epsilon)`` clipped to ``[-clip, clip]``; the clip bounds the
    rare values of features that were (nearly) constant so far, e.g. a one-hot stage that
    appears for the first time."""
    return jnp.clip((x - stats.mean) / jnp.sqrt(stats.var + epsilon), -clip, clip)
