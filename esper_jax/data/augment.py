"""Image preprocessing: per-channel normalization (CIFAR's published statistics, or a dataset's own)
and the standard CIFAR crop-and-flip augmentation.

Everything but :func:`channel_stats` (computed once, in NumPy, when a dataset is loaded) is pure
JAX on whole batches, so it can run inside a jitted or vmapped training step next to the model
instead of in a host-side loader. The augmentations are jitted with ``pad`` static (inside an
outer jit they inline).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

# What a run's image batches get: CIFAR's random shifts and mirrors, shifts only (digits and text
# change meaning when mirrored), or nothing.
Augment = Literal["crop_flip", "crop", "none"]
AUGMENTS: tuple[Augment, ...] = ("crop_flip", "crop", "none")

# per-channel statistics of the training sets, on the [0, 1] scale
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def cifar_channel_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for ``cifar10`` or ``cifar100``."""
    canonical = name.lower().replace("-", "").replace("_", "")
    if canonical == "cifar10":
        return CIFAR10_MEAN, CIFAR10_STD
    if canonical == "cifar100":
        return CIFAR100_MEAN, CIFAR100_STD
    raise ValueError(f"no channel statistics for {name!r}; expected 'cifar10' or 'cifar100'")


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of uint8 NHWC ``images`` on the [0, 1] scale, for a dataset without
    published statistics. Summed a chunk of images at a time, so a large set needs no float copy."""
    channels = images.shape[-1]
    total, squares = np.zeros(channels), np.zeros(channels)
    for start in range(0, len(images), chunk):
        pixels = images[start:start + chunk].reshape(-1, channels).astype(np.float64) / 255.0
        total += pixels.sum(axis=0)
        squares += np.square(pixels).sum(axis=0)
    count = max(images.size // channels, 1)
    mean = total / count
    # A constant channel has std 0; one grey level keeps its (constant) normalized value finite.
    std = np.maximum(np.sqrt(np.maximum(squares / count - mean**2, 0.0)), 1.0 / 255.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def normalize_images(
    images: jax.Array,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> jax.Array:
    """uint8 NHWC images -> float32, scaled to [0, 1] then standardized per channel."""
    scaled = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@partial(jax.jit, static_argnames="pad")
def crop_and_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array, pad: int = 4) -> jax.Array:
    """Zero-pad each image by ``pad``, take the HxW window at ``offsets[i] = (row, col)``, mirror where ``flips[i]``.

    Offsets lie in ``[0, 2 * pad]``; ``(pad, pad)`` without a flip returns the image unchanged.
    """
    return gather_crop_flip(images, jnp.arange(images.shape[0]), offsets, flips, pad)


def gather_crop_flip(dataset: jax.Array, index: jax.Array, offsets: jax.Array, flips: jax.Array,
                     pad: int = 4) -> jax.Array:
    """:func:`crop_and_flip` of the images ``dataset[index]``, read straight from ``dataset``: one
    gather of each output pixel's source pixel (zero where the window leaves the image), with no
    padded copy and no gathered batch in between. Why: the padded per-image ``dynamic_slice``
    under ``vmap`` took 1.8x the time of this form (CIFAR batch of 64 from 4,096 images, with
    normalization, XLA:CPU: 0.31 vs 0.17 ms)."""
    height, width = dataset.shape[1:3]
    rows = offsets[:, 0, None] + jnp.arange(height) - pad                                  # [B, H]
    columns = jnp.where(flips[:, None], jnp.arange(width)[::-1], jnp.arange(width))
    columns = offsets[:, 1, None] + columns - pad                                          # [B, W]
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((columns >= 0) & (columns < width))[:, None, :]
    pixels = dataset[index[:, None, None], jnp.clip(rows, 0, height - 1)[:, :, None],
                     jnp.clip(columns, 0, width - 1)[:, None, :]]
    return jnp.where(inside[..., None], pixels, jnp.zeros((), dataset.dtype))


@partial(jax.jit, static_argnames="pad")
def random_crop_flip(key: jax.Array, images: jax.Array, pad: int = 4) -> jax.Array:
    """The standard CIFAR augmentation: per-image random crop (zero padding ``pad``) and random horizontal flip.

    Works on any dtype and batch size; deterministic for a given key.
    """
    offsets, flips = draw_crop_flip(key, images.shape[0], pad)
    return crop_and_flip(images, offsets, flips, pad)


def draw_crop_flip(key: jax.Array, batch: int, pad: int = 4) -> tuple[jax.Array, jax.Array]:
    """:func:`random_crop_flip`'s random choices for ``batch`` images: crop offsets ``[batch, 2]``
    in ``[0, 2 * pad]`` and flips ``[batch]``, for :func:`crop_and_flip`."""
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    return offsets, flips
