"""Was growing worth it? The references a practitioner compares a grown network with, at equal
compute: a frontier of static networks and the best fixed growth schedule.

**The static frontier.** A family of static networks (:func:`static_family`), each trained under
the static controller on the same held-out envs as the run's controllers (same data, same
per-epoch keys, so the same batches): the run's host at several widths (CNN) or widths and depths
(transformer), the host without its handicap (3x3 kernels; attention), and every architecture a
controller ended with, built in from epoch 0 (FOSSILIZED at alpha 1:
:meth:`~esper_jax.lattice.grid.Lattice.build_in`) and trained from scratch. Each network trains
at its own best learning rate: the run's host rate times the scale (of :data:`LR_SCALES`) with the
lowest mean final loss on *calibration* envs (:func:`calibration_key`, a stream neither training
nor the held-out evaluation draws from). Seeds built in keep the run's seed rate. The frontier is
the lower envelope of mean final loss against mean compute (FLOPs,
:mod:`esper_jax.runs.compute`): the networks no cheaper network beats, joined piecewise-linearly
in log compute.

**Below the frontier, as a number** (:func:`frontier_gap`): for each controller, per env, its
final loss minus the frontier's loss at that env's compute (the frontier's networks' losses on
the same env, interpolated in log compute), paired over envs with a 95% interval; and the
controller's compute divided by the compute the frontier needs to reach its mean loss (below 1:
growing saved compute; LiGO and LEMON report 0.43-0.67 for hand-designed growth of pretrained models).

**The ceiling of a plan policy** (:func:`menu_ceiling`): for a run that decides once per episode among
a menu of plans, the menu's plan with the lowest final loss on each held-out env, chosen knowing the
result (and the plan furthest below the frontier at its own compute), against the frontier. No
policy over that menu passes it; where it is on the frontier, what limits the policy is the menu
(what its growth offers), not the learning.

**The best fixed schedule** (:func:`schedule_candidates`, :func:`later_and_pairs`): single seeds
(every blueprint in every slot at epoch 0, the best three also later) and pairs of the best single
seeds, each scored by mean final loss on the calibration envs; the best single and the best
of all become controllers (``best_fixed_1``, ``best_fixed_2``) evaluated on the held-out envs.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from esper_jax.env.controllers import Schedule
from esper_jax.env.environment import EnvState, MorphogeneticEnv
from esper_jax.lattice import lifecycle
from esper_jax.lattice.hosts import CNNHost, TransformerHost
from esper_jax.lattice.hosts.base import Host
from esper_jax.runs.config import RunConfig
from esper_jax.runs.evaluation import BEST_FIXED, Evaluator, ci_text, paired_ci

# The calibration envs' stream: fold_in(key(run seed), CALIBRATION_STREAM). The proof presets were
# calibrated on this stream of seed 0; training splits key(seed), the held-out envs fold in EVAL_STREAM.
CALIBRATION_STREAM = 0xCA11B
# A built-in network's initial seed weights: fold_in(the envs' key, BUILT_IN_STREAM).
BUILT_IN_STREAM = 0xB11D
# Learning-rate scales a static network's sweep tries (times the run's host rate).
LR_SCALES = (0.5, 1.0, 2.0)
BEST_FIXED_1, BEST_FIXED_2 = BEST_FIXED
CALIBRATION_FILE = "calibration.json"


def calibration_key(run_seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(run_seed), CALIBRATION_STREAM)


# ---------------------------------------------------------------------------- the static family


@dataclasses.dataclass(frozen=True)
class StaticNetwork:
    """One static network of the frontier: a host, with seeds ``(slot, blueprint)`` built in."""

    name: str
    host: Host
    built_in: tuple[tuple[str, str], ...] = ()
    description: str = ""


# Width multipliers of the family's networks (times the run host's width), by host topology.
WIDTHS = {"cnn": (0.5, 1, 2, 4), "transformer": (1, 2)}


def network_name(tag: str, host: Host) -> str:
    """A family network's name: ``tag`` (``host``, or what differs from the run's host) and its
    width (CNN: ``_w{base width}``) or width and depth (transformer: ``_d{d_model}_l{layers}``)."""
    if isinstance(host, TransformerHost):
        return f"{tag}_d{host.d_model}_l{host.num_layers}"
    return f"{tag}_w{host.base_width}"


def _cnn_family(host, widths) -> list[StaticNetwork]:
    family = []
    kernels = dict.fromkeys((host.kernel_size, 3))
    for kernel in kernels:
        for factor in widths:
            width = max(1, int(host.base_width * factor))
            variant = dataclasses.replace(host, base_width=width, kernel_size=kernel)
            tag = "host" if kernel == host.kernel_size else f"{kernel}x{kernel}"
            family.append(StaticNetwork(network_name(tag, variant), variant,
                                        description=f"{kernel}x{kernel} kernels, widths {width}-{variant.width(host.num_blocks - 1)}"))
    return family


def _transformer_family(host, widths) -> list[StaticNetwork]:
    family = []
    for attention in dict.fromkeys((host.attention, True)):
        tag = "host" if attention == host.attention else "attn"
        for width, layers in [(int(host.d_model * f), n * host.num_layers) for n in (1, 2) for f in widths]:
            variant = dataclasses.replace(host, d_model=width, num_layers=layers, attention=attention)
            family.append(StaticNetwork(network_name(tag, variant), variant,
                                        description=f"{'with' if attention else 'without'} attention, width {width}, "
                                                    f"{layers} layers"))
    return family


def check_family(config: RunConfig) -> None:
    """A ValueError when the run's host cannot be varied into a family (a user's own network)."""
    if not isinstance(config.host, (CNNHost, TransformerHost)):
        raise ValueError("the static frontier varies the host's width, depth, kernels and attention, which only the "
                         "built-in CNN and transformer hosts expose; a run grown from --host cannot be compared with one")


def static_family(config: RunConfig, architectures: Mapping[str, Sequence[tuple[str, str]]] = (),
                  widths: Sequence[float] | None = None) -> list[StaticNetwork]:
    """The frontier's networks for a run (module docstring); ``architectures``: name -> the
    ``(slot, blueprint)`` seeds a controller ended with, each built into the run's host;
    ``widths``: multipliers of the host's width (default :data:`WIDTHS`; a transformer's at
    its depth and at twice it)."""
    check_family(config)
    host = config.host
    widths = tuple(widths or WIDTHS[config.topology])
    family = _cnn_family(host, widths) if config.topology == "cnn" else _transformer_family(host, widths)
    seen = set()
    for name, seeds in dict(architectures).items():
        seeds = tuple(sorted(seeds))
        if not seeds or seeds in seen:
            continue
        seen.add(seeds)
        family.append(StaticNetwork(f"built_in:{name}", host, seeds,
                                    description="the run's host with " + ", ".join(f"{b}@{s}" for s, b in seeds)
                                                + " built in from epoch 0"))
    return family


def final_architecture(timeline: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The architecture a controller ended with in most envs: the seeds blended at the end
    (BLENDING, HOLDING, FOSSILIZED), as ``(slot, blueprint)``."""
    stage = np.asarray(timeline["stage"])[:, -1]          # [N, S]
    blueprint = np.asarray(timeline["blueprint"])[:, -1]
    blended = np.isin(stage, [int(s) for s in lifecycle.BLENDED_STAGES]) & (blueprint >= 0)
    archs = [tuple((timeline["slots"][s], timeline["blueprints"][blueprint[i, s]])
                   for s in range(stage.shape[1]) if blended[i, s]) for i in range(stage.shape[0])]
    counts = collections.Counter(archs)
    return max(counts, key=lambda a: (counts[a], -len(a)))  # ties: the smaller architecture


