"""Widening a host mid-training (esper_jax.lattice.hosts.widening): the wide host holds the narrow
one, ``preserve`` keeps its function, ``fresh`` does not but keeps its weights, moments carry over."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from esper_jax.lattice.hosts import CNNHost, TransformerHost, host_forward
from esper_jax.lattice.hosts.widening import WideCNNHost, widen_moments, widen_params, widened_host

CNN = CNNHost(num_classes=3, base_width=2, num_blocks=2, pool_blocks=1, image_size=8)
TRANSFORMER = TransformerHost(vocab_size=11, d_model=8, num_heads=2, num_layers=2, block_size=6)


def _forward(host):
    return jax.jit(functools.partial(host_forward, host))


def _inputs(host):
    if host is CNN:
        return jax.random.normal(jax.random.key(1), (4, 8, 8, 3)), jnp.array([0, 1, 2, 1])
    tokens = jax.random.randint(jax.random.key(1), (4, 6), 0, 11)
    return tokens, jnp.roll(tokens, -1, axis=1)


def _trained_like(host, key):
    """Initial parameters with every leaf moved off its initial value (biases and norms too)."""
    params = host.init(key)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("host", [CNN, TRANSFORMER], ids=["cnn", "transformer"])
def test_preserve_keeps_the_narrow_function_and_fresh_keeps_its_weights(host):
    wide = widened_host(host, 2)
    narrow_params = _trained_like(host, jax.random.key(0))
    fresh_wide = wide.init(jax.random.key(3))
    x, y = _inputs(host)
    narrow_out, wide_forward = _forward(host)(narrow_params, x), _forward(wide)
    widen = jax.jit(widen_params, static_argnames="init")

    preserved = widen(narrow_params, fresh_wide, "preserve")
    # two different programs (the wide one sums over zeros too): equal within float32 rounding
    np.testing.assert_allclose(wide_forward(preserved, x), narrow_out, rtol=1e-5, atol=1e-5)

    fresh = widen(narrow_params, fresh_wide, "fresh")
    assert not np.allclose(wide_forward(fresh, x), narrow_out, atol=1e-3)
    # both modes hold the narrow weights themselves; fresh leaves every added weight as initialized
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(narrow_params)[0]]
    for path, narrow_leaf, fresh_leaf, init_leaf in zip(paths, jax.tree.leaves(narrow_params), jax.tree.leaves(fresh),
                                                        jax.tree.leaves(fresh_wide)):
        chunks = 3 if path[-1].key in ("qkv", "qkv_b") else 1  # query, key, value side by side
        n, w = narrow_leaf.shape[-1] // chunks, fresh_leaf.shape[-1] // chunks
        kept = np.zeros(fresh_leaf.shape, bool)
        for j in range(chunks):
            kept[tuple(slice(0, s) for s in narrow_leaf.shape[:-1]) + (slice(j * w, j * w + n),)] = True
        assert kept.sum() == narrow_leaf.size
        # a boolean mask reads row-major, the order of the narrow leaf's own entries
        np.testing.assert_array_equal(np.asarray(fresh_leaf)[kept], np.asarray(narrow_leaf).reshape(-1))
        np.testing.assert_array_equal(np.asarray(fresh_leaf)[~kept], np.asarray(init_leaf)[~kept])


@pytest.mark.parametrize("host", [CNN, TRANSFORMER], ids=["cnn", "transformer"])
def test_preserved_added_weights_learn(host):
    """The weights ``preserve`` zeroes get gradients: the added capacity can join in."""
    wide = widened_host(host, 2)
    params = widen_params(_trained_like(host, jax.random.key(0)), wide.init(jax.random.key(3)), "preserve")
    x, y = _inputs(host)
    grads = jax.jit(jax.grad(lambda p: wide.loss(host_forward(wide, p, x), y)))(params)
    if host is CNN:
        cut = grads["block1"]["conv"][:, :, 2:, :4]  # narrow outputs over added inputs
        head = grads["classifier"]["w"][4:]          # added channels into the classes
    else:
        cut = grads["layer1"]["fc"][8:, :32]          # narrow MLP units over added stream dimensions
        head = grads["ln_f"]["scale"][8:]
    assert float(jnp.abs(cut).max()) > 0 and float(jnp.abs(head).max()) > 0


def test_moments_carry_over_with_the_count():
    narrow_params, wide_params = TRANSFORMER.init(jax.random.key(0)), widened_host(TRANSFORMER, 2).init(jax.random.key(1))
    optimizer = optax.adamw(1e-3)
    state = optimizer.init(narrow_params)
    grads = jax.tree.map(jnp.ones_like, narrow_params)
    for _ in range(3):
        _, state = optimizer.update(grads, state, narrow_params)
    carried = widen_moments(state, optimizer.init(wide_params))
    adam = carried[0]
    assert int(adam.count) == 3
    mu = adam.mu["layer0"]["qkv"]
    assert mu.shape == wide_params["layer0"]["qkv"].shape
    np.testing.assert_allclose(mu[:8, 16:24], state[0].mu["layer0"]["qkv"][:, 8:16])  # the narrow keys' block
    assert float(jnp.abs(mu[8:]).max()) == 0 and float(jnp.abs(mu[:, 8:16]).max()) == 0  # added: zero
    jax.tree.map(lambda a, b: None if a.shape == b.shape else pytest.fail("shape"), carried, optimizer.init(wide_params))


def test_bad_widening_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        widened_host(CNN, 1)
    with pytest.raises(ValueError, match="only the built-in CNN and transformer"):
        widened_host(widened_host(CNN, 2), 2)
    with pytest.raises(ValueError, match="narrow width"):
        WideCNNHost(base_width=4, narrow_base_width=4)
    with pytest.raises(ValueError, match="unknown widening init"):
        widen_params({}, {}, "copy")
