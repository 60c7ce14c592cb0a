"""CIFAR loaders against small archives written in the official formats, plus on-device augmentation."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
import tarfile
from collections import OrderedDict
from pathlib import Path
from urllib.error import URLError

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.data import augment, cifar
from esper_jax.data import (
    CorruptDatasetError,
    DatasetDownloadError,
    DatasetNotFoundError,
    OptionalDependencyError,
    load_cifar,
    load_cifar_dataset,
    load_image_dataset,
)

N_TRAIN, N_TEST = 20, 10
TFDS_INSTALLED = importlib.util.find_spec("tensorflow_datasets") is not None


# --------------------------------------------------------------------------- writing official-format fixtures


def make_split(count: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(count) * 7 + seed) % num_classes
    return images, labels.astype(np.int32)


def chw_rows(images: np.ndarray) -> np.ndarray:
    """What the archives store: per image, all red bytes, then green, then blue."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def binary_records(images: np.ndarray, labels: np.ndarray, name: str) -> bytes:
    if name == "cifar10":
        label_bytes = labels[:, None].astype(np.uint8)
    else:  # coarse label first; deliberately different from the fine one
        label_bytes = np.stack([(labels // 5) % 20, labels], axis=1).astype(np.uint8)
    return np.concatenate([label_bytes, chw_rows(images)], axis=1).tobytes()


def python_batch(images: np.ndarray, labels: np.ndarray, name: str) -> bytes:
    batch: dict[bytes, object] = {b"data": chw_rows(images), b"filenames": [b"x.png"] * len(images)}
    if name == "cifar10":
        batch[b"labels"] = labels.tolist()
    else:
        batch[b"fine_labels"] = labels.tolist()
        batch[b"coarse_labels"] = ((labels // 5) % 20).tolist()
    return pickle.dumps(batch, protocol=2)


def official_members(name: str, variant: str, train: tuple, test: tuple) -> dict[str, bytes]:
    """Member name (inside the archive's folder) -> bytes, with train split over the official files."""
    archive = cifar.cifar_archive(name, variant)
    encode = binary_records if variant == "binary" else python_batch
    members: dict[str, bytes] = {}
    train_parts = np.array_split(np.arange(len(train[0])), len(archive.train_files))
    for file_name, part in zip(archive.train_files, train_parts):
        members[file_name] = encode(train[0][part], train[1][part], name)
    members[archive.test_files[0]] = encode(test[0], test[1], name)
    return members


def write_dataset(
    data_dir: Path, name: str, variant: str, *, as_folder: bool = False, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], Path]:
    num_classes = cifar.NUM_CLASSES[name]
    train = make_split(N_TRAIN, num_classes, seed)
    test = make_split(N_TEST, num_classes, seed + 1)
    archive = cifar.cifar_archive(name, variant)
    members = official_members(name, variant, train, test)
    data_dir.mkdir(parents=True, exist_ok=True)
    if as_folder:
        folder = data_dir / archive.folder_name
        folder.mkdir()
        for member, payload in members.items():
            (folder / member).write_bytes(payload)
        return train, test, folder
    path = data_dir / archive.archive_name
    path.write_bytes(tar_gz(archive.folder_name, members))
    return train, test, path


def tar_gz(folder: str, members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member, payload in members.items():
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("variant", ["binary", "python"])
@pytest.mark.parametrize("as_folder", [False, True], ids=["archive", "folder"])
def test_both_variants_round_trip_exactly(tmp_path: Path, name: str, variant: str, as_folder: bool) -> None:
    train, test, _ = write_dataset(tmp_path, name, variant, as_folder=as_folder)
    for split, (images, labels) in (("train", train), ("test", test)):
        loaded_images, loaded_labels = load_cifar(name, split, data_dir=tmp_path, source="archive")
        assert loaded_images.dtype == np.uint8 and loaded_images.shape == images.shape
        assert loaded_labels.dtype == np.int32
        np.testing.assert_array_equal(loaded_images, images)
        np.testing.assert_array_equal(loaded_labels, labels)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_channel_planes_become_the_last_axis(tmp_path: Path, name: str) -> None:
    # written by hand, independent of the fixture helpers: red plane 10, green = pixel index, blue 200
    plane_size = 32 * 32
    image_bytes = bytes([10] * plane_size) + bytes(i % 256 for i in range(plane_size)) + bytes([200] * plane_size)
    labels = b"\x03" if name == "cifar10" else b"\x01\x07"  # cifar100: coarse 1, fine 7
    record = labels + image_bytes
    archive = cifar.cifar_archive(name, "binary")
    folder = tmp_path / archive.folder_name
    folder.mkdir()
    for member in archive.train_files + archive.test_files:
        (folder / member).write_bytes(record * 2)
    images, loaded_labels = load_cifar(name, "test", data_dir=tmp_path)
    assert images.shape == (2, 32, 32, 3)
    assert (images[..., 0] == 10).all() and (images[..., 2] == 200).all()
    y, x = 5, 17
    assert images[1, y, x, 1] == (y * 32 + x) % 256
    assert loaded_labels.tolist() == ([3, 3] if name == "cifar10" else [7, 7])


def test_dataset_records_its_source(tmp_path: Path) -> None:
    train, test, path = write_dataset(tmp_path, "cifar100", "python")
    dataset = load_cifar_dataset("CIFAR-100", data_dir=tmp_path)
    assert dataset.synthetic is False and dataset.source == str(path)
    assert dataset.num_classes == 100 and dataset.name == "cifar100"
    np.testing.assert_array_equal(dataset.train_images, train[0])
    np.testing.assert_array_equal(dataset.test_labels, test[1])


def test_load_image_dataset_takes_a_path(tmp_path: Path) -> None:
    write_dataset(tmp_path, "cifar10", "binary")
    dataset = load_image_dataset("cifar10", data=str(tmp_path))
    assert not dataset.synthetic and dataset.train_images.shape == (N_TRAIN, 32, 32, 3)


def test_data_may_name_the_archive_itself_but_not_another_file(tmp_path: Path) -> None:
    _, _, archive = write_dataset(tmp_path, "cifar10", "binary")
    dataset = load_image_dataset("cifar10", data=str(archive))
    assert not dataset.synthetic and dataset.train_images.shape == (N_TRAIN, 32, 32, 3)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match=r"--data .*notes.txt is a file; pass the folder"):
        load_image_dataset("cifar10", data=str(other))


def test_extracted_folder_is_preferred_to_archive(tmp_path: Path) -> None:
    write_dataset(tmp_path, "cifar10", "binary", seed=0)
    _, test_from_folder, folder = write_dataset(tmp_path, "cifar10", "binary", as_folder=True, seed=5)
    dataset = load_cifar_dataset("cifar10", data_dir=tmp_path)
    assert dataset.source == str(folder)
    np.testing.assert_array_equal(dataset.test_images, test_from_folder[0])


# --------------------------------------------------------------------------- where the data directory is


def test_env_var_is_used_and_explicit_dir_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_env, explicit = tmp_path / "env", tmp_path / "explicit"
    env_train, _, _ = write_dataset(from_env, "cifar10", "binary", seed=1)
    explicit_train, _, _ = write_dataset(explicit, "cifar10", "binary", seed=2)
    monkeypatch.setenv("ESPER_DATA", str(from_env))
    np.testing.assert_array_equal(load_cifar("cifar10", "train")[0], env_train[0])
    np.testing.assert_array_equal(load_cifar("cifar10", "train", data_dir=explicit)[0], explicit_train[0])


def test_default_is_data_under_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ESPER_DATA", raising=False)
    train, _, _ = write_dataset(tmp_path / "data", "cifar10", "python")
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(load_cifar("cifar10", "train")[0], train[0])


# --------------------------------------------------------------------------- missing and corrupt data


@pytest.mark.parametrize("name, files", [
    ("cifar10", ["cifar-10-binary.tar.gz", "cifar-10-python.tar.gz", "cifar-10-batches-bin"]),
    ("cifar100", ["cifar-100-binary.tar.gz", "cifar-100-python.tar.gz", "cifar-100-python"]),
])
def test_missing_dataset_says_what_to_put_where(tmp_path: Path, name: str, files: list[str]) -> None:
    data_dir = tmp_path / "nothing here"
    with pytest.raises(DatasetNotFoundError) as caught:
        load_cifar(name, "train", data_dir=data_dir)
    assert isinstance(caught.value, FileNotFoundError)
    message = str(caught.value)
    assert str(data_dir.resolve()) in message
    for expected in [*files, "--data-dir", "$ESPER_DATA", "download_cifar", "--data=synthetic"]:
        assert expected in message


def test_auto_never_falls_back_to_synthetic(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError):
        load_image_dataset("cifar10", data="auto", data_dir=tmp_path)


def test_incomplete_folder_names_the_missing_files(tmp_path: Path) -> None:
    _, _, folder = write_dataset(tmp_path, "cifar10", "binary", as_folder=True)
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DatasetNotFoundError, match="lacks: data_batch_3.bin"):
        load_cifar("cifar10", "train", data_dir=tmp_path)
    # the test split is complete, so it still loads
    assert load_cifar("cifar10", "test", data_dir=tmp_path)[0].shape == (N_TEST, 32, 32, 3)


def test_not_a_gzip_file(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CorruptDatasetError, match="cifar-10-binary.tar.gz"):
        load_cifar("cifar10", "train", data_dir=tmp_path)


@pytest.mark.parametrize("variant", ["binary", "python"])
def test_truncated_archive(tmp_path: Path, variant: str) -> None:
    _, _, path = write_dataset(tmp_path, "cifar10", variant)
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(CorruptDatasetError, match=path.name):
        load_cifar_dataset("cifar10", data_dir=tmp_path)


def test_archive_missing_a_member(tmp_path: Path) -> None:
    archive = cifar.cifar_archive("cifar10", "binary")
    members = official_members("cifar10", "binary", make_split(N_TRAIN, 10, 0), make_split(N_TEST, 10, 1))
    del members["data_batch_4.bin"]
    (tmp_path / archive.archive_name).write_bytes(tar_gz(archive.folder_name, members))
    with pytest.raises(CorruptDatasetError, match="data_batch_4.bin"):
        load_cifar("cifar10", "train", data_dir=tmp_path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_record_file_of_wrong_length(tmp_path: Path, name: str) -> None:
    _, _, folder = write_dataset(tmp_path, name, "binary", as_folder=True)
    test_file = folder / cifar.cifar_archive(name, "binary").test_files[0]
    test_file.write_bytes(test_file.read_bytes()[:-100])
    with pytest.raises(CorruptDatasetError, match="not a positive multiple") as caught:
        load_cifar(name, "test", data_dir=tmp_path)
    assert str(test_file) in str(caught.value)


@pytest.mark.parametrize("payload, problem", [
    (b"\x80\x02garbage", "not a readable CIFAR pickle"),
    (pickle.dumps(OrderedDict(a=1), protocol=2), "refusing to load global collections.OrderedDict"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2), "expected a dict"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2), "uint8 \\[N, 3072\\]"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, protocol=2), "outside \\[0, 10\\)"),
])
def test_bad_pickles(tmp_path: Path, payload: bytes, problem: str) -> None:
    _, _, folder = write_dataset(tmp_path, "cifar10", "python", as_folder=True)
    (folder / "test_batch").write_bytes(payload)
    with pytest.raises(CorruptDatasetError, match=problem) as caught:
        load_cifar("cifar10", "test", data_dir=tmp_path)
    assert "test_batch" in str(caught.value)


def test_unknown_names_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cifar10"):
        load_cifar("mnist", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_cifar("cifar10", "validation", data_dir=tmp_path)


# --------------------------------------------------------------------------- opt-in download (no network)


class FakeResponse(io.BytesIO):
    def __enter__(self) -> "FakeResponse":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_download_writes_verified_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = cifar.cifar_archive("cifar10", "binary")
    train, test = make_split(N_TRAIN, 10, 0), make_split(N_TEST, 10, 1)
    payload = tar_gz(archive.folder_name, official_members("cifar10", "binary", train, test))
    requested: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> FakeResponse:
        requested.append(url)
        return FakeResponse(payload)

    monkeypatch.setattr(cifar, "urlopen", fake_urlopen)
    path = cifar.download_cifar("cifar10", tmp_path, md5=hashlib.md5(payload).hexdigest())
    assert requested == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert path == tmp_path / "cifar-10-binary.tar.gz" and path.read_bytes() == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-binary.tar.gz"]
    np.testing.assert_array_equal(load_cifar("cifar10", "test", data_dir=tmp_path)[0], test[0])
    # already there with the right checksum: no second request
    cifar.download_cifar("cifar10", tmp_path, md5=hashlib.md5(payload).hexdigest())
    assert len(requested) == 1


def test_download_with_wrong_checksum_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar, "urlopen", lambda url, timeout: FakeResponse(b"not the archive"))
    with pytest.raises(DatasetDownloadError, match="c58f30108f718f92721af3b95e74349a"):
        cifar.download_cifar("cifar10", tmp_path, variant="python")
    assert list(tmp_path.iterdir()) == []


def test_download_network_failure_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float) -> FakeResponse:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "urlopen", offline)
    with pytest.raises(DatasetDownloadError) as caught:
        cifar.download_cifar("cifar100", tmp_path)
    message = str(caught.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz" in message
    assert str(tmp_path / "cifar-100-binary.tar.gz") in message and "--data=synthetic" in message
    assert list(tmp_path.iterdir()) == []


def test_official_checksums_are_known() -> None:
    assert cifar.cifar_archive("cifar10", "python").md5 == "c58f30108f718f92721af3b95e74349a"
    assert cifar.cifar_archive("cifar10", "binary").md5 == "c32a1d4ab5d03f1284b67883e8d87530"
    assert cifar.cifar_archive("cifar100", "python").md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert cifar.cifar_archive("cifar100", "binary").md5 == "03b5dce01913d631647c71ecec9e9cb8"


# --------------------------------------------------------------------------- tensorflow-datasets route


@pytest.mark.skipif(TFDS_INSTALLED, reason="tensorflow-datasets is installed; this checks the message shown without it")
def test_tfds_route_names_the_extra(tmp_path: Path) -> None:
    with pytest.raises(OptionalDependencyError, match=r"pip install esper-jax\[tfds\]"):
        cifar.load_cifar_tfds("cifar10", tmp_path)
    with pytest.raises(OptionalDependencyError, match="tfds"):
        load_cifar("cifar10", "train", data_dir=tmp_path, source="tfds")
    # auto mode without tfds reports the missing archive, not the missing package
    with pytest.raises(DatasetNotFoundError):
        load_cifar("cifar10", "train", data_dir=tmp_path, source="auto")


@pytest.mark.skipif(not TFDS_INSTALLED, reason="tensorflow-datasets is not installed (optional extra `tfds`)")
def test_tfds_route_reads_prepared_data(tmp_path: Path) -> None:
    import tensorflow_datasets as tfds

    # unprepared: a clear error, no download attempt
    with pytest.raises(DatasetNotFoundError, match="no prepared cifar10"):
        cifar.load_cifar_tfds("cifar10", tmp_path, split="test")
    with tfds.testing.mock_data(num_examples=6):
        images, labels = cifar.load_cifar_tfds("cifar100", tmp_path, split="test")
        dataset = load_cifar_dataset("cifar10", tmp_path, source="tfds")
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
    assert dataset.source.startswith("tfds:") and dataset.train_images.shape == (6, 32, 32, 3)


# --------------------------------------------------------------------------- augmentation


def test_normalize_images_uses_channel_statistics() -> None:
    images = jnp.full((2, 32, 32, 3), 255, dtype=jnp.uint8)
    normalized = augment.normalize_images(images)
    assert normalized.dtype == jnp.float32 and normalized.shape == images.shape
    expected = (1.0 - np.array(augment.CIFAR10_MEAN)) / np.array(augment.CIFAR10_STD)
    np.testing.assert_allclose(normalized[0, 0, 0], expected, rtol=1e-6)
    mean, std = augment.cifar_channel_stats("cifar100")
    np.testing.assert_allclose(augment.normalize_images(images, mean, std)[1, 3, 4], (1.0 - np.array(mean)) / np.array(std), rtol=1e-6)


BATCH = 32  # one batch shape for every augmentation test, so each function compiles once


def _batch() -> jax.Array:
    # pixel values 1..255: a 0 in the output can only come from the padding
    return jnp.asarray(np.random.default_rng(0).integers(1, 256, size=(BATCH, 32, 32, 3), dtype=np.uint8))


def test_centre_crop_without_flip_is_identity() -> None:
    images = _batch()
    offsets = jnp.full((BATCH, 2), 4)
    out = augment.crop_and_flip(images, offsets, jnp.zeros(BATCH, bool), pad=4)
    np.testing.assert_array_equal(out, images)
    flipped = augment.crop_and_flip(images, offsets, jnp.ones(BATCH, bool), pad=4)
    np.testing.assert_array_equal(flipped, images[:, :, ::-1])


def test_crop_offset_shifts_and_zero_fills() -> None:
    images = _batch()
    offsets = jnp.tile(jnp.array([[0, 8]]), (BATCH, 1))
    out = augment.crop_and_flip(images, offsets, jnp.zeros(BATCH, bool), pad=4)
    # offset (0, 8): the window starts 4 rows above the image and 4 columns into it
    np.testing.assert_array_equal(out[:, 4:, :28], images[:, :28, 4:])
    assert (out[:, :4] == 0).all() and (out[:, :, 28:] == 0).all()


def test_random_crop_flip_is_deterministic_varied_and_vmappable() -> None:
    images = _batch()
    first = np.asarray(augment.random_crop_flip(jax.random.key(0), images))
    assert first.shape == images.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, augment.random_crop_flip(jax.random.key(0), images))
    assert not np.array_equal(first, augment.random_crop_flip(jax.random.key(1), images))
    unchanged = np.all(first == np.asarray(images), axis=(1, 2, 3))
    has_zero_border = np.any(first == 0, axis=(1, 2, 3))
    assert unchanged.sum() < BATCH // 4 and has_zero_border.sum() > BATCH // 2
    # one key per environment, as a population training step uses it (traced, not compiled: fast)
    keys = jax.random.split(jax.random.key(2), 3)
    vmapped = jax.eval_shape(jax.vmap(augment.random_crop_flip, in_axes=(0, None)), keys, images)
    assert vmapped.shape == (3, *images.shape)


