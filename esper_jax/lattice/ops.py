"""Numeric building blocks shared by hosts and blueprints, and the one place the
convolution formulation is chosen.

Three formulations of a stride-1 'same' convolution, measured by
``python -m experiments.bench --only conv`` (numbers in ``benchmarks/results/``):

* ``lax``: ``lax.conv`` with autodiff's gradients. XLA:CPU rewrites the kernel-gradient
  convolution into its fast layout only in the entry computation; inside a ``lax.cond`` branch
  (the lattice's dispatch, the dormant-lattice skip) it runs as a naive loop, 6-40x slower.
  Under ``vmap`` over kernels it becomes grouped convolutions, about 3x slower per member
  than a loop on XLA:CPU (measured: a 3-block CNN, population of 4, 683-700 ms per member against
  226-278 ms for one).
* ``im2col``: shifted slices concatenated on channels, then one matmul; batches under ``vmap``
  into a plain batched matmul.
* ``lax_vjp``: ``lax.conv`` forward with a hand-written VJP whose two gradient convolutions
  are already in XLA:CPU's fast layout, so they are fast wherever they sit; under ``vmap``
  (``jax.custom_batching.custom_vmap``) the forward and both gradients run as im2col instead.

:func:`default_conv_impl`: ``lax_vjp`` on CPU, where population members run unbatched
(``PopulationStrategy.for_backend``): one baseline-CNN env's training step with a live
conv_light seed, batch 64, 8 members mapped: 17.0 ms per member vs 23.3 ms with im2col and
139 ms with ``lax``. Elsewhere im2col, as measured before lax_vjp existed (no accelerator has
been measured since). ``ESPER_CONV_IMPL`` overrides the choice (read at trace time).

Tried and not kept (one-off comparisons on a 2-core x86-64 CPU, batch 64, each variant timed in
one process interleaved with the others and with PyTorch; the variants are not in the suite): the
image layer's forward (3 -> 8 channels at 32x32) as a direct sum of shifted channels ran 5x
faster than ``lax.conv`` alone (0.49 vs 2.5 ms) but made the host's training step 2.2x slower
(31 vs 14 ms): XLA fused the elementwise sum into each consumer (the normalization's statistics,
the pooling) and recomputed it there. Hand-written VJPs for normalization + ReLU and for the
2x2 pooling left the step within noise; so did XLA:CPU's XNNPACK fusion flags (dot, eltwise,
reduce; graph fusion) in processes of their own, alternated over three rounds, and its oneDNN
fusions failed to compile this program.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp

CONV_IMPLS = ("im2col", "lax", "lax_vjp")


def default_conv_impl() -> str:
    """The measured choice (module docstring): unbatched members on CPU, vmapped elsewhere."""
    return "lax_vjp" if jax.default_backend() == "cpu" else "im2col"


def conv_impl() -> str:
    impl = os.environ.get("ESPER_CONV_IMPL") or default_conv_impl()
    if impl not in CONV_IMPLS:
        raise ValueError(f"ESPER_CONV_IMPL={impl!r} is not one of {CONV_IMPLS}")
    return impl


def _conv_im2col(x: jax.Array, w: jax.Array) -> jax.Array:
    kh, kw, cin, cout = w.shape
    ph, pw = kh // 2, kw // 2
    padded = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    height, width = x.shape[1], x.shape[2]
    patches = jnp.concatenate(
        [padded[:, i:i + height, j:j + width, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    return patches @ w.reshape(kh * kw * cin, cout)


def _conv_lax(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _batched_as_im2col(im2col_form):
    """Decorator: the function as written, except under ``vmap``, where every argument is
    batched and ``im2col_form`` runs instead. Why: vmapped over kernels, each lax convolution
    would become a grouped convolution, about 3x slower per member on XLA:CPU than im2col's
    batched matmuls (``python -m experiments.bench --only population``)."""
    def decorate(lax_form):
        function = jax.custom_batching.custom_vmap(lax_form)

        @function.def_vmap
        def rule(axis_size, in_batched, *args):
            args = [a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, batched in zip(args, in_batched)]
            return jax.vmap(im2col_form)(*args), True

        return function
    return decorate


@_batched_as_im2col(_conv_im2col)
def _forward_lax(x, w):
    return _conv_lax(x, w)


@_batched_as_im2col(lambda x, w, g: jax.vjp(lambda x: _conv_im2col(x, w), x)[1](g)[0])
def _input_gradient_lax(x, w, g):
    return _conv_lax(g, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))


@_batched_as_im2col(lambda x, w, g: jax.vjp(lambda w: _conv_im2col(x, w), w)[1](g)[0])
def _kernel_gradient_lax(x, w, g):
    # dw[i, j, c, o] = sum_{b,h,v} x_pad[b, h+i, v+j, c] g[b, h, v, o]: a convolution whose batch
    # is the input channels, whose features are the images and whose window is the whole map.
    kh, kw = w.shape[0], w.shape[1]
    dw = jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return dw.transpose(1, 2, 0, 3)


@jax.custom_vjp
def _conv_lax_vjp(x: jax.Array, w: jax.Array) -> jax.Array:
    return _forward_lax(x, w)


def _conv_lax_vjp_forward(x, w):
    return _forward_lax(x, w), (x, w)


def _conv_lax_vjp_backward(residuals, g):
    # Both gradients as convolutions already in the NHWC/HWIO form XLA:CPU runs fast. Autodiff's
    # kernel gradient (dimension labels f01b_i01o->01bf) is rewritten into that form only in the
    # entry computation: inside a lax.cond branch it falls to a naive loop, 6-40x slower.
    x, w = residuals
    return _input_gradient_lax(x, w, g), _kernel_gradient_lax(x, w, g)


_conv_lax_vjp.defvjp(_conv_lax_vjp_forward, _conv_lax_vjp_backward)

_CONVS = {"im2col": _conv_im2col, "lax": _conv_lax, "lax_vjp": _conv_lax_vjp}


def conv2d(x: jax.Array, w: jax.Array, impl: str | None = None) -> jax.Array:
    """Stride-1 'same' convolution, NHWC input, HWIO kernel (odd kernel sizes)."""
    kh, kw, cin, cout = w.shape
    if kh == 1 and kw == 1:  # a matmul in every formulation
        return x @ w.reshape(cin, cout)
    return _CONVS[impl or conv_impl()](x, w)


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
    """Multi-head causal attention; q, k, v are ``[B, T, H, Dh]`` (the layout of
    ``jax.nn.dot_product_attention``, which picks the backend's implementation)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def causal_self_attention(x: jax.Array, qkv: jax.Array, num_heads: int, qkv_bias: jax.Array | None = None) -> jax.Array:
    """Causal self-attention of ``x`` (``[B, T, D]``) through one fused query/key/value
    projection ``qkv`` (``[D, 3W]``) split into ``num_heads`` heads: ``[B, T, W]``, before any
    output projection."""
    b, t, _ = x.shape
    projected = x @ qkv
    if qkv_bias is not None:
        projected = projected + qkv_bias
    q, k, v = jnp.split(projected, 3, axis=-1)
    width = q.shape[-1]
    heads = lambda y: y.reshape(b, t, num_heads, width // num_heads)
    return causal_attention(heads(q), heads(k), heads(v)).reshape(b, t, width)


# A pre-norm transformer layer is ``h + A(h)`` then ``h + M(h)``, each branch reading a
# LayerNorm of the stream. Its parameters: ``ln1``/``ln2`` ({scale, bias}), ``qkv``/``qkv_b``,
# ``proj``/``proj_b`` (attention) and ``fc``/``fc_b``, ``out``/``out_b`` (MLP); the host's
# layers and the depth blueprint share these functions, so a fossilized depth block computes
# what a host layer does.


def attention_branch(p: dict, h: jax.Array, num_heads: int) -> jax.Array:
    """``A(h)``: LayerNorm, causal self-attention, output projection."""
    x = layer_norm(h, p["ln1"]["scale"], p["ln1"]["bias"])
    return causal_self_attention(x, p["qkv"], num_heads, p["qkv_b"]) @ p["proj"] + p["proj_b"]


def mlp_branch(p: dict, h: jax.Array) -> jax.Array:
    """``M(h)``: LayerNorm, GELU MLP, output projection."""
    x = layer_norm(h, p["ln2"]["scale"], p["ln2"]["bias"])
    return jax.nn.gelu(x @ p["fc"] + p["fc_b"]) @ p["out"] + p["out_b"]
