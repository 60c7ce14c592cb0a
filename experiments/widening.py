"""Does widening the host mid-episode pay? A run's host trained narrow, widened at epoch ``e``,
against the narrow and the wide static networks on the same envs, at equal compute.

    python -m experiments.widening --run-dir DIR [--stream calibration] [--envs 8] [--at 1,3,5]
        [--factor 2] [--init fresh|preserve] [--lr-scales NARROW,WIDE] [--json PATH]

Each env trains the run's host (static controller: no seed) for ``e`` epochs; then its parameters
and optimizer moments are carried into the host at ``--factor`` times its width
(:mod:`esper_jax.lattice.hosts.widening`: ``fresh`` keeps the added weights as initialized,
``preserve`` keeps the function), which trains the episode's remaining epochs on the same batches
(the schedule goes on where it was). The references train on the same envs and batches: the
narrow host for the whole episode and the wide host (the same widened architecture) from epoch 0.
Each trains at its learning rate from the run's static frontier (``frontier.json``: the best of
the run's scales on calibration envs, the narrow network's and the wide one's; the widened host
at the wide one's after widening), or at ``--lr-scales``.

Compute is counted as :mod:`esper_jax.runs.compute` counts a static network's episode: every
epoch's training batches and validation forward through the host that trained it, and the reset's
validation. Reported, paired over envs with 95% intervals: each widening's final loss minus the
line between the narrow and the wide network (in log compute) at its compute, and on the held-out
stream of a run whose frontier was measured, minus that frontier at its compute. Calibrate (which
epoch, which init) on ``--stream calibration`` (the default); evaluate the choice once on
``--stream held-out``. Writes ``widening-STREAM.json`` and ``.md`` into the run directory (or
``--json`` and its ``.md`` twin).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from pathlib import Path

from experiments.cli import Parser, positive

STREAMS = ("calibration", "held-out")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m experiments.widening",
                    description="Widening the host mid-episode against the narrow and wide static networks.")
    parser.add_argument("--run-dir", required=True, help="a run directory (its configuration and, for the learning "
                        "rates and the held-out comparison, its frontier.json)")
    parser.add_argument("--stream", choices=STREAMS, default="calibration",
                        help="calibration envs (choose here) or the held-out envs (evaluate the choice once)")
    parser.add_argument("--envs", type=positive, default=8, help="envs (default 8)")
    parser.add_argument("--at", default="1,3,5", help="epochs to widen at, comma-separated (default 1,3,5)")
    parser.add_argument("--factor", type=positive, default=2, help="width multiple (default 2)")
    parser.add_argument("--init", choices=("fresh", "preserve"), default="fresh",
                        help="added weights as initialized (fresh) or cut so the function is kept (preserve)")
    parser.add_argument("--lr-scales", help="NARROW,WIDE: learning-rate scales (times the run's host rate); "
                        "default: the narrow and wide networks' from the run's frontier.json")
    parser.add_argument("--json", help="where to write the JSON (default RUN_DIR/widening-STREAM.json)")
    return parser


def parse_epochs(text: str, episode_epochs: int) -> tuple[int, ...]:
    try:
        epochs = sorted({int(t) for t in text.split(",")})
    except ValueError:
        raise ValueError(f"--at must be epochs separated by commas, got {text!r}") from None
    if not epochs or epochs[0] < 1 or epochs[-1] >= episode_epochs:
        raise ValueError(f"--at: epochs to widen at must be in 1..{episode_epochs - 1} (the episode has "
                         f"{episode_epochs}), got {text!r}")
    return tuple(epochs)


def lr_scales(text: str | None, frontier: dict | None, names: tuple[str, str]) -> tuple[float, float]:
    if text is not None:
        try:
            narrow, wide = (float(t) for t in text.split(","))
        except ValueError:
            raise ValueError(f"--lr-scales must be NARROW,WIDE (two numbers), got {text!r}") from None
        if not (narrow > 0 and wide > 0):
            raise ValueError(f"--lr-scales must be positive, got {text!r}")
        return narrow, wide
    rows = (frontier or {}).get("rows", {})
    missing = [n for n in names if "lr_scale" not in rows.get(n, {})]
    if missing:
        raise ValueError(f"the run's frontier.json has no learning rate for {', '.join(missing)}: run "
                         f"experiments.frontier on it first, or give --lr-scales NARROW,WIDE")
    return float(rows[names[0]]["lr_scale"]), float(rows[names[1]]["lr_scale"])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    import jax
    import numpy as np

    from esper_jax.env.controllers import make_controller
    from esper_jax.lattice.hosts.widening import widen_moments, widen_params, widened_host
    from esper_jax.runs import evaluation as ev
    from esper_jax.runs import frontier as fr
    from esper_jax.runs.build import build, build_env
    from esper_jax.runs.config import CONFIG_FILE, RunConfigError, read_config
    from esper_jax.runs.loop import USER_ERRORS
    from esper_jax.runs.rundir import read_json

    run_dir = Path(args.run_dir)
    try:
        if not (run_dir / CONFIG_FILE).is_file():
            raise RunConfigError(f"{run_dir} is not a run directory ({CONFIG_FILE} is missing)")
        config = read_config(run_dir)
        wide_host = widened_host(config.host, args.factor)
        epochs = parse_epochs(args.at, config.env.episode_epochs)
        frontier = read_json(run_dir / "frontier.json") if (run_dir / "frontier.json").is_file() else None
        # the frontier's names of the narrow host and of the static network as wide as the widened one
        names = (fr.network_name("host", config.host), fr.network_name("host", wide_host))
        if args.stream == "held-out" and frontier is not None and args.envs != frontier["held_out"]["num_envs"]:
            raise RunConfigError(f"--envs {args.envs}: on the held-out stream the comparison with the run's frontier "
                                 f"needs the frontier's {frontier['held_out']['num_envs']} held-out envs")
        scale_n, scale_w = lr_scales(args.lr_scales, frontier, names)
        json_path = Path(args.json) if args.json else run_dir / f"widening-{args.stream}.json"
        if not json_path.parent.is_dir():
            raise RunConfigError(f"--json {json_path}: directory {json_path.parent} does not exist")
        built = build(config)
        env_n = fr.with_lr_scale(built.env)
        env_w = fr.with_lr_scale(build_env(config.replace(host=wide_host), built.dataset)[2])
    except (ValueError,) + USER_ERRORS as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    data, n, total = built.env_data, args.envs, config.env.episode_epochs
    key = fr.calibration_key(config.seed) if args.stream == "calibration" else ev.held_out_key(config.seed)
    reset_keys, step_keys, _ = ev.episode_keys(key, n, total)

    def start(env, scale):
        _, state = jax.jit(env.population_reset)(reset_keys, data)
        return fr.prepare_members(env, np.full(n, scale))(state)

    def epoch_step(env):
        """One epoch of every env under the static controller (one compiled program per host)."""
        static = make_controller("static", env)

        @jax.jit
        def step(state, keys):
            return env.population_step(keys, state, jax.vmap(static)(keys, state), data)[1]
        return step

    def train(step, state, first, last, curve):
        for e in range(first, last):
            state = step(state, step_keys[e])
            curve.append(float(np.mean(state.val_loss)))
        return state

    costs_n, costs_w = env_n.model_costs(data), env_w.model_costs(data)
    spe = config.env.steps_per_epoch
    epoch_cost = lambda costs: spe * costs.host_train + costs.host_eval

    def flops(widen_at: int) -> float:
        """The reset's validation, then each epoch through the host that trained it (as a static
        network's episode is counted in esper_jax.runs.compute)."""
        first = costs_n if widen_at > 0 else costs_w
        return first.host_eval + widen_at * epoch_cost(costs_n) + (total - widen_at) * epoch_cost(costs_w)

    step_n, step_w = epoch_step(env_n), epoch_step(env_w)
    wide_start = start(env_w, scale_w)
    widen = jax.jit(jax.vmap(functools.partial(widen_params, init=args.init)))
    carry = jax.jit(jax.vmap(widen_moments))
    rows, curves = {}, {}

    def record(name, state, compute, widen_at, curve, seconds):
        rows[name] = {"widen_at": widen_at, "final_val_loss_per_env": np.asarray(state.val_loss, np.float64).tolist(),
                      "final_val_loss": float(np.mean(state.val_loss)), "flops": compute,
                      "flops_per_env": [compute] * n, "seconds": seconds}
        curves[name] = curve
        print(f"  {name}: final val loss {rows[name]['final_val_loss']:.4f}, {compute / 1e9:.1f} GFLOPs "
              f"({seconds:.0f} s)", flush=True)

    def timed(fn, *args):
        t = time.perf_counter()
        return fn(*args), time.perf_counter() - t

    print(f"widening {names[0]} x{args.factor} ({args.init}) on {n} {args.stream} envs of {built.data_label}; "
          f"learning-rate scales narrow x{scale_n:g}, wide x{scale_w:g}", flush=True)
    curve = []
    wide_state, seconds = timed(train, step_w, wide_start, 0, total, curve)
    record("wide", wide_state, flops(0), 0, curve, seconds)
    # one narrow episode, branched off at each widening epoch
    curve, narrow_seconds = [], 0.0
    state, done = start(env_n, scale_n), 0
    for widen_at in epochs:
        (state, seconds), done = timed(train, step_n, state, done, widen_at, curve), widen_at
        narrow_seconds += seconds
        t = time.perf_counter()
        grown = wide_start.train
        inner_n, _ = state.train.host_opt_state
        inner_w, injected_w = grown.host_opt_state
        grown = grown.replace(host_params=widen(state.train.host_params, grown.host_params),
                              host_opt_state=(carry(inner_n, inner_w), injected_w))
        grown_curve = list(curve)
        grown_state = train(step_w, state.replace(train=grown, snapshot=grown), widen_at, total, grown_curve)
        record(f"widen@e{widen_at}", grown_state, flops(widen_at), widen_at, grown_curve, time.perf_counter() - t)
    state, seconds = timed(train, step_n, state, done, total, curve)
    record("narrow", state, flops(total), total, curve, narrow_seconds + seconds)

    payload = widening_payload(rows, curves, frontier if args.stream == "held-out" else None, names=names,
                               args=args, config=config, data_label=built.data_label, synthetic=built.synthetic,
                               scales=(scale_n, scale_w))
    payload["wall_seconds"] = time.perf_counter() - started
    table = markdown(payload)
    print(table)
    ev.write_json_and_markdown(json_path, payload, table)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0