def test_pad_zero_only_flips() -> None:
    images = _batch()
    out = np.asarray(augment.random_crop_flip(jax.random.key(3), images, pad=0))
    same = np.all(out == np.asarray(images), axis=(1, 2, 3))
    mirrored = np.all(out == np.asarray(images)[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored) and same.any() and mirrored.any()


def test_gather_crop_flip_reads_the_indexed_images_like_pad_slice_and_mirror() -> None:
    """Against NumPy: zero-pad, slice the window, mirror; images picked by index (repeats too)."""
    dataset = _batch()
    rng = np.random.default_rng(5)
    index = rng.integers(0, BATCH, size=BATCH)
    index[:3] = 7
    offsets = rng.integers(0, 9, size=(BATCH, 2))
    flips = rng.random(BATCH) < 0.5
    out = np.asarray(jax.jit(augment.gather_crop_flip, static_argnames="pad")(
        dataset, jnp.asarray(index), jnp.asarray(offsets), jnp.asarray(flips), pad=4))
    padded = np.pad(np.asarray(dataset), ((0, 0), (4, 4), (4, 4), (0, 0)))
    for b in range(BATCH):
        window = padded[index[b], offsets[b, 0]:offsets[b, 0] + 32, offsets[b, 1]:offsets[b, 1] + 32]
        np.testing.assert_array_equal(out[b], window[:, ::-1] if flips[b] else window, err_msg=f"image {b}")
