"""How much can a controller gain? Fixed growth schedules against static, on held-out envs.

    python -m experiments.headroom --run-dir DIR [--envs 16] [--schedules conv_heavy@r1c0@e0,...]
    python -m experiments.headroom --task cifar10 --preset proof [--envs 16] [--json PATH] [any experiments.ppo
        setting by its name: --data synthetic, --host-lr 0.05, --slots ...]
    python -m experiments.headroom --task cifar10 --preset default --stream calibration --envs 24
        --strata train_fraction:3        # which schedule is best where in the problem family
    python -m experiments.headroom ... --schedules conv_heavy@r2c0@e0 --built-in conv_heavy@r2c0
                                         # growing a seed against the same network trained from the start

Each schedule germinates one seed (``blueprint@slot@eEPOCH``), advances it whenever the gates
allow and fossilizes it as soon as G5 passes (:class:`esper_jax.env.controllers.Schedule`). Every
schedule, static and the heuristic run one episode on the same held-out envs as
``experiments.evaluate`` uses (same reset keys, same batches: the run seed's held-out stream, which
training never draws from), so the paired difference to static is what the growth decision
changed. The default schedules are every enabled blueprint in every slot, germinated at epoch 0.
``--stream calibration`` uses the calibration envs instead (``fold_in(key(seed), 0xCA11B)``, what
problem design and schedule choices may be tuned on; the held-out stream is for the final
evaluation). Every controller's training compute is counted in FLOPs (:mod:`esper_jax.runs.compute`),
and ``--strata DIM:N`` splits the envs into N quantile bins of their drawn problem's ``DIM``
(train_fraction or label_noise) and names the best controller in each, by loss and by the loss
priced as the reward prices compute (:mod:`esper_jax.runs.strata`). ``--built-in`` adds static
networks with seeds built in from epoch 0 (``built_in:blueprint@slot[+blueprint@slot]``, trained at
the run's own rates, as :mod:`esper_jax.runs.frontier` builds them): how far growing a seed is from
the network it grows into, on the same envs.

Prints the table (paired mean difference to static with its 95% confidence interval) and writes
``headroom.json`` and ``headroom.md`` into the run directory (or to ``--json``/its ``.md`` twin).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

from esper_jax.runs import compute as cp
from esper_jax.runs import evaluation as ev
from esper_jax.runs import frontier as fr
from esper_jax.runs import strata as st
from esper_jax.runs import settings as run_settings
from esper_jax.runs.build import build
from esper_jax.runs.config import RunConfigError, read_config
from esper_jax.runs.loop import USER_ERRORS
from esper_jax.env.controllers import Schedule, make_scripted_controller, parse_schedules
from experiments.cli import Parser, add_env_settings, given_settings, positive


OWN_OPTIONS = ("run_dir", "envs", "schedules", "tempo", "json", "stream", "strata", "built_in")
STREAMS = ("held-out", "calibration")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m experiments.headroom",
                    description="Fixed growth schedules against static on held-out envs.",
                    argument_default=argparse.SUPPRESS)
    g = parser.add_argument_group("run")
    where = g.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir", help="use this run's configuration (written by experiments.ppo)")
    where.add_argument("--task", help="resolve a configuration from --preset and the settings given, as "
                       "experiments.ppo does, instead of a run")
    g.add_argument("--preset", help=f"with --task: one of {', '.join(run_settings.PRESETS)}")
    g.add_argument("--seed", type=int, help="with --task: the run seed whose held-out stream is used (default 0)")
    g.add_argument("--envs", type=positive, default=16, help="held-out envs (default 16)")
    g.add_argument("--schedules", default=None,
                   help="comma-separated blueprint@slot[@eEPOCH] (default: every blueprint in every slot at epoch 0)")
    g.add_argument("--tempo", type=positive, default=3, help="blend tempo of the schedules, epochs (default 3)")
    g.add_argument("--json", default=None, help="where to write the results (default RUN_DIR/headroom.json)")
    g.add_argument("--stream", choices=STREAMS, default="held-out",
                   help="which envs: the run seed's held-out stream (default), or its calibration stream (for "
                        "choosing a problem or a schedule)")
    g.add_argument("--strata", default=None, metavar="DIM:N",
                   help="compare controllers within N quantile bins of the envs' drawn train_fraction or label_noise, "
                        "e.g. train_fraction:3")
    g.add_argument("--built-in", default=None, metavar="NETWORKS",
                   help="comma-separated static networks with seeds built in from epoch 0, each blueprint@slot joined "
                        "by + (e.g. conv_heavy@r2c0,depthwise@r2c0+conv_heavy@r1c0), trained at the run's rates")
    add_env_settings(parser, skip=("--envs",))  # with --task: any experiments.ppo setting by its name
    return parser


def default_schedules(env) -> list[Schedule]:
    return [Schedule(b.name, slot) for slot in env.lattice.slots.slot_ids for b in env.lattice.blueprints if not b.is_noop]


def parse_built_in(text: str | None, env) -> dict[str, tuple[tuple[str, str], ...]]:
    """``--built-in``: row name -> the ``(slot, blueprint)`` seeds built in; a ValueError naming
    a bad network (an epoch, a slot used twice, a blueprint or slot the run does not have)."""
    networks = {}
    for network in (text.split(",") if text else []):
        if any(part.count("@") == 2 for part in network.split("+")):
            raise ValueError(f"--built-in {network}: a built-in seed is there from epoch 0; write blueprint@slot "
                             "without @eEPOCH")
        seeds = parse_schedules(network)
        make_scripted_controller(env, seeds)  # the run has these slots and blueprints
        networks["built_in:" + network] = tuple((s.slot, s.blueprint) for s in seeds)
    return networks


def built_in_results(env, networks, num_envs: int, data, key) -> dict:
    """Each built-in network's episode on the envs of ``key`` (the static controller, seeds
    FOSSILIZED at alpha 1 from epoch 0)."""
    net_env = fr.with_lr_scale(env)  # scale 1: the run's own host rate
    results = {}
    for name, seeds in networks.items():
        t = time.perf_counter()
        evaluator = fr.network_evaluator(net_env, num_envs, np.ones(num_envs), seeds,
                                         jax.random.fold_in(key, fr.BUILT_IN_STREAM))
        results[name] = evaluator.run("static", data, key)
        print(f"  {name}: final val loss {np.mean(results[name].final_val_loss):.4f} ({time.perf_counter() - t:.0f} s)",
              flush=True)
    return results


def headroom_table(payload: dict) -> str:
    lines = []
    if payload["synthetic"]:
        lines += ["**SYNTHETIC data**: these results are on the synthetic stand-in, not the real dataset.", ""]
    held = payload["held_out"]
    lines += [f"Headroom on task {payload['task']} ({payload['data']}): {held['num_envs']} "
              f"{payload.get('stream', 'held-out')} envs x "
              f"{held['episode_epochs']} epochs (stream {held['derivation']}); host {payload['host_params']} parameters; "
              f"static ends at val loss {payload['static_final_val_loss']:.4f}."
              + (f" Inner problems: {held['problems']['family']}." if held.get("problems") else ""), "",
              "| controller | final val loss | minus static, mean [95% CI] | better in | fossilized | params added "
              "| GFLOPs |",
              "|---|---|---|---|---|---|---|"]
    for name, r in payload["controllers"].items():
        ci = r["final_val_loss_minus_static_ci"]
        interval = "-" if ci["half_width"] is None else f"{ci['mean']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]"
        lines.append(f"| {name} | {r['final_val_loss']:.4f} | {interval} | {ci['better']}/{ci['n']} | "
                     f"{sum(r['fossilized'].values())} | {r['params_added']:.0f} | "
                     f"{r['compute']['flops'] / 1e9 if 'compute' in r else float('nan'):.3g} |")
    lines += ["", "Schedules are blueprint@slot@eEPOCH: germinate then, advance whenever the gates allow, fossilize "
              "when G5 passes; built_in:blueprint@slot, a static network with that seed built in from epoch 0. "
              "minus static: final loss minus static's on the same env (negative = better), Student-t interval over "
              "envs."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        explicit = given_settings(args, OWN_OPTIONS)
        run_dir = getattr(args, "run_dir", None)
        if run_dir:
            if explicit:
                raise RunConfigError(f"--run-dir uses the run's own configuration: drop "
                                     f"{', '.join('--' + k.replace('_', '-') for k in explicit)} (or use --task)")
            config = read_config(run_dir)
        else:
            preset = explicit.pop("preset", None)
            config = run_settings.resolve_config(run_settings.resolve_settings(run_settings.without_learner(explicit),
                                                                               preset))
        built = build(config)
        env = built.env
        texts = args.schedules.split(",") if args.schedules else None
        schedules = ([Schedule.parse(t, tempo_epochs=args.tempo) for t in texts] if texts is not None
                     else [Schedule(s.blueprint, s.slot, tempo_epochs=args.tempo) for s in default_schedules(env)])
        scripted = {s.name: make_scripted_controller(env, s) for s in schedules}
        networks = parse_built_in(args.built_in, env)
        strata = st.parse_strata(args.strata)
        json_path = Path(args.json) if args.json else (Path(run_dir) / "headroom.json" if run_dir else None)
        if json_path is not None and not json_path.parent.is_dir():
            raise RunConfigError(f"--json {json_path}: directory {json_path.parent} does not exist")
    except (ValueError,) + USER_ERRORS as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    evaluator = ev.Evaluator(env, args.envs, ("static", "heuristic"), scripted=scripted)
    key = ev.held_out_key(config.seed) if args.stream == "held-out" else fr.calibration_key(config.seed)
    print(f"{len(evaluator.names)} controllers x {args.envs} {args.stream} envs on {built.data_label}")
    results, started = {}, time.perf_counter()
    for name in evaluator.names:
        t = time.perf_counter()
        results[name] = evaluator.run(name, built.env_data, key)
        print(f"  {name}: final val loss {np.mean(results[name].final_val_loss):.4f} ({time.perf_counter() - t:.0f} s)",
              flush=True)
    results.update(built_in_results(env, networks, args.envs, built.env_data, key))
    payload = ev.evaluation_payload(env, results, run_seed=config.seed, task=config.task,
                                    data_label=built.data_label, synthetic=built.synthetic, run_dir=run_dir)
    payload["static_final_val_loss"] = payload["controllers"]["static"]["final_val_loss"]
    payload["schedules"] = [s.name for s in schedules]
    payload["built_in"] = {name: [f"{b}@{s}" for s, b in seeds] for name, seeds in networks.items()}
    payload["wall_seconds"] = time.perf_counter() - started
    computes = cp.add_compute(payload, env, built.env_data, results)
    payload["stream"] = args.stream
    if args.stream == "calibration":
        payload["held_out"]["derivation"] = f"calibration stream fold_in(key({config.seed}), {fr.CALIBRATION_STREAM:#x})"
    table = headroom_table(payload)
    if strata is not None:
        table += "\n" + st.add_strata(payload, env.config.reward, results, computes, strata)
    print(table)
    if json_path is not None:
        ev.write_json_and_markdown(json_path, payload, table)
        print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
