"""Datasets tensorflow-datasets has prepared (``--task=tfds:NAME``), written here in the
array_record format without TensorFlow and read back through the loader.

The builders are defined outside tfds' registry, so they are read the way a user's dataset is:
from the prepared files alone. Skipped without tensorflow-datasets (the optional ``tfds`` extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from esper_jax.data import (  # noqa: E402 - after the skip
    CorruptDatasetError,
    DatasetNotFoundError,
    ImageShape,
    describe_image_dataset,
    load_image_dataset,
)

SIZE, CHANNELS, CLASSES = 8, 1, 3
SPLIT_SIZES = {"train": 12, "test": 6}


def split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels a split holds (the arrays the prepared files must give back)."""
    count = SPLIT_SIZES.get(split, 4)
    rng = np.random.default_rng(sorted(SPLIT_SIZES).index(split) if split in SPLIT_SIZES else 7)
    return (rng.integers(0, 256, (count, SIZE, SIZE, CHANNELS), dtype=np.uint8),
            (np.arange(count) + len(split)) % CLASSES)


def _examples(split: str, image_key: str = "image"):
    from PIL import Image  # tfds encodes a numpy image with TensorFlow, a PIL image without it

    images, labels = split_arrays(split)
    for index, (image, label) in enumerate(zip(images, labels)):
        yield index, {image_key: Image.fromarray(image[..., 0]), "label": int(label)}


def prepare(data_dir: Path, name: str, splits: tuple[str, ...] = ("train", "test"), image_key: str = "image") -> None:
    """Prepare a tiny image dataset called ``name`` in ``data_dir`` as ``tfds build`` would, in the
    array_record format."""
    dataset_name = name

    with tfds.core.registered.skip_registration():
        class TinyImages(tfds.core.GeneratorBasedBuilder):
            name = dataset_name
            VERSION = tfds.core.Version("1.0.0")
            # A one-part module name: tfds then does not look for the builder's code as a package
            # resource, which needs importlib_resources (in the tfds extra, not in every tfds install).
            __module__ = "tiny_images"

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    image_key: tfds.features.Image(shape=(SIZE, SIZE, CHANNELS)),
                    "label": tfds.features.ClassLabel(num_classes=CLASSES)}))

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(split) for split in splits}

            def _generate_examples(self, split):
                yield from _examples(split, image_key)

    TinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tensorflow_datasets")
    prepare(directory, "tiny_digits")
    return directory


def test_a_prepared_dataset_reads_back_exactly(tfds_dir: Path) -> None:
    assert describe_image_dataset("tfds:tiny_digits", tfds_dir) == ImageShape(SIZE, CHANNELS, CLASSES)
    dataset = load_image_dataset("tfds:tiny_digits", tfds_dir)
    for split, images, labels in (("train", dataset.train_images, dataset.train_labels),
                                  ("test", dataset.test_images, dataset.test_labels)):
        expected_images, expected_labels = split_arrays(split)
        order = np.argsort([image.tobytes() for image in images])  # tfds shuffles examples when it prepares them
        reference = np.argsort([image.tobytes() for image in expected_images])
        np.testing.assert_array_equal(images[order], expected_images[reference])
        np.testing.assert_array_equal(labels[order], expected_labels[reference])
    assert dataset.num_classes == CLASSES and dataset.train_labels.dtype == np.int32 and not dataset.synthetic
    assert dataset.source == f"tfds:{tfds_dir / 'tiny_digits' / '1.0.0'} (splits train, test)"


def test_the_default_directory_is_the_data_directorys_tensorflow_datasets(tfds_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tensorflow_datasets").symlink_to(tfds_dir)
    assert load_image_dataset("tfds:tiny_digits", data_dir=tmp_path).shape == ImageShape(SIZE, CHANNELS, CLASSES)
    with pytest.raises(ValueError, match="names tfds' data directory and --data-dir"):
        load_image_dataset("tfds:tiny_digits", tfds_dir, data_dir=tmp_path)
    with pytest.raises(ValueError, match="no synthetic stand-in"):
        load_image_dataset("tfds:tiny_digits", "synthetic")


def test_not_prepared_names_the_dataset_the_directory_and_the_command(tmp_path: Path) -> None:
    """A dataset tfds knows (mnist) but nobody prepared there, and one it does not know at all:
    nothing is downloaded, and the message says how to prepare it."""
    for name in ("mnist", "no_such_dataset"):
        for read in (describe_image_dataset, load_image_dataset):
            with pytest.raises(DatasetNotFoundError) as raised:
                read(f"tfds:{name}", tmp_path)
            message = str(raised.value)
            assert f"has no prepared {name} in {tmp_path}" in message, message
            assert f"tfds build {name} --data_dir={tmp_path} --file_format=array_record" in message
            assert "Available datasets" not in message  # tfds' own message lists them all
    with pytest.raises(ValueError, match="name the dataset, e.g. --task=tfds:mnist"):
        describe_image_dataset("tfds:", tmp_path)


def test_a_dataset_without_a_test_split_names_the_splits_it_has(tmp_path: Path) -> None:
    prepare(tmp_path, "no_test_split", splits=("train", "validation"))
    for read in (describe_image_dataset, load_image_dataset):
        with pytest.raises(CorruptDatasetError, match=r"has no 'test' split \(it has: train, validation\)"):
            read("tfds:no_test_split", tmp_path)


def test_a_dataset_without_an_image_feature_names_its_features(tmp_path: Path) -> None:
    prepare(tmp_path, "pictures", image_key="picture")
    with pytest.raises(CorruptDatasetError, match=r"has features .*picture \(Image\).*needs 'image'"):
        describe_image_dataset("tfds:pictures", tmp_path)


def test_a_dataset_tfds_cannot_read_without_tensorflow_or_with_damaged_files(tfds_dir: Path, tmp_path: Path) -> None:
    """Prepared in tfds' default tfrecord format (its metadata says so; writing tfrecord files needs
    TensorFlow), or with a truncated file: one line naming the dataset and how to prepare it again."""
    import shutil

    copy = tmp_path / "tfrecord"
    shutil.copytree(tfds_dir, copy)
    info = copy / "tiny_digits" / "1.0.0" / "dataset_info.json"
    info.write_text(info.read_text().replace('"fileFormat": "array_record"', '"fileFormat": "tfrecord"'))
    for read in (describe_image_dataset, load_image_dataset):
        with pytest.raises(CorruptDatasetError, match="is prepared in the tfrecord format, which cannot be read without "
                                                      "TensorFlow .*--file_format=array_record"):
            read("tfds:tiny_digits", copy)
    damaged = tmp_path / "damaged"
    shutil.copytree(tfds_dir, damaged)
    (records,) = (damaged / "tiny_digits" / "1.0.0").glob("*-train.array_record-*")
    records.write_bytes(records.read_bytes()[: records.stat().st_size // 2])
    with pytest.raises(CorruptDatasetError, match="the train split cannot be read .*its files are damaged"):
        load_image_dataset("tfds:tiny_digits", damaged)
