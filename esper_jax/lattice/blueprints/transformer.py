"""Transformer blueprints. Activations are ``[B, T, D]`` residual-stream states; each
returns a residual that is zero at germination (zero-initialized output projection)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esper_jax.lattice import ops
from esper_jax.lattice.blueprints.registry import register_blueprint


@register_blueprint("norm", "transformer", "LayerNorm branch with a zero-initialized affine.", role="normalization")
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


@register_blueprint("lora", "transformer", "Low-rank adapter, rank 8.", role="adapter")
class Lora:
    @staticmethod
    def init(key, dim):
        return _lora_init(key, dim, 8)

    apply = staticmethod(_lora_apply)


@register_blueprint("lora_large", "transformer", "Low-rank adapter, rank 32.", role="adapter")
class LoraLarge:
    @staticmethod
    def init(key, dim):
        return _lora_init(key, dim, 32)

    apply = staticmethod(_lora_apply)


ATTENTION_SEED_HEADS = 2


@register_blueprint("attention", "transformer", "Two extra causal attention heads (total width D/4).", role="context")
class ExtraAttention:
    @staticmethod
    def init(key, dim):
        head_dim = max(dim // (4 * ATTENTION_SEED_HEADS), 4)
        width = ATTENTION_SEED_HEADS * head_dim
        return {"qkv": ops.lecun_normal(key, (dim, 3 * width), dim), "out": jnp.zeros((width, dim))}

    @staticmethod
    def apply(params, h):
        return ops.causal_self_attention(ops.layer_norm(h), params["qkv"], ATTENTION_SEED_HEADS) @ params["out"]


def _mlp_init(key, dim, expansion):
    hidden = expansion * dim
    return {"w1": ops.lecun_normal(key, (dim, hidden), dim), "b1": jnp.zeros((hidden,)), "w2": jnp.zeros((hidden, dim))}


def _mlp_apply(params, h):
    return jax.nn.gelu(ops.layer_norm(h) @ params["w1"] + params["b1"]) @ params["w2"]


@register_blueprint("mlp_small", "transformer", "Parallel MLP, 2× expansion.", role="width")
class MlpSmall:
    @staticmethod
    def init(key, dim):
        return _mlp_init(key, dim, 2)

    apply = staticmethod(_mlp_apply)


@register_blueprint("mlp", "transformer", "Parallel MLP, 4× expansion.", role="width")
class Mlp:
    @staticmethod
    def init(key, dim):
        return _mlp_init(key, dim, 4)

    apply = staticmethod(_mlp_apply)


DEPTH_HEAD_WIDTH = 64  # GPT-2's head width, and the TinyStories base host's (4 heads at width 256)
DEPTH_MLP_RATIO = 4


def depth_heads(dim: int) -> int:
    """Attention heads of a depth block at width ``dim``: heads of width 64 (the blueprint is
    given only the width, not the host's head count), at least one, and a divisor of ``dim``:
    4 at the base host's 256, where the host has 4 too; 1 at the ``tiny`` host's 64 (it has 2)."""
    heads = max(1, dim // DEPTH_HEAD_WIDTH)
    while dim % heads:
        heads -= 1
    return heads


@register_blueprint("depth", "transformer",
                    "A whole pre-norm transformer layer (causal self-attention with heads of width 64, then a 4x "
                    "GELU MLP), both output projections zero-initialized; at r{i}c0 it is a new layer of depth.",
                    role="depth")
class Depth:
    """The residual ``layer(h) - h`` of a layer shaped like the host's, computed as its two
    branches ``A(h) + M(h + A(h))`` (no cancellation): exactly zero while both output projections
    and their biases are zero, and a full extra layer once fossilized."""

    @staticmethod
    def init(key, dim):
        hidden = DEPTH_MLP_RATIO * dim
        k_attention, k_mlp = ops.split_key(key, 2)
        norm = lambda: {"scale": jnp.ones((dim,)), "bias": jnp.zeros((dim,))}
        return {
            "ln1": norm(),
            "qkv": ops.lecun_normal(k_attention, (dim, 3 * dim), dim), "qkv_b": jnp.zeros((3 * dim,)),
            "proj": jnp.zeros((dim, dim)), "proj_b": jnp.zeros((dim,)),
            "ln2": norm(),
            "fc": ops.lecun_normal(k_mlp, (dim, hidden), dim), "fc_b": jnp.zeros((hidden,)),
            "out": jnp.zeros((hidden, dim)), "out_b": jnp.zeros((dim,)),
        }

    @staticmethod
    def apply(params, h):
        attended = ops.attention_branch(params, h, depth_heads(h.shape[-1]))
        return attended + ops.mlp_branch(params, h + attended)
