"""Seed lifecycle: Esper's transition table, gates, and the pure request/tick functions.

The property tests drive random request sequences (out-of-range and non-finite arguments
included) through :mod:`esper_jax.lattice.lifecycle` and check, after every request, invariants that
are derived from ``lifecycle.TRANSITIONS`` and Esper's gate semantics (G1-G5).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper_jax.lattice import blending, lifecycle
from esper_jax.lattice.lifecycle import GateConfig, SlotStatus, Stage

from tests.conftest import assert_close_across_programs
from tests.strategies import GATE_PRESETS, KINDS, intents, SLOT_KINDS, Request, gate_configs, next_request

NUM_BLUEPRINTS = 5  # the lifecycle only needs a count; the registry is tested elsewhere
FIELDS = tuple(f.name for f in dataclasses.fields(SlotStatus))
BLANK = {name: np.asarray(getattr(lifecycle.init_status(1), name))[0] for name in FIELDS}
MEASUREMENT_FIELDS = ("contribution", "contribution_measured", "improvement", "seed_grad_norm", "host_grad_norm")
SEEDED = frozenset(lifecycle.LIVE_STAGES) | {Stage.FOSSILIZED}
# Forward successor of each stage, read off the table: the one that is not a prune.
FORWARD = {
    src: next(iter(dsts - {Stage.PRUNED})) for src, dsts in lifecycle.TRANSITIONS.items() if len(dsts - {Stage.PRUNED}) == 1
}

PROPERTY_SETTINGS = settings(
    max_examples=35,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ============================================================================== helpers


def to_np(status: SlotStatus) -> dict[str, np.ndarray]:
    return {name: np.asarray(getattr(status, name)) for name in FIELDS}


def slot_view(state: dict, k: int) -> dict:
    return {name: state[name][k] for name in FIELDS}


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_state_bits_equal(a: dict, b: dict, what: str = ""):
    for name in FIELDS:
        assert same_bits(a[name], b[name]), f"{what}: field {name} changed: {a[name]!r} -> {b[name]!r}"


def assert_slot_bits_equal(a: dict, b: dict, k: int, what: str = ""):
    for name in FIELDS:
        assert same_bits(a[name][k], b[name][k]), f"{what}: slot {k} field {name}: {a[name][k]!r} -> {b[name][k]!r}"


def assert_same_status_across_programs(a: dict, b: dict, what: str = ""):
    """Statuses from two different programs (jit, vmap, op by op): every integer and boolean field
    (stage, blueprint, counters, flags) exactly, float fields to 4 rounding steps (issue 23: each
    program fuses ``scheduled_alpha``'s multiply-add and curve its own way; the other float
    fields are copies of given measurements), NaNs and infinities in the same places."""
    for name in FIELDS:
        assert_close_across_programs(a[name], b[name], ulps=4, err_msg=f"{what}: {name}")


def f32(x) -> np.float32:
    return np.float32(x)


def apply_plain(status: SlotStatus, req: Request, gates: GateConfig):
    """Apply a request with the plain (un-jitted) library functions."""
    if req.kind == "germinate":
        return lifecycle.germinate(status, req.slot, req.blueprint, req.blend_style, req.tempo, NUM_BLUEPRINTS, gates)
    if req.kind == "advance":
        return lifecycle.advance(status, req.slot, gates)
    if req.kind == "set_alpha_target":
        return lifecycle.set_alpha_target(status, req.slot, req.target, gates)
    if req.kind == "prune":
        return lifecycle.prune(status, req.slot, gates, req.ramp)
    if req.kind == "fossilize":
        return lifecycle.fossilize(status, req.slot, gates)
    if req.kind == "tick":
        return lifecycle.tick(status, gates), None
    if req.kind == "record":
        given_ = {k: v for k, v in req.measurements.items() if v is not None}
        return lifecycle.record_measurements(status, **given_), None
    raise AssertionError(req.kind)


# ------------------------------------------------------------------------------ gate oracle
# Esper's gate semantics, written independently of lifecycle.py. Thresholds are
# compared in float32, the precision of the state.


def grads_ok(slot: dict, gates: GateConfig) -> bool:
    sg, hg = slot["seed_grad_norm"], slot["host_grad_norm"]
    if not (np.isfinite(sg) and np.isfinite(hg)):
        return False
    if gates.require_healthy_gradients:
        return bool(f32(gates.min_seed_grad_norm) < sg < f32(gates.max_seed_grad_norm))
    return True


def g2_ok(slot: dict, gates: GateConfig, epochs: int) -> bool:
    if slot["stage"] != Stage.TRAINING or epochs < gates.min_training_epochs or not grads_ok(slot, gates):
        return False
    return gates.min_improvement is None or bool(slot["improvement"] >= f32(gates.min_improvement))


def g3_ok(slot: dict, step: int) -> bool:
    return slot["stage"] == Stage.BLENDING and not slot["pruning"] and step >= slot["alpha_steps"]


def g5_ok(slot: dict, gates: GateConfig) -> bool:
    return bool(
        slot["stage"] == Stage.HOLDING
        and not slot["pruning"]
        and slot["contribution_measured"]
        and slot["contribution"] > f32(gates.min_contribution)
        and slot["epochs_in_stage"] >= gates.min_holding_epochs
    )


def gate_out_ok(slot: dict, gates: GateConfig) -> bool:
    """Does the gate out of the slot's current stage (along the forward path) pass?"""
    stage = Stage(int(slot["stage"]))
    return {
        Stage.GERMINATED: True,  # G1: the seed exists
        Stage.TRAINING: g2_ok(slot, gates, int(slot["epochs_in_stage"])),
        Stage.BLENDING: g3_ok(slot, int(slot["alpha_step"])),
        Stage.HOLDING: g5_ok(slot, gates),
    }.get(stage, False)


# ------------------------------------------------------------------------------ invariants


