"""Transformer blueprints. Activations are ``[B, T, D]`` residual-stream states; each
returns a residual that is zero at germination (zero-initialized output projection)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esper_jax.lattice import ops
from esper_jax.lattice.blueprints.registry import register_blueprint


@register_blueprint("norm", "transformer", "LayerNorm branch with a zero-initialized affine.")
class Norm:
    @staticmethod
    def init(key, dim):
        return {"scale": jnp.zeros((dim,)), "bias": jnp.zeros((dim,))}

    @staticmethod
    def apply(params, h):
        return ops.layer_norm(h, params["scale"], params["bias"])


def _lora_init(key, dim, rank):
    return {"a": ops.lecun_normal(key, (dim, rank), dim), "b": jnp.zeros((rank, dim))}


def _lora_apply(params, h):
    return (ops.layer_norm(h) @ params["a"]) @ params["b"]


@register_blueprint("lora", "transformer", "Low-rank adapter, rank 8.")
class Lora:
    @staticmethod
    def init(key, dim):
        return _lora_init(key, dim, 8)

    apply = staticmethod(_lora_apply)


@register_blueprint("lora_large", "transformer", "Low-rank adapter, rank 32.")
class LoraLarge:
    @staticmethod
    def init(key, dim):
        return _lora_init(key, dim, 32)

    apply = staticmethod(_lora_apply)


ATTENTION_SEED_HEADS = 2


@register_blueprint("attention", "transformer", "Two extra causal attention heads (total width D/4).")
class ExtraAttention:
    @staticmethod
    def init(key, dim):
        head_dim = max(dim // (4 * ATTENTION_SEED_HEADS), 4)
        width = ATTENTION_SEED_HEADS * head_dim
        return {"qkv": ops.lecun_normal(key, (dim, 3 * width), dim), "out": jnp.zeros((width, dim))}

    @staticmethod
    def apply(params, h):
        b, t, _ = h.shape
        width = params["out"].shape[0]
        q, k, v = jnp.split(ops.layer_norm(h) @ params["qkv"], 3, axis=-1)
        heads = lambda x: x.reshape(b, t, ATTENTION_SEED_HEADS, width // ATTENTION_SEED_HEADS)
        return ops.causal_attention(heads(q), heads(k), heads(v)).reshape(b, t, width) @ params["out"]


def _mlp_init(key, dim, expansion):
    hidden = expansion * dim
    return {"w1": ops.lecun_normal(key, (dim, hidden), dim), "b1": jnp.zeros((hidden,)), "w2": jnp.zeros((hidden, dim))}


def _mlp_apply(params, h):
    return jax.nn.gelu(ops.layer_norm(h) @ params["w1"] + params["b1"]) @ params["w2"]


@register_blueprint("mlp_small", "transformer", "Parallel MLP, 2× expansion.")
class MlpSmall:
    @staticmethod
    def init(key, dim):
        return _mlp_init(key, dim, 2)

    apply = staticmethod(_mlp_apply)


@register_blueprint("mlp", "transformer", "Parallel MLP, 4× expansion.")
class Mlp:
    @staticmethod
    def init(key, dim):
        return _mlp_init(key, dim, 4)

    apply = staticmethod(_mlp_apply)
