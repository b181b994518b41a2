"""What every dataset adapter shares: the source spec, the run context, the one-walk file index.

An adapter is a generator `rows(ctx)` that reads a release's annotation files and yields
manifest rows (plain dicts in the `clipray.manifest` schema, plus a private `_where` naming the
annotation file and entry the row came from). It never writes anything itself: `prepare()` in
`clipray.sources` owns the writer and the report. What an adapter cannot turn into a row it
tells the context: `ctx.missing(video_id)` for videos not found under the root (their rows are
dropped) and `ctx.reject(where, reason)` for annotation entries that are unusable (empty
caption, empty span, ...). Both end up, counted, in the `PrepareReport`.

Local roots and URI roots (s3://, gs://, file://) go through the same code: files are listed
once (pyarrow.fs for URIs, os.walk locally), annotation files are opened through the same
helpers, and row paths are absolute local paths or URIs, so a manifest stays valid wherever it
is copied to.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TextIO

from clipray.manifest import ManifestError, filesystem, utf8_text

# Extensions counted as video files, in order of preference when one stem has several files
# (CLIP4Clip's MSR-VTT loader tries .mp4 before .webm; the rest follow the releases' own), with
# the Content-Type the served app sends each as (Python's mimetypes reads the machine's
# /etc/mime.types, where .ts is a Qt translation)
VIDEO_TYPES = {"mp4": "video/mp4", "webm": "video/webm", "mkv": "video/x-matroska", "avi": "video/x-msvideo",
               "mov": "video/quicktime", "m4v": "video/mp4", "mpg": "video/mpeg", "mpeg": "video/mpeg",
               "wmv": "video/x-ms-wmv", "flv": "video/x-flv", "3gp": "video/3gpp", "ogv": "video/ogg",
               "ts": "video/mp2t"}
VIDEO_EXTS = tuple(VIDEO_TYPES)

# Options every source accepts, on top of its own.
COMMON_OPTIONS: dict[str, Any] = {
    "annotations": None,  # folder holding the annotation files (default: the root)
    "rows_per_shard": 1_000_000,  # rows per Parquet shard when `out` is a directory
}
POSITIVE_OPTIONS = ("rows_per_shard", "workers")  # counts: 0 or less is a mistake


class SourceError(ValueError):
    """A release cannot be prepared (missing file, malformed annotation); the message says where."""


def is_uri(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    if not is_uri(path):
        return os.path.isfile(path)
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.File


class NotUtf8(SourceError):
    """An annotation file holds bytes that are not UTF-8 (a spreadsheet saved as cp1252, say)."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}: line {line} is not UTF-8 text ({reason}); re-save the file as UTF-8")
        self.path, self.line = path, line


class _Utf8Text(io.TextIOWrapper):
    """utf-8 text whose decoding errors name the file and the line, rather than a bare
    UnicodeDecodeError from somewhere inside a CSV or JSON parser."""

    def __init__(self, raw: Any, path: str):
        super().__init__(raw, encoding="utf-8-sig", newline="")
        self.path = path

    def _named(self, call: Callable, *args: Any) -> Any:
        try:
            return call(*args)
        except UnicodeDecodeError as e:
            raise NotUtf8(self.path, first_bad_utf8_line(self.path), e.reason) from None

    def read(self, size: int | None = -1) -> str:
        return self._named(super().read, size)

    def readline(self, size: int | None = -1) -> str:
        return self._named(super().readline, size)

    def __next__(self) -> str:
        return self._named(super().__next__)