def check_well_formed(state: dict, gates: GateConfig):
    S = state["stage"].shape[0]
    for name in FIELDS:
        assert state[name].shape == (S,), name
        assert state[name].dtype == BLANK[name].dtype, (name, state[name].dtype)
    for k in range(S):
        slot = slot_view(state, k)
        stage = Stage(int(slot["stage"]))  # raises for an out-of-range stage
        for name in ("alpha", "alpha_start", "alpha_target"):
            assert np.isfinite(slot[name]) and 0.0 <= slot[name] <= 1.0, (k, name, slot[name])
        if stage not in lifecycle.BLENDED_STAGES:
            assert slot["alpha"] == 0.0, f"slot {k} in {stage.name} reports alpha {slot['alpha']}"
        assert 0 <= slot["alpha_step"] <= slot["alpha_steps"], (k, slot["alpha_step"], slot["alpha_steps"])
        assert slot["epochs_in_stage"] >= 0 and slot["seed_age"] >= 0
        assert 0 <= slot["embargo"] <= max(gates.embargo_epochs, 0)
        if slot["pruning"]:
            assert stage in (Stage.BLENDING, Stage.HOLDING), (k, stage)
        if stage == Stage.DORMANT:
            for name in FIELDS:  # an empty slot carries nothing over to its next seed
                assert same_bits(slot[name], BLANK[name]), f"DORMANT slot {k} has {name}={slot[name]!r}"
        else:
            assert 0 <= slot["blueprint"] < NUM_BLUEPRINTS
            assert 0 <= slot["blend_style"] < len(blending.BLEND_STYLES)
            assert int(slot["tempo"]) in blending.TEMPOS


def check_transition(prev: dict, new: dict, req: Request, applied, gates: GateConfig):
    """Every invariant of one request; ``applied`` is None for tick and record."""
    S = prev["stage"].shape[0]
    check_well_formed(new, gates)
    if applied is not None:
        applied_np = np.asarray(applied)
        assert applied_np.shape == () and applied_np.dtype == np.bool_, applied_np
        applied = bool(applied_np)
        if not applied:
            assert_state_bits_equal(prev, new, f"refused {req!r}")

    for k in range(S):
        old_stage, new_stage = Stage(int(prev["stage"][k])), Stage(int(new["stage"][k]))
        assert new_stage == old_stage or new_stage in lifecycle.TRANSITIONS[old_stage], (
            f"{req!r}: slot {k} {old_stage.name} -> {new_stage.name} is not in TRANSITIONS"
        )
        if old_stage == Stage.FOSSILIZED:
            assert new_stage == Stage.FOSSILIZED
            for name in ("alpha", "alpha_target", "blueprint", "blend_style", "tempo"):
                assert same_bits(prev[name][k], new[name][k]), f"{req!r}: fossilized slot {k} changed {name}"

    if req.kind in SLOT_KINDS:
        in_range = 0 <= req.slot < S
        if not in_range:
            assert not applied, f"{req!r} applied to a slot outside 0..{S - 1}"
        for k in range(S):
            if k != req.slot:
                assert_slot_bits_equal(prev, new, k, f"{req!r} touched another slot")
        if in_range:
            CHECKS[req.kind](slot_view(prev, req.slot), slot_view(new, req.slot), req, applied, gates)
    elif req.kind == "tick":
        check_tick(prev, new, gates)
    else:
        check_record(prev, new, req)


def check_germinate(old, new, req, applied, gates):
    expected = (
        old["stage"] == Stage.DORMANT
        and 0 <= req.blueprint < NUM_BLUEPRINTS
        and 0 <= req.blend_style < len(blending.BLEND_STYLES)
        and 0 <= req.tempo < len(blending.TEMPOS)
    )
    assert applied == expected, f"{req!r} on {Stage(int(old['stage'])).name}: applied={applied}"
    if applied:
        fresh = dict(BLANK, stage=Stage.GERMINATED, blueprint=req.blueprint, blend_style=req.blend_style,
                     tempo=blending.TEMPOS[req.tempo])
        for name in FIELDS:
            assert new[name] == fresh[name], f"{req!r}: germinated slot has {name}={new[name]!r}"


def check_advance(old, new, req, applied, gates):
    stage = Stage(int(old["stage"]))
    assert applied == gate_out_ok(old, gates), f"{req!r} from {stage.name} (slot {old}): applied={applied}"
    if applied:
        assert new["stage"] == FORWARD[stage], f"advance from {stage.name} went to {Stage(int(new['stage'])).name}"
        assert new["epochs_in_stage"] == 0
        assert same_bits(new["alpha"], old["alpha"]), "advancing must not make alpha jump"
        if FORWARD[stage] == Stage.BLENDING:
            assert new["alpha_start"] == old["alpha"] and new["alpha_target"] == 1.0
            assert new["alpha_step"] == 0 and new["alpha_steps"] == old["tempo"]


def check_fossilize(old, new, req, applied, gates):
    assert applied == g5_ok(old, gates), f"{req!r} from {Stage(int(old['stage'])).name}: applied={applied}"
    if applied:
        assert new["stage"] == Stage.FOSSILIZED and same_bits(new["alpha"], old["alpha"])


def check_set_alpha_target(old, new, req, applied, gates):
    target = f32(req.target)
    expected = (
        old["stage"] in (Stage.BLENDING, Stage.HOLDING)
        and not old["pruning"]
        and math.isfinite(req.target)
        and 0.0 < target <= 1.0
        and target != old["alpha_target"]
    )
    assert applied == expected, f"{req!r} on {old}: applied={applied}"
    if applied:
        assert new["stage"] == old["stage"]
        assert same_bits(new["alpha"], old["alpha"]), "a new target must not make alpha jump"
        assert same_bits(new["alpha_start"], old["alpha"]), "the schedule restarts from the current alpha"
        assert same_bits(new["alpha_target"], target)
        assert new["alpha_step"] == 0 and new["alpha_steps"] == old["tempo"]


