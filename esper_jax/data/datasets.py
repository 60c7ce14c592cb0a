"""The containers every data source returns, and the errors every loader raises.

Real and synthetic data share these dataclasses, so a training run can always
tell where its arrays came from (``source``) and whether they are real
(``synthetic``). The checks in ``__post_init__`` pin the shapes and dtypes that
the rest of the library relies on, for real and synthetic data alike.
"""

from __future__ import annotations

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
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != CIFAR_IMAGE_SHAPE:
        raise ValueError(
            f"{field} must be uint8 [N, 32, 32, 3], got {images.dtype} {list(images.shape)}"
        )


def _check_labels(field: str, labels: np.ndarray, count: int, num_classes: int) -> None:
    if labels.dtype != np.int32 or labels.shape != (count,):
        raise ValueError(f"{field} must be int32 [{count}], got {labels.dtype} {list(labels.shape)}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{field} must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")


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
        _check_labels("train_labels", self.train_labels, len(self.train_images), self.num_classes)
        _check_labels("test_labels", self.test_labels, len(self.test_images), self.num_classes)


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
