"""Synthetic stand-ins for CIFAR and TinyStories, for runs where the real data is absent.

They are selected only explicitly (``--data=synthetic``), are deterministic
from a seed, and have exactly the shapes and dtypes of the real tasks, so every
code path runs unchanged; their datasets carry ``synthetic=True`` and a
``source`` string that says how they were made.

They are built to be learnable but not trivial, so that model capacity shows:

* Images: each class owns a few prototypes drawn from smooth random fields
  (spatially structured, so convolutions help). A sample is one prototype of
  its class, cropped at a random shift, with random contrast and brightness,
  smooth class-independent clutter and pixel noise. Labels are never noisy.
  Shifts and several prototypes per class keep linear models well below what
  a shift-tolerant (convolutional) model reaches.
* Tokens: stories from a sparse order-2 Markov source. The next-token
  distribution depends on the last two tokens through a hashed context table,
  so a bigram model does clearly better than unigram statistics, and a model
  using two tokens of context better still; the source's entropy keeps the
  best achievable loss well above zero.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from esper_jax.data.datasets import CIFAR_IMAGE_SHAPE, ImageDataset, TokenDataset

IMAGE_SIZE = CIFAR_IMAGE_SHAPE[0]
MAX_SHIFT = 4
PROTOTYPES_PER_CLASS = 3
CLASS_FIELD_GRID = 5  # coarse grid of the class-wide field: larger = finer detail
VARIATION_GRID = 7  # coarse grid of each prototype's own variation
VARIATION_SCALE = 0.8  # how far prototypes of one class differ from each other
CLUTTER_GRID = 6
CLUTTER_SCALE = 0.9  # smooth class-independent background, relative to the prototype
NOISE_SCALE = 0.8  # per-pixel uniform noise with this standard deviation, relative to the prototype
CONTRAST_RANGE = (0.5, 1.3)
BRIGHTNESS_STD = 0.4
PIXEL_SCALE = 42.0  # one unit of field = this many grey levels around 128
_IMAGE_CHUNK = 1024

MEAN_STORY_TOKENS = 200
_TOKEN_STREAMS = 512


# --------------------------------------------------------------------------- images


def _gaussian_upsampler(grid: int, size: int) -> np.ndarray:
    """[size, grid] weights that interpolate a coarse grid smoothly onto ``size`` pixels."""
    centres = (np.arange(size) + 0.5) / size * grid - 0.5
    weights = np.exp(-0.5 * ((centres[:, None] - np.arange(grid)[None, :]) / 0.7) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _field_synthesis_matrix(grid: int, size: int) -> np.ndarray:
    """[grid*grid*3, size*size*3] matrix taking coarse RGB noise straight to an NHWC smooth field.

    One GEMM per chunk is several times faster than separable upsampling
    followed by a transpose into NHWC order.
    """
    upsample = _gaussian_upsampler(grid, size)
    spatial = np.kron(upsample, upsample)  # [size*size, grid*grid]
    return np.kron(spatial.T, np.eye(3, dtype=np.float32)).astype(np.float32)


def smooth_random_fields(rng: np.random.Generator, count: int, size: int, grid: int, scale: float = 1.0) -> np.ndarray:
    """``count`` smooth RGB fields [count, size, size, 3], each with zero mean and standard deviation ``scale``."""
    coarse = rng.standard_normal((count, grid * grid * 3), dtype=np.float32)
    fields = (coarse @ _field_synthesis_matrix(grid, size)).reshape(count, size, size, 3)
    fields -= fields.mean(axis=(1, 2, 3), keepdims=True)
    fields *= scale / (fields.std(axis=(1, 2, 3), keepdims=True) + 1e-6)
    return fields


def _class_prototypes(rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """[num_classes * PROTOTYPES_PER_CLASS, canvas, canvas, 3], prototype p belonging to class p // PROTOTYPES_PER_CLASS.

    Each is a field shared by its class plus its own variation, so a class is
    several related modes rather than one.
    """
    canvas = IMAGE_SIZE + 2 * MAX_SHIFT
    class_fields = smooth_random_fields(rng, num_classes, canvas, CLASS_FIELD_GRID)
    variations = smooth_random_fields(rng, num_classes * PROTOTYPES_PER_CLASS, canvas, VARIATION_GRID, VARIATION_SCALE)
    prototypes = np.repeat(class_fields, PROTOTYPES_PER_CLASS, axis=0) + variations
    return prototypes / prototypes.std(axis=(1, 2, 3), keepdims=True)


def _shifted_crops(prototypes: np.ndarray, prototype_ids: np.ndarray, shift: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """float32 [n, 32, 32, 3] crops of the chosen prototypes at per-sample offsets, some mirrored."""
    # a view of every 32x32 window; indexing it copies whole rows, far faster than a per-pixel gather
    windows = sliding_window_view(prototypes, (IMAGE_SIZE, IMAGE_SIZE), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
    crops = windows[prototype_ids, shift[:, 0], shift[:, 1]]
    crops[flip] = crops[flip, :, ::-1]  # mirrored copies, like real photos
    return crops


def _render_images(rng: np.random.Generator, prototypes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Draw one uint8 image per label, in fixed-size chunks so memory stays bounded.

    Works in place on float32 buffers: generating a 60k-image set is dominated by
    memory traffic, not arithmetic.
    """
    images = np.empty((len(labels), *CIFAR_IMAGE_SHAPE), dtype=np.uint8)
    clutter_matrix = _field_synthesis_matrix(CLUTTER_GRID, IMAGE_SIZE)
    # the synthesis matrix maps unit-variance noise to fields of roughly this standard deviation
    clutter_gain = np.float32(CLUTTER_SCALE * PIXEL_SCALE / np.sqrt((clutter_matrix**2).sum(axis=0).mean()))
    # uniform noise on [0, 255] has standard deviation 255 / sqrt(12)
    noise_gain = np.float32(NOISE_SCALE * PIXEL_SCALE * np.sqrt(12.0) / 255.0)
    for start in range(0, len(labels), _IMAGE_CHUNK):
        chunk_labels = labels[start : start + _IMAGE_CHUNK]
        count = len(chunk_labels)
        prototype_ids = chunk_labels * PROTOTYPES_PER_CLASS + rng.integers(0, PROTOTYPES_PER_CLASS, size=count)
        shift = rng.integers(0, 2 * MAX_SHIFT + 1, size=(count, 2))
        flip = rng.random(count) < 0.5
        gain = rng.uniform(*CONTRAST_RANGE, size=(count, 1, 1, 1)).astype(np.float32) * np.float32(PIXEL_SCALE)
        offset = 128.0 + PIXEL_SCALE * rng.normal(0.0, BRIGHTNESS_STD, size=(count, 1, 1, 1))
        offset = (offset - 127.5 * noise_gain).astype(np.float32)  # centres the uniform noise
        clutter_coarse = rng.standard_normal((count, CLUTTER_GRID * CLUTTER_GRID * 3), dtype=np.float32)
        clutter_coarse *= clutter_gain

        pixels = _shifted_crops(prototypes, prototype_ids, shift, flip)
        pixels *= gain
        pixels += (clutter_coarse @ clutter_matrix).reshape(pixels.shape)
        pixels += offset
        pixels += rng.integers(0, 256, size=pixels.shape, dtype=np.uint8) * noise_gain
        np.clip(pixels, 0, 255, out=pixels)
        images[start : start + count] = pixels
    return images


