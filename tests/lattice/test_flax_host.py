"""A user's own Flax network as a host (:mod:`esper_jax.lattice.hosts.flax_host`).

With every slot dormant the host computes what the Flax network itself computes (two different
programs: compared to float32 rounding); a seed planted through the lattice and blended in
changes its output; its injection points follow the segments; the checks that modules form a
host, and the import path's errors, are one line each. Tiny shapes (8x8 images, widths 4 and 8),
one forward program compiled for the model: nothing here trains.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.lattice.hosts import FlaxHost, HostImportError, host_forward, import_host
from esper_jax.lattice.lifecycle import Stage
from esper_jax.lattice.model import MorphogeneticModel
from esper_jax.lattice.strategy import PopulationStrategy

from examples.my_host import Block  # the README's block: conv -> norm -> ReLU (-> 2x2 max-pooling)
from tests.conftest import (_read_units, _write_units, assert_close_across_programs, fresh_lattice_state, key,
                            perturb_zero_leaves, set_status, strong, to_device)

HERE = __name__
BATCH, SIZE, CHANNELS, CLASSES = 3, 8, 1, 3


class Head(nn.Module):
    classes: int

    @nn.compact
    def __call__(self, h):
        return nn.Dense(self.classes)(h.reshape(h.shape[0], -1, h.shape[-1]).mean(axis=1))


class Network(nn.Module):
    """The same network as one Flax module: its submodules carry the host's parameter names."""

    def setup(self):
        self.segment0 = Block(4, pool=True)
        self.segment1 = Block(8)
        self.head = Head(CLASSES)

    def __call__(self, x):
        return self.head(self.segment1(self.segment0(x)))


def cnn_host(**changes) -> FlaxHost:
    host = FlaxHost(None, [Block(4, pool=True), Block(8)], Head(CLASSES), (SIZE, SIZE, CHANNELS))
    return dataclasses.replace(host, **changes) if changes else host


class Patches(nn.Module):
    """A ViT-style stem: 4x4 patches of the image, embedded as tokens [B, T, D]."""
    dim: int

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        patches = x.reshape(b, h // 4, 4, w // 4, 4, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, 16 * c)
        return nn.Dense(self.dim)(patches)


class Mixer(nn.Module):
    @nn.compact
    def __call__(self, h):
        return h + nn.Dense(h.shape[-1])(nn.gelu(nn.LayerNorm()(h)))


# Import paths for import_host (this module's functions).
def make_tuple():
    return None, [Block(4, pool=True), Block(8)], Head(CLASSES)


def make_flax_host():
    return cnn_host()


def make_transformer():
    return Patches(8), (Mixer(), Mixer()), Head(CLASSES)


def make_string():
    return "a host"


def make_error():
    raise RuntimeError("no GPU here\nsecond line")


NOT_A_FUNCTION = 3


def images(seed: int = 0) -> jax.Array:
    return to_device(np.random.default_rng(seed).standard_normal((BATCH, SIZE, SIZE, CHANNELS)).astype(np.float32))


# ---------------------------------------------------------------------------- the host's shape (eval_shape only)


def test_points_follow_the_segments_and_the_head_gives_the_classes():
    host = cnn_host()
    assert [(p.slot_id, p.dim, p.topology, p.parallel) for p in host.injection_points] == [
        ("r0c0", 4, "cnn", False), ("r1c0", 8, "cnn", False)]
    assert host.default_slots == ("r0c0", "r1c0") and host.topology == "cnn"
    assert (host.num_classes, host.image_size, host.in_channels) == (CLASSES, SIZE, CHANNELS)
    assert host.input_shape(5) == (5, SIZE, SIZE, CHANNELS)
    params = jax.eval_shape(host.init, jax.random.key(0))
    assert params["segment1"]["Conv_0"]["kernel"].shape == (3, 3, 4, 8) and "stem" not in params
    batch = jax.ShapeDtypeStruct((5, SIZE, SIZE, CHANNELS), jnp.float32)
    assert jax.eval_shape(lambda p, x: host_forward(host, p, x), params, batch).shape == (5, CLASSES)
    # a frozen, hashable configuration: equal modules make an equal host (a list becomes a tuple)
    same = FlaxHost(None, (Block(4, pool=True), Block(8)), Head(CLASSES), [SIZE, SIZE, CHANNELS])
    assert same == host and hash(same) == hash(host) and isinstance(host.segment_modules, tuple)
    assert same.parameter_digest == host.parameter_digest
    assert cnn_host(segment_modules=(Block(4, pool=True), Block(16))).parameter_digest != host.parameter_digest


def test_a_transformer_host_has_sequence_points():
    host = FlaxHost(Patches(8), (Mixer(), Mixer()), Head(CLASSES), (SIZE, SIZE, CHANNELS), topology="transformer")
    assert [(p.slot_id, p.dim, p.topology) for p in host.injection_points] == [
        ("r0c0", 8, "transformer"), ("r1c0", 8, "transformer")]
    assert "stem" in jax.eval_shape(host.init, jax.random.key(0)) and host.num_classes == CLASSES


def test_every_blueprint_of_its_topology_fits_a_user_host():
    """The model's forward with every blueprint at every point traces (``jax.eval_shape``: the
    ``lax.cond`` of each blueprint is traced, nothing compiled) and gives the host's logits."""
    batch = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, CHANNELS), jnp.float32)
    transformer = FlaxHost(Patches(8), (Mixer(), Mixer()), Head(CLASSES), (SIZE, SIZE, CHANNELS), topology="transformer")
    for host in (cnn_host(), transformer):
        model = MorphogeneticModel.build(host)
        params, state = jax.eval_shape(model.init, jax.random.key(0))
        assert len(model.lattice.blueprints) > 3 and model.isolate_blending == (host.topology == "cnn")
        assert jax.eval_shape(model.apply, params, state, batch).shape == (BATCH, CLASSES), host.topology


