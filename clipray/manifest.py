"""The clip manifest: one Arrow schema for every video-text source.

One row per (video, caption). Every adapter (MSR-VTT, MSVD, ..., HowTo100M, user CSV/JSONL,
the synthetic generator) writes this schema, and the one Ray Data reader takes any manifest, so
datasets differ in data, not in code.

Columns
  row_id      int64   unique within the manifest, assigned at write time (batches carry it)
  video_id    string  rows sharing it are one video
  path        string  file path (absolute, or relative to the manifest's folder) or URI
  start, end  float64 seconds inside the file; both null = the whole file
  caption     string  stripped, non-empty
  split       string  train | val | test
  timestamp   float64 optional single-timestamp supervision (inside [start, end] if given)
  group       string  sentence group (paragraph retrieval); defaults to video_id
  duration    float64 optional known length of the video file in seconds

Manifests are Parquet: one file, or a directory of `part-NNNNN.parquet` shards (large sources
are written shard by shard, never held whole). Key/value metadata (source, rules used) rides in
the Parquet schema metadata.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import posixpath
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clipray.config import SPLITS  # train, val, test

SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("start", pa.float64()),
        pa.field("end", pa.float64()),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("timestamp", pa.float64()),
        pa.field("group", pa.string()),
        pa.field("duration", pa.float64()),
    ]
)
COLUMNS = tuple(SCHEMA.names)


class ManifestError(ValueError):
    """A manifest row or file is invalid; the message names the row."""


def as_seconds(v: Any) -> float | None:
    """A time field as float seconds; None and NaN (Parquet nulls in numpy) are None."""
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


def check_row(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate and normalise one row; raise ManifestError naming `where` on bad fields."""
    out: dict[str, Any] = {}
    for key in ("video_id", "path", "caption", "split"):
        v = row.get(key)
        if v is None or not isinstance(v, str):
            raise ManifestError(f"{where}: '{key}' is missing or not a string ({v!r})")
        out[key] = utf8_text(v.strip(), key, where)
    if not out["video_id"] or not out["path"]:
        raise ManifestError(f"{where}: empty video_id or path")
    if not out["caption"]:
        raise ManifestError(f"{where} (video {out['video_id']}): empty caption")
    if out["split"] not in SPLITS:
        raise ManifestError(f"{where}: split must be one of {SPLITS}, got {out['split']!r}")
    try:
        start, end = as_seconds(row.get("start")), as_seconds(row.get("end"))
        ts, dur = as_seconds(row.get("timestamp")), as_seconds(row.get("duration"))
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: an int past float's range
        raise ManifestError(f"{where} (video {out['video_id']}): times must be seconds: {e}")
    for name, v in (("start", start), ("end", end), ("timestamp", ts), ("duration", dur)):
        if v is not None and math.isinf(v):  # decoded as "to the end", but no index key or JSON answer holds it
            raise ManifestError(f"{where} (video {out['video_id']}): {name} {v} is no time: give seconds "
                                "(start and end both empty: the whole video)")
    if (start is None) != (end is None):
        raise ManifestError(f"{where} (video {out['video_id']}): give both start and end, or neither")
    if start is not None:
        if start < 0:
            raise ManifestError(f"{where} (video {out['video_id']}): negative start {start}")
        if end <= start:
            raise ManifestError(f"{where} (video {out['video_id']}): end {end} <= start {start}")
    if ts is not None:
        lo = 0.0 if start is None else start
        hi = (dur if dur is not None else math.inf) if end is None else end
        if not lo <= ts <= hi:
            raise ManifestError(f"{where} (video {out['video_id']}): timestamp {ts} outside [{lo}, {hi}]")
    if dur is not None and dur <= 0:
        raise ManifestError(f"{where} (video {out['video_id']}): duration must be > 0")
    group = row.get("group")
    out.update(start=start, end=end, timestamp=ts, duration=dur,
               group=utf8_text(str(group), "group", where) if group not in (None, "") else out["video_id"])
    return out


def utf8_text(text: str, key: str, where: str) -> str:
    """`text`, when it is text Parquet can store: a lone surrogate (JSON's "\\ud83d" escape cut
    from an emoji's pair, a file name that is not UTF-8 as os.walk gives it) failed the writer's
    whole row group, and so the manifest, where it is one row refused."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ManifestError(f"{where}: '{key}' holds a lone surrogate (half of a pair: a JSON escape "
                                "cut from an emoji's, or a file name that is not UTF-8), which is not text") from None
    return text


PARTIAL = ".partial"  # a manifest file's suffix until the whole manifest is written
ROWS_PER_GROUP = 32_768  # rows a ManifestWriter holds before writing them out (one row group)


def shard_name(i: int) -> str:
    """The file name of a folder manifest's shard `i` (from 0)."""
    return f"part-{i:05d}.parquet"


