"""``python -m experiments.ppo``: bad input, the run directory, Ctrl-C, and exact resume.

Bad input is tested in-process (it fails before anything compiles). The end-to-end runs are
subprocesses on the smoke preset (a one-block width-4 CNN, one slot, two blueprints, 2 envs x
7-epoch episodes), sharing one persistent compilation cache: the first run compiles the learner
(~40 s on an idle 2-core CPU), the others load it from the cache.

The resume test: run R trains 4 updates with a checkpoint every 2 without stopping. Run I is the
same command, interrupted by a KeyboardInterrupt while it writes the rows of updates 3-4 (what
Ctrl-C does); it must exit 130 with the resume command, keep rows 1-2 and the checkpoint at
update 2. Then, as if a later process had been killed, a stray row for update 3 and a temporary
Orbax directory for update 4 are added; ``--resume`` must drop the row, ignore the temporary
directory, continue from update 2, and end with a metrics.jsonl byte-for-byte equal to R's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from esper_jax.data import load_image_dataset
from esper_jax.env.actions import Op
from esper_jax.lattice.model import MorphogeneticModel
from esper_jax.runs.build import build_env
from esper_jax.runs.config import Member, RunConfig, RunConfigError, WarmStart, read_config
from esper_jax.runs.load import load_run
from esper_jax.runs.rundir import write_json
from esper_jax.runs.settings import check_resume_settings, resolve_config, resolve_settings, without_learner
from tests.conftest import block_imports
from experiments import ppo as cli

REPO = Path(__file__).resolve().parents[2]
TINY = ["--task=cifar10", "--preset=smoke", "--updates=4", "--checkpoint-every=2", "--keep-checkpoints=2",
        "--no-progress"]
SPEC_METRICS = ("update", "env_steps", "mean_return", "mean_final_val_loss", "mean_final_val_accuracy", "policy_loss",
                "value_loss", "approx_kl", "clip_fraction", "explained_variance", "entropy_op", "entropy_slot",
                "entropy_blueprint", "entropy_blend", "entropy_tempo", "entropy_alpha_target", "germinated",
                "fossilized", "pruned", "rollbacks")

# Ctrl-C while the second chunk's rows are being written: one row is on disk, then the interrupt.
INTERRUPT = """
import sys
from esper_jax.runs import loop
calls = []
append = loop.append_rows
def interrupted(path, rows):
    calls.append(len(rows))
    if len(calls) == 2:
        append(path, rows[:1])
        raise KeyboardInterrupt
    append(path, rows)
loop.append_rows = interrupted
from experiments.ppo import main
sys.exit(main(sys.argv[1:]))
"""
PLAIN = "import sys\nfrom experiments.ppo import main\nsys.exit(main(sys.argv[1:]))\n"


def cli_run(args, cache: Path, code: str = PLAIN, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args, f"--compile-cache={cache}"], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=900)


def error_line(capsys, argv) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr."""
    try:
        code = cli.main([*argv, "--compile-cache=off"])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------- bad input (no compilation)


