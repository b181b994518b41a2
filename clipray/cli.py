"""The `clipray` command: one entry point for data, training, indexing, serving and benchmarks.

Each subcommand is a thin shim over a `main(argv)` function that tests call directly:
  clipray demo                         the whole system on an embedded local Ray (CPU, tiny model)
  clipray data synth|prepare|check     build and inspect clip manifests
  clipray train CONFIG [k=v ...]       = python -m train CONFIG [k=v ...]
  clipray edit CONFIG [k=v ...]        clip-boundary editing from single timestamps (= python -m train.edit)
  clipray index CONFIG [k=v ...]       offline embedding index of a manifest
  clipray serve CONFIG [k=v ...]       the retrieval API on Ray Serve
  clipray bench data|model|train|serve|stream|heads|edit|startup|shuffle|poll|prepare   benchmarks beside a baseline
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from typing import Callable

# subcommand -> "module:function" taking argv; imported lazily so `clipray --help` is instant
PASSTHROUGH = {
    "train": "train.__main__:main",
    "edit": "train.edit:main",
    "index": "serve.index:main",
    "serve": "serve.__main__:main",
    "demo": "clipray.demo:main",
}

BENCHES = {
    "data": "clipray.bench.data:main",
    "model": "clipray.bench.model:main",
    "train": "clipray.bench.train:main",
    "serve": "clipray.bench.serve:main",
    "stream": "clipray.bench.stream:main",
    "heads": "clipray.bench.heads:main",
    "edit": "clipray.bench.edit:main",
    "startup": "clipray.bench.startup:main",
    "shuffle": "clipray.bench.shuffle:main",
    "poll": "clipray.bench.poll:main",
    "prepare": "clipray.bench.prepare:main",
}


# `clipray data synth` and `clipray demo` plan every video in memory, without a line, before the
# first is written (100,000 in ~30 s): a count past this one ran on, silent, until stopped
MAX_VIDEOS = 100_000


def at_least(lo: float, cast: Callable[[str], float] = int, most: float = math.inf) -> Callable[[str], float]:
    """An argparse `type`: a finite number >= lo (and <= `most`), so a zero or negative count
    (or nan or inf, which pass a `< lo` test) is a usage error at once rather than an empty
    output or a ZeroDivisionError minutes in."""
    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            try:  # `--fps 7.5` was "not a number"
                float(text)
                what = "a whole number" if cast is int else "a number"
            except ValueError:
                what = "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be {lo} or more, got {text}")
        if value > most:
            raise argparse.ArgumentTypeError(f"must be {most:g} or less, got {text}")
        return value
    return parse


def _load(target: str) -> Callable[[list[str]], int]:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def data_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="clipray data", description="Build and inspect clip manifests.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write the synthetic H.264 video-text dataset and its manifests")
    # (each path: `--out=~/x`, `~` quoted or in a script's variable, reaches here unexpanded; it is the
    # home folder, as clipray train and serve read their paths, not a folder named '~' made here)
    s.add_argument("--out", required=True, type=os.path.expanduser, help="output directory")
    s.add_argument("--videos", type=at_least(1, most=MAX_VIDEOS), default=200,
                   help=f"videos to make, up to {MAX_VIDEOS:,} (default 200; the demo's 240)")
    s.add_argument("--seed", type=at_least(0), default=0, help="0 or more (numpy's seeds are); default 0")
    # past these a frame count overflowed or filled memory (tracebacks), or ran on for hours
    s.add_argument("--fps", type=at_least(1, most=240), default=8, help="1 to 240; default 8")
    s.add_argument("--width", type=at_least(16), default=96, help="even (H.264 in yuv420p); default 96")
    s.add_argument("--height", type=at_least(16), default=72, help="even; default 72")
    # 2 s an event: 1e9 built half a billion events in memory before the first video
    s.add_argument("--max-events", type=at_least(1, most=16), default=2, help="1 to 16; default 2")
    s.add_argument("--idle-seconds", type=at_least(0, float, most=3600), default=0.0,
                   help="empty background before, between and after events (untrimmed-video-like), "
                        "up to 3600; default 0")
    p = sub.add_parser("prepare", help="turn a public release (or your own CSV/JSONL) into a manifest")
    p.add_argument("name", help="source name (msrvtt, msvd, lsmdc, activitynet, didemo, youcook2, "
                                "howto100m, generic)")
    p.add_argument("--root", required=True, type=os.path.expanduser,
                   help="folder holding the release's files and videos")
    p.add_argument("--out", required=True, type=os.path.expanduser,
                   help="manifest: a .parquet file or a directory of shards")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="adapter option, repeatable (e.g. -o view=paragraph)")
    c = sub.add_parser("check", help="validate every row of a manifest (streamed) and print its summary")
    c.add_argument("manifest", type=os.path.expanduser)
    args = ap.parse_args(argv)

    if args.cmd == "synth":
        from clipray.synth import generate

        if args.width % 2 or args.height % 2:
            s.error(f"--width and --height must be even for H.264 (yuv420p), got {args.width}x{args.height}")
        if max(args.width, args.height) > 16384:  # else libx264 refuses to open, as a traceback
            s.error(f"--width and --height must be 16384 or less for libx264, got {args.width}x{args.height}")
        if (args.width + 128) * (args.height + 128) >= (2**31 - 1) // 8:  # FFmpeg's frame check
            # 16384x16384 drew its frames (8.5 GB), then failed in PyAV with a traceback
            s.error(f"--width x --height {args.width}x{args.height} is past FFmpeg's largest frame: "
                    "(width + 128) x (height + 128) must stay below 268,435,455")
        if "://" in args.out:  # Path() made s3://b/x a local folder ./s3:/b/x, and said it was written
            s.error(f"--out {args.out}: the synthetic set is written to a local folder (its videos are encoded "
                    "there); copy the whole folder to object storage after: its manifests name the videos "
                    "relative to themselves, so they read there as here")

        made = generate(args.out, videos=args.videos, seed=args.seed, fps=args.fps, width=args.width,
                        height=args.height, max_events=args.max_events, idle_seconds=args.idle_seconds,
                        progress=True)
        print(f"wrote {made['videos']} videos ({made['splits']}) and {made['events']} events")
        print(f"manifest:        {made['manifest']}\nevents manifest: {made['events_manifest']}")
        return 0
    if args.cmd == "prepare":
        from clipray.manifest import PROGRESS_S
        from clipray.sources import prepare

        opts = {}
        for o in args.option:
            if "=" not in o:
                ap.error(f"--option takes KEY=VALUE, got {o!r}")
            k, v = o.split("=", 1)
            opts[k] = v  # text: each source types its options by their defaults
        report = prepare(args.name, args.root, args.out, progress_s=PROGRESS_S, **opts)
        print(report)
        return 0 if report.rows else 1  # no rows: nothing written (the report says why)
    from clipray.manifest import PROGRESS_S, check_manifest, manifest_metadata

    print(f"{args.manifest}: valid; {check_manifest(args.manifest, progress_s=PROGRESS_S)}")
    meta = manifest_metadata(args.manifest)
    if meta:
        print(f"metadata: {meta}")
    return 0


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(f"usage: clipray bench {{{','.join(BENCHES)}}} [options]; each takes --help",
              file=sys.stdout if asked else sys.stderr)
        if argv and not asked:
            print(f"clipray bench: error: unknown benchmark {argv[0]!r}", file=sys.stderr)
        return 0 if asked else 2
    return _load(BENCHES[argv[0]])(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"data": data_main, "bench": bench_main,
                **{k: (lambda a, t=t: _load(t)(a)) for k, t in PASSTHROUGH.items()}}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):  # `clipray trian`: say what was wrong, as bench does
            print(f"clipray: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    for stream in sys.stdout, sys.stderr:  # a latin-1 locale: a Chinese file name prints as \u89c6, not a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    from clipray.config import ConfigError, RunFailed
    from clipray.manifest import ManifestError
    from clipray.sources import SourceError

    try:
        return int(commands[argv[0]](argv[1:]) or 0)
    except (ConfigError, ManifestError, SourceError, FileNotFoundError) as e:
        print(f"clipray {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    # a worker's error: its last line (the workers' tracebacks are Ray's to log); `clipray serve`'s
    # health check: no traceback for a wait that ran out
    except (RunFailed, TimeoutError) as e:
        print(f"clipray {argv[0]}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: a line (after the command's own, e.g. train's resume hint), not a traceback
        print(f"\nclipray {argv[0]}: interrupted", file=sys.stderr)
        return 130  # as a process killed by SIGINT
    except BrokenPipeError:  # `clipray data check M | head -1`: the reader has gone, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush is quiet
        return 141  # as a process killed by SIGPIPE
    except OSError as e:  # a path that cannot be read or written (not a folder, no permission)
        if e.filename is None:
            raise
        print(f"clipray {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
