"""Held-out evaluation of controllers: the trained policy, the heuristic, random and static.

Every controller runs one episode on the same population of held-out inner environments: the
same reset keys (initial host weights), the same per-epoch environment keys (batch order,
augmentation, seed initialization), derived from the run seed by :func:`held_out_key` through a
stream no training code draws from. The only difference between two controllers' episodes is
their actions. A controller's own randomness (the random controller, a sampling policy) comes
from a separate key stream, also the same for every controller.

One compiled program serves all controllers: the episode is a ``lax.scan`` over epochs whose
body picks the controller with ``lax.switch`` on a (non-batched) index, so XLA runs only the
chosen branch and the expensive part — the environment step — is compiled once rather than once
per controller. Each epoch records the lattice's stage and blueprint per slot, the validation
loss and the op taken, which become the seed timelines of the report.

What this module returns and writes:

* :class:`EpisodeOutput`: arrays of one episode per env (``[N]``, ``[N, E]``, ``[N, E, S]``);
* :func:`summarize_episodes` / :func:`timeline`: JSON-ready dicts of one controller's results;
* :func:`write_evaluation`: ``evaluation.json`` and ``evaluation.md`` (the comparison table).

Language-model runs also answer the efficiency question (loss against parameters x seconds, with
a large static reference): :mod:`esper_jax.runs.efficiency`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from flax import struct

from esper_jax.env.actions import FactoredAction, Op
from esper_jax.env.controllers import CONTROLLERS, make_controller
from esper_jax.env.problems import ProblemFamily
from esper_jax.env.environment import EnvData, EnvState, MorphogeneticEnv
from esper_jax.lattice.lifecycle import Stage
from esper_jax.env.rewards import parameter_rent
from esper_jax.rl.plans import PlanTrainer
from esper_jax.runs.rundir import fmt, perplexity, write_json

POLICY = "policy"
EVALUATION_VERSION = 1
# The held-out environments' key stream: fold_in(key(run seed), EVAL_STREAM). Training draws its
# keys by splitting key(seed) (and per-member seeds); a fold_in with this constant is a different
# stream, so held-out environments never replay a training environment.
EVAL_STREAM = 0x45564C31  # "EVL1"
STAGE_NAMES = tuple(s.name for s in Stage)
OP_NAMES = tuple(o.name for o in Op)


def held_out_key(run_seed: int) -> jax.Array:
    """The key of the held-out environments of a run with seed ``run_seed``."""
    return jax.random.fold_in(jax.random.key(run_seed), EVAL_STREAM)


def episode_keys(key: jax.Array, num_envs: int, epochs: int, repeats: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The keys of one evaluation episode: reset keys ``[N]`` (initial weights), environment step
    keys ``[E, N]`` (batches, augmentation, seed initialization) and controller keys ``[E]``.
    ``repeats``: every env's keys ``repeats`` times in a row (``[N * repeats]``), for members
    that see the same env under different settings (a learning-rate sweep); the envs are those
    of ``repeats=1``."""
    reset_key, env_key, act_key = jax.random.split(key, 3)
    step_keys = jax.vmap(lambda k: jax.random.split(k, num_envs))(jax.random.split(env_key, epochs))
    reset_keys = jax.random.split(reset_key, num_envs)
    if repeats > 1:
        reset_keys, step_keys = jnp.repeat(reset_keys, repeats, axis=0), jnp.repeat(step_keys, repeats, axis=1)
    return reset_keys, step_keys, jax.random.split(act_key, epochs)


class Driver(NamedTuple):
    """How a controller acts on a population of envs.

    ``init_carry(num_envs)`` gives the controller's recurrent carry (``()`` for stateless ones);
    ``act(inputs, carry, key, obs[N, D], state) -> (FactoredAction leaves [N], carry)``, where
    ``inputs`` is a pytree of traced arguments (the policy's parameters) shared by all drivers.
    """

    init_carry: Callable[[int], Any]
    act: Callable


def controller_driver(controller: Callable[[jax.Array, EnvState], FactoredAction]) -> Driver:
    """A rule-based ``(key, EnvState of one member) -> FactoredAction`` controller, vmapped."""

    def act(inputs, carry, key, obs, state):
        keys = jax.random.split(key, obs.shape[0])
        return jax.vmap(controller)(keys, state), carry

    return Driver(init_carry=lambda num_envs: (), act=act)


