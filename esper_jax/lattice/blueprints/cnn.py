"""CNN blueprints. Activations are NHWC with ``C = dim``; each returns a residual that is
zero at germination (its last layer or scale starts at zero)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esper_jax.lattice import ops
from esper_jax.lattice.blueprints.registry import register_blueprint


@register_blueprint("noop", "cnn", "Placeholder seed with no parameters: a control that never changes the host.")
class Noop:
    @staticmethod
    def init(key, dim):
        return {}

    @staticmethod
    def apply(params, h):
        return jnp.zeros_like(h)


@register_blueprint("norm", "cnn", "Per-sample normalization branch with a learned, zero-initialized affine.",
                    role="normalization")
class Norm:
    @staticmethod
    def init(key, dim):
        return {"scale": jnp.zeros((dim,)), "bias": jnp.zeros((dim,))}

    @staticmethod
    def apply(params, h):
        return ops.group_norm(h, params["scale"], params["bias"])


@register_blueprint("attention", "cnn", "Squeeze-and-excitation channel attention (reduction 4).", role="context")
class SqueezeExcitation:
    @staticmethod
    def init(key, dim):
        hidden = max(dim // 4, 4)
        return {
            "w1": ops.he_normal(key, (dim, hidden), dim), "b1": jnp.zeros((hidden,)),
            "w2": jnp.zeros((hidden, dim)), "b2": jnp.zeros((dim,)),
        }

    @staticmethod
    def apply(params, h):
        squeezed = h.mean(axis=(1, 2))
        excitation = jax.nn.relu(squeezed @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
        return h * excitation[:, None, None, :]


@register_blueprint("depthwise", "cnn", "Depthwise 3×3 then pointwise 1×1 (depthwise-separable).", role="context")
class DepthwiseSeparable:
    @staticmethod
    def init(key, dim):
        return {"dw": ops.he_normal(key, (3, 3, dim), 9), "pw": jnp.zeros((1, 1, dim, dim))}

    @staticmethod
    def apply(params, h):
        return ops.conv2d(jax.nn.relu(ops.depthwise_conv2d(h, params["dw"])), params["pw"])


@register_blueprint("bottleneck", "cnn", "1×1 down to C/4, 3×3, 1×1 back up.", role="depth")
class Bottleneck:
    @staticmethod
    def init(key, dim):
        mid = max(dim // 4, 4)
        k1, k2 = ops.split_key(key, 2)
        return {
            "down": ops.he_normal(k1, (1, 1, dim, mid), dim),
            "conv": ops.he_normal(k2, (3, 3, mid, mid), 9 * mid),
            "up": jnp.zeros((1, 1, mid, dim)),
        }

    @staticmethod
    def apply(params, h):
        x = jax.nn.relu(ops.conv2d(h, params["down"]))
        x = jax.nn.relu(ops.conv2d(x, params["conv"]))
        return ops.conv2d(x, params["up"])


@register_blueprint("conv_small", "cnn", "One 1×1 convolution (channel mixing only).", role="width")
class ConvSmall:
    @staticmethod
    def init(key, dim):
        return {"w": jnp.zeros((1, 1, dim, dim))}

    @staticmethod
    def apply(params, h):
        return ops.conv2d(h, params["w"])


@register_blueprint("conv_light", "cnn", "One 3×3 convolution, ReLU, per-channel scale starting at zero.",
                    role="depth")
class ConvLight:
    @staticmethod
    def init(key, dim):
        return {"w": ops.he_normal(key, (3, 3, dim, dim), 9 * dim), "scale": jnp.zeros((dim,))}

    @staticmethod
    def apply(params, h):
        return jax.nn.relu(ops.conv2d(h, params["w"])) * params["scale"]


@register_blueprint("conv_heavy", "cnn", "Two 3×3 convolutions with a normalization between them.", role="depth")
class ConvHeavy:
    @staticmethod
    def init(key, dim):
        return {
            "w1": ops.he_normal(key, (3, 3, dim, dim), 9 * dim),
            "scale": jnp.ones((dim,)), "bias": jnp.zeros((dim,)),
            "w2": jnp.zeros((3, 3, dim, dim)),
        }

    @staticmethod
    def apply(params, h):
        x = ops.group_norm(ops.conv2d(h, params["w1"]), params["scale"], params["bias"])
        return ops.conv2d(jax.nn.relu(x), params["w2"])
