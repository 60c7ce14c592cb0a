"""Rule-based controllers (:mod:`esper_jax.env.controllers`) on the tiny environment of ``env_rig``.

Each controller is jitted and vmapped over the population, drives a short episode through the
compiled population step (shared with ``test_env.py``), and must only ever take actions the
masks allow. The heuristic's decisions are checked on constructed states.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from esper_jax.lattice import blending
from esper_jax.env.actions import Op, action_masks
from esper_jax.env.controllers import (
    CONTROLLERS, HeuristicConfig, make_controller, make_heuristic_controller, make_random_controller,
)
from esper_jax.lattice.lifecycle import TRANSITIONS, Stage
from esper_jax.env.observations import LOSS_HISTORY

from tests.env_rig import POPULATION, member, stack_members, tiny_env

EPISODE = 14  # past EPISODE_EPOCHS on purpose: the env keeps stepping, and a seed can get through its life


@pytest.fixture(scope="module")
def tiny():
    return tiny_env()


@pytest.fixture(scope="module")
def fresh(tiny):
    return tiny.population_reset(tiny.keys(0, 1), tiny.data)[1]


@pytest.fixture(scope="module")
def masks_of(tiny):
    env = tiny.env
    return jax.jit(jax.vmap(lambda s: action_masks(env.lattice, s.train.lattice, env.config.actions)))


@pytest.fixture(scope="module")
def is_valid():
    return jax.jit(jax.vmap(lambda m, a: m.is_valid(a)))


def run_episode(tiny, controller, fresh, masks_of, is_valid, seed: int):
    """Drive ``EPISODE`` steps; check every action against the masks. Returns the per-step
    (state before, action, info) and the final state."""
    policy = jax.jit(jax.vmap(controller))
    state, trace = fresh, []
    for t in range(EPISODE):
        keys = jax.random.split(jax.random.key(1000 * seed + t), 2 * POPULATION)
        action = policy(keys[:POPULATION], state)
        assert all(np.asarray(a).shape == (POPULATION,) for a in jax.tree.leaves(action))
        valid = np.asarray(is_valid(masks_of(state), action))
        assert valid.all(), f"step {t}: invalid action {jax.tree.map(np.asarray, action)}"
        obs, new, reward, done, info = tiny.population_step(keys[POPULATION:], state, action, tiny.data)
        applied, op = np.asarray(info["applied"]), np.asarray(action.op)
        # a valid action is applied (a SET_ALPHA_TARGET to the target already set is a valid no-op)
        assert applied[op != Op.SET_ALPHA_TARGET].all(), f"step {t}: valid action refused"
        assert np.all(np.isfinite(np.asarray(obs))) and np.all(np.isfinite(np.asarray(reward)))
        trace.append((state, jax.tree.map(np.asarray, action), info))
        state = new
    return trace, state


@pytest.mark.parametrize("name", CONTROLLERS)
def test_controller_is_jittable_vmappable_and_only_takes_valid_actions(tiny, fresh, masks_of, is_valid, name):
    controller = make_controller(name, tiny.env)
    trace, final = run_episode(tiny, controller, fresh, masks_of, is_valid, seed=CONTROLLERS.index(name))
    ops = np.stack([a.op for _, a, _ in trace])
    if name == "static":
        assert np.all(ops == Op.WAIT)
    if name == "random":
        # it explores: more than one op, and it grows something
        assert len(np.unique(ops)) > 1 and np.asarray(final.germinated).sum() > 0
    # vmapped == one member at a time (jit of the unbatched controller)
    single = jax.jit(controller)
    state, action, _ = trace[EPISODE // 2]
    keys = jax.random.split(jax.random.key(5), POPULATION)
    batched = jax.jit(jax.vmap(controller))(keys, state)
    for i in range(POPULATION):
        one = single(keys[i], member(state, i))
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(batched)):
            assert int(a) == int(np.asarray(b)[i])


def test_static_controller_never_changes_the_lattice(tiny, fresh, masks_of, is_valid):
    trace, final = run_episode(tiny, make_controller("static", tiny.env), fresh, masks_of, is_valid, seed=7)
    # the lattice is exactly as reset made it: status and every seed parameter and moment
    for a, b in zip(jax.tree.leaves(fresh.train.lattice), jax.tree.leaves(final.train.lattice)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for counts in (final.germinated, final.fossilized, final.pruned):
        assert not np.asarray(counts).any()
    assert all(not np.asarray(info["added_params"]).any() for _, _, info in trace)
    # while the host itself trained
    assert not np.array_equal(np.asarray(fresh.train.host_params["classifier"]["w"]),
                              np.asarray(final.train.host_params["classifier"]["w"]))


def test_heuristic_episode_takes_a_seed_through_its_whole_life(tiny, fresh, masks_of, is_valid):
    """With a short warmup and a coarse plateau test, the heuristic germinates, advances through
    every gate (G2 after 2 epochs here) and then fossilizes or prunes the seed, every action
    valid and applied, every stage change one of the lifecycle's transitions."""
    config = HeuristicConfig(warmup_epochs=2, plateau_min_delta=0.05, tempo_epochs=3)
    trace, final = run_episode(tiny, make_heuristic_controller(tiny.env, config), fresh, masks_of, is_valid, seed=3)
    states = [s for s, _, _ in trace] + [final]
    stages = np.stack([np.asarray(s.train.lattice.status.stage)[:, 0] for s in states])  # [T + 1, P]
    for (before, action, info), t in zip(trace, range(EPISODE)):
        assert np.asarray(info["applied"]).all()
        for i in range(POPULATION):
            if stages[t + 1, i] != stages[t, i]:
                assert Stage(stages[t + 1, i]) in TRANSITIONS[Stage(stages[t, i])], (t, i, stages[:, i])
            if action.op[i] == Op.GERMINATE:
                assert int(np.asarray(before.epoch)[i]) >= config.warmup_epochs
            if action.op[i] == Op.FOSSILIZE:
                assert np.asarray(before.train.lattice.status.contribution)[i, 0] > 0
    for i in range(POPULATION):
        assert Stage.HOLDING in stages[:, i], stages[:, i]
        assert stages[-1, i] in (Stage.FOSSILIZED, Stage.PRUNED, Stage.EMBARGOED, Stage.RESETTING, Stage.DORMANT)
    fossilized = stages[-1] == Stage.FOSSILIZED
    np.testing.assert_array_equal(np.asarray(final.fossilized)[:, 0], fossilized.astype(int))
    np.testing.assert_array_equal(np.asarray(final.pruned)[:, 0], (~fossilized).astype(int))