def synthetic_cifar(num_classes: int, n_train: int, n_test: int, seed: int) -> ImageDataset:
    """A CIFAR-shaped synthetic task: uint8 [N, 32, 32, 3] images, int32 labels, balanced classes.

    Prototypes, train and test sets come from independent streams of ``seed``,
    so the test set does not change with ``n_train``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    proto_seq, train_seq, test_seq = np.random.SeedSequence([seed, 0xC1FA]).spawn(3)
    prototypes = _class_prototypes(np.random.default_rng(proto_seq), num_classes)

    def split(seq: np.random.SeedSequence, count: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seq)
        # balanced: every class appears (count // num_classes) or one more times
        labels = rng.permutation(np.arange(count) % num_classes).astype(np.int32)
        return _render_images(rng, prototypes, labels), labels

    train_images, train_labels = split(train_seq, n_train)
    test_images, test_labels = split(test_seq, n_test)
    name = {10: "cifar10", 100: "cifar100"}.get(num_classes, f"cifar{num_classes}")
    return ImageDataset(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        num_classes=num_classes,
        source=f"synthetic:{name}(seed={seed}, n_train={n_train}, n_test={n_test})",
        synthetic=True,
    )


# --------------------------------------------------------------------------- tokens


class _Order2Source:
    """A sparse order-2 Markov source: next token ~ table[hash(previous two tokens)].

    Each hashed context owns a handful of candidate tokens with Dirichlet
    weights; candidates are drawn Zipf-like from a lexicon, so token frequencies
    look like text. ``eot_id`` ends a story with a fixed per-token probability.
    """

    CANDIDATES = 6

    def __init__(self, rng: np.random.Generator, vocab_size: int, eot_id: int) -> None:
        regular = np.delete(np.arange(vocab_size), eot_id)
        lexicon_size = min(len(regular), 4096)
        self.lexicon = rng.choice(regular, size=lexicon_size, replace=False)
        self.num_contexts = int(min(8192, max(256, 4 * lexicon_size)))
        zipf = 1.0 / np.arange(1, lexicon_size + 1) ** 1.1
        self.candidates = rng.choice(
            lexicon_size, size=(self.num_contexts, self.CANDIDATES), p=zipf / zipf.sum()
        )
        probs = rng.dirichlet(np.full(self.CANDIDATES, 0.4), size=self.num_contexts)
        self.cumulative = np.cumsum(probs, axis=1)
        self.cumulative[:, -1] = 1.0
        self.eot_id = eot_id
        self.vocab_size = vocab_size
        # large odd multipliers: a cheap hash that mixes both previous tokens
        self._mix = np.array([0x9E3779B1, 0x85EBCA77], dtype=np.uint64)

    def context(self, previous: np.ndarray, current: np.ndarray) -> np.ndarray:
        mixed = previous.astype(np.uint64) * self._mix[0] ^ current.astype(np.uint64) * self._mix[1]
        return ((mixed >> np.uint64(13)) % np.uint64(self.num_contexts)).astype(np.int64)

    def sample(self, rng: np.random.Generator, n_tokens: int) -> np.ndarray:
        """``n_tokens`` tokens: parallel streams of whole stories, concatenated."""
        streams = max(1, min(_TOKEN_STREAMS, n_tokens // (4 * MEAN_STORY_TOKENS)))
        steps = -(-n_tokens // streams)
        out = np.empty((streams, steps), dtype=np.uint16)
        previous = np.full(streams, self.eot_id, dtype=np.int64)
        current = np.full(streams, self.eot_id, dtype=np.int64)
        end_story = rng.random((steps, streams)) < 1.0 / MEAN_STORY_TOKENS
        uniforms = rng.random((steps, streams))
        rows = np.arange(streams)
        for step in range(steps):
            ctx = self.context(previous, current)
            choice = (uniforms[step][:, None] > self.cumulative[ctx]).sum(axis=1)
            token = self.lexicon[self.candidates[ctx, choice]]
            # a story needs at least one token before it may end
            token = np.where(end_story[step] & (current != self.eot_id), self.eot_id, token)
            out[rows, step] = token
            previous, current = current, token
        return out.reshape(-1)[:n_tokens]


def synthetic_tinystories(
    n_tokens: int,
    vocab_size: int,
    seed: int,
    *,
    n_val_tokens: int | None = None,
    eot_id: int | None = None,
    tokenizer: str = "synthetic",
) -> TokenDataset:
    """A TinyStories-shaped token task: flat uint16 streams of stories ending in ``eot_id``.

    ``n_tokens`` train tokens and ``n_val_tokens`` (default n_tokens // 10,
    at least 1024) validation tokens from the same source. ``eot_id`` defaults
    to ``vocab_size - 1``, where both real tokenizers put it.
    """
    if not 2 < vocab_size <= np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocab_size must be in (2, 65536], got {vocab_size}")
    eot_id = vocab_size - 1 if eot_id is None else eot_id
    n_val_tokens = max(n_tokens // 10, 1024) if n_val_tokens is None else n_val_tokens
    source_seq, train_seq, val_seq = np.random.SeedSequence([seed, 0x7A1E]).spawn(3)
    source = _Order2Source(np.random.default_rng(source_seq), vocab_size, eot_id)
    return TokenDataset(
        name="tinystories",
        train_tokens=source.sample(np.random.default_rng(train_seq), n_tokens),
        val_tokens=source.sample(np.random.default_rng(val_seq), n_val_tokens),
        vocab_size=vocab_size,
        eot_id=eot_id,
        tokenizer=tokenizer,
        source=f"synthetic:tinystories(seed={seed}, n_tokens={n_tokens}, n_val_tokens={n_val_tokens}, vocab={vocab_size})",
        synthetic=True,
    )
