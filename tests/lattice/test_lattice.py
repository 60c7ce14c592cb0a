"""The seed lattice: per-(slot, blueprint) parameters and optimizer states, and the rule that
a unit changes only when it is germinated or learning.

A slot's parameters are one raveled vector (``SlotLayout``); a *unit* is a blueprint's (or the
gate's) range of it. Unit views below come from ``Lattice.unit_params`` and the layout's ranges.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.lattice import blending, lifecycle
from esper_jax.lattice.hosts import CNNHost, slot_config_for
from esper_jax.lattice.grid import GATE, Lattice, LatticeState
from esper_jax.lattice.lifecycle import GateConfig, Stage
from esper_jax.lattice.optim import inner_optimizer

from tests.conftest import assert_close_across_programs

SLOTS = slot_config_for(CNNHost.baseline(), ["r0c0", "r1c0", "r2c0"])
# Short gates so states in later stages are a few requests away.
LAT = Lattice(SLOTS, gates=GateConfig(min_training_epochs=0, require_healthy_gradients=False))
NAMES = tuple(bp.name for bp in LAT.blueprints)
UNITS = tuple((s, name) for s in range(SLOTS.num_slots) for name in NAMES + (GATE,))
LINEAR = blending.blend_style_index("linear")
GATE_STYLE = blending.blend_style_index("gate")



def key(seed: int) -> jax.Array:
    # The library is PRNG-agnostic; "rbg" keys make initializing every blueprint of every slot
    # compile several times faster than threefry on XLA:CPU (see tests/conftest.py).
    return jax.random.key(seed, impl="rbg")


# Compiled once; every call below reuses them (slot, blueprint, ... are traced).
GERMINATE = jax.jit(LAT.germinate)
APPLY = jax.jit(LAT.apply_gradients)
NORMS = jax.jit(LAT.seed_grad_norms)


def same_tree(a, b) -> bool:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return all(np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def unit_range(s: int, name: str) -> slice:
    (start, stop), = [(a, b) for n, a, b in LAT.layout(s).unit_ranges if n == name]
    return slice(start, stop)


def unit_vector_slices(slot_tree, s: int, name: str) -> list[np.ndarray]:
    """The unit's elements of every leaf shaped like the slot's raveled parameters."""
    size = LAT.layout(s).size
    return [np.asarray(leaf)[unit_range(s, name)] for leaf in jax.tree.leaves(slot_tree) if leaf.shape == (size,)]


def unit_params(state, s, name):
    return LAT.unit_params(state, s)[name]


def unit_opt(state, s, name):
    return unit_vector_slices(state.opt_state[s], s, name)


def unit_grads(grads, s, name):
    return np.asarray(grads[s])[unit_range(s, name)]


SHAPES = jax.eval_shape(LAT.init, key(0))


def trained_state(seed: int) -> LatticeState:
    """A fresh status over parameters and optimizer moments that are far from any initial value,
    as after training (built from the shapes: compiling ``Lattice.init`` takes many seconds)."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(rng.normal(size=leaf.shape) + 1.0, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return LatticeState(status=lifecycle.init_status(SLOTS.num_slots), params=jax.tree.map(fill, SHAPES.params),
                        opt_state=jax.tree.map(fill, SHAPES.opt_state))


