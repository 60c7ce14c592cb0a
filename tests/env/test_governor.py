"""The governor's rule on its own (:func:`esper_jax.env.governor.judge`), on hand-made losses: no
training needed to see when it rolls back, what it counts and which epochs become snapshots."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from esper_jax.env.governor import GovernorConfig, judge

CONFIG = GovernorConfig(absolute_loss_bound=10.0, relative_factor=3.0, patience=2, history=3)
RECENT = jnp.full((4, 3), 2.0)  # every member's recent mean is 2.0


def verdict(val_loss, train_loss=(1.0, 1.0, 1.0, 1.0), divergent_epochs=(0, 0, 0, 0)):
    v = judge(CONFIG, jnp.asarray(val_loss, jnp.float32), jnp.asarray(train_loss, jnp.float32), RECENT,
              jnp.asarray(divergent_epochs, jnp.int32))
    return {name: np.asarray(value) for name, value in v._asdict().items()}


def test_a_non_finite_loss_rolls_back_at_once():
    v = verdict([jnp.nan, 2.0, jnp.inf, 2.0], train_loss=[1.0, jnp.nan, 1.0, 1.0])
    np.testing.assert_array_equal(v["rolled_back"], [True, True, True, False])
    np.testing.assert_array_equal(v["good"], [False, False, False, True])
    np.testing.assert_array_equal(v["divergent_epochs"], [0, 0, 0, 0])


def test_divergence_needs_both_bounds_and_patience():
    # member 0: above both bounds for the first time (counted; neither rolled back nor a snapshot);
    # member 1: far above the recent mean but below the absolute bound; member 2: above both for
    # the second epoch in a row (patience 2: rolled back); member 3: calm again after one.
    v = verdict([11.0, 9.0, 11.0, 2.5], divergent_epochs=[0, 0, 1, 1])
    np.testing.assert_array_equal(v["rolled_back"], [False, False, True, False])
    np.testing.assert_array_equal(v["divergent_epochs"], [1, 0, 0, 0])  # reset after a rollback or a calm epoch
    np.testing.assert_array_equal(v["good"], [False, True, False, True])


def test_relative_bound_uses_the_recent_mean():
    high_mean = jnp.full((1, 3), 5.0)  # 3 x 5 = 15: a loss of 11 is not far above it
    v = judge(CONFIG, jnp.asarray([11.0]), jnp.asarray([1.0]), high_mean, jnp.asarray([1], jnp.int32))
    assert not bool(v.rolled_back[0]) and bool(v.good[0]) and int(v.divergent_epochs[0]) == 0
