"""Orbax checkpoints of the whole learner state: save between jitted chunks, resume exactly.

This module owns :class:`Checkpointer`, a thin wrapper over ``orbax.checkpoint.CheckpointManager``
that stores one pytree (the learner's ``RunnerState``: parameters, optimizer state, observation
statistics, the environment population, PRNG keys, the update counter) per step, where the step
is the number of updates done. What it adds to Orbax:

* **Restores against an abstract target** (``jax.ShapeDtypeStruct`` leaves, with shardings where
  the state is sharded). Without one, Orbax hands optax states back as plain lists and typed PRNG
  keys as raw data (checked with orbax-checkpoint on jax 0.10); with one they round-trip exactly.
* **Asynchronous saves.** ``save`` returns once the arrays are copied off the device; the files
  are written in the background while the next chunk trains. ``wait`` (and ``close``) block until
  every pending save is on disk, so callers wait before exiting, also on Ctrl-C.
* **Only complete checkpoints count.** Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*``
  and renames it when finished, so a run killed while saving leaves a temporary directory that is
  never listed as a step (and is removed the next time the directory is opened for writing).
  A step directory whose files are damaged is reported as a :class:`CheckpointError` naming the
  directory and the previous good step, never silently skipped: that would quietly throw away
  training the user may want to recover.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(Exception):
    """A checkpoint directory that cannot be used: missing, empty, damaged, or of another shape."""


def abstract_like(state: Any) -> Any:
    """The restore target for a state like ``state``: shapes, dtypes and shardings, no values.

    ``state`` may hold arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``). Leaves
    without a sharding go to the default device: a checkpoint written from several devices then
    restores on one (Orbax would otherwise insist on the devices it was saved from)."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(leaf):
        struct = ocp.utils.to_shape_dtype_struct(leaf)
        if getattr(struct, "sharding", None) is None:
            struct = jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=default)
        return struct

    return jax.tree.map(target, state)


def incomplete_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """Temporary step directories a save left behind when it was interrupted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and ocp.utils.TMP_DIR_SUFFIX in p.name)


def has_checkpoint(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds at least one complete step (without opening a manager)."""
    directory = Path(directory)
    return directory.is_dir() and any(p.is_dir() and p.name.isdigit() for p in directory.iterdir())


# How Orbax reports a write the file system refused: an OSError, or (from TensorStore's writer
# threads) a ValueError "RESOURCE_EXHAUSTED: ... [os_error_code='28']".
_WRITE_REFUSED = re.compile(r"RESOURCE_EXHAUSTED|os_error_code='(\d+)'|No space left on device|Disk quota exceeded")


def write_failure_reason(error: BaseException | None) -> str | None:
    """Why a save could not be written ("No space left on device", ...), from ``error`` and its
    causes; None when ``error`` is not a refused write."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            return error.strerror or str(error)
        match = _WRITE_REFUSED.search(str(error))
        if match:
            code = re.search(r"os_error_code='(\d+)'", str(error))
            return os.strerror(int(code.group(1))) if code else match.group(0)
        error = error.__cause__ or error.__context__
    return None


class _QuietRefusedWrites(logging.Filter):
    """Orbax's writer threads log a traceback for each part of a save the disk refused; the save's
    caller gets the failure once, as a :class:`CheckpointError`, so those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        error = record.exc_info[1] if record.exc_info else None
        return write_failure_reason(error) is None and not _WRITE_REFUSED.search(record.getMessage())


_QUIET = _QuietRefusedWrites()


