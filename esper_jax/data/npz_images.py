"""A user's own image dataset in one ``.npz`` file (``--task=images --data=PATH.npz``).

The file holds four arrays, as ``numpy.savez(PATH, x_train=..., y_train=..., x_test=..., y_test=...)``
writes them:

* ``x_train``, ``x_test``: uint8 images ``[N, S, S, C]`` (square, channels last, the same ``S``
  and ``C`` in both splits; grayscale is ``C = 1``);
* ``y_train``, ``y_test``: integer class indices ``[N]``, one per image, from 0;
* optionally ``num_classes``, an integer scalar: the number of classes, for a file whose labels do
  not reach the last class. Without it the task has ``max(label) + 1`` classes over both splits.

:func:`describe_npz` checks all of this except the pixel values while reading only the labels and
the image arrays' headers, so a run's configuration can take the host's input from the file at
once; :func:`load_npz` reads the images too. Every fault is a :class:`CorruptDatasetError` (or
:class:`DatasetNotFoundError`) whose one-line message names the file, the array and the fix.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from esper_jax.data.datasets import CorruptDatasetError, DatasetNotFoundError, ImageDataset, ImageShape
from esper_jax.data.paths import PathLike

IMAGE_ARRAYS = ("x_train", "x_test")
LABEL_ARRAYS = {"x_train": "y_train", "x_test": "y_test"}
REQUIRED = ("x_train", "y_train", "x_test", "y_test")
NUM_CLASSES_ARRAY = "num_classes"
LAYOUT = ("numpy.savez(PATH, x_train=..., y_train=..., x_test=..., y_test=...) with uint8 images [N, S, S, C] "
          "and integer labels [N]")
_MAX_LABEL = np.iinfo(np.int32).max - 1  # labels are int32 on the device, and num_classes = max + 1 must fit too
# what numpy and zipfile raise on a damaged archive or member
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError)


def describe_npz(path: PathLike) -> ImageShape:
    """The file's image size, channels and classes, with every check but the pixel values."""
    shape, _ = _inspect(Path(path))
    return shape


def load_npz(path: PathLike) -> ImageDataset:
    """Both splits of the file as an :class:`ImageDataset` (labels as int32), named after the file."""
    path = Path(path)
    shape, labels = _inspect(path)
    with _open(path) as npz:
        images = {name: np.ascontiguousarray(_read(npz, path, name)) for name in IMAGE_ARRAYS}
    return ImageDataset(name=path.stem, train_images=images["x_train"], train_labels=labels["y_train"],
                        test_images=images["x_test"], test_labels=labels["y_test"], num_classes=shape.num_classes,
                        source=str(path), synthetic=False)


def _inspect(path: Path) -> tuple[ImageShape, dict[str, np.ndarray]]:
    """Every check but the pixel values; the shape and the labels (int32, by array name)."""
    with _open(path) as npz:
        missing = [name for name in REQUIRED if name not in npz.files]
        if missing:
            held = ", ".join(npz.files) or "no arrays"
            raise CorruptDatasetError(f"{path} lacks {', '.join(missing)} (it holds {held}); an image dataset file "
                                      f"needs x_train, y_train, x_test and y_test: {LAYOUT}")
        image_shapes = {name: _image_header(npz, path, name) for name in IMAGE_ARRAYS}
        train, test = image_shapes["x_train"], image_shapes["x_test"]
        if train[1:] != test[1:]:
            raise CorruptDatasetError(
                f"{path}: x_test holds {_pixels(test)} images but x_train {_pixels(train)}; both splits need the same "
                f"height, width and channels")
        labels = {LABEL_ARRAYS[name]: _labels(npz, path, name, image_shapes[name][0]) for name in IMAGE_ARRAYS}
        declared = _declared_classes(npz, path) if NUM_CLASSES_ARRAY in npz.files else None
    top = max(int(values.max()) for values in labels.values())
    if declared is not None:
        for name, values in labels.items():
            if values.max() >= declared:
                raise CorruptDatasetError(
                    f"{path}: {name} has label {int(values.max())}, outside the {declared} classes the file's "
                    f"num_classes declares (labels 0..{declared - 1})")
    num_classes = declared if declared is not None else top + 1
    if num_classes < 2:
        raise CorruptDatasetError(f"{path}: every label is 0, one class; a classification task needs at least two "
                                  f"(or store num_classes in the file)")
    shape = ImageShape(size=train[1], channels=train[3], num_classes=num_classes)
    return shape, {name: values.astype(np.int32) for name, values in labels.items()}


