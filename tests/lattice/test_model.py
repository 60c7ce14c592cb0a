"""The morphogenetic forward (:mod:`esper_jax.lattice.model`): gradient isolation, blending at a slot,
disabled slots, germination without shock, and the population forward.

Every model-level check runs through the session rigs of ``conftest.py``: one compiled
forward+gradient per topology (the CNN rig through ``jax.vmap`` of ``model.apply`` over a
member axis, the transformer rig through plain ``model.apply``, whose ``lax.cond``s really
branch). The lattice state is an argument, so planting seeds with other blueprints, stages
and alphas never recompiles.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.lattice import blending
from esper_jax.lattice.strategy import Execution, PopulationStrategy
from esper_jax.lattice.blueprints import blueprint_names, get_blueprint
from esper_jax.lattice.grid import GATE
from esper_jax.lattice.hosts import TransformerHost
from esper_jax.lattice.lifecycle import COMPUTED_STAGES, Stage
from esper_jax.lattice.model import MorphogeneticModel

from tests.conftest import (
    add_member_axis,
    assert_trees_close,
    assert_trees_equal,
    set_status,
    stack,
    to_device,
    tree_norm,
    trees_close,
)

CNN_SEEDS = tuple(name for name in blueprint_names("cnn") if name != "noop")
TRANSFORMER_SEEDS = blueprint_names("transformer")
# ``host_forward`` and the model are different compiled programs (the model batches the host
# over a member axis), so they agree to float32 rounding, not bit for bit (the transformer
# differs by ~1e-7). "Exactly the host" is therefore checked bit for bit against the model
# with every slot dormant (same program), and to rounding against ``host_forward``; a seed
# leaking into the host's forward or gradients is orders of magnitude larger than either.
OUT_RTOL, OUT_ATOL = 1e-6, 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6


def leaves_with_paths(tree):
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_all_zero(tree, what: str):
    for path, leaf in leaves_with_paths(tree):
        assert not np.any(np.asarray(leaf)), f"{what}{path} has a non-zero gradient"


def assert_every_leaf_learns(tree, what: str):
    for path, leaf in leaves_with_paths(tree):
        leaf = np.asarray(leaf)
        assert np.all(np.isfinite(leaf)), f"{what}{path} has a non-finite gradient"
        assert np.any(leaf != 0), f"{what}{path} gets no gradient"


# ============================================================================== 1. TRAINING isolation


def test_model_without_seeds_is_the_host(rig):
    loss, out, g_host, g_seed = rig.dormant
    ref_loss, ref_out, ref_grads = rig.reference
    assert out.shape == ref_out.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=OUT_RTOL, atol=OUT_ATOL)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    assert_trees_close(g_host, ref_grads, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert_all_zero(g_seed, "dormant seed params")


def test_skipping_the_dormant_lattice_is_the_plain_host(rig):
    """The default model (``PopulationStrategy.skip_dormant``) runs the plain host while no slot is computed
    and the lattice program otherwise; both agree with the rig's always-lattice model to rounding.
    A real ``lax.cond`` here (one member, no vmap), so both branches are exercised."""
    skipping = dataclasses.replace(rig.model, strategy=dataclasses.replace(rig.model.strategy, skip_dormant=True))
    disabled = rig.no_slot_disabled()

    @jax.jit
    def value_and_grads(host_params, state, x, y):
        def loss(host_params, seed_params):
            out = skipping.apply(host_params, state.replace(params=seed_params), x, disabled)
            return rig.host.loss(out, y), out
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(host_params, state.params)

    planted = rig.plant(rig.state, rig.slot_ids[0], rig.blueprint_names[-1], Stage.BLENDING, alpha=0.6, seed=9)
    for state in (rig.state, planted):
        (loss, out), (g_host, g_seed) = value_and_grads(rig.host_params, state, rig.x, rig.y)
        exp_loss, exp_out, exp_host, exp_seed = rig.run(state)
        np.testing.assert_allclose(np.asarray(out), exp_out, rtol=OUT_RTOL, atol=OUT_ATOL)
        np.testing.assert_allclose(float(loss), float(exp_loss), rtol=1e-6)
        assert_trees_close(g_host, exp_host, rtol=GRAD_RTOL, atol=GRAD_ATOL)
        assert_trees_close(g_seed, exp_seed, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    _, (_, dormant_seed_grads) = value_and_grads(rig.host_params, rig.state, rig.x, rig.y)
    assert_all_zero(dormant_seed_grads, "seed params of a skipped lattice")


def _primitives(jaxpr) -> list[str]:
    """Every primitive of a jaxpr, sub-jaxprs (cond branches, checkpoints, calls) expanded in place."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names += _primitives(inner)
    return names


