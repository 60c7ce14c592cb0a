"""``--host MODULE:FUNCTION``: a user's own Flax network, grown by ``experiments.ppo`` (and taken by
``experiments.heuristic`` and ``experiments.headroom``, which share the run settings).

Refusals are tested in-process: one line, exit 2, before any data is loaded or anything compiled
(the host is checked against the data by ``jax.eval_shape``). A run is resolved and built without
compiling: the host, its input at the data's (or its own) resolution, and its ``config.json``
form, rebuilt by importing it again (and refused when the code changed). Training, resuming and
evaluating end to end compile the learner, so that test is ``slow``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import examples.my_host as my_host
from esper_jax.lattice.hosts import FlaxHost
from esper_jax.runs.build import build
from esper_jax.runs.config import RunConfig, RunConfigError, read_config
from esper_jax.runs.loop import describe
from esper_jax.runs.rundir import write_json
from esper_jax.runs.settings import resolve_config, resolve_settings
from experiments import headroom, heuristic
from tests.data.test_data_npz import CHANNELS, CLASSES, N_TRAIN, SIZE, write_npz
from tests.experiments.test_ppo_cli import REPO, error_line

HERE = __name__
EXAMPLE = "examples.my_host:make_host"


# Import paths the tests give --host.
def three_classes():
    """The example network with a head for the test data's 3 classes."""
    stem, segments, _ = my_host.make_host()
    return stem, segments, my_host.Classifier(CLASSES)


def fixed_4x4():
    """The same as a FlaxHost of a fixed input: 4x4 grayscale images."""
    return FlaxHost(*three_classes(), example_shape=(4, 4, CHANNELS))


def fixed_rgb():
    return FlaxHost(*three_classes(), example_shape=(SIZE, SIZE, 3))


def fixed_3x3():
    return FlaxHost(None, (my_host.Block(4),), my_host.Classifier(CLASSES), example_shape=(3, 3, CHANNELS))


def a_number():
    return 42


@pytest.fixture
def data(tmp_path) -> Path:
    return write_npz(tmp_path / "digits.npz")  # 8x8x1 images, 3 classes


def line_of(capsys, tmp_path, argv) -> str:
    run_dir = tmp_path / "never"
    line = error_line(capsys, [*argv, "--preset=smoke", "--no-progress", f"--run-dir={run_dir}"])
    assert not run_dir.exists(), line
    return line


def test_a_host_that_does_not_import_or_is_no_host_is_one_line(capsys, tmp_path):
    for path, expected in (
        ("examples.my_host", "--host examples.my_host: give MODULE:FUNCTION"),
        ("examples.nothing:make_host", "there is no module examples.nothing to import"),
        ("examples.my_host:make", "examples.my_host has no make (it defines: Block, Classifier, make_host)"),
        (f"{HERE}:a_number", "a_number() returned int, not a host; return a FlaxHost, or (stem, segments, head)"),
    ):
        assert expected in line_of(capsys, tmp_path, ["--task=cifar10", f"--host={path}"]), path


def test_a_host_that_does_not_fit_the_data_is_one_line(capsys, tmp_path, data):
    holds = f"{data} holds 8x8x1 images of 3 classes"
    for argv, expected in (
        ([f"--host={EXAMPLE}"], f"--host {EXAMPLE} gives [2, 10] outputs for a batch of 2 images, but {holds}: its "
                                "head must give logits [batch, 3]"),
        ([f"--host={HERE}:fixed_rgb"], f"takes 8x8x3 images, but {holds}: a host takes the data's channels at a size "
                                       "that divides 8 (8, 4, 2, 1)"),
        ([f"--host={HERE}:fixed_3x3"], "takes 3x3x1 images, but"),
        ([f"--host={HERE}:fixed_4x4", "--image-size=2"], f"--image-size 2 does not match --host {HERE}:fixed_4x4, "
                                                         "which takes 4x4 images"),
        ([f"--host={HERE}:three_classes", "--image-size=3"], "--image-size must divide 8, the images' size"),
        ([f"--host={HERE}:three_classes", "--host-variant=impaired"], "--host grows your own network and "
                                                                      "--host-variant chooses among the built-in"),
    ):
        assert expected in line_of(capsys, tmp_path, ["--task=images", f"--data={data}", *argv]), argv
    line = line_of(capsys, tmp_path, ["--task=tinystories", f"--host={EXAMPLE}"])
    assert "--host grows your own network on an image classification task (cifar10, cifar100, images, tfds:NAME)" in line
    # the example on CIFAR-10's 32x32x3 images of 10 classes is refused nowhere (checked here without data)
    assert resolve_config(resolve_settings({"task": "cifar10", "host": EXAMPLE}, "smoke")).host.example_shape == (32, 32, 3)


