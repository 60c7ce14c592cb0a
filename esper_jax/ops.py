"""Numeric building blocks shared by hosts and blueprints, and the one place the
convolution formulation is chosen.

Why a choice at all: ``vmap`` over parameter sets turns ``lax.conv`` into a grouped
convolution, which XLA:CPU runs about 3× slower per member than a loop (DESIGN.md §2).
An im2col convolution (shifted slices concatenated on channels, then one matmul) batches
into a plain batched matmul instead. ``python -m experiments.bench --only conv`` measures both;
:data:`DEFAULT_CONV_IMPL` holds the winner and ``ESPER_CONV_IMPL`` overrides it. On CPU the
members of a population now run unbatched (``model.default_member_execution``), and im2col
still wins there: one baseline-CNN env's training step with a live conv_light seed, batch 64,
took 22.7 ms with im2col and 144 ms with ``lax.conv`` (``--only reference``, 2-core CPU).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

CONV_IMPLS = ("im2col", "lax")
# Chosen by python -m experiments.bench (conv and reference sections); numbers in benchmarks/results/.
DEFAULT_CONV_IMPL = "im2col"


def conv_impl() -> str:
    impl = os.environ.get("ESPER_CONV_IMPL", DEFAULT_CONV_IMPL)
    if impl not in CONV_IMPLS:
        raise ValueError(f"ESPER_CONV_IMPL={impl!r} is not one of {CONV_IMPLS}")
    return impl


def _conv_im2col(x: jax.Array, w: jax.Array) -> jax.Array:
    kh, kw, cin, cout = w.shape
    if kh == 1 and kw == 1:
        return x @ w.reshape(cin, cout)
    ph, pw = kh // 2, kw // 2
    padded = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    height, width = x.shape[1], x.shape[2]
    patches = jnp.concatenate(
        [padded[:, i:i + height, j:j + width, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    return patches @ w.reshape(kh * kw * cin, cout)


def _conv_lax(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv2d(x: jax.Array, w: jax.Array, impl: str | None = None) -> jax.Array:
    """Stride-1 'same' convolution, NHWC input, HWIO kernel (odd kernel sizes)."""
    impl = impl or conv_impl()
    return _conv_im2col(x, w) if impl == "im2col" else _conv_lax(x, w)


def depthwise_conv2d(x: jax.Array, w: jax.Array) -> jax.Array:
    """Depthwise 'same' convolution; ``w`` has shape ``[kh, kw, C]``.

    Written as a sum of shifted, scaled copies: elementwise work only, so it vectorizes
    under ``vmap`` without grouped convolutions.
    """
    kh, kw, _ = w.shape
    ph, pw = kh // 2, kw // 2
    padded = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    height, width = x.shape[1], x.shape[2]
    out = jnp.zeros_like(x)
    for i in range(kh):
        for j in range(kw):
            out = out + padded[:, i:i + height, j:j + width, :] * w[i, j]
    return out


def max_pool_2x2(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Per-sample normalization over all non-batch axes (one group), per-channel affine.

    Needs no batch statistics, so the forward is the same in training and evaluation and
    members of a population never share statistics.
    """
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def layer_norm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None, eps: float = 1e-5) -> jax.Array:
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


class NormalSource:
    """Standard-normal draws handed out in slices, usable wherever an initializer takes a key.

    Why: every ``jax.random.normal`` call compiles its own threefry kernel (about 0.2 s each on
    XLA:CPU), and a lattice runs dozens of initializers on every germination and reset: 27 draws
    compiled in 5.9 s, one draw of their total size in 0.2 s. So the lattice draws one vector per
    slot and the initializers below slice it. The offset is trace-time bookkeeping (a Python
    int), not runtime state; consumption follows call order, so every draw gets fresh values.
    """

    def __init__(self, values: jax.Array):
        self.values = values
        self.offset = 0

    def take(self, shape: tuple[int, ...]) -> jax.Array:
        size = math.prod(shape)
        if self.offset + size > self.values.shape[-1]:
            raise ValueError(f"NormalSource exhausted: {size} values asked, {self.values.shape[-1] - self.offset} left")
        out = self.values[..., self.offset:self.offset + size].reshape(self.values.shape[:-1] + tuple(shape))
        self.offset += size
        return out


def split_key(key, num: int):
    """``jax.random.split`` for keys; a :class:`NormalSource` is shared (it never repeats a slice)."""
    if isinstance(key, NormalSource):
        return [key] * num
    return jax.random.split(key, num)


def standard_normal(key, shape: tuple[int, ...]) -> jax.Array:
    if isinstance(key, NormalSource):
        return key.take(shape)
    return jax.random.normal(key, shape, jnp.float32)


def he_normal(key, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    return standard_normal(key, shape) * jnp.sqrt(2.0 / max(fan_in, 1))


def lecun_normal(key, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    return standard_normal(key, shape) * jnp.sqrt(1.0 / max(fan_in, 1))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Multi-head causal attention; q, k, v are ``[B, T, H, Dh]``."""
    t = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
