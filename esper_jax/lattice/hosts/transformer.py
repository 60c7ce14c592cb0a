"""GPT-style transformer host: token + learned position embeddings, pre-norm causal blocks,
a final LayerNorm and an output layer tied to the token embedding. Injection point ``r{i}c0``
is the residual stream after layer ``i``. Deterministic (no dropout), so a forward is a pure
function of parameters and input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from esper_jax.lattice import ops
from esper_jax.lattice.slots import SlotSpec, Topology, format_slot_id


@dataclasses.dataclass(frozen=True)
class TransformerHost:
    vocab_size: int = 50257
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 4
    block_size: int = 256
    mlp_ratio: int = 4
    topology: Topology = dataclasses.field(default="transformer", init=False)

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.num_layers < 1:
            raise ValueError("a transformer host needs at least one layer")

    @classmethod
    def tinystories(cls, vocab_size: int = 50257, **overrides) -> "TransformerHost":
        """The TinyStories base host of the TinyStories design: 4 layers, 4 heads, width 256."""
        return cls(vocab_size=vocab_size, **overrides)

    @property
    def injection_points(self) -> tuple[SlotSpec, ...]:
        return tuple(SlotSpec(format_slot_id(i, 0), self.d_model, "transformer") for i in range(self.num_layers))

    @property
    def default_slots(self) -> tuple[str, ...]:
        return tuple(p.slot_id for p in self.injection_points)

    def init(self, key: jax.Array) -> dict:
        d, hidden = self.d_model, self.mlp_ratio * self.d_model
        keys = jax.random.split(key, 2 + 4 * self.num_layers)
        # GPT-2 style: small embeddings, residual projections scaled down by depth.
        residual_std = 0.02 / jnp.sqrt(2.0 * self.num_layers)
        params = {
            "tok_emb": 0.02 * jax.random.normal(keys[0], (self.vocab_size, d)),
            "pos_emb": 0.01 * jax.random.normal(keys[1], (self.block_size, d)),
            "ln_f": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
        }
        for i in range(self.num_layers):
            k = keys[2 + 4 * i: 6 + 4 * i]
            params[f"layer{i}"] = {
                "ln1": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
                "qkv": 0.02 * jax.random.normal(k[0], (d, 3 * d)), "qkv_b": jnp.zeros((3 * d,)),
                "proj": residual_std * jax.random.normal(k[1], (d, d)), "proj_b": jnp.zeros((d,)),
                "ln2": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
                "fc": 0.02 * jax.random.normal(k[2], (d, hidden)), "fc_b": jnp.zeros((hidden,)),
                "out": residual_std * jax.random.normal(k[3], (hidden, d)), "out_b": jnp.zeros((d,)),
            }
        return params

    def _layer(self, p: dict, h: jax.Array) -> jax.Array:
        b, t, d = h.shape
        x = ops.layer_norm(h, p["ln1"]["scale"], p["ln1"]["bias"])
        q, k, v = jnp.split(x @ p["qkv"] + p["qkv_b"], 3, axis=-1)
        heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
        attn = ops.causal_attention(heads(q), heads(k), heads(v)).reshape(b, t, d)
        h = h + attn @ p["proj"] + p["proj_b"]
        x = ops.layer_norm(h, p["ln2"]["scale"], p["ln2"]["bias"])
        return h + jax.nn.gelu(x @ p["fc"] + p["fc_b"]) @ p["out"] + p["out_b"]

    def segment(self, params: dict, index: int, h: jax.Array) -> jax.Array:
        if index == 0:
            tokens = h
            if tokens.shape[1] > self.block_size:
                raise ValueError(f"sequence length {tokens.shape[1]} exceeds block size {self.block_size}")
            h = params["tok_emb"][tokens] + params["pos_emb"][: tokens.shape[1]]
        return self._layer(params[f"layer{index}"], h)

    def head(self, params: dict, h: jax.Array) -> jax.Array:
        h = ops.layer_norm(h, params["ln_f"]["scale"], params["ln_f"]["bias"])
        return h @ params["tok_emb"].T

    def loss(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def input_shape(self, batch: int, length: int | None = None) -> tuple[int, ...]:
        return (batch, length or self.block_size)
