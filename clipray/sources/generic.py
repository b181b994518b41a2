"""A user's own CSV or JSONL (specs/datasets.md section 8) -> clip manifest.

Option `file=` names the annotation file (absolute, relative to the working directory, or
relative to the root). Three shapes are accepted:
- CSV with a header (comma, RFC 4180 quoting), one row per (video, caption);
- JSONL, one such row object per line;
- video-level JSONL: `{"path": ..., "captions": [{"text", "start", "end", "timestamp"}, ...]}`
  (a caption may also be a bare string), expanded to one row per caption.
Columns: `path` and `caption` required (in JSONL `text` also names the caption, as in a caption
object); `video_id` (default: the path's stem), `start`/`end`
(seconds; both empty = whole file), `split` (default train), `timestamp`, `group`, `duration`,
`caption_id` (accepted; the manifest keeps row order instead). Other columns are ignored and
named in the report notes.

Relative paths are under the root; missing files are dropped and listed by path in the report
(URIs in the file are passed through unchecked). A local path finds its file also when one of them
spells an accented letter in the other Unicode form (a Mac's NFD names, an annotation's NFC). Times must be numbers of seconds: an `hh:mm:ss` string stops the run
with an error naming the line — guessing a time format is how clips end up wrong silently.
Other bad rows (empty caption, end <= start, timestamp outside the clip, unknown split) are
rejected and counted; an `end` past a given `duration` is clamped and noted.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import unicodedata
from typing import Any, Iterator

from clipray.manifest import SPLITS
from clipray.sources.base import (Context, SourceError, SourceSpec, csv_rows, exists, is_uri, join, open_text,
                                  seconds as finite_seconds, split_ext)

KNOWN = {"path", "caption", "video_id", "start", "end", "split", "timestamp", "group", "duration",
         "caption_id", "captions", "text"}


def seconds(value: Any, key: str, where: str) -> float | None:
    """A time in seconds, None when empty; SourceError for hh:mm:ss and for what the release
    adapters' `seconds` refuses (a bool, NaN or inf, an integer past float's range)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and ":" in value:
        raise SourceError(f"{where}: {key}={value!r} looks like hh:mm:ss; write times as seconds "
                          "(e.g. 83.5), this adapter does not guess time formats")
    try:
        return finite_seconds(value)
    except ValueError as e:
        raise SourceError(f"{where}: {key}={e}") from None


def read_records(path: str, ctx: Context) -> Iterator[tuple[str, dict]]:
    """(where, record) for every row-level record of the file; video-level JSONL is expanded.
    CSV lines with the wrong number of fields (an unquoted comma) are rejected, not truncated."""
    name = os.path.basename(path)
    with open_text(path) as f:
        if name.lower().endswith(".csv"):
            header, _, body = csv_rows(f, name)
            for col in ("path", "caption"):
                if col not in header:
                    raise SourceError(f"{name}: header {header} lacks the required column '{col}'")
            for line, fields in body:
                if len(fields) != len(header):
                    ctx.reject(f"{name} line {line}", f"{len(fields)} fields for {len(header)} columns "
                               "(quote values that contain commas)", category="wrong number of fields")
                    continue
                yield f"{name} line {line}", dict(zip(header, fields))
            return
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{name} line {line}"
            try:
                rec = json.loads(text)
            except ValueError as e:
                raise SourceError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise SourceError(f"{where}: expected a JSON object per line")
            if "captions" not in rec:  # `text` as a caption object names it, if no `caption`
                yield where, {**rec, "caption": rec["text"]} if "caption" not in rec and "text" in rec else rec
                continue
            if not isinstance(rec["captions"], list):
                raise SourceError(f"{where}: 'captions' must be a list")
            if not rec["captions"]:  # (as the releases' adapters count theirs; it left no trace)
                ctx.reject(where, "no captions", category="video with no captions")
            video = {k: v for k, v in rec.items() if k != "captions"}
            for k, cap in enumerate(rec["captions"]):
                cap = {"text": cap} if isinstance(cap, str) else cap
                if not isinstance(cap, dict):
                    raise SourceError(f"{where} caption {k}: expected a string or an object")
                merged = {**video, **{key: v for key, v in cap.items() if key != "text"}}
                merged["caption"] = cap.get("text", cap.get("caption"))
                yield f"{where} caption {k}", merged


