"""The inner environment (:mod:`esper_jax.env.environment`) on the tiny configuration of ``env_rig``.

Every test here runs the same three compiled programs (population reset and step for two
members, and the single-environment step), shared with ``test_controllers.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.env.actions import FactoredAction, Op
from esper_jax.env.controllers import make_controller, parse_controller
from esper_jax.lattice.lifecycle import LIVE_STAGES, Stage
from esper_jax.env.observations import LOSS_HISTORY

from tests.env_rig import EPISODE_EPOCHS, POPULATION, member, stack_members, tiny_env


def actions(*per_member: FactoredAction) -> FactoredAction:
    return stack_members(*per_member)


WAIT = FactoredAction.wait()


def germinate(blueprint: int = 0, slot: int = 0) -> FactoredAction:
    return FactoredAction.make(Op.GERMINATE, slot=slot, blueprint=blueprint, blend=0, tempo=0)


def np_tree(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_bitwise_equal(a, b, err_msg=""):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, err_msg
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=err_msg)


@pytest.fixture(scope="module")
def tiny():
    return tiny_env()


@pytest.fixture(scope="module")
def reset(tiny):
    """(keys, obs, state) of a fresh population."""
    keys = tiny.keys(0, 1)
    obs, state = tiny.population_reset(keys, tiny.data)
    return keys, obs, state


@pytest.fixture(scope="module")
def germinated(tiny, reset):
    """One step from reset: member 0 germinates conv_small into its slot, member 1 waits."""
    _, _, state = reset
    return tiny.population_step(tiny.keys(10, 11), state, actions(germinate(0), WAIT), tiny.data)


# ---------------------------------------------------------------------------- reset


def test_reset_shapes_and_values(tiny, reset):
    env = tiny.env
    _, obs, state = reset
    assert env.observation_size == len(env.feature_names()) == obs.shape[1]
    assert obs.shape == (POPULATION, env.observation_size) and obs.dtype == np.float32
    assert np.all(np.isfinite(np.asarray(obs)))
    np.testing.assert_array_equal(np.asarray(state.epoch), [0, 0])
    assert np.all(np.asarray(state.train.lattice.status.stage) == Stage.DORMANT)
    for counts in (state.germinated, state.fossilized, state.pruned):
        assert counts.shape == (POPULATION, env.lattice.num_blueprints) and not np.asarray(counts).any()
    val_loss = np.asarray(state.val_loss)
    # an untrained 10-class classifier: the loss is near ln(10)
    assert np.all(np.isfinite(val_loss)) and np.all(np.abs(val_loss - np.log(10)) < 1.0)
    assert state.loss_history.shape == (POPULATION, LOSS_HISTORY)
    # different keys, different hosts
    w = np.asarray(state.train.host_params["classifier"]["w"])
    assert not np.array_equal(w[0], w[1])
    # the snapshot starts as the initial weights
    assert_trees_bitwise_equal(state.snapshot, state.train)


def test_single_environment_shapes(tiny, reset):
    """``reset``/``step`` are the same code with one member: no population axis anywhere
    (``eval_shape``, so nothing compiles)."""
    env = tiny.env
    _, _, state = reset
    obs, single = jax.eval_shape(env.reset, jax.random.key(0), tiny.data)
    assert obs.shape == (env.observation_size,)
    for full, one in zip(jax.tree.leaves(state), jax.tree.leaves(single)):
        assert full.shape == (POPULATION,) + one.shape
    obs, new, reward, done, info = jax.eval_shape(env.step, jax.random.key(0), single, WAIT, tiny.data)
    assert obs.shape == (env.observation_size,) and reward.shape == () and done.shape == ()
    for name, value in info.items():
        assert value.shape == ((env.lattice.slots.num_slots,) if name in ("contribution", "trained_stage") else ()), name


# ---------------------------------------------------------------------------- step


def test_episode_shapes_done_flag_and_bookkeeping(tiny, reset):
    env = tiny.env
    keys, obs, state = reset
    epoch_feature = env.feature_names().index("epoch_fraction")
    for t in range(1, EPISODE_EPOCHS + 2):
        obs, new, reward, done, info = tiny.population_step(tiny.keys(20 + t, 40 + t), state, actions(WAIT, WAIT), tiny.data)
        assert obs.shape == (POPULATION, env.observation_size) and np.all(np.isfinite(np.asarray(obs)))
        assert reward.shape == (POPULATION,) and np.all(np.isfinite(np.asarray(reward)))
        # done is a truncation flag at episode_epochs; the env does not reset itself
        np.testing.assert_array_equal(np.asarray(done), [t >= EPISODE_EPOCHS] * POPULATION)
        np.testing.assert_array_equal(np.asarray(new.epoch), [t, t])
        np.testing.assert_allclose(np.asarray(obs)[:, epoch_feature], t / EPISODE_EPOCHS, rtol=1e-6)
        for name in ("val_loss", "val_accuracy", "train_loss", "applied", "rolled_back", "added_params"):
            assert info[name].shape == (POPULATION,), name
        assert info["contribution"].shape == (POPULATION, env.lattice.slots.num_slots)
        assert np.asarray(info["applied"]).all() and not np.asarray(info["rolled_back"]).any()
        np.testing.assert_array_equal(np.asarray(new.val_loss), np.asarray(info["val_loss"]))
        np.testing.assert_array_equal(np.asarray(new.prev_val_loss), np.asarray(state.val_loss))
        np.testing.assert_array_equal(np.asarray(new.loss_history)[:, -1], np.asarray(new.val_loss))
        np.testing.assert_array_equal(np.asarray(new.loss_history)[:, :-1], np.asarray(state.loss_history)[:, 1:])
        np.testing.assert_array_equal(np.asarray(new.best_val_loss),
                                      np.minimum(np.asarray(state.best_val_loss), np.asarray(new.val_loss)))
        # the host trains: its weights move
        w0, w1 = (np.asarray(s.train.host_params["classifier"]["w"]) for s in (state, new))
        assert not np.array_equal(w0, w1)
        # a good step becomes the new snapshot
        assert_trees_bitwise_equal(new.snapshot.host_params, new.train.host_params)
        state = new
    # WAIT everywhere: nothing grew
    assert np.all(np.asarray(state.train.lattice.status.stage) == Stage.DORMANT)
    assert not np.asarray(state.germinated).any() and not np.asarray(info["added_params"]).any()


def test_germinate_is_applied_and_counted(tiny, reset, germinated):
    env = tiny.env
    _, _, before = reset
    obs, state, reward, done, info = germinated
    np.testing.assert_array_equal(np.asarray(info["applied"]), [True, True])
    np.testing.assert_array_equal(np.asarray(state.germinated), [[1, 0], [0, 0]])
    status = np_tree(state.train.lattice.status)
    np.testing.assert_array_equal(status.stage[:, 0], [Stage.GERMINATED, Stage.DORMANT])
    # the stage the epoch trained with: the seed was planted before training (and not computed in it)
    np.testing.assert_array_equal(np.asarray(info["trained_stage"])[:, 0], [Stage.GERMINATED, Stage.DORMANT])
    np.testing.assert_array_equal(status.blueprint[:, 0], [0, -1])
    np.testing.assert_array_equal(np.asarray(state.last_op), [Op.GERMINATE, Op.WAIT])
    # the task metric when the seed was planted (accuracy, before this epoch's training)
    np.testing.assert_array_equal(np.asarray(state.metric_at_germination)[:, 0],
                                  [float(np.asarray(before.val_accuracy)[0]), 0.0])
    # the observation shows the seed
    names = env.feature_names()
    o = np.asarray(obs)
    assert o[0, names.index("r0c0.stage_germinated")] == 1 and o[1, names.index("r0c0.stage_dormant")] == 1
    assert o[0, names.index("r0c0.blueprint_conv_small")] == 1 and o[1, names.index("r0c0.blueprint_conv_small")] == 0
    assert o[0, names.index("last_op_germinate")] == 1 and o[1, names.index("last_op_wait")] == 1
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(np.asarray(reward)))


def test_masked_out_action_is_never_applied(tiny, germinated):
    """Germinating into the occupied slot is refused: nothing counted, the seed untouched;
    the other member's valid germination goes through in the same step."""
    _, state, _, _, _ = germinated
    # Random seed parameters (the tiny blueprints start at zero), so a re-initialization shows.
    params = np.random.default_rng(0).standard_normal(state.train.lattice.params[0].shape).astype(np.float32)
    lattice = state.train.lattice.replace(params=(jax.device_put(params),))
    state = state.replace(train=state.train.replace(lattice=lattice))
    obs, new, reward, done, info = tiny.population_step(
        tiny.keys(12, 13), state, actions(germinate(1), germinate(1)), tiny.data)
    np.testing.assert_array_equal(np.asarray(info["applied"]), [False, True])
    np.testing.assert_array_equal(np.asarray(new.germinated), [[1, 0], [0, 1]])
    np.testing.assert_array_equal(np.asarray(new.last_op), [Op.WAIT, Op.GERMINATE])
    status = np_tree(new.train.lattice.status)
    np.testing.assert_array_equal(status.stage[:, 0], [Stage.GERMINATED, Stage.GERMINATED])
    np.testing.assert_array_equal(status.blueprint[:, 0], [0, 1])  # not re-planted as blueprint 1
    # a GERMINATED seed is not trained yet, and the refused germination did not re-initialize it
    after = np.asarray(new.train.lattice.params[0])
    np.testing.assert_array_equal(after[0], params[0])
    # the applied one re-initialized its blueprint and gate, and nothing else
    layout = tiny.env.lattice.layout(0)
    for name, start, stop in layout.unit_ranges:
        if name == "conv_small":
            np.testing.assert_array_equal(after[1, start:stop], params[1, start:stop])
        else:
            assert not np.array_equal(after[1, start:stop], params[1, start:stop]), name


