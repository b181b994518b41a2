"""Clip-boundary editing from single timestamps: the pure parts (specs/clip_editing.md).

Each training caption of a video has one timestamp t_i inside the event it describes. This
module turns timestamps into clips and decides edits; the Ray jobs around it live in
`train/edit.py`.

- `initial_clips`: stage 1. `midpoint` spans from the midpoint with the previous timestamp to
  the midpoint with the next one (0 and the video's end at the ends); `window` is a fixed width
  centred on t_i, clipped to the video. `max_width_s` (both rules) shrinks a clip towards t_i.
- `candidates`: the clips a teacher scores around the current one: start and end each moved by
  -K..K steps, never before the previous timestamp or after the next one (nor past the video's
  ends), these bounds taken to the millisecond as clips are; always containing t_i, never
  shorter than `min_width_s`. The current clip comes first. A boundary already past a
  neighbouring timestamp (a `window` clip wider than the gap) moves from that timestamp.
- `choose`: the best-scoring candidate replaces the current clip only when it beats it by more
  than `margin` (in the head's own score units: cosine for loose heads, a logit for tightTransf).
- `tiou`: temporal IoU, to compare edited clips with ground truth where the manifest has it.

Times are rounded to milliseconds so moves by a step never drift by float error (an initial
clip's ends never round past its timestamp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

INIT_RULES = ("midpoint", "window")


def _ms(x: float) -> float:
    return round(x, 3)


def _ms_up(x: float) -> float:
    """x up to the millisecond: the width a clip on the millisecond grid needs to reach x."""
    return math.ceil(x * 1000 - 1e-6) / 1000


def _ms_down(x: float) -> float:
    return math.floor(x * 1000 + 1e-6) / 1000


@dataclass(frozen=True)
class Bounds:
    """What a caption's clip may span: from the previous timestamp (or 0) to the next (or the
    video's end); `t` is the caption's own timestamp."""
    lo: float
    t: float
    hi: float


def neighbour_bounds(timestamps: Sequence[float], duration: float) -> list[Bounds]:
    """Bounds of each timestamp among one video's timestamps (given in any order; the result is
    in the same order). Equal timestamps bound each other, so neither may cross the other."""
    order = sorted(range(len(timestamps)), key=lambda i: timestamps[i])
    out: list[Optional[Bounds]] = [None] * len(timestamps)
    for k, i in enumerate(order):
        lo = timestamps[order[k - 1]] if k > 0 else 0.0
        hi = timestamps[order[k + 1]] if k + 1 < len(order) else duration
        out[i] = Bounds(float(lo), float(timestamps[i]), float(hi))
    return out  # type: ignore[return-value]


def _widen(s: float, e: float, b: Bounds, duration: float, min_width: float) -> tuple[float, float]:
    """Grow a clip narrower than min_width around its timestamp `b.t`: inside its neighbour
    bounds where they leave room for it, else (no clip of that width fits between them) inside
    [0, duration]. Grown past a neighbouring timestamp where it fitted inside, no candidate
    (`candidates`, which keeps a start between the bounds) was ever valid, and the clip stayed
    as it was, holding another caption's timestamp, for every round."""
    if e - s >= min_width:
        return s, e
    # grown to the width it has on the millisecond grid (`_on_ms_grid`), between the bounds
    # taken to the millisecond as `candidates` takes them: grown to 1.0005 s up to the next
    # timestamp 4.0, the start rounded up to 3.0 and the end went to 4.001 to make 1.001 s, past
    # that timestamp, where no move by whole steps of 0.1 s or more was ever valid
    need = _ms_up(min_width)
    lo, hi = _ms(b.lo), _ms(b.hi)
    if hi - lo < need - 1e-9:
        lo, hi = 0.0, duration
    w = min(need, hi - lo)
    s = min(max(lo, b.t - w / 2), hi - w)
    return s, s + w


