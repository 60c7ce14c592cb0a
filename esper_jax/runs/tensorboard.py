"""TensorBoard scalars of a run (``--tensorboard``): the rows of ``metrics.jsonl`` written again as
event files under ``DIR/tensorboard/``, one scalar per metric and update, and for a population
``member_<m>/<metric>`` beside the member mean. Uses tensorboardX (the ``tensorboard`` extra),
which writes the event format without TensorFlow; view with ``tensorboard --logdir DIR/tensorboard``
(the viewer is the separate ``tensorboard`` package)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from esper_jax.data.datasets import OptionalDependencyError

TENSORBOARD_DIR = "tensorboard"


class ScalarWriter:
    """Writes metric rows as scalars; a context manager that flushes and closes the event file."""

    def __init__(self, run_dir: Path):
        self.check_available()
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR))

    @staticmethod
    def check_available() -> None:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise OptionalDependencyError("--tensorboard needs tensorboardX: pip install -e '.[tensorboard]'") from None

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            step = int(row["update"])
            self._scalars("", row, step)
            for m, member in enumerate(row.get("members") or []):
                self._scalars(f"member_{m}/", member, step)
        self._writer.flush()

    def _scalars(self, prefix: str, row: dict[str, Any], step: int) -> None:
        for name, value in row.items():
            if name in ("update", "members") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(prefix + name, value, step)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "ScalarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
