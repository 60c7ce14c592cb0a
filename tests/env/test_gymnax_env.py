"""The gymnax adapter (:mod:`esper_jax.env.gymnax_env`) on the tiny environment of ``env_rig``.

The default tests compile the adapter's vmapped reset and small functions of the actions only:
spaces against what reset returns, the flat decoding, which action runs. One vmapped adapter step
compiles the env's epoch with gymnax's auto-reset in it, about 30 s of CPU on the 2-core test
machine, so the tests that step are marked slow: factored actions, auto-reset and "illegal runs as
WAIT" share one compiled step, and the PureJaxRL-style PPO loop (flat encoding, one categorical
head, the env stepped inside ``lax.scan`` under ``jit`` as PureJaxRL runs it) compiles its own.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gymnax = pytest.importorskip("gymnax")

from gymnax.environments import spaces  # noqa: E402
from gymnax.wrappers import LogWrapper  # noqa: E402

from esper_jax.data.datasets import OptionalDependencyError  # noqa: E402
from esper_jax.env.actions import HEADS, FactoredAction, Op  # noqa: E402
from esper_jax.env.gymnax_env import GYMNAX_INTERFACE, GrowthGymnaxEnv  # noqa: E402

from tests.env_rig import EPISODE_EPOCHS, member, stack_members, tiny_env  # noqa: E402

OPS = int(Op.SEAL)  # the tiny env's op head: the six ops (no SEAL option)

ENVS = 2
# The stepping tests below unpack gymnax 1.0's six values; the 0.0.x-style loop has a test of its own.
needs_gymnax_1 = pytest.mark.skipif(GYMNAX_INTERFACE != "1.0", reason="written against gymnax 1.0's step")


def keys(*seeds: int) -> jax.Array:
    """rbg keys: the adapter is PRNG-agnostic, and initializing seeds compiles faster with rbg."""
    return jnp.stack([jax.random.key(s, impl="rbg") for s in seeds])


def np_tree(tree):
    return jax.tree.map(np.asarray, tree)


def factored_dict(action: FactoredAction) -> dict[str, jax.Array]:
    return {head: getattr(action, head) for head in HEADS}


@pytest.fixture(scope="module")
def tiny():
    return tiny_env()


@pytest.fixture(scope="module")
def flat(tiny) -> GrowthGymnaxEnv:
    return GrowthGymnaxEnv(tiny.env, tiny.data, "flat")


@pytest.fixture(scope="module")
def factored(tiny) -> GrowthGymnaxEnv:
    return GrowthGymnaxEnv(tiny.env, tiny.data, "factored")


@pytest.fixture(scope="module")
def params(flat):
    return flat.default_params


@pytest.fixture(scope="module")
def reset(flat, params):
    """``(obs, state)`` of ENVS fresh envs from one jitted, vmapped reset (the state is the same
    for either encoding)."""
    return jax.jit(jax.vmap(flat.reset, in_axes=(0, None)))(keys(0, 1), params)


@pytest.fixture(scope="module")
def executed(flat, factored):
    """``executed_action`` of each encoding, vmapped over envs and jitted."""
    return {env.encoding: jax.jit(jax.vmap(env.executed_action)) for env in (flat, factored)}


# ---------------------------------------------------------------------------- spaces


def test_spaces_describe_what_the_env_returns(tiny, flat, factored, params, reset):
    obs, state = reset
    heads = tiny.env.action_space.head_sizes()
    n = math.prod(heads.values())
    assert flat.num_actions == factored.num_actions == n == OPS * 1 * 2 * 7 * 3 * 3
    space = flat.action_space(params)
    assert isinstance(space, spaces.Discrete) and space.n == n
    space = factored.action_space(params)
    assert isinstance(space, spaces.Dict) and list(space.spaces) == list(HEADS)
    assert {h: s.n for h, s in space.spaces.items()} == heads
    observation_space = flat.observation_space(params)
    assert obs.shape == (ENVS,) + observation_space.shape and obs.dtype == observation_space.dtype
    assert observation_space.shape == (tiny.env.observation_size,)
    assert params.max_steps_in_episode == EPISODE_EPOCHS and params.data is tiny.data
    state_space = flat.state_space(params)
    for i in range(ENVS):
        assert bool(observation_space.contains(obs[i]))
        assert bool(state_space.contains(member(state, i)))
    np.testing.assert_array_equal(np.asarray(state.time), [0, 0])
    # the space's bounds are checked, not ignored
    assert not bool(observation_space.contains(jnp.full(obs.shape[1:], jnp.nan)))
    assert not bool(state_space.contains(member(state, 0).replace(time=jnp.int32(EPISODE_EPOCHS + 1))))
    assert flat.name == "EsperGrowth-cifar10"


def test_sampled_actions_are_in_the_action_space(flat, factored, params):
    sample_keys = jax.random.split(jax.random.key(3), 64)
    flat_space, dict_space = flat.action_space(params), factored.action_space(params)
    indices = jax.vmap(flat_space.sample)(sample_keys)
    assert indices.shape == (64,) and indices.dtype == flat_space.dtype
    assert np.asarray(jax.vmap(flat_space.contains)(indices)).all()
    assert not np.asarray(flat_space.contains(jnp.asarray([-1, flat.num_actions]))).any()
    sampled = jax.vmap(dict_space.sample)(sample_keys)
    assert list(sampled) == list(HEADS)
    # gymnax's Dict.contains reads the entries as attributes: a FactoredAction has them
    as_actions = FactoredAction(**sampled)
    assert np.asarray(jax.vmap(dict_space.contains)(as_actions)).all()
    assert not bool(dict_space.contains(FactoredAction.make(op=OPS)))


# ---------------------------------------------------------------------------- actions


def test_flat_decoding_is_mixed_radix_in_head_order(flat):
    sizes = tuple(flat.head_sizes.values())
    every = jnp.arange(flat.num_actions, dtype=jnp.int32)
    decoded = np_tree(jax.jit(jax.vmap(flat.factored))(every))
    for head, digits in zip(HEADS, np.unravel_index(np.arange(flat.num_actions), sizes)):
        np.testing.assert_array_equal(getattr(decoded, head), digits, err_msg=head)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(flat.flat_index))(decoded)), np.arange(flat.num_actions))
    # the op is the most significant digit and alpha_target the least
    assert int(flat.flat_index(FactoredAction.make(op=Op.GERMINATE))) == flat.num_actions // OPS
    assert int(flat.flat_index(FactoredAction.make(alpha_target=1))) == 1


def test_an_illegal_action_runs_as_wait(flat, factored, params, reset, executed):
    """In a fresh episode (the slot dormant) WAIT and GERMINATE are legal, nothing else; an
    illegal or out-of-range action runs as WAIT, in either encoding."""
    _, state = reset
    masks = jax.vmap(flat.action_masks)(state)
    np.testing.assert_array_equal(np.asarray(masks.op), [[True, True, False, False, False, False]] * ENVS)
    germinate = FactoredAction.make(Op.GERMINATE, slot=0, blueprint=1, blend=2, tempo=1, alpha_target=2)
    fossilize = FactoredAction.make(Op.FOSSILIZE, slot=0)
    wait = np_tree(FactoredAction.wait())

    def check(encoding, given, legal, expected):
        taken, valid = executed[encoding](state, given)
        np.testing.assert_array_equal(np.asarray(valid), legal, err_msg=encoding)
        for head in HEADS:
            want = [int(getattr(expected if ok else wait, head)) for ok in legal]
            np.testing.assert_array_equal(np.asarray(getattr(taken, head)), want, err_msg=f"{encoding} {head}")

    for action, legal in ((germinate, True), (fossilize, False)):
        check("flat", jnp.stack([flat.flat_index(action)] * ENVS), [legal] * ENVS, np_tree(action))
        check("factored", stack_members(factored_dict(action), factored_dict(action)), [legal] * ENVS, np_tree(action))
    # out of range: a third blueprint (there are two), flat indices outside [0, n)
    beyond = FactoredAction.make(Op.GERMINATE, slot=0, blueprint=2)
    check("factored", stack_members(factored_dict(beyond), factored_dict(germinate)), [False, True], np_tree(germinate))
    check("flat", jnp.asarray([-1, flat.num_actions], jnp.int32), [False, False], wait)
    # the flat mask says which indices are legal: every index with op WAIT or GERMINATE here
    flat_mask = np.asarray(jax.jit(jax.vmap(flat.flat_action_mask))(state))
    assert flat_mask.shape == (ENVS, flat.num_actions)
    ops = np.unravel_index(np.arange(flat.num_actions), tuple(flat.head_sizes.values()))[0]
    np.testing.assert_array_equal(flat_mask, np.stack([np.isin(ops, (Op.WAIT, Op.GERMINATE))] * ENVS))


def test_bad_actions_and_encodings_are_one_line(tiny, factored, reset):
    _, state = reset
    one = member(state, 0)
    with pytest.raises(ValueError, match="exactly the heads op, slot, blueprint, blend, tempo, alpha_target; got"):
        factored.executed_action(one, {"op": 1})
    with pytest.raises(ValueError, match="unknown action encoding 'onehot'; choose one of factored, flat"):
        GrowthGymnaxEnv(tiny.env, tiny.data, "onehot")


def test_without_gymnax_the_import_says_how_to_install_it(monkeypatch):
    for name in [m for m in sys.modules if m == "gymnax" or m.startswith("gymnax.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "gymnax", None)
    monkeypatch.delitem(sys.modules, "esper_jax.env.gymnax_env")
    with pytest.raises(OptionalDependencyError) as error:
        importlib.import_module("esper_jax.env.gymnax_env")
    assert str(error.value) == 'esper_jax.env.gymnax_env needs gymnax: pip install -e ".[gymnax]"'


def test_the_interface_is_the_installed_gymnax_s():
    from importlib.metadata import version

    major = version("gymnax").split(".")[0]
    assert GYMNAX_INTERFACE == ("0.0" if major == "0" else "1.0")


# ---------------------------------------------------------------------------- stepping (slow)


@pytest.fixture(scope="module")
def factored_step(factored):
    return jax.jit(jax.vmap(factored.step, in_axes=(0, 0, 0, None)))


@pytest.mark.slow
@needs_gymnax_1
def test_factored_actions_step_and_episodes_reset_themselves(tiny, factored, params, reset, factored_step):
    """Dict actions under vmap and jit; after EPISODE_EPOCHS steps the episode terminates (also
    gymnax's time limit), the env resets itself, and ``info``'s masks are the new state's."""
    obs, state = reset
    epoch = tiny.env.feature_names().index("epoch_fraction")
    wait = jax.tree.map(lambda a: jnp.stack([a] * ENVS), factored_dict(FactoredAction.wait()))
    germinate = dict(wait, op=jnp.asarray([Op.GERMINATE, Op.WAIT], jnp.int32))
    for t in range(1, EPISODE_EPOCHS + 2):
        action = germinate if t == 1 else wait
        new_obs, new_state, reward, terminated, truncated, info = factored_step(keys(10 + t, 20 + t), state, action, params)
        ended = t == EPISODE_EPOCHS
        np.testing.assert_array_equal(np.asarray(terminated), [ended] * ENVS)
        np.testing.assert_array_equal(np.asarray(truncated), [ended] * ENVS)
        assert np.isfinite(np.asarray(reward)).all() and np.asarray(info["valid"]).all()
        time = 0 if ended else t % EPISODE_EPOCHS
        np.testing.assert_array_equal(np.asarray(new_state.time), [time] * ENVS)
        np.testing.assert_array_equal(np.asarray(new_state.inner.epoch), [time] * ENVS)
        np.testing.assert_allclose(np.asarray(new_obs)[:, epoch], time / EPISODE_EPOCHS, rtol=1e-6)
        # the observation before the reset is kept for learners that bootstrap from it
        stepped = t if t <= EPISODE_EPOCHS else t - EPISODE_EPOCHS
        np.testing.assert_allclose(np.asarray(info["final_observation"])[:, epoch], stepped / EPISODE_EPOCHS, rtol=1e-6)
        masks = np_tree(jax.vmap(factored.action_masks)(new_state))
        jax.tree.map(np.testing.assert_array_equal, np_tree(info["masks"]), masks)
        assert "flat_mask" not in info
        if t == 1:  # env 0 germinated: its slot is no longer free
            np.testing.assert_array_equal(np.asarray(new_state.inner.germinated).sum(-1), [1, 0])
            np.testing.assert_array_equal(masks.op[:, Op.GERMINATE], [False, True])
        if ended:  # a fresh episode: nothing planted, germination legal again
            assert not np.asarray(new_state.inner.germinated).any() and masks.op[:, Op.GERMINATE].all()
        for i in range(ENVS):
            assert bool(factored.observation_space(params).contains(new_obs[i]))
        obs, state = new_obs, new_state


@pytest.mark.slow
@needs_gymnax_1
def test_an_illegal_action_steps_exactly_like_wait(factored, params, reset, factored_step):
    """Env 0 asks for an illegal FOSSILIZE, then for WAIT, from the same state with the same keys
    (the same batch position: rbg keys draw differently across a vmapped batch)."""
    _, state = reset
    fossilize, wait = factored_dict(FactoredAction.make(Op.FOSSILIZE)), factored_dict(FactoredAction.wait())
    illegal = factored_step(keys(7, 8), state, stack_members(fossilize, wait), params)
    waited = factored_step(keys(7, 8), state, stack_members(wait, wait), params)
    np.testing.assert_array_equal(np.asarray(illegal[5]["valid"]), [False, True])
    np.testing.assert_array_equal(np.asarray(waited[5]["valid"]), [True, True])
    for a, b in zip(jax.tree.leaves(illegal[:5]), jax.tree.leaves(waited[:5])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(np.asarray(illegal[1].inner.last_op)[0]) == Op.WAIT


# ---------------------------------------------------------------------------- a PureJaxRL-style PPO loop (slow)


class Transition(NamedTuple):
    done: jax.Array
    action: jax.Array
    value: jax.Array
    reward: jax.Array
    log_prob: jax.Array
    obs: jax.Array
    mask: jax.Array
    valid: jax.Array


PPO = dict(num_envs=ENVS, num_steps=2 * EPISODE_EPOCHS, updates=2, update_epochs=2, num_minibatches=2, gamma=0.99,
           gae_lambda=0.95, clip_eps=0.2, ent_coef=0.01, vf_coef=0.5, lr=3e-4, max_grad_norm=0.5, hidden=16)


def make_ppo_train(env: GrowthGymnaxEnv, params):
    """PureJaxRL's PPO (``ppo.py``) cut down: an MLP actor-critic with one categorical head over
    the flat actions, masked by the legal actions the env reports in ``info``, ``LogWrapper``,
    vmapped envs stepped in ``lax.scan``, GAE, minibatch epochs of the clipped loss; one ``jit``."""
    import flax.linen as nn
    import optax

    c = PPO
    env = LogWrapper(env)
    n_actions = env.action_space(params).n

    class ActorCritic(nn.Module):
        @nn.compact
        def __call__(self, x):
            actor = nn.Dense(n_actions)(nn.tanh(nn.Dense(c["hidden"])(x)))
            critic = nn.Dense(1)(nn.tanh(nn.Dense(c["hidden"])(x)))
            return actor, critic[..., 0]

    network = ActorCritic()
    tx = optax.chain(optax.clip_by_global_norm(c["max_grad_norm"]), optax.adam(c["lr"]))

    def log_probs(logits, mask):
        return jax.nn.log_softmax(jnp.where(mask, logits, -1e9))

    def train(key):
        key, k_net, k_reset = jax.random.split(key, 3)
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, c["num_envs"]), params)
        net_params = network.init(k_net, obs)
        opt_state = tx.init(net_params)
        mask = jax.vmap(env.flat_action_mask)(env_state.env_state)  # after a reset, from the state

        def env_step(carry, _):
            net_params, env_state, obs, mask, key = carry
            key, k_act, k_step = jax.random.split(key, 3)
            logits, value = network.apply(net_params, obs)
            logp = log_probs(logits, mask)
            action = jax.random.categorical(k_act, logp)
            obs2, env_state, reward, terminated, truncated, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(k_step, c["num_envs"]), env_state, action, params)
            t = Transition((terminated | truncated).astype(jnp.float32), action, value, reward, jnp.take_along_axis(logp, action[:, None], 1)[:, 0],
                           obs, mask, info["valid"])
            return (net_params, env_state, obs2, info["flat_mask"], key), (t, info["returned_episode_returns"])

        def update(carry, _):
            net_params, opt_state, env_state, obs, mask, key = carry
            (net_params, env_state, obs, mask, key), (traj, returns) = jax.lax.scan(
                env_step, (net_params, env_state, obs, mask, key), None, c["num_steps"])
            _, last_value = network.apply(net_params, obs)

            def gae(carry, t):
                advantage, next_value = carry
                delta = t.reward + c["gamma"] * next_value * (1 - t.done) - t.value
                advantage = delta + c["gamma"] * c["gae_lambda"] * (1 - t.done) * advantage
                return (advantage, t.value), advantage

            _, advantages = jax.lax.scan(gae, (jnp.zeros_like(last_value), last_value), traj, reverse=True)
            targets = advantages + traj.value

            def loss_fn(p, t, adv, target):
                logits, value = network.apply(p, t.obs)
                logp_all = log_probs(logits, t.mask)
                logp = jnp.take_along_axis(logp_all, t.action[:, None], 1)[:, 0]
                ratio = jnp.exp(logp - t.log_prob)
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                actor = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - c["clip_eps"], 1 + c["clip_eps"]) * adv).mean()
                critic = 0.5 * jnp.square(value - target).mean()
                entropy = -jnp.sum(jnp.where(t.mask, jnp.exp(logp_all) * logp_all, 0.0), -1).mean()
                return actor + c["vf_coef"] * critic - c["ent_coef"] * entropy, (actor, critic, entropy)

            def epoch(carry, k):
                net_params, opt_state = carry
                batch = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), (traj, advantages, targets))
                order = jax.random.permutation(k, c["num_steps"] * c["num_envs"])
                minibatches = jax.tree.map(lambda x: x[order].reshape((c["num_minibatches"], -1) + x.shape[1:]), batch)

                def minibatch(carry, mb):
                    net_params, opt_state = carry
                    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(net_params, *mb)
                    updates, opt_state = tx.update(grads, opt_state)
                    return (optax.apply_updates(net_params, updates), opt_state), (loss,) + parts

                return jax.lax.scan(minibatch, (net_params, opt_state), minibatches)

            key, k_epochs = jax.random.split(key)
            (net_params, opt_state), losses = jax.lax.scan(epoch, (net_params, opt_state),
                                                           jax.random.split(k_epochs, c["update_epochs"]))
            return (net_params, opt_state, env_state, obs, mask, key), (losses, traj, returns)

        first = net_params
        carry, (losses, traj, returns) = jax.lax.scan(update, (net_params, opt_state, env_state, obs, mask, key), None,
                                                      c["updates"])
        return first, carry[0], losses, traj, returns

    return jax.jit(train)


