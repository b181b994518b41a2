"""`clipray bench stream`: a million-row manifest streams through Ray Data in flat memory.

What it does, on an embedded local Ray:
  1. writes a synthetic manifest of `--rows` rows (default 1,000,000) as Parquet shards with
     `ManifestWriter`, streaming: rows are generated one at a time and written a row group at
     a time. The rows reuse a few tiny synthetic H.264 videos under many video ids, so the
     manifest is HowTo100M-sized while the disk holds a few KB of video;
  2. streams the whole manifest through the reader's stages, `read_parquet -> filter(split) ->
     select -> map_batches(tokenise, CPU actor pool)`, and consumes it on the driver, checking
     every row arrives exactly once;
  3. streams the first `--decode-rows` rows through the real pipeline
     (`clipray.pipeline.clip_dataset`: decode + sample + crop + tokenise) at 2 frames of 32 px,
     on `--actors` decode tasks (`data.decode_pool`'s default).
While each phase runs, a thread samples once a second the memory of the driver plus every Ray
process (GCS, raylet, workers: the driver's process tree) and the table prints peak and mean and
the values at 10 %, 50 % and 100 % of the rows: flat means the stream never accumulates.

Why decoding is not run over all 1M rows: the pipeline decodes a tiny clip in ~15 ms of one
core (open file, seek, decode, resize, through the timeout thread), so 1M clips would take about
2 hours on 2 cores. Phase 2 exercises everything whose cost grows with the manifest (Parquet
reading, block scheduling, backpressure, the driver's consumption) at full size in minutes;
phase 3 shows the decode path keeps the same flat profile.

Memory is reported two ways: PSS (proportional set size: shared pages such as Ray's object
store divided among the processes mapping them, so the sum is the true total) and the plain
RSS sum (counts shared object-store pages once per process that touched them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from clipray.cli import at_least
from clipray.runtime import usable_cores
from clipray.config import DataConfig, RayConfig, VideoConfig

GIB = 1024 ** 3  # memory is printed in GiB (it was labelled GB)


# ---------------------------------------------------------------- the manifest

def caption(i: int) -> str:
    """Two synthetic events picked from row i: 9,216 distinct captions over a 20-word vocabulary.

    The vocabulary is kept closed on purpose: open_clip's tokenizer caches every distinct word
    it has seen, forever, so captions carrying a row number would grow each actor by one cache
    entry per row and measure the tokenizer's cache instead of the stream.
    """
    events = _events()
    return f"{events[i % len(events)]}, then {events[(i // len(events)) % len(events)]}"


@functools.lru_cache(maxsize=1)
def _events() -> tuple[str, ...]:
    from clipray.synth import COLOURS, DIRECTIONS, SHAPES

    return tuple(f"a {c} {s} moves {d}" for c in COLOURS for s in SHAPES for d in DIRECTIONS)


def synthetic_rows(rows: int, videos: list[str]) -> Iterator[dict[str, Any]]:
    """`rows` manifest rows cycling over a few real video files, each row a distinct video id."""
    for i in range(rows):
        yield {"video_id": f"bench{i:08d}", "path": videos[i % len(videos)], "caption": caption(i),
               "split": "train"}


def write_big_manifest(out: Path, rows: int, shard_rows: int, videos: list[str]) -> tuple[str, int]:
    """Stream `rows` rows into `out/part-NNNNN.parquet`; returns (manifest dir, shards)."""
    from clipray.manifest import ManifestWriter

    with ManifestWriter(out, rows_per_shard=shard_rows, metadata={"source": "bench-stream"}) as w:
        w.extend(synthetic_rows(rows, videos))
    return str(out), len(w.shards)


# ---------------------------------------------------------------- memory sampling

def ray_tree_memory(by_process: dict[str, float] | None = None) -> tuple[float, float]:
    """(PSS, RSS) in bytes summed over this process and all its descendants (the local Ray).

    If `by_process` is given, it is filled with PSS per process name (Ray names its worker
    processes after what they run, e.g. `ray::MapWorker(MapBatches(Tokenise))`).
    """
    import psutil

    me = psutil.Process()
    pss = rss = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            info = p.memory_full_info()  # reads smaps_rollup on Linux: has pss
            name = "driver" if p.pid == me.pid else _role(p.name())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a worker exiting between listing and reading
        pss += getattr(info, "pss", info.rss)
        rss += info.rss
        if by_process is not None:
            by_process[name] = by_process.get(name, 0.0) + getattr(info, "pss", info.rss)
    return pss, rss


def peak_rss() -> float:
    """Bytes: the most this process has held resident since it started (getrusage's ru_maxrss,
    KiB on Linux, bytes on macOS). The resident set now (psutil's rss) is not the peak: what
    writing the manifest held and gave back was missing from a line labelled "peak"."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)


def _wait_gone(part: str, timeout_s: float = 60.0) -> None:
    """Wait until no process of the local Ray is named with `part` (an actor pool's workers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        held: dict[str, float] = {}
        ray_tree_memory(held)
        if not any(part in name for name in held):
            return
        time.sleep(0.5)


def _role(name: str) -> str:
    """A process's role: a pooled Ray worker renames itself after each task it runs (and
    `ray::IDLE` between tasks), so those are one group; actors and system processes keep names."""
    if name.startswith("ray::") and not name.startswith(("ray::MapWorker", "ray::_StatsActor")):
        return "ray task workers"
    # an actor's title carries the method it is running: `ray::MapWorker(...).submit`
    return re.sub(r"^(ray::_StatsActor)\..*$", r"\1", re.sub(r"\)\.\w+$", ")", name))


@dataclass
class Sampler:
    """Samples `ray_tree_memory()` every `period` seconds with the consumer's progress."""

    period: float = 1.0
    done: int = 0  # rows consumed so far; the consumer updates it
    samples: list[tuple[float, int, float, float]] = field(default_factory=list)  # t, rows, pss, rss
    breakdown: list[dict[str, float]] = field(default_factory=list)  # PSS per process name, per sample

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="clipray-mem")

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            procs: dict[str, float] = {}
            self.samples.append((time.perf_counter() - t0, self.done, *ray_tree_memory(procs)))
            self.breakdown.append(procs)
            self._stop.wait(self.period)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((self.samples[-1][0] if self.samples else 0.0, self.done, *ray_tree_memory()))

    def _index(self, frac: float, total: int) -> int:
        for i, (_, rows, _, _) in enumerate(self.samples):
            if rows >= frac * total:
                return i
        return len(self.samples) - 1

    def at_fraction(self, frac: float, total: int) -> tuple[float, float]:
        """(PSS, RSS) at the first sample where `frac` of `total` rows had been consumed."""
        return self.samples[self._index(frac, total)][2:]

    def growth(self, total: int, a: float = 0.1, b: float = 1.0) -> list[tuple[str, float]]:
        """PSS change per process name between the samples at fractions a and b, largest first."""
        ia, ib = self._index(a, total), min(self._index(b, total), len(self.breakdown) - 1)
        before, after = self.breakdown[min(ia, len(self.breakdown) - 1)], self.breakdown[ib]
        names = set(before) | set(after)
        return sorted(((n, after.get(n, 0.0) - before.get(n, 0.0)) for n in names), key=lambda x: -abs(x[1]))


