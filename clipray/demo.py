"""`clipray demo`: the whole system on an embedded local Ray, CPU only, in minutes.

Generates the synthetic dataset (once), then streams its training split through the Ray Data
pipeline and prints what arrived. Training, evaluation and serving join this command as they
land (see the README).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clipray.config import DataConfig, VideoConfig


def ensure_synth(data_dir: Path, videos: int, seed: int = 0) -> Path:
    """Generate the synthetic set under data_dir unless a complete one is already there."""
    manifest = data_dir / "manifest.parquet"
    if not (data_dir / "synth.json").exists():
        from clipray.synth import generate

        print(f"generating {videos} synthetic videos in {data_dir} ...", flush=True)
        generate(data_dir, videos=videos, seed=seed, progress=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="clipray_data/synth", help="synthetic dataset folder")
    ap.add_argument("--videos", type=int, default=200)
    ap.add_argument("--out", default="runs/demo", help="run directory (skip report, outputs)")
    args = ap.parse_args(argv)

    from clipray.pipeline import clip_dataset, collect_skips
    from clipray.runtime import init_ray, quiet_data_progress

    manifest = ensure_synth(Path(args.data), args.videos)
    init_ray(quiet=True)
    quiet_data_progress()
    data = DataConfig(manifest=str(manifest), video=VideoConfig(fps=2, max_frames=8, size=64),
                      decode_actors=2, decode_cpus=0.5, decode_batch=8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clips = frames = 0
    for b in clip_dataset(data, str(out)).iter_batches(batch_size=16, batch_format="numpy"):
        clips += len(b["row_id"])
        frames += int(b["frame_mask"].sum())
        print(f"\r  streamed {clips} clips", end="", flush=True)
    dt = time.perf_counter() - t0
    skips = collect_skips(str(out))
    print(f"\nstreamed {clips} training clips, {frames} frames in {dt:.1f}s "
          f"({clips / dt:.1f} clips/s, {frames / dt:.0f} frames/s incl. start-up); "
          f"skipped {skips['skipped']} {skips['by_reason'] or ''}; report: {skips['report']}")
    return 0