@pytest.mark.slow
@needs_gymnax_1
def test_a_purejaxrl_style_ppo_loop_trains_on_it(flat, params):
    before, after, losses, traj, returns = make_ppo_train(flat, params)(jax.random.key(0, impl="rbg"))
    c = PPO
    # every loss of every minibatch is finite, and the parameters moved
    for values in losses:
        assert values.shape == (c["updates"], c["update_epochs"], c["num_minibatches"])
        assert np.isfinite(np.asarray(values)).all()
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    # what the loop saw has the spaces' shapes and lies in them
    leading = (c["updates"], c["num_steps"], c["num_envs"])
    observation_space, action_space = flat.observation_space(params), flat.action_space(params)
    assert traj.obs.shape == leading + observation_space.shape and traj.obs.dtype == observation_space.dtype
    assert traj.action.shape == leading and traj.action.dtype == action_space.dtype
    assert traj.mask.shape == leading + (action_space.n,)
    flat_obs = traj.obs.reshape((-1,) + observation_space.shape)
    assert np.asarray(jax.vmap(observation_space.contains)(flat_obs)).all()
    assert np.asarray(jax.vmap(action_space.contains)(traj.action.reshape(-1))).all()
    # sampled under the masks from info, every action was legal, also right after an auto-reset
    assert np.asarray(traj.valid).all()
    # episodes of EPISODE_EPOCHS steps: done at the end of each, and their returns were logged
    done = np.asarray(traj.done).astype(bool)
    np.testing.assert_array_equal(done, np.broadcast_to(
        (np.arange(c["num_steps"]) % EPISODE_EPOCHS == EPISODE_EPOCHS - 1)[None, :, None], leading))
    assert np.isfinite(np.asarray(returns)).all() and np.abs(np.asarray(returns)[done]).sum() > 0


