"""``python -m experiments.ppo --task=images --data=PATH.npz`` and ``--task=tfds:NAME``: a user's own
image data through the command line.

Bad input is tested in-process (it fails before anything compiles, and before the run directory
is made): one line and exit 2 each. A run is checked as far as it goes without compiling (the
host, the normalization and the data's digest it records; a resume or an evaluation on changed
data refused). The end-to-end runs (train, resume, evaluate, report; the tfds route) compile the
learner, so they are ``slow``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from esper_jax.data.augment import channel_stats
from esper_jax.runs.build import build
from esper_jax.runs.config import RunConfigError, read_config
from esper_jax.runs.rundir import default_run_dir, write_json
from esper_jax.runs.settings import resolve_config, resolve_settings
from tests.conftest import block_imports
from tests.data.test_data_npz import CHANNELS, CLASSES, N_TEST, N_TRAIN, SIZE, image_arrays, write_npz
from tests.experiments.test_ppo_cli import REPO, error_line

SMOKE = ["--preset=smoke", "--no-progress"]


def bad(capsys, tmp_path: Path, argv: list[str]) -> str:
    """The one error line of a run that must not start; nothing is created."""
    run_dir = tmp_path / "never"
    line = error_line(capsys, [*argv, f"--run-dir={run_dir}"])
    assert not run_dir.exists(), line
    return line


def test_bad_image_files_are_one_line_each(capsys, tmp_path):
    arrays = image_arrays()
    cases = [  # (file, what the line must say)
        (tmp_path / "missing.npz", "missing.npz does not exist; --task=images needs --data=PATH.npz"),
        (tmp_path, "is not a file"),
        (tmp_path / "notes.npz", "is not an .npz file (not a zip archive of arrays)"),
        (write_npz(tmp_path / "a.npz", drop=("y_test",)), "lacks y_test (it holds x_train, y_train, x_test)"),
        (write_npz(tmp_path / "b.npz", x_train=arrays["x_train"].astype(np.float32)),
         "x_train must be uint8 (pixel values 0..255), got float32"),
        (write_npz(tmp_path / "c.npz", x_train=arrays["x_train"][..., 0]),
         "x_train must be images [N, H, W, C] (channels last), got shape [12, 8, 8]"),
        (write_npz(tmp_path / "d.npz", x_test=np.zeros((N_TEST, SIZE, SIZE, 3), np.uint8)),
         "x_test holds 8x8x3 images but x_train 8x8x1"),
        (write_npz(tmp_path / "e.npz", y_test=arrays["y_test"][:-1]),
         "y_test must hold one label per x_test image, [6], got shape [5]"),
        (write_npz(tmp_path / "f.npz", y_train=-arrays["y_train"]), "y_train has negative labels"),
        (write_npz(tmp_path / "g.npz", y_train=arrays["y_train"] + 0.5), "y_train must hold integer class indices"),
        (write_npz(tmp_path / "h.npz", num_classes=np.int64(2)), "outside the 2 classes the file's num_classes"),
        (write_npz(tmp_path / "i.npz", x_train=np.zeros((0, SIZE, SIZE, 1), np.uint8), y_train=np.zeros(0, int)),
         "x_train holds no images"),
    ]
    (tmp_path / "notes.npz").write_text("not an archive")
    for path, expected in cases:
        line = bad(capsys, tmp_path, ["--task=images", f"--data={path}", *SMOKE])
        assert expected in line and str(path) in line, (expected, line)
    good = write_npz(tmp_path / "good.npz")
    for argv, expected in (
        (["--preset=smoke"], "--task=images reads your own .npz file: pass --data=PATH.npz (got --data=synthetic"),
        ([], "pass --data=PATH.npz (got --data=auto"),
        ([f"--data={good}", f"--data-dir={tmp_path}"], "--data-dir does not apply to --task=images"),
        ([f"--data={good}", "--image-size=3"], "--image-size must divide 8, the images' size (8, 4, 2, 1), got 3"),
        ([f"--data={good}", "--preset=proof"], "got 16 (the proof preset's; choose one with --image-size)"),
        ([f"--data={good}", "--image-size=2"],  # the default host pools twice: 2 pixels cannot be
         "the baseline cnn host cannot take the images of"),
        ([f"--data={good}", "--host-variant=tiny"], "choose one of baseline, impaired, pointwise"),
    ):
        assert expected in bad(capsys, tmp_path, ["--task=images", *argv]), argv
    assert "valid tasks are: cifar10, cifar100, tinystories, images, tfds:NAME" in bad(capsys, tmp_path, ["--task=image"])


def test_tfds_without_its_extra_is_one_line(capsys, tmp_path, monkeypatch):
    block_imports(monkeypatch, "tensorflow_datasets")
    line = bad(capsys, tmp_path, ["--task=tfds:mnist", f"--data-dir={tmp_path}"])
    assert "needs tensorflow-datasets, which is not installed" in line and "pip install esper-jax[tfds]" in line


def test_bad_tfds_datasets_are_one_line_each(capsys, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from tests.data.test_data_tfds import prepare

    line = bad(capsys, tmp_path, ["--task=tfds:mnist", f"--data-dir={tmp_path}"])
    searched = tmp_path / "tensorflow_datasets"
    assert f"has no prepared mnist in {searched}" in line
    assert f"tfds build mnist --data_dir={searched} --file_format=array_record" in line
    prepare(tmp_path, "no_test", splits=("train", "validation"))
    prepare(tmp_path, "pictures", image_key="picture")
    capsys.readouterr()  # tfds' progress bars while preparing
    for argv, expected in (
        (["--task=tfds:no_test", f"--data={tmp_path}"], "has no 'test' split (it has: train, validation)"),
        (["--task=tfds:pictures", f"--data={tmp_path}"], "picture (Image)"),
        (["--task=tfds:", f"--data={tmp_path}"], "name the dataset, e.g. --task=tfds:mnist"),
        (["--task=tfds:no_test", "--preset=smoke"], "has no synthetic stand-in"),
        (["--task=tfds:no_test", f"--data={tmp_path}", f"--data-dir={tmp_path}"], "pass one"),
    ):
        assert expected in bad(capsys, tmp_path, argv), argv


def test_a_run_takes_its_host_from_the_data_and_refuses_changed_data(capsys, tmp_path):
    """Resolved and built (nothing compiled): the host's input and classes come from the file, the
    images are normalized with their own statistics, the configuration records the file and its
    digest; a resume or an evaluation with different data is refused, the same data moved is read."""
    data = write_npz(tmp_path / "digits.npz")
    config = resolve_config(resolve_settings({"task": "images", "data": str(data)}, "smoke"))
    assert (config.host.in_channels, config.host.image_size, config.host.num_classes) == (CHANNELS, SIZE, CLASSES)
    assert config.data.source == str(data) and config.data.fingerprint is None and not config.data.synthetic
    built = build(config)
    task = built.env.config.task
    assert task.channel_stats == channel_stats(image_arrays()["x_train"]) and task.baseline_loss == pytest.approx(np.log(3))
    assert built.env_data.train_x.shape == (N_TRAIN, SIZE, SIZE, CHANNELS) and built.data_label == f"real data from {data}"
    recorded = built.config
    assert recorded.data.fingerprint is not None and recorded.data.label == f"real data from {data}"
    run_dir = tmp_path / "run"  # a run as train() leaves it after its first checkpoint
    (run_dir / "checkpoints" / "2").mkdir(parents=True)
    write_json(run_dir / "config.json", recorded.to_json())
    assert read_config(run_dir) == recorded
    # the same arrays in another file (here compressed, and moved): what an evaluation may read
    np.savez_compressed(tmp_path / "moved.npz", **image_arrays())
    assert build(recorded, data=str(tmp_path / "moved.npz")).config.data.fingerprint == recorded.data.fingerprint
    # changed in place: resume and evaluate refuse it
    arrays = image_arrays()
    write_npz(data, x_train=arrays["x_train"] ^ np.uint8(1))
    line = error_line(capsys, [f"--resume={run_dir}", "--no-progress"])
    assert f"{data} is not the data this run started with" in line and "restore that data, or start a new run" in line
    from experiments import evaluate

    assert evaluate.main(["--run-dir", str(run_dir), "--envs", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is not the data this run started with" in err
    # a different number of classes is named too (caught by the digest first, said in its terms)
    write_npz(data, y_test=np.array([0, 1, 2, 3, 0, 1]))
    with pytest.raises(RunConfigError, match="it now holds 8x8x1 images, 4 classes"):
        build(recorded)
    assert default_run_dir(recorded.replace(task="tfds:mnist/2.0")).name.startswith("tfds_mnist_2.0-smoke-")


# ---------------------------------------------------------------------------- end to end (compiles)


def run_cli(module: str, args: list[str], cache: Path | None = None) -> subprocess.CompletedProcess:
    extra = [f"--compile-cache={cache}"] if cache is not None else []
    return subprocess.run([sys.executable, "-m", module, *args, *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The module's compilation cache (a resumed run loads its program from it)."""
    return tmp_path_factory.mktemp("xla-cache")