def policy_driver(trainer, deterministic: bool = True) -> Driver:
    """The trained policy through ``trainer.act`` (:mod:`esper_jax.rl.ppo`; a learner that decides
    once per episode, :mod:`esper_jax.rl.plans`, acts on the env state through its plan); ``inputs`` is
    ``(params, obs_stats)`` of one learner. ``deterministic`` takes each head's most likely
    valid choice (the most likely plan); otherwise actions (plans) are sampled."""

    def act(inputs, carry, key, obs, state):
        params, obs_stats = inputs
        if isinstance(trainer, PlanTrainer):
            return trainer.act(params, obs_stats, obs, state, carry, key, deterministic)
        return trainer.act(params, obs_stats, obs, trainer.masks(state), carry, key, deterministic)

    return Driver(init_carry=trainer.init_carry, act=act)


@struct.dataclass
class EpisodeOutput:
    """One held-out episode per env. Timelines hold the state at the end of each epoch (after
    the lifecycle tick), so ``stage[:, -1]`` is the final state's stage."""

    final_val_loss: jax.Array       # [N]
    final_val_accuracy: jax.Array   # [N] (0 for language models)
    params_added: jax.Array         # [N] parameters of computed seeds at the end
    episode_return: jax.Array       # [N] undiscounted
    rollbacks: jax.Array            # [N]
    germinated: jax.Array           # [N, NB]
    fossilized: jax.Array           # [N, NB]
    pruned: jax.Array               # [N, NB]
    final_stage: jax.Array          # [N, S]
    final_blueprint: jax.Array      # [N, S]
    stage: jax.Array                # [N, E, S]
    trained_stage: jax.Array        # [N, E, S] while the epoch trained (after the action, before the tick)
    blueprint: jax.Array            # [N, E, S] (-1 empty)
    val_loss: jax.Array             # [N, E]
    val_accuracy: jax.Array         # [N, E]
    op: jax.Array                   # [N, E] the op requested
    applied: jax.Array              # [N, E] whether it was valid and applied
    train_fraction: jax.Array       # [N] each env's problem (esper_jax.env.problems)
    label_noise: jax.Array          # [N]


def _as_action(action: FactoredAction, num_envs: int) -> FactoredAction:
    # Every switch branch must return identical types: int32 leaves of shape [N].
    return jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a, jnp.int32), (num_envs,)), action)


