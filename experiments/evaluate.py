"""Evaluate a trained run against the rule-based controllers on held-out environments.

    python -m experiments.evaluate --run-dir DIR [--envs N] [--member best|all|K]
        [--controllers policy,heuristic,random,static,best_fixed_1,best_fixed_2] [--stochastic] [--step U] [--eval-seed S]
        [--data synthetic|PATH] [--data-dir PATH] [--efficiency | --no-efficiency] [--timing-rounds R]
        [--schedules conv_heavy@r2c0@e0,...] [--strata train_fraction:2]
        [--train-fraction LOW:HIGH] [--label-noise LOW:HIGH] [--task TASK | --target-run DIR]

Restores the run's newest checkpoint (or ``--step U``), then runs the trained policy, the
heuristic, random and static controllers for one episode each on the same ``N`` held-out
environments (seeds derived from the run seed through a stream training never uses; see
:func:`esper_jax.runs.evaluation.held_out_key`). Writes ``evaluation.json`` (results and per-env
seed timelines) and ``evaluation.md`` (the comparison table) into the run directory and prints
the table. A run that ``experiments.frontier`` has calibrated (``calibration.json``) is also
evaluated with its best fixed schedules, ``best_fixed_1`` (one seed) and ``best_fixed_2`` (one or
two seeds), chosen on calibration envs; every controller is compared with ``best_fixed_2``.
``--schedules`` adds fixed schedules by name (``a@slot@eN``, ``+`` between the seeds of one; for
example the best of ``experiments.headroom --stream calibration``). ``--strata DIM:N`` compares the
controllers within N quantile bins of the envs' drawn problems (:mod:`esper_jax.runs.strata`).
``--train-fraction``/``--label-noise`` draw the held-out envs' problems from other ranges of the run's
family, for example a stratum it never trained on (sets smaller than any in training), observed as
the controller observed its training problems (:meth:`esper_jax.env.problems.ProblemFamily.stratum`);
the results go to ``evaluation-<ranges>.json|md``, beside (never over) ``evaluation.json``.
``--task TASK`` or ``--target-run DIR`` evaluate the run's policy zero-shot on another task's envs and
menu (:mod:`esper_jax.runs.transfer`: a plan policy that sees only the drawn problem, and with
``--plan-head scorer`` any menu); the other controllers run on the same target envs; results in
``transfer-<task or DIR's name>.json|md``. ``--target-run`` takes everything but the policy from that
run, its held-out envs included (so its own evaluation pairs with this one) and its best fixed
schedules; ``--task`` the run's preset for that task, or for a task of a mixed run (``--mix``) the
configuration it trained on there (its held-out envs: the run's held-out stream on that task).

Populations: ``--member best`` (default) evaluates the member ``summary.json`` names best (member 0
if the run has no summary yet) as ``policy``; ``--member K`` evaluates member K; ``--member all``
adds every other member as ``policy_m{K}``. The policy takes each head's most likely valid
action unless ``--stochastic``. Its *first decision* is reported too: its probability of each op at
every env's first observation and the critic's value of it (``policy.first_decision`` in
``evaluation.json``, a line under the table): how it decides per problem before anything trains.

Language-model runs also answer the efficiency question (on by default; ``--no-efficiency`` skips
the second compile it needs): every controller's episode is timed after a warm-up (the median of
``--timing-rounds`` interleaved rounds, default 1), and a large static reference (the host with
twice the layers, under the static controller, on the same held-out envs) runs too;
``evaluation.json`` gets an ``"efficiency"`` section (final loss, parameters, seconds and
parameter-seconds per controller, and the paired difference from the reference) and
``evaluation.md`` its table. See :mod:`esper_jax.runs.efficiency`. Image runs have no such section;
``--efficiency`` on one is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import re
import sys
import time
from pathlib import Path

from esper_jax.runs import evaluation as ev
from esper_jax.env.controllers import CONTROLLERS
from experiments.cli import Parser, positive


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m experiments.evaluate",
                    description="Compare a trained policy with rule-based controllers on held-out envs.")
    parser.add_argument("--run-dir", required=True, help="a run directory written by experiments.ppo")
    parser.add_argument("--envs", type=positive, default=8, help="held-out environments per controller (default 8)")
    parser.add_argument("--member", default="best", help="population member to evaluate: best, all, or an index")
    parser.add_argument("--controllers", default=None,
                        help=f"comma-separated subset of {', '.join((ev.POLICY,) + CONTROLLERS + ev.BEST_FIXED)} "
                             "(default: all; the best fixed schedules when the run has a calibration.json of "
                             "experiments.frontier)")
    parser.add_argument("--stochastic", action="store_true", help="sample the policy's actions instead of the mode")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint (updates done) to evaluate; default newest")
    parser.add_argument("--eval-seed", type=int, default=None,
                        help="base of the held-out seed stream (default: the run's seed)")
    parser.add_argument("--data", default=None, help="read the data from elsewhere than the run did: synthetic or a path")
    parser.add_argument("--data-dir", default=None, help="directory of the real dataset, if it moved")
    parser.add_argument("--efficiency", action=argparse.BooleanOptionalAction, default=None,
                        help="language-model runs: time every controller and compare with a large static reference "
                             "(the host with twice the layers; a second compile). Default: on for language-model runs")
    parser.add_argument("--schedules", default=None,
                        help="comma-separated fixed schedules to evaluate too, blueprint@slot@eEPOCH, + between the "
                             "seeds of one (choose them on calibration envs: experiments.headroom --stream calibration)")
    parser.add_argument("--strata", default=None, metavar="DIM:N",
                        help="also compare the controllers within N quantile bins of the envs' drawn train_fraction "
                             "or label_noise (runs with a problem family; static is run for it)")
    parser.add_argument("--train-fraction", default=None, metavar="LOW:HIGH",
                        help="draw the held-out envs' training fractions from this range instead of the run's (a "
                             "stratum it never trained on, e.g. sets smaller than any in training); written to "
                             "evaluation-<ranges>.json|md, not evaluation.json")
    parser.add_argument("--label-noise", default=None, metavar="LOW:HIGH",
                        help="the same for the label noise (e.g. noisier labels than any in training)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--task", default=None,
                        help="zero-shot transfer: evaluate the run's policy on this task's envs and menu of plans, "
                             "under the run's preset (with --data for the task's data); results in "
                             "transfer-TASK.json|md. Plan policies from the drawn problem transfer (--plan-inputs "
                             "problem; --plan-head scorer for a menu of other plans)")
    target.add_argument("--target-run", default=None, metavar="DIR",
                        help="zero-shot transfer onto another run's task, data, settings, menu and held-out envs (the "
                             "same envs as that run's own evaluation); results in transfer-NAME.json|md (NAME: the "
                             "directory's name)")
    parser.add_argument("--timing-rounds", type=positive, default=1,
                        help="with --efficiency: time every episode this many times, interleaved, and take the median "
                             "(default 1)")
    return parser


def parse_controllers(text: str | None, fixed: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The controllers to evaluate; ``fixed``: the best fixed schedules this run has."""
    valid = (ev.POLICY,) + CONTROLLERS + tuple(fixed)
    if text is None:
        return valid
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        if name in ev.BEST_FIXED and name not in fixed:
            raise ValueError(f"{name} needs the run's calibration.json: run `python -m experiments.frontier "
                             f"--run-dir RUN_DIR` first")
        if name not in valid:
            raise ValueError(f"unknown controller {name!r}; choose from {', '.join(valid)}")
    if not names:
        raise ValueError(f"--controllers is empty; choose from {', '.join(valid)}")
    return tuple(dict.fromkeys(names))


