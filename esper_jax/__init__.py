"""esper-jax: morphogenetic neural networks as pure JAX functions over pytrees.

Layers, each importing only those before it (``tests/test_layering.py`` checks):
``data`` (datasets) → ``lattice`` (the growable model and its inner training) → ``env`` (one
training run per member as a gymnax-style environment) → ``rl`` (the PPO controller) → ``runs``
(configuration, the training loop, checkpoints, evaluation). ``trees`` holds pytree helpers any
layer may use. See ``docs/architecture.md``.
"""

import os as _os

# XLA:CPU's library fusions, chosen once for the package, here because XLA reads XLA_FLAGS when
# its CPU backend starts (the first computation), which importing the package comes before.
# YNNPACK's dot fusion, on by default in jaxlib 0.10.2, is turned off: XLA:CPU's own dot kernels
# ran this project's small matrices faster. Measured on a 2-core x86-64 CPU, each setting in a
# process of its own, alternated (``python -m experiments.bench --only env,lattice``; README of
# benchmarks/results), three rounds: the plain host's training step at batch 128 took 0.56-0.67x the
# time, with a live seed 0.63-0.75x; env steps per second, median 1.1x (rounds 0.89-1.42x). Letting
# YNNPACK fuse convolutions as well was no better (host step 0.78-0.82x, env steps 0.83-1.15x).
# Other backends ignore the flag. A user's own ``--xla_cpu_experimental_ynn_fusion_type`` in
# XLA_FLAGS is kept as given.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if YNN_FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {YNN_FLAG}=".strip()