# ---------------------------------------------------------------------------- a network's env


def with_lr_scale(env: MorphogeneticEnv) -> MorphogeneticEnv:
    """``env`` whose host updates are multiplied by a per-member scale held in the optimizer
    state (so one compiled program sweeps learning rates: for SGD with momentum and for AdamW,
    scaling the update is scaling the learning rate, weight decay included)."""
    scaled = optax.chain(env.config.host_optimizer, optax.inject_hyperparams(optax.scale)(step_size=1.0))
    return MorphogeneticEnv(dataclasses.replace(env.config, host_optimizer=scaled))


def prepare_members(env: MorphogeneticEnv, scales: np.ndarray, built_in: Sequence[tuple[str, str]] = (),
                    key: jax.Array | None = None) -> Callable[[EnvState], EnvState]:
    """The ``prepare`` of an :class:`~esper_jax.runs.evaluation.Evaluator` over ``env`` (made by
    :func:`with_lr_scale`): member ``i`` gets learning-rate scale ``scales[i]`` and the seeds
    ``built_in`` (their initial weights drawn per member from ``key``)."""
    lattice = env.lattice
    seeds = [(lattice.slots.index(slot), lattice.blueprint_index(bp)) for slot, bp in built_in]
    key = jax.random.key(0) if key is None else key

    def set_scale(train):
        inner, injected = train.host_opt_state
        hyper = dict(injected.hyperparams, step_size=jnp.asarray(scales, jnp.float32))
        return train.replace(host_opt_state=(inner, injected._replace(hyperparams=hyper)))

    def build_in(train):
        n = jax.tree.leaves(train.lattice)[0].shape[0]
        keys = jax.random.split(key, (len(seeds), n)) if seeds else None
        state = train.lattice
        for j, (slot, bp) in enumerate(seeds):
            state = jax.vmap(lambda l, k: lattice.build_in(l, slot, bp, k))(state, keys[j])
        return train.replace(lattice=state)

    def prepare(state: EnvState) -> EnvState:
        train = build_in(set_scale(state.train))
        return state.replace(train=train, snapshot=train)

    return prepare