class Checkpointer:
    """Saves and restores one pytree per step under ``directory``, keeping the newest ``keep``.

    ``read_only`` opens an existing directory without creating, cleaning or deleting anything
    (for evaluation and inspection)."""

    def __init__(self, directory: str | os.PathLike[str], keep: int | None = None, *, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self._failed = False
        logging.getLogger("absl").addFilter(_QUIET)  # once: a filter is added only if not there yet
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        if not read_only and jax.process_index() == 0:
            # A killed save leaves <step>.orbax-checkpoint-tmp-*: never listed as a step; a writer
            # removes it. (Orbax's own cleanup option runs in the background, and a reader after
            # us could still see the directory.) One writer per run directory is assumed; over several
            # processes, process 0 is it.
            for path in incomplete_checkpoints(self.directory):
                shutil.rmtree(path, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=True,
        )
        quiet = logging.getLogger("absl")
        level = quiet.level
        if read_only:  # Orbax warns that a read-only manager will not save: that is the point
            quiet.setLevel(logging.ERROR)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            quiet.setLevel(level)

    # ------------------------------------------------------------------ queries

    def steps(self) -> list[int]:
        """Complete steps, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ save / restore

    def save(self, step: int, state: Any) -> None:
        """Start saving ``state`` as ``step``; returns once the arrays are off the device. A save
        that cannot be written (a full disk) is a :class:`CheckpointError` saying which complete
        checkpoint is intact; an earlier asynchronous save's failure surfaces here or in :meth:`wait`."""
        try:
            self._manager.save(int(step), args=ocp.args.StandardSave(state))
        except Exception as error:  # noqa: BLE001 - only a write failure is translated
            raise self._write_failure(error) or error

    def wait(self) -> None:
        """Block until every pending save is complete on disk."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            raise self._write_failure(error) or error

    def _write_failure(self, error: BaseException) -> CheckpointError | None:
        """A :class:`CheckpointError` for a save that failed because the disk refused the write,
        or None for anything else."""
        reason = write_failure_reason(error)
        if reason is None:
            return None
        self._failed = True
        latest = self.latest_step()
        intact = (f"the checkpoint at update {latest} is complete and intact" if latest is not None
                  else "no complete checkpoint was written yet")
        return CheckpointError(f"saving a checkpoint in {self.directory} failed: {reason}; {intact}; "
                               f"free space and continue with --resume")

    def restore(self, target: Any, step: int | None = None, *, only: tuple[str, ...] | None = None) -> tuple[int, Any]:
        """Restore ``step`` (default: the newest complete one) as ``(step, state)``.

        ``target`` is a state of the right structure (arrays or ``ShapeDtypeStruct`` leaves); the
        result has its structure, dtypes and shardings. ``only``: restore just these fields of a
        dataclass target and leave the others ``None`` (evaluation needs the policy, not the
        training envs, so a checkpoint whose env state predates a change of its layout still
        loads). Errors name the directory and what to do."""
        steps = self.steps()
        if not steps:
            hint = ""
            if incomplete_checkpoints(self.directory):
                hint = " (only an incomplete save was found: the run was stopped before its first checkpoint finished)"
            raise CheckpointError(f"no complete checkpoint in {self.directory}{hint}")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise CheckpointError(f"no checkpoint for update {step} in {self.directory}; available: {steps}")
        earlier = [s for s in steps if s < step]
        try:
            if only is None:
                state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_like(target)))
            else:
                part = {name: abstract_like(getattr(target, name)) for name in only}
                # A checkpointer of its own (the manager's item is registered with the standard handler,
                # which has no partial restore), reading the manager's single item directly.
                item = self.directory / str(step) / ocp.checkpoint_manager.DEFAULT_ITEM_NAME
                with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
                    restored = reader.restore(item, args=ocp.args.PyTreeRestore(
                        part, restore_args=ocp.checkpoint_utils.construct_restore_args(part), partial_restore=True))
                state = target.replace(**{f.name: restored[f.name] if f.name in only else None
                                          for f in dataclasses.fields(target)})
        except Exception as error:  # Orbax raises many types (JSON, tensorstore, tree mismatch)
            where = self.directory / str(step)
            advice = (f"delete {where} to resume from update {earlier[-1]}" if earlier
                      else "no earlier checkpoint is left to fall back on")
            detail = " ".join(f"{type(error).__name__}: {error}".split())[:300]
            raise CheckpointError(
                f"checkpoint at update {step} ({where}) cannot be restored: it is damaged or was written by a "
                f"different configuration ({detail}); {advice}") from error
        return step, state

    def close(self) -> None:
        """Wait for pending saves and release the manager's threads (after a failed save, the
        failure has been reported: its remains are not raised again)."""
        reported = self._failed
        try:
            self.wait()
        except CheckpointError:
            if not reported:
                raise
        finally:
            self._manager.close()

    @property
    def failed(self) -> bool:
        """Whether a save failed to be written (already reported as a :class:`CheckpointError`)."""
        return self._failed

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