class Evaluator:
    """Runs any of its controllers over ``num_envs`` held-out envs with one compiled episode.

    ``controllers``: rule-based controller names (:data:`esper_jax.env.controllers.CONTROLLERS`);
    ``policy``: an optional :func:`policy_driver`, evaluated under the name ``"policy"``;
    ``scripted``: more ``(key, EnvState) -> FactoredAction`` controllers by name (e.g. the fixed
    growth schedules of :func:`esper_jax.env.controllers.make_scripted_controller`);
    ``repeats``: run every env that many times side by side (outputs lead with ``num_envs x
    repeats`` members, env-major), each copy changed by ``prepare``;
    ``prepare``: ``(population EnvState) -> EnvState`` applied once after the reset (set up each
    member's variant: a learning-rate scale, an architecture built in).
    """

    def __init__(self, env: MorphogeneticEnv, num_envs: int, controllers: Sequence[str] = CONTROLLERS,
                 policy: Driver | None = None, scripted: Mapping[str, Callable] | None = None, repeats: int = 1,
                 prepare: Callable[[EnvState], EnvState] | None = None):
        if num_envs <= 0 or repeats <= 0:
            raise ValueError(f"num_envs and repeats must be positive, got {num_envs} and {repeats}")
        self.env = env
        self.num_envs = num_envs * repeats
        self.repeats = repeats
        self.prepare = prepare
        drivers = {POLICY: policy} if policy is not None else {}
        for name in controllers:
            drivers[name] = controller_driver(make_controller(name, env))
        for name, controller in (scripted or {}).items():
            if name in drivers:
                raise ValueError(f"controller name {name!r} is used twice")
            drivers[name] = controller_driver(controller)
        if not drivers:
            raise ValueError("nothing to evaluate: give a policy or at least one controller")
        self.names = tuple(drivers)
        self._drivers = tuple(drivers.values())
        # The carry every branch passes along: the policy's (rule-based drivers return it unchanged).
        self._carry_driver = policy if policy is not None else self._drivers[0]
        self._episode = jax.jit(self._episode_impl)

    def _episode_impl(self, index, inputs, key, data: EnvData) -> EpisodeOutput:
        env, n = self.env, self.num_envs
        epochs = env.config.episode_epochs
        reset_keys, step_keys, act_keys = episode_keys(key, n // self.repeats, epochs, self.repeats)
        obs, state = env.population_reset(reset_keys, data)
        if self.prepare is not None:
            state = self.prepare(state)
            obs = jax.vmap(env.observe)(state)

        def branch(driver):
            def run(operands):
                carry, k, obs, state = operands
                action, carry = driver.act(inputs, carry, k, obs, state)
                return _as_action(action, n), carry
            return run

        branches = [branch(d) for d in self._drivers]

        def epoch(loop, keys):
            obs, state, carry, ret = loop
            k_act, k_env = keys
            action, carry = jax.lax.switch(index, branches, (carry, k_act, obs, state))
            obs, state, reward, done, info = env.population_step(k_env, state, action, data)
            status = state.train.lattice.status
            record = (status.stage, status.blueprint, state.val_loss, state.val_accuracy, action.op, info["applied"],
                      info["trained_stage"])
            return (obs, state, carry, ret + reward), record

        keys = (act_keys, step_keys)
        carry0 = self._carry_driver.init_carry(n)
        (obs, state, carry, ret), record = jax.lax.scan(epoch, (obs, state, carry0, jnp.zeros((n,), jnp.float32)), keys)
        stage, blueprint, val_loss, val_accuracy, op, applied, trained_stage = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), record)
        status = state.train.lattice.status
        return EpisodeOutput(
            final_val_loss=state.val_loss, final_val_accuracy=state.val_accuracy,
            params_added=jax.vmap(env.lattice.live_param_count)(state.train.lattice), episode_return=ret,
            rollbacks=state.rollbacks, germinated=state.germinated, fossilized=state.fossilized, pruned=state.pruned,
            final_stage=status.stage, final_blueprint=status.blueprint, stage=stage, trained_stage=trained_stage,
            blueprint=blueprint,
            val_loss=val_loss, val_accuracy=val_accuracy, op=op, applied=applied,
            train_fraction=state.problem.train_fraction, label_noise=state.problem.label_noise,
        )

    def run(self, name: str, data: EnvData, key: jax.Array, inputs: Any = None) -> EpisodeOutput:
        """One episode of controller ``name`` (NumPy arrays). ``inputs``: the policy's
        ``(params, obs_stats)`` when this evaluator has a policy (every controller call passes
        the same structure; rule-based controllers ignore it)."""
        if name not in self.names:
            raise ValueError(f"unknown controller {name!r}; this evaluator runs {', '.join(self.names)}")
        index = jnp.asarray(self.names.index(name), jnp.int32)
        return jax.device_get(self._episode(index, inputs, key, data))


def first_decision(env: MorphogeneticEnv, trainer, inputs, data: EnvData, key: jax.Array,
                   num_envs: int) -> dict[str, Any]:
    """The policy's probability of each op at the first observation of every held-out env (the
    envs of the evaluation episodes, from the same reset keys): how it decides per problem before
    anything has trained (with SEAL: grow, wait, or seal the episode), and the critic's value of
    that observation (what the learner expects of the episode: whether it tells the problems apart
    where the policy does not). ``inputs``: the policy's ``(params, obs_stats)``. Per env, with the
    env's drawn training-set fraction."""
    reset_keys, _, _ = episode_keys(key, num_envs, env.config.episode_epochs)
    obs, state = jax.jit(env.population_reset)(reset_keys, data)
    params, obs_stats = inputs
    if isinstance(trainer, PlanTrainer):  # its one decision: the plan
        probabilities, value = jax.jit(trainer.plan_distribution)(params, obs_stats, obs)
        choices = {"plans": list(trainer.plans)}
    else:
        probabilities, value = jax.jit(trainer.op_distribution)(
            params, obs_stats, obs, env.population_masks(state), trainer.init_carry(num_envs),
            jnp.ones((num_envs,), bool))
        choices = {"ops": list(OP_NAMES[:env.action_space.num_ops])}
    return {
        **choices,
        "probabilities": np.asarray(probabilities, np.float64).round(6).tolist(),
        "value": [float(v) for v in np.asarray(value)],
        "train_fraction": [float(v) for v in np.asarray(state.problem.train_fraction)],
    }


