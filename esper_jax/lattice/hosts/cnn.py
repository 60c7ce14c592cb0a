"""CNN host: blocks of conv → norm → ReLU with widths ``base·2^i``, 2×2 max-pooling after the
first ``pool_blocks`` blocks, global average pooling and a linear classifier.

Injection points: ``r{i}c0`` after block ``i`` and, where the block is pooled, ``r{i}c1`` after
its pool. Convolutions have no bias (the normalization's shift plays that role), which makes
Esper's baseline (base 8, three blocks, 10 classes) exactly 6,418 parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from esper_jax.lattice import ops
from esper_jax.lattice.slots import SlotSpec, Topology, format_slot_id


@dataclasses.dataclass(frozen=True)
class CNNHost:
    num_classes: int = 10
    base_width: int = 8
    num_blocks: int = 3
    kernel_size: int = 3
    pool_blocks: int = 2
    in_channels: int = 3
    image_size: int = 32
    topology: Topology = dataclasses.field(default="cnn", init=False)

    def __post_init__(self):
        if self.num_blocks < 1:
            raise ValueError("a CNN host needs at least one block")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if not 0 <= self.pool_blocks <= self.num_blocks:
            raise ValueError(f"pool_blocks must be in [0, {self.num_blocks}], got {self.pool_blocks}")
        if self.image_size % (2 ** self.pool_blocks):
            raise ValueError(f"image size {self.image_size} cannot be pooled {self.pool_blocks} times (each 2x2 "
                             f"max-pooling halves it: it must be a multiple of {2 ** self.pool_blocks})")

    @classmethod
    def baseline(cls, num_classes: int = 10, **overrides) -> "CNNHost":
        """Esper's deliberately weak CIFAR host: 8→16→32 channels, 3×3 kernels (6.4K parameters)."""
        return cls(num_classes=num_classes, **overrides)

    @classmethod
    def impaired(cls, num_classes: int = 10, **overrides) -> "CNNHost":
        """Esper's impaired host: base width 1 and 1×1 kernels, so growth has a lot to add."""
        return cls(**{"num_classes": num_classes, "base_width": 1, "kernel_size": 1, **overrides})

    @classmethod
    def pointwise(cls, num_classes: int = 10, **overrides) -> "CNNHost":
        """The baseline's widths with 1×1 kernels: the host sees no spatial pattern of its own, so
        a seed that brings a spatial kernel has something real to add, and where it is grown
        (which resolution, how many channels) changes how much. Impaired in kind rather than in
        width, unlike :meth:`impaired`, whose single channel leaves a seed nothing to work with."""
        return cls(**{"num_classes": num_classes, "kernel_size": 1, **overrides})

    def width(self, block: int) -> int:
        return self.base_width * 2 ** block

    @property
    def _layout(self) -> tuple[tuple[str, int, int], ...]:
        """(kind, block, dim) per segment: a conv block or the pool after it."""
        layout = []
        for block in range(self.num_blocks):
            layout.append(("block", block, self.width(block)))
            if block < self.pool_blocks:
                layout.append(("pool", block, self.width(block)))
        return tuple(layout)

    @property
    def injection_points(self) -> tuple[SlotSpec, ...]:
        return tuple(
            SlotSpec(format_slot_id(block, 0 if kind == "block" else 1), dim, "cnn")
            for kind, block, dim in self._layout
        )

    @property
    def default_slots(self) -> tuple[str, ...]:
        """One slot after each block (Esper's early/mid/late for three blocks)."""
        return tuple(format_slot_id(block, 0) for block in range(self.num_blocks))

    def init(self, key: jax.Array) -> dict:
        keys = jax.random.split(key, self.num_blocks + 1)
        params = {}
        cin, k = self.in_channels, self.kernel_size
        for block in range(self.num_blocks):
            cout = self.width(block)
            params[f"block{block}"] = {
                "conv": ops.he_normal(keys[block], (k, k, cin, cout), k * k * cin),
                "scale": jnp.ones((cout,)),
                "bias": jnp.zeros((cout,)),
            }
            cin = cout
        params["classifier"] = {
            "w": ops.lecun_normal(keys[-1], (cin, self.num_classes), cin),
            "b": jnp.zeros((self.num_classes,)),
        }
        return params

    def stem(self, params: dict, x: jax.Array) -> jax.Array:
        return x  # the first block convolves the image itself

    def segment(self, params: dict, index: int, h: jax.Array) -> jax.Array:
        kind, block, _ = self._layout[index]
        if kind == "pool":
            return ops.max_pool_2x2(h)
        p = params[f"block{block}"]
        return jax.nn.relu(ops.group_norm(ops.conv2d(h, p["conv"]), p["scale"], p["bias"]))

    def head(self, params: dict, h: jax.Array) -> jax.Array:
        return h.mean(axis=(1, 2)) @ params["classifier"]["w"] + params["classifier"]["b"]

    def loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def input_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.image_size, self.image_size, self.in_channels)
