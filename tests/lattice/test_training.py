"""The training step of a population: running the members in turn inside one program
(``Execution.MAPPED``), batching them (``Execution.BATCHED``) and stepping each alone agree."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from esper_jax.lattice.hosts import CNNHost
from esper_jax.lattice.lifecycle import Stage
from esper_jax.lattice.strategy import Execution, PopulationStrategy
from esper_jax.lattice.model import MorphogeneticModel
from esper_jax.lattice.training import make_train_step
from tests.conftest import assert_trees_close, key, stack

MEMBERS = 3


@pytest.fixture(scope="module")
def setup():
    host = CNNHost(base_width=4, num_blocks=2, pool_blocks=1, image_size=8)
    model = MorphogeneticModel.build(host, slot_ids=("r0c0", "r1c0"), blueprints=("conv_light",),
                                     strategy=PopulationStrategy(Execution.MAPPED))
    mapped = make_train_step(model)
    batched = make_train_step(dataclasses.replace(model, strategy=PopulationStrategy(Execution.BATCHED)))
    states = [jax.jit(mapped.init)(key(i)) for i in range(MEMBERS)]
    # Member 1 grows a seed at r1c0 in TRAINING, member 2 one at r0c0; member 0 stays dormant.
    germinate = jax.jit(model.lattice.germinate)
    for member, slot in ((1, 1), (2, 0)):
        lattice, applied = germinate(states[member].lattice, slot, model.lattice.blueprint_index("conv_light"), 0, 0, key(9))
        assert bool(applied)
        stage = lattice.status.stage.at[slot].set(Stage.TRAINING)
        states[member] = states[member].replace(lattice=lattice.replace(status=lattice.status.replace(stage=stage)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((MEMBERS, 4, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 10, (MEMBERS, 4)).astype(np.int32)
    population = stack(*states)
    return dict(
        mapped=jax.jit(mapped.population_step)(population, x, y),
        batched=jax.jit(batched.population_step)(population, x, y),
        singles=[jax.jit(mapped.step)(s, x[i], y[i]) for i, s in enumerate(states)],
    )


def test_mapped_population_step_equals_batched(setup):
    assert_trees_close(setup["mapped"], setup["batched"], rtol=1e-5, atol=1e-6)


def test_mapped_population_step_equals_each_member_alone(setup):
    new_states, metrics = setup["mapped"]
    for i, (single_state, single_metrics) in enumerate(setup["singles"]):
        member = lambda tree: jax.tree.map(lambda a: a[i], tree)
        assert_trees_close(member(new_states), single_state, rtol=1e-5, atol=1e-6, err_msg=f"member {i}")
        assert_trees_close(member(metrics), single_metrics, rtol=1e-5, atol=1e-6, err_msg=f"member {i}")


def test_only_members_with_a_training_seed_get_seed_gradients(setup):
    _, metrics = setup["mapped"]
    norms = np.asarray(metrics.seed_grad_norm)
    assert norms.shape == (MEMBERS, 2)
    assert np.all(norms[0] == 0)
    assert norms[1, 1] > 0 and norms[1, 0] == 0
    assert norms[2, 0] > 0 and norms[2, 1] == 0
