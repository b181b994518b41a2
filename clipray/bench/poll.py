"""`clipray bench poll`: what Ray Train's checks on its workers cost a short training run.

Ray Train's controller checks its worker group every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S seconds
(Ray's default: 2), and each phase of a run waits for the next check: the worker group up, each
report, the end. The embedded Ray sets 0.5 (clipray.runtime.TRAIN_POLL_S). This trains the demo's
model (train/configs/demo.yaml) on a small synthetic set for one epoch with each interval, the
runs alternated (2, 0.5, 0.5, 2, ...) in one process on one Ray after a warm-up run, and prints
each run's wall time and the medians side by side. Key=value arguments override the training
config in every run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time
from pathlib import Path

from clipray.bench import alternated, scratch_dir
from clipray.cli import at_least

RAY_DEFAULT_S = "2"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray bench poll", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="clipray_data/synth24",
                    help="synthetic set, made if absent (default: %(default)s, of --videos videos)")
    ap.add_argument("--videos", type=at_least(1), default=24, help="videos to generate when --data is absent")
    ap.add_argument("--runs", type=at_least(1), default=4, help="timed runs per interval")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of train/configs/demo.yaml")
    args = ap.parse_args(argv)

    import train
    from clipray.config import load_config
    from clipray.demo import ensure_synth
    from clipray.runtime import TRAIN_POLL_ENV, TRAIN_POLL_S
    from train import driver

    config = Path(train.__file__).parent / "configs" / "demo.yaml"
    short = ["train.epochs=1", "data.batch_size=4", "data.video.max_frames=4", *args.overrides]
    driver.check_negatives(driver.model_io(load_config(config, short)))  # a bad override fails now
    manifest = ensure_synth(Path(args.data), args.videos).resolve()
    with scratch_dir("clipray-bench-poll-") as runs:
        order = [RAY_DEFAULT_S] + alternated(RAY_DEFAULT_S, TRAIN_POLL_S, args.runs)  # a warm-up run first
        times: dict[str, list[float]] = {RAY_DEFAULT_S: [], TRAIN_POLL_S: []}
        was = os.environ.get(TRAIN_POLL_ENV)
        try:
            for i, interval in enumerate(order):
                # read from this process's environment as each run's controller starts
                os.environ[TRAIN_POLL_ENV] = interval
                cfg = load_config(config, [*short, f"data.manifest={manifest}", f"train.storage_path={runs}",
                                           f"train.run_name=run{i}"])
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    driver.run(cfg, quiet_ray=True, table=False)
                took = time.perf_counter() - t0
                if i:  # the first run also pays the imports and Ray's start
                    times[interval].append(took)
                print(f"run {i}: {interval} s checks, {took:.1f} s{' (warm-up, not counted)' if not i else ''}",
                      flush=True)
        finally:
            if was is None:
                os.environ.pop(TRAIN_POLL_ENV, None)
            else:
                os.environ[TRAIN_POLL_ENV] = was

        print(f"\nclipray bench poll: {manifest}, one epoch of the demo's model ({' '.join(short)}), "
              f"{args.runs} runs per interval, alternated")
        print(f"{'checks every':>13}{'median s':>10}   runs")
        for interval, ts in times.items():
            print(f"{interval + ' s':>13}{statistics.median(ts):10.1f}   {', '.join(f'{t:.1f}' for t in ts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