def _forward_branches(model, x_shape) -> tuple[list[str], list[str]]:
    """The primitives of the two branches of the forward's outer ``lax.cond``
    (``PopulationStrategy.unless_dormant``): (no slot computed, some slot computed)."""
    host_params, state = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct(x_shape, jnp.int32)
    closed = jax.make_jaxpr(model.apply)(host_params, state, x)
    (outer,) = [eqn for eqn in closed.jaxpr.eqns if eqn.primitive.name == "cond"]
    dormant, live = outer.params["branches"]  # ordered by the predicate: False, True
    return _primitives(dormant.jaxpr), _primitives(live.jaxpr)


def test_dormant_slots_of_every_column_are_out_of_the_skipped_forward():
    """With ``skip_dormant``, a dormant lattice costs the forward nothing, whichever columns are
    configured: the skipped branch has no seed in it (no per-slot cond) and is the same program
    for the default slot (r0c0) as for every point of the grid. Traced, not compiled."""
    host = TransformerHost(vocab_size=64, d_model=32, num_heads=2, num_layers=1, block_size=8)
    every = tuple(p.slot_id for p in host.injection_points)
    strategy = PopulationStrategy(Execution.MAPPED, skip_dormant=True)
    build = lambda slots: MorphogeneticModel.build(host, slot_ids=slots, strategy=strategy)
    shape = (2, host.block_size)
    dormant_default, _ = _forward_branches(build(None), shape)
    dormant_every, live_every = _forward_branches(build(every), shape)
    assert live_every.count("cond") >= len(every), "the live branch has a cond per slot"
    assert "cond" not in dormant_every and "dot_general" in dormant_every
    assert dormant_every == dormant_default