def first_bad_utf8_line(path: str) -> int:
    """The 1-based line holding the file's first byte that is not UTF-8 (0: none), read in
    chunks so a multi-GB file costs no memory. The decoding error indexes into the bytes held
    back from the last chunk plus this one; held-back bytes are never a newline."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open_binary(path) as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                return line + e.object.count(b"\n", 0, e.start)
            line += chunk.count(b"\n")
    return 0


def open_text(path: str) -> TextIO:
    """A text handle on a local path or URI; utf-8 with any BOM (spreadsheet exports) removed.
    A byte that is not UTF-8 raises `NotUtf8`, naming the file and its line."""
    return _Utf8Text(open_binary(path), path)


def open_binary(path: str):
    if not is_uri(path):
        return open(path, "rb")
    fs, p = filesystem(path)
    return fs.open_input_stream(p)


def _subdirs(path: str) -> list[str]:
    if not is_uri(path):
        try:
            return sorted(e.path for e in os.scandir(path) if e.is_dir())
        except OSError:
            return []
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    sel = pafs.FileSelector(p, allow_not_found=True)
    scheme = path.split("://", 1)[0]
    return sorted(f"{scheme}://{i.path}" for i in fs.get_file_info(sel)
                  if i.type == pafs.FileType.Directory)


def split_ext(name: str) -> tuple[str, str]:
    """('video0', 'mp4') for 'video0.mp4'; only the LAST extension goes, as CLIP4Clip matches."""
    stem, dot, ext = name.rpartition(".")
    return (stem, ext.lower()) if dot and stem else (name, "")


class FileIndex:
    """The files under a root, listed by ONE walk, looked up by relative path, name or stem.

    `exts=None` keeps every file (DiDeMo names end in anything, even a bare '.'); otherwise
    only video extensions are kept, which also keeps caption CSVs of HowTo100M out of memory.
    The lookup tables are built on first use, so a 1.2M-file root pays only for the one it needs.
    """

    def __init__(self, root: str, exts: Iterable[str] | None = VIDEO_EXTS):
        self.root = root
        self.exts = None if exts is None else {e.lower() for e in exts}
        self.rels: list[str] = sorted(self._walk())

    def _keep(self, name: str) -> bool:
        if name.startswith("."):  # hidden files, macOS '._x.mp4' resource forks
            return False
        return self.exts is None or split_ext(name)[1] in self.exts

    def _walk(self) -> Iterator[str]:
        if is_uri(self.root):
            import pyarrow.fs as pafs

            fs, base = filesystem(self.root)
            base = base.rstrip("/")
            if fs.get_file_info(base).type == pafs.FileType.NotFound:
                # as a local root that is no folder: a typo listed nothing, and every video was
                # missing, an existing manifest replaced by an empty one (exit 0)
                raise SourceError(f"video root {self.root!r} not found: no object under it")
            for info in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
                if info.type == pafs.FileType.File and self._keep(info.base_name):
                    yield info.path[len(base):].lstrip("/")
            return
        if not os.path.isdir(self.root):
            raise SourceError(f"video root {self.root!r} is not a directory")
        seen: set[tuple[int, int]] = set()
        # followlinks: datasets are often symlinked onto big disks; `seen` stops link loops.
        # A folder reached twice (a link beside its target) is listed under the path walked
        # first: folders are walked in name order, not the file system's (ext4: by hash), so
        # the same tree gives the same paths on every machine.
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if self._keep(name):
                    yield name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")

    def __len__(self) -> int:
        return len(self.rels)

    def __contains__(self, rel: str) -> bool:
        return rel in self._relset

    @cached_property
    def _relset(self) -> set[str]:
        return set(self.rels)

    def get(self, rel: str) -> str | None:
        """The listed file `rel` names: itself, or else the one whose path is the same text in
        another Unicode form. Files made on a Mac keep 'é' as 'e' and a combining accent (NFD)
        wherever they are copied, while an annotation typed elsewhere has the one letter (NFC):
        the two look alike in every listing, and such a video was reported missing."""
        if rel in self._relset:
            return rel
        return None if rel.isascii() else self._nfc.get(unicodedata.normalize("NFC", rel))

    @cached_property
    def _nfc(self) -> dict[str, str]:
        return {unicodedata.normalize("NFC", r): r for r in self.rels if not r.isascii()}

    def _rank(self, rel: str) -> tuple:
        ext = split_ext(rel.rsplit("/", 1)[-1])[1]
        rank = VIDEO_EXTS.index(ext) if ext in VIDEO_EXTS else len(VIDEO_EXTS)
        return (rank, rel.count("/"), rel)

    @cached_property
    def _names(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for rel in sorted(self.rels, key=self._rank):
            out.setdefault(rel.rsplit("/", 1)[-1], rel)
        return out

    @cached_property
    def _stems(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for rel in sorted(self.rels, key=self._rank):
            out.setdefault(split_ext(rel.rsplit("/", 1)[-1])[0], rel)
        return out

    def by_name(self, name: str) -> str | None:
        """The file whose base name is exactly `name`, anywhere under the root."""
        return self._names.get(name)

    def by_stem(self, stem: str) -> str | None:
        """The file whose name minus its last extension is `stem`, anywhere under the root."""
        return self._stems.get(stem)


@dataclass
class Context:
    """One run of one adapter: its options, where to look, and what it could not use."""

    source: str
    root: str
    options: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    missing_ids: dict[str, None] = field(default_factory=dict)  # ordered set
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    rejected_examples: list[str] = field(default_factory=list)
    max_examples: int = 50
    _index: dict[Any, FileIndex] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def annotations(self) -> str:
        folder = self.options.get("annotations")
        return self.user_path(folder) if folder else self.root

    def files(self, exts: Iterable[str] | None = VIDEO_EXTS) -> FileIndex:
        """The (cached) one-walk index of the root."""
        key = None if exts is None else tuple(exts)
        if key not in self._index:
            self._index[key] = FileIndex(self.root, exts)
        return self._index[key]

    def path(self, rel: str) -> str:
        """The manifest path of a file under the root: absolute, or a URI under a URI root."""
        if is_uri(self.root):
            return join(self.root, rel)
        return os.path.abspath(os.path.join(self.root, rel))

    def find(self, *names: str, required: bool = True) -> str | None:
        """An annotation file: the first of `names` found in the annotations folder or up to two
        folder levels below it (releases unzip into a subfolder, e.g. `msrvtt_data/`). Found
        files are recorded in the manifest metadata (`annotation_files`)."""
        found = self.locate(names)
        if found:
            return self._found(found)
        if required:
            raise SourceError(f"{self.source}: none of {list(names)} found in {self.annotations!r} or two "
                              "folder levels below it (pass -o annotations=DIR if they live elsewhere)")
        return None

    def locate(self, names: Sequence[str], test: Callable[[str], bool] = exists) -> str | None:
        """The first of `names` that `test` finds (a file, by default) in the annotations folder
        or up to two folder levels below it; None if none."""
        base = self.annotations
        for name in names:  # the folder itself first: no listing needed in the usual layout
            if test(join(base, name)):
                return join(base, name)
        for level in self._levels()[1:]:
            for name in names:
                for d in level:
                    if test(join(d, name)):
                        return join(d, name)
        return None

    def _levels(self) -> list[list[str]]:
        # listed once per run: a video folder below the root may hold a million entries
        if "levels" not in self._cache:
            levels = [[self.annotations]]
            for _ in range(2):
                levels.append([s for d in levels[-1] for s in _subdirs(d)])
            self._cache["levels"] = levels
        return self._cache["levels"]

    def _found(self, path: str) -> str:
        self.metadata.setdefault("annotation_files", []).append(path)
        return path

    def user_path(self, path: str) -> str:
        """A file named in an option: a URI or absolute path as is, a relative one from the
        working directory when it exists there, else under the root."""
        if is_uri(path) or os.path.isabs(path):
            return path
        return os.path.abspath(path) if os.path.exists(path) else join(self.root, path)

    def missing(self, video_id: str) -> None:
        # as the report can print it: a lone surrogate (a JSON escape cut from its pair) as \\ud800
        self.missing_ids[video_id.encode("utf-8", "backslashreplace").decode()] = None

    def reject(self, where: str, reason: str, category: str | None = None) -> None:
        """Count an unusable entry under `category` (default: the reason) and keep the first
        few with their location as examples."""
        category = category or reason
        self.rejected[category] = self.rejected.get(category, 0) + 1
        if len(self.rejected_examples) < self.max_examples:
            self.rejected_examples.append(f"{where}: {reason}")

    def caption(self, text: Any, where: str) -> str | None:
        """The stripped caption, or None (rejected as empty) — several releases pad with spaces."""
        if text is None:
            text = ""
        if not isinstance(text, str):
            self.reject(where, f"caption is not a string ({type(text).__name__})")
            return None
        text = text.strip()
        if not text:
            self.reject(where, "empty caption")
            return None
        try:  # refused here, as the writer would refuse its row: one sentence of an ActivityNet
            # paragraph holding a lone surrogate lost the whole paragraph at the writer
            utf8_text(text, "caption", "")
        except ManifestError as e:
            reason = str(e).removeprefix(": ")
            self.reject(where, reason, category="invalid row: " + reason)
            return None
        return text


@dataclass(frozen=True)
class SourceSpec:
    """A registered adapter: its row generator, its options with defaults, their allowed values."""

    name: str
    rows: Callable[[Context], Iterator[dict]]
    options: Mapping[str, Any]
    choices: Mapping[str, tuple] = field(default_factory=dict)
    summary: str = ""

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults merged with `given`; unknown names and values outside `choices` fail here,
        before any file is read. Strings from a command line are coerced to the default's type."""
        allowed = {**COMMON_OPTIONS, **self.options}
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            listing = ", ".join(f"{k} (default {v!r})" for k, v in allowed.items())
            raise SourceError(f"unknown option(s) {unknown} for source '{self.name}'; allowed: {listing}")
        out = dict(allowed)
        for key, value in given.items():
            out[key] = _coerce(self.name, key, value, allowed[key])
        for key, values in self.choices.items():
            if out[key] not in values:
                raise SourceError(f"source '{self.name}': option {key}={out[key]!r} must be one of {values}")
        for key in POSITIVE_OPTIONS:
            if key in out and out[key] < 1:
                raise SourceError(f"source '{self.name}': option {key}={out[key]!r} must be at least 1")
        return out