def initial_clips(timestamps: Sequence[float], duration: float, rule: str = "midpoint",
                  window_s: float = 0.0, max_width_s: float = 0.0,
                  min_width_s: float = 0.0) -> list[tuple[float, float]]:
    """Stage 1: one (start, end) per timestamp of one video, in the order given."""
    if rule not in INIT_RULES:
        raise ValueError(f"edit.init must be one of {', '.join(INIT_RULES)}, got {rule!r}")
    if rule == "window" and window_s <= 0:
        raise ValueError("edit.init=window needs edit.window_s > 0")
    order = sorted(range(len(timestamps)), key=lambda i: timestamps[i])
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(timestamps)
    for k, i in enumerate(order):
        t = float(timestamps[i])
        if rule == "midpoint":
            s = (timestamps[order[k - 1]] + t) / 2 if k > 0 else 0.0
            e = (t + timestamps[order[k + 1]]) / 2 if k + 1 < len(order) else duration
        else:
            s, e = max(0.0, t - window_s / 2), min(duration, t + window_s / 2)
        if max_width_s > 0:
            # the cap's ends taken inwards to the millisecond: rounded to the nearest with the
            # clip's, a 2 s cap around t = 7.2345 gave (6.234, 8.235), 2.001 s wide
            s, e = max(s, _ms_up(t - max_width_s / 2)), min(e, _ms_down(t + max_width_s / 2))
        lo = timestamps[order[k - 1]] if k > 0 else 0.0
        hi = timestamps[order[k + 1]] if k + 1 < len(order) else duration
        s, e = _widen(s, e, Bounds(float(lo), t, float(hi)), duration, min_width_s)
        out[i] = _on_ms_grid(s, e, t, min(min_width_s, duration))
    return out


def _on_ms_grid(s: float, e: float, t: float, width: float) -> tuple[float, float]:
    """(s, e) rounded to the millisecond, but never past t (the clip must hold its timestamp)
    and never narrower than `width`: each end rounded on its own, a 1 ms clip around t came
    out as (t, t), and a 1 s one as 0.999 s, which `candidates` then only ever widened."""
    s, e = min(_ms(s), t), max(_ms(e), t)
    need = _ms_up(width)
    if e - s < need - 1e-9:
        e = _ms(s + need)
        e = max(e if e - s >= need - 1e-9 else _ms(e + 0.001), t)
    return s, e


def candidates(start: float, end: float, b: Bounds, step_s: float, max_steps: int,
               min_width_s: float) -> list[tuple[float, float]]:
    """The current clip first, then every valid move of its start and end by -K..K steps. A
    boundary not moved stays as it is (an end kept at an unrounded timestamp keeps holding it);
    one past its neighbouring timestamp moves from that timestamp instead."""
    out, seen = [(start, end)], {(start, end), (_ms(start), _ms(end))}
    moves = [k * step_s for k in range(-max_steps, max_steps + 1)]
    eps = 1e-6
    # the neighbours and the video's end count to the millisecond, as the clips do (a last clip
    # ends at the video's end rounded, maybe up); t is compared exactly, as the manifest checks
    # it: an end a float's hair below t (t = 3.0000004, e = 3.0) would not hold it
    lo, hi = min(b.lo, _ms(b.lo)), max(b.hi, _ms(b.hi))
    # a clip past a neighbouring timestamp (init=window spans a fixed width, whatever the
    # neighbours) moves from that timestamp: else every move of a boundary more than K steps
    # past it stayed past it, and the clip was never edited, holding another caption's timestamp
    s0 = start if start >= lo - eps else min(_ms(b.lo), b.t)
    e0 = end if end <= hi + eps else max(_ms(b.hi), b.t)
    for ds in moves:
        s = _ms(s0 + ds) if ds else s0
        if not (lo - eps <= s <= b.t):
            continue
        for de in moves:
            e = _ms(e0 + de) if de else e0
            if (s, e) in seen or not (b.t <= e <= hi + eps) or e - s < min_width_s - eps:
                continue
            seen.add((s, e))
            out.append((s, e))
    return out


def choose(scores: Sequence[float], margin: float) -> int:
    """Index of the candidate to keep: the best one if it beats the current (index 0) by more
    than `margin`, else 0. NaN scores (a window that could not be decoded) never win; a NaN
    current clip is replaced by the best decodable one."""
    best, best_score = 0, -math.inf
    for i, s in enumerate(scores):
        if not math.isnan(s) and s > best_score:
            best, best_score = i, s
    current = scores[0] if scores else math.nan
    if math.isnan(current):
        return best
    return best if best_score > current + margin else 0


def tiou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal IoU of two [start, end] spans."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0
