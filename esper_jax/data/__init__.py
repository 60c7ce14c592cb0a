"""The dataset layer: one entry point per task family, real or synthetic, never mixed up.

``load_image_dataset`` and ``load_token_dataset`` take ``data``:

* ``"auto"``: the real dataset from the data directory (``data_dir`` >
  ``$ESPER_DATA`` > ``./data``); if it is missing, DatasetNotFoundError says what
  to put where. There is deliberately no silent fallback to synthetic data.
* ``"synthetic"``: the deterministic synthetic stand-in, same shapes and dtypes.
* any other string or path: used as the data directory for the real dataset.

Both return dataclasses (:class:`ImageDataset`, :class:`TokenDataset`) that
record ``source`` and ``synthetic`` alongside the arrays.

Besides CIFAR, ``load_image_dataset`` reads a user's own image dataset, whose shape and classes
come from the data (:func:`describe_image_dataset` tells them without reading the images):

* ``"images"``: an ``.npz`` file, ``data`` being its path (:mod:`esper_jax.data.npz_images`);
* ``"tfds:NAME"``: a dataset tensorflow-datasets has prepared, ``data`` being tfds' data directory,
  or ``"auto"`` for ``<data dir>/tensorflow_datasets`` (:mod:`esper_jax.data.tfds_images`).

Neither has a synthetic stand-in.
"""

from __future__ import annotations

import os
from pathlib import Path

from esper_jax.data.cifar import (
    NUM_CLASSES,
    VARIANTS as CIFAR_VARIANTS,
    canonical_cifar_name,
    cifar_archive,
    download_cifar,
    load_cifar,
    load_cifar_dataset,
    load_cifar_tfds,
)
from esper_jax.data.datasets import (
    CorruptDatasetError,
    DatasetDownloadError,
    DatasetNotFoundError,
    ImageDataset,
    ImageShape,
    OptionalDependencyError,
    TokenDataset,
    TokenizerUnavailableError,
)
from esper_jax.data.npz_images import describe_npz, load_npz
from esper_jax.data.paths import DATA_DIR_ENV_VAR, resolve_data_dir
from esper_jax.data.tfds_images import default_tfds_dir, describe_tfds, load_tfds
from esper_jax.data.synthetic import synthetic_cifar, synthetic_tinystories
from esper_jax.data.tinystories import (
    SOURCE_FILE_PATTERNS as TINYSTORIES_FILE_PATTERNS,
    ByteTokenizer,
    get_tokenizer,
    load_tinystories_dataset,
    load_tinystories_tokens,
    token_windows,
    tokenizer_vocab,
)

SYNTHETIC = "synthetic"
AUTO = "auto"
# the real CIFAR split sizes, so synthetic runs see the same number of batches
CIFAR_TRAIN_SIZE = 50_000
CIFAR_TEST_SIZE = 10_000
SYNTHETIC_TRAIN_TOKENS = 4_000_000
SYNTHETIC_VAL_TOKENS = 400_000
IMAGES = "images"        # a user's own .npz file
TFDS_PREFIX = "tfds:"    # tfds:NAME, a dataset tensorflow-datasets has prepared


def _real_data_dir(data: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None,
                   dataset_files: tuple[str, ...] = ()) -> str | os.PathLike[str] | None:
    """``data`` names a directory unless it is "auto"; it may not contradict ``data_dir``. A path to
    one of the dataset's own files (``dataset_files``, e.g. the CIFAR archive) means its folder;
    any other file is refused, since a data directory is a folder."""
    data = _folder_of(data, "data", dataset_files) if str(data) != AUTO else data
    data_dir = None if data_dir is None else _folder_of(data_dir, "data-dir", dataset_files)
    if str(data) == AUTO:
        return data_dir
    if data_dir is not None and resolve_data_dir(data) != resolve_data_dir(data_dir):
        raise ValueError(f"data={str(data)!r} and data_dir={str(data_dir)!r} name different directories; pass one")
    return data


def _folder_of(path: str | os.PathLike[str], option: str, dataset_files: tuple[str, ...]) -> str | os.PathLike[str]:
    if not os.path.isfile(path):
        return path
    if os.path.basename(path) in dataset_files:
        return os.path.dirname(os.path.abspath(path))
    raise ValueError(f"--{option} {path} is a file; pass the folder that holds the dataset's files "
                     f"({os.path.dirname(os.path.abspath(path))})")


def is_user_image_dataset(name: str) -> bool:
    """Whether ``name`` is a user's own image dataset (``images`` or ``tfds:NAME``), whose shape
    and classes come from the data."""
    return name == IMAGES or name.startswith(TFDS_PREFIX)