def _coerce(source: str, key: str, value: Any, default: Any) -> Any:
    """Option values as the default's type, from the strings of a command line (`-o
    expand=false`, `-o test_set=1000`) or from Python values. Options without a default are
    paths: kept as text, so a folder named `2016` or a file `0123` stays what it was."""
    if value is None:
        return value
    if default is None:
        return str(value)  # also a pathlib.Path
    bad = SourceError(f"source '{source}': option {key}={value!r} is not of type {type(default).__name__}")
    if isinstance(default, bool):
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        low = str(value).strip().lower()
        if low in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return low in ("1", "true", "yes", "on")
        raise bad
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad
    if isinstance(default, str):
        return value if isinstance(value, str) else str(value)
    return value


def seconds(value: Any) -> float:
    """A time of an annotation file (a number, or a number as text) as float seconds; ValueError
    for anything else: a bool or null, NaN or inf (Python's json reads both), and an integer past
    float's range (its OverflowError was a traceback). A NaN start and end had passed every
    check (`max(nan, 0.0)` is NaN, `nan >= nan` False) and the row was written as the whole
    video."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} is not a number of seconds")
    try:
        out = float(value)
    except OverflowError:
        raise ValueError(f"{value} is past float's range") from None
    except ValueError:
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not math.isfinite(out):
        raise ValueError(f"{value!r} is not a finite number of seconds")
    return out


def span(pair: Any) -> tuple[float, float]:
    """A `[start, end]` pair of an annotation file as two `seconds`; ValueError for anything else
    (a text of two characters was read as two one-digit times)."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise ValueError(f"{pair!r} is not a [start, end] pair")
    return seconds(pair[0]), seconds(pair[1])


