"""Write PNG plots of a run into ``DIR/plots/`` and list them.

    python -m experiments.report --run-dir DIR [--no-eval] [--max-envs N]

From ``metrics.jsonl`` (written by ``python -m experiments.ppo``): learning curves (return, final
validation loss and accuracy, explained variance, seeds per episode) and entropy per head, one
line per member for populations. From ``evaluation.json`` (written by
``python -m experiments.evaluate``): the controller comparison, the held-out validation loss per
controller, a seed timeline per controller with a panel per held-out env, and for language-model
runs the final loss against parameter-seconds (``efficiency.png``). From ``frontier.json`` (written by
``python -m experiments.frontier``), image and language runs alike: loss against training FLOPs,
the static frontier as a line and each controller as a point (``frontier.png``). ``--no-eval``
plots the learning curves only (e.g. while a run is still training).
"""

from __future__ import annotations

import argparse
import os
import sys

from esper_jax.runs import plots
from esper_jax.runs.config import RunConfig, RunConfigError, read_config
from esper_jax.runs.rundir import read_json
from experiments.cli import Parser, positive


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m experiments.report",
                    description="Plot a run's learning curves and its held-out seed timelines.")
    parser.add_argument("--run-dir", required=True, help="a run directory written by experiments.ppo")
    parser.add_argument("--no-eval", action="store_true", help="only the learning curves; do not need evaluation.json")
    parser.add_argument("--max-envs", type=positive, default=16, help="held-out envs shown per timeline (default 16)")
    return parser


def _note(config: RunConfig | None, evaluation: dict | None) -> str | None:
    """'SYNTHETIC data' when the run trained (or was evaluated) on the synthetic stand-in."""
    synthetic = bool(config and config.data.synthetic) or bool(evaluation and evaluation.get("synthetic"))
    return "SYNTHETIC data (not the real dataset)" if synthetic else None


def _member_labels(config: RunConfig | None) -> list[str] | None:
    if config is None or config.population < 2:
        return None
    return [f"member {m} (learning_rate={spec.learning_rate:.3g}, ent_coef={spec.ent_coef:.3g})"
            for m, spec in enumerate(config.members)]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def make_report(run_dir: str, *, with_eval: bool = True, max_envs: int = 16) -> list[str]:
    """Write the plots; returns their paths. Raises FileNotFoundError (with the command to run
    first) when an input is missing, plots.MetricsError when metrics.jsonl is unusable."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir} does not exist; train one with "
                                f"`python -m experiments.ppo --task=... --run-dir {run_dir}`")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    eval_path = os.path.join(run_dir, "evaluation.json")
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"{metrics_path} is missing: train first with "
                                f"`python -m experiments.ppo --task=... --run-dir {run_dir}`")
    if with_eval and not os.path.isfile(eval_path):
        raise FileNotFoundError(f"{eval_path} is missing (the seed timelines come from it): run "
                                f"`python -m experiments.evaluate --run-dir {run_dir}` first, or pass --no-eval")
    rows = plots.read_metrics(metrics_path)
    if not rows:
        raise plots.MetricsError(f"{metrics_path} has no complete rows yet")
    config = read_config(run_dir) if os.path.isfile(os.path.join(run_dir, "config.json")) else None
    evaluation = read_json(eval_path) if with_eval else None
    note = _note(config, evaluation)
    labels = _member_labels(config)

    out = os.path.join(run_dir, "plots")
    os.makedirs(out, exist_ok=True)
    written = [
        plots.plot_learning_curves(rows, os.path.join(out, "learning_curves.png"), note=note, member_labels=labels),
        plots.plot_entropy(rows, os.path.join(out, "entropy.png"), note=note, member_labels=labels),
    ]
    if evaluation is not None:
        written.append(plots.plot_comparison(evaluation, os.path.join(out, "evaluation.png"), note=note))
        written.append(plots.plot_eval_loss(evaluation, os.path.join(out, "evaluation_val_loss.png"), note=note))
        if evaluation.get("efficiency"):  # language-model runs
            written.append(plots.plot_efficiency(evaluation, os.path.join(out, "efficiency.png"), note=note))
        frontier_path = os.path.join(run_dir, "frontier.json")
        if os.path.isfile(frontier_path):  # written by experiments.frontier
            written.append(plots.plot_frontier(read_json(frontier_path), os.path.join(out, "frontier.png"), note=note))
        for name, tl in evaluation["timelines"].items():
            final = evaluation["controllers"].get(name, {}).get("final_val_loss_per_env")
            written.append(plots.plot_seed_timeline(tl, os.path.join(out, f"timeline_{_safe(name)}.png"),
                                                    controller=name, note=note, max_envs=max_envs,
                                                    final_val_loss=final))
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = make_report(args.run_dir, with_eval=not args.no_eval, max_envs=args.max_envs)
    except (FileNotFoundError, plots.MetricsError, RunConfigError, ValueError, KeyError) as error:
        message = error if not isinstance(error, KeyError) else f"evaluation.json lacks {error}; rerun experiments.evaluate"
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} plots to {os.path.join(args.run_dir, 'plots')}:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
