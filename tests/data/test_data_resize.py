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


def test_image_containers_accept_square_divisors_of_32_only():
    labels = np.zeros(2, np.int32)
    for shape in ((2, 16, 16, 3), (2, 32, 32, 3)):
        ImageDataset("x", np.zeros(shape, np.uint8), labels, np.zeros(shape, np.uint8), labels, 10, "test", True)
    for shape in ((2, 16, 8, 3), (2, 12, 12, 3), (2, 16, 16, 1)):
        with pytest.raises(ValueError, match="S dividing 32"):
            ImageDataset("x", np.zeros(shape, np.uint8), labels, np.zeros(shape, np.uint8), labels, 10, "test", True)
