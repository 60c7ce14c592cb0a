"""Blueprints (:mod:`esper_jax.lattice.blueprints`): what grows in a slot.

Every registered blueprint of each topology, freshly initialized by ``init(key, dim)``, must
return exactly zero on any input (planting a seed never shocks the host), and must become a
real function of its input once its zero-initialized layers are trained (perturbed here).
CNN blueprints must treat samples independently; transformer blueprints must be causal.

Parameters come from germination in the session rigs (CNN width 16, transformer width 32);
one compiled function per topology applies every blueprint. The registry itself (names,
order, errors) is covered by ``test_registry.py``.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from esper_jax.lattice.blueprints import blueprint_names, blueprints_for, get_blueprint
from esper_jax.lattice.blueprints.transformer import depth_heads
from esper_jax.lattice.hosts import TransformerHost
from esper_jax.lattice.lifecycle import Stage

from tests.conftest import perturb_zero_leaves

CHANGED_POSITION = 5  # transformer inputs change from this position on; CNN inputs in sample 1


def _input(topology: str, dim: int, rng: np.random.Generator) -> np.ndarray:
    shape = (3, 4, 4, dim) if topology == "cnn" else (3, 8, dim)
    return (rng.standard_normal(shape) * 1.5 + 0.3).astype(np.float32)


def _changed(topology: str, h: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h2 = h.copy()
    if topology == "cnn":
        h2[1] = rng.standard_normal(h2[1].shape)  # another sample
    else:
        h2[:, CHANGED_POSITION:] = rng.standard_normal(h2[:, CHANGED_POSITION:].shape)  # the future
    return h2


@pytest.fixture(scope="module", params=["cnn", "transformer"])
def probe(request):
    """Fresh parameters of every blueprint at the first slot of the topology's rig, as
    germination makes them (``blueprint.init(key, width)``: germinating compiles nothing new
    here), and every blueprint applied to random inputs by one compiled function."""
    rig = request.getfixturevalue(request.param)
    topology, slot_id = rig.host.topology, rig.slot_ids[0]
    dim = rig.model.lattice.slots.spec(slot_id).dim
    blueprints = blueprints_for(topology)
    rng = np.random.default_rng(dim)
    h = _input(topology, dim, rng)
    h2 = _changed(topology, h, rng)

    fresh = {}
    for i, bp in enumerate(blueprints):
        state = rig.plant(rig.state, slot_id, bp.name, Stage.GERMINATED, seed=300 + i, perturb=False)
        fresh[bp.name] = rig.units(state.params, slot_id)[bp.name]
    trained = {name: perturb_zero_leaves(p, seed=i) for i, (name, p) in enumerate(fresh.items())}

    @jax.jit
    def apply_all(params, h):
        return {bp.name: bp.apply(params[bp.name], h) for bp in blueprints}

    run = lambda params, x: jax.tree.map(np.asarray, apply_all(params, x))
    return dict(
        topology=topology, dim=dim, h=h, fresh=fresh, trained=trained,
        r_fresh=run(fresh, h), r_fresh_other=run(fresh, h2 * 10.0),
        r_trained=run(trained, h), r_trained_changed=run(trained, h2),
    )


def test_every_registered_blueprint_is_probed(probe):
    names = blueprint_names(probe["topology"])
    assert sorted(probe["r_fresh"]) == sorted(names) and len(names) == len(set(names))


def test_fresh_blueprints_return_exactly_zero(probe):
    for name, params in probe["fresh"].items():
        init_shapes = jax.eval_shape(lambda k: get_blueprint(probe["topology"], name).init(k, probe["dim"]), jax.random.key(0))
        assert jax.tree.map(lambda a: a.shape, init_shapes) == jax.tree.map(np.shape, params), name
        if name not in ("noop", "norm", "conv_small"):  # all-zero by design; the others draw random weights
            assert any(np.any(leaf) for leaf in jax.tree.leaves(params)), f"{name} was not initialized"
    for name, r in probe["r_fresh"].items():
        assert r.shape == probe["h"].shape and r.dtype == np.float32, name
        assert not np.any(r), f"{name} shocks the host at germination"
        assert not np.any(probe["r_fresh_other"][name]), f"{name} shocks the host on another input"


def test_trained_blueprints_are_real_functions_of_their_input(probe):
    for name, r in probe["r_trained"].items():
        assert np.all(np.isfinite(r)), name
        if get_blueprint(probe["topology"], name).is_noop:
            assert not np.any(r)
            continue
        assert np.abs(r).max() > 1e-2, f"{name} ignores its parameters"
        assert not np.allclose(r, probe["r_trained_changed"][name], atol=1e-4), f"{name} ignores its input"


def test_blueprints_respect_sample_independence_or_causality(probe):
    """CNN: sample 0 and 2 are untouched when sample 1 changes. Transformer: positions before
    the change are untouched (a seed must never see the future)."""
    for name, r in probe["r_trained"].items():
        changed = probe["r_trained_changed"][name]
        if probe["topology"] == "cnn":
            np.testing.assert_allclose(changed[[0, 2]], r[[0, 2]], rtol=0, atol=1e-6, err_msg=name)
        else:
            t = CHANGED_POSITION
            np.testing.assert_allclose(changed[:, :t], r[:, :t], rtol=0, atol=1e-6, err_msg=name)


def test_param_counts_and_noop(probe):
    for name, params in probe["fresh"].items():
        bp = get_blueprint(probe["topology"], name)
        n = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
        assert bp.num_params(probe["dim"]) == n, name
        assert bp.is_noop == (n == 0), name
    assert [n for n in probe["fresh"] if get_blueprint(probe["topology"], n).is_noop] == (
        ["noop"] if probe["topology"] == "cnn" else []
    )


def test_transformer_lora_ranks():
    for name, rank in (("lora", 8), ("lora_large", 32)):
        shapes = jax.eval_shape(lambda k: get_blueprint("transformer", name).init(k, 48), jax.random.key(0))
        assert shapes["a"].shape == (48, rank) and shapes["b"].shape == (rank, 48)


def test_mlp_expansions():
    for name, expansion in (("mlp_small", 2), ("mlp", 4)):
        shapes = jax.eval_shape(lambda k: get_blueprint("transformer", name).init(k, 48), jax.random.key(0))
        assert shapes["w1"].shape == (48, expansion * 48) and shapes["w2"].shape == (expansion * 48, 48)


def test_depth_block_is_a_layer_shaped_like_the_hosts():
    """Its parameters are a host layer's, shape for shape (so a fossilized block is a layer),
    with both output projections and their biases zero at germination."""
    host = TransformerHost(vocab_size=64, d_model=64, num_heads=2, num_layers=1, block_size=8)
    layer = jax.eval_shape(host.init, jax.random.key(0))["layer0"]
    block = jax.eval_shape(lambda k: get_blueprint("transformer", "depth").init(k, 64), jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, block) == jax.tree.map(lambda a: a.shape, layer)
    fresh = jax.jit(lambda k: get_blueprint("transformer", "depth").init(k, 8))(jax.random.key(0, impl="rbg"))
    for name in ("proj", "proj_b", "out", "out_b"):
        assert not np.any(np.asarray(fresh[name])), name


@pytest.mark.parametrize("dim, heads", [(256, 4), (64, 1), (32, 1), (192, 3), (200, 2), (512, 8)])
def test_depth_heads_are_64_wide_where_the_width_allows(dim, heads):
    assert depth_heads(dim) == heads and dim % heads == 0
