"""ActivityNet Captions (`captions.zip` from the dataset page) -> clip manifest.

Caption files map a video id WITH the `v_` prefix to `duration`, `timestamps` ([start, end]
seconds) and `sentences` (same order). Splits follow CLIP4Clip: train = `train.json` (restricted
to `train_ids.json` when present), and the evaluation set = `val_1.json` (restricted to
`val_ids.json` when present), labelled `test` by default because it IS the reported test set
(option `eval_split="val"` labels it val). `val_2.json` is not used, as in CLIP4Clip.

Two views (option `view`):
- `sentence` (default): one row per sentence, start/end = its timestamps clamped to
  [0, duration]; spans empty after clamping (start >= end) are rejected; `group` = video id, so
  paragraph-level evaluation can still regroup them.
- `paragraph`: one row per video, the whole file (start/end null), its stripped sentences
  joined with one space in file order (CLIP4Clip's paragraph-to-video retrieval).

Video files: CLIP4Clip names them without `v_` (`<id>.mp4`), other pipelines keep it
(`v_<id>.mkv`); both are found, by stem, anywhere under the root.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from clipray.sources.base import Context, SourceError, SourceSpec, open_text, seconds, span

SPLITS = (("train", "train.json", "train_ids.json"), ("eval", "val_1.json", "val_ids.json"))


def file_stems(video_id: str) -> tuple[str, str]:
    """Stems a video may be stored under: without the `v_` prefix first (CLIP4Clip), then with."""
    bare = video_id[2:] if video_id.startswith("v_") else video_id
    return bare, "v_" + bare


def _load(path: str) -> Any:
    with open_text(path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise SourceError(f"{os.path.basename(path)}: not valid JSON ({e})") from None


def rows(ctx: Context) -> Iterator[dict]:
    view, eval_split = ctx.options["view"], ctx.options["eval_split"]
    ctx.metadata.update(view=view, eval_file="val_1.json", eval_split=eval_split,
                        clamp="timestamps clamped to [0, duration]; start >= end dropped")
    plan = []
    for split, cap_name, ids_name in SPLITS:
        cap_path = ctx.find(cap_name)
        data = _load(cap_path)
        if not isinstance(data, dict):
            raise SourceError(f"{cap_name}: expected an object keyed by video id")
        ids_path = ctx.find(ids_name, required=False)
        if ids_path is None:
            ids = list(data)
        else:
            listed = _load(ids_path)
            if not isinstance(listed, list) or not all(isinstance(i, str) for i in listed):
                raise SourceError(f"{ids_name}: expected a JSON list of video ids (strings)")
            ids = [i for i in dict.fromkeys(listed) if i in data]
            absent = len(set(listed)) - len(ids)
            if absent:
                ctx.notes.append(f"{absent:,} ids of {ids_name} have no captions in {cap_name}; skipped")
            if len(set(listed)) < len(listed):
                ctx.notes.append(f"{len(listed) - len(set(listed)):,} ids repeat in {ids_name}; "
                                 "each video is used once")
            unlisted = len(data) - len(ids)
            if unlisted:
                ctx.notes.append(f"{unlisted:,} videos of {cap_name} are not in {ids_name}; left out")
        plan.append((eval_split if split == "eval" else split, cap_name, data, ids))
    files = ctx.files()
    for split, cap_name, data, ids in plan:
        for vid in ids:
            rel = next((r for r in map(files.by_stem, file_stems(vid)) if r), None)
            if rel is None:
                ctx.missing(vid)
                continue
            yield from _video_rows(ctx, view, split, f"{cap_name} {vid}", vid, ctx.path(rel), data[vid])


def _video_rows(ctx: Context, view: str, split: str, where: str, vid: str, path: str,
                entry: Any) -> Iterator[dict]:
    try:
        stamps, sentences = list(entry["timestamps"]), list(entry["sentences"])
        duration = entry["duration"]
    except (TypeError, KeyError, ValueError):
        ctx.reject(where, "entry lacks duration/timestamps/sentences")
        return
    try:
        duration = seconds(duration)
    except ValueError as e:
        ctx.reject(where, f"duration {e}", category="duration is not a finite number")
        return
    if not duration > 0:
        ctx.reject(where, "duration is not positive")
        return
    if len(stamps) != len(sentences):
        ctx.reject(where, "timestamps and sentences differ in length")
        return
    base = {"video_id": vid, "path": path, "split": split, "group": vid, "duration": duration}
    if view == "paragraph":
        texts = [c for k, s in enumerate(sentences) if (c := ctx.caption(s, f"{where} sentence {k}"))]
        if texts:
            yield {**base, "start": None, "end": None, "caption": " ".join(texts), "_where": where}
        return
    for k, (stamp, sentence) in enumerate(zip(stamps, sentences)):
        at = f"{where} sentence {k}"
        try:
            start, end = span(stamp)
        except ValueError as e:
            ctx.reject(at, f"timestamp {e}", category="timestamp is not a [start, end] pair of finite seconds")
            continue
        # some ends run past the video and some spans are empty: clamp, then drop empty
        start, end = min(max(start, 0.0), duration), min(max(end, 0.0), duration)
        if start >= end:
            ctx.reject(at, "empty span after clamping to [0, duration]")
            continue
        caption = ctx.caption(sentence, at)
        if caption is not None:
            yield {**base, "start": start, "end": end, "caption": caption, "_where": at}


SOURCE = SourceSpec(
    name="activitynet", rows=rows,
    options={"view": "sentence", "eval_split": "test"},
    choices={"view": ("sentence", "paragraph"), "eval_split": ("test", "val")},
    summary="ActivityNet Captions: per-sentence moments or paragraphs; train + val_1",
)
