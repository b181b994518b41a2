"""Synthetic video-text data: real H.264 files whose captions can be learned, order included.

Each video shows one to three events in sequence, optionally with `idle_seconds` of empty
background before, between and after them (as untrimmed video has footage no caption is about).
An event is one object (a colour and a shape) crossing the frame in one direction; its caption
names them in order, e.g.
"a red square moves left, then a blue circle moves up". Two-event videos come in twins with
the events swapped ("B, then A"), both in the same split: a model that pools frames without
order (meanP) cannot tell twins apart, a temporal head (seqTransf) can. That is what the
order benchmark measures.

Outputs under `out/`:
  videos/<video_id>.mp4   H.264, yuv420p, `fps` frames per second
  manifest.parquet        one row per video, the whole-video caption (train / val / test)
  events.parquet          one row per event: true start/end, one timestamp inside it, group =
                          video (clip editing and moment search use these); in val and test
                          one event per caption (a repeated event is drawn alike)
Everything is reproducible from the seed.
"""

from __future__ import annotations

import errno
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from clipray.manifest import PROGRESS_S, Every, fsspec_path, naming, replace_whole, write_manifest


COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235),
    "yellow": (235, 215, 40), "white": (240, 240, 240), "purple": (160, 60, 200),
}
SHAPES = ("square", "circle", "triangle", "cross")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class Event:
    colour: str
    shape: str
    direction: str

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} moves {self.direction}"


@dataclass
class SynthVideo:
    video_id: str
    events: tuple[Event, ...]
    split: str
    twin: str | None = None  # the video with the same events in the other order

    @property
    def caption(self) -> str:
        return ", then ".join(e.text for e in self.events)


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "triangle":  # apex up; width grows linearly towards the base
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        t = r / 3
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    raise ValueError(shape)


def frame_counts(fps: int, event_seconds: float, idle_seconds: float) -> tuple[int, int]:
    """Frames per event (at least one) and per idle gap: the seconds rounded to whole frames."""
    return max(1, round(event_seconds * fps)), round(idle_seconds * fps)


def event_span(k: int, fps: int, event_seconds: float, idle_seconds: float) -> tuple[float, float]:
    """Event k's [start, end) in seconds: events and idle gaps alternate, idle first. The times
    of the frames `render` writes (frame i at i / fps), so an idle gap or event that is not a
    whole number of frames does not shift the recorded times away from the video."""
    per_event, idle = frame_counts(fps, event_seconds, idle_seconds)
    start = idle + k * (per_event + idle)
    return start / fps, (start + per_event) / fps


def duration(n_events: int, fps: int, event_seconds: float, idle_seconds: float) -> float:
    """Seconds of video `render` writes for n events: its frame count / fps."""
    per_event, idle = frame_counts(fps, event_seconds, idle_seconds)
    return (n_events * per_event + (n_events + 1) * idle) / fps


