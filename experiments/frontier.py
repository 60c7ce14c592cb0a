"""Was growing worth it? A run's controllers against the static frontier and the best fixed
schedule, at equal compute, on the held-out envs of its evaluation.

    python -m experiments.frontier --run-dir DIR [--calibration-envs 8] [--lr-scales 0.5,1,2]
        [--widths 0.5,1,2,4] [--data synthetic|PATH] [--data-dir PATH]

Reads ``DIR/config.json`` and ``DIR/evaluation.json`` (written by ``experiments.evaluate``; its
controllers' per-env losses and timelines are compared as they are, no checkpoint is needed), then:

1. **calibration** (envs from ``fold_in(key(seed), 0xCA11B)``, never the held-out stream): the fixed
   schedule sweep (single seeds, then later plantings and pairs of the best) and every static
   network's learning-rate sweep; written to ``DIR/calibration.json``, which
   ``experiments.evaluate`` then reads for its ``best_fixed_1``/``best_fixed_2`` columns;
2. **held-out** (the evaluation's envs): the best fixed schedules, static (checked against the
   evaluation's), and every static network of the family at its calibrated rate;
3. **compute** of every episode in FLOPs (:mod:`esper_jax.runs.compute`), the frontier and each
   controller's distance below it (:mod:`esper_jax.runs.frontier`); for a run that chooses among a
   menu of plans, the ceiling of any policy over that menu (its best plan on each env, known after
   the fact).

Writes ``DIR/frontier.json`` and ``DIR/frontier.md`` and prints the table;
``experiments.report`` draws ``plots/frontier.png`` from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from experiments.cli import Parser, positive

FRONTIER_FILE = "frontier.json"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m experiments.frontier",
                    description="A run's controllers against the static frontier and the best fixed schedule.")
    parser.add_argument("--run-dir", required=True, help="a run directory with config.json and evaluation.json")
    parser.add_argument("--calibration-envs", type=positive, default=8,
                        help="calibration envs for the schedule and learning-rate sweeps (default 8)")
    parser.add_argument("--lr-scales", default=None,
                        help="comma-separated multiples of the run's host learning rate each static network tries "
                             "(default 0.5,1,2)")
    parser.add_argument("--widths", default=None,
                        help="comma-separated multiples of the host's width for the static family (default 0.5,1,2,4 "
                             "for a CNN host, 1,2 for a transformer, each at its depth and twice it)")
    parser.add_argument("--rerender", action="store_true",
                        help="run nothing: recompute frontier.json's comparisons and frontier.md from the rows it holds "
                             "(after a change of how they are computed)")
    parser.add_argument("--data", default=None, help="read the data from elsewhere than the run did: synthetic or a path")
    parser.add_argument("--data-dir", default=None, help="directory of the real dataset, if it moved")
    return parser


def parse_multiples(text: str | None, option: str, default: tuple[float, ...] | None = None) -> tuple[float, ...] | None:
    """A comma-separated list of positive numbers (``default`` when not given)."""
    if text is None:
        return default
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"{option} must be positive numbers, got {text!r}")
    return values


def _read_evaluation(run_dir: Path) -> dict:
    path = run_dir / "evaluation.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing: evaluate the run first with `python -m experiments.evaluate "
                         f"--run-dir {run_dir} --envs 16`")
    try:
        payload = json.loads(path.read_text())
        payload["timelines"], payload["controllers"], payload["held_out"]["num_envs"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not an evaluation written by experiments.evaluate ({error}): evaluate again") from None
    return payload


def _run_all(evaluator, data, key, names) -> dict:
    """One episode of each named controller, printed as it ends."""
    import numpy as np

    out = {}
    for name in names:
        t = time.perf_counter()
        out[name] = evaluator.run(name, data, key)
        print(f"    {name}: final val loss {np.mean(out[name].final_val_loss):.4f} ({time.perf_counter() - t:.0f} s)",
              flush=True)
    return out


def sweep_schedules(env, data, key, num_envs: int) -> tuple[dict, dict[str, float]]:
    """The fixed-schedule sweep on calibration envs: every single seed at epoch 0, then the best
    three later and pairs of the best four. Returns the schedules by name and their mean final loss."""
    import numpy as np

    from esper_jax.env.controllers import make_scripted_controller, schedule_name
    from esper_jax.runs import evaluation as ev
    from esper_jax.runs import frontier as fr

    def run(schedules, controllers):
        evaluator = ev.Evaluator(env, num_envs, controllers,
                                 scripted={n: make_scripted_controller(env, s) for n, s in schedules.items()})
        return {n: float(np.mean(o.final_val_loss)) for n, o in _run_all(evaluator, data, key, evaluator.names).items()}

    round1 = {schedule_name(s): s for s in fr.schedule_candidates(env)}
    scores = run(round1, ("static",))
    ranked = sorted(round1.values(), key=lambda s: scores[schedule_name(s)])
    round2 = {schedule_name(s): s for s in fr.later_and_pairs(ranked, env.config.episode_epochs)}
    scores.update(run(round2, ()))
    return {**round1, **round2}, scores


def calibrate_networks(config, built, family, scales, num_envs: int, key, built_in_key) -> dict[str, dict]:
    """Each static network's learning-rate scale: the one with the lowest mean final loss on the
    calibration envs (all scales in one program, each env repeated once per scale)."""
    import numpy as np

    from esper_jax.runs import frontier as fr
    from esper_jax.runs.build import build_env
    from esper_jax.runs.config import RunConfigError

    networks = {}
    for net in family:
        try:
            net_env = fr.with_lr_scale(build_env(config.replace(host=net.host), built.dataset)[2])
        except (ValueError, RunConfigError) as error:
            print(f"    {net.name}: skipped ({error})", flush=True)
            continue
        t = time.perf_counter()
        evaluator = fr.network_evaluator(net_env, num_envs, np.tile(scales, num_envs), net.built_in, built_in_key,
                                         repeats=len(scales))
        losses = evaluator.run("static", built.env_data, key).final_val_loss.reshape(num_envs, len(scales))
        means = np.nanmean(np.where(np.isfinite(losses), losses, np.nan), axis=0)
        best = int(np.nanargmin(means))
        networks[net.name] = {"net": net, "env": net_env, "lr_scale": scales[best],
                              "calibration_loss_by_scale": {f"{s:g}": float(m) for s, m in zip(scales, means)}}
        print(f"    {net.name}: " + ", ".join(f"x{s:g} {m:.4f}" for s, m in zip(scales, means))
              + f" -> x{scales[best]:g} ({time.perf_counter() - t:.0f} s)", flush=True)
    return networks


def network_row(name: str, network: dict, data, envs: int, key, built_in_key) -> dict:
    """A static network on the held-out envs at its calibrated rate: its losses and compute."""
    import numpy as np

    from esper_jax.runs import compute as cp
    from esper_jax.runs import frontier as fr

    net, net_env = network["net"], network["env"]
    t = time.perf_counter()
    evaluator = fr.network_evaluator(net_env, envs, np.full(envs, network["lr_scale"]), net.built_in, built_in_key)
    out = evaluator.run("static", data, key)
    comp = cp.output_compute(net_env.model_costs(data), out, net_env.config.steps_per_epoch, measured=False)
    lattice = net_env.lattice
    seeds = sum(lattice.blueprints[lattice.blueprint_index(b)].num_params(lattice.slots.slots[lattice.slots.index(s)].dim)
                for s, b in net.built_in)
    row = {"kind": fr.STATIC_NETWORK, "description": net.description, "lr_scale": network["lr_scale"],
           "params": net_env.host_param_count + seeds,
           "final_val_loss_per_env": [float(v) for v in out.final_val_loss], **cp.compute_summary(comp)}
    print(f"    {name}: final val loss {np.mean(out.final_val_loss):.4f}, {row['flops']:.3g} FLOPs "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    return row


def rerender(run_dir: Path) -> int:
    """``--rerender``: the payload and table again from the rows of an existing frontier.json."""
    from esper_jax.runs import evaluation as ev
    from esper_jax.runs import frontier as fr

    from esper_jax.runs.config import read_config

    path = run_dir / FRONTIER_FILE
    try:
        old = json.loads(path.read_text())
        held = old["held_out"]
        payload = fr.frontier_payload(old["rows"], envs=held["num_envs"], run_seed=held["run_seed"], task=old["task"],
                                      data_label=old["data"], synthetic=old["synthetic"], host_params=old["host_params"],
                                      run_dir=old["run_dir"], calibration=old.get("calibration"),
                                      static_check=old.get("static_reproduced_max_abs_difference"),
                                      menu=read_config(run_dir).ppo.plans)
    except (OSError, ValueError, KeyError, TypeError) as error:  # RunConfigError among them
        print(f"error: {path} cannot be rerendered ({error}): run `python -m experiments.frontier --run-dir {run_dir}`",
              file=sys.stderr)
        return 2
    payload["wall_seconds"] = old.get("wall_seconds")
    markdown = fr.markdown(payload)
    ev.write_json_and_markdown(path, payload, markdown)
    print(markdown)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    import jax
    import numpy as np

    from esper_jax.env.controllers import make_scripted_controller
    from esper_jax.runs import compute as cp
    from esper_jax.runs import evaluation as ev
    from esper_jax.runs import frontier as fr
    from esper_jax.runs.build import build
    from esper_jax.runs.config import CONFIG_FILE, RunConfigError, read_config
    from esper_jax.runs.loop import USER_ERRORS
    from esper_jax.runs.rundir import write_json

    run_dir = Path(args.run_dir)
    if args.rerender:
        return rerender(run_dir)
    try:
        scales = parse_multiples(args.lr_scales, "--lr-scales", fr.LR_SCALES)
        widths = parse_multiples(args.widths, "--widths")
        if not (run_dir / CONFIG_FILE).is_file():
            raise RunConfigError(f"{run_dir} is not a run directory ({CONFIG_FILE} is missing)")
        config = read_config(run_dir)
        fr.check_family(config)
        evaluation = _read_evaluation(run_dir)
        built = build(config, data=args.data, data_dir=args.data_dir)
    except USER_ERRORS + (ValueError,) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    env, data = built.env, built.env_data
    envs = int(evaluation["held_out"]["num_envs"])
    seed = int(evaluation["held_out"]["run_seed"])
    held_key, cal_key = ev.held_out_key(seed), fr.calibration_key(seed)
    built_in_key = jax.random.fold_in(held_key, fr.BUILT_IN_STREAM)
    print(f"frontier of run {run_dir} ({built.data_label}): {envs} held-out envs (stream fold_in(key({seed}), "
          f"{ev.EVAL_STREAM:#x})), {args.calibration_envs} calibration envs (fold_in(key({seed}), "
          f"{fr.CALIBRATION_STREAM:#x}))", flush=True)

    # 1. calibration envs: the fixed schedules, then every static network's learning rate
    print("calibration: fixed schedules", flush=True)
    schedules, scores = sweep_schedules(env, data, cal_key, args.calibration_envs)
    best = {fr.BEST_FIXED_1: min((n for n, s in schedules.items() if len(s) == 1), key=scores.get),
            fr.BEST_FIXED_2: min(schedules, key=scores.get)}
    architectures = {name: fr.final_architecture(t) for name, t in evaluation["timelines"].items()}
    architectures.update({name: tuple((s.slot, s.blueprint) for s in schedules[n]) for name, n in best.items()})
    print("calibration: static networks' learning rates", flush=True)
    networks = calibrate_networks(config, built, fr.static_family(config, architectures, widths), scales,
                                  args.calibration_envs, cal_key, built_in_key)
    calibration = {
        "run_seed": seed, "stream": f"fold_in(key({seed}), {fr.CALIBRATION_STREAM:#x})",
        "num_envs": args.calibration_envs, "synthetic": built.synthetic, "data": built.data_label,
        "schedules": {n: {"final_val_loss": scores[n], "seeds": [dataclasses.asdict(s) for s in schedules[n]]}
                      for n in sorted(schedules, key=scores.get)},
        **best, "lr_scales": list(scales), "host_lr": config.env.host_lr,
        "static_networks": {n: {"lr_scale": r["lr_scale"], "calibration_loss_by_scale": r["calibration_loss_by_scale"]}
                            for n, r in networks.items()},
    }
    write_json(str(run_dir / fr.CALIBRATION_FILE), calibration)
    print(f"  best fixed schedules on calibration envs: single {best[fr.BEST_FIXED_1]} "
          f"({scores[best[fr.BEST_FIXED_1]]:.4f}), any {best[fr.BEST_FIXED_2]} ({scores[best[fr.BEST_FIXED_2]]:.4f}); "
          f"wrote {run_dir / fr.CALIBRATION_FILE}", flush=True)

    # 2. held-out envs: the evaluation's controllers as they are, the best fixed schedules, static
    # (checked against the evaluation's), and every static network at its calibrated rate
    print("held-out: best fixed schedules and static", flush=True)
    fixed = ev.Evaluator(env, envs, ("static",),
                         scripted={name: make_scripted_controller(env, schedules[n]) for name, n in best.items()})
    fixed_out = _run_all(fixed, data, held_key, fixed.names)
    stored_static = np.asarray(evaluation["controllers"].get("static", {}).get("final_val_loss_per_env") or [], float)
    static_check = (float(np.max(np.abs(stored_static - fixed_out["static"].final_val_loss)))
                    if stored_static.size == envs else None)
    costs, steps = env.model_costs(data), env.config.steps_per_epoch
    rows = {}
    for name, timeline in evaluation["timelines"].items():
        comp, how = cp.timeline_compute(costs, timeline, steps)
        rows[name] = {"kind": "controller", "trained_stages": how, **cp.compute_summary(comp),
                      "final_val_loss_per_env": evaluation["controllers"][name]["final_val_loss_per_env"]}
    for name, schedule in best.items():
        out = fixed_out[name]
        comp = cp.output_compute(costs, out, steps)
        rows[name] = {"kind": "fixed schedule", "schedule": schedule, "trained_stages": "recorded",
                      "final_val_loss_per_env": [float(v) for v in out.final_val_loss], **cp.compute_summary(comp)}
    print("held-out: static networks", flush=True)
    for name, network in networks.items():
        rows[name] = network_row(name, network, data, envs, held_key, built_in_key)

    # 3. the frontier and every row against it
    payload = fr.frontier_payload(rows, envs=envs, run_seed=seed, task=config.task, data_label=built.data_label,
                                  synthetic=built.synthetic, host_params=env.host_param_count, run_dir=str(run_dir),
                                  calibration=calibration, static_check=static_check, menu=config.ppo.plans)
    payload["wall_seconds"] = time.perf_counter() - started
    markdown = fr.markdown(payload)
    ev.write_json_and_markdown(run_dir / FRONTIER_FILE, payload, markdown)
    print()
    print(markdown)
    if built.synthetic:
        print("NOTE: these results are on SYNTHETIC data, not the real dataset.")
    print(f"wrote {run_dir / FRONTIER_FILE} and {run_dir / 'frontier.md'} ({payload['wall_seconds']:.0f} s); "
          f"plots: python -m experiments.report --run-dir {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
