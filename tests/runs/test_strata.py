"""Strata of a problem family (esper_jax.runs.strata) on hand-made per-env results: nothing is compiled."""

from __future__ import annotations

import numpy as np
import pytest

from esper_jax.env.rewards import RewardConfig
from esper_jax.runs import strata as st


def test_quantile_bins_hold_every_env_once():
    values = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    index = st.assign(values, st.bin_edges(values, 3))
    assert sorted(index.tolist()) == [0, 0, 1, 1, 2, 2] and index[np.argmax(values)] == 2
    with pytest.raises(ValueError, match="at least one bin"):
        st.bin_edges(values, 0)


def test_the_priced_loss_uses_the_rewards_exchange_rate():
    reward = RewardConfig(compute_weight=2.0)  # 2 x 0.1 / 5: 0.04 loss per static episode of extra compute
    assert st.loss_per_compute(reward) == pytest.approx(0.04)
    priced = st.priced_losses({"static": np.array([2.0]), "grown": np.array([1.9])},
                              {"static": np.array([10.0]), "grown": np.array([35.0])}, reward, np.array([10.0]))
    assert priced["static"][0] == 2.0 and priced["grown"][0] == pytest.approx(1.9 + 0.04 * 2.5)


def test_each_stratum_names_its_own_best():
    # small sets: growing overfits; large sets: growing helps
    fraction = np.array([0.05, 0.06, 0.07, 0.8, 0.9, 1.0])
    losses = {"static": np.array([2.0, 2.0, 2.0, 1.8, 1.8, 1.8]), "grown": np.array([2.1, 2.1, 2.2, 1.6, 1.7, 1.6])}
    section = st.strata_section(losses, losses, fraction, "train_fraction", 2)
    low, high = section["bins"]
    assert low["envs"] == [0, 1, 2] and low["best_by_loss"] == "static" and high["best_by_priced_loss"] == "grown"
    assert high["rows"]["grown"]["minus_static_ci"]["mean"] == pytest.approx(-1 / 6)
    assert not section["one_best_for_all"]
    assert "differs between strata" in st.strata_markdown(section)
    with pytest.raises(ValueError, match="static"):
        st.strata_section({"grown": losses["grown"]}, losses, fraction, "train_fraction", 2)
