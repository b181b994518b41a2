"""DiDeMo (LisaAnne/LocalizingMoments `data/`) -> clip manifest.

`train_data.json`, `val_data.json`, `test_data.json` are lists of descriptions: `video` (the
Flickr file name), `description`, `times` (one [start_seg, end_seg] pair per annotator, usually
4, sometimes 5 or 7), `num_segments`. Segment k covers seconds [5k, 5k+5). When CE's split
lists (`train_list.txt`, ...) are present, only listed videos are kept, as CLIP4Clip does.

Two views (option `view`):
- `sentence` (default): one row per description, start = 5 * mean(starts), end =
  5 * (mean(ends) + 1) (CLIP4Clip's formula; annotators disagree, so fractions are normal),
  clamped to [0, 5 * num_segments] — the annotated part of the video; the reader caps at the
  real length, which is not probed here. `group` = video.
- `paragraph`: one row per video, the whole file (start/end null), its descriptions joined with
  one space in file order (CLIP4Clip's paragraph-to-video retrieval).

Video names: the file is found when its name equals `video` exactly (extensions vary; some end
in a bare '.') or equals `video` + '.mp4' (what the official AWS download script saves).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator

from clipray.sources.base import Context, SourceError, SourceSpec, open_text, read_lines, span, split_ext

SPLITS = (("train", "train_data.json", "train_list.txt"), ("val", "val_data.json", "val_list.txt"),
          ("test", "test_data.json", "test_list.txt"))
SEGMENT_S = 5.0


def moment(times: Any, num_segments: Any = 6) -> tuple[float, float]:
    """(start, end) seconds of one description from its annotators' segment pairs.
    ValueError when `times` is not a non-empty list of [start_seg, end_seg] numbers."""
    if not isinstance(times, list) or not times:
        raise ValueError("times is not a non-empty list")
    try:
        pairs = [span(p) for p in times]
    except ValueError:
        raise ValueError(f"times {times!r} are not [start_seg, end_seg] pairs of finite numbers") from None
    start = SEGMENT_S * sum(s for s, _ in pairs) / len(pairs)
    end = SEGMENT_S * (sum(e for _, e in pairs) / len(pairs) + 1)
    if not (math.isfinite(start) and math.isfinite(end)):  # finite numbers whose sum is not
        raise ValueError(f"times {times!r} are past float's range")
    try:
        # (JSON's true is no count: read as 1, it cut every moment to the first 5 s)
        ok = isinstance(num_segments, int) and not isinstance(num_segments, bool) and num_segments > 0
        limit = SEGMENT_S * (num_segments if ok else 6)
    except OverflowError:  # a count past float's range is as wrong as 0 (it was a traceback)
        limit = SEGMENT_S * 6
    return min(max(start, 0.0), limit), min(max(end, 0.0), limit)


def rows(ctx: Context) -> Iterator[dict]:
    view = ctx.options["view"]
    plan = []
    for split, data_name, list_name in SPLITS:
        path = ctx.find(data_name)
        with open_text(path) as f:
            try:
                items = json.load(f)
            except ValueError as e:
                raise SourceError(f"{data_name}: not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise SourceError(f"{data_name}: expected a JSON list of descriptions")
        list_path = ctx.find(list_name, required=False)
        listed = set(read_lines(list_path)) if list_path else None
        plan.append((split, data_name, items, listed))
    used = [name for (_, _, name), p in zip(SPLITS, plan) if p[3] is not None]
    ctx.metadata.update(view=view, split_lists=used,
                        moment_rule="start=5*mean(starts), end=5*(mean(ends)+1), "
                                    "clamped to [0, 5*num_segments]")
    files = ctx.files(exts=None)  # any extension, even none: match by exact name
    found: dict[str, str | None] = {}
    for split, data_name, items, listed in plan:
        paragraphs: dict[str, list[str]] = {}
        unlisted: dict[str, int] = {}  # video -> descriptions left out by the split list
        for i, item in enumerate(items):
            where = f"{data_name}[{i}]"
            video = item.get("video") if isinstance(item, dict) else None
            if not isinstance(video, str) or not video:
                ctx.reject(where, "entry has no 'video' name")
                continue
            if listed is not None and video not in listed and split_ext(video)[0] not in listed:
                unlisted[video] = unlisted.get(video, 0) + 1
                continue
            if video not in found:
                found[video] = files.by_name(video) or files.by_name(video + ".mp4")
            if found[video] is None:
                ctx.missing(video)
                continue
            where = f"{where} (annotation_id {item.get('annotation_id')})"
            if view == "paragraph":
                caption = ctx.caption(item.get("description"), where)
                if caption is not None:
                    paragraphs.setdefault(video, []).append(caption)
                continue
            try:
                start, end = moment(item.get("times"), item.get("num_segments", 6))
            except ValueError as e:
                ctx.reject(where, str(e), category="malformed times")
                continue
            if start >= end:
                ctx.reject(where, "empty span after clamping")
                continue
            caption = ctx.caption(item.get("description"), where)
            if caption is not None:
                yield _row(ctx, video, found[video], split, caption, start, end, where)
        for video, texts in paragraphs.items():
            yield _row(ctx, video, found[video], split, " ".join(texts), None, None,
                       f"{data_name} video {video}")
        if unlisted:
            list_name = next(name for s, _, name in SPLITS if s == split)
            ctx.notes.append(f"{sum(unlisted.values()):,} descriptions of {len(unlisted):,} videos in "
                             f"{data_name} are not in {list_name}; left out")


def _row(ctx: Context, video: str, rel: str, split: str, caption: str, start, end, where: str) -> dict:
    return {"video_id": video, "path": ctx.path(rel), "start": start, "end": end,
            "caption": caption, "split": split, "group": video, "_where": where}


SOURCE = SourceSpec(
    name="didemo", rows=rows, options={"view": "sentence"},
    choices={"view": ("sentence", "paragraph")},
    summary="DiDeMo: per-description moments (5 s segments) or paragraphs; train/val/test",
)
