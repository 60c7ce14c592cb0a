"""Orbax checkpoints (esper_jax.runs.checkpoint): exact round trips of typed PRNG keys and optax states
against an abstract target, keep-N, asynchronous saves, and what a killed or damaged save leaves.

The states here are small pytrees shaped like the learner's (struct dataclass, optax chain with
``inject_hyperparams``, threefry and rbg keys, int32 counters): nothing here compiles a model.
The whole learner state is round-tripped by the resume test in test_ppo_cli.py."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from esper_jax.runs.checkpoint import Checkpointer, CheckpointError, abstract_like, has_checkpoint, incomplete_checkpoints


@struct.dataclass
class State:
    params: dict
    opt_state: object
    key: jax.Array
    rbg_key: jax.Array
    update: jax.Array
    done: jax.Array


TX = optax.chain(optax.clip_by_global_norm(5.0), optax.inject_hyperparams(optax.adam)(learning_rate=3e-4))


def make_state(seed: int) -> State:
    rng = np.random.default_rng(seed)
    params = {"w": jax.device_put(rng.standard_normal((3, 4)).astype(np.float32)),
              "b": jax.device_put(np.zeros((4,), np.float32))}
    opt_state = TX.init(params)
    # a few Adam steps so that the moments and the count are not their initial values
    for _ in range(2):
        grads = jax.tree.map(lambda p: jax.device_put(rng.standard_normal(p.shape).astype(np.float32)), params)
        updates, opt_state = TX.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return State(params, opt_state, jax.random.split(jax.random.key(seed), 3), jax.random.key(seed, impl="rbg"),
                 jnp.int32(seed), jnp.array([True, False]))


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)

    def check(x, y):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    jax.tree.map(check, a, b)


def test_round_trip_keeps_types_keys_and_optimizer_state(tmp_path):
    state = make_state(7)
    with Checkpointer(tmp_path / "ckpt", keep=3) as ckpt:
        ckpt.save(5, state)
        ckpt.wait()
        step, restored = ckpt.restore(make_state(0))  # target: a state of the same structure
    assert step == 5
    assert_same(restored, state)
    # optax states come back as their own types (not lists): the optimizer continues from them
    inner = restored.opt_state[1]
    assert type(inner) is type(state.opt_state[1])
    assert float(inner.hyperparams["learning_rate"]) == pytest.approx(3e-4)
    # restored keys are keys: they split like the originals
    np.testing.assert_array_equal(jax.random.key_data(jax.random.split(restored.key[0])),
                                  jax.random.key_data(jax.random.split(state.key[0])))


def test_abstract_target_from_eval_shape(tmp_path):
    """Restoring needs only shapes: an ``eval_shape`` target (what load_run uses) works."""
    state = make_state(3)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        target = jax.eval_shape(lambda: make_state(3))
        assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(abstract_like(target)))
        _, restored = ckpt.restore(target)
    assert_same(restored, state)


def test_only_restores_the_named_fields_of_a_state_whose_other_parts_changed(tmp_path):
    state = make_state(4)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        changed = make_state(0).replace(done=jnp.zeros((5,), jnp.uint32))
        with pytest.raises(CheckpointError, match="cannot be restored"):
            ckpt.restore(changed)
        target = jax.eval_shape(lambda: changed)
        step, restored = ckpt.restore(target, only=("params", "opt_state", "key", "update"))
    assert step == 1 and restored.done is None and restored.rbg_key is None
    for name in ("params", "opt_state", "key", "update"):
        assert_same(getattr(restored, name), getattr(state, name))
    assert type(restored.opt_state[1]) is type(state.opt_state[1])


def test_async_saves_keep_newest_and_reopen(tmp_path):
    directory = tmp_path / "ckpt"
    states = {step: make_state(step) for step in (2, 4, 6, 8)}
    with Checkpointer(directory, keep=2) as ckpt:
        for step, state in states.items():
            ckpt.save(step, state)  # returns before the files are written
    # close() waited for every save
    reopened = Checkpointer(directory, read_only=True)
    assert reopened.steps() == [6, 8] and reopened.latest_step() == 8
    _, restored = reopened.restore(states[2], step=6)
    assert_same(restored, states[6])
    with pytest.raises(CheckpointError, match="no checkpoint for update 4"):
        reopened.restore(states[2], step=4)


def test_killed_save_is_ignored_and_damaged_checkpoint_is_reported(tmp_path):
    directory = tmp_path / "ckpt"
    with Checkpointer(directory, keep=5) as ckpt:
        ckpt.save(2, make_state(2))
        ckpt.save(4, make_state(4))
    # A save killed half-way leaves Orbax's temporary directory: never a step.
    shutil.copytree(directory / "4", directory / "6.orbax-checkpoint-tmp-1700000000")
    assert incomplete_checkpoints(directory)
    reader = Checkpointer(directory, read_only=True)
    assert reader.latest_step() == 4
    step, restored = reader.restore(make_state(0))
    assert step == 4
    assert_same(restored, make_state(4))
    # Opening for writing removes the leftover.
    Checkpointer(directory, keep=5).close()
    assert not incomplete_checkpoints(directory)

    # A complete-looking step whose files are damaged: a clear error naming what to do.
    shutil.copytree(directory / "4", directory / "8")
    for path in (directory / "8").rglob("*"):
        if path.is_file() and path.stat().st_size:
            path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"update 8 .* cannot be restored.*delete .*8 to resume from update 4"):
        Checkpointer(directory, read_only=True).restore(make_state(0))


def test_empty_missing_and_mismatched(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        Checkpointer(tmp_path / "missing", read_only=True)
    empty = tmp_path / "empty"
    with Checkpointer(empty) as ckpt:
        assert ckpt.latest_step() is None and not has_checkpoint(empty)
        with pytest.raises(CheckpointError, match="no complete checkpoint"):
            ckpt.restore(make_state(0))
        ckpt.save(1, make_state(1))
        ckpt.wait()
        assert has_checkpoint(empty)
        other = {"params": {"w": jnp.zeros((5, 5))}}  # a different structure: not silently accepted
        with pytest.raises(CheckpointError, match="cannot be restored"):
            ckpt.restore(other)


def test_a_save_the_disk_refuses_is_one_error_naming_the_intact_checkpoint(tmp_path, monkeypatch):
    """A full disk during an (asynchronous) save: one CheckpointError saying so and naming the
    newest complete checkpoint, which stays restorable; closing does not raise it again."""
    import errno

    state = make_state(0)
    with Checkpointer(tmp_path / "ckpt", keep=3) as ckpt:
        ckpt.save(1, state)
        ckpt.wait()

        def full(*args, **kwargs):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as cause:
                raise RuntimeError("async save failed") from cause  # how a writer thread's failure arrives

        monkeypatch.setattr(ckpt._manager, "save", full)
        with pytest.raises(CheckpointError, match=r"No space left on device; the checkpoint at update 1 is complete"):
            ckpt.save(2, state)
        assert ckpt.failed
    monkeypatch.undo()
    with Checkpointer(tmp_path / "ckpt", read_only=True) as reader:
        step, restored = reader.restore(abstract_like(state))
    assert step == 1
    assert_same(restored, state)


def test_refused_writes_are_recognized_in_the_forms_orbax_reports_them():
    """A full disk reaches us as an OSError, or from TensorStore's writer threads as a ValueError
    carrying the OS error code (as measured on a full tmpfs); the writer threads' logged
    tracebacks for it are dropped, other errors are kept."""
    import errno
    import logging

    from esper_jax.runs.checkpoint import _QUIET, write_failure_reason

    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to write 10071 bytes '
                             "to file 15: No space left on device [os_error_code='28']")
    assert write_failure_reason(tensorstore) == os.strerror(errno.ENOSPC)
    assert write_failure_reason(OSError(errno.EDQUOT, "Disk quota exceeded")) == "Disk quota exceeded"
    try:
        try:
            raise tensorstore
        except ValueError as inner:
            raise RuntimeError("Save Finalize thread failed") from inner
    except RuntimeError as outer:
        wrapped = outer
    assert write_failure_reason(wrapped) == os.strerror(errno.ENOSPC)
    assert write_failure_reason(ValueError("shapes do not match")) is None

    def record(message, error=None, level=logging.ERROR):
        return logging.LogRecord("absl", level, __file__, 1, message, None,
                                 (type(error), error, None) if error else None)

    assert not _QUIET.filter(record("_SignalingThread.run() raised an exception", tensorstore))
    assert not _QUIET.filter(record("RESOURCE_EXHAUSTED: Error writing"))
    assert _QUIET.filter(record("something else broke", ValueError("bad")))
    assert _QUIET.filter(record("RESOURCE_EXHAUSTED", level=logging.WARNING))
