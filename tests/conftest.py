"""Shared, session-scoped fixtures: small hosts, built models and their compiled functions.

XLA:CPU compile time dominates these tests: one morphogenetic forward carries a ``lax.cond``
per (slot, blueprint), and the gradient of a one-slot CNN model takes ~20 s of CPU to compile
on the 2-core test machine. So:

* every compiled function is built once per session here and takes the lattice state as an
  argument: stage, blueprint, blend style and alpha are traced values, so one compilation
  serves every configuration a test sets up (never re-jit in a loop, and keep dtypes and weak
  types stable, see :func:`strong`);
* models carry few slots (the CNN rig one, the transformer rig two), and the CNN rig's one
  compiled function is ``jax.vmap`` of the per-member forward and gradient, which serves the
  single-member tests, the ``vmap(model.apply)`` check and the population references at once;
* PRNG keys use the ``rbg`` implementation: the library is PRNG-agnostic, and initializing
  every blueprint of every slot compiles ~6x faster than with threefry;
* nothing runs op by op where that would compile every primitive (an eager ``model.init``
  takes ~30 s; ``jnp.asarray`` of a NumPy array compiles per shape, ``device_put`` does not),
  and the fresh lattice state is built from ``lattice.init``'s shapes without compiling it.

(Lowering XLA's backend optimization level would compile ~5x faster, but
``xla_backend_optimization_level=0`` produced NaN and wrong gradients for this model with
jaxlib 0.10.2 on CPU, so compiler options stay at their defaults.)
"""

from __future__ import annotations

import builtins
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.lattice import blending, lifecycle
from esper_jax.lattice.blueprints import get_blueprint
from esper_jax.lattice.hosts import CNNHost, TransformerHost, host_forward
from esper_jax.lattice.lifecycle import Stage
from esper_jax.lattice.strategy import Execution, PopulationStrategy
from esper_jax.lattice.model import MorphogeneticModel


