"""The inner environment: one morphogenetic training run per member, a population of them
stepped as one jitted program.

gymnax-style pure API: ``reset(key, data) -> (obs, state)`` and
``step(key, state, action, data) -> (obs, state, reward, done, info)``; ``data`` (the
dataset, on device) plays the role of gymnax's env params. One step = one epoch:

1. apply the (masked) factored action to the lattice;
2. train host and live seeds for ``steps_per_epoch`` batches (``lax.scan``), each member
   drawing its batches by index from its own key;
3. validate on a fixed validation subset, and measure each slot's counterfactual contribution
   (the loss with that slot forced to identity, minus the loss with it);
4. governor: a non-finite loss, or a loss above an absolute bound and far above its recent
   mean for several epochs, rolls host and lattice back to the last good snapshot, prunes
   live seeds, and is penalized in the reward;
5. record measurements, tick the lifecycle, observe, reward.

Why the population axis is explicit (``population_reset``/``population_step``) rather than a
``vmap`` of ``step``: under ``vmap`` every blueprint branch becomes a ``select`` and is computed
for every member; with the axis explicit, the model computes a blueprint only when some member
uses it (see :mod:`esper_jax.lattice.model`). ``reset``/``step`` are the same code with one member, and
still work under ``jax.vmap`` (just without that saving).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from esper_jax.lattice import lifecycle
from esper_jax.lattice.flops import ModelCosts, epoch_flops, model_costs

from esper_jax.env import observations
from esper_jax.env.governor import GovernorConfig, Verdict, judge
from esper_jax.env.problems import Problem, ProblemFamily, draw_problem, noisy_targets, problem_size, train_count
from esper_jax.env.actions import ActionConfig, ActionMasks, ActionSpace, FactoredAction, Op, action_masks, apply_action
from esper_jax.data.augment import AUGMENTS, Augment, draw_crop_flip, gather_crop_flip, normalize_images
from esper_jax.lattice.lifecycle import GateConfig, Stage
from esper_jax.lattice.model import MorphogeneticModel
from esper_jax.lattice.optim import LRSchedule, OptimizerKind, inner_optimizer
from esper_jax.env.rewards import RewardConfig, RewardSignals, compute_reward
from esper_jax.env.tasks import TaskConfig
from esper_jax.lattice.strategy import PopulationStrategy
from esper_jax.lattice.training import StepMetrics, TrainState, default_host_optimizer, make_train_step
from esper_jax.trees import add_axis, drop_axis, select


@struct.dataclass
class EnvData:
    """The dataset on device. Images: uint8 NHWC + int labels. Language model: ``train_x`` is the
    1-D uint16 token stream (``train_y`` unused, empty) and ``val_x``/``val_y`` fixed windows."""

    train_x: jax.Array
    train_y: jax.Array
    val_x: jax.Array
    val_y: jax.Array


@struct.dataclass
class EnvState:
    train: TrainState
    snapshot: TrainState           # last good weights, for the governor
    epoch: jax.Array
    train_loss: jax.Array
    val_loss: jax.Array
    prev_val_loss: jax.Array
    best_val_loss: jax.Array
    initial_val_loss: jax.Array
    val_accuracy: jax.Array
    loss_history: jax.Array        # [LOSS_HISTORY] most recent last
    recent_val_losses: jax.Array   # [governor.history]
    divergent_epochs: jax.Array
    rollbacks: jax.Array
    metric_at_germination: jax.Array  # [S] accuracy (classification) or loss when the seed was planted
    last_op: jax.Array
    germinated: jax.Array          # [NB] counts per blueprint
    fossilized: jax.Array          # [NB]
    pruned: jax.Array              # [NB]
    problem: Problem               # the inner problem this env drew at reset (esper_jax.env.problems)
    # with the SEAL op (ActionConfig.seal): whether this episode's germination is over; None
    # without it, so a run without the op has the state (and checkpoints) it always had
    sealed: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    task: TaskConfig
    model: MorphogeneticModel
    episode_epochs: int = 25
    steps_per_epoch: int = 20
    batch_size: int = 128
    val_size: int = 512
    # images only: crop_flip (CIFAR's shifts and mirrors), crop (shifts only: digits and text are not
    # mirror-symmetric) or none
    augment: Augment = "crop_flip"
    problems: ProblemFamily = ProblemFamily()
    reward: RewardConfig = RewardConfig()
    governor: GovernorConfig = GovernorConfig()
    actions: ActionConfig = ActionConfig()
    host_optimizer: Any = dataclasses.field(default_factory=default_host_optimizer)
    data_label: str = "unknown"    # "synthetic" or where the real data came from; shown in every output

    def __post_init__(self):
        for name in ("episode_epochs", "steps_per_epoch", "batch_size", "val_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if self.task.kind == "classification" and self.task.channel_stats is None:
            raise ValueError(f"task {self.task.name} has no channel statistics yet: they come from its training "
                             f"images (get_task(..., channel_stats=channel_stats(images)))")


def make_env_config(task: TaskConfig, slot_ids=None, gates: GateConfig = GateConfig(), blueprints=(), host=None,
                    strategy: PopulationStrategy | None = None, host_lr: float = 0.01,
                    host_lr_schedule: LRSchedule = "constant", seed_lr: float = 0.01,
                    optimizer: OptimizerKind = "sgd", **kwargs) -> EnvConfig:
    """``blueprints``: names of the blueprints this run may grow (default: all of the topology's);
    ``host``: a host to use instead of the task's own (tests and smoke runs use small ones);
    ``host_lr``/``host_lr_schedule``: the host's learning rate, constant or cosine-decayed to 0 over the
    episode; ``seed_lr``: every seed's rate, constant (a seed lives for part of an episode, so a
    per-episode decay does not fit it; Esper: 0.01 for host and seeds); ``optimizer``: what host
    and seeds train with (:data:`~esper_jax.lattice.optim.OPTIMIZERS`; Esper's SGD by default);
    ``strategy``: how a population of environments runs (default: the backend's,
    :meth:`~esper_jax.lattice.strategy.PopulationStrategy.for_backend`)."""
    model = MorphogeneticModel.build(host or task.make_host(), slot_ids, gates, blueprints=blueprints,
                                     seed_optimizer=inner_optimizer(optimizer, seed_lr), strategy=strategy)
    episode_steps = (kwargs.get("episode_epochs", EnvConfig.episode_epochs)
                     * kwargs.get("steps_per_epoch", EnvConfig.steps_per_epoch))
    kwargs.setdefault("host_optimizer", inner_optimizer(optimizer, host_lr, host_lr_schedule, episode_steps))
    reward = kwargs.pop("reward", None) or RewardConfig()
    reward = dataclasses.replace(reward, baseline_loss=task.baseline_loss, target_loss=task.target_loss,
                                 typical_loss_delta_std=task.typical_loss_delta_std)
    return EnvConfig(task=task, model=model, reward=reward, **kwargs)


def make_env_data(config: EnvConfig, dataset) -> EnvData:
    """Move a loaded dataset (``ImageDataset`` or ``TokenDataset``) to the device."""
    if config.task.kind == "classification":
        n_val = min(config.val_size, len(dataset.test_labels))
        return EnvData(jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels, jnp.int32),
                       jnp.asarray(dataset.test_images[:n_val]), jnp.asarray(dataset.test_labels[:n_val], jnp.int32))
    block = config.task.block_size
    val = np.asarray(dataset.val_tokens)
    count = min(config.val_size, (len(val) - 1) // block)
    if count < 1:
        raise ValueError(f"validation tokens ({len(val)}) are fewer than one window of {block + 1}")
    windows = np.stack([val[i * block: i * block + block + 1] for i in range(count)]).astype(np.int32)
    return EnvData(jnp.asarray(dataset.train_tokens), jnp.zeros((0,), jnp.int32),
                   jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:]))


class BatchDraw(NamedTuple):
    """One training batch's random choices: ``index`` the examples (classification) or the token
    windows' starts (language modelling), ``offsets``/``flips`` each image's crop and mirror
    (zeros where there is no augmentation)."""
    index: jax.Array    # [B]
    offsets: jax.Array  # [B, 2]
    flips: jax.Array    # [B]


class Validation(NamedTuple):
    """What one epoch's validation measured, per member."""

    val_loss: jax.Array          # [P]
    val_accuracy: jax.Array      # [P] (0 for language models)
    contribution: jax.Array      # [P, S]: loss with slot s forced to identity, minus the loss with it


class MorphogeneticEnv:
    """Holds the static configuration; every method is a pure function of its arguments."""

    def __init__(self, config: EnvConfig):
        self.config = config
        self.model = config.model
        self.lattice = config.model.lattice
        self.trainer = make_train_step(config.model, config.host_optimizer)
        self.host_param_count = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(
            jax.eval_shape(self.model.host.init, jax.random.key(0))))
        self._costs: dict[tuple, ModelCosts] = {}  # model_costs per validation shape: tracing them takes seconds

    # ------------------------------------------------------------------ sizes

    @property
    def observation_size(self) -> int:
        return observations.observation_size(self.lattice, self.config.problems.observes_size, self.config.actions.seal)

    def feature_names(self) -> list[str]:
        return observations.feature_names(self.lattice, self.config.problems.observes_size, self.config.actions.seal)

    def model_costs(self, data: EnvData) -> ModelCosts:
        """The per-batch FLOPs of this env's model (:mod:`esper_jax.lattice.flops`) at its training
        batch and ``data``'s validation set; from shapes alone, so it may be asked while tracing."""
        return self._model_costs(tuple(data.val_x.shape))

    def training_costs(self) -> ModelCosts:
        """:meth:`model_costs` without the data: the training batch's counts are exact, the
        evaluation ones are those of a one-example validation set (what needs no data: the cost of
        a seed relative to the host, :mod:`esper_jax.env.descriptors`)."""
        host = self.model.host
        example = host.input_shape(1) if self.config.task.kind == "classification" else (1, self.config.task.block_size)
        return self._model_costs(tuple(example))

    def _model_costs(self, val_shape: tuple[int, ...]) -> ModelCosts:
        cfg = self.config
        if val_shape not in self._costs:
            if cfg.task.kind == "classification":
                example, target, dtype = val_shape[1:], (), jnp.float32
            else:
                example, target, dtype = (cfg.task.block_size,), (cfg.task.block_size,), jnp.int32
            self._costs[val_shape] = model_costs(self.model, cfg.batch_size, val_shape[0], example, target, dtype)
        return self._costs[val_shape]

    # ------------------------------------------------------------------ data

    def _draw_batch(self, key: jax.Array, data: EnvData, problem: Problem) -> BatchDraw:
        """One batch's random choices (which examples, and how each image is cropped and flipped),
        from the part of the training set the env's problem trains on."""
        cfg = self.config
        total = data.train_x.shape[0]
        if cfg.task.kind == "classification":
            k_idx, k_aug = jax.random.split(key)
            count = train_count(problem, total) if cfg.problems.subsets else total
            index = jax.random.randint(k_idx, (cfg.batch_size,), 0, count)
            if cfg.augment != "none":
                offsets, flips = draw_crop_flip(k_aug, cfg.batch_size, self._crop_pad(data))
                return BatchDraw(index, offsets, flips & (cfg.augment == "crop_flip"))
        else:
            window = cfg.task.block_size + 1
            count = train_count(problem, total, window + 1) if cfg.problems.subsets else total
            index = jax.random.randint(key, (cfg.batch_size,), 0, count - window)
        return BatchDraw(index, jnp.zeros((cfg.batch_size, 2), jnp.int32), jnp.zeros((cfg.batch_size,), bool))

    def _crop_pad(self, data: EnvData) -> int:
        return max(1, data.train_x.shape[1] // 8)  # CIFAR's 4-pixel shifts at 32x32, scaled with the resolution

    def _make_batch(self, draw: BatchDraw, data: EnvData, problem: Problem):
        """The batch a draw names: images gathered, cropped, flipped and normalized (or token
        windows), with the targets the env's problem replaced by noise."""
        cfg = self.config
        if cfg.task.kind == "classification":
            if cfg.augment != "none":
                images = gather_crop_flip(data.train_x, draw.index, draw.offsets, draw.flips, self._crop_pad(data))
            else:
                images = data.train_x[draw.index]
            x, y, ids = normalize_images(images, *cfg.task.channel_stats), data.train_y[draw.index], draw.index
        else:
            block = cfg.task.block_size
            windows = jax.vmap(lambda s: jax.lax.dynamic_slice(data.train_x, (s,), (block + 1,)))(
                draw.index).astype(jnp.int32)
            x, y = windows[:, :-1], windows[:, 1:]
            ids = draw.index[:, None] + 1 + jnp.arange(block)  # each target's position in the token stream
        if cfg.problems.noisy:
            y = noisy_targets(problem, ids, y, cfg.task.num_classes)
        return x, y

    def _sample_batch(self, key: jax.Array, data: EnvData, problem: Problem):
        return self._make_batch(self._draw_batch(key, data, problem), data, problem)

    def _val_inputs(self, data: EnvData):
        if self.config.task.kind == "classification":
            return normalize_images(data.val_x, *self.config.task.channel_stats)
        return data.val_x

    def _evaluate(self, train: TrainState, val_x, val_y, disabled=None):
        """Per-member validation loss and accuracy (accuracy is 0 for language models)."""
        logits = self.model.population_apply(train.host_params, train.lattice, val_x, disabled, shared_input=True)
        losses = jax.vmap(lambda out: self.model.host.loss(out, val_y))(logits)
        if self.config.task.has_accuracy:
            accuracy = jnp.mean(jnp.argmax(logits, -1) == val_y, axis=-1)
        else:
            accuracy = jnp.zeros_like(losses)
        return losses, accuracy

    # ------------------------------------------------------------------ API

    def population_reset(self, keys: jax.Array, data: EnvData):
        cfg = self.config
        train = jax.vmap(self.trainer.init)(keys)
        problem = jax.vmap(lambda k: draw_problem(cfg.problems, k))(keys)
        val_loss, accuracy = self._evaluate(train, self._val_inputs(data), data.val_y)
        val_loss = jnp.nan_to_num(val_loss, nan=cfg.task.baseline_loss, posinf=cfg.task.baseline_loss)
        p, s, nb = keys.shape[0], self.lattice.slots.num_slots, self.lattice.num_blueprints
        zeros_i = lambda *shape: jnp.zeros((p,) + shape, jnp.int32)
        state = EnvState(
            train=train, snapshot=train, epoch=zeros_i(), train_loss=val_loss, val_loss=val_loss, prev_val_loss=val_loss,
            best_val_loss=val_loss, initial_val_loss=val_loss, val_accuracy=accuracy,
            loss_history=jnp.repeat(val_loss[:, None], observations.LOSS_HISTORY, axis=1),
            recent_val_losses=jnp.repeat(val_loss[:, None], cfg.governor.history, axis=1),
            divergent_epochs=zeros_i(), rollbacks=zeros_i(), metric_at_germination=jnp.zeros((p, s), jnp.float32),
            last_op=zeros_i(), germinated=zeros_i(nb), fossilized=zeros_i(nb), pruned=zeros_i(nb), problem=problem,
            sealed=jnp.zeros((p,), bool) if cfg.actions.seal else None,
        )
        return jax.vmap(self.observe)(state), state

    def reset(self, key: jax.Array, data: EnvData):
        obs, state = self.population_reset(key[None], data)
        return obs[0], drop_axis(state)

    def step(self, key: jax.Array, state: EnvState, action: FactoredAction, data: EnvData):
        return drop_axis(self.population_step(key[None], add_axis(state), add_axis(action), data))

    def population_step(self, keys: jax.Array, state: EnvState, action: FactoredAction, data: EnvData):
        """One epoch of every member; ``keys``, ``state`` and ``action`` lead with the member axis."""
        return self.model.strategy.run(self._batched_step, (keys, state, action), (data,))

    def masks(self, state: EnvState) -> ActionMasks:
        """One member's legal actions: what the lattice allows, and with the SEAL op whether the
        episode is sealed. Every controller and the learner ask here, so none of them names an
        action the env would refuse (a kickstarting teacher's label among them)."""
        return action_masks(self.lattice, state.train.lattice, self.config.actions, self._sealed(state))

    def population_masks(self, state: EnvState) -> ActionMasks:
        """The legal actions of every member (leaves ``[P, ...]``)."""
        return jax.vmap(self.masks)(state)

    def _sealed(self, state: EnvState) -> jax.Array:
        """The sealed flag (per member where ``state`` has the member axis); False without the SEAL op."""
        return jnp.zeros(state.epoch.shape, bool) if state.sealed is None else state.sealed

    @property
    def action_space(self) -> ActionSpace:
        return ActionSpace.for_lattice(self.lattice, self.config.actions)

    @property
    def episode_epochs(self) -> int:
        return self.config.episode_epochs

    # ------------------------------------------------------------------ one epoch, in stages

    def _batched_step(self, keys: jax.Array, state: EnvState, action: FactoredAction, data: EnvData):
        split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
        act_keys, train_keys = split[:, 0], split[:, 1]
        before = state.train.lattice.status
        lattice_trained, applied, metric_at_germination = self._act(state, action, act_keys)
        train, fit = self._train_epoch(state.train.replace(lattice=lattice_trained), train_keys, data, state.problem)
        validation = self._validate(train, data)
        verdict = judge(self.config.governor, validation.val_loss, fit.loss, state.recent_val_losses,
                        state.divergent_epochs)
        train, snapshot, validation, train_loss = self._apply_verdict(verdict, state, train, validation, fit.loss)
        lattice = self._measure_and_tick(train.lattice, validation, metric_at_germination, fit)
        new_state = self._record(state, train.replace(lattice=lattice), snapshot, validation, train_loss, verdict,
                                 metric_at_germination, action, applied, before)
        done = new_state.epoch >= self.config.episode_epochs
        added = jax.vmap(self.lattice.live_param_count)(lattice)
        reward = self._reward(state, new_state, before, added, done, verdict,
                              self._seed_compute(lattice_trained, data) if self.config.reward.compute_weight > 0
                              else jnp.zeros_like(new_state.val_loss))
        info = {
            "val_loss": new_state.val_loss, "val_accuracy": new_state.val_accuracy, "train_loss": train_loss,
            "applied": applied, "rolled_back": verdict.rolled_back, "added_params": added,
            "contribution": validation.contribution,
            # each slot's stage while this epoch trained (after the action, before the tick): what was computed
            "trained_stage": lattice_trained.status.stage,
            # the episode's counts so far, for learners that report them when an episode ends
            "germinated": new_state.germinated.sum(-1), "fossilized": new_state.fossilized.sum(-1),
            "pruned": new_state.pruned.sum(-1), "rollbacks": new_state.rollbacks,
        }
        return jax.vmap(self.observe)(new_state), new_state, reward, done, info

    def _act(self, state: EnvState, action: FactoredAction, keys: jax.Array):
        """Apply each member's (masked) action to its lattice; remember the metric at germination."""
        lattice, applied = jax.vmap(lambda l, a, k, s: apply_action(self.lattice, l, a, k, self.config.actions, s))(
            state.train.lattice, action, keys, self._sealed(state))
        germinated_now = applied & (action.op == Op.GERMINATE)
        metric_now = state.val_accuracy if self.config.task.has_accuracy else state.val_loss
        planted = germinated_now[:, None] & (jnp.arange(self.lattice.slots.num_slots) == action.slot[:, None])
        return lattice, applied, jnp.where(planted, metric_now[:, None], state.metric_at_germination)

    def _train_epoch(self, train: TrainState, keys: jax.Array, data: EnvData,
                     problem: Problem) -> tuple[TrainState, StepMetrics]:
        """``steps_per_epoch`` batches (``lax.scan``), each member drawing its own from its own
        problem; returns the epoch's mean step metrics."""
        batch_keys = jax.vmap(lambda k: jax.random.split(k, self.config.steps_per_epoch))(keys).swapaxes(0, 1)
        # Every batch's random choices are drawn before the scan, which then reads them as data.
        # Why: drawn inside the body, XLA fused the draw's arithmetic (threefry bits to offsets,
        # flips, indices) into the gather-crop-normalize loop and recomputed it for every pixel:
        # 2.4 ms per batch of 64 CIFAR images, 8% of an env step (``--only breakdown``'s profile).
        draws = jax.vmap(jax.vmap(lambda k, p: self._draw_batch(k, data, p)), in_axes=(0, None))(batch_keys, problem)

        def train_batch(train, member_draws):
            x, y = jax.vmap(lambda d, p: self._make_batch(d, data, p))(member_draws, problem)
            return self.trainer.population_step(train, x, y)

        train, metrics = jax.lax.scan(train_batch, train, draws)
        return train, jax.tree.map(lambda m: m.mean(axis=0), metrics)

    def _validate(self, train: TrainState, data: EnvData) -> Validation:
        """The validation loss, and each slot's counterfactual contribution: the loss with the slot
        forced to identity minus the loss with it. Only a blended seed (BLENDING, HOLDING,
        FOSSILIZED) changes the forward's value (a TRAINING seed joins straight-through, so the
        forward is the host's), so where no member has one at a slot its contribution is exactly 0
        and its pass is skipped: a ``lax.cond`` on a population-wide predicate, real in the env's
        programs. Measured (``python -m experiments.bench --only breakdown``): with every slot
        dormant, validation took a quarter of the four passes it computed before. One ``lax.map``
        body over the slots instead of S inlined copies of the forward keeps the compile time down."""
        val_x = self._val_inputs(data)
        num_slots, members = self.lattice.slots.num_slots, jax.tree.leaves(train)[0].shape[0]
        val_loss, val_accuracy = self._evaluate(train, val_x, data.val_y)
        blended = lifecycle.in_stages(train.lattice.status.stage, lifecycle.BLENDED_STAGES)  # [P, S]

        def counterfactual(s):
            off = jnp.broadcast_to(jnp.arange(num_slots) == s, (members, num_slots))
            return jax.lax.cond(jnp.any(blended[:, s]), lambda: self._evaluate(train, val_x, data.val_y, off)[0],
                                lambda: val_loss)

        losses = jax.lax.map(counterfactual, jnp.arange(num_slots))  # [S, P]
        contribution = jnp.nan_to_num(losses.T - val_loss[:, None], nan=0.0, posinf=0.0, neginf=0.0)
        return Validation(val_loss, val_accuracy, contribution)

    def _apply_verdict(self, verdict: Verdict, state: EnvState, train: TrainState, validation: Validation,
                       train_loss: jax.Array):
        """A rolled-back member returns to its snapshot with its live seeds pruned and keeps the
        previous epoch's losses; a good epoch becomes the new snapshot."""
        back = verdict.rolled_back
        restored = state.snapshot.replace(lattice=jax.vmap(self._prune_live)(state.snapshot.lattice))
        snapshot = select(back, restored, select(verdict.good, train, state.snapshot))
        validation = validation._replace(val_loss=jnp.where(back, state.val_loss, validation.val_loss),
                                         val_accuracy=jnp.where(back, state.val_accuracy, validation.val_accuracy))
        return select(back, restored, train), snapshot, validation, jnp.where(back, state.train_loss, train_loss)

    def _measure_and_tick(self, lattice, validation: Validation, metric_at_germination: jax.Array,
                          fit: StepMetrics):
        """Record each slot's measurements, then advance the lifecycle one epoch."""
        has_accuracy = self.config.task.has_accuracy
        metric = validation.val_accuracy if has_accuracy else validation.val_loss
        # Improvement since germination: accuracy points for classification, loss decrease otherwise.
        improvement = ((metric[:, None] - metric_at_germination) * 100.0 if has_accuracy
                       else metric_at_germination - metric[:, None])
        measured = jax.vmap(lambda l, c, i, g, h: self.lattice.record_measurements(
            l, contribution=c, improvement=i, seed_grad_norm=g, host_grad_norm=jnp.broadcast_to(h, g.shape)))(
            lattice, validation.contribution, improvement, fit.seed_grad_norm, fit.host_grad_norm)
        return jax.vmap(self.lattice.tick)(measured)

    def _record(self, state: EnvState, train: TrainState, snapshot: TrainState, validation: Validation,
                train_loss: jax.Array, verdict: Verdict, metric_at_germination, action: FactoredAction,
                applied: jax.Array, before) -> EnvState:
        """The next state: losses, histories, governor counters and per-blueprint counts."""
        after = train.lattice.status
        val_loss = validation.val_loss
        counts = lambda stage_mask: jnp.sum(
            jax.nn.one_hot(jnp.where(stage_mask, before.blueprint, -1), self.lattice.num_blueprints), axis=1
        ).astype(jnp.int32)
        newly_fossilized = (after.stage == Stage.FOSSILIZED) & (before.stage != Stage.FOSSILIZED)
        # A seed with alpha 0 is pruned at once and the tick moves it on to EMBARGOED in the same
        # step, so count every live seed that left for the pruned path, not only those still PRUNED.
        newly_pruned = lifecycle.in_stages(before.stage, lifecycle.LIVE_STAGES) & lifecycle.in_stages(
            after.stage, (Stage.PRUNED, Stage.EMBARGOED))
        germinated_now = applied & (action.op == Op.GERMINATE)
        planted = jax.nn.one_hot(action.blueprint, self.lattice.num_blueprints, dtype=jnp.int32)
        push = lambda history: jnp.concatenate([history[:, 1:], val_loss[:, None]], axis=1)
        return state.replace(
            train=train, snapshot=snapshot, epoch=state.epoch + 1, train_loss=train_loss, val_loss=val_loss,
            prev_val_loss=state.val_loss, best_val_loss=jnp.minimum(state.best_val_loss, val_loss),
            val_accuracy=validation.val_accuracy, loss_history=push(state.loss_history),
            recent_val_losses=push(state.recent_val_losses), divergent_epochs=verdict.divergent_epochs,
            rollbacks=state.rollbacks + verdict.rolled_back.astype(jnp.int32),
            metric_at_germination=metric_at_germination, last_op=jnp.where(applied, action.op, Op.WAIT),
            germinated=state.germinated + jnp.where(germinated_now[:, None], planted, 0),
            fossilized=state.fossilized + counts(newly_fossilized), pruned=state.pruned + counts(newly_pruned),
            sealed=None if state.sealed is None else state.sealed | (applied & (action.op == Op.SEAL)),
        )

    def _seed_compute(self, lattice_trained, data: EnvData) -> jax.Array:
        """Each member's epoch FLOPs beyond the host's (its computed seeds' training and validation
        forwards, the counterfactual passes of its blended seeds), as a fraction of the static host's
        whole episode (its batches and validation passes): what the reward's compute price charges.
        The same count as :func:`esper_jax.runs.compute.episode_compute`'s, epoch by epoch."""
        cfg, costs = self.config, self.model_costs(data)
        host_epoch = cfg.steps_per_epoch * costs.host_train + costs.host_eval
        host_episode = cfg.episode_epochs * host_epoch + costs.host_eval
        scaled = ModelCosts(*(jnp.asarray(np.asarray(c, np.float64) / host_episode, jnp.float32) for c in costs))
        status = lattice_trained.status
        epoch = epoch_flops(scaled, lifecycle.in_stages(status.stage, lifecycle.COMPUTED_STAGES),
                            lifecycle.in_stages(status.stage, lifecycle.BLENDED_STAGES), status.blueprint,
                            cfg.steps_per_epoch, xp=jnp)
        return epoch.train + epoch.validation + epoch.measurement - jnp.float32(host_epoch / host_episode)

    def _reward(self, state: EnvState, new_state: EnvState, before, added: jax.Array, done: jax.Array,
                verdict: Verdict, seed_compute: jax.Array) -> jax.Array:
        after = new_state.train.lattice.status
        signals = RewardSignals(
            val_loss=new_state.val_loss, prev_val_loss=state.val_loss, stage_before=before.stage,
            stage_after=after.stage, contribution=after.contribution, contribution_measured=after.contribution_measured,
            added_params=added.astype(jnp.float32),
            host_params=jnp.full_like(new_state.val_loss, float(self.host_param_count)),
            is_terminal=done, rolled_back=verdict.rolled_back, seed_compute=seed_compute,
        )
        return jax.vmap(lambda sig: compute_reward(sig, self.config.reward))(signals)

    # ------------------------------------------------------------------ helpers

    def _prune_live(self, lattice_state):
        for s in range(self.lattice.slots.num_slots):
            lattice_state, _ = self.lattice.prune(lattice_state, s, ramp=False)
        return lattice_state

    def observe(self, state: EnvState) -> jax.Array:
        """One member's observation of its state (what ``reset`` and ``step`` return, per member)."""
        cfg = self.config
        return observations.observe(
            self.lattice, state.train.lattice.status, epoch=state.epoch, episode_epochs=cfg.episode_epochs,
            train_loss=state.train_loss, val_loss=state.val_loss, prev_val_loss=state.prev_val_loss,
            best_val_loss=state.best_val_loss, initial_val_loss=state.initial_val_loss,
            loss_history=state.loss_history, last_op=state.last_op,
            train_set_size=problem_size(cfg.problems, state.problem) if cfg.problems.observes_size else None,
            sealed=state.sealed,
        )
