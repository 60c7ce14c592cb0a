"""A user's own Flax network as a host: :class:`FlaxHost` turns ``flax.linen`` modules, a stem,
segments and a head, into the :class:`~esper_jax.lattice.hosts.base.Host` that the lattice,
the environment and the controllers grow, with one injection point after every segment.
:func:`import_host` makes one from an import path, ``module:function``: how ``--host`` names it,
and how a run records it in ``config.json`` and rebuilds it (a module is code, not data).

Owns: the modules' parameters (each module's ``params`` collection under ``stem``,
``segment{i}`` and ``head``), the activation shapes at the points (``jax.eval_shape`` of the
chain: nothing is computed), the checks that the modules form a host, and the import path's
one-line errors (:class:`HostImportError`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from esper_jax.lattice.slots import TOPOLOGIES, SlotSpec, Topology, format_slot_id

InputDtype = Literal["float32", "int32"]
INPUT_DTYPES: tuple[InputDtype, ...] = ("float32", "int32")
# The rank of an activation at an injection point, by topology: what the blueprints read.
ACTIVATION_RANK: dict[Topology, int] = {"cnn": 4, "transformer": 3}  # NHWC; [B, T, D]
ACTIVATION_LAYOUT: dict[Topology, str] = {"cnn": "[batch, height, width, channels]", "transformer": "[batch, T, D]"}
RETURNS = "return a FlaxHost, or (stem, segments, head): flax.linen modules (stem may be None)"


class HostImportError(ValueError):
    """An import path that gives no host; the message is one line."""


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


@dataclasses.dataclass(frozen=True)
class _Trace:
    """Each module's parameter shapes and output shape for one example (batch 1)."""

    names: tuple[str, ...]
    inputs: tuple[jax.ShapeDtypeStruct, ...]
    outputs: tuple[jax.ShapeDtypeStruct, ...]
    params: tuple[dict, ...]


def _trace(modules: tuple[tuple[str, nn.Module], ...], example_shape: tuple[int, ...], dtype: str,
           topology: Topology | None = None) -> _Trace:
    """``jax.eval_shape`` of each module's ``init_with_output`` along the chain; ValueError (one
    line) naming the module that does not take its input, keeps state besides ``params``, or
    (given a ``topology``) is a segment whose output is not that topology's activation."""
    x = jax.ShapeDtypeStruct((1, *example_shape), jnp.dtype(dtype))
    inputs, outputs, params = [], [], []
    for name, module in modules:
        try:
            # the key is made inside: the whole initialization is abstract, nothing runs or compiles
            out, variables = jax.eval_shape(lambda a, m=module: m.init_with_output(jax.random.key(0), a), x)
        except Exception as error:  # the user's code: whatever it raises is said in one line
            raise ValueError(f"the {name} ({type(module).__name__}) does not take a {list(x.shape)} "
                             f"{x.dtype} input: {_one_line(error)}") from None
        other = sorted(set(variables) - {"params"})
        if other:  # a host's forward is a pure function of trained parameters: no mutable state
            raise ValueError(f"the {name} ({type(module).__name__}) keeps variables besides params "
                             f"({', '.join(other)}): a host's modules must be stateless (LayerNorm or GroupNorm, not "
                             f"BatchNorm; no dropout)")
        if not isinstance(out, jax.ShapeDtypeStruct):
            raise ValueError(f"the {name} ({type(module).__name__}) returns {type(out).__name__}, not one array")
        if topology is not None and name.startswith("segment") and (
                out.ndim != ACTIVATION_RANK[topology] or not jnp.issubdtype(out.dtype, jnp.floating)):
            raise ValueError(f"{name} outputs {out.dtype}{list(out.shape)} for one example; a {topology} host's "
                             f"activations are float {ACTIVATION_LAYOUT[topology]}")
        inputs.append(x)
        outputs.append(out)
        params.append(dict(variables.get("params", {})))
        x = out
    return _Trace(tuple(n for n, _ in modules), tuple(inputs), tuple(outputs), tuple(params))


def _check_modules(modules: tuple[tuple[str, nn.Module], ...]) -> None:
    for name, module in modules:
        if not isinstance(module, nn.Module):
            raise ValueError(f"the {name} must be a flax.linen Module, got {type(module).__name__}")
        try:
            hash(module)
        except TypeError:
            raise ValueError(f"the {name} ({type(module).__name__}) is not hashable: give its attributes as tuples, "
                             f"not lists or dicts (e.g. nn.Sequential((...)))") from None


def _named(stem: nn.Module | None, segments: tuple[nn.Module, ...], head: nn.Module) -> tuple[tuple[str, nn.Module], ...]:
    return ((("stem", stem),) if stem is not None else ()) + tuple(
        (f"segment{i}", m) for i, m in enumerate(segments)) + (("head", head),)


