"""esper-jax: morphogenetic neural networks as pure JAX functions over pytrees."""
