"""Grow your own network: a small CNN written with flax.linen, grown by esper-jax.

    python -m experiments.ppo --task=images --data=PATH.npz --host examples.my_host:make_host --preset=smoke

(run from the repository root, so that ``examples`` imports). ``make_host`` takes no arguments and
returns the network as a stem (``None``: the images themselves), segments and a head. The host
takes its input size from the data, and has an injection point after each segment, ``r0c0`` and
``r1c0``, where the controller may plant seeds (CNN blueprints, as the activations are images).
To fix the input size, return ``FlaxHost(stem, segments, head, example_shape=(H, W, C))`` instead
(:class:`esper_jax.lattice.hosts.FlaxHost`). Set ``NUM_CLASSES`` to your data's number of classes.
"""

import flax.linen as nn

NUM_CLASSES = 10


class Block(nn.Module):  # conv -> norm -> ReLU, then 2x2 max-pooling if asked
    width: int
    pool: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(num_groups=1)(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
        return nn.max_pool(x, (2, 2), (2, 2)) if self.pool else x


class Classifier(nn.Module):  # global average pooling, then a linear layer
    classes: int

    @nn.compact
    def __call__(self, h):
        return nn.Dense(self.classes)(h.mean(axis=(1, 2)))


def make_host():
    return None, (Block(8, pool=True), Block(16)), Classifier(NUM_CLASSES)
