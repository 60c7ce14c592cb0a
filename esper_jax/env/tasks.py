"""The task registry: which host a task trains, on what data, and the loss scales rewards need
(the loss-primary design's TaskConfig: baseline loss, achievable target loss, typical loss-delta scale)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from esper_jax.lattice.hosts import CNNHost, TransformerHost
from esper_jax.lattice.slots import Topology

TaskKind = Literal["classification", "language_model"]

HOST_VARIANTS = {"cifar10": ("baseline", "impaired", "pointwise"), "cifar100": ("baseline", "impaired", "pointwise"),
                 "tinystories": ("base", "tiny")}


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

    @property
    def has_accuracy(self) -> bool:
        return self.kind == "classification"

    def make_host(self):
        if self.topology == "cnn":
            factory = {"impaired": CNNHost.impaired, "pointwise": CNNHost.pointwise}.get(self.host_variant,
                                                                                         CNNHost.baseline)
            return factory(num_classes=self.num_classes)
        if self.host_variant == "tiny":
            return TransformerHost(vocab_size=self.num_classes, d_model=64, num_heads=2, num_layers=2, block_size=self.block_size)
        return TransformerHost.tinystories(vocab_size=self.num_classes, block_size=self.block_size)


TASK_NAMES = tuple(HOST_VARIANTS)


def get_task(name: str, host_variant: str | None = None, vocab_size: int = 50257, block_size: int = 256) -> TaskConfig:
    """Look up a task; unknown names and variants get a message listing the valid ones."""
    if name not in HOST_VARIANTS:
        raise ValueError(f"unknown task {name!r}; valid tasks are: {', '.join(TASK_NAMES)}")
    variant = host_variant or HOST_VARIANTS[name][0]
    if variant not in HOST_VARIANTS[name]:
        raise ValueError(f"unknown host variant {variant!r} for {name}; choose one of {', '.join(HOST_VARIANTS[name])}")
    if name == "cifar10":
        return TaskConfig("cifar10", "cnn", "classification", 10, math.log(10), 0.3, 0.1, variant)
    if name == "cifar100":
        return TaskConfig("cifar100", "cnn", "classification", 100, math.log(100), 1.5, 0.1, variant)
    # The loss-primary design: ~33 perplexity is achievable with GPT-2's vocabulary; bytes are far easier to predict.
    target = 3.5 if vocab_size > 1000 else 1.2
    return TaskConfig("tinystories", "transformer", "language_model", vocab_size, math.log(vocab_size), target, 0.15,
                      variant, block_size)
