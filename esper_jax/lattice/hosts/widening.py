"""Widening a host mid-training: the host at a multiple of its width, and the map that carries a
trained narrow host's parameters (and optimizer moments) into it.

The wide host keeps the narrow one inside it: the narrow host's channels (CNN) or residual-stream
dimensions, heads and MLP units (transformer) come first, and every normalization computes the
narrow part's statistics apart from the added part's (a CNN block's GroupNorm, a LayerNorm:
one group each), so that the narrow features are normalized exactly as they were. A transformer
grows heads of the narrow host's head size (``num_heads`` times the factor), not wider heads.

:func:`widen_params` places a narrow host's parameters into freshly initialized wide ones, by
``init`` (:data:`WidenInit`):

* ``"fresh"``: every added weight keeps its fresh initialization, including those through which
  the added units feed the narrow ones, so the function changes at once (on the default
  TinyStories host by about 0.03 of validation loss) and the added capacity takes part from the
  first step;
* ``"preserve"``: those weights are zero (CNN: the narrow output channels' kernels over added
  input channels, the classifier's rows of added channels; transformer: the narrow heads' and MLP
  units' reads of added stream dimensions, their writes' from added heads and units, the final
  LayerNorm's scale over added dimensions), so the wide host computes exactly the narrow one's
  function until training moves them.

Measured on calibration envs (``experiments.widening``; README "Does growth pay?"), ``fresh`` is
what lets a widened transformer catch up with one trained wide from the start.

:func:`widen_moments` carries an optimizer state across: the narrow parameters' moments placed as
the parameters are, zero for the added ones, step counts kept (so a schedule goes on where it was).
Both work on one member's trees; ``vmap`` them over a population.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from esper_jax.lattice import ops
from esper_jax.lattice.hosts.cnn import CNNHost
from esper_jax.lattice.hosts.transformer import TransformerHost

WidenInit = Literal["fresh", "preserve"]
WIDEN_INITS: tuple[WidenInit, ...] = ("fresh", "preserve")


def _split_norm(norm, x: jax.Array, narrow: int, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """``norm`` over the last axis's first ``narrow`` entries and over the rest, apart."""
    return jnp.concatenate([norm(x[..., :narrow], scale[:narrow], bias[:narrow]),
                            norm(x[..., narrow:], scale[narrow:], bias[narrow:])], axis=-1)


@dataclasses.dataclass(frozen=True)
class WideCNNHost(CNNHost):
    """A CNN host of base width ``base_width`` holding one of base width ``narrow_base_width``:
    block ``i``'s first ``narrow_base_width·2^i`` channels are the narrow host's."""

    narrow_base_width: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.narrow_base_width < self.base_width:
            raise ValueError(f"a widened host's narrow width must be in [1, {self.base_width}), "
                             f"got {self.narrow_base_width}")

    def segment(self, params: dict, index: int, h: jax.Array) -> jax.Array:
        kind, block, _ = self._layout[index]
        if kind == "pool":
            return ops.max_pool_2x2(h)
        p = params[f"block{block}"]
        narrow = self.narrow_base_width * 2 ** block
        return jax.nn.relu(_split_norm(ops.group_norm, ops.conv2d(h, p["conv"]), narrow, p["scale"], p["bias"]))


@dataclasses.dataclass(frozen=True)
class WideTransformerHost(TransformerHost):
    """A transformer host of width ``d_model`` holding one of width ``narrow_d_model`` (its heads
    are the first heads, its stream dimensions and MLP units the first ones)."""

    narrow_d_model: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.narrow_d_model < self.d_model:
            raise ValueError(f"a widened host's narrow width must be in [1, {self.d_model}), got {self.narrow_d_model}")

    def _norm(self, p: dict, h: jax.Array) -> jax.Array:
        return _split_norm(ops.layer_norm, h, self.narrow_d_model, p["scale"], p["bias"])

    def segment(self, params: dict, index: int, h: jax.Array) -> jax.Array:
        part, layer = self._layout[index]
        p = params[f"layer{layer}"]
        if part == "attention":
            if not self.attention:
                return h
            x = self._norm(p["ln1"], h)
            return h + ops.causal_self_attention(x, p["qkv"], self.num_heads, p["qkv_b"]) @ p["proj"] + p["proj_b"]
        if part == "mlp":
            x = self._norm(p["ln2"], h)
            return h + jax.nn.gelu(x @ p["fc"] + p["fc_b"]) @ p["out"] + p["out_b"]
        return h

    def head(self, params: dict, h: jax.Array) -> jax.Array:
        return self._norm(params["ln_f"], h) @ params["tok_emb"].T


