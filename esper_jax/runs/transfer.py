"""A run's controller on another task: the configuration its policy is evaluated in there
(zero-shot transfer, ``experiments.evaluate --task`` or ``--target-run``), and the one-line
refusals where it cannot act.

What transfers is a policy whose inputs and choices do not depend on its task: the plan learner
(:mod:`esper_jax.rl.plans`) that sees only the drawn problem (``--plan-inputs problem``: the
training set's size on its family's scale) and scores each plan from its description
(``--plan-head scorer``, :mod:`esper_jax.env.descriptors`), so its parameters act on the target's
own menu. A fixed plan head transfers only to a menu of the same plans by name (CIFAR-10 to another
image task with the same slots and blueprints). The per-epoch learner's heads and observation are
sized by its task's slots and blueprints: it does not transfer.

A mixed run's policy (``--mix``) evaluates on each of its tasks this way too (the report says it
trained there). The target's environment, data, menu and held-out stream are the target's (another run's
configuration, or the source's preset for the target task); the policy's settings (its network,
inputs, head), members and learner state are the source run's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from esper_jax.runs.config import RunConfig, RunConfigError
from esper_jax.runs.evaluation import POLICY, paired_ci


def transfer_config(source: RunConfig, target: RunConfig) -> RunConfig:
    """The configuration in which ``source``'s policy acts on ``target``'s envs; a
    :class:`RunConfigError` with one line where it cannot."""
    if not source.ppo.plans:
        raise RunConfigError(f"the run's policy is the per-epoch learner, whose observation and heads are sized by "
                             f"its task's slots and blueprints: it acts on {source.task} only (a policy trained with "
                             f"--plans MENU --plan-inputs problem --plan-head scorer acts on any task)")
    if not target.ppo.plans:
        raise RunConfigError(f"the target ({target.task}, preset {target.preset}) has no menu of plans to choose "
                             f"from: evaluate on a run trained with --plans (--target-run), or a preset with a menu")
    if source.ppo.plan_inputs != "problem" and target.task != source.task:
        raise RunConfigError(f"the run's plan policy sees the whole first observation, whose layout is its task's "
                             f"(slots, blueprints): only a policy trained with --plan-inputs problem acts on another "
                             f"task")
    if source.ppo.plan_head == "fixed" and target.ppo.plans != source.ppo.plans:
        raise RunConfigError(f"the run's plan policy has one logit per plan of its menu ({','.join(source.ppo.plans)}) "
                             f"and the target's menu is {','.join(target.ppo.plans)}: a policy trained with "
                             f"--plan-head scorer scores any menu")
    ppo = dataclasses.replace(source.ppo, plans=target.ppo.plans, num_envs=target.ppo.num_envs,
                              num_minibatches=target.ppo.num_minibatches, group_size=target.ppo.group_size)
    return dataclasses.replace(target, ppo=ppo, members=source.members, mix=())  # the policy acts on one task


def against_native_policy(payload: Mapping[str, Any], native: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The transferred policy's final loss minus the target run's own policy's on the same held-out
    envs (``native``: the target's ``evaluation.json``), paired over envs; ``None`` unless both
    evaluated the same envs (one seed stream, episode and drawn problems) and both have a policy."""
    if not native or POLICY not in native.get("controllers", {}) or POLICY not in payload["controllers"]:
        return None
    mine, theirs = payload["held_out"], native["held_out"]
    same = all(mine.get(k) == theirs.get(k) for k in ("derivation", "num_envs", "episode_epochs")) and all(
        mine["problems"].get(k) == theirs.get("problems", {}).get(k) for k in ("train_fraction", "label_noise"))
    if not same:
        return None
    loss = lambda evaluation: np.asarray(evaluation["controllers"][POLICY]["final_val_loss_per_env"], np.float64)
    return paired_ci(loss(payload) - loss(native))
