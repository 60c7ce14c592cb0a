"""Blueprints: what can grow in a slot. See :mod:`esper_jax.lattice.blueprints.registry`."""

from esper_jax.lattice.blueprints.registry import (
    Blueprint,
    blueprint_index,
    blueprint_names,
    blueprints_for,
    get_blueprint,
    register_blueprint,
)

__all__ = ["Blueprint", "blueprint_index", "blueprint_names", "blueprints_for", "get_blueprint", "register_blueprint"]