def widening_payload(rows, curves, frontier, *, names, args, config, data_label, synthetic, scales) -> dict:
    """Every row against the narrow-wide line (and the run's frontier, given its held-out rows)."""
    import numpy as np

    from esper_jax.runs import frontier as fr
    from esper_jax.runs.evaluation import paired_ci

    line_losses = np.asarray([rows["narrow"]["final_val_loss_per_env"], rows["wide"]["final_val_loss_per_env"]])
    line_compute = np.asarray([rows["narrow"]["flops"], rows["wide"]["flops"]])
    envelope = None
    if frontier is not None:
        envelope = frontier["frontier"]["networks"]
        f_losses = np.asarray([frontier["rows"][k]["final_val_loss_per_env"] for k in envelope], np.float64)
        f_compute = np.asarray(frontier["frontier"]["flops"], np.float64)
    for name, r in rows.items():
        loss, compute = np.asarray(r["final_val_loss_per_env"]), np.asarray(r["flops_per_env"])
        r["minus_line_ci"] = paired_ci(loss - fr.frontier_at(compute, line_losses, line_compute))
        r["compute_over_wide"] = r["flops"] / rows["wide"]["flops"]
        if envelope is not None:
            r.update(fr.frontier_gap(loss, compute, f_losses, f_compute))
    reproduced = None
    if frontier is not None and names[0] in frontier["rows"]:
        # the narrow host trained here (another compiled program) against the frontier's own run of it
        reproduced = float(np.max(np.abs(np.asarray(rows["narrow"]["final_val_loss_per_env"])
                                         - np.asarray(frontier["rows"][names[0]]["final_val_loss_per_env"]))))
    return {
        "version": 1, "run_dir": str(args.run_dir), "task": config.task, "data": data_label, "synthetic": bool(synthetic), "stream": args.stream,
        "envs": args.envs, "factor": args.factor, "init": args.init, "narrow": names[0], "wide_static": names[1],
        "lr_scales": {"narrow": scales[0], "wide": scales[1]}, "episode_epochs": config.env.episode_epochs,
        "frontier_networks": envelope, "narrow_reproduced_max_abs_difference": reproduced,
        "rows": rows, "curves": curves,
        "definitions": {
            "minus_line": "final loss minus the line between the narrow and the wide network trained here (final "
                          "losses on the same env, piecewise-linear in log compute) at the row's compute, paired "
                          "over envs, 95% CI",
            "minus_frontier": "on the held-out stream: final loss minus the run's static frontier (frontier.json) at "
                              "the row's compute, paired over envs, 95% CI",
            "flops": "the reset's validation forward, then every epoch's training batches (forward and backward) "
                     "and validation forward through the host that trained it",
        },
    }


