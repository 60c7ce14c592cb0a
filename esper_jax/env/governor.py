"""The governor: the inner run's divergence rule (Esper's). An epoch whose validation or training
loss is not finite, or whose validation loss has been above an absolute bound *and* far above its
recent mean for several epochs in a row, is rolled back: the environment restores the last good
weights and prunes the live seeds (and the reward charges a penalty).

:func:`judge` is the rule alone, a pure function of per-member arrays, so it can be tested
without training anything; the environment applies its verdict."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GovernorConfig:
    """Above ``absolute_loss_bound`` and ``relative_factor`` × the mean of the last ``history``
    validation losses for ``patience`` consecutive epochs (or any non-finite loss): roll back."""

    absolute_loss_bound: float = 10.0
    relative_factor: float = 3.0
    patience: int = 2
    history: int = 5


class Verdict(NamedTuple):
    rolled_back: jax.Array       # [P] bool: restore the last good snapshot this epoch
    good: jax.Array              # [P] bool: finite and not divergent, so this epoch's weights become the snapshot
    divergent_epochs: jax.Array  # [P] int32: the consecutive divergent epochs to carry to the next epoch


def judge(config: GovernorConfig, val_loss: jax.Array, train_loss: jax.Array, recent_val_losses: jax.Array,
          divergent_epochs: jax.Array) -> Verdict:
    """The verdict on one epoch, per member: ``val_loss``/``train_loss`` ``[P]`` of this epoch,
    ``recent_val_losses`` ``[P, history]`` of the epochs before it, ``divergent_epochs`` ``[P]``
    the count carried so far."""
    finite = jnp.isfinite(val_loss) & jnp.isfinite(train_loss)
    recent_mean = recent_val_losses.mean(axis=1)
    divergent = finite & (val_loss > config.absolute_loss_bound) & (val_loss > config.relative_factor * recent_mean)
    divergent_epochs = jnp.where(divergent, divergent_epochs + 1, 0)
    rolled_back = ~finite | (divergent_epochs >= config.patience)
    # Only a good epoch (finite, not divergent) becomes the snapshot: the weights of an epoch
    # counted toward the divergence patience are not "last good" for the rollback that follows.
    return Verdict(rolled_back, finite & ~divergent, jnp.where(rolled_back, 0, divergent_epochs))