@pytest.mark.slow
def test_an_image_file_trains_resumes_evaluates_and_reports(tmp_path, cache):
    data = write_npz(tmp_path / "digits.npz")
    run_dir = tmp_path / "run"
    first = run_cli("experiments.ppo", ["--task=images", f"--data={data}", *SMOKE, "--updates=2", "--checkpoint-every=1",
                                        f"--run-dir={run_dir}"], cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"task images (baseline host variant" in first.stdout and f"on real data from {data}" in first.stdout
    assert "'in_channels': 1, 'image_size': 8" in first.stdout and "SYNTHETIC" not in first.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"] == "images" and config["data"]["source"] == str(data) and config["data"]["fingerprint"]
    assert (config["host"]["in_channels"], config["host"]["image_size"], config["host"]["num_classes"]) == (1, 8, 3)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["synthetic"] is False and summary["data"] == f"real data from {data}"

    resumed = run_cli("experiments.ppo", [f"--resume={run_dir}", "--updates=3", "--no-progress"], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint at update 2 of 3" in resumed.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2, 3] and all(0 <= r["mean_final_val_accuracy"] <= 1 for r in rows)

    moved = tmp_path / "elsewhere.npz"
    shutil.move(data, moved)
    evaluated = run_cli("experiments.evaluate", ["--run-dir", str(run_dir), "--envs", "1", "--controllers",
                                                 "policy,static", "--data", str(moved)])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"task images on real data from {moved}" in evaluated.stdout
    payload = json.loads((run_dir / "evaluation.json").read_text())
    assert payload["task"] == "images" and payload["data"] == f"real data from {moved}" and not payload["synthetic"]
    reported = run_cli("experiments.report", ["--run-dir", str(run_dir)])
    assert reported.returncode == 0, reported.stderr[-3000:]


@pytest.mark.slow
def test_a_prepared_tfds_dataset_trains(tmp_path, cache):
    pytest.importorskip("tensorflow_datasets")
    from tests.data.test_data_tfds import prepare

    prepare(tmp_path / "tensorflow_datasets", "tiny_digits")
    run_dir = tmp_path / "run"
    result = run_cli("experiments.ppo", ["--task=tfds:tiny_digits", f"--data-dir={tmp_path}", "--data=auto", *SMOKE,
                                         "--updates=1", "--checkpoint-every=1", f"--run-dir={run_dir}"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "task tfds:tiny_digits" in result.stdout and "tiny_digits/1.0.0 (splits train, test)" in result.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"]["source"] == "auto" and config["data"]["fingerprint"]
    assert (config["host"]["in_channels"], config["host"]["num_classes"]) == (1, 3)
