"""The PyTorch reference of the benchmark suite (experiments/bench/torch_reference.py): it trains
exactly as our step does, so the ``torch_reference_ratio`` compares the same work; and without
torch the section says how to install it instead of failing.

Equivalence is judged on the parameter *updates*: after three steps from the same weights on
the same batches, ``|Δtorch - Δours| / |Δours|`` over the host and over the seed. float32
rounding leaves ~1e-6; each mistake the reference could make (no weight decay, another
momentum, no clipping, a seed gradient leaking into the host) moves it past 4e-3, and
``test_the_comparison_catches_each_mistake`` keeps that true.
"""

from __future__ import annotations

import dataclasses
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from esper_jax.lattice.hosts import CNNHost
from esper_jax.lattice.model import MorphogeneticModel
from esper_jax.lattice.training import make_train_step
from experiments.bench import torch_reference as reference
from experiments.bench.host import LIVE_BLUEPRINT, LIVE_SLOT, with_live_seed
from tests.conftest import key

TORCH_MISSING = reference.NOT_INSTALLED  # the skip says how to install it
STEPS, BATCH = 3, 4
LOSS_RTOL = 1e-4
UPDATE_RTOL = 1e-4  # on |Δtorch - Δours| / |Δours|; see the module docstring


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason=TORCH_MISSING)


@dataclasses.dataclass
class Trajectory:
    """Parameters before and after STEPS training steps (JAX layout, NumPy) and the losses."""

    host_before: dict
    seed_before: dict
    host_after: dict
    seed_after: dict
    losses: list[float]


@dataclasses.dataclass
class Ours:
    model: MorphogeneticModel
    step: object  # jitted make_train_step(model).step
    state: object  # one member, a fresh conv_light seed in TRAINING at r1c0
    xs: np.ndarray  # [STEPS, BATCH, 32, 32, 3]
    ys: np.ndarray  # [STEPS, BATCH]

    def seed_units(self, state) -> dict:
        return jax.tree.map(np.array, dict(self.model.lattice.unit_params(state.lattice, LIVE_SLOT)))

    def seed_of(self, state) -> dict:
        return self.seed_units(state)[LIVE_BLUEPRINT]

    def train(self, state) -> Trajectory:
        start = state
        losses = []
        for x, y in zip(self.xs, self.ys):
            state, metrics = self.step(state, jax.device_put(x), jax.device_put(y))
            losses.append(float(metrics.loss))
        return Trajectory(jax.tree.map(np.array, start.host_params), self.seed_of(start),
                          jax.tree.map(np.array, state.host_params), self.seed_of(state), losses)


@pytest.fixture(scope="module")
def ours() -> Ours:
    # The bench's model (three slots, the seed at r1c0), restricted to conv_light to compile less.
    model = MorphogeneticModel.build(CNNHost.baseline(), blueprints=(LIVE_BLUEPRINT,))
    train = make_train_step(model)
    state = with_live_seed(model, jax.jit(train.init)(key(0)), LIVE_SLOT, LIVE_BLUEPRINT, key(7))
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((STEPS,) + model.host.input_shape(BATCH)).astype(np.float32)
    ys = rng.integers(0, model.host.num_classes, (STEPS, BATCH)).astype(np.int32)
    return Ours(model, jax.jit(train.step), state, xs, ys)


def with_perturbed_seed(ours: Ours, state):
    """The seed's zero-initialized scale made non-zero: the seed then changes what it computes
    from the first step, so a seed gradient leaking into the host would show at once."""
    units = ours.seed_units(state)
    units[LIVE_BLUEPRINT]["scale"] = (0.5 * np.random.default_rng(1).standard_normal(units[LIVE_BLUEPRINT]["scale"].shape)
                                      ).astype(np.float32)
    return state.replace(lattice=ours.model.lattice.with_unit_params(state.lattice, LIVE_SLOT, units))


@pytest.fixture(scope="module")
def perturbed_trajectory(ours) -> Trajectory:
    return ours.train(with_perturbed_seed(ours, ours.state))


@pytest.fixture(scope="module", params=["fresh seed", "perturbed seed"])
def trajectory(request, ours) -> Trajectory:
    if request.param == "fresh seed":  # as the benchmark germinates it
        return ours.train(ours.state)
    return request.getfixturevalue("perturbed_trajectory")


def train_reference(ours: Ours, start: Trajectory, settings=reference.OptimizerSettings(), split_pool_ties=True,
                    model_class=None) -> Trajectory:
    """The PyTorch reference from ``start``'s weights over the same batches."""
    env = reference.ReferenceEnv(ours.model.host, reference.seed_block_of(ours.model, LIVE_SLOT), settings,
                                 split_pool_ties=split_pool_ties, model_class=model_class)
    reference.load_jax_weights(env.model, start.host_before, start.seed_before)
    losses = [float(env.train_step(reference.images_to_torch(x), reference.labels_to_torch(y)))
              for x, y in zip(ours.xs, ours.ys)]
    return Trajectory(start.host_before, start.seed_before, reference.host_params_as_jax_layout(env.model),
                      reference.seed_params_as_jax_layout(env.model), losses)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)])


def update_errors(ours: Trajectory, theirs: Trajectory) -> dict[str, float]:
    """``|Δtheirs - Δours| / |Δours|`` for the host and for the seed, and the largest relative
    difference of the losses."""
    def relative(before, after_ours, after_theirs):
        step = _flat(after_ours) - _flat(before)
        return float(np.linalg.norm(_flat(after_theirs) - _flat(after_ours)) / np.linalg.norm(step))

    losses = np.abs(np.asarray(theirs.losses) - ours.losses) / np.abs(ours.losses)
    return {"host": relative(ours.host_before, ours.host_after, theirs.host_after),
            "seed": relative(ours.seed_before, ours.seed_after, theirs.seed_after),
            "loss": float(losses.max())}