def user_image_location(name: str, data: str | os.PathLike[str] = AUTO,
                        data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where a user's own image dataset is read from: the ``.npz`` file (``images``), or tfds' data
    directory (``tfds:NAME``: ``data``, else ``<data dir>/tensorflow_datasets``), as an absolute
    path. Raises ValueError for a choice that cannot name one (no file, synthetic data, both
    ``data`` and ``data_dir``)."""
    data = str(data)
    if not is_user_image_dataset(name):
        raise ValueError(f"{name!r} is not a user's own image dataset ({IMAGES} or {TFDS_PREFIX}NAME)")
    if name == IMAGES:
        if data in (AUTO, SYNTHETIC):
            raise ValueError(f"--task=images reads your own .npz file: pass --data=PATH.npz (got --data={data}; "
                             f"a preset's synthetic data does not apply to it)")
        if data_dir is not None:
            raise ValueError("--data-dir does not apply to --task=images; the file is --data=PATH.npz")
        return Path(data).expanduser().absolute()
    tfds_name(name)
    if data == SYNTHETIC:
        raise ValueError(f"--task={name} reads data tensorflow-datasets has prepared and has no synthetic stand-in; "
                         f"pass --data=auto (<data dir>/tensorflow_datasets) or --data=DIR (tfds' data directory)")
    if data == AUTO:
        return default_tfds_dir(data_dir)
    if data_dir is not None:
        raise ValueError(f"--data={data} names tfds' data directory and --data-dir={data_dir} another; pass one")
    if os.path.isfile(data):
        raise ValueError(f"--data={data} is a file; for --task={name} pass tfds' data directory (the folder that "
                         f"holds {tfds_name(name)}/)")
    return Path(data).expanduser().absolute()


def tfds_name(name: str) -> str:
    """NAME of ``tfds:NAME`` (as tfds spells it: ``name[/config][:version]``)."""
    dataset = name.removeprefix(TFDS_PREFIX)
    if not name.startswith(TFDS_PREFIX) or not dataset.strip():
        raise ValueError(f"--task={name}: name the dataset, e.g. --task=tfds:mnist")
    return dataset


def describe_image_dataset(name: str, data: str | os.PathLike[str] = AUTO, *,
                           data_dir: str | os.PathLike[str] | None = None) -> ImageShape:
    """The image size, channels and classes of a user's own image dataset (``images``,
    ``tfds:NAME``), checked as far as can be without reading its images."""
    location = user_image_location(name, data, data_dir)
    return describe_npz(location) if name == IMAGES else describe_tfds(tfds_name(name), location)


def load_image_dataset(
    name: str,
    data: str | os.PathLike[str] = AUTO,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    source: str = "auto",
    seed: int = 0,
    n_train: int = CIFAR_TRAIN_SIZE,
    n_test: int = CIFAR_TEST_SIZE,
) -> ImageDataset:
    """CIFAR-10/100, real (from the data directory) or synthetic (``data="synthetic"``), or a user's
    own dataset (``images``, ``tfds:NAME``: see the module's docstring).

    ``seed``, ``n_train`` and ``n_test`` only shape the synthetic data; ``source``
    ('auto' | 'archive' | 'tfds') only real CIFAR.
    """
    if is_user_image_dataset(name):
        location = user_image_location(name, data, data_dir)
        return load_npz(location) if name == IMAGES else load_tfds(tfds_name(name), location)
    canonical = canonical_cifar_name(name)
    if str(data) == SYNTHETIC:
        return synthetic_cifar(NUM_CLASSES[canonical], n_train, n_test, seed)
    archives = tuple(cifar_archive(canonical, variant).archive_name for variant in CIFAR_VARIANTS)
    return load_cifar_dataset(canonical, _real_data_dir(data, data_dir, archives), source=source)  # type: ignore[arg-type]


def load_token_dataset(
    name: str = "tinystories",
    data: str | os.PathLike[str] = AUTO,
    *,
    tokenizer: str = "gpt2",
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    n_train_tokens: int = SYNTHETIC_TRAIN_TOKENS,
    n_val_tokens: int = SYNTHETIC_VAL_TOKENS,
) -> TokenDataset:
    """TinyStories tokens, real (tokenized and cached) or synthetic with the tokenizer's vocabulary.

    Synthetic tokens use the chosen tokenizer's vocabulary size and end-of-text
    id, but need none of its files.
    """
    if name.lower() != "tinystories":
        raise ValueError(f"unknown token dataset {name!r}; expected 'tinystories'")
    if str(data) == SYNTHETIC:
        vocab_size, eot_id = tokenizer_vocab(tokenizer)
        return synthetic_tinystories(
            n_train_tokens, vocab_size, seed, n_val_tokens=n_val_tokens, eot_id=eot_id, tokenizer=tokenizer
        )
    texts = tuple(pattern.format(split=split) for pattern in TINYSTORIES_FILE_PATTERNS for split in ("train", "valid"))
    return load_tinystories_dataset(_real_data_dir(data, data_dir, texts), tokenizer=tokenizer)  # type: ignore[arg-type]


__all__ = [
    "AUTO",
    "IMAGES",
    "SYNTHETIC",
    "TFDS_PREFIX",
    "DATA_DIR_ENV_VAR",
    "ByteTokenizer",
    "CorruptDatasetError",
    "DatasetDownloadError",
    "DatasetNotFoundError",
    "ImageDataset",
    "ImageShape",
    "OptionalDependencyError",
    "TokenDataset",
    "TokenizerUnavailableError",
    "describe_image_dataset",
    "download_cifar",
    "get_tokenizer",
    "is_user_image_dataset",
    "load_cifar",
    "load_cifar_dataset",
    "load_cifar_tfds",
    "load_image_dataset",
    "load_tinystories_dataset",
    "load_tinystories_tokens",
    "load_token_dataset",
    "resolve_data_dir",
    "synthetic_cifar",
    "synthetic_tinystories",
    "tfds_name",
    "token_windows",
    "tokenizer_vocab",
    "user_image_location",
]
