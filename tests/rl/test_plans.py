"""The learner that decides once per episode (:mod:`esper_jax.rl.plans`) and the plan controller it
acts through (:func:`esper_jax.env.controllers.make_plan_controller`), on the tiny env of
``tests/env_rig.py`` (3-epoch episodes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.env.actions import Op
from esper_jax.env.controllers import make_plan_controller, make_scripted_controller, parse_plan, plan_names
from esper_jax.rl.plans import PlanTrainer, make_train
from esper_jax.rl.ppo import Hyperparams, PPOConfig
from esper_jax.runs import evaluation as ev
from tests.env_rig import tiny_env

MENU = ("static", "conv_small@r0c0@e0")
CONFIG = PPOConfig(num_envs=4, update_epochs=4, num_minibatches=2, hidden_size=16, group_size=2, learning_rate=0.01,
                   plans=MENU)


@pytest.fixture(scope="module")
def learner():
    """The tiny env, a plan learner on MENU, its initial state, and one compiled episodes program."""
    rig = tiny_env()
    trainer = make_train(CONFIG, rig.env, 4)
    state = jax.jit(trainer.init)(jax.random.key(0), Hyperparams.default(CONFIG), rig.data)
    return rig.env, rig.data, trainer, state, jax.jit(trainer.episodes)


def test_each_plan_is_carried_out_as_its_schedule_or_static():
    """One controller for the menu acts exactly as the scripted controller of each plan (static: as
    the static controller) on the same held-out envs: the same ops every epoch, the same losses
    (within float tolerance: different branches of one program)."""
    rig = tiny_env()
    menu = ("static", "conv_small@r0c0@e0", "norm@r0c0@e1")
    plan = make_plan_controller(rig.env, [parse_plan(p) for p in menu])
    scripted = {f"plan {i}": (lambda i: lambda key, state: plan(key, state, jnp.int32(i)))(i) for i in range(len(menu))}
    scripted.update({name: make_scripted_controller(rig.env, parse_plan(name)) for name in menu[1:]})
    evaluator = ev.Evaluator(rig.env, 2, ("static",), scripted=scripted)
    key = jax.random.key(3)
    for i, name in enumerate(menu):
        mine, theirs = evaluator.run(f"plan {i}", rig.data, key), evaluator.run(name, rig.data, key)
        np.testing.assert_array_equal(mine.op, theirs.op)
        np.testing.assert_array_equal(mine.germinated, theirs.germinated)
        np.testing.assert_allclose(mine.final_val_loss, theirs.final_val_loss, rtol=1e-6)
    late = evaluator.run("plan 2", rig.data, key)
    assert (late.germinated.sum(axis=1) == 1).all() and (late.op[:, 0] == Op.WAIT).all()  # planted at epoch 1
    assert evaluator.run("plan 0", rig.data, key).germinated.sum() == 0


def test_the_menu_is_checked_and_named_canonically():
    assert plan_names(("static", "norm@r0c0", "a@r0c0@e1+b@r1c0")) == ("static", "norm@r0c0@e0",
                                                                        "a@r0c0@e1+b@r1c0@e0")
    with pytest.raises(ValueError, match="two plans or more"):
        PPOConfig(plans=("static",))
    with pytest.raises(ValueError, match="names a plan twice"):
        PPOConfig(plans=("norm@r0c0", "norm@r0c0@e0"))
    with pytest.raises(ValueError, match="--recurrent does not apply"):
        PPOConfig(plans=MENU, recurrent="lstm")
    with pytest.raises(ValueError, match="or 'static'"):
        PPOConfig(plans=("static", "norm"))
    assert PPOConfig(plans=list(MENU)).plans == MENU  # as config.json gives it


def test_the_learner_moves_to_the_plan_whose_paired_return_is_higher(learner):
    """Under the tiny env's parameter rent, growing ``conv_small`` costs return and (in 3 epochs)
    changes no loss: measured here, with both plans imposed on the two envs of each problem group.
    Eight updates of the bandit move the policy from near-uniform to that plan on fresh problems."""
    env, data, trainer, state, episodes = learner
    _, imposed = episodes(state, data, jax.random.key(1), jnp.asarray([0, 1, 0, 1]))
    returns = np.asarray(imposed.episode_return)
    assert (returns[0::2] > returns[1::2]).all()  # static pays more, in every group
    probabilities, _ = trainer.plan_distribution(state.params, state.obs_stats, np.zeros((4, env.observation_size)))
    assert np.allclose(probabilities, 0.5, atol=0.05)  # near-uniform at the start
    chunk = jax.jit(trainer.train_chunk)
    trained, metrics = chunk(state, data)
    trained, metrics = chunk(trained, data)
    columns = jax.device_get(metrics).columns()
    assert set(columns) >= {"mean_return", "policy_loss", "entropy", "plan_static", "plan_conv_small@r0c0@e0"}
    assert int(trained.update) == 8 and not columns["nonfinite"].any()
    obs, _ = jax.jit(env.population_reset)(jax.random.split(jax.random.key(5), 4), data)  # problems not trained on
    probabilities, _ = trainer.plan_distribution(trained.params, trained.obs_stats, obs)
    assert np.asarray(probabilities)[:, 0].mean() > 0.8 and (np.asarray(probabilities)[:, 0] > 0.6).all()


def test_the_scorer_learns_the_same_choice_from_the_plans_descriptions(learner):
    """``plan_head="scorer"``: the policy scores each plan from its description
    (:mod:`esper_jax.env.descriptors`) with parameters whose shapes depend on neither the menu nor
    the host, and learns what the fixed head learns in the test above."""
    import dataclasses

    env, data, _, _, _ = learner
    config = dataclasses.replace(CONFIG, plan_head="scorer")
    trainer = make_train(config, env, 4)
    state = jax.jit(trainer.init)(jax.random.key(0), Hyperparams.default(config), data)
    assert all(MENU[0] not in str(path) for path, _ in jax.tree_util.tree_flatten_with_path(state.params)[0])
    longer = make_train(dataclasses.replace(config, plans=(*MENU, "norm@r0c0@e1")), env, 4)
    shapes = lambda params: jax.tree.map(np.shape, params)
    assert shapes(longer.init(jax.random.key(0), Hyperparams.default(config), data).params) == shapes(state.params)
    chunk = jax.jit(trainer.train_chunk)
    trained, _ = chunk(state, data)
    trained, metrics = chunk(trained, data)
    assert not jax.device_get(metrics).columns()["nonfinite"].any()
    obs, _ = jax.jit(env.population_reset)(jax.random.split(jax.random.key(5), 4), data)
    probabilities, _ = trainer.plan_distribution(trained.params, trained.obs_stats, obs)
    assert np.asarray(probabilities)[:, 0].mean() > 0.8
    with pytest.raises(ValueError, match="give the menu with --plans"):
        PPOConfig(plan_head="scorer")


def test_one_scorer_learns_from_two_tasks_menus_in_each_update(learner):
    """A mixed learner (``others``): each update also plays the other task's envs under its own menu
    (here the tiny env again, with a longer menu in another order: the padded plan is never chosen),
    and one parameter set learns both tasks' better plan. A fixed head is refused."""
    import dataclasses

    from esper_jax.rl.plans import TaskMenu

    env, data, _, _, _ = learner
    config = dataclasses.replace(CONFIG, plan_head="scorer")  # one env, so one observation layout
    other = ("conv_small@r0c0@e0", "norm@r0c0@e1", "static")
    trainer = make_train(config, env, 4, (TaskMenu("again", other, env),))
    state = jax.jit(trainer.init)(jax.random.key(0), Hyperparams.default(config), data)
    chunk = jax.jit(trainer.train_chunk)
    trained, first = chunk(state, (data, data))
    trained, metrics = chunk(trained, (data, data))
    columns = jax.device_get(metrics).columns()
    assert {"plan_static", "again/plan_static", "again/plan_norm@r0c0@e1", "again/mean_return"} <= set(columns)
    assert not columns["nonfinite"].any() and int(columns["env_steps"][-1]) == 8 * 2 * 4 * env.episode_epochs
    chosen = jax.device_get(first).columns()  # each task's shares sum to 1 over its own menu
    assert np.allclose(chosen["plan_static"] + chosen["plan_conv_small@r0c0@e0"], 1.0)
    assert np.allclose(sum(chosen[f"again/plan_{n}"] for n in other), 1.0)
    obs, _ = jax.jit(env.population_reset)(jax.random.split(jax.random.key(5), 4), data)
    for menu, static in ((MENU, 0), (other, 2)):
        acting = make_train(dataclasses.replace(config, plans=menu), env, 4)
        probabilities, _ = acting.plan_distribution(trained.params, trained.obs_stats, obs)
        assert np.asarray(probabilities)[:, static].mean() > 0.7, menu
    with pytest.raises(ValueError, match="give --plan-head scorer"):
        make_train(dataclasses.replace(config, plan_head="fixed"), env, 4, (TaskMenu("again", other, env),))


