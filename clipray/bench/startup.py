"""`clipray bench startup`: what one execution of a small dataset costs before its first clip.

Ray Data starts afresh every time a dataset is executed, and Ray Train executes the training
and test datasets again every epoch, so on small data that start-up, not decoding, sets the
pace. This runs the demo's test split (the demo config's decode settings) through three
versions of the pipeline, in interleaved rounds on one embedded Ray:
  (a) decode actors (`data.decode_pool=actors`) as they were before the decoders stopped
      importing torchvision and the whole open_clip package (each actor imports both before
      its first clip, and tokenises with `open_clip.get_tokenizer`): the baseline;
  (b) decode actors now (`clip_dataset`), importing torch and open_clip's tokenizer module only;
  (c) decode tasks now (`data.decode_pool=tasks`, the default), on worker processes Ray keeps
      between executions.
All three read the manifest as `clip_dataset` does (Ray Data's V1 Parquet reader; the
reader arms of earlier versions of this bench are recorded in docs/benchmarks.md).
For each: seconds to the first batch and to the last, for the first execution and the median
of the later ones (an actor pool starts anew each time; task workers are started once).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from clipray.bench import scratch_dir
from clipray.cli import at_least
from clipray.runtime import usable_cores
from clipray.pipeline import ClipDecoder

ARMS = {
    "a": "(a) decode actors, importing open_clip",
    "b": "(b) decode actors, tokenizer module only",
    "c": "(c) decode tasks",
}


class OpenClipDecoder(ClipDecoder):
    """(a)'s decoder: `ClipDecoder` as it was, importing torchvision (its resize) and the open_clip
    package (its tokenizer) as each actor starts."""

    def __init__(self, data, root: str, skip_dir: str):
        import open_clip
        import torchvision.transforms.v2.functional  # noqa: F401

        super().__init__(data, root, skip_dir)
        self.tokenize = open_clip.get_tokenizer(data.tokenizer, context_length=data.max_words)


def dataset(arm: str, data, skip_dir: str):
    from dataclasses import replace
    from unittest import mock

    from clipray import pipeline

    # (a) is clip_dataset's own actor pool with (a)'s decoder put in it, so the arms differ in
    # the decoder class alone
    decoder = OpenClipDecoder if arm == "a" else pipeline.ClipDecoder
    with mock.patch.object(pipeline, "ClipDecoder", decoder):
        return pipeline.clip_dataset(replace(data, decode_pool="tasks" if arm == "c" else "actors"), skip_dir,
                                     split="test")


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
    ap.add_argument("--decoders", type=at_least(1), default=None,
                    help="decoders per execution (default: the demo config's data.decode_actors, 2)")
    args = ap.parse_args(argv)

    from clipray.config import load_config
    from clipray.demo import demo_config_path, ensure_synth
    from clipray.runtime import init_ray, quiet_data_progress

    manifest = ensure_synth(Path(args.data), args.videos).resolve()
    from train.driver import count_rows

    if count_rows(str(manifest), "test") < 1:  # else every version timed 0 clips
        ap.error(f"{manifest} has no 'test' rows to decode (a small set may draw none): give --data another "
                 "set, or more --videos")
    data = load_config(demo_config_path(), [f"data.manifest={manifest}"]
                       + ([f"data.decode_actors={args.decoders}"] if args.decoders else [])).data
    with scratch_dir("clipray-bench-startup-") as work:
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
              f"{data.video.size}px), {data.decode_actors} decoders x {data.decode_cpus:g} CPU, {usable_cores()} cores, "
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
