"""``python -m experiments.heuristic`` refuses bad input in one line, before loading data or
compiling anything (a run of it is in the slow suite, ``tests/env/test_env_slow.py``)."""

from __future__ import annotations

import pytest

from experiments import heuristic


def error_line(capsys, argv) -> str:
    assert heuristic.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_options_are_one_line(capsys, tmp_path, monkeypatch):
    base = ["--task=cifar10", "--data=synthetic"]
    assert "unknown controller 'oracle'" in error_line(capsys, [*base, "--controller=oracle"])
    # --json into a missing directory: refused before the run, not after it
    assert "does not exist" in error_line(capsys, [*base, f"--json={tmp_path / 'no' / 'r.json'}"])
    assert "legacy slot names" in error_line(capsys, [*base, "--slots=mid"])
    monkeypatch.setenv("ESPER_CONV_IMPL", "bogus")
    assert "ESPER_CONV_IMPL" in error_line(capsys, base)


def test_presets_and_every_run_setting_by_its_experiments_ppo_name(capsys):
    """The parser is experiments.ppo's for the run settings: --preset and the env settings resolve
    the same way (refusals come before any data is loaded)."""
    parser = heuristic.build_parser()
    args = parser.parse_args(["--task=cifar10", "--preset=proof", "--host-lr=0.05", "--auto-advance", "--envs=3"])
    assert vars(args) == {"task": "cifar10", "preset": "proof", "host_lr": 0.05, "auto_advance": True, "envs": 3,
                          "controller": "all", "json": None}
    assert "unknown preset" in error_line(capsys, ["--task=cifar10", "--preset=nope"])
    assert "--task is required" in error_line(capsys, ["--preset=proof"])
    from experiments import ppo

    ppo_options = {a.dest for a in ppo.build_parser()._actions}
    assert {a.dest for a in parser._actions} - ppo_options == {"controller", "json"}


def test_parser_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        heuristic.build_parser().parse_args(["--task=cifar10", "--envs=0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_tinystories_without_tiktoken_files_is_one_line(capsys, tmp_path, monkeypatch):
    for split in ("train", "valid"):
        folder = tmp_path / "tinystories"
        folder.mkdir(exist_ok=True)
        (folder / f"TinyStories-{split}.txt").write_text("Once upon a time.\n<|endoftext|>\nThe end.\n")
    empty = tmp_path / "no-tiktoken-files"
    empty.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty))
    line = error_line(capsys, ["--task=tinystories", f"--data={tmp_path}", "--tokenizer=gpt2"])
    assert "gpt2" in line and "TIKTOKEN_CACHE_DIR" in line