def test_population_member_steps_like_a_single_environment(tiny, reset):
    """Member i of ``population_step`` equals ``step`` on member i alone with member i's key."""
    _, _, state = reset
    keys = tiny.keys(30, 31)
    per_member = (germinate(0), WAIT)
    population = tiny.population_step(keys, state, actions(*per_member), tiny.data)
    for i in range(POPULATION):
        single = tiny.step(keys[i], member(state, i), per_member[i], tiny.data)
        for name, got, want in zip(("obs", "state", "reward", "done", "info"), member(population, i), single):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                a, b = np.asarray(a), np.asarray(b)
                if np.issubdtype(a.dtype, np.floating):
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"member {i}: {name}")
                else:
                    np.testing.assert_array_equal(a, b, err_msg=f"member {i}: {name}")


def test_members_draw_their_own_batches(tiny, reset):
    """Two identical members: different keys give different batches (losses, weights), the same
    key the same ones."""
    _, _, state = reset
    twins = stack_members(member(state, 0), member(state, 0))
    _, diff, _, _, diff_info = tiny.population_step(tiny.keys(50, 51), twins, actions(WAIT, WAIT), tiny.data)
    _, same, _, _, same_info = tiny.population_step(tiny.keys(50, 50), twins, actions(WAIT, WAIT), tiny.data)
    loss = np.asarray(diff_info["train_loss"])
    assert loss[0] != loss[1]
    w = np.asarray(diff.train.host_params["classifier"]["w"])
    assert not np.allclose(w[0], w[1])
    np.testing.assert_array_equal(np.asarray(same_info["train_loss"])[0], np.asarray(same_info["train_loss"])[1])
    for leaf in jax.tree.leaves(same.train.host_params):
        np.testing.assert_array_equal(np.asarray(leaf)[0], np.asarray(leaf)[1])
    # member 0 saw the same batches (key 50) both times
    np.testing.assert_array_equal(np.asarray(same_info["train_loss"])[0], loss[0])


