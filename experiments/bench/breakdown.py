"""Benchmark section ``breakdown``: where the time of one env step and of one PPO update goes.

Each part is compiled as a program of its own, on the very inputs the whole uses, and timed with
the whole in interleaved rounds (one process), so the shares compare. Parts timed alone need not
add up exactly to the whole (a fused program is not the sum of its parts); what the whole spends
beyond its parts is reported as "the rest" (actions, lifecycle tick, bookkeeping, reward).

One env step (a population of one, the baseline CNN host with its three slots):

* sampling: drawing ``steps_per_epoch`` batches by index, random crop and flip, normalization;
* training: the ``steps_per_epoch`` host + seed training steps (forward, backward, both
  optimizers), sampling included (the env's own ``_train_epoch``), so training alone is the
  difference;
* validation: the env's validation (the plain pass and the counterfactual passes it needs), and,
  for comparison, every pass the env computed before idle counterfactuals were skipped (S + 1);
* the plain host at the same batch: forward, forward + backward, and the whole SGD step.

One PPO update (the smoke preset): the whole update and its rollout alone; learning (GAE and the
minibatch epochs) is the difference.

Then the profile (:mod:`experiments.bench.profile`): the env step with a live seed and the PPO
update, traced, their thunk time summed by what the code was doing (convolution forward and
backward, normalization, pooling, optimizers, seeds, the lattice, copies and control flow, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esper_jax.data import SYNTHETIC
from esper_jax.lattice.hosts import host_forward
from experiments.bench.host import LIVE_BLUEPRINT, with_live_seed
from experiments.bench.profile import Profile, print_profile, profile_categories
from experiments.bench.timing import Timer, compile_timed, image_batch
from esper_jax.trees import add_axis

SCENARIOS = ("dormant", "live", "blending")


def bench_breakdown(args) -> dict:
    from esper_jax.data import load_image_dataset
    from esper_jax.env.environment import MorphogeneticEnv, make_env_config, make_env_data
    from esper_jax.env.tasks import get_task
    from esper_jax.lattice.lifecycle import Stage
    from esper_jax.lattice.training import make_host_train_step
    from esper_jax.rl import ppo as ppo_lib
    from esper_jax.runs import settings as run_settings
    from esper_jax.runs.build import build

    task = get_task("cifar10")
    config = make_env_config(task, blueprints=args.blueprints, episode_epochs=10_000,
                             steps_per_epoch=args.env_steps_per_epoch, batch_size=args.env_batch,
                             val_size=args.env_val_size, data_label="SYNTHETIC data")
    env = MorphogeneticEnv(config)
    data = make_env_data(config, load_image_dataset("cifar10", SYNTHETIC, n_train=4096, n_test=args.env_val_size))
    model, slots = env.model, env.lattice.slots.num_slots
    print(f"breakdown: one env step ({config.steps_per_epoch} batches of {config.batch_size}, validation "
          f"{config.val_size} images, {slots} slots) and one PPO update (smoke preset)", flush=True)

    # States: fresh (every slot dormant), a live conv_light seed in TRAINING at r1c0, and the same
    # seed BLENDING at half alpha (the one stage here whose counterfactual pass is needed).
    _, fresh = jax.jit(env.reset)(jax.random.key(0), data)
    live_train = with_live_seed(model, fresh.train, 1, LIVE_BLUEPRINT, jax.random.key(3))
    status = live_train.lattice.status
    blending = live_train.replace(lattice=live_train.lattice.replace(status=status.replace(
        stage=status.stage.at[1].set(Stage.BLENDING), alpha=status.alpha.at[1].set(0.5))))
    states = {"dormant": fresh, "live": fresh.replace(train=live_train), "blending": fresh.replace(train=blending)}

    wait = jax.tree.map(jnp.asarray, __import__("esper_jax.env.actions", fromlist=["FactoredAction"]).FactoredAction.wait())
    key = jax.random.key(7)
    # Compiled once, for the timing and the profile alike (every state has the same shapes).
    step, step_compile = compile_timed(jax.jit(env.step), key, states["live"], wait, data)
    problem = add_axis(fresh.problem)
    train_epoch = jax.jit(lambda train, key: env._train_epoch(add_axis(train), key[None], data, problem))
    sample = jax.jit(lambda key: jax.vmap(lambda k: env._sample_batch(k, data, fresh.problem))(
        jax.random.split(key, config.steps_per_epoch)))
    validate = jax.jit(lambda train: env._validate(add_axis(train), data))

    def every_pass(train):  # the validation before idle counterfactual passes were skipped
        train, val_x = add_axis(train), env._val_inputs(data)
        rows = jnp.concatenate([jnp.zeros((1, slots), bool), jnp.eye(slots, dtype=bool)])
        return jax.lax.map(lambda off: env._evaluate(train, val_x, data.val_y, off[None]), rows)

    every_pass = jax.jit(every_pass)

    host_init, host_step = make_host_train_step(model.host, config.host_optimizer)
    params, opt_state = jax.jit(host_init)(jax.random.key(1))
    x, y = image_batch(config.batch_size, 1)
    x, y = x[0], y[0]
    plain_forward = jax.jit(lambda p, x: host_forward(model.host, p, x))
    host_grad = jax.jit(jax.grad(lambda p, x, y: model.host.loss(host_forward(model.host, p, x), y)))
    host_train = jax.jit(host_step)

    timer = Timer(args.rounds, args.calls)
    timer.compile_seconds["env step"] = step_compile["total"]
    for name in SCENARIOS:
        s = states[name]
        timer.add(f"{name}: env step", lambda s=s: step(key, s, wait, data), compiled=True)
        timer.add(f"{name}: training (with sampling)", lambda s=s: train_epoch(s.train, key))
        timer.add(f"{name}: validation", lambda s=s: validate(s.train))
        timer.add(f"{name}: validation, every pass", lambda s=s: every_pass(s.train))
    timer.add("sampling", lambda: sample(key))
    timer.add("host forward", lambda: plain_forward(params, x))
    timer.add("host forward + backward", lambda: host_grad(params, x, y))
    timer.add("host training step", lambda: host_train(params, opt_state, x, y))

    # PPO: the smoke preset's whole update and its rollout alone.
    built = build(run_settings.resolve_config(run_settings.resolve_settings(
        {"task": "cifar10", "checkpoint_every": 1, "data": SYNTHETIC}, "smoke")))
    trainer = built.trainer
    runner = jax.jit(trainer.init)(jax.random.key(0), ppo_lib.Hyperparams.default(built.ppo_config), built.env_data)
    update, update_compile = compile_timed(jax.jit(trainer.train_chunk), runner, built.env_data)
    timer.compile_seconds["ppo: update"] = update_compile["total"]
    rollout = jax.jit(trainer.rollout)
    timer.add("ppo: update", lambda: update(runner, built.env_data), compiled=True)
    timer.add("ppo: rollout", lambda: rollout(runner, built.env_data, key))
    print(f"  timing {len(timer.candidates)} parts in {args.rounds} interleaved rounds", flush=True)
    t = timer.run()

    sample_s = t["sampling"]
    result = {"env": {}, "host": {}, "ppo": {}, "compile_seconds": timer.compile_seconds,
              "sizes": {"steps_per_epoch": config.steps_per_epoch, "batch_size": config.batch_size,
                        "val_size": config.val_size, "slots": slots}}
    for name in SCENARIOS:
        whole = t[f"{name}: env step"]
        training = t[f"{name}: training (with sampling)"] - sample_s
        validation = t[f"{name}: validation"]
        parts = {"sampling": sample_s, "training": training, "validation": validation,
                 "rest": whole - sample_s - training - validation}
        result["env"][name] = {"env_step_s": whole, "parts_s": parts,
                               "shares": {k: v / whole for k, v in parts.items()},
                               "validation_every_pass_s": t[f"{name}: validation, every pass"],
                               "validation_over_every_pass": validation / t[f"{name}: validation, every pass"]}
    forward, backward_too, whole = t["host forward"], t["host forward + backward"], t["host training step"]
    result["host"] = {"training_step_s": whole, "parts_s": {"forward": forward, "backward": backward_too - forward,
                                                            "optimizer": whole - backward_too},
                      "shares": {"forward": forward / whole, "backward": (backward_too - forward) / whole,
                                 "optimizer": (whole - backward_too) / whole}}
    update_s, rollout_s = t["ppo: update"], t["ppo: rollout"]
    result["ppo"] = {"update_s": update_s, "parts_s": {"rollout": rollout_s, "learning": update_s - rollout_s},
                     "shares": {"rollout": rollout_s / update_s, "learning": (update_s - rollout_s) / update_s}}

    print("  profiling the env step (live seed) and the PPO update (smoke)", flush=True)
    profiles = {"env step (live seed)": profile_categories(step, key, states["live"], wait, data),
                "PPO update (smoke)": profile_categories(update, runner, built.env_data)}
    result["profile"] = {name: _profile_json(p, whole) for (name, p), whole
                         in zip(profiles.items(), (t["live: env step"], update_s))}
    return result


def _profile_json(profile: Profile, untraced_s: float) -> dict:
    return {"untraced_wall_s": untraced_s, "traced_wall_s": profile.wall_s, "thunk_s": profile.thunk_s,
            "seconds": profile.seconds, "shares": {k: v / profile.thunk_s for k, v in profile.seconds.items()}}


def print_breakdown_table(result: dict):
    sizes = result["sizes"]
    print(f"\n## breakdown (one env step: {sizes['steps_per_epoch']} x {sizes['batch_size']} training images, "
          f"{sizes['val_size']} validation images, {sizes['slots']} slots; parts timed alone, interleaved)")
    print(f"  {'state':<9} {'env step ms':>11} {'sampling':>9} {'training':>9} {'validation':>11} {'rest':>7}"
          f"   {'validation vs every pass':>25}")
    for name, r in result["env"].items():
        s = r["shares"]
        print(f"  {name:<9} {r['env_step_s'] * 1e3:11.1f} {s['sampling']:9.0%} {s['training']:9.0%} {s['validation']:11.0%}"
              f" {s['rest']:7.0%}   {r['validation_over_every_pass']:25.2f}")
    h = result["host"]
    print(f"  plain host training step {h['training_step_s'] * 1e3:.1f} ms: forward {h['shares']['forward']:.0%}, "
          f"backward {h['shares']['backward']:.0%}, optimizer {h['shares']['optimizer']:.0%}")
    p = result["ppo"]
    print(f"  PPO update (smoke) {p['update_s'] * 1e3:.1f} ms: rollout {p['shares']['rollout']:.0%}, "
          f"learning {p['shares']['learning']:.0%}")
    for name, profiled in result.get("profile", {}).items():
        print(f"  profile of the {name} ({profiled['untraced_wall_s'] * 1e3:.1f} ms untraced), thunk time by category:")
        print_profile(name, Profile(profiled["seconds"], profiled["traced_wall_s"], profiled["thunk_s"]))