def widened_host(host, factor: int):
    """``host`` (a :class:`CNNHost` or :class:`TransformerHost`) at ``factor`` times its width,
    holding it (a ValueError for any other host or a factor below 2)."""
    if not isinstance(factor, int) or factor < 2:
        raise ValueError(f"the widening factor must be an integer of at least 2, got {factor!r}")
    fields = lambda cls: {f.name: getattr(host, f.name) for f in dataclasses.fields(cls) if f.init}
    if type(host) is CNNHost:
        return WideCNNHost(**{**fields(CNNHost), "base_width": factor * host.base_width,
                              "narrow_base_width": host.base_width})
    if type(host) is TransformerHost:
        return WideTransformerHost(**{**fields(TransformerHost), "d_model": factor * host.d_model,
                                      "num_heads": factor * host.num_heads, "narrow_d_model": host.d_model})
    raise ValueError(f"only the built-in CNN and transformer hosts can be widened, not {type(host).__name__}")


def _keys(path) -> list[str]:
    """The dictionary keys along a tree path (an optimizer state's named tuples left out)."""
    return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def _chunks(name: str) -> int:
    """How many blocks a leaf's last axis holds side by side (the fused query/key/value)."""
    return 3 if name in ("qkv", "qkv_b") else 1


def _place(narrow: jax.Array, wide: jax.Array, chunks: int) -> jax.Array:
    """``narrow`` into the leading corner of ``wide`` (of each of ``chunks`` blocks of the last axis)."""
    if narrow.ndim == 0:
        return narrow
    n_last, w_last = narrow.shape[-1] // chunks, wide.shape[-1] // chunks
    for j in range(chunks):
        corner = tuple(slice(0, s) for s in narrow.shape[:-1]) + (slice(j * w_last, j * w_last + n_last),)
        wide = wide.at[corner].set(narrow[..., j * n_last:(j + 1) * n_last])
    return wide


def _cut_reads(keys: list[str], narrow: jax.Array, wide: jax.Array) -> jax.Array:
    """Zero the weights through which added units would reach narrow ones (``"preserve"``)."""
    name, chunks = keys[-1], _chunks(keys[-1])
    if keys[-2:] == ["ln_f", "scale"]:  # the output layer reads the added dimensions' norm
        return wide.at[narrow.shape[-1]:].set(0.0)
    # kernels and matrices [..., in, out]: the classifier's "w", a layer's projections
    if name in ("conv", "w", "qkv", "proj", "fc", "out"):
        n_in, n_last, w_last = narrow.shape[-2], narrow.shape[-1] // chunks, wide.shape[-1] // chunks
        for j in range(chunks):
            wide = wide.at[..., n_in:, j * w_last:j * w_last + n_last].set(0.0)
    return wide


def widen_params(narrow_params: Any, wide_params: Any, init: WidenInit = "fresh") -> Any:
    """A narrow host's parameters placed into a wide host's freshly initialized ones (same tree,
    as :func:`widened_host` makes them), by ``init`` (module docstring)."""
    if init not in WIDEN_INITS:
        raise ValueError(f"unknown widening init {init!r}; choose one of {', '.join(WIDEN_INITS)}")

    def place(path, narrow, wide):
        keys = _keys(path)
        out = _place(narrow, wide, _chunks(keys[-1]))
        return _cut_reads(keys, narrow, out) if init == "preserve" else out

    return jax.tree_util.tree_map_with_path(place, narrow_params, wide_params)


def widen_moments(narrow_state: Any, wide_state: Any) -> Any:
    """An optimizer state of the narrow parameters carried into one of the wide (same optimizer):
    moments placed as :func:`widen_params` places parameters, zero for the added entries; scalars
    (step counts, injected hyperparameters) kept."""
    def place(path, narrow, wide):
        keys = _keys(path)
        return _place(narrow, jnp.zeros_like(wide), _chunks(keys[-1]) if keys else 1)

    return jax.tree_util.tree_map_with_path(place, narrow_state, wide_state)