# ---------------------------------------------------------------------------- governor


def _with_host_leaf(state, transform, which: int = 0):
    """``state`` with member ``which``'s classifier weights replaced by ``transform(w)`` in the
    trained weights only (the snapshot keeps the last good ones)."""
    w = np.array(state.train.host_params["classifier"]["w"])
    w[which] = transform(w[which])
    host = dict(state.train.host_params)
    host["classifier"] = dict(host["classifier"], w=jax.device_put(w))
    return state.replace(train=state.train.replace(host_params=host))


def _check_rolled_back(tiny, before, new, reward, obs, info, m: int):
    """Member ``m`` was rolled back to ``before.snapshot``; live seeds pruned; penalty paid."""
    env = tiny.env
    assert bool(np.asarray(info["rolled_back"])[m])
    assert_trees_bitwise_equal(member(new.train.host_params, m), member(before.snapshot.host_params, m))
    assert_trees_bitwise_equal(member(new.train.host_opt_state, m), member(before.snapshot.host_opt_state, m))
    assert_trees_bitwise_equal(member(new.snapshot.host_params, m), member(new.train.host_params, m))
    stage = np.asarray(new.train.lattice.status.stage)[m]
    assert not np.isin(stage, LIVE_STAGES).any()
    # the losses reported are the previous step's (not the failed step's), and nothing non-finite gets out
    assert float(np.asarray(new.val_loss)[m]) == float(np.asarray(before.val_loss)[m])
    assert np.asarray(new.rollbacks)[m] == np.asarray(before.rollbacks)[m] + 1
    assert np.asarray(new.divergent_epochs)[m] == 0
    for x in (obs, reward, info["val_loss"], info["train_loss"], info["contribution"]):
        assert np.all(np.isfinite(np.asarray(x)))
    # no loss change, no live seed, not terminal: the reward is exactly the governor's penalty
    np.testing.assert_allclose(float(np.asarray(reward)[m]), -env.config.reward.governor_penalty, atol=1e-6)


