"""Numeric building blocks (:mod:`esper_jax.lattice.ops`) against ``lax`` and NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.lattice import ops

from tests.conftest import key


def normal(seed: int, shape, scale: float = 1.0, shift: float = 0.0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale + shift, jnp.float32)


# Compiled once each: op-by-op execution would compile every primitive separately.
group_norm = jax.jit(ops.group_norm)
layer_norm = jax.jit(ops.layer_norm)
causal_attention = jax.jit(ops.causal_attention)
max_pool_2x2 = jax.jit(ops.max_pool_2x2)


# ============================================================================== convolutions


@jax.jit
def every_conv(x, w):
    return {impl: ops.conv2d(x, w, impl=impl) for impl in ops.CONV_IMPLS}


def conv_loss(impl, w, x):
    return jnp.sum(jnp.tanh(ops.conv2d(x, w, impl=impl)) * jnp.cos(x[..., :1]))


@jax.jit
def every_conv_gradient(x, w, inside_cond):
    """Gradients with respect to kernel and input, taken inside a lax.cond branch: where the
    lattice's convolutions run, and where XLA:CPU compiles gradient convolutions differently."""
    def gradients(impl):
        grad = jax.grad(conv_loss, argnums=(1, 2))
        return jax.lax.cond(inside_cond, lambda: grad(impl, w, x),
                            lambda: (jnp.zeros_like(w), jnp.zeros_like(x)))
    return {impl: gradients(impl) for impl in ops.CONV_IMPLS}


CONV_CASES = [(1, 16, 4, 4, 4), (3, 1, 1, 5, 7), (3, 8, 16, 4, 4), (5, 4, 6, 7, 5)]


@pytest.mark.parametrize("kernel, cin, cout, height, width", CONV_CASES)
def test_every_conv_formulation_equals_lax_conv(kernel, cin, cout, height, width):
    x = normal(kernel * 100 + cin, (2, height, width, cin))
    w = normal(cout, (kernel, kernel, cin, cout), scale=0.3)
    outputs = every_conv(x, w)
    reference = np.asarray(outputs["lax"])
    assert reference.shape == (2, height, width, cout) and np.abs(reference).max() > 0.1
    for impl, out in outputs.items():
        np.testing.assert_allclose(np.asarray(out), reference, rtol=1e-5, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("kernel, cin, cout, height, width", CONV_CASES)
def test_every_conv_formulation_has_lax_convs_gradients(kernel, cin, cout, height, width):
    x = normal(kernel * 10 + cout, (3, height, width, cin))
    w = normal(cin, (kernel, kernel, cin, cout), scale=0.3)
    gradients = every_conv_gradient(x, w, jnp.asarray(True))
    reference_w, reference_x = (np.asarray(g) for g in gradients["lax"])
    assert np.abs(reference_w).max() > 1e-2 and np.abs(reference_x).max() > 1e-2
    for impl, (grad_w, grad_x) in gradients.items():
        np.testing.assert_allclose(np.asarray(grad_w), reference_w, rtol=1e-4, atol=1e-5, err_msg=impl)
        np.testing.assert_allclose(np.asarray(grad_x), reference_x, rtol=1e-4, atol=1e-5, err_msg=impl)


def test_every_conv_formulation_under_vmap_over_kernels():
    """The vmapped population path: one kernel per member, values and gradients."""
    x = normal(1, (3, 2, 6, 6, 4))
    w = normal(2, (3, 3, 3, 4, 8), scale=0.3)
    outputs = jax.jit(jax.vmap(every_conv))(x, w)
    grads = jax.jit(jax.vmap(lambda x, w: {impl: jax.grad(conv_loss, argnums=1)(impl, w, x) for impl in ops.CONV_IMPLS}))(x, w)
    for impl in ops.CONV_IMPLS:
        np.testing.assert_allclose(np.asarray(outputs[impl]), np.asarray(outputs["lax"]), rtol=1e-5, atol=1e-5, err_msg=impl)
        np.testing.assert_allclose(np.asarray(grads[impl]), np.asarray(grads["lax"]), rtol=1e-4, atol=1e-5, err_msg=impl)


def test_lax_vjp_batches_as_im2col_under_vmap():
    """Vmapped over kernels, lax_vjp's convolutions (forward and both gradients) run as im2col
    matmuls rather than grouped convolutions; unbatched, they stay lax convolutions."""
    x, w = normal(3, (2, 2, 6, 6, 4)), normal(4, (2, 3, 3, 4, 8), scale=0.3)
    value_and_grad = jax.value_and_grad(lambda w, x: conv_loss("lax_vjp", w, x), argnums=(0, 1))
    assert "convolution" not in jax.jit(jax.vmap(value_and_grad)).lower(w, x).as_text()
    assert "convolution" in jax.jit(value_and_grad).lower(w[0], x[0]).as_text()
    # Unbatched arguments are broadcast: images shared by every kernel, and nested vmaps.
    shared = jax.jit(jax.vmap(value_and_grad, in_axes=(0, None)))(w, x[0])
    for member in range(2):
        expected = value_and_grad(w[member], x[0])
        for got, want in zip(jax.tree.leaves(shared), jax.tree.leaves(expected)):
            np.testing.assert_allclose(np.asarray(got[member]), np.asarray(want), rtol=1e-4, atol=1e-5)
    nested = jax.jit(jax.vmap(jax.vmap(value_and_grad)))(w[None], x[None])
    assert nested[1][0].shape == (1,) + w.shape


def test_conv_impl_default_and_override(monkeypatch):
    monkeypatch.delenv("ESPER_CONV_IMPL", raising=False)
    assert ops.conv_impl() == ops.default_conv_impl() == ("lax_vjp" if jax.default_backend() == "cpu" else "im2col")
    monkeypatch.setenv("ESPER_CONV_IMPL", "im2col")
    assert ops.conv_impl() == "im2col"
    monkeypatch.setenv("ESPER_CONV_IMPL", "winograd")
    with pytest.raises(ValueError, match="ESPER_CONV_IMPL"):
        ops.conv_impl()


@jax.jit
def both_depthwise(x, w):
    reference = jax.lax.conv_general_dilated(
        x, w[:, :, None, :], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1]
    )
    return ops.depthwise_conv2d(x, w), reference


