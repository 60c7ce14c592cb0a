"""Which policies act on another task, and in what configuration (:mod:`esper_jax.runs.transfer`).
Nothing here builds or compiles."""

from __future__ import annotations

import pytest

from esper_jax.runs.config import RunConfigError
from esper_jax.runs.settings import resolve_config, resolve_settings
from esper_jax.runs.transfer import transfer_config

PLANS = {"plans": "static,norm@r0c0@e1", "num_minibatches": 1, "train_fraction": "0.25:1", "plan_inputs": "problem"}


def smoke(task: str, **settings):
    return resolve_config(resolve_settings({"task": task, **settings}, "smoke"))


def test_a_scorer_policy_takes_the_targets_envs_and_menu():
    source = smoke("cifar10", **PLANS, plan_head="scorer", seed=3, population=2, learning_rate="1e-3,3e-3")
    target = smoke("tinystories", **{**PLANS, "plans": "static,lora@r0c0@e0,norm@r0c0@e2"}, seed=5)
    config = transfer_config(source, target)
    assert config.task == "tinystories" and config.env == target.env and config.data == target.data
    assert config.ppo.plans == target.ppo.plans and config.ppo.plan_head == "scorer"
    assert config.ppo.hidden_size == source.ppo.hidden_size and config.members == source.members
    assert config.seed == 5  # the target's held-out envs


def test_what_cannot_act_on_another_task_is_refused_in_one_line():
    target = smoke("tinystories", **{**PLANS, "plans": "static,lora@r0c0@e0"})
    cases = (
        (smoke("cifar10"), target, "per-epoch learner"),
        (smoke("cifar10", **PLANS, plan_head="scorer"), smoke("tinystories"), "has no menu of plans"),
        (smoke("cifar10", **{**PLANS, "plan_inputs": "observation"}, plan_head="scorer"), target,
         "sees the whole first observation"),
        (smoke("cifar10", **PLANS), target, "one logit per plan of its menu (static,norm@r0c0@e1)"),
    )
    for source, to, message in cases:
        with pytest.raises(RunConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            transfer_config(source, to)


def test_a_fixed_plan_head_acts_on_a_menu_of_the_same_plans():
    """CIFAR-10 to CIFAR-100 with the same slots, blueprints and menu: the fixed head's logits name
    the same plans there."""
    config = transfer_config(smoke("cifar10", **PLANS), smoke("cifar100", **PLANS))
    assert config.task == "cifar100" and config.ppo.plan_head == "fixed"


def test_a_task_named_on_the_command_line_is_the_runs_preset_for_it():
    """``experiments.evaluate --task``: the target task under the source run's preset and seed, with
    ``--data``; the default preset's menu for the target's host."""
    import argparse

    from experiments.evaluate import target_of_task, transfer_stem

    source = resolve_config(resolve_settings({"task": "cifar10", "data": "synthetic", "plan_head": "scorer",
                                              "seed": 7}))
    target = target_of_task(argparse.Namespace(task="tinystories", data="synthetic", data_dir=None), source)
    assert target.task == "tinystories" and target.seed == 7 and target.data.synthetic
    assert target.ppo.plans == ("static", "depth@r1c0@e0", "depth@r0c0@e0", "mlp_small@r0c0@e0")
    assert transfer_config(source, target).ppo.plan_head == "scorer"
    assert transfer_stem("tfds:mnist", None) == "transfer-tfds_mnist"
    assert transfer_stem(None, "runs/ts-run/") == "transfer-ts-run"


def test_the_transferred_policy_is_paired_with_the_targets_own_on_the_same_envs():
    from esper_jax.runs.transfer import against_native_policy

    def evaluation(losses, fractions=(0.3, 0.6, 0.9), derivation="fold_in(key(0), 0x45564c31)"):
        return {"held_out": {"derivation": derivation, "num_envs": 3, "episode_epochs": 10,
                             "problems": {"train_fraction": list(fractions), "label_noise": [0.0] * 3}},
                "controllers": {"policy": {"final_val_loss_per_env": list(losses)}, "static": {}}}

    transferred = evaluation([2.0, 2.5, 3.0])
    ci = against_native_policy(transferred, evaluation([2.1, 2.4, 2.8]))
    assert ci["mean"] == pytest.approx((-0.1 + 0.1 + 0.2) / 3) and ci["n"] == 3 and ci["better"] == 1
    assert against_native_policy(transferred, evaluation([2.0] * 3, fractions=(0.3, 0.6, 0.8))) is None
    assert against_native_policy(transferred, evaluation([2.0] * 3, derivation="other")) is None
    assert against_native_policy(transferred, None) is None
    del transferred["controllers"]["policy"]
    assert against_native_policy(transferred, evaluation([2.0] * 3)) is None