# ---------------------------------------------------------------- the streams

class Tokenise:
    """`map_batches` callable: the tokenise half of `ClipDecoder` (same tokenizer, same output)."""

    def __init__(self, data: DataConfig):
        import open_clip

        self.tokenize = open_clip.get_tokenizer(data.tokenizer, context_length=data.max_words)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = self.tokenize([str(c) for c in batch["caption"]]).numpy().astype(np.int64)
        return {"tokens": tokens, "row_id": np.asarray(batch["row_id"], dtype=np.int64)}


def read_tokenise_dataset(data: DataConfig, batch: int) -> Any:
    """The reader's stages of `clip_dataset` with tokenising in place of decoding."""
    import dataclasses

    import ray.data

    from clipray.pipeline import manifest_rows

    # as in clip_dataset: small blocks, so work and output flow block by block instead of one
    # Parquet row group (a whole shard) per task
    rows = manifest_rows(dataclasses.replace(data, decode_batch=batch))
    return rows.map_batches(Tokenise, fn_constructor_args=(data,), batch_size=batch,
                            compute=ray.data.ActorPoolStrategy(size=data.decode_actors),
                            num_cpus=data.decode_cpus, batch_format="numpy")


@dataclass
class Run:
    rows: int
    startup_s: float  # plan -> first batch: actor start-up (torch, tokenizer) and the first read
    steady_s: float  # first batch -> last batch
    steady_rows: int  # rows after the first batch

    @property
    def rows_per_s(self) -> float:
        # no rows after the first batch (it held them all): no rate, not "0 rows/s"
        return self.steady_rows / self.steady_s if self.steady_s > 0 and self.steady_rows else float("nan")