def check_prune(old, new, req, applied, gates):
    stage = Stage(int(old["stage"]))
    expected = stage in lifecycle.LIVE_STAGES and Stage.PRUNED in lifecycle.TRANSITIONS[stage] and not old["pruning"]
    assert applied == expected, f"{req!r} on {stage.name} pruning={old['pruning']}: applied={applied}"
    if not applied:
        return
    if req.ramp and old["alpha"] > 0:
        assert new["stage"] == stage and new["pruning"], "a ramped prune keeps the stage until alpha reaches 0"
        assert same_bits(new["alpha"], old["alpha"]) and same_bits(new["alpha_start"], old["alpha"])
        assert new["alpha_target"] == 0.0 and new["alpha_step"] == 0 and new["alpha_steps"] == old["tempo"]
    else:
        assert new["stage"] == Stage.PRUNED and new["alpha"] == 0.0 and not new["pruning"]


def check_tick(prev, new, gates):
    S = prev["stage"].shape[0]
    for k in range(S):
        old, nw = slot_view(prev, k), slot_view(new, k)
        o, n = Stage(int(old["stage"])), Stage(int(nw["stage"]))
        where = f"tick: slot {k} {o.name}->{n.name} ({old})"
        # schedule bookkeeping
        scheduled = o in (Stage.BLENDING, Stage.HOLDING) and old["alpha_step"] < old["alpha_steps"]
        step = int(old["alpha_step"]) + int(scheduled)
        if scheduled:
            lo, hi = sorted((old["alpha_start"], old["alpha_target"]))
            going_up = old["alpha_target"] >= old["alpha_start"]
            if n == o:
                assert nw["alpha_step"] == step, where
                assert lo <= nw["alpha"] <= hi, where
                # curves are monotone: alpha never moves away from the target
                assert (nw["alpha"] >= old["alpha"]) if going_up else (nw["alpha"] <= old["alpha"]), where
                if step >= old["alpha_steps"]:
                    assert same_bits(nw["alpha"], old["alpha_target"]), f"{where}: schedule done but alpha != target"
        elif n == o:
            assert same_bits(nw["alpha"], old["alpha"]), f"{where}: alpha moved without a schedule"
        # counters
        if n != o:
            assert nw["epochs_in_stage"] == 0, where
        elif o != Stage.DORMANT:
            assert nw["epochs_in_stage"] == old["epochs_in_stage"] + 1, where
        # stage changes, from the table plus the gate semantics
        if o == Stage.FOSSILIZED or o == Stage.DORMANT:
            assert n == o, where
        elif o in (Stage.PRUNED, Stage.RESETTING):
            assert n == FORWARD[o], where  # the only way on, one step per tick
        elif o == Stage.EMBARGOED:
            done = old["epochs_in_stage"] + 1 >= gates.embargo_epochs
            assert (n == FORWARD[o]) == done, f"{where}: embargo of {gates.embargo_epochs} epochs"
        elif old["pruning"]:
            assert n == (Stage.PRUNED if step >= old["alpha_steps"] else o), where
            assert nw["alpha"] <= old["alpha"], where
        else:
            if o == Stage.HOLDING:
                auto = False  # G5 is never passed by tick: fossilizing is a decision
            elif not gates.auto_advance:
                auto = False
            elif o == Stage.GERMINATED:
                auto = True
            elif o == Stage.TRAINING:
                auto = g2_ok(old, gates, int(old["epochs_in_stage"]) + 1)
            else:
                auto = g3_ok(old, step)
            assert n == (FORWARD[o] if auto else o), f"{where}: auto_advance={gates.auto_advance}"
        if n == Stage.PRUNED:
            assert nw["alpha"] == 0.0
        if n != o and n == Stage.HOLDING:
            assert same_bits(nw["alpha"], old["alpha_target"]), f"{where}: entered HOLDING before the target"


def check_record(prev, new, req):
    given_ = {k: v for k, v in req.measurements.items() if v is not None}
    S = prev["stage"].shape[0]
    for k in range(S):
        old, nw = slot_view(prev, k), slot_view(new, k)
        if Stage(int(old["stage"])) not in SEEDED:
            assert_slot_bits_equal(prev, new, k, "record on a slot without a seed")
            continue
        for name in FIELDS:
            if name not in MEASUREMENT_FIELDS:
                assert same_bits(old[name], nw[name]), f"record changed {name} of slot {k}"
        for name in ("improvement", "seed_grad_norm", "host_grad_norm"):
            if name in given_:
                assert same_bits(nw[name], f32(given_[name][k])), (name, k)
            else:
                assert same_bits(nw[name], old[name]), (name, k)
        assert nw["contribution_measured"] >= old["contribution_measured"], "a measurement is never forgotten"
        if "contribution" in given_:
            measured = given_.get("contribution_measured", np.ones(S, bool))[k]
            if measured:
                assert same_bits(nw["contribution"], f32(given_["contribution"][k])) and nw["contribution_measured"]
            else:
                assert same_bits(nw["contribution"], old["contribution"])
                assert nw["contribution_measured"] == old["contribution_measured"]
        else:
            assert same_bits(nw["contribution"], old["contribution"])
            assert nw["contribution_measured"] == old["contribution_measured"]


CHECKS = {
    "germinate": check_germinate,
    "advance": check_advance,
    "fossilize": check_fossilize,
    "set_alpha_target": check_set_alpha_target,
    "prune": check_prune,
}


# ============================================================================== property tests

MAX_STEPS = 25


@PROPERTY_SETTINGS
@given(data=st.data(), num_slots=st.integers(1, 4), gates=gate_configs(), steps=st.integers(10, MAX_STEPS),
       intent=intents)
def test_random_request_sequences_keep_lifecycle_invariants(data, num_slots, gates, steps, intent):
    status = lifecycle.init_status(num_slots)
    state = to_np(status)
    for t in range(steps):
        req = data.draw(next_request(state, gates, NUM_BLUEPRINTS, intent=intent), label=f"request {t}")
        status, applied = apply_plain(status, req, gates)
        new_state = to_np(status)
        check_transition(state, new_state, req, applied, gates)
        assert not any(leaf.weak_type for leaf in jax.tree.leaves(status)), f"weak-typed field after {req!r}"
        state = new_state


