"""Synthetic stand-ins for CIFAR and TinyStories, for runs where the real data is absent.

They are selected only explicitly (``--data=synthetic``), are deterministic
from a seed, and have exactly the shapes and dtypes of the real tasks, so every
code path runs unchanged; their datasets carry ``synthetic=True`` and a
``source`` string that says how they were made.

They are built to be learnable but not trivial, so that model capacity shows:

* Images: two cues per class. A global one: a few smooth random prototypes
  per class, seen at a random shift and sometimes mirrored. A local one: small
  sharp motifs of the class stamped at random places, among motifs of random
  classes. Random contrast, brightness, smooth clutter and pixel noise on top;
  labels are never noisy. Pixel-space linear models only get the blurred
  global cue (about 37% on CIFAR-10-sized sets, chance 10%); convolutions find
  the motifs, and how well depends on their capacity.
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
# global layout cue: a few smooth prototypes per class, seen at a random shift
MAX_SHIFT = 4
PROTOTYPES_PER_CLASS = 3
PROTOTYPE_GRID = 6  # coarse grid of the prototype fields: larger = finer detail
PROTOTYPE_SCALE = 0.4
# local cue: small sharp class motifs stamped at random places (position-free, so linear models miss it)
MOTIFS_PER_CLASS = 4
MOTIF_SIZE = 5
MOTIF_PLACEMENTS = 4
DISTRACTOR_PLACEMENTS = 2  # motifs of random classes on top: a model has to weigh evidence, not spot one motif
MOTIF_SCALE = 1.3
# nuisances
CLUTTER_GRID = 6
CLUTTER_SCALE = 0.7  # smooth class-independent background
NOISE_SCALE = 0.6  # per-pixel uniform noise with this standard deviation
CONTRAST_RANGE = (0.6, 1.4)
BRIGHTNESS_STD = 0.3
PIXEL_SCALE = 40.0  # one unit of signal = this many grey levels around 128
_IMAGE_CHUNK = 1024

MEAN_STORY_TOKENS = 200
_TOKEN_STREAMS = 4096  # parallel stories: the sampler's Python loop runs n_tokens / streams steps


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


class _ImageSource:
    """The class-conditional image distribution; prototypes and motifs fixed by one seed."""

    def __init__(self, rng: np.random.Generator, num_classes: int) -> None:
        canvas = IMAGE_SIZE + 2 * MAX_SHIFT
        self.num_classes = num_classes
        # prototype p belongs to class p // PROTOTYPES_PER_CLASS
        prototypes = smooth_random_fields(rng, num_classes * PROTOTYPES_PER_CLASS, canvas, PROTOTYPE_GRID)
        # every column offset stored contiguously, [prototype, column offset, row, 32 * 3]: a crop is then
        # 32 contiguous rows, which numpy copies far faster than a per-pixel gather
        self.column_shifted = np.stack(
            [prototypes[:, :, offset : offset + IMAGE_SIZE] for offset in range(2 * MAX_SHIFT + 1)], axis=1
        ).reshape(len(prototypes), 2 * MAX_SHIFT + 1, canvas, IMAGE_SIZE * 3) * np.float32(PROTOTYPE_SCALE)
        motifs = rng.standard_normal((num_classes * MOTIFS_PER_CLASS, MOTIF_SIZE, MOTIF_SIZE, 3)).astype(np.float32)
        # zero mean per channel: a motif changes no image-wide colour average a linear model could read
        motifs -= motifs.mean(axis=(1, 2), keepdims=True)
        self.motifs = motifs / motifs.std(axis=(1, 2, 3), keepdims=True) * np.float32(MOTIF_SCALE)
        self.clutter_matrix = _field_synthesis_matrix(CLUTTER_GRID, IMAGE_SIZE)
        # the synthesis matrix maps unit-variance noise to fields of roughly this standard deviation
        self.clutter_gain = np.float32(CLUTTER_SCALE / np.sqrt((self.clutter_matrix**2).sum(axis=0).mean()))

    def _layout(self, rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
        """float32 [n, 32, 32, 3]: a prototype of each label at a random shift."""
        count = len(labels)
        prototype_ids = labels * PROTOTYPES_PER_CLASS + rng.integers(0, PROTOTYPES_PER_CLASS, size=count)
        row_offset, column_offset = rng.integers(0, 2 * MAX_SHIFT + 1, size=(2, count))
        windows = sliding_window_view(self.column_shifted, IMAGE_SIZE, axis=2).swapaxes(-1, -2)
        crops = windows[prototype_ids, column_offset, row_offset]  # [n, 32, 32 * 3]
        return crops.reshape(count, *CIFAR_IMAGE_SHAPE)

    def _stamp_motifs(self, rng: np.random.Generator, labels: np.ndarray, pixels: np.ndarray) -> None:
        """Add motifs at random positions, in place: MOTIF_PLACEMENTS of the image's class, then distractors."""
        count = len(labels)
        # writable view of every MOTIF_SIZE window of each image; one sample per row, so no index repeats
        stride_n, stride_y, stride_x, stride_c = pixels.strides
        span = IMAGE_SIZE - MOTIF_SIZE + 1
        windows = np.lib.stride_tricks.as_strided(
            pixels,
            shape=(count, span, span, MOTIF_SIZE, MOTIF_SIZE, 3),
            strides=(stride_n, stride_y, stride_x, stride_y, stride_x, stride_c),
        )
        rows = np.arange(count)
        for placement in range(MOTIF_PLACEMENTS + DISTRACTOR_PLACEMENTS):
            classes = labels if placement < MOTIF_PLACEMENTS else rng.integers(0, self.num_classes, size=count)
            motif_ids = classes * MOTIFS_PER_CLASS + rng.integers(0, MOTIFS_PER_CLASS, size=count)
            y, x = rng.integers(0, span, size=(2, count))
            windows[rows, y, x] += self.motifs[motif_ids]

    def _add_clutter(self, rng: np.random.Generator, pixels: np.ndarray) -> None:
        """Add a smooth class-independent RGB field to every image, in place."""
        coarse = rng.standard_normal((len(pixels), CLUTTER_GRID * CLUTTER_GRID * 3), dtype=np.float32)
        coarse *= self.clutter_gain
        pixels += (coarse @ self.clutter_matrix).reshape(pixels.shape)

    def render(self, rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
        """One uint8 [32, 32, 3] image per label, drawn in chunks so memory stays bounded."""
        images = np.empty((len(labels), *CIFAR_IMAGE_SHAPE), dtype=np.uint8)
        # uniform noise on [0, 255] has standard deviation 255 / sqrt(12)
        noise_gain = np.float32(NOISE_SCALE * PIXEL_SCALE * np.sqrt(12.0) / 255.0)
        for start in range(0, len(labels), _IMAGE_CHUNK):
            chunk_labels = labels[start : start + _IMAGE_CHUNK]
            count = len(chunk_labels)
            pixels = self._layout(rng, chunk_labels)
            self._stamp_motifs(rng, chunk_labels, pixels)
            self._add_clutter(rng, pixels)
            gain = rng.uniform(*CONTRAST_RANGE, size=(count, 1, 1, 1)).astype(np.float32) * np.float32(PIXEL_SCALE)
            offset = 128.0 + PIXEL_SCALE * rng.normal(0.0, BRIGHTNESS_STD, size=(count, 1, 1, 1))
            pixels *= gain
            pixels += (offset - 127.5 * noise_gain).astype(np.float32)  # also centres the uniform noise
            pixels += rng.integers(0, 256, size=pixels.shape, dtype=np.uint8) * noise_gain
            np.clip(pixels, 0, 255, out=pixels)
            images[start : start + count] = pixels
        # mirror half of the images, motifs included: the distribution is flip-invariant like photos,
        # so random-flip augmentation stays label-preserving
        flip = rng.random(len(images)) < 0.5
        images[flip] = images[flip, :, ::-1]
        return images


def synthetic_cifar(num_classes: int, n_train: int, n_test: int, seed: int) -> ImageDataset:
    """A CIFAR-shaped synthetic task: uint8 [N, 32, 32, 3] images, int32 labels, balanced classes.

    Prototypes, train and test sets come from independent streams of ``seed``,
    so the test set does not change with ``n_train``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    proto_seq, train_seq, test_seq = np.random.SeedSequence([seed, 0xC1FA]).spawn(3)
    image_source = _ImageSource(np.random.default_rng(proto_seq), num_classes)

    def split(seq: np.random.SeedSequence, count: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seq)
        # balanced: every class appears (count // num_classes) or one more times
        labels = rng.permutation(np.arange(count) % num_classes).astype(np.int32)
        return image_source.render(rng, labels), labels

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
        if n_tokens <= 0:
            return np.zeros(0, dtype=np.uint16)
        streams = max(1, min(_TOKEN_STREAMS, n_tokens // (4 * MEAN_STORY_TOKENS)))
        steps = -(-n_tokens // streams)
        out = np.empty((streams, steps), dtype=np.uint16)
        previous = np.full(streams, self.eot_id, dtype=np.int64)
        current = np.full(streams, self.eot_id, dtype=np.int64)
        end_story = rng.random((steps, streams)) < 1.0 / MEAN_STORY_TOKENS
        uniforms = rng.random((steps, streams))
        for step in range(steps):
            ctx = self.context(previous, current)
            choice = (uniforms[step][:, None] > self.cumulative[ctx]).sum(axis=1)
            token = self.lexicon[self.candidates[ctx, choice]]
            # a story needs at least one token before it may end
            token = np.where(end_story[step] & (current != self.eot_id), self.eot_id, token)
            out[:, step] = token
            previous, current = current, token
        # each stream ends its last story, so concatenated streams stay a sequence of whole stories
        out[:, -1] = self.eot_id
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
