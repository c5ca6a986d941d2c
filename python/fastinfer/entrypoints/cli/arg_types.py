"""Command-line value parsers (argparse ``type=``) shared by the ``fastinfer`` subcommands."""

from __future__ import annotations

import argparse
import re
from typing import Callable

THREADS_MAX = 1 << 16  # torch takes a C int; more threads than this is a typo


def byte_size(text: str) -> int:
    """``123``, ``512M``, ``4GiB``, ``1.5G`` -> bytes."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = text.strip().lower().removesuffix("b").removesuffix("i")
    num, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 4GiB, 512M, 1000000)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return int(value)


def int_at_least(low: int) -> Callable[[str], int]:
    """A parser of ints >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}: {text!r}")
        return value

    return parse


positive_int = int_at_least(1)


def threads(text: str) -> int:
    """A thread count in [1, THREADS_MAX]."""
    value = positive_int(text)
    if value > THREADS_MAX:
        raise argparse.ArgumentTypeError(f"must be <= {THREADS_MAX}: {text!r}")
    return value


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text
