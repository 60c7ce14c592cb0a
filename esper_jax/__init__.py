"""esper-jax: morphogenetic neural networks as pure JAX functions over pytrees.

Layers, each importing only those before it (``tests/test_layering.py`` checks):
``data`` (datasets) → ``lattice`` (the growable model and its inner training) → ``env`` (one
training run per member as a gymnax-style environment) → ``rl`` (the PPO controller) → ``runs``
(configuration, the training loop, checkpoints, evaluation). ``trees`` holds pytree helpers any
layer may use. See ``docs/architecture.md``.
"""