def consume(ds: Any, total: int, sampler: Sampler, batch: int) -> Run:
    """Iterate the stream on the driver, checking every row comes at most once."""
    seen = np.zeros(total, dtype=bool)  # 1 byte per row, allocated up front: no growth while streaming
    t0 = time.perf_counter()
    first: tuple[float, int] | None = None
    for b in ds.iter_batches(batch_size=batch, batch_format="numpy"):
        ids = b["row_id"]
        if seen[ids].any():
            raise RuntimeError("a row arrived twice")
        seen[ids] = True
        sampler.done += len(ids)
        if first is None:
            first = (time.perf_counter(), sampler.done)
    end = time.perf_counter()
    first = first or (end, 0)
    rows = int(seen.sum())
    return Run(rows, first[0] - t0, end - first[0], rows - first[1])


# ---------------------------------------------------------------- report

def _gb(x: float) -> str:
    return f"{x / GIB:6.2f}"


def report(name: str, run: Run, sampler: Sampler, base: tuple[float, float]) -> dict:
    rows = run.rows
    pss = np.array([s[2] for s in sampler.samples])
    rss = np.array([s[3] for s in sampler.samples])
    flowing = [s for s in sampler.samples if s[1] > 0]  # mean over the streaming part, not start-up
    mean_pss = float(np.mean([s[2] for s in flowing])) if flowing else float("nan")
    mean_rss = float(np.mean([s[3] for s in flowing])) if flowing else float("nan")
    points = {f"at {int(f * 100)}% of rows": sampler.at_fraction(f, rows) for f in (0.1, 0.5, 1.0)}
    rate = "no rate: the first batch held every row" if np.isnan(run.rows_per_s) else f"{run.rows_per_s:,.0f} rows/s"
    print(f"\n{name}: {rows:,} rows; start-up {run.startup_s:.1f} s, then {run.steady_s:.1f} s "
          f"at {rate} ({len(pss)} memory samples, 1/s)")
    print(f"  {'memory, driver + all Ray processes':36} {'PSS GiB':>7} {'RSS GiB':>7}")
    print(f"  {'baseline (Ray idle, before the run)':36} {_gb(base[0]):>7} {_gb(base[1]):>7}")
    for label, (p, r) in points.items():
        print(f"  {label:36} {_gb(p):>7} {_gb(r):>7}")
    at_peak = sampler.samples[int(pss.argmax())][1]
    print(f"  {f'peak (reached at {at_peak:,} rows)':36} {_gb(pss.max()):>7} {_gb(rss.max()):>7}")
    print(f"  {'mean while rows flow':36} {_gb(mean_pss):>7} {_gb(mean_rss):>7}")
    p10, p100 = points["at 10% of rows"][0], points["at 100% of rows"][0]
    print(f"  PSS change from 10% to 100% of rows: {(p100 - p10) / GIB:+.2f} GiB; largest by process: "
          + ", ".join(f"{n} {d / GIB:+.2f}" for n, d in sampler.growth(rows)[:3]))
    return {"rows": rows, "startup_s": run.startup_s, "rows_per_s": run.rows_per_s, "peak_pss": float(pss.max()),
            "mean_pss": mean_pss, "pss_10": p10, "pss_50": points["at 50% of rows"][0],
            "pss_100": p100, "baseline_pss": base[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray bench stream", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=at_least(1), default=1_000_000, help="manifest rows (read + tokenise)")
    ap.add_argument("--shard-rows", type=at_least(1), default=100_000, help="rows per Parquet shard")
    ap.add_argument("--videos", type=at_least(1), default=4, help="distinct tiny videos the rows reuse")
    ap.add_argument("--decode-rows", type=at_least(0), default=4000,
                    help="rows also decoded through clip_dataset (2 frames, 32 px); 0 skips")
    ap.add_argument("--actors", type=at_least(1), default=2, help="tokenise actors (phase 2); decoders (phase 3: decode tasks, data.decode_pool's default)")
    ap.add_argument("--batch", type=at_least(1), default=1024, help="rows per tokenise call and per driver batch")
    ap.add_argument("--workdir", default=None, help="where to write the manifest (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep what the bench wrote in the workdir")
    args = ap.parse_args(argv)
    if os.environ.get("RAY_ADDRESS", "local") not in ("", "local"):  # local: the embedded Ray (clipray.runtime)
        ap.error("this benchmark measures an embedded local Ray: unset RAY_ADDRESS")

    from clipray.manifest import read_manifest
    from clipray.pipeline import clip_dataset, collect_skips
    from clipray.runtime import check_fits, init_ray, quiet_data_progress
    from clipray.synth import generate

    # a folder the bench makes is removed whole; in one that was there, only what it writes
    own = args.workdir is None or not Path(args.workdir).exists()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipray-bench-stream-"))
    try:
        synth = generate(work / "synth", videos=args.videos, seed=0, width=32, height=32, fps=4,
                         event_seconds=1.0, max_events=1)
        videos = [str(work / "synth" / r["path"]) for r in read_manifest(synth["manifest"]).to_pylist()]

        t0 = time.perf_counter()
        manifest, shards = write_big_manifest(work / "manifest", args.rows, args.shard_rows, videos)
        write_s = time.perf_counter() - t0
        print(f"clipray bench stream: {args.rows:,} manifest rows over {len(videos)} tiny videos, "
              f"{usable_cores()} cores, {args.actors} actors")
        print(f"manifest: {shards} Parquet shards written streaming in {write_s:.1f} s "
              f"({args.rows / write_s:,.0f} rows/s); driver peak RSS so far "
              f"{peak_rss() / GIB:.2f} GiB")

        init_ray(RayConfig(), quiet=True)
        # actors holding every CPU would starve the read tasks: the stream would wait forever
        check_fits({"--actors (1 CPU each)": float(args.actors)}, advice="lower --actors")
        quiet_data_progress()
        data = DataConfig(manifest=manifest, split="train", max_words=32, decode_actors=args.actors,
                          decode_cpus=1.0, decode_batch=args.batch,
                          video=VideoConfig(fps=2.0, max_frames=2, size=32, timeout_s=30.0))
        time.sleep(2.0)  # let Ray's start-up settle before the baseline
        base = ray_tree_memory()
        with Sampler() as s:
            run = consume(read_tokenise_dataset(data, args.batch), args.rows, s, args.batch)
        if run.rows != args.rows:
            raise RuntimeError(f"{run.rows} of {args.rows} rows arrived")
        report("phase 2, read + tokenise (every row, exactly once)", run, s, base)

        if args.decode_rows:
            n = min(args.decode_rows, args.rows)
            dec = dataclasses.replace(data, decode_batch=8)
            # phase 2's tokenise actors outlive its stream for a few seconds (0.7 GiB here): a
            # baseline taken with them alive was phase 2's end, not Ray idle
            _wait_gone("Tokenise")
            base = ray_tree_memory()
            with Sampler() as s:
                ds = clip_dataset(dec, str(work / "run"), limit=n)
                run = consume(ds, args.rows, s, 64)
            skipped = collect_skips(str(work / "run"))["skipped"]
            if run.rows != n or skipped:
                raise RuntimeError(f"decode phase: {run.rows} of {n} clips, {skipped} skipped")
            report("phase 3, clip_dataset decode (2 frames, 32 px)", run, s, base)
    finally:
        if not args.keep:
            for path in [work] if own else [work / "synth", work / "manifest", work / "run"]:
                shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
