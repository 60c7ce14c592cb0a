"""The blueprint registry: one decorated definition per blueprint, action order per topology."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.lattice.blueprints import blueprint_index, blueprint_names, blueprints_for, get_blueprint, register_blueprint
from esper_jax.lattice.blueprints import registry

CNN = ("noop", "norm", "attention", "depthwise", "bottleneck", "conv_small", "conv_light", "conv_heavy")
TRANSFORMER = ("norm", "lora", "lora_large", "attention", "mlp_small", "mlp", "depth")


@pytest.fixture
def scratch_registry():
    """Lets a test register blueprints; the registry is restored afterwards."""
    for topology in registry._REGISTRY:
        blueprints_for(topology)  # load the built-ins first, or restoring would drop them for good
    saved = {topology: dict(entries) for topology, entries in registry._REGISTRY.items()}
    yield registry._REGISTRY
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_each_topology_lists_its_blueprints_in_action_order():
    assert blueprint_names("cnn") == CNN
    assert blueprint_names("transformer") == TRANSFORMER
    for topology, names in (("cnn", CNN), ("transformer", TRANSFORMER)):
        for i, name in enumerate(names):
            assert blueprint_index(topology, name) == i
            bp = get_blueprint(topology, name)
            assert bp.name == name and bp.topology == topology and bp.description


@pytest.mark.parametrize("topology, name, owner", [("transformer", "conv_light", "cnn"), ("cnn", "lora", "transformer"),
                                                   ("transformer", "noop", "cnn"), ("cnn", "mlp", "transformer"),
                                                   ("cnn", "depth", "transformer")])
def test_blueprint_of_the_other_topology_is_a_clear_error(topology, name, owner):
    with pytest.raises(ValueError) as info:
        blueprint_index(topology, name)
    message = str(info.value)
    assert name in message and owner in message and topology in message, message
    with pytest.raises(ValueError):
        get_blueprint(topology, name)


@pytest.mark.parametrize("topology", ["cnn", "transformer"])
def test_unknown_names_and_topologies_raise(topology):
    with pytest.raises(ValueError, match="unknown blueprint") as info:
        blueprint_index(topology, "resnet9000")
    assert blueprint_names(topology)[0] in str(info.value), "the error lists the valid names"
    with pytest.raises(ValueError, match="topology"):
        blueprints_for("rnn")
    with pytest.raises(ValueError, match="topology"):
        register_blueprint("x", "rnn")


def _toy(dim_factor=1):
    class Toy:
        """A toy blueprint."""

        @staticmethod
        def init(key, dim):
            return {"w": jnp.zeros((dim, dim * dim_factor))}

        @staticmethod
        def apply(params, h):
            return jnp.zeros_like(h)

    return Toy


def test_registering_adds_to_the_action_space(scratch_registry):
    before = blueprint_names("cnn")

    @register_blueprint("toy", "cnn")
    class Toy:
        """A toy blueprint."""

        @staticmethod
        def init(key, dim):
            return {"w": jnp.zeros((dim, dim))}

        @staticmethod
        def apply(params, h):
            return jnp.zeros_like(h)

    assert Toy.__name__ == "Toy" and callable(Toy.init)  # the decorator returns the class itself
    assert blueprint_names("cnn") == before + ("toy",)
    assert blueprint_index("cnn", "toy") == len(before)
    toy = get_blueprint("cnn", "toy")
    assert toy.description == "A toy blueprint." and toy.num_params(5) == 25
    assert blueprint_names("transformer") == TRANSFORMER, "other topologies are unaffected"


def test_scratch_registry_was_restored():
    # runs after test_registering_adds_to_the_action_space (file order)
    assert blueprint_names("cnn") == CNN


def test_duplicate_and_reserved_names_raise(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        register_blueprint("conv_small", "cnn")(_toy())
    with pytest.raises(ValueError, match="reserved"):
        register_blueprint("gate", "cnn")
    with pytest.raises(ValueError, match="reserved"):
        register_blueprint("gate", "transformer")
    register_blueprint("conv_small", "transformer")(_toy())  # names are per topology
    assert blueprint_names("cnn") == CNN
    assert blueprint_names("transformer") == TRANSFORMER + ("conv_small",)


@pytest.mark.parametrize(
    "topology, name, dim, expected",
    [
        ("cnn", "conv_small", 16, 16 * 16),
        ("cnn", "noop", 16, 0),
        ("cnn", "norm", 8, 2 * 8),
        ("cnn", "conv_light", 8, 3 * 3 * 8 * 8 + 8),
        ("cnn", "depthwise", 8, 3 * 3 * 8 + 8 * 8),
        ("transformer", "lora", 64, 64 * 8 + 8 * 64),
        ("transformer", "lora_large", 64, 64 * 32 + 32 * 64),
        ("transformer", "norm", 64, 2 * 64),
        # a host layer's count, 12 d^2 + 13 d: 789,760 at the TinyStories base width 256
        ("transformer", "depth", 256, 789_760),
        ("transformer", "depth", 64, 12 * 64 * 64 + 13 * 64),
    ],
)
def test_num_params_is_exact(topology, name, dim, expected):
    assert get_blueprint(topology, name).num_params(dim) == expected


def test_only_noop_is_noop():
    assert [bp.name for bp in blueprints_for("cnn") if bp.is_noop] == ["noop"]
    assert not any(bp.is_noop for bp in blueprints_for("transformer"))


@pytest.mark.parametrize("topology, shape", [("cnn", (2, 8, 8, 16)), ("transformer", (2, 5, 32))])
def test_every_blueprint_starts_as_an_exact_zero_residual(topology, shape):
    h = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    bps = blueprints_for(topology)

    @jax.jit  # one program for all blueprints: compiling op by op is slow on CPU
    def residuals(h):
        keys = jax.random.split(jax.random.key(0, impl="rbg"), len(bps))  # rbg: compiles faster
        return [bp.apply(bp.init(k, shape[-1]), h) for bp, k in zip(bps, keys)]

    for bp, r in zip(bps, residuals(h)):
        r = np.asarray(r)
        assert r.shape == shape, bp.name
        assert np.all(r == 0.0), f"{topology}:{bp.name} shocks the host at germination"
