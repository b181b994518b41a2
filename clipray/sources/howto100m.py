"""HowTo100M ASR captions -> clip manifest, streamed: one row per caption segment.

~1.2M videos and ~136M ASR lines never fit in one dict, so nothing here holds more than one
video's captions (plus the id sets) at a time, and `prepare` writes shards of `rows_per_shard`
rows as they fill. Two input forms, same content (`start`, `end`, `text` per line):
- the release's giant `raw_caption.json` / `caption.json` (one object keyed by video id, values
  of parallel lists), parsed incrementally with ijson — never `json.load` of the whole file;
  parsing one JSON stream is sequential, so `workers` does not apply to it;
- a folder of per-video CSVs `<video_id>.csv` with header `start,end,text` (MIL-NCE's
  `small_train_captions/`), read by `workers` processes, a bounded number of batches in flight.
By default the first of `raw_caption.json` (unprocessed ASR, what text encoders expect),
`caption.json` (stop words removed), then a folder `raw_caption/`, `caption/`, `captions/` or
`small_train_captions/` is used; option `captions=PATH` names either form explicitly.

Rows keep the ASR times as they are (float noise like 68.46000000000001 included); lines with
end <= start, negative or unreadable times, or empty text are rejected and counted (a bare
NaN or Infinity, which Python's json writes, is not JSON: the file is refused there). Merging
short lines into longer clips (UniVL's min_time) is a sampling choice left to the loader.
Split: everything is train, except the video ids in `val_list` (a text file of ids, or a CSV
with a `video_id` or `video_path` column; extensions are stripped). `subset` (same format, e.g.
HowTo100M_v1.csv or a 380k list) keeps only the listed videos. Videos: `<video_id>.<ext>`
anywhere under the root, matched by stem.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import math
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any, Iterator

from clipray.manifest import filesystem
from clipray.sources.base import (Context, NotUtf8, SourceError, SourceSpec, csv_header, first_bad_utf8_line, is_uri,
                                  join, open_binary, open_text, split_ext)

JSON_NAMES = ("raw_caption.json", "caption.json")
CSV_DIRS = ("raw_caption", "caption", "captions", "small_train_captions")
_BATCH = 64  # caption files per task sent to a worker process

Segments = list[tuple[float, float, str, str]]  # (start, end, text, where: the line that gave it)
Rejects = list[tuple[str, str]]


def video_segments(where: str, starts: Any, ends: Any, texts: Any,
                   lines: list[int] | None = None) -> tuple[Segments, Rejects]:
    """Usable (start, end, text) lines of one video, and (where, reason) for the others.
    A rejected line is named by its position in the lists, or by `lines` (a CSV's file lines)."""
    if not (isinstance(starts, list) and isinstance(ends, list) and isinstance(texts, list)):
        return [], [(where, "start/end/text are not lists")]
    if not len(starts) == len(ends) == len(texts):
        return [], [(where, "start/end/text lists differ in length")]
    good: Segments = []
    bad: Rejects = []
    for k, s, e, t in zip(lines or range(len(starts)), starts, ends, texts):
        try:
            if isinstance(s, bool) or isinstance(e, bool):  # JSON true/false, which float() takes for 1/0
                raise TypeError
            s, e = float(s), float(e)
        except (TypeError, ValueError):
            bad.append((f"{where} line {k}", "unreadable time"))
            continue
        text = t.strip() if isinstance(t, str) else ""
        if not (math.isfinite(s) and math.isfinite(e)) or s < 0 or e <= s:
            bad.append((f"{where} line {k}", "end <= start, or a negative or non-finite time"))
        elif not isinstance(t, str):
            bad.append((f"{where} line {k}", "caption is not text"))
        elif not text:
            bad.append((f"{where} line {k}", "empty caption"))
        else:
            good.append((s, e, text, f"{where} line {k}"))
    return good, bad


def read_caption_csv(path: str) -> tuple[Segments, Rejects]:
    """One per-video caption CSV (header start,end,text). A file that cannot be read as CSV
    text is rejected whole, with its reason: one bad file among a million stops nothing."""
    name = path.rsplit("/", 1)[-1]
    cols: dict[str, list] = {"start": [], "end": [], "text": []}
    lines: list[int] = []
    cut: Rejects = []  # lines of more fields than the header that cannot be read back
    with open_text(path) as f:
        reader = csv.DictReader(f)
        try:
            if not reader.fieldnames or not {"start", "end", "text"} <= set(reader.fieldnames):
                return [], [(name, f"header {reader.fieldnames} is not start,end,text")]
            for rec in reader:
                over = rec.pop(None, None)  # the fields past the header's: an unquoted comma
                if over:
                    # DictReader kept them apart, and the caption was cut at the comma without a
                    # word; the last column's text is whole again with them, another is unsure
                    if reader.fieldnames[-1] != "text":
                        cut.append((f"{name} line {reader.line_num}", "more fields than the header "
                                    "(a comma in a caption that is not quoted)"))
                        continue
                    rec["text"] = ",".join([rec["text"], *over])
                for key in cols:
                    cols[key].append(rec[key])
                lines.append(reader.line_num)
        except NotUtf8 as e:
            return [], [(f"{name} line {e.line}", "not UTF-8 text; file skipped")]
        except csv.Error as e:  # a NUL byte, a field over csv's size limit
            # DictReader's own line_num moves only after a good record; its reader's is this line
            return [], [(f"{name} line {reader.reader.line_num}", f"unreadable CSV ({e}); file skipped")]
    good, bad = video_segments(name, cols["start"], cols["end"], cols["text"], lines)
    return good, cut + bad


def _read_batch(paths: list[str]) -> list[tuple[Segments, Rejects]]:
    return [read_caption_csv(p) for p in paths]


def read_id_file(path: str) -> set[str]:
    """Video ids of a list file: plain lines, or a CSV with a video_id/video_path column."""
    with open_text(path) as f:
        lines = [s.strip() for s in f if s.strip()]
    if not lines:
        return set()
    # csv's reading of the header too: quoted names ("video_id", as pandas' QUOTE_ALL writes
    # them) were missed, and every whole line, the header's included, was taken for an id
    header, delim = csv_header(lines[0])
    col = next((header.index(c) for c in ("video_id", "video_path") if c in header), None)
    if col is not None:
        ids = [r[col] for r in csv.reader(lines[1:], delimiter=delim) if len(r) > col]
    else:
        ids = lines
    return {split_ext(os.path.basename(i.strip()))[0] if "." in i else i.strip() for i in ids}


def _isdir(path: str) -> bool:
    if not is_uri(path):
        return os.path.isdir(path)
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def _list_csv(folder: str) -> list[str]:
    if not is_uri(folder):
        return sorted(e.name for e in os.scandir(folder) if e.name.endswith(".csv") and e.is_file())
    import pyarrow.fs as pafs

    fs, p = filesystem(folder)
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(p))
                  if i.type == pafs.FileType.File and i.base_name.endswith(".csv"))