# ---------------------------------------------------------------------------- both gymnax interfaces (slow)
# .ci/run runs these: the installed gymnax's loop in-process, and the other version's in a subprocess
# with that gymnax on the path (``-k style_loop``).


def _loop_steps(flat, params, unpack):
    """A loop as gymnax code writes it: vmapped, jitted reset and step, a legal action from
    info's mask each step, EPISODE_EPOCHS + 1 steps (one auto-reset); ``unpack`` turns a step's
    values into (obs, state, done, info)."""
    reset = jax.jit(jax.vmap(flat.reset, in_axes=(0, None)))
    step = jax.jit(jax.vmap(flat.step, in_axes=(0, 0, 0, None)))
    obs, state = reset(keys(0, 1), params)
    mask = jax.vmap(flat.flat_action_mask)(state)
    dones, times = [], []
    for t in range(EPISODE_EPOCHS + 1):
        action = jnp.argmax(mask, axis=-1).astype(jnp.int32)  # the first legal action: WAIT
        obs, state, done, info = unpack(step(keys(10 + t, 20 + t), state, action, params))
        assert np.asarray(info["valid"]).all() and obs.shape == (ENVS, flat.env.observation_size)
        mask = info["flat_mask"]
        dones.append(np.asarray(done).tolist())
        times.append(np.asarray(state.time).tolist())
    ended = [[t == EPISODE_EPOCHS - 1] * ENVS for t in range(EPISODE_EPOCHS + 1)]
    assert dones == ended
    assert times == [[(t + 1) % EPISODE_EPOCHS] * ENVS for t in range(EPISODE_EPOCHS)] + [[1] * ENVS]


