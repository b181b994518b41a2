"""`clipray bench shuffle`: how mixed training batches are when a manifest lists each video's
captions together, and what the mixing costs before the first batch.

Dataset manifests list a video's captions in a row (MSR-VTT 9k expanded: 20 per video,
180,000 rows; HowTo100M: ~110 clips per video). In a contrastive batch, two captions of one
video make one of them the other's negative. This writes such a manifest (rows only: nothing
is decoded) and reads its training rows through `clipray.pipeline.manifest_rows` three ways:
  (a) as listed (no `data.shuffle_rows`, no `data.shuffle_buffer`);
  (b) a local shuffle buffer of --buffer rows on the consumer (`data.shuffle_buffer`, what the
      recipes used before `data.shuffle_rows`; in training it holds decoded clips:
      --buffer x 1.8 MB at 12 frames of 224 px, filled before the first step);
  (c) the rows shuffled before decoding (`data.shuffle_rows`, Ray Data's random_shuffle);
and prints, per batch of --batch, the mean number of pairs of captions of one video and the
share of batches with any, beside what uniform sampling gives: B(B-1)/2 x (k-1)/(N-1).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clipray.bench import scratch_dir
from clipray.cli import at_least
from clipray.runtime import usable_cores


def grouped_manifest(path: Path, videos: int, captions: int) -> None:
    from clipray.manifest import write_manifest

    rows = ({"video_id": f"v{v:07d}", "path": f"videos/v{v:07d}.mp4", "caption": f"caption {c} of video {v}",
             "split": "train"} for v in range(videos) for c in range(captions))
    write_manifest(rows, path)


def read(data, shuffle: bool, buffer: int, batch: int, captions: int) -> dict[str, float]:
    """One execution: same-video pairs per batch, and seconds to the first batch and to the end."""
    from clipray.pipeline import manifest_rows

    t0 = time.perf_counter()
    first, pairs, hit, batches = None, 0, 0, 0
    for b in manifest_rows(data, "train", shuffle=shuffle).iter_batches(
            batch_size=batch, batch_format="numpy", drop_last=True, local_shuffle_buffer_size=buffer or None):
        first = first if first is not None else time.perf_counter() - t0
        video = b["row_id"] // captions  # rows are written video by video
        same = sum(int(video[i] == video[j]) for i in range(batch) for j in range(i + 1, batch))
        pairs, hit, batches = pairs + same, hit + (same > 0), batches + 1
    return {"pairs": pairs / batches, "hit": hit / batches, "first": first or 0.0,
            "total": time.perf_counter() - t0, "batches": batches}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray bench shuffle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=at_least(2), default=9000, help="videos (MSR-VTT 9k: 9000)")
    ap.add_argument("--captions", type=at_least(1), default=20, help="captions per video, listed together")
    ap.add_argument("--buffer", type=at_least(1), default=2048, help="(b)'s local shuffle buffer, rows")
    ap.add_argument("--batch", type=at_least(2), default=16, help="clips per batch (one training worker's)")
    args = ap.parse_args(argv)
    if args.videos * args.captions < args.batch:  # batches are drop_last: none would be read
        ap.error(f"{args.videos * args.captions} rows (--videos x --captions) do not fill one batch of "
                 f"{args.batch} (--batch)")

    from clipray.config import DataConfig
    from clipray.runtime import init_ray, quiet_data_progress

    with scratch_dir("clipray-bench-shuffle-") as work:
        grouped_manifest(work / "m.parquet", args.videos, args.captions)
        data = DataConfig(manifest=str(work / "m.parquet"), decode_batch=8)
        init_ray(quiet=True)
        quiet_data_progress()
        n, B, k = args.videos * args.captions, args.batch, args.captions
        arms = {"(a) as listed": (False, 0), f"(b) local buffer of {args.buffer} rows": (False, args.buffer),
                "(c) data.shuffle_rows": (True, 0)}
        print(f"clipray bench shuffle: {n:,} rows, {k} captions per video listed together, batches of {B}, "
              f"{usable_cores()} cores")
        print(f"{'order':34} {'same-video pairs/batch':>22} {'batches with one':>17} {'first batch':>12} {'all rows':>9}")
        for label, (shuffle, buffer) in arms.items():
            r = read(data, shuffle, buffer, B, k)
            print(f"{label:34} {r['pairs']:22.2f} {100 * r['hit']:16.1f}% {r['first']:11.1f}s {r['total']:8.1f}s")
        uniform = B * (B - 1) / 2 * (k - 1) / (n - 1)
        print(f"{'uniform sampling (expected)':34} {uniform:22.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