def block_imports(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make every import of ``package`` (and its submodules) fail as if it were not installed, even
    where it is, for the tests of the one-line message a missing optional extra gets."""
    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {package!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)


def key(seed: int) -> jax.Array:
    """A typed PRNG key with the fast-compiling ``rbg`` implementation."""
    return jax.random.key(seed, impl="rbg")


def to_device(a) -> jax.Array:
    """A strong-typed device array. (``jnp.asarray`` of a NumPy array compiles a small program
    per shape in this jax version; ``device_put`` compiles nothing.)"""
    return jax.device_put(np.asarray(a))


def stack(*trees):
    """Stack pytrees of the same structure on a new leading (population) axis
    (``jnp.stack`` semantics, done in NumPy so that nothing compiles)."""
    return jax.tree.map(lambda *a: to_device(np.stack([np.asarray(x) for x in a])), *trees)


def add_member_axis(tree):
    return jax.tree.map(lambda a: to_device(np.asarray(a)[None]), tree)


# ---------------------------------------------------------------------------- lattice access
# The lattice may store a slot's seed parameters as ``{unit: params}`` or raveled into one
# vector with a layout; these read and write named units either way, on ``state.params`` or on
# a gradient shaped like it.


def _read_units(model: MorphogeneticModel, params: tuple, s: int) -> dict[str, Any]:
    """Named units as NumPy arrays (unraveling a NumPy vector compiles nothing)."""
    lattice = model.lattice
    if hasattr(lattice, "layout"):
        return dict(lattice.layout(s).unravel(np.asarray(params[s])))
    return dict(jax.tree.map(np.asarray, params[s]))


def _write_units(model: MorphogeneticModel, params: tuple, s: int, units: dict[str, Any]) -> tuple:
    lattice = model.lattice
    units = jax.tree.map(np.asarray, dict(units))
    params = list(params)
    params[s] = lattice.layout(s).ravel(units) if hasattr(lattice, "layout") else jax.tree.map(to_device, units)
    return tuple(params)


def strong(tree):
    """The same values on device with every weak type made strong, so that every state a test
    builds hits the same jit cache entry (``lifecycle.init_status`` used to return a weak-typed
    ``stage``; transitions return strong ones)."""
    return jax.tree.map(to_device, tree)


def set_status(state, s: int, **fields):
    """Set per-slot status fields of slot ``s`` (dtype-preserving, so jit caches still hit)."""
    status = state.status
    updates = {}
    for name, value in fields.items():
        new = np.array(getattr(status, name))
        new[s] = value
        updates[name] = to_device(new)
    return state.replace(status=status.replace(**updates))


def perturb_zero_leaves(tree, seed: int, scale: float = 0.5):
    """Replace every all-zero leaf (zero-initialized output layers, scales, biases) by noise,
    so that a freshly germinated seed really contributes. (NumPy noise: no compilation.)"""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for leaf in leaves:
        value = np.asarray(leaf)
        if value.size and not value.any():
            value = (scale * rng.standard_normal(value.shape)).astype(value.dtype)
        out.append(to_device(value))
    return jax.tree.unflatten(treedef, out)


def tree_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in jax.tree.leaves(tree))))


def assert_trees_equal(a, b, err_msg: str = ""):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=err_msg), a, b)


def assert_trees_close(a, b, rtol: float, atol: float, err_msg: str = ""):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=err_msg), a, b
    )


def trees_close(a, b, rtol: float, atol: float) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.allclose(x, y, rtol=rtol, atol=atol)), a, b)))


# ---------------------------------------------------------------------------- comparing programs


def assert_close_across_programs(actual, desired, ulps: float = 4, err_msg: str = "") -> None:
    """Results of two DIFFERENT compiled programs agree to a few float32 rounding steps.

    The rule (issue 23). XLA compiles every program on its own: which ops it fuses, how it
    vectorizes and splits reductions, whether a multiply-add becomes one FMA, and which vector
    width and instructions it uses all depend on the program and on the CPU it runs on (an AMD
    EPYC without AVX-512 rounds differently from an Intel CI machine with it). So two different
    programs that compute the same mathematics (two controllers or two ``lax.switch`` branches
    around the same host, sharded and unsharded, members mapped and batched, ``vmap`` and one
    member, ``jit`` and op-by-op, a chunk of two updates and two chunks of one) agree to
    rounding, not bit for bit, even where every op is the same: compare them with this helper.
    Bit-identity (``np.testing.assert_array_equal``) is asserted only where the SAME compiled
    program runs twice on the same inputs (determinism, resuming from a checkpoint), for values
    that are copied or selected rather than computed, and where only exact IEEE arithmetic
    (``h + 0 = h``, ``x - x = 0``, ``h * 1 = h``, a max, one correctly rounded op) separates two
    results computed by code one program shares: the rigs below never skip the dormant lattice
    for that reason, so a TRAINING seed and no seed run the same host code.

    Float leaves: ``|actual - desired| <= ulps * eps * (max |desired| over the leaf's finite
    values + |desired|)``, ``eps`` the leaf dtype's rounding step at 1.0 (``2**-23`` for float32),
    so ``ulps`` counts rounding steps of the leaf's largest value (what its sums and products
    were rounded to). NaNs and infinities must sit in the same places. Integer, boolean and key
    leaves (stages, blueprints, masks, actions, counts) compare exactly. Choose ``ulps`` per call
    and say why: a few for one pass of arithmetic, more where training steps carry a difference
    forward. A test calling this must be marked ``@pytest.mark.cross_program``: the guard in
    ``tests/test_xla_flags.py`` reruns exactly those tests with XLA's CPU code changed.
    """
    item = _RUNNING_TEST[0]
    if item is not None and item.get_closest_marker("cross_program") is None:
        raise AssertionError(f"{item.nodeid} compares programs with assert_close_across_programs but is not marked "
                             "@pytest.mark.cross_program (tests/test_xla_flags.py's guard selects tests by that mark)")
    paths_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    paths_d, tree_d = jax.tree_util.tree_flatten_with_path(desired)
    assert tree_a == tree_d, f"{err_msg}: different structures {tree_a} and {tree_d}"
    for (path, a), (_, d) in zip(paths_a, paths_d):
        where = f"{err_msg} {jax.tree_util.keystr(path)}".strip()
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, d = jax.random.key_data(a), jax.random.key_data(d)
        a, d = np.asarray(a), np.asarray(d)
        assert a.shape == d.shape and a.dtype == d.dtype, f"{where}: {a.dtype}{a.shape} vs {d.dtype}{d.shape}"
        if not np.issubdtype(d.dtype, np.inexact):
            np.testing.assert_array_equal(a, d, err_msg=where)
            continue
        eps = float(np.finfo(d.dtype).eps)
        finite = np.abs(d[np.isfinite(d)])
        scale = float(finite.max()) if finite.size else 0.0
        step = ulps * eps
        if not np.allclose(a, d, rtol=step, atol=step * scale, equal_nan=True):
            with np.errstate(invalid="ignore"):
                off = np.nanmax(np.where(np.isfinite(d), np.abs(a.astype(np.float64) - d), 0.0)) / (eps * max(scale, 1e-30))
            where = f"{where} (max difference {off:.3g} rounding steps of the largest value; allowed {ulps})"
        np.testing.assert_allclose(a, d, rtol=step, atol=step * scale, equal_nan=True, err_msg=where)


# The test being run, for assert_close_across_programs's check of its marker.
_RUNNING_TEST: list = [None]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _RUNNING_TEST[0] = item
    try:
        return (yield)
    finally:
        _RUNNING_TEST[0] = None


# ---------------------------------------------------------------------------- rigs


@dataclasses.dataclass(eq=False)
class Rig:
    """A host, a model on it, parameters, a fixed batch and the model's compiled functions."""

    name: str
    host: Any
    model: MorphogeneticModel
    host_params: Any
    state: Any  # freshly initialized lattice state: every slot DORMANT
    x: jax.Array
    y: jax.Array
    _grad_fn: Callable
    members: int | None  # None: one member, plain ``model.apply``; else ``jax.vmap`` over this many
    _host_fn: Callable
    _germinate: Callable
    _read: Callable
    _write: Callable
    _cache: dict = dataclasses.field(default_factory=dict)

    @property
    def slot_ids(self) -> tuple[str, ...]:
        return self.model.lattice.slots.slot_ids

    @property
    def num_slots(self) -> int:
        return len(self.slot_ids)

    @property
    def blueprint_names(self) -> tuple[str, ...]:
        return tuple(bp.name for bp in self.model.lattice.blueprints)

    def no_slot_disabled(self) -> jax.Array:
        return to_device(np.zeros((self.num_slots,), bool))

    def _args(self, state, host_params=None, x=None, y=None, disabled=None):
        host_params = self.host_params if host_params is None else host_params
        x = self.x if x is None else x
        y = self.y if y is None else y
        disabled = self.no_slot_disabled() if disabled is None else to_device(np.asarray(disabled, bool))
        return host_params, state.params, state, x, y, disabled

    def run(self, state, host_params=None, x=None, y=None, disabled=None):
        """``model.apply`` forward and gradients of the loss for one member:
        ``(loss, output, host_grads, seed_grads)``."""
        args = self._args(state, host_params, x, y, disabled)
        if self.members is None:
            (loss, out), (g_host, g_seed) = self._grad_fn(*args)
            return loss, out, g_host, g_seed
        return self.run_members([args])[0]

    def run_members(self, member_args: list) -> list:
        """Several members at once through ``jax.vmap`` of the per-member forward and gradient
        (only for a rig built with ``members``): a list of ``(loss, output, host_grads, seed_grads)``."""
        assert self.members is not None and 0 < len(member_args) <= self.members
        padded = list(member_args) + [member_args[0]] * (self.members - len(member_args))
        (loss, out), (g_host, g_seed) = self._grad_fn(*stack(*padded))
        results = jax.tree.map(np.asarray, (loss, out, g_host, g_seed))
        return [jax.tree.map(lambda a, m=m: a[m], results) for m in range(len(member_args))]

    def member_args(self, state, host_params=None, x=None, y=None, disabled=None):
        return self._args(state, host_params, x, y, disabled)

    def host_only(self, host_params=None, x=None, y=None):
        """``host_forward`` and its gradients: ``(loss, output, host_grads)``."""
        host_params = self.host_params if host_params is None else host_params
        x = self.x if x is None else x
        y = self.y if y is None else y
        (loss, out), g_host = self._host_fn(host_params, x, y)
        return loss, out, g_host

    @property
    def dormant(self):
        """``run`` on the fresh state (no seed anywhere), computed once."""
        if "dormant" not in self._cache:
            self._cache["dormant"] = self.run(self.state)
        return self._cache["dormant"]

    @property
    def reference(self):
        """``host_only`` on the fixed batch, computed once."""
        if "reference" not in self._cache:
            self._cache["reference"] = self.host_only()
        return self._cache["reference"]

    def manual(self, slot_id: str, blueprint: str) -> Callable:
        """A hand-written forward with one seed of ``blueprint`` at ``slot_id``, independent of
        :mod:`esper_jax.lattice.model` and :mod:`esper_jax.lattice.blending`, and its gradients:
        ``f(host_params, units, x, y, alpha, multiply, isolate) -> ((loss, out), (g_host, g_units))``
        with ``out = h + alpha*r`` (or ``h*(1 + alpha*tanh(r))`` when ``multiply``) and the seed
        reading ``h``, or at a parallel point the input ``u`` of the segment before it,
        through ``stop_gradient`` when ``isolate``."""
        cache_key = ("manual", slot_id, blueprint)
        if cache_key not in self._cache:
            host, bp = self.host, get_blueprint(self.host.topology, blueprint)

            def loss(host_params, units, x, y, alpha, multiply, isolate):
                h = host.stem(host_params, x)
                for index, point in enumerate(host.injection_points):
                    u = h
                    h = host.segment(host_params, index, h)
                    if point.slot_id == slot_id:
                        read = u if point.parallel else h
                        r = bp.apply(units, jnp.where(isolate, jax.lax.stop_gradient(read), read))
                        h = jnp.where(multiply, h * (1.0 + alpha * jnp.tanh(r)), h + alpha * r)
                out = host.head(host_params, h)
                return host.loss(out, y), out

            grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

            def run(host_params, units, x, y, alpha, multiply, isolate):
                return grad_fn(host_params, units, x, y, jnp.float32(alpha), jnp.bool_(multiply), jnp.bool_(isolate))

            self._cache[cache_key] = run
        return self._cache[cache_key]

    def lattice_fn(self, name: str) -> Callable:
        """A compiled lattice method (``advance``, ``tick``, ``record_measurements``...), built once."""
        cache_key = ("lattice", name)
        if cache_key not in self._cache:
            self._cache[cache_key] = jax.jit(getattr(self.model.lattice, name))
        return self._cache[cache_key]

    def units(self, params, slot_id: str) -> dict[str, Any]:
        """Named units (blueprint names and "gate") of one slot of ``state.params`` or of a
        gradient shaped like it."""
        return self._read(params, self.model.lattice.slots.index(slot_id))

    def with_units(self, state, slot_id: str, units: dict[str, Any]):
        return state.replace(params=self._write(state.params, self.model.lattice.slots.index(slot_id), units))

    def plant(self, state, slot_id: str, blueprint: str, stage: Stage, alpha: float = 0.0, style: str = "linear",
              seed: int | None = None, perturb: bool = True):
        """Germinate ``blueprint`` at ``slot_id`` through the lattice, then put it in ``stage``
        with ``alpha``; ``perturb`` makes its zero-initialized leaves non-zero."""
        lattice = self.model.lattice
        s = lattice.slots.index(slot_id)
        seed = 1000 + 17 * s + lattice.blueprint_index(blueprint) if seed is None else seed
        state, applied = self._germinate(
            state, jnp.int32(s), jnp.int32(lattice.blueprint_index(blueprint)),
            jnp.int32(blending.blend_style_index(style)), jnp.int32(0), key(seed),
        )
        assert bool(applied), f"germinating {blueprint} at {slot_id} was refused"
        state = strong(state)
        state = set_status(state, s, stage=int(stage), alpha=alpha)
        if perturb:
            units = self.units(state.params, slot_id)
            units[blueprint] = perturb_zero_leaves(units[blueprint], seed)
            state = self.with_units(state, slot_id, units)
        return state


