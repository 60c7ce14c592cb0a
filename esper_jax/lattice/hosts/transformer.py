"""GPT-style transformer host: token + learned position embeddings, pre-norm causal blocks,
a final LayerNorm and an output layer tied to the token embedding. Deterministic (no dropout),
so a forward is a pure function of parameters and input.

With ``attention=False`` the host is *position-wise*: its layers keep their MLPs but have no
attention, so each position sees its own token (and place) only, a bigram model. It is the
language-model counterpart of the pointwise CNN host (1x1 kernels): context is then something a
seed can bring (``attention``, ``depth``) and the host cannot learn by itself.

Row ``i`` of the slot grid is layer ``i``; its three columns (in forward order c1, c2, c0):

* ``r{i}c1``, pre-attention (parallel): the seed reads the stream entering the layer's
  attention and its residual joins where the attention's output does, so it adds attention
  heads to the layer (the ``attention`` blueprint: extra heads).
* ``r{i}c2``, post-FFN (parallel): the seed reads the stream entering the layer's MLP and its
  residual joins the MLP's output, so it adds MLP width to the layer (``mlp``, ``mlp_small``).
* ``r{i}c0``, the residual stream after layer ``i`` (after any seed at ``r{i}c2``): the seed
  reads it and adds to it, a new stage in depth (``depth``: a whole extra layer).

Every transformer blueprint may grow at every column (the blueprint and slot heads of the
action are chosen independently); the blueprints named above are what each column was made
for. The default slots are the ``r{i}c0``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from esper_jax.lattice import ops
from esper_jax.lattice.slots import SlotSpec, Topology, format_slot_id


# A layer's segments in forward order, and the column of the slot after each (module docstring).
_PARTS = ("attention", "mlp", "output")
_COLUMNS = {"attention": 1, "mlp": 2, "output": 0}


@dataclasses.dataclass(frozen=True)
class TransformerHost:
    vocab_size: int = 50257
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 4
    block_size: int = 256
    mlp_ratio: int = 4
    attention: bool = True      # False: position-wise layers (module docstring)
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
    def _layout(self) -> tuple[tuple[str, int], ...]:
        """(part, layer) per segment, in forward order; the slot after it is in ``_COLUMNS``."""
        return tuple((part, layer) for layer in range(self.num_layers) for part in _PARTS)

    @property
    def injection_points(self) -> tuple[SlotSpec, ...]:
        return tuple(
            SlotSpec(format_slot_id(layer, _COLUMNS[part]), self.d_model, "transformer", parallel=part != "output")
            for part, layer in self._layout
        )

    @property
    def default_slots(self) -> tuple[str, ...]:
        """The residual stream after each layer."""
        return tuple(format_slot_id(layer, 0) for layer in range(self.num_layers))

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
            layer = {
                "ln2": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
                "fc": 0.02 * jax.random.normal(k[2], (d, hidden)), "fc_b": jnp.zeros((hidden,)),
                "out": residual_std * jax.random.normal(k[3], (hidden, d)), "out_b": jnp.zeros((d,)),
            }
            if self.attention:
                layer.update({
                    "ln1": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
                    "qkv": 0.02 * jax.random.normal(k[0], (d, 3 * d)), "qkv_b": jnp.zeros((3 * d,)),
                    "proj": residual_std * jax.random.normal(k[1], (d, d)), "proj_b": jnp.zeros((d,)),
                })
            params[f"layer{i}"] = layer
        return params

    def stem(self, params: dict, tokens: jax.Array) -> jax.Array:
        if tokens.shape[1] > self.block_size:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds block size {self.block_size}")
        return params["tok_emb"][tokens] + params["pos_emb"][: tokens.shape[1]]

    def segment(self, params: dict, index: int, h: jax.Array) -> jax.Array:
        part, layer = self._layout[index]
        p = params[f"layer{layer}"]
        if part == "attention":
            return h + ops.attention_branch(p, h, self.num_heads) if self.attention else h
        if part == "mlp":
            return h + ops.mlp_branch(p, h)
        return h  # the layer's output: r{i}c2's seed has joined, r{i}c0's reads it

    def head(self, params: dict, h: jax.Array) -> jax.Array:
        h = ops.layer_norm(h, params["ln_f"]["scale"], params["ln_f"]["bias"])
        return h @ params["tok_emb"].T

    def loss(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def input_shape(self, batch: int, length: int | None = None) -> tuple[int, ...]:
        return (batch, length or self.block_size)