def first_decision_text(decision: Mapping[str, Any]) -> str:
    """One line: the mean probability of each op the policy gives any env and the critic's mean
    value, over all envs and, when the envs' set sizes differ, over the smaller and the larger half."""
    probabilities, value = np.asarray(decision["probabilities"]), np.asarray(decision["value"])
    used = probabilities.max(axis=0) > 0
    kind = "plans" if "plans" in decision else "ops"

    def means(rows):
        ops = ", ".join(f"{op} {p:.3f}" for op, p, u in zip(decision[kind], probabilities[rows].mean(axis=0), used) if u)
        return f"{ops} (value {value[rows].mean():+.2f})"

    everything = np.ones(len(value), bool)
    what = "its plan for the episode" if kind == "plans" else "epoch 0"
    text = f"The policy's first decision ({what}), mean probability over the envs: {means(everything)}"
    fraction = np.asarray(decision["train_fraction"])
    if len(np.unique(fraction)) > 1:
        small = fraction <= np.median(fraction)
        text += (f"; on the smaller half of the training sets (fraction <= {np.median(fraction):.4g}): "
                 f"{means(small)}; on the larger: {means(~small)}")
    return text + "."


# ---------------------------------------------------------------------------- results as JSON


def _per_blueprint(counts: np.ndarray, blueprints: Sequence[str]) -> dict[str, int]:
    """Totals over envs per blueprint (every enabled blueprint listed, zeros included)."""
    totals = np.asarray(counts).sum(axis=0)
    return {name: int(c) for name, c in zip(blueprints, totals)}


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


def summarize_episodes(env: MorphogeneticEnv, out: EpisodeOutput) -> dict[str, Any]:
    """One controller's results: means over the held-out envs, per-env values, seeds
    germinated/fossilized/pruned per blueprint (totals over envs) and, with the SEAL op, the
    epoch each env sealed at (None: never)."""
    blueprints = [b.name for b in env.lattice.blueprints]
    loss = np.asarray(out.final_val_loss, np.float64)
    has_accuracy = env.config.task.has_accuracy
    acc = np.asarray(out.final_val_accuracy, np.float64)
    added = np.asarray(out.params_added, np.int64)
    return {
        "final_val_loss": _finite_or_none(loss.mean()),
        "final_val_loss_std": _finite_or_none(loss.std()),
        "final_val_loss_per_env": [_finite_or_none(v) for v in loss],
        "final_val_accuracy": float(acc.mean()) if has_accuracy else None,
        "final_val_accuracy_per_env": [float(v) for v in acc] if has_accuracy else None,
        # language models: exp of the final validation loss (of the mean over envs, and per env)
        "final_val_perplexity": None if has_accuracy else perplexity(float(loss.mean())),
        "final_val_perplexity_per_env": None if has_accuracy else [perplexity(float(v)) for v in loss],
        "params_added": float(added.mean()),
        "params_added_per_env": [int(v) for v in added],
        "mean_return": float(np.mean(out.episode_return)),
        "rollbacks": int(np.sum(out.rollbacks)),
        "germinated": _per_blueprint(out.germinated, blueprints),
        "fossilized": _per_blueprint(out.fossilized, blueprints),
        "pruned": _per_blueprint(out.pruned, blueprints),
        **({"sealed_at_epoch": _sealed_at(out)} if env.config.actions.seal else {}),
    }


def _sealed_at(out: EpisodeOutput) -> list[int | None]:
    """Per env, the epoch whose action was an applied SEAL (at most one: a second is masked out)."""
    sealed = (np.asarray(out.op) == Op.SEAL) & np.asarray(out.applied)
    return [int(np.argmax(row)) if row.any() else None for row in sealed]


def timeline(env: MorphogeneticEnv, out: EpisodeOutput) -> dict[str, Any]:
    """Per-env, per-epoch lattice state: ``stage``/``blueprint`` are ``[env][epoch][slot]``
    (stage codes index ``stages``; blueprint codes index ``blueprints``, -1 = empty)."""
    return {
        "slots": list(env.lattice.slots.slot_ids),
        "blueprints": [b.name for b in env.lattice.blueprints],
        "stages": list(STAGE_NAMES),
        "ops": list(OP_NAMES),
        "stage": np.asarray(out.stage).astype(int).tolist(),
        "trained_stage": np.asarray(out.trained_stage).astype(int).tolist(),
        "blueprint": np.asarray(out.blueprint).astype(int).tolist(),
        "val_loss": [[_finite_or_none(v) for v in row] for row in np.asarray(out.val_loss, np.float64)],
        "op": np.asarray(out.op).astype(int).tolist(),
        "applied": np.asarray(out.applied).astype(bool).tolist(),
    }