def matches(errors: dict[str, float]) -> bool:
    return errors["host"] <= UPDATE_RTOL and errors["seed"] <= UPDATE_RTOL and errors["loss"] <= LOSS_RTOL


# ---------------------------------------------------------------------------- without torch


def test_without_torch_the_section_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    assert reference.torch_available() is False
    assert reference.torch_version() is None
    args = SimpleNamespace(rounds=1, calls=1, blueprints=(LIVE_BLUEPRINT,), reference_envs=2, reference_batches=1,
                           reference_batch=4)
    result = reference.bench_torch_reference(args)
    assert result == {"available": False, "reason": reference.NOT_INSTALLED}
    assert "pip install -e '.[bench]'" in result["reason"] and "torch==2.13.0" in result["reason"]


# ---------------------------------------------------------------------------- with torch


def test_weights_copy_both_ways_exactly(torch, ours):
    host = jax.tree.map(np.array, ours.state.host_params)
    seed = ours.seed_of(ours.state)
    model = reference.reference_cnn_class()(ours.model.host, reference.seed_block_of(ours.model, LIVE_SLOT))
    reference.load_jax_weights(model, host, seed)
    jax.tree.map(np.testing.assert_array_equal, reference.host_params_as_jax_layout(model), host)
    jax.tree.map(np.testing.assert_array_equal, reference.seed_params_as_jax_layout(model), seed)


def test_reference_trains_like_ours(torch, ours, trajectory):
    theirs = train_reference(ours, trajectory)
    errors = update_errors(trajectory, theirs)
    np.testing.assert_allclose(theirs.losses, trajectory.losses, rtol=LOSS_RTOL)
    assert errors["host"] <= UPDATE_RTOL, errors
    assert errors["seed"] <= UPDATE_RTOL, errors
    # The seed learned, on both sides (a fresh seed's scale starts at zero).
    assert np.linalg.norm(_flat(trajectory.seed_after) - _flat(trajectory.seed_before)) > 1e-3
    assert np.linalg.norm(_flat(theirs.seed_after) - _flat(theirs.seed_before)) > 1e-3


def test_a_training_seed_leaves_the_forward_unchanged(torch, ours, perturbed_trajectory):
    model = reference.reference_cnn_class()(ours.model.host, reference.seed_block_of(ours.model, LIVE_SLOT))
    reference.load_jax_weights(model, perturbed_trajectory.host_before, perturbed_trajectory.seed_before)
    x = reference.images_to_torch(ours.xs[0])
    with torch.no_grad():
        h = torch.from_numpy(np.random.default_rng(2).standard_normal((BATCH, model.seed.conv.in_channels, 16, 16))
                             .astype(np.float32))
        assert model.seed(h).abs().max() > 0.1  # the seed computes something
        np.testing.assert_array_equal(model(x, with_seed=True).numpy(), model(x, with_seed=False).numpy())


MISTAKES = {
    "no weight decay": dict(settings=reference.OptimizerSettings(weight_decay=0.0)),
    "momentum 0.8": dict(settings=reference.OptimizerSettings(momentum=0.8)),
    "no gradient clipping": dict(settings=reference.OptimizerSettings(max_grad_norm=1e9)),
    "seed gradient leaks into the host": dict(leak=True),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_the_comparison_catches_each_mistake(torch, ours, perturbed_trajectory, mistake):
    options = dict(MISTAKES[mistake])
    model_class = None
    if options.pop("leak", False):
        class LeakyReferenceCNN(reference.reference_cnn_class()):
            def join_seed(self, h):
                r = self.seed(h)  # reads h itself, not h.detach()
                return h + (r - r.detach())

        model_class = LeakyReferenceCNN
    errors = update_errors(perturbed_trajectory, train_reference(ours, perturbed_trajectory, model_class=model_class,
                                                                 **options))
    assert not matches(errors), f"{mistake} went unnoticed: {errors}"


def test_max_pool2d_differs_from_ours_only_in_the_seeds_tied_gradients(torch, ours, perturbed_trajectory):
    """The timed reference pools with F.max_pool2d, which sends a tied window's gradient to one
    element where JAX shares it; only the seed (reading the gradient at ReLU zeros) sees it."""
    errors = update_errors(perturbed_trajectory, train_reference(ours, perturbed_trajectory, split_pool_ties=False))
    assert errors["host"] <= UPDATE_RTOL and errors["loss"] <= LOSS_RTOL, errors
    assert errors["seed"] > UPDATE_RTOL, errors


def test_bench_section_smoke(torch):
    args = SimpleNamespace(rounds=1, calls=1, blueprints=(LIVE_BLUEPRINT,), reference_envs=2, reference_batches=1,
                           reference_batch=4)
    result = reference.bench_torch_reference(args)
    assert result["available"] is True
    assert result["torch_version"] == torch.__version__
    assert result["torch_threads"] == torch.get_num_threads() >= 1
    assert (result["envs"], result["batches"], result["batch"]) == (2, 1, 4)
    assert set(result["seconds"]) == set(result["seconds_per_env_batch"]) == {"ours", "torch"}
    for name, seconds in result["seconds"].items():
        assert seconds > 0
        assert result["seconds_per_env_batch"][name] == pytest.approx(seconds / 2)
    assert result["torch_reference_ratio"] == pytest.approx(result["seconds"]["torch"] / result["seconds"]["ours"])
    assert result["torch_reference_ratio"] > 0
