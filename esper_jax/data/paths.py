"""Where datasets live on disk: the single rule that resolves the data directory.

Every loader in :mod:`esper_jax.data` calls :func:`resolve_data_dir`, so the
precedence is the same everywhere: an explicit ``data_dir`` argument (what
``--data-dir`` passes), then the ``$ESPER_DATA`` environment variable, then
``./data`` relative to the current working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV_VAR = "ESPER_DATA"
DEFAULT_DATA_DIR_NAME = "data"

PathLike = str | os.PathLike[str]


def resolve_data_dir(data_dir: PathLike | None = None) -> Path:
    """Return the absolute data directory: ``data_dir`` > ``$ESPER_DATA`` > ``./data``.

    The directory is not required to exist; loaders report what is missing in it.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser().resolve()
    from_env = os.environ.get(DATA_DIR_ENV_VAR, "")
    if from_env:
        return Path(from_env).expanduser().resolve()
    return (Path.cwd() / DEFAULT_DATA_DIR_NAME).resolve()


def describe_data_dir_choice(data_dir: PathLike | None = None) -> str:
    """Say which rule chose the data directory, for error messages."""
    if data_dir is not None and str(data_dir) != "":
        return "given explicitly (data_dir argument / --data-dir)"
    if os.environ.get(DATA_DIR_ENV_VAR, ""):
        return f"from ${DATA_DIR_ENV_VAR}"
    return f"the default ./{DEFAULT_DATA_DIR_NAME} under the current directory"


def data_dir_help(data_dir: PathLike | None = None) -> str:
    """One paragraph on how the data directory is chosen, appended to missing-data errors."""
    return (
        f"The data directory is {resolve_data_dir(data_dir)} "
        f"({describe_data_dir_choice(data_dir)}). Choose another with --data-dir "
        f"(or data_dir=...), or set ${DATA_DIR_ENV_VAR}; the default is ./{DEFAULT_DATA_DIR_NAME}."
    )
