"""Benchmark section ``flops``: achieved FLOP/s of the population training step ÷ the FLOP/s of
a large matmul, both measured by XLA on this machine in this run.

The step: a population of 8 baseline CNN hosts, each with one live conv_light seed in TRAINING
at r1c0. Its time is taken from the ``reference`` section when that ran in the same process (the
very program compared with PyTorch: K batches of the population step), and measured here
otherwise. Its FLOPs are XLA's own count (``compiled.cost_analysis()``) of cond-free programs
doing the same work: the plain host training step of the members plus each member's seed
training step alone (see :mod:`experiments.bench.host`). Why not count the population step
itself: its ``lax.cond`` branches that do not run would be counted as if they did.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esper_jax.lattice.hosts import CNNHost
from esper_jax.lattice.model import MorphogeneticModel
from esper_jax.lattice.training import make_host_train_step, make_train_step
from experiments.bench.host import LIVE_BLUEPRINT, LIVE_SLOT, seed_alone_step, with_live_seed
from experiments.bench.timing import Timer, compile_timed, flops_of, image_batch, stack

MATMUL_SIZE = 2048
MEMBERS = 8


def _population_seconds(args, model: MorphogeneticModel, batch: int) -> float:
    train = make_train_step(model)
    init = jax.jit(train.init)
    live = stack([with_live_seed(model, init(jax.random.key(i)), LIVE_SLOT, LIVE_BLUEPRINT, jax.random.key(100 + i))
                  for i in range(MEMBERS)])
    xs, ys = image_batch(batch, MEMBERS)
    population_step = jax.jit(train.population_step)
    timer = Timer(args.rounds, args.calls)
    timer.add("population step", lambda: population_step(live, xs, ys))
    return timer.run()["population step"]


def bench_flops(args, previous: dict | None = None) -> dict:
    size = MATMUL_SIZE
    a = jax.random.normal(jax.random.key(0), (size, size))
    b = jax.random.normal(jax.random.key(1), (size, size))
    matmul, _ = compile_timed(jax.jit(jnp.matmul), a, b)
    timer = Timer(args.rounds, max(args.calls, 4))
    timer.add("matmul", lambda: matmul(a, b))
    matmul_seconds = timer.run()["matmul"]
    peak = (flops_of(matmul) or 2.0 * size ** 3) / matmul_seconds

    reference = (previous or {}).get("reference") or {}
    reused = bool(reference.get("available")) and reference.get("envs") == MEMBERS
    blueprints = tuple(args.blueprints or ())
    model = MorphogeneticModel.build(CNNHost.baseline(), blueprints=blueprints)
    if reused:
        batch, batches, seconds = reference["batch"], reference["batches"], reference["seconds"]["ours"]
        timed = f"the reference section's population step ({batches} batches of {batch})"
    else:
        batch, batches = args.batch, 1
        seconds = _population_seconds(args, model, batch)
        timed = f"one population step (batch {batch}), timed here"

    xs, ys = image_batch(batch, MEMBERS)
    host_init, host_step = make_host_train_step(model.host)
    host_init = jax.jit(host_init)
    host_members = stack([host_init(jax.random.key(i)) for i in range(MEMBERS)])
    host_population, _ = compile_timed(jax.jit(jax.vmap(host_step)), host_members[0], host_members[1], xs, ys)
    seed_step, seed_args = seed_alone_step(model, LIVE_SLOT, LIVE_BLUEPRINT, batch)
    seed_compiled, _ = compile_timed(seed_step, *seed_args)
    host_flops, seed_flops = flops_of(host_population), flops_of(seed_compiled)
    out = {"matmul_size": size, "matmul_seconds": matmul_seconds, "matmul_flops_per_second": peak,
           "members": MEMBERS, "batch": batch, "batches": batches, "timed": timed, "population_seconds": seconds,
           "flops_per_batch": {"host_population_step": host_flops, "seed_alone_step": seed_flops}}
    if host_flops is None or seed_flops is None:
        return {**out, "flop_utilization": None, "reason": "XLA gave no FLOP count on this backend"}
    achieved = batches * (host_flops + MEMBERS * seed_flops) / seconds
    return {**out, "achieved_flops_per_second": achieved, "flop_utilization": achieved / peak}
