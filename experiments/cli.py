"""Argument parsing shared by the command-line entry points."""

from __future__ import annotations

import argparse
import typing


class Parser(argparse.ArgumentParser):
    """Bad options end with one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message}\n")


def positive(text: str) -> int:
    """An argparse type: a positive integer, with a one-line error otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value
