"""`clipray demo`: the whole system on an embedded local Ray, CPU only, in minutes.

1. generates the synthetic H.264 dataset once (`clipray_data/synth/`);
2. trains the demo config (`train/configs/demo.yaml`: tiny CLIP4Clip, 2 Ray Train workers,
   DeepSpeed ZeRO-0 fp32 on gloo) with evaluation every epoch, and exports the model;
3. prints the retrieval metrics and where the run's files are;
4. when the serving package is present: indexes every video of the set (all splits), starts the
   HTTP API, runs a few captions of test videos as queries against it and prints their top
   results next to the true video.

Extra `key=value` arguments override the demo config, e.g. `model.name=test_seqTransf`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time
from pathlib import Path

from clipray.cli import MAX_VIDEOS, at_least


def synth_defaults() -> dict:
    """`clipray.synth.generate`'s defaults (fps, size, splits, ...): the demo's set is made with them."""
    from clipray.synth import generate

    return {k: p.default for k, p in inspect.signature(generate).parameters.items()
            if p.default is not inspect.Parameter.empty}


def ensure_synth(data_dir: Path, videos: int, seed: int = 0, **options) -> Path:
    """Generate the synthetic set under data_dir unless a complete one is already there;
    `options` go to `clipray.synth.generate` (e.g. idle_seconds)."""
    manifest = data_dir / "manifest.parquet"
    if not (data_dir / "synth.json").exists():
        from clipray.synth import generate

        print(f"[demo] generating {videos} synthetic videos in {data_dir} ...", flush=True)
        generate(data_dir, videos=videos, seed=seed, progress=True, **options)
        return manifest
    made = json.loads((data_dir / "synth.json").read_text())
    other = []
    if (made.get("videos"), made.get("seed")) != (videos, seed):
        other.append(f"{videos} (seed {seed})")
    # the idle background changes what the set is (`bench edit --idle-seconds`): say so too
    recorded = _synth_metadata(manifest)
    idle = float(options.get("idle_seconds", 0.0))
    made_idle = float(recorded.get("idle_seconds", 0.0))
    if made_idle != idle:
        other.append(f"{idle:g} s of idle background (these have {made_idle:g} s)")
    # and so do the encoding and the plan of a set made with `clipray data synth --fps ...`: its
    # videos are not those the asked-for set (the demo's, whose figures the README gives) holds
    from clipray.synth import plan

    want = {**synth_defaults(), **options}
    want["size"] = [want.pop("width"), want.pop("height")]
    for key in ("fps", "size", "max_events", "event_seconds", "val_frac", "test_frac"):
        if key in recorded and recorded[key] != want[key]:
            show = (lambda v: "x".join(map(str, v))) if key == "size" else (lambda v: f"{v:g}")
            other.append(f"{key} {show(want[key])} (these have {show(recorded[key])})")
    drawn = None if other else _drawn(manifest)
    if drawn is not None and drawn != [(v.video_id, v.caption, v.split) for v in plan(
            videos, seed, want["val_frac"], want["test_frac"], want["max_events"])]:
        # a set drawn by an older generator (before 100c9df: repeated captions, test videos also
        # in train), which no setting names: its videos are not those asked for either
        other.append("the videos this clipray draws (these were drawn by an older one)")
    print(f"[demo] using the {made.get('videos')} synthetic videos (seed {made.get('seed')}) already in {data_dir}"
          + (f"; for {' and '.join(other)} give another --data folder" if other else ""), flush=True)
    return manifest


def _drawn(manifest: Path) -> list[tuple] | None:
    """The set's (video_id, caption, split) rows in manifest order; None if unreadable."""
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(manifest, columns=["video_id", "caption", "split"])
    except (OSError, ValueError):
        return None
    return list(zip(*(t.column(c).to_pylist() for c in ("video_id", "caption", "split"))))


