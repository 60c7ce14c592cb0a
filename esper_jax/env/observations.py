"""The observation: one fixed-size float32 vector per environment, global features followed
by one block per slot (row-major slot order). :func:`feature_names` documents the layout and is
derived from the same code path as the vector, so the two cannot drift apart.

Losses and gradient norms are ``symlog``-scaled so one feature scale fits every task; the
learner normalizes online on top of this.

Validation accuracy is telemetry, not an input (as the loss-primary design has it): the
controller sees losses, which every task has, and is judged on the loss.

An env whose problem family draws the training set's size (:mod:`esper_jax.env.problems`) also
shows it, as one more global feature (``train_set_size``: the log of the env's fraction over the
log of the family's smallest, 0 for the whole set, 1 for the smallest): whoever grows a network
knows how much data it has, and before the first epochs show a train-validation gap nothing else
tells. The label noise is not shown (nobody knows theirs). Runs without such a family keep the
layout they always had.

With the SEAL op (``ActionConfig.seal``) the ``last_op`` one-hot has its seventh entry and one more
global feature says whether the episode is sealed (``sealed``, after ``train_set_size``); without
it the layout is the one it always was.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from esper_jax.lattice import blending, lifecycle
from esper_jax.env.actions import Op, op_count
from esper_jax.lattice.grid import Lattice
from esper_jax.lattice.lifecycle import NUM_STAGES, SlotStatus, Stage

LOSS_HISTORY = 5


def symlog(x: jax.Array) -> jax.Array:
    x = jnp.nan_to_num(jnp.asarray(x, jnp.float32), nan=0.0, posinf=1e6, neginf=-1e6)
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def global_feature_names(seal: bool = False) -> list[str]:
    names = ["epoch_fraction", "train_loss", "val_loss", "val_loss_delta", "best_val_loss", "val_loss_vs_initial"]
    names += [f"val_loss_history_{i}" for i in range(LOSS_HISTORY)]
    names += [f"slots_{s.name.lower()}" for s in Stage]
    names += [f"last_op_{o.name.lower()}" for o in list(Op)[:op_count(seal)]]
    return names


def slot_feature_names(lattice: Lattice, slot_id: str) -> list[str]:
    names = [f"stage_{s.name.lower()}" for s in Stage]
    names += ["alpha", "alpha_target", "schedule_progress", "pruning", "contribution", "contribution_measured",
              "improvement", "seed_grad_norm", "host_grad_norm", "gradients_healthy", "epochs_in_stage", "seed_age",
              "gate_passes", "tempo"]
    names += [f"blueprint_{b.name}" for b in lattice.blueprints]
    names += [f"blend_{b}" for b in blending.BLEND_STYLE_NAMES]
    return [f"{slot_id}.{n}" for n in names]


def feature_names(lattice: Lattice, train_set_size: bool = False, seal: bool = False) -> list[str]:
    names = global_feature_names(seal) + (["train_set_size"] if train_set_size else []) + (["sealed"] if seal else [])
    for slot_id in lattice.slots.slot_ids:
        names += slot_feature_names(lattice, slot_id)
    return names


def observation_size(lattice: Lattice, train_set_size: bool = False, seal: bool = False) -> int:
    return len(feature_names(lattice, train_set_size, seal))


def _slot_features(lattice: Lattice, st: SlotStatus, episode_epochs: int) -> jax.Array:
    occupied = st.blueprint >= 0
    progress = jnp.where(st.alpha_steps > 0, st.alpha_step / jnp.maximum(st.alpha_steps, 1), 0.0)
    columns = [
        jax.nn.one_hot(st.stage, NUM_STAGES),
        st.alpha[:, None], st.alpha_target[:, None], progress[:, None], st.pruning[:, None],
        symlog(st.contribution)[:, None], st.contribution_measured[:, None], symlog(st.improvement)[:, None],
        symlog(st.seed_grad_norm)[:, None], symlog(st.host_grad_norm)[:, None],
        lifecycle.gradients_healthy(st, lattice.gates)[:, None],
        (st.epochs_in_stage / max(episode_epochs, 1))[:, None], (st.seed_age / max(episode_epochs, 1))[:, None],
        lifecycle.gates_passed(st, lattice.gates)[:, None], (st.tempo / max(blending.TEMPOS))[:, None],
        jax.nn.one_hot(jnp.where(occupied, st.blueprint, -1), lattice.num_blueprints),
        jax.nn.one_hot(jnp.where(occupied, st.blend_style, -1), len(blending.BLEND_STYLES)),
    ]
    return jnp.concatenate([jnp.asarray(c, jnp.float32) for c in columns], axis=1)


def observe(lattice: Lattice, status: SlotStatus, *, epoch, episode_epochs: int, train_loss, val_loss, prev_val_loss,
            best_val_loss, initial_val_loss, loss_history, last_op, train_set_size=None, sealed=None) -> jax.Array:
    """The observation vector; every input is a jnp scalar (``loss_history`` is ``[LOSS_HISTORY]``;
    ``train_set_size``, when the family draws it, in [0, 1] as the module docstring says;
    ``sealed`` with the SEAL op only)."""
    stage_counts = jnp.sum(jax.nn.one_hot(status.stage, NUM_STAGES), axis=0) / status.num_slots
    parts = [
        jnp.asarray([epoch / episode_epochs]), symlog(jnp.stack([train_loss, val_loss, val_loss - prev_val_loss, best_val_loss,
                                                                val_loss - initial_val_loss])),
        symlog(loss_history),
    ]
    parts += [stage_counts, jax.nn.one_hot(last_op, op_count(sealed is not None))]
    if train_set_size is not None:
        parts.append(jnp.asarray([train_set_size]))
    if sealed is not None:
        parts.append(jnp.asarray([sealed]))
    parts.append(_slot_features(lattice, status, episode_epochs).reshape(-1))
    return jnp.concatenate([jnp.asarray(p, jnp.float32).reshape(-1) for p in parts])