def parse_member(text: str, population: int, best: int) -> tuple[int, bool]:
    """(member evaluated as ``policy``, whether to add every other member too)."""
    if text in ("best", "all"):
        return best, text == "all"
    try:
        member = int(text)
    except ValueError:
        raise ValueError(f"--member must be best, all or a member index, got {text!r}") from None
    if not 0 <= member < population:
        raise ValueError(f"--member {member} is out of range: the run has {population} member(s), 0..{population - 1}")
    return member, False


def efficiency_enabled(flag: bool | None, task_kind: str) -> bool:
    """Whether to answer the efficiency question: ``--efficiency``/``--no-efficiency``, by default
    for language-model runs only; asked of an image run, a ValueError."""
    if flag and task_kind != "language_model":
        raise ValueError(f"--efficiency is for language-model runs (its large static reference is a deeper "
                         f"transformer); this run's task is {task_kind}: drop --efficiency")
    return task_kind == "language_model" if flag is None else flag


def stratum_ranges(train_fraction: str | None, label_noise: str | None) -> dict[str, tuple[float, float]]:
    """``--train-fraction``/``--label-noise`` as ranges by setting name (ValueError naming the flag);
    empty when neither is given (the run's own family)."""
    from esper_jax.env.problems import parse_range

    ranges = {}
    if train_fraction is not None:
        ranges["train_fraction"] = parse_range("train-fraction", train_fraction, 0.0, 1.0, low_open=True)
    if label_noise is not None:
        ranges["label_noise"] = parse_range("label-noise", label_noise, 0.0, 1.0)
    return ranges