def _synth_metadata(manifest: Path) -> dict:
    """What `generate` recorded in the manifest (seed, fps, idle_seconds, ...); {} if unreadable."""
    from clipray.manifest import ManifestError, manifest_metadata

    try:
        return manifest_metadata(manifest)
    except (ManifestError, OSError):
        return {}


def demo_config_path() -> Path:
    import train

    return Path(train.__file__).parent / "configs" / "demo.yaml"


def as_text(path: Path) -> str:
    """A folder as an override's value that reads back as the same text: a `${` in it was taken
    for an interpolation (`--runs 'r${x}'`: "Interpolation key 'x' not found", blamed on an
    override the user never gave)."""
    return str(path).replace("${", "\\${")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # (`--data=~/x` reaches here unexpanded: the home folder, not a folder named '~' made here)
    ap.add_argument("--data", default="clipray_data/synth", type=os.path.expanduser, help="synthetic dataset folder")
    ap.add_argument("--videos", type=at_least(1, most=MAX_VIDEOS), default=240,
                    help=f"synthetic videos (generated once), up to {MAX_VIDEOS:,}")
    ap.add_argument("--runs", default="runs", type=os.path.expanduser, help="storage path for run directories")
    ap.add_argument("--no-serve", action="store_true", help="stop after training")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of train/configs/demo.yaml")
    args = ap.parse_args(argv)

    from clipray.config import ConfigError, load_config
    from train.driver import check_negatives, model_io, run, run_dir

    # the demo's videos and runs are on this machine: an embedded Ray, whatever RAY_ADDRESS says
    # (a shell on a cluster's head node has it set); `ray.address=...` joins a cluster on purpose
    overrides = ["ray.address=local", *args.overrides]
    # a bad override, or a model name or head that does not exist, fails before a minute of video making
    given = load_config(demo_config_path(), overrides)
    check_negatives(model_io(given))
    for what, where in (("--data", args.data), ("--runs", args.runs),
                        ("train.storage_path", given.train.storage_path)):
        if "://" in where:  # Path() folded s3://b/runs into a local folder ./s3:/b/runs
            raise ConfigError(f"{what}={where}: the demo keeps its videos, runs and index on this machine (a "
                              "local folder); `clipray train` reads and trains in object storage")
    if not (Path(args.data) / "synth.json").exists():
        # too few videos for one training step: said after a minute of making them
        from clipray.synth import plan

        made = synth_defaults()
        train = sum(v.split == "train" for v in plan(args.videos, 0, made["val_frac"], made["test_frac"]))
        per_step = given.data.batch_size * given.train.num_workers
        if train < per_step:
            raise ConfigError(f"--videos {args.videos} makes {train} training videos, which cannot fill one step of "
                              f"{per_step} clips (data.batch_size x train.num_workers): give more --videos")
    manifest = ensure_synth(Path(args.data), args.videos)
    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = load_config(demo_config_path(), [f"data.manifest={as_text(manifest.resolve())}",
                                           f"train.storage_path={as_text(Path(args.runs).resolve())}",
                                           f"train.run_name={name}", *overrides])
    if os.environ.get("RAY_ADDRESS", "local") != "local" and cfg.ray.address == "local":
        print(f"[demo] on an embedded local Ray, not RAY_ADDRESS={os.environ['RAY_ADDRESS']}: the demo's "
              "videos and runs are on this machine (`clipray train` joins a cluster)", flush=True)
    print(f"[demo] training {cfg.model.name} on {manifest} with {cfg.train.num_workers} Ray Train "
          f"workers (DeepSpeed ZeRO-{cfg.train.zero_stage}) ...", flush=True)
    final = run(cfg, quiet_ray=False)
    out = run_dir(cfg)
    chance = 100.0 / final["num_test_videos"]
    print(f"[demo] text->video R@1 {final['t2v_r1']:.1f}% = {final['t2v_r1'] / chance:.1f}x chance")
    if args.no_serve:
        return 0
    try:
        from serve.demo_step import serve_demo
    except ImportError:
        return 0
    serve_demo(f"{out}/export", str(manifest.resolve()), out)
    return 0
