"""Report plots from a run directory's files (matplotlib, Agg backend: no display needed).

* :func:`plot_learning_curves`: mean return, final validation loss (and accuracy), seeds per
  episode against updates, from ``metrics.jsonl``; one line per member for populations;
* :func:`plot_entropy`: policy entropy per action head against updates, one panel per head;
* :func:`plot_comparison`: the held-out evaluation's final validation loss and parameters
  added per controller, from ``evaluation.json``;
* :func:`plot_eval_loss`: validation loss over the held-out episode per controller;
* :func:`plot_seed_timeline`: one panel per held-out env, a row per slot, the stage over epochs
  as coloured spans labelled with the blueprint;
* :func:`plot_efficiency`: language-model runs' final validation loss against parameter-seconds
  per controller and the large static reference (``evaluation.json``'s ``efficiency`` section).

Functions take already-parsed data (lists of metric rows, the evaluation dict) and write one
PNG each; reading the files is :func:`read_metrics` / :func:`read_json`. Plots of runs on
synthetic data say so in their title.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on the training machines

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402

HEADS = ("op", "slot", "blueprint", "blend", "tempo", "alpha_target")
# One colour per lifecycle stage (esper_jax.lattice.lifecycle.Stage order): growth in greens/blues,
# removal in reds, the empty slot light grey.
STAGE_COLORS = {
    "DORMANT": "#eeeeee",
    "GERMINATED": "#c7e9c0",
    "TRAINING": "#fdd49e",
    "BLENDING": "#9ecae1",
    "HOLDING": "#807dba",
    "FOSSILIZED": "#238b45",
    "PRUNED": "#ef3b2c",
    "EMBARGOED": "#fcbba1",
    "RESETTING": "#bdbdbd",
}
DPI = 110


class MetricsError(ValueError):
    """metrics.jsonl is unreadable (not a truncated last line of a run still writing)."""


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``. A run that is still writing may leave half a last line:
    it is skipped; a bad line anywhere else is an error."""
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if i == len(lines) - 1:
                break
            raise MetricsError(f"{path} line {i + 1} is not JSON: {error}") from None
    return rows


