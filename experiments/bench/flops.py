"""Benchmark section ``flops``: achieved FLOP/s of the population training step ÷ the FLOP/s of
a large matmul, both measured by XLA on this machine in this run.

FLOPs are XLA's own count (``compiled.cost_analysis()``) of cond-free programs that do the same
work: the plain host training step (``vmap`` over the members) plus, for the live case, the
seed's own training step timed alone (see :mod:`experiments.bench.host`). Why not count the
population step itself: its ``lax.cond`` branches that do not run would be counted as if they
did. The time is that of the real population training step of the morphogenetic model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esper_jax.hosts import CNNHost
from esper_jax.model import MorphogeneticModel
from esper_jax.training import make_host_train_step, make_train_step
from experiments.bench.host import LIVE_BLUEPRINT, LIVE_SLOT, seed_alone_step, with_live_seed
from experiments.bench.timing import Timer, compile_timed, flops_of, image_batch, stack

MATMUL_SIZE = 2048


def bench_flops(args) -> dict:
    n = 8
    size = MATMUL_SIZE
    a = jax.random.normal(jax.random.key(0), (size, size))
    b = jax.random.normal(jax.random.key(1), (size, size))
    matmul, _ = compile_timed(jax.jit(jnp.matmul), a, b)
    matmul_flops = flops_of(matmul) or 2.0 * size ** 3

    model = MorphogeneticModel.build(CNNHost.baseline(), blueprints=args.blueprints)
    train = make_train_step(model)
    xs, ys = image_batch(args.batch, n)
    host_init, host_step = make_host_train_step(model.host)
    host_members = stack([host_init(jax.random.key(i)) for i in range(n)])
    host_population, _ = compile_timed(jax.jit(jax.vmap(host_step)), host_members[0], host_members[1], xs, ys)
    seed_step, seed_args = seed_alone_step(model, LIVE_SLOT, LIVE_BLUEPRINT, args.batch)
    seed_compiled, _ = compile_timed(seed_step, *seed_args)
    host_flops, seed_flops = flops_of(host_population), flops_of(seed_compiled)

    members = [train.init(jax.random.key(i)) for i in range(n)]
    dormant = stack(members)
    live = stack([with_live_seed(model, m, LIVE_SLOT, LIVE_BLUEPRINT, jax.random.key(100 + i)) for i, m in enumerate(members)])
    population_step = jax.jit(train.population_step)

    timer = Timer(args.rounds, args.calls)
    timer.add(f"matmul {size}x{size}", lambda: matmul(a, b))
    timer.add("population of 8, all dormant", lambda: population_step(dormant, xs, ys))
    timer.add(f"population of 8, one live {LIVE_BLUEPRINT} each", lambda: population_step(live, xs, ys))
    times = timer.run()

    peak = matmul_flops / times[f"matmul {size}x{size}"]
    out = {"matmul_size": size, "matmul_flops_per_second": peak, "seconds": times,
           "flops_per_call": {"host_population_step": host_flops, "seed_alone_step": seed_flops}}
    if host_flops is None or seed_flops is None:
        out["flop_utilization"] = None
        out["reason"] = "XLA gave no FLOP count on this backend"
        return out
    dormant_rate = host_flops / times["population of 8, all dormant"]
    live_rate = (host_flops + n * seed_flops) / times[f"population of 8, one live {LIVE_BLUEPRINT} each"]
    out["achieved_flops_per_second"] = {"dormant": dormant_rate, "live": live_rate}
    out["flop_utilization"] = {"dormant": dormant_rate / peak, "live": live_rate / peak}
    return out