def test_an_evaluated_plan_is_chosen_once_and_kept(learner):
    """``act`` chooses each env's plan at its first call (the most likely one when deterministic) and
    keeps it whatever it observes later; evaluation drives it and reports the plan distribution."""
    env, data, trainer, state, _ = learner
    assert isinstance(trainer, PlanTrainer)
    obs, env_state = jax.jit(env.population_reset)(jax.random.split(jax.random.key(7), 4), data)
    probabilities, _ = trainer.plan_distribution(state.params, state.obs_stats, obs)
    _, plan = trainer.act(state.params, state.obs_stats, obs, env_state, trainer.init_carry(4), jax.random.key(0), True)
    np.testing.assert_array_equal(plan, np.argmax(probabilities, axis=1))
    forced = jnp.asarray([1, 0, 1, 0])
    action, kept = trainer.act(state.params, state.obs_stats, obs + 5.0, env_state, forced, jax.random.key(1))
    np.testing.assert_array_equal(kept, forced)
    np.testing.assert_array_equal(action.op, [Op.GERMINATE, Op.WAIT, Op.GERMINATE, Op.WAIT])  # epoch 0 of each plan
    decision = ev.first_decision(env, trainer, (state.params, state.obs_stats), data, jax.random.key(9), 4)
    assert decision["plans"] == list(MENU) and "ops" not in decision
    assert np.allclose(np.sum(decision["probabilities"], axis=1), 1.0)
    assert "its plan for the episode" in ev.first_decision_text(decision)


