"""Action masks and applying actions (:mod:`esper_jax.env.actions`), checked exhaustively.

Every combination of stages over a three-slot lattice (9^3 = 729 lattice states, the other
status fields drawn at random), crossed with every (op, slot) pair and random option heads,
goes through one ``jax.vmap`` of ``action_masks``/``apply_action``. The masks are compared
against an independent NumPy statement of Esper's rules, and every masked-out action must
leave the state bit for bit unchanged with ``applied`` False.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.lattice import blending
from esper_jax.env.actions import (
    ALPHA_TARGETS, HEADS, NUM_OPS, RELEVANT_HEADS, ActionConfig, ActionSpace, FactoredAction, Op, action_masks,
    apply_action,
)
from esper_jax.lattice.hosts import CNNHost
from esper_jax.lattice.lifecycle import GateConfig, Stage
from esper_jax.lattice.model import MorphogeneticModel

from tests.conftest import fresh_lattice_state

SLOTS = ("r0c0", "r0c1", "r1c0")
BLUEPRINTS = ("conv_small", "norm")
GATES = GateConfig()  # Esper's: G2 after 10 epochs with healthy gradients, G5 after one measured holding epoch
ACTIONS = ActionConfig()
SIX_OPS = [o for o in Op if o != Op.SEAL]  # the rig's action space (ActionConfig.seal off)
LIVE = (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING)
HAPPY_NEXT = {Stage.GERMINATED: Stage.TRAINING, Stage.TRAINING: Stage.BLENDING, Stage.BLENDING: Stage.HOLDING,
              Stage.HOLDING: Stage.FOSSILIZED}


@dataclasses.dataclass(frozen=True)
class Rig:
    lattice: object
    states: object       # LatticeState with a leading batch axis [B]
    status: dict         # the same statuses as NumPy arrays [B, S]
    masks: object        # ActionMasks of every state, NumPy leaves [B, ...]
    apply: object        # jitted vmap of apply_action over (state, action, key)
    is_valid: object     # jitted vmap of ActionMasks.is_valid


def _random_statuses(rng: np.random.Generator, stages: np.ndarray, num_blueprints: int) -> dict:
    """Statuses with the given stages; every other field random, including the edge values the
    rules look at (age 0 vs 1, epochs around the G2 threshold, schedules done or not,
    non-finite and out-of-range gradient norms)."""
    b, s = stages.shape
    occupied = stages != Stage.DORMANT
    tempo = rng.choice(blending.TEMPOS, (b, s)).astype(np.int32)
    steps = np.where(rng.random((b, s)) < 0.8, tempo, 0).astype(np.int32)
    return {
        "stage": stages.astype(np.int32),
        "blueprint": np.where(occupied, rng.integers(0, num_blueprints, (b, s)), -1).astype(np.int32),
        "blend_style": rng.integers(0, len(blending.BLEND_STYLES), (b, s)).astype(np.int32),
        "tempo": tempo,
        "alpha": np.where(rng.random((b, s)) < 0.3, 0.0, rng.random((b, s))).astype(np.float32),
        "alpha_start": rng.random((b, s)).astype(np.float32),
        "alpha_target": rng.choice((0.0,) + ALPHA_TARGETS, (b, s)).astype(np.float32),
        "alpha_step": rng.integers(0, 9, (b, s)).astype(np.int32),
        "alpha_steps": steps,
        "pruning": occupied & (rng.random((b, s)) < 0.25),
        "epochs_in_stage": rng.integers(0, 13, (b, s)).astype(np.int32),
        "seed_age": rng.integers(0, 3, (b, s)).astype(np.int32),
        "embargo": rng.integers(0, 6, (b, s)).astype(np.int32),
        "contribution": rng.normal(0.0, 0.05, (b, s)).astype(np.float32),
        "contribution_measured": rng.random((b, s)) < 0.7,
        "improvement": rng.normal(0.0, 1.0, (b, s)).astype(np.float32),
        "seed_grad_norm": rng.choice(np.asarray([0.0, 1e-9, 0.3, 2.0, 5e3, np.nan, np.inf], np.float32), (b, s)),
        "host_grad_norm": rng.choice(np.asarray([0.5, 1.0, np.nan], np.float32), (b, s), p=(0.45, 0.45, 0.1)),
    }


def reference_masks(st: dict, gates: GateConfig = GATES, config: ActionConfig = ACTIONS,
                    sealed: bool = False) -> np.ndarray:
    """Esper's rules, written independently of the lifecycle code: ``[B, num_ops, S]`` (with the
    SEAL op: neither germination nor a second SEAL once sealed)."""
    stage = st["stage"]
    live = np.isin(stage, LIVE)
    busy = np.isin(stage, (Stage.GERMINATED, Stage.TRAINING)).sum(axis=1, keepdims=True)
    germinate = (stage == Stage.DORMANT) & (busy < config.max_concurrent_training)
    g, h = st["seed_grad_norm"], st["host_grad_norm"]
    with np.errstate(invalid="ignore"):
        healthy = np.isfinite(g) & np.isfinite(h) & (g > gates.min_seed_grad_norm) & (g < gates.max_seed_grad_norm)
    g2 = (stage == Stage.TRAINING) & (st["epochs_in_stage"] >= gates.min_training_epochs) & healthy
    g3 = (stage == Stage.BLENDING) & ~st["pruning"] & (st["alpha_step"] >= st["alpha_steps"])
    g5 = ((stage == Stage.HOLDING) & ~st["pruning"] & st["contribution_measured"]
          & (st["contribution"] > gates.min_contribution) & (st["epochs_in_stage"] >= gates.min_holding_epochs))
    advance = (stage == Stage.GERMINATED) | g2 | g3 | g5
    set_alpha = np.isin(stage, (Stage.BLENDING, Stage.HOLDING)) & ~st["pruning"]
    prune = live & ~st["pruning"] & (st["seed_age"] >= config.min_prune_age)
    wait = np.ones_like(germinate)
    by_op = {Op.WAIT: wait, Op.GERMINATE: germinate & ~sealed, Op.ADVANCE: advance, Op.SET_ALPHA_TARGET: set_alpha,
             Op.PRUNE: prune, Op.FOSSILIZE: g5, Op.SEAL: wait & ~sealed}
    return np.stack([by_op[op] for op in Op if config.seal or op != Op.SEAL], axis=1)


@pytest.fixture(scope="module")
def rig() -> Rig:
    host = CNNHost(base_width=4, num_blocks=2, pool_blocks=1)
    model = MorphogeneticModel.build(host, SLOTS, GATES, blueprints=BLUEPRINTS)
    lattice = model.lattice
    stages = np.asarray(list(itertools.product(range(len(Stage)), repeat=len(SLOTS))), np.int32)
    status = _random_statuses(np.random.default_rng(0), stages, lattice.num_blueprints)
    # Seed parameters: random values (not zeros), so that a germination that re-initialized the
    # wrong slot, or a refused one that did anything, shows up in the bit-for-bit comparisons.
    template = fresh_lattice_state(model)
    prng = np.random.default_rng(1)
    batch = lambda a: jax.device_put(prng.standard_normal((len(stages),) + a.shape).astype(a.dtype)
                                     if np.issubdtype(a.dtype, np.floating) else np.broadcast_to(a, (len(stages),) + a.shape))
    states = jax.tree.map(lambda a: batch(np.asarray(a)), template)
    states = states.replace(status=states.status.replace(**{k: jax.device_put(v) for k, v in status.items()}))
    masks = jax.jit(jax.vmap(lambda s: action_masks(lattice, s, ACTIONS)))(states)
    apply = jax.jit(jax.vmap(lambda s, a, k: apply_action(lattice, s, a, k, ACTIONS)))
    is_valid = jax.jit(jax.vmap(lambda m, a: m.is_valid(a)))
    return Rig(lattice, states, status, jax.tree.map(np.asarray, masks), apply, is_valid)


def _actions(rng: np.random.Generator, n: int, op: int, slot: int, out_of_range: bool = False) -> FactoredAction:
    space = ActionSpace(len(SLOTS), len(BLUEPRINTS))
    sizes = space.head_sizes()
    draw = lambda head: rng.integers(-1 if out_of_range else 0, sizes[head] + (1 if out_of_range else 0), n)
    return FactoredAction(*(jnp.asarray(np.full(n, v) if np.isscalar(v) else v, jnp.int32) for v in (
        op, slot, draw("blueprint"), draw("blend"), draw("tempo"), draw("alpha_target"))))


def _bits(a: np.ndarray) -> np.ndarray:
    """Per-row raw bytes, so that NaN == NaN and -0.0 != 0.0 (bit for bit)."""
    a = np.ascontiguousarray(a)
    return a.reshape(a.shape[0], -1).view(np.uint8) if a.ndim > 1 else a.reshape(-1, 1).view(np.uint8)


def _unchanged_rows(before, after) -> np.ndarray:
    """Per batch row: is every leaf of ``after`` bit-for-bit equal to ``before``?"""
    same = None
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        rows = np.all(_bits(x) == _bits(y), axis=1)
        same = rows if same is None else same & rows
    return same


# ---------------------------------------------------------------------------- masks


def test_masks_follow_esper_rules_for_every_stage_combination(rig):
    expected = reference_masks(rig.status)
    assert rig.masks.slot_given_op.shape == expected.shape
    for op in SIX_OPS:
        np.testing.assert_array_equal(rig.masks.slot_given_op[:, op], expected[:, op], err_msg=f"{op.name} mask")
    np.testing.assert_array_equal(rig.masks.op, expected.any(axis=2))
    # The cases the rules single out are all present in the drawn states (so the comparison above
    # exercised them both ways).
    germ = expected[:, Op.GERMINATE]
    dormant_but_blocked = (rig.status["stage"] == Stage.DORMANT) & ~germ
    assert germ.any() and dormant_but_blocked.any()
    for op in (Op.ADVANCE, Op.SET_ALPHA_TARGET, Op.PRUNE, Op.FOSSILIZE):
        assert expected[:, op].any() and not expected[:, op].all(), op.name


def test_wait_is_always_valid_and_option_heads_are_open(rig):
    assert rig.masks.op[:, Op.WAIT].all() and rig.masks.slot_given_op[:, Op.WAIT].all()
    for head in ("blueprint", "blend", "tempo", "alpha_target"):
        assert getattr(rig.masks, head).all(), head


def test_germinate_only_into_dormant_slot_while_no_seed_is_germinated_or_training(rig):
    germ, stage = rig.masks.slot_given_op[:, Op.GERMINATE], rig.status["stage"]
    assert np.all(stage[germ] == Stage.DORMANT)
    busy = np.isin(stage, (Stage.GERMINATED, Stage.TRAINING)).any(axis=1)
    assert not germ[busy].any()
    # and where nothing is busy, every DORMANT slot may be germinated
    np.testing.assert_array_equal(germ[~busy], stage[~busy] == Stage.DORMANT)


def test_fossilize_only_from_holding_with_g5(rig):
    fossil, st = rig.masks.slot_given_op[:, Op.FOSSILIZE], rig.status
    assert fossil.any()
    assert np.all(st["stage"][fossil] == Stage.HOLDING)
    assert np.all(st["contribution_measured"][fossil]) and np.all(st["contribution"][fossil] > 0)
    assert not st["pruning"][fossil].any()
    holding_positive = (st["stage"] == Stage.HOLDING) & st["contribution_measured"] & (st["contribution"] > 0)
    assert (holding_positive & ~fossil).any()  # some HOLDING seeds fail G5 on other grounds (age, pruning)


def test_prune_only_a_live_seed_past_min_age(rig):
    prune, st = rig.masks.slot_given_op[:, Op.PRUNE], rig.status
    assert np.all(np.isin(st["stage"][prune], LIVE))
    assert np.all(st["seed_age"][prune] >= ACTIONS.min_prune_age)
    young_live = np.isin(st["stage"], LIVE) & (st["seed_age"] < ACTIONS.min_prune_age)
    assert young_live.any() and not prune[young_live].any()


def test_max_concurrent_training_is_a_parameter(rig):
    """With two concurrent seeds allowed, one GERMINATED/TRAINING seed no longer blocks
    germination into the DORMANT slots; two do."""
    config = ActionConfig(max_concurrent_training=2)
    masks = jax.jit(jax.vmap(lambda s: action_masks(rig.lattice, s, config)))(rig.states)
    got = np.asarray(masks.slot_given_op)[:, Op.GERMINATE]
    np.testing.assert_array_equal(got, reference_masks(rig.status, config=config)[:, Op.GERMINATE])
    busy = np.isin(rig.status["stage"], (Stage.GERMINATED, Stage.TRAINING)).sum(axis=1)
    one_busy = (busy == 1) & (rig.status["stage"] == Stage.DORMANT).any(axis=1)
    assert one_busy.any() and got[one_busy].any(axis=1).all()
    assert not rig.masks.slot_given_op[one_busy, Op.GERMINATE].any()  # the default allows one
    assert not got[busy >= 2].any()


# ---------------------------------------------------------------------------- applying


@pytest.mark.parametrize("op", SIX_OPS, ids=[o.name for o in SIX_OPS])
def test_masked_out_actions_are_never_applied_and_valid_ones_are(rig, op):
    rng = np.random.default_rng(100 + op)
    n = len(rig.status["stage"])
    keys = jax.random.split(jax.random.key(op), n)
    before_status = rig.status
    for slot in range(len(SLOTS)):
        action = _actions(rng, n, op, slot)
        valid = np.asarray(rig.is_valid(jax.tree.map(jnp.asarray, rig.masks), action))
        expected_valid = rig.masks.slot_given_op[:, op, slot]
        np.testing.assert_array_equal(valid, expected_valid)
        new, applied = jax.tree.map(np.asarray, rig.apply(rig.states, action, keys))
        unchanged = _unchanged_rows(rig.states, new)
        # masked out: nothing changes, bit for bit, and ``applied`` says so
        assert not applied[~valid].any()
        assert unchanged[~valid].all()
        # valid: applied (SET_ALPHA_TARGET to the target already set is a valid no-op)
        if op == Op.SET_ALPHA_TARGET:
            same_target = np.isclose(before_status["alpha_target"][:, slot],
                                     np.asarray(ALPHA_TARGETS)[np.asarray(action.alpha_target)])
            np.testing.assert_array_equal(applied[valid], ~same_target[valid])
        else:
            assert applied[valid].all()
        if op != Op.WAIT:
            assert not unchanged[applied].any()  # an applied request changed something
        else:
            assert unchanged.all()
        _check_effect(op, slot, before_status, new.status, applied, np.asarray(action.blueprint))
        # other slots' status never changes
        others = [s for s in range(len(SLOTS)) if s != slot]
        for name, value in before_status.items():
            a, b = value[:, others], np.asarray(getattr(new.status, name))[:, others]
            np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=f"{op.name} at slot {slot} changed {name} elsewhere")
        # seed parameters of other slots never change; germination re-initializes only its slot
        for s in others:
            assert _unchanged_rows(rig.states.params[s], new.params[s]).all()
        if op == Op.GERMINATE:
            assert not _unchanged_rows(rig.states.params[slot], new.params[slot])[applied].any()


def _check_effect(op, slot, before, after_status, applied, blueprint):
    stage_before = before["stage"][applied, slot]
    stage_after = np.asarray(after_status.stage)[applied, slot]
    if op == Op.GERMINATE:
        assert np.all(stage_after == Stage.GERMINATED)
        np.testing.assert_array_equal(np.asarray(after_status.blueprint)[applied, slot], blueprint[applied])
    elif op == Op.ADVANCE:
        np.testing.assert_array_equal(stage_after, [HAPPY_NEXT[Stage(s)] for s in stage_before])
    elif op == Op.FOSSILIZE:
        assert np.all(stage_after == Stage.FOSSILIZED)
    elif op == Op.PRUNE:
        ramped = before["alpha"][applied, slot] > 0  # ActionConfig.ramped_prune: blended seeds ramp down
        assert np.all(np.asarray(after_status.pruning)[applied, slot][ramped])
        np.testing.assert_array_equal(stage_after[ramped], stage_before[ramped])
        assert np.all(stage_after[~ramped] == Stage.PRUNED)


def test_out_of_range_indices_are_refused(rig):
    """Indices outside a head (negative, or past its size) make an action invalid, never clipped
    into some other slot or blueprint."""
    rng = np.random.default_rng(7)
    n = len(rig.status["stage"])
    keys = jax.random.split(jax.random.key(7), n)
    masks = jax.tree.map(jnp.asarray, rig.masks)
    space = ActionSpace(len(SLOTS), len(BLUEPRINTS)).head_sizes()
    for op in (-1, Op.SEAL, NUM_OPS, NUM_OPS + 3):  # SEAL is out of range without ActionConfig.seal
        action = _actions(rng, n, op, 0)
        assert not np.asarray(rig.is_valid(masks, action)).any()
        new, applied = rig.apply(rig.states, action, keys)
        assert not np.asarray(applied).any() and _unchanged_rows(rig.states, new).all()
    for op in (Op.GERMINATE, Op.PRUNE, Op.SET_ALPHA_TARGET):
        for slot in (-1, len(SLOTS)):
            action = _actions(rng, n, op, slot)
            assert not np.asarray(rig.is_valid(masks, action)).any()
            new, applied = rig.apply(rig.states, action, keys)
            assert not np.asarray(applied).any() and _unchanged_rows(rig.states, new).all()
    # germinate with an option head out of range, into a slot where the mask allows germination
    for head in ("blueprint", "blend", "tempo"):
        slot = 0
        action = _actions(rng, n, Op.GERMINATE, slot)
        bad = np.where(rng.random(n) < 0.5, -1, space[head])
        action = action.replace(**{head: jnp.asarray(bad, jnp.int32)})
        assert not np.asarray(rig.is_valid(masks, action)).any()
        new, applied = rig.apply(rig.states, action, keys)
        assert not np.asarray(applied).any() and _unchanged_rows(rig.states, new).all()


def test_relevant_heads_cover_every_op():
    assert set(RELEVANT_HEADS) == set(Op)
    for op, heads in RELEVANT_HEADS.items():
        assert heads[0] == "op" and set(heads) <= set(HEADS)
    assert "slot" not in RELEVANT_HEADS[Op.WAIT]
    assert set(RELEVANT_HEADS[Op.GERMINATE]) >= {"slot", "blueprint", "blend", "tempo"}


# ---------------------------------------------------------------------------- SEAL


def test_seal_is_an_option_that_ends_germination_and_nothing_else(rig):
    """With ``ActionConfig.seal`` the op head has a seventh op. Unsealed, the six ops' masks are
    the rig's (Esper's rules) and SEAL is valid everywhere; sealed, germination and SEAL are
    masked out and every other op keeps its mask. Applying SEAL leaves the lattice bit for bit
    as it was (the environment records it); a germination requested while sealed is refused."""
    assert ActionSpace.for_lattice(rig.lattice).head_sizes()["op"] == len(SIX_OPS)
    config = dataclasses.replace(ACTIONS, seal=True)
    assert ActionSpace.for_lattice(rig.lattice, config).head_sizes()["op"] == NUM_OPS
    n = len(rig.status["stage"])
    masks_of = jax.jit(jax.vmap(lambda s, sealed: action_masks(rig.lattice, s, config, sealed)))
    apply = jax.jit(jax.vmap(lambda s, a, k, sealed: apply_action(rig.lattice, s, a, k, config, sealed)))
    keys = jax.random.split(jax.random.key(3), n)
    rng = np.random.default_rng(3)
    for sealed in (False, True):
        flags = jnp.full((n,), sealed)
        masks = jax.tree.map(np.asarray, masks_of(rig.states, flags))
        expected = reference_masks(rig.status, config=config, sealed=sealed)
        assert masks.slot_given_op.shape == expected.shape == (n, NUM_OPS, len(SLOTS))
        np.testing.assert_array_equal(masks.slot_given_op, expected)
        np.testing.assert_array_equal(masks.op, expected.any(axis=2))
        # unsealed, the six ops are the rig's; sealed, only germination changed
        same = SIX_OPS if not sealed else [o for o in SIX_OPS if o != Op.GERMINATE]
        np.testing.assert_array_equal(masks.slot_given_op[:, same], rig.masks.slot_given_op[:, same])
        assert masks.op[:, Op.SEAL].all() != sealed and masks.slot_given_op[:, Op.GERMINATE].any() != sealed
        new, applied = jax.tree.map(np.asarray, apply(rig.states, _actions(rng, n, Op.SEAL, 0), keys, flags))
        np.testing.assert_array_equal(applied, np.full(n, not sealed))
        assert _unchanged_rows(rig.states, new).all()
        germinate = _actions(rng, n, Op.GERMINATE, 0)
        new, applied = jax.tree.map(np.asarray, apply(rig.states, germinate, keys, flags))
        could = rig.masks.slot_given_op[:, Op.GERMINATE, 0]
        assert could.any()
        np.testing.assert_array_equal(applied, could & (not sealed))
        assert _unchanged_rows(rig.states, new)[~applied].all()