@dataclasses.dataclass(frozen=True)
class FlaxHost:
    """A host made of ``flax.linen`` modules: ``head(segment_{n-1}(... segment_0(stem(x))))``.

    Injection point ``r{i}c0`` sits after ``segment_modules[i]``; its width is the activation's
    last axis. ``topology`` says what the activations are and so which blueprints grow there:
    ``"cnn"``, images ``[B, H, W, C]`` (the CNN blueprints); ``"transformer"``, sequences
    ``[B, T, D]`` (the transformer blueprints). ``stem_module`` (optional) maps the raw input to
    the first activation, e.g. image patches to tokens. ``example_shape`` is one input's shape
    without the batch axis (an image's ``(H, W, C)``). The loss is softmax cross-entropy with
    integer labels, the mean over the batch. Modules must be stateless (only ``params``) and
    hashable (tuples, not lists, in their attributes), as a host is static configuration that
    ``jit`` closes over. ``source`` is the import path the host came from
    (:func:`import_host`); a run needs it to write the host into ``config.json``.
    """

    stem_module: nn.Module | None
    segment_modules: tuple[nn.Module, ...]
    head_module: nn.Module
    example_shape: tuple[int, ...]
    topology: Topology = "cnn"
    input_dtype: InputDtype = "float32"
    source: str | None = None

    def __post_init__(self):
        segments = self.segment_modules
        if isinstance(segments, nn.Module) or not isinstance(segments, (tuple, list)) or not segments:
            raise ValueError("segment_modules must be a non-empty tuple (or list) of flax.linen modules, one per "
                             "injection point")
        object.__setattr__(self, "segment_modules", tuple(segments))  # a list is not hashable
        if isinstance(self.example_shape, (tuple, list)):
            object.__setattr__(self, "example_shape", tuple(self.example_shape))
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {self.topology!r}; expected one of {', '.join(TOPOLOGIES)}")
        if self.input_dtype not in INPUT_DTYPES:
            raise ValueError(f"input_dtype must be one of {', '.join(INPUT_DTYPES)}, got {self.input_dtype!r}")
        if not isinstance(self.example_shape, tuple) or not self.example_shape or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                             for n in self.example_shape):
            raise ValueError(f"example_shape must be one input's shape without the batch axis, positive integers "
                             f"(e.g. (32, 32, 3)), got {self.example_shape!r}")
        _check_modules(self._modules)
        self._trace  # every check that needs shapes, once, before the host is used

    @property
    def _modules(self) -> tuple[tuple[str, nn.Module], ...]:
        return _named(self.stem_module, self.segment_modules, self.head_module)

    @functools.cached_property
    def _trace(self) -> _Trace:
        # Cached on the instance (not a dataclass field: equality and hashing ignore it).
        return _trace(self._modules, self.example_shape, self.input_dtype, self.topology)

    @property
    def _segment_outputs(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        return self._trace.outputs[len(self._trace.outputs) - len(self.segment_modules) - 1:-1]

    # ------------------------------------------------------------------ the Host protocol

    @property
    def injection_points(self) -> tuple[SlotSpec, ...]:
        return tuple(SlotSpec(format_slot_id(i, 0), out.shape[-1], self.topology)
                     for i, out in enumerate(self._segment_outputs))

    @property
    def default_slots(self) -> tuple[str, ...]:
        """Every point: the user chose where the segments end."""
        return tuple(p.slot_id for p in self.injection_points)

    def init(self, key: jax.Array) -> dict:
        trace = self._trace
        keys = jax.random.split(key, len(trace.names))
        params = {}
        for (name, module), k, x in zip(self._modules, keys, trace.inputs):
            # Parameters do not depend on the batch: one example of the module's input shape.
            params[name] = dict(module.init(k, jnp.zeros(x.shape, x.dtype)).get("params", {}))
        return params

    def stem(self, params: dict, x: jax.Array) -> jax.Array:
        if self.stem_module is None:
            return x
        return self.stem_module.apply({"params": params["stem"]}, x)

    def segment(self, params: dict, index: int, h: jax.Array) -> jax.Array:
        return self.segment_modules[index].apply({"params": params[f"segment{index}"]}, h)

    def head(self, params: dict, h: jax.Array) -> jax.Array:
        return self.head_module.apply({"params": params["head"]}, h)

    def loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    # ------------------------------------------------------------------ what a run reads

    def input_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.example_shape)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The head's output for one example, without the batch axis (``(classes,)`` for a classifier)."""
        return tuple(self._trace.outputs[-1].shape[1:])

    @property
    def num_classes(self) -> int:
        return self.output_shape[-1] if self.output_shape else 1

    @property
    def image_size(self) -> int:
        """The side of the square images the host takes (``ValueError`` if it takes none)."""
        return self._image[0]

    @property
    def in_channels(self) -> int:
        return self._image[1]

    @property
    def _image(self) -> tuple[int, int]:
        shape = self.example_shape
        if len(shape) != 3 or shape[0] != shape[1] or self.input_dtype != "float32":
            raise ValueError(f"this host takes {self.input_dtype}{list(shape)} inputs, not square images "
                             f"[size, size, channels]")
        return shape[0], shape[2]

    @property
    def parameter_digest(self) -> str:
        """A digest of every parameter's path and shape: the same network gives the same digest,
        so a run can tell that the code at its import path still builds the host it trained."""
        layout = ";".join(f"{name}{jax.tree_util.keystr(path)}:{leaf.dtype}{list(leaf.shape)}"
                          for name, tree in zip(self._trace.names, self._trace.params)
                          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0])
        return hashlib.sha256(layout.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line: where it came from, its input and the widths at its points."""
        dims = ", ".join(f"{p.slot_id} {p.dim}" for p in self.injection_points)
        return (f"{self.source or 'a FlaxHost'}: {len(self.segment_modules)} segments on "
                f"{list(self.example_shape)} inputs, points {dims}, {self.num_classes} outputs")


def infer_topology(stem: nn.Module | None, segments, example_shape: tuple[int, ...],
                   input_dtype: InputDtype = "float32") -> Topology:
    """The topology whose activations the first segment gives: rank 4 ``cnn``, rank 3 ``transformer``."""
    if not isinstance(segments, (tuple, list)) or not segments:
        raise ValueError("segments must be a non-empty tuple (or list) of flax.linen modules")
    modules = ((("stem", stem),) if stem is not None else ()) + (("segment0", segments[0]),)
    _check_modules(modules)
    rank = _trace(modules, tuple(example_shape), input_dtype).outputs[-1].ndim
    for topology, expected in ACTIVATION_RANK.items():
        if rank == expected:
            return topology
    raise ValueError(f"segment 0 outputs a rank-{rank} activation; a host's activations are images "
                     f"{ACTIVATION_LAYOUT['cnn']} or sequences {ACTIVATION_LAYOUT['transformer']}")


def import_host(path: str, example_shape: tuple[int, ...] | None = None) -> FlaxHost:
    """The host that ``module:function`` returns, with ``source=path``. The function takes no
    arguments and returns a :class:`FlaxHost`, or ``(stem, segments, head)`` modules, whose input
    is then ``example_shape`` (the data's) and whose topology the activations' rank says.
    :class:`HostImportError` (one line) when the path does not import or gives no host."""
    module_name, colon, attribute = str(path).partition(":")
    if not colon or not module_name.strip() or not attribute.strip():
        raise HostImportError(f"--host {path}: give MODULE:FUNCTION, e.g. --host examples.my_host:make_host")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise HostImportError(f"--host {path}: there is no module {missing} to import (a module is found from the "
                                  f"current directory or PYTHONPATH)") from None
        raise HostImportError(f"--host {path}: importing {module_name} failed: {_one_line(error)}") from None
    except Exception as error:  # the user's module raised while importing
        raise HostImportError(f"--host {path}: importing {module_name} failed: {_one_line(error)}") from None
    factory = getattr(module, attribute, None)
    if factory is None:
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise HostImportError(f"--host {path}: {module_name} has no {attribute}"
                              + (f" (it defines: {', '.join(defined)})" if defined else ""))
    if not callable(factory):
        raise HostImportError(f"--host {path}: {attribute} is a {type(factory).__name__}, not a function; {RETURNS}")
    try:
        made = factory()
    except Exception as error:  # the user's function raised
        raise HostImportError(f"--host {path}: {attribute}() failed: {_one_line(error)}") from None
    try:
        if isinstance(made, FlaxHost):
            host = made
        elif isinstance(made, (tuple, list)) and len(made) == 3:
            stem, segments, head = made
            if example_shape is None:
                raise HostImportError(f"--host {path}: it returns (stem, segments, head), whose input shape comes from "
                                      f"the data, and none was given")
            topology = infer_topology(stem, segments, tuple(example_shape))
            host = FlaxHost(stem, segments, head, tuple(example_shape), topology)
        else:
            raise HostImportError(f"--host {path}: {attribute}() returned {type(made).__name__}, not a host; {RETURNS}")
    except HostImportError:
        raise
    except ValueError as error:
        raise HostImportError(f"--host {path}: {' '.join(str(error).split())}") from None
    return dataclasses.replace(host, source=str(path))