def stratum_stem(ranges: dict[str, tuple[float, float]]) -> str:
    """The stem of the evaluation's files: ``evaluation``, or for a stratum its ranges
    (``evaluation-train_fraction-0.001-0.005``), so that it never replaces the run's own."""
    if not ranges:
        return "evaluation"
    return "evaluation-" + "-".join(f"{name}-{low:g}-{high:g}" for name, (low, high) in ranges.items())


def target_of_task(args: argparse.Namespace, source):
    """``--task``'s target: the task under the source run's preset and seed, with ``--data``/``--data-dir``;
    for a task of a mixed run's ``--mix`` (and its data, or no ``--data``), the configuration it trained on."""
    from esper_jax.runs import settings as run_settings

    for other in source.mix:
        if other.task == args.task and args.data in (None, other.data.source) and args.data_dir is None:
            return other
    explicit = {"task": args.task, "data": args.data, "data_dir": args.data_dir, "seed": source.seed}
    return run_settings.resolve_config(run_settings.resolve_settings(explicit, source.preset))


def transfer_stem(task: str | None, target_run: str | None) -> str:
    """The stem of a transfer evaluation's files: ``transfer-TASK`` or ``transfer-NAME`` (the target
    run directory's name), in characters safe in a file name."""
    name = task if task is not None else Path(target_run).resolve().name
    return "transfer-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _selection(option: str, summary: dict | None) -> str:
    if option not in ("best", "all"):
        return "chosen with --member"
    if summary and summary.get("best_member") is not None:
        return f"the best member by {summary.get('best_by', 'summary.json')}"
    return "no summary.json with a best member yet, so member 0"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Orbax logs a warning for every read-only checkpoint directory it opens; it is not news here.
    logging.getLogger("absl").setLevel(logging.ERROR)
    # Imported here so that `--help` and argument errors answer without loading JAX and Orbax.
    from esper_jax.runs import compute as cp
    from esper_jax.runs import efficiency as eff
    from esper_jax.runs.checkpoint import CheckpointError
    from esper_jax.runs.config import CONFIG_FILE, RunConfigError, read_config
    from esper_jax.runs.load import load_run
    from esper_jax.runs.loop import USER_ERRORS
    from esper_jax.runs.frontier import read_best_schedules
    from esper_jax.runs.rundir import read_json
    from esper_jax.runs.transfer import against_native_policy, transfer_config
    from esper_jax.env.controllers import make_scripted_controller, parse_schedules, schedule_name
    from esper_jax.runs import strata as st

    try:
        parse_controllers(args.controllers, ev.BEST_FIXED)  # the names alone, before anything is read
        stratum = stratum_ranges(args.train_fraction, args.label_noise)
        if not (Path(args.run_dir) / CONFIG_FILE).is_file():
            raise RunConfigError(f"{args.run_dir} is not a run directory ({CONFIG_FILE} is missing): train one first "
                                 f"with `python -m experiments.ppo --task=... --run-dir {args.run_dir}`")
        fixed = read_best_schedules(args.run_dir)
        controllers = parse_controllers(args.controllers, tuple(fixed))
        strata = st.parse_strata(args.strata)
        if strata is not None and st.STATIC not in controllers:
            raise ValueError("--strata compares with static: keep static among --controllers")
        extra = {schedule_name(s): s for s in (parse_schedules(t) for t in (args.schedules or "").split(",") if t)}
        config = read_config(args.run_dir)
        transfer = native = None
        if args.task is not None or args.target_run is not None:
            if stratum:
                raise ValueError("--train-fraction/--label-noise draw a stratum of the run's own family, and a transfer "
                                 "evaluation draws the target's problems: drop them")
            target = read_config(args.target_run) if args.target_run else target_of_task(args, config)
            transfer = transfer_config(config, target)
            # the target run's own evaluation, paired with this one when it holds the same envs (read here, so a
            # damaged file is a one-line error before anything runs)
            native_path = None if args.target_run is None else Path(args.target_run) / "evaluation.json"
            native = read_json(native_path) if native_path is not None and native_path.is_file() else None
            fixed = read_best_schedules(args.target_run) if args.target_run else {}
            controllers = parse_controllers(args.controllers, tuple(fixed))
        efficiency = efficiency_enabled(args.efficiency, (transfer or config).kind)
        if args.timing_rounds > 1 and not efficiency:
            raise ValueError("--timing-rounds times the episodes of --efficiency, which is off for this run: drop it")
        problems = config.env.problems.stratum(stratum.get("train_fraction"), stratum.get("label_noise")) \
            if stratum else None
        handle = load_run(args.run_dir, step=args.step, data=args.data, data_dir=args.data_dir, problems=problems,
                          config=transfer)
        large_env = eff.large_static_env(handle) if efficiency else None
        member, all_members = parse_member(args.member, handle.population, handle.best_member)
        if ev.POLICY in controllers:
            for m in (range(handle.population) if all_members else (member,)):
                if not handle.policy_is_finite(m):
                    raise RunConfigError(
                        f"member {m}'s policy at update {handle.step} is not finite (its learner diverged; see "
                        f"summary.json): evaluate another member with --member, or an earlier checkpoint with --step")
    except CheckpointError as error:
        hint = "" if args.step is not None else "; train (or resume) with `python -m experiments.ppo` first"
        print(f"error: {error}{hint}", file=sys.stderr)
        return 2
    except USER_ERRORS + (ValueError,) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    env = handle.env
    seed = handle.config.seed if args.eval_seed is None else args.eval_seed
    use_policy = ev.POLICY in controllers
    rule_based = tuple(n for n in controllers if n in CONTROLLERS)
    try:
        scripted = {n: make_scripted_controller(env, fixed[n]) for n in controllers if n in ev.BEST_FIXED}
        scripted.update({n: make_scripted_controller(env, s) for n, s in extra.items()})
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    policy = ev.policy_driver(handle.trainer, deterministic=not args.stochastic) if use_policy else None
    evaluator = ev.Evaluator(env, args.envs, rule_based, policy=policy, scripted=scripted)
    key = ev.held_out_key(seed)

    def inputs_of(m: int):
        state = handle.member_state(m)
        return state.params, state.obs_stats

    # Every run passes the same input structure (rule-based controllers ignore it), so one compiled
    # episode serves them all.
    inputs = inputs_of(member) if use_policy else None
    runs = [(name, name, inputs) for name in evaluator.names]
    if use_policy and all_members:
        runs += [(f"{ev.POLICY}_m{m}", ev.POLICY, inputs_of(m)) for m in range(handle.population) if m != member]

    print(f"evaluating run {handle.run_dir} (checkpoint after update {handle.step}; task {handle.config.task} on "
          f"{handle.data_label}): {args.envs} held-out envs x {env.config.episode_epochs} epochs, "
          f"held-out seed stream fold_in(key({seed}), {ev.EVAL_STREAM:#x})")
    episodes = {label: functools.partial(evaluator.run, name, handle.env_data, key, run_inputs)
                for label, name, run_inputs in runs}
    section = None
    if not efficiency:
        results = {}
        for label, episode in episodes.items():
            start = time.perf_counter()
            results[label] = episode()
            first = " (including compilation)" if len(results) == 1 else ""
            print(f"  {label}: {time.perf_counter() - start:.1f} s{first}", flush=True)
    else:
        large = ev.Evaluator(large_env, args.envs, (eff.STATIC,))
        episodes[eff.LARGE_STATIC] = functools.partial(large.run, eff.STATIC, handle.env_data, key)
        # Timed episodes are compiled ones: compile (and run) each of the two programs once first.
        for label, what in ((runs[0][0], "the controllers"),
                            (eff.LARGE_STATIC, f"{eff.LARGE_STATIC} ({large_env.model.host.num_layers} layers, "
                                               f"{large_env.host_param_count} parameters)")):
            start = time.perf_counter()
            episodes[label]()
            print(f"  compiled the episode of {what} and ran it once: {time.perf_counter() - start:.1f} s",
                  flush=True)
        results, seconds = eff.time_episodes(episodes, args.timing_rounds)
        for label, secs in seconds.items():
            print(f"  {label}: {secs:.2f} s per episode (median of {args.timing_rounds})", flush=True)
        large_out, large_seconds = results.pop(eff.LARGE_STATIC), seconds.pop(eff.LARGE_STATIC)
        section = eff.efficiency_section(env, results, seconds, large_env, large_out, large_seconds,
                                         args.timing_rounds)

    policy_info = None
    if use_policy:
        policy_info = {
            "member": member, "population": handle.population,
            "selection": _selection(args.member, handle.summary),
            "checkpoint_update": handle.step, "deterministic": not args.stochastic,
            "hyperparameters": dataclasses.asdict(handle.members[member]),
            "first_decision": ev.first_decision(env, handle.trainer, inputs, handle.env_data, key, args.envs),
        }
    # a stratum's evaluation records the ranges the run trained on
    trained_on = {name: list(getattr(config.env, name)) for name in ("train_fraction", "label_noise")} \
        if stratum else None
    transferred = None if transfer is None else {
        "task": config.task, "data": config.data.label or config.data.source, "plans": list(config.ppo.plans),
        "plan_head": config.ppo.plan_head, "target_run": args.target_run,
        "mix": [{"task": m.task, "data": m.data.label or m.data.source, "plans": list(m.ppo.plans)} for m in config.mix]}
    payload = ev.evaluation_payload(env, results, run_seed=seed, task=handle.config.task,
                                    data_label=handle.data_label, synthetic=handle.synthetic,
                                    run_dir=str(handle.run_dir), policy=policy_info, trained_on=trained_on,
                                    transferred_from=transferred)
    if native is not None:
        payload["transferred_from"]["minus_native_policy"] = against_native_policy(payload, native)
    # every controller's training compute in FLOPs (machine-independent; esper_jax.runs.compute)
    computes = cp.add_compute(payload, env, handle.env_data, results)
    if section is not None:
        for label, row in section["controllers"].items():
            if label in payload["controllers"]:
                row["flops"] = payload["controllers"][label]["compute"]["flops"]
        large_compute = cp.output_compute(large_env.model_costs(handle.env_data), large_out,
                                          large_env.config.steps_per_epoch)
        section["controllers"][eff.LARGE_STATIC]["flops"] = float(large_compute.total.mean())
        payload["efficiency"] = section
    markdown = ev.markdown_table(payload) + eff.markdown_section(payload)
    if strata is not None:
        markdown += "\n" + st.add_strata(payload, env.config.reward, results, computes, strata)
    stem = stratum_stem(stratum) if transfer is None else transfer_stem(args.task, args.target_run)
    json_path, md_path = ev.write_evaluation(str(handle.run_dir), payload, markdown, stem=stem)
    print()
    print(markdown)
    if handle.synthetic:
        print("NOTE: these results are on SYNTHETIC data, not the real dataset.")
    print(f"wrote {json_path} and {md_path}; plots: python -m experiments.report --run-dir {handle.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
