"""The actor-critic (esper_jax.rl.policy) and the observation normalizer (esper_jax.rl.normalize):
masked factored sampling, relevance of heads to log-prob and entropy, recurrent carry resets,
running statistics against NumPy. No environment: everything here compiles in seconds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esper_jax.rl import normalize
from esper_jax.env.actions import HEADS, NUM_OPS, RELEVANT_HEADS, ActionMasks, FactoredAction, Op
from esper_jax.rl.policy import (
    HEAD_RELEVANCE, MASKED_LOGIT, Policy, evaluate_actions, head_entropies, masked_logits, sample_action,
)

from tests.conftest import assert_close_across_programs

SIZES = {"op": NUM_OPS, "slot": 4, "blueprint": 3, "blend": 3, "tempo": 3, "alpha_target": 3}
OBS = 7


def random_masks(rng: np.random.Generator, n: int) -> ActionMasks:
    """Random masks with the structure action_masks guarantees: WAIT always valid (and every
    slot under WAIT), an op valid iff some slot is valid under it, every option head non-empty."""
    slot_given_op = rng.random((n, NUM_OPS, SIZES["slot"])) < 0.4
    slot_given_op[:, Op.WAIT] = True

    def nonempty(size):
        m = rng.random((n, size)) < 0.5
        m[np.arange(n), rng.integers(0, size, n)] = True
        return m

    return ActionMasks(op=jnp.asarray(slot_given_op.any(-1)), slot_given_op=jnp.asarray(slot_given_op),
                       blueprint=jnp.asarray(nonempty(SIZES["blueprint"])), blend=jnp.asarray(nonempty(SIZES["blend"])),
                       tempo=jnp.asarray(nonempty(SIZES["tempo"])),
                       alpha_target=jnp.asarray(nonempty(SIZES["alpha_target"])))


def adversarial_logits(rng: np.random.Generator, masks: ActionMasks) -> dict:
    """Logits that put huge weight on exactly the masked-out entries."""
    out = {}
    for h in HEADS:
        mask = np.asarray(masks.slot_given_op[:, 1] if h == "slot" else getattr(masks, h))
        out[h] = jnp.asarray(np.where(mask, 0.0, 50.0) + rng.standard_normal(mask.shape), jnp.float32)
    return out


def log_softmax_np(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------- normalizer


def test_normalizer_matches_numpy_over_uneven_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, (n, 5)).astype(np.float32) * np.array([1, 10, 0.1, 1, 1], np.float32)
               for n in (1, 7, 32, 3)]
    batches[1] = batches[1].reshape(7, 1, 5)  # any leading shape
    update = jax.jit(normalize.update)
    stats = normalize.init(5)
    seen = []
    for b in batches:
        stats = update(stats, b)
        seen.append(b.reshape(-1, 5))
        rows = np.concatenate(seen)
        np.testing.assert_allclose(np.asarray(stats.mean), rows.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(stats.var), rows.var(0), rtol=1e-4, atol=1e-5)
        assert float(stats.count) == len(rows)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    expected = np.clip((x - rows.mean(0)) / np.sqrt(rows.var(0) + 1e-8), -10, 10)
    np.testing.assert_allclose(np.asarray(normalize.apply(stats, x)), expected, rtol=1e-4, atol=1e-4)


def test_normalizer_starts_as_identity_and_clips_constant_features():
    stats = normalize.init(3)
    x = jnp.asarray([[1.0, -2.0, 3.0]])
    np.testing.assert_allclose(np.asarray(normalize.apply(stats, x)), np.asarray(x), rtol=1e-6)
    stats = normalize.update(stats, jnp.zeros((10, 3)))  # a feature that has always been 0
    assert np.all(np.asarray(normalize.apply(stats, jnp.ones((1, 3)))) == 10.0)


# ---------------------------------------------------------------------------- heads and masks


def test_relevance_table_matches_relevant_heads():
    for op in Op:
        assert [h for h, r in zip(HEADS, HEAD_RELEVANCE[op]) if r] == list(RELEVANT_HEADS[op])


@pytest.fixture(scope="module")
def sampled():
    """8 random mask sets x 256 samples each, with logits favouring the masked-out entries."""
    rng = np.random.default_rng(1)
    masks = random_masks(rng, 8)
    logits = adversarial_logits(rng, masks)
    rep = lambda t: jax.tree.map(lambda a: jnp.repeat(a, 256, axis=0), t)
    masks, logits = rep(masks), rep(logits)
    action = jax.jit(sample_action)(jax.random.key(0), logits, masks)
    mode = jax.jit(sample_action, static_argnums=3)(jax.random.key(0), logits, masks, True)
    return masks, logits, action, mode


def test_sampled_actions_are_always_valid(sampled):
    masks, _, action, mode = sampled
    for a in (action, mode):
        assert bool(jnp.all(jax.vmap(ActionMasks.is_valid)(masks, a)))
        # The slot was drawn under the sampled op's own mask.
        slot_mask = masks.slot_given_op[jnp.arange(a.op.shape[0]), a.op]
        assert bool(jnp.all(slot_mask[jnp.arange(a.op.shape[0]), a.slot]))
    # Sampling is not degenerate: several ops and slots occur.
    assert len(np.unique(np.asarray(action.op))) >= 3 and len(np.unique(np.asarray(action.slot))) >= 2


def test_masked_entries_have_zero_probability_and_no_gradient(sampled):
    masks, logits, action, _ = sampled

    def mean_log_prob(logits):
        return evaluate_actions(logits, masks, action)[0].mean()

    log_prob, entropies, _ = jax.jit(evaluate_actions)(logits, masks, action)
    assert np.all(np.isfinite(np.asarray(log_prob)))
    assert all(np.all(np.isfinite(np.asarray(e))) for e in entropies.values())
    grads = jax.jit(jax.grad(mean_log_prob))(logits)
    for h in ("op", "blueprint", "blend", "tempo", "alpha_target"):
        assert np.all(np.asarray(grads[h])[~np.asarray(getattr(masks, h))] == 0.0), h


def test_log_prob_and_entropy_count_only_relevant_heads():
    rng = np.random.default_rng(2)
    masks = random_masks(rng, 1)
    logits = {h: jnp.asarray(rng.standard_normal((1, n)), jnp.float32) for h, n in SIZES.items()}
    for op in Op:
        if not bool(masks.op[0, op]):
            continue
        slot = int(np.argmax(np.asarray(masks.slot_given_op[0, op])))
        option = {h: int(np.argmax(np.asarray(getattr(masks, h)[0]))) for h in ("blueprint", "blend", "tempo", "alpha_target")}
        action = FactoredAction(*(jnp.asarray([v], jnp.int32) for v in (op, slot, option["blueprint"], option["blend"],
                                                                       option["tempo"], option["alpha_target"])))
        log_prob, entropies, rel = evaluate_actions(logits, masks, action)
        # NumPy reference: masked log-softmax of the relevant heads only.
        expected_lp, expected_ent, expected_raw = 0.0, {}, {}
        for h in HEADS:
            mask = np.asarray(masks.slot_given_op[0, op] if h == "slot" else getattr(masks, h)[0])
            lsm = np.where(mask, log_softmax_np(np.where(mask, np.asarray(logits[h][0]), -np.inf)), 0.0)
            ent = expected_raw[h] = -np.sum(np.exp(lsm) * lsm * mask)
            index = int(getattr(action, h)[0])
            if h in RELEVANT_HEADS[op]:
                expected_lp += lsm[index]
                expected_ent[h] = ent
            else:
                expected_ent[h] = 0.0
        np.testing.assert_allclose(float(log_prob[0]), expected_lp, rtol=1e-5, atol=1e-5, err_msg=str(op))
        for h in HEADS:
            np.testing.assert_allclose(float(entropies[h][0]), expected_ent[h], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{op.name} {h}")
        # The plain per-head entropies ignore relevance (the slot head still follows the op).
        raw = head_entropies(logits, masks, action.op)
        for h in HEADS:
            np.testing.assert_allclose(float(raw[h][0]), expected_raw[h], rtol=1e-5, atol=1e-6, err_msg=f"{op.name} {h}")


@pytest.mark.cross_program
def test_wait_log_prob_is_the_op_heads_and_other_heads_get_no_gradient():
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 4)
    logits = {h: jnp.asarray(rng.standard_normal((4, n)), jnp.float32) for h, n in SIZES.items()}
    action = FactoredAction(jnp.zeros(4, jnp.int32), *(jnp.asarray(rng.integers(0, SIZES[h], 4), jnp.int32)
                                                       for h in HEADS[1:]))
    log_prob, entropies, _ = jax.jit(evaluate_actions)(logits, masks, action)
    op_lp = jax.nn.log_softmax(masked_logits(logits["op"], masks.op))[:, Op.WAIT]
    # jitted inside evaluate_actions against op by op: two programs (issue 23), so to rounding; a
    # log-softmax of ~5 logits is a few steps off at most, any other head's term adds ~1 nat
    assert_close_across_programs(np.asarray(log_prob), np.asarray(op_lp), ulps=8)
    for h in HEADS[1:]:
        assert np.all(np.asarray(entropies[h]) == 0.0)

    def objective(logits):
        lp, ent, _ = evaluate_actions(logits, masks, action)
        return lp.sum() + sum(ent.values()).sum()

    grads = jax.jit(jax.grad(objective))(logits)
    assert np.any(np.asarray(grads["op"]) != 0)
    for h in HEADS[1:]:
        assert np.all(np.asarray(grads[h]) == 0.0), h


def test_masked_logit_is_far_below_any_real_logit():
    assert MASKED_LOGIT < -1e8 and math.isfinite(MASKED_LOGIT)


# ---------------------------------------------------------------------------- network


@pytest.mark.parametrize("kind", ["none", "lstm", "gru"])
def test_network_shapes_and_initial_policy_is_near_uniform(kind):
    policy = Policy.make(SIZES, hidden_size=16, recurrent=kind)
    params = policy.init(jax.random.key(0), OBS)
    carry, logits, value = jax.jit(policy.apply)(params, policy.initial_carry(5), jnp.ones((5, OBS)), jnp.ones(5, bool))
    assert value.shape == (5,) and {h: l.shape for h, l in logits.items()} == {h: (5, n) for h, n in SIZES.items()}
    assert jax.tree.structure(carry) == jax.tree.structure(policy.initial_carry(5))
    # Small output initialization: every head starts close to uniform.
    for h, l in logits.items():
        assert float(jnp.max(jnp.abs(l))) < 0.2, h


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_carry_resets_where_an_episode_starts(kind):
    policy = Policy.make(SIZES, hidden_size=16, recurrent=kind)
    params = policy.init(jax.random.key(1), OBS)
    rng = np.random.default_rng(4)
    obs = jnp.asarray(rng.standard_normal((6, 3, OBS)), jnp.float32)
    apply = jax.jit(policy.apply)
    # Build a non-trivial carry by running a few steps.
    carry = policy.initial_carry(3)
    for t in range(3):
        carry, _, _ = apply(params, carry, obs[t], jnp.zeros(3, bool))
    assert all(float(jnp.abs(c).max()) > 0 for c in jax.tree.leaves(carry))
    start = jnp.asarray([True, False, True])
    _, logits, value = apply(params, carry, obs[3], start)
    _, fresh_logits, fresh_value = apply(params, policy.initial_carry(3), obs[3], jnp.ones(3, bool))
    _, kept_logits, kept_value = apply(params, carry, obs[3], jnp.zeros(3, bool))
    for i in range(3):
        ref_v, ref_l = (fresh_value, fresh_logits) if bool(start[i]) else (kept_value, kept_logits)
        np.testing.assert_allclose(float(value[i]), float(ref_v[i]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(logits["op"][i]), np.asarray(ref_l["op"][i]), rtol=1e-6, atol=1e-6)
    # The reset matters: the carried state changes the output of env 1.
    assert not np.allclose(np.asarray(kept_value[1]), np.asarray(fresh_value[1]), atol=1e-6)

    # unroll = the same steps one at a time (with a reset in the middle of the sequence).
    starts = jnp.asarray(rng.random((6, 3)) < 0.3)
    final, seq_logits, seq_values = jax.jit(policy.unroll)(params, policy.initial_carry(3), obs, starts)
    c = policy.initial_carry(3)
    for t in range(6):
        c, l, v = apply(params, c, obs[t], starts[t])
        np.testing.assert_allclose(np.asarray(seq_values[t]), np.asarray(v), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(seq_logits["slot"][t]), np.asarray(l["slot"]), rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), final, c)


def test_policy_rejects_unknown_recurrent_kind():
    with pytest.raises(ValueError, match="recurrent"):
        Policy.make(SIZES, recurrent="transformer")


@pytest.mark.parametrize("kind", ["none", "gru"])
def test_init_gives_scaled_orthogonal_kernels_and_zero_biases(kind):
    policy = Policy.make(SIZES, hidden_size=16, recurrent=kind)
    params = jax.jit(policy.init, static_argnums=1)(jax.random.key(3), 40)
    reference = jax.eval_shape(policy.network.init, jax.random.key(0), policy.initial_carry(1), jnp.zeros((1, 40)),
                               jnp.ones(1, bool))
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference)
    expected = {"torso": math.sqrt(2.0), "head": 0.01, "value": 1.0, "gru": 1.0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        a = np.asarray(leaf, np.float64)
        if names[-1] == "bias":
            assert not a.any(), names
            continue
        gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
        scale = expected[names[1].split("_")[0]]
        np.testing.assert_allclose(gram, scale ** 2 * np.eye(len(gram)), atol=1e-5 * max(1.0, scale ** 2), err_msg=str(names))
    other = jax.jit(policy.init, static_argnums=1)(jax.random.key(4), 40)
    assert not np.allclose(np.asarray(other["params"]["torso_0"]["kernel"]), np.asarray(params["params"]["torso_0"]["kernel"]))
