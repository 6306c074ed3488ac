"""Argument value types shared by the ``cdm`` commands (argparse ``type=`` functions)."""

from __future__ import annotations

import argparse


def csv_list(value: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [v for v in (s.strip() for s in value.split(",")) if v]


def csv_ints(value: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``; argparse reports anything else as a usage error naming the value."""
    try:
        return [int(v) for v in csv_list(value)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from exc


def positive_int(value: str) -> int:
    """An integer >= 1 (a count of images, steps or draws); argparse reports anything else naming the value."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {n}")
    return n
