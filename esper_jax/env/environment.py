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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from esper_jax.lattice import lifecycle

from esper_jax.env import observations
from esper_jax.env.actions import ActionConfig, FactoredAction, Op, apply_action
from esper_jax.data.augment import cifar_channel_stats, normalize_images, random_crop_flip
from esper_jax.lattice.lifecycle import GateConfig, Stage
from esper_jax.lattice.model import MorphogeneticModel
from esper_jax.lattice.optim import LRSchedule, sgd_optimizer
from esper_jax.env.rewards import RewardConfig, RewardSignals, compute_reward
from esper_jax.env.tasks import TaskConfig
from esper_jax.lattice.training import TrainState, default_host_optimizer, make_train_step


@dataclasses.dataclass(frozen=True)
class GovernorConfig:
    """Esper's divergence rule: above ``absolute_loss_bound`` and ``relative_factor`` × the
    recent mean for ``patience`` consecutive epochs (or any non-finite loss) → roll back."""

    absolute_loss_bound: float = 10.0
    relative_factor: float = 3.0
    patience: int = 2
    history: int = 5


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


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    task: TaskConfig
    model: MorphogeneticModel
    episode_epochs: int = 25
    steps_per_epoch: int = 20
    batch_size: int = 128
    val_size: int = 512
    augment: bool = True
    reward: RewardConfig = RewardConfig()
    governor: GovernorConfig = GovernorConfig()
    actions: ActionConfig = ActionConfig()
    host_optimizer: Any = dataclasses.field(default_factory=default_host_optimizer)
    data_label: str = "unknown"    # "synthetic" or where the real data came from; shown in every output

    def __post_init__(self):
        for name in ("episode_epochs", "steps_per_epoch", "batch_size", "val_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def make_env_config(task: TaskConfig, slot_ids=None, gates: GateConfig = GateConfig(), blueprints=(), host=None,
                    seed_dispatch: str | None = None, member_execution: str | None = None, host_lr: float = 0.01,
                    host_lr_schedule: LRSchedule = "constant", seed_lr: float = 0.01, **kwargs) -> EnvConfig:
    """``blueprints``: names of the blueprints this run may grow (default: all of the topology's);
    ``host``: a host to use instead of the task's own (tests and smoke runs use small ones);
    ``host_lr``/``host_lr_schedule``: the host's SGD rate, constant or cosine-decayed to 0 over the
    episode; ``seed_lr``: every seed's SGD rate, constant (a seed lives for part of an episode, so a
    per-episode decay does not fit it; Esper: 0.01 for host and seeds);
    ``member_execution``: how a population of environments runs, "vmap" or "map" (default:
    :func:`esper_jax.lattice.model.default_member_execution`); ``seed_dispatch``: under "vmap", how a
    population computes its seeds (default: :func:`esper_jax.lattice.model.default_seed_dispatch`)."""
    model = MorphogeneticModel.build(host or task.make_host(), slot_ids, gates, blueprints=blueprints,
                                     seed_optimizer=sgd_optimizer(seed_lr), seed_dispatch=seed_dispatch,
                                     member_execution=member_execution)
    episode_steps = (kwargs.get("episode_epochs", EnvConfig.episode_epochs)
                     * kwargs.get("steps_per_epoch", EnvConfig.steps_per_epoch))
    kwargs.setdefault("host_optimizer", sgd_optimizer(host_lr, host_lr_schedule, episode_steps))
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


def _add(tree):
    return jax.tree.map(lambda a: a[None], tree)


def _drop(tree):
    return jax.tree.map(lambda a: a[0], tree)


def _select(pred, new, old):
    """Per-member select; ``pred`` is ``[P]``."""
    return jax.tree.map(lambda n, o: jnp.where(pred.reshape(pred.shape + (1,) * (n.ndim - 1)), n, o), new, old)


