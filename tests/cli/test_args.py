"""cli.args: argument types; a count given as 0 is a usage error, never silently the configured default."""

from __future__ import annotations

import argparse

import pytest

from cli import build_parser
from cli.args import csv_ints, csv_list, positive_int


def test_csv_types() -> None:
    assert csv_list(" a, b,,c ") == ["a", "b", "c"]
    assert csv_ints("1, 2") == [1, 2]
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated integers, got 'a,1'"):
        csv_ints("a,1")


def test_positive_int_refuses_zero_and_text() -> None:
    assert positive_int("3") == 3
    for bad, shown in (("0", "got 0"), ("-2", "got -2"), ("x", "got 'x'")):
        with pytest.raises(argparse.ArgumentTypeError, match=shown):
            positive_int(bad)


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--store", "s", "--out", "o.npz", "--steps", "0"],
        ["sample", "--store", "s", "--out", "o.npz", "--n", "0"],
        ["evaluate", "--store", "s", "--steps", "0"],
        ["evaluate", "--store", "s", "--n", "0"],
        ["attribute", "img.png", "--store", "s", "--draws", "0"],
    ],
)
def test_a_zero_count_is_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "expected an integer >= 1, got 0" in capsys.readouterr().err
