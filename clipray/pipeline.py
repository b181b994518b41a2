"""The Ray Data pipeline: clip manifest -> fixed-shape uint8 frame batches, streamed.

    read_parquet(manifest) -> filter(split) -> map_batches(ClipDecoder, CPU tasks or actors)
        -> rows of frames [T, 3, S, S] uint8, frame_mask [T] uint8, tokens [L] int64, row_id

One generic reader serves every source, because every source is the same manifest. The decoders
resize and crop but never normalise, so each batch stays uint8 (4x smaller than float);
the training worker normalises. Rows whose clip cannot be decoded are dropped from the stream
and written to a skip report (`skips/*.jsonl`, merged by `collect_skips`) with their reason.
A clip whose window runs past its video's end is decoded cut there, and listed apart (CUT_REPORT).

Decoding runs on `data.decode_actors` decoders at once with `data.decode_cpus` each. They ask
only for CPUs, so they can run on CPU-only nodes of a cluster while the training workers hold the
GPUs. `data.decode_pool` picks how they run; both keep one `ClipDecoder` per process:
- "tasks" (default): Ray tasks on worker processes that Ray keeps between executions, each with
  its decoder in `_DECODERS`. Ray Data executes a dataset again every epoch and evaluation, and a
  warm worker starts decoding at once, where a new actor pool first imports (`clipray bench
  startup` measures both). But a task is submitted only once Ray Data's scheduling loop has
  handled the last one's return, and that loop waits up to 0.1 s for all its running tasks:
  with two decoders on 2 cores each waited about 0.2 s between calls.
- "actors": a Ray Data actor pool, built anew on every execution, each actor starting a Ray
  worker and importing torch (2-3 s more with torchvision and all of open_clip, which the
  decoders no longer import) before its first clip. An actor holds its next call while it decodes
  the current one, so it stays busy: with a decoder per core, 1.14-1.17x the tasks' frames/s on
  real H.264 and 1.8-2.2x on synthetic clips (`clipray bench data`). The choice for long epochs
  and for streaming HowTo100M.
docs/benchmarks.md, "Decode tasks or decode actors" and "Start-up per execution", has the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from clipray.config import DataConfig
from clipray.manifest import (SCHEMA, as_seconds, default_root, fsspec_path, manifest_files, naming, replace_whole,
                              resolve_path)
from clipray.video import SkipClip, decode_clip_safe

DATA_COLUMNS = ["row_id", "video_id", "path", "start", "end", "caption"]
SKIP_DIR = "skips"
SKIP_REPORT = "skip_report.jsonl"  # collect_skips' merged report, beside SKIP_DIR
CUT_REPORT = "cut_report.jsonl"  # and its list of the windows cut at their video's end (not skips)
CUTS_REMEMBERED = 100_000  # cut clips a decoder reports once (see ClipDecoder._cut_said)
NO_WORDS = "caption has no words once cleaned for the tokenizer"
_TOKENIZER_MODULE = "clipray._open_clip_tokenizer"


def wordless(tokens: Any, tokenize: Callable[[list[str]], Any]) -> np.ndarray:
    """Which rows of `tokens` (`tokenize`'s output) hold no word: start and end of text with
    nothing between, as the empty text. The tokenizer cleans away HTML entities (`&nbsp;`) and
    control characters, so such a caption trained, was ranked or was searched as the empty
    text. The decoders skip it (NO_WORDS), evaluation leaves it out, the API refuses it."""
    empty = np.asarray(tokenize([""]))[0, :2]
    return (np.asarray(tokens)[:, :2] == empty).all(1)


def caption_tokenizer(name: str, context_length: int) -> Callable[[list[str]], Any]:
    """open_clip's tokenizer for the open_clip model `name`, as `open_clip.get_tokenizer` gives it.

    Every decode actor loads one as it starts, on every dataset execution, and importing the
    open_clip package (its models and torchvision) was about 2 s of that start-up (`clipray
    bench startup`). For a built-in model config that asks for CLIP's own BPE tokenizer (all of
    clipray's models), this loads only open_clip's tokenizer module, from the installed
    package. A name with no built-in config, one whose config names a Hugging Face tokenizer
    (SigLIP's among them) or tokenizer options, or a process that has imported open_clip anyway,
    goes through `get_tokenizer`. tests/test_pipeline.py checks both routes.
    """
    import importlib.util

    pkg = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    config = pkg / "model_configs" / f"{name}.json"
    text = json.loads(config.read_text()).get("text_cfg", {}) if config.is_file() else None
    if "open_clip" in sys.modules or text is None or text.get("hf_tokenizer_name") or text.get("tokenizer_kwargs"):
        import open_clip

        return open_clip.get_tokenizer(name, context_length=context_length)
    if _TOKENIZER_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(_TOKENIZER_MODULE, pkg / "tokenizer.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[_TOKENIZER_MODULE] = module
    return sys.modules[_TOKENIZER_MODULE].SimpleTokenizer(context_length=context_length)


TOKEN_CACHE_MAX = 100_000  # words whose BPE open_clip's tokenizer keeps (~30 MB)


def cache_trimmer(tokenize: Any) -> Callable[[], None]:
    """A call that empties open_clip's BPE word cache of `tokenize` back to its special tokens
    once it holds over TOKEN_CACHE_MAX words. open_clip keeps every word it has seen, for ever:
    a Serve replica grew with each query of new words, and a training decoder process, which
    lives through every shard and epoch, by ~210 bytes a distinct word (HowTo100M's ASR text
    holds millions), 50 MB over 240k words in a test of 40k rows."""
    fresh = dict(getattr(tokenize, "cache", {}))

    def trim() -> None:
        if len(getattr(tokenize, "cache", ())) > TOKEN_CACHE_MAX:
            tokenize.cache = dict(fresh)

    return trim


class ClipDecoder:
    """Decodes, samples, crops and tokenises a batch of manifest rows.

    One instance per decode actor, or per task worker process and settings (`decode_batch` keeps
    them): it loads the tokenizer once and appends its skipped rows to its own files in
    `skip_dir` (local path or fsspec URI).
    """

    def __init__(self, data: DataConfig, root: str, skip_dir: str):
        self.cfg = data.video
        self.root = root
        self.tokenize = caption_tokenizer(data.tokenizer, data.max_words)
        self._trim_cache = cache_trimmer(self.tokenize)
        self.skip_dir = skip_dir.rstrip("/")
        self.name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.calls = 0
        # the cut clips this decoder has reported: an epoch's pass reported each again, a skip
        # file for every batch that held one, each epoch (bounded: past it, collect_skips dedups)
        self._cut_said: set[tuple] = set()
        self._buffers: list[np.ndarray] = []  # frames arrays this decoder may write into again
        self._free_refs = 0  # sys.getrefcount of a buffer that nothing outside the list holds

    def _frames_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialised frames array: an earlier batch's, once nothing else holds it.

        A new array this large (116 MB for 64 clips of 12 frames at 224 px) is fresh memory:
        glibc maps and unmaps it on every call and the kernel zeroes each page as the decoder
        first writes it. Reusing arrays gave 18% more frames/s per decode core on short clips
        (docs/benchmarks-data-log.md). A returned batch cannot simply be overwritten: Ray Data
        wraps it without a copy and may still hold it when the next call runs (its output
        buffer gathers up to 128 MB before putting a block in the object store). Every holder,
        view or Arrow buffer keeps a reference to the array, so one is reused only at its bare
        refcount.
        """
        # the list's own reference is the only one a free buffer has; no local name may hold one
        # while counting, so both counts below read the list in the same way
        for i in range(len(self._buffers)):
            if self._buffers[i].shape == shape and sys.getrefcount(self._buffers[i]) == self._free_refs:
                return self._buffers[i]
        buf = np.empty(shape, dtype=np.uint8)
        if len(self._buffers) < 4:  # bounded: past that, batches get new arrays as before
            self._buffers.append(buf)
            del buf
            self._free_refs = sys.getrefcount(self._buffers[-1])
            return self._buffers[-1]
        return buf

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The decoded batch; {} when every clip in it was skipped, since Ray Data cannot build a
        block from a zero-row tensor column (it warns and pickles it). Not a generator that
        yields nothing instead: that left the decode actors idle between calls (docs/benchmarks-data-log.md)."""
        T, S = self.cfg.max_frames, self.cfg.size
        n = len(batch["row_id"])
        # each clip is decoded straight into its row of the batch: no second copy of the frames
        frames = self._frames_buffer((n, T, 3, S, S))
        masks = np.empty((n, T), dtype=np.uint8)
        # tokenised first: a caption the tokenizer cleans to no words (an HTML entity such as
        # &nbsp;, a control character) trained as the empty text, its clip's vector pulled to it
        self._trim_cache()
        tokens = self.tokenize([str(c) for c in batch["caption"]]).numpy()
        no_words = wordless(tokens, self.tokenize)
        keep, skips = [], []
        for i in range(n):
            if no_words[i]:
                skips.append({"row_id": int(batch["row_id"][i]), "video_id": str(batch["video_id"][i]),
                              "path": str(batch["path"][i]).strip(), "reason": NO_WORDS})
                continue
            # stripped, as the manifest's own check reads it (clipray data check, clipray index):
            # a hand-written manifest's "videos/x.mp4 " was every clip skipped as a missing file
            path = str(batch["path"][i]).strip()
            try:
                clip = decode_clip_safe(resolve_path(path, self.root), batch["start"][i], batch["end"][i],
                                        self.cfg, out=frames[len(keep)])
            except SkipClip as e:
                skips.append({"row_id": int(batch["row_id"][i]), "video_id": str(batch["video_id"][i]),
                              "path": path, "reason": e.reason})
                continue
            if clip.cut is not None:  # kept; its line goes to CUT_REPORT, once
                key = (int(batch["row_id"][i]), str(batch["video_id"][i]), path)
                if key not in self._cut_said:
                    skips.append({"kind": "cut", "row_id": key[0], "video_id": key[1], "path": path,
                                  "start": as_seconds(batch["start"][i]), "end": as_seconds(batch["end"][i]),
                                  "length": round(clip.cut, 3)})
                    if len(self._cut_said) < CUTS_REMEMBERED:
                        self._cut_said.add(key)
            masks[len(keep)] = clip.mask
            keep.append(i)
        if skips:
            self._report(skips)
        if not keep:
            return {}
        k = len(keep)
        return {
            "frames": frames[:k],
            "frame_mask": masks[:k],
            "tokens": tokens[keep].astype(np.int64),
            "row_id": np.asarray(batch["row_id"])[keep].astype(np.int64),
        }

    def _report(self, skips: list[dict]) -> None:
        self.calls += 1
        # named from the time of writing (`skipped_since` counts an epoch's by it: no listing each epoch)
        path = f"{self.skip_dir}/{SKIP_DIR}/{time.time_ns()}-{self.name}-{self.calls:06d}.jsonl"
        fs, p = fsspec_path(path)
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        # a local file under a name the report does not read until whole (an object store's PUT
        # is whole already): a write cut midway (a full disk) left a line cut, and the skip
        # report at the run's end failed on its JSONDecodeError, after every epoch had trained
        text = "".join(json.dumps(s) + "\n" for s in skips)

        def write(tmp: str) -> None:
            with fs.open(tmp, "w") as f:
                f.write(text)

        replace_whole(fs, p, "://" not in path, write)


_DECODERS: dict[str, ClipDecoder] = {}  # this worker process's decoders, by settings


def decode_batch(batch: dict[str, np.ndarray], data: DataConfig, root: str, skip_dir: str) -> dict[str, np.ndarray]:
    """`map_batches` function: this process's `ClipDecoder` for these settings decodes the batch."""
    key = repr((data.video, data.tokenizer, data.max_words, root, skip_dir))
    if key not in _DECODERS:
        if len(_DECODERS) >= 4:  # a long-lived worker may serve many runs: keep the newest few
            del _DECODERS[next(iter(_DECODERS))]
        _DECODERS[key] = ClipDecoder(data, root, skip_dir)
    return _DECODERS[key](batch)


@contextlib.contextmanager
def _parquet_reader_without_actors():
    """Ray Data 2.60 reads Parquet with its V2 datasource by default, which starts actors to
    read the files' footers on every execution of a dataset (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS,
    32 of them unless set): on 2 cores an execution of the demo's test split took 2.4-2.7 s with
    one such actor and 0.6-0.8 s with the V1 datasource, which lists the files and samples a few
    when the dataset is built and starts no actor (`clipray bench startup`). Ray Train executes
    the datasets again every epoch, so V1 is used for the read. A user's
    RAY_DATA_USE_DATASOURCE_V2 is left alone."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if "RAY_DATA_USE_DATASOURCE_V2" in os.environ:
        yield
        return
    was, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = was


def clip_dataset(data: DataConfig, skip_dir: str, split: str | None = None,
                 limit: int | None = None, files: list[str] | None = None,
                 shuffle: bool = False, seed: int | None = None, rows: list[int] | None = None,
                 exclude: list[int] | None = None, count: int | None = None) -> Any:
    """A streaming Ray Dataset of decoded clips for one split of `data.manifest`.

    `files` narrows the read to some of the manifest's shard files (as `manifest_files` names
    them): training workers that stream a huge manifest shard by shard read their own.
    `shuffle` puts the rows in a random order before they are decoded (see `manifest_rows`).
    `rows`: only these row ids (evaluation decodes each clip once, `train.evaluate.first_rows`);
    `exclude`: all but these (a shard a resumed run read partly, `train.shards`).
    `count`: the rows read, where the caller knows them (`rows` counts itself).
    """
    from clipray.runtime import check_fits

    check_fits({"data.decode_actors x data.decode_cpus": data.decode_actors * data.decode_cpus})
    import ray.data

    args = {"data": data, "root": data.video_root or default_root(data.manifest), "skip_dir": skip_dir}
    size = decode_pool_size(data, len(rows) if rows is not None else count, limit)
    if data.decode_pool == "actors":
        udf = {"fn": ClipDecoder, "fn_constructor_kwargs": args,
               "compute": ray.data.ActorPoolStrategy(size=size)}
    else:
        udf = {"fn": decode_batch, "fn_kwargs": args,
               "compute": ray.data.TaskPoolStrategy(size=size)}
    return manifest_rows(data, split, limit, files, shuffle, seed, rows, exclude).map_batches(
        **udf, batch_size=data.decode_batch, num_cpus=data.decode_cpus, batch_format="numpy")


def decode_pool_size(data: DataConfig, count: int | None, limit: int | None = None) -> int:
    """data.decode_actors, or fewer where the `count` rows read (None: not known) come in fewer
    blocks (data.decode_batch rows each, at most). Ray Data warns at the end of every execution
    whose pool is larger than the blocks it got, "The maximum number of concurrent tasks for
    'MapBatches(decode_batch)' is set to 2, but the operator only received 1 input(s)": clip
    editing's 1-clip validation split said so every round; those decoders had nothing to do."""
    if limit:
        count = limit if count is None else min(count, limit)
    if count is None:
        return data.decode_actors
    return max(1, min(data.decode_actors, -(-count // data.decode_batch)))


def manifest_rows(data: DataConfig, split: str | None = None, limit: int | None = None,
                  files: list[str] | None = None, shuffle: bool = False, seed: int | None = None,
                  rows: list[int] | None = None, exclude: list[int] | None = None) -> Any:
    """The reading half of `clip_dataset`: the split's manifest rows, `data.decode_batch` per block.

    `shuffle`: Ray Data's random_shuffle of the rows, before any decoding. It holds the split's
    rows (a few hundred bytes each) at once, so a huge manifest shuffles shard by shard
    (`data.shard_stream`). With `seed` None every execution (every epoch) draws a new order;
    with a seed every execution draws the same one, though its blocks may still arrive in
    another order (Ray Data hands each on as it is ready)."""
    import ray.data
    from ray.data.expressions import col

    fs, all_files = manifest_files(data.manifest, only=files)  # (the footers of the files read)
    files = files or all_files
    with _parquet_reader_without_actors():
        # partitioning=None: Ray Data reads a `key=value` folder in a path as a column
        # (hive partitioning), so a manifest under `.../split=test/` or `.../caption=x/` had
        # that value in place of its rows' own, where every other reader of it does not.
        # schema: the manifest's, as every other reader takes it: a file without the optional
        # start/end columns reads them as nulls (whole files), not as a KeyError inside Ray.
        # file_extensions=None: the files are listed already, and Ray Data's own extension
        # check cuts a path at '?' (a URL's query), so a manifest under `what?/` read no file
        ds = ray.data.read_parquet(files, filesystem=fs, partitioning=None, schema=SCHEMA,
                                   file_extensions=None).select_columns(
            DATA_COLUMNS + ["split"])
    split = split or data.split
    if split:
        ds = ds.filter(expr=col("split") == split)
    if rows is not None:
        ds = ds.filter(expr=col("row_id").is_in(rows))
    if exclude:
        ds = ds.filter(expr=col("row_id").not_in(exclude))
    ds = ds.select_columns(DATA_COLUMNS)
    if limit:
        ds = ds.limit(limit)
    if shuffle:
        ds = ds.random_shuffle(seed=seed)
    # Manifest rows are tiny and decoding is slow: small blocks let every decoder work (one
    # Parquet row group would otherwise go to a single task). Streaming unless shuffled.
    return ds.repartition(target_num_rows_per_block=data.decode_batch)


def collect_skips(skip_dir: str) -> dict[str, Any]:
    """Merge the decoders' skip files into one report beside them, one line per skipped row in
    row order; return the count, the counts by reason and the report's path. Memory holds each
    skipped row's line once, not the files' lines. The clips cut at their video's end are no
    skips: they are counted apart ("cut") and listed in CUT_REPORT, written when there are any."""
    where = skip_dir.rstrip("/")
    fs, root = fsspec_path(where)
    records, cuts = _skip_records(fs, skip_files(skip_dir))
    fs.makedirs(root, exist_ok=True)
    reasons: Counter = Counter()

    def skipped() -> Iterator[str]:
        reasons.clear()
        for key in sorted(records):
            reasons[_reason_kind(json.loads(records[key])["reason"])] += 1
            yield records[key]

    def write(name: str, lines: Callable[[], Iterable[str]]) -> None:
        """`name` beside the skip files, written line by line (not joined into one string first).
        A full disk is an OSError naming no file: the run ended in its traceback after training.
        Whole or not at all: written in place, it also left the report cut, its last line no JSON."""
        def put(tmp: str) -> None:
            with fs.open(tmp, "w") as f:
                f.writelines(line + "\n" for line in lines())

        with naming(f"{where}/{name}"):
            replace_whole(fs, f"{root}/{name}", "://" not in skip_dir, put)

    write(SKIP_REPORT, skipped)
    if cuts:
        write(CUT_REPORT, lambda: (cuts[key] for key in sorted(cuts)))
    elif fs.exists(f"{root}/{CUT_REPORT}"):  # an earlier attempt's, in a run begun again
        fs.rm_file(f"{root}/{CUT_REPORT}")
    return {"skipped": len(records), "by_reason": dict(reasons), "report": f"{where}/{SKIP_REPORT}",
            "cut": len(cuts), "cut_report": f"{where}/{CUT_REPORT}"}


def cut_line(count: int, report: str) -> str:
    """The summaries' line for the `count` clips cut at their video's end, listed in `report`."""
    many = count != 1
    return f"{count} clip{'s' * many} cut at {'their' if many else 'its'} video's end (see {report})"


_SKIP_FILES_AT_ONCE = 64  # skip files read (and held) at a time by collect_skips


def skip_files(skip_dir: str) -> list[str]:
    """The decoders' skip files under `skip_dir` now (paths within its filesystem), sorted."""
    fs, root = fsspec_path(skip_dir.rstrip("/"))
    # the decoders (other processes) wrote the files: a listing this process cached before (an
    # object store's, s3fs/gcsfs: the resume check's of the run folder, an earlier report's of
    # skips/) would hide those written since; this drops skips/'s and its parents'
    fs.invalidate_cache(f"{root}/{SKIP_DIR}")
    # listed, not globbed: a run folder named like "exp [2]" is no glob pattern for itself
    return sorted(p for p in fs.find(f"{root}/{SKIP_DIR}", maxdepth=1) if p.endswith(".jsonl")) \
        if fs.exists(f"{root}/{SKIP_DIR}") else []


def _skip_records(fs: Any, parts: list[str]) -> tuple[dict[tuple, str], dict[tuple, str]]:
    """The lines of the skip files `parts`, one per skipped clip; and apart, one per clip cut at
    its video's end (their "kind": "cut")."""
    # each clip's line, by (row_id, video_id, path): a re-executed block, or a later epoch or pass
    # over the same rows, reports a row again; but a run's training and evaluation manifests
    # (data.eval_manifest) both number their rows from 0
    records: dict[tuple, str] = {}
    cuts: dict[tuple, str] = {}
    # read 32 at a time: decoders write a file per batch with a skip, so a long run on an object
    # store leaves thousands, and one request after another took seconds per thousand. A window
    # of files at a time, each parsed as it comes: every file read first held every line of the
    # run, each epoch's and pass's again, before one was parsed (1M skipped rows: 1.3 GB, now 0.5)
    with ThreadPoolExecutor(32) as pool:
        for i in range(0, len(parts), _SKIP_FILES_AT_ONCE):
            for text in pool.map(fs.cat_file, parts[i:i + _SKIP_FILES_AT_ONCE]):
                for line in text.decode().splitlines():
                    rec = json.loads(line)
                    held = cuts if rec.get("kind") == "cut" else records
                    held[(rec["row_id"], rec["video_id"], rec["path"])] = line
    return records, cuts


def skipped_since(skip_dir: str, since_ns: int) -> int:
    """The clips skipped in the skip files written since `since_ns` (`time.time_ns()`, as their
    names begin), once each. Read by a time, not by the files listed when the epoch began: on a
    long run in object storage the skip folder holds up to millions of files, and each worker
    listed them all at every epoch for a message of the rare epoch without a batch."""
    def written(path: str) -> int:
        head = path.rsplit("/", 1)[-1].split("-", 1)[0]
        return int(head) if head.isdigit() else 0  # (an older run's name, its pid first: earlier)

    fs, _ = fsspec_path(skip_dir.rstrip("/"))
    return len(_skip_records(fs, [p for p in skip_files(skip_dir) if written(p) >= since_ns])[0])


def _reason_kind(reason: str) -> str:
    """The reason's first clause, so counts group 'decode failed: <details>' together, and
    without a closing number of seconds ("timestamp past the video's end 12.35s": a count per
    video, hundreds of them on one line for a big set)."""
    return re.sub(r" \d+(\.\d+)?s$", "", reason.split(":")[0].split(" after ")[0].split(" [")[0])


def reason_counts(skips: Iterable[dict]) -> dict[str, int]:
    """Skipped rows counted by the kind of their reason (`_reason_kind`), most first."""
    return dict(Counter(_reason_kind(s["reason"]) for s in skips).most_common())
