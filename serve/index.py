"""`clipray index CONFIG checkpoint=EXPORT manifest=MANIFEST out=DIR [k=v ...]`: the offline index.

A Ray Data batch job: the manifest's clips (one split or all; whole-video rows optionally cut
into sliding windows) -> `map_batches(ClipEmbedder)` on an actor pool where each actor loads the
export once (on a GPU when the cluster has one) and decodes + embeds its clips with the model's
video encoder -> embeddings Parquet + a faiss index in `out` (layout: `serve.store`).

- Exact inner product (`IndexFlatIP`) by default; `index.kind` = ivf_flat | ivf_sq8 | ivf_pq |
  hnsw builds an approximate or compressed index instead, and its recall@10 against exact is
  measured at build time on real queries (the manifest's captions through the text encoder).
- Incremental: clips already in `out` (same path, start, end) are not embedded again; a run adds
  one Parquet part and rebuilds the faiss index over everything. A video written anew at its
  path since its clips were embedded (another size or modification time) has them embedded
  again, in place (their ids kept). The export must be the same
  model (checked by fingerprint), or the vectors would live in different spaces.
- `checkpoint` is an export directory, local or at a URI (`s3://.../<run>/export`, where a run
  stored in object storage keeps it); one at a URI is copied into `out/model-<fingerprint>/`,
  which the index then serves with.
- Only indexable (loose) heads give video vectors. A tightTransf export joins as a re-ranker:
  `index.rerank_checkpoint=TIGHT_EXPORT` also stores its per-frame features, and the served app
  re-scores the loose index's top candidates with it.
- Unreadable clips are skipped and listed in `out/skip_report.jsonl`; progress and an ETA are
  printed while the job runs. A clip whose window runs past its video's end is embedded from
  the frames up to that end and listed in `out/cut_report.jsonl`; it keeps the manifest's window.
- A wrong checkpoint, manifest or index kind fails before anything is embedded (a wrong path
  before Ray starts), and a new `out` made for the run is removed again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from clipray.config import SAMPLING, ConfigError, VideoConfig
from clipray.manifest import PROGRESS_S, Every, ManifestError
from serve import store
from serve.config import AppConfig, load_app_config


def windows(duration: float, window: float, stride: float) -> list[tuple[float, float]]:
    """Sliding windows covering [0, duration]; the last one is aligned to the end."""
    if duration <= window:
        return [(0.0, round(duration, 3))]
    out, t = [], 0.0
    while t + window <= duration + 1e-6:
        out.append((round(t, 3), round(t + window, 3)))
        t += stride
    if out[-1][1] < duration - 1e-6:
        out.append((round(duration - window, 3), round(duration, 3)))
    return out


def plan_clips(cfg: AppConfig, have: set | dict, files: Optional[set] = None) -> tuple[list[dict], list[str]]:
    """Unique clips of the manifest not yet in the index (+ windows), and a seeded uniform
    sample of its captions (up to index.recall_queries) for the recall check. Given the index's
    video ids (`have` a dict, clip_key -> id), clips the index holds under another id than the
    manifest gives are said in a note: the index keeps its ids, and it said '0 new'. The manifest is
    streamed a checked batch at a time (`checked_batches`): only the clips are kept, not its
    rows, and what is done for each row (the clip's key, the caption sample) is done a column
    at a time; a path is resolved once a batch. Row by row, planning took 10-17 s a million
    rows. The videos whose length windows need (a whole-video row without a `duration`) are
    opened PROBE_THREADS at a time: one after another, a million videos in object storage (a
    few requests each) took a day before the first clip was embedded. `files`, if given, gets
    every video path of the manifest (resolved), indexed or not."""
    from concurrent.futures import ThreadPoolExecutor

    from clipray.manifest import checked_batches, default_root, resolve_path
    from clipray.video import PROBE_THREADS, probe_duration

    split = None if cfg.index.split == "all" else cfg.index.split
    root = cfg.manifest and default_root(cfg.manifest)
    window, stride = cfg.index.window_s, cfg.index.stride_s
    rows, seen = [], set(have)
    sample, rng, k, n = [], np.random.default_rng(0), cfg.index.recall_queries, 0
    durations: dict[str, Optional[float]] = {}
    windowed: set[str] = set()  # the videos cut into windows: their other rows give the same clips
    ids, renamed = (have if isinstance(have, dict) else {}), {}  # clip_key -> (the index's id, the manifest's)

    def absolute(path: str) -> str:
        path = resolve_path(path, root)
        return path if "://" in path else os.path.abspath(path)

    with ThreadPoolExecutor(PROBE_THREADS) as pool:
        for b in checked_batches(cfg.manifest, split):
            # reservoir sampling: every caption kept with the same chance k / rows
            caps, m = b.column("caption"), b.num_rows
            first = min(max(k - n, 0), m)
            sample += caps.slice(0, first).to_pylist()
            if first < m and k:
                j = rng.integers(0, np.arange(n + first, n + m) + 1)  # row n + i takes slot j < k
                for i in np.flatnonzero(j < k):
                    sample[j[i]] = caps[first + int(i)].as_py()
            n += m
            coded = b.column("path").dictionary_encode()
            names = np.array([absolute(p) for p in coded.dictionary.to_pylist()], dtype=object)
            paths = names[coded.indices.to_numpy()].tolist()
            if files is not None:
                files.update(names)
            vids, starts, ends = (b.column(c).to_pylist() for c in ("video_id", "start", "end"))
            keys = zip(paths, store.clip_ms(b.column("start")), store.clip_ms(b.column("end")))  # clip_key's
            if window:  # a video has many captions: its first row's duration, or one probe
                probe = []
                for path, s, d in zip(paths, starts, b.column("duration").to_pylist()):
                    if s is None and path not in durations:
                        durations[path] = d
                        if not d:
                            probe.append(path)
                for path, dur in zip(probe, pool.map(lambda p: probe_duration(p, cfg.video.backend), probe)):
                    durations[path] = dur
            for vid, path, s, e, key in zip(vids, paths, starts, ends, keys):
                spans = [(s, e, key)]
                if window and s is None and durations[path]:
                    if path in windowed:
                        continue
                    windowed.add(path)
                    spans = [(s, e, store.clip_key(path, s, e)) for s, e in windows(durations[path], window, stride)]
                for s, e, key in spans:
                    if key not in seen:
                        seen.add(key)
                        rows.append({"video_id": vid, "path": path, "start": s, "end": e})
                    elif ids.get(key, vid) != vid:
                        renamed.setdefault(key, (ids[key], vid))
    if renamed:
        (path, s, e), (old, new) = next(iter(renamed.items()))
        span = "" if s is None else f" {s / 1000:g}-{e / 1000:g}s"
        print(f"[index] note: {len(renamed)} clips of the manifest are in the index under other video ids "
              f"(e.g. {path}{span}: {old!r} in the index, {new!r} in the manifest); clips are matched by "
              "file and times, and the index keeps its ids: to serve the manifest's, build a new index "
              "(another out=)", file=sys.stderr, flush=True)
    return rows, sorted(set(sample))


class ClipEmbedder:
    """map_batches callable: one export loaded per actor; decodes and embeds a batch of clips."""

    def __init__(self, export_dir: str, video: VideoConfig, rerank_dir: str, use_gpu: bool):
        import torch

        from clipray.export import load_export

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = load_export(export_dir, self.device)
        self.video = dataclasses.replace(video, size=self.model.image_size)
        self.tight = load_export(rerank_dir, self.device) if rerank_dir else None

    def _decode(self, batch: dict, cfg: VideoConfig) -> tuple[list, list[str]]:
        from clipray.video import SkipClip, decode_clip_safe

        clips, reasons = [], []
        for p, s, e in zip(batch["path"], batch["start"], batch["end"]):
            s = None if s is None or np.isnan(s) else float(s)
            e = None if e is None or np.isnan(e) else float(e)
            try:
                clips.append(decode_clip_safe(str(p), s, e, cfg))
                reasons.append("")
            except SkipClip as err:
                clips.append(None)
                reasons.append(err.reason)
        return clips, reasons

    def _frames(self, clips: list, model: Any):
        import torch

        ok = [c for c in clips if c is not None]
        frames = torch.from_numpy(np.stack([c.frames for c in ok])).to(self.device)
        mask = torch.from_numpy(np.stack([c.mask for c in ok])).to(self.device).bool()
        return model.normalize(frames), mask

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        clips, reasons = self._decode(batch, self.video)
        n, dim = len(clips), self.model.embed_dim
        out = dict(batch, skip=np.array(reasons, dtype=object),
                   embedding=np.zeros((n, dim), np.float32),
                   cut=np.array([np.nan if c is None or c.cut is None else c.cut for c in clips]))
        ok = np.array([c is not None for c in clips])
        if ok.any():
            with torch.no_grad():
                x, m = self._frames(clips, self.model)
                out["embedding"][ok] = self.model.encode_video(x, m).float().cpu().numpy()
            # a NaN/inf vector is never found by an exact index and breaks an IVF one's k-means
            for i in np.flatnonzero(ok & ~np.isfinite(out["embedding"]).all(1)):
                out["skip"][i] = "the model's embedding of this clip is not finite (NaN/inf)"
        if self.tight is not None:
            tcfg = dataclasses.replace(self.video, size=self.tight.image_size)
            if tcfg.size != self.video.size:
                # decoded again at its size, which can fail where the first did not (a timeout, a
                # read error): such a clip is a skip, where the two decodes' counts of clips
                # differed and the actor, and with it the job, failed on the features' shape
                tclips, treasons = self._decode(batch, tcfg)
                for i in np.flatnonzero(ok & np.array([c is None for c in tclips])):
                    out["skip"][i] = f"{treasons[i]} (decoded again at {tcfg.size}px for the re-ranker)"
                    ok[i] = False
            else:
                tclips = clips
            t = self.video.max_frames
            feats = np.zeros((n, t, self.tight.embed_dim), np.float16)
            masks = np.zeros((n, t), np.uint8)
            if ok.any():
                with torch.no_grad():
                    x, m = self._frames([c if k else None for c, k in zip(tclips, ok)], self.tight)
                    feats[ok] = self.tight.encode_frames(x, m).half().cpu().numpy()
                    masks[ok] = m.cpu().numpy()
                # a NaN/inf feature (or one past float16's range, as stored) made the re-ranker
                # score NaN: every query with the clip among its candidates failed (500)
                for i in np.flatnonzero(ok & (out["skip"] == "") & ~np.isfinite(feats).all((1, 2))):
                    out["skip"][i] = ("the re-ranker's frame features of this clip are not finite "
                                      "(NaN/inf, or past float16's range)")
            out.update(rerank_feats=feats, rerank_mask=masks)
        return out


PLAN = "_plan"  # a clip's position in plan_clips' list, carried through the embedding job
AGAIN = "_again"  # the row id of an indexed clip embedded again (its file changed), else -1


def _progress(done: int, total: int, skipped: int, since: tuple[float, int], every: Every) -> None:
    """On a terminal one line rewritten in place; in a log (`ray job logs`, a file) a line every
    PROGRESS_S and one at the end, rather than every update joined by carriage returns. The rate
    counts from `since`, (the time, the clips done) when the first batch came back: from the
    command's start it took in Ray's and the actors' start-up, and the early ETA was too long.
    `done` counts the skipped clips too, which the line says apart, and so does the rate: a
    skipped clip was decoded (or tried) as the others, and the clips left may be skipped too.
    Until a second batch is back there is no rate (it said 0.0 clips/s, with clips done), and at
    the end no ETA (it said 'ETA when the next batch is back' with none to come)."""
    dt, base = time.perf_counter() - since[0], since[1]
    said = []
    if dt > 0 and done > base:
        rate = (done - base) / dt
        said.append(f"{rate:.1f} clips/s" if rate >= 0.05 else f"{rate:.2g} clips/s")  # not 0.0
        if done < total:
            said.append(f"ETA {(total - done) / rate:.0f}s")
    elif done < total:
        said.append("rate and ETA when the next batch is back")
    line = f"  {done}/{total} clips done, {skipped} of them skipped" + (f" ({', '.join(said)})" if said else "")
    if sys.stdout.isatty():
        print(f"\r{line}\x1b[K", end="", flush=True)  # the rest of a longer line before it cleared
    elif every() or done == total:
        print(line, flush=True)


@contextlib.contextmanager
def fetch_folder(parent: str | Path | None) -> Iterator[str]:
    """A new folder `parent/.fetch-*` to fetch an export into, removed after the block (one in
    the system's temporary folder if `parent` is None). A fetch killed midway (Ctrl-C twice, an
    OOM, a preempted node) left its folder, possibly a model's weights, in the index folder for
    good. Each fetch holds a shared lock on `parent` itself (a flock, which the kernel drops
    when the process ends) while its folder exists, so one that gets the lock alone finds every
    `.fetch-*` there stale and removes them, never the folder of a fetch running now (`clipray
    index` or `clipray serve`, in another process)."""
    import fcntl
    import tempfile

    with contextlib.ExitStack() as held:
        if parent is not None:
            lock = os.open(parent, os.O_RDONLY)
            held.callback(os.close, lock)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                for p in Path(parent).glob(".fetch-*"):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                fcntl.flock(lock, fcntl.LOCK_SH)
            except BlockingIOError:  # another fetch is running: its folder is not stale
                fcntl.flock(lock, fcntl.LOCK_SH)
            except OSError:  # a filesystem without locks: nothing is known stale
                pass
        tmp = tempfile.mkdtemp(dir=parent, prefix=".fetch-" if parent is not None else "clipray-export-")
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _local_export(path: str, what: str, out: Path) -> str:
    """A local directory holding the export at `path`. One at a URI (a run directory in object
    storage) is copied into `out/model-<fingerprint>`: the index keeps its own copy, and a later
    run with another model can never overwrite it."""
    from clipray.export import fetch_export, local_dir

    if not path:
        raise ConfigError(f"{what}: give an export directory (<run>/export)")
    if (local := local_dir(path)) is not None:
        return os.path.abspath(local)
    out.mkdir(parents=True, exist_ok=True)
    with fetch_folder(out) as tmp:
        try:
            fetch_export(path, tmp)
            keep = out.absolute() / f"model-{store.fingerprint(tmp)}"
            if not keep.exists():
                os.rename(tmp, keep)
            return str(keep)
        except FileNotFoundError as e:
            raise ConfigError(f"{what}={path}: no clipray export there ({e})") from None
        except Exception as e:  # an object store it cannot reach (credentials, network, permission)
            raise ConfigError(f"{what}={path}: cannot fetch the export ({type(e).__name__}: {e})") from None


def _check_export(path: str, what: str, indexable: bool) -> dict:
    from clipray.export import check_export

    conf = check_export(path)  # weights cut off or of another model: now, not in every actor
    if conf["indexable"] != indexable:
        raise ConfigError(
            f"{what}={path}: head {conf['overrides']['head']} " + (
                "is a cross-encoder and gives no video vector; index with a loose export "
                "(meanP/seqLSTM/seqTransf) and pass this one as index.rerank_checkpoint"
                if indexable else "is not a cross-encoder (tightTransf) re-ranker"))
    return conf


def build_index(cfg: AppConfig, quiet: bool = False) -> dict[str, Any]:
    """Embed the manifest's new clips into `cfg.out` and rebuild the faiss index; returns meta."""
    if not cfg.manifest or not cfg.out:
        raise ConfigError("clipray index needs manifest=... and out=...")
    if "://" in cfg.out:  # Path() would fold s3://b/i into a local folder s3:/b/i
        raise ConfigError(f"out={cfg.out}: the index folder is a local path (on a cluster, a shared "
                          "volume every Serve replica mounts), not a URI")
    ix = cfg.index  # now, not in faiss after every clip is embedded
    store.check_knobs(nlist=ix.nlist, nprobe=ix.nprobe, pq_m=ix.pq_m, refine=ix.refine, hnsw_m=ix.hnsw_m,
                      ef_search=ix.ef_search)
    out = Path(cfg.out)
    fresh = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out: cannot create the index folder {out} ({e})") from e
    with _writing(out):
        try:
            return _build(cfg, out, quiet)
        except (ConfigError, ManifestError, FileNotFoundError):
            # a wrong checkpoint, manifest or index kind fails before anything is embedded: leave
            # no index folder behind that holds nothing but a fetched model (a skip report stays).
            # Only while this run holds the lock: a run refused by it, which found no folder a
            # moment before, removed the folder of the run that made it and holds it, lock and all
            if fresh and all(p.name.startswith("model-") or p.name == LOCK for p in out.iterdir()):
                shutil.rmtree(out, ignore_errors=True)
            raise


LOCK = ".index.lock"  # held by the one `clipray index` writing the folder


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """The index folder, locked for this run. Two runs into one out= both numbered their part
    after the parts they saw and gave its rows the same first row id: one run's part replaced
    the other's without a word, its clips lost though it said 'N added', or both parts stayed
    and the index failed every later read. The second run is now refused, before it embeds
    anything."""
    from clipray.runtime import exclusive

    with exclusive(str(out / LOCK), ConfigError(f"out={out}: another `clipray index` is writing this index now; "
                                                "run this one when it has finished (or give another out=)")):
        yield


def check_frame_positions(conf: dict, what: str, max_frames: int) -> None:
    """`models.check_frames` for an export, now: an index of more frames than its temporal head
    has positions failed in every embedding actor, a Ray Data traceback after Ray had started."""
    from clipray.models import check_frames

    try:
        check_frames(conf["overrides"]["head"], int(conf["context_length"]), max_frames)
    except ValueError as e:
        raise ConfigError(f"video.max_frames={max_frames}: {what}: {e}") from None


def recorded_sampling(conf: dict) -> dict[str, Any]:
    """How the training run that made the export sampled clips and cut captions (recorded in
    its `extra`), under this config's keys (video.fps, ..., serve.max_words); {} if not recorded."""
    extra = conf.get("extra") or {}
    video = extra.get("video") or {}
    trained = {f"video.{k}": video[k] for k in SAMPLING if k in video}
    if "max_words" in extra:
        trained["serve.max_words"] = extra["max_words"]
    return trained


def words_kept(conf: dict, max_words: int) -> int:
    """The tokens a query keeps under serve.max_words with this export: no more than its text
    tower's positions (`context_length`), as training capped data.max_words."""
    return min(max_words, int(conf.get("context_length") or max_words))


def sampling_notice(conf: dict, cfg: AppConfig, what: str = "export") -> str:
    """How this index would sample clips or cut captions unlike the training run that made the
    export (`recorded_sampling`), with the overrides that match it; "" when alike or not
    recorded. Not refused: another sampling may be meant, but unsaid it gives a worse index."""
    trained = recorded_sampling(conf)
    now = {"serve.max_words": words_kept(conf, cfg.serve.max_words), **{f"video.{k}": getattr(cfg.video, k) for k in SAMPLING}}
    differ = {k: v for k, v in trained.items() if v != now[k]}
    if not differ:
        return ""
    return (f"the {what} was trained with {' '.join(f'{k}={v}' for k, v in differ.items())}, and this index "
            f"uses {' '.join(f'{k}={now[k]}' for k in differ)}; give the former as overrides to "
            "sample clips and cut captions as training did")


def _build(cfg: AppConfig, out: Path, quiet: bool) -> dict[str, Any]:
    import ray.data

    from clipray.runtime import init_ray

    export = _local_export(cfg.checkpoint, "checkpoint", out)
    conf = _check_export(export, "checkpoint", indexable=True)
    check_frame_positions(conf, f"checkpoint={cfg.checkpoint}", cfg.video.max_frames)
    notice = sampling_notice(conf, cfg)
    if notice:
        print(f"[index] note: {notice}", file=sys.stderr, flush=True)
    rerank = ""
    if cfg.index.rerank_checkpoint:
        rerank = _local_export(cfg.index.rerank_checkpoint, "index.rerank_checkpoint", out)
        rconf = _check_export(rerank, "index.rerank_checkpoint", indexable=False)
        check_frame_positions(rconf, f"index.rerank_checkpoint={cfg.index.rerank_checkpoint}", cfg.video.max_frames)
        # its frame features are decoded with this index's sampling too
        notice = sampling_notice(rconf, cfg, "re-ranker export")
        if notice:
            print(f"[index] note: {notice}", file=sys.stderr, flush=True)
    if cfg.index.kind == "ivf_pq":  # now, not in build_faiss after every clip is embedded
        store.pq_sub_quantizers(conf["open_clip_cfg"]["embed_dim"], cfg.index.pq_m)
    meta, fp = store.read_meta(out), store.fingerprint(export)
    began = {"checkpoint": (export, fp)}  # each export as this run began with it (checked again once embedded)
    if rerank:
        began["index.rerank_checkpoint"] = (rerank, store.fingerprint(rerank))
    if meta and meta["fingerprint"] != fp:
        raise ConfigError(f"{out} was built with another model ({meta['export']}); "
                          "vectors from two models cannot share an index: use a new out=")
    # a first build stopped after its part and before index.json (killed, out of memory in the
    # faiss rebuild) left clips embedded by an export that no index.json names: taken as this
    # run's, another model's vectors were served as this one's, without a word
    other = store.part_fingerprints(out) - {fp}
    if other:
        raise ConfigError(f"{out} holds clips embedded with another model (fingerprint {', '.join(sorted(other))}) "
                          f"by a `clipray index` that stopped before writing {store.META}: vectors from two "
                          "models cannot share an index: use a new out=, or that run's checkpoint=")
    # (and features stored with another re-ranker, or none, by such a first build: the index.json
    # then written named this run's re-ranker, and its rows without features failed every search
    # that drew them, or the Reranker's start, saying to copy the index folder again)
    rerank_fp = began["index.rerank_checkpoint"][1] if rerank else ""
    other = set() if meta else store.part_reranks(out) - {rerank_fp}
    if other:
        said = " and ".join("without re-ranker features" if o == "" else f"with the features of the re-ranker "
                            f"export of fingerprint {o}" for o in sorted(other))
        now = f"this run's is {rerank_fp}" if rerank_fp else "this run has no index.rerank_checkpoint"
        raise ConfigError(f"{out} holds clips stored {said} by a `clipray index` that stopped before writing "
                          f"{store.META}, and {now}: every clip needs features of one re-ranker, or none does: "
                          "use a new out=, or that run's index.rerank_checkpoint (or none)")
    if meta and meta.get("rerank") and rerank and meta["rerank"]["fingerprint"] != store.fingerprint(rerank):
        raise ConfigError(f"{out}: re-ranker export differs from the one the index holds")
    # every row needs re-ranker features or none does: a row without them fails every search
    # whose candidates include it
    if meta and meta.get("rerank") and not rerank:
        raise ConfigError(f"{out} holds re-ranker features for its {meta['count']} clips: append with the "
                          f"same index.rerank_checkpoint ({meta['rerank']['export']})")
    if meta and not meta.get("rerank") and rerank:
        raise ConfigError(f"{out} has no re-ranker features for its {meta['count']} clips: build a new "
                          "index (another out=) with index.rerank_checkpoint")
    # the served app samples query uploads as the index records, and one vector space holds
    # clips sampled one way: an append sampled another way would mix the two unseen
    # (a first build stopped before writing index.json: its parts say how their clips were sampled)
    held = (meta or {}).get("video") or store.part_sampling(out)
    differ = [k for k in SAMPLING if k in held and held[k] != getattr(cfg.video, k)]
    if differ:
        raise ConfigError(f"{out} holds clips sampled with {' '.join(f'video.{k}={held[k]}' for k in differ)}; "
                          f"this append asks {' '.join(f'video.{k}={getattr(cfg.video, k)}' for k in differ)}: "
                          "give the former as overrides, or build a new index (another out=)")
    existing, files = store.read_table(out, store.META_COLUMNS), set()
    rows, captions = plan_clips(cfg, store.existing_ids(existing), files)
    again, signs = changed_clips(out, files, existing)
    del files
    if not rows and not len(existing):  # no skip report to look at: nothing was tried
        raise ConfigError(f"manifest={cfg.manifest} has no clip to index" + (
            f" in the {cfg.index.split} split (index.split)" if cfg.index.split != "all" else ""))
    why = store.too_few_for(cfg.index.kind, len(existing) + len(rows))
    if why:  # now, not after hours of embedding
        raise ConfigError(f"index {out}: {len(existing)} clips indexed + {len(rows)} new from {cfg.manifest}; {why}")
    print(f"index {out}: {len(existing)} clips already embedded, {len(rows)} new"
          + (f", {len(again)} embedded again (their files were written anew since)" if again else "")
          + f" ({cfg.index.split} split{', windows %gs/%gs' % (cfg.index.window_s, cfg.index.stride_s) if cfg.index.window_s else ''})",
          flush=True)
    rows = [{AGAIN: -1, **r} for r in rows] + again
    t0, done, skipped, new, every, since = time.perf_counter(), 0, [], [], Every(PROGRESS_S), None
    cut: list[tuple[int, dict]] = []  # the clips whose window was cut at their video's end
    rewritten = {r["path"] for r in again}
    if rows:
        import pyarrow as pa

        from clipray.runtime import model_pool

        init_ray(cfg.ray, quiet=True)  # after the checks above: a wrong path fails in a second

        gpus = model_pool("index", cfg.index.actors, cfg.index.actor_cpus, cfg.index.actor_gpus)
        # each clip's place in the plan: the actors' batches come back in the order they finish,
        # and the row ids (the served clip ids) and skip report follow the plan, not the timing
        table = pa.Table.from_pylist(rows).append_column(PLAN, pa.array(np.arange(len(rows), dtype=np.int64)))
        ds = ray.data.from_arrow(table).repartition(target_num_rows_per_block=cfg.index.batch)
        del table
        ds = ds.map_batches(
            ClipEmbedder, fn_constructor_args=(export, cfg.video, rerank, gpus > 0),
            batch_size=cfg.index.batch, compute=ray.data.ActorPoolStrategy(size=cfg.index.actors),
            num_cpus=cfg.index.actor_cpus, num_gpus=gpus, batch_format="numpy")
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, reason in enumerate(b["skip"]):
                if reason or np.isfinite(b["cut"][i]):
                    clip = {"video_id": str(b["video_id"][i]), "path": str(b["path"][i]),
                            "start": _f(b["start"][i]), "end": _f(b["end"][i])}
                    if reason:
                        skipped.append((int(b[PLAN][i]), dict(clip, reason=str(reason))))
                    else:
                        cut.append((int(b[PLAN][i]), dict(clip, length=round(float(b["cut"][i]), 3))))
            keep = np.array([not r for r in b["skip"]], bool)
            if keep.any():
                new.append({k: v[keep] for k, v in b.items() if k != "skip"})
            done += len(b["skip"])
            since = since or (time.perf_counter(), done)
            if not quiet:
                _progress(done, len(rows), len(skipped), since, every)
        if not quiet and sys.stdout.isatty():
            print(flush=True)
    # every actor read the export from its path as it started: one written again there meanwhile
    # (a training run of that name, a clip editing round) embedded clips with other weights
    # than the index records, some actors' with the old, some with the new, without a word
    changed = [f"{what}={path}" for what, (path, was) in began.items() if store.fingerprint(path) != was]
    if changed:
        raise ConfigError(f"{' and '.join(changed)}: written again while this run embedded its clips (other "
                          f"weights than it began with); {out} is as it was: run clipray index again")
    first_id = len(existing)
    from clipray.pipeline import CUT_REPORT, cut_line  # (torch's import: not before the checks above)

    # the clips tried again: their earlier lines in the skip report give way to this run's outcome
    tried = {store.clip_key(r["path"], r["start"], r["end"]) for r in rows} \
        if (out / "skip_report.jsonl").exists() or (out / CUT_REPORT).exists() else set()
    del existing, rows, again  # the index's clip table and this run's plan: not needed from here on
    redone = sum(int((b[AGAIN] >= 0).sum()) for b in new)
    # (the sampling too: a first build stopped before index.json left parts that said nothing of it)
    added = _write_new(out, new, first_id, rerank, fp, {k: getattr(cfg.video, k) for k in SAMPLING}, rerank_fp)
    # recorded once its clips are stored; not for a rewritten file a clip of which could not be
    # embedded again (it keeps its old vector): the next run tries all of them again
    failed = {s["path"] for _, s in skipped} & rewritten
    store.write_signatures(out, {p: sign for p, sign in signs.items() if p not in failed})
    if skipped or tried:
        append_skips(out, [s for _, s in sorted(skipped, key=lambda p: p[0])], tried)
    if cut or (out / CUT_REPORT).exists():
        append_skips(out, [c for _, c in sorted(cut, key=lambda p: p[0])], tried, CUT_REPORT)
    meta = _rebuild(out, cfg, export, fp, rerank, conf, captions, meta, quiet)
    meta.setdefault("history", []).append({
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "manifest": cfg.manifest, "split": cfg.index.split,
        "window_s": cfg.index.window_s, "stride_s": cfg.index.stride_s, "added": added, "replaced": redone,
        "skipped": len(skipped), "cut": len(cut), "seconds": round(time.perf_counter() - t0, 2)})
    store.write_meta(out, meta)
    rec = meta.get("recall") or {}
    print(f"index {out}: {meta['count']} clips ({added} added, {f'{redone} embedded again, ' if redone else ''}"
          f"{len(skipped)} skipped), "
          f"{meta['kind']} dim {meta['dim']}" + (f", recall@10 vs exact {rec.get('recall@10', float('nan')):.3f} "
          f"on {rec.get('queries')} caption queries" if rec else ""), flush=True)
    if skipped:
        print(skip_summary(out, [s for _, s in skipped]), flush=True)
    if cut:
        print(f"  {cut_line(len(cut), str(out / CUT_REPORT))}", flush=True)
    return meta


def changed_clips(out: Path, files: set[str], existing: Any) -> tuple[list[dict], dict]:
    """The indexed clips of the manifest's `files` written anew since they were embedded (their
    size or modification time, from a listing of their folders, differs from the one `files/`
    records), to embed again under their row ids; and the signatures to record, the ones that
    differ from it (taken now, before embedding: a file written during the run is embedded again
    by the next). A file indexed before signatures were recorded is taken as unchanged, said once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    signs, was = store.file_signatures(files), store.recorded_signatures(out)
    unknown = pa.array([p for p in signs if p not in was], pa.string())
    old = pc.sum(pc.is_in(unknown, value_set=existing.column("path").unique())).as_py() if len(existing) else 0
    if old:
        print(f"[index] note: {old} files of the manifest hold clips indexed before `clipray index` recorded each "
              "file's size and modification time: taken as unchanged and recorded now (one written anew before "
              "this run keeps its old vectors: build a new index, another out=, to embed them again)",
              file=sys.stderr, flush=True)
    changed = pa.array([p for p, sign in signs.items() if was.get(p, sign) != sign], pa.string())
    # (none without clips: a first build whose every clip was skipped recorded its files, and
    # its table of no parts has columns of no type, which is_in refused with a traceback)
    stale = existing.filter(pc.is_in(existing.column("path"), value_set=changed)).to_pylist() \
        if len(changed) and len(existing) else []
    again = [{AGAIN: r.pop("row_id"), **r} for r in stale]
    return again, {p: sign for p, sign in signs.items() if was.get(p) != sign}


def skip_summary(out: Path, skips: list[dict]) -> str:
    """The summary's line for this run's skipped clips: their count by reason (grouped as a
    training run's table groups them) and the report that lists each."""
    from clipray.pipeline import reason_counts

    return (f"  skipped {len(skips)} clips {reason_counts(skips)}; each with its reason in "
            f"{out / 'skip_report.jsonl'}")


def append_skips(out: Path, skips: list[dict], tried: frozenset | set = frozenset(),
                 name: str = "skip_report.jsonl") -> None:
    """Add this run's skipped clips to `out/skip_report.jsonl`, dropping the report's earlier
    lines for the clips this run `tried` again (their clip_key): it has their outcome now. A
    clip that could not be embedded is tried again by every run, and an unchanged re-run added
    each one to the report once more; one fixed since stayed listed though it is indexed.
    The report and this run's lines are written under another name that replaces it when
    whole. Appended in place, a full disk (or a kill) midway left a line cut, which the next
    run's first line then joined. A full disk (or a quota) is an OSError naming the report:
    Python's names no file, and `clipray index` ended in its traceback after every clip was
    embedded. `name`: CUT_REPORT, the same for the clips cut at their video's end."""
    report = out / name

    def again(line: str) -> bool:
        try:
            s = json.loads(line)
        except ValueError:  # not ours to judge: kept as it is
            return False
        return isinstance(s, dict) and "path" in s and store.clip_key(s["path"], s.get("start"), s.get("end")) in tried

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            if report.exists():
                with open(report) as old:
                    f.writelines(line for line in old if not (tried and line.strip() and again(line)))
            f.writelines(json.dumps(s) + "\n" for s in skips)

    store.write_whole(report, f"{report}.tmp", write)


def _f(v: Any) -> Optional[float]:
    return None if v is None or np.isnan(v) else float(v)


def _write_new(out: Path, new: list[dict], first_id: int, rerank: str, fp: str = "",
               sampling: Optional[dict] = None, rerank_fp: str = "") -> int:
    """Write the embedded batches `new` as one part (and their re-ranker features as another),
    emptying `new` as they are joined: each column's batches go as it is joined, and none is
    left for the faiss rebuild, which holds every embedding of the index at least twice.
    `rerank_fp`: the fingerprint of the re-ranker export (`rerank`), which the part records."""
    import pyarrow as pa

    if not new:
        return 0
    cat = {k: np.concatenate([b.pop(k) for b in new]) for k in list(new[0])}
    new.clear()
    order = np.argsort(cat.pop(PLAN), kind="stable")  # the plan's order, whichever actor finished first
    for k in cat:
        cat[k] = cat[k][order]
    # a clip embedded again (its file written anew) keeps its row id; a new one takes the next
    again = cat.pop(AGAIN, np.full(len(order), -1))
    fresh = again < 0
    cat["row_id"] = np.where(fresh, first_id + np.cumsum(fresh) - 1, again).astype(np.int64)
    cat["start"] = np.array([_f(v) for v in cat["start"]], dtype=np.float64)
    cat["end"] = np.array([_f(v) for v in cat["end"]], dtype=np.float64)
    cat.pop("cut", None)  # (listed in CUT_REPORT: a clip keeps the manifest's window, its identity)
    if rerank:  # the re-ranker part first: an interrupted run then leaves no orphan row ids
        store.write_part(out, {"row_id": cat["row_id"], "feats": cat.pop("rerank_feats"),
                               "mask": cat.pop("rerank_mask")}, sub=store.RERANK_DIR)
    if not fresh.all():  # their new vectors replace the old ones (store.read_embeddings)
        store.write_rows(out, store.REPLACED_DIR, {"row_id": pa.array(cat["row_id"][~fresh]),
                                                   "embedding": store.vectors(cat["embedding"][~fresh])})
    if fresh.any():
        keep = slice(None) if fresh.all() else fresh  # (no copy of the columns of an append of new clips)
        store.write_part(out, {k: [None if isinstance(x, float) and np.isnan(x) else x for x in v[keep]]
                               if k in ("start", "end") else v[keep] for k, v in cat.items()},
                         fingerprint=fp, sampling=sampling, rerank=rerank_fp)
    return int(fresh.sum())


def _rebuild(out: Path, cfg: AppConfig, export: str, fp: str, rerank: str, conf: dict,
             captions: list[str], meta: Optional[dict], quiet: bool = False) -> dict:
    """faiss over every stored embedding; recall@10 of an approximate kind vs exact. Unless
    `quiet`, a line as it starts and one with its time at the end: on millions of clips reading
    the vectors back, training an IVF/PQ index and the recall check take minutes."""
    import faiss

    ix, t0 = cfg.index, time.perf_counter()
    if not quiet:
        check = f" and its recall@10 check on {len(captions)} caption queries" if ix.kind != "flat" and captions else ""
        print(f"index {out}: building the {ix.kind} faiss index{check} ...", flush=True)
    x = store.read_embeddings(out)
    if len(x) == 0:
        raise ConfigError(f"{out}: no clip could be embedded (see skip_report.jsonl)")
    index, params = store.build_faiss(x, ix.kind, ix.nlist, ix.pq_m, ix.refine, ix.hnsw_m)
    search = {"nprobe": ix.nprobe, "ef_search": ix.ef_search, "refine": ix.refine}
    store.set_search_params(index, **search)
    recall = None
    if ix.kind != "flat" and captions:
        exact = faiss.IndexFlatIP(x.shape[1])
        exact.add(x)
        recall = store.recall_at_k(index, exact, _caption_queries(export, captions, cfg), captions=captions)
    saved = store.save_faiss(out, index)
    if not quiet:
        print(f"index {out}: {ix.kind} faiss index of {len(x):,} clips built and saved in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
    meta = dict(meta or {})
    meta.update(format=store.FORMAT, faiss_file=saved, export=export, export_rel=os.path.relpath(export, out.absolute()),
                fingerprint=fp, dim=int(x.shape[1]), count=int(len(x)),
                kind=ix.kind, build=params, search=search, recall=recall,
                video=dataclasses.asdict(dataclasses.replace(cfg.video, size=conf["image_size"])),
                tokenizer=conf["tokenizer_name"], max_words=cfg.serve.max_words,
                rerank={"export": rerank, "export_rel": os.path.relpath(rerank, out.absolute()),
                        "fingerprint": store.fingerprint(rerank)} if rerank else meta.get("rerank"))
    return meta


def _caption_queries(export: str, captions: list[str], cfg: AppConfig) -> np.ndarray:
    """The recall check's queries: `plan_clips` already sampled at most index.recall_queries."""
    import open_clip
    import torch

    from clipray.export import load_export
    from clipray.runtime import cap_threads

    cap_threads()  # torch's threads under a CPU quota, now that it is imported
    model = load_export(export)
    tok = open_clip.get_tokenizer(model.tokenizer_name, context_length=min(cfg.serve.max_words, model.context_length))
    with torch.no_grad():
        return model.encode_text(tok(captions)).float().numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray index", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config, e.g. serve/configs/demo.yaml")
    ap.add_argument("overrides", nargs="*", default=[], help="key=value, e.g. checkpoint=runs/demo/export "
                    "manifest=clipray_data/synth/manifest.parquet out=runs/index index.kind=ivf_sq8")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_app_config(args.config, args.overrides)

    from clipray.runtime import quiet_data_progress

    quiet_data_progress()
    build_index(cfg)  # starts Ray (or joins RAY_ADDRESS's) once its inputs check out
    return 0


if __name__ == "__main__":
    # through the `clipray` entry point, as `python -m train`: a bad config or checkpoint is one
    # line and exit status 2 (`ray job submit ... python -m serve.index` shows the same)
    from clipray.cli import main as cli

    raise SystemExit(cli(["index", *sys.argv[1:]]))
