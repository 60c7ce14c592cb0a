"""The optimizers host and seeds train with."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.lattice.optim import OPTIMIZERS, inner_optimizer


def test_the_optimizer_choice():
    """Esper's SGD or AdamW for host and seeds, under the same clipping and schedule; anything else
    is named in the error."""
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.full(3, 100.0)}
    for kind in OPTIMIZERS:
        opt = inner_optimizer(kind, 0.1, "cosine", total_steps=10)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
        # clipped to a global norm of 1 before the step: SGD moves by lr / sqrt(3) (+ decay), Adam by ~lr
        assert np.all(np.asarray(updates["w"]) < 0) and np.all(np.abs(np.asarray(updates["w"])) <= 0.11)
        for _ in range(9):
            updates, state = opt.update(grads, state, params)
        # the cosine schedule has decayed the rate to 0 by its last step
        assert np.all(np.abs(np.asarray(opt.update(grads, state, params)[0]["w"])) < 1e-6), kind
    adam = inner_optimizer("adamw", 0.1)
    first = adam.update({"w": jnp.full(3, 1e-3)}, adam.init(params), params)[0]["w"]
    # scale-free: Adam's first step is about the rate, plus the decoupled weight decay (1e-4 x rate x w)
    np.testing.assert_allclose(np.asarray(first), -0.1 * (1 + 1e-4), rtol=1e-3)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'; choose one of sgd, adamw"):
        inner_optimizer("lamb", 0.1)
