"""Strata of a problem family: which controller (fixed schedule, static) is best where.

With a family of inner problems (:mod:`esper_jax.env.problems`) a controller's observations can
matter only if no single fixed choice is best for every env. This module measures that: envs are
binned by one dimension of their drawn problem (quantile bins of the training fraction or the
label noise), and within each bin every controller's final loss is compared with static's on the
same envs (paired, 95% CI), ranked by loss and by the *priced loss* the reward optimizes:

    priced loss = final loss + lambda_loss x (episode FLOPs / static's episode FLOPs - 1)

with ``lambda_loss = compute_weight x typical_loss_delta_std / loss_delta_weight``: the reward's
own exchange rate between loss (whose per-epoch deltas it pays ``loss_delta_weight /
typical_loss_delta_std`` per unit, telescoping over the episode) and compute
(:func:`esper_jax.env.rewards.compute_price`).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import numpy as np

from esper_jax.env.rewards import RewardConfig
from esper_jax.runs.evaluation import ci_text, paired_ci

Dimension = Literal["train_fraction", "label_noise"]
DIMENSIONS: tuple[Dimension, ...] = ("train_fraction", "label_noise")
STATIC = "static"


def loss_per_compute(reward: RewardConfig) -> float:
    """``lambda_loss``: the loss one static-host episode of extra compute is worth to the reward."""
    return reward.compute_weight * reward.typical_loss_delta_std / reward.loss_delta_weight


def priced_losses(losses: Mapping[str, np.ndarray], flops: Mapping[str, np.ndarray], reward: RewardConfig,
                  static_flops: np.ndarray) -> dict[str, np.ndarray]:
    """Each controller's per-env priced loss (module docstring)."""
    rate = loss_per_compute(reward)
    return {name: np.asarray(losses[name], np.float64) + rate * (np.asarray(flops[name]) / static_flops - 1.0)
            for name in losses}


def bin_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """``bins + 1`` quantile edges of ``values`` (the last bin closed)."""
    if bins < 1:
        raise ValueError(f"strata need at least one bin, got {bins}")
    return np.quantile(np.asarray(values, np.float64), np.linspace(0.0, 1.0, bins + 1))


def assign(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each value's bin index under ``edges`` (inner edges open above; the top edge closed)."""
    return np.clip(np.searchsorted(edges[1:-1], np.asarray(values), side="right"), 0, len(edges) - 2)


def strata_section(losses: Mapping[str, np.ndarray], priced: Mapping[str, np.ndarray], values: np.ndarray,
                   dimension: Dimension, bins: int) -> dict[str, Any]:
    """Per bin of ``values`` (each env's ``dimension``): every controller's mean loss, its paired
    difference to static with a 95% CI, and the best controller by loss and by priced loss."""
    if STATIC not in losses:
        raise ValueError("strata compare with static: run it among the controllers")
    edges = bin_edges(values, bins)
    index = assign(values, edges)
    out = []
    for b in range(bins):
        members = np.flatnonzero(index == b)
        if members.size == 0:
            continue
        rows = {}
        for name, loss in losses.items():
            loss = np.asarray(loss, np.float64)
            rows[name] = {"final_val_loss": float(loss[members].mean()),
                          "priced_loss": float(np.asarray(priced[name])[members].mean()),
                          "minus_static_ci": paired_ci(loss[members] - np.asarray(losses[STATIC])[members])}
        out.append({"range": [float(edges[b]), float(edges[b + 1])], "envs": [int(i) for i in members],
                    "best_by_loss": min(rows, key=lambda n: rows[n]["final_val_loss"]),
                    "best_by_priced_loss": min(rows, key=lambda n: rows[n]["priced_loss"]), "rows": rows})
    bests = {s["best_by_priced_loss"] for s in out}
    return {"dimension": dimension, "bins": out, "one_best_for_all": len(bests) == 1}


def parse_strata(text: str | None) -> tuple[Dimension, int] | None:
    """``--strata DIM:N`` as (dimension, bins); ValueError naming the option otherwise."""
    if text is None:
        return None
    dimension, _, count = text.partition(":")
    if dimension not in DIMENSIONS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"--strata must be DIM:N with DIM one of {', '.join(DIMENSIONS)} and N a positive "
                         f"integer, got {text!r}")
    return dimension, int(count)


def add_strata(payload: dict[str, Any], reward: RewardConfig, results: Mapping[str, Any],
               computes: Mapping[str, Any], strata: tuple[Dimension, int]) -> str:
    """Put the strata of ``results`` (name -> ``EpisodeOutput``, static among them; ``computes``:
    each one's :class:`~esper_jax.runs.compute.EpisodeCompute`) into an evaluation ``payload``;
    returns their Markdown."""
    losses = {n: np.asarray(o.final_val_loss, np.float64) for n, o in results.items()}
    flops = {n: np.asarray(c.total) for n, c in computes.items()}
    priced = priced_losses(losses, flops, reward, np.asarray(flops[STATIC]))
    values = np.asarray(getattr(results[STATIC], strata[0]))
    payload["strata"] = strata_section(losses, priced, values, *strata)
    payload["loss_per_compute"] = loss_per_compute(reward)
    return strata_markdown(payload["strata"])


def strata_markdown(section: Mapping[str, Any], top: int = 4) -> str:
    """Each bin's best controllers (by priced loss), as Markdown."""
    lines = [f"Strata by {section['dimension']} (quantile bins of the envs' drawn problems): the {top} best by priced "
             "loss in each, with their final loss and its difference to static on the same envs.", "",
             "| stratum | envs | best by loss | best by priced loss | top controllers: priced loss, loss minus static [95% CI] |",
             "|---|---|---|---|---|"]
    for s in section["bins"]:
        ranked = sorted(s["rows"], key=lambda n: s["rows"][n]["priced_loss"])[:top]
        cells = "; ".join(f"{n} {s['rows'][n]['priced_loss']:.4f}, {ci_text(s['rows'][n]['minus_static_ci'])}"
                          for n in ranked)
        lo, hi = s["range"]
        lines.append(f"| {lo:.3g}..{hi:.3g} | {len(s['envs'])} | {s['best_by_loss']} | {s['best_by_priced_loss']} "
                     f"| {cells} |")
    verdict = ("one controller is best in every stratum" if section["one_best_for_all"]
               else "the best controller differs between strata")
    return "\n".join(lines + ["", f"By priced loss, {verdict}."]) + "\n"
