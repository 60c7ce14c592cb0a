"""Benchmark sections on one training step of the baseline CNN host (batch 128).

* ``conv``: the convolution formulations (:mod:`esper_jax.lattice.ops`: im2col, lax, lax_vjp), for one host
  training step, for a vmapped population of 8 host steps, and for the training steps of
  three convolutional seeds alone (conv_light, conv_heavy, bottleneck).
* ``lattice``: ``dormant_overhead`` (all 3 slots DORMANT ÷ the plain host with no lattice) and
  ``live_seed_overhead`` (one conv_light seed in TRAINING ÷ the plain host plus that seed's own
  training step, timed alone on the activation it reads).
* ``population``: the training step of a population of 8 members vs a loop of 8 jitted steps.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import optax

from esper_jax.lattice import ops
from esper_jax.lattice.blueprints import get_blueprint
from esper_jax.lattice.hosts import CNNHost
from esper_jax.lattice.lifecycle import Stage
from esper_jax.lattice.model import MorphogeneticModel
from esper_jax.lattice.strategy import Execution, PopulationStrategy
from esper_jax.lattice.training import make_host_train_step, make_train_step
from experiments.bench.timing import Timer, image_batch, stack

LIVE_BLUEPRINT = "conv_light"
LIVE_SLOT = 1  # r1c0: 16 channels at 16x16, the middle of the baseline host


def with_live_seed(model: MorphogeneticModel, state, slot: int, blueprint: str, key):
    """``state`` with a fresh ``blueprint`` seed germinated at ``slot`` and moved to TRAINING."""
    lattice, applied = _germinate_in_training(model)(state.lattice, slot, model.lattice.blueprint_index(blueprint), key)
    if not bool(applied):
        raise RuntimeError(f"could not germinate {blueprint} at slot {slot}")
    return state.replace(lattice=lattice)


@functools.lru_cache(maxsize=None)
def _germinate_in_training(model: MorphogeneticModel):
    """One compiled germination per model (run op by op it compiled every primitive: seconds)."""

    @jax.jit
    def germinate(lattice_state, slot, blueprint, key):
        lattice_state, applied = model.lattice.germinate(lattice_state, slot, blueprint, 0, 0, key)
        stage = lattice_state.status.stage.at[slot].set(jnp.where(applied, Stage.TRAINING, lattice_state.status.stage[slot]))
        return lattice_state.replace(status=lattice_state.status.replace(stage=stage)), applied

    return germinate


SEED_CONV_CASES = (("conv_light", 1), ("conv_heavy", 2), ("bottleneck", 0))


def bench_conv(args) -> dict:
    host = CNNHost.baseline()
    seed_model = MorphogeneticModel.build(host, blueprints=tuple(b for b, _ in SEED_CONV_CASES))
    x, y = image_batch(args.batch)
    xs, ys = image_batch(args.batch, 8)
    timer = Timer(args.rounds, args.calls)
    previous = os.environ.get("ESPER_CONV_IMPL")
    try:
        for impl in ops.CONV_IMPLS:
            os.environ["ESPER_CONV_IMPL"] = impl  # read at trace time
            init, step = make_host_train_step(host)
            params, opt = init(jax.random.key(0))
            single = jax.jit(step)
            members = stack([init(jax.random.key(i)) for i in range(8)])
            population = jax.jit(jax.vmap(step))
            timer.add(f"{impl}: one member", lambda s=single, p=params, o=opt: s(p, o, x, y))
            # Where the lattice runs its convolutions: inside a lax.cond branch (traced predicate).
            in_cond = jax.jit(lambda p, o, x, y, run, step=step: jax.lax.cond(
                run, lambda: step(p, o, x, y), lambda: (p, o, jnp.zeros(()))))
            timer.add(f"{impl}: one member inside lax.cond",
                      lambda s=in_cond, p=params, o=opt: s(p, o, x, y, jnp.asarray(True)))
            timer.add(f"{impl}: vmap 8 (per member)", lambda s=population, m=members: s(m[0], m[1], xs, ys))
            # The blueprints' convs: on CPU each member runs them unbatched (mapped members).
            for blueprint, slot in SEED_CONV_CASES:
                seed_step, seed_args = seed_alone_step(seed_model, slot, blueprint, args.batch)
                timer.add(f"{impl}: {blueprint} seed alone at {seed_model.lattice.slots.slot_ids[slot]}",
                          lambda f=seed_step, a=seed_args: f(*a))
    finally:
        if previous is None:
            os.environ.pop("ESPER_CONV_IMPL", None)
        else:
            os.environ["ESPER_CONV_IMPL"] = previous
    times = timer.run()
    for impl in ops.CONV_IMPLS:
        times[f"{impl}: vmap 8 (per member)"] /= 8
    cases = ["one member", "one member inside lax.cond", "vmap 8 (per member)"] + [
        f"{blueprint} seed alone at {seed_model.lattice.slots.slot_ids[slot]}" for blueprint, slot in SEED_CONV_CASES]
    chosen = ops.default_conv_impl()
    return {
        "seconds": times,
        "compile_seconds": timer.compile_seconds,
        "chosen": chosen,
        # Each formulation's time ÷ the chosen one's, per case (> 1: slower than the choice).
        "over_chosen": {f"{impl}: {case}": times[f"{impl}: {case}"] / times[f"{chosen}: {case}"]
                        for case in cases for impl in ops.CONV_IMPLS if impl != chosen},
    }


def seed_alone_step(model: MorphogeneticModel, slot: int, blueprint: str, batch: int):
    """The seed's own training step, without the host: its forward on a fixed activation of the
    slot's shape, the backward from a fixed cotangent, and the seed optimizer's update."""
    bp = get_blueprint("cnn", blueprint)
    spec = model.lattice.slots.slots[slot]
    shape = jax.eval_shape(lambda x: _activation_at(model, x, slot), jnp.zeros(model.host.input_shape(batch))).shape
    h = jax.random.normal(jax.random.key(3), shape)
    cotangent = jax.random.normal(jax.random.key(4), shape)
    optimizer = model.lattice.seed_optimizer
    params, opt_state = jax.jit(lambda key: (lambda p: (p, optimizer.init(p)))(bp.init(key, spec.dim)))(jax.random.key(5))

    def step(params, opt_state, h):
        grads = jax.grad(lambda p: jnp.vdot(bp.apply(p, jax.lax.stop_gradient(h)), cotangent))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step), (params, opt_state, h)


def _activation_at(model: MorphogeneticModel, x, slot: int):
    """The host activation at a slot (shape only is used: a parallel point's seed reads one of
    the same shape)."""
    params = model.host.init(jax.random.key(0))
    target = model.lattice.slots.slot_ids[slot]
    h = model.host.stem(params, x)
    for index, point in enumerate(model.host.injection_points):
        h = model.host.segment(params, index, h)
        if point.slot_id == target:
            return h
    raise ValueError(f"slot {target} is not an injection point of the host")


def bench_lattice(args) -> dict:
    model = MorphogeneticModel.build(CNNHost.baseline(), blueprints=args.blueprints)
    train = make_train_step(model)
    x, y = image_batch(args.batch)
    host_init, host_step = make_host_train_step(model.host)
    params, opt = jax.jit(host_init)(jax.random.key(0))
    dormant = jax.jit(train.init)(jax.random.key(0))
    live = with_live_seed(model, dormant, LIVE_SLOT, LIVE_BLUEPRINT, jax.random.key(7))
    seed_step, seed_args = seed_alone_step(model, LIVE_SLOT, LIVE_BLUEPRINT, args.batch)
    host_step, step = jax.jit(host_step), jax.jit(train.step)
    timer = Timer(args.rounds, args.calls)
    timer.add("plain host", lambda: host_step(params, opt, x, y))
    timer.add("all slots dormant", lambda: step(dormant, x, y))
    timer.add(f"one live {LIVE_BLUEPRINT} seed", lambda: step(live, x, y))
    timer.add(f"{LIVE_BLUEPRINT} seed alone", lambda: seed_step(*seed_args))
    times = timer.run()
    plain, seed_alone = times["plain host"], times[f"{LIVE_BLUEPRINT} seed alone"]
    with_seed = times[f"one live {LIVE_BLUEPRINT} seed"]
    return {
        "blueprints": [b.name for b in model.lattice.blueprints],
        "live_seed": {"blueprint": LIVE_BLUEPRINT, "slot": model.lattice.slots.slot_ids[LIVE_SLOT]},
        "seconds": times,
        "compile_seconds": timer.compile_seconds,
        "dormant_overhead": times["all slots dormant"] / plain,
        "live_seed_overhead": with_seed / (plain + seed_alone),
        "live_seed_components": {"plain_host_s": plain, "seed_alone_s": seed_alone, "host_with_live_seed_s": with_seed,
                                 "lattice_overhead_s": with_seed - plain - seed_alone,
                                 "live_over_plain_host": with_seed / plain},
    }


def bench_population(args) -> dict:
    """The training step alone (no env), 8 members: a loop of 8 jitted one-member steps vs one
    population step with the members batched (``Execution.BATCHED``) or run in turn inside
    the program (``Execution.MAPPED``), each with every slot dormant and with one live seed per member."""
    base = MorphogeneticModel.build(CNNHost.baseline(), blueprints=args.blueprints)
    n = 8
    xs, ys = image_batch(args.batch, n)
    xs_list, ys_list = list(xs), list(ys)
    timer = Timer(args.rounds, max(1, args.calls // 2))
    labels = ("dormant", "one live seed each")
    for label in labels:
        train = make_train_step(base)
        init = jax.jit(train.init)
        members = [init(jax.random.key(i)) for i in range(n)]
        if label != "dormant":
            members = [with_live_seed(base, m, i % 3, LIVE_BLUEPRINT, jax.random.key(100 + i)) for i, m in enumerate(members)]
        stacked = stack(members)
        step = jax.jit(train.step)

        def loop(members=members, step=step):
            return [step(m, xi, yi) for m, xi, yi in zip(members, xs_list, ys_list)]

        timer.add(f"{label}: loop of {n}", loop)
        for execution in (e.value for e in Execution):
            strategy = PopulationStrategy(Execution(execution))
            population_step = jax.jit(make_train_step(dataclasses.replace(base, strategy=strategy)).population_step)
            timer.add(f"{label}: population ({execution})", lambda f=population_step, s=stacked: f(s, xs, ys))
    times = timer.run()
    results = {"default_execution": base.strategy.execution.value,
               "seconds_per_member": {k: v / n for k, v in times.items()}, "compile_seconds": timer.compile_seconds}
    for label in labels:
        for execution in (e.value for e in Execution):
            results[f"population_over_loop[{label}, {execution}]"] = (
                times[f"{label}: population ({execution})"] / times[f"{label}: loop of {n}"])
    return results
