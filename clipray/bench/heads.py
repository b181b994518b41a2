"""`clipray bench heads`: does a temporal head read event order? meanP vs seqTransf, same run.

Trains the demo config (`train/configs/demo.yaml`, synthetic set) once per head with the same
data, seed and schedule, and prints test R@1 next to event-order accuracy: for every caption of
a two-event video whose swapped twin ("B, then A") is also in the test split, does the caption
score its own video strictly above the twin? Mean pooling is order-blind (the twins' frame sets
are nearly the same), so it sits near or below 50%; a temporal head can do better.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from clipray.bench import scratch_dir
from clipray.cli import at_least


def _heads(text: str) -> list[str]:
    """An argparse `type`: a comma list of temporal heads, each checked now, not at its turn."""
    from clipray.models import HEAD_NAMES

    heads = [h for h in text.split(",") if h]
    bad = [h for h in heads if h not in HEAD_NAMES]
    if bad or not heads:
        raise argparse.ArgumentTypeError(f"{', '.join(bad) or 'no head'}: give a comma list of "
                                         f"{', '.join(HEAD_NAMES)}")
    twice = sorted({h for h in heads if heads.count(h) > 1})
    if twice:  # each head's run is named after it: a second one resumed the first's finished run
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} named twice: give each head once")
    return heads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray bench heads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=_heads, default="meanP,seqTransf", help="comma list of temporal heads")
    # 600 videos give 168 steps: seqTransf needs about that many to separate twins (60 are too few)
    ap.add_argument("--data", default="clipray_data/synth600", help="synthetic set (made if absent)")
    ap.add_argument("--videos", type=at_least(1), default=600, help="videos to generate when --data is absent")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    args = ap.parse_args(argv)

    from clipray.config import load_config
    from clipray.demo import demo_config_path, ensure_synth
    from clipray.runtime import init_ray
    from train.driver import check_negatives, model_io, run

    for head in args.heads:  # a bad override fails now, not after minutes of video making
        check_negatives(model_io(load_config(demo_config_path(), [f"model.name=test_{head}", *args.overrides])))
    manifest = ensure_synth(Path(args.data), args.videos).resolve()
    with scratch_dir("clipray-bench-heads-") as runs:
        rows = []
        configs = [load_config(demo_config_path(), [f"data.manifest={manifest}", f"train.storage_path={runs}",
                                                    f"train.run_name={head}", f"model.name=test_{head}",
                                                    *args.overrides]) for head in args.heads]
        init_ray(configs[0].ray, quiet=True)  # now: the first head's minutes held Ray's start
        for head, cfg in zip(args.heads, configs):
            t0 = time.perf_counter()
            m = run(cfg, quiet_ray=True)
            rows.append((head, m, time.perf_counter() - t0))
        print(f"\nclipray bench heads: demo config, {rows[0][1]['num_test_videos']} test videos "
              f"(chance R@1 {100 / rows[0][1]['num_test_videos']:.1f}%), "
              f"{rows[0][1].get('order_pairs', 0)} twin captions")
        print(f"{'head':12}{'t2v R@1':>9}{'t2v R@5':>9}{'order acc %':>13}{'minutes':>9}")
        for head, m, dt in rows:
            print(f"{head:12}{m['t2v_r1']:9.1f}{m['t2v_r5']:9.1f}{m.get('order_acc', float('nan')):13.1f}"
                  f"{dt / 60:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
