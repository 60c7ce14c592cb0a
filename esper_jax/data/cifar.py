"""CIFAR-10 and CIFAR-100 from the official archives, the opt-in download, and the tfds route.

Both official variants are read, from the ``.tar.gz`` archive or from the folder
it extracts to, in the data directory (see :mod:`esper_jax.data.paths`):

* binary: records of label byte(s) + 3072 image bytes in CHW order;
* python: pickled dicts with ``b"data"`` (uint8 [N, 3072], CHW) and the labels.

Images come back as uint8 NHWC ``[N, 32, 32, 3]``, labels as int32 (CIFAR-100:
the fine labels). Archives are decompressed on each load rather than cached
as ``.npz``: one pass over the 160 MB archive takes about a second, and a
cache would need its own invalidation rules.

Nothing here touches the network except :func:`download_cifar`, which only runs
when called explicitly.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.error import URLError
from urllib.request import urlopen

import numpy as np

from esper_jax.data.datasets import (
    CorruptDatasetError,
    DatasetDownloadError,
    DatasetNotFoundError,
    ImageDataset,
)
from esper_jax.data.paths import PathLike, data_dir_help, resolve_data_dir
from esper_jax.data.tfds_images import default_tfds_dir, read_splits as read_tfds_splits, tfds_installed

Split = Literal["train", "test"]
Variant = Literal["binary", "python"]
Source = Literal["auto", "archive", "tfds"]
LabelledArrays = tuple[np.ndarray, np.ndarray]  # uint8 [N, 32, 32, 3] images, int32 [N] labels

IMAGE_BYTES = 32 * 32 * 3
CIFAR_BASE_URL = "https://www.cs.toronto.edu/~kriz/"
VARIANTS: tuple[Variant, ...] = ("binary", "python")


@dataclass(frozen=True)
class CifarArchive:
    """One official archive: where it comes from, what it unpacks to, how its records look."""

    dataset: str
    variant: Variant
    archive_name: str
    folder_name: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    md5: str
    # binary variant: label bytes before each image, and which of them is the label we keep
    label_bytes: int
    label_index: int
    # python variant: the dict key holding the labels we keep
    label_key: bytes

    @property
    def url(self) -> str:
        return CIFAR_BASE_URL + self.archive_name

    @property
    def record_bytes(self) -> int:
        return self.label_bytes + IMAGE_BYTES

    def files(self, split: Split) -> tuple[str, ...]:
        return self.train_files if split == "train" else self.test_files


_ARCHIVES: dict[tuple[str, Variant], CifarArchive] = {
    ("cifar10", "binary"): CifarArchive(
        dataset="cifar10",
        variant="binary",
        archive_name="cifar-10-binary.tar.gz",
        folder_name="cifar-10-batches-bin",
        train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        test_files=("test_batch.bin",),
        md5="c32a1d4ab5d03f1284b67883e8d87530",
        label_bytes=1,
        label_index=0,
        label_key=b"labels",
    ),
    ("cifar10", "python"): CifarArchive(
        dataset="cifar10",
        variant="python",
        archive_name="cifar-10-python.tar.gz",
        folder_name="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        md5="c58f30108f718f92721af3b95e74349a",
        label_bytes=1,
        label_index=0,
        label_key=b"labels",
    ),
    ("cifar100", "binary"): CifarArchive(
        dataset="cifar100",
        variant="binary",
        archive_name="cifar-100-binary.tar.gz",
        folder_name="cifar-100-binary",
        train_files=("train.bin",),
        test_files=("test.bin",),
        md5="03b5dce01913d631647c71ecec9e9cb8",
        label_bytes=2,
        label_index=1,  # byte 0 is the coarse (20-class) label
        label_key=b"fine_labels",
    ),
    ("cifar100", "python"): CifarArchive(
        dataset="cifar100",
        variant="python",
        archive_name="cifar-100-python.tar.gz",
        folder_name="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        label_bytes=2,
        label_index=1,
        label_key=b"fine_labels",
    ),
}

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
DISPLAY_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def canonical_cifar_name(name: str) -> str:
    """Map spellings like ``CIFAR-10`` or ``cifar_100`` to ``cifar10`` / ``cifar100``."""
    canonical = name.lower().replace("-", "").replace("_", "")
    if canonical not in NUM_CLASSES:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected 'cifar10' or 'cifar100'")
    return canonical


def cifar_archive(name: str, variant: Variant = "binary") -> CifarArchive:
    """The official archive description for ``name`` in ``variant`` ('binary' or 'python')."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown CIFAR variant {variant!r}; expected one of {VARIANTS}")
    return _ARCHIVES[(canonical_cifar_name(name), variant)]


