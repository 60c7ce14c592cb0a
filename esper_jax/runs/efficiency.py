"""The efficiency question for language-model runs: does growing reach a lower loss per
parameter-second than a large static model?

**The large static reference** (:func:`large_static_config`, :func:`large_static_env`) is the
run's own host with ``LAYER_FACTOR`` (2) times the layers — the TinyStories design's base model of
4 layers is to grow to 8 or more — and the same width, heads, vocabulary, block size and attention, trained
under the static controller (it never grows) on the same held-out envs as the other controllers:
the same data and the same per-epoch keys, so the same batches in the same order. Its initial
weights necessarily differ, since the model differs. It is a second environment, built from the
run's configuration by the run's own build path (:func:`esper_jax.runs.build.build_env`) with only
the host's ``num_layers`` changed; its slots are the run's (a deeper host has every slot of a
shallower one), and irrelevant under the static controller.

**Parameters x seconds** of one controller's episode (:func:`parameter_timeline`,
:func:`efficiency_row`): the model's parameter count at the end of each epoch — the host plus
every seed present in the lattice, from GERMINATED through FOSSILIZED (a seed counts from the
epoch it is planted until it is pruned, whether or not it is computed yet) — summed over the
epochs (parameter-epochs), times the measured wall-clock seconds per epoch of that controller's
episode (:func:`time_episodes`: one compiled episode over all held-out envs at once, after a
warm-up run, blocking on the result; the median over interleaved rounds when there are several).
The seconds are those of the whole population of held-out envs, so they compare controllers of one
evaluation, not evaluations with different numbers of envs.

:func:`efficiency_section` is the ``"efficiency"`` object of ``evaluation.json``;
:func:`markdown_section` is its part of ``evaluation.md``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import numpy as np

from esper_jax.env.environment import MorphogeneticEnv
from esper_jax.lattice import lifecycle
from esper_jax.lattice.grid import Lattice
from esper_jax.lattice.lifecycle import Stage
from esper_jax.runs.build import Built, build_env
from esper_jax.runs.config import RunConfig
from esper_jax.runs.evaluation import EpisodeOutput, ci_text, paired_ci, summarize_episodes
from esper_jax.runs.rundir import fmt

LARGE_STATIC = "large_static"
STATIC = "static"
LAYER_FACTOR = 2
# A seed holds parameters in the model from germination until it is pruned (or for good, once fossilized).
PRESENT_STAGES = lifecycle.LIVE_STAGES + (Stage.FOSSILIZED,)


def large_static_config(config: RunConfig) -> RunConfig:
    """``config`` with the host's layers multiplied by :data:`LAYER_FACTOR`, everything else kept."""
    if config.topology != "transformer":
        raise ValueError(f"the large static reference is defined for language-model runs (a transformer host); "
                         f"this run's host is a {config.topology}")
    return config.replace(host=dataclasses.replace(config.host, num_layers=LAYER_FACTOR * config.host.num_layers))


def large_static_env(built: Built) -> MorphogeneticEnv:
    """The large static reference's environment on the run's own (already loaded) dataset, so it
    reads the same :class:`EnvData` as the run's env."""
    return build_env(large_static_config(built.config), built.dataset)[2]


def time_episodes(episodes: Mapping[str, Callable[[], EpisodeOutput]], rounds: int = 1
                  ) -> tuple[dict[str, EpisodeOutput], dict[str, float]]:
    """Each episode's output and its wall-clock seconds, median over ``rounds`` interleaved rounds
    (every episode once per round, in order, so a slow spell of a shared machine is spread over all
    of them). An episode is a compiled :meth:`~esper_jax.runs.evaluation.Evaluator.run` (warm it
    up first), which returns host arrays, so its time covers the whole computation. Episodes are
    deterministic: the outputs are the first round's."""
    if rounds < 1:
        raise ValueError(f"rounds must be positive, got {rounds}")
    outputs, times = {}, {name: [] for name in episodes}
    for _ in range(rounds):
        for name, episode in episodes.items():
            start = time.perf_counter()
            out = episode()
            times[name].append(time.perf_counter() - start)
            outputs.setdefault(name, out)
    return outputs, {name: float(np.median(t)) for name, t in times.items()}


def seed_sizes(lattice: Lattice) -> np.ndarray:
    """Parameters of each blueprint at each slot, ``[S, NB]``."""
    return np.asarray([[bp.num_params(spec.dim) for bp in lattice.blueprints] for spec in lattice.slots.slots],
                      np.int64)


def parameter_timeline(stage: np.ndarray, blueprint: np.ndarray, sizes: np.ndarray, host_params: int) -> np.ndarray:
    """The model's parameters at the end of each epoch, ``[N, E]``, from the episode's stage and
    blueprint timelines (``[N, E, S]``): the host's plus those of every seed present
    (:data:`PRESENT_STAGES`)."""
    stage, blueprint = np.asarray(stage), np.asarray(blueprint)
    present = np.isin(stage, [int(s) for s in PRESENT_STAGES]) & (blueprint >= 0)
    slot = np.arange(stage.shape[-1])
    per_slot = np.where(present, sizes[slot, np.clip(blueprint, 0, None)], 0)
    return int(host_params) + per_slot.sum(axis=-1)


