"""An episode's training compute from its timelines (esper_jax.runs.compute), on hand-made
timelines and costs: nothing is compiled."""

from __future__ import annotations

import numpy as np

from esper_jax.env.actions import Op
from esper_jax.lattice.flops import ModelCosts
from esper_jax.lattice.lifecycle import Stage
from esper_jax.runs import compute as cp

D, G, T, B, H, F, P, E = (int(s) for s in (Stage.DORMANT, Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING,
                                           Stage.HOLDING, Stage.FOSSILIZED, Stage.PRUNED, Stage.EMBARGOED))
COSTS = ModelCosts(host_train=100.0, host_eval=1000.0, seed_train=np.array([[0.0, 10.0], [0.0, 20.0]]),
                   seed_eval=np.array([[0.0, 50.0], [0.0, 70.0]]))


def test_compute_by_hand():
    # one env, 3 epochs, 2 slots; slot 0 computed (TRAINING) in epoch 1 and blended (BLENDING) in epoch 2
    computed = np.array([[[False, False], [True, False], [True, False]]])
    blended = np.array([[[False, False], [False, False], [True, False]]])
    blueprint = np.array([[[1, -1], [1, -1], [1, -1]]])
    c = cp.episode_compute(COSTS, computed, blended, blueprint, steps_per_epoch=4)
    assert c.train[0] == 4 * (3 * 100 + 2 * 10)
    assert c.validation[0] == 1000 + (1000 + 1050 + 1050)      # the reset's pass, then one per epoch
    assert c.measurement[0] == 1000                              # epoch 2: the pass without slot 0's seed
    assert c.total[0] == c.train[0] + c.validation[0] + c.measurement[0]
    assert cp.episode_compute(COSTS, computed, blended, blueprint, 4, measured=False).measurement[0] == 0


def test_a_seed_pruned_in_the_tick_is_costed_by_its_blueprint_before():
    computed = np.array([[[True, False], [True, False]]])
    blueprint = np.array([[[1, -1], [-1, -1]]])  # the tick of epoch 1 pruned it and emptied the slot
    c = cp.episode_compute(COSTS, computed, np.zeros_like(computed), blueprint, steps_per_epoch=1)
    assert c.train[0] == 2 * 100 + 2 * 10


def _masks(end, ops, applied=None):
    stage = np.array([end])
    op = np.array([ops])
    return cp.trained_masks_from_timeline(stage, op, np.ones_like(op, bool) if applied is None else np.array([applied]))


def test_trained_stages_reconstructed_from_the_ends_of_epochs():
    W, GERM, ADV, PRUNE = int(Op.WAIT), int(Op.GERMINATE), int(Op.ADVANCE), int(Op.PRUNE)
    # germinated in epoch 0 (not computed while it trained), moved to TRAINING by the tick of epoch 0
    # (auto-advance): computed from epoch 1; advanced to BLENDING by an action in epoch 2: blended then
    computed, blended = _masks([[T], [T], [B], [H]], [GERM, W, ADV, W])
    assert computed[0, :, 0].tolist() == [False, True, True, True]
    assert blended[0, :, 0].tolist() == [False, False, True, True]
    # germinated, then an ADVANCE action out of GERMINATED: computed in the epoch it was advanced
    computed, _ = _masks([[G], [T]], [GERM, ADV])
    assert computed[0, :, 0].tolist() == [False, True]
    # the same end stages with the tick advancing it: not computed in that epoch
    computed, _ = _masks([[G], [T]], [GERM, W])
    assert computed[0, :, 0].tolist() == [False, False]
    # a PRUNE action takes the seed out before the epoch trains; a prune in the tick (G5 failing,
    # a rollback) after it
    computed, blended = _masks([[T], [B], [P]], [W, W, PRUNE])
    assert computed[0, :, 0].tolist() == [False, True, False] and blended[0, :, 0].tolist() == [False, False, False]
    computed, blended = _masks([[T], [B], [E]], [W, W, W])
    assert computed[0, :, 0].tolist() == [False, True, True] and blended[0, :, 0].tolist() == [False, False, True]
    computed, _ = _masks([[T], [B], [P]], [W, W, PRUNE], applied=[True, True, False])
    assert computed[0, :, 0].tolist() == [False, True, True]


def test_timeline_compute_prefers_the_recorded_stages():
    timeline = {"stage": [[[T]]], "trained_stage": [[[G]]], "blueprint": [[[1]]], "op": [[int(Op.GERMINATE)]],
                "applied": [[True]]}
    costs = ModelCosts(100.0, 1000.0, np.array([[0.0, 10.0]]), np.array([[0.0, 50.0]]))
    recorded, how = cp.timeline_compute(costs, timeline, steps_per_epoch=1)
    assert how == "recorded" and recorded.train[0] == 100
    del timeline["trained_stage"]
    reconstructed, how = cp.timeline_compute(costs, timeline, steps_per_epoch=1)
    assert how == "reconstructed" and reconstructed.train[0] == 100
