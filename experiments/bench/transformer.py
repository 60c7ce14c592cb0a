"""Benchmark section ``transformer``: the TinyStories hosts (``tiny`` and ``base``) on byte
tokens of SYNTHETIC text.

Per host, one training step at the design's context (``--transformer-block``, default 256):
``dormant_overhead`` (every default slot DORMANT ÷ the plain host with no lattice) and
``live_depth_overhead`` (one ``depth`` seed, a whole extra transformer layer, in TRAINING at the
middle layer ÷ the plain host), timed in interleaved rounds in one process; and the compile time
(lower + compile) of one environment step of the task with its default slots and the transformer
blueprints. The byte vocabulary keeps the output layer small enough for a CPU; with GPT-2's
50,257 tokens the output layer dominates every step of either host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.bench.host import with_live_seed
from experiments.bench.timing import Timer, compile_timed

VARIANTS = ("tiny", "base")
LIVE_BLUEPRINT = "depth"
BLUEPRINTS = ("norm", "lora", "attention", "mlp_small", LIVE_BLUEPRINT)
BYTE_VOCAB = 256


def token_batch(batch: int, length: int, vocab: int) -> tuple[jax.Array, jax.Array]:
    """A fixed random batch of token windows and their next tokens (benchmarks need shapes)."""
    tokens = jax.random.randint(jax.random.key(1), (batch, length + 1), 0, vocab)
    return tokens[:, :-1], tokens[:, 1:]


def bench_transformer(args) -> dict:
    from esper_jax.data import load_token_dataset
    from esper_jax.env.actions import FactoredAction
    from esper_jax.env.environment import MorphogeneticEnv, make_env_config, make_env_data
    from esper_jax.env.tasks import get_task
    from esper_jax.lattice.model import MorphogeneticModel
    from esper_jax.lattice.training import make_host_train_step, make_train_step

    block, batch = args.transformer_block, args.transformer_batch
    results: dict = {"data": "SYNTHETIC data (byte tokens)", "block_size": block, "batch": batch,
                     "blueprints": list(BLUEPRINTS), "live_blueprint": LIVE_BLUEPRINT, "hosts": {}}
    for variant in VARIANTS:
        task = get_task("tinystories", variant, vocab_size=BYTE_VOCAB, block_size=block)
        host = task.make_host()
        model = MorphogeneticModel.build(host, blueprints=BLUEPRINTS)
        slots = model.lattice.slots.slot_ids
        live_slot = slots.index(f"r{host.num_layers // 2}c0")
        train = make_train_step(model)
        host_init, host_step = make_host_train_step(host)
        params, opt = jax.jit(host_init)(jax.random.key(0))
        dormant = jax.jit(train.init)(jax.random.key(0))
        live = with_live_seed(model, dormant, live_slot, LIVE_BLUEPRINT, jax.random.key(7))
        x, y = token_batch(batch, block, BYTE_VOCAB)
        host_step, step = jax.jit(host_step), jax.jit(train.step)
        timer = Timer(args.rounds, args.calls)
        timer.add("plain host", lambda: host_step(params, opt, x, y))
        timer.add("all slots dormant", lambda: step(dormant, x, y))
        timer.add(f"one live {LIVE_BLUEPRINT} seed", lambda: step(live, x, y))
        print(f"transformer {variant}: timing training steps ({sum(p.size for p in jax.tree.leaves(params))} host "
              f"parameters, slots {', '.join(slots)})", flush=True)
        times = timer.run()

        # One environment step of the task, as a run compiles it (a few batches, a validation pass).
        config = make_env_config(task, blueprints=BLUEPRINTS, episode_epochs=100, steps_per_epoch=2,
                                 batch_size=batch, val_size=2 * batch, data_label="SYNTHETIC data")
        env = MorphogeneticEnv(config)
        dataset = load_token_dataset("tinystories", "synthetic", tokenizer="byte", n_train_tokens=64 * block * batch,
                                     n_val_tokens=4 * block * batch)
        data = make_env_data(config, dataset)
        _, state = jax.jit(env.reset)(jax.random.key(0), data)
        _, env_compile = compile_timed(jax.jit(env.step), jax.random.key(1), state, FactoredAction.wait(), data)

        plain = times["plain host"]
        results["hosts"][variant] = {
            "host": {"d_model": host.d_model, "num_heads": host.num_heads, "num_layers": host.num_layers,
                     "host_params": env.host_param_count},
            "slots": list(slots), "live_slot": slots[live_slot],
            "seconds": times, "compile_seconds": {**timer.compile_seconds, "env_step": env_compile},
            "tokens_per_second_plain": batch * block / plain,
            "dormant_overhead": times["all slots dormant"] / plain,
            "live_depth_overhead": times[f"one live {LIVE_BLUEPRINT} seed"] / plain,
        }
    return results


def print_transformer_table(result: dict) -> None:
    print(f"{'host':<6} {'params':>9} {'plain ms':>9} {'dormant/plain':>14} {'live depth/plain':>17} "
          f"{'env step compile s':>19}")
    for variant, r in result["hosts"].items():
        print(f"{variant:<6} {r['host']['host_params']:>9} {1e3 * r['seconds']['plain host']:>9.1f} "
              f"{r['dormant_overhead']:>14.3f} {r['live_depth_overhead']:>17.3f} "
              f"{r['compile_seconds']['env_step']['total']:>19.1f}")
