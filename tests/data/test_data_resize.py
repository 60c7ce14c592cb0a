"""Lower-resolution variants of image datasets (a cheaper task, labelled as such)."""

from __future__ import annotations

import numpy as np
import pytest

from esper_jax.data import load_image_dataset
from esper_jax.data.datasets import ImageDataset, downsample_images


def test_downsampling_averages_blocks_and_says_so():
    dataset = load_image_dataset("cifar10", "synthetic", n_train=8, n_test=4)
    small = downsample_images(dataset, 16)
    assert small.train_images.shape == (8, 16, 16, 3) and small.test_images.shape == (4, 16, 16, 3)
    assert small.train_images.dtype == np.uint8
    block = dataset.train_images[3, 4:6, 10:12, 1].astype(np.float64)
    assert small.train_images[3, 2, 5, 1] == np.rint(block.mean())
    np.testing.assert_array_equal(small.train_labels, dataset.train_labels)
    assert small.synthetic and "downsampled to 16x16" in small.source and small.name == "cifar10@16px"
    assert downsample_images(dataset, 32) is dataset
    assert downsample_images(dataset, 8).train_images.shape[1:] == (8, 8, 3)
    for bad in (0, 5, 64):
        with pytest.raises(ValueError, match="must divide"):
            downsample_images(dataset, bad)


def test_image_containers_take_square_uint8_images_of_one_shape():
    """Any square size and channel count (a user's own data: 28x28 grayscale, 12x12 RGB...), the
    same in both splits; not rectangles, other dtypes or missing channel axes."""
    labels = np.zeros(2, np.int32)
    for shape in ((2, 16, 16, 3), (2, 32, 32, 3), (2, 12, 12, 3), (2, 28, 28, 1), (2, 8, 8, 4)):
        dataset = ImageDataset("x", np.zeros(shape, np.uint8), labels, np.zeros(shape, np.uint8), labels, 10, "test", True)
        assert (dataset.shape.size, dataset.shape.channels, dataset.shape.num_classes) == (shape[1], shape[3], 10)
    for shape, dtype in (((2, 16, 8, 3), np.uint8), ((2, 16, 16), np.uint8), ((2, 16, 16, 0), np.uint8),
                         ((2, 16, 16, 3), np.float32)):
        with pytest.raises(ValueError, match=r"must be uint8 \[N, S, S, C\]"):
            ImageDataset("x", np.zeros(shape, dtype), labels, np.zeros(shape, dtype), labels, 10, "test", True)
    with pytest.raises(ValueError, match="train and test images differ in shape"):
        ImageDataset("x", np.zeros((2, 8, 8, 3), np.uint8), labels, np.zeros((2, 8, 8, 1), np.uint8), labels, 10,
                     "test", True)
