"""Loading a run for evaluation: :func:`load_run` rebuilds env, data and learner from a run
directory and restores a checkpoint (:class:`RunHandle`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from esper_jax.env.problems import ProblemFamily
from esper_jax.runs.build import Built, build, make_programs
from esper_jax.runs.checkpoint import Checkpointer
from esper_jax.runs.config import RunConfig, read_config
from esper_jax.runs.rundir import CHECKPOINT_DIR, METRICS_FILE, SUMMARY_FILE, read_json, read_rows
from esper_jax.trees import take



# What evaluation restores of a checkpoint: the learner, not its training envs (env_state, obs, the
# policy's carry and the running episodes are None), so a run saved before the env state's layout
# changed still evaluates.
LEARNER_FIELDS = ("params", "opt_state", "obs_stats", "key", "update", "hyper")


@dataclasses.dataclass
class RunHandle(Built):
    """A run directory, rebuilt (everything :class:`~esper_jax.runs.build.Built` holds), with the
    restored learner state of a checkpoint with its population axis (``state`` leaves ``[P, ...]``;
    only :data:`LEARNER_FIELDS`)."""

    run_dir: Path
    state: Any
    step: int                    # updates done at this checkpoint
    summary: dict[str, Any] | None

    @property
    def best_member(self) -> int:
        """The summary's best member (member 0 if the run has no summary yet)."""
        best = (self.summary or {}).get("best_member")
        return 0 if best is None else int(best)

    def member_state(self, member: int):
        """The learner state of one member (no population axis)."""
        if not 0 <= member < self.population:
            raise IndexError(f"member {member} out of range: the run has {self.population}")
        return take(self.state, member)

    def policy_is_finite(self, member: int) -> bool:
        """Whether the member's policy parameters and observation statistics are all finite (a
        diverged learner's are not, and must not be evaluated as if it were a controller)."""
        state = self.member_state(member)
        return all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves((state.params, state.obs_stats)))

    def metrics(self) -> list[dict[str, Any]]:
        return read_rows(self.run_dir / METRICS_FILE)


def load_run(run_dir: str | os.PathLike[str], *, step: int | None = None, data: str | None = None,
             data_dir: str | None = None, problems: ProblemFamily | None = None,
             config: RunConfig | None = None) -> RunHandle:
    """Rebuild a run and restore a checkpoint (default: the newest complete one).

    ``data``/``data_dir`` read the dataset from elsewhere than the run did (e.g. ``data="synthetic"``,
    or the real dataset's directory on another machine). ``problems``: the envs draw their problems
    from another family than the run's, a stratum of it (:meth:`~esper_jax.env.problems.ProblemFamily.stratum`).
    ``config``: build this configuration instead of the run's and restore the run's learner into it
    (another task's, :func:`esper_jax.runs.transfer.transfer_config`). Raises
    :class:`~esper_jax.runs.config.RunConfigError` or :class:`~esper_jax.runs.checkpoint.CheckpointError`
    with a one-line message when the directory is not a usable run."""
    run_dir = Path(run_dir)
    built = build(config or read_config(run_dir), data=data, data_dir=data_dir, problems=problems)
    programs = make_programs(built)
    with Checkpointer(run_dir / CHECKPOINT_DIR, read_only=True) as checkpointer:
        restored_step, state = checkpointer.restore(programs.abstract_state, step, only=LEARNER_FIELDS)
    summary_path = run_dir / SUMMARY_FILE
    fields = {f.name: getattr(built, f.name) for f in dataclasses.fields(Built)}
    return RunHandle(**fields, run_dir=run_dir, state=state, step=restored_step,
                     summary=read_json(summary_path) if summary_path.exists() else None)
