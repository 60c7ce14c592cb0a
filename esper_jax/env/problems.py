"""Inner problems: the family each env draws its training problem from, and what a drawn
problem changes in what the env trains on.

With a single problem, one fixed schedule ("plant X in slot Y at epoch 0") is best for every env
and a controller's observations cannot matter. A :class:`ProblemFamily` (static, hashable) gives
ranges; at reset every env draws its own :class:`Problem` (a pytree of arrays) from its reset
key, folded with :data:`PROBLEM_STREAM`, so that every controller evaluated on an env faces the
same problem, and the key the host is initialized with is the one it was before families
existed. Two dimensions, each a real reason to grow more or less:

* ``train_fraction``: the env trains on the first ``ceil(f * N)`` of the ``N`` training examples
  (a language model: tokens), ``f`` log-uniform in the range. A small set is memorized by
  capacity that a large one needs.
* ``label_noise``: a fraction ``p``, uniform in the range, of the training targets is replaced by
  a uniformly drawn class (token), fixed per example (per token position) for the whole episode:
  a noisy dataset, not noisy batches. Validation stays clean: an env is judged on the truth.

A family whose ranges are single points at 1 and 0 (the default) is *trivial*: the env's program
then contains none of this and computes exactly what it did before families existed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

PROBLEM_STREAM = 0x50524F42  # "PROB": folded into an env's reset key to draw its problem
Range = tuple[float, float]


def parse_range(flag: str, value, low: float, high: float, low_open: bool = False) -> Range:
    """``"a:b"`` (or one number ``"a"``, or a pair) as a range within ``[low, high]``; ValueError
    naming ``flag`` otherwise."""
    try:
        parts = value.split(":") if isinstance(value, str) else list(value) if isinstance(value, (tuple, list)) else [value]
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) == 1:
        numbers = numbers * 2
    lower_ok = (lambda a: a > low) if low_open else (lambda a: a >= low)
    if (len(numbers) != 2 or not all(math.isfinite(v) for v in numbers) or not numbers[0] <= numbers[1]
            or not lower_ok(numbers[0]) or numbers[1] > high):
        bound = "(" if low_open else "["
        raise ValueError(f"--{flag} must be a number or a range LOW:HIGH within {bound}{low:g}, {high:g}], got {value!r}")
    return numbers


@dataclasses.dataclass(frozen=True)
class ProblemFamily:
    """The ranges each env's problem is drawn from (module docstring)."""

    train_fraction: Range = (1.0, 1.0)   # log-uniform
    label_noise: Range = (0.0, 0.0)      # uniform
    # The smallest fraction the observed ``train_set_size`` is measured against (:func:`problem_size`);
    # None: the range's own lower end. A controller evaluated on a stratum it never trained on (a range
    # outside its training family's) keeps its training family's, so the feature means what it meant
    # in training, and the controller observes the set's size even where the stratum is the whole set.
    size_scale: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "train_fraction", parse_range("train-fraction", self.train_fraction, 0.0, 1.0, True))
        object.__setattr__(self, "label_noise", parse_range("label-noise", self.label_noise, 0.0, 1.0))
        if self.size_scale is not None and not 0.0 < self.size_scale < 1.0:
            raise ValueError(f"size_scale must be a fraction in (0, 1), the training family's smallest; "
                             f"got {self.size_scale!r}")

    @property
    def subsets(self) -> bool:
        """Whether any env trains on less than the whole training set."""
        return self.train_fraction != (1.0, 1.0)

    @property
    def observes_size(self) -> bool:
        """Whether the controller observes the training set's size (``train_set_size``)."""
        return self.subsets or self.size_scale is not None

    @property
    def noisy(self) -> bool:
        return self.label_noise[1] > 0.0

    @property
    def trivial(self) -> bool:
        return not (self.observes_size or self.noisy)

    def stratum(self, train_fraction=None, label_noise=None) -> "ProblemFamily":
        """Another range of this family's problems (``None``: this family's range), observed as a
        controller trained on this family observes them: for evaluating it on a stratum it never
        trained on. ValueError, naming the flag, where the controller could not observe it so."""
        if train_fraction is not None and not self.observes_size:
            raise ValueError("--train-fraction: this run trained on the whole training set, so its controller does "
                             "not observe the set's size; evaluate strata of runs trained with a --train-fraction range")
        # the scale the controller learned on: this family's own, kept through a stratum of a stratum
        scale = self.size_scale if self.size_scale is not None else self.train_fraction[0] if self.subsets else None
        return ProblemFamily(self.train_fraction if train_fraction is None else train_fraction,
                             self.label_noise if label_noise is None else label_noise, size_scale=scale)

    def describe(self) -> str:
        if self.trivial:
            return "one problem (the whole training set, clean labels)"
        f, p = self.train_fraction, self.label_noise
        scale = "" if self.size_scale is None else f"; the set's size observed on the scale of a smallest {self.size_scale:g}"
        return (f"problems drawn per env: training fraction {f[0]:g}..{f[1]:g} (log-uniform), "
                f"label noise {p[0]:g}..{p[1]:g} (uniform){scale}")


