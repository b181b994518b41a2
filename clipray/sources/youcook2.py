"""YouCook2 (`youcookii_annotations_trainval.json`, YouCookII release) -> clip manifest.

`{"database": {video_id: {duration, subset, recipe_type, annotations: [{segment, id,
sentence}]}}}`. One row per annotated segment: start/end = `segment` (integer seconds, clamped
to [0, duration]; empty spans rejected), split from `subset` (training -> train, validation ->
val; the test release has no sentences), `group` = video id, `duration` = the video's.

Single-timestamp supervision (clip editing, specs/clip_editing.md): every row also carries one
`timestamp` inside its segment. How the paper derives it is not public, so the rule is ours and
an option, recorded in the manifest metadata (`timestamp_rule`, `seed`):
- `midpoint` (default): (start + end) / 2.
- `uniform`: a uniform draw in [start, end] from a generator seeded by (seed, video, segment),
  so a row's timestamp does not depend on which other rows were prepared.

Video file: `raw_videos/<subset>/<recipe_type>/<video_id>.{mp4,mkv,webm}` under the root, or
else a file with stem `<video_id>` anywhere under it.
"""

from __future__ import annotations

import json
import os
import random
from typing import Iterator

from clipray.sources.base import Context, SourceError, SourceSpec, open_text, seconds, span

SUBSETS = {"training": "train", "validation": "val", "testing": "test"}
EXTS = ("mp4", "mkv", "webm")


def timestamp(rule: str, start: float, end: float, seed: int, video_id: str, index: int) -> float:
    if rule == "midpoint":
        return (start + end) / 2
    # str seeds hash with sha512 in `random`, so this is stable across processes and runs
    return random.Random(f"{seed}:{video_id}:{index}").uniform(start, end)


def rows(ctx: Context) -> Iterator[dict]:
    rule, seed = ctx.options["timestamp_rule"], int(ctx.options["seed"])
    path = ctx.find("youcookii_annotations_trainval.json")
    name = os.path.basename(path)
    with open_text(path) as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise SourceError(f"{name}: not valid JSON ({e})") from None
    database = data.get("database") if isinstance(data, dict) else None
    if not isinstance(database, dict):
        raise SourceError(f"{name}: expected an object with a 'database' object")
    ctx.metadata.update(timestamp_rule=rule, seed=seed if rule == "uniform" else None)
    files = ctx.files()
    for vid, entry in database.items():
        where = f"{name} {vid}"
        if not isinstance(entry, dict) or not isinstance(entry.get("subset"), str) or entry["subset"] not in SUBSETS:
            ctx.reject(where, "entry has no known subset (training/validation/testing)")
            continue
        subset, recipe = entry["subset"], str(entry.get("recipe_type", ""))
        rel = next((r for r in (f"raw_videos/{subset}/{recipe}/{vid}.{e}" for e in EXTS) if r in files),
                   None) or files.by_stem(vid)
        if rel is None:
            ctx.missing(vid)
            continue
        yield from _segments(ctx, entry, vid, ctx.path(rel), SUBSETS[subset], where, rule, seed)


def _segments(ctx: Context, entry: dict, vid: str, path: str, split: str, where: str, rule: str,
              seed: int) -> Iterator[dict]:
    try:
        duration = seconds(entry.get("duration"))
    except ValueError:
        duration = None  # optional: the segments are not clamped at the end
    duration = duration if duration is not None and duration > 0 else None
    annotations = entry.get("annotations") or []
    if not isinstance(annotations, list):
        ctx.reject(where, f"annotations is not a list ({type(annotations).__name__})")
        return
    if not annotations and split != "test":  # (the test subset's captions are not public)
        ctx.reject(where, "no annotations", category="training/validation video with no annotations")
        return
    for k, ann in enumerate(annotations):
        at = f"{where} annotation {ann.get('id', k) if isinstance(ann, dict) else k}"
        try:
            start, end = span(ann["segment"])
        except (TypeError, KeyError, ValueError):
            ctx.reject(at, "segment is not a [start, end] pair of finite seconds")
            continue
        start, end = max(start, 0.0), end if duration is None else min(end, duration)
        if start >= end:
            ctx.reject(at, "empty segment after clamping to [0, duration]")
            continue
        caption = ctx.caption(ann.get("sentence"), at)
        if caption is None:
            continue
        index = ann.get("id", k) if isinstance(ann.get("id", k), int) else k
        yield {"video_id": vid, "path": path, "start": start, "end": end, "caption": caption,
               "split": split, "group": vid, "duration": duration,
               "timestamp": timestamp(rule, start, end, seed, vid, index), "_where": at}


SOURCE = SourceSpec(
    name="youcook2", rows=rows, options={"timestamp_rule": "midpoint", "seed": 0},
    choices={"timestamp_rule": ("midpoint", "uniform")},
    summary="YouCook2: one row per segment (train/val) with a single timestamp by a set rule",
)