def read_lines(path: str) -> list[str]:
    """Non-empty stripped lines of a list file (split lists, id lists)."""
    with open_text(path) as f:
        return [s for s in (line.strip() for line in f) if s]


def csv_header(first: str) -> tuple[list[str], str]:
    """The fields and delimiter of a CSV's header line, the delimiter ',' or ';' — sniffed from
    the line, because third-party copies of some releases were re-saved with ';'."""
    delim = ";" if first.count(";") > first.count(",") else ","
    return [h.strip() for h in next(csv.reader([first], delimiter=delim))], delim


def csv_rows(f: TextIO, name: str) -> tuple[list[str], str, Iterator[tuple[int, list[str]]]]:
    """Header, delimiter (`csv_header`) and (line number, fields) of a CSV. Blank lines are
    skipped."""
    first = f.readline()
    if not first.strip():
        raise SourceError(f"{name}: empty file or missing header line")
    header, delim = csv_header(first)

    def body() -> Iterator[tuple[int, list[str]]]:
        # strict: an unclosed '"' took every later line into one field (a test set of 4 rows came
        # out as 1, exit 0), and '"a "cat" jumps"' was read as 'a cat" jumps"'
        reader = csv.reader(f, delimiter=delim, strict=True)
        done = 0  # lines of the file's body read up to the end of the last record
        try:
            for fields in reader:  # line_num, not a counter: quoted fields may span lines
                if fields and any(s.strip() for s in fields):
                    yield reader.line_num + 1, fields
                done = reader.line_num
        except csv.Error as e:  # a bad quote, a NUL byte, a field over csv's size limit
            why = str(e)
            if "unexpected end of data" in why:
                why += ", a '\"' opened in this record is never closed"
            if '"' in why:
                why += "; quote a field that holds '\"' and double each '\"' in it (RFC 4180)"
            raise SourceError(f"{name} line {done + 2}: unreadable CSV ({why})") from None

    return header, delim, body()
