"""Building a run from its configuration: the data, the environment, the learner, where they
run (:class:`Built`; each task on its data, a mixed run's others too, a :class:`BuiltTask`), and the
population programs, jitted with their shardings (:class:`Programs`).

A user's own image dataset (``images``, ``tfds:NAME``) must be the data the run started with: its
digest is recorded in the configuration when the run is first built, and a resumed or evaluated
run whose data differs is refused (:func:`check_user_data`).

P learners are one ``jax.vmap`` of the learner (:func:`population_functions`), sharded over the
devices by :class:`~esper_jax.runs.population.Placement`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from esper_jax.data import (SYNTHETIC, DatasetNotFoundError, is_user_image_dataset, load_image_dataset,
                            load_token_dataset)
from esper_jax.data.augment import channel_stats
from esper_jax.data.datasets import CorruptDatasetError, ImageDataset, downsample_images, image_fingerprint
from esper_jax.env.actions import ActionConfig
from esper_jax.env.controllers import make_controller, parse_controller
from esper_jax.env.environment import EnvData, MorphogeneticEnv, make_env_config, make_env_data
from esper_jax.env.problems import ProblemFamily
from esper_jax.env.rewards import RewardConfig
from esper_jax.env.tasks import TaskConfig, get_task
from esper_jax.lattice.lifecycle import GateConfig
from esper_jax.rl import plans as plans_lib
from esper_jax.rl import ppo as ppo_lib
from esper_jax.rl.imitation import ImitationConfig, make_imitation
from esper_jax.runs.config import USER_HOST_VARIANT, Host, RunConfig, RunConfigError
from esper_jax.runs.population import Placement, stack_hyperparams
from esper_jax.trees import add_axis, drop_axis



@dataclasses.dataclass
class BuiltTask:
    """One task of a run built on its data (:func:`build_task`): its configuration (recording the
    data's origin), env, dataset and env data; a mixed run's other tasks (``--mix``) are these."""

    config: RunConfig
    task: TaskConfig
    env: MorphogeneticEnv
    dataset: Any
    env_data: EnvData


@dataclasses.dataclass
class Built:
    """Everything a configuration makes: env, data, learner and where it runs."""

    config: RunConfig
    task: TaskConfig
    env: MorphogeneticEnv
    dataset: Any
    env_data: EnvData
    trainer: ppo_lib.Trainer | plans_lib.PlanTrainer
    placement: Placement
    mixed: tuple[BuiltTask, ...]   # a mixed run's other tasks (--mix); () for one task

    @property
    def learner_data(self) -> Any:
        """What the learner's programs take: the env's data, or a mixed run's tuple of every task's
        data (the run's own first)."""
        return self.env_data if not self.mixed else (self.env_data,) + tuple(m.env_data for m in self.mixed)

    @property
    def population(self) -> int:
        return self.config.population

    @property
    def ppo_config(self) -> ppo_lib.PPOConfig:
        return self.config.ppo

    @property
    def members(self):
        return self.config.members

    @property
    def synthetic(self) -> bool:
        return bool(self.dataset.synthetic)

    @property
    def data_label(self) -> str:
        return self.env.config.data_label


def load_dataset(config: RunConfig, data: str | None = None, data_dir: str | None = None):
    """The dataset a configuration names, as read (``data``/``data_dir`` override where it is read
    from); image datasets at their own resolution (:func:`build` fits them to the host)."""
    try:
        return _load_dataset(config, data, data_dir)
    except (DatasetNotFoundError, CorruptDatasetError):
        raise
    except ValueError as error:  # e.g. --data and --data-dir naming different directories, a bad tokenizer
        raise RunConfigError(str(error)) from None


def _load_dataset(config: RunConfig, data: str | None, data_dir: str | None):
    d = config.data
    source = data if data is not None else d.source
    directory = data_dir if data_dir is not None else d.data_dir
    synthetic = source == SYNTHETIC
    if config.kind == "classification":
        sizes = {"n_train": d.synthetic_train or 10_000,
                 "n_test": max(d.synthetic_test or 1_000, config.env.val_size)} if synthetic else {}
        return load_image_dataset(config.task, source, data_dir=directory, **sizes)
    sizes = {"n_train_tokens": 100 * (d.synthetic_train or 10_000),
             "n_val_tokens": 100 * (d.synthetic_test or 1_000)} if synthetic else {}
    return load_token_dataset("tinystories", source, tokenizer=d.tokenizer or "gpt2", data_dir=directory, **sizes)


def check_user_data(config: RunConfig, dataset: ImageDataset) -> str:
    """A user's own dataset must fit the run's host (channels, classes, a size its input divides)
    and, once the run has recorded its digest, be the same data; otherwise one line saying what
    changed. Returns the dataset's digest."""
    host, shape = config.host, dataset.shape
    digest = image_fingerprint(dataset)
    if config.data.fingerprint is not None and digest != config.data.fingerprint:
        raise RunConfigError(f"{dataset.source} is not the data this run started with (its arrays differ; it now "
                             f"holds {shape.describe()}); restore that data, or start a new run")
    if (shape.channels, shape.num_classes) != (host.in_channels, host.num_classes) or shape.size % host.image_size:
        raise RunConfigError(f"{dataset.source} holds {shape.describe()}, which the run's host does not take "
                             f"({host.in_channels} channels, {host.num_classes} classes, {host.image_size}x"
                             f"{host.image_size} input); use the run's data, or start a new run")
    return digest


def data_label(dataset) -> str:
    return "SYNTHETIC data" if dataset.synthetic else f"real data from {dataset.source}"


def build_env(config: RunConfig, dataset, problems: ProblemFamily | None = None
              ) -> tuple[TaskConfig, Host, MorphogeneticEnv, Any]:
    """The task, the host, the environment a configuration makes on a loaded dataset, and the
    dataset as that environment takes it (images at the host's resolution; a language model's
    host takes the dataset's vocabulary). ``problems``: another problem family than the
    configuration's (:meth:`ProblemFamily.stratum`). :class:`RunConfigError` for settings the
    environment refuses."""
    user_data = is_user_image_dataset(config.task)
    spec = config.env
    # A user's own host (--host) is none of the task's variants: the task is the same without one.
    variant = None if config.host_variant == USER_HOST_VARIANT else config.host_variant
    try:
        if config.kind == "classification":
            native = dataset.shape
            dataset = downsample_images(dataset, config.host.image_size)  # the data follows the host's input
            if user_data:  # normalized with its own statistics, at the resolution the host sees
                task = get_task(config.task, variant, image=native, channel_stats=channel_stats(dataset.train_images))
            else:
                task = get_task(config.task, variant)
            host = config.host
        else:
            task = get_task(config.task, config.host_variant, vocab_size=dataset.vocab_size,
                            block_size=spec.block_size)
            host = dataclasses.replace(config.host, vocab_size=dataset.vocab_size)
        env_config = make_env_config(
            task, spec.slots, blueprints=spec.blueprints, host=host, episode_epochs=spec.episode_epochs,
            steps_per_epoch=spec.steps_per_epoch, batch_size=spec.batch_size, val_size=spec.val_size,
            reward=RewardConfig(kind=spec.reward, rent_weight=spec.rent_weight, compute_weight=spec.compute_weight),
            problems=problems or spec.problems,
            gates=GateConfig(min_training_epochs=spec.min_training_epochs, auto_advance=spec.auto_advance),
            actions=ActionConfig(max_concurrent_training=spec.max_concurrent_training, min_prune_age=spec.min_prune_age,
                                 seal=spec.seal),
            host_lr=spec.host_lr, host_lr_schedule=spec.host_lr_schedule, seed_lr=spec.seed_lr,
            optimizer=spec.optimizer, augment=spec.augment,
            data_label=data_label(dataset))
        return task, host, MorphogeneticEnv(env_config), dataset
    except (ValueError, TypeError) as error:
        raise RunConfigError(str(error)) from None


def build(config: RunConfig, *, data: str | None = None, data_dir: str | None = None, devices=None,
          problems: ProblemFamily | None = None) -> Built:
    """Load the data and build env, learner and placement for a resolved configuration. The
    built configuration (``Built.config``) records the data's origin, for a user's own image
    dataset its digest, and for a language model the vocabulary its tokenizer gave the host.
    ``problems``: the envs draw from another family than the configuration's (evaluation on a
    stratum; :meth:`~esper_jax.env.problems.ProblemFamily.stratum`)."""
    placement = Placement.for_devices(config.population, config.ppo.num_envs, devices)
    own = build_task(config, placement, data=data, data_dir=data_dir, problems=problems)
    mixed = tuple(_build_mixed(other, placement) for other in config.mix)
    try:
        trainer = make_learner(config, own.env, config.checkpoint_every, mixed)
    except (ValueError, TypeError) as error:
        raise RunConfigError(str(error)) from None
    return Built(own.config.replace(mix=tuple(m.config for m in mixed)), own.task, own.env, own.dataset,
                 own.env_data, trainer, placement, mixed)


def build_task(config: RunConfig, placement: Placement, *, data: str | None = None, data_dir: str | None = None,
               problems: ProblemFamily | None = None) -> BuiltTask:
    """One task of a run on its data (read from elsewhere with ``data``/``data_dir``), its env data
    placed on the devices; the configuration records the data's origin, a user's own image
    dataset's digest and a language model's vocabulary."""
    dataset = load_dataset(config, data, data_dir)
    fingerprint = check_user_data(config, dataset) if is_user_image_dataset(config.task) else None
    task, host, env, dataset = build_env(config, dataset, problems)
    try:
        env_data = make_env_data(env.config, dataset)
    except (ValueError, TypeError) as error:
        raise RunConfigError(str(error)) from None
    config = config.replace(host=host, data=dataclasses.replace(config.data, label=env.config.data_label,
                                                                 fingerprint=fingerprint))
    return BuiltTask(config, task, env, dataset, placement.put(env_data, placement.replicated()))


def _build_mixed(config: RunConfig, placement: Placement) -> BuiltTask:
    """A mixed run's other task on its own data; what is wrong with it is named with ``--mix``."""
    try:
        return build_task(config, placement)
    except (ValueError, TypeError) as error:  # RunConfigError among them
        raise RunConfigError(f"--mix {config.task}: {error}") from None


# ---------------------------------------------------------------------------- population programs


def population_functions(trainer: ppo_lib.Trainer, population: int) -> tuple[Callable, Callable]:
    """``init(seeds[P], hyper[P], data) -> state[P]`` and ``chunk(state[P], data) -> (state, metrics[P, U])``.

    P learners are one ``jax.vmap`` of the learner. For P = 1 the learner runs unbatched and the
    axis is added around it: under ``vmap`` the environment's "compute this blueprint only if some
    env uses it" conditionals become selects that compute every blueprint, which a single learner
    need not pay for."""

    def keys(seeds):
        return jax.vmap(jax.random.key)(seeds)

    if population == 1:
        def init(seeds, hyper, data):
            return add_axis(trainer.init(keys(seeds)[0], drop_axis(hyper), data))
    else:
        def init(seeds, hyper, data):
            return jax.vmap(trainer.init, in_axes=(0, 0, None))(keys(seeds), hyper, data)
    return init, per_member(trainer.train_chunk, population)


def per_member(step: Callable, population: int) -> Callable:
    """``step(state, data) -> outputs`` of one learner as ``(state[P], data) -> outputs[P]``: one
    ``jax.vmap`` over the members, or for P = 1 the learner unbatched with the axis added around it
    (see :func:`population_functions`)."""
    if population == 1:
        return lambda state, data: add_axis(step(drop_axis(state), data))
    return jax.vmap(step, in_axes=(0, None))


@dataclasses.dataclass
class Programs:
    """The compiled population programs of a built run, and the abstract state they produce."""

    init: Callable
    chunk: Callable
    abstract_state: Any          # ShapeDtypeStructs with shardings
    seeds: jax.Array
    hyper: Any
    imitate: Callable | None = None  # (state[P], data) -> (state, ImitationMetrics[P, rounds]): the warm start


def make_programs(built: Built) -> Programs:
    members = built.members
    placement = built.placement
    seeds = placement.put(jnp.asarray([m.seed for m in members], jnp.uint32), placement.population())
    hyper = placement.put(stack_hyperparams(ppo_lib.Hyperparams.default(built.ppo_config), members),
                          placement.population())
    init, chunk = population_functions(built.trainer, len(members))
    abstract = placement.with_shardings(jax.eval_shape(init, seeds, hyper, built.learner_data))
    shardings = placement.state_shardings(abstract)
    imitate = None
    if built.config.warm_start is not None:
        warm = built.config.warm_start
        imitate = per_member(make_imitation(built.trainer, make_teacher(warm.teacher, built.env),
                                            ImitationConfig(warm.rounds, warm.epochs)), len(members))
    if shardings is None:
        init_fn, chunk_fn = jax.jit(init), jax.jit(chunk)
        imitate_fn = None if imitate is None else jax.jit(imitate)
    else:
        init_fn = jax.jit(init, out_shardings=shardings)
        chunk_fn = jax.jit(chunk, out_shardings=(shardings, placement.population()))
        imitate_fn = None if imitate is None else jax.jit(imitate, out_shardings=(shardings, placement.population()))
    return Programs(init_fn, chunk_fn, abstract, seeds, hyper, imitate_fn)


def make_learner(config: RunConfig, env: MorphogeneticEnv, updates_per_chunk: int,
                 mixed: tuple[BuiltTask, ...] = ()) -> ppo_lib.Trainer | plans_lib.PlanTrainer:
    """The run's learner, ``updates_per_chunk`` updates per chunk: the per-epoch PPO learner
    (kickstarted by the warm start's teacher when ``ppo.kickstart_coef`` > 0), or with ``ppo.plans``
    the one that decides once per episode (:mod:`esper_jax.rl.plans`), over ``mixed``'s tasks too."""
    if config.ppo.plans:
        others = tuple(plans_lib.TaskMenu(m.config.task, m.config.ppo.plans, m.env) for m in mixed)
        return plans_lib.make_train(config.ppo, env, updates_per_chunk, others)
    teacher = None if config.warm_start is None else make_teacher(config.warm_start.teacher, env)
    return ppo_lib.make_train(config.ppo, env, updates_per_chunk, teacher)


def make_teacher(teacher: str, env: MorphogeneticEnv) -> Callable:
    """``--imitate``'s teacher as the learner's rollout takes it: ``(keys [N], env_state) ->
    FactoredAction [N]``, a controller by name or a fixed schedule."""
    return jax.vmap(make_controller(parse_controller(teacher), env))


def chunk_program(built: Built, programs: Programs, updates: int):
    """The population chunk program for a chunk of a different length (the last one of a run whose
    ``updates`` is not a multiple of ``checkpoint_every``): a second learner, same state layout."""
    trainer = make_learner(built.config, built.env, updates, built.mixed)
    _, chunk = population_functions(trainer, built.population)
    shardings = built.placement.state_shardings(programs.abstract_state)
    if shardings is None:
        return jax.jit(chunk)
    return jax.jit(chunk, out_shardings=(shardings, built.placement.population()))
