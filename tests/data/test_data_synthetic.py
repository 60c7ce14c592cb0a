"""Synthetic stand-ins: deterministic, shaped exactly like the real tasks, learnable but not trivially."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from esper_jax.data import (
    DatasetNotFoundError,
    ImageDataset,
    TokenDataset,
    load_cifar,
    load_image_dataset,
    load_token_dataset,
    synthetic_cifar,
    synthetic_tinystories,
)


@pytest.fixture(scope="module")
def cifar10_small() -> ImageDataset:
    return synthetic_cifar(10, n_train=3000, n_test=1000, seed=0)


# --------------------------------------------------------------------------- images


def test_images_are_deterministic_per_seed() -> None:
    first = synthetic_cifar(10, n_train=300, n_test=100, seed=0)
    again = synthetic_cifar(10, n_train=300, n_test=100, seed=0)
    assert again.train_images.tobytes() == first.train_images.tobytes()
    assert again.test_labels.tobytes() == first.test_labels.tobytes()
    other = synthetic_cifar(10, n_train=300, n_test=100, seed=1)
    assert other.train_images.tobytes() != first.train_images.tobytes()
    # the test split comes from its own stream: it does not change with the train size
    smaller = synthetic_cifar(10, n_train=50, n_test=100, seed=0)
    assert smaller.test_images.tobytes() == first.test_images.tobytes()


@pytest.mark.parametrize("num_classes", [10, 100])
def test_shapes_dtypes_and_classes(num_classes: int) -> None:
    dataset = synthetic_cifar(num_classes, n_train=1000, n_test=300, seed=3)
    assert dataset.train_images.shape == (1000, 32, 32, 3) and dataset.train_images.dtype == np.uint8
    assert dataset.test_images.shape == (300, 32, 32, 3) and dataset.test_images.dtype == np.uint8
    assert dataset.train_labels.dtype == np.int32 and dataset.test_labels.dtype == np.int32
    assert set(dataset.train_labels.tolist()) == set(range(num_classes))
    assert set(dataset.test_labels.tolist()) == set(range(num_classes))
    counts = np.bincount(dataset.train_labels, minlength=num_classes)
    assert counts.max() - counts.min() <= 1
    assert dataset.synthetic and dataset.source.startswith("synthetic:") and dataset.num_classes == num_classes
    # images use the pixel range like photos do, not a constant or saturated one
    assert 90 < dataset.train_images.mean() < 165 and dataset.train_images.std() > 30


def test_same_layout_as_the_real_loader(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    record = bytes([4]) + bytes(range(256)) * 12
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (folder / name).write_bytes(record * 3)
    real_images, real_labels = load_cifar("cifar10", "test", data_dir=tmp_path)
    synthetic = synthetic_cifar(10, n_train=10, n_test=10, seed=0)
    assert synthetic.test_images.dtype == real_images.dtype and synthetic.test_images.shape[1:] == real_images.shape[1:]
    assert synthetic.test_labels.dtype == real_labels.dtype


def _nearest_class_mean_accuracy(dataset: ImageDataset) -> float:
    train = dataset.train_images.reshape(len(dataset.train_images), -1).astype(np.float32)
    test = dataset.test_images.reshape(len(dataset.test_images), -1).astype(np.float32)
    means = np.stack([train[dataset.train_labels == c].mean(0) for c in range(dataset.num_classes)])
    distances = (test**2).sum(1, keepdims=True) - 2 * test @ means.T + (means**2).sum(1)
    return float((distances.argmin(1) == dataset.test_labels).mean())


def test_images_learnable_but_not_trivial(cifar10_small: ImageDataset) -> None:
    accuracy = _nearest_class_mean_accuracy(cifar10_small)
    # chance is 0.1: a template matcher finds real signal but stays far from solving the task
    assert 0.2 < accuracy < 0.7, accuracy


def test_load_image_dataset_synthetic_is_explicit(tmp_path: Path) -> None:
    dataset = load_image_dataset("cifar100", data="synthetic", n_train=200, n_test=100, seed=2)
    assert dataset.synthetic and dataset.num_classes == 100 and dataset.name == "cifar100"
    with pytest.raises(DatasetNotFoundError):
        load_image_dataset("cifar100", data="auto", data_dir=tmp_path)


# --------------------------------------------------------------------------- tokens


def test_tokens_are_deterministic_and_shaped_like_real() -> None:
    first = synthetic_tinystories(20_000, 257, seed=0)
    again = synthetic_tinystories(20_000, 257, seed=0)
    assert first.train_tokens.tobytes() == again.train_tokens.tobytes()
    assert first.val_tokens.tobytes() == again.val_tokens.tobytes()
    assert synthetic_tinystories(20_000, 257, seed=1).train_tokens.tobytes() != first.train_tokens.tobytes()
    assert first.train_tokens.shape == (20_000,) and first.train_tokens.dtype == np.uint16
    assert first.val_tokens.ndim == 1 and first.val_tokens.dtype == np.uint16
    assert first.eot_id == 256 and int(first.train_tokens.max()) <= 256
    assert first.synthetic and first.source.startswith("synthetic:")
    assert synthetic_tinystories(0, 257, seed=0, n_val_tokens=0).train_tokens.shape == (0,)


def test_tokens_form_stories() -> None:
    tokens = synthetic_tinystories(50_000, 257, seed=0).train_tokens
    ends = np.flatnonzero(tokens == 256)
    lengths = np.diff(ends) - 1
    assert len(ends) > 50 and lengths.min() >= 1 and 50 < lengths.mean() < 400
    assert not np.any((tokens[:-1] == 256) & (tokens[1:] == 256))


def _ngram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab: int, order: int) -> float:
    """Smoothed n-gram model (one pseudo-count per context) fitted on train, evaluated on val, in nats per token."""

    def contexts_and_targets(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens = tokens.astype(np.int64)
        count = len(tokens) - order + 1
        context = np.zeros(count, np.int64)
        for offset in range(order - 1):
            context = context * vocab + tokens[offset : offset + count]
        return context, tokens[order - 1 :]

    def counts_of(keys: np.ndarray, table: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        unique, counts = table
        where = np.minimum(np.searchsorted(unique, keys), len(unique) - 1)
        return np.where(unique[where] == keys, counts[where], 0)

    context, target = contexts_and_targets(train)
    pair_table = np.unique(context * vocab + target, return_counts=True)
    context_table = np.unique(context, return_counts=True)
    val_context, val_target = contexts_and_targets(val)
    alpha = 1.0 / vocab
    pair_counts = counts_of(val_context * vocab + val_target, pair_table)
    context_counts = counts_of(val_context, context_table)
    return float(np.mean(-np.log((pair_counts + alpha) / (context_counts + alpha * vocab))))


@pytest.mark.parametrize("vocab", [257, 50257])
def test_tokens_reward_context_but_stay_uncertain(vocab: int) -> None:
    dataset = synthetic_tinystories(300_000, vocab, seed=0, n_val_tokens=30_000)
    unigram, bigram, trigram = (
        _ngram_cross_entropy(dataset.train_tokens, dataset.val_tokens, vocab, order) for order in (1, 2, 3)
    )
    assert unigram < np.log(vocab) - 0.5  # skewed frequencies, like text
    assert bigram < unigram - 0.3  # one token of context helps
    assert trigram < bigram - 0.3  # and two help more: the source is order 2
    assert trigram > 0.5  # but it stays a stochastic source, not a lookup table


def test_load_token_dataset_synthetic_uses_tokenizer_vocab() -> None:
    dataset = load_token_dataset(data="synthetic", tokenizer="byte", n_train_tokens=4000, n_val_tokens=1000, seed=5)
    assert isinstance(dataset, TokenDataset) and dataset.synthetic
    assert (dataset.vocab_size, dataset.eot_id, dataset.tokenizer) == (257, 256, "byte")
    assert dataset.train_tokens.shape == (4000,) and dataset.val_tokens.shape == (1000,)