def efficiency_row(summary: Mapping[str, Any], params: np.ndarray, seconds: float) -> dict[str, Any]:
    """One controller's line: its loss summary (of :func:`summarize_episodes`), its parameters
    ``[N, E]`` and the seconds of its episode."""
    params = np.asarray(params, np.float64)
    epochs = params.shape[1]
    param_epochs = params.sum(axis=1)
    param_seconds = param_epochs * (seconds / epochs)
    return {
        **{k: summary[k] for k in ("final_val_loss", "final_val_loss_std", "final_val_loss_per_env",
                                   "final_val_perplexity")},
        "mean_params": float(params.mean()),
        "mean_params_per_env": [float(v) for v in params.mean(axis=1)],
        "param_epochs_per_env": [float(v) for v in param_epochs],
        "seconds_per_episode": float(seconds),
        "seconds_per_epoch": float(seconds / epochs),
        "param_seconds": float(param_seconds.mean()),
        "param_seconds_std": float(param_seconds.std()),
        "param_seconds_per_env": [float(v) for v in param_seconds],
    }


def efficiency_section(env: MorphogeneticEnv, results: Mapping[str, EpisodeOutput], seconds: Mapping[str, float],
                       reference_env: MorphogeneticEnv, reference: EpisodeOutput, reference_seconds: float,
                       timing_rounds: int = 1) -> dict[str, Any]:
    """The ``"efficiency"`` object of ``evaluation.json``: a row per controller of ``results``
    (with ``seconds[name]``) and one for the large static reference (``reference_env``'s static
    episode), each with its final loss minus the reference's on the same env (paired, 95% CI)."""
    rows = {}
    outputs = {**results, LARGE_STATIC: reference}
    for name, out in outputs.items():
        e, secs = (reference_env, reference_seconds) if name == LARGE_STATIC else (env, seconds[name])
        params = parameter_timeline(out.stage, out.blueprint, seed_sizes(e.lattice), e.host_param_count)
        rows[name] = efficiency_row(summarize_episodes(e, out), params, secs)
        diff = np.asarray(out.final_val_loss, np.float64) - np.asarray(reference.final_val_loss, np.float64)
        rows[name][f"final_val_loss_minus_{LARGE_STATIC}_ci"] = paired_ci(diff)
    host, large = env.model.host, reference_env.model.host
    return {
        "reference": {
            "name": LARGE_STATIC,
            "controller": STATIC,
            "host": dataclasses.asdict(large),
            "run_host": dataclasses.asdict(host),
            "host_params": reference_env.host_param_count,
            "run_host_params": env.host_param_count,
            "slots": list(reference_env.lattice.slots.slot_ids),
            "definition": (f"the run's host with {LAYER_FACTOR}x the layers ({host.num_layers} -> {large.num_layers}), "
                           "the same width, heads, vocabulary, block size and attention, under the static controller on the same "
                           "held-out envs: the same data and per-epoch keys (the same batches); its initial weights "
                           "differ, since the model differs"),
        },
        "params_counted": ("host + every seed present at the end of each epoch, from GERMINATED through FOSSILIZED; "
                           "mean_params: mean over epochs; param-epochs: sum over epochs"),
        "seconds_measured": ("wall-clock of one compiled episode of the controller over all held-out envs together, "
                             f"after a warm-up run, in this process (median of {timing_rounds} interleaved round(s)); "
                             "param-seconds = param-epochs x seconds per epoch"),
        "timing_rounds": timing_rounds,
        "episode_epochs": env.config.episode_epochs,
        "controllers": rows,
    }


def markdown_section(payload: Mapping[str, Any]) -> str:
    """The efficiency part of ``evaluation.md``, to follow :func:`~esper_jax.runs.evaluation.markdown_table`
    (empty when the payload has none)."""
    section = payload.get("efficiency")
    if not section:
        return ""
    ref = section["reference"]
    synthetic = " (SYNTHETIC data)" if payload.get("synthetic") else ""
    lines = [
        "",
        f"## Efficiency: final loss against parameters x seconds{synthetic}",
        "",
        f"Large static reference ({LARGE_STATIC}): {ref['definition']}; {ref['host_params']:,} parameters "
        f"(the run's host: {ref['run_host_params']:,}).",
        "",
        "| controller | final val loss | val perplexity | mean params | seconds / episode | param-seconds | FLOPs "
        f"| minus {LARGE_STATIC}, mean [95% CI] (lower in) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in section["controllers"].items():
        loss = "-" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f} ± {r['final_val_loss_std']:.4f}"
        versus = "0" if name == LARGE_STATIC else ci_text(r[f"final_val_loss_minus_{LARGE_STATIC}_ci"])
        flops = "-" if r.get("flops") is None else f"{r['flops']:.3g}"
        lines.append(f"| {name} | {loss} | {fmt(r['final_val_perplexity'], '.2f')} | {r['mean_params']:,.0f} | "
                     f"{r['seconds_per_episode']:.2f} | {r['param_seconds']:.4g} | {flops} | {versus} |")
    lines += ["", f"Parameters: {section['params_counted']}. Seconds: {section['seconds_measured']}. Minus "
              f"{LARGE_STATIC}: mean over envs of the final loss minus the reference's on the same env (negative = "
              "lower), its 95% Student-t interval, and in how many envs it was lower. FLOPs: the episode's training "
              "compute, mean per env (esper_jax.runs.compute). A controller answers the "
              "efficiency question with yes when it is lower here at fewer param-seconds."]
    return "\n".join(lines) + "\n"