# ---------------------------------------------------------------------------- writing


def _counts(counts: dict[str, int]) -> str:
    used = [f"{name} {count}" for name, count in counts.items() if count]
    return ", ".join(used) if used else "0"


def markdown_table(payload: dict[str, Any]) -> str:
    """The comparison table of ``evaluation.json``'s payload, as Markdown."""
    held = payload["held_out"]
    lines = []
    if payload.get("synthetic"):
        lines += ["**SYNTHETIC data**: these results are on the synthetic stand-in, not the real dataset.", ""]
    lines += [
        f"Evaluation of run `{payload.get('run_dir', '?')}`: task {payload['task']} on {payload['data']}; "
        f"{held['num_envs']} held-out envs x {held['episode_epochs']} epochs (held-out seed stream "
        f"{held['derivation']}); host {payload['host_params']} parameters.",
    ]
    problems = held.get("problems")
    if problems and problems["family"] != ProblemFamily().describe():
        lines.append(f"Inner problems: {problems['family']}; each env's drawn problem is in the evaluation's JSON file.")
    if problems and problems.get("trained_on"):
        trained = problems["trained_on"]
        lines.append(f"**A stratum, not the run's family**: the run trained on training fractions "
                     f"{trained['train_fraction'][0]:g}..{trained['train_fraction'][1]:g} and label noise "
                     f"{trained['label_noise'][0]:g}..{trained['label_noise'][1]:g}; envs outside those ranges are "
                     f"problems it never trained on.")
    source = payload.get("transferred_from")
    if source:
        mix = source.get("mix") or []  # a mixed run's other tasks (absent from evaluations before --mix)
        trained = (f"{source['task']} ({source['data']}; plans {', '.join(source['plans'])}; {source['plan_head']} "
                   f"plan head)" + "".join(f" and {other['task']} ({other['data']}; plans {', '.join(other['plans'])})"
                                           for other in mix))
        if payload["task"] in [other["task"] for other in mix]:
            head = (f"**Trained on a mix**: the policy trained on {trained} in one run acts here on held-out envs of "
                    f"{payload['task']}, one of its tasks.")
        else:
            head = (f"**Zero-shot transfer**: the policy trained on {trained} acts here on the envs and menu of "
                    f"{payload['task']}, which it never trained on.")
        lines.append(head + (f" Minus the target run's own policy on the same envs (its evaluation.json): "
                        f"{ci_text(source['minus_native_policy'])}." if source.get("minus_native_policy") else ""))
    if payload.get("policy"):
        pol = payload["policy"]
        lines.append(f"Policy: member {pol['member']} of {pol['population']} ({pol['selection']}); checkpoint after "
                     f"update {pol['checkpoint_update']}, {'deterministic' if pol['deterministic'] else 'sampled'} actions.")
        if pol.get("first_decision"):
            lines.append(first_decision_text(pol["first_decision"]))
    language_model = any(r.get("final_val_perplexity") is not None for r in payload["controllers"].values())
    quality, quality_spec = ("final_val_perplexity", ".2f") if language_model else ("final_val_accuracy", ".3f")
    compared = [base for base in BASELINES if base in payload["controllers"]]
    lines += [
        "",
        "| controller | final val loss | " + "".join(f"vs {base}, mean [95% CI] (better in) | " for base in compared)
        + f"{'val perplexity' if language_model else 'val accuracy'} | params added | return | germinated | fossilized "
        "| pruned |",
        "|---|---|" + "---|" * len(compared) + "---|---|---|---|---|---|",
    ]

    def versus(r, base):
        return ci_text(r.get(f"final_val_loss_minus_{base}_ci"))

    for name, r in payload["controllers"].items():
        loss = "-" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f} ± {r['final_val_loss_std']:.4f}"
        lines.append(
            f"| {name} | {loss} | " + "".join(f"{versus(r, base)} | " for base in compared) +
            f"{fmt(r.get(quality), quality_spec)} | {r['params_added']:.0f} | "
            f"{r['mean_return']:.3f} | {_counts(r['germinated'])} | {_counts(r['fossilized'])} | {_counts(r['pruned'])} |"
        )
    lines += ["", "Losses and accuracy: mean (± std) over held-out envs at the end of the episode; vs "
              f"{' / vs '.join(compared)}: mean over envs of the final loss minus that baseline's on the same env (negative = better), "
              "its 95% Student-t confidence interval, and in how many envs it was lower; params added: mean per env of "
              "parameters in computed seeds; seed counts: totals over all envs, per blueprint."]
    sealing = {name: r["sealed_at_epoch"] for name, r in payload["controllers"].items() if "sealed_at_epoch" in r}
    if sealing:
        lines += ["", "SEAL (no more germinations this episode): " + "; ".join(
            f"{name} sealed in {sum(e is not None for e in at)} of {len(at)} envs"
            + (f", at epochs {', '.join(str(e) for e in at if e is not None)}" if any(e is not None for e in at) else "")
            for name, at in sealing.items()) + "."]
    align = payload.get("return_alignment")
    if align:
        lines += ["", f"Return vs goal over all {align['episodes']} episodes: Pearson correlation of the episode return "
                  f"with the final val loss net of parameter rent {fmt(align['pearson_return_vs_final_loss_net_of_rent'], '+.3f')} "
                  f"(within env {fmt(align['pearson_return_vs_final_loss_net_of_rent_within_env'], '+.3f')}; "
                  "strongly negative = a higher return means a better network)."]
    return "\n".join(lines) + "\n"


