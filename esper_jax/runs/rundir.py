"""The run directory: ``config.json`` (:mod:`esper_jax.runs.config`), ``metrics.jsonl`` (one row
per update; for a population the member mean on top and one entry per member), ``checkpoints/``
(Orbax, :mod:`esper_jax.runs.checkpoint`) and ``summary.json``; how they are written (atomically,
rows before the checkpoint that covers them) and read back.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from esper_jax.runs.checkpoint import has_checkpoint, incomplete_checkpoints
from esper_jax.runs.config import CONFIG_FILE, RunConfig, RunConfigError

METRICS_FILE, SUMMARY_FILE, CHECKPOINT_DIR, LOCK_FILE = "metrics.jsonl", "summary.json", "checkpoints", ".lock"
IMITATION_FILE = "imitation.json"  # the warm start's metrics (--imitate), written before the first checkpoint



def read_json(path: Path) -> Any:
    """A JSON file of the run directory; a damaged one is a :class:`RunConfigError` naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunConfigError(f"{path} is damaged (not valid JSON: {error})") from None


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    """Atomically (write, then rename), so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _json_scalar(value) -> Any:
    value = np.asarray(value)
    if value.dtype == np.bool_:
        return bool(value)
    if np.issubdtype(value.dtype, np.integer):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None  # strict JSON has no NaN


def metric_rows(metrics: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per update from ``{name: [P, U]}``: the member values, and for P > 1 the mean over
    members on top and ``"members"``: one entry per member."""
    names = sorted(metrics, key=lambda n: ({"update": 0, "env_steps": 1}.get(n, 2), n))
    population, updates = np.asarray(metrics["update"]).shape
    rows = []
    for u in range(updates):
        per_member = [{n: _json_scalar(metrics[n][m, u]) for n in names} for m in range(population)]
        if population == 1:
            rows.append(per_member[0])
            continue
        row = {}
        for n in names:
            values = np.asarray(metrics[n][:, u])
            if n in ("update", "env_steps"):  # the same for every member
                row[n] = int(values[0])
            elif n == "nonfinite":  # how many members' learners are no longer finite
                row[n] = int(values.sum())
            else:
                finite = values[np.isfinite(values.astype(np.float64))]
                row[n] = float(finite.astype(np.float64).mean()) if finite.size else None
        row["members"] = per_member
        rows.append(row)
    return rows


def perplexity(loss: float | None) -> float | None:
    """A language model's perplexity, exp of its mean cross-entropy loss; None for a loss that
    is missing or not finite (exp is capped at exp(700), near the end of float64)."""
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(float(loss), 700.0))


def language_model_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a language-model run: validation perplexity (exp of the final validation loss; for
    a population's mean row, exp of the members' mean loss) in place of accuracy, which a language
    model does not have."""
    def fix(row: dict[str, Any]) -> dict[str, Any]:
        loss = row.get("mean_final_val_loss")
        return {**row, "mean_final_val_accuracy": None, "mean_final_val_perplexity": perplexity(loss)}

    out = []
    for row in rows:
        row = fix(row)
        if "members" in row:
            row["members"] = [fix(m) for m in row["members"]]
        out.append(row)
    return out


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())  # rows are on disk before the checkpoint that covers them is started


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a row cut short by a kill: it and anything after are not trusted
    return rows


def truncate_rows(path: Path, updates: int) -> None:
    """Keep the rows of updates ``1..updates`` (those a checkpoint covers), drop the rest."""
    rows = read_rows(path)
    kept = rows[:updates]
    if len(kept) < updates or [r["update"] for r in kept] != list(range(1, updates + 1)):
        raise RunConfigError(f"{path} does not hold rows for updates 1..{updates} (the checkpoint's update); "
                             f"the run directory is inconsistent")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in kept:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)



def default_run_dir(config: RunConfig) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    task = re.sub(r"[^A-Za-z0-9._-]+", "_", config.task)  # one folder, even for tfds:NAME/CONFIG
    return Path("runs") / f"{task}-{config.preset}-{stamp}"


def prepare_run_dir(run_dir: Path, resume: bool) -> bool:
    """A fresh run needs an empty (or new) directory; a resumed one needs a run. Returns whether
    a resumed run has no complete checkpoint (it stopped before its first save finished): it then
    starts from update 0 with its stored configuration, since nothing trained was saved."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise RunConfigError(in_use_message(run_dir, holder))
    if resume:
        if not (run_dir / CONFIG_FILE).exists():
            raise RunConfigError(f"--resume {run_dir}: no run there ({CONFIG_FILE} is missing)")
        return not has_checkpoint(run_dir / CHECKPOINT_DIR)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunConfigError(f"--run-dir {run_dir} exists and is not a directory")
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        hint = (f"; to continue it use --resume {run_dir}" if (run_dir / CONFIG_FILE).exists()
                else "; choose an empty or new directory")
        raise RunConfigError(f"--run-dir {run_dir} is not empty{hint}")
    return False