@pytest.mark.parametrize("make, message", [
    (lambda: cnn_host(segment_modules=()), "segment_modules must be a non-empty tuple"),
    (lambda: cnn_host(segment_modules=(Block(4), jnp.tanh)), "the segment1 must be a flax.linen Module, got PjitFunction"),
    (lambda: cnn_host(segment_modules=(nn.Sequential([Block(4)]),)), "the segment0 (Sequential) is not hashable"),
    (lambda: cnn_host(segment_modules=(nn.BatchNorm(use_running_average=False),)),
     "keeps variables besides params (batch_stats): a host's modules must be stateless"),
    (lambda: cnn_host(topology="transformer"), "segment0 outputs float32[1, 4, 4, 4] for one example; a transformer "
                                               "host's activations are float [batch, T, D]"),
    (lambda: cnn_host(topology="rnn"), "unknown topology 'rnn'"),
    (lambda: cnn_host(example_shape=(SIZE, 0, CHANNELS)), "example_shape must be one input's shape"),
    (lambda: cnn_host(stem_module=Patches(8)), "for one example; a cnn host's activations are float [batch, height, width, channels]"),
])
def test_modules_that_make_no_host_are_one_line(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


# ---------------------------------------------------------------------------- import paths


def test_an_import_path_gives_the_host_with_its_source():
    host = import_host(f"{HERE}:make_flax_host")
    assert host.source == f"{HERE}:make_flax_host" and dataclasses.replace(host, source=None) == cnn_host()
    made = import_host(f"{HERE}:make_tuple", (SIZE, SIZE, CHANNELS))
    assert dataclasses.replace(made, source=None) == cnn_host()  # the data's input, the topology from the rank
    made = import_host(f"{HERE}:make_transformer", (SIZE, SIZE, CHANNELS))
    assert made.topology == "transformer" and [p.dim for p in made.injection_points] == [8, 8]
    # the example of the README
    example = import_host("examples.my_host:make_host", (16, 16, 3))
    assert example.default_slots == ("r0c0", "r1c0") and example.num_classes == 10


@pytest.mark.parametrize("path, message", [
    ("examples.my_host", "--host examples.my_host: give MODULE:FUNCTION"),
    ("no_such_package.hosts:make", "there is no module no_such_package to import (a module is found from the "
                                   "current directory or PYTHONPATH)"),
    ("examples.no_such_module:make", "there is no module examples.no_such_module to import"),
    ("examples.my_host:make_hots", "examples.my_host has no make_hots (it defines: Block, Classifier, make_host)"),
    (f"{HERE}:NOT_A_FUNCTION", "NOT_A_FUNCTION is a int, not a function; return a FlaxHost, or (stem, segments, head)"),
    (f"{HERE}:make_string", "make_string() returned str, not a host; return a FlaxHost"),
    (f"{HERE}:make_error", "make_error() failed: RuntimeError: no GPU here second line"),
])
def test_import_paths_that_give_no_host_are_one_line(path, message):
    with pytest.raises(HostImportError) as error:
        import_host(path, (SIZE, SIZE, CHANNELS))
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_a_tuple_needs_the_input_shape():
    with pytest.raises(HostImportError, match="whose input shape comes from the data, and none was given"):
        import_host(f"{HERE}:make_tuple")


# ---------------------------------------------------------------------------- grown by the lattice (compiles)


@pytest.mark.cross_program
def test_dormant_host_is_the_flax_network_and_a_blended_seed_changes_it():
    """One compiled model forward (the lattice in the program even while dormant) serves the
    dormant check and the planted seed; the reference is the Flax network's own ``apply``."""
    host = cnn_host()
    model = MorphogeneticModel.build(host, blueprints=("conv_small",),
                                     strategy=dataclasses.replace(PopulationStrategy.for_backend(), skip_dormant=False))
    params = strong(jax.jit(host.init)(key(0)))
    x = images()
    forward = jax.jit(model.apply)
    dormant = fresh_lattice_state(model)
    network = jax.jit(Network().apply)({"params": params}, x)
    assert network.shape == (BATCH, CLASSES)
    assert_close_across_programs(forward(params, dormant, x), network, ulps=8,  # one pass of arithmetic
                                 err_msg="dormant host vs the Flax network")
    assert_close_across_programs(jax.jit(lambda p, x: host_forward(host, p, x))(params, x), network, ulps=8,
                                 err_msg="host_forward vs the Flax network")

    # a conv_small seed at r1c0, germinated by the lattice, blending at alpha 0.5
    lattice = model.lattice
    s, blueprint = lattice.slots.index("r1c0"), lattice.blueprint_index("conv_small")
    state, applied = jax.jit(lattice.germinate)(dormant, jnp.int32(s), jnp.int32(blueprint), jnp.int32(0),
                                                jnp.int32(0), key(1))
    assert bool(applied)
    state = set_status(strong(state), s, stage=int(Stage.BLENDING), alpha=0.5)
    # a fresh seed's residual is exactly zero (its output layer starts at zero): make it contribute
    units = _read_units(model, state.params, s)
    units["conv_small"] = perturb_zero_leaves(units["conv_small"], 2)
    state = state.replace(params=_write_units(model, state.params, s, units))
    blended = np.asarray(forward(params, state, x))
    assert np.all(np.isfinite(blended)) and not np.allclose(blended, np.asarray(network), atol=1e-4)
    at_zero = forward(params, set_status(state, s, alpha=0.0), x)  # the same seed at alpha 0: the host again
    assert_close_across_programs(at_zero, network, ulps=8, err_msg="seed at alpha 0 vs the Flax network")
