"""Benchmarks behind `clipray bench <name>`: each module has `main(argv)` and prints its figures.

`data` (decode pipeline), `model` (per-clip forward / forward+backward time of every head),
`train`, `serve`. Results and the exact commands are kept in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def scratch_dir(prefix: str, keep: str | None = None) -> Iterator[Path]:
    """The folder a bench writes its clip sets and runs into. `keep` (a --workdir) is used and
    left in place, made if absent; without it, a new temp dir that is removed when the bench
    ends, finished or failed (a `bench edit` leaves ~350 MB of runs, and tests run benches)."""
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep)
        return
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as d:
        yield Path(d)


def alternated(a: T, b: T, runs: int) -> list[T]:
    """`runs` runs of each of two arms in the order a, b, b, a, a, b, b, a, ...: each arm is as
    often first as second of a pair, so a machine growing busier or quieter favours neither."""
    return [(a, b, b, a)[i % 4] for i in range(2 * runs)]
