"""The task registry: which host a task trains, on what data, and the loss scales rewards need
(the loss-primary design's TaskConfig: baseline loss, achievable target loss, typical loss-delta scale).

The registry is closed: CIFAR-10/100 and TinyStories, plus a user's own image classification
dataset, ``images`` (an ``.npz`` file) or ``tfds:NAME`` (a prepared tensorflow-datasets dataset),
whose image size, channels and classes come from the data (:class:`~esper_jax.data.ImageShape`)
and whose normalization statistics are its own training images'."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from esper_jax.data import IMAGES, TFDS_PREFIX, ImageShape, is_user_image_dataset
from esper_jax.data.augment import cifar_channel_stats
from esper_jax.lattice.hosts import CNNHost, TransformerHost
from esper_jax.lattice.slots import Topology

TaskKind = Literal["classification", "language_model"]
ChannelStats = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel, on the [0, 1] scale

CNN_VARIANTS = ("baseline", "impaired", "pointwise")
HOST_VARIANTS = {"cifar10": CNN_VARIANTS, "cifar100": CNN_VARIANTS, "tinystories": ("base", "tiny", "pointwise"),
                 IMAGES: CNN_VARIANTS}
TFDS_TASK = f"{TFDS_PREFIX}NAME"
# An achievable loss of a user's task, as a fraction of a uniform guess's ln(classes): CIFAR-10's
# 0.3 of ln(10).
USER_TARGET_FRACTION = 0.3 / math.log(10)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    name: str
    topology: Topology
    kind: TaskKind
    num_classes: int            # classes, or vocabulary size for a language model
    baseline_loss: float        # loss of a uniform guess: ln(num_classes)
    target_loss: float          # an achievable loss for this host family
    typical_loss_delta_std: float
    host_variant: str = "baseline"
    block_size: int = 256       # language models: tokens per training window
    image_size: int = 32        # image tasks: the data's own resolution and channels
    in_channels: int = 3
    # image tasks: the normalization's per-channel statistics (None: not known until the data is)
    channel_stats: ChannelStats | None = None

    @property
    def has_accuracy(self) -> bool:
        return self.kind == "classification"

    def make_host(self, **overrides):
        """The task's host; ``overrides`` replace its fields (e.g. a smaller ``image_size``), applied
        when it is made, so that they are checked together."""
        if self.topology == "cnn":
            factory = {"impaired": CNNHost.impaired, "pointwise": CNNHost.pointwise}.get(self.host_variant,
                                                                                         CNNHost.baseline)
            return factory(**{"num_classes": self.num_classes, "in_channels": self.in_channels,
                              "image_size": self.image_size, **overrides})
        if self.host_variant in ("tiny", "pointwise"):
            # pointwise: the tiny host's widths without attention (a bigram model; see TransformerHost)
            host = TransformerHost(vocab_size=self.num_classes, d_model=64, num_heads=2, num_layers=2,
                                   block_size=self.block_size, attention=self.host_variant == "tiny")
        else:
            host = TransformerHost.tinystories(vocab_size=self.num_classes, block_size=self.block_size)
        return dataclasses.replace(host, **overrides) if overrides else host


TASK_NAMES = (*HOST_VARIANTS, TFDS_TASK)


LANGUAGE_MODEL_TASKS = ("tinystories",)


def host_variants(name: str) -> tuple[str, ...]:
    """The host variants of a task (``tfds:NAME`` has the CNN's), or ValueError listing the tasks."""
    if name.startswith(TFDS_PREFIX):
        return CNN_VARIANTS
    if name not in HOST_VARIANTS:
        raise ValueError(f"unknown task {name!r}; valid tasks are: {', '.join(TASK_NAMES)}")
    return HOST_VARIANTS[name]


def get_task(name: str, host_variant: str | None = None, vocab_size: int = 50257, block_size: int = 256,
             image: ImageShape | None = None, channel_stats: ChannelStats | None = None) -> TaskConfig:
    """Look up a task; unknown names and variants get a message listing the valid ones. A user's
    image task needs its data's ``image`` shape; its ``channel_stats`` are the training images'
    (they may be left out until the data is loaded; an environment needs them)."""
    variants = host_variants(name)
    variant = host_variant or variants[0]
    if variant not in variants:
        raise ValueError(f"unknown host variant {variant!r} for {name}; choose one of {', '.join(variants)}")
    if is_user_image_dataset(name):
        if image is None:
            raise ValueError(f"task {name}: its image shape comes from its data, and none was given")
        return TaskConfig(name, "cnn", "classification", image.num_classes, math.log(image.num_classes),
                          USER_TARGET_FRACTION * math.log(image.num_classes), 0.1, variant,
                          image_size=image.size, in_channels=image.channels, channel_stats=channel_stats)
    if name == "cifar10":
        return TaskConfig("cifar10", "cnn", "classification", 10, math.log(10), 0.3, 0.1, variant,
                          channel_stats=cifar_channel_stats(name))
    if name == "cifar100":
        return TaskConfig("cifar100", "cnn", "classification", 100, math.log(100), 1.5, 0.1, variant,
                          channel_stats=cifar_channel_stats(name))
    # The loss-primary design: ~33 perplexity is achievable with GPT-2's vocabulary; bytes are far easier to predict.
    target = 3.5 if vocab_size > 1000 else 1.2
    return TaskConfig("tinystories", "transformer", "language_model", vocab_size, math.log(vocab_size), target, 0.15,
                      variant, block_size)
