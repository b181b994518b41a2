"""`clipray bench edit`: do edited clips train a better model than clips from timestamps alone?

Three arms on the synthetic events (`events.parquet`: each event's true start/end and one
timestamp inside it), with the same model, data, seed and number of epochs, each evaluated on
the test split's ground-truth clips:
  timestamps    the stage-1 clips built from the timestamps, never edited: the baseline
  edited        clip editing (`clipray edit`): warm-up, then the teacher's edits every round
  ground truth  the annotated start/end: the upper bound
It prints each arm's training clips (mean tIoU with ground truth and mean width; for `edited`,
after the last round) beside test R@1 / R@5 / R@10 / median rank. `--idle-seconds` puts empty
background before, between and after the events (clips built from timestamps then take some in,
as in untrimmed video). Key=value arguments override `train/configs/edit_demo.yaml` in all three
arms (e.g. edit.margin=0.02, or edit.init=window edit.window_s=1).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clipray.bench import scratch_dir
from clipray.cli import at_least


def _gain(r: dict) -> str:
    return "-" if r.get("median_gain") is None else f"{r['median_gain']:.4f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray bench edit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="synthetic set, made if absent (default: clipray_data/synth-idle<S>, "
                    "or the demo's clipray_data/synth with --idle-seconds 0)")
    ap.add_argument("--videos", type=at_least(1), default=240, help="videos to generate when --data is absent")
    ap.add_argument("--idle-seconds", type=at_least(0, float, most=3600), default=1.0,
                    help="empty background around events, when the set is generated (0: back to back; "
                    "up to 3600, as data synth)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of train/configs/edit_demo.yaml")
    args = ap.parse_args(argv)

    import numpy as np

    import train
    from clipray.config import load_config
    from clipray.manifest import read_manifest
    from clipray.demo import ensure_synth
    from clipray.runtime import init_ray
    from train import driver, edit

    config = Path(train.__file__).parent / "configs" / "edit_demo.yaml"
    # a bad override fails now, not after minutes of video making
    driver.check_negatives(driver.model_io(load_config(config, args.overrides)))
    data = args.data or ("clipray_data/synth" + (f"-idle{args.idle_seconds:g}" if args.idle_seconds else ""))
    events = ensure_synth(Path(data), args.videos, idle_seconds=args.idle_seconds).resolve().parent / "events.parquet"
    with scratch_dir("clipray-bench-edit-") as runs:
        common = [f"data.manifest={events}", f"train.storage_path={runs}", *args.overrides]
        rows = []

        cfg = load_config(config, [*common, "train.run_name=edited"])
        init_ray(cfg.ray, quiet=True)  # now: the edited arm's minutes held Ray's start
        t0 = time.perf_counter()
        result = edit.run(cfg, quiet_ray=True)
        rounds = result["rounds"]
        rows.append(("edited", rounds[-1]["train_tiou"], rounds[-1]["mean_width_s"], result["test"],
                     time.perf_counter() - t0))

        e = cfg.edit
        epochs = e.warmup_epochs + e.rounds * e.epochs_per_round
        fixed = [f"train.epochs={epochs}", f"train.eval_every_epochs={epochs}", f"data.eval_split={e.test_split}",
                 f"data.eval_manifest={events}", f"data.video_root={events.parent}"]
        # the edited run's round 0 trained on the stage-1 clips: the baseline trains on them throughout
        truth = read_manifest(str(events), columns=["start", "end"], split="train")
        truth_width = float(np.mean(np.subtract(truth.column("end"), truth.column("start"))))
        for name, manifest, tiou, width in (
                ("timestamps", rounds[0]["manifest"], rounds[0]["train_tiou"], rounds[0]["mean_width_s"]),
                ("ground truth", str(events), 1.0, truth_width)):
            t0 = time.perf_counter()
            m = driver.run(load_config(config, [*common, *fixed, f"data.manifest={manifest}",
                                                f"train.run_name={name.replace(' ', '-')}"]), quiet_ray=True, table=False)
            rows.insert(0 if name == "timestamps" else len(rows), (name, tiou, width, m, time.perf_counter() - t0))

        n = rows[0][3]["num_test_videos"]
        print(f"\nclipray bench edit: {events}, {epochs} epochs per arm (edited: {e.warmup_epochs} warm-up + "
              f"{e.rounds} rounds x {e.epochs_per_round}, margin {e.margin:g}), {n} test clips "
              f"(chance R@1 {100 / n:.1f}%)")
        print(f"{'arm':14}{'train tIoU':>11}{'width s':>9}{'t2v R@1':>9}{'R@5':>7}{'R@10':>7}{'MdR':>6}{'minutes':>9}")
        for name, tiou, width, m, dt in rows:
            print(f"{name:14}{tiou:11.3f}{width:9.2f}{m['t2v_r1']:9.1f}{m['t2v_r5']:7.1f}{m['t2v_r10']:7.1f}"
                  f"{m['t2v_mdr']:6.1f}{dt / 60:9.1f}")
        print("edited, by round: " + "; ".join(
            f"{r['round']}: {r['edited']} edited (median gain {_gain(r)}), tIoU {r['train_tiou']:.3f}, "
            f"width {r['mean_width_s']:.2f}s, val R@1 {r['val_r1']:.1f}" for r in rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
