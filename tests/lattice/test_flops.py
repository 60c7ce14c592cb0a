"""FLOP counts of traced programs (esper_jax.lattice.flops): exact on hand-computed cases, and
within a few percent of XLA's own cost analysis of the same programs (lowered, not compiled: the
count must not depend on the backend's optimizations)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.lattice import ops
from esper_jax.lattice.blueprints.registry import blueprints_for
from esper_jax.lattice.flops import function_flops, model_costs
from esper_jax.lattice.hosts import CNNHost, TransformerHost, host_forward
from esper_jax.lattice.model import MorphogeneticModel

f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)


def xla_flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


def test_matmul_and_convolution_counts_by_hand():
    assert function_flops(jnp.matmul, f32(5, 7), f32(7, 3)) == 2 * 5 * 3 * 7
    # A 'same' 3x3 convolution of a 6x6 map: per dimension, 6 outputs x 3 taps less the 2 taps on padding.
    valid = (6 * 3 - 2) ** 2
    conv = lambda x, w: ops.conv2d(x, w)
    assert function_flops(conv, f32(2, 6, 6, 3), f32(3, 3, 3, 4)) == 2 * 2 * 4 * 3 * valid
    # Its backward: the input gradient and the kernel gradient are convolutions of the same size.
    grads = jax.grad(lambda x, w: ops.conv2d(x, w).sum(), argnums=(0, 1))
    elementwise = 2 * 6 * 6 * 4  # the sum's reduction (its cotangent's broadcast is free)
    assert function_flops(grads, f32(2, 6, 6, 3), f32(3, 3, 3, 4)) == 3 * 2 * 2 * 4 * 3 * valid + elementwise
    # elementwise: one per output element; a scan counts its body length times
    assert function_flops(lambda x: jnp.exp(x) + 1.0, f32(4, 5)) == 2 * 20
    scanned = lambda x: jax.lax.scan(lambda c, _: (c * 2.0, None), x, None, length=6)[0]
    assert function_flops(scanned, f32(3)) == 6 * 3


HOSTS = {
    "cnn 3x3": (CNNHost(base_width=4, image_size=8), f32(2, 8, 8, 3), i32(2)),
    "cnn 1x1": (CNNHost.pointwise(base_width=4, image_size=8), f32(2, 8, 8, 3), i32(2)),
    "transformer": (TransformerHost(vocab_size=19, d_model=8, num_heads=2, num_layers=2, block_size=6),
                    i32(2, 6), i32(2, 6)),
    "position-wise": (TransformerHost(vocab_size=19, d_model=8, num_heads=2, num_layers=1, block_size=6,
                                      attention=False), i32(2, 6), i32(2, 6)),
}


@pytest.mark.parametrize("name", list(HOSTS))
def test_host_counts_agree_with_xla(name):
    host, x, y = HOSTS[name]
    params = jax.eval_shape(host.init, jax.random.key(0))
    loss = lambda p, x, y: host.loss(host_forward(host, p, x), y)
    assert function_flops(loss, params, x, y) == pytest.approx(xla_flops(loss, params, x, y), rel=0.03)
    if host.topology == "transformer":
        # XLA's count of the CNN's kernel-gradient convolution (the batch as its features, the map as its
        # window) leaves out most of its work (2 convolutions counted of 3 in the hand case above), so the
        # training step is compared where it has none.
        step = jax.value_and_grad(loss)
        assert function_flops(step, params, x, y) == pytest.approx(xla_flops(step, params, x, y), rel=0.03)


@pytest.mark.parametrize("topology, h", [("cnn", f32(2, 8, 8, 16)), ("transformer", f32(2, 16, 32))])
def test_every_blueprint_forward_agrees_with_xla(topology, h):
    for bp in blueprints_for(topology):
        if bp.is_noop:
            continue
        params = jax.eval_shape(lambda k: bp.init(k, h.shape[-1]), jax.random.key(0))
        assert function_flops(bp.apply, params, h) == pytest.approx(xla_flops(bp.apply, params, h), rel=0.03), bp.name


def test_model_costs_of_every_slot_and_blueprint():
    host = CNNHost(base_width=4, image_size=8)
    model = MorphogeneticModel.build(host, ("r0c0", "r2c0"), blueprints=("norm", "conv_small"))
    costs = model_costs(model, train_batch=4, eval_batch=8, example_shape=(8, 8, 3))
    assert costs.seed_train.shape == costs.seed_eval.shape == (2, model.lattice.num_blueprints)
    params = jax.eval_shape(host.init, jax.random.key(0))
    loss = lambda p, x, y: host.loss(host_forward(host, p, x), y)
    assert costs.host_eval == function_flops(loss, params, f32(8, 8, 8, 3), i32(8))
    assert costs.host_train == function_flops(jax.value_and_grad(loss), params, f32(4, 8, 8, 3), i32(4))
    noop = [b for b, bp in enumerate(model.lattice.blueprints) if bp.is_noop]
    real = [b for b, bp in enumerate(model.lattice.blueprints) if not bp.is_noop]
    assert np.all(costs.seed_train[:, noop] == 0) and np.all(costs.seed_train[:, real] > costs.seed_eval[:, real] / 2)
    # r2c0 (after block 2, two poolings) sees the validation batch as a 2x2 map of 16 channels
    bp = model.lattice.blueprints[real[-1]]
    seed = jax.eval_shape(lambda k: bp.init(k, 16), jax.random.key(0))
    assert costs.seed_eval[1, real[-1]] == function_flops(bp.apply, seed, f32(8, 2, 2, 16))