def test_bad_input_one_line_exit_2(capsys, tmp_path):
    assert "valid tasks are: cifar10, cifar100, tinystories" in error_line(capsys, ["--task=cifar11"])
    assert "valid presets are: smoke, default, proof, full" in error_line(capsys, ["--task=cifar10", "--preset=huge"])
    for flag, expected in (("--image-size=3", "must divide 32"), ("--image-size=64", "must divide 32"),
                           ("--host-lr=0", "--host-lr must be a positive number"),
                           ("--host-lr=nan", "--host-lr must be a positive number"),
                           ("--seed-lr=-1", "--seed-lr must be a positive number"),
                           ("--host-lr-schedule=linear", "invalid choice"),
                           ("--optimizer=lamb", "invalid choice"),
                           ("--max-concurrent-training=0", "--max-concurrent-training"),
                           ("--train-fraction=0:1", "--train-fraction must be a number or a range LOW:HIGH"),
                           ("--label-noise=0.5:0.1", "--label-noise must be a number or a range LOW:HIGH"),
                           ("--compute-weight=-1", "--compute-weight must be a non-negative number"),
                           ("--host-variant=wide", "choose one of baseline, impaired, pointwise")):
        assert expected in error_line(capsys, ["--task=cifar10", flag]), flag
    assert "image tasks only" in error_line(capsys, ["--task=tinystories", "--image-size=16"])
    assert "--augment applies to image tasks only" in error_line(capsys, ["--task=tinystories", "--augment=crop"])
    assert "invalid choice" in error_line(capsys, ["--task=cifar10", "--augment=mirror"])
    for flag in ("--block-size=32", "--tokenizer=byte"):
        assert "language-model tasks only" in error_line(capsys, ["--task=cifar10", flag]), flag
    for flag in ("--seed=99999999999", "--seed=-1"):
        assert "--seed must be an integer in 0..4294967295" in error_line(capsys, ["--task=cifar10", flag]), flag
    assert "--seeds: member seed 4294967296 is outside" in error_line(capsys, ["--task=cifar10", "--seeds=0,4294967296"])
    assert "--seed: member seed 4294967296 is outside" in error_line(
        capsys, ["--task=cifar10", "--seed=4294967295", "--population=2"])
    # an empty list is not the default list
    assert "--blueprints is empty" in error_line(capsys, ["--task=cifar10", "--blueprints="])
    assert "--slots is empty" in error_line(capsys, ["--task=cifar10", "--slots= "])
    assert "on this cnn host early is r0c0" in error_line(capsys, ["--task=cifar10", "--slots=early"])
    assert "late is r2c0" in error_line(capsys, ["--task=cifar10", "--slots=r0c0,late"])
    assert "use r0c0" in error_line(capsys, ["--task=cifar10", "--slots=slot1"])
    line = error_line(capsys, ["--task=cifar10", "--slots=r0c0,r7c0"])
    assert "r7c0 does not exist" in line and "r0c0, r0c1, r1c0" in line
    for flag in ("--envs=0", "--updates=-2", "--episode-epochs=0", "--batch-size=0", "--population=0",
                 "--checkpoint-every=0", "--keep-checkpoints=0", "--envs=two"):
        assert "--" + flag.split("=")[0].lstrip("-") in error_line(capsys, ["--task=cifar10", flag])
    assert "cnn blueprints are:" in error_line(capsys, ["--task=cifar10", "--blueprints=norm,lora"])
    assert "transformer blueprints are:" in error_line(capsys, ["--task=tinystories", "--blueprints=conv_small"])
    assert "cnn blueprints are:" in error_line(capsys, ["--task=cifar10", "--blueprints=depth"])
    line = error_line(capsys, ["--task=tinystories", "--host-variant=tiny", "--slots=r0c1,r1c3"])
    assert "r1c3 does not exist on this transformer host" in line and "r0c0, r0c1, r0c2, r1c0, r1c1, r1c2" in line
    assert "invalid choice" in error_line(capsys, ["--task=cifar10", "--reward=shaped"])
    assert "sparse reward is zero before" in error_line(capsys, ["--task=cifar10", "--reward=sparse", "--compute-weight=1"])
    assert "lists 2 values but the population has 3" in error_line(
        capsys, ["--task=cifar10", "--population=3", "--lr=1e-3,3e-4"])
    assert "LO < HI" in error_line(capsys, ["--task=cifar10", "--lr=log:1e-3:1e-4"])
    assert "recurrent" in error_line(capsys, ["--task=cifar10", "--recurrent=transformer"])
    assert "--task is required" in error_line(capsys, [])
    # learner settings that cannot be right are refused up front, not found later as NaN losses
    for flag, expected in (("--max-grad-norm=nan", "--max-grad-norm) must be a finite number > 0"),
                           ("--vf-coef=nan", "--vf-coef) must be a finite number >= 0"),
                           ("--vf-coef=-1", "--vf-coef) must be a finite number >= 0"),
                           ("--adam-eps=0", "--adam-eps) must be a finite number > 0"),
                           ("--adam-eps=-1", "--adam-eps) must be a finite number > 0"),
                           ("--clip-eps=nan", "--clip-eps) must be a finite number > 0"),
                           ("--gamma=1.5", "--gamma) must be a finite number > 0 and <= 1"),
                           ("--target-kl=inf", "--target-kl) must be a finite number > 0"),
                           ("--lr=1e6", "--lr: values must be at most 1"),
                           ("--lr=nan", "--lr: values must be finite"),
                           ("--ent-coef=-0.1", "--ent-coef: values must be non-negative")):
        assert expected in error_line(capsys, ["--task=cifar10", flag]), flag
    # a missing dataset: the data layer's advice, on one line, and nothing is created
    empty = tmp_path / "no-data"
    empty.mkdir()
    line = error_line(capsys, ["--task=cifar10", f"--data-dir={empty}", f"--run-dir={tmp_path / 'r'}"])
    assert "CIFAR-10 was not found" in line and "--data=synthetic" in line
    assert not (tmp_path / "r").exists()


def test_tensorboard_without_its_extra_is_one_line(capsys, tmp_path, monkeypatch):
    block_imports(monkeypatch, "tensorboardX")
    line = error_line(capsys, ["--task=cifar10", "--preset=smoke", f"--run-dir={tmp_path / 'r'}", "--tensorboard"])
    assert "pip install -e '.[tensorboard]'" in line and not (tmp_path / "r").exists()


def test_unknown_conv_formulation_is_a_config_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ESPER_CONV_IMPL", "winograd")
    line = error_line(capsys, ["--task=cifar10", "--data=synthetic", f"--run-dir={tmp_path / 'r'}"])
    assert "ESPER_CONV_IMPL='winograd' is not one of ('im2col', 'lax', 'lax_vjp')" in line
    assert not (tmp_path / "r").exists()


def test_bad_run_directories(capsys, tmp_path):
    assert "no run there" in error_line(capsys, [f"--resume={tmp_path}"])
    # a run whose first checkpoint never completed (only Orbax's temporary directory)
    config = resolve_config(resolve_settings({"task": "cifar10"}, "smoke"))
    (tmp_path / "checkpoints" / "0.orbax-checkpoint-tmp-1").mkdir(parents=True)
    write_json(tmp_path / "config.json", config.to_json())
    # a fresh run into a directory that holds one
    assert "--resume" in error_line(capsys, ["--task=cifar10", "--preset=smoke", f"--run-dir={tmp_path}"])
    # options that contradict the run being resumed
    (tmp_path / "checkpoints" / "2").mkdir()
    line = error_line(capsys, [f"--resume={tmp_path}", "--envs=3"])
    assert "--envs=3 does not match the run's --envs=2" in line
    assert "does not match" in error_line(capsys, [f"--resume={tmp_path}", "--lr=1e-3"])
    assert "does not match" in error_line(capsys, [f"--resume={tmp_path}", "--preset=default"])
    assert "another --run-dir" in error_line(capsys, [f"--resume={tmp_path}", f"--run-dir={tmp_path / 'x'}"])
    # a damaged config.json: one line naming it
    (tmp_path / "config.json").write_text('{"version": 1, "task": "cifar')
    assert "config.json is damaged" in error_line(capsys, [f"--resume={tmp_path}"])