# ---------------------------------------------------------------------------- constructed states


def _construct(tiny, fresh, *, epoch=6, history=None, germinated=None, **slot0):
    """Member 0 of a fresh state with the given epoch, loss history, germination counts and
    slot-0 status fields (values for the one slot)."""
    state = member(fresh, 0)
    status = state.train.lattice.status
    if slot0:
        stage = slot0.get("stage", Stage.DORMANT)
        defaults = {"blueprint": 0 if stage != Stage.DORMANT else -1, "seed_age": 4, "tempo": 5}
        fields = {**defaults, **slot0}
        status = status.replace(**{
            k: jax.device_put(np.full(np.shape(getattr(status, k)), v, np.asarray(getattr(status, k)).dtype))
            for k, v in fields.items()})
    history = np.full(LOSS_HISTORY, 2.0, np.float32) if history is None else np.asarray(history, np.float32)
    counts = np.zeros(tiny.env.lattice.num_blueprints, np.int32) if germinated is None else np.asarray(germinated, np.int32)
    return state.replace(
        epoch=jax.device_put(np.int32(epoch)), loss_history=jax.device_put(history), germinated=jax.device_put(counts),
        train=state.train.replace(lattice=state.train.lattice.replace(status=status)))


@pytest.fixture(scope="module")
def heuristic(tiny):
    return jax.jit(make_heuristic_controller(tiny.env))


@pytest.fixture(scope="module")
def masks_one(tiny):
    env = tiny.env
    return jax.jit(lambda s: action_masks(env.lattice, s.train.lattice, env.config.actions))


def _decide(heuristic, masks_one, state):
    action = heuristic(jax.random.key(0), state)
    assert bool(masks_one(state).is_valid(action)), "the heuristic took an invalid action"
    return jax.tree.map(int, action)


def test_heuristic_germinates_after_warmup_on_a_plateau(tiny, fresh, heuristic, masks_one):
    config = HeuristicConfig.scaled(tiny.env.lattice.gates)  # the timing the heuristic fixture runs with
    lattice = tiny.env.lattice
    flat = np.full(LOSS_HISTORY, 2.0)
    falling = 2.5 - 0.1 * np.arange(LOSS_HISTORY)
    act = _decide(heuristic, masks_one, _construct(tiny, fresh, epoch=config.warmup_epochs, history=flat))
    assert act.op == Op.GERMINATE and act.slot == 0
    assert act.blueprint == lattice.blueprint_index("conv_small")  # first in the rotation
    assert act.blend == blending.blend_style_index(config.blend_style)
    assert act.tempo == blending.tempo_index(config.tempo_epochs)
    # the rotation moves on with every germination
    act = _decide(heuristic, masks_one, _construct(tiny, fresh, history=flat, germinated=[1, 0]))
    assert act.op == Op.GERMINATE and act.blueprint == lattice.blueprint_index("norm")
    act = _decide(heuristic, masks_one, _construct(tiny, fresh, history=flat, germinated=[1, 1]))
    assert act.blueprint == lattice.blueprint_index("conv_small")
    # not during warmup, not while the loss is still falling
    assert _decide(heuristic, masks_one, _construct(tiny, fresh, epoch=config.warmup_epochs - 1, history=flat)).op == Op.WAIT
    assert _decide(heuristic, masks_one, _construct(tiny, fresh, history=falling)).op == Op.WAIT
    # a drop smaller than plateau_min_delta is still a plateau
    nearly_flat = flat - np.asarray([0, 0, 0.001, 0.002, 0.003])
    assert _decide(heuristic, masks_one, _construct(tiny, fresh, history=nearly_flat)).op == Op.GERMINATE


