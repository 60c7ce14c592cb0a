"""Alpha schedules and blend operators: how a seed's output enters the host.

Blueprints produce a *residual* ``r`` that is zero at germination. A blend op combines the
host activation ``h`` with ``r`` under the blend weight ``a``:

* ``add``:      ``h + a·r``                (= ``lerp(h, h + r, a)``)
* ``multiply``: ``h·(1 + a·tanh(r))``
* ``gate``:     ``h + a·g(x)·r`` with a small learned per-sample gate ``g``; the gate is
  used during BLENDING only. Afterwards the seed is integrated with the plain ``add`` op.

With ``r = 0`` every op is the identity, so a fresh seed never shocks the host. The alpha
stored in the lattice state is exactly the ``a`` the forward uses (times the gate for
``gate`` during BLENDING).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

CURVES = ("linear", "cosine", "sigmoid")
BLEND_OPS = ("add", "multiply", "gate")
OP_ADD, OP_MULTIPLY, OP_GATE = range(3)


@dataclasses.dataclass(frozen=True)
class BlendStyle:
    name: str
    curve: str
    steepness: float
    op: str


# The "how" head of the action space indexes this table; adding a row adds an action.
BLEND_STYLES: tuple[BlendStyle, ...] = (
    BlendStyle("linear", "linear", 0.0, "add"),
    BlendStyle("cosine", "cosine", 0.0, "add"),
    BlendStyle("sigmoid_gentle", "sigmoid", 6.0, "add"),
    BlendStyle("sigmoid", "sigmoid", 12.0, "add"),
    BlendStyle("sigmoid_sharp", "sigmoid", 24.0, "add"),
    BlendStyle("multiply", "linear", 0.0, "multiply"),
    BlendStyle("gate", "linear", 0.0, "gate"),
)
BLEND_STYLE_NAMES = tuple(s.name for s in BLEND_STYLES)

# Blending durations in epochs (the "tempo" head).
TEMPOS: tuple[int, ...] = (3, 5, 8)

# NumPy tables (made device arrays where used): a device array at import would start JAX's backend
# before a run over several processes can initialize its multi-process runtime.
_CURVE_INDEX = np.array([CURVES.index(s.curve) for s in BLEND_STYLES], np.int32)
_STEEPNESS = np.array([s.steepness for s in BLEND_STYLES], np.float32)
_OP_INDEX = np.array([BLEND_OPS.index(s.op) for s in BLEND_STYLES], np.int32)
_TEMPO_EPOCHS = np.array(TEMPOS, np.int32)


def blend_style_index(name: str) -> int:
    if name not in BLEND_STYLE_NAMES:
        raise ValueError(f"unknown blend style {name!r}; choose one of {', '.join(BLEND_STYLE_NAMES)}")
    return BLEND_STYLE_NAMES.index(name)


def tempo_index(epochs: int) -> int:
    if epochs not in TEMPOS:
        raise ValueError(f"unsupported tempo {epochs}; choose one of {TEMPOS} epochs")
    return TEMPOS.index(epochs)


def tempo_epochs(index: jax.Array) -> jax.Array:
    return jnp.asarray(_TEMPO_EPOCHS)[jnp.clip(index, 0, len(TEMPOS) - 1)]


def blend_op_of(style: jax.Array) -> jax.Array:
    return jnp.asarray(_OP_INDEX)[jnp.clip(style, 0, len(BLEND_STYLES) - 1)]


def curve(style: jax.Array, progress: jax.Array) -> jax.Array:
    """Fraction of the way from start to target alpha, for progress in [0, 1].

    All curves map 0→0 and 1→1 exactly; the sigmoid is rescaled so it does too.
    """
    style = jnp.clip(style, 0, len(BLEND_STYLES) - 1)
    t = jnp.clip(progress, 0.0, 1.0)
    k = jnp.maximum(jnp.asarray(_STEEPNESS)[style], 1e-3)
    lo, hi = jax.nn.sigmoid(-k / 2), jax.nn.sigmoid(k / 2)
    sigmoid = (jax.nn.sigmoid(k * (t - 0.5)) - lo) / (hi - lo)
    cosine = 0.5 * (1.0 - jnp.cos(jnp.pi * t))
    value = jnp.select([jnp.asarray(_CURVE_INDEX)[style] == 0, jnp.asarray(_CURVE_INDEX)[style] == 1], [t, cosine], sigmoid)
    return jnp.clip(value, 0.0, 1.0)


# Always compiled: XLA contracts the multiply-add below into one FMA (one rounding), while
# op-by-op execution rounds twice. Jitting it here makes plain calls round like jitted and
# vmapped callers do, so the lifecycle state is bit-for-bit the same however it is run.
@jax.jit
def scheduled_alpha(start, target, step, steps, style) -> jax.Array:
    """Alpha after ``step`` of ``steps`` schedule epochs from ``start`` toward ``target``."""
    progress = jnp.where(steps > 0, step / jnp.maximum(steps, 1), 1.0)
    value = start + (target - start) * curve(style, progress)
    return jnp.clip(jnp.where(step >= steps, target, value), 0.0, 1.0)


def init_gate(dim: int) -> dict:
    # Starts open (sigmoid(3) ≈ 0.95) so the schedule drives blending from the first epoch;
    # the gate learns where to hold the seed back.
    return {"w": jnp.zeros((dim,), jnp.float32), "b": jnp.full((), 3.0, jnp.float32)}


def gate_value(gate_params: dict, h: jax.Array) -> jax.Array:
    """Gate in (0, 1), broadcastable to ``h``.

    Images ``[B, H, W, C]``: one value per sample from the spatial mean. Sequences ``[B, T, D]``:
    one value per position from the mean over positions up to it, so a gated seed in a causal
    model never sees future tokens.
    """
    if h.ndim == 3:
        counts = jnp.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        pooled = jnp.cumsum(h, axis=1) / counts
        return jax.nn.sigmoid(pooled @ gate_params["w"] + gate_params["b"])[..., None]
    pooled = jnp.mean(h, axis=tuple(range(1, h.ndim - 1))) if h.ndim > 2 else h
    g = jax.nn.sigmoid(pooled @ gate_params["w"] + gate_params["b"])
    return g.reshape(g.shape + (1,) * (h.ndim - 1))


def blend(h: jax.Array, r: jax.Array, weight: jax.Array, op: jax.Array) -> jax.Array:
    """Combine host activation and seed residual; ``weight`` broadcasts against ``h``."""
    added = h + weight * r
    multiplied = h * (1.0 + weight * jnp.tanh(r))
    return jnp.where(op == OP_MULTIPLY, multiplied, added)