def _series(rows: Sequence[dict], key: str, member: int | None = None) -> tuple[list, list]:
    """(updates, values) for ``key``, skipping rows where it is missing or null/NaN."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        source = row
        if member is not None:
            members = row.get("members") or []
            if member >= len(members):
                continue
            source = members[member]
        value = source.get(key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue
        xs.append(row.get("update", i + 1))
        ys.append(value)
    return xs, ys


def num_members(rows: Sequence[dict]) -> int:
    return max((len(row.get("members") or []) for row in rows), default=0)


def _title(fig, title: str, note: str | None):
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11, color="firebrick" if note and "SYNTHETIC" in note else "black")


def _plot_metric(ax, rows, key: str, label: str, members: int, member_labels: Sequence[str] | None):
    """Population: one thin line per member plus the mean; single learner: one line."""
    if members > 1:
        for m in range(members):
            xs, ys = _series(rows, key, m)
            if xs:
                ax.plot(xs, ys, lw=1, alpha=0.8, label=member_labels[m] if member_labels else f"member {m}")
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, lw=2.2, color="black", label="mean")
    else:
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, lw=1.6, marker="o" if len(xs) < 30 else None, ms=3)
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("update")
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="y", useOffset=False)  # entropies near their maximum: no "1e-5+1.098" axes
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not ax.lines:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")


def plot_learning_curves(rows: Sequence[dict], path: str, *, note: str | None = None,
                         member_labels: Sequence[str] | None = None) -> str:
    """Return, final validation loss, final validation accuracy (or a language model's perplexity)
    and seeds per episode against updates."""
    if not rows:
        raise MetricsError("no metric rows to plot")
    members = num_members(rows)
    has_accuracy = bool(_series(rows, "mean_final_val_accuracy")[0])
    has_perplexity = bool(_series(rows, "mean_final_val_perplexity")[0])  # language-model runs
    panels = [("mean_return", "mean episode return"), ("mean_final_val_loss", "final validation loss")]
    if has_perplexity:
        panels.append(("mean_final_val_perplexity", "final validation perplexity"))
    elif has_accuracy:
        panels.append(("mean_final_val_accuracy", "final validation accuracy"))
    panels += [("explained_variance", "value explained variance"), ("approx_kl", "approximate KL")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.2))
    axes = list(axes.flat)
    for ax, (key, label) in zip(axes, panels):
        _plot_metric(ax, rows, key, label, members, member_labels)
    ax = axes[len(panels)]
    for key, color in (("germinated", "tab:green"), ("fossilized", "darkgreen"), ("pruned", "tab:red")):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, color=color, label=key, lw=1.6)
    ax.set_title("seeds per episode (mean over envs)", fontsize=10)
    ax.set_xlabel("update")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    for unused in axes[len(panels) + 1:]:
        unused.set_visible(False)
    _finish(fig, path, "Learning curves" + (f" ({members} members)" if members > 1 else ""), note,
            axes[0] if members > 1 else None)
    return path


def _finish(fig, path: str, title: str, note: str | None, legend_from=None):
    """Title, the member legend below the panels (populations), save, close."""
    bottom = 0.0
    if legend_from is not None:
        handles, labels = legend_from.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
        bottom = 0.04 + 0.025 * ((len(labels) - 1) // 4)
    _title(fig, title, note)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_entropy(rows: Sequence[dict], path: str, *, note: str | None = None,
                 member_labels: Sequence[str] | None = None) -> str:
    """Policy entropy of each action head against updates (one panel per head)."""
    members = num_members(rows)
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4))
    for ax, head in zip(axes.flat, HEADS):
        _plot_metric(ax, rows, f"entropy_{head}", f"entropy: {head}", members, member_labels)
    _finish(fig, path, "Policy entropy per head", note, axes.flat[0] if members > 1 else None)
    return path


def plot_comparison(evaluation: dict[str, Any], path: str, *, note: str | None = None) -> str:
    """Final validation loss (bars = mean, dots = envs) and parameters added per controller."""
    results = evaluation["controllers"]
    names = list(results)
    fig, (ax_loss, ax_params) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, name in enumerate(names):
        r = results[name]
        # Points, not bars from 0: the differences between controllers are small next to the loss.
        per_env = [v for v in r["final_val_loss_per_env"] if v is not None]
        ax_loss.scatter([i - 0.12] * len(per_env), per_env, color=f"C{i}", s=16, alpha=0.8, zorder=2)
        if r["final_val_loss"] is not None:
            ax_loss.errorbar(i + 0.12, r["final_val_loss"], yerr=r.get("final_val_loss_std") or 0.0, fmt="_", ms=24, mew=2.5,
                             color="black", capsize=6, zorder=3)
        ax_params.bar(i, r["params_added"], color=f"C{i}", alpha=0.6)
        ax_params.scatter([i] * len(r["params_added_per_env"]), r["params_added_per_env"], color="black", s=10, zorder=3)
    ax_loss.set_xlim(-0.6, len(names) - 0.4)
    for ax, title in ((ax_loss, "final validation loss (dots: envs; bar: mean ± std)"), (ax_params, "parameters added")):
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    held = evaluation["held_out"]
    _title(fig, f"Controllers on {held['num_envs']} held-out envs x {held['episode_epochs']} epochs", note)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_efficiency(evaluation: dict[str, Any], path: str, *, note: str | None = None) -> str:
    """Final validation loss against parameter-seconds (log scale), one marker per controller and
    the large static reference, with error bars over the held-out envs (std of both)."""
    section = evaluation["efficiency"]
    reference = section["reference"]["name"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (name, r) in enumerate(section["controllers"].items()):
        if r["final_val_loss"] is None or not r["param_seconds"] > 0:
            continue  # a diverged episode has no loss to place; nothing ran in no time
        big = name == reference
        ax.errorbar(r["param_seconds"], r["final_val_loss"], xerr=r["param_seconds_std"],
                    yerr=r["final_val_loss_std"] or 0.0, fmt="s" if big else "o", ms=8 if big else 7,
                    color="black" if big else f"C{i}", capsize=4)
        ax.annotate(name, (r["param_seconds"], r["final_val_loss"]), textcoords="offset points", xytext=(6, 6),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters x seconds (parameter-epochs x seconds per epoch; log scale)")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3, which="both")
    held = evaluation["held_out"]
    _title(fig, f"Loss against parameter-seconds: {held['num_envs']} held-out envs x {held['episode_epochs']} epochs "
                f"(bars: std over envs)", note)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_frontier(frontier: dict[str, Any], path: str, *, note: str | None = None) -> str:
    """Final validation loss against training FLOPs (log scale): the static frontier as a line
    through its networks, the other static networks as grey squares, and every controller and
    fixed schedule as a point with error bars (95% CI of its mean loss; std of its compute)."""
    rows = frontier["rows"]
    front = frontier["frontier"]
    fig, ax = plt.subplots(figsize=(8, 5.2))
    ax.plot(front["flops"], front["final_val_loss"], "-", color="black", lw=1.5, label="static frontier", zorder=2)
    colour = 0
    for name, r in rows.items():
        loss = np.asarray(r["final_val_loss_per_env"], float)
        flops = np.asarray(r["flops_per_env"], float)
        half = 0.0 if loss.size < 2 else float(scipy.stats.t.ppf(0.975, loss.size - 1) * loss.std(ddof=1) / np.sqrt(loss.size))
        if r["kind"] == "static network":
            ax.errorbar(flops.mean(), loss.mean(), yerr=half, fmt="s", ms=6, capsize=3, zorder=3,
                        color="black" if r.get("on_frontier") else "grey")
            ax.annotate(name, (flops.mean(), loss.mean()), textcoords="offset points", xytext=(5, -10), fontsize=7,
                        color="dimgrey")
            continue
        ax.errorbar(flops.mean(), loss.mean(), xerr=flops.std(), yerr=half, fmt="o", ms=7, capsize=4, zorder=4,
                    color=f"C{colour}", label=name)
        colour += 1
    ax.set_xscale("log")
    ax.set_xlabel("training compute of the episode (FLOPs, log scale)")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    _finish(fig, path, f"Loss against compute: controllers vs static networks, {frontier['held_out']['num_envs']} "
                       "held-out envs (bars: 95% CI)", note)
    return path


def _loss_curves(tl: dict[str, Any]) -> list[list[float]]:
    return [[math.nan if v is None else v for v in env] for env in tl["val_loss"]]


def plot_eval_loss(evaluation: dict[str, Any], path: str, *, note: str | None = None) -> str:
    """Validation loss over the held-out episode: mean over envs per controller, with the range;
    and, when ``static`` was evaluated, each controller's paired difference from it (same envs,
    same seeds, so the difference is what the controller's actions changed)."""
    timelines = evaluation["timelines"]
    baseline = _loss_curves(timelines["static"]) if "static" in timelines else None
    fig, axes = plt.subplots(1, 2 if baseline else 1, figsize=(12 if baseline else 6.5, 4), squeeze=False)
    ax = axes[0, 0]
    for i, (name, tl) in enumerate(timelines.items()):
        curves = _loss_curves(tl)
        epochs = list(range(1, len(curves[0]) + 1))
        ax.plot(epochs, [sum(col) / len(col) for col in zip(*curves)], color=f"C{i}", lw=1.8, label=name)
        ax.fill_between(epochs, [min(col) for col in zip(*curves)], [max(col) for col in zip(*curves)],
                        color=f"C{i}", alpha=0.08)
        if baseline:
            diffs = [[a - b for a, b in zip(env, base)] for env, base in zip(curves, baseline)]
            axes[0, 1].plot(epochs, [sum(col) / len(col) for col in zip(*diffs)], color=f"C{i}", lw=1.8, label=name)
    ax.set_title("validation loss (mean; band: min-max over envs)", fontsize=10)
    ax.set_ylabel("validation loss")
    if baseline:
        axes[0, 1].axhline(0.0, color="grey", lw=0.8)
        axes[0, 1].set_title("minus static's loss on the same env (mean over envs; < 0: better)", fontsize=10)
    for a in axes[0]:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.legend(fontsize=8)
    _title(fig, "Held-out validation loss per controller", note)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _segments(stages: Sequence[int], blueprints: Sequence[int]):
    """Runs of equal (stage, blueprint) as (start index, length, stage, blueprint)."""
    runs, start = [], 0
    for i in range(1, len(stages) + 1):
        if i == len(stages) or (stages[i], blueprints[i]) != (stages[start], blueprints[start]):
            runs.append((start, i - start, stages[start], blueprints[start]))
            start = i
    return runs


def plot_seed_timeline(tl: dict[str, Any], path: str, *, controller: str, note: str | None = None,
                       max_envs: int = 16, final_val_loss: Sequence[float | None] | None = None) -> str:
    """One panel per env (the first ``max_envs``): a row per slot, epochs on x, each span coloured
    by stage and labelled with its blueprint."""
    stage_names, slots, blueprints = tl["stages"], tl["slots"], tl["blueprints"]
    stage, blueprint = tl["stage"], tl["blueprint"]
    n_envs = len(stage)
    shown = min(n_envs, max_envs)
    epochs = len(stage[0]) if n_envs else 0
    height = 0.45 * len(slots) + 0.75
    width = min(max(7.0, 4 + 0.25 * epochs), 22)
    fig, axes = plt.subplots(shown, 1, figsize=(width, height * shown + 1.4), squeeze=False, sharex=True)
    used = set()
    for e in range(shown):
        ax = axes[e, 0]
        for s, slot in enumerate(slots):
            codes = [stage[e][t][s] for t in range(epochs)]
            bps = [blueprint[e][t][s] for t in range(epochs)]
            for start, length, code, bp in _segments(codes, bps):
                name = stage_names[code]
                used.add(name)
                ax.broken_barh([(start + 0.5, length)], (s - 0.4, 0.8), facecolors=STAGE_COLORS.get(name, "white"),
                               edgecolors="white", linewidth=0.5)
                if name != "DORMANT" and 0 <= bp < len(blueprints):
                    ax.text(start + 0.6, s, blueprints[bp], va="center", ha="left", fontsize=7, clip_on=True)
        ax.set_yticks(range(len(slots)), slots)
        ax.set_ylim(-0.6, len(slots) - 0.4)
        ax.invert_yaxis()
        loss = final_val_loss[e] if final_val_loss is not None and e < len(final_val_loss) else None
        ax.set_ylabel(f"env {e}", rotation=0, ha="right", va="center", fontsize=8)
        if loss is not None:
            ax.text(1.005, 0.5, f"val loss\n{loss:.3f}", transform=ax.transAxes, fontsize=7, va="center")
    axes[-1, 0].set_xlim(0.5, epochs + 0.5)
    axes[-1, 0].set_xlabel("epoch")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    legend = [Patch(facecolor=STAGE_COLORS[n], edgecolor="grey", label=n) for n in stage_names if n in used]
    fig.legend(handles=legend, loc="lower center", ncol=max(1, min(len(legend), int(width / 1.45))), fontsize=8,
               frameon=False)
    more = f" (first {shown} of {n_envs} envs)" if shown < n_envs else ""
    _title(fig, f"Seed timeline: {controller}{more}", note)
    fig.tight_layout(rect=(0, 0.06 if shown > 1 else 0.1, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