def test_heuristic_and_headroom_take_host(capsys):
    for main in (heuristic.main, headroom.main):
        assert main(["--task=cifar10", "--preset=smoke", "--host=examples.my_host:nothing"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "error: --host examples.my_host:nothing: examples.my_host has no nothing (it defines: Block, " \
                      "Classifier, make_host)", err


def test_a_run_builds_the_host_and_its_config_rebuilds_it(tmp_path, data, monkeypatch):
    """Resolved and built (nothing compiled); config.json's host is the import path, rebuilt equal
    by importing it, and refused once the code builds another network."""
    config = resolve_config(resolve_settings({"task": "images", "data": str(data), "host": f"{HERE}:three_classes"},
                                             "smoke"))
    host = config.host
    assert isinstance(host, FlaxHost) and host.source == f"{HERE}:three_classes" and config.host_variant == "user"
    assert host.example_shape == (SIZE, SIZE, CHANNELS) and host.topology == "cnn" and config.env.slots == ("r0c0",)
    assert config.env.blueprints == ("conv_small", "norm") and config.options["host"] == f"{HERE}:three_classes"
    built = build(config)
    assert built.env.model.host == host and built.env_data.train_x.shape == (N_TRAIN, SIZE, SIZE, CHANNELS)
    assert f"task images (user host variant, {built.env.host_param_count} parameters: cnn {HERE}:three_classes: 2 " \
           "segments on [8, 8, 1] inputs, points r0c0 8, r1c0 16, 3 outputs)" in describe(built, tmp_path)

    recorded = built.config
    value = json.loads(json.dumps(recorded.to_json()))
    assert value["host"] == {"topology": "cnn", "import": f"{HERE}:three_classes", "example_shape": [8, 8, 1],
                             "input_dtype": "float32", "parameters": host.parameter_digest}
    assert RunConfig.from_json(value) == recorded
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_json(run_dir / "config.json", value)
    assert read_config(run_dir) == recorded
    # the code changed since: a wider first block is another network; a missing function, no host
    monkeypatch.setattr(my_host, "make_host", lambda: (None, (my_host.Block(16, pool=True), my_host.Block(16)),
                                                       my_host.Classifier(10)))
    with pytest.raises(RunConfigError, match=rf"{HERE}:three_classes now builds a different host than the run's \(its "
                                             r"parameters changed: .*\); restore the code the run started with"):
        read_config(run_dir)
    monkeypatch.delattr(sys.modules[HERE], "three_classes")
    with pytest.raises(RunConfigError, match="the run's host cannot be rebuilt: --host .* has no three_classes"):
        read_config(run_dir)


def test_a_host_of_fixed_input_takes_the_data_downsampled(data):
    config = resolve_config(resolve_settings({"task": "images", "data": str(data), "host": f"{HERE}:fixed_4x4"},
                                             "smoke"))
    assert config.host.image_size == 4 and config.options["image_size"] == 4
    assert build(config).env_data.train_x.shape == (N_TRAIN, 4, 4, CHANNELS)


# ---------------------------------------------------------------------------- end to end (compiles)


def run_cli(module: str, args: list[str], cache: Path) -> subprocess.CompletedProcess:
    extra = [f"--compile-cache={cache}"] if module == "experiments.ppo" else []
    return subprocess.run([sys.executable, "-m", module, *args, *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_the_example_host_trains_resumes_and_evaluates(tmp_path):
    """The README's command: the example network on the user's own images (10 classes)."""
    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "mine.npz"
    np.savez(data, x_train=rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8), y_train=np.arange(64) % 10,
             x_test=rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8), y_test=np.arange(32) % 10)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    first = run_cli("experiments.ppo", ["--task=images", f"--data={data}", f"--host={EXAMPLE}", "--preset=smoke",
                                        f"--run-dir={run_dir}", "--updates=1", "--checkpoint-every=1", "--no-progress"],
                    cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"(user host variant" in first.stdout and f"{EXAMPLE}: 2 segments on [16, 16, 3] inputs" in first.stdout
    assert json.loads((run_dir / "config.json").read_text())["host"]["import"] == EXAMPLE
    resumed = run_cli("experiments.ppo", [f"--resume={run_dir}", "--updates=2", "--no-progress"], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    evaluated = run_cli("experiments.evaluate", ["--run-dir", str(run_dir), "--envs", "2"], cache)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((run_dir / "evaluation.json").read_text())["task"] == "images"
