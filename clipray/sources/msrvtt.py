"""MSR-VTT (the files of CLIP4Clip's `msrvtt_data.zip`) -> clip manifest.

Splits follow CLIP4Clip, the standard retrieval protocol: train = the videos listed in
`MSRVTT_train.9k.csv` (or `.7k.csv`, option `train_split`) with their captions from
`MSRVTT_data.json`; test = the 1k-A set `MSRVTT_JSFUSION_test.csv`, ONE caption per video, row
i of the file being text i (MSR-VTT has no separate val set in that protocol). Every row is the
whole file (start/end null) and `group` = video id.

`expand=True` (CLIP4Clip's `--expand_msrvtt_sentences`, the published setting) writes every
(video, caption) pair of the train videos: 180,000 rows for 9k. `expand=False` keeps the first
usable caption per train video (9,000 rows); CLIP4Clip instead draws a random caption each
epoch, which is a sampler's job, not the manifest's.

Videos: `<video_id>.mp4` (or `.webm`, ...) anywhere under the root (`MSRVTT_Videos/` in the
release), matched by file stem as CLIP4Clip does.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

from clipray.sources.base import Context, SourceError, SourceSpec, csv_rows, open_text


def rows(ctx: Context) -> Iterator[dict]:
    split_name = ctx.options["train_split"]
    data_path = ctx.find("MSRVTT_data.json")
    train_path = ctx.find(f"MSRVTT_train.{split_name}.csv")
    test_path = ctx.find("MSRVTT_JSFUSION_test.csv")
    train_ids = read_train_ids(train_path)
    test = read_test(test_path)
    captions = read_captions(data_path, set(train_ids))
    ctx.metadata.update(train_split=split_name, expand=ctx.options["expand"],
                        test_set="1k-A (MSRVTT_JSFUSION_test.csv)")
    # a video in both csvs is kept in both splits, and the report says so (`Tally.shared_note`)
    files = ctx.files()

    for vid in train_ids:
        rel = files.by_stem(vid)
        if rel is None:
            ctx.missing(vid)
            continue
        if vid not in captions:
            ctx.reject(f"{os.path.basename(train_path)} {vid}", "video has no captions in MSRVTT_data.json")
            continue
        kept = 0
        for where, text in captions[vid]:
            caption = ctx.caption(text, where)
            if caption is None:
                continue
            yield _row(ctx, vid, rel, caption, "train", where)
            kept += 1
            if not ctx.options["expand"]:
                break
        if not kept:
            ctx.notes.append(f"train video {vid} has no usable caption")

    test_name = os.path.basename(test_path)
    for line, vid, text in test:
        where = f"{test_name} line {line}"
        if not vid:  # else said a missing video of no name, the line not named
            ctx.reject(where, "no video_id", category="no video_id")
            continue
        rel = files.by_stem(vid)
        if rel is None:
            ctx.missing(vid)
            continue
        caption = ctx.caption(text, where)
        if caption is not None:
            yield _row(ctx, vid, rel, caption, "test", where)


def _row(ctx: Context, vid: str, rel: str, caption: str, split: str, where: str) -> dict:
    return {"video_id": vid, "path": ctx.path(rel), "start": None, "end": None,
            "caption": caption, "split": split, "group": vid, "_where": where}


def read_train_ids(path: str) -> list[str]:
    """The `video_id` column of a train csv, in order, without repeats (extra columns ignored)."""
    name = os.path.basename(path)
    with open_text(path) as f:
        header, _, body = csv_rows(f, name)
        if "video_id" not in header:
            raise SourceError(f"{name}: header {header} has no 'video_id' column")
        col = header.index("video_id")
        ids = [fields[col].strip() for _, fields in body if len(fields) > col]
    return list(dict.fromkeys(i for i in ids if i))


def read_test(path: str) -> list[tuple[int, str, str]]:
    """(line, video_id, sentence) of the JSFUSION csv, header `key,vid_key,video_id,sentence`."""
    name = os.path.basename(path)
    with open_text(path) as f:
        header, delim, body = csv_rows(f, name)
        for col in ("video_id", "sentence"):
            if col not in header:
                raise SourceError(f"{name}: header {header} has no '{col}' column")
        vcol, scol = header.index("video_id"), header.index("sentence")
        out = []
        for line, fields in body:
            if len(fields) <= max(vcol, scol):
                raise SourceError(f"{name} line {line}: expected {len(header)} fields, got {fields}")
            sentence = fields[scol]
            if scol == len(header) - 1 and len(fields) > len(header):
                # an unquoted delimiter inside the last column, the sentence: keep it whole
                sentence = delim.join(fields[scol:])
            out.append((line, fields[vcol].strip(), sentence))
    return out


def read_captions(path: str, wanted: set[str]) -> dict[str, list[tuple[str, str]]]:
    """video_id -> [(where, caption)] from MSRVTT_data.json, file order, for `wanted` videos."""
    name = os.path.basename(path)
    with open_text(path) as f:
        try:
            data = json.load(f)  # ~200k short sentences: small enough to load whole
        except ValueError as e:
            raise SourceError(f"{name}: not valid JSON ({e})") from None
    sentences = data.get("sentences") if isinstance(data, dict) else None
    if not isinstance(sentences, list):
        raise SourceError(f"{name}: expected an object with a 'sentences' list")
    out: dict[str, list[tuple[str, str]]] = {}
    for i, s in enumerate(sentences):
        if not isinstance(s, dict) or not isinstance(s.get("video_id"), str) or "caption" not in s:
            raise SourceError(f"{name}: sentences[{i}] lacks 'video_id' (a string) or 'caption': {s!r}")
        if s["video_id"] in wanted:
            out.setdefault(s["video_id"], []).append((f"{name} sentences[{i}]", s["caption"]))
    return out


SOURCE = SourceSpec(
    name="msrvtt", rows=rows,
    options={"train_split": "9k", "expand": True},
    choices={"train_split": ("9k", "7k"), "expand": (True, False)},
    summary="MSR-VTT: 9k/7k train (MSRVTT_data.json captions), 1k-A test (JSFUSION csv)",
)
