"""The benchmark suite's command line: clear errors for bad input, the summary's targets, and
one real (small) section end to end. Timings are never asserted (machines are noisy)."""

from __future__ import annotations

import json

import pytest

from experiments.bench import cli


@pytest.mark.parametrize("argv, message", [
    (["--only", "lattice,gpu"], "unknown section(s) gpu"),
    (["--blueprints", "conv_light,transformerish"], "--blueprints"),
    (["--blueprints", "norm"], "must include conv_light"),
    (["--env-sizes", "0,8"], "--env-sizes must be positive"),
    (["--env-sizes", "eight"], "--env-sizes must be positive"),
    (["--ppo-presets", "huge"], "unknown --ppo-presets huge"),
    (["--env-scenarios", "busy"], "unknown --env-scenarios busy"),
    (["--reference-envs", "0"], "--reference-envs must be positive"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert cli.main(argv + ["--json", "/nonexistent/never-written.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unknown_conv_formulation_exits_2_before_any_section(monkeypatch, capsys):
    monkeypatch.setenv("ESPER_CONV_IMPL", "winograd")
    assert cli.main(["--only", "lattice", "--json", "/nonexistent/never-written.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ESPER_CONV_IMPL='winograd' is not one of" in err and len(err.splitlines()) == 1


def test_quick_defaults_are_the_small_configuration():
    args = cli.resolve(cli.parse_args(["--quick"]))
    assert args.sections == list(cli.QUICK_SECTIONS)
    assert args.blueprints == cli.QUICK_BLUEPRINTS and args.env_sizes == [1, 8] and args.ppo_presets == ("smoke",)
    full = cli.resolve(cli.parse_args([]))
    assert full.blueprints == () and full.env_sizes == [1, 8, 32] and full.ppo_presets == ("smoke", "default", "proof")
    assert set(full.sections) == set(cli.SECTIONS)


def _fake_output(torch: bool) -> dict:
    reference = ({"available": True, "torch_reference_ratio": 3.5} if torch
                 else {"available": False, "reason": "PyTorch is not installed"})
    return {
        "lattice": {"dormant_overhead": 1.2, "live_seed_overhead": 1.1,
                    "live_seed_components": {"plain_host_s": 1.0, "seed_alone_s": 0.5, "host_with_live_seed_s": 1.65}},
        "env": {"vmap_over_loop_n8": {"dormant": 0.9, "live": 1.05},
                "population_scaling": {"dormant": {"1": 5.0, "8": 7.0}},
                "memory_bytes": {"1": {"peak": 10}, "8": {"peak": 12}}, "memory_growth": None,
                "compile_seconds": {"env.step N=1": {"total": 30.0}}},
        "ppo": {"presets": {"smoke": {"env_steps_per_second": 100.0, "train_images_per_second": 3200.0,
                                       "compile_seconds": {"total": 70.0}}}},
        "reference": reference,
        "flops": {"flop_utilization": 0.3},
        "transformer": {"hosts": {
            "tiny": {"dormant_overhead": 1.0, "live_depth_overhead": 1.5, "compile_seconds": {"env_step": {"total": 30.0}}},
            "base": {"dormant_overhead": 1.2, "live_depth_overhead": 1.4, "compile_seconds": {"env_step": {"total": 65.0}}},
        }},
    }


def test_summary_checks_each_target():
    summary = cli.summarize_bench(_fake_output(torch=True), quick=True, wall_seconds=80.0)
    met = {name: t["met"] for name, t in summary["targets"].items()}
    assert met == {
        "dormant_overhead": False,                 # 1.2 > 1.15
        "vmap_over_loop_n8[dormant]": True,
        "vmap_over_loop_n8[live]": False,          # 1.05 > 1.0
        "torch_reference_ratio": True,
        "flop_utilization": True,
        "compile_seconds[env_step]": True,
        "compile_seconds[ppo_update]": False,      # 70 s
        "wall_seconds[--quick]": True,
        "transformer_dormant_overhead[tiny]": True,
        "transformer_dormant_overhead[base]": False,   # 1.2 > 1.15
        "compile_seconds[transformer_env_step]": False,  # the base host's 65 s
    }
    assert summary["transformer_live_depth_overhead"] == {"tiny": 1.5, "base": 1.4}
    assert summary["ppo_env_steps_per_s"] == 100.0 and summary["ppo_train_images_per_s"] == {"smoke": 3200.0}


def test_summary_without_torch_says_why_and_measures_nothing_for_it():
    summary = cli.summarize_bench(_fake_output(torch=False), quick=False, wall_seconds=500.0)
    assert summary["targets"]["torch_reference_ratio"]["met"] is None
    assert "not installed" in summary["torch_reference_skipped"]
    assert summary["targets"]["wall_seconds[--quick]"]["met"] is None  # only judged for --quick


@pytest.mark.slow  # ~20 s of compiling the lattice section's programs
def test_lattice_section_end_to_end(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["--only", "lattice", "--blueprints", "conv_light", "--batch", "4", "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    lattice = out["lattice"]
    assert lattice["blueprints"] == ["noop", "conv_light"] or lattice["blueprints"] == ["conv_light"]
    assert lattice["dormant_overhead"] > 0 and lattice["live_seed_overhead"] > 0
    components = lattice["live_seed_components"]
    assert components["host_with_live_seed_s"] > 0 and components["seed_alone_s"] > 0
    assert out["summary"]["targets"]["dormant_overhead"]["value"] == lattice["dormant_overhead"]
    assert "dormant_overhead" in capsys.readouterr().out