def test_governor_rolls_back_a_nan_and_prunes_live_seeds(tiny, germinated):
    _, state, _, _, _ = germinated   # member 0 has a GERMINATED seed, and a good snapshot
    poisoned = _with_host_leaf(state, lambda w: np.full_like(w, np.nan))
    advance = FactoredAction.make(Op.ADVANCE, slot=0)
    obs, new, reward, done, info = tiny.population_step(tiny.keys(60, 61), poisoned, actions(advance, WAIT), tiny.data)
    np.testing.assert_array_equal(np.asarray(info["rolled_back"]), [True, False])
    _check_rolled_back(tiny, poisoned, new, reward, obs, info, 0)
    # the rollback pruned member 0's seed: counted once, as conv_small
    assert np.asarray(new.train.lattice.status.stage)[0, 0] in (Stage.PRUNED, Stage.EMBARGOED)
    names = tiny.env.feature_names()
    assert np.asarray(obs)[0, names.index("r0c0.stage_" + Stage(np.asarray(new.train.lattice.status.stage)[0, 0]).name.lower())] == 1
    np.testing.assert_array_equal(np.asarray(new.pruned), [[1, 0], [0, 0]])
    # member 1 trained normally
    w1 = np.asarray(new.train.host_params["classifier"]["w"])[1]
    assert np.all(np.isfinite(w1)) and not np.array_equal(w1, np.asarray(state.train.host_params["classifier"]["w"])[1])
    # and the rolled-back member goes on training from the restored weights
    obs, after, reward, done, info = tiny.population_step(tiny.keys(62, 63), new, actions(WAIT, WAIT), tiny.data)
    assert not np.asarray(info["rolled_back"]).any() and np.all(np.isfinite(np.asarray(after.val_loss)))


def test_governor_rolls_back_a_divergent_loss_after_patience(tiny, reset):
    """A finite loss above the absolute bound and far above the recent mean, for ``patience``
    epochs in a row, rolls back to the last good weights (from before the divergence)."""
    env = tiny.env
    gov = env.config.governor
    _, _, state = reset
    _, good, _, _, _ = tiny.population_step(tiny.keys(70, 71), state, actions(WAIT, WAIT), tiny.data)
    blown = _with_host_leaf(good, lambda w: w * 1e4)  # huge but finite logits: a loss of thousands
    current = blown
    for epoch in range(1, gov.patience + 1):
        obs, current_new, reward, done, info = tiny.population_step(
            tiny.keys(72 + epoch, 90 + epoch), current, actions(WAIT, WAIT), tiny.data)
        rolled = np.asarray(info["rolled_back"])
        assert not rolled[1]
        if epoch < gov.patience:
            val = float(np.asarray(info["val_loss"])[0])
            assert np.isfinite(val) and val > gov.absolute_loss_bound
            assert not rolled[0] and np.asarray(current_new.divergent_epochs)[0] == epoch
            # a divergent epoch is not a good one: the snapshot keeps the weights from before it
            assert_trees_bitwise_equal(member(current_new.snapshot.host_params, 0), member(good.snapshot.host_params, 0))
        else:
            assert rolled[0]
            _check_rolled_back(tiny, current, current_new, reward, obs, info, 0)
            assert_trees_bitwise_equal(member(current_new.train.host_params, 0), member(good.train.host_params, 0))
        current = current_new


