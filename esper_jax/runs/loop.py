"""The training loop (:func:`train`): the learner's ``train_chunk`` (``checkpoint_every`` updates
in one jitted ``lax.scan``) runs chunk after chunk; between chunks the metrics rows are appended
and the state is saved asynchronously.

Resume: ``resume=True`` restores the newest complete checkpoint, drops ``metrics.jsonl`` rows after
it and continues; chunk boundaries stay at multiples of ``checkpoint_every``, so a resumed run
computes exactly what an uninterrupted one does.

Errors a user can cause (bad names, counts, directories, data) are raised as one of
:data:`USER_ERRORS`, with one-line messages, before anything is compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax

from esper_jax.data import DatasetNotFoundError
from esper_jax.data.datasets import CorruptDatasetError, OptionalDependencyError, TokenizerUnavailableError
from esper_jax.lattice.hosts import FlaxHost
from esper_jax.runs import distributed
from esper_jax.runs.build import Built, build, chunk_program, make_programs
from esper_jax.runs.checkpoint import Checkpointer, CheckpointError
from esper_jax.runs.config import CONFIG_FILE, RunConfig, RunConfigError
from esper_jax.runs.tensorboard import ScalarWriter
from esper_jax.runs.rundir import (CHECKPOINT_DIR, IMITATION_FILE, METRICS_FILE, SUMMARY_FILE, append_rows,
                                   diverged_members, fmt, language_model_rows, metric_rows, prepare_run_dir, read_rows,
                                   start_from_scratch, read_json, summarize_run, truncate_rows, write_json, RunLock)

# Errors that mean "the user asked for something impossible": the command line prints them as
# one line and exits 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (RunConfigError, CheckpointError, DatasetNotFoundError, CorruptDatasetError, OptionalDependencyError,
               TokenizerUnavailableError)



@dataclasses.dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    interrupted: bool
    checkpoint: int | None       # newest complete checkpoint (updates done)
    diverged: dict[int, int] = dataclasses.field(default_factory=dict)  # member -> first non-finite update


def enable_compile_cache(directory: str | os.PathLike[str] | None,
                         warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> bool:
    """Keep compiled programs on disk (JAX's persistent compilation cache), so that a resumed or
    repeated run skips the compilation (tens of seconds on a CPU). ``None`` leaves it off. A
    directory that cannot be written (a file, a read-only place) only costs the cache: one line
    through ``warn`` and the run goes on without it. Returns whether the cache is on."""
    if directory is None:
        return False
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()  # can a file be created there?
    except OSError as error:
        warn(f"warning: the compile cache {directory} cannot be used ({error.strerror or error}); running without "
             f"it (choose another with --compile-cache DIR, or --compile-cache off)")
        return False
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return True


def describe(built: Built, run_dir: Path) -> str:
    c, ppo, env = built.config, built.ppo_config, built.config.env
    host = (c.host.describe() if isinstance(c.host, FlaxHost) else
            {f.name: getattr(c.host, f.name) for f in dataclasses.fields(c.host) if f.init})
    rollout = ppo.rollout_steps or env.episode_epochs
    members = "; ".join(f"{i}: lr {m.learning_rate:.3g} ent {m.ent_coef:.3g} seed {m.seed}"
                        for i, m in enumerate(c.members[:8]))
    lines = [
        f"task {c.task} ({c.host_variant} host variant, {built.env.host_param_count} parameters: "
        f"{c.topology} {host}) on {built.data_label}",
        f"preset {c.preset}: {c.preset_description}",
        f"slots {','.join(env.slots)}; blueprints {','.join(env.blueprints)}; reward {env.reward} (parameter rent "
        f"{env.rent_weight:g}, compute price {env.compute_weight:g}); {built.env.config.problems.describe()}",
        f"population {c.population} x {ppo.num_envs} envs x {env.episode_epochs}-epoch episodes of "
        f"{env.steps_per_epoch} batches of {env.batch_size}; {rollout} env steps per env per update; "
        f"{c.updates} updates, a checkpoint every {c.checkpoint_every}",
        (f"policy mlp {ppo.hidden_size}, deciding once per episode among {len(ppo.plans)} plans "
         f"({', '.join(ppo.plans)}) from {'the drawn problem alone' if ppo.plan_inputs == 'problem' else 'its first observation'}"
         f"{', each scored from its description' if ppo.plan_head == 'scorer' else ''}"
         f"{'' if ppo.group_size == 1 else f', in problem groups of {ppo.group_size}'}; "
         if ppo.plans else f"policy {ppo.recurrent if ppo.recurrent != 'none' else 'mlp'} {ppo.hidden_size}; ")
        + f"members {members}"
        + (f"; ... ({c.population} in all, see config.json)" if c.population > 8 else ""),
        f"devices: {built.placement.describe()}; run directory {run_dir}",
    ]
    for other in built.mixed:  # a mixed run's other tasks: the same policy learns from their envs too
        o = other.config
        lines.insert(-1, f"mixed with {o.task} on {other.env.config.data_label} ({o.host_variant} host variant, "
                         f"{other.env.host_param_count} parameters), {ppo.num_envs} envs x {o.env.episode_epochs}-epoch "
                         f"episodes per update, plans {', '.join(o.ppo.plans)}; its metrics are prefixed {o.task}/")
    if built.synthetic:
        lines.append("NOTE: training on SYNTHETIC data, not the real dataset.")
    return "\n".join(lines)


def _chunk_sizes(done: int, total: int, every: int) -> list[int]:
    """Chunks end at multiples of ``every`` (and at ``total``), wherever the run (re)started."""
    sizes = []
    while done < total:
        n = min(every - done % every, total - done)
        sizes.append(n)
        done += n
    return sizes


def train(config: RunConfig, run_dir: str | os.PathLike[str], *, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, tensorboard: bool = False) -> RunResult:
    """Train (or continue, ``resume=True``) the run ``config`` in ``run_dir``.

    Ctrl-C (KeyboardInterrupt) is not re-raised: pending saves are finished, the summary of what is
    done is written, and the result says ``interrupted`` and which checkpoint to resume from. The
    run directory has one writer: a second process training into it is refused (:class:`RunLock`).
    ``tensorboard``: also write every row as TensorBoard scalars under ``run_dir/tensorboard``.

    Over several processes (:mod:`esper_jax.runs.distributed`, initialized before this is called)
    every process calls ``train`` with the same arguments; process 0 holds the lock, logs and writes
    the files, all of them compute and checkpoint."""
    run_dir = Path(run_dir)
    if tensorboard:
        ScalarWriter.check_available()  # before any work: a missing extra is one line, not a late failure
    if not distributed.is_writer():
        log = _silent
    with contextlib.ExitStack() as stack:
        def lock() -> None:
            stack.enter_context(RunLock(run_dir))

        decided_by_writer(lock)
        return _train(config, run_dir, resume, progress, log, tensorboard)


def _silent(line: str) -> None:
    """The log of a process that is not the writer: process 0 says everything once."""


def decided_by_writer(action: Callable[[], int | bool | None]) -> int:
    """``action()`` run by the writer (process 0) alone and its result (None counts as 0) on every
    process. A user error there is raised there and stops the other processes with a line pointing
    to it, rather than leaving them waiting for a writer that has given up. One process: ``action()``."""
    if distributed.process_count() == 1:
        return int(action() or 0)
    result, error = 0, None
    if distributed.is_writer():
        try:
            result = int(action() or 0)
        except USER_ERRORS as raised:
            result, error = -1, raised
    result = distributed.agree(result)
    if error is not None:
        raise error
    if result == -1:
        raise RunConfigError("process 0 could not start the run (its error line says why); nothing was written")
    return result


def _train(config: RunConfig, run_dir: Path, resume: bool, progress: bool, log: Callable[[str], None],
           tensorboard: bool) -> RunResult:
    writer = distributed.is_writer()
    if decided_by_writer(lambda: prepare_run_dir(run_dir, resume)):  # resumed, but no save had completed
        log(f"{run_dir} has no complete checkpoint (the run stopped before its first save): starting it from "
            f"update 0 with its stored configuration")
        decided_by_writer(lambda: start_from_scratch(run_dir))
        resume = False
    built = build(config)  # user errors (data, names) surface here, before compiling
    config = built.config  # with the data's origin and (language models) the tokenizer's vocabulary
    checkpoints, metrics_path = run_dir / CHECKPOINT_DIR, run_dir / METRICS_FILE
    started = time.perf_counter()
    programs = make_programs(built)
    state = None
    done = 0
    interrupted = False
    diverged: dict[int, int] = {}
    compile_seconds = train_seconds = 0.0
    steps_run = 0
    with Checkpointer(checkpoints, keep=config.keep_checkpoints) as ckpt:
        if resume:
            done, state = ckpt.restore(programs.abstract_state)
            if done > config.updates:
                raise RunConfigError(f"--resume {run_dir}: the checkpoint is at update {done}, beyond --updates "
                                     f"{config.updates}; give a larger --updates to continue")
        # A resume that finds the run complete leaves its directory as it is (its summary keeps the
        # training's wall time): nothing is trained, so nothing is written, unless the summary is missing.
        finished = resume and done == config.updates and (run_dir / SUMMARY_FILE).is_file()
        if resume and writer and not finished:
            truncate_rows(metrics_path, done)  # rows after the checkpoint are computed again
        elif writer and not resume:
            metrics_path.touch()
        if writer and not finished:
            write_json(run_dir / CONFIG_FILE, config.to_json())  # on resume: the new --updates/--keep-checkpoints

        log(describe(built, run_dir))
        if resume:
            log(f"resuming from the checkpoint at update {done} of {config.updates}" if done < config.updates else
                f"the run is complete ({done} updates); give a larger --updates to continue it")
        sizes = _chunk_sizes(done, config.updates, config.checkpoint_every)
        bar = None
        scalars = ScalarWriter(run_dir) if tensorboard and writer and not finished else None
        saved = done
        try:
            t0 = time.perf_counter()
            if state is None:
                state = programs.init(programs.seeds, programs.hyper, built.env_data)
                if programs.imitate is not None:
                    state, seconds = _warm_start(config, programs, state, built.env_data, run_dir, writer, log)
                    t0 += seconds  # compile_seconds: the learner's compilation; the warm start is timed on its own
                ckpt.save(0, state)  # a run stopped during its first chunk can still resume
            compiled = {}
            for n in sorted(set(sizes), reverse=True):
                log(f"compiling {n} update(s) per chunk..." if n == config.checkpoint_every
                    else f"compiling the last chunk ({n} update(s))...")
                fn = programs.chunk if n == config.checkpoint_every else chunk_program(built, programs, n)
                compiled[n] = fn.lower(programs.abstract_state, built.learner_data).compile()
            compile_seconds = time.perf_counter() - t0
            if sizes:
                log(f"initialized and compiled in {compile_seconds:.1f} s; training")
            bar = _progress_bar(config.updates, done, progress)
            for n in sizes:
                t = time.perf_counter()
                new_state, metrics = compiled[n](state, built.learner_data)
                rows = metric_rows(distributed.fetch(metrics).columns())  # the one host sync per chunk
                if not built.task.has_accuracy:
                    rows = language_model_rows(rows)
                seconds = time.perf_counter() - t
                if writer:
                    append_rows(metrics_path, rows)  # on disk before the checkpoint that covers them starts
                if scalars is not None:
                    scalars.write(rows)
                state, done = new_state, done + n
                new = {m: u for m, u in diverged_members(rows, config.population).items() if m not in diverged}
                diverged.update(new)
                for m, u in sorted(new.items()):
                    log(f"member {m}: the learner's parameters or losses are not finite from update {u} on "
                        f"(it diverged)" + (f"; the other {config.population - len(diverged)} member(s) train on"
                                            if len(diverged) < config.population else ""))
                if len(diverged) == config.population:
                    # Nothing healthy is left to save: the newest checkpoint stays the last finite one.
                    log(f"every learner diverged; stopping at update {done} without saving it; the checkpoint at "
                        f"update {saved} is the last finite one")
                    break
                ckpt.save(done, state)  # asynchronous: written while the next chunk trains
                saved = done
                train_seconds += seconds
                steps_run += n * _steps_per_update(built)
                _report(bar, rows[-1], n, n * _steps_per_update(built) / max(seconds, 1e-9), log, done,
                        config.updates, built.task.has_accuracy)
        except KeyboardInterrupt:
            interrupted = True
            if state is not None and saved != done:  # rows written, save not started: save now
                ckpt.save(done, state)
            if writer:
                truncate_rows(metrics_path, done)  # rows of a chunk cut short are not kept
        finally:
            if bar is not None:
                bar.close()
            if scalars is not None:
                scalars.close()
            if not ckpt.failed:  # a failed save was reported already; its remains are not raised again
                ckpt.wait()  # every pending save is on disk before we go on (also on Ctrl-C)
        latest = ckpt.latest_step()
    distributed.barrier("metrics written")  # the others read the rows process 0 wrote
    rows = read_rows(metrics_path)
    if finished:
        return RunResult(run_dir, read_json(run_dir / SUMMARY_FILE), False, latest,
                         diverged_members(rows, config.population))
    summary = summarize_run(
        config, rows, complete=not interrupted and len(diverged) < config.population and len(rows) >= config.updates,
        checkpoint=latest,
        data=built.data_label, wall_seconds=time.perf_counter() - started, compile_seconds=compile_seconds,
        env_steps=sum(_env_steps(rows[-1], m) for m in range(config.population)) if rows else 0,
        env_steps_per_second=steps_run / train_seconds if train_seconds else None,
        devices=built.placement.describe())
    if writer:
        write_json(run_dir / SUMMARY_FILE, summary)
    return RunResult(run_dir, summary, interrupted, latest, diverged_members(rows, config.population))


def _warm_start(config: RunConfig, programs, state, env_data, run_dir: Path, writer: bool,
                log) -> tuple[Any, float]:
    """Imitation before PPO (part of the learner's initialization: the checkpoint at update 0
    holds its result, so a resumed run never repeats it); its metrics go to ``imitation.json``.
    Returns the state and the seconds it took, its own compilation included."""
    warm = config.warm_start
    log(f"warm start: imitating {warm.teacher} for {warm.rounds} round(s) of {config.ppo.num_envs} episodes, "
        f"{warm.epochs} epochs each (compiling)...")
    t = time.perf_counter()
    state, metrics = programs.imitate(state, env_data)
    columns = {name: distributed.fetch(value).tolist() for name, value in metrics._asdict().items()}  # [P, rounds]
    seconds = time.perf_counter() - t
    for m in range(config.population):
        member = "" if config.population == 1 else f"member {m}: "
        log(f"warm start: {member}" + "; ".join(
            f"round {r + 1}: -log p(teacher) {columns['nll'][m][r]:.3f}, agrees {columns['agreement'][m][r]:.2f}, "
            f"teacher's final val loss {columns['mean_final_val_loss'][m][r]:.4f}" for r in range(warm.rounds)))
    if writer:
        write_json(run_dir / IMITATION_FILE, {"teacher": warm.teacher, "rounds": warm.rounds, "epochs": warm.epochs,
                                              "seconds": seconds, "members": columns})
    return state, seconds


def _steps_per_update(built: Built) -> int:
    rollout = built.ppo_config.rollout_steps or built.config.env.episode_epochs
    rollout += sum(m.config.env.episode_epochs for m in built.mixed)  # a mixed run's other tasks' episodes
    return rollout * built.ppo_config.num_envs * built.population


def _env_steps(row: dict[str, Any], member: int | None = None) -> int:
    """Environment steps of all members (or of one) up to this row."""
    if "members" in row:
        if member is not None:
            return int(row["members"][member]["env_steps"])
        return sum(int(m["env_steps"]) for m in row["members"])
    return int(row["env_steps"])


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="updates", unit="update", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr, smoothing=0.0)


def _report(bar, row: dict[str, Any], n: int, steps_per_second: float, log, done: int, total: int,
            has_accuracy: bool = True) -> None:
    bar.update(n)
    bar.set_postfix({"steps/s": f"{steps_per_second:.1f}", "return": fmt(row.get("mean_return"))}, refresh=True)
    quality = (f"accuracy {fmt(row.get('mean_final_val_accuracy'))}" if has_accuracy
               else f"perplexity {fmt(row.get('mean_final_val_perplexity'), '.2f')}")
    line = (f"update {done}/{total}: return {fmt(row.get('mean_return'))}, final val loss "
            f"{fmt(row.get('mean_final_val_loss'))}, {quality}, {steps_per_second:.1f} env steps/s; checkpoint {done}")
    if row.get("teacher_nll") is not None:  # kickstarting: how far the policy is from its teacher
        line += f"; -log p(teacher) {fmt(row['teacher_nll'])}"
    if bar.disable:
        log(line)
    else:
        bar.write(line, file=sys.stdout)  # clears the bar (on stderr), prints, redraws it