def markdown(payload: dict) -> str:
    from esper_jax.runs.evaluation import ci_text
    from esper_jax.runs.frontier import ratio_text

    label = ("**SYNTHETIC data**: these results are on the synthetic stand-in, not the real dataset.\n\n"
             if payload["synthetic"] else f"Data: {payload['data']}.\n\n")
    stream = ("calibration envs (fold_in(key(seed), 0xca11b))" if payload["stream"] == "calibration"
              else "held-out envs (fold_in(key(seed), 0x45564c31))")
    lines = [label + f"Widening `{payload['narrow']}` x{payload['factor']} ({payload['init']}) mid-episode, task "
             f"{payload['task']}, {payload['envs']} {stream}, {payload['episode_epochs']}-epoch episodes; learning-rate "
             f"scales narrow x{payload['lr_scales']['narrow']:g}, wide x{payload['lr_scales']['wide']:g}.", ""]
    frontier = payload["frontier_networks"] is not None
    header = "| row | final val loss | GFLOPs | compute / wide | minus narrow-wide line [95% CI] (lower in) |"
    rule = "|---|---|---|---|---|"
    if frontier:
        header += " minus frontier at its compute [95% CI] (lower in) | compute / frontier's for its loss |"
        rule += "---|---|"
    lines += [header, rule]
    for name, r in sorted(payload["rows"].items(), key=lambda item: item[1]["flops"]):
        cells = [name, f"{r['final_val_loss']:.4f}", f"{r['flops'] / 1e9:.1f}", f"{r['compute_over_wide']:.2f}",
                 ci_text(r["minus_line_ci"])]
        if frontier:
            cells += [ci_text(r["minus_frontier_ci"]), ratio_text(r)]
        lines.append("| " + " | ".join(cells) + " |")
    if frontier:
        lines += ["", f"Frontier: {', '.join(payload['frontier_networks'])} (frontier.json); the narrow host trained "
                      f"here against the frontier's run of it: largest per-env difference "
                      f"{payload['narrow_reproduced_max_abs_difference']:.2e}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
