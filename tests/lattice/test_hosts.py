"""Hosts end to end (:mod:`esper_jax.lattice.hosts`): Esper's CNN hosts, the GPT-style transformer
host, slot configuration against a host, and a few training steps with a live seed.

Shapes at CIFAR size come from ``jax.eval_shape`` (nothing compiles); numbers come from the
session rigs of ``conftest.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.lattice import ops
from esper_jax.lattice.hosts import CNNHost, TransformerHost, host_forward, slot_config_for
from esper_jax.lattice.lifecycle import Stage
from esper_jax.lattice.model import MorphogeneticModel

from tests.conftest import to_device, tree_norm



def param_shapes(host):
    return jax.eval_shape(host.init, jax.random.key(0))


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def abstract_forward(host, batch_shape, dtype=jnp.float32):
    """Output shape and the activation shape at every injection point, without compiling."""
    params = param_shapes(host)
    h = jax.eval_shape(host.stem, params, jax.ShapeDtypeStruct(batch_shape, dtype))
    at_points = []
    for index in range(len(host.injection_points)):
        h = jax.eval_shape(functools.partial(host.segment, index=index), params, h=h)
        at_points.append(h.shape)
    out = jax.eval_shape(functools.partial(host_forward, host), params, jax.ShapeDtypeStruct(batch_shape, dtype))
    return out.shape, at_points


# ============================================================================== CNN host


def test_cnn_baseline_is_esper_weak_host():
    host = CNNHost.baseline()
    params = param_shapes(host)
    assert count(params) == 6418
    assert host.num_classes == 10 and params["classifier"]["w"].shape == (32, 10)
    assert [params[f"block{i}"]["conv"].shape for i in range(3)] == [(3, 3, 3, 8), (3, 3, 8, 16), (3, 3, 16, 32)]
    points = host.injection_points
    assert [p.slot_id for p in points] == ["r0c0", "r0c1", "r1c0", "r1c1", "r2c0"]
    assert [p.dim for p in points] == [8, 8, 16, 16, 32]
    assert {p.topology for p in points} == {"cnn"} and host.topology == "cnn"
    assert not any(p.parallel for p in points)
    assert host.default_slots == ("r0c0", "r1c0", "r2c0")


def test_cnn_classifier_follows_the_number_of_classes():
    assert count(param_shapes(CNNHost.baseline(num_classes=100))) == 6418 + 32 * 90 + 90


def test_cnn_impaired_host_uses_1x1_kernels_and_base_width_1():
    host = CNNHost.impaired()
    params = param_shapes(host)
    assert host.kernel_size == 1 and host.base_width == 1
    assert [params[f"block{i}"]["conv"].shape for i in range(3)] == [(1, 1, 3, 1), (1, 1, 1, 2), (1, 1, 2, 4)]
    assert [p.dim for p in host.injection_points] == [1, 1, 2, 2, 4]
    assert count(params) == (3 + 2) + (2 + 4) + (8 + 8) + (4 * 10 + 10)


@pytest.mark.parametrize(
    "host",
    [CNNHost.baseline(), CNNHost.baseline(num_classes=100), CNNHost.impaired(), CNNHost.impaired(num_classes=100)],
    ids=["baseline-10", "baseline-100", "impaired-10", "impaired-100"],
)
def test_cnn_shapes_for_cifar_images(host):
    assert host.input_shape(5) == (5, 32, 32, 3)
    out, at_points = abstract_forward(host, host.input_shape(5))
    assert out == (5, host.num_classes)
    sizes = {"r0c0": 32, "r0c1": 16, "r1c0": 16, "r1c1": 8, "r2c0": 8}
    assert at_points == [(5, sizes[p.slot_id], sizes[p.slot_id], p.dim) for p in host.injection_points]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(kernel_size=2), "odd"),
        (dict(num_blocks=0), "at least one block"),
        (dict(pool_blocks=4), "pool_blocks"),
        (dict(image_size=30), "cannot be pooled"),
    ],
)
def test_cnn_host_rejects_bad_configurations(overrides, message):
    with pytest.raises(ValueError, match=message):
        CNNHost(**overrides)


def test_cnn_host_treats_samples_independently(cnn):
    """Per-sample normalization: no statistics are shared across the batch."""
    _, out, _ = cnn.reference
    x = np.array(cnn.x)
    x[1:] *= -3.0
    x = to_device(x)
    _, changed, _ = cnn.host_only(x=x)
    np.testing.assert_array_equal(np.asarray(changed[0]), np.asarray(out[0]))
    assert not np.allclose(np.asarray(changed[1:]), np.asarray(out[1:]), atol=1e-4)


# ============================================================================== transformer host


def test_transformer_output_and_injection_points(transformer):
    """Per layer, in forward order: beside the attention (c1), beside the MLP (c2), after the
    layer (c0); only c0 is a point whose seed reads the stream there, and the default slots are
    the c0 points (the stream after each layer)."""
    host = transformer.host
    _, out, _ = transformer.reference
    assert out.shape == (2, 8, host.vocab_size)
    assert np.all(np.isfinite(np.asarray(out)))
    points = host.injection_points
    assert [p.slot_id for p in points] == ["r0c1", "r0c2", "r0c0", "r1c1", "r1c2", "r1c0"]
    assert [p.parallel for p in points] == [True, True, False] * 2
    assert {p.dim for p in points} == {host.d_model}
    assert host.default_slots == ("r0c0", "r1c0") and host.topology == "transformer"


def test_transformer_segments_are_the_layers_attention_and_mlp(transformer):
    """Segments c1, c2 then c0 of a layer are its attention (``h + A(h)``), its MLP
    (``h + M(h)``) and nothing: their composition is one pre-norm layer, written out here."""
    host, params = transformer.host, transformer.host_params
    h = np.random.default_rng(4).standard_normal((2, 8, host.d_model)).astype(np.float32)

    @jax.jit
    def both(params, h):
        p = params["layer1"]
        x = ops.layer_norm(h, p["ln1"]["scale"], p["ln1"]["bias"])
        q, k, v = jnp.split(x @ p["qkv"] + p["qkv_b"], 3, axis=-1)
        heads = lambda y: y.reshape(2, 8, host.num_heads, host.d_model // host.num_heads)
        mid = h + jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True).reshape(h.shape) @ p["proj"] + p["proj_b"]
        x = ops.layer_norm(mid, p["ln2"]["scale"], p["ln2"]["bias"])
        written = mid + jax.nn.gelu(x @ p["fc"] + p["fc_b"]) @ p["out"] + p["out_b"]
        after_attention = host.segment(params, 3, h)  # r1c1 follows it
        after_mlp = host.segment(params, 4, after_attention)  # r1c2
        after_layer = host.segment(params, 5, after_mlp)  # r1c0
        return (mid, written, written), (after_attention, after_mlp, after_layer)

    expected, segments = both(params, to_device(h))
    for want, got in zip(expected, segments):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_transformer_tinystories_host_shapes():
    host = TransformerHost.tinystories()
    assert [p.slot_id for p in host.injection_points if not p.parallel] == ["r0c0", "r1c0", "r2c0", "r3c0"]
    assert sorted(p.slot_id for p in host.injection_points) == sorted(f"r{i}c{c}" for i in range(4) for c in range(3))
    assert host.default_slots == ("r0c0", "r1c0", "r2c0", "r3c0")
    out, at_points = abstract_forward(host, (3, 16), jnp.int32)
    assert out == (3, 16, 50257)
    assert at_points == [(3, 16, 256)] * 12


def test_transformer_is_causal(transformer):
    _, out, _ = transformer.reference
    t = 5
    x = np.array(transformer.x)
    x[:, t] = (x[:, t] + 7) % transformer.host.vocab_size
    x = to_device(x)
    _, changed, _ = transformer.host_only(x=x)
    np.testing.assert_allclose(np.asarray(changed[:, :t]), np.asarray(out[:, :t]), rtol=0, atol=1e-6)
    assert not np.allclose(np.asarray(changed[:, t:]), np.asarray(out[:, t:]), atol=1e-4)


def test_position_wise_transformer_sees_one_token_at_a_time():
    """Without attention the host is a bigram model: a position's logits depend on its own token and
    place only, it has no attention parameters, and it keeps the same injection points."""
    host = TransformerHost(vocab_size=11, d_model=8, num_heads=2, num_layers=2, block_size=6, attention=False)
    params = host.init(jax.random.key(0))
    assert all(set(params[f"layer{i}"]) == {"ln2", "fc", "fc_b", "out", "out_b"} for i in range(2))
    with_attention = dataclasses.replace(host, attention=True)
    assert count(params) < count(param_shapes(with_attention))
    assert [p.slot_id for p in host.injection_points] == [p.slot_id for p in with_attention.injection_points]
    x = np.arange(12).reshape(2, 6) % 11
    out = host_forward(host, params, jnp.asarray(x))
    for t in range(6):
        changed = x.copy()
        changed[:, t] = (changed[:, t] + 3) % 11
        moved = np.abs(np.asarray(host_forward(host, params, jnp.asarray(changed)) - out)).max(axis=(0, 2))
        assert moved[t] > 1e-4 and np.all(np.delete(moved, t) == 0)


def test_transformer_output_layer_is_the_token_embedding(transformer):
    """Tied embeddings: no separate output matrix; a token's logit column is its embedding row,
    and the head sends gradient into ``tok_emb`` even for tokens absent from the input."""
    params = transformer.host_params
    matrices = [leaf.shape for leaf in jax.tree.leaves(params) if leaf.ndim == 2]
    assert (transformer.host.vocab_size, transformer.host.d_model) in matrices
    assert all(shape[-1] != transformer.host.vocab_size for shape in matrices), "no separate output projection"

    present = np.unique(np.asarray(transformer.x))
    absent = np.setdiff1d(np.arange(transformer.host.vocab_size), present)
    assert absent.size > 0
    v = int(absent[0])
    _, out, grads = transformer.reference
    # Only the head reads the embedding rows of absent tokens, and they still learn.
    assert np.all(np.abs(np.asarray(grads["tok_emb"])[absent]).sum(axis=1) > 0)

    bump = np.random.default_rng(5).standard_normal(transformer.host.d_model).astype(np.float32)
    tok_emb = np.array(params["tok_emb"])
    tok_emb[v] += bump
    bumped = dict(params, tok_emb=to_device(tok_emb))
    _, changed, _ = transformer.host_only(host_params=bumped)
    changed, out = np.asarray(changed), np.asarray(out)
    others = np.arange(transformer.host.vocab_size) != v
    np.testing.assert_array_equal(changed[..., others], out[..., others])
    assert not np.allclose(changed[..., v], out[..., v], atol=1e-4)


def test_transformer_host_rejects_bad_configurations():
    with pytest.raises(ValueError, match="divisible"):
        TransformerHost(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="at least one layer"):
        TransformerHost(num_layers=0)
    host = TransformerHost(vocab_size=64, d_model=32, num_heads=2, num_layers=2, block_size=8)
    with pytest.raises(ValueError, match="block size"):
        abstract_forward(host, (1, 9), jnp.int32)


# ============================================================================== slot configuration


@pytest.mark.parametrize("slot_id", ["r2c1", "r3c0", "r0c2"])
def test_slot_config_rejects_a_slot_the_cnn_host_lacks(slot_id):
    with pytest.raises(ValueError) as error:
        slot_config_for(CNNHost.baseline(), [slot_id])
    message = str(error.value)
    assert slot_id in message
    for valid in ("r0c0", "r0c1", "r1c0", "r1c1", "r2c0"):
        assert valid in message


@pytest.mark.parametrize("slot_id", ["r2c0", "r0c3", "r2c1"])
def test_slot_config_rejects_a_slot_the_transformer_host_lacks(transformer_host, slot_id):
    with pytest.raises(ValueError) as error:
        MorphogeneticModel.build(transformer_host, slot_ids=[slot_id])
    message = str(error.value)
    assert slot_id in message and "does not exist on this transformer host" in message
    for valid in ("r0c0", "r0c1", "r0c2", "r1c0", "r1c1", "r1c2"):
        assert valid in message


def test_slot_config_accepts_every_column_of_the_transformer_grid(transformer_host):
    config = slot_config_for(transformer_host, ["r1c2", "r0c1", "r1c0", "r0c0"])
    assert config.slot_ids == ("r0c0", "r0c1", "r1c0", "r1c2")  # row-major: the action order
    assert config.execution_order == ("r0c1", "r0c0", "r1c2", "r1c0")  # the forward's order
    assert [s.parallel for s in config.slots] == [False, True, False, True]


@pytest.mark.parametrize("legacy, cnn, transformer", [("early", "r0c0", "r0c0"), ("mid", "r1c0", "r1c0"),
                                                       ("late", "r2c0", "r1c0")])
def test_slot_config_rejects_legacy_names_naming_the_hosts_own_slot(legacy, cnn, transformer):
    """The hint is derived from the host's layout: on the CNN host mid and late are the residual
    streams after blocks 1 and 2 (r1c0, r2c0), not r0c1 (a pool) or r0c2 (no such slot)."""
    hosts = ((CNNHost.baseline(), cnn),
             (TransformerHost(vocab_size=64, d_model=32, num_heads=2, num_layers=2, block_size=8), transformer))
    for host, expected in hosts:
        with pytest.raises(ValueError) as error:
            slot_config_for(host, ["r0c0", legacy])
        assert f"{legacy} is {expected}" in str(error.value), str(error.value)


def test_slot_config_orders_row_major_and_keeps_execution_order():
    config = slot_config_for(CNNHost.baseline(), ["r2c0", "r0c1", "r1c0"])
    assert config.slot_ids == ("r0c1", "r1c0", "r2c0")
    assert [s.dim for s in config.slots] == [8, 16, 32]
    assert tuple(config.execution_order) == ("r0c1", "r1c0", "r2c0")
    with pytest.raises(ValueError, match="duplicate"):
        slot_config_for(CNNHost.baseline(), ["r1c0", "r1c0"])


# ============================================================================== training


@jax.jit
def sgd(params, grads, lr):
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)


@pytest.mark.parametrize("topology, blueprint, lr", [("cnn", "conv_light", 0.1), ("transformer", "lora", 0.5)])
def test_sgd_steps_with_a_live_seed_reduce_the_loss(request, topology, blueprint, lr):
    rig = request.getfixturevalue(topology)
    slot_id = rig.slot_ids[-1]
    state = rig.plant(rig.state, slot_id, blueprint, Stage.BLENDING, alpha=0.5)
    params = (rig.host_params, state.params)
    losses = []
    for _ in range(6):
        loss, _, g_host, g_seed = rig.run(state.replace(params=params[1]), host_params=params[0])
        losses.append(float(loss))
        params = sgd(params, (g_host, g_seed), jnp.float32(lr))
    losses.append(float(rig.run(state.replace(params=params[1]), host_params=params[0])[0]))

    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    if topology == "cnn":
        assert all(b < a for a, b in zip(losses, losses[1:])), losses
    # (The tiny transformer on random tokens is too curved for every plain SGD step to descend:
    # its losses rose mid-run even at lr 0.02 with one random draw of the seed; whether they
    # did depended on that draw. What must hold is below: the gradient is the loss's.)
    # The seed learned, and only the seed that is live.
    before, after = rig.units(state.params, slot_id), rig.units(params[1], slot_id)
    for name in before:
        moved = tree_norm(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), after[name], before[name]))
        assert (moved > 0) == (name == blueprint), name


@pytest.mark.parametrize("topology, blueprint", [("cnn", "conv_light"), ("transformer", "lora")])
def test_a_small_step_along_the_gradient_lowers_the_loss_as_predicted(request, topology, blueprint):
    """First-order check of the host and seed gradients together: a step of ``eps`` along
    ``-grad`` lowers the loss by ``eps * |grad|^2`` up to second-order terms."""
    rig = request.getfixturevalue(topology)
    state = rig.plant(rig.state, rig.slot_ids[-1], blueprint, Stage.BLENDING, alpha=0.5)
    loss, _, g_host, g_seed = rig.run(state, host_params=rig.host_params)
    eps = 1e-3
    host_params, seed_params = sgd((rig.host_params, state.params), (g_host, g_seed), jnp.float32(eps))
    stepped = float(rig.run(state.replace(params=seed_params), host_params=host_params)[0])
    predicted = eps * sum(float(np.sum(np.square(np.asarray(g)))) for g in jax.tree.leaves((g_host, g_seed)))
    assert predicted > 0
    np.testing.assert_allclose(float(loss) - stepped, predicted, rtol=0.1)
