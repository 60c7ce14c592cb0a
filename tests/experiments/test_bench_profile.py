"""The benchmark's profile (experiments.bench.profile): instructions attributed to what the code
was doing through the compiled program's stack metadata, and thunk time summed by category."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from esper_jax.lattice import ops
from experiments.bench.profile import CONTROL_FLOW, Frame, attribute, category, profile_categories

OPS = "/repo/esper_jax/lattice/ops.py"


@pytest.mark.parametrize("stack, op_name, expected", [
    ([Frame("/x/jax/_src/lax.py", "conv", 1), Frame(OPS, "_conv_lax", 9)], "jit(f)/jvp()/conv", "convolution forward"),
    ([Frame(OPS, "_kernel_gradient_lax", 9)], "jit(f)/transpose(jvp())/conv", "convolution backward"),
    ([Frame(OPS, "group_norm", 9)], "jit(f)/transpose(jvp())/reduce_sum", "normalization backward"),
    ([Frame(OPS, "max_pool_2x2", 9)], "jit(f)/jvp()/reduce_max", "pooling forward"),
    ([Frame("/v/site-packages/optax/_src/transform.py", "update_fn", 3)], "jit(f)/mul", "optimizer"),
    ([Frame("/v/site-packages/optax/losses/_classification.py", "f", 3)], "jit(f)/exp", "loss"),
    ([Frame("/repo/esper_jax/lattice/blueprints/cnn.py", "ConvLight.apply", 3)], "jit(f)/jvp()/mul", "seeds forward"),
    ([Frame("/repo/esper_jax/lattice/model.py", "MorphogeneticModel.apply_slot", 3)], "jit(f)/select_n",
     "lattice (slots, blending, lifecycle)"),
    ([Frame("/repo/esper_jax/rl/ppo.py", "loss_fn", 3)], "jit(f)/add", "PPO (policy, GAE, minibatches)"),
    ([], "", CONTROL_FLOW),
])
def test_category_names_the_innermost_project_frame(stack, op_name, expected):
    assert category(stack, op_name) == expected


@pytest.fixture(scope="module")
def tiny_step():
    """A convolution, the group normalization and pooling, a loss and an SGD step: tiny shapes."""
    optimizer = optax.sgd(0.1, momentum=0.9)

    def loss(w, x):
        h = jax.nn.relu(ops.group_norm(ops.conv2d(x, w, impl="lax_vjp"), jnp.ones(4), jnp.zeros(4)))
        return jnp.mean(ops.max_pool_2x2(h) ** 2)

    @jax.jit
    def step(w, state, x):
        grads = jax.grad(loss)(w, x)
        updates, state = optimizer.update(grads, state, w)
        return optax.apply_updates(w, updates), state

    w = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
    return step, (w, optimizer.init(w), x)


def test_every_part_of_a_training_step_is_attributed(tiny_step):
    step, args = tiny_step
    categories = set(attribute(step.lower(*args).compile().as_text()).values())
    for expected in ("convolution forward", "convolution backward", "normalization forward",
                     "normalization backward", "pooling forward", "pooling backward", "optimizer"):
        assert expected in categories, (expected, categories)


def test_profile_sums_thunk_time_by_category(tiny_step):
    step, args = tiny_step
    profile = profile_categories(step.lower(*args).compile(), *args, calls=2)
    assert profile.thunk_s > 0 and profile.wall_s > 0
    assert abs(sum(profile.seconds.values()) - profile.thunk_s) < 1e-9
    assert profile.seconds.get("convolution backward", 0.0) > 0.0
    assert list(profile.seconds.values()) == sorted(profile.seconds.values(), reverse=True)