def test_resume_without_a_checkpoint_starts_from_update_0(capsys, tmp_path, monkeypatch):
    """A run killed before its first save finished: --resume starts it again from update 0 with
    its stored configuration (nothing trained was saved) instead of refusing with no way out."""
    from esper_jax.runs import loop

    config = resolve_config(resolve_settings({"task": "cifar10"}, "smoke"))
    partial = tmp_path / "checkpoints" / "0.orbax-checkpoint-tmp-1"
    partial.mkdir(parents=True)
    write_json(tmp_path / "config.json", config.to_json())
    (tmp_path / "metrics.jsonl").write_text('{"update": 1}\n')
    built = []

    def stop(config, **kwargs):  # the data and the compilation are not what is tested here
        built.append(config)
        raise RunConfigError("stopped before building")

    monkeypatch.setattr(loop, "build", stop)
    assert "stopped before building" in error_line(capsys, [f"--resume={tmp_path}"])
    assert built == [config] and not partial.exists() and (tmp_path / "metrics.jsonl").read_text() == ""


HOLD = """
import sys, time
from pathlib import Path
from esper_jax.runs.rundir import RunLock
lock = RunLock(Path(sys.argv[1])).__enter__()
print("locked", flush=True)
time.sleep(120)
"""


def test_one_writer_per_run_directory(capsys, tmp_path):
    """A second writer (fresh run or resume) is refused while another process holds the run
    directory, naming that process; the holder's files are untouched; the lock dies with it."""
    run_dir = tmp_path / "run"
    config = resolve_config(resolve_settings({"task": "cifar10"}, "smoke"))
    run_dir.mkdir()
    write_json(run_dir / "config.json", config.to_json())
    (run_dir / "checkpoints" / "2").mkdir(parents=True)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir() if p.name != ".lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = error_line(capsys, [f"--resume={run_dir}", "--no-progress"])
        assert f"is in use by another run (process {holder.pid})" in line
        fresh = tmp_path / "fresh"
        holder2 = subprocess.Popen([sys.executable, "-c", HOLD, str(fresh)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert holder2.stdout.readline().strip() == "locked"
            line = error_line(capsys, ["--task=cifar10", "--preset=smoke", f"--run-dir={fresh}", "--no-progress"])
            assert f"process {holder2.pid}" in line
        finally:
            holder2.kill()
            holder2.wait()
        assert sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir() if p.name != ".lock") == before
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock went with it
    from esper_jax.runs.rundir import RunLock
    with RunLock(run_dir):
        pass


def test_unwritable_run_directory_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = error_line(capsys, ["--task=cifar10", "--preset=smoke", f"--run-dir={blocker / 'run'}"])
    assert "cannot write the run directory" in line


def test_read_only_run_directory_is_one_line(capsys, tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        line = error_line(capsys, ["--task=cifar10", "--preset=smoke", f"--run-dir={read_only / 'run'}"])
        assert "cannot write the run directory" in line
    finally:
        read_only.chmod(0o700)


def test_proof_preset_resolves_the_calibrated_problem():
    config = resolve_config(resolve_settings({"task": "cifar10"}, "proof"))
    assert config.host_variant == "pointwise" and config.host.kernel_size == 1
    assert config.host.image_size == 16 and config.data.synthetic
    env = config.env
    assert (env.host_lr, env.host_lr_schedule, env.seed_lr, env.auto_advance) == (0.1, "cosine", 0.05, True)
    assert env.max_concurrent_training == 1 and env.min_training_epochs == 1
    # explicit options still win, and the per-topology preset values do not leak into other tasks
    config = resolve_config(resolve_settings({"task": "cifar10", "image_size": 32, "host_variant": "baseline"}, "proof"))
    assert config.host.image_size == 32 and config.host.kernel_size == 3
    # TinyStories has its own calibrated problem: the position-wise host under AdamW, on bytes
    config = resolve_config(resolve_settings({"task": "tinystories"}, "proof"))
    assert config.host_variant == "pointwise" and not config.host.attention and config.host.d_model == 32
    assert config.options["image_size"] is None and config.data.tokenizer == "byte" and config.data.synthetic
    env = config.env
    assert (env.optimizer, env.host_lr, env.seed_lr, env.batch_size, env.block_size) == ("adamw", 3e-3, 3e-3, 32, 16)
    assert "depth" in env.blueprints and env.slots == ("r0c0", "r0c1", "r1c0")
    # a per-topology value explicitly overridden, and one a topology leaves out (the default)
    config = resolve_config(resolve_settings({"task": "tinystories", "optimizer": "sgd", "host_lr": 0.1}, "proof"))
    assert (config.env.optimizer, config.env.host_lr) == ("sgd", 0.1)
    assert resolve_config(resolve_settings({"task": "cifar10"}, "proof")).env.optimizer == "sgd"


def test_language_model_context_length():
    """The TinyStories design's context of 256 tokens where a preset does not choose one (full),
    for the host and the data's windows; ``--block-size`` overrides it; the smoke and default
    presets use 16."""
    config = resolve_config(resolve_settings({"task": "tinystories"}, "full"))
    assert config.host.block_size == 256 and config.env.block_size == 256
    config = resolve_config(resolve_settings({"task": "tinystories", "block_size": 128, "host_variant": "tiny"}, "full"))
    assert config.host.block_size == 128 and config.env.block_size == 128
    assert resolve_config(resolve_settings({"task": "tinystories"}, "smoke")).host.block_size == 16
    assert resolve_config(resolve_settings({"task": "tinystories"})).host.block_size == 16


def test_the_tiny_tinystories_host_takes_every_column_and_the_depth_block():
    config = resolve_config(resolve_settings(
        {"task": "tinystories", "host_variant": "tiny", "slots": "r1c2,r0c1,r0c0", "blueprints": "depth,attention,mlp"},
        "full"))
    assert (config.host.d_model, config.host.num_layers) == (64, 2)
    assert config.env.slots == ("r0c0", "r0c1", "r1c2") and config.env.blueprints == ("depth", "attention", "mlp")
    model = MorphogeneticModel.build(config.host, slot_ids=config.env.slots, blueprints=config.env.blueprints)
    assert [s.parallel for s in model.lattice.slots.slots] == [False, True, True]
    host_params, state = jax.eval_shape(model.init, jax.random.key(0))
    out = jax.eval_shape(model.apply, host_params, state, jax.ShapeDtypeStruct((2, 16), jnp.int32))
    assert out.shape == (2, 16, config.host.vocab_size)


def test_settings_layering():
    """Explicit options override the preset, the preset overrides the defaults; canonical forms
    make ``--lr 3e-4`` equal the stored ``0.0003`` on resume."""
    config = resolve_config(resolve_settings({"task": "cifar10", "envs": 3, "learning_rate": "1e-3"}, "smoke"))
    assert config.ppo.num_envs == 3 and config.env.episode_epochs == 7
    assert config.members == (Member(learning_rate=1e-3, ent_coef=0.05, seed=0),)
    assert config.host.base_width == 4 and config.env.blueprints == ("conv_small", "norm")
    assert config.data.synthetic and config.data.label == "SYNTHETIC data"
    check_resume_settings(config, {"learning_rate": "0.001", "envs": 3, "slots": "r0c0", "updates": 99})
    default = resolve_config(resolve_settings({"task": "cifar10"}))
    assert default.preset == "default" and default.env.slots == ("r0c0", "r1c0", "r2c0")
    assert default.data.source == "auto" and not default.data.synthetic


def test_config_json_round_trip_and_damage(tmp_path):
    """config.json is one JSON form of the typed configuration; a damaged or incomplete one is a
    one-line error naming the file."""
    config = resolve_config(resolve_settings({"task": "cifar10", "population": 2, "learning_rate": "1e-3,3e-4"}, "smoke"))
    write_json(tmp_path / "config.json", config.to_json())
    assert read_config(tmp_path) == config
    (tmp_path / "config.json").write_text('{"version": 1, "task": ')
    with pytest.raises(RunConfigError, match="config.json is damaged"):
        read_config(tmp_path)
    value = config.to_json()
    del value["env"]
    write_json(tmp_path / "config.json", value)
    with pytest.raises(RunConfigError, match="lacks 'env'"):
        read_config(tmp_path)


def test_warm_start_settings(capsys, tmp_path):
    """--imitate names a controller or a schedule of the run's own slots, blueprints and epochs;
    its canonical form is stored in config.json and compared on resume; its options without it,
    and a recurrent learner, are refused."""
    smoke = ["--task=cifar10", "--preset=smoke"]
    for flag, expected in (("--imitate=conv_heavy@r0c0", "blueprint conv_heavy is not one of the run's blueprints "
                                                         "(conv_small, norm)"),
                           ("--imitate=norm@r2c0", "slot r2c0 is not one of the run's slots (r0c0)"),
                           ("--imitate=norm@r0c0@e7", "epoch 7 is outside the episode's 0..6"),
                           ("--imitate=norm", "is not blueprint@slot[@eEPOCH]"),
                           ("--imitate=oracle", "or a controller (heuristic, random, static)"),
                           ("--imitate= ", "--imitate needs a teacher")):
        assert expected in error_line(capsys, [*smoke, flag]), flag
    for flag in ("--imitation-rounds=2", "--imitation-epochs=3"):
        assert "give the teacher with --imitate" in error_line(capsys, [*smoke, flag]), flag
    assert "--imitation-rounds: must be positive, got 0" in error_line(
        capsys, [*smoke, "--imitate=heuristic", "--imitation-rounds=0"])
    assert "cannot warm-start --recurrent gru" in error_line(capsys, [*smoke, "--imitate=heuristic", "--recurrent=gru"])

    config = resolve_config(resolve_settings({"task": "cifar10", "imitate": " norm@r0c0 ", "imitation_rounds": 2},
                                             "smoke"))
    assert config.warm_start == WarmStart("norm@r0c0@e0", 2, 32)
    write_json(tmp_path / "config.json", config.to_json())
    assert read_config(tmp_path) == config
    check_resume_settings(config, {"imitate": "norm@r0c0@e0", "imitation_rounds": 2})
    with pytest.raises(RunConfigError, match="--imitate=heuristic does not match the run's --imitate=norm@r0c0@e0"):
        check_resume_settings(config, {"imitate": "heuristic"})
    # a configuration written before the warm start existed: no teacher, and none may be added on resume
    value = config.to_json()
    del value["warm_start"]
    value["settings"] = {k: v for k, v in value["settings"].items() if not k.startswith("imitat")}
    old = RunConfig.from_json(value)
    assert old.warm_start is None
    check_resume_settings(old, {"imitation_epochs": 32})
    with pytest.raises(RunConfigError, match="does not match the run's --imitate=None"):
        check_resume_settings(old, {"imitate": "heuristic"})
    assert resolve_config(resolve_settings({"task": "cifar10"}, "smoke")).warm_start is None


def assert_setting_kept(config: RunConfig, name: str, value, other, default, section: str = "ppo"):
    """The setting ``name`` is stored in the configuration's ``section`` (``ppo``: the learner's,
    ``env``: the environment's) as ``value`` and survives config.json, a resume must repeat it
    (``other`` is refused, naming both), and a configuration written before the setting existed
    (neither in its section nor among its settings) reads as ``default``."""
    flag = "--" + name.replace("_", "-")
    assert getattr(getattr(config, section), name) == value
    assert RunConfig.from_json(config.to_json()) == config
    check_resume_settings(config, {name: value})
    with pytest.raises(RunConfigError, match=f"{flag}={other} does not match the run's {flag}={value}"):
        check_resume_settings(config, {name: other})
    written = config.to_json()
    del written[section][name]
    written["settings"] = {k: v for k, v in written["settings"].items() if k != name}
    old = RunConfig.from_json(written)
    assert getattr(getattr(old, section), name) == default
    check_resume_settings(old, {name: default})


def test_kickstart_settings(capsys):
    """--kickstart-coef weighs the --imitate teacher during PPO: refused without a teacher or below 0,
    stored with the learner, compared on resume; a configuration from before it reads as 0."""
    smoke = ["--task=cifar10", "--preset=smoke"]
    assert "give the teacher with --imitate" in error_line(capsys, [*smoke, "--kickstart-coef=0.5"])
    assert "kickstart_coef (--kickstart-coef) must be a finite number >= 0" in error_line(
        capsys, [*smoke, "--imitate=static", "--kickstart-coef=-1"])
    config = resolve_config(resolve_settings({"task": "cifar10", "imitate": "norm@r0c0", "kickstart_coef": 0.5},
                                             "smoke"))
    assert config.warm_start.teacher == "norm@r0c0@e0"
    assert_setting_kept(config, "kickstart_coef", 0.5, 0.0, 0.0)


def test_group_size_settings(capsys):
    """--group-size groups the envs by problem: refused unless it divides --envs, stored with the
    learner, compared on resume; a configuration from before it reads as 1 (no groups)."""
    smoke = ["--task=cifar10", "--preset=smoke", "--envs=4"]
    assert "--group-size 3 splits the 4 envs" in error_line(capsys, [*smoke, "--group-size=3"])
    assert "group_size must be positive" in error_line(capsys, [*smoke, "--group-size=0"])
    config = resolve_config(resolve_settings({"task": "cifar10", "envs": 4, "group_size": 2}, "smoke"))
    assert config.ppo.num_envs == 4
    assert_setting_kept(config, "group_size", 2, 1, 1)


def test_seal_settings():
    """--seal gives the op head SEAL: stored with the environment, compared on resume, built into
    the env's action space; a configuration from before it reads as off (the six ops)."""
    args = cli.build_parser().parse_args(["--task=cifar10", "--seal"])
    assert cli.explicit_settings(args)["seal"] is True
    config = resolve_config(resolve_settings({"task": "cifar10", "seal": True}, "smoke"))
    assert_setting_kept(config, "seal", True, False, False, section="env")
    dataset = load_image_dataset("cifar10", "synthetic", n_train=64, n_test=32)
    for seal, ops in ((True, len(Op)), (False, int(Op.SEAL))):
        _, _, env, _ = build_env(dataclasses.replace(config, env=dataclasses.replace(config.env, seal=seal)), dataset)
        assert env.config.actions.seal == seal and env.action_space.num_ops == ops


def test_plans_settings(capsys):
    """--plans makes the learner decide once per episode: the menu is checked against the run's slots,
    blueprints and episode, named canonically, stored with the learner and compared on resume;
    settings that do not apply to it are refused in one line; a configuration from before it reads as
    the per-epoch learner."""
    smoke = ["--task=cifar10", "--preset=smoke"]
    args = cli.build_parser().parse_args([*smoke, "--plans=static,norm@r0c0"])
    assert cli.explicit_settings(args)["plans"] == "static,norm@r0c0"
    config = resolve_config(resolve_settings({"task": "cifar10", "plans": "static,norm@r0c0", "num_minibatches": 1},
                                             "smoke"))
    assert config.ppo.plans == ("static", "norm@r0c0@e0") and config.options["plans"] == "static,norm@r0c0@e0"
    assert RunConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    check_resume_settings(config, {"plans": "static, norm@r0c0@e0"})
    with pytest.raises(RunConfigError, match="--plans=static does not match the run's --plans=static,norm@r0c0@e0"):
        check_resume_settings(config, {"plans": "static"})
    written = config.to_json()
    del written["ppo"]["plans"]
    written["settings"].pop("plans")
    old = RunConfig.from_json(written)
    assert old.ppo.plans == ()
    check_resume_settings(old, {"plans": ()})
    for bad, message in (("static", "needs two plans or more"), ("static,norm@r9c0", "slot r9c0 is not one of the run's"),
                         ("static,conv_heavy@r0c0", "blueprint conv_heavy is not one of the run's"),
                         ("static,norm@r0c0@e99", "epoch 99 is outside the episode's"),
                         ("static,norm@r0c0,norm@r0c0@e0", "names a plan twice"), ("static,norm", "or 'static'")):
        assert message in error_line(capsys, [*smoke, f"--plans={bad}", "--minibatches=1"]), bad
    plans = [*smoke, "--plans=static,norm@r0c0", "--minibatches=1"]
    assert "--recurrent does not apply" in error_line(capsys, [*plans, "--recurrent=gru"])
    assert "give one of them" in error_line(capsys, [*plans, "--imitate=static"])
    assert "never acts per epoch: give one of them" in error_line(capsys, [*plans, "--seal"])
    assert "--envs (2) must be a multiple of --minibatches (4)" in error_line(
        capsys, [*smoke, "--plans=static,norm@r0c0", "--minibatches=4"])


def test_the_default_preset_learns_a_plan_per_problem(capsys):
    """The command users run first poses the growth-that-pays problem with the learner that decides
    once per episode from the drawn problem, each topology with its own menu; ``--plans none`` gives
    the per-epoch learner, and options of that learner, or slots, blueprints or an episode the menu
    does not fit, are refused in one line that says so. Commands that run no learner ignore the menu."""
    cifar = resolve_config(resolve_settings({"task": "cifar10"}))
    assert cifar.ppo.plans == ("static", "conv_heavy@r2c0@e0", "conv_heavy@r2c0@e10", "depthwise@r2c0@e0")
    assert (cifar.ppo.plan_inputs, cifar.ppo.group_size, cifar.ppo.num_minibatches) == ("problem", 2, 2)
    story = resolve_config(resolve_settings({"task": "tinystories"}))
    assert story.ppo.plans == ("static", "depth@r1c0@e0", "depth@r0c0@e0", "mlp_small@r0c0@e0")
    per_epoch = resolve_config(resolve_settings({"task": "cifar10", "plans": "none", "imitate": "conv_heavy@r2c0@e0"}))
    assert (per_epoch.ppo.plans, per_epoch.ppo.plan_inputs) == ((), "observation")
    assert per_epoch.warm_start.teacher == "conv_heavy@r2c0@e0" and per_epoch.options["plans"] == ""
    check_resume_settings(per_epoch, {"plans": "none"})
    with pytest.raises(RunConfigError, match="does not match the run's --plans=static,conv_heavy"):
        check_resume_settings(cifar, {"plans": "none"})
    with pytest.raises(RunConfigError, match="--plan-inputs chooses what the plan policy sees"):
        resolve_config(resolve_settings({"task": "cifar10", "plans": "none", "plan_inputs": "problem"}))
    task = ["--task=cifar10", "--data=synthetic"]
    for option in ("--imitate=conv_heavy@r2c0@e0", "--recurrent=gru", "--rollout-steps=5", "--seal"):
        line = error_line(capsys, [*task, option])
        assert "is an option of the per-epoch learner" in line and "add --plans none" in line, option
    for option, message in (("--slots=r0c0,r1c0", "slot r2c0 is not one of the run's slots"),
                            ("--blueprints=norm,conv_heavy", "blueprint depthwise is not one of the run's"),
                            ("--episode-epochs=10", "epoch 10 is outside the episode's 0..9")):
        line = error_line(capsys, [*task, option])
        assert line.startswith("error: the default preset's --plans") and message in line, option
        assert "give your own --plans MENU, or --plans none" in line
    # a menu of one's own replaces the preset's and is checked as given
    own = resolve_config(resolve_settings({"task": "cifar10", "slots": "r0c0", "plans": "static,conv_heavy@r0c0"}))
    assert own.ppo.plans == ("static", "conv_heavy@r0c0@e0")
    assert "error: --plans: plan conv_heavy@r2c0" in error_line(capsys, [*task, "--slots=r0c0",
                                                                       "--plans=static,conv_heavy@r2c0"])
    sweep = resolve_config(resolve_settings(without_learner({"task": "cifar10", "slots": "r0c0", "envs": 3})))
    assert sweep.ppo.plans == () and sweep.env.slots == ("r0c0",)


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla-cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """4 updates, a checkpoint every 2, never stopped; TensorBoard scalars too."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    result = cli_run([*TINY, f"--run-dir={run_dir}", "--tensorboard"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_run_directory(reference):
    run_dir, result = reference
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"] == "cifar10" and config["preset"] == "smoke" and config["version"] == 1
    assert config["data"] == {**config["data"], "source": "synthetic", "synthetic": True, "label": "SYNTHETIC data"}
    assert config["env"]["slots"] == ["r0c0"] and config["env"]["blueprints"] == ["conv_small", "norm"]
    assert config["host"]["base_width"] == 4 and config["host"]["num_blocks"] == 1
    assert config["ppo"]["num_envs"] == 2 and config["population"] == 1 and config["updates"] == 4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2, 3, 4]
    assert [r["env_steps"] for r in rows] == [14, 28, 42, 56]  # 2 envs x 7-epoch episodes per update
    assert all(set(SPEC_METRICS) <= set(r) for r in rows) and "members" not in rows[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["synthetic"] and summary["best_member"] == 0
    assert summary["updates_done"] == 4 and summary["checkpoint"] == 4 and summary["members"][0]["final"] == rows[-1]
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [2, 4]  # --keep-checkpoints=2
    assert "SYNTHETIC" in result.stdout and "best member: 0" in result.stdout
    assert "preset smoke:" in result.stdout and "update 4/4" in result.stdout
    # --tensorboard: every row's metrics as scalars, one per update
    from tests.runs.test_rundir import read_scalars

    scalars = read_scalars(run_dir / "tensorboard")
    assert sorted(scalars["mean_return"]) == [1, 2, 3, 4]
    assert scalars["mean_return"][4] == pytest.approx(rows[-1]["mean_return"])


def _snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time, but the writer lock's (which names its holder)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_resume_of_a_complete_run_changes_nothing(reference, tmp_path, cache):
    run_dir = tmp_path / "complete"
    shutil.copytree(reference[0], run_dir, ignore=shutil.ignore_patterns(".lock"))
    before = _snapshot(run_dir)
    resumed = cli_run([f"--resume={run_dir}", "--no-progress", "--tensorboard"], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "the run is complete (4 updates)" in resumed.stdout
    assert _snapshot(run_dir) == before  # summary.json keeps the training's wall time; no new event file


def test_interrupt_then_resume_is_identical(reference, tmp_path, cache):
    ref_dir, _ = reference
    run_dir = tmp_path / "interrupted"
    stopped = cli_run([*TINY, f"--run-dir={run_dir}"], cache, code=INTERRUPT)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert f"resume with: python -m experiments.ppo --resume {run_dir}" in stopped.stderr.strip().splitlines()[-1]
    reference_lines = (ref_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert (run_dir / "metrics.jsonl").read_text() == "".join(reference_lines[:2])  # the half-written chunk is gone
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not summary["complete"] and summary["checkpoint"] == 2 and summary["updates_done"] == 2

    # as if a later process was killed: a row past the checkpoint and a save that never finished
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"update": 3, "mean_return": 123.0}) + "\n")
    shutil.copytree(run_dir / "checkpoints" / "2", run_dir / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000")

    resumed = cli_run([f"--resume={run_dir}", "--no-progress"], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint at update 2 of 4" in resumed.stdout
    assert (run_dir / "metrics.jsonl").read_text() == "".join(reference_lines)
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [2, 4]
    assert json.loads((run_dir / "summary.json").read_text())["complete"]

    # load_run restores the newest checkpoint with its population axis, for evaluation
    handle = load_run(run_dir)
    assert handle.step == 4 and handle.population == 1 and handle.synthetic and handle.best_member == 0
    assert handle.state.update.shape == (1,) and int(handle.state.update[0]) == 4
    member = handle.member_state(0)
    assert member.obs_stats.mean.shape == (handle.env.observation_size,)
    assert member.env_state is None and member.obs is None  # the learner, not its training envs

    # a damaged newest checkpoint: a clear error naming it and the fallback
    for path in (run_dir / "checkpoints" / "4").rglob("*"):
        if path.is_file() and path.stat().st_size:
            path.write_bytes(b"garbage")
    damaged = cli_run([f"--resume={run_dir}", "--updates=6", "--no-progress"], cache)
    assert damaged.returncode == 2
    last = damaged.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint at update 4") and "to resume from update 2" in last
    assert "Traceback" not in damaged.stderr


def test_evaluate_with_a_damaged_summary_is_one_line(reference, tmp_path, capsys):
    from experiments import evaluate

    run_dir = tmp_path / "copy"
    shutil.copytree(reference[0], run_dir, ignore=shutil.ignore_patterns(".lock"))
    (run_dir / "summary.json").write_text('{"best_member": ')
    assert evaluate.main(["--run-dir", str(run_dir), "--envs", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "summary.json is damaged" in err and "Traceback" not in err


@pytest.mark.slow  # ~40 s: three CLI runs that compile a learner
def test_a_diverged_learner_is_reported_never_best_and_never_saved(tmp_path, monkeypatch, capsys):
    """Through the real training loop: a population of two whose member 1 goes non-finite in
    update 1 and member 0 in update 2. The on-device check flags each at its update, member 1 is
    named and the other trains on; when none is left the run stops without saving the diverged
    state; nobody is the best member; the command exits 3 naming both updates."""
    import jax
    import jax.numpy as jnp

    from esper_jax.runs import loop

    make_programs = loop.make_programs

    def poisoned_programs(built):
        programs = make_programs(built)
        chunk = programs.chunk

        def poisoned(state, data):  # NaN parameters from member 1's update 1 and member 0's update 2
            bad = (state.update + 1) >= jnp.asarray([2, 1])
            nan = lambda p: jnp.where(bad.reshape((-1,) + (1,) * (p.ndim - 1)), jnp.nan, p)
            return chunk(state.replace(params=jax.tree.map(nan, state.params)), data)

        return dataclasses.replace(programs, chunk=jax.jit(poisoned))

    monkeypatch.setattr(loop, "make_programs", poisoned_programs)
    run_dir = tmp_path / "run"
    code = cli.main(["--task=cifar10", "--preset=smoke", "--population=2", "--updates=3", "--checkpoint-every=1",
                     f"--run-dir={run_dir}", "--no-progress", "--compile-cache=off"])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert "member 1: the learner's parameters or losses are not finite from update 1" in captured.out
    assert "the other 1 member(s) train on" in captured.out
    assert "every learner diverged; stopping at update 2 without saving it" in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        "error: the learner diverged (parameters or losses not finite): member 0 at update 2; member 1 at update 1; "
        "the checkpoint at update 1 is the last finite one; lower --learning-rate or --max-grad-norm and start a new run")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_member"] is None and summary["diverged"] == {"0": 2, "1": 1} and not summary["complete"]
    assert summary["checkpoint"] == 1 and sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["0", "1"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite"] for r in rows] == [1, 2]


def test_interrupted_message_names_what_is_saved():
    assert "delete runs/x" in cli.interrupted_message(Path("runs/x"), None)
    message = cli.interrupted_message(Path("runs/x"), 0)
    assert "1..0" not in message and "before the first update finished" in message and "--resume runs/x" in message
    assert "updates 1..8 are saved" in cli.interrupted_message(Path("runs/x"), 8)


def test_an_unusable_compile_cache_is_a_warning_not_a_traceback(tmp_path):
    from esper_jax.runs.loop import enable_compile_cache

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    warnings: list[str] = []
    assert not enable_compile_cache(blocker, warn=warnings.append)
    assert not enable_compile_cache(blocker / "below", warn=warnings.append)
    assert len(warnings) == 2 and all("running without it" in w and "\n" not in w for w in warnings)
    assert not enable_compile_cache(None, warn=warnings.append) and len(warnings) == 2


@pytest.mark.slow
def test_a_second_writer_is_refused_while_a_real_run_trains(tmp_path, cache):
    """Two real writers: while a run trains, a fresh run into its directory and a --resume of it
    are refused naming the first process; the first run finishes exactly like an undisturbed one."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", PLAIN, *TINY, f"--run-dir={run_dir}", f"--compile-cache={cache}"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:  # the lock is held before the description is printed
            if line.startswith("task cifar10"):
                break
        second = cli_run([f"--resume={run_dir}", "--updates=6", "--no-progress"], cache)
        third = cli_run([*TINY, f"--run-dir={run_dir}", "--learning-rate=1e-3"], cache)
        out, err = first.communicate(timeout=900)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    for other in (second, third):
        assert other.returncode == 2 and f"in use by another run (process {first.pid})" in other.stderr, other.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["complete"]
    assert json.loads((run_dir / "config.json").read_text())["ppo"]["learning_rate"] == 3e-4


@pytest.mark.slow  # ~80 s: the imitation program compiles besides the learner
def test_a_warm_started_run_imitates_once_then_trains(tmp_path, cache):
    """--imitate runs before the checkpoint at update 0 and writes imitation.json; a resumed run
    continues from its checkpoints and never imitates again."""
    run_dir = tmp_path / "warm"
    first = cli_run([*TINY, "--updates=2", f"--run-dir={run_dir}", "--imitate=norm@r0c0@e1", "--imitation-rounds=2",
                     "--imitation-epochs=4"], cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "warm start: imitating norm@r0c0@e1 for 2 round(s) of 2 episodes, 4 epochs each" in first.stdout
    assert first.stdout.count("round 2: -log p(teacher)") == 1
    imitation = json.loads((run_dir / "imitation.json").read_text())
    assert imitation["teacher"] == "norm@r0c0@e1" and (imitation["rounds"], imitation["epochs"]) == (2, 4)
    nll, agreement = imitation["members"]["nll"], imitation["members"]["agreement"]
    assert len(nll) == 1 and len(nll[0]) == 2 and all(0.0 <= a <= 1.0 for a in agreement[0])
    assert json.loads((run_dir / "config.json").read_text())["warm_start"] == {
        "teacher": "norm@r0c0@e1", "rounds": 2, "epochs": 4}
    resumed = cli_run([f"--resume={run_dir}", "--updates=4", "--no-progress"], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint at update 2 of 4" in resumed.stdout and "warm start" not in resumed.stdout
    assert [json.loads(line)["update"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_mix_resolves_each_task_under_the_preset_with_the_runs_learner(capsys):
    """``--mix TASK[=DATA]``: each other task takes the preset's configuration and menu for its host
    and the run's learner settings; the configuration survives its JSON form and resume compares
    the option. What one policy cannot learn across tasks is refused in one line."""
    config = resolve_config(resolve_settings({"task": "cifar10", "data": "synthetic", "plan_head": "scorer",
                                              "envs": 4, "mix": " tinystories = synthetic "}))
    (story,) = config.mix
    assert story.task == "tinystories" and story.data.source == "synthetic" and config.options["mix"] == \
        "tinystories=synthetic"
    assert story.ppo.plans == ("static", "depth@r1c0@e0", "depth@r0c0@e0", "mlp_small@r0c0@e0")
    assert (story.ppo.plan_head, story.ppo.num_envs, story.seed, story.env.episode_epochs) == ("scorer", 4, 0, 10)
    assert RunConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    check_resume_settings(config, {"mix": "tinystories=synthetic"})
    with pytest.raises(RunConfigError, match="--mix=tinystories=auto does not match the run's"):
        check_resume_settings(config, {"mix": "tinystories"})
    with pytest.raises(RunConfigError, match="--mix=tinystories=synthetic does not match the run's --mix=None"):
        check_resume_settings(config.replace(options={k: v for k, v in config.options.items() if k != "mix"},
                                             mix=()), {"mix": "tinystories=synthetic"})
    task = ["--task=cifar10", "--data=synthetic"]
    for options, message in ((["--mix=tinystories"], "give --plan-head scorer and --plan-inputs problem"),
                             (["--plans=none", "--mix=tinystories"], "give --plan-head scorer"),
                             (["--plan-head=scorer", "--mix=cifar10"], "cifar10 is the run's own task"),
                             (["--plan-head=scorer", "--mix=tinystories,tinystories"], "tinystories is given twice"),
                             (["--plan-head=scorer", "--mix=tinystories="], "is not TASK or TASK=DATA"),
                             (["--plan-head=scorer", "--mix=cifar11"], "--mix cifar11: unknown task"),
                             (["--preset=smoke", "--plans=static,norm@r0c0@e1", "--plan-head=scorer",
                               "--plan-inputs=problem", "--train-fraction=0.1:1", "--mix=tinystories"],
                              "the smoke preset has no menu of plans for the tinystories host")):
        assert message in error_line(capsys, [*task, *options]), options


def test_resume_compares_a_setting_newer_than_the_run_with_what_the_run_used():
    """A run written before a setting existed has no option for it: giving the value the run used
    is accepted on resume, another value is refused by name."""
    config = resolve_config(resolve_settings({"task": "cifar10"}, "smoke"))
    assert config.env.augment == "crop_flip"
    assert resolve_config(resolve_settings({"task": "cifar10", "augment": "crop"}, "smoke")).env.augment == "crop"
    assert resolve_config(resolve_settings({"task": "tinystories"}, "smoke")).env.augment == "none"
    old = config.replace(options={k: v for k, v in config.options.items() if k != "optimizer"})
    check_resume_settings(old, {"optimizer": "sgd"})
    older = config.replace(options={k: v for k, v in config.options.items() if k != "train_fraction"})
    check_resume_settings(older, {"train_fraction": "1"})
    with pytest.raises(RunConfigError, match="--train-fraction"):
        check_resume_settings(older, {"train_fraction": "0.1:1"})
    with pytest.raises(RunConfigError, match="--optimizer=adamw does not match the run's --optimizer=sgd"):
        check_resume_settings(old, {"optimizer": "adamw"})