# --- jit and vmap agreement ------------------------------------------------------------------
# One program per gate preset, built once here: ``lax.switch`` over the request kind calls the
# library transition with a static gate config. Under ``vmap`` the switch runs every member's own
# request, so one call checks a batch of different statuses with different requests.

KIND_INDEX = {kind: i for i, kind in enumerate(KINDS)}


def _dispatch(gates: GateConfig, status, kind, slot, blueprint, blend_style, tempo, target, ramp,
              contribution, contribution_measured, improvement, seed_grad_norm, host_grad_norm):
    done = jnp.asarray(True)
    branches = {
        "germinate": lambda: lifecycle.germinate(status, slot, blueprint, blend_style, tempo, NUM_BLUEPRINTS, gates),
        "advance": lambda: lifecycle.advance(status, slot, gates),
        "set_alpha_target": lambda: lifecycle.set_alpha_target(status, slot, target, gates),
        "prune": lambda: lifecycle.prune(status, slot, gates, ramp),
        "fossilize": lambda: lifecycle.fossilize(status, slot, gates),
        "tick": lambda: (lifecycle.tick(status, gates), done),
        "record": lambda: (
            lifecycle.record_measurements(
                status, contribution=contribution, contribution_measured=contribution_measured,
                improvement=improvement, seed_grad_norm=seed_grad_norm, host_grad_norm=host_grad_norm,
            ),
            done,
        ),
    }
    return jax.lax.switch(kind, [branches[k] for k in KINDS])


def encode(req: Request, num_slots: int) -> tuple:
    m = req.measurements or {}
    zeros = np.zeros(num_slots, np.float32)
    return (
        np.int32(KIND_INDEX[req.kind]), np.int32(req.slot), np.int32(req.blueprint), np.int32(req.blend_style),
        np.int32(req.tempo), np.float32(req.target), np.bool_(req.ramp),
        m.get("contribution", zeros), m.get("contribution_measured", zeros > 0), m.get("improvement", zeros),
        m.get("seed_grad_norm", zeros), m.get("host_grad_norm", zeros),
    )


# (gate preset, number of slots): between them the two presets take every Python branch on the
# gate config in lifecycle.py (healthy-gradient check on/off, strict improvement on/off,
# auto_advance on/off). Each program costs seconds to compile on a 2-core CPU, hence only two;
# the plain-function test above covers 1-4 slots and every preset.
AGREEMENT_CASES = (("permissive", 2), ("strict", 3))
JITTED = {name: jax.jit(functools.partial(_dispatch, GATE_PRESETS[name])) for name, _ in AGREEMENT_CASES}
VMAPPED = {name: jax.jit(jax.vmap(functools.partial(_dispatch, GATE_PRESETS[name]))) for name, _ in AGREEMENT_CASES}
BATCH = 3
MAX_AGREEMENT_STEPS = 16


def _stack(trees):
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def from_np(state: dict) -> SlotStatus:
    return SlotStatus(**{name: jnp.asarray(value) for name, value in state.items()})


@pytest.mark.cross_program
@settings(PROPERTY_SETTINGS, max_examples=12)
@given(
    data=st.data(),
    case=st.sampled_from(AGREEMENT_CASES),
    member_intents=st.lists(intents, min_size=BATCH, max_size=BATCH),
    steps=st.integers(5, MAX_AGREEMENT_STEPS),
)
def test_jit_and_vmap_agree_with_plain_functions(data, case, member_intents, steps):
    """A batch of statuses, each with its own request per step: the vmapped program, the jitted
    program and (for one member per step, in turn) the plain functions give the same states:
    the same stages, counters and flags, and alphas to rounding (three programs)."""
    preset, num_slots = case
    gates = GATE_PRESETS[preset]
    states = [to_np(lifecycle.init_status(num_slots)) for _ in range(BATCH)]
    for t in range(steps):
        reqs = [
            data.draw(next_request(states[b], gates, NUM_BLUEPRINTS, complete_measurements=True, intent=member_intents[b]),
                      label=f"step {t} member {b}")
            for b in range(BATCH)
        ]
        args = [encode(r, num_slots) for r in reqs]
        batched_status, batched_applied = VMAPPED[preset](_stack([from_np(x) for x in states]), *_stack(args))
        batched = to_np(batched_status)
        for b in range(BATCH):
            where = f"step {t} member {b} {reqs[b]!r}"
            jit_status, jit_applied = JITTED[preset](from_np(states[b]), *args[b])
            got = to_np(jit_status)
            assert_same_status_across_programs({name: batched[name][b] for name in FIELDS}, got, f"vmap vs jit, {where}")
            assert bool(np.asarray(batched_applied)[b]) == bool(jit_applied), where
            if b == t % BATCH:
                plain_status, plain_applied = apply_plain(from_np(states[b]), reqs[b], gates)
                assert_same_status_across_programs(to_np(plain_status), got, f"plain vs jit, {where}")
                assert bool(jit_applied) == (True if plain_applied is None else bool(plain_applied)), where
            check_transition(states[b], got, reqs[b], None if reqs[b].kind in ("tick", "record") else jit_applied, gates)
            states[b] = got


# ============================================================================== unit tests

DEFAULT = GateConfig()
TEMPO_5 = blending.tempo_index(5)
LINEAR = blending.blend_style_index("linear")
S3 = 3


def ok(result) -> SlotStatus:
    status, applied = result
    assert bool(applied), "request was refused"
    return status


def refused(status: SlotStatus, result) -> SlotStatus:
    new, applied = result
    assert not bool(applied), "request was applied"
    assert_state_bits_equal(to_np(status), to_np(new), "refused request")
    return new


def stage(status: SlotStatus, k: int = 0) -> Stage:
    return Stage(int(status.stage[k]))


def value(status: SlotStatus, name: str, k: int = 0):
    return np.asarray(getattr(status, name))[k]


def healthy(status: SlotStatus, **overrides) -> SlotStatus:
    """Record the measurements of a good epoch (overrides: a scalar for every slot)."""
    n = status.num_slots
    values = dict(seed_grad_norm=1.0, host_grad_norm=1.0, improvement=1.0) | overrides
    return lifecycle.record_measurements(status, **{k: np.full(n, v, np.float32) for k, v in values.items()})


