"""Image datasets that tensorflow-datasets (tfds) has already prepared, read without TensorFlow.

``--task=tfds:NAME`` reads any such dataset with an ``image`` feature (``tfds.features.Image`` of
one square size) and a ``label`` feature (``tfds.features.ClassLabel``, which gives the number of
classes), training on its ``train`` split and validating on its ``test`` split; the CIFAR loader's
tfds route reads through here too.

Nothing is ever downloaded or prepared (offline, tfds would retry for minutes, and preparing most
datasets needs TensorFlow). tfds' random-access reader (``as_data_source``) needs no TensorFlow but
reads only data prepared in the array_record (or parquet) file format, not tfds' default tfrecord:
prepare it with ``tfds build NAME --data_dir=DIR --file_format=array_record``. A dataset that is not
there, not readable or not an image classification dataset is one line naming the dataset, the
directory searched and what to do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from esper_jax.data.datasets import (
    CorruptDatasetError,
    DatasetNotFoundError,
    ImageDataset,
    ImageShape,
    OptionalDependencyError,
)
from esper_jax.data.paths import PathLike, resolve_data_dir

TFDS_SUBDIR = "tensorflow_datasets"  # tfds' data directory inside ours, as tfds itself names its default
SPLITS = ("train", "test")
RANDOM_ACCESS_FORMATS = ("array_record", "parquet")  # what as_data_source reads without TensorFlow
LabelledArrays = tuple[np.ndarray, np.ndarray]  # uint8 [N, S, S, C] images, int32 [N] labels


def default_tfds_dir(data_dir: PathLike | None = None) -> Path:
    """Where prepared tfds data is looked for unless a directory is given: ``<data dir>/tensorflow_datasets``."""
    return resolve_data_dir(data_dir) / TFDS_SUBDIR


def tfds_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow_datasets") is not None


def import_tfds():  # noqa: ANN201 - the module has no stable type to name
    try:
        import tensorflow_datasets as tfds
    except ImportError as exc:
        raise OptionalDependencyError(
            "reading data prepared by tensorflow-datasets (--task=tfds:NAME, or CIFAR with source='tfds') needs "
            "tensorflow-datasets, which is not installed. Install the extra with `pip install esper-jax[tfds]`, or use "
            "the official archives (source='archive'); for an offline run pass --data=synthetic."
        ) from exc
    return tfds


def build_command(name: str, directory: Path) -> str:
    return f"tfds build {name} --data_dir={directory} --file_format=array_record"


def not_prepared_message(name: str, directory: Path, cause: BaseException | None = None) -> str:
    reason = f" ({type(cause).__name__}: {_first_line(cause)})" if cause is not None else ""
    return (f"tensorflow-datasets has no prepared {name} in {directory}{reason}. Prepare it there on a machine with "
            f"network (and TensorFlow, which building most datasets needs): {build_command(name, directory)}")


def describe_tfds(name: str, directory: Path) -> ImageShape:
    """The dataset's image size, channels and classes from its metadata (no image is read), once
    it is known to be prepared in ``directory`` with a train and a test split."""
    builder, shape = _open(name, directory)
    for split in SPLITS:
        problem = _problem(builder, name, directory, split)
        if problem is not None:
            raise problem
    return shape


def load_tfds(name: str, directory: Path) -> ImageDataset:
    """The train and test splits as an :class:`ImageDataset` (classes from the label feature)."""
    arrays, shape, source = read_splits(name, directory, SPLITS)
    (train_images, train_labels), (test_images, test_labels) = arrays["train"], arrays["test"]
    try:
        return ImageDataset(name=name, train_images=train_images, train_labels=train_labels, test_images=test_images,
                            test_labels=test_labels, num_classes=shape.num_classes, source=source, synthetic=False)
    except ValueError as error:  # labels outside the label feature's classes
        raise CorruptDatasetError(f"{name} in {directory}: {error}") from None


def read_splits(name: str, directory: Path, splits: tuple[str, ...],
                guidance: str = "") -> tuple[dict[str, LabelledArrays], ImageShape, str]:
    """The requested splits' (images, labels), the dataset's shape and a description of where they
    came from. ``guidance`` is appended to the message when the dataset is not prepared."""
    builder, shape = _open(name, directory, guidance)
    arrays: dict[str, LabelledArrays] = {}
    for split in splits:
        try:
            source = builder.as_data_source(split=split)
        except Exception as exc:  # noqa: BLE001 - tfds raises AssertionError, ValueError, NotImplementedError...
            raise _problem(builder, name, directory, split, guidance) or _damaged(builder, name, directory, split,
                                                                                   exc) from exc
        try:
            records = [source[index] for index in range(len(source))]
            empty = np.zeros((0, shape.size, shape.size, shape.channels), np.uint8)
            images = np.stack([np.asarray(r["image"], dtype=np.uint8) for r in records]) if records else empty
            labels = np.asarray([int(r["label"]) for r in records], dtype=np.int32)
        except Exception as exc:  # noqa: BLE001 - array_record, tfds' decoders and PIL each raise their own
            raise _damaged(builder, name, directory, split, exc) from exc
        arrays[split] = (images, labels)
    return arrays, shape, f"tfds:{builder.data_dir} (splits {', '.join(splits)})"


def _open(name: str, directory: Path, guidance: str = ""):
    """tfds' builder for ``name`` over ``directory`` and the shape its features promise."""
    tfds = import_tfds()
    try:
        builder = tfds.builder(name, data_dir=str(directory))
    except Exception as exc:  # noqa: BLE001 - an unknown name, an unparsable one, files tfds cannot read...
        raise DatasetNotFoundError(not_prepared_message(name, directory, exc) + guidance) from exc
    features = builder.info.features
    image = features["image"] if "image" in features else None
    label = features["label"] if "label" in features else None
    if not isinstance(image, tfds.features.Image) or not isinstance(label, tfds.features.ClassLabel):
        held = ", ".join(f"{key} ({type(features[key]).__name__})" for key in features.keys())
        raise CorruptDatasetError(f"{name} has features {held}; an image classification dataset needs 'image' "
                                  f"(tfds.features.Image) and 'label' (tfds.features.ClassLabel)")
    height, width, channels = image.shape
    if height is None or height != width or np.dtype(image.np_dtype) != np.uint8:
        raise CorruptDatasetError(f"{name}'s images are {image.np_dtype} of shape {image.shape}; the CNN host takes "
                                  f"uint8 square images of one size (resize them, and save them with "
                                  f"--task=images --data=PATH.npz)")
    if label.num_classes < 2:
        raise CorruptDatasetError(f"{name}'s label has {label.num_classes} class(es); a classification task needs at "
                                  f"least two")
    return builder, ImageShape(size=height, channels=channels, num_classes=label.num_classes)