def _caption_source(ctx: Context) -> str:
    if ctx.options["captions"]:
        path = ctx.user_path(str(ctx.options["captions"]))
        if not (_isdir(path) or path.endswith(".json")):
            raise SourceError(f"howto100m: captions={path!r} is neither a .json file nor a folder of CSVs")
        return path
    found = ctx.find(*JSON_NAMES, required=False)
    if found:
        return found
    folder = ctx.locate(CSV_DIRS, _isdir)  # as annotation files are found (MIL-NCE's data/small_train_captions/)
    if folder:
        return folder
    raise SourceError(f"howto100m: no {' / '.join(JSON_NAMES)} and no caption folder "
                      f"({', '.join(CSV_DIRS)}) in {ctx.annotations!r} or two folder levels below it; "
                      "pass captions=PATH")


def rows(ctx: Context) -> Iterator[dict]:
    source = _caption_source(ctx)
    val = read_id_file(ctx.user_path(ctx.options["val_list"])) if ctx.options["val_list"] else set()
    keep = read_id_file(ctx.user_path(ctx.options["subset"])) if ctx.options["subset"] else None
    form = "csv-folder" if _isdir(source) else "json"
    ctx.metadata.update(captions=source, captions_form=form, val_videos=len(val),
                        split_rule="val if listed in val_list, else train")
    files = ctx.files()

    def wanted(vid: str) -> str | None:
        if keep is not None and vid not in keep:
            return None
        rel = files.by_stem(vid)
        if rel is None:
            ctx.missing(vid)
        return rel

    def emit(vid: str, rel: str, segments: Segments, rejects: Rejects) -> Iterator[dict]:
        for where, reason in rejects:
            ctx.reject(where, reason)
        if not segments and not rejects:  # `{"start": [], ...}`, a CSV of its header only: said, as MSVD's
            ctx.reject(vid, "no captions", category="video with no captions")
        path, split = ctx.path(rel), "val" if vid in val else "train"
        # (named by the line that gave it: the count of kept lines named other lines, where
        # the writer refused one)
        for s, e, text, where in segments:
            yield {"video_id": vid, "path": path, "start": s, "end": e, "caption": text,
                   "split": split, "group": vid, "_where": where}

    if form == "json":
        for vid, entry in _stream_json(source):
            rel = wanted(vid)
            if rel is None:
                continue
            if not isinstance(entry, dict):
                ctx.reject(vid, "value is not an object with start/end/text")
                continue
            segments, rejects = video_segments(vid, entry.get("start"), entry.get("end"), entry.get("text"))
            yield from emit(vid, rel, segments, rejects)
        return
    # Missing videos are known from the listing alone: only the others' CSVs are read.
    todo = [vid for vid in (split_ext(n)[0] for n in _list_csv(source)) if wanted(vid) is not None]
    batches = [todo[i:i + _BATCH] for i in range(0, len(todo), _BATCH)]
    for batch, results in zip(batches, _map_batches(source, batches, int(ctx.options["workers"]))):
        for vid, (segments, rejects) in zip(batch, results):
            yield from emit(vid, files.by_stem(vid), segments, rejects)