class ManifestWriter:
    """Streams rows into Parquet shards of `rows_per_shard` rows, validating each row.

    Rows are checked a buffer at a time, a column at a time (`_checked_batch`, as `data check`
    reads); only a buffer where a row breaks a rule, or whose values are not plain text and
    numbers, goes row by row through `check_row`, which names the row. Row by row, the check
    was about half of a HowTo100M prepare's time (docs/benchmarks.md, "Writing a manifest").
    So a bad row is refused when its buffer is written, not when it is added: by `on_bad(row,
    error)` when given (the row is dropped and the write goes on), else by raising the
    ManifestError. `tally`, when given, counts the rows written (`Tally.add_batch`).

    `out` ending in `.parquet` gives one file; otherwise `out` is a directory of
    `part-NNNNN.parquet` shards. Either way rows go to disk as they come, `ROWS_PER_GROUP` at a
    time (one Parquet row group), so memory stays flat however many rows a source has. Each file
    is written under a `.partial` name until `close()` renames them all (first removing the shards
    an earlier manifest left in the folder): a write killed midway (OOM, preemption) leaves no
    file or folder that reads as a smaller, complete manifest. Rows are numbered
    0, 1, ... in the order written, unless `keep_row_ids`: then each row brings its own
    `row_id` (a rewrite of a manifest whose rows must still join with the original's).
    """

    by_columns = True  # False: every row through check_row (`clipray bench prepare`'s baseline)

    def __init__(self, out: str | Path, rows_per_shard: int = 1_000_000,
                 metadata: Mapping[str, Any] | None = None, keep_row_ids: bool = False,
                 on_bad: Callable[[Mapping[str, Any], ManifestError], None] | None = None,
                 tally: Tally | None = None):
        self.out = str(out)
        self.single = self.out.endswith(".parquet")
        self.rows_per_shard = rows_per_shard
        meta = {"clipray.manifest": "1", **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
        self.schema = SCHEMA.with_metadata(meta)
        self.fs, self.root = filesystem(self.out)
        folder = self.root if not self.single else str(Path(self.root).parent)
        info = self.fs.get_file_info(self.root)
        kind = info.type
        if self.single and kind == pafs.FileType.Directory:
            raise ManifestError(f"{self.out}: is a folder; a manifest named *.parquet is written as one "
                                "file (name a folder without .parquet to write shards into it)")
        if not self.single and kind == pafs.FileType.File:
            raise ManifestError(f"{self.out}: is a file; a manifest not named *.parquet is a folder of "
                                "shards (name the file *.parquet to replace it)")
        if not self.single and kind == pafs.FileType.Directory:
            # every .parquet under a folder manifest is read as part of it: a manifest written
            # into `clipray data synth`'s folder (beside its manifest.parquet and events.parquet)
            # was said written, and every read of it then failed on row ids repeated. So was one
            # written beside a part-00001.PARQUET (a copy tool's), which every reader refuses
            other = sorted(name for i in _files(self.fs, self.root, info)
                           if (i.base_name.lower().endswith(".parquet") or i.base_name.endswith(".parquet" + PARTIAL))
                           and not re.fullmatch(r"part-\d+\.parquet(\.partial)?", name := i.path[len(self.root) + 1:]))
            if other:
                raise ManifestError(f"{self.out}: holds other Parquet files ({', '.join(other[:3])}"
                                    f"{', ...' if len(other) > 3 else ''}), which a folder manifest would be read "
                                    "with: write it into an empty folder, or name a file *.parquet")
        try:  # up front, so a bad --out fails before a long source is read
            self.fs.create_dir(folder, recursive=True)
        except OSError as e:
            raise ManifestError(f"{self.out}: cannot create the folder {folder} ({e})") from e
        self._buf: list[Mapping[str, Any]] = []  # rows added, not yet checked
        self.rows = 0  # rows written (checked)
        self.shards: list[str] = []  # final names of the files begun; `.partial` until close()
        self._final = 0  # the shards under their final name so far, in order
        self._writer: pq.ParquetWriter | None = None  # the file being written
        self._in_shard = 0  # rows written to the file being written
        self._ids = RowIds() if keep_row_ids else None
        self._videos = VideoPaths()
        self.on_bad, self.tally = on_bad, tally

    def add(self, row: Mapping[str, Any]) -> None:
        """Take `row` (kept as it is until its buffer is written: give each row its own dict)."""
        self._buf.append(row)
        # a shard's last buffer is no longer than its room, so a shard holds rows_per_shard rows
        room = ROWS_PER_GROUP if self.single else min(ROWS_PER_GROUP, self.rows_per_shard - self._in_shard)
        if len(self._buf) >= room:
            self._flush()

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> "ManifestWriter":
        for r in rows:
            self.add(r)
        return self

    def _flush(self) -> None:
        """Check the buffered rows and write those kept to the current file (begun here if need
        be) as one row group; end the file when its shard is full."""
        batch = self._checked(self._buf)
        self._buf = []
        if not batch.num_rows:
            return
        self._open()
        # a full disk is pyarrow's OSError naming no file: `clipray data synth` ended in its traceback
        with naming(self._named(self.shards[-1]) + PARTIAL):
            self._writer.write_batch(batch)
        self.rows += batch.num_rows
        self._in_shard += batch.num_rows
        if self.tally is not None:
            self.tally.add_batch(batch)
        if not self.single and self._in_shard >= self.rows_per_shard:
            self._end_file()

    def _open(self) -> None:
        """Begin the next file, unless one is being written."""
        if self._writer is None:
            path = self.root if self.single else f"{self.root}/{shard_name(len(self.shards))}"
            self.shards.append(path)
            with naming(self._named(path) + PARTIAL):
                self._writer = pq.ParquetWriter(path + PARTIAL, self.schema, filesystem=self.fs)

    def _checked(self, raws: list[Mapping[str, Any]]) -> pa.RecordBatch:
        """The rows of `raws` to write (numbered from self.rows, or by their own row_id), checked
        by columns when they allow it, else one by one."""
        batch = self._by_columns(raws) if self.by_columns and raws else None
        if batch is not None:
            return pa.RecordBatch.from_arrays([batch.column(k) for k in COLUMNS], schema=self.schema)
        out = []
        for row in raws:
            n = self.rows + len(out)  # the row's number in the manifest, were it kept
            try:
                clean = check_row(row, f"row {n}")
                clean["row_id"] = n
                if self._ids is not None:
                    rid = row.get("row_id")
                    # (True is an int to Python, and 2**63 to Python and RowIds: Arrow's TypeError
                    # or OverflowError out of the writer, past on_bad. numpy's ints are taken, as
                    # the check by columns takes them)
                    int64 = isinstance(rid, numbers.Integral) and not isinstance(rid, bool) and -2**63 <= rid < 2**63
                    clean["row_id"] = rid = int(rid) if int64 else rid
                    if not int64 or not self._ids.add(rid):
                        raise ManifestError(f"row {n}: row_id {rid!r} is missing, not an int64 or repeated")
                self._videos.add(clean["video_id"], clean["path"], f"row {n}", n)
            except ManifestError as e:
                if self.on_bad is None:
                    raise
                self.on_bad(row, e)
                continue
            out.append(clean)
        return pa.RecordBatch.from_pylist(out, schema=self.schema)

    def _by_columns(self, raws: list[Mapping[str, Any]]) -> pa.RecordBatch | None:
        """`raws` checked a column at a time (`_checked_batch`), its row ids recorded; None when
        a value is not plain text or a number (bytes, a time as text: check_row reads or names
        those) or a row breaks a rule."""
        arrays = {}
        try:
            for k, want in zip(SCHEMA.names, SCHEMA.types):  # what the rows' values must read as
                if k == "row_id" and self._ids is None:
                    arrays[k] = pa.array(range(self.rows, self.rows + len(raws)), pa.int64())
                    continue
                a = pa.array([r.get(k) for r in raws])
                if not _reads_as(a.type, want):
                    return None
                arrays[k] = a.cast(want)
        except (pa.ArrowException, UnicodeError, OverflowError, TypeError, ValueError):
            return None  # mixed types, a lone surrogate, an int past int64: check_row names it
        return _checked_batch(pa.RecordBatch.from_pydict(arrays), self._ids, self._videos, self.rows)

    def _named(self, path: str) -> str:
        """A file's path as the caller gave `out` (with its s3:// or gs://), for an error."""
        return self.out.rstrip("/") + path[len(self.root):]

    def _end_file(self) -> None:
        writer, self._writer, self._in_shard = self._writer, None, 0
        if writer is not None:
            with naming(self._named(self.shards[-1]) + PARTIAL):
                writer.close()

    def finish(self) -> "ManifestWriter":
        """Write out every row, each file still under its `.partial` name (`close` renames them)."""
        if self._buf:
            self._flush()
        if not self.shards:  # no row at all still gives an (empty) manifest
            self._open()
        self._end_file()
        return self

    def close(self) -> "ManifestWriter":
        self.finish()
        if not self._final:
            # a folder manifest is written whole: an earlier, longer one's shards left were read
            # back with these (100k rows rewritten as 10k read back as 96k, and said valid).
            # Stopped from here on, the new shards' `.partial` names make it read as unfinished
            remove_old_shards(self.out, self.shards)
        for path in self.shards[self._final:]:
            with naming(self._named(path)):
                self.fs.move(path + PARTIAL, path)  # on an object store, a copy: seconds each
            self._final += 1
        return self

    def discard(self) -> None:
        """Delete what was written (a failed write leaves no manifest that reads as complete)."""
        self._end_file()
        for i, path in enumerate(self.shards):
            # a close() that failed midway renamed the first shards only
            name = path if i < self._final else path + PARTIAL
            if self.fs.get_file_info(name).type == pafs.FileType.File:
                self.fs.delete_file(name)

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if kind is None:
            self.close()
        else:  # a bad row midway: its .partial files left made the earlier manifest unreadable
            self.discard()


def old_shards(out: str) -> tuple[Any, list[str]]:
    """The filesystem of a folder manifest and the `part-*.parquet` (and `.partial`) files it
    holds now; none for a one-file manifest."""
    if out.endswith(".parquet"):
        return None, []
    fs, base = filesystem(out)  # the key as the writer takes it: a '#' in it is no fragment
    return fs, [info.path for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
                if info.type == pafs.FileType.File and re.fullmatch(r"part-\d+\.parquet(\.partial)?", info.base_name)]


def remove_old_shards(out: str, new: list[str]) -> None:
    """A folder manifest is rewritten whole: stale `part-*.parquet` from a longer earlier run
    would otherwise be read back as part of this one (and `.partial` ones of a killed run linger).

    They go once the new shards `new` are whole under their `.partial` names, which a run
    stopped while they go (one delete per shard: seconds for HowTo100M's ~545 on an object
    store) leaves, so the folder reads as unfinished, not as the old shards left, a smaller,
    complete manifest. Deleted before the new shards were written, a run failing midway (a bad
    annotation line deep in a big source, a full disk) lost the manifest an earlier run wrote."""
    fs, old = old_shards(out)
    keep = {path + PARTIAL for path in new}
    for path in old:
        if path not in keep:
            fs.delete_file(path)


def write_manifest(rows: Iterable[Mapping[str, Any]], out: str | Path,
                   rows_per_shard: int = 1_000_000, metadata: Mapping[str, Any] | None = None,
                   keep_row_ids: bool = False) -> int:
    """Validate and write rows; returns the number of rows written."""
    with ManifestWriter(out, rows_per_shard, metadata, keep_row_ids) as w:
        w.extend(rows)
    return w.rows


def _as_uri(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


# How long a failing GCS request is retried: Google's truncated exponential backoff (1, 2, 4, 8,
# 16 s) rides out half a minute of a transient error (503, 429), and no credentials or network
# is an error line in under a minute (`data check`: 53 s; with pyarrow's default, over 15 minutes)
GCS_RETRY_S = 30


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a manifest path or URI. An object store key is taken
    as written, as s3fs/gcsfs take it for the videos and skip files beside the manifest:
    pyarrow's URI parsing would refuse a space or a non-ASCII letter, cut a key at '#' or '?'
    (writing and reading another place) and decode '%20'. A file:/// URI is the local path
    after its scheme, as written, as the video decoder (`clipray.video.open_source`) opens it."""
    uri = _as_uri(path)
    if uri.startswith("file:///"):
        return pafs.LocalFileSystem(), uri[len("file://"):]
    scheme, _, rest = uri.partition("://")
    if scheme in ("s3", "gs", "gcs") and not rest.strip("/"):  # pyarrow would list every bucket
        raise ManifestError(f"{path}: no bucket (write {scheme}://BUCKET/manifest)")
    if scheme in ("s3", "gs", "gcs"):
        if rest.startswith("/") or "//" in rest.rstrip("/"):  # pyarrow's ArrowInvalid traceback at the read
            raise ManifestError(f"{path}: an empty name between two '/' (a key is taken as written: "
                                f"write {scheme}://{'/'.join(p for p in rest.split('/') if p)})")
        # GCS's client retries a failing request for 15 minutes: a gs:// manifest without
        # credentials held `data check` and `train` that long without a word
        retry = f"?retry_limit_seconds={GCS_RETRY_S}" if scheme != "s3" else ""
        fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{rest.split('/', 1)[0]}{retry}")
        return fs, rest.rstrip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as e:  # a scheme pyarrow has no filesystem for (https://, S3://): a traceback
        raise ManifestError(f"{path}: {e} (a manifest is a local path or an s3://, gs:// or hdfs:// URI)") from None


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """Around a write of `path`: an OSError that names no file is raised again naming `path`.
    A full disk, a quota or a file size limit met while writing (Python's file objects,
    pyarrow's writers) is an OSError with an errno and no file name, which the commands
    (clipray.cli) could not name, so they ended in its traceback."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or not e.errno:  # (an object store's error keeps its own words)
            raise
        # an object store's own words (its key, bucket, service error) say more than the errno
        why = os.strerror(e.errno) if "://" not in str(path) else str(e.strerror or e).splitlines()[0][:300]
        raise OSError(e.errno, why, str(path)) from e


def replace_whole(fs: Any, path: str, local: bool, write: Callable[[str], Any]) -> None:
    """`write(tmp)`, then `tmp` moved over the file `path` of the fsspec filesystem `fs`. A local
    file is written under a `.partial` name, which a failed write removes: written in place, a
    write cut midway (a full disk) left a file that read as whole. An object store's PUT is whole
    already, so there it is written in place."""
    tmp = path + PARTIAL if local else path
    try:
        write(tmp)
        if tmp != path:
            fs.mv(tmp, path)
    except BaseException:
        if tmp != path:
            with contextlib.suppress(OSError):
                fs.rm_file(tmp)
        raise


def fsspec_path(path: str) -> tuple[Any, str]:
    """The fsspec filesystem and path of a local path or URI, the path as written, as
    `filesystem` takes it for pyarrow. fsspec's url_to_fs and open read '::' anywhere in a path
    as a chain of filesystems and drop all after it: a run folder `runs/exp::2` had its
    result.json, metrics.csv, export and skip files written over one another as a file `runs/exp`."""
    import fsspec

    protocol = path.split("://", 1)[0] if "://" in path else "file"
    cls = fsspec.get_filesystem_class(protocol)
    fs = fsspec.filesystem(protocol, **cls._get_kwargs_from_urls(path))
    return fs, fs._strip_protocol(path)


def prepare_lock(path: str) -> str:
    """The lock file (a hidden `.NAME.prepare.lock` beside it) that `clipray data prepare` holds
    while it writes the local manifest `path`."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.prepare.lock")


def _stopped(path: str) -> str:
    """How an unfinished manifest came to be, and what to do: a `clipray data prepare` writing
    it now (holding its lock; a rewrite keeps the old shards until the new ones are whole), else
    a write that stopped midway. Said to have stopped, a manifest being written was written
    again (a second prepare is refused) or thrown away."""
    import fcntl

    if "://" not in path:
        try:
            with open(prepare_lock(path)) as f:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return "a `clipray data prepare` is writing it now); wait for it to finish"
        except OSError:  # no lock file, or a filesystem without locks
            pass
    return "the write that made it stopped midway); write it again"


def manifest_files(path: str, only: list[str] | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of a manifest (a file or a directory of shards), sorted, each one's
    footer checked (`_check_headers`); with `only`, the footers of those files alone (a worker
    streaming one shard of hundreds)."""
    try:
        fs, root = filesystem(path)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            if fs.get_file_info(root + PARTIAL).type == pafs.FileType.File:
                raise ManifestError(f"{path}: an unfinished manifest (only {path}{PARTIAL}: {_stopped(path)}")
            raise ManifestError(f"manifest not found: {path}")
        partial = 0
        if info.type == pafs.FileType.File:
            files, infos = [root], [info]
        else:
            infos = _files(fs, root, info)
            listed = [i.path for i in infos]
            files = sorted(p for p in listed if p.endswith(".parquet"))
            partial = sum(p.endswith(".parquet" + PARTIAL) for p in listed)
            cased = [p.rsplit("/", 1)[-1] for p in listed if p.lower().endswith(".parquet") and p not in files]
            if cased:  # (left out of the read, without a word, as a folder's other files are)
                raise ManifestError(f"{path}: {cased[0]} is read as no shard of the manifest: its name does not end "
                                    "in .parquet, in lower case; rename it (or move it out)")
    except OSError as e:  # an object store it cannot reach (network, credentials, bucket, permission)
        raise ManifestError(f"{path}: cannot read the manifest ({str(e).splitlines()[0][:300]})") from None
    if partial:
        # a write stopped before or while close() renamed its shards (each a copy on an
        # object store): the finished names alone would read as a smaller, complete manifest
        raise ManifestError(f"{path}: an unfinished manifest ({partial} *.parquet{PARTIAL} shard"
                            f"{'s' if partial > 1 else ''}: {_stopped(path)}")
    if not files:
        raise ManifestError(f"no .parquet files under {path}")
    # one command asks for the files several times (data check: 3, a training start: 4-5), and
    # each footer is a read (~0.7 s for 100 shards in object storage): a file whose listing
    # (size, modification time) is the one already checked is not read again
    # (a file listed without a time is never taken as checked)
    listing = {i.path: (fs.type_name, i.path, i.size, i.mtime_ns) for i in infos if i.mtime_ns is not None}
    unchecked = [f for f in only or files if listing.get(f) not in _CHECKED]
    _CHECKED.update(listing[f] for f in _check_headers(fs, unchecked, path, files) if f in listing)
    return fs, files


_CHECKED: set[tuple] = set()  # (filesystem, path, size, mtime_ns) of each file whose footer passed


SIGNED_SPAN = 1 << 16  # bytes read at each end of a file to sign it


def file_signature(fs: pafs.FileSystem, path: str, parquet: bool = False) -> list:
    """[its size in bytes, a hash of its first and last 64 kB]: what a copy or a move of a file
    keeps, unlike its path. A Parquet file's footer (schema, row groups, every column's
    statistics) and a torch zip's central directory (every entry's CRC) are at the end, a
    safetensors header (every tensor's offsets) at the start. `parquet=True`: pyarrow's own
    ArrowInvalid unless both ends carry Parquet's magic bytes (a file cut short, or of another
    format), as opening it would raise."""
    import hashlib

    with fs.open_input_file(path) as f:
        size = f.size()
        ends = f.read_at(min(size, SIGNED_SPAN), 0) + f.read_at(min(size, SIGNED_SPAN), max(0, size - SIGNED_SPAN))
    if parquet and (size < 12 or ends[:4] != b"PAR1" or ends[-4:] != b"PAR1"):
        raise pa.ArrowInvalid(f"{path}: not a Parquet file ({size} bytes without Parquet's magic bytes at "
                              "both ends: cut short, or of another format)")
    return [size, hashlib.sha256(ends).hexdigest()[:16]]


def manifest_signature(path: str, parquet: bool = False) -> list[list]:
    """Each Parquet file of a manifest as [its path inside the manifest folder (a one-file
    manifest: its name), *file_signature]: what a copy or a move of the manifest keeps.
    `parquet=True`: a ManifestError (`reading`'s) naming the first file that is no Parquet file."""
    from concurrent.futures import ThreadPoolExecutor

    fs, files = manifest_files(path)
    root = filesystem(path)[1].rstrip("/")
    # a few at a time: a streamed manifest in object storage has hundreds of shards, each two reads
    with ThreadPoolExecutor(16) as pool, reading(path):
        signs = list(pool.map(lambda f: file_signature(fs, f, parquet), files))
    return [[f.rsplit("/", 1)[-1] if files == [root] else f[len(root):].lstrip("/"), *sign]
            for f, sign in zip(files, signs)]


def manifest_listing(path: str) -> list[tuple[str, int, int]]:
    """Every file of a manifest (the file, or every file under its folder, unfinished shards
    too) as (path, size, modification time in ns), from one listing: writing the manifest again
    changes it (new files, new times) without a file being opened."""
    fs, root = filesystem(path)
    return sorted((i.path, i.size, i.mtime_ns) for i in _files(fs, root, fs.get_file_info(root)))


def _files(fs: pafs.FileSystem, root: str, info: pafs.FileInfo) -> list[pafs.FileInfo]:
    """The files `root` (its FileInfo `info`) names: itself, or every file under its folder."""
    if info.type == pafs.FileType.Directory:
        return [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    return [info] if info.type == pafs.FileType.File else []


def _check_headers(fs: pafs.FileSystem, files: list[str], path: str, every: list[str]) -> list[str]:
    """Read the footers of `files`, some of the manifest's `every` file (16 at a time: a streamed
    manifest has hundreds of shards), so a wrong file fails here with its name rather than later
    in a Ray task: not Parquet (a later file that is none is named by the read, `reading`), or
    lacking the columns every manifest row must have, or with one of another type. Only the
    first file's was read, and a later shard's int video_id or caption was read as text, a text
    or bool start as seconds. Returns the files whose footer was read and passed."""
    from concurrent.futures import ThreadPoolExecutor

    def schema(file: str) -> pa.Schema | None:
        try:
            return pq.read_schema(file, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as e:
            if file != every[0]:
                return None
            raise ManifestError(f"{_where(path, file, len(every) > 1)}: not a Parquet manifest "
                                f"({str(e).splitlines()[0][:200]})") from None

    with ThreadPoolExecutor(16) as pool:
        schemas = list(pool.map(schema, files))
    for file, schema in zip(files, schemas):
        if schema is None:
            continue
        where = _where(path, file, len(every) > 1)
        missing = [f.name for f in SCHEMA if not f.nullable and f.name not in schema.names]
        if missing:
            raise ManifestError(f"{where}: not a clipray manifest, it has no {', '.join(missing)} column(s); "
                                "write one with `clipray data prepare` (`generic` for your own CSV/JSONL)")
        wrong = [f"{f.name} is {f.type}, not {SCHEMA.field(f.name).type}" for f in schema
                 if f.name in COLUMNS and not _reads_as(f.type, SCHEMA.field(f.name).type)]
        if wrong:
            raise ManifestError(f"{where}: column types differ from the manifest schema: {'; '.join(wrong)}")
    return [file for file, schema in zip(files, schemas) if schema is not None]


def _where(path: str | Path, file: str, folder: bool) -> str:
    """A manifest file as an error names it: the manifest, and the file's name in a folder."""
    return f"{path} ({file.rsplit('/', 1)[-1]})" if folder else str(path)


def _reads_as(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether a column of type `have` reads into the schema's `want` without loss or parsing:
    ints as float seconds, large strings as strings, an all-null column as anything."""
    if have == want or pa.types.is_null(have):
        return True
    if pa.types.is_dictionary(have):
        have = have.value_type
    if pa.types.is_string(want):
        return pa.types.is_string(have) or pa.types.is_large_string(have)
    if pa.types.is_floating(want):
        return pa.types.is_integer(have) or pa.types.is_floating(have)
    return pa.types.is_integer(want) and pa.types.is_integer(have)


@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Around a read of a manifest's files as one dataset: a later shard that is no Parquet (empty,
    cut short) was pyarrow's traceback out of `clipray train` (`_check_headers` names the first
    file only when it is no Parquet); `clipray data check` already said it in a line."""
    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise ManifestError(f"{path}: cannot be read as a manifest ({str(e).splitlines()[0][:300]})") from None


def read_manifest(path: str | Path, columns: Sequence[str] | None = None,
                  split: str | None = None, validate: bool = True) -> pa.Table:
    """Read a (small enough) manifest whole; large ones go through `clipray.pipeline`. Validated,
    its table holds the rows `iter_checked` gives: every row of every split checked, a bad one
    named by its file and row. (A check of its own let a null or repeated row_id through, and
    returned a split ' train' it had read as 'train', so split='train' dropped its row.)"""
    if validate:
        table = pa.Table.from_batches(checked_batches(path, split), schema=CHECKED).select(list(COLUMNS))
    else:
        fs, files = manifest_files(str(path))
        ds = pads.dataset(files, filesystem=fs, format="parquet", schema=SCHEMA)
        with reading(path):
            table = ds.to_table(filter=(pads.field("split") == split) if split else None)
    return table.select(list(columns)) if columns else table


def manifest_metadata(path: str | Path) -> dict[str, Any]:
    fs, files = manifest_files(str(path))
    meta = pq.read_schema(files[0], filesystem=fs).metadata or {}
    out = {}
    for k, v in meta.items():
        # (another tool's bytes that are not UTF-8, shown escaped: a UnicodeDecodeError
        # traceback out of `clipray data check`, after it had said the manifest valid)
        k = k.decode(errors="backslashreplace")
        if k.startswith("clipray.") or k in ("pandas", "ARROW:schema"):
            continue
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v.decode(errors="backslashreplace")
    return out


def resolve_path(path: str, root: str) -> str:
    """A manifest path made absolute: URIs and absolute paths as they are, else under root."""
    if "://" in path or path.startswith("/") or not root:
        return path
    return f"{root.rstrip('/')}/{path}"


def default_root(manifest: str) -> str:
    """Relative video paths resolve against the folder holding the manifest: the folder a
    manifest file is in, or a folder of shards itself. Told by what the path is; by its name
    (`*.parquet` a file) only where it cannot be looked up: a file `clips.pq` was taken for a
    folder, and every clip in it was skipped as a missing file."""
    p = manifest.rstrip("/")
    try:
        fs, where = filesystem(p)
        kind = fs.get_file_info(where).type
    except (OSError, ValueError):  # a store it cannot reach, a path it refuses (ManifestError)
        kind = None
    if kind == pafs.FileType.File or (kind != pafs.FileType.Directory and p.endswith(".parquet")):
        p = p.rsplit("/", 1)[0] if "/" in p else "."
    return p if "://" in p else str(Path(p).resolve())


# Distinct captions are counted exactly up to this many; HowTo100M has ~136M ASR lines and a
# set of them would cost more memory than the whole streamed write.
MAX_DISTINCT = 2_000_000


@dataclass
class Tally:
    """Running counts over a stream of manifest rows: memory holds the video ids and at most
    MAX_DISTINCT caption hashes, however many rows."""
    rows: int = 0
    per_split: dict[str, int] = field(default_factory=dict)
    videos: dict[str, str] = field(default_factory=dict)  # video id -> the split of its first row
    shared: dict[str, None] = field(default_factory=dict)  # (ordered) ids with rows in more than one split
    captions: set[int] | None = field(default_factory=set)  # hashes; None past MAX_DISTINCT

    def add_batch(self, batch: pa.RecordBatch) -> None:
        """Count a batch of checked rows (`checked_batches`, the manifest writer's), a column at a time."""
        import pyarrow.compute as pc

        self.rows += batch.num_rows
        for c in pc.value_counts(batch.column("split")).to_pylist():
            self.per_split[c["values"]] = self.per_split.get(c["values"], 0) + c["counts"]
        pairs = pa.Table.from_batches([batch.select(["video_id", "split"])]).group_by(["video_id", "split"]).aggregate([])
        splits = {s: sys.intern(s) for s in self.per_split}  # one string per split, not one per video
        for vid, split in zip(pairs.column("video_id").to_pylist(), pairs.column("split").to_pylist()):
            if self.videos.setdefault(vid, splits[split]) != split:
                self.shared[vid] = None
        if self.captions is not None:
            self.captions.update(map(hash, batch.column("caption").to_pylist()))
            if len(self.captions) > MAX_DISTINCT:
                self.captions = None

    @property
    def distinct_captions(self) -> int | None:
        return None if self.captions is None else len(self.captions)

    def shared_note(self) -> str | None:
        """Videos with rows in two or more splits, said (a model tested on one split has trained
        on these videos), or None."""
        if not self.shared:
            return None
        first = next(iter(self.shared))
        n = len(self.shared)
        return (f"{n:,} video{' has' if n == 1 else 's have'} rows in more than one split (e.g. {first}): "
                "a split evaluated on them shares videos with the others")

    def __str__(self) -> str:
        splits = ", ".join(f"{k} {v:,}" for k, v in sorted(self.per_split.items())) or "none"
        caps = f"more than {MAX_DISTINCT:,}" if self.captions is None else f"{len(self.captions):,}"
        shared = f"; {note}" if (note := self.shared_note()) else ""
        return f"{self.rows:,} rows ({splits}), {len(self.videos):,} videos, {caps} distinct captions{shared}"


PROGRESS_S = 10.0  # long commands (data prepare, check and synth, edit, index) print a progress line this often


class Every:
    """`if every(): print(...)` at most once per `seconds` (None: never), for progress lines."""

    def __init__(self, seconds: float | None):
        self.seconds, self.last = seconds, time.perf_counter()

    def __call__(self) -> bool:
        if self.seconds is None or time.perf_counter() - self.last < self.seconds:
            return False
        self.last = time.perf_counter()
        return True


class RowIds:
    """The row ids met so far, to catch a repeated one: a byte per id below 2**28, since every
    clipray writer numbers rows 0, 1, ... (136-170 MB for HowTo100M's 136M rows), and a set for any
    id above that."""

    DENSE = 1 << 28

    def __init__(self) -> None:
        self.dense, self.sparse = bytearray(), set()

    def add(self, rid: int) -> bool:
        """Record `rid`; False when it was met before."""
        if 0 <= rid < self.DENSE:
            self._room(rid)
            if self.dense[rid]:
                return False
            self.dense[rid] = 1
            return True
        if rid in self.sparse:
            return False
        self.sparse.add(rid)
        return True

    def _room(self, rid: int) -> None:
        if rid >= len(self.dense):
            self.dense.extend(bytes(max(rid + 1, len(self.dense) * 5 // 4, 1 << 16) - len(self.dense)))

    def add_all(self, rids: Any) -> bool:
        """Record every id of the int64 array `rids`; False, and none recorded, when one was met
        before or is in `rids` twice."""
        import numpy as np

        inside = (rids >= 0) & (rids < self.DENSE)
        dense, sparse = rids[inside], rids[~inside].tolist()
        if len(dense):
            self._room(int(dense.max()))
        seen = np.frombuffer(self.dense, np.uint8)
        if (seen[dense].any() or not (np.all(dense[1:] > dense[:-1]) or len(np.unique(dense)) == len(dense))
                or len(set(sparse)) < len(sparse) or not self.sparse.isdisjoint(sparse)):
            return False
        seen[dense] = 1
        self.sparse.update(sparse)
        return True


class VideoPaths:
    """The path each video id names, and the row that first named it: a video_id naming two
    files was taken for one video, and evaluation scored the captions of one file against the
    clip of the other. About 280 bytes a video (324 MB for HowTo100M's 1.2M videos), whatever
    the rows."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[str, int, int]] = {}  # video id -> (path, place, row)
        self.places: list[str] = [""]  # the files rows are numbered in ("": the writer's); now the last

    def new(self, video_ids: pa.Array, paths: pa.Array, first: int) -> dict | None:
        """The videos of a batch of rows (its first row: `first`) met for the first time, as
        `self.first` will hold them; None when one names two paths (or one path two ways: `add`
        tells them apart), or another file than before."""
        rows = pa.table({"v": video_ids, "p": paths, "i": pa.array(range(first, first + len(paths)), pa.int64())})
        pairs = rows.group_by(["v", "p"]).aggregate([("i", "min")])
        vids, paths, firsts = (pairs.column(k).to_pylist() for k in ("v", "p", "i_min"))
        new = dict(zip(vids, zip(paths, [len(self.places) - 1] * len(vids), firsts)))
        if len(new) < len(vids):  # a video of two paths in the batch
            return None
        for vid in new.keys() & self.first.keys():  # (set operations: a batch may hold 65k videos)
            if not _same_file(new.pop(vid)[0], self.first[vid][0]):
                return None
        return new

    def add(self, vid: str, path: str, where: str, row: int) -> None:
        """Record the video of row `row` (named `where`); ManifestError naming it and the row
        that first named its video, when that gave another path."""
        known, place, at = self.first.setdefault(vid, (path, len(self.places) - 1, row))
        if not _same_file(known, path):
            earlier = f"{self.places[place]} row {at}".lstrip()  # (the writer's rows: "row N")
            raise ManifestError(f"{where}: video_id {vid!r} names {path!r}, but {earlier} gave it {known!r}; "
                                "give each video its own video_id")


def _same_file(a: str, b: str) -> bool:
    """Whether two manifest paths name one file: as written, or a local path's './' and '../'
    aside (an object store key is taken as written)."""
    return a == b or ("://" not in a + b and posixpath.normpath(a) == posixpath.normpath(b))


def _mixed_hint(files: list[str]) -> str:
    """What a repeated row id most likely means when the manifest is a folder of several files."""
    if len(files) < 2:
        return ""
    names = ", ".join(f.rsplit("/", 1)[-1] for f in files[:4]) + (", ..." if len(files) > 4 else "")
    return (f"; a manifest folder must hold the shards of one manifest only (its files: {names}): "
            "give one file or one manifest's folder")


def check_unique_ids(path: str) -> None:
    """Raise ManifestError when rows of the manifest share a row_id (batches, skip reports and
    evaluation join on it). Reads the row_id column only (8 bytes a row) and sorts a copy of
    it: for manifests counted up front, not for a streamed HowTo100M. (Arrow's count_distinct
    built a hash table of about 90 bytes a row: 0.9 GB in the driver for a 10M-row manifest.)"""
    import numpy as np

    fs, files = manifest_files(path)
    with reading(path):
        ids = pads.dataset(files, filesystem=fs, schema=SCHEMA).to_table(columns=["row_id"])["row_id"]
    ids = np.sort(ids.drop_null().to_numpy())  # (a missing row id is iter_checked's to name)
    repeated = ids[1:][ids[1:] == ids[:-1]]
    if len(repeated):
        raise ManifestError(f"{path}: row_id {int(repeated[0])} is used by more than one row" + _mixed_hint(files))


def iter_checked(path: str | Path, split: str | None = None,
                 batch_rows: int = 65536) -> Iterator[dict[str, Any]]:
    """Every row of a manifest (of `split`, if given), validated and normalised by `check_row`,
    read file by file in batches, so memory stays flat however many rows (but for a byte per
    row id, `RowIds`); a bad row or a repeated row id raises ManifestError naming its file and
    row."""
    for batch in checked_batches(path, split, batch_rows):
        yield from batch.to_pylist()


# the checked rows' columns, in the order of check_row's keys
CHECKED = pa.schema([SCHEMA.field(k) for k in ("row_id", "video_id", "path", "caption", "split", "start", "end",
                                               "timestamp", "duration", "group")])
# what str.strip() strips (tests check it against every code point's isspace())
WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
              "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def checked_batches(path: str | Path, split: str | None = None,
                    batch_rows: int = 65536) -> Iterator[pa.RecordBatch]:
    """The rows `iter_checked` yields, a batch at a time, as columns (CHECKED). Each batch is
    checked with Arrow's kernels a column at a time (`_checked_batch`); only a batch where a row
    breaks a rule is read row by row, by `check_row` as ever, which names the row and the rule.
    Row by row, `clipray data check` took 6 s a million rows: 14 minutes for HowTo100M."""
    import pyarrow.compute as pc

    fs, files = manifest_files(str(path))
    ids, videos = RowIds(), VideoPaths()
    for f in files:
        where = _where(path, f, len(files) > 1)
        videos.places.append(where)
        first = 0  # the file's row number of the batch's first row
        batches = pads.dataset(f, filesystem=fs, format="parquet", schema=SCHEMA).to_batches(batch_size=batch_rows)
        for raw in _batches(batches, where):
            batch = _checked_batch(raw, ids, videos, first)
            if batch is None:
                rows = check_rows(_text_rows(raw, where, first, ids, files, videos), where, first, ids, files, videos)
                batch = pa.RecordBatch.from_pylist(rows, schema=CHECKED)
            first += raw.num_rows
            if split is not None:
                batch = batch.filter(pc.equal(batch.column("split"), split))
            yield batch


def check_rows(raws: list[dict[str, Any]], where: str, first: int, ids: RowIds, files: list[str],
               videos: VideoPaths | None = None) -> list[dict]:
    """The rows of a batch (`first`: the file's row number of its first), each checked by
    check_row: the first bad row, repeated row id or video of two paths (`videos`, when given)
    raises ManifestError naming it."""
    out = []
    for i, raw in enumerate(raws, first):
        row = check_row(raw, f"{where} row {i}")
        if raw["split"] != row["split"]:  # (ManifestWriter strips it; a hand-made file may not)
            raise ManifestError(f"{where} row {i}: split {raw['split']!r} has spaces around it, and the "
                                f"readers take a split as written: write {row['split']!r}")
        if not isinstance(raw["row_id"], int):
            raise ManifestError(f"{where} row {i}: row_id is missing ({raw['row_id']!r})")
        if not ids.add(raw["row_id"]):
            raise ManifestError(f"{where} row {i}: row_id {raw['row_id']} repeats an earlier row's"
                                + _mixed_hint(files))
        if videos is not None:
            videos.add(row["video_id"], row["path"], f"{where} row {i}", i)
        out.append({"row_id": raw["row_id"], **row})
    return out


def _text_rows(raw: pa.RecordBatch, where: str, first: int, ids: RowIds, files: list[str],
               videos: VideoPaths | None) -> list[dict[str, Any]]:
    """`raw.to_pylist()`, for check_rows; a text value that is not UTF-8 (another tool's writer
    need not check) raises ManifestError naming its row, after the rows before it are checked
    (an earlier bad row is named first, as check_rows names it). to_pylist's UnicodeDecodeError
    was a traceback out of `clipray data check`, read_manifest and training's manifest check."""
    bad = None  # (row, column, value) of the first value that is not UTF-8
    for k in ("video_id", "path", "caption", "split", "group"):
        try:
            raw.column(k).validate(full=True)
        except pa.ArrowInvalid:
            for i, v in enumerate(raw.column(k).cast(pa.binary()).to_pylist()):
                if bad is not None and i >= bad[0]:
                    break
                if v is not None and not _is_utf8(v):
                    bad = (i, k, v)
                    break
    if bad is None:
        return raw.to_pylist()
    i, k, v = bad
    check_rows(raw.slice(0, i).to_pylist(), where, first, ids, files, videos)
    raise ManifestError(f"{where} row {first + i}: '{k}' is not UTF-8 text ({v[:80]!r}): write it "
                        "again as UTF-8")


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def nan_as_null(times: Any) -> Any:
    """A float column of times with NaN as null (none), as `as_seconds` reads a NaN."""
    import pyarrow.compute as pc

    return pc.if_else(pc.is_nan(times), pa.scalar(None, pa.float64()), times)


def _checked_batch(raw: pa.RecordBatch, ids: RowIds | None = None, videos: VideoPaths | None = None,
                   first: int = 0) -> pa.RecordBatch | None:
    """`raw`'s rows as `check_rows` gives them, each of its rules applied to whole columns, and
    their row ids recorded in `ids` (when given: else row ids are not checked for repeats) and
    their videos' paths in `videos` (likewise; `first`: the number of `raw`'s first row); None
    (and nothing recorded) when a row breaks a rule, for check_rows to name it."""
    import pyarrow.compute as pc

    def bad(mask: pa.Array) -> bool:  # a null (an unknown) is no row found bad
        return mask.true_count > 0

    try:
        for k in ("video_id", "path", "caption", "split", "group"):
            raw.column(k).validate(full=True)  # UTF-8 (check_row's rows are Python's text)
    except pa.ArrowInvalid:
        return None
    text = {k: pc.utf8_trim(raw.column(k), WHITESPACE) for k in ("video_id", "path", "caption")}
    if (raw.column("row_id").null_count or any(raw.column(k).null_count for k in ("video_id", "path", "caption"))
            or any(bad(pc.equal(c, "")) for c in text.values())
            or not pc.all(pc.is_in(raw.column("split"), pa.array(SPLITS)), min_count=0).as_py()):
        return None
    start, end, ts, dur = (nan_as_null(raw.column(k)) for k in ("start", "end", "timestamp", "duration"))
    lo, hi = pc.coalesce(start, 0.0), pc.coalesce(end, dur, float("inf"))
    if (any(bad(pc.is_inf(c)) for c in (start, end, ts, dur))
            or bad(pc.not_equal(pc.is_null(start), pc.is_null(end))) or bad(pc.less(start, 0))
            or bad(pc.less_equal(end, start)) or bad(pc.less_equal(dur, 0))
            or bad(pc.invert(pc.and_(pc.less_equal(lo, ts), pc.less_equal(ts, hi))))):
        return None
    new = videos.new(text["video_id"], text["path"], first) if videos is not None else {}
    if new is None or (ids is not None and not ids.add_all(raw.column("row_id").to_numpy())):
        return None
    if videos is not None:
        videos.first.update(new)
    group = raw.column("group")
    group = pc.if_else(pc.or_kleene(pc.is_null(group), pc.equal(group, "")), text["video_id"], group)
    return pa.RecordBatch.from_arrays([raw.column("row_id"), text["video_id"], text["path"], text["caption"],
                                       raw.column("split"), start, end, ts, dur, group], schema=CHECKED)


def _batches(batches: Iterator[pa.RecordBatch], where: str) -> Iterator[pa.RecordBatch]:
    """Record batches of one file; one that cannot be read (cut short) fails naming the file."""
    with reading(where):
        yield from batches


def check_manifest(path: str | Path, progress_s: float | None = None) -> Tally:
    """Validate and count every row of a manifest (`clipray data check`); with `progress_s`, a
    line on stderr at most that often, with the rows checked of the footers' total, the rate and
    an ETA (a bare count said nothing of how far a 136M-row manifest had got)."""
    tally, every, t0 = Tally(), Every(progress_s), time.perf_counter()
    total = _footer_rows(path) if progress_s is not None else None
    for batch in checked_batches(path):
        tally.add_batch(batch)
        if every():
            rate = tally.rows / max(time.perf_counter() - t0, 1e-3)
            of, eta = ("", "") if total is None else (f"/{total:,} rows ({100 * tally.rows / max(total, 1):.0f}%)",
                                                      f", ETA {max(total - tally.rows, 0) / rate:,.0f}s")
            print(f"  checked {tally.rows:,}{of or ' rows'}, {rate:,.0f} rows/s{eta}", file=sys.stderr, flush=True)
    return tally


def shard_rows(path: str | Path, listed: tuple[Any, list[str]] | None = None) -> list[int]:
    """Each file's row count, from the manifest's Parquet footers (no row is read; 16 at a
    time: a streamed manifest in object storage has hundreds of shards). `listed`: its
    `manifest_files`, if already listed."""
    from concurrent.futures import ThreadPoolExecutor

    fs, files = listed or manifest_files(str(path))
    with ThreadPoolExecutor(16) as pool, reading(path):
        return list(pool.map(lambda f: pq.read_metadata(f, filesystem=fs).num_rows, files))


def _footer_rows(path: str | Path) -> int | None:
    """The manifest's row count from its files' Parquet footers (`shard_rows`), or None when
    one cannot be read: iter_checked then names the file and what is wrong with it. A manifest
    that cannot be listed fails here, as iter_checked would, not twice (an unreachable store's
    retries, twice: `data check gs://...` without credentials took 95 s, not 53)."""
    listed = manifest_files(str(path))
    try:
        return sum(shard_rows(path, listed))
    except Exception:  # noqa: BLE001 - only the progress line's total is lost
        return None