def _problem(builder, name: str, directory: Path, split: str, guidance: str = "") -> Exception | None:
    """What keeps ``split`` from being read, as far as the dataset's metadata tells, or None.
    (When tfds' reader fails on data that is not prepared, its reason is about file formats,
    which would mislead here.)"""
    if not builder.is_prepared():
        return DatasetNotFoundError(not_prepared_message(name, directory) + guidance)
    if split not in builder.info.splits:
        held = ", ".join(sorted(builder.info.splits)) or "none"
        return CorruptDatasetError(f"{name} in {builder.data_dir} has no '{split}' split (it has: {held}); a run "
                                   f"trains on 'train' and validates on 'test'")
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format not in RANDOM_ACCESS_FORMATS:
        return CorruptDatasetError(
            f"{name} in {builder.data_dir} is prepared in the {file_format} format, which cannot be read without "
            f"TensorFlow (only {' or '.join(RANDOM_ACCESS_FORMATS)} can); prepare it again into another directory, "
            f"{build_command(name, Path('OTHER'))} and --data=OTHER, or here once {builder.data_dir} is removed")
    return None


def _damaged(builder, name: str, directory: Path, split: str, cause: BaseException) -> CorruptDatasetError:
    return CorruptDatasetError(f"{name} in {builder.data_dir}: the {split} split cannot be read "
                               f"({type(cause).__name__}: {_first_line(cause)}); its files are damaged, prepare it "
                               f"again: {build_command(name, directory)}")


def _first_line(error: BaseException) -> str:
    # tfds' "not found" errors go on to list every dataset it knows
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