def write_json_and_markdown(json_path: str | os.PathLike, payload: dict[str, Any], markdown: str) -> None:
    """``payload`` as JSON at ``json_path`` (atomically: a reader never sees half a file) and
    ``markdown`` beside it, with the suffix ``.md``."""
    json_path = os.fspath(json_path)
    write_json(json_path, payload)
    with open(os.path.splitext(json_path)[0] + ".md", "w") as f:
        f.write(markdown)


def write_evaluation(run_dir: str, payload: dict[str, Any], markdown: str | None = None,
                     stem: str = "evaluation") -> tuple[str, str]:
    """Write ``evaluation.json`` and ``evaluation.md`` (or ``stem``'s) into ``run_dir``; returns their
    paths. ``markdown``: the text of the ``.md`` when it has more than :func:`markdown_table` (the
    efficiency section of :mod:`esper_jax.runs.efficiency`)."""
    json_path = os.path.join(run_dir, f"{stem}.json")
    write_json_and_markdown(json_path, payload, markdown_table(payload) if markdown is None else markdown)
    return json_path, os.path.join(run_dir, f"{stem}.md")


# The best fixed growth schedules of a calibration sweep (esper_jax.runs.frontier): of one seed, of any.
BEST_FIXED = ("best_fixed_1", "best_fixed_2")
# What every controller is compared with, pairwise on the same envs: never growing, Esper's rules,
# growing at random (a learned controller has to beat chance, not only the rules), and the best
# fixed schedule when the run has one (what a learned controller has to beat to be worth learning).
BASELINES = ("static", "heuristic", "random", BEST_FIXED[1])


def ci_text(ci: Mapping[str, Any] | None) -> str:
    """A :func:`paired_ci` as a table cell: ``mean [low, high] (lower in/n)``; ``-`` without a mean."""
    if not ci or ci["mean"] is None:
        return "-"
    interval = "" if ci["half_width"] is None else f" [{ci['low']:+.4f}, {ci['high']:+.4f}]"
    return f"{ci['mean']:+.4f}{interval} ({ci['better']}/{ci['n']})"


