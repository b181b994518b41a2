"""`clipray bench prepare`: what checking each row costs `clipray data prepare howto100m`.

The manifest writer checks the rows it is given a buffer at a time, a column at a time (Arrow's
kernels), and goes row by row through `check_row` only for a buffer with a bad row. This writes
a HowTo100M caption file (`raw_caption.json`: --videos videos of --lines ASR lines each, and an
empty file per video to match), then runs the real `prepare` over it with the writer checking
(a) every row by `check_row`, as it did before, and (b) by columns, alternated (a, b, b, a, ...),
and prints each run's seconds and the medians side by side. The manifests written must be equal.
Nothing is decoded: the videos are only listed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from clipray.bench import alternated
from clipray.cli import at_least


def caption_release(root: Path, videos: int, lines: int) -> None:
    """`raw_caption.json` and an empty video file per video under `root`."""
    (root / "videos").mkdir(parents=True)
    with open(root / "raw_caption.json", "w") as f:
        f.write("{")
        for v in range(videos):
            starts = [round(3.1 * k, 2) for k in range(lines)]
            texts = [f"now stir step {k} of video {v} until it thickens" for k in range(lines)]
            entry = {"start": starts, "end": [s + 2.5 for s in starts], "text": texts}
            f.write(("," if v else "") + json.dumps(f"vid{v:07d}") + ":" + json.dumps(entry))
            (root / "videos" / f"vid{v:07d}.mp4").touch()
        f.write("}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray bench prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=at_least(1), default=20_000, help="videos in the caption file")
    ap.add_argument("--lines", type=at_least(1), default=50, help="ASR lines (manifest rows) per video")
    ap.add_argument("--runs", type=at_least(1), default=2, help="timed runs per way of checking")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="clipray-bench-prepare-"))
    try:
        return _compare(work, args.videos, args.lines, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compare(work: Path, videos: int, lines: int, runs: int) -> int:
    from clipray.manifest import ManifestWriter, read_manifest
    from clipray.sources import prepare

    caption_release(work / "release", videos, lines)
    ways = {"(a) row by row": False, "(b) by columns": True}
    times: dict[str, list[float]] = {w: [] for w in ways}
    rows = videos * lines
    print(f"clipray bench prepare: howto100m, {videos:,} videos x {lines} lines = {rows:,} rows, "
          f"{runs} runs each")
    try:
        # a warm-up run first, not counted: the first run of the process pays its imports and
        # first calls (1.14 s against 0.59 s after), which (a), always first, took into its median
        for i, way in enumerate([next(iter(ways))] + alternated(*ways, runs)):
            ManifestWriter.by_columns = ways[way]
            t0 = time.perf_counter()
            rep = prepare("howto100m", str(work / "release"), str(work / way.split()[0]))
            took = time.perf_counter() - t0
            if i:
                times[way].append(took)
            if rep.rows != rows:
                raise SystemExit(f"clipray bench prepare: {way} wrote {rep.rows} rows of {rows}")
            print(f"  run {i}: {way:15} {took:6.2f} s{' (warm-up, not counted)' if not i else ''}")
    finally:
        ManifestWriter.by_columns = True
    if not read_manifest(work / "(a)").equals(read_manifest(work / "(b)")):
        raise SystemExit("clipray bench prepare: the two ways wrote different manifests")
    print(f"{'check':15} {'median s':>9} {'rows/s':>11}")
    for way, ts in times.items():
        med = statistics.median(ts)
        print(f"{way:15} {med:9.2f} {rows / med:11,.0f}")
    a, b = (statistics.median(times[w]) for w in ways)
    print(f"by columns: {a / b:.2f}x the rows/s of row by row; the manifests written are equal")
    return 0
