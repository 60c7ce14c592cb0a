"""Alpha curves, schedules and blend operators."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper_jax.lattice import blending

from tests.conftest import assert_close_across_programs

STYLES = range(len(blending.BLEND_STYLES))
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)
# XLA on CPU flushes subnormals to zero, so they are left out of exact comparisons.
unit = st.floats(0.0, 1.0, width=32, allow_subnormal=False)
finite = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
PAD = 32  # hypothesis lists are padded to one length so eager ops compile once


def arr(values, dtype=np.float32):
    return np.asarray(values, dtype)


def padded(rows):
    return list(rows) + [rows[0]] * (PAD - len(rows))


# Compiled once per shape (an eager call compiles each of its many small ops instead); the
# plain functions are checked against these in test_plain_and_jitted_curve_and_blend_agree.
curve = jax.jit(blending.curve)
blend = jax.jit(blending.blend)


def styles_like(values, style):
    return jnp.full(np.shape(values), style, jnp.int32)


def test_style_and_tempo_tables_match_the_design():
    by_name = {s.name: s for s in blending.BLEND_STYLES}
    assert {s.curve for s in blending.BLEND_STYLES} == set(blending.CURVES)
    assert sorted(s.steepness for s in blending.BLEND_STYLES if s.curve == "sigmoid") == [6.0, 12.0, 24.0]
    assert {s.op for s in blending.BLEND_STYLES} == set(blending.BLEND_OPS)
    assert by_name["multiply"].op == "multiply" and by_name["gate"].op == "gate"
    assert blending.TEMPOS == (3, 5, 8)
    ops = np.asarray(blending.blend_op_of(jnp.arange(len(blending.BLEND_STYLES))))
    assert ops.tolist() == [blending.BLEND_OPS.index(s.op) for s in blending.BLEND_STYLES]


@pytest.mark.parametrize("style", STYLES)
def test_curve_endpoints_are_exact(style):
    t = arr(padded([0.0, 1.0, -0.5, 1.5, 7.0]))
    values = np.asarray(curve(styles_like(t, style), t))
    # progress outside [0, 1] is clamped, never extrapolated
    assert values[:5].tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("style", STYLES)
def test_curve_is_monotone_and_bounded_on_a_dense_grid(style):
    t = np.linspace(0.0, 1.0, 2001, dtype=np.float32)
    values = np.asarray(curve(jnp.full(t.shape, style), t))
    assert np.all(np.isfinite(values)) and values.min() >= 0.0 and values.max() <= 1.0
    assert np.all(np.diff(values) >= 0.0), "curve must not decrease as progress grows"
    assert values[1000] == pytest.approx(0.5, abs=1e-6)  # every curve is symmetric about the midpoint
    if blending.BLEND_STYLES[style].curve == "linear":
        np.testing.assert_allclose(values, t, atol=1e-7)


def test_sigmoid_steepness_orders_the_curves():
    t = arr(padded([0.25]))
    gentle, mid, sharp = (float(curve(styles_like(t, blending.blend_style_index(n)), t)[0])
                          for n in ("sigmoid_gentle", "sigmoid", "sigmoid_sharp"))
    assert gentle > mid > sharp > 0.0


@SETTINGS
@given(st.sampled_from(STYLES), st.lists(st.tuples(unit, unit), min_size=1, max_size=PAD))
def test_curve_monotone_for_random_pairs(style, pairs):
    pairs = padded(pairs)
    lo = arr([min(a, b) for a, b in pairs])
    hi = arr([max(a, b) for a, b in pairs])
    s = jnp.full(lo.shape, style)
    assert np.all(np.asarray(curve(s, lo)) <= np.asarray(curve(s, hi)))


@SETTINGS
@given(
    st.sampled_from(STYLES),
    st.lists(st.tuples(unit, unit, st.integers(0, 10), st.integers(0, 8)), min_size=1, max_size=PAD),
)
def test_scheduled_alpha_bounded_and_exact_at_the_end(style, rows):
    rows = padded(rows)
    start, target = arr([r[0] for r in rows]), arr([r[1] for r in rows])
    step, steps = arr([r[2] for r in rows], np.int32), arr([r[3] for r in rows], np.int32)
    styles = jnp.full(start.shape, style)
    alpha = np.asarray(blending.scheduled_alpha(start, target, step, steps, styles))
    assert np.all(np.isfinite(alpha)) and np.all((alpha >= 0.0) & (alpha <= 1.0))
    lo, hi = np.minimum(start, target), np.maximum(start, target)
    assert np.all((alpha >= lo) & (alpha <= hi)), "alpha stays between start and target"
    done = step >= steps
    assert np.array_equal(alpha[done], target[done]), "the target is reached exactly"
    began = (step == 0) & (steps > 0)
    assert np.array_equal(alpha[began], start[began])
    # one more step never moves alpha away from the target
    following = np.asarray(blending.scheduled_alpha(start, target, np.minimum(step + 1, steps), steps, styles))
    assert np.all(np.where(target >= start, following >= alpha, following <= alpha))


def test_scheduled_alpha_linear_values():
    steps = np.full(6, 5, np.int32)
    alpha = blending.scheduled_alpha(np.zeros(6, np.float32), np.ones(6, np.float32), np.arange(6, dtype=np.int32),
                                     steps, jnp.zeros(6, jnp.int32))
    np.testing.assert_allclose(np.asarray(alpha), [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], rtol=1e-6)


@pytest.mark.cross_program
def test_scheduled_alpha_jit_vmap_and_plain_agree():
    """``scheduled_alpha`` is always compiled (so that its multiply-add is one FMA however it is
    called), but inlined in a caller's program or vmapped it is compiled again, with the caller's
    fusion: the three agree to rounding (issue 23). 4 steps of alpha's largest value (~1): an FMA
    or not is one, the curve's sigmoid or cosine a step or two more."""
    rng = np.random.default_rng(0)
    n = 512
    args = (rng.uniform(0, 1, n).astype(np.float32), rng.uniform(0, 1, n).astype(np.float32),
            rng.integers(0, 9, n).astype(np.int32), rng.integers(1, 9, n).astype(np.int32),
            rng.integers(0, len(blending.BLEND_STYLES), n).astype(np.int32))
    plain = np.asarray(blending.scheduled_alpha(*args))
    inlined = np.asarray(jax.jit(lambda *a: blending.scheduled_alpha(*a) * 1.0)(*args))
    vmapped = np.asarray(jax.jit(jax.vmap(blending.scheduled_alpha))(*args))
    assert_close_across_programs(inlined, plain, ulps=4, err_msg="inlined in jit")
    assert_close_across_programs(vmapped, plain, ulps=4, err_msg="jit of vmap")