@struct.dataclass
class Problem:
    """One env's drawn problem."""

    train_fraction: jax.Array  # float32: the fraction of the training set it trains on
    label_noise: jax.Array     # float32: the fraction of its training targets replaced
    # which targets are replaced, and by what: the uint32 seed of the key that decides it (a number,
    # not a typed key, so that the state stays plain arrays for NumPy, checkpoints and slicing)
    noise_seed: jax.Array


def draw_problem(family: ProblemFamily, reset_key: jax.Array) -> Problem:
    """The problem of the env reset with ``reset_key``."""
    k_fraction, k_noise, k_seed = jax.random.split(jax.random.fold_in(reset_key, PROBLEM_STREAM), 3)
    (f_lo, f_hi), (p_lo, p_hi) = family.train_fraction, family.label_noise
    log_fraction = jax.random.uniform(k_fraction, (), jnp.float32, math.log(f_lo), math.log(f_hi))
    return Problem(train_fraction=jnp.exp(log_fraction) if f_lo < f_hi else jnp.float32(f_lo),
                   label_noise=jax.random.uniform(k_noise, (), jnp.float32, p_lo, p_hi) if p_lo < p_hi
                   else jnp.float32(p_lo),
                   noise_seed=jax.random.bits(k_seed, (), jnp.uint32))


def train_count(problem: Problem, total: int, minimum: int = 1) -> jax.Array:
    """How many of the ``total`` training examples (tokens) the problem trains on: at least
    ``minimum`` (a language model needs one window and its next token)."""
    count = jnp.ceil(problem.train_fraction * total).astype(jnp.int32)
    return jnp.clip(count, min(minimum, total), total)


def problem_size(family: ProblemFamily, problem: Problem) -> jax.Array:
    """The problem's training-set size as the controller sees it: ``log f / log f_min`` (0 for the
    whole set, 1 for the family's smallest, ``f_min`` its ``size_scale`` when given, above 1 for sets
    smaller still; 0 where the family draws no subsets)."""
    smallest = family.train_fraction[0] if family.size_scale is None else family.size_scale
    if smallest >= 1.0:
        return jnp.zeros_like(problem.train_fraction)
    return jnp.log(problem.train_fraction) / math.log(smallest)


def noisy_targets(problem: Problem, ids: jax.Array, targets: jax.Array, num_classes: int) -> jax.Array:
    """``targets`` with the problem's noisy ones replaced; ``ids`` (same shape) name each target
    (its example's index, or its token's position), so that a target is replaced, and by what,
    the same way in every batch that holds it."""
    def one(i, y):
        k_flip, k_class = jax.random.split(jax.random.fold_in(jax.random.key(problem.noise_seed), i))
        flipped = jax.random.uniform(k_flip) < problem.label_noise
        return jnp.where(flipped, jax.random.randint(k_class, (), 0, num_classes, y.dtype), y)

    return jax.vmap(one)(ids.reshape(-1), targets.reshape(-1)).reshape(targets.shape)
