"""Several policies on one target's held-out envs, side by side: the transfer table.

    python -m experiments.transfer_table --target-run DIR --rows LABEL=FILE[,LABEL=FILE...]
        [--baselines FILE] [--out FILE.json]

Each ``FILE`` is an evaluation of a policy on the target's held-out envs (``experiments.evaluate``'s
``evaluation.json`` of the target run itself, or a ``transfer-NAME.json`` of another run evaluated
there with ``--target-run DIR``). Every row is paired per env with: static, random and the heuristic
(from ``--baselines``, an evaluation on the same envs that ran them; default the first row file that
did), the target run's own policy (``DIR/evaluation.json``), and, when the target has a
``frontier.json`` (``experiments.frontier``), its best fixed schedule and its static frontier at the
row's compute (:func:`esper_jax.runs.frontier.frontier_gap`). All files must hold the same envs: their
static runs must agree env by env, or the command says which file differs. Prints a markdown table;
``--out`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from experiments.cli import Parser

BASELINES = ("static", "random", "heuristic")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m experiments.transfer_table",
                    description="Several policies on one target run's held-out envs, paired per env.")
    parser.add_argument("--target-run", required=True, help="the run whose held-out envs the rows were evaluated on")
    parser.add_argument("--rows", required=True, help="LABEL=FILE comma-separated: evaluations of a policy there")
    parser.add_argument("--baselines", default=None,
                        help="an evaluation on the same envs with static, random and the heuristic (default: the "
                             "first row file that has them)")
    parser.add_argument("--out", default=None, help="also write the table as JSON here")
    return parser


def _read(path: Path) -> dict:
    """An evaluation or frontier file (a damaged one: :func:`~esper_jax.runs.rundir.read_json`'s one line)."""
    from esper_jax.runs.rundir import read_json

    if not path.is_file():
        raise ValueError(f"{path} does not exist (write it with experiments.evaluate or experiments.frontier)")
    return read_json(path)


def _losses(evaluation: dict, controller: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(evaluation["controllers"][controller]["final_val_loss_per_env"], np.float64)
    except KeyError:
        raise ValueError(f"{path} has no {controller} (evaluate with --controllers including it)") from None


def table(target: Path, rows: list[tuple[str, Path]], baselines: Path | None) -> list[dict]:
    """One dict per row: its loss and compute and the paired differences (:func:`paired_ci`)."""
    from esper_jax.runs.evaluation import paired_ci
    from esper_jax.runs.frontier import frontier_gap

    evaluations = {label: _read(path) for label, path in rows}
    if baselines is None:
        found = [path for label, path in rows if all(b in evaluations[label]["controllers"] for b in BASELINES)]
        if not found:
            raise ValueError("no row file ran static, random and the heuristic: give --baselines FILE")
        baselines = found[0]
    reference = _read(baselines)
    static = _losses(reference, "static", baselines)
    own_path = target / "evaluation.json"
    own = _read(own_path)
    frontier_path = target / "frontier.json"
    frontier = _read(frontier_path) if frontier_path.is_file() else None
    for path, evaluation in [(own_path, own)] + [(p, evaluations[label]) for label, p in rows] + (
            [(frontier_path, {"controllers": frontier["rows"]})] if frontier else []):
        if not np.array_equal(_losses(evaluation, "static", path), static):
            raise ValueError(f"{path} holds other envs than {baselines} (their static runs differ)")
    out = []
    for label, path in rows:
        loss = _losses(evaluations[label], "policy", path)
        flops = np.asarray(evaluations[label]["controllers"]["policy"]["compute"]["flops_per_env"], np.float64)
        row = {"row": label, "file": str(path), "final_val_loss": float(loss.mean()), "gflops": float(flops.mean() / 1e9),
               **{f"minus_{b}": paired_ci(loss - _losses(reference, b, baselines)) for b in BASELINES},
               "minus_target_policy": paired_ci(loss - _losses(own, "policy", own_path))}
        if frontier:
            fixed = np.asarray(frontier["rows"]["best_fixed_2"]["final_val_loss_per_env"], np.float64)
            networks = frontier["frontier"]["networks"]
            gap = frontier_gap(loss, flops, np.asarray([frontier["rows"][n]["final_val_loss_per_env"] for n in networks]),
                               np.asarray(frontier["frontier"]["flops"], np.float64))
            row.update(minus_best_fixed=paired_ci(loss - fixed), minus_frontier=gap["minus_frontier_ci"],
                       compute_ratio=gap["compute_ratio"])
        out.append(row)
    return out


def markdown(rows: list[dict]) -> str:
    from esper_jax.runs.evaluation import ci_text

    frontier = all("minus_frontier" in r for r in rows)
    head = ["row", "final val loss", "GFLOPs", "minus static", "minus random", "minus heuristic",
            "minus the target's own policy"] + (["minus its best fixed schedule", "minus the frontier at its compute",
                                                 "compute / frontier's"] if frontier else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["row"], f"{r['final_val_loss']:.4f}", f"{r['gflops']:.1f}"] + [
            ci_text(r[k]) for k in ("minus_static", "minus_random", "minus_heuristic", "minus_target_policy")]
        if frontier:
            cells += [ci_text(r["minus_best_fixed"]), ci_text(r["minus_frontier"]), f"{r['compute_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = []
        for item in args.rows.split(","):
            label, sep, path = item.partition("=")
            if not sep or not label.strip() or not path.strip():
                raise ValueError(f"--rows: {item!r} is not LABEL=FILE")
            rows.append((label.strip(), Path(path.strip())))
        result = table(Path(args.target_run), rows, None if args.baselines is None else Path(args.baselines))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
