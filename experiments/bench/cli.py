"""The command line of the benchmark suite: runs the sections, prints their tables and a summary
of the headline figures against their targets, and writes everything as JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax

from esper_jax.lattice import ops
from esper_jax.lattice.blueprints import blueprint_index
from experiments.bench.breakdown import bench_breakdown, print_breakdown_table
from experiments.bench.env import SCENARIOS, bench_env, print_env_table
from experiments.bench.flops import bench_flops
from experiments.bench.host import bench_conv, bench_lattice, bench_population
from experiments.bench.ppo import bench_ppo, print_ppo_table
from experiments.bench.torch_reference import bench_torch_reference
from experiments.bench.transformer import bench_transformer, print_transformer_table

SECTIONS = {
    "lattice": bench_lattice,
    "env": bench_env,
    "ppo": bench_ppo,
    "reference": bench_torch_reference,
    "flops": bench_flops,
    "conv": bench_conv,
    "population": bench_population,
    "breakdown": bench_breakdown,
    "transformer": bench_transformer,
}
QUICK_SECTIONS = ("lattice", "env", "ppo", "reference", "flops")
QUICK_BLUEPRINTS = ("conv_light",)
PRESETS = ("smoke", "default", "proof", "full")

# name: (target as text, test on the value); a value of None (not measured) is not "met".
TARGETS = {
    "dormant_overhead": ("<= 1.15", lambda v: v <= 1.15),
    "vmap_over_loop_n8[dormant]": ("<= 1.0", lambda v: v <= 1.0),
    "vmap_over_loop_n8[live]": ("<= 1.0", lambda v: v <= 1.0),
    "torch_reference_ratio": (">= 3", lambda v: v >= 3.0),
    "flop_utilization": (">= 0.25 (aim)", lambda v: v >= 0.25),
    "compile_seconds[env_step]": ("< 60 s", lambda v: v < 60.0),
    "transformer_dormant_overhead[tiny]": ("<= 1.15", lambda v: v <= 1.15),
    "transformer_dormant_overhead[base]": ("<= 1.15", lambda v: v <= 1.15),
    "compile_seconds[transformer_env_step]": ("< 60 s", lambda v: v < 60.0),
    "compile_seconds[ppo_update]": ("< 60 s", lambda v: v < 60.0),
    "wall_seconds[--quick]": ("< 90 s", lambda v: v < 90.0),
}


def environment() -> dict:
    return {
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "conv_impl": ops.conv_impl(),
    }


def summarize_bench(output: dict, quick: bool, wall_seconds: float) -> dict:
    """The headline keys of the issue, lifted out of the sections."""
    s: dict = {}
    lattice, env, ppo = output.get("lattice"), output.get("env"), output.get("ppo")
    reference, flops = output.get("reference"), output.get("flops")
    transformer = (output.get("transformer") or {}).get("hosts", {})
    if lattice:
        s["dormant_overhead"] = lattice["dormant_overhead"]
        s["live_seed_overhead"] = lattice["live_seed_overhead"]
        s["live_seed_components"] = lattice["live_seed_components"]
    if env:
        s["vmap_over_loop_n8"] = env.get("vmap_over_loop_n8")
        s["population_scaling"] = env["population_scaling"]
        s["peak_memory"] = {"bytes_per_compiled_step": {n: m and m["peak"] for n, m in env["memory_bytes"].items()},
                            "growth": env.get("memory_growth")}
    if ppo and "smoke" in ppo["presets"]:
        s["ppo_env_steps_per_s"] = ppo["presets"]["smoke"]["env_steps_per_second"]
    if ppo:  # end to end: host training images per second of whole PPO updates, per preset
        s["ppo_train_images_per_s"] = {name: r["train_images_per_second"] for name, r in ppo["presets"].items()}
    if reference:
        s["torch_reference_ratio"] = reference.get("torch_reference_ratio")
        if not reference.get("available", False):
            s["torch_reference_skipped"] = reference.get("reason")
    if flops:
        s["flop_utilization"] = flops.get("flop_utilization")
    compile_seconds = {}
    if env:
        compile_seconds["env_step"] = env["compile_seconds"]["env.step N=1"]["total"]
    if ppo:
        for name, r in ppo["presets"].items():
            compile_seconds[f"ppo_update[{name}]"] = r["compile_seconds"]["total"]
    for variant, r in transformer.items():
        s.setdefault("transformer_dormant_overhead", {})[variant] = r["dormant_overhead"]
        s.setdefault("transformer_live_depth_overhead", {})[variant] = r["live_depth_overhead"]
        compile_seconds[f"transformer_env_step[{variant}]"] = r["compile_seconds"]["env_step"]["total"]
    s["compile_seconds"] = compile_seconds
    s["wall_seconds"] = wall_seconds

    values = {
        "dormant_overhead": s.get("dormant_overhead"),
        "vmap_over_loop_n8[dormant]": (s.get("vmap_over_loop_n8") or {}).get("dormant"),
        "vmap_over_loop_n8[live]": (s.get("vmap_over_loop_n8") or {}).get("live"),
        "torch_reference_ratio": s.get("torch_reference_ratio"),
        "flop_utilization": s.get("flop_utilization"),
        "compile_seconds[env_step]": compile_seconds.get("env_step"),
        "compile_seconds[ppo_update]": max((v for k, v in compile_seconds.items() if k.startswith("ppo_update")),
                                           default=None),
        "wall_seconds[--quick]": wall_seconds if quick else None,
        "transformer_dormant_overhead[tiny]": transformer.get("tiny", {}).get("dormant_overhead"),
        "transformer_dormant_overhead[base]": transformer.get("base", {}).get("dormant_overhead"),
        "compile_seconds[transformer_env_step]": max((v for k, v in compile_seconds.items()
                                                       if k.startswith("transformer_env_step")), default=None),
    }
    s["targets"] = {name: {"target": target, "value": values[name],
                           "met": None if values[name] is None else bool(test(values[name]))}
                    for name, (target, test) in TARGETS.items()}
    return s


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def print_summary(summary: dict):
    print("\n## summary (ratios measured in this process)")
    for name, t in summary["targets"].items():
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"  {name:<30} {_fmt(t['value']):>10}   target {t['target']:<14} {met}")
    if "live_seed_overhead" in summary:
        c = summary["live_seed_components"]
        print(f"  {'live_seed_overhead':<30} {summary['live_seed_overhead']:>10.3f}   host+seed {c['host_with_live_seed_s'] * 1e3:.1f} ms "
              f"÷ (plain host {c['plain_host_s'] * 1e3:.1f} ms + seed alone {c['seed_alone_s'] * 1e3:.1f} ms)")
    for name, per_n in (summary.get("population_scaling") or {}).items():
        row = ", ".join(f"N={n}: {v:.2f}" for n, v in per_n.items())
        print(f"  population_scaling[{name}]  env steps/s  {row}")
    if summary.get("ppo_env_steps_per_s") is not None:
        print(f"  {'ppo_env_steps_per_s (smoke)':<30} {summary['ppo_env_steps_per_s']:>10.2f}")
    for name, rate in (summary.get("ppo_train_images_per_s") or {}).items():
        print(f"  {'ppo_train_images_per_s[' + name + ']':<30} {rate:>10.0f}   (end to end: whole PPO updates)")
    for name, seconds in summary["compile_seconds"].items():
        print(f"  compile_seconds[{name}]{'':<{max(0, 13 - len(name))}} {seconds:>10.1f}")
    if summary.get("torch_reference_skipped"):
        print(f"  torch_reference_ratio skipped: {summary['torch_reference_skipped']}")
    growth = (summary.get("peak_memory") or {}).get("growth")
    if growth:
        per_env = ", ".join(f"N={n}: {b / 2**20:.1f} MiB" for n, b in zip(growth["sizes"], growth["peak_bytes_per_env"]))
        print(f"  peak memory per env (XLA account of the step)  {per_env}; peak ~ N^{growth['peak_vs_n_exponent']:.2f}")


def print_section(name: str, result: dict):
    if name == "env":
        return print_env_table(result)
    if name == "ppo":
        return print_ppo_table(result)
    if name == "breakdown":
        return print_breakdown_table(result)
    if name == "transformer":
        return print_transformer_table(result)
    print(f"\n## {name}")
    for key, value in result.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, float):
                    timed = key == "seconds" or key.startswith("seconds_per") or sub.endswith("_s")
                    shown, unit = (v * 1e3, "ms") if timed else (v, "")
                    print(f"  {key:<26} {sub:<40} {shown:12.3f} {unit}")
                else:
                    print(f"  {key:<26} {sub:<40} {v!s:>12}")
        elif isinstance(value, float):
            print(f"  {key:<67} {value:12.3f}")
        else:
            print(f"  {key:<67} {value!s:>12}")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench",
        description="The esper-jax benchmark suite: prints tables and writes JSON. Ratios are timed in one process, "
                    "in interleaved rounds.",
        epilog="Full run on this CPU: python -m experiments.bench --json benchmarks/results/bench_cpu.json")
    parser.add_argument("--quick", action="store_true",
                        help=f"the headline figures (about 2 minutes on a 2-core CPU, some 60 s of it XLA compiling; "
                             f"the target is 90 s): sections {', '.join(QUICK_SECTIONS)}; "
                             f"blueprints {', '.join(QUICK_BLUEPRINTS)} only (fewer branches to compile), N = 1 and 8, "
                             "the smoke PPO preset, fewer rounds")
    parser.add_argument("--json", default="benchmarks/results/bench.json", help="where to write the JSON results")
    parser.add_argument("--only", default=None, help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--batch", type=int, default=128, help="batch size of the lattice, flops, conv and population sections")
    parser.add_argument("--blueprints", default=None,
                        help="comma-separated CNN blueprint subset for the lattice, env, flops and reference sections "
                             "(default: every CNN blueprint, as the task has; --quick: conv_light)")
    parser.add_argument("--env-sizes", default=None, help="env section: population sizes N (default 1,8,32; --quick 1,8)")
    parser.add_argument("--env-scenarios", default=",".join(SCENARIOS),
                        help=f"env section: lattice states to time, of {', '.join(SCENARIOS)}")
    parser.add_argument("--env-steps-per-epoch", type=int, default=4, help="env section: training batches per env step")
    parser.add_argument("--env-batch", type=int, default=64, help="env section: training batch size")
    parser.add_argument("--env-val-size", type=int, default=128, help="env section: validation images")
    parser.add_argument("--env-rounds", type=int, default=None, help="env section: interleaved timing rounds (default 3; --quick 2)")
    parser.add_argument("--env-execution", default=None, choices=("map", "vmap"),
                        help="env section: members one after another (map) or batched (vmap) (default: the "
                             "backend's, esper_jax.lattice.strategy.PopulationStrategy.for_backend)")
    parser.add_argument("--ppo-presets", default=None,
                        help="ppo section: run presets (default smoke,default,proof; --quick smoke)")
    parser.add_argument("--transformer-block", type=int, default=256,
                        help="transformer section: tokens per window (default 256, the TinyStories design's context)")
    parser.add_argument("--transformer-batch", type=int, default=8, help="transformer section: windows per batch")
    parser.add_argument("--reference-envs", type=int, default=8, help="reference section: environments (population size)")
    parser.add_argument("--reference-batches", type=int, default=4, help="reference section: training batches per env")
    parser.add_argument("--reference-batch", type=int, default=64, help="reference section: batch size")
    return parser.parse_args(argv)


class UsageError(ValueError):
    pass


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the --quick dependent defaults and check every value; raises UsageError."""
    sections = _csv(args.only) if args.only else list(QUICK_SECTIONS if args.quick else SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise UsageError(f"unknown section(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SECTIONS)}")
    args.sections = sections
    try:
        ops.conv_impl()  # ESPER_CONV_IMPL, read when programs are traced: check it before any is
    except ValueError as error:
        raise UsageError(str(error)) from None
    for name in ("batch", "env_steps_per_epoch", "env_batch", "env_val_size", "reference_envs", "reference_batches",
                 "reference_batch", "transformer_block", "transformer_batch"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.env_rounds is None:
        args.env_rounds = 2 if args.quick else 3
    if args.env_rounds <= 0:
        raise UsageError("--env-rounds must be positive")
    try:
        sizes = sorted({int(n) for n in _csv(args.env_sizes or ("1,8" if args.quick else "1,8,32"))})
    except ValueError:
        sizes = []
    if not sizes or min(sizes) <= 0:
        raise UsageError("--env-sizes must be positive integers, e.g. 1,8,32")
    args.env_sizes = sizes
    if args.blueprints is None:
        args.blueprints = QUICK_BLUEPRINTS if args.quick else ()
    else:
        args.blueprints = tuple(_csv(args.blueprints))
    for name in args.blueprints:
        try:
            blueprint_index("cnn", name)
        except ValueError as error:
            raise UsageError(f"--blueprints: {error}") from None
    if args.blueprints and "conv_light" not in args.blueprints:
        raise UsageError("--blueprints must include conv_light: it is the live seed every section measures")
    args.env_scenarios = tuple(_csv(args.env_scenarios))
    bad = [s for s in args.env_scenarios if s not in SCENARIOS]
    if bad or not args.env_scenarios:
        raise UsageError(f"unknown --env-scenarios {', '.join(bad) or '(none)'}; choose from {', '.join(SCENARIOS)}")
    args.ppo_presets = tuple(_csv(args.ppo_presets or ("smoke" if args.quick else "smoke,default,proof")))
    bad = [p for p in args.ppo_presets if p not in PRESETS]
    if bad or not args.ppo_presets:
        raise UsageError(f"unknown --ppo-presets {', '.join(bad) or '(none)'}; choose from {', '.join(PRESETS)}")
    args.rounds, args.calls = (3, 2) if args.quick else (7, 4)
    return args


def main(argv=None) -> int:
    try:
        args = resolve(parse_args(argv))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    output = {"environment": environment(), "quick": args.quick, "batch": args.batch, "sections_run": args.sections,
              "blueprints": list(args.blueprints) or "all"}
    print(f"esper-jax benchmarks on {output['environment']['device_kind']} ({output['environment']['platform']}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}); sections: {', '.join(args.sections)}", flush=True)
    output["section_seconds"] = {}
    for section in args.sections:
        started = time.perf_counter()
        output[section] = SECTIONS[section](args, output) if section == "flops" else SECTIONS[section](args)
        output["section_seconds"][section] = time.perf_counter() - started
        print_section(section, output[section])
        print(f"  ({section}: {output['section_seconds'][section]:.1f} s)", flush=True)
    wall = time.perf_counter() - start
    output["summary"] = summarize_bench(output, args.quick, wall)
    print_summary(output["summary"])
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(output, f, indent=2, default=float)
    print(f"\nwrote {args.json} ({wall:.0f} s)")
    return 0