def _open(path: Path):
    """numpy's lazy view of the archive (arrays are read when asked for), or why there is none."""
    if not path.exists():
        raise DatasetNotFoundError(f"{path} does not exist; --task=images needs --data=PATH.npz, a file written "
                                   f"with {LAYOUT}")
    if not path.is_file():
        raise CorruptDatasetError(f"{path} is not a file; --task=images needs --data=PATH.npz, a file written "
                                  f"with {LAYOUT}")
    if not zipfile.is_zipfile(path):
        raise CorruptDatasetError(f"{path} is not an .npz file (not a zip archive of arrays); write one with {LAYOUT}")
    try:
        return np.load(path, allow_pickle=False)
    except _READ_ERRORS as error:
        raise CorruptDatasetError(f"{path} cannot be read as an .npz file ({_reason(error)}); it is damaged, "
                                  f"write it again") from None


def _header(npz, path: Path, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """An array's shape and dtype from its .npy header, without reading its data."""
    member = name + ".npy" if name + ".npy" in npz.zip.namelist() else name
    try:
        with npz.zip.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(handle)
    except _READ_ERRORS as error:
        raise CorruptDatasetError(f"{path}: {name} cannot be read ({_reason(error)}); the file is damaged, write it "
                                  f"again") from None
    return tuple(int(n) for n in shape), dtype


def _read(npz, path: Path, name: str) -> np.ndarray:
    try:
        return npz[name]
    except _READ_ERRORS as error:
        raise CorruptDatasetError(f"{path}: {name} cannot be read ({_reason(error)}); the file is damaged, write it "
                                  f"again") from None


def _image_header(npz, path: Path, name: str) -> tuple[int, ...]:
    shape, dtype = _header(npz, path, name)
    if len(shape) != 4 or shape[3] < 1:
        hint = "; for grayscale [N, H, W] images add a channel axis: x[..., None]" if len(shape) == 3 else ""
        raise CorruptDatasetError(f"{path}: {name} must be images [N, H, W, C] (channels last), got shape "
                                  f"{list(shape)}{hint}")
    if dtype != np.uint8:
        raise CorruptDatasetError(f"{path}: {name} must be uint8 (pixel values 0..255), got {dtype}; scale the "
                                  f"pixels to 0..255 and store x.astype(np.uint8)")
    if shape[1] != shape[2]:
        raise CorruptDatasetError(f"{path}: {name} holds {shape[1]}x{shape[2]} images; the CNN host takes square "
                                  f"images, crop or pad them to one side length")
    if shape[0] == 0:
        raise CorruptDatasetError(f"{path}: {name} holds no images")
    return shape


def _labels(npz, path: Path, images: str, count: int) -> np.ndarray:
    """The labels of the ``images`` array, which holds ``count`` images."""
    name = LABEL_ARRAYS[images]
    shape, dtype = _header(npz, path, name)
    if dtype.kind not in "iu":
        hint = "; one-hot labels? store class indices, y.argmax(axis=1)" if len(shape) == 2 else (
            "; store them with y.astype(np.int64)" if dtype.kind == "f" else "")
        raise CorruptDatasetError(f"{path}: {name} must hold integer class indices, got {dtype} {list(shape)}{hint}")
    if shape != (count,):
        raise CorruptDatasetError(f"{path}: {name} must hold one label per {images} image, [{count}], got shape "
                                  f"{list(shape)}")
    labels = _read(npz, path, name)
    if labels.min() < 0:
        raise CorruptDatasetError(f"{path}: {name} has negative labels (the smallest is {int(labels.min())}); labels "
                                  f"are class indices 0, 1, 2, ...")
    if labels.max() > _MAX_LABEL:
        raise CorruptDatasetError(f"{path}: {name} has label {int(labels.max())}; labels are class indices 0, 1, 2, "
                                  f"... below {_MAX_LABEL + 1}")
    return labels


def _declared_classes(npz, path: Path) -> int:
    shape, dtype = _header(npz, path, NUM_CLASSES_ARRAY)
    value = _read(npz, path, NUM_CLASSES_ARRAY) if shape == () and dtype.kind in "iu" else None
    if value is None or not 2 <= int(value) <= _MAX_LABEL + 1:
        shown = f"{dtype} {list(shape)}" if value is None else str(int(value))
        raise CorruptDatasetError(f"{path}: num_classes, when given, must be an integer scalar of at least 2, got "
                                  f"{shown}")
    return int(value)


def _pixels(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[2]}x{shape[3]}"


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
