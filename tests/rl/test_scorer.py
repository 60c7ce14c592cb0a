"""The policy over described candidates (:mod:`esper_jax.rl.scorer`): one set of parameters scores
menus of any size, masked candidates never get probability, and the order of the candidates only
permutes their scores."""

from __future__ import annotations

import distrax
import jax
import numpy as np
import pytest

from esper_jax.rl.scorer import CandidatePolicy

POLICY = CandidatePolicy(hidden_size=16)
OBS, FEATURES = 3, 5


@pytest.fixture(scope="module")
def scorer():
    params = POLICY.init(jax.random.key(0), OBS, FEATURES)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(4, OBS)).astype(np.float32)
    # a trained-looking read-out: the initial one (scale 0.01) is near-uniform by design
    params = jax.tree.map(lambda p: p * 100 if p.ndim == 2 and p.shape[-1] == 1 else p, params)
    return params, obs, rng.normal(size=(6, FEATURES)).astype(np.float32), jax.jit(POLICY.apply)


def test_one_set_of_parameters_scores_menus_of_any_size(scorer):
    """Two menus of different sizes (two tasks' candidates) with the same parameters; a candidate's
    score does not depend on which others are offered; the value reads the observation alone."""
    params, obs, candidates, apply = scorer
    big, value = apply(params, obs, candidates, np.ones(6, bool))
    small, small_value = apply(params, obs, candidates[:2], np.ones(2, bool))
    assert big.shape == (4, 6) and small.shape == (4, 2) and value.shape == (4,)
    np.testing.assert_allclose(small, big[:, :2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(small_value, value, rtol=1e-6)
    assert np.ptp(np.asarray(big), axis=1).min() > 1e-3  # the candidates are told apart


def test_masked_candidates_never_get_probability(scorer):
    """Masked entries: probability exactly 0, never sampled, never the mode; the rest's distribution
    is the one over the unmasked candidates alone; the entropy stays finite."""
    params, obs, candidates, apply = scorer
    mask = np.asarray([True, False, True, False, False, True])
    logits, _ = apply(params, obs, candidates, mask)
    dist = distrax.Categorical(logits=logits)
    probs = np.asarray(dist.probs)
    assert (probs[:, ~mask] == 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    alone, _ = apply(params, obs, candidates[mask], np.ones(3, bool))
    np.testing.assert_allclose(probs[:, mask], np.asarray(distrax.Categorical(logits=alone).probs), rtol=1e-5)
    samples = np.asarray(dist.sample(seed=jax.random.key(1), sample_shape=(200,)))
    assert mask[samples].all() and mask[np.asarray(dist.mode())].all()
    assert np.isfinite(np.asarray(dist.entropy())).all()


def test_permuting_the_candidates_permutes_their_scores(scorer):
    params, obs, candidates, apply = scorer
    order = np.asarray([3, 0, 5, 1, 4, 2])
    logits, _ = apply(params, obs, candidates, np.ones(6, bool))
    permuted, _ = apply(params, obs, candidates[order], np.ones(6, bool))
    np.testing.assert_allclose(permuted, np.asarray(logits)[:, order], rtol=1e-5, atol=1e-6)


def test_the_initial_choice_is_near_uniform():
    params = POLICY.init(jax.random.key(1), OBS, FEATURES)
    obs = np.random.default_rng(1).normal(size=(4, OBS)).astype(np.float32)
    logits, _ = POLICY.apply(params, obs, np.random.default_rng(2).normal(size=(5, FEATURES)), np.ones(5, bool))
    np.testing.assert_allclose(np.asarray(distrax.Categorical(logits=logits).probs), 0.2, atol=0.02)