def rows(ctx: Context) -> Iterator[dict]:
    if not ctx.options["file"]:
        raise SourceError("generic: name the CSV or JSONL to read with -o file=PATH (see datasets/generic.yaml)")
    path = ctx.user_path(str(ctx.options["file"]))
    ctx.metadata.update(file=path)
    files = ctx.files(exts=None)  # user videos may carry any extension
    ids: dict[str, tuple[str, str, str]] = {}  # video_id -> (file, path as given, first where), to catch clashes
    clips: dict[tuple, tuple[str, str]] = {}  # (file, start, end) -> (video_id, first where), likewise
    local: dict[str, str | None] = {}
    unknown: set[str] = set()
    clamped = 0
    for where, rec in read_records(path, ctx):
        unknown.update(k for k in rec if k not in KNOWN)
        raw = str(rec.get("path") or "").strip()
        if not raw:
            ctx.reject(where, "no path")
            continue
        if not is_uri(raw):  # './a.mp4' and 'a.mp4' are one file, and '/r/./a.mp4' and '/r/a.mp4'
            raw = posixpath.normpath(raw.replace(os.sep, "/"))
        vid = _text(rec.get("video_id")) or split_ext(posixpath.basename(raw))[0]
        start, end = seconds(rec.get("start"), "start", where), seconds(rec.get("end"), "end", where)
        ts, duration = seconds(rec.get("timestamp"), "timestamp", where), seconds(rec.get("duration"), "duration", where)
        # the file itself: 'clips/a.mp4' and '<root>/clips/a.mp4' are one video, refused as two
        file = raw if is_uri(raw) or os.path.isabs(raw) else ctx.path(raw)
        first = ids.setdefault(vid, (file, raw, where))
        if first[0] != file:
            raise SourceError(f"{where}: video_id {vid!r} names {raw!r}, but {first[2]} gave it "
                              f"{first[1]!r}; give each video its own video_id")
        # and one clip under two ids (an id given in one row, the path's stem in another): two
        # retrieval targets of the same frames, one of which counted as a miss
        named = clips.setdefault((file, start, end), (vid, where))
        if named[0] != vid:
            span = "the whole video" if start is None else f"[{start:g}, {end:g}]"
            raise SourceError(f"{where}: {raw!r} ({span}) is video_id {vid!r} here and {named[0]!r} at "
                              f"{named[1]}; give one clip one video_id")
        full = _locate(ctx, files, raw, local)
        if full is None:
            ctx.missing(raw)
            continue
        split = _text(rec.get("split")) or "train"
        if split not in SPLITS:
            ctx.reject(where, f"split must be one of {', '.join(SPLITS)}", category="unknown split")
            continue
        if (start is None) != (end is None):
            ctx.reject(where, "give both start and end, or neither")
            continue
        if duration is not None and duration <= 0:
            ctx.reject(where, "duration must be > 0")
            continue
        cut = end is not None and duration is not None and end > duration
        if cut:
            end = duration
        if start is not None and (start < 0 or end <= start):
            ctx.reject(where, "need 0 <= start < end")
            continue
        lo, hi = (0.0, duration if duration is not None else math.inf) if start is None else (start, end)
        if ts is not None and not lo <= ts <= hi:
            ctx.reject(where, "timestamp outside [start, end]")
            continue
        caption = ctx.caption(rec.get("caption"), where)
        if caption is None:
            continue
        group = _text(rec.get("group")) or vid
        clamped += cut  # (counted once the row is kept: a rejected row is counted as rejected)
        yield {"video_id": vid, "path": full, "start": start, "end": end, "caption": caption,
               "split": split, "timestamp": ts, "group": group, "duration": duration, "_where": where}
    if clamped:
        ctx.notes.append(f"{clamped} rows had end past their duration; end clamped to duration")
    if unknown:
        ctx.notes.append(f"ignored columns: {', '.join(sorted(unknown))}")


def _text(value: Any) -> str:
    """An id as text; only a missing or empty value is absent (a JSONL id 0 is the id '0')."""
    return "" if value is None else str(value).strip()


def _locate(ctx: Context, files, raw: str, cache: dict[str, str | None]) -> str | None:
    """The manifest path of a row's video, or None when it does not exist."""
    if is_uri(raw):
        return raw  # a URI elsewhere: listing every bucket it names is not this adapter's job
    if os.path.isabs(raw):
        return _on_disk(raw, cache)
    rel = files.get(raw)  # (already normalised) as listed, in the Unicode form found on disk
    if rel is not None:
        return ctx.path(rel)
    if not is_uri(ctx.root):
        # not listed: outside the walked root ('../'), or hidden ('.take2.mp4', '.cache/a.mp4':
        # the listing leaves dotfiles out, macOS's '._a.mp4' among them), which a row naming
        # it was reported missing for
        return _on_disk(os.path.normpath(os.path.join(ctx.root, raw)), cache)
    if raw.startswith(".") or "/." in raw:  # likewise under a bucket's root, looked up one by one
        scheme, _, key = join(ctx.root, raw).partition("://")
        key = posixpath.normpath(key)
        if key.split("/")[0] != ctx.root.partition("://")[2].split("/")[0]:
            return None  # '../' past the bucket: another bucket's name, not a folder
        full = f"{scheme}://{key}"
        if full not in cache:
            cache[full] = full if exists(full) else None
        return cache[full]
    return None


def _on_disk(full: str, cache: dict[str, str | None]) -> str | None:
    """A local file's path as on disk, or None: as written, else in the other Unicode form
    (NFC or NFD: a Mac's 'e' + accent for an annotation's 'é', `FileIndex.get`)."""
    if full not in cache:
        forms = [full] if full.isascii() else dict.fromkeys(
            [full, unicodedata.normalize("NFC", full), unicodedata.normalize("NFD", full)])
        cache[full] = next((f for f in forms if os.path.isfile(f)), None)
    return cache[full]


SOURCE = SourceSpec(
    name="generic", rows=rows, options={"file": None},
    summary="your own CSV / JSONL / video-level JSONL (datasets/generic.yaml)",
)