def test_the_policy_can_be_shown_only_the_drawn_problem(learner):
    """``plan_inputs="problem"``: the policy's input is the observation's ``train_set_size`` alone (so two
    first observations of one problem that differ elsewhere get one distribution); refused in one line
    where the envs all train on one problem."""
    import dataclasses

    from esper_jax.env.environment import MorphogeneticEnv
    from esper_jax.env.problems import ProblemFamily
    from esper_jax.rl.plans import input_features

    env, data, _, _, _ = learner
    problem_only = dataclasses.replace(CONFIG, plan_inputs="problem")
    with pytest.raises(ValueError, match="all train on one problem"):
        input_features(problem_only, env)
    family = MorphogeneticEnv(dataclasses.replace(env.config, problems=ProblemFamily((0.1, 1.0), (0.0, 0.0))))
    names = family.feature_names()
    assert input_features(problem_only, family) == (names.index("train_set_size"),)
    assert input_features(CONFIG, family) == tuple(range(len(names)))
    trainer = make_train(problem_only, family, 1)
    state = trainer.init(jax.random.key(0), Hyperparams.default(problem_only), data)
    assert state.obs_stats.mean.shape == (1,)
    obs = np.random.default_rng(0).normal(size=(2, len(names))).astype(np.float32)
    obs[1, names.index("train_set_size")] = obs[0, names.index("train_set_size")]
    probabilities, _ = trainer.plan_distribution(state.params, state.obs_stats, obs)
    np.testing.assert_array_equal(probabilities[0], probabilities[1])
    with pytest.raises(ValueError, match="give the menu with --plans"):
        PPOConfig(plan_inputs="problem")
