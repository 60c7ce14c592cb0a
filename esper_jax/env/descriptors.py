"""What a controller that acts on any host sees of its choices: slots, blueprints and plans
described by features that mean the same on every host, not by their names or positions.

A controller whose heads are sized by the task (one logit per slot, per blueprint, per plan of a
menu) cannot even be loaded on another host. Described by what they are, the choices of a CIFAR
CNN and of a TinyStories transformer live in one feature space, and a policy that scores each
candidate from its features (:mod:`esper_jax.rl.scorer`) acts on any of them.

* **A slot** (:data:`SLOT_FEATURES`): where it is in the host (its injection point's position among
  all of the host's, 0 at the first and 1 at the last), how wide the activation there is (relative
  to the host's widest), and what a seed there does to the host (1: it runs beside a segment and
  widens it; 0: its residual is a new stage in depth, :class:`~esper_jax.lattice.slots.SlotSpec`).
* **A seed** (:data:`SEED_FEATURES`): its blueprint's role (one-hot over
  :data:`~esper_jax.lattice.blueprints.registry.ROLES`), what it costs relative to the host (its
  parameters over the host's, its FLOPs on a training batch over the host's, each as ``log1p``), its
  slot's features, and when it is planted (its epoch over the episode's).
* **A plan** (:data:`PLAN_FEATURES`): the number of its seeds and the sum of their features; ``static``
  is all zeros. Sums, not a list: a plan of any length has the same size of description, and the
  order of its seeds does not matter.

The features come from the env's static configuration (host, slots, blueprints, episode) and FLOPs
counted from shapes (:mod:`esper_jax.lattice.flops`), so they are NumPy arrays built once, before
anything is traced.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from esper_jax.env.controllers import Schedule
from esper_jax.env.environment import MorphogeneticEnv
from esper_jax.lattice.blueprints import get_blueprint
from esper_jax.lattice.blueprints.registry import ROLES

SLOT_FEATURES = ("slot_depth", "slot_width", "slot_parallel")
SEED_FEATURES = (*(f"role_{role}" for role in ROLES), "param_cost", "compute_cost", *SLOT_FEATURES, "start")
PLAN_FEATURES = ("seeds", *SEED_FEATURES)


def slot_features(env: MorphogeneticEnv) -> dict[str, np.ndarray]:
    """:data:`SLOT_FEATURES` of each of the env's slots, by slot id."""
    points = env.model.host.injection_points
    widest = max(point.dim for point in points)
    last = max(len(points) - 1, 1)
    position = {point.slot_id: i for i, point in enumerate(points)}
    return {spec.slot_id: np.asarray([position[spec.slot_id] / last, spec.dim / widest, float(spec.parallel)])
            for spec in env.lattice.slots.slots}


def seed_features(env: MorphogeneticEnv, seed: Schedule) -> np.ndarray:
    """:data:`SEED_FEATURES` of one seed of a plan (its slot and blueprint must be the env's)."""
    slots = env.lattice.slots.slot_ids
    blueprints = tuple(bp.name for bp in env.lattice.blueprints)
    if seed.slot not in slots or seed.blueprint not in blueprints:
        raise ValueError(f"seed {seed.name} is not one of this env's: slots {', '.join(slots)}, "
                         f"blueprints {', '.join(blueprints)}")
    topology = env.model.host.topology
    blueprint = get_blueprint(topology, seed.blueprint)
    s, b = slots.index(seed.slot), blueprints.index(seed.blueprint)
    dim = env.lattice.slots.slots[s].dim
    costs = env.training_costs()
    role = np.asarray([float(blueprint.role == r) for r in ROLES])
    cost = np.log1p([blueprint.num_params(dim) / env.host_param_count, costs.seed_train[s, b] / costs.host_train])
    start = np.asarray([seed.epoch / env.episode_epochs])
    return np.concatenate([role, cost, slot_features(env)[seed.slot], start])


def plan_features(env: MorphogeneticEnv, plans: Sequence[Sequence[Schedule]]) -> np.ndarray:
    """``[M, len(PLAN_FEATURES)]`` float32: each plan's number of seeds and their summed features."""
    rows = [np.concatenate([[len(plan)], sum((seed_features(env, seed) for seed in plan),
                                             np.zeros(len(SEED_FEATURES)))]) for plan in plans]
    return np.asarray(rows, np.float32).reshape(len(plans), len(PLAN_FEATURES))