def fresh_lattice_state(model: MorphogeneticModel):
    """A lattice state with every slot DORMANT: ``lifecycle.init_status`` and zeros shaped like
    ``lattice.init``'s parameters and optimizer state.

    Not ``lattice.init`` itself: compiling it (every blueprint's initializer for every slot)
    costs seconds, and it is redundant here, since germination re-initializes the planted
    blueprint and gate and parameters of other blueprints are never computed (``lattice.init``
    is tested in ``test_lattice.py``)."""
    template = jax.eval_shape(model.lattice.init, key(0))
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), template)
    return strong(zeros.replace(status=lifecycle.init_status(model.lattice.slots.num_slots)))


def _maybe_vmap(fun, members):
    return fun if members is None else jax.vmap(fun)


def _build_rig(name: str, host, x: jax.Array, y: jax.Array, slot_ids=None, seed: int = 0, members=None) -> Rig:
    # The lattice program even when every slot is dormant, so that "a live seed leaves the host
    # exactly as it was" can be checked bit for bit against the same program.
    # test_model.py::test_skipping_the_dormant_lattice_is_the_plain_host checks the default.
    model = MorphogeneticModel.build(host, slot_ids=slot_ids,
                                     strategy=dataclasses.replace(PopulationStrategy.for_backend(), skip_dormant=False))
    host_params = strong(jax.jit(host.init)(key(seed)))
    state = fresh_lattice_state(model)

    def model_loss(host_params, seed_params, state, x, y, disabled):
        out = model.apply(host_params, state.replace(params=seed_params), x, disabled)
        return host.loss(out, y), out

    def host_loss(host_params, x, y):
        out = host_forward(host, host_params, x)
        return host.loss(out, y), out

    return Rig(
        name=name, host=host, model=model, host_params=host_params, state=state, x=x, y=y,
        _grad_fn=jax.jit(_maybe_vmap(jax.value_and_grad(model_loss, argnums=(0, 1), has_aux=True), members)),
        members=members,
        _host_fn=jax.jit(jax.value_and_grad(host_loss, has_aux=True)),
        _germinate=jax.jit(model.lattice.germinate),
        _read=lambda params, s: _read_units(model, params, s),
        _write=lambda params, s, units: _write_units(model, params, s, units),
    )