def render(events: tuple[Event, ...], width: int, height: int, fps: int,
           event_seconds: float, idle_seconds: float = 0.0) -> Iterator[np.ndarray]:
    """Yield uint8 RGB frames [H, W, 3]; event k occupies `event_span(k, ...)`, the rest is
    empty background."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r = min(width, height) / 6
    per_event, idle_frames = frame_counts(fps, event_seconds, idle_seconds)
    idle = [np.full((height, width, 3), 24, np.uint8)] * idle_frames
    yield from idle
    for ev in events:
        (ux, uy), colour = DIRECTIONS[ev.direction], np.array(COLOURS[ev.colour], np.uint8)
        for i in range(per_event):
            p = (i + 0.5) / per_event  # progress 0..1 across the frame
            cx = width / 2 + ux * (p - 0.5) * (width - 2 * r)
            cy = height / 2 + uy * (p - 0.5) * (height - 2 * r)
            frame = np.full((height, width, 3), 24, np.uint8)
            frame[_shape_mask(ev.shape, xx, yy, cx, cy, r)] = colour
            yield frame
        yield from idle


def write_mp4(path: Path, frames: Iterator[np.ndarray], width: int, height: int, fps: int) -> int:
    """Encode RGB frames as H.264 (libx264 ships in the PyAV wheel). Returns the frame count."""
    import av

    n = 0
    # absolute: FFmpeg reads a relative path's first folder with a ':' in it (--out synth-12:30)
    # as a protocol, and the write failed (ProtocolNotFoundError traceback)
    with av.open(str(Path(path).absolute()), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # a keyframe every second keeps seeking cheap; one thread keeps output byte-stable
        stream.options = {"crf": "20", "preset": "veryfast", "g": str(fps), "threads": "1",
                          "x264-params": "mbtree=0"}
        for rgb in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            n += 1
        out.mux(stream.encode(None))
    return n


def plan(videos: int, seed: int, val_frac: float, test_frac: float,
         max_events: int = 2) -> list[SynthVideo]:
    """Decide every video's events and split. Each draw is a single event (40%) or a pair of
    order twins (60%, two videos), so about a quarter of the videos show a single event.

    No caption is used twice while the event space lasts: an event always renders the same
    frames, so two videos with one caption would be one file twice, and the same clip in train
    and test. There are 96 single events (6 colours x 4 shapes x 4 directions); once all are
    used, the remaining videos are twins (9,120 ordered pairs at `max_events=2`; past them, of
    more events where `max_events` allows); only a lone last video, or a set larger than the
    space, repeats a caption.
    """
    rng = np.random.default_rng(seed)
    used: set[tuple[Event, ...]] = set()  # the events of each caption drawn (one caption, one tuple)
    spent: set[int] = set()  # n such that every caption of n events is used (`left` found none)
    colours, directions = list(COLOURS), list(DIRECTIONS)
    singles = [Event(c, s, d) for c in colours for s in SHAPES for d in directions]  # the 96, listed for `left`

    def event() -> Event:
        # an index drawn as rng.choice draws one (integers(0, len)), so a seed gives the same
        # videos: choice turned the list into an array at each of the draws, about 20 us each,
        # and once the event space is used up every video costs `fresh` its thousands of tries
        return Event(colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))],
                     directions[rng.integers(len(directions))])

    def left(n: int) -> tuple[Event, ...] | None:
        """One of the captions of n events not used yet, drawn from a list of them (n <= 2: 96
        singles, 9,120 ordered pairs); None when none is left, or for n > 2 (a space of 884,640
        triples, which random draws do not run out of)."""
        if n in spent:  # (used captions stay used: no list to build again)
            return None
        if n == 1:
            free = [(e,) for e in singles if (e,) not in used]
        elif n == 2:
            free = [(a, b) for a in singles for b in singles if a != b and (a, b) not in used]
        else:
            return None
        if not free:
            spent.add(n)
            return None
        return free[rng.integers(len(free))]

    def fresh(n: int, tries: int = 200, must: bool = False) -> tuple[Event, ...] | None:
        """n events whose caption, and for twins the swapped one, is not used yet; after
        `tries` draws, one drawn from the unused ones left (random draws missed the last few:
        96 videos of single events repeated one in 31 of 200 seeds, a copy in train and test),
        and where none is left, None, or with `must` a used one."""
        if n > 1 and n in spent and not must:
            # every caption of n events is used, and stays used: the tries could only fail. They
            # cost ~30 ms a video past the 9,216 captions of up to 2 events (`--videos 100000`:
            # some 45 minutes, by 12,000 videos' 83 s, of planning before the first video was written)
            return None
        while True:
            evs = tuple(event() for _ in range(n))
            if n > 1 and evs[0] == evs[-1]:  # twins must differ when swapped
                continue
            tries -= 1
            if not {evs, evs[::-1]} & used:  # (a caption is its events': they name it word for word)
                break
            if tries < 0:
                evs = left(n) or (evs if must else None)
                if evs is None:
                    return None
                break
        used.update({evs, evs[::-1]})
        return evs

    def split() -> str:
        u = rng.random()
        return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"

    out: list[SynthVideo] = []
    while len(out) < videos:
        vid = f"synth{len(out):05d}"
        pair_fits = max_events >= 2 and videos - len(out) >= 2  # max_events=1: single events only
        single = None if pair_fits and rng.random() < 0.6 else fresh(1)
        if single is None and pair_fits:
            n = int(rng.integers(2, max_events + 1))
            evs = fresh(n, tries=2_000)
            if evs is None and max_events > 2:
                # the 9,120 pairs run out long before the triples: a used pair was taken (794
                # repeated captions in 20,000 videos of up to 3 events, 370 of them across splits)
                evs = fresh(int(rng.integers(3, max_events + 1)), tries=2_000)
            evs = evs or fresh(n, 0, must=True)
            twin_id, s = f"synth{len(out) + 1:05d}", split()
            out.append(SynthVideo(vid, evs, s, twin_id))
            out.append(SynthVideo(twin_id, evs[::-1], s, vid))
        else:
            out.append(SynthVideo(vid, single or fresh(1, 0, must=True), split()))
    return out


def generate(out: str | Path, videos: int = 200, seed: int = 0, width: int = 96, height: int = 72,
             fps: int = 8, event_seconds: float = 2.0, val_frac: float = 0.1,
             test_frac: float = 0.2, max_events: int = 2, idle_seconds: float = 0.0,
             progress: bool = False) -> dict:
    """Write the videos and both manifests; returns a summary dict (also saved as synth.json)."""
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    # synth.json marks a finished set (`clipray demo` reuses one): a run that stops midway, over
    # an older set, must not leave the old marker and manifests over some of the new videos
    # (the manifests read as whole: `clipray train` on one took its captions for other videos)
    for name in ("synth.json", "manifest.parquet", "events.parquet"):
        if not (out / name).is_dir():  # (a folder there is the manifest writer's to refuse)
            (out / name).unlink(missing_ok=True)
    rng = np.random.default_rng(seed + 1)
    rows, event_rows = [], []
    # an event's caption names a colour, shape and direction (96 of them), and an event drawn
    # again is drawn alike: a twin's events are its partner's, in the same split. A val or test
    # event whose caption the split holds already is left out of events.parquet: as queries,
    # copies of one caption on near-identical clips capped R@1 at ~50% (78 test events of 240
    # videos held 39 captions), and the teacher is chosen on val
    held: dict[str, set[str]] = {"val": set(), "test": set()}
    specs = plan(videos, seed, val_frac, test_frac, max_events)
    # a folder where a file goes: PyAV's IsADirectoryError traceback at that video, or the
    # manifest writer's refusal after every video was written; said before any is
    for name in [f"videos/{v.video_id}.mp4" for v in specs] + ["manifest.parquet", "events.parquet"]:
        if (out / name).exists() and not (out / name).is_file():
            raise IsADirectoryError(errno.EISDIR, "a folder is where the set writes a file: move it, "
                                    "or write the set elsewhere", str(out / name))
    # an earlier, bigger set's videos past this one's: no manifest names them, and the folder,
    # copied whole to object storage as README says, took them along (only ours: synth<n>.mp4)
    ours = {f"{v.video_id}.mp4" for v in specs}
    for old in (out / "videos").glob("synth*.mp4"):
        if old.name not in ours and old.name[5:-4].isdigit() and old.is_file():
            old.unlink()
    every, t0 = Every(PROGRESS_S if progress else None), time.perf_counter()
    for k, v in enumerate(specs):
        rel = f"videos/{v.video_id}.mp4"
        write_mp4(out / rel, render(v.events, width, height, fps, event_seconds, idle_seconds), width, height, fps)
        seconds = duration(len(v.events), fps, event_seconds, idle_seconds)
        rows.append(dict(video_id=v.video_id, path=rel, start=None, end=None, caption=v.caption,
                         split=v.split, duration=seconds))
        for i, ev in enumerate(v.events):
            s, e = event_span(i, fps, event_seconds, idle_seconds)
            ts = float(np.round(rng.uniform(s + 0.2 * (e - s), e - 0.2 * (e - s)), 3))
            if ev.text in held.get(v.split, ()):
                continue
            held.get(v.split, set()).add(ev.text)
            event_rows.append(dict(video_id=v.video_id, path=rel, start=s, end=e, caption=ev.text,
                                   split=v.split, timestamp=ts, duration=seconds))
        # by time, not every 50 videos: that was a line a second in a log at 96x72, and none
        # for minutes at 1280x720 with idle seconds
        if every():
            rate = (k + 1) / (time.perf_counter() - t0)
            print(f"  synth: {k + 1}/{len(specs)} videos, {rate:.1f} videos/s, "
                  f"ETA {(len(specs) - k - 1) / rate:.0f}s", flush=True)
    meta = {"source": "synthetic", "seed": seed, "fps": fps, "size": [width, height],
            "event_seconds": event_seconds, "idle_seconds": idle_seconds, "max_events": max_events,
            "val_frac": val_frac, "test_frac": test_frac}
    write_manifest(rows, out / "manifest.parquet", metadata=meta)
    write_manifest(event_rows, out / "events.parquet", metadata={**meta, "timestamp_rule": "uniform"})
    twins = {v.video_id: v.twin for v in specs if v.twin}
    summary = {"videos": len(specs), "events": len(event_rows), "seed": seed,
               "splits": {s: sum(v.split == s for v in specs) for s in ("train", "val", "test")},
               "twins": twins, "manifest": str(out / "manifest.parquet"),
               "events_manifest": str(out / "events.parquet")}
    # written whole or not at all (the marker `clipray demo` trusts): in place, a full disk midway
    # left it cut, and every later demo failed on its JSONDecodeError traceback
    fs, marker = fsspec_path(str((out / "synth.json").absolute()))
    with naming(out / "synth.json"):
        replace_whole(fs, marker, True, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    return summary