def random_grads(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


@pytest.fixture(scope="module")
def base() -> LatticeState:
    return trained_state(0)


def test_lattice_layout(base):
    assert LAT.num_blueprints == 8 and NAMES[0] == "noop"
    assert [spec.dim for spec in SLOTS.slots] == [8, 16, 32]
    for s, spec in enumerate(SLOTS.slots):
        layout = LAT.layout(s)
        units = LAT.unit_params(base, s)
        assert set(units) == set(NAMES) | {GATE}
        assert units[GATE]["w"].shape == (spec.dim,)
        # the units tile the raveled vector exactly, each as large as its blueprint
        ranges = sorted((a, b) for _, a, b in layout.unit_ranges)
        assert ranges[0][0] == 0 and ranges[-1][1] == layout.size == base.params[s].shape[0]
        assert all(b0 == a1 for (_, b0), (a1, _) in zip(ranges, ranges[1:]))
        for name in NAMES:
            r = unit_range(s, name)
            assert r.stop - r.start == LAT.blueprints[LAT.blueprint_index(name)].num_params(spec.dim)
        # the view and the vector are the same numbers
        again = LAT.with_unit_params(base, s, units)
        assert same_tree(again.params, base.params)


@pytest.mark.parametrize("slot", range(3))
def test_germinate_resets_only_the_chosen_unit_and_gate(base, slot):
    for b, name in enumerate(NAMES):
        state, applied = GERMINATE(base, slot, b, LINEAR, 1, key(100 + b))
        assert bool(applied)
        assert int(state.status.stage[slot]) == Stage.GERMINATED and int(state.status.blueprint[slot]) == b
        for s, u in UNITS:
            new_p, old_p = unit_params(state, s, u), unit_params(base, s, u)
            new_o, old_o = unit_opt(state, s, u), unit_opt(base, s, u)
            if s == slot and u in (name, GATE):
                if jax.tree.leaves(old_p):
                    assert not same_tree(new_p, old_p), f"({s}, {u}) was not re-initialized"
                # fresh optimizer moments for the fresh parameters
                fresh_opt = unit_vector_slices(LAT.seed_optimizer.init(state.params[s]), s, u)
                assert new_o and same_tree(new_o, fresh_opt), f"({s}, {u}) optimizer state not reset"
            else:
                assert same_tree(new_p, old_p), f"germinating ({slot}, {name}) changed parameters of ({s}, {u})"
                assert same_tree(new_o, old_o), f"germinating ({slot}, {name}) changed optimizer state of ({s}, {u})"
        assert same_tree(unit_params(state, slot, GATE), blending.init_gate(SLOTS.slots[slot].dim))


def test_germinated_output_layers_start_at_zero(base):
    b = LAT.blueprint_index("conv_light")
    state, _ = GERMINATE(base, 1, b, LINEAR, 0, key(7))
    units = LAT.unit_params(state, 1)
    assert np.all(np.asarray(units["conv_light"]["scale"]) == 0.0)
    assert np.any(np.asarray(units["conv_light"]["w"]) != 0.0)


@pytest.mark.parametrize(
    "slot, blueprint, style, tempo",
    [(-1, 0, 0, 0), (3, 0, 0, 0), (99, 1, 0, 0), (0, -1, 0, 0), (0, 8, 0, 0), (0, 1, -1, 0),
     (0, 1, len(blending.BLEND_STYLES), 0), (0, 1, 0, -1), (0, 1, 0, len(blending.TEMPOS))],
)
def test_germinate_with_a_wrong_index_changes_nothing(base, slot, blueprint, style, tempo):
    state, applied = GERMINATE(base, slot, blueprint, style, tempo, key(1))
    assert not bool(applied)
    assert same_tree(state, base)


def test_germinate_an_occupied_slot_changes_nothing(base):
    state, _ = GERMINATE(base, 2, 3, LINEAR, 0, key(1))
    again, applied = GERMINATE(state, 2, 5, LINEAR, 0, key(2))
    assert not bool(applied) and same_tree(again, state)


def _ok(result):
    state, applied = result
    assert bool(applied)
    return state


def scenario(base, which: str) -> LatticeState:
    """States with seeds in several stages (gates: no minimum training, no health check)."""
    bp = LAT.blueprint_index
    s = base
    if which == "training_blending_germinated":
        s = _ok(GERMINATE(s, 0, bp("conv_small"), LINEAR, 0, key(1)))
        s = _ok(LAT.advance(s, 0))                                              # r0c0 TRAINING
        s = _ok(GERMINATE(s, 1, bp("norm"), GATE_STYLE, 0, key(2)))
        s = _ok(LAT.advance(_ok(LAT.advance(s, 1)), 1))                         # r1c0 BLENDING, gate op
        s = _ok(GERMINATE(s, 2, bp("conv_heavy"), LINEAR, 0, key(3)))  # r2c0 GERMINATED
        expected = {(0, "conv_small"), (1, "norm"), (1, GATE)}
    elif which == "pruned_holding_dormant":
        s = _ok(GERMINATE(s, 0, bp("bottleneck"), LINEAR, 0, key(1)))
        s = _ok(LAT.prune(_ok(LAT.advance(s, 0)), 0))                           # r0c0 PRUNED
        s = _ok(GERMINATE(s, 1, bp("depthwise"), GATE_STYLE, 0, key(2)))
        s = _ok(LAT.advance(_ok(LAT.advance(s, 1)), 1))
        for _ in range(blending.TEMPOS[0]):
            s = LAT.tick(s)
        s = _ok(LAT.advance(s, 1))                                              # r1c0 HOLDING: gate off
        expected = {(1, "depthwise")}                                           # r2c0 DORMANT
    elif which == "fossilized_blending_add":
        s = _ok(GERMINATE(s, 2, bp("attention"), LINEAR, 0, key(1)))
        s = _ok(LAT.advance(_ok(LAT.advance(s, 2)), 2))
        s = LAT.tick(LAT.tick(LAT.tick(s)))
        s = _ok(LAT.advance(s, 2))
        s = LAT.tick(LAT.record_measurements(s, contribution=jnp.ones(3)))
        s = _ok(LAT.fossilize(s, 2))                                            # r2c0 FOSSILIZED
        s = _ok(GERMINATE(s, 0, bp("noop"), LINEAR, 0, key(2)))
        s = _ok(LAT.advance(_ok(LAT.advance(s, 0)), 0))                         # r0c0 BLENDING noop, add op
        expected = {(2, "attention"), (0, "noop")}
    else:
        raise AssertionError(which)
    return s, expected


SCENARIOS = ["training_blending_germinated", "pruned_holding_dormant", "fossilized_blending_add"]


@pytest.mark.parametrize("which", SCENARIOS)
def test_apply_gradients_changes_only_trainable_units(base, which):
    state, expected = scenario(base, which)
    masks = LAT.trainable(state)
    marked = {(s, u) for s, u in UNITS if bool(masks[s][u])}
    assert marked == expected, f"trainable units {sorted(marked)}"
    for seed in range(2):
        grads = random_grads(state.params, seed)
        new = APPLY(state, grads)
        assert same_tree(new.status, state.status)
        for s, u in UNITS:
            p_changed = not same_tree(unit_params(new, s, u), unit_params(state, s, u))
            o_changed = not same_tree(unit_opt(new, s, u), unit_opt(state, s, u))
            if (s, u) in marked and jax.tree.leaves(unit_params(state, s, u)):
                assert p_changed and o_changed, f"learning unit ({s}, {u}) did not change"
            elif (s, u) not in marked:
                assert not p_changed and not o_changed, f"unit ({s}, {u}) changed although it is not learning"
        state = new


@pytest.mark.parametrize("which", SCENARIOS)
def test_seed_grad_norms(base, which):
    state, expected = scenario(base, which)
    grads = random_grads(state.params, 3)
    norms = np.asarray(NORMS(state, grads))
    assert norms.shape == (3,)
    for s in range(3):
        learning = [u for (t, u) in expected if t == s and u != GATE]
        want = np.sqrt(sum(float(np.sum(np.square(unit_grads(grads, s, u)))) for u in learning))
        np.testing.assert_allclose(norms[s], want, rtol=1e-5)
        if not learning:
            assert norms[s] == 0.0, f"slot {s} has no learning seed"


def test_untouched_blueprints_never_change_over_many_steps(base):
    """Units of blueprints not in use keep their exact initial values through training."""
    state, expected = scenario(base, "training_blending_germinated")
    start = state
    for seed in range(4):
        state = APPLY(state, random_grads(state.params, 10 + seed))
        state = LAT.tick(state)
    for s, u in UNITS:
        if (s, u) not in expected:
            assert same_tree(unit_params(state, s, u), unit_params(start, s, u)), (s, u)


def test_live_param_count(base):
    state, _ = scenario(base, "training_blending_germinated")
    # r0c0 conv_small (dim 8) and r1c0 norm (dim 16) are computed; r2c0 is only GERMINATED
    assert int(LAT.live_param_count(state)) == 8 * 8 + 2 * 16


@pytest.mark.cross_program
def test_jit_vmap_germinate_over_a_population_equals_members():
    """Different states and different requests per member (one refused for an occupied slot, one
    for a blueprint index out of range): the vmapped program equals per-member calls, integers and
    flags exactly, float leaves to rounding (two programs, issue 23: 4 rounding steps of a leaf's
    largest value, for the scaling of freshly drawn weights). A refused member is its input, bit for bit.

    The key is shared by the members: ``rbg`` keys (used here because they compile fast) do not
    give the same random bits under ``vmap`` as unbatched, so per-member keys would compare the
    PRNG, not the lattice. (With threefry keys per-member keys agree too, but compile ~2x slower.)
    """
    population = 4
    states = [trained_state(100 + m) for m in range(population)]
    states[1] = GERMINATE(states[1], 0, 2, LINEAR, 0, key(5))[0]  # member 1's first slot is taken
    requests = [(0, 6, LINEAR, 1), (0, 3, GATE_STYLE, 2), (2, 7, 3, 0), (1, 8, 0, 0)]
    batched = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    cols = [jnp.asarray([r[i] for r in requests], jnp.int32) for i in range(4)]
    shared = key(9)
    vstate, vapplied = jax.jit(jax.vmap(LAT.germinate, in_axes=(0, 0, 0, 0, 0, None)))(batched, *cols, shared)
    assert np.asarray(vapplied).tolist() == [True, False, True, False]
    for m in range(population):
        want, applied = GERMINATE(states[m], *requests[m], shared)
        got = jax.tree.map(lambda x: x[m], vstate)
        assert bool(applied) == bool(vapplied[m])
        assert_close_across_programs(got, want, ulps=4, err_msg=f"member {m}, vmap vs a single jitted call")
        if not bool(applied):
            assert same_tree(got, states[m]), f"refused member {m} changed"


def test_a_slots_optimizer_step_count_is_its_own():
    """Adam's step count (its bias correction) restarts only in the slot that germinates and ticks
    only where a seed learns: germinating or training one slot leaves every other slot's optimizer
    state as it was (SGD's state has no count, so only a counting optimizer can see this)."""
    lat = Lattice(SLOTS, gates=LAT.gates, seed_optimizer=inner_optimizer("adamw", 1e-3), blueprint_names=("norm",))
    shapes = jax.eval_shape(lat.init, key(0))
    rng = np.random.default_rng(1)
    fill = lambda leaf: jnp.asarray(rng.normal(size=leaf.shape) if jnp.issubdtype(leaf.dtype, jnp.floating)
                                    else np.full(leaf.shape, 7), leaf.dtype)
    state = LatticeState(status=lifecycle.init_status(SLOTS.num_slots), params=jax.tree.map(fill, shapes.params),
                         opt_state=jax.tree.map(fill, shapes.opt_state))
    counts = lambda st, s: [int(leaf) for leaf in jax.tree.leaves(st.opt_state[s]) if leaf.ndim == 0]
    assert counts(state, 0) and all(c == 7 for c in counts(state, 0))
    grown, applied = jax.jit(lat.germinate)(state, 1, lat.blueprint_index("norm"), LINEAR, 0, key(2))
    assert bool(applied) and all(c == 0 for c in counts(grown, 1))
    assert same_tree(grown.opt_state[0], state.opt_state[0]) and same_tree(grown.opt_state[2], state.opt_state[2])
    # nothing learns yet (GERMINATED): a step moves no slot's state, its count included
    stepped = jax.jit(lat.apply_gradients)(grown, random_grads(grown.params, 3))
    assert all(same_tree(stepped.opt_state[s], grown.opt_state[s]) for s in range(SLOTS.num_slots))