CNN_BATCH = 4
# The CNN rig runs ``jax.vmap`` of the per-member forward and gradient over this many members:
# one compilation serves single-member tests (padded), the ``vmap(model.apply)`` check and the
# per-member references of the population tests. (The transformer rig runs plain ``model.apply``.)
CNN_MEMBERS = 7
CNN_SLOTS = ("r1c0",)  # after the second block: width 16, 4x4 maps for 8x8 inputs
TRANSFORMER_BATCH, TRANSFORMER_LENGTH = 2, 8
# Both kinds of transformer point: beside layer 0's attention (a parallel point, whose seed reads
# the stem's output, the stream entering the attention) and the stream after layer 1.
TRANSFORMER_SLOTS = ("r0c1", "r1c0")


@pytest.fixture(scope="session")
def cnn_host() -> CNNHost:
    return CNNHost.baseline(image_size=8)


@pytest.fixture(scope="session")
def transformer_host() -> TransformerHost:
    return TransformerHost(vocab_size=64, d_model=32, num_heads=2, num_layers=2, block_size=8)


@pytest.fixture(scope="session")
def cnn(cnn_host) -> Rig:
    x = to_device(np.random.default_rng(101).standard_normal(cnn_host.input_shape(CNN_BATCH)).astype(np.float32))
    y = to_device(np.arange(CNN_BATCH, dtype=np.int32) % cnn_host.num_classes)
    return _build_rig("cnn", cnn_host, x, y, slot_ids=CNN_SLOTS, members=CNN_MEMBERS)


@pytest.fixture(scope="session")
def transformer(transformer_host) -> Rig:
    shape = (TRANSFORMER_BATCH, TRANSFORMER_LENGTH + 1)
    tokens = to_device(np.random.default_rng(102).integers(0, transformer_host.vocab_size, shape).astype(np.int32))
    return _build_rig("transformer", transformer_host, tokens[:, :-1], tokens[:, 1:], slot_ids=TRANSFORMER_SLOTS)


@pytest.fixture(scope="session", params=["cnn", "transformer"])
def rig(request) -> Rig:
    return request.getfixturevalue(request.param)
