"""Benchmarks behind `clipray bench <name>`: each module has `main(argv)` and prints its figures.

`data` (decode pipeline), `model` (per-clip forward / forward+backward time of every head),
`train`, `serve`. Results and the exact commands are kept in docs/benchmarks.md.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def alternated(a: T, b: T, runs: int) -> list[T]:
    """`runs` runs of each of two arms in the order a, b, b, a, a, b, b, a, ...: each arm is as
    often first as second of a pair, so a machine growing busier or quieter favours neither."""
    return [(a, b, b, a)[i % 4] for i in range(2 * runs)]
