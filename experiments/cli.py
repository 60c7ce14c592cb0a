"""Argument types shared by the command-line entry points."""

from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """An argparse type: a positive integer, with a one-line error otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value