@pytest.mark.parametrize("kernel, channels, height, width", [(3, 8, 5, 7), (5, 6, 6, 6)])
def test_depthwise_conv_equals_grouped_lax_conv(kernel, channels, height, width):
    x = normal(channels, (2, height, width, channels))
    w = normal(kernel + channels, (kernel, kernel, channels))
    ours, reference = both_depthwise(x, w)
    assert ours.shape == x.shape
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-5, atol=1e-5)


# ============================================================================== pooling and normalization


def test_max_pool_2x2_equals_reduce_window():
    x = normal(3, (2, 6, 4, 5))
    reference = jax.jit(lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"))(x)
    pooled = max_pool_2x2(x)
    assert pooled.shape == (2, 3, 2, 5)
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(reference))
    # and by hand for one window
    assert float(pooled[1, 2, 1, 3]) == float(np.max(np.asarray(x)[1, 4:6, 2:4, 3]))


def test_group_norm_normalizes_each_sample_over_all_its_features():
    x = normal(4, (3, 4, 4, 6), scale=3.0, shift=5.0) * np.asarray([1.0, 10.0, 0.1], np.float32)[:, None, None, None]
    y = np.asarray(group_norm(x, jnp.ones((6,)), jnp.zeros((6,))), np.float64)
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(1, 2, 3)), 1.0, rtol=1e-3)
    # Not per channel: one group over all channels.
    assert np.abs(y.mean(axis=(1, 2))).max() > 0.1

    scale, bias = normal(5, (6,)), normal(6, (6,))
    z = np.asarray(group_norm(x, scale, bias), np.float64)
    np.testing.assert_allclose(z, y * np.asarray(scale) + np.asarray(bias), rtol=1e-5, atol=1e-5)

    # Samples never share statistics; a constant sample maps to the bias.
    x2 = np.array(x)
    x2[1] = 7.0
    z2 = np.asarray(group_norm(x2, scale, bias))
    np.testing.assert_array_equal(z2[[0, 2]], np.asarray(group_norm(x, scale, bias))[[0, 2]])
    np.testing.assert_allclose(z2[1], np.broadcast_to(np.asarray(bias), z2[1].shape), atol=1e-6)


def test_layer_norm_normalizes_the_last_axis():
    x = normal(7, (2, 5, 16), scale=4.0, shift=-2.0)
    y = np.asarray(layer_norm(x, jnp.ones((16,)), jnp.zeros((16,))), np.float64)
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=-1), 1.0, rtol=1e-3)
    scale, bias = normal(8, (16,)), normal(9, (16,))
    np.testing.assert_allclose(
        np.asarray(layer_norm(x, scale, bias)), y * np.asarray(scale) + np.asarray(bias), rtol=1e-5, atol=1e-5
    )


# ============================================================================== attention


def reference_attention(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t = q.shape[1]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def test_causal_attention_matches_a_reference_and_is_causal():
    q, k, v = (normal(10 + i, (2, 7, 3, 4)) for i in range(3))
    out = np.asarray(causal_attention(q, k, v))
    np.testing.assert_allclose(out, reference_attention(q, k, v), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 0], np.asarray(v)[:, 0], rtol=1e-6, atol=1e-6)  # the first token sees itself only

    t = 4
    q2, k2, v2 = (np.array(a) for a in (q, k, v))
    k2[:, t:] *= -2.0
    v2[:, t:] += 1.0
    q2[:, t:] *= 3.0
    changed = np.asarray(causal_attention(q2, k2, v2))
    np.testing.assert_array_equal(changed[:, :t], out[:, :t])
    assert not np.allclose(changed[:, t:], out[:, t:], atol=1e-3)


# ============================================================================== initializers


def test_initializers_have_the_advertised_scale():
    he = np.asarray(ops.he_normal(key(0), (64, 256), 64))
    lecun = np.asarray(ops.lecun_normal(key(1), (64, 256), 64))
    assert he.dtype == lecun.dtype == np.float32
    np.testing.assert_allclose(he.std(), np.sqrt(2.0 / 64), rtol=0.05)
    np.testing.assert_allclose(lecun.std(), np.sqrt(1.0 / 64), rtol=0.05)
    assert abs(he.mean()) < 0.01 and abs(lecun.mean()) < 0.01