OPS = {name: blending.BLEND_OPS.index(name) for name in blending.BLEND_OPS}


@SETTINGS
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=PAD))
def test_blend_ops_at_weight_zero_and_one(rows):
    rows = padded(rows)
    h, r = arr([x for x, _ in rows]), arr([y for _, y in rows])
    for name, op in OPS.items():
        at_zero = np.asarray(blend(h, r, jnp.float32(0.0), op))
        assert np.array_equal(at_zero, h), f"{name} at weight 0 must give h exactly"
    add = np.asarray(blend(h, r, jnp.float32(1.0), OPS["add"]))
    assert np.array_equal(add, h + r)
    gate = np.asarray(blend(h, r, jnp.float32(1.0), OPS["gate"]))
    assert np.array_equal(gate, h + r), "the gate op blends additively (the gate scales the weight)"
    mul = np.asarray(blend(h, r, jnp.float32(1.0), OPS["multiply"]))
    np.testing.assert_allclose(mul, h * (1.0 + np.tanh(r)), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(st.lists(finite, min_size=1, max_size=PAD), st.floats(0.0, 1.0, width=32))
def test_zero_residual_is_identity_for_every_op(h, weight):
    h = arr(padded(h))
    for name, op in OPS.items():
        out = np.asarray(blend(h, np.zeros_like(h), jnp.float32(weight), op))
        assert np.array_equal(out, h), name  # values (h = -0.0 may come back as +0.0)


def test_blend_weight_broadcasts_per_sample():
    h = jnp.ones((2, 4, 4, 3))
    r = jnp.ones((2, 4, 4, 3))
    w = jnp.array([0.0, 1.0]).reshape(2, 1, 1, 1)
    out = np.asarray(blend(h, r, w, OPS["add"]))
    assert np.all(out[0] == 1.0) and np.all(out[1] == 2.0)


def test_gate_starts_open_and_is_per_sample():
    params = blending.init_gate(3)
    h = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4, 4, 3)), jnp.float32)
    g = np.asarray(blending.gate_value(params, h))
    assert g.shape == (5, 1, 1, 1)
    assert np.all((g > 0.9) & (g < 1.0))
    g2 = np.asarray(blending.gate_value(params, h[:, 0, 0, :]))  # [B, D] activations
    assert g2.shape == (5, 1)
    params = {"w": jnp.array([10.0, 0.0, 0.0]), "b": jnp.float32(0.0)}
    g = np.asarray(blending.gate_value(params, h)).ravel()
    assert np.all((g > 0) & (g < 1)) and g.std() > 0, "the gate depends on the sample"


