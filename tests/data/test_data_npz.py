"""A user's own image dataset in an .npz file (``--task=images``): small files written here, read
back exactly, and every fault named in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from esper_jax.data import (
    CorruptDatasetError,
    DatasetNotFoundError,
    ImageShape,
    describe_image_dataset,
    load_image_dataset,
)
from esper_jax.data.augment import channel_stats
from esper_jax.data.datasets import image_fingerprint

N_TRAIN, N_TEST, SIZE, CHANNELS, CLASSES = 12, 6, 8, 1, 3


def image_arrays(seed: int = 0, size: int = SIZE, channels: int = CHANNELS) -> dict[str, np.ndarray]:
    """A tiny dataset: 8x8 grayscale images of 3 classes, every class in both splits."""
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (N_TRAIN, size, size, channels), dtype=np.uint8),
            "y_train": np.arange(N_TRAIN) % CLASSES,
            "x_test": rng.integers(0, 256, (N_TEST, size, size, channels), dtype=np.uint8),
            "y_test": (np.arange(N_TEST) + 1) % CLASSES}


def write_npz(path: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    """``image_arrays`` with ``changes`` (arrays replaced or added) and ``drop`` (names left out)."""
    arrays = {**image_arrays(), **changes}
    np.savez(path, **{k: v for k, v in arrays.items() if k not in drop})
    return path


def test_round_trip(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "digits.npz")
    arrays = image_arrays()
    assert describe_image_dataset("images", path) == ImageShape(SIZE, CHANNELS, CLASSES)
    dataset = load_image_dataset("images", str(path))
    np.testing.assert_array_equal(dataset.train_images, arrays["x_train"])
    np.testing.assert_array_equal(dataset.test_labels, arrays["y_test"])
    assert dataset.train_labels.dtype == np.int32 and dataset.shape == ImageShape(SIZE, CHANNELS, CLASSES)
    assert dataset.name == "digits" and dataset.source == str(path) and not dataset.synthetic
    # the digest follows the arrays, not the file: the same arrays compressed give the same one
    np.savez_compressed(tmp_path / "again.npz", **arrays)
    assert image_fingerprint(load_image_dataset("images", tmp_path / "again.npz")) == image_fingerprint(dataset)
    write_npz(tmp_path / "changed.npz", x_train=arrays["x_train"] ^ np.uint8(1))
    assert image_fingerprint(load_image_dataset("images", tmp_path / "changed.npz")) != image_fingerprint(dataset)


def test_classes_from_the_labels_or_declared(tmp_path: Path) -> None:
    """max label + 1 over both splits (here the test split alone reaches class 4), unless the file
    declares num_classes, which the labels must then lie under."""
    path = write_npz(tmp_path / "a.npz", y_test=np.array([0, 1, 2, 4, 0, 1]))
    assert describe_image_dataset("images", path).num_classes == 5
    path = write_npz(tmp_path / "b.npz", num_classes=np.int64(10))
    assert load_image_dataset("images", path).num_classes == 10
    with pytest.raises(CorruptDatasetError, match="y_test has label 4, outside the 4 classes the file's num_classes"):
        describe_image_dataset("images", write_npz(tmp_path / "c.npz", y_test=np.array([0, 1, 2, 4, 0, 1]),
                                                   num_classes=np.int64(4)))


def test_colour_and_other_sizes(tmp_path: Path) -> None:
    arrays = image_arrays(size=12, channels=3)
    path = write_npz(tmp_path / "rgb.npz", **arrays)
    assert describe_image_dataset("images", path) == ImageShape(12, 3, CLASSES)
    mean, std = channel_stats(arrays["x_train"])
    pixels = arrays["x_train"].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=0))
    np.testing.assert_allclose(std, pixels.std(axis=0))
    # in chunks, as a large set is summed
    np.testing.assert_allclose(channel_stats(arrays["x_train"], chunk=5)[1], pixels.std(axis=0))
    # a constant channel keeps a finite normalization
    assert channel_stats(np.zeros((2, 4, 4, 1), np.uint8)) == ((0.0,), (1 / 255,))


@pytest.mark.parametrize("changes, drop, message", [
    ({}, ("y_test",), "lacks y_test (it holds x_train, y_train, x_test)"),
    ({}, ("x_train", "y_train", "x_test", "y_test"), "lacks x_train, y_train, x_test, y_test (it holds no arrays)"),
    ({"x_train": np.zeros((N_TRAIN, SIZE, SIZE, 1), np.float32)}, (), "x_train must be uint8 (pixel values 0..255), got float32"),
    ({"x_test": np.zeros((N_TEST, SIZE, SIZE), np.uint8)}, (), "x_test must be images [N, H, W, C] (channels last), got shape [6, 8, 8]; for grayscale [N, H, W] images add a channel axis"),
    ({"x_train": np.zeros((N_TRAIN, SIZE, 6, 1), np.uint8)}, (), "x_train holds 8x6 images; the CNN host takes square"),
    ({"x_test": np.zeros((N_TEST, 4, 4, 1), np.uint8)}, (), "x_test holds 4x4x1 images but x_train 8x8x1"),
    ({"x_test": np.zeros((N_TEST, SIZE, SIZE, 3), np.uint8)}, (), "x_test holds 8x8x3 images but x_train 8x8x1"),
    ({"x_train": np.zeros((0, SIZE, SIZE, 1), np.uint8), "y_train": np.zeros(0, np.int64)}, (), "x_train holds no images"),
    ({"y_train": np.arange(N_TRAIN - 1) % CLASSES}, (), "y_train must hold one label per x_train image, [12], got shape [11]"),
    ({"y_test": np.eye(CLASSES)[np.arange(N_TEST) % CLASSES]}, (), "one-hot labels"),
    ({"y_train": (np.arange(N_TRAIN) % CLASSES).astype(np.float32)}, (), "y_train must hold integer class indices, got float32"),
    ({"y_train": np.arange(N_TRAIN) % CLASSES - 1}, (), "y_train has negative labels"),
    ({"y_train": np.zeros(N_TRAIN, np.int64), "y_test": np.zeros(N_TEST, np.int64)}, (), "one class"),
    ({"num_classes": np.array([3, 3])}, (), "num_classes, when given, must be an integer scalar"),
])
def test_bad_files_are_named(tmp_path: Path, changes: dict, drop: tuple, message: str) -> None:
    path = write_npz(tmp_path / "bad.npz", drop=drop, **changes)
    with pytest.raises(CorruptDatasetError) as raised:
        describe_image_dataset("images", path)
    assert message in str(raised.value) and str(path) in str(raised.value)


def test_not_an_npz(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist; --task=images needs --data=PATH.npz"):
        load_image_dataset("images", tmp_path / "missing.npz")
    with pytest.raises(CorruptDatasetError, match="is not a file"):
        load_image_dataset("images", tmp_path)
    (tmp_path / "text.npz").write_text("x_train,y_train\n")
    with pytest.raises(CorruptDatasetError, match=r"is not an \.npz file \(not a zip archive"):
        load_image_dataset("images", tmp_path / "text.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))  # a single array, not an archive of them
    with pytest.raises(CorruptDatasetError, match="not an .npz file"):
        load_image_dataset("images", tmp_path / "one.npy")
    good = write_npz(tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2] + good[-200:])  # its table of contents is off
    with pytest.raises(CorruptDatasetError, match="cut.npz cannot be read as an .npz file .*it is damaged"):
        load_image_dataset("images", tmp_path / "cut.npz")
    flipped = bytearray(good)  # pixels damaged after the header: found when the images are read (CRC)
    at = good.index(b"x_train.npy") + 400  # its local header and .npy header are shorter; its 768 pixels follow
    flipped[at] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    with pytest.raises(CorruptDatasetError, match="flipped.npz: x_train cannot be read .*the file is damaged"):
        load_image_dataset("images", tmp_path / "flipped.npz")


def test_where_the_data_is_named(tmp_path: Path) -> None:
    for data in ("auto", "synthetic"):
        with pytest.raises(ValueError, match="pass --data=PATH.npz"):
            load_image_dataset("images", data)
    with pytest.raises(ValueError, match="--data-dir does not apply to --task=images"):
        load_image_dataset("images", write_npz(tmp_path / "a.npz"), data_dir=tmp_path)