def _stream_json(path: str) -> Iterator[tuple[str, Any]]:
    try:
        import ijson
    except ImportError:
        raise SourceError("howto100m: reading caption JSON needs the ijson package (pip install ijson)") from None
    with open_binary(path) as f:
        src = _WithoutBom(f)
        first = src.first()
        if first and first in b'["-0123456789tfn':  # another JSON value (else: the parser's error)
            # an array or a string has no key-value items at the top: 0 rows and exit 0
            raise SourceError(f"{os.path.basename(path)}: expected an object keyed by video id, "
                              f"found JSON starting with {first.decode('latin-1')!r}")
        try:
            yield from ijson.kvitems(src, "", use_float=True)
        except (ijson.JSONError, UnicodeDecodeError) as e:
            # yajl reads bytes: a byte that is not UTF-8 is its JSON error, named by line here
            # as every other annotation file's is (datasets/README.md)
            line = first_bad_utf8_line(path) if isinstance(e, UnicodeDecodeError) or "UTF8" in str(e) else 0
            if line:
                raise NotUtf8(path, line, "invalid byte") from None
            # yajl's message is three lines (what, the text around it, an arrow): one line here
            what, *around = str(e).strip().splitlines() or [""]
            near = f" near: {around[0].strip()}" if around and around[0].strip() else ""
            raise SourceError(f"{os.path.basename(path)}: invalid JSON ({what.rstrip('.')}{near})") from None


class _WithoutBom:
    """A binary file read past a leading UTF-8 BOM (an editor's 'UTF-8 with BOM'), which the
    JSON parser takes for a stray character; the text readers drop it too (`open_text`)."""

    def __init__(self, f: Any):
        self.f, head = f, f.read(len(codecs.BOM_UTF8))
        self.head = b"" if head == codecs.BOM_UTF8 else head

    def first(self) -> bytes:
        """The first byte past leading whitespace (b"" for none); the whitespace is dropped, the
        byte is kept for the next read."""
        while not self.head.lstrip():
            self.head = self.f.read(65536)
            if not self.head:
                return b""
        self.head = self.head.lstrip()
        return self.head[:1]

    def read(self, size: int = -1) -> bytes:
        if not self.head or size == 0:
            return self.f.read(size)
        if size is None or size < 0:
            out, self.head = self.head + self.f.read(), b""
            return out
        out, self.head = self.head[:size], self.head[size:]
        return out + self.f.read(size - len(out)) if len(out) < size else out


def _map_batches(folder: str, batches: list, workers: int) -> Iterator[list[tuple[Segments, Rejects]]]:
    """Results of `_read_batch` per batch, in order; at most 2 x workers batches in flight so a
    slow writer never lets parsed captions pile up in memory."""
    paths = ([join(folder, f"{vid}.csv") for vid in b] for b in batches)
    if workers <= 1:
        yield from map(_read_batch, paths)
        return
    # spawn, not fork: the parent may hold pyarrow / Ray threads that a fork would copy mid-lock
    pending: deque = deque()  # [paths, future], in order
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for p in paths:
                pending.append([p, None])  # (before submit, which raises once the pool is broken)
                pending[-1][1] = pool.submit(_read_batch, p)
                if len(pending) >= 2 * workers:
                    yield pending[0][1].result()
                    pending.popleft()
            while pending:
                yield pending[0][1].result()
                pending.popleft()
    except BrokenProcessPool:
        # A spawned worker runs the caller's script again: one that calls prepare() outside
        # `if __name__ == "__main__":` ends each worker in a RuntimeError, and prepare() ended in
        # BrokenProcessPool. The batches not read yet are read here instead, nothing lost.
        print("  howto100m: the worker processes ended (a script that calls prepare() must do so under "
              "`if __name__ == \"__main__\":` to use workers); reading the captions in this process",
              file=sys.stderr, flush=True)
        for p in itertools.chain((p for p, _ in pending), paths):
            yield _read_batch(p)


SOURCE = SourceSpec(
    name="howto100m", rows=rows,
    # 250k rows per shard: ~550 shards for HowTo100M; the writer holds one row group of rows
    # (manifest.ROWS_PER_GROUP) at a time, whatever the shard's size
    options={"captions": None, "val_list": None, "subset": None, "workers": min(8, os.cpu_count() or 1),
             "rows_per_shard": 250_000},
    summary="HowTo100M: ASR lines from the giant caption JSON (streamed) or per-video CSVs",
)
