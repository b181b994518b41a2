"""`clipray bench startup`: what one execution of a small dataset costs before its first clip.

Ray Data starts afresh every time a dataset is executed, and Ray Train executes the training
and test datasets again every epoch, so on small data that start-up, not decoding, sets the
pace. This runs the demo's test split (the demo config's decode settings) through three
versions of the pipeline, in interleaved rounds on one embedded Ray:
  (a) decode actors (`data.decode_pool=actors`: `ClipDecoder` in a Ray Data actor pool) and Ray
      Data's V2 Parquet reader with its 32 footer-reader actors: the pipeline before f0a301c,
      the baseline;
  (b) decode tasks (`data.decode_pool=tasks`, the default) on workers Ray keeps between
      executions, and the V2 reader with one footer reader per manifest file (f0a301c-03ca8fe);
  (c) decode tasks and Ray Data's V1 Parquet reader, which starts no actor: `clip_dataset` now.
For each: seconds to the first batch and to the last, for the first execution and the median
of the later ones (an actor pool starts anew each time; task workers are started once).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from clipray.cli import at_least

ARMS = {
    "a": "(a) decode actors, 32 footer readers",
    "b": "(b) decode tasks, 1 footer reader/file",
    "c": "(c) decode tasks, no footer readers",
}
V2 = "RAY_DATA_USE_DATASOURCE_V2"
FOOTERS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def dataset(arm: str, data, skip_dir: str):
    from dataclasses import replace

    from clipray.pipeline import clip_dataset

    # (a) and (b) ask for the V2 reader, which clip_dataset then leaves alone; (c) reads as
    # clip_dataset does by itself. The environment is restored as it was.
    env = {"a": {V2: "1", FOOTERS: "32"}, "b": {V2: "1", FOOTERS: "1"}, "c": {}}[arm]
    with mock.patch.dict(os.environ, env):
        if arm == "c":
            os.environ.pop(V2, None)
        return clip_dataset(replace(data, decode_pool="actors" if arm == "a" else "tasks"), skip_dir, split="test")


def execute(ds) -> tuple[int, float, float]:
    """Rows, seconds to the first batch, seconds to the end."""
    t0 = time.perf_counter()
    first, rows = None, 0
    for b in ds.iter_batches(batch_size=16, batch_format="numpy"):
        first = first if first is not None else time.perf_counter() - t0
        rows += len(b["row_id"])
    return rows, first or 0.0, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray bench startup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=at_least(2), default=4, help="executions of each version")
    ap.add_argument("--data", default="clipray_data/synth", help="synthetic set (made if absent)")
    ap.add_argument("--videos", type=at_least(1), default=240, help="videos to generate when --data is absent")
    args = ap.parse_args(argv)

    from clipray.config import load_config
    from clipray.demo import demo_config_path, ensure_synth
    from clipray.runtime import init_ray, quiet_data_progress

    manifest = ensure_synth(Path(args.data), args.videos).resolve()
    data = load_config(demo_config_path(), [f"data.manifest={manifest}"]).data
    work = Path(tempfile.mkdtemp(prefix="clipray-bench-startup-"))
    init_ray(quiet=True)
    quiet_data_progress()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in ARMS}
    clips = None
    for r in range(args.rounds):
        for arm in ARMS:
            n, first, total = execute(dataset(arm, data, str(work / arm)))
            if clips is not None and n != clips:
                raise SystemExit(f"clipray bench startup: {ARMS[arm]} gave {n} clips, the others {clips}")
            clips = n
            times[arm].append((first, total))
            print(f"round {r + 1}/{args.rounds} {ARMS[arm]:42} first batch {first:5.1f}s, all {n} clips {total:5.1f}s",
                  flush=True)
    print(f"\nclipray bench startup: the demo's test split ({clips} clips, {data.video.max_frames} frames at "
          f"{data.video.size}px), {data.decode_actors} decoders x {data.decode_cpus:g} CPU, {os.cpu_count()} cores, "
          f"{args.rounds} executions each")
    print(f"{'version':42} {'first execution':>18} {'later (median)':>16} {'later (range)':>14}  against (a)")
    base = statistics.median(t for _, t in times["a"][1:])
    for arm, label in ARMS.items():
        later = [t for _, t in times[arm][1:]]
        med = statistics.median(later)
        line = f"{label:42} {times[arm][0][1]:17.1f}s {med:15.1f}s {min(later):6.1f}-{max(later):4.1f}s"
        print(line + (f"  {base / med:.1f}x faster" if arm != "a" else ""))
    print("seconds to an execution's last clip; to its first batch (median of the later executions): "
          + ", ".join(f"({k}) {statistics.median(f for f, _ in v[1:]):.1f}s" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
