"""Rewards: PBRS telescoping, bounds, monotonicity, asymmetry, clipping, rent, governor, vmap.

Every compiled function is built once at module scope and called with signals of one fixed
shape and dtype, and configs come from a small fixed set, so Hypothesis examples hit the jit
cache instead of recompiling.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esper_jax.lattice.lifecycle import NUM_STAGES, Stage
from esper_jax.env.rewards import (
    DEFAULT_STAGE_POTENTIALS,
    HAPPY_PATH_STAGE_BONUS,
    REWARD_KINDS,
    RewardConfig,
    RewardSignals,
    compute_reward,
    pbrs_shaping,
    stage_potential,
)

S = 4  # slots
SETTINGS = settings(deadline=None, max_examples=40, derandomize=True)

CONFIGS = {
    (kind, variant): dataclasses.replace(base, kind=kind)
    for kind in REWARD_KINDS
    for variant, base in {
        "default": RewardConfig(),
        # Other weights, a different task scale, and regressions charged more than improvements.
        "varied": RewardConfig(loss_delta_weight=2.0, max_loss_delta=3.0, regression_penalty_scale=1.5,
                               typical_loss_delta_std=0.15, baseline_loss=10.8, target_loss=3.5,
                               terminal_loss_weight=2.5, contribution_weight=0.7, max_contribution=2.0,
                               pbrs_coef=0.5, gamma=0.9, rent_weight=0.3, governor_penalty=2.0),
    }.items()
}
config_keys = st.sampled_from(sorted(CONFIGS))

# Jitted once; the config is static, so each (function, config) pair compiles once.
reward_fn = jax.jit(compute_reward, static_argnums=1)
batched_reward_fn = jax.jit(jax.vmap(compute_reward, in_axes=(0, None)), static_argnums=1)
pbrs_fn = jax.jit(pbrs_shaping, static_argnums=2)
potential_fn = jax.jit(stage_potential, static_argnums=1)


def signals(val_loss=1.0, prev_val_loss=1.2, stage_before=None, stage_after=None, contribution=None,
            contribution_measured=None, added_params=0.0, host_params=6418.0, is_terminal=False,
            rolled_back=False, seed_compute=0.0) -> RewardSignals:
    """Signals with fixed dtypes and shapes (so every call hits the same compiled function)."""
    dormant = [int(Stage.DORMANT)] * S
    return RewardSignals(
        val_loss=jnp.float32(val_loss), prev_val_loss=jnp.float32(prev_val_loss),
        stage_before=jnp.asarray(dormant if stage_before is None else stage_before, jnp.int32),
        stage_after=jnp.asarray(dormant if stage_after is None else stage_after, jnp.int32),
        contribution=jnp.asarray([0.0] * S if contribution is None else contribution, jnp.float32),
        contribution_measured=jnp.asarray([False] * S if contribution_measured is None else contribution_measured, bool),
        added_params=jnp.float32(added_params), host_params=jnp.float32(host_params),
        is_terminal=jnp.bool_(is_terminal), rolled_back=jnp.bool_(rolled_back),
        seed_compute=jnp.float32(seed_compute),
    )


def reward(sig: RewardSignals, config: RewardConfig) -> float:
    out = reward_fn(sig, config)
    assert out.dtype == jnp.float32 and out.shape == ()
    return float(out)


# ---------------------------------------------------------------------------- strategies

NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
losses = st.floats(0.0, 20.0, width=32) | NON_FINITE
stage_vectors = st.lists(st.integers(0, NUM_STAGES - 1), min_size=S, max_size=S)
contributions = st.lists(st.floats(-5.0, 5.0, width=32) | NON_FINITE, min_size=S, max_size=S)
MAX_ADDED, MIN_HOST = 1e7, 1e3


@st.composite
def any_signals(draw, finite_losses: bool = False) -> RewardSignals:
    loss = st.floats(0.0, 20.0, width=32) if finite_losses else losses
    return signals(
        val_loss=draw(loss), prev_val_loss=draw(loss),
        stage_before=draw(stage_vectors), stage_after=draw(stage_vectors),
        contribution=draw(contributions),
        contribution_measured=draw(st.lists(st.booleans(), min_size=S, max_size=S)),
        added_params=draw(st.floats(0.0, MAX_ADDED)), host_params=draw(st.floats(MIN_HOST, 1e7)),
        is_terminal=draw(st.booleans()), rolled_back=draw(st.booleans()),
    )


def reward_bound(config: RewardConfig) -> float:
    """|reward| <= this for every signal in the ranges above, derived from the config alone."""
    rent = config.rent_weight * math.log1p(MAX_ADDED / MIN_HOST)
    common = config.terminal_loss_weight + rent + config.governor_penalty
    if config.kind == "loss":
        delta = config.max_loss_delta * config.loss_delta_weight * max(1.0, config.regression_penalty_scale)
        return delta + S * max(abs(b) for b in config.stage_bonus) + common
    if config.kind == "contribution":
        pbrs = config.pbrs_coef * (config.gamma + 1.0) * S * max(abs(p) for p in config.stage_potentials)
        return config.contribution_weight * config.max_contribution + pbrs + common
    return common


# ---------------------------------------------------------------------------- PBRS


@st.composite
def episodes(draw):
    length = draw(st.integers(1, 12))
    return np.asarray(draw(st.lists(stage_vectors, min_size=length + 1, max_size=length + 1)), np.int32)


@pytest.mark.parametrize("gamma", [RewardConfig().gamma, 0.9, 1.0])
@SETTINGS
@given(episode=episodes())
def test_pbrs_telescopes(gamma, episode):
    config = RewardConfig(kind="contribution", gamma=gamma)
    T = len(episode) - 1
    shaped = [float(pbrs_fn(jnp.asarray(episode[t]), jnp.asarray(episode[t + 1]), config)) for t in range(T)]
    discounted = sum(gamma**t * r for t, r in enumerate(shaped))
    phi_0, phi_T = (float(potential_fn(jnp.asarray(episode[i]), config)) for i in (0, T))
    np.testing.assert_allclose(discounted, config.pbrs_coef * (gamma**T * phi_T - phi_0), rtol=1e-5, atol=1e-4)
    if gamma == 1.0:  # undiscounted: only the endpoints matter
        np.testing.assert_allclose(sum(shaped), config.pbrs_coef * (phi_T - phi_0), rtol=1e-5, atol=1e-4)


def test_stage_potentials_are_esper_values():
    expected = {Stage.DORMANT: 0, Stage.GERMINATED: 1, Stage.TRAINING: 2, Stage.BLENDING: 3.5, Stage.HOLDING: 5.5,
                Stage.FOSSILIZED: 6, Stage.PRUNED: 0, Stage.EMBARGOED: 0, Stage.RESETTING: 0}
    assert DEFAULT_STAGE_POTENTIALS == tuple(float(expected[s]) for s in Stage)
    stages = jnp.asarray([Stage.TRAINING, Stage.HOLDING, Stage.DORMANT, Stage.FOSSILIZED], jnp.int32)
    assert float(potential_fn(stages, RewardConfig())) == pytest.approx(2 + 5.5 + 0 + 6)


def test_default_reward_has_no_stage_bonus_and_telescopes():
    # Bonuses out-earned small real improvements, and a half-forgiven regression pays for noise.
    config = RewardConfig()
    assert all(b == 0.0 for b in config.stage_bonus) and config.regression_penalty_scale == 1.0
    losses = [2.0, 1.9, 1.95, 1.7, 1.8, 1.6]
    total = sum(reward(signals(val_loss=b, prev_val_loss=a), CONFIGS["loss", "default"])
                for a, b in zip(losses, losses[1:]))
    expected = (losses[0] - losses[-1]) / config.typical_loss_delta_std * config.loss_delta_weight
    assert total == pytest.approx(expected, rel=1e-4)


def test_stage_bonus_is_small_and_only_for_seeds_on_the_happy_path():
    bonus = HAPPY_PATH_STAGE_BONUS
    assert len(bonus) == NUM_STAGES and all(0.0 <= b < 0.1 for b in bonus)
    for stage in (Stage.DORMANT, Stage.PRUNED, Stage.EMBARGOED, Stage.RESETTING):
        assert bonus[stage] == 0.0
    path = [bonus[s] for s in (Stage.GERMINATED, Stage.TRAINING, Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED)]
    assert all(b > 0 for b in path) and path == sorted(path)  # never lose bonus by advancing
    # The loss-primary reward adds the bonuses of every slot's stage after the step.
    config = dataclasses.replace(CONFIGS["loss", "default"], stage_bonus=bonus)
    after = [Stage.TRAINING, Stage.HOLDING, Stage.DORMANT, Stage.TRAINING]
    base = reward(signals(val_loss=1.0, prev_val_loss=1.0), config)
    assert base == 0.0
    with_seeds = reward(signals(val_loss=1.0, prev_val_loss=1.0, stage_after=after), config)
    assert with_seeds == pytest.approx(sum(bonus[s] for s in after))


# ---------------------------------------------------------------------------- bounds


@SETTINGS
@given(key=config_keys, sig=any_signals())
def test_every_reward_is_finite_and_bounded(key, sig):
    config = CONFIGS[key]
    r = reward(sig, config)
    assert math.isfinite(r)
    assert abs(r) <= reward_bound(config) * (1 + 1e-6), (key, r, reward_bound(config))


@pytest.mark.parametrize("kind", REWARD_KINDS)
def test_non_finite_inputs_never_escape(kind):
    config = CONFIGS[kind, "default"]
    for bad in (math.nan, math.inf, -math.inf):
        for sig in (
            signals(val_loss=bad, is_terminal=True), signals(prev_val_loss=bad, is_terminal=True),
            signals(val_loss=bad, prev_val_loss=bad, rolled_back=True),
            signals(contribution=[bad] * S, contribution_measured=[True] * S, stage_after=[Stage.HOLDING] * S),
            signals(added_params=bad, host_params=bad, is_terminal=True), signals(host_params=0.0, added_params=1e30),
        ):
            assert math.isfinite(reward(sig, config)), (kind, bad, sig)


def test_non_finite_val_loss_is_the_clipped_worst_case():
    config = CONFIGS["loss", "default"]
    worst = -config.max_loss_delta * config.regression_penalty_scale * config.loss_delta_weight
    for bad in (math.nan, math.inf, -math.inf):
        assert reward(signals(val_loss=bad, prev_val_loss=1.0), config) == pytest.approx(worst)
        # and no terminal improvement is credited for it
        assert reward(signals(val_loss=bad, prev_val_loss=1.0, is_terminal=True), config) == pytest.approx(worst)
        # a non-finite loss *before* the step alone carries no information about the change
        assert reward(signals(val_loss=1.0, prev_val_loss=bad), config) == 0.0


# ---------------------------------------------------------------------------- monotonicity


@SETTINGS
@given(key=config_keys, sig=any_signals(finite_losses=True), a=st.floats(-5.0, 25.0, width=32),
       b=st.floats(-5.0, 25.0, width=32), terminal=st.booleans())
def test_lower_val_loss_never_gives_less_reward(key, sig, a, b, terminal):
    config = CONFIGS[key]
    low, high = min(a, b), max(a, b)
    sig = sig.replace(is_terminal=jnp.bool_(terminal))
    r_low = reward(sig.replace(val_loss=jnp.float32(low)), config)
    r_high = reward(sig.replace(val_loss=jnp.float32(high)), config)
    assert r_low >= r_high, (key, low, high, r_low, r_high)


@SETTINGS
@given(variant=st.sampled_from(["default", "varied"]), sig=any_signals(), slot=st.integers(0, S - 1),
       a=st.floats(-5.0, 5.0, width=32), b=st.floats(-5.0, 5.0, width=32))
def test_higher_contribution_never_gives_less_reward(variant, sig, slot, a, b):
    config = CONFIGS["contribution", variant]
    lo, hi = min(a, b), max(a, b)
    r = []
    for c in (lo, hi):
        r.append(reward(sig.replace(contribution=sig.contribution.at[slot].set(c)), config))
    assert r[1] >= r[0], (lo, hi, r)


def test_contribution_counts_measured_blended_seeds_only():
    config = CONFIGS["contribution", "default"]
    stages = [Stage.TRAINING, Stage.BLENDING, Stage.HOLDING, Stage.FOSSILIZED]
    base = dict(stage_before=stages, stage_after=stages)
    zero = reward(signals(**base), config)
    c = 0.05  # half a typical loss delta: 0.5 reward units
    expected = {0: 0.0, 1: 0.5, 2: 0.5, 3: 0.5}  # a TRAINING seed is not blended yet
    for s, gain in expected.items():
        contribution = [0.0] * S
        contribution[s] = c
        measured = [i == s for i in range(S)]
        got = reward(signals(contribution=contribution, contribution_measured=measured, **base), config)
        assert got - zero == pytest.approx(gain, abs=1e-6), s
        unmeasured = reward(signals(contribution=contribution, **base), config)
        assert unmeasured == pytest.approx(zero, abs=1e-6)
    # the sum is clipped to ±max_contribution
    big = reward(signals(contribution=[1.0] * S, contribution_measured=[True] * S, **base), config)
    assert big - zero == pytest.approx(config.contribution_weight * config.max_contribution, abs=1e-5)
    small = reward(signals(contribution=[-1.0] * S, contribution_measured=[True] * S, **base), config)
    assert small - zero == pytest.approx(-config.contribution_weight * config.max_contribution, abs=1e-5)


# ---------------------------------------------------------------------------- loss-primary details


@pytest.mark.parametrize("d", [0.01, 0.1, 0.3, 0.49])
def test_regression_costs_the_configured_fraction_of_an_equal_improvement(d):
    config = dataclasses.replace(CONFIGS["loss", "default"], regression_penalty_scale=0.5)
    improve = reward(signals(val_loss=1.0 - d, prev_val_loss=1.0), config)
    regress = reward(signals(val_loss=1.0 + d, prev_val_loss=1.0), config)
    assert improve == pytest.approx(d / config.typical_loss_delta_std * config.loss_delta_weight, rel=1e-4)
    assert regress == pytest.approx(-config.regression_penalty_scale * improve, rel=1e-4)


def test_loss_delta_is_clipped():
    config = CONFIGS["loss", "default"]
    top = config.max_loss_delta * config.loss_delta_weight  # 25
    for d in (0.5, 1.0, 100.0):  # 0.5 is exactly the clip (5 typical deltas)
        assert reward(signals(val_loss=1.0, prev_val_loss=1.0 + d), config) == pytest.approx(top)
        assert reward(signals(val_loss=1.0 + d, prev_val_loss=1.0), config) == pytest.approx(
            -config.regression_penalty_scale * top)


@pytest.mark.parametrize("kind", REWARD_KINDS)
def test_terminal_bonus_is_clamped_to_0_and_1(kind):
    config = CONFIGS[kind, "default"]  # baseline 2.3, target 0.3: achievable range 2.0
    # prev == val so the loss-delta term is 0; no seeds so no bonus, PBRS or contribution.
    def terminal(val):
        return reward(signals(val_loss=val, prev_val_loss=val, is_terminal=True), config)
    assert terminal(0.3) == pytest.approx(1.0) and terminal(0.0) == pytest.approx(1.0)
    assert terminal(-50.0) == pytest.approx(1.0)
    assert terminal(1.3) == pytest.approx(0.5)
    assert terminal(2.3) == pytest.approx(0.0) and terminal(9.0) == pytest.approx(0.0)
    assert reward(signals(val_loss=0.3, prev_val_loss=0.3, is_terminal=False), config) == 0.0


def test_sparse_reward_is_zero_before_the_terminal_step():
    config = CONFIGS["sparse", "default"]
    stages = [Stage.HOLDING] * S
    busy = signals(val_loss=0.1, prev_val_loss=2.0, stage_before=[Stage.TRAINING] * S, stage_after=stages,
                   contribution=[0.3] * S, contribution_measured=[True] * S, added_params=5e4)
    assert reward(busy, config) == 0.0
    end = busy.replace(is_terminal=jnp.bool_(True))
    expected = 1.0 - config.rent_weight * math.log1p(5e4 / 6418.0)
    assert reward(end, config) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------- rent, governor


@pytest.mark.parametrize("kind", REWARD_KINDS)
def test_rent_grows_with_added_params(kind):
    config = CONFIGS[kind, "default"]
    host = 6418.0
    rewards = [reward(signals(added_params=a, host_params=host, is_terminal=True), config) for a in (0, 1e2, 1e3, 1e4, 1e5)]
    assert all(x > y for x, y in zip(rewards, rewards[1:])), rewards
    no_rent = reward(signals(added_params=0.0, is_terminal=True), config)
    assert rewards[-1] == pytest.approx(no_rent - config.rent_weight * math.log1p(1e5 / host), rel=1e-5)


@pytest.mark.parametrize("kind", ["loss", "contribution"])
def test_compute_is_charged_at_its_weight_and_only_above_the_host(kind):
    free, priced = RewardConfig(kind=kind), RewardConfig(kind=kind, compute_weight=2.0)
    sig = signals(seed_compute=0.25)
    assert reward(sig, priced) == pytest.approx(reward(sig, free) - 0.5, abs=1e-6)
    assert reward(signals(seed_compute=0.0), priced) == reward(signals(seed_compute=0.0), free)
    assert reward(signals(seed_compute=math.nan), priced) == reward(signals(seed_compute=0.0), priced)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_governor_penalty_applied_on_rollback(key):
    config = CONFIGS[key]
    sig = signals(val_loss=0.9, prev_val_loss=1.0, stage_before=[Stage.TRAINING] * S, stage_after=[Stage.BLENDING] * S,
                  added_params=1e3, is_terminal=True)
    kept = reward(sig, config)
    rolled = reward(sig.replace(rolled_back=jnp.bool_(True)), config)
    assert kept - rolled == pytest.approx(config.governor_penalty, abs=1e-5)


# ---------------------------------------------------------------------------- config


def test_unknown_kind_raises_listing_valid_kinds():
    with pytest.raises(ValueError, match="loss, contribution, sparse"):
        RewardConfig(kind="dense")


@pytest.mark.parametrize("baseline, target", [(0.3, 0.3), (0.3, 2.3)])
def test_non_positive_achievable_range_raises(baseline, target):
    with pytest.raises(ValueError, match="achievable_range"):
        RewardConfig(baseline_loss=baseline, target_loss=target)


def test_config_is_hashable_and_validated():
    config = RewardConfig(stage_bonus=[0.0] * NUM_STAGES, stage_potentials=list(DEFAULT_STAGE_POTENTIALS))
    assert isinstance(config.stage_bonus, tuple) and hash(config) == hash(dataclasses.replace(config))
    assert RewardConfig().achievable_range == pytest.approx(2.0)
    for bad in (dict(stage_bonus=(0.0,) * (NUM_STAGES - 1)), dict(typical_loss_delta_std=0.0), dict(gamma=0.0),
                dict(gamma=1.5), dict(loss_delta_weight=-1.0), dict(rent_weight=math.nan)):
        with pytest.raises(ValueError):
            RewardConfig(**bad)


# ---------------------------------------------------------------------------- vmap


@pytest.mark.parametrize("kind", REWARD_KINDS)
def test_vmap_equals_per_element(kind):
    config = CONFIGS[kind, "varied"]
    rng = np.random.default_rng(0)
    B = 8
    batch = [
        signals(val_loss=v, prev_val_loss=p, stage_before=rng.integers(0, NUM_STAGES, S), stage_after=rng.integers(0, NUM_STAGES, S),
                contribution=rng.normal(0, 0.2, S), contribution_measured=rng.random(S) < 0.5,
                added_params=rng.uniform(0, 1e5), host_params=6418.0, is_terminal=rng.random() < 0.5,
                rolled_back=rng.random() < 0.3)
        for v, p in zip([0.5, math.nan, 3.0, 1.0, math.inf, 0.2, 2.0, 1.1], rng.uniform(0, 3, B))
    ]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batch)
    batched = np.asarray(batched_reward_fn(stacked, config))
    assert batched.shape == (B,) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, [reward(sig, config) for sig in batch], rtol=1e-6, atol=1e-6)