def start_from_scratch(run_dir: Path) -> None:
    """Before a resumed run without a complete checkpoint starts from update 0: drop the partial
    saves and any rows (nothing a checkpoint covers is removed: there is none)."""
    for partial in incomplete_checkpoints(run_dir / CHECKPOINT_DIR):
        shutil.rmtree(partial, ignore_errors=True)
    (run_dir / METRICS_FILE).write_text("")


def lock_holder(run_dir: Path) -> str | None:
    """The process id of another process training in ``run_dir`` now, or None when none is."""
    try:
        with open(Path(run_dir) / LOCK_FILE) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = f.read().strip() or "unknown"
                return None if holder == str(os.getpid()) else holder  # this process's own run
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:  # no lock file (no run yet), or not readable: nobody we can name
        return None
    return None


def in_use_message(run_dir: Path, holder: str) -> str:
    return f"{run_dir} is in use by another run (process {holder}); wait for it to end, or use another --run-dir"


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``DIR/.lock``, held while the run
    trains. The OS releases it when the holder exits, however it exits (a killed holder leaves no
    stale lock); the file keeps the holder's process id, so a second writer is told who holds it.
    Readers (evaluation, reports) do not take it. Entering creates the directory if needed; a
    directory it created that holds nothing but the lock when the run fails is removed again."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._file = None
        self._created = False

    def __enter__(self) -> "RunLock":
        try:
            self._created = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.run_dir / LOCK_FILE, "a+")
        except OSError as error:
            raise RunConfigError(f"cannot write the run directory {self.run_dir}: {error.strerror or error}; "
                                 f"choose a writable --run-dir") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise RunConfigError(in_use_message(self.run_dir, holder)) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        lock_path = self.run_dir / LOCK_FILE
        if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            lock_path.unlink(missing_ok=True)  # a run that failed before writing anything leaves no directory
            self.run_dir.rmdir()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()



# ---------------------------------------------------------------------------- summary


def best_window(updates: int) -> int:
    return max(1, math.ceil(updates / 10))


def summarize_run(config: RunConfig, rows: list[dict[str, Any]], **extra) -> dict[str, Any]:
    """Final metrics per member and the best member: the highest mean return over the last tenth
    of the updates (at least one), among the members whose learner stayed finite. A member that
    diverged has no score and ``diverged_at``, the first update at which it was not finite."""
    population = config.population
    per_member = [[r["members"][m] if population > 1 else r for r in rows] for m in range(population)]
    window = best_window(len(rows))
    members, scores, diverged = [], [], {}
    for m, member_rows in enumerate(per_member):
        diverged_at = next((r["update"] for r in member_rows if r.get("nonfinite")), None)
        returns = [r.get("mean_return") for r in member_rows[-window:]]
        returns = [v for v in returns if v is not None]
        score = float(np.mean(returns)) if returns and diverged_at is None else None
        scores.append(-math.inf if score is None else score)
        if diverged_at is not None:
            diverged[str(m)] = diverged_at
        members.append({"member": m, **dataclasses.asdict(config.members[m]), "score": score,
                        "diverged_at": diverged_at, "final": member_rows[-1] if member_rows else None})
    healthy = [m for m in range(population) if str(m) not in diverged]
    best = max(healthy, key=lambda m: scores[m]) if rows and healthy else None
    return {
        "task": config.task, "preset": config.preset, "population": population, "synthetic": config.data.synthetic,
        "updates_done": len(rows), "updates": config.updates,
        "best_member": best, "best_by": f"mean_return averaged over the last {window} update(s), members whose "
                                        f"learner stayed finite",
        "diverged": diverged, "members": members, **extra,
    }


def diverged_members(rows: list[dict[str, Any]], population: int) -> dict[int, int]:
    """``{member: first update whose learner was not finite}`` over ``rows``."""
    found: dict[int, int] = {}
    for row in rows:
        entries = row["members"] if population > 1 else [row]
        for m, entry in enumerate(entries):
            if entry.get("nonfinite") and m not in found:
                found[m] = int(entry["update"])
    return found




def fmt(value, spec: str = ".3f") -> str:
    """A number as text, or "-" where there is none (a metric no episode produced)."""
    return "-" if value is None else format(value, spec)