def test_heuristic_fossilizes_a_holding_seed_with_positive_contribution(tiny, fresh, heuristic, masks_one):
    holding = dict(stage=Stage.HOLDING, alpha=1.0, alpha_target=1.0, contribution_measured=True, epochs_in_stage=1)
    act = _decide(heuristic, masks_one, _construct(tiny, fresh, contribution=0.05, **holding))
    assert act.op == Op.FOSSILIZE and act.slot == 0
    # not measured yet: it waits (HOLDING leaves only by FOSSILIZE or PRUNE)
    act = _decide(heuristic, masks_one, _construct(tiny, fresh, contribution=0.05, **{**holding, "contribution_measured": False}))
    assert act.op == Op.WAIT
    # a seed that hurts is pruned once it is old enough, and left alone before
    age = HeuristicConfig.scaled(tiny.env.lattice.gates).min_epochs_before_prune
    hurts = dict(holding, contribution=-0.05, epochs_in_stage=age)
    assert _decide(heuristic, masks_one, _construct(tiny, fresh, **hurts)).op == Op.PRUNE
    assert _decide(heuristic, masks_one, _construct(tiny, fresh, **{**hurts, "epochs_in_stage": age - 1})).op == Op.WAIT


def test_heuristic_advances_through_passing_gates(tiny, fresh, heuristic, masks_one):
    gates = tiny.env.lattice.gates
    act = _decide(heuristic, masks_one, _construct(tiny, fresh, stage=Stage.GERMINATED, seed_age=1))
    assert act.op == Op.ADVANCE
    training = dict(stage=Stage.TRAINING, seed_grad_norm=0.5, host_grad_norm=0.5, improvement=0.0)
    act = _decide(heuristic, masks_one, _construct(tiny, fresh, epochs_in_stage=gates.min_training_epochs, **training))
    assert act.op == Op.ADVANCE
    # before G2, or with dead gradients, it waits
    assert _decide(heuristic, masks_one, _construct(tiny, fresh, epochs_in_stage=0, **training)).op == Op.WAIT
    dead = dict(training, seed_grad_norm=0.0)
    assert _decide(heuristic, masks_one, _construct(tiny, fresh, epochs_in_stage=gates.min_training_epochs, **dead)).op == Op.WAIT
    # a training seed far behind since germination is pruned
    age = HeuristicConfig.scaled(tiny.env.lattice.gates).min_epochs_before_prune
    lagging = dict(training, improvement=-5.0, epochs_in_stage=age)
    assert _decide(heuristic, masks_one, _construct(tiny, fresh, **lagging)).op == Op.PRUNE


def test_random_controller_is_uniform_over_valid_ops(tiny, fresh, masks_one):
    """From a HOLDING seed that passes G5, the valid ops are WAIT, ADVANCE, SET_ALPHA_TARGET,
    PRUNE and FOSSILIZE (GERMINATE needs a free slot): each is drawn about a fifth of the time."""
    state = _construct(tiny, fresh, stage=Stage.HOLDING, alpha=1.0, alpha_target=1.0, contribution_measured=True,
                       contribution=0.05, epochs_in_stage=1)
    masks = masks_one(state)
    expected = np.asarray(masks.op)
    assert expected.sum() == 5 and not expected[Op.GERMINATE]
    draws = 2000
    sample = jax.jit(jax.vmap(make_random_controller(tiny.env), in_axes=(0, None)))
    actions = sample(jax.random.split(jax.random.key(9), draws), state)
    valid = jax.jit(jax.vmap(lambda a: masks.is_valid(a)))(actions)
    assert np.asarray(valid).all()
    counts = np.bincount(np.asarray(actions.op), minlength=tiny.env.action_space.num_ops)
    assert counts[~expected].sum() == 0
    # binomial(2000, 0.2): standard deviation ~18 draws; allow ~4.5 of them
    assert np.all(np.abs(counts[expected] - draws / 5) < 80), counts
    # the option heads are uniform too (every alpha target and blueprint shows up)
    assert len(np.unique(np.asarray(actions.alpha_target))) == 3
    assert len(np.unique(np.asarray(actions.blueprint))) == tiny.env.lattice.num_blueprints


def test_unknown_controller_is_rejected(tiny):
    with pytest.raises(ValueError, match="heuristic, random, static"):
        make_controller("greedy", tiny.env)