def test_counterfactual_passes_only_where_a_seed_is_blended(tiny, germinated):
    """A slot's counterfactual pass is computed only where some member's seed is blended (only then
    can the forward change); elsewhere the contribution is exactly 0, which is what every pass
    would have measured. Member 0's germinated seed is set BLENDING at alpha 0.5, then TRAINING."""
    env = tiny.env
    state = germinated[1]
    status = state.train.lattice.status

    # a seed that has learned something (a fresh one contributes exactly zero by design)
    leaves, treedef = jax.tree.flatten(state.train.lattice.params)
    noise = [0.3 * jax.random.normal(jax.random.key(i), leaf.shape) for i, leaf in enumerate(leaves)]
    params = jax.tree.unflatten(treedef, [leaf + n for leaf, n in zip(leaves, noise)])

    def with_stage(stage, alpha):
        s = status.replace(stage=status.stage.at[0, 0].set(stage), alpha=status.alpha.at[0, 0].set(alpha))
        return state.train.replace(lattice=state.train.lattice.replace(status=s, params=params))

    validate = jax.jit(lambda train: env._validate(train, tiny.data))
    off = jax.jit(lambda train: env._evaluate(train, env._val_inputs(tiny.data), tiny.data.val_y,
                                              jnp.ones((POPULATION, 1), bool))[0])
    blended = with_stage(Stage.BLENDING, 0.5)
    measured = validate(blended)
    every_pass = np.asarray(off(blended)) - np.asarray(measured.val_loss)
    assert abs(float(every_pass[0])) > 1e-4  # the seed really changes the loss
    np.testing.assert_allclose(np.asarray(measured.contribution)[:, 0], every_pass, rtol=1e-5, atol=1e-6)
    training = with_stage(Stage.TRAINING, 0.0)
    measured = validate(training)
    np.testing.assert_array_equal(np.asarray(measured.contribution), 0.0)
    np.testing.assert_allclose(np.asarray(off(training)), np.asarray(measured.val_loss), rtol=1e-6)


# ---------------------------------------------------------------------------- SEAL


def test_seal_ends_germination_for_the_episode_and_the_observation_shows_it(tiny, reset):
    """Without the op the state and the observation are what they always were; with it, a member
    that SEALs is refused every later germination of its episode (the other member, which waited,
    germinates), its observation says sealed, and a reset opens the next episode again."""
    assert reset[2].sealed is None and "sealed" not in tiny.env.feature_names()
    assert "last_op_seal" not in tiny.env.feature_names() and tiny.env.action_space.num_ops == int(Op.SEAL)
    sealing = tiny_env(seal=True)
    env, names = sealing.env, sealing.env.feature_names()
    assert env.action_space.num_ops == len(Op) and len(names) == env.observation_size == tiny.env.observation_size + 2
    assert names.index("sealed") == names.index("last_op_seal") + 1  # the global features' end (no problem family here)
    obs, state = sealing.population_reset(sealing.keys(0, 1), sealing.data)
    assert not np.asarray(state.sealed).any() and not np.asarray(obs)[:, names.index("sealed")].any()
    seal = FactoredAction.make(Op.SEAL)
    obs, state, _, _, info = sealing.population_step(sealing.keys(10, 11), state, actions(seal, WAIT), sealing.data)
    np.testing.assert_array_equal(np.asarray(info["applied"]), [True, True])
    np.testing.assert_array_equal(np.asarray(state.sealed), [True, False])
    np.testing.assert_array_equal(np.asarray(state.last_op), [Op.SEAL, Op.WAIT])
    o = np.asarray(obs)
    np.testing.assert_array_equal(o[:, names.index("sealed")], [1, 0])
    np.testing.assert_array_equal(o[:, names.index("last_op_seal")], [1, 0])
    masks = env.population_masks(state)
    np.testing.assert_array_equal(np.asarray(masks.op)[:, [Op.GERMINATE, Op.SEAL]], [[False, False], [True, True]])
    # the controllers ask the env's masks: a schedule (a kickstarting teacher) does not name a germination
    # the sealed member would refuse, nor does the random controller
    schedule = make_controller(parse_controller("conv_small@r0c0@e0"), env)
    np.testing.assert_array_equal([int(schedule(None, member(state, i)).op) for i in (0, 1)], [Op.WAIT, Op.GERMINATE])
    draws = jax.vmap(make_controller("random", env), in_axes=(0, None))(
        jax.random.split(jax.random.key(0), 64), member(state, 0))
    assert not np.isin(np.asarray(draws.op), [Op.GERMINATE, Op.SEAL]).any()
    obs, state, _, _, info = sealing.population_step(sealing.keys(12, 13), state, actions(germinate(), germinate()),
                                                     sealing.data)
    np.testing.assert_array_equal(np.asarray(info["applied"]), [False, True])
    np.testing.assert_array_equal(np.asarray(state.germinated).sum(-1), [0, 1])
    np.testing.assert_array_equal(np.asarray(state.sealed), [True, False])  # a refused action unseals nothing
    np.testing.assert_array_equal(np.asarray(state.train.lattice.status.stage)[:, 0], [Stage.DORMANT, Stage.GERMINATED])
    _, state = sealing.population_reset(sealing.keys(2, 3), sealing.data)
    assert not np.asarray(state.sealed).any()