@pytest.mark.slow
@pytest.mark.skipif(GYMNAX_INTERFACE != "0.0", reason="gymnax 0.0.x is not installed here (see the subprocess test)")
def test_a_gymnax_0_0_style_loop(flat, params):
    def unpack(values):
        obs, state, reward, done, info = values  # gymnax 0.0.x: five values
        assert np.isfinite(np.asarray(reward)).all()
        return obs, state, done, info

    _loop_steps(flat, params, unpack)


@pytest.mark.slow
@needs_gymnax_1
def test_a_gymnax_1_0_style_loop(flat, params):
    def unpack(values):
        obs, state, reward, terminated, truncated, info = values  # gymnax 1.0: six values
        assert "final_observation" in info
        return obs, state, terminated | truncated, info

    _loop_steps(flat, params, unpack)


OTHER_GYMNAX = {"1.0": "gymnax==0.0.9", "0.0": "gymnax==1.0.1"}


@pytest.mark.slow
def test_the_other_gymnax_style_loop_in_a_subprocess(tmp_path):
    """The other gymnax version, installed (without dependencies: both need the same jax, flax and
    gymnasium) into a folder put first on the path, runs its own style's loop."""
    import subprocess

    spec = OTHER_GYMNAX[GYMNAX_INTERFACE]
    target = tmp_path / "other-gymnax"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                              spec], capture_output=True, text=True)
    if install.returncode != 0:
        pytest.skip(f"could not install {spec} from the package index: {install.stderr.strip()[-300:]}")
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-m", "slow", __file__,
                             "-k", "style_loop and not subprocess"], capture_output=True, text=True, env=env,
                            cwd=str(Path(__file__).resolve().parents[2]))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout, result.stdout[-2000:]