class MorphogeneticEnv:
    """Holds the static configuration; every method is a pure function of its arguments."""

    def __init__(self, config: EnvConfig):
        self.config = config
        self.model = config.model
        self.lattice = config.model.lattice
        self.trainer = make_train_step(config.model, config.host_optimizer)
        self.host_param_count = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(
            jax.eval_shape(self.model.host.init, jax.random.key(0))))

    # ------------------------------------------------------------------ sizes

    @property
    def observation_size(self) -> int:
        return observations.observation_size(self.lattice)

    def feature_names(self) -> list[str]:
        return observations.feature_names(self.lattice)

    # ------------------------------------------------------------------ data

    def _sample_batch(self, key: jax.Array, data: EnvData):
        cfg = self.config
        if cfg.task.kind == "classification":
            k_idx, k_aug = jax.random.split(key)
            idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, data.train_x.shape[0])
            images = data.train_x[idx]
            if cfg.augment:  # CIFAR's 4-pixel shifts at 32x32, scaled with the resolution
                images = random_crop_flip(k_aug, images, pad=max(1, images.shape[1] // 8))
            return normalize_images(images, *cifar_channel_stats(cfg.task.name)), data.train_y[idx]
        block = cfg.task.block_size
        starts = jax.random.randint(key, (cfg.batch_size,), 0, data.train_x.shape[0] - block - 1)
        windows = jax.vmap(lambda s: jax.lax.dynamic_slice(data.train_x, (s,), (block + 1,)))(starts).astype(jnp.int32)
        return windows[:, :-1], windows[:, 1:]

    def _val_inputs(self, data: EnvData):
        if self.config.task.kind == "classification":
            return normalize_images(data.val_x, *cifar_channel_stats(self.config.task.name))
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
            last_op=zeros_i(), germinated=zeros_i(nb), fossilized=zeros_i(nb), pruned=zeros_i(nb),
        )
        return jax.vmap(self._observe)(state), state

    def reset(self, key: jax.Array, data: EnvData):
        obs, state = self.population_reset(key[None], data)
        return obs[0], _drop(state)

    def step(self, key: jax.Array, state: EnvState, action: FactoredAction, data: EnvData):
        out = self.population_step(key[None], _add(state), _add(action), data)
        return tuple(_drop(o) for o in out)

    def population_step(self, keys: jax.Array, state: EnvState, action: FactoredAction, data: EnvData):
        if self.model.member_execution == "map" and keys.shape[0] > 1:
            # Each environment's one-env program in turn (see model.default_member_execution).
            return jax.lax.map(lambda member: self.step(*member, data), (keys, state, action))
        cfg = self.config
        split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
        act_keys, train_keys = split[:, 0], split[:, 1]
        before = state.train.lattice.status

        # 1. the action
        lattice, applied = jax.vmap(lambda l, a, k: apply_action(self.lattice, l, a, k, cfg.actions))(
            state.train.lattice, action, act_keys)
        germinated_now = applied & (action.op == Op.GERMINATE)
        metric_now = state.val_accuracy if cfg.task.has_accuracy else state.val_loss
        planted = germinated_now[:, None] & (jnp.arange(self.lattice.slots.num_slots) == action.slot[:, None])
        metric_at_germination = jnp.where(planted, metric_now[:, None], state.metric_at_germination)
        train = state.train.replace(lattice=lattice)

        # 2. training: K batches, each member from its own key
        batch_keys = jax.vmap(lambda k: jax.random.split(k, cfg.steps_per_epoch))(train_keys).swapaxes(0, 1)

        def train_batch(train, member_keys):
            x, y = jax.vmap(lambda k: self._sample_batch(k, data))(member_keys)
            return self.trainer.population_step(train, x, y)

        train, metrics = jax.lax.scan(train_batch, train, batch_keys)
        train_loss = metrics.loss.mean(axis=0)
        seed_grad_norm = metrics.seed_grad_norm.mean(axis=0)
        host_grad_norm = metrics.host_grad_norm.mean(axis=0)

        # 3. validation and per-slot counterfactuals
        val_x = self._val_inputs(data)
        num_slots, members = self.lattice.slots.num_slots, keys.shape[0]
        # Row 0 disables nothing; row 1 + s disables slot s. One lax.map body instead of S + 1
        # inlined copies of the forward keeps the compile time down.
        disabled = jnp.concatenate([jnp.zeros((1, num_slots), bool), jnp.eye(num_slots, dtype=bool)])
        losses, accuracies = jax.lax.map(
            lambda off: self._evaluate(train, val_x, data.val_y, jnp.broadcast_to(off, (members, num_slots))), disabled)
        val_loss, val_accuracy = losses[0], accuracies[0]
        contribution = jnp.nan_to_num(losses[1:].T - val_loss[:, None], nan=0.0, posinf=0.0, neginf=0.0)

        # 4. governor
        gov = cfg.governor
        finite = jnp.isfinite(val_loss) & jnp.isfinite(train_loss)
        recent_mean = state.recent_val_losses.mean(axis=1)
        divergent = finite & (val_loss > gov.absolute_loss_bound) & (val_loss > gov.relative_factor * recent_mean)
        divergent_epochs = jnp.where(divergent, state.divergent_epochs + 1, 0)
        rolled_back = ~finite | (divergent_epochs >= gov.patience)
        restored = state.snapshot.replace(lattice=jax.vmap(self._prune_live)(state.snapshot.lattice))
        train = _select(rolled_back, restored, train)
        val_loss = jnp.where(rolled_back, state.val_loss, val_loss)
        val_accuracy = jnp.where(rolled_back, state.val_accuracy, val_accuracy)
        train_loss = jnp.where(rolled_back, state.train_loss, train_loss)
        divergent_epochs = jnp.where(rolled_back, 0, divergent_epochs)
        # Only a good epoch (finite, not divergent) becomes the snapshot: the weights of an epoch
        # counted toward the divergence patience are not "last good" for the rollback that follows.
        good = finite & ~divergent
        snapshot = _select(rolled_back, restored, _select(good, train, state.snapshot))

        # 5. measurements, lifecycle tick, bookkeeping
        metric = val_accuracy if cfg.task.has_accuracy else val_loss
        # Improvement since germination: accuracy points for classification, loss decrease otherwise.
        improvement = (metric[:, None] - metric_at_germination) * 100.0 if cfg.task.has_accuracy else \
            metric_at_germination - metric[:, None]
        measured = jax.vmap(lambda l, c, i, g, h: self.lattice.record_measurements(
            l, contribution=c, improvement=i, seed_grad_norm=g, host_grad_norm=jnp.broadcast_to(h, g.shape)))(
            train.lattice, contribution, improvement, seed_grad_norm, host_grad_norm)
        lattice = jax.vmap(self.lattice.tick)(measured)
        train = train.replace(lattice=lattice)
        after = lattice.status

        counts = lambda stage_mask: jnp.sum(
            jax.nn.one_hot(jnp.where(stage_mask, before.blueprint, -1), self.lattice.num_blueprints), axis=1
        ).astype(jnp.int32)
        newly_fossilized = (after.stage == Stage.FOSSILIZED) & (before.stage != Stage.FOSSILIZED)
        # A seed with alpha 0 is pruned at once and the tick moves it on to EMBARGOED in the same
        # step, so count every live seed that left for the pruned path, not only those still PRUNED.
        newly_pruned = lifecycle.in_stages(before.stage, lifecycle.LIVE_STAGES) & lifecycle.in_stages(
            after.stage, (Stage.PRUNED, Stage.EMBARGOED))
        germinated = state.germinated + jnp.where(
            germinated_now[:, None], jax.nn.one_hot(action.blueprint, self.lattice.num_blueprints, dtype=jnp.int32), 0)

        epoch = state.epoch + 1
        new_state = EnvState(
            train=train, snapshot=snapshot, epoch=epoch, train_loss=train_loss, val_loss=val_loss,
            prev_val_loss=state.val_loss, best_val_loss=jnp.minimum(state.best_val_loss, val_loss),
            initial_val_loss=state.initial_val_loss, val_accuracy=val_accuracy,
            loss_history=jnp.concatenate([state.loss_history[:, 1:], val_loss[:, None]], axis=1),
            recent_val_losses=jnp.concatenate([state.recent_val_losses[:, 1:], val_loss[:, None]], axis=1),
            divergent_epochs=divergent_epochs, rollbacks=state.rollbacks + rolled_back.astype(jnp.int32),
            metric_at_germination=metric_at_germination, last_op=jnp.where(applied, action.op, Op.WAIT),
            germinated=germinated, fossilized=state.fossilized + counts(newly_fossilized),
            pruned=state.pruned + counts(newly_pruned),
        )
        done = epoch >= cfg.episode_epochs
        added = jax.vmap(self.lattice.live_param_count)(lattice)
        signals = RewardSignals(
            val_loss=val_loss, prev_val_loss=state.val_loss, stage_before=before.stage, stage_after=after.stage,
            contribution=after.contribution, contribution_measured=after.contribution_measured,
            added_params=added.astype(jnp.float32), host_params=jnp.full_like(val_loss, float(self.host_param_count)),
            is_terminal=done, rolled_back=rolled_back,
        )
        reward = jax.vmap(lambda sig: compute_reward(sig, cfg.reward))(signals)
        info = {
            "val_loss": val_loss, "val_accuracy": val_accuracy, "train_loss": train_loss, "applied": applied,
            "rolled_back": rolled_back, "added_params": added, "contribution": contribution,
        }
        return jax.vmap(self._observe)(new_state), new_state, reward, done, info

    # ------------------------------------------------------------------ helpers

    def _prune_live(self, lattice_state):
        for s in range(self.lattice.slots.num_slots):
            lattice_state, _ = self.lattice.prune(lattice_state, s, ramp=False)
        return lattice_state

    def _observe(self, state: EnvState) -> jax.Array:
        cfg = self.config
        return observations.observe(
            self.lattice, state.train.lattice.status, epoch=state.epoch, episode_epochs=cfg.episode_epochs,
            train_loss=state.train_loss, val_loss=state.val_loss, prev_val_loss=state.prev_val_loss,
            best_val_loss=state.best_val_loss, initial_val_loss=state.initial_val_loss,
            loss_history=state.loss_history, last_op=state.last_op,
        )