def test_sequence_gate_is_causal():
    """For [B, T, D] activations the gate at position t depends on positions <= t only."""
    params = {"w": jnp.asarray([2.0, -1.0, 0.5, 3.0]), "b": jnp.float32(0.1)}
    h = np.random.default_rng(2).normal(size=(2, 6, 4)).astype(np.float32)
    g = np.asarray(blending.gate_value(params, jnp.asarray(h)))
    assert g.shape == (2, 6, 1) and np.all((g > 0) & (g < 1))
    changed = h.copy()
    changed[:, 4:, :] += 10.0
    g2 = np.asarray(blending.gate_value(params, jnp.asarray(changed)))
    assert np.array_equal(g2[:, :4], g[:, :4]), "the gate looked at future positions"
    assert not np.array_equal(g2[:, 4:], g[:, 4:])


@pytest.mark.cross_program
def test_plain_and_jitted_curve_and_blend_agree():
    rng = np.random.default_rng(1)
    t = rng.uniform(-0.1, 1.1, 64).astype(np.float32)
    styles = rng.integers(0, len(blending.BLEND_STYLES), 64).astype(np.int32)
    # op by op (each primitive its own program) and one fused program: to rounding (issue 23),
    # a few steps of the curve's largest value (1) for its sigmoid or cosine and the rescaling
    assert_close_across_programs(np.asarray(blending.curve(styles, t)), np.asarray(curve(styles, t)), ulps=4)
    h, r = rng.normal(size=(2, 64)).astype(np.float32)
    for op in OPS.values():
        w = jnp.float32(0.375)
        # the forward always runs compiled; op-by-op rounding may differ in the last bits (FMA)
        np.testing.assert_allclose(np.asarray(blending.blend(h, r, w, op)), np.asarray(blend(h, r, w, op)),
                                   rtol=1e-6, atol=1e-6)


def test_name_and_tempo_lookups():
    for i, style in enumerate(blending.BLEND_STYLES):
        assert blending.blend_style_index(style.name) == i
    for i, epochs in enumerate(blending.TEMPOS):
        assert blending.tempo_index(epochs) == i
        assert int(blending.tempo_epochs(jnp.int32(i))) == epochs
    with pytest.raises(ValueError, match="linear"):
        blending.blend_style_index("wobbly")
    for bad in (0, 4, 10, -3):
        with pytest.raises(ValueError) as info:
            blending.tempo_index(bad)
        assert "3" in str(info.value) and "8" in str(info.value)