def ticks(status: SlotStatus, n: int, gates: GateConfig, **record) -> SlotStatus:
    for _ in range(n):
        status = lifecycle.tick(healthy(status, **record) if record else status, gates)
    return status


def to_training(gates=DEFAULT, num_slots=1, slot=0, tempo=TEMPO_5, style=LINEAR) -> SlotStatus:
    s = ok(lifecycle.germinate(lifecycle.init_status(num_slots), slot, 1, style, tempo, NUM_BLUEPRINTS, gates))
    return ok(lifecycle.advance(s, slot, gates))


def to_blending(gates=DEFAULT, **kw) -> SlotStatus:
    fast = dataclasses.replace(gates, min_training_epochs=0)
    s = healthy(to_training(fast, **kw))
    return ok(lifecycle.advance(s, kw.get("slot", 0), fast))


def to_holding(gates=DEFAULT, **kw) -> SlotStatus:
    s = to_blending(gates, **kw)
    s = ticks(s, int(s.alpha_steps[kw.get("slot", 0)]), gates)
    return ok(lifecycle.advance(s, kw.get("slot", 0), gates))


def test_transition_table_is_esper_lifecycle():
    T = lifecycle.TRANSITIONS
    assert set(T) == set(Stage)
    assert T[Stage.FOSSILIZED] == frozenset(), "FOSSILIZED is terminal"
    for live in lifecycle.LIVE_STAGES:
        assert Stage.PRUNED in T[live], f"a {live.name} seed can be pruned"
    for src, dst in lifecycle.HAPPY_PATH.items():
        assert dst in T[src]
    # the matrix the jitted code uses is the table
    for src in Stage:
        for dst in Stage:
            assert bool(lifecycle.is_valid_transition(int(src), int(dst))) == (dst in T[src])
    # every stage is reachable from DORMANT, and every non-terminal stage leads back to DORMANT
    def reachable(start):
        seen, todo = {start}, [start]
        while todo:
            for nxt in T[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen
    assert reachable(Stage.DORMANT) == set(Stage)
    for s in Stage:
        if s != Stage.FOSSILIZED:
            assert Stage.DORMANT in reachable(s) or s == Stage.DORMANT
    # a pruned seed only goes, one stage at a time, through the cool-down back to DORMANT
    path, current = [], Stage.PRUNED
    while current != Stage.DORMANT:
        (current,) = T[current]
        path.append(current)
    assert path == [Stage.EMBARGOED, Stage.RESETTING, Stage.DORMANT]


def test_fresh_status_has_the_types_of_later_ones_so_jit_compiles_once():
    fresh = lifecycle.init_status(S3)
    assert not any(leaf.weak_type for leaf in jax.tree.leaves(fresh))
    traces = []

    @jax.jit
    def step(s):
        traces.append(None)
        return lifecycle.tick(s, DEFAULT)

    s = step(fresh)
    s = step(ok(lifecycle.germinate(s, 0, 1, LINEAR, TEMPO_5, NUM_BLUEPRINTS, DEFAULT)))
    step(s)
    assert len(traces) == 1, "a fresh status must not trigger a second compilation"


def test_happy_path_dormant_to_fossilized():
    g = DEFAULT
    s = lifecycle.init_status(S3)
    s = ok(lifecycle.germinate(s, 1, 2, LINEAR, TEMPO_5, NUM_BLUEPRINTS, g))
    assert stage(s, 1) == Stage.GERMINATED and value(s, "blueprint", 1) == 2 and value(s, "tempo", 1) == 5
    s = refused(s, lifecycle.germinate(s, 1, 0, LINEAR, TEMPO_5, NUM_BLUEPRINTS, g))  # occupied
    s = ok(lifecycle.advance(s, 1, g))
    assert stage(s, 1) == Stage.TRAINING
    for epoch in range(g.min_training_epochs):
        s = refused(s, lifecycle.advance(s, 1, g))
        s = lifecycle.tick(healthy(s), g)
        assert stage(s, 1) == Stage.TRAINING and value(s, "epochs_in_stage", 1) == epoch + 1
    s = ok(lifecycle.advance(s, 1, g))
    assert stage(s, 1) == Stage.BLENDING
    assert (value(s, "alpha", 1), value(s, "alpha_start", 1), value(s, "alpha_target", 1)) == (0.0, 0.0, 1.0)
    assert value(s, "alpha_steps", 1) == 5
    alphas = []
    for _ in range(5):
        s = refused(s, lifecycle.advance(s, 1, g))
        s = lifecycle.tick(s, g)
        alphas.append(float(value(s, "alpha", 1)))
    np.testing.assert_allclose(alphas, [0.2, 0.4, 0.6, 0.8, 1.0], rtol=1e-6)  # linear curve
    assert alphas[-1] == 1.0
    s = ok(lifecycle.advance(s, 1, g))
    assert stage(s, 1) == Stage.HOLDING and value(s, "alpha", 1) == 1.0
    s = refused(s, lifecycle.fossilize(s, 1, g))  # nothing measured yet
    s = lifecycle.record_measurements(s, contribution=np.full(S3, 2.0, np.float32))
    s = refused(s, lifecycle.fossilize(s, 1, g))  # not held for min_holding_epochs yet
    s = lifecycle.tick(s, g)
    s = ok(lifecycle.fossilize(s, 1, g))
    assert stage(s, 1) == Stage.FOSSILIZED and value(s, "alpha", 1) == 1.0
    for _ in range(3):
        s = lifecycle.tick(healthy(s, contribution=-5.0), g)
        for request in (
            lifecycle.advance(s, 1, g), lifecycle.prune(s, 1, g), lifecycle.prune(s, 1, g, True),
            lifecycle.set_alpha_target(s, 1, 0.5, g), lifecycle.fossilize(s, 1, g),
            lifecycle.germinate(s, 1, 0, LINEAR, TEMPO_5, NUM_BLUEPRINTS, g),
        ):
            refused(s, request)
    assert stage(s, 1) == Stage.FOSSILIZED and value(s, "alpha", 1) == 1.0
    assert value(s, "seed_age", 1) == g.min_training_epochs + 5 + 1 + 3
    for k in (0, 2):  # the other slots never noticed
        for name in FIELDS:
            assert same_bits(value(s, name, k), BLANK[name]), name


@pytest.mark.parametrize("min_epochs", [0, 3, 10])
def test_g2_waits_for_min_training_epochs(min_epochs):
    g = GateConfig(min_training_epochs=min_epochs)
    s = healthy(to_training(g))
    for _ in range(min_epochs):
        s = refused(s, lifecycle.advance(s, 0, g))
        s = lifecycle.tick(s, g)
    assert stage(ok(lifecycle.advance(s, 0, g))) == Stage.BLENDING
    # with auto_advance the tick that completes the epochs moves it on, not earlier
    auto = dataclasses.replace(g, auto_advance=True)
    s = healthy(to_training(auto))
    for _ in range(min_epochs):
        assert stage(s) == Stage.TRAINING
        s = lifecycle.tick(s, auto)
    assert stage(s) == (Stage.TRAINING if min_epochs == 0 else Stage.BLENDING)


@pytest.mark.parametrize(
    "seed_norm, host_norm, require_healthy, passes",
    [
        (1.0, 1.0, True, True),
        (0.0, 1.0, True, False),        # no gradient reached the seed
        (1e4, 1.0, True, False),        # exploding
        (math.nan, 1.0, True, False),
        (math.inf, 1.0, True, False),
        (1.0, math.nan, True, False),   # the host diverged
        (0.0, 1.0, False, True),        # health checks off: a silent seed may blend
        (1e4, 1.0, False, True),
    ],
)
def test_g2_requires_healthy_gradients(seed_norm, host_norm, require_healthy, passes):
    g = GateConfig(min_training_epochs=2, require_healthy_gradients=require_healthy)
    s = ticks(to_training(g), 2, g, seed_grad_norm=seed_norm, host_grad_norm=host_norm)
    result = lifecycle.advance(s, 0, g)
    if passes:
        assert stage(ok(result)) == Stage.BLENDING
    else:
        refused(s, result)


def test_g2_before_any_measurement_is_refused():
    g = GateConfig(min_training_epochs=0)
    s = to_training(g)  # germination zeroes the gradient statistics: nothing says it learns
    refused(s, lifecycle.advance(s, 0, g))


@pytest.mark.parametrize("improvement, passes", [(0.49, False), (math.nan, False), (-1.0, False), (0.5, True), (3.0, True)])
def test_g2_strict_needs_min_improvement(improvement, passes):
    g = GateConfig.strict(min_training_epochs=1)
    s = ticks(to_training(g), 1, g, improvement=improvement)
    result = lifecycle.advance(s, 0, g)
    if passes:
        assert stage(ok(result)) == Stage.BLENDING
    else:
        refused(s, result)
    # the same measurements pass without strict mode
    plain = GateConfig(min_training_epochs=1)
    s = ticks(to_training(plain), 1, plain, improvement=improvement)
    ok(lifecycle.advance(s, 0, plain))


@pytest.mark.parametrize("tempo", blending.TEMPOS)
def test_g3_only_when_schedule_complete(tempo):
    g = DEFAULT
    s = to_blending(g, tempo=blending.tempo_index(tempo))
    for _ in range(tempo):
        s = refused(s, lifecycle.advance(s, 0, g))
        assert value(s, "alpha") < 1.0
        s = lifecycle.tick(s, g)
    assert value(s, "alpha") == 1.0 and value(s, "alpha_step") == tempo
    assert stage(ok(lifecycle.advance(s, 0, g))) == Stage.HOLDING
    auto = GateConfig(auto_advance=True)
    s = to_blending(auto, tempo=blending.tempo_index(tempo))
    for _ in range(tempo - 1):
        s = lifecycle.tick(s, auto)
        assert stage(s) == Stage.BLENDING
    s = lifecycle.tick(s, auto)
    assert stage(s) == Stage.HOLDING and value(s, "alpha") == 1.0


def test_g5_needs_a_measurement_taken_while_holding():
    g = DEFAULT
    s = to_blending(g)
    s = lifecycle.record_measurements(s, contribution=np.full(1, 3.0, np.float32))  # measured while BLENDING
    s = ticks(s, 5, g)
    s = ok(lifecycle.advance(s, 0, g))
    assert not value(s, "contribution_measured"), "entering HOLDING starts a fresh measurement"
    s = ticks(s, 2, g)
    refused(s, lifecycle.fossilize(s, 0, g))
    refused(s, lifecycle.advance(s, 0, g))


@pytest.mark.parametrize(
    "contribution, passes", [(1.0, True), (1e-6, True), (0.0, False), (-1.0, False), (math.nan, False), (-math.inf, False)]
)
def test_g5_needs_positive_contribution(contribution, passes):
    g = DEFAULT
    s = lifecycle.tick(to_holding(g), g)
    s = lifecycle.record_measurements(s, contribution=np.full(1, contribution, np.float32))
    if passes:
        assert stage(ok(lifecycle.fossilize(s, 0, g))) == Stage.FOSSILIZED
        assert stage(ok(lifecycle.advance(s, 0, g))) == Stage.FOSSILIZED  # advance goes through G5 as well
    else:
        refused(s, lifecycle.fossilize(s, 0, g))
        refused(s, lifecycle.advance(s, 0, g))


def test_g5_measured_but_not_for_measured_false():
    g = DEFAULT
    s = lifecycle.tick(to_holding(g), g)
    s = lifecycle.record_measurements(s, contribution=np.full(1, 2.0, np.float32), contribution_measured=np.zeros(1, bool))
    assert value(s, "contribution") == 0.0 and not value(s, "contribution_measured")
    refused(s, lifecycle.fossilize(s, 0, g))


@pytest.mark.parametrize("min_holding", [0, 1, 3])
def test_g5_waits_for_min_holding_epochs(min_holding):
    g = GateConfig(min_holding_epochs=min_holding)
    s = lifecycle.record_measurements(to_holding(g), contribution=np.full(1, 1.0, np.float32))
    for _ in range(min_holding):
        s = refused(s, lifecycle.fossilize(s, 0, g))
        s = lifecycle.tick(s, g)
    ok(lifecycle.fossilize(s, 0, g))


def test_g5_strict_min_contribution():
    g = GateConfig.strict()
    s = lifecycle.tick(to_holding(g), g)
    low = lifecycle.record_measurements(s, contribution=np.full(1, 0.4, np.float32))
    high = lifecycle.record_measurements(s, contribution=np.full(1, 0.6, np.float32))
    refused(low, lifecycle.fossilize(low, 0, g))
    high = refused(high, lifecycle.fossilize(high, 0, g))  # strict holds for two epochs
    ok(lifecycle.fossilize(lifecycle.tick(high, g), 0, g))


@pytest.mark.parametrize("embargo", [1, 5])
def test_ramped_prune_embargo_reset_and_regerminate(embargo):
    g = GateConfig(embargo_epochs=embargo)
    s = to_holding(g, num_slots=2, tempo=TEMPO_5)
    s = ok(lifecycle.prune(s, 0, g, True))
    assert stage(s) == Stage.HOLDING and value(s, "pruning") and value(s, "alpha") == 1.0
    for request in (lifecycle.advance(s, 0, g), lifecycle.fossilize(lifecycle.record_measurements(
            s, contribution=np.ones(2, np.float32)), 0, g), lifecycle.set_alpha_target(s, 0, 0.5, g),
            lifecycle.prune(s, 0, g), lifecycle.prune(s, 0, g, True)):
        assert not bool(request[1]), "a ramping seed takes no other request"
    alphas = [1.0]
    for _ in range(4):
        s = lifecycle.tick(s, g)
        assert stage(s) == Stage.HOLDING
        alphas.append(float(value(s, "alpha")))
    assert all(a > b > 0 for a, b in zip(alphas, alphas[1:])), alphas
    s = lifecycle.tick(s, g)
    assert stage(s) == Stage.PRUNED and value(s, "alpha") == 0.0 and not value(s, "pruning")
    s = lifecycle.tick(s, g)
    assert stage(s) == Stage.EMBARGOED
    for _ in range(embargo - 1):
        refused(s, lifecycle.germinate(s, 0, 0, LINEAR, TEMPO_5, NUM_BLUEPRINTS, g))
        s = lifecycle.tick(s, g)
        assert stage(s) == Stage.EMBARGOED
    s = lifecycle.tick(s, g)
    assert stage(s) == Stage.RESETTING
    refused(s, lifecycle.germinate(s, 0, 0, LINEAR, TEMPO_5, NUM_BLUEPRINTS, g))
    s = lifecycle.tick(s, g)
    assert stage(s) == Stage.DORMANT
    for name in FIELDS:
        assert same_bits(value(s, name), BLANK[name]), name
    s = ok(lifecycle.germinate(s, 0, 3, LINEAR, 0, NUM_BLUEPRINTS, g))
    assert stage(s) == Stage.GERMINATED and value(s, "blueprint") == 3 and value(s, "tempo") == blending.TEMPOS[0]
    assert stage(s, 1) == Stage.DORMANT


def test_ramped_prune_while_blending_starts_from_current_alpha():
    g = DEFAULT
    s = ticks(to_blending(g), 2, g)
    a = value(s, "alpha")
    assert 0.0 < a < 1.0
    s = ok(lifecycle.prune(s, 0, g, True))
    assert value(s, "alpha_start") == a and value(s, "alpha") == a and value(s, "alpha_target") == 0.0
    s = lifecycle.tick(s, g)
    assert 0.0 < value(s, "alpha") < a and stage(s) == Stage.BLENDING
    s = ticks(s, 4, g)
    assert stage(s) == Stage.PRUNED and value(s, "alpha") == 0.0


@pytest.mark.parametrize("where", ["germinated", "training", "blending", "holding"])
@pytest.mark.parametrize("ramp", [False, True])
def test_instant_prune(where, ramp):
    g = DEFAULT
    s = {
        "germinated": lambda: ok(lifecycle.germinate(lifecycle.init_status(1), 0, 1, LINEAR, TEMPO_5, NUM_BLUEPRINTS, g)),
        "training": lambda: to_training(g),
        "blending": lambda: to_blending(g),  # alpha still 0: nothing to ramp down
        "holding": lambda: lifecycle.record_measurements(to_holding(g), contribution=np.ones(1, np.float32)),
    }[where]()
    s = ok(lifecycle.prune(s, 0, g, ramp))
    if ramp and where == "holding":
        assert value(s, "pruning") and stage(s) == Stage.HOLDING
        return
    assert stage(s) == Stage.PRUNED
    assert value(s, "alpha") == 0.0 and not value(s, "pruning")
    assert value(s, "contribution") == 0.0 and not value(s, "contribution_measured")
    s = refused(s, lifecycle.prune(s, 0, g))
    assert stage(lifecycle.tick(s, g)) == Stage.EMBARGOED


def test_set_alpha_target_restarts_schedule_from_current_alpha():
    g = DEFAULT
    s = ticks(to_blending(g), 2, g)
    a = value(s, "alpha")
    np.testing.assert_allclose(a, 0.4, rtol=1e-6)
    s = ok(lifecycle.set_alpha_target(s, 0, 0.5, g))
    assert value(s, "alpha") == a and value(s, "alpha_start") == a and value(s, "alpha_target") == np.float32(0.5)
    assert value(s, "alpha_step") == 0 and value(s, "alpha_steps") == 5
    s = lifecycle.tick(s, g)
    np.testing.assert_allclose(value(s, "alpha"), 0.4 + 0.1 / 5, rtol=1e-6)
    s = refused(s, lifecycle.advance(s, 0, g))  # G3 waits for the new schedule
    s = ticks(s, 4, g)
    assert value(s, "alpha") == np.float32(0.5)
    s = ok(lifecycle.advance(s, 0, g))
    assert stage(s) == Stage.HOLDING and value(s, "alpha") == np.float32(0.5)
    # in HOLDING a new target moves alpha again (down this time), ending exactly on it
    s = ok(lifecycle.set_alpha_target(s, 0, 0.25, g))
    previous = value(s, "alpha")
    for _ in range(5):
        s = lifecycle.tick(s, g)
        assert value(s, "alpha") < previous
        previous = value(s, "alpha")
    assert value(s, "alpha") == np.float32(0.25) and stage(s) == Stage.HOLDING


@pytest.mark.parametrize("target", [math.nan, math.inf, -math.inf, 0.0, -0.1, 1.0 + 1e-6, 1.5])
def test_set_alpha_target_refuses_invalid_targets(target):
    g = DEFAULT
    s = ticks(to_blending(g), 1, g)
    refused(s, lifecycle.set_alpha_target(s, 0, target, g))


def test_set_alpha_target_refused_outside_blending_and_holding():
    g = DEFAULT
    s = to_training(g)
    refused(s, lifecycle.set_alpha_target(s, 0, 0.5, g))
    s = to_blending(g)
    refused(s, lifecycle.set_alpha_target(s, 0, 1.0, g))  # already the target


def test_auto_advance_off_tick_never_passes_gates():
    g = GateConfig(min_training_epochs=1, auto_advance=False)
    s = ok(lifecycle.germinate(lifecycle.init_status(1), 0, 1, LINEAR, 0, NUM_BLUEPRINTS, g))
    s = ticks(s, 6, g, contribution=1.0)
    assert stage(s) == Stage.GERMINATED
    s = ticks(ok(lifecycle.advance(s, 0, g)), 6, g, contribution=1.0)
    assert stage(s) == Stage.TRAINING
    s = ticks(ok(lifecycle.advance(s, 0, g)), 6, g, contribution=1.0)
    assert stage(s) == Stage.BLENDING and value(s, "alpha") == 1.0
    s = ticks(ok(lifecycle.advance(s, 0, g)), 3, g, contribution=1.0)
    assert stage(s) == Stage.HOLDING


def test_auto_advance_on_moves_one_stage_per_tick_and_never_fossilizes():
    g = GateConfig(min_training_epochs=0, auto_advance=True)
    s = healthy(ok(lifecycle.germinate(lifecycle.init_status(1), 0, 1, LINEAR, 0, NUM_BLUEPRINTS, g)))
    seen = []
    for _ in range(8):
        s = lifecycle.tick(healthy(s, contribution=1.0), g)
        seen.append(stage(s))
    # G1 then (same measurements, 0 epochs needed) G2 would both pass: still one stage per tick
    assert seen[:2] == [Stage.TRAINING, Stage.BLENDING]
    assert seen[2:5] == [Stage.BLENDING] * 2 + [Stage.HOLDING]  # tempo 3
    assert seen[5:] == [Stage.HOLDING] * 3, "fossilizing is never automatic"


@pytest.mark.parametrize("bad_slot", [-1, S3, 100])
def test_requests_on_missing_slots_are_refused(bad_slot):
    g = GateConfig.permissive()
    s = healthy(to_training(g, num_slots=S3, slot=0))
    for result in (
        lifecycle.germinate(s, bad_slot, 0, LINEAR, 0, NUM_BLUEPRINTS, g),
        lifecycle.advance(s, bad_slot, g),
        lifecycle.set_alpha_target(s, bad_slot, 0.5, g),
        lifecycle.prune(s, bad_slot, g),
        lifecycle.prune(s, bad_slot, g, True),
        lifecycle.fossilize(s, bad_slot, g),
    ):
        refused(s, result)


@pytest.mark.parametrize(
    "blueprint, style, tempo",
    [(-1, 0, 0), (NUM_BLUEPRINTS, 0, 0), (0, -1, 0), (0, len(blending.BLEND_STYLES), 0), (0, 0, -1),
     (0, 0, len(blending.TEMPOS))],
)
def test_germinate_refuses_out_of_range_choices(blueprint, style, tempo):
    s = lifecycle.init_status(2)
    refused(s, lifecycle.germinate(s, 1, blueprint, style, tempo, NUM_BLUEPRINTS, DEFAULT))


def test_record_measurements_only_touches_seeded_slots():
    g = DEFAULT
    s = to_training(g, num_slots=S3, slot=1)
    before = to_np(s)
    s = lifecycle.record_measurements(s, seed_grad_norm=np.array([5.0, 6.0, 7.0], np.float32))
    after = to_np(s)
    assert after["seed_grad_norm"].tolist() == [0.0, 6.0, 0.0]
    for name in FIELDS:
        if name != "seed_grad_norm":
            assert same_bits(before[name], after[name]), f"{name} changed although it was not given"
    s = lifecycle.record_measurements(s, contribution=np.array([1.0, -2.0, 3.0], np.float32))
    assert value(s, "contribution", 1) == -2.0 and value(s, "contribution_measured", 1)
    assert not value(s, "contribution_measured", 0) and not value(s, "contribution_measured", 2)


def test_fossilized_alpha_stays_where_it_was_even_mid_schedule():
    """A seed fossilized while a new alpha schedule was running keeps the alpha it had."""
    g = DEFAULT
    s = lifecycle.record_measurements(to_holding(g), contribution=np.ones(1, np.float32))
    s = lifecycle.tick(ok(lifecycle.set_alpha_target(s, 0, 0.5, g)), g)
    a = value(s, "alpha")
    assert 0.5 < a < 1.0 and value(s, "alpha_step") < value(s, "alpha_steps")
    s = ok(lifecycle.fossilize(s, 0, g))
    for _ in range(6):
        s = lifecycle.tick(healthy(s, contribution=2.0), g)
        assert stage(s) == Stage.FOSSILIZED and value(s, "alpha") == a
