"""Dataset adapters: each public release (and a user's own CSV/JSONL) -> one clip manifest.

    from clipray.sources import prepare
    report = prepare("msrvtt", root="/data/msrvtt", out="/data/msrvtt/manifest.parquet")
    print(report)

`SOURCES` maps a name to its `SourceSpec` (row generator + options). `prepare` runs one,
streams its rows through `clipray.manifest.ManifestWriter` (one file for `*.parquet`, else a
folder of shards; either way written a row group at a time, so HowTo100M never sits in memory) and returns a
`PrepareReport`: what was written, which videos were not found under the root (their rows
dropped), and which annotation entries were rejected and why. The exact annotation formats are
in specs/datasets.md; one module per release holds its rules.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping

from clipray.manifest import (MAX_DISTINCT, PARTIAL, Every, ManifestError, ManifestWriter, Tally, old_shards,
                              remove_old_shards)
from clipray.sources import activitynet, didemo, generic, howto100m, lsmdc, msrvtt, msvd, youcook2
from clipray.sources.base import Context, SourceError, SourceSpec, is_uri

SOURCES: dict[str, SourceSpec] = {
    m.SOURCE.name: m.SOURCE
    for m in (msrvtt, msvd, lsmdc, activitynet, didemo, youcook2, howto100m, generic)
}

__all__ = ["SOURCES", "PrepareReport", "SourceError", "SourceSpec", "get_source", "list_sources",
           "prepare"]

def list_sources() -> list[str]:
    return sorted(SOURCES)


def get_source(name: str) -> SourceSpec:
    try:
        return SOURCES[name]
    except KeyError:
        raise SourceError(f"unknown source {name!r}; known: {', '.join(list_sources())}") from None


@dataclass
class PrepareReport:
    source: str
    root: str
    out: str
    rows: int
    videos: int
    captions: int | None  # distinct caption texts; None when more than MAX_DISTINCT
    per_split: dict[str, int]
    missing_videos: list[str]  # video ids not found under the root; their rows were dropped
    rejected: dict[str, int]  # reason -> number of annotation entries rejected for it
    rejected_examples: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def missing_count(self) -> int:
        return len(self.missing_videos)

    @property
    def rejected_count(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "missing_count": self.missing_count,
                "rejected_count": self.rejected_count}

    def __str__(self) -> str:
        splits = ", ".join(f"{k} {v:,}" for k, v in sorted(self.per_split.items())) or "none"
        files = f"{len(self.shards)} file{'s' if len(self.shards) != 1 else ''}"
        caps = f"more than {MAX_DISTINCT:,}" if self.captions is None else f"{self.captions:,}"
        lines = [f"{self.source}: {self.root} -> {self.out} ({files}, {self.seconds:.1f} s)",
                 f"  rows      {self.rows:,} ({splits})",
                 f"  videos    {self.videos:,}",
                 f"  captions  {caps} distinct"]
        if self.missing_videos:
            shown = ", ".join(self.missing_videos[:10])
            more = f", ... ({self.missing_count - 10:,} more)" if self.missing_count > 10 else ""
            lines.append(f"  missing   {self.missing_count:,} videos not found under the root, "
                         f"rows dropped: {shown}{more}")
        else:
            lines.append("  missing   none")
        if self.rejected:
            lines.append(f"  rejected  {self.rejected_count:,} entries:")
            lines += [f"    {n:,} x {reason}" for reason, n in sorted(self.rejected.items(), key=lambda kv: -kv[1])]
            lines += [f"    e.g. {ex}" for ex in self.rejected_examples[:5]]
        else:
            lines.append("  rejected  none")
        read = self.metadata.get("annotation_files") or []
        if read:
            lines.append("  read      " + ", ".join(os.path.basename(p) for p in read))
        rules = {k: v for k, v in self.metadata.items()
                 if k not in ("source", "root", "options", "annotation_files")}
        if rules:
            lines.append("  rules     " + ", ".join(f"{k}={v}" for k, v in rules.items()))
        lines += [f"  note      {n}" for n in self.notes]
        if self.rows == 0:
            lines.append(f"  ERROR     no rows, so no manifest written ({self.out} is as it was): "
                         "check --root and the annotation files")
        return "\n".join(lines)


def prepare(name: str, root: str, out: str, progress_s: float | None = None, **options: Any) -> PrepareReport:
    """Turn the release `name` found under `root` into the manifest `out` (a `.parquet` file, or
    a folder of shards); see each module in clipray.sources for its options. With `progress_s`,
    a line on stderr at most that often (HowTo100M takes a while)."""
    try:
        return _prepare(name, root, out, progress_s, **options)
    except OSError as e:
        if e.filename is not None:  # a local path: the command names it (clipray.cli)
            raise
        # pyarrow's error for an object store it cannot reach (network, credentials, bucket,
        # permission) names the key and bucket but carries no file name: a line, not its traceback
        raise SourceError(f"{name}: cannot read {root} or write {out} ({str(e).splitlines()[0][:300]})") from None


def _prepare(name: str, root: str, out: str, progress_s: float | None = None, **options: Any) -> PrepareReport:
    spec = get_source(name)
    opts = spec.resolve_options(options)
    root, out = str(root), str(out)
    if not is_uri(root):
        root = os.path.abspath(root)
    ctx = Context(name, root, opts)
    started = time.perf_counter()
    rows = iter(spec.rows(ctx))
    # Adapters read and check their annotation files before the first row, so a wrong root
    # fails before anything is written, and rules they discover are in the metadata.
    first = next(rows, None)
    # the rate counts from here: reading a big release's annotations and listing its videos
    # (HowTo100M's 1.2M in object storage) took minutes, which the rows/s then spread over
    writing = time.perf_counter()
    if progress_s is not None and writing - started >= progress_s:
        print(f"  {name}: first row after {writing - started:,.0f}s (annotations read, videos listed)",
              file=sys.stderr, flush=True)
    metadata = {"source": name, "root": root, "options": opts, **ctx.metadata}
    tally = Tally()
    writer = ManifestWriter(out, rows_per_shard=int(opts["rows_per_shard"]), metadata=metadata,
                            on_bad=functools.partial(_refused, ctx), tally=tally)
    with _writing(out):
        if any(path.endswith(PARTIAL) for path in old_shards(out)[1]):
            # unfinished (a run stopped while its shards went or were renamed): no manifest to
            # keep, and its shards left would read as a smaller, complete one once a failure
            # of this run removed its own .partial shards
            remove_old_shards(out, [])
        every = Every(progress_s)
        try:
            if first is not None:
                for n, row in enumerate(_chain(first, rows), 1):
                    writer.add(row)
                    if every():  # the writer checks and writes rows a buffer at a time
                        print(f"  {name}: {n:,} rows read, {writer.rows:,} written, {len(writer.shards)} shards, "
                              f"{n / max(time.perf_counter() - writing, 1e-3):,.0f} rows/s",
                              file=sys.stderr, flush=True)
            writer.finish()
        except BaseException:
            # a format error deep in a big source: leave no half manifest that reads as complete,
            # and the manifest an earlier run wrote there as it was
            writer.discard()
            raise
        if writer.rows == 0:
            # nothing to train or index on (a wrong --root, every video missing): an empty
            # manifest replaced the one an earlier run wrote, and the command said so in a
            # warning and exited 0. Nothing is written now, and the command fails (clipray.cli).
            writer.discard()
            writer.shards.clear()
        else:
            writer.close()  # (which removes the old shards first)
    return PrepareReport(
        source=name, root=root, out=out, rows=writer.rows, videos=len(tally.videos),
        captions=tally.distinct_captions, per_split=tally.per_split,
        missing_videos=sorted(ctx.missing_ids), rejected=dict(ctx.rejected),
        rejected_examples=list(ctx.rejected_examples), shards=list(writer.shards), options=opts,
        metadata=metadata, notes=list(ctx.notes) + [n for n in [tally.shared_note()] if n],
        seconds=time.perf_counter() - started)


@contextlib.contextmanager
def _writing(out: str) -> Iterator[None]:
    """A local manifest, locked while this process writes it (a hidden `.NAME.prepare.lock`
    beside it). Two prepares into one --out both wrote the same `part-00000.parquet.partial`:
    one said it had written the manifest, which then failed every read (its pages overwritten
    by the other's), and the other failed renaming a file that was gone. The second is now
    refused at once. (A manifest in object storage cannot be locked.)"""
    if is_uri(out):
        yield
        return
    from clipray.manifest import prepare_lock
    from clipray.runtime import exclusive

    with exclusive(prepare_lock(out),
                   SourceError(f"{out}: another `clipray data prepare` is writing this manifest now: let it "
                               "finish, or give another --out")):
        yield


def _refused(ctx: Context, row: Mapping[str, Any], e: ManifestError) -> None:
    """A row the writer refused (a last guard: adapters reject what they can name themselves)."""
    reason = re.sub(r"^row \d+( \(video .*?\))?: ", "", str(e))
    ctx.reject(row.get("_where", "?"), reason,
               category="invalid row: " + re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", reason))


def _chain(first, rest):
    yield first
    yield from rest