def network_evaluator(env: MorphogeneticEnv, num_envs: int, scales: np.ndarray,
                      built_in: Sequence[tuple[str, str]] = (), key: jax.Array | None = None,
                      repeats: int = 1) -> Evaluator:
    """A static network's evaluator: ``env`` (made by :func:`with_lr_scale`) under the static
    controller, each of its ``num_envs x repeats`` members at its scale with the seeds ``built_in``."""
    return Evaluator(env, num_envs, ("static",), repeats=repeats, prepare=prepare_members(env, scales, built_in, key))


# ---------------------------------------------------------------------------- schedules


def schedule_candidates(env: MorphogeneticEnv, tempo_epochs: int = 3) -> list[tuple[Schedule, ...]]:
    """Every enabled (non-noop) blueprint in every slot at epoch 0, one seed each."""
    return [(Schedule(b.name, slot, 0, tempo_epochs=tempo_epochs),) for slot in env.lattice.slots.slot_ids
            for b in env.lattice.blueprints if not b.is_noop]


def later_and_pairs(ranked: Sequence[tuple[Schedule, ...]], episode_epochs: int, top: int = 3,
                    pair_top: int = 4) -> list[tuple[Schedule, ...]]:
    """The second round of the sweep, from single seeds ranked best first: the best ``top``
    germinated a third of the way into the episode, and every pair of the best ``pair_top`` in
    different slots (the better one planted first, the other as soon as the masks allow)."""
    later = [(dataclasses.replace(s[0], epoch=episode_epochs // 3),) for s in ranked[:top]]
    best = [s[0] for s in ranked[:pair_top]]
    pairs = [(a, dataclasses.replace(b, epoch=0)) for i, a in enumerate(best) for b in best[i + 1:] if a.slot != b.slot]
    return later + pairs


def read_best_schedules(run_dir) -> dict[str, tuple[Schedule, ...]]:
    """``{best_fixed_1: seeds, best_fixed_2: seeds}`` from a run's ``calibration.json``
    (written by ``experiments.frontier``); empty when the run has none."""
    import json
    import os

    path = os.path.join(os.fspath(run_dir), CALIBRATION_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            cal = json.load(f)
        return {name: tuple(Schedule(**seed) for seed in cal["schedules"][cal[name]]["seeds"]) for name in BEST_FIXED}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a calibration written by experiments.frontier ({error}): run "
                         f"`python -m experiments.frontier --run-dir {run_dir}` again, or remove it") from None


# ---------------------------------------------------------------------------- the frontier


def lower_envelope(compute: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the points no cheaper-or-equal point beats, by increasing compute."""
    order = np.lexsort((loss, compute))
    kept, best = [], math.inf
    for i in order:
        if loss[i] < best:
            kept.append(int(i))
            best = loss[i]
    return np.asarray(kept, int)


def interpolate_log(compute: np.ndarray, points_compute: np.ndarray, points_loss: np.ndarray) -> np.ndarray:
    """The piecewise-linear (in log compute) curve through the points, at ``compute``; flat
    beyond the first and last point."""
    return np.interp(np.log(compute), np.log(points_compute), points_loss)


def compute_to_reach(loss: float, points_compute: np.ndarray, points_loss: np.ndarray) -> tuple[float, str]:
    """The compute at which the frontier (decreasing loss with compute) reaches ``loss``, and
    whether it is ``"interpolated"``, or a bound where the loss is outside the frontier's range:
    ``"below_frontier"`` (lower than every static network: at least the largest one's compute)
    or ``"above_frontier"`` (higher than the cheapest: at most its compute)."""
    if loss < points_loss[-1]:
        return float(points_compute[-1]), "below_frontier"
    if loss > points_loss[0]:
        return float(points_compute[0]), "above_frontier"
    # points_loss decreases along the envelope: interpolate log compute against loss
    log_c = np.interp(loss, points_loss[::-1], np.log(points_compute[::-1]))
    return float(np.exp(log_c)), "interpolated"


def frontier_at(per_env_compute: np.ndarray, frontier_losses: np.ndarray, frontier_compute: np.ndarray) -> np.ndarray:
    """The frontier's loss on each env at that env's compute ``[N]``: the envelope's networks'
    losses on the env (``frontier_losses`` ``[K, N]``, at mean FLOPs ``frontier_compute`` ``[K]``),
    interpolated in log compute."""
    return np.array([interpolate_log(c, frontier_compute, frontier_losses[:, i]) for i, c in enumerate(per_env_compute)])


def frontier_gap(loss: np.ndarray, compute: np.ndarray, frontier_losses: np.ndarray,
                 frontier_compute: np.ndarray) -> dict[str, Any]:
    """A controller against the frontier. ``loss``/``compute``: its final loss and FLOPs per env
    ``[N]``; ``frontier_losses`` ``[K, N]``: the envelope's networks' final losses per env (in
    envelope order), ``frontier_compute`` ``[K]``: their mean FLOPs."""
    loss, compute = np.asarray(loss, np.float64), np.asarray(compute, np.float64)
    at_compute = frontier_at(compute, frontier_losses, frontier_compute)
    # One static network for the whole family at the controller's mean compute (what a user picks
    # without knowing each problem): the frontier's networks' losses on each env at that one compute.
    at_mean_compute = frontier_at(np.full_like(compute, compute.mean()), frontier_losses, frontier_compute)
    mean_curve = frontier_losses.mean(axis=1)
    needed, how = compute_to_reach(float(loss.mean()), frontier_compute, mean_curve)
    inside = bool(frontier_compute[0] <= compute.mean() <= frontier_compute[-1])
    return {
        "frontier_loss_at_compute": float(at_compute.mean()),
        "minus_frontier_ci": paired_ci(loss - at_compute),
        "frontier_loss_at_mean_compute": float(np.mean(at_mean_compute)),
        "minus_frontier_at_mean_compute_ci": paired_ci(loss - at_mean_compute),
        "compute_within_frontier_range": inside,
        "frontier_compute_to_reach_loss": needed,
        "frontier_compute_to_reach_how": how,
        # the controller's compute / the frontier's for the same loss (< 1: growing saved compute); a
        # bound where the loss is outside the frontier's range (an upper bound below it, a lower above)
        "compute_ratio": float(compute.mean()) / needed,
    }


def menu_ceiling(rows: Mapping[str, Mapping[str, Any]], menu: Sequence[str], frontier_losses: np.ndarray,
                 frontier_compute: np.ndarray) -> dict[str, Any] | None:
    """The best a policy choosing one plan of ``menu`` per env can reach on these envs: per env the
    plan with the lowest final loss (``by_loss``) and the plan furthest below the frontier at its
    own compute (``by_frontier``), each chosen knowing the outcome (optimistic: the minimum over
    noisy values), with its distance from the frontier (:func:`frontier_gap`) and how often each
    plan is chosen. ``None`` unless the rows hold at least two of the menu's plans."""
    names = [name for name in menu if name in rows]
    if len(names) < 2:
        return None
    loss = np.asarray([rows[n]["final_val_loss_per_env"] for n in names], np.float64)   # [M, N]
    flops = np.asarray([rows[n]["flops_per_env"] for n in names], np.float64)
    envs = np.arange(loss.shape[1])
    frontier_here = np.array([frontier_at(plan_flops, frontier_losses, frontier_compute) for plan_flops in flops])

    def oracle(choice: np.ndarray) -> dict[str, Any]:
        chosen_loss, chosen_flops = loss[choice, envs], flops[choice, envs]
        return {"final_val_loss": float(chosen_loss.mean()), "flops": float(chosen_flops.mean()),
                "chosen": {n: int(np.sum(choice == m)) for m, n in enumerate(names)},
                **frontier_gap(chosen_loss, chosen_flops, frontier_losses, frontier_compute)}

    return {"plans": names, "by_loss": oracle(loss.argmin(axis=0)),
            "by_frontier": oracle((loss - frontier_here).argmin(axis=0))}


# ---------------------------------------------------------------------------- results


STATIC_NETWORK = "static network"


def frontier_payload(rows: Mapping[str, dict[str, Any]], *, envs: int, run_seed: int, task: str, data_label: str,
                     synthetic: bool, host_params: int, run_dir: str | None = None,
                     calibration: Mapping[str, Any] | None = None, static_check: float | None = None,
                     menu: Sequence[str] = ()) -> dict[str, Any]:
    """The ``frontier.json`` object. ``rows``: name -> ``kind`` (``"static network"`` for the
    family, anything else for a controller), ``final_val_loss_per_env`` ``[N]`` and ``flops_per_env``
    (with :func:`~esper_jax.runs.compute.compute_summary`'s other fields): every row gets its mean
    loss and its distance from the frontier of the static networks. ``menu``: the run's plans (a
    plan learner's), for the ceiling of any policy over them (:func:`menu_ceiling`)."""
    rows = {name: dict(r) for name, r in rows.items()}
    for r in rows.values():
        loss = np.asarray(r["final_val_loss_per_env"], np.float64)
        r["final_val_loss"] = float(loss.mean())
        r["final_val_loss_std"] = float(loss.std())
    statics = [n for n, r in rows.items() if r["kind"] == STATIC_NETWORK]
    if not statics:
        raise ValueError("the frontier needs at least one static network")
    compute = np.asarray([rows[n]["flops"] for n in statics])
    mean_loss = np.asarray([rows[n]["final_val_loss"] for n in statics])
    envelope = [statics[i] for i in lower_envelope(compute, mean_loss)]
    frontier_compute = np.asarray([rows[n]["flops"] for n in envelope])
    frontier_losses = np.asarray([rows[n]["final_val_loss_per_env"] for n in envelope], np.float64)
    best_fixed = rows.get(BEST_FIXED_2)
    for name, r in rows.items():
        r["on_frontier"] = name in envelope
        r.update(frontier_gap(r["final_val_loss_per_env"], r["flops_per_env"], frontier_losses, frontier_compute))
        if best_fixed is not None:  # paired on the same envs: what a learned controller has to beat
            r[f"minus_{BEST_FIXED_2}_ci"] = paired_ci(np.asarray(r["final_val_loss_per_env"], np.float64)
                                                     - np.asarray(best_fixed["final_val_loss_per_env"], np.float64))
    return {
        "version": 1, "run_dir": run_dir, "task": task, "data": data_label, "synthetic": bool(synthetic),
        "host_params": host_params,
        "held_out": {"run_seed": int(run_seed), "num_envs": int(envs),
                     "derivation": f"fold_in(key({int(run_seed)}), 0x45564c31)"},
        "frontier": {"networks": envelope, "flops": [float(c) for c in frontier_compute],
                     "final_val_loss": [float(v) for v in frontier_losses.mean(axis=1)]},
        "static_reproduced_max_abs_difference": static_check,
        "calibration": calibration,
        "ceiling": menu_ceiling(rows, menu, frontier_losses, frontier_compute),
        "rows": rows,
        "definitions": {
            "flops": "training compute of the episode: host and computed seeds forward+backward for every batch, "
                     "validation forwards, and the counterfactual passes a controller's observations need "
                     "(esper_jax.runs.compute)",
            "minus_frontier": "final loss minus the frontier's loss at the same compute (the envelope's networks' "
                              "losses on the same env, piecewise-linear in log compute), paired over envs, 95% CI",
            "minus_frontier_at_mean_compute": "final loss minus the frontier's at the row's mean compute (one "
                                              "static network for every env, as a user picks one without knowing "
                                              "each env's problem), paired over envs, 95% CI",
            "compute_ratio": "the row's compute / the compute the frontier needs for the row's mean loss "
                             "(< 1: fewer FLOPs than the best static network of that loss)",
            "ceiling": "the best a policy choosing one plan of the run's menu per env can reach on these envs: "
                       "per env the plan with the lowest final loss (by_loss) or the one furthest below the "
                       "frontier at its compute (by_frontier), chosen knowing the outcome",
        },
    }


def _verdict(ci: Mapping[str, Any]) -> str:
    if ci.get("high") is not None and ci["high"] < 0:
        return "below"
    if ci.get("low") is not None and ci["low"] > 0:
        return "above"
    return "on (CI spans 0)"


def ratio_text(row: Mapping[str, Any]) -> str:
    """A row's compute / the frontier's for its loss, as a table cell (a bound where the loss is outside
    the frontier's range)."""
    bound = {"interpolated": "", "below_frontier": " (at most: below every static network)",
             "above_frontier": " (at least: above every static network)"}[row["frontier_compute_to_reach_how"]]
    return f"{row['compute_ratio']:.2f}{bound}"


def markdown(payload: Mapping[str, Any]) -> str:
    """``frontier.md``: the frontier and every row against it."""
    lines = []
    if payload["synthetic"]:
        lines += ["**SYNTHETIC data**: these results are on the synthetic stand-in, not the real dataset.", ""]
    held, front = payload["held_out"], payload["frontier"]
    lines += [f"Frontier of run `{payload['run_dir']}`: task {payload['task']} on {payload['data']}; "
              f"{held['num_envs']} held-out envs ({held['derivation']}); host {payload['host_params']:,} parameters. "
              f"Static frontier (lower envelope of loss against FLOPs): {', '.join(front['networks'])}.", "",
              "| row | kind | final val loss | GFLOPs | minus frontier at same compute [95% CI] (lower in) | vs frontier "
              "| minus frontier at mean compute [95% CI] "
              f"| compute / frontier's for same loss | minus {BEST_FIXED_2} [95% CI] (lower in) |",
              "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(payload["rows"].items(), key=lambda kv: (kv[1]["kind"] == STATIC_NETWORK, kv[1]["flops"]))
    for name, r in order:
        ci = r["minus_frontier_ci"]
        gap = ci_text(ci) if ci["half_width"] is not None else f"- ({ci['better']}/{ci['n']})"
        kind = r["kind"] + (f", lr x{r['lr_scale']:g}" if "lr_scale" in r else "") + (" *" if r.get("on_frontier") else "")
        fixed = r.get(f"minus_{BEST_FIXED_2}_ci")
        versus = "-" if not fixed or fixed["half_width"] is None else ci_text(fixed)
        mean_ci = r.get("minus_frontier_at_mean_compute_ci")  # absent from payloads written before it existed
        at_mean = "-" if not mean_ci or mean_ci["half_width"] is None else ci_text(mean_ci)
        lines.append(f"| {name} | {kind} | {r['final_val_loss']:.4f} ± {r['final_val_loss_std']:.4f} | "
                     f"{r['flops'] / 1e9:.3g} | {gap} | {_verdict(ci)} | {at_mean} | "
                     f"{ratio_text(r)} | {versus} |")
    check = payload.get("static_reproduced_max_abs_difference")
    lines += ["", "`*`: on the frontier. " + payload["definitions"]["minus_frontier"] + "; at mean compute: "
              + payload["definitions"].get("minus_frontier_at_mean_compute", "not computed for this payload") + ". Compute: "
              + payload["definitions"]["flops"] + "; compute / frontier's: " + payload["definitions"]["compute_ratio"] + "."]
    if check is not None:
        lines += ["", f"Static re-run here vs the evaluation's static: largest per-env difference {check:.2e}."]
    ceiling = payload.get("ceiling")  # absent from payloads written before it existed
    if ceiling:
        lines += ["", f"**The ceiling of a policy over the menu** ({', '.join(ceiling['plans'])}): "
                  + payload["definitions"]["ceiling"] + "."]
        for key, what in (("by_loss", "lowest loss"), ("by_frontier", "furthest below the frontier")):
            c = ceiling[key]
            chosen = ", ".join(f"{n} {k}" for n, k in c["chosen"].items() if k)
            lines.append(f"- {what} per env: final val loss {c['final_val_loss']:.4f} at {c['flops'] / 1e9:.3g} GFLOPs "
                         f"(chosen: {chosen}); minus the frontier at its compute {ci_text(c['minus_frontier_ci'])}, "
                         f"{_verdict(c['minus_frontier_ci'])}; compute / frontier's for its loss "
                         f"{c['compute_ratio']:.2f}.")
    cal = payload.get("calibration")
    if cal:
        lines += ["", f"Best fixed schedules, chosen on {cal['num_envs']} calibration envs ({cal['stream']}): single "
                  f"`{cal[BEST_FIXED_1]}`, any `{cal[BEST_FIXED_2]}`; each static network's learning rate: the run's "
                  f"host rate ({cal['host_lr']:g}) times the best of {', '.join(f'x{s:g}' for s in cal['lr_scales'])} "
                  "there."]
    return "\n".join(lines) + "\n"
