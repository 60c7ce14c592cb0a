"""Compute, counted: floating-point operations of a traced program, and of the pieces a
morphogenetic model trains (the host, each blueprint at each slot), independent of the machine.

The count walks the program's jaxpr (what JAX traces, before XLA optimizes anything), so it is
the same on every machine and backend:

* ``dot_general``: 2 x (batch) x M x N x K (a multiply and an add per term);
* ``conv_general_dilated``: 2 x the multiply-adds that read real input (a 'same' convolution's
  taps on its padding are not counted);
* elementwise arithmetic (add, mul, max, exp, ...): one per output element; reductions: one per
  input element; data movement (reshape, broadcast, slice, gather, select, ...) is free;
* inner programs (``pjit``, ``custom_jvp``/``custom_vjp``, ``checkpoint``) are counted once per
  call, a ``scan`` ``length`` times, a ``cond`` by its most expensive branch.

These are the conventions of XLA's own cost analysis (``compiled.cost_analysis()["flops"]``),
which the tests check this count against on small models. Why not use XLA's count: it is taken
after optimization, so it depends on the backend and version, and it counts every branch of a
``lax.cond`` whether it runs or not.

:func:`model_costs` gives the :class:`ModelCosts` of a model at a batch size: the host's training
step (forward and backward of its loss), its evaluation forward, and the same for every blueprint
at every slot, seed alone on an activation of the slot's shape. The optimizers' updates are not
counted (a few operations per parameter per step, against one multiply-add per parameter per
example and position in the forward alone).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax.extend import core as jex_core

from esper_jax.lattice.hosts.base import host_forward

# One operation per output element.
_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "rem", "neg", "max", "min", "abs", "sign", "pow", "integer_pow", "sqrt", "rsqrt",
    "cbrt", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "atan2", "erf", "erfc",
    "erf_inv", "square", "reciprocal", "floor", "ceil", "round", "nextafter", "is_finite", "eq", "ne", "lt", "le",
    "gt", "ge", "and", "or", "not", "xor", "add_any", "clamp", "select_and_scatter_add", "lgamma", "digamma",
})
# One operation per input element.
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin",
                         "reduce_and", "reduce_or", "cumsum", "cummax", "cumlogsumexp", "cumprod", "cummin",
                         "reduce_precision"})


def _size(aval) -> int:
    return int(math.prod(getattr(aval, "shape", ())))


def _inner_jaxprs(eqn):
    """The sub-programs an equation calls (whatever the primitive names the parameter: ``jit``,
    ``custom_jvp_call``, ``custom_vjp_call``, ``custom_vmap_call``, ``checkpoint``...), each with
    how many times it runs."""
    if eqn.primitive.name == "while":
        raise ValueError("a while loop's trip count is not known when tracing: count its body yourself")
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    return [(value, times) for value in eqn.params.values() if isinstance(value, (jex_core.Jaxpr, jex_core.ClosedJaxpr))]


def _valid_taps(in_size: int, out_size: int, window: int, stride: int, pad_low: int, lhs_dilation: int,
                rhs_dilation: int) -> int:
    """(output position, kernel tap) pairs of one spatial dimension that read an input element
    rather than padding (or a hole of a dilated input)."""
    out = np.arange(out_size)[:, None] * stride + np.arange(window)[None, :] * rhs_dilation - pad_low
    return int(np.sum((out >= 0) & (out % lhs_dilation == 0) & (out // lhs_dilation < in_size)))


def _conv_flops(eqn) -> int:
    """Two operations per multiply-add that reads real input (taps on padding are not counted,
    as in XLA's cost analysis)."""
    p = eqn.params
    lhs, rhs, out = eqn.invars[0].aval, eqn.invars[1].aval, eqn.outvars[0].aval
    dims = p["dimension_numbers"]
    pairs = 1
    for i, (l, r, o) in enumerate(zip(dims.lhs_spec[2:], dims.rhs_spec[2:], dims.out_spec[2:])):
        pairs *= _valid_taps(lhs.shape[l], out.shape[o], rhs.shape[r], p["window_strides"][i], p["padding"][i][0],
                             p["lhs_dilation"][i], p["rhs_dilation"][i])
    batch = out.shape[dims.out_spec[0]]
    in_per_group = rhs.shape[dims.rhs_spec[1]]  # the kernel's input features are per feature group
    return 2 * batch * out.shape[dims.out_spec[1]] * in_per_group * pairs // max(1, p["batch_group_count"])


def jaxpr_flops(jaxpr) -> int:
    """Floating-point operations of a (closed) jaxpr, by the conventions of the module docstring."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            contracted = math.prod(lhs.shape[d] for d in lhs_contract)
            total += 2 * _size(eqn.outvars[0].aval) * contracted
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name in _ELEMENTWISE:
            total += _size(eqn.outvars[0].aval)
        elif name in _REDUCTIONS:
            total += _size(eqn.invars[0].aval)
        elif name == "cond":
            total += max(jaxpr_flops(branch) for branch in eqn.params["branches"])
        else:
            for inner, times in _inner_jaxprs(eqn):
                total += times * jaxpr_flops(inner)
    return int(total)


def function_flops(fn: Callable, *args, **kwargs) -> int:
    """Floating-point operations of ``fn(*args, **kwargs)``; arguments may be arrays or
    ``jax.ShapeDtypeStruct`` (nothing is computed)."""
    return jaxpr_flops(jax.make_jaxpr(fn, **kwargs)(*args))


class ModelCosts(NamedTuple):
    """Floating-point operations of a model's pieces (NumPy integers, float64 to avoid overflow).

    ``host_train``: one training batch through the host alone, forward and backward of its loss;
    ``host_eval``: one evaluation batch, forward and loss;
    ``seed_train`` ``[S, NB]``: blueprint ``b`` at slot ``s`` on one training batch's activation,
    forward and backward (gradients of its parameters and of its input);
    ``seed_eval`` ``[S, NB]``: the same seed's forward on one evaluation batch's activation.
    """

    host_train: float
    host_eval: float
    seed_train: np.ndarray
    seed_eval: np.ndarray


class EpochFlops(NamedTuple):
    """FLOPs of one epoch of an env (leading axes as the masks'): ``train`` its batches through the
    host and the computed seeds, ``validation`` its validation forward, ``measurement`` the
    leave-one-out passes of its blended seeds (zeros where nothing measures them)."""

    train: Any
    validation: Any
    measurement: Any


def epoch_flops(costs: ModelCosts, computed, blended, blueprint, steps_per_epoch: int, measured: bool = True,
                xp=np) -> EpochFlops:
    """The FLOPs of epochs whose seeds were ``computed`` (``[..., S]``: TRAINING to FOSSILIZED
    while the epoch trained) and ``blended`` (BLENDING, HOLDING, FOSSILIZED), with ``blueprint``
    ``[..., S]`` (-1 empty): ``steps_per_epoch`` training batches, one validation forward, and
    with ``measured`` one more forward per blended slot without that slot's seed (the
    counterfactual a controller observes). ``xp``: ``numpy`` (float64, exact for any count a run
    reaches) or ``jax.numpy`` (inside a jitted env)."""
    slot = xp.arange(blueprint.shape[-1])
    live = computed & (blueprint >= 0)
    index = xp.clip(blueprint, 0, None)
    seed_train = xp.where(live, xp.asarray(costs.seed_train)[slot, index], 0.0).sum(axis=-1)
    seed_eval = xp.where(live, xp.asarray(costs.seed_eval)[slot, index], 0.0)
    train = steps_per_epoch * (costs.host_train + seed_train)
    forward = costs.host_eval + seed_eval.sum(axis=-1)
    leave_one_out = xp.where(blended, forward[..., None] - seed_eval, 0.0).sum(axis=-1)
    return EpochFlops(train, forward, leave_one_out if measured else xp.zeros_like(forward))


def _activation_shapes(host, x: jax.ShapeDtypeStruct) -> dict[str, tuple]:
    """The shape of the activation at every injection point of the host, for input ``x``."""
    def forward(params, x):
        h = host.stem(params, x)
        out = {}
        for index, point in enumerate(host.injection_points):
            h = host.segment(params, index, h)
            out[point.slot_id] = h
        return out

    params = jax.eval_shape(host.init, jax.random.key(0))
    return {k: v.shape for k, v in jax.eval_shape(forward, params, x).items()}


def _host_flops(host, x: jax.ShapeDtypeStruct, y: jax.ShapeDtypeStruct, train: bool) -> int:
    """The host on one batch: its loss's forward, and with ``train`` the backward too."""
    params = jax.eval_shape(host.init, jax.random.key(0))
    loss = lambda p, x, y: host.loss(host_forward(host, p, x), y)
    return function_flops(jax.value_and_grad(loss) if train else loss, params, x, y)


def _seed_flops(blueprint, dim: int, shape: tuple, train: bool) -> int:
    """A seed alone on an activation of ``shape``: its forward, and with ``train`` the backward
    from a cotangent too (gradients of its parameters and of its input)."""
    params = jax.eval_shape(lambda k: blueprint.init(k, dim), jax.random.key(0))
    h = jax.ShapeDtypeStruct(shape, jnp.float32)

    def forward_backward(p, h):
        out, vjp = jax.vjp(blueprint.apply, p, h)
        return vjp(out)

    return function_flops(forward_backward if train else blueprint.apply, params, h)


def model_costs(model, train_batch: int, eval_batch: int, example_shape: tuple, target_shape: tuple = (),
                input_dtype=jnp.float32) -> ModelCosts:
    """The :class:`ModelCosts` of a :class:`~esper_jax.lattice.model.MorphogeneticModel` whose
    examples have shape ``example_shape`` (an image's ``H, W, C``; a window's ``T`` with
    ``input_dtype`` int32) and targets ``target_shape`` (``()`` for a class, ``(T,)`` for tokens)."""
    host, lattice = model.host, model.lattice
    target_dtype = jnp.int32

    def batch(n):
        return (jax.ShapeDtypeStruct((n,) + tuple(example_shape), input_dtype),
                jax.ShapeDtypeStruct((n,) + tuple(target_shape), target_dtype))

    host_train = _host_flops(host, *batch(train_batch), train=True)
    host_eval = _host_flops(host, *batch(eval_batch), train=False)
    train_shapes = _activation_shapes(host, batch(train_batch)[0])
    eval_shapes = _activation_shapes(host, batch(eval_batch)[0])
    slots, blueprints = lattice.slots.slots, lattice.blueprints
    seed_train = np.zeros((len(slots), len(blueprints)))
    seed_eval = np.zeros((len(slots), len(blueprints)))
    for s, spec in enumerate(slots):
        for b, bp in enumerate(blueprints):
            if bp.is_noop:
                continue
            seed_train[s, b] = _seed_flops(bp, spec.dim, train_shapes[spec.slot_id], train=True)
            seed_eval[s, b] = _seed_flops(bp, spec.dim, eval_shapes[spec.slot_id], train=False)
    return ModelCosts(float(host_train), float(host_eval), seed_train, seed_eval)