@pytest.mark.parametrize(
    "topology, blueprint",
    [("cnn", name) for name in CNN_SEEDS] + [("transformer", name) for name in TRANSFORMER_SEEDS],
)
def test_training_seed_learns_without_touching_the_host(request, topology, blueprint):
    rig = request.getfixturevalue(topology)
    state = rig.state
    for slot_id in rig.slot_ids:
        state = rig.plant(state, slot_id, blueprint, Stage.TRAINING)
    loss, out, g_host, g_seed = rig.run(state)
    ref_loss, ref_out, ref_host_grads = rig.reference
    dormant_loss, dormant_out, dormant_grads, _ = rig.dormant

    # The seed really contributes: the same seeds blended in at alpha 1 change the output.
    blended = state
    for s in range(rig.num_slots):
        blended = set_status(blended, s, stage=Stage.BLENDING, alpha=1.0)
    assert not np.allclose(rig.run(blended)[1], ref_out, atol=1e-3), "perturbed seeds should change a blended forward"

    # (a) the forward value is exactly the host's.
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dormant_out))
    assert float(loss) == float(dormant_loss)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=OUT_RTOL, atol=OUT_ATOL)

    # (b) the seed learns: every parameter of the planted blueprint gets a gradient, nothing else.
    for slot_id in rig.slot_ids:
        units = rig.units(g_seed, slot_id)
        assert_every_leaf_learns(units[blueprint], f"{slot_id}/{blueprint}")
        for name, grads in units.items():
            if name != blueprint:
                assert_all_zero(grads, f"{slot_id}/{name}")

    # (c) host gradients are those without any seed: bit for bit against the same program with
    # every slot dormant, and to rounding against host_forward alone.
    assert_trees_equal(g_host, dormant_grads, err_msg="host gradients changed by a TRAINING seed")
    assert_trees_close(g_host, ref_host_grads, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_lifecycle_driven_seed_trains_invisibly_then_blends_with_the_state_alpha(cnn):
    """Germinate, pass G1 and G2 with recorded measurements, then let ``tick`` move alpha: the
    forward always uses the alpha the state reports."""
    slot_id, blueprint = "r1c0", "conv_small"
    s = cnn.model.lattice.slots.index(slot_id)
    advance, tick, record = (cnn.lattice_fn(name) for name in ("advance", "tick", "record_measurements"))
    manual = cnn.manual(slot_id, blueprint)
    _, ref_out, _, _ = cnn.dormant

    state = cnn.plant(cnn.state, slot_id, blueprint, Stage.GERMINATED)  # germinate leaves it GERMINATED
    state, ok = advance(state, jnp.int32(s))
    assert bool(ok) and int(np.asarray(state.status.stage)[s]) == Stage.TRAINING
    _, out, _, g_seed = cnn.run(state)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))

    grad_norm = np.zeros((cnn.num_slots,), np.float32)
    grad_norm[s] = tree_norm(cnn.units(g_seed, slot_id)[blueprint])
    grad_norm = to_device(grad_norm)
    for _ in range(cnn.model.lattice.gates.min_training_epochs):
        state = tick(record(state, seed_grad_norm=grad_norm, host_grad_norm=to_device(np.ones((cnn.num_slots,), np.float32))))
    state, ok = advance(state, jnp.int32(s))
    assert bool(ok) and int(np.asarray(state.status.stage)[s]) == Stage.BLENDING
    assert float(np.asarray(state.status.alpha)[s]) == 0.0
    np.testing.assert_array_equal(np.asarray(cnn.run(state)[1]), np.asarray(ref_out))

    units = cnn.units(state.params, slot_id)[blueprint]
    seen = []
    for _ in range(int(np.asarray(state.status.tempo)[s])):
        state = tick(state)
        alpha = float(np.asarray(state.status.alpha)[s])
        seen.append(alpha)
        (_, want), _ = manual(cnn.host_params, units, cnn.x, cnn.y, alpha, False, True)
        np.testing.assert_allclose(np.asarray(cnn.run(state)[1]), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert 0.0 < seen[0] < seen[-1] == 1.0
    state, ok = advance(state, jnp.int32(s))
    assert bool(ok) and int(np.asarray(state.status.stage)[s]) == Stage.HOLDING


# ============================================================================== 2. blending at a slot


@pytest.fixture(scope="module")
def slot_probe(cnn):
    """``model.apply_slot`` at CNN slot r1c0 (width 16) on a hand-made activation ``h``,
    compiled once, and ``r = blueprint.apply(params, h)`` computed outside the model."""
    slot_id = "r1c0"
    s = cnn.model.lattice.slots.index(slot_id)
    compiled = jax.jit(lambda state, h, disabled: cnn.model.apply_slot(state, s, h, disabled))
    rng = np.random.default_rng(7)
    h = to_device(rng.standard_normal((1, 2, 4, 4, cnn.model.lattice.slots.spec(slot_id).dim)).astype(np.float32))
    apply_fns = {}

    class Probe:
        pass

    probe = Probe()
    h0 = to_device(np.asarray(h)[0])
    probe.slot_id, probe.s, probe.h = slot_id, s, np.asarray(h0, np.float64)

    def run(state, disabled=False):
        return np.asarray(compiled(add_member_axis(state), h, to_device(np.asarray([disabled])))[0], np.float64)

    def residual(state, blueprint):
        if blueprint not in apply_fns:
            apply_fns[blueprint] = jax.jit(get_blueprint("cnn", blueprint).apply)
        return np.asarray(apply_fns[blueprint](cnn.units(state.params, slot_id)[blueprint], h0), np.float64)

    probe.run, probe.residual = run, residual
    return probe


def expected_blend(h, r, weight, op):
    if op == "multiply":
        return h * (1.0 + weight * np.tanh(r))
    return h + weight * r


@pytest.mark.parametrize("stage", [Stage.BLENDING, Stage.HOLDING])
@pytest.mark.parametrize("op", ["add", "multiply"])
@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
def test_apply_slot_blends_with_the_state_alpha(cnn, slot_probe, stage, op, alpha):
    blueprint = "conv_small"
    style = "linear" if op == "add" else "multiply"
    state = cnn.plant(cnn.state, slot_probe.slot_id, blueprint, stage, alpha=alpha, style=style)
    r = slot_probe.residual(state, blueprint)
    assert np.abs(r).max() > 0.1, "the perturbed seed should produce a non-trivial residual"
    out, h = slot_probe.run(state), slot_probe.h
    if alpha == 0.0:
        np.testing.assert_array_equal(out, h)  # identity, bit for bit
    else:
        np.testing.assert_allclose(out, expected_blend(h, r, alpha, op), rtol=1e-5, atol=1e-5)
        assert not np.allclose(out, h, atol=1e-3)
        other = "add" if op == "multiply" else "multiply"
        assert not np.allclose(out, expected_blend(h, r, alpha, other), atol=1e-3), "the op must matter"


@pytest.mark.parametrize("alpha", [0.37, 1.0])
def test_gate_op_scales_alpha_by_the_gate_while_blending_and_adds_after(cnn, slot_probe, alpha):
    blueprint = "conv_small"
    state = cnn.plant(cnn.state, slot_probe.slot_id, blueprint, Stage.BLENDING, alpha=alpha, style="gate")
    units = cnn.units(state.params, slot_probe.slot_id)
    # A gate that tells the two samples apart: w along the difference of their pooled features.
    h = slot_probe.h
    pooled = h.mean(axis=(1, 2))
    d = pooled[0] - pooled[1]
    w = 3.0 * d / (d @ d)
    b = -0.5 * (pooled[0] + pooled[1]) @ w
    gate = {"w": jnp.asarray(w, jnp.float32), "b": jnp.float32(b)}
    state = cnn.with_units(state, slot_probe.slot_id, {**units, GATE: gate})
    r = slot_probe.residual(state, blueprint)

    g = 1.0 / (1.0 + np.exp(-(pooled @ np.asarray(gate["w"], np.float64) + float(gate["b"]))))
    g = g[:, None, None, None]
    assert np.ptp(g) > 0.5, "the gate should differ between samples"
    out = slot_probe.run(state)
    np.testing.assert_allclose(out, h + alpha * g * r, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, h + alpha * r, atol=1e-3), "BLENDING with the gate op must use the gate"

    held = slot_probe.run(set_status(state, slot_probe.s, stage=Stage.HOLDING))
    np.testing.assert_allclose(held, h + alpha * r, rtol=1e-5, atol=1e-5)


def test_fossilized_seed_is_blended_with_its_alpha(cnn, slot_probe):
    blueprint = "conv_small"
    state = cnn.plant(cnn.state, slot_probe.slot_id, blueprint, Stage.FOSSILIZED, alpha=0.37, style="multiply")
    r = slot_probe.residual(state, blueprint)
    np.testing.assert_allclose(slot_probe.run(state), expected_blend(slot_probe.h, r, 0.37, "multiply"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "stage", [Stage.DORMANT, Stage.GERMINATED, Stage.TRAINING, Stage.PRUNED, Stage.EMBARGOED, Stage.RESETTING]
)
def test_apply_slot_is_the_identity_outside_blended_stages(cnn, slot_probe, stage):
    state = cnn.plant(cnn.state, slot_probe.slot_id, "conv_small", Stage.BLENDING, alpha=0.8)
    state = set_status(state, slot_probe.s, stage=stage)
    np.testing.assert_array_equal(slot_probe.run(state), slot_probe.h)


@pytest.mark.parametrize("stage", [Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED])
def test_apply_slot_disabled_is_the_identity(cnn, slot_probe, stage):
    state = cnn.plant(cnn.state, slot_probe.slot_id, "conv_small", stage, alpha=1.0, style="multiply")
    assert not np.allclose(slot_probe.run(state), slot_probe.h, atol=1e-3)
    np.testing.assert_array_equal(slot_probe.run(state, disabled=True), slot_probe.h)


@pytest.mark.parametrize("stage, multiply", [(Stage.BLENDING, False), (Stage.HOLDING, True)])
def test_cnn_blending_seed_is_isolated_from_the_host(cnn, stage, multiply):
    """Whole-model check: host gradients equal a hand-written forward whose seed reads
    ``stop_gradient(h)`` (no host gradient through the seed path), and differ from one whose
    seed reads ``h``."""
    assert cnn.model.isolate_blending
    slot_id, blueprint, alpha = "r1c0", "conv_small", 0.37
    state = cnn.plant(cnn.state, slot_id, blueprint, stage, alpha=alpha, style="multiply" if multiply else "linear")
    _, out, g_host, g_seed = cnn.run(state)
    units = cnn.units(state.params, slot_id)[blueprint]
    manual = cnn.manual(slot_id, blueprint)
    (_, want_out), (isolated_host, isolated_seed) = manual(cnn.host_params, units, cnn.x, cnn.y, alpha, multiply, True)
    _, (coupled_host, _) = manual(cnn.host_params, units, cnn.x, cnn.y, alpha, multiply, False)

    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=1e-5)
    assert_trees_close(g_host, isolated_host, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert_trees_close(cnn.units(g_seed, slot_id)[blueprint], isolated_seed, rtol=1e-4, atol=1e-6)
    assert not trees_close(g_host, coupled_host, rtol=1e-3, atol=1e-4), "the seed path should matter here"


def test_cnn_fossilized_seed_is_part_of_the_host(cnn):
    slot_id, blueprint, alpha = "r1c0", "conv_small", 0.37
    state = cnn.plant(cnn.state, slot_id, blueprint, Stage.FOSSILIZED, alpha=alpha)
    _, _, g_host, g_seed = cnn.run(state)
    units = cnn.units(state.params, slot_id)[blueprint]
    _, (coupled_host, coupled_seed) = cnn.manual(slot_id, blueprint)(cnn.host_params, units, cnn.x, cnn.y, alpha, False, False)
    assert_trees_close(g_host, coupled_host, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert_trees_close(cnn.units(g_seed, slot_id)[blueprint], coupled_seed, rtol=1e-4, atol=1e-6)


def test_transformer_blending_seed_co_adapts_with_the_host(transformer):
    assert not transformer.model.isolate_blending
    slot_id, blueprint, alpha = "r0c1", "lora", 0.37  # a parallel point: the seed reads the attention's input
    state = transformer.plant(transformer.state, slot_id, blueprint, Stage.BLENDING, alpha=alpha)
    _, out, g_host, g_seed = transformer.run(state)
    units = transformer.units(state.params, slot_id)[blueprint]
    manual = transformer.manual(slot_id, blueprint)
    args = (transformer.host_params, units, transformer.x, transformer.y, alpha, False)
    (_, want_out), (coupled_host, coupled_seed) = manual(*args, False)
    _, (isolated_host, _) = manual(*args, True)

    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=1e-5)
    assert_trees_close(g_host, coupled_host, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert_trees_close(transformer.units(g_seed, slot_id)[blueprint], coupled_seed, rtol=1e-4, atol=1e-6)
    assert not trees_close(g_host, isolated_host, rtol=1e-3, atol=1e-5), "co-adaptation should change host gradients"


# ============================================================================== 3. disabled slots


def test_disabled_slots_are_the_identity(rig):
    names = [n for n in rig.blueprint_names if n != "noop"]
    state = rig.state
    for k, slot_id in enumerate(rig.slot_ids):
        stage, style = [(Stage.BLENDING, "linear"), (Stage.FOSSILIZED, "multiply")][k % 2]
        state = rig.plant(state, slot_id, names[(3 * k + 1) % len(names)], stage, alpha=1.0, style=style)
    _, ref_out, ref_grads, _ = rig.dormant

    _, live, _, _ = rig.run(state)
    assert not np.allclose(np.asarray(live), np.asarray(ref_out), atol=1e-3)

    _, none_out, g_host, g_seed = rig.run(state, disabled=[True] * rig.num_slots)
    np.testing.assert_array_equal(np.asarray(none_out), np.asarray(ref_out))
    assert_trees_equal(g_host, ref_grads)
    assert_all_zero(g_seed, "seed params of disabled slots")

    for k, slot_id in enumerate(rig.slot_ids):
        disabled = [j == k for j in range(rig.num_slots)]
        _, out, _, g_seed = rig.run(state, disabled=disabled)
        _, without, _, _ = rig.run(set_status(state, k, stage=Stage.DORMANT))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(without))
        assert_all_zero(rig.units(g_seed, slot_id), f"{slot_id} (disabled)")
        if rig.num_slots > 1:
            assert not np.allclose(np.asarray(out), np.asarray(live), atol=1e-4)
            assert not np.allclose(np.asarray(out), np.asarray(ref_out), atol=1e-4)


# ============================================================================== 4. germination does not shock


@pytest.mark.parametrize("stage", [Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED])
def test_fresh_seeds_at_full_alpha_leave_the_host_output_unchanged(rig, stage):
    ref_out = np.asarray(rig.dormant[1])  # bit for bit; the dormant model is the host to rounding (above)
    for i, blueprint in enumerate(rig.blueprint_names):
        state = rig.state
        for k, slot_id in enumerate(rig.slot_ids):
            style = blending.BLEND_STYLE_NAMES[(i + k) % len(blending.BLEND_STYLE_NAMES)]
            state = rig.plant(state, slot_id, blueprint, stage, alpha=1.0, style=style, seed=50 + i, perturb=False)
        np.testing.assert_array_equal(np.asarray(rig.run(state)[1]), ref_out, err_msg=f"{blueprint} in {stage.name}")


# ============================================================================== 5. causality with live seeds


def _future_token_changed(transformer, state, position: int = 5):
    x2 = np.array(transformer.x)
    x2[:, position] = (x2[:, position] + 1) % transformer.host.vocab_size
    x2 = to_device(x2)
    _, before, _, _ = transformer.run(state)
    _, after, _, _ = transformer.run(state, x=x2)
    return np.asarray(before), np.asarray(after), position


@pytest.mark.parametrize("stage", [Stage.TRAINING, Stage.BLENDING, Stage.FOSSILIZED])
def test_transformer_with_live_seeds_stays_causal(transformer, stage):
    for blueprint in TRANSFORMER_SEEDS:
        state = transformer.state
        for slot_id in transformer.slot_ids:
            state = transformer.plant(state, slot_id, blueprint, stage, alpha=0.7)
        before, after, t = _future_token_changed(transformer, state)
        np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0, atol=1e-6, err_msg=blueprint)
        assert not np.allclose(after[:, t:], before[:, t:], atol=1e-4)


def test_transformer_gated_blending_stays_causal(transformer):
    slot_id, blueprint = "r0c1", "lora"
    state = transformer.plant(transformer.state, slot_id, blueprint, Stage.BLENDING, alpha=0.5, style="gate")
    units = transformer.units(state.params, slot_id)
    w = np.random.default_rng(3).standard_normal(units[GATE]["w"].shape).astype(np.float32)
    state = transformer.with_units(state, slot_id, {**units, GATE: {"w": jnp.asarray(w), "b": units[GATE]["b"]}})
    before, after, t = _future_token_changed(transformer, state)
    np.testing.assert_allclose(after[:, :t], before[:, :t], rtol=0, atol=1e-6)


# ============================================================================== 6. populations


MEMBERS = (
    # per member: host-parameter noise seed, {slot: (blueprint, stage, alpha, style)}, disabled slots
    (0, {"r1c0": ("conv_light", Stage.BLENDING, 0.37, "linear")}, (False,)),
    (1, {"r1c0": ("bottleneck", Stage.HOLDING, 0.8, "multiply")}, (False,)),
    (2, {"r1c0": ("depthwise", Stage.BLENDING, 0.5, "gate")}, (False,)),
    (3, {"r1c0": ("conv_small", Stage.TRAINING, 0.0, "linear")}, (False,)),
    (4, {"r1c0": ("norm", Stage.FOSSILIZED, 1.0, "cosine")}, (False,)),
    (5, {"r1c0": ("conv_light", Stage.FOSSILIZED, 0.6, "sigmoid")}, (True,)),
    (6, {}, (False,)),
)


@pytest.fixture(scope="module")
def population(cnn):
    """The members of ``MEMBERS`` (different host parameters, inputs, blueprints, stages, alphas,
    blend ops and disabled slots) through ``population_apply`` (jit + grad of the summed losses)
    and, one by one, through ``jax.vmap`` of the per-member forward and gradient of ``model.apply``."""
    host = cnn.host

    def make_pop_grad(model):
        def pop_loss(host_params, seed_params, state, x, y, disabled):
            out = model.population_apply(host_params, state.replace(params=seed_params), x, disabled)
            return jax.vmap(host.loss)(out, y).sum(), out

        return jax.jit(jax.value_and_grad(pop_loss, argnums=(0, 1), has_aux=True))

    # Batched members (vmap), where the seed dispatch matters; "map" is checked against it below.
    batched_model = dataclasses.replace(cnn.model, strategy=PopulationStrategy(Execution.BATCHED))
    pop_grad = make_pop_grad(batched_model)

    members = []
    for noise, seeds, disabled in MEMBERS:
        rng = np.random.default_rng(100 + noise)
        host_params = jax.tree.map(
            lambda p: to_device(np.asarray(p) + 0.1 * rng.standard_normal(p.shape).astype(np.float32)), cnn.host_params
        )
        x = to_device(rng.standard_normal(cnn.x.shape).astype(np.float32))
        y = to_device(rng.integers(0, host.num_classes, cnn.y.shape).astype(np.int32))
        state = cnn.state
        for slot_id, (blueprint, stage, alpha, style) in seeds.items():
            state = cnn.plant(state, slot_id, blueprint, stage, alpha=alpha, style=style, seed=200 + 10 * noise)
            if style == "gate":
                units = cnn.units(state.params, slot_id)
                w = 3.0 * rng.standard_normal(units[GATE]["w"].shape).astype(np.float32)
                state = cnn.with_units(state, slot_id, {**units, GATE: {"w": w, "b": units[GATE]["b"]}})
        members.append(dict(host_params=host_params, state=state, x=x, y=y, disabled=to_device(np.asarray(disabled)), seeds=seeds))

    args = [cnn.member_args(m["state"], m["host_params"], m["x"], m["y"], m["disabled"]) for m in members]
    batched = stack(*args)  # jax.tree.map(lambda *a: jnp.stack(a), ...)
    (pop_loss_value, pop_out), (pop_host_grads, pop_seed_grads) = jax.tree.map(np.asarray, pop_grad(*batched))
    mapped_model = dataclasses.replace(batched_model, strategy=PopulationStrategy(Execution.MAPPED))
    mapped = jax.tree.map(np.asarray, make_pop_grad(mapped_model)(*batched))
    singles = cnn.run_members(args)
    host_outs = [np.asarray(cnn.host_only(m["host_params"], m["x"], m["y"])[1]) for m in members]
    return dict(
        members=members, singles=singles, host_outs=host_outs,
        loss=pop_loss_value, out=pop_out, host_grads=pop_host_grads, seed_grads=pop_seed_grads, mapped=mapped,
    )


def test_mapped_and_batched_members_agree(population):
    """Mapped members (each its one-member program in turn, its seed's blueprint by ``lax.switch``)
    give what batched members give (each blueprint in use run for the population by ``lax.cond``)."""
    (loss, out), (host_grads, seed_grads) = population["mapped"]
    np.testing.assert_allclose(out, population["out"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, population["loss"], rtol=1e-5)
    assert_trees_close(host_grads, population["host_grads"], rtol=1e-4, atol=1e-6)
    assert_trees_close(seed_grads, population["seed_grads"], rtol=1e-4, atol=1e-6)


def member(tree, m: int):
    return jax.tree.map(lambda a: a[m], tree)


def test_population_apply_equals_vmapped_apply_per_member(population):
    outs = np.asarray(population["out"])
    assert outs.shape[0] == len(MEMBERS)
    for m, (loss, out, _, _) in enumerate(population["singles"]):
        np.testing.assert_allclose(outs[m], np.asarray(out), rtol=1e-5, atol=1e-6, err_msg=f"member {m}")
    np.testing.assert_allclose(float(population["loss"]), sum(float(s[0]) for s in population["singles"]), rtol=1e-5)
    # The members' seeds really act: blended members differ from their host alone ...
    for m in (0, 1, 2, 4):
        assert not np.allclose(outs[m], population["host_outs"][m], atol=1e-3), f"member {m}"
    # ... and TRAINING, disabled or absent seeds leave it unchanged.
    for m in (3, 5, 6):
        np.testing.assert_allclose(outs[m], population["host_outs"][m], rtol=1e-5, atol=1e-6, err_msg=f"member {m}")


def test_population_gradients_are_per_member_gradients(population):
    for m, (_, _, g_host, g_seed) in enumerate(population["singles"]):
        assert_trees_close(member(population["host_grads"], m), g_host, rtol=1e-4, atol=1e-6, err_msg=f"member {m}")
        assert_trees_close(member(population["seed_grads"], m), g_seed, rtol=1e-4, atol=1e-6, err_msg=f"member {m}")


def test_population_gradients_vanish_for_blueprints_a_member_does_not_use(cnn, population):
    for m, info in enumerate(population["members"]):
        grads = member(population["seed_grads"], m)
        for k, slot_id in enumerate(cnn.slot_ids):
            blueprint, stage, _, style = info["seeds"].get(slot_id, (None, Stage.DORMANT, 0.0, "linear"))
            live = stage in COMPUTED_STAGES and not bool(info["disabled"][k])
            for name, unit_grads in cnn.units(grads, slot_id).items():
                where = f"member {m} {slot_id}/{name}"
                used = live and (name == blueprint or (name == GATE and style == "gate" and stage == Stage.BLENDING))
                if used:
                    assert tree_norm(unit_grads) > 0, f"{where} should learn"
                else:
                    assert_all_zero(unit_grads, where)


# ============================================================================== 7. compile-once hygiene


def test_initial_lattice_state_has_the_types_of_a_transitioned_one(cnn):
    """A jitted step must not compile twice, once for the fresh lattice state and once after the
    first transition (``init_status`` once built ``stage`` weak-typed). Compared through
    ``jax.eval_shape``: same shapes, dtypes and weak types, no compilation."""
    lattice = cnn.model.lattice
    initial = jax.eval_shape(lattice.init, jax.random.key(0))
    after, _ = jax.eval_shape(lattice.germinate, initial, 0, 1, 0, 0, jax.random.key(1))
    describe = lambda tree: jax.tree.map(lambda a: (a.shape, str(a.dtype), bool(getattr(a, "weak_type", False))), tree)
    assert describe(initial) == describe(after)