def paired_ci(differences: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """Mean of paired differences with a Student-t confidence interval (``half_width``: the mean
    ± this is the interval), their standard deviation, and in how many pairs the difference is
    negative (lower loss = better)."""
    d = np.asarray(differences, np.float64)
    n = d.size
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    half = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    mean = float(d.mean()) if n else float("nan")
    return {"mean": _finite_or_none(mean), "half_width": _finite_or_none(half), "sd": _finite_or_none(sd),
            "low": _finite_or_none(mean - half), "high": _finite_or_none(mean + half), "level": level,
            "better": int(np.sum(d < 0)), "n": int(n)}


def paired_differences(out: EpisodeOutput, results: dict[str, EpisodeOutput]) -> dict[str, Any]:
    """Final validation loss minus each baseline's on the same held-out env (mean over envs, its
    95% confidence interval, and in how many envs it is lower). The envs and their seeds are
    shared, so this paired difference is what the actions changed, without the env-to-env spread
    of the plain means."""
    diffs = {}
    for base in BASELINES:
        if base not in results:
            continue
        d = np.asarray(out.final_val_loss, np.float64) - np.asarray(results[base].final_val_loss, np.float64)
        stats = paired_ci(d)
        diffs[f"final_val_loss_minus_{base}"] = stats["mean"]
        diffs[f"final_val_loss_minus_{base}_ci"] = stats
        diffs[f"envs_better_than_{base}"] = stats["better"]
    return diffs


def rent(env: MorphogeneticEnv, params_added: np.ndarray) -> np.ndarray:
    """The reward's parameter rent for an episode's final size, in loss units: what the goal
    charges for the parameters a controller added (``rent_weight * log1p(added / host)`` per
    epoch, over the episode, divided by the loss term's scale)."""
    r = env.config.reward
    per_epoch = np.asarray(parameter_rent(params_added, float(env.host_param_count), r.rent_weight), np.float64)
    return per_epoch * env.config.episode_epochs * r.typical_loss_delta_std / r.loss_delta_weight


def return_alignment(env: MorphogeneticEnv, results: dict[str, EpisodeOutput]) -> dict[str, Any]:
    """Does a higher episode return mean a better outcome? Over every evaluated episode (all
    controllers, all envs): the correlation of the return with the final validation loss net of
    parameter rent (the goal; lower is better, so aligned means strongly negative), pooled and
    within env (each env's mean over controllers removed, so that easy and hard envs do not
    decide it)."""
    returns = np.stack([np.asarray(o.episode_return, np.float64) for o in results.values()])      # [C, N]
    goal = np.stack([np.asarray(o.final_val_loss, np.float64) + rent(env, o.params_added) for o in results.values()])
    loss = np.stack([np.asarray(o.final_val_loss, np.float64) for o in results.values()])

    def corr(a, b):
        a, b = a.ravel(), b.ravel()
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() < 3 or a[ok].std() == 0 or b[ok].std() == 0:
            return None
        return float(np.corrcoef(a[ok], b[ok])[0, 1])

    within = lambda x: x - x.mean(axis=0, keepdims=True)
    return {
        "episodes": int(returns.size),
        "pearson_return_vs_final_loss_net_of_rent": corr(returns, goal),
        "pearson_return_vs_final_loss_net_of_rent_within_env": corr(within(returns), within(goal)),
        "pearson_return_vs_final_loss": corr(returns, loss),
        "spearman_return_vs_final_loss_net_of_rent": (
            None if returns.size < 3 else _finite_or_none(scipy.stats.spearmanr(returns.ravel(), goal.ravel())[0])),
    }


def evaluation_payload(env: MorphogeneticEnv, results: dict[str, EpisodeOutput], *, run_seed: int, task: str,
                       data_label: str, synthetic: bool, run_dir: str | None = None,
                       policy: dict[str, Any] | None = None,
                       trained_on: dict[str, list[float]] | None = None,
                       transferred_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``evaluation.json`` object for ``results`` (controller name → episode). ``trained_on``:
    the ranges of the run's own family, when the envs drew from another (a stratum);
    ``transferred_from``: the task, data and menu the policy trained on, when it acts on another task's
    envs (zero-shot transfer)."""
    first = next(iter(results.values()))
    return {
        "version": EVALUATION_VERSION,
        "run_dir": run_dir,
        "task": task,
        "data": data_label,
        "synthetic": bool(synthetic),
        "host_params": env.host_param_count,
        "held_out": {
            "run_seed": int(run_seed),
            "derivation": f"fold_in(key({int(run_seed)}), {EVAL_STREAM:#x})",
            "num_envs": int(np.asarray(first.final_val_loss).shape[0]),
            "episode_epochs": env.config.episode_epochs,
            # every env's problem, the same for every controller (drawn from the env's reset key)
            "problems": {"family": env.config.problems.describe(),
                         "train_fraction": [float(v) for v in np.asarray(first.train_fraction)],
                         "label_noise": [float(v) for v in np.asarray(first.label_noise)],
                         **({} if trained_on is None else {"trained_on": trained_on})},
        },
        "policy": policy,
        **({} if transferred_from is None else {"transferred_from": transferred_from}),
        "controllers": {name: {**summarize_episodes(env, out), **paired_differences(out, results)}
                        for name, out in results.items()},
        "return_alignment": return_alignment(env, results),
        "timelines": {name: timeline(env, out) for name, out in results.items()},
    }