def _check_split(split: str) -> Split:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    return split  # type: ignore[return-value]


# --------------------------------------------------------------------------- decoding records


def decode_binary_records(raw: bytes, archive: CifarArchive, file_label: str) -> LabelledArrays:
    """Decode a binary-variant record file into (uint8 NHWC images, int32 labels)."""
    if len(raw) == 0 or len(raw) % archive.record_bytes != 0:
        raise CorruptDatasetError(
            f"{file_label}: size {len(raw)} bytes is not a positive multiple of the "
            f"{archive.record_bytes}-byte {DISPLAY_NAMES[archive.dataset]} record "
            f"({archive.label_bytes} label byte(s) + {IMAGE_BYTES} image bytes); the file is truncated or not CIFAR"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, archive.record_bytes)
    labels = records[:, archive.label_index].astype(np.int32)
    images = records[:, archive.label_bytes :]
    return _chw_rows_to_nhwc(images), _checked_labels(labels, archive, file_label)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches without letting a tampered file run arbitrary code.

    The official pickles only need numpy's array reconstruction (and, when written
    by Python 3, ``_codecs.encode`` for bytes); any other global is refused, which
    turns a malicious or foreign pickle into a CorruptDatasetError.
    """

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"  # numpy 2 moved it; the old path warns
        return super().find_class(module, name)


def decode_python_batch(raw: bytes, archive: CifarArchive, file_label: str) -> LabelledArrays:
    """Decode a python-variant pickled batch into (uint8 NHWC images, int32 labels)."""
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # pickle can fail with almost any exception type on bad input
        raise CorruptDatasetError(f"{file_label}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or archive.label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise CorruptDatasetError(
            f"{file_label}: expected a dict with b'data' and {archive.label_key!r}, got {keys}"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[archive.label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise CorruptDatasetError(f"{file_label}: b'data' must be uint8 [N, {IMAGE_BYTES}], got {data.dtype} {list(data.shape)}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptDatasetError(
            f"{file_label}: {archive.label_key!r} must hold {data.shape[0]} integer labels, got {labels.dtype} {list(labels.shape)}"
        )
    return _chw_rows_to_nhwc(data), _checked_labels(labels.astype(np.int32), archive, file_label)


def _chw_rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
    # the archives store each image as 1024 red, then 1024 green, then 1024 blue bytes
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _checked_labels(labels: np.ndarray, archive: CifarArchive, file_label: str) -> np.ndarray:
    num_classes = NUM_CLASSES[archive.dataset]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptDatasetError(
            f"{file_label}: labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes}) for "
            f"{DISPLAY_NAMES[archive.dataset]}"
        )
    return labels


def _decode(raw: bytes, archive: CifarArchive, file_label: str) -> LabelledArrays:
    if archive.variant == "binary":
        return decode_binary_records(raw, archive, file_label)
    return decode_python_batch(raw, archive, file_label)


# --------------------------------------------------------------------------- locating and reading files


def _folder_is_complete(folder: Path, archive: CifarArchive, splits: tuple[Split, ...]) -> bool:
    return all((folder / name).is_file() for split in splits for name in archive.files(split))


def _find_cifar_files(name: str, data_dir: PathLike | None, splits: tuple[Split, ...]) -> tuple[CifarArchive, Path]:
    """Pick the first usable copy: extracted folder, then archive; binary before python."""
    root = resolve_data_dir(data_dir)
    for variant in VARIANTS:
        archive = cifar_archive(name, variant)
        folder = root / archive.folder_name
        if folder.is_dir() and _folder_is_complete(folder, archive, splits):
            return archive, folder
        if (root / archive.archive_name).is_file():
            return archive, root / archive.archive_name
    raise DatasetNotFoundError(missing_cifar_message(name, data_dir))


def missing_cifar_message(name: str, data_dir: PathLike | None = None) -> str:
    """The full 'what to put where' message for a missing CIFAR dataset."""
    canonical = canonical_cifar_name(name)
    root = resolve_data_dir(data_dir)
    lines = [f"{DISPLAY_NAMES[canonical]} was not found in {root}.", f"Put one of these into {root}{os.sep}:"]
    for variant in VARIANTS:
        archive = cifar_archive(canonical, variant)
        members = ", ".join(archive.train_files + archive.test_files)
        lines.append(f"  - {archive.archive_name}  ({archive.url})")
        lines.append(f"    or the folder it extracts to, {root / archive.folder_name}{os.sep} with {members}")
        folder = root / archive.folder_name
        if folder.is_dir():
            missing = [f for f in archive.train_files + archive.test_files if not (folder / f).is_file()]
            lines.append(f"    (that folder exists but lacks: {', '.join(missing)})")
    lines.append(data_dir_help(data_dir))
    lines.append(
        "To download it (opt-in, needs network): "
        f"python -c \"from esper_jax.data.cifar import download_cifar; download_cifar('{canonical}')\"."
    )
    lines.append("For an offline run without the real data, pass --data=synthetic (clearly labelled synthetic data).")
    return "\n".join(lines)


def _read_from_folder(folder: Path, archive: CifarArchive, wanted: list[str]) -> dict[str, bytes]:
    return {member: (folder / member).read_bytes() for member in wanted}


def _read_from_tar(archive_path: Path, archive: CifarArchive, wanted: list[str]) -> dict[str, bytes]:
    """Read the wanted members in one sequential pass (a gzip stream cannot seek cheaply)."""
    wanted_paths = {f"{archive.folder_name}/{member}": member for member in wanted}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive_path, mode="r|gz") as tar:
            for info in tar:
                member = wanted_paths.get(info.name.removeprefix("./"))
                if member is None or not info.isfile():
                    continue
                handle = tar.extractfile(info)
                if handle is None:
                    continue
                found[member] = handle.read()
                if len(found) == len(wanted_paths):
                    break
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise CorruptDatasetError(
            f"{archive_path}: cannot be read as a gzip-compressed tar archive ({type(exc).__name__}: {exc}); "
            f"the file is truncated or corrupt, delete it and fetch {archive.url} again"
        ) from exc
    missing = [m for m in wanted if m not in found]
    if missing:
        raise CorruptDatasetError(
            f"{archive_path}: archive lacks {', '.join(f'{archive.folder_name}/{m}' for m in missing)}; "
            f"it is truncated or not the official {archive.archive_name}"
        )
    return found


def _load_splits(name: str, data_dir: PathLike | None, splits: tuple[Split, ...]) -> tuple[dict[Split, LabelledArrays], Path]:
    """Decode the requested splits from the first usable copy; also returns where they came from."""
    archive, location = _find_cifar_files(name, data_dir, splits)
    wanted = [member for split in splits for member in archive.files(split)]
    from_folder = location.is_dir()
    raw = _read_from_folder(location, archive, wanted) if from_folder else _read_from_tar(location, archive, wanted)

    def label(member: str) -> str:
        # error messages name the file as the user would find it
        return str(location / member) if from_folder else f"{location}:{archive.folder_name}/{member}"

    result: dict[Split, LabelledArrays] = {}
    for split in splits:
        parts = [_decode(raw[member], archive, label(member)) for member in archive.files(split)]
        result[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return result, location


# --------------------------------------------------------------------------- public loaders


def _load(canonical: str, data_dir: PathLike | None, source: Source, splits: tuple[Split, ...]) -> tuple[dict[Split, LabelledArrays], str]:
    """The requested splits and a description of where they came from, following ``source``."""
    if source == "tfds":
        return _tfds_splits(canonical, data_dir, splits, full_guidance=True)
    if source not in ("auto", "archive"):
        raise ValueError(f"unknown source {source!r}; expected 'auto', 'archive' or 'tfds'")
    try:
        arrays, location = _load_splits(canonical, data_dir, splits)
        return arrays, str(location)
    except DatasetNotFoundError as archive_missing:
        if source == "archive" or not tfds_installed():
            raise
        try:
            return _tfds_splits(canonical, data_dir, splits, full_guidance=False)
        except DatasetNotFoundError as tfds_missing:
            raise DatasetNotFoundError(f"{archive_missing}\nAlso tried: {tfds_missing}") from None


def load_cifar(
    name: str,
    split: Split,
    data_dir: PathLike | None = None,
    source: Source = "auto",
) -> LabelledArrays:
    """Load one split of CIFAR-10/100 as (uint8 [N, 32, 32, 3], int32 [N]).

    ``source="archive"`` reads the official archive or its extracted folder;
    ``"tfds"`` reads data tensorflow-datasets has already prepared (never
    downloads); ``"auto"`` tries the archive, then prepared tfds data if
    tensorflow-datasets is installed, and otherwise raises DatasetNotFoundError.
    """
    split = _check_split(split)
    arrays, _ = _load(canonical_cifar_name(name), data_dir, source, (split,))
    return arrays[split]


def load_cifar_dataset(name: str, data_dir: PathLike | None = None, source: Source = "auto") -> ImageDataset:
    """Both splits of CIFAR-10/100 as an :class:`ImageDataset`, reading an archive only once."""
    canonical = canonical_cifar_name(name)
    arrays, origin = _load(canonical, data_dir, source, ("train", "test"))
    (train_images, train_labels), (test_images, test_labels) = arrays["train"], arrays["test"]
    return ImageDataset(
        name=canonical,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=NUM_CLASSES[canonical],
        source=origin,
        synthetic=False,
    )


# --------------------------------------------------------------------------- opt-in download


def _md5_of_file(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar(
    name: str,
    data_dir: PathLike | None = None,
    variant: Variant = "binary",
    *,
    url: str | None = None,
    md5: str | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Download an official CIFAR archive into the data directory (explicit opt-in; needs network).

    The file is streamed to a temporary name in the same folder, its md5 checked,
    then renamed into place, so an interrupted or wrong download never sits
    where the loaders look. ``url``/``md5`` override the official ones (mirrors).
    An archive already present with the right md5 is kept. Returns its path.
    """
    archive = cifar_archive(name, variant)
    source_url = url or archive.url
    expected_md5 = (md5 or archive.md5).lower()
    root = resolve_data_dir(data_dir)
    target = root / archive.archive_name
    if target.is_file() and _md5_of_file(target) == expected_md5:
        return target
    root.mkdir(parents=True, exist_ok=True)
    handle_fd, temp_name = tempfile.mkstemp(prefix=f".{archive.archive_name}.", suffix=".part", dir=root)
    temp_path = Path(temp_name)
    try:
        digest = hashlib.md5()
        with os.fdopen(handle_fd, "wb") as out:
            try:
                with urlopen(source_url, timeout=timeout_s) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
            except (URLError, OSError) as exc:  # socket timeouts and resets are OSErrors
                raise DatasetDownloadError(
                    f"could not download {source_url} ({type(exc).__name__}: {exc}). Check the network, or fetch "
                    f"the file by other means and put it at {target}; for an offline run pass --data=synthetic."
                ) from exc
        actual_md5 = digest.hexdigest()
        if actual_md5 != expected_md5:
            raise DatasetDownloadError(
                f"downloaded {source_url} but its md5 is {actual_md5}, expected {expected_md5}; nothing was saved"
            )
        os.replace(temp_path, target)
    finally:
        temp_path.unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------- tensorflow-datasets route


def _tfds_splits(
    canonical: str, data_dir: PathLike | None, splits: tuple[Split, ...], *, full_guidance: bool
) -> tuple[dict[Split, LabelledArrays], str]:
    """Read already-prepared tfds splits from ``<data dir>/tensorflow_datasets`` (never downloads;
    see :mod:`esper_jax.data.tfds_images`)."""
    guidance = f"\nOr use the official archives:\n{missing_cifar_message(canonical, data_dir)}" if full_guidance else ""
    arrays, _, source = read_tfds_splits(canonical, default_tfds_dir(data_dir), splits, guidance)
    return arrays, source  # type: ignore[return-value]


def load_cifar_tfds(name: str, data_dir: PathLike | None = None, *, split: Split = "train") -> LabelledArrays:
    """Read one split that tensorflow-datasets has already prepared under ``<data dir>/tensorflow_datasets``.

    Never downloads or prepares anything (preparing CIFAR needs TensorFlow);
    unprepared data raises DatasetNotFoundError, a missing package
    OptionalDependencyError naming the ``tfds`` extra.
    """
    split = _check_split(split)
    arrays, _ = _tfds_splits(canonical_cifar_name(name), data_dir, (split,), full_guidance=True)
    return arrays[split]
