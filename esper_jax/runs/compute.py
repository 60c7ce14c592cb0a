"""Training compute of an episode, in floating-point operations: what a controller's growth cost.

Counted from the episode's timelines with the per-batch costs of :mod:`esper_jax.lattice.flops`
(deterministic, the same on every machine), per env:

* **train**: every epoch, ``steps_per_epoch`` batches through the host (forward and backward)
  plus, for every slot whose seed was *computed* while that epoch trained (TRAINING, BLENDING,
  HOLDING, FOSSILIZED: the stage after the epoch's action, before its lifecycle tick), that
  seed's forward and backward on the slot's activation;
* **validation**: the validation set's forward (host and computed seeds) once at the reset and
  once per epoch;
* **measurement**: the counterfactual passes a controller's observations need: one more
  validation forward per epoch for every slot whose seed was blended (BLENDING, HOLDING,
  FOSSILIZED), with that seed left out. A static network never needs them.

Optimizer updates are not counted (see :mod:`esper_jax.lattice.flops`), nor a governor's rollback.

Evaluations record the stage each epoch trained with (``trained_stage``); evaluations written
before they did have only the end-of-epoch stages and the op each epoch, from which
:func:`trained_masks_from_timeline` reconstructs it (tested against the recorded one).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from esper_jax.env.actions import Op
from esper_jax.lattice import lifecycle
from esper_jax.lattice.flops import ModelCosts, epoch_flops
from esper_jax.lattice.lifecycle import Stage


class EpisodeCompute(NamedTuple):
    """FLOPs per env (``[N]``, float64) of one controller's episode."""

    train: np.ndarray
    validation: np.ndarray
    measurement: np.ndarray

    @property
    def total(self) -> np.ndarray:
        return self.train + self.validation + self.measurement


def _in(stage: np.ndarray, stages) -> np.ndarray:
    return np.isin(stage, [int(s) for s in stages])


def trained_masks_from_timeline(stage: np.ndarray, op: np.ndarray, applied: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which seeds were computed and which blended while each epoch trained (``[N, E, S]`` each),
    from end-of-epoch stages ``[N, E, S]`` and the op requested each epoch (``[N, E]``, with
    whether it applied). Between two ends a seed's state changes by the epoch's action (before
    training) or by the tick (after it): a seed that became computed (blended) was so while
    training only if the action was an applied ADVANCE out of GERMINATED (TRAINING); one that
    stopped was so unless the action was an applied PRUNE."""
    stage, op, applied = np.asarray(stage), np.asarray(op), np.asarray(applied, bool)
    previous = np.concatenate([np.full_like(stage[:, :1], int(Stage.DORMANT)), stage[:, :-1]], axis=1)
    acted = lambda which: ((op == which) & applied)[..., None]

    def during(stages, entered_from):
        before, after = _in(previous, stages), _in(stage, stages)
        entered = ~before & after & acted(Op.ADVANCE) & (previous == int(entered_from))
        return (before & after) | entered | (before & ~after & ~acted(Op.PRUNE))

    return during(lifecycle.COMPUTED_STAGES, Stage.GERMINATED), during(lifecycle.BLENDED_STAGES, Stage.TRAINING)


def trained_masks(trained_stage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Computed and blended seeds, ``[N, E, S]``, from the recorded stage each epoch trained with."""
    trained_stage = np.asarray(trained_stage)
    return _in(trained_stage, lifecycle.COMPUTED_STAGES), _in(trained_stage, lifecycle.BLENDED_STAGES)


def episode_compute(costs: ModelCosts, computed: np.ndarray, blended: np.ndarray, blueprint: np.ndarray,
                    steps_per_epoch: int, measured: bool = True) -> EpisodeCompute:
    """FLOPs of each env's episode (module docstring). ``computed``/``blended``: ``[N, E, S]``
    masks of the seeds computed and blended while each epoch trained; ``blueprint``: end-of-epoch
    blueprints ``[N, E, S]`` (-1 empty; a seed pruned in the tick keeps its blueprint from the
    epoch before); ``measured``: whether the counterfactual passes count (False for a static
    network with seeds built in, which nothing measures)."""
    blueprint = np.asarray(blueprint)
    previous = np.concatenate([np.full_like(blueprint[:, :1], -1), blueprint[:, :-1]], axis=1)
    epochs = epoch_flops(costs, np.asarray(computed, bool), np.asarray(blended, bool),
                         np.where(blueprint >= 0, blueprint, previous), steps_per_epoch, measured)
    # the reset's validation pass, then the epochs'
    return EpisodeCompute(np.asarray(epochs.train.sum(axis=1), np.float64),
                          np.asarray(costs.host_eval + epochs.validation.sum(axis=1), np.float64),
                          np.asarray(epochs.measurement.sum(axis=1), np.float64))


def output_compute(costs: ModelCosts, out, steps_per_epoch: int, measured: bool = True) -> EpisodeCompute:
    """:func:`episode_compute` of an :class:`~esper_jax.runs.evaluation.EpisodeOutput` (its
    recorded trained stages and blueprints)."""
    return episode_compute(costs, *trained_masks(out.trained_stage), out.blueprint, steps_per_epoch, measured)


def timeline_compute(costs: ModelCosts, timeline: Mapping[str, Any], steps_per_epoch: int) -> tuple[EpisodeCompute, str]:
    """:func:`episode_compute` of a controller's timeline as ``evaluation.json`` stores it, and
    how the trained stages were known (``"recorded"`` or ``"reconstructed"``)."""
    blueprint = np.asarray(timeline["blueprint"])
    if "trained_stage" in timeline:
        computed, blended = trained_masks(np.asarray(timeline["trained_stage"]))
        how = "recorded"
    else:
        computed, blended = trained_masks_from_timeline(np.asarray(timeline["stage"]), np.asarray(timeline["op"]),
                                                        np.asarray(timeline["applied"]))
        how = "reconstructed"
    return episode_compute(costs, computed, blended, blueprint, steps_per_epoch), how


def add_compute(payload: dict[str, Any], env, data, results: Mapping[str, Any]) -> dict[str, EpisodeCompute]:
    """The compute of every controller's episode (``results``: name -> ``EpisodeOutput``) on ``env``,
    its :func:`compute_summary` put into an evaluation ``payload``'s controller rows; returns it."""
    costs = env.model_costs(data)
    computes = {name: output_compute(costs, out, env.config.steps_per_epoch) for name, out in results.items()}
    for name, compute in computes.items():
        payload["controllers"][name]["compute"] = compute_summary(compute)
    return computes


def compute_summary(compute: EpisodeCompute) -> dict[str, Any]:
    """JSON-ready means and per-env totals."""
    return {
        "flops": float(compute.total.mean()),
        "flops_per_env": [float(v) for v in compute.total],
        "train_flops": float(compute.train.mean()),
        "validation_flops": float(compute.validation.mean()),
        "measurement_flops": float(compute.measurement.mean()),
    }
