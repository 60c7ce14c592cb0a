"""The containers every data source returns, and the errors every loader raises.

Real and synthetic data share these dataclasses, so a training run can always
tell where its arrays came from (``source``) and whether they are real
(``synthetic``). The checks in ``__post_init__`` pin the shapes and dtypes that
the rest of the library relies on, for real and synthetic data alike.
:class:`ImageShape` is what a host needs to know of an image dataset (its
resolution, channels and classes), which the loaders of users' own datasets can
tell without reading the images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

CIFAR_IMAGE_SHAPE = (32, 32, 3)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not in the data directory; the message says what to put where."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but cannot be read as what it claims to be (names the file and the fault)."""


class TokenizerUnavailableError(RuntimeError):
    """A tokenizer's vocabulary files cannot be found offline; the message says how to provide them."""


class DatasetDownloadError(RuntimeError):
    """An explicitly requested download failed (network error or checksum mismatch)."""


class OptionalDependencyError(ImportError):
    """An optional extra (e.g. tensorflow-datasets) is needed for the requested route but not installed."""


def _check_images(field: str, images: np.ndarray) -> None:
    # The CNN host takes square images of one size (any size it can pool, any channel count).
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] < 1:
        raise ValueError(f"{field} must be uint8 [N, S, S, C], got {images.dtype} {list(images.shape)}")


def _check_labels(field: str, labels: np.ndarray, count: int, num_classes: int) -> None:
    if labels.dtype != np.int32 or labels.shape != (count,):
        raise ValueError(f"{field} must be int32 [{count}], got {labels.dtype} {list(labels.shape)}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{field} must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")


@dataclass(frozen=True)
class ImageShape:
    """What a host needs to know of an image dataset: square ``size`` x ``size`` images with
    ``channels`` channels, labels in ``[0, num_classes)``."""

    size: int
    channels: int
    num_classes: int

    def describe(self) -> str:
        return f"{self.size}x{self.size}x{self.channels} images, {self.num_classes} classes"


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An image classification task: uint8 NHWC images and int32 labels for both splits."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    source: str
    synthetic: bool

    def __post_init__(self) -> None:
        _check_images("train_images", self.train_images)
        _check_images("test_images", self.test_images)
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(f"train and test images differ in shape: {list(self.train_images.shape[1:])} and "
                             f"{list(self.test_images.shape[1:])}")
        _check_labels("train_labels", self.train_labels, len(self.train_images), self.num_classes)
        _check_labels("test_labels", self.test_labels, len(self.test_images), self.num_classes)

    @property
    def shape(self) -> ImageShape:
        return ImageShape(self.train_images.shape[1], self.train_images.shape[3], self.num_classes)


@dataclass(frozen=True, eq=False)
class TokenDataset:
    """A language-modelling task: flat uint16 token streams with stories joined by ``eot_id``."""

    name: str
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    vocab_size: int
    eot_id: int
    tokenizer: str
    source: str
    synthetic: bool

    def __post_init__(self) -> None:
        if not 0 <= self.eot_id < self.vocab_size <= np.iinfo(np.uint16).max + 1:
            raise ValueError(f"need 0 <= eot_id < vocab_size <= 65536, got {self.eot_id}, {self.vocab_size}")
        for field in ("train_tokens", "val_tokens"):
            tokens = getattr(self, field)
            if tokens.dtype != np.uint16 or tokens.ndim != 1:
                raise ValueError(f"{field} must be a flat uint16 array, got {tokens.dtype} {list(tokens.shape)}")


def downsample_images(dataset: ImageDataset, size: int) -> ImageDataset:
    """The same dataset at ``size`` x ``size`` pixels (mean of each block of pixels, rounded).

    A cheaper variant of a task: a 16x16 CIFAR step costs about a quarter of a 32x32 one. The
    result's ``name`` and ``source`` say that it was downsampled, so no output mistakes it for the
    full-size task."""
    full = dataset.train_images.shape[1]
    if size == full:
        return dataset
    if size <= 0 or full % size:
        raise ValueError(f"image size {size} must divide the dataset's {full}; e.g. 16 or 8")
    factor = full // size

    def pool(images: np.ndarray) -> np.ndarray:
        blocks = images.reshape(len(images), size, factor, size, factor, images.shape[3]).astype(np.float32)
        return np.rint(blocks.mean(axis=(2, 4))).astype(np.uint8)

    return ImageDataset(
        name=f"{dataset.name}@{size}px", train_images=pool(dataset.train_images), train_labels=dataset.train_labels,
        test_images=pool(dataset.test_images), test_labels=dataset.test_labels, num_classes=dataset.num_classes,
        source=f"{dataset.source}, downsampled to {size}x{size}", synthetic=dataset.synthetic)


def image_fingerprint(dataset: ImageDataset) -> str:
    """A digest of a dataset's arrays (shapes, dtypes and bytes of both splits): a run records it
    for data the user supplies, so that a resumed or evaluated run can refuse different data."""
    digest = hashlib.sha256()
    for array in (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()[:16]
