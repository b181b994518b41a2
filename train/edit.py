"""`clipray edit CONFIG [key=value ...]` (= `python -m train.edit`): clip-boundary editing from
single timestamps, wrapped around any retrieval model (README: `clipray edit`).

Stage 1  each training caption's clip is built from the timestamps of its video
         (`clipray.editing.initial_clips`: edit.init, edit.window_s, edit.max_width_s).
Stage 2  warm-up: the student trains edit.warmup_epochs on those clips; the teacher is a copy.
Stage 3  edit.rounds times: the teacher scores candidate clips around every current clip (a Ray
         Data batch job on `ClipScorer` actors, GPUs when the cluster has them) and the best
         replaces the clip when it wins by more than edit.margin; the student trains
         edit.epochs_per_round more on the edited clips and is validated on edit.val_split.
         When its t2v R@1 + R@5 + R@10 beats the best so far it becomes the teacher and the
         next round edits again; otherwise the clips stay as they are until a student beats
         it (the spec edits only after a teacher update).
Finally  the last student is evaluated on edit.test_split, on ground-truth clips.

The student is one Ray Train + DeepSpeed run (train/driver.py) continued round after round, each
round on its own manifest, with one learning-rate schedule over all of them. The source manifest
needs a `timestamp` on every training row; its start/end, where given, are only the ground truth
that edited clips are compared with. Validation and test rows are used as they are.

Run directory = that of `clipray train`, plus:
  clips/round-NN.parquet   the manifest round NN trained on (round 00: the initial clips)
  clips/skips.jsonl        training captions left out (video unreadable, with why; timestamp past its end;
                           no words for the tokenizer)
                           and those the teacher could not score in a round
  teacher/                 the teacher's export
  edits.csv                one row per round: clips edited, mean boundary shift, mean tIoU of
                           the training clips with ground truth, validation metrics, teacher
  edit_result.json         the rounds and the final test metrics; edit_state.json lets a
                           re-run of the same command resume after the last finished round
                           (and holds a round's edits while it trains: a round stopped midway
                           goes on with them, not scored again)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from clipray.config import Config, ConfigError, EditConfig, VideoConfig
from clipray.editing import Bounds, candidates, choose, initial_clips, neighbour_bounds, tiou
from clipray.manifest import (PROGRESS_S, Every, ManifestError, iter_checked, manifest_files, manifest_metadata,
                              manifest_signature, resolve_path, write_manifest)
from clipray.pipeline import reason_counts


@dataclass
class Caption:
    """One training caption's editing state."""
    row_id: int
    video_id: str
    path: str
    caption: str
    bounds: Bounds
    clip: tuple[float, float]
    truth: Optional[tuple[float, float]]  # the manifest's start/end, if it has them


# ---------------------------------------------------------------- stage 1

def initial_captions(source: str, root: str, e: EditConfig, backend: str,
                     tokenize: Optional[Callable[[list[str]], Any]] = None) -> tuple[dict[int, Caption], list[dict]]:
    """Every training caption with its stage-1 clip, and the ones left out with their reason.
    Held in memory: editing sets are 10^4-10^5 captions, tens of bytes each. With the training
    run's `tokenize`, a caption that keeps no word for it (`&nbsp;`) is left out (NO_WORDS): the
    decoders skip it every round, and it was edited and counted in every round's figures. Its
    timestamp still bounds its neighbours' clips."""
    from concurrent.futures import ThreadPoolExecutor

    from clipray.pipeline import NO_WORDS
    from clipray.video import PROBE_THREADS, SkipClip, video_length
    from train.evaluate import has_words

    by_video: dict[str, list[dict]] = {}
    no_ts = []
    for r in iter_checked(source, split="train"):
        (no_ts if r["timestamp"] is None else by_video.setdefault(r["video_id"], [])).append(r)
    if no_ts:
        r = no_ts[0]
        raise ConfigError(f"{source}: {len(no_ts)} training rows have no timestamp (first: row {r['row_id']}, "
                          f"video {r['video_id']}); clip editing needs one per training caption")
    if not by_video:
        raise ConfigError(f"{source} has no training rows")

    def length(rows: list[dict]) -> tuple[str, Optional[float], str]:
        # every video is opened, a manifest's duration or not: a video shorter than its
        # duration says had a caption past its real end trained on frames before it (decoding
        # stops at the end), never edited and never reported; an unreadable one, its reason
        path = resolve_path(rows[0]["path"], root)
        try:
            real = video_length(path, backend)
        except SkipClip as e:
            return path, None, str(e)
        said = rows[0]["duration"]
        return path, min(real, said) if said else real, ""

    every = [r for rs in by_video.values() for r in rs]  # (`rows` names one video's below)
    words = dict(zip((r["row_id"] for r in every), has_words([r["caption"] for r in every], tokenize)
                     if tokenize else [True] * len(every)))
    captions, left_out = {}, []
    with ThreadPoolExecutor(PROBE_THREADS) as pool:
        lengths = list(pool.map(length, by_video.values()))
    for (vid, rows), (path, duration, unread) in zip(by_video.items(), lengths):
        usable = []
        for r in rows:
            if duration and r["timestamp"] <= duration:
                usable.append(r)
                continue
            why = f"timestamp past the video's end {duration:.2f}s" if duration else unread  # ("missing file", ...)
            left_out.append({"row_id": r["row_id"], "video_id": vid, "path": path, "round": 0, "reason": why})
        if not usable:
            continue
        ts = [r["timestamp"] for r in usable]
        clips = initial_clips(ts, duration, e.init, e.window_s, e.max_width_s, e.min_width_s)
        for r, clip, b in zip(usable, clips, neighbour_bounds(ts, duration)):
            if not words[r["row_id"]]:
                left_out.append({"row_id": r["row_id"], "video_id": vid, "path": path, "round": 0, "reason": NO_WORDS})
                continue
            truth = (r["start"], r["end"]) if r["start"] is not None else None
            captions[r["row_id"]] = Caption(r["row_id"], vid, path, r["caption"], b, clip, truth)
    if not captions:
        raise ConfigError(f"{source}: no training caption is usable ({reason_counts(left_out)})")
    return captions, left_out


def write_round(source: str, root: str, path: str, captions: dict[int, Caption], round_no: int,
                source_files: Optional[list] = None) -> None:
    """The source manifest with each training row's clip replaced by its current one (rows left
    out are dropped); row ids are kept, so rounds join with the source's ground truth. Video
    paths are written resolved under `root` (the source's video root): the round lives in the
    run folder, where a relative path would point at nothing. `source_files`: the source's
    manifest_signature when the run began; the source written again since is refused (the
    captions and clips joined by row id to rows they are not of, without a word)."""
    from train.driver import changed_manifests, manifest_changed, stored

    if source_files is not None and changed_manifests({source: source_files}):
        raise manifest_changed([source])

    def rows():
        for row in iter_checked(source):
            row = dict(row, path=resolve_path(row["path"], root))
            if row["split"] == "train":
                c = captions.get(row["row_id"])
                if c is None:
                    continue
                row.update(start=c.clip[0], end=c.clip[1])
            yield row

    meta = {**manifest_metadata(source), "edit_round": round_no}
    with stored(path):  # the run folder in object storage failing: a line, not pyarrow's traceback
        write_manifest(rows(), path, metadata=meta, keep_row_ids=True)


# ---------------------------------------------------------------- stage 3: the teacher's edits

class ClipScorer:
    """map_batches callable: the teacher scores each caption against its candidate clips and
    picks the clip to keep. One export loaded per actor (on a GPU when given one)."""

    def __init__(self, teacher: str, video: VideoConfig, max_words: int, edit: EditConfig, use_gpu: bool):
        import tempfile

        import open_clip
        import torch

        from clipray.export import fetch_export, load_export

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        with tempfile.TemporaryDirectory() as d:
            self.model = load_export(fetch_export(teacher, d), self.device)
        self.video = dataclasses.replace(video, size=self.model.image_size)
        self.tokenize = open_clip.get_tokenizer(self.model.tokenizer_name,
                                                context_length=min(max_words, self.model.context_length))
        self.edit = edit

    def scores(self, caption: str, clips: list) -> list[float]:
        """The model's caption-clip score for each decoded clip; NaN where one was skipped."""
        import torch

        from clipray.video import Clip

        ok = [k for k, c in enumerate(clips) if isinstance(c, Clip)]
        out = [math.nan] * len(clips)
        if not ok:
            return out
        frames = torch.from_numpy(np.stack([clips[k].frames for k in ok]))
        mask = torch.from_numpy(np.stack([clips[k].mask for k in ok])).to(self.device).bool()
        from clipray.metrics import similarity_in_blocks

        with torch.no_grad():
            text = self.model.encode_text(self.tokenize([caption]))
            feats = self.model.encode_frames(self.model.normalize(frames), mask)
            # float32 products, as evaluation scores: a bf16 export (a GPU run's) scored in bf16,
            # whose ~3 digits tied candidates that differ, and the tie kept the current clip
            if self.model.indexable:
                sim = similarity_in_blocks(self.model, text, self.model.pool_video(feats, mask))[0].tolist()
            else:
                sim = similarity_in_blocks(self.model, text, feats, mask)[0].tolist()
        for k, s in zip(ok, sim):
            out[k] = s
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from clipray.video import SkipClip, decode_windows

        e, n = self.edit, len(batch["row_id"])
        out = {"row_id": np.asarray(batch["row_id"], np.int64), "start": np.array(batch["start"], np.float64),
               "end": np.array(batch["end"], np.float64), "candidates": np.zeros(n, np.int64),
               "current": np.full(n, np.nan), "best": np.full(n, np.nan), "reason": np.full(n, "", dtype=object)}
        for i in range(n):
            b = Bounds(float(batch["lo"][i]), float(batch["t"][i]), float(batch["hi"][i]))
            wins = candidates(out["start"][i], out["end"][i], b, e.step_s, e.max_steps, e.min_width_s)
            try:
                clips = decode_windows(str(batch["path"][i]), wins, self.video)
            except SkipClip as err:
                out["reason"][i] = err.reason
                continue
            scores = self.scores(str(batch["caption"][i]), clips)
            if all(math.isnan(s) for s in scores):
                out["reason"][i] = f"no candidate clip could be decoded: {clips[0].reason}"
                continue
            k = choose(scores, e.margin)
            out["start"][i], out["end"][i] = wins[k]
            # the best candidate's score, kept or not: under a margin a gain short of it is still
            # the scale the margin is set against
            out["candidates"][i], out["current"][i], out["best"][i] = len(wins), scores[0], np.nanmax(scores)
        return out


def edit_clips(cfg: Config, captions: dict[int, Caption], teacher: str, round_no: int,
               quiet: bool = False) -> tuple[dict[int, tuple[float, float]], dict[int, float], list[dict]]:
    """Run the teacher over every training caption: the new clip of each, how much its best
    candidate beat its current clip (score units), and the captions it could not score (they
    keep their clip)."""
    import pyarrow as pa
    import ray.data

    from clipray.runtime import model_pool

    e = cfg.edit
    gpus = model_pool("edit", e.actors, e.actor_cpus, e.actor_gpus)
    rows = [{"row_id": c.row_id, "path": c.path, "caption": c.caption, "start": c.clip[0], "end": c.clip[1],
             "lo": c.bounds.lo, "t": c.bounds.t, "hi": c.bounds.hi} for c in captions.values()]
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows)).repartition(target_num_rows_per_block=e.batch)
    ds = ds.map_batches(ClipScorer, fn_constructor_args=(teacher, cfg.data.video, cfg.data.max_words, e, gpus > 0),
                        batch_size=e.batch, compute=ray.data.ActorPoolStrategy(size=e.actors),
                        num_cpus=e.actor_cpus, num_gpus=gpus, batch_format="numpy")
    new, gains, unscored = {}, {}, []
    every, t0 = Every(None if quiet else PROGRESS_S), time.perf_counter()
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, rid in enumerate(b["row_id"].tolist()):
            if b["reason"][i]:
                c = captions[rid]
                unscored.append({"row_id": rid, "video_id": c.video_id, "path": c.path, "round": round_no,
                                 "reason": str(b["reason"][i])})
            else:
                new[rid] = (float(b["start"][i]), float(b["end"][i]))
                gains[rid] = float(b["best"][i] - b["current"][i])  # NaN: the current clip could not be decoded
        if every():
            done = len(new) + len(unscored)
            print(f"[edit] round {round_no}: scored {done}/{len(rows)} captions "
                  f"({done / (time.perf_counter() - t0):.1f}/s)", flush=True)
    # in row order, not the order the actors' batches finished in: the round's means (float
    # sums), skips.jsonl and the saved state are the same however the job ran
    return (dict(sorted(new.items())), dict(sorted(gains.items())),
            sorted(unscored, key=lambda u: u["row_id"]))


def round_stats(captions: dict[int, Caption], new: dict[int, tuple[float, float]],
                gains: dict[int, float]) -> dict[str, Any]:
    """What an edit changed: clips edited, their mean boundary shift ((|d start| + |d end|) / 2,
    seconds), the mean tIoU with ground truth of the edited clips before and after, and the
    median over scored captions of the best candidate's gain on the current clip (the scale to
    set edit.margin against)."""
    moved = [(captions[r].clip, c, captions[r].truth) for r, c in new.items() if c != captions[r].clip]
    with_truth = [(a, b, t) for a, b, t in moved if t is not None]
    finite = [g for g in gains.values() if math.isfinite(g)]
    return {
        "edited": len(moved),
        "median_gain": float(np.median(finite)) if finite else None,
        "mean_shift_s": float(np.mean([(abs(b[0] - a[0]) + abs(b[1] - a[1])) / 2 for a, b, _ in moved])) if moved else 0.0,
        "edited_tiou_before": _mean(tiou(a, t) for a, _, t in with_truth),
        "edited_tiou_after": _mean(tiou(b, t) for _, b, t in with_truth),
    }


def _mean(xs) -> Optional[float]:
    xs = list(xs)
    return float(np.mean(xs)) if xs else None


def clip_stats(captions: dict[int, Caption]) -> dict[str, Optional[float]]:
    """The training clips as they stand: mean width, and mean tIoU with ground truth (None when
    the manifest has none)."""
    return {"train_tiou": _mean(tiou(c.clip, c.truth) for c in captions.values() if c.truth is not None),
            "mean_width_s": _mean(c.clip[1] - c.clip[0] for c in captions.values())}


# ---------------------------------------------------------------- the rounds

# the scoring job's resources, not what it computes (each caption is scored on its own): a
# resumed run may use other ones, on another cluster, and make the same edits
POOL_KEYS = ("actors", "actor_cpus", "actor_gpus", "batch")


STATE_KEYS = {"edit": dict, "records": list, "skips": list, "clips": dict}  # edit_state.json holds them


def _unreadable(uri: str) -> ConfigError:
    """The error of a state or result file that is not readable: cut by a write that stopped
    midway (in place, before 01c7ad5) or edited by hand, every later run of the command ended in
    json's JSONDecodeError traceback; a hand-edited state without its keys (`{"source": ...}`)
    in a KeyError traceback."""
    return ConfigError(f"{uri}: not readable (cut by a write that stopped midway?), and the editing run "
                       "cannot go on without it: give a new train.run_name")


def _get_json(uri: str, keys: Optional[dict[str, type]] = None) -> Optional[dict]:
    """The JSON object at `uri` (None when there is none), holding `keys` with their types."""
    from train.driver import read_json

    return read_json(uri, keys, _unreadable(uri))


def _copy_export(src: str, dst: str) -> None:
    from clipray.export import CONFIG, WEIGHTS
    from clipray.manifest import fsspec_path

    from train.driver import copy_whole, stored

    fs, s = fsspec_path(src)
    d = fsspec_path(dst)[1]
    with stored(dst):  # the run folder in object storage failing: a line, not botocore's traceback
        fs.makedirs(d, exist_ok=True)
    for name in (WEIGHTS, CONFIG):  # each whole: the teacher is what a resumed run goes on from
        copy_whole(f"{dst}/{name}", lambda tmp: fs.cp_file(f"{s}/{name}", tmp))  # copy() would glob a "[2]"


def _val(final: dict) -> dict[str, float]:
    v = {k: final[f"t2v_{k}"] for k in ("r1", "r5", "r10")}
    return {f"val_{k}": x for k, x in v.items()} | {"val_rsum": sum(v.values())}


def run(cfg: Config, quiet_ray: bool = False) -> dict[str, Any]:
    """Stages 1-3 and the final test; returns edit_result.json's content."""
    with contextlib.ExitStack() as held:  # the run folder's lock, once it is made
        return _run(cfg, quiet_ray, held)


def _run(cfg: Config, quiet_ray: bool, held: contextlib.ExitStack) -> dict[str, Any]:
    from clipray.manifest import default_root
    from clipray.runtime import init_ray, model_pool, quiet_data_progress
    from train import driver

    e = cfg.edit
    source = cfg.data.manifest
    if not source:
        raise ConfigError("data.manifest is empty: give a manifest with timestamps (e.g. data.manifest=PATH)")
    if cfg.data.shard_stream or cfg.train.max_steps or cfg.train.checkpoint_every_steps:
        raise ConfigError("clip editing trains by epochs: unset data.shard_stream, train.max_steps and "
                          "train.checkpoint_every_steps")
    if e.init == "window" and e.window_s <= 0:
        raise ConfigError("edit.init=window needs edit.window_s > 0 (the clip's width around its timestamp)")
    if e.init == "midpoint" and e.window_s > 0:  # else the width asked for was dropped without a word
        raise ConfigError(f"edit.window_s={e.window_s:g} is read only with edit.init=window; "
                          "edit.init=midpoint takes clips between midpoints (edit.max_width_s caps them)")
    for key in ("max_width_s",) + (("window_s",) if e.init == "window" else ()):
        if 0 < getattr(e, key) < e.min_width_s:  # else every clip is widened past it, silently
            raise ConfigError(f"edit.{key}={getattr(e, key):g} is below edit.min_width_s={e.min_width_s:g}, "
                              "which every clip is widened to: lower edit.min_width_s, or raise it")
    try:
        manifest_files(source)
    except ManifestError as err:
        raise ConfigError(f"{err}; a manifest with timestamps comes from `clipray data synth --out DIR "
                          "--idle-seconds 1` (DIR/events.parquet) or `clipray data prepare youcook2 ...`") from None
    cfg = driver.model_io(cfg)  # loads open_clip's model configs (~4 s): after the cheap checks
    driver.check_negatives(cfg)
    out = driver.run_dir(cfg)
    # data.video_root stays as given: the rounds' manifests hold absolute paths, and an
    # evaluation manifest in another folder resolves its relative paths against its own folder
    # (they were taken under the source's, so every evaluation clip was skipped)
    root = cfg.data.video_root or default_root(source)
    data = dataclasses.replace(cfg.data, eval_manifest=cfg.data.eval_manifest or source, eval_split=e.val_split)
    epochs = e.warmup_epochs + e.rounds * e.epochs_per_round
    base = dataclasses.replace(cfg, data=data, train=dataclasses.replace(cfg.train, epochs=epochs))
    for split in (e.val_split, e.test_split):
        if driver.count_rows(data.eval_manifest, split) < 1:
            raise ConfigError(f"{data.eval_manifest} has no {split!r} rows: set edit.val_split / edit.test_split")
    # each round trains on the usable captions: too few for one step was refused only by the
    # warm-up's training, after Ray started
    driver.check_steps(base, driver.count_rows(source, "train"))
    # the manifest's checks first: made after the run folder, each refusal (no timestamps,
    # timestamps outside their clips, repeated row ids) left an empty run folder behind
    from clipray.pipeline import caption_tokenizer

    captions, skips = initial_captions(source, root, e, data.video.backend,
                                       caption_tokenizer(data.tokenizer, data.max_words))
    driver.check_steps(base, len(captions), "usable training captions")
    driver.make_run_dir(out)
    held.enter_context(driver.run_folder_lock(out))  # its rounds' training runs hold it too
    with driver.storage_access(cfg, out):
        state = _get_json(f"{out}/edit_state.json", STATE_KEYS)
        if state is not None and not state.get("records") and not driver.checkpointed(out):
            state = None  # recorded at a start that trained nothing yet: that run starts afresh
    changed = [f"edit.{k}: {v!r} -> {getattr(e, k)!r}" for k, v in (state or {}).get("edit", {}).items()
               if k not in POOL_KEYS and v != getattr(e, k, None)]
    if changed:
        raise ConfigError(f"{out} holds an editing run with other edit.* settings ({'; '.join(changed)}); "
                          "use a new train.run_name, or the run's settings")
    # its clips join this manifest by row id; the same files at another path are the source
    # moved or copied (with the project, to another disk or bucket)
    source_files = manifest_signature(source)
    if state and state.get("source", source) != source and state.get("source_files") != source_files:
        raise ConfigError(f"{out} holds an editing run of another data.manifest ({state['source']}); "
                          "use a new train.run_name")
    # the same path, other files: the manifest written again since (`clipray data prepare --out`
    # it), whose rows the run's clips and skips, joined by row id, were not of
    if state and state.get("source_files") not in (None, source_files):
        raise ConfigError(f"{out} holds an editing run of {source} as it was: it holds other files now "
                          "(written again since), which the run's clips, joined by row id, are not of; "
                          "use a new train.run_name")
    records: list[dict] = state["records"] if state else []
    if len(records) == e.rounds + 1:
        finished = driver.finished_run("edit", out, "edit_result.json", "every round", bool,
                                       lambda r: _summary(r, out), _unreadable(f"{out}/edit_result.json"))
        if finished is not None:
            return finished
    if state:  # resume after the last finished round, with its clips and skips
        for rid, clip in state["clips"].items():
            if int(rid) in captions:  # (a video unreadable since is left out again)
                captions[int(rid)].clip = tuple(clip)
        skips, since = resumed_skips(state["skips"], skips, captions)
        if since:
            print(f"[edit] {len(since)} more training captions left out since the last run: "
                  f"{reason_counts(since)}", flush=True)
    def save_state(pending: Optional[dict] = None) -> None:
        # whole or not at all (as every file of the run folder here): a cut edit_state.json
        # (a full disk, the job killed mid-write) failed every re-run
        driver.put_text(f"{out}/edit_state.json", json.dumps({"edit": dataclasses.asdict(e), "source": source,
                                                             "source_files": source_files, "records": records,
                                                             "skips": skips,
                                                             "clips": {r: c.clip for r, c in captions.items()},
                                                             **({"pending": pending} if pending else {})}))

    # the training run's own settings check (batch size, model, optimiser ...), which each
    # round's training repeats: made now, a changed setting was refused only after Ray started
    # and the round's teacher had scored every caption again
    with driver.storage_access(cfg, out):
        driver.check_resume(out, driver.resume_key(base, 0, stop_epoch=epochs, command="clipray edit"))
        if state is None:
            # the edit.* settings and the manifest, recorded before the warm-up: recorded first
            # after round 0, a run stopped in its warm-up resumed its checkpoints with other
            # settings or on another manifest (round 0's clips made anew from them), unchecked
            save_state()
    init_ray(cfg.ray, quiet=quiet_ray)
    quiet_data_progress()
    if e.rounds:  # the teacher's pool first runs after the warm-up: a pool that cannot fit fails now
        model_pool("edit", e.actors, e.actor_cpus, e.actor_gpus)
    if skips and not records:
        print(f"[edit] {len(skips)} training captions left out: {reason_counts(skips)}", flush=True)
    print(_plan_line(out, len(captions), e), flush=True)

    teacher, best = f"{out}/teacher", max((r["val_rsum"] for r in records), default=-math.inf)
    changed = records[-1]["teacher_updated"] if records else True
    # a round's edits are saved before it trains: a run stopped during the round (its training,
    # or the teacher's copy at its end) resumes with the clips it was training on. Scored again,
    # they came from a teacher that a finished round may already have replaced, so the round's
    # manifest held clips its training never saw (and a cut copy failed every re-run)
    pending = (state or {}).get("pending")
    for round_no in range(len(records), e.rounds + 1):
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"round": round_no, "edited": 0, "mean_shift_s": 0.0}
        new: dict[int, tuple] = {}
        unscored: list[dict] = []
        if pending and pending["round"] == round_no:
            rec, unscored = pending["rec"], pending["unscored"]
            new = {int(rid): tuple(clip) for rid, clip in pending["clips"].items() if int(rid) in captions}
            print(f"[edit] round {round_no}: the stopped run's edits are reused, not scored again", flush=True)
        elif round_no > 0 and changed:
            new, gains, unscored = edit_clips(base, captions, teacher, round_no, quiet_ray)
            rec.update(round_stats(captions, new, gains), unscored=len(unscored))
            save_state({"round": round_no, "rec": rec, "unscored": unscored, "clips": new})
        skips += unscored
        for rid, clip in new.items():
            captions[rid].clip = clip
        manifest = f"{out}/clips/round-{round_no:02d}.parquet"
        write_round(source, root, manifest, captions, round_no, source_files)
        stop = e.warmup_epochs + round_no * e.epochs_per_round
        print(f"[edit] round {round_no}: {rec['edited']} clips edited; training to epoch {stop}", flush=True)
        final = driver.run(dataclasses.replace(base, data=dataclasses.replace(data, manifest=manifest)),
                           quiet_ray=quiet_ray, stop_epoch=stop, table=False, command="clipray edit")
        rec.update(epoch=stop, **clip_stats(captions), **_val(final))
        changed = rec["val_rsum"] > best
        if changed:
            best = rec["val_rsum"]
            _copy_export(f"{out}/export", teacher)
        rec.update(teacher_updated=changed, manifest=manifest, seconds=round(time.perf_counter() - t0, 1))
        records.append(rec)
        driver.put_text(f"{out}/clips/skips.jsonl", "".join(json.dumps(s) + "\n" for s in skips))
        save_state()
        driver.put_text(f"{out}/edits.csv", _csv(records))
        print(_round_line(rec), flush=True)
    if records:  # again: a run stopped after a round's state and before its line here resumes past it
        driver.put_text(f"{out}/edits.csv", _csv(records))
    # again too: a resume with no round left (stopped in the final evaluation) that found captions
    # left out since (a video deleted) counted them in edit_result.json and the summary, which
    # point at clips/skips.jsonl, while that file, written only after a round, did not list them
    driver.put_text(f"{out}/clips/skips.jsonl", "".join(json.dumps(s) + "\n" for s in skips))

    test = driver.evaluate_export(base, f"{out}/export", e.test_split, name=f"eval-{e.test_split}")
    result = {"rounds": records, "test": test, **skip_counts(skips)}
    driver.put_text(f"{out}/edit_result.json", json.dumps(result, indent=1))
    print(_summary(result, out))
    return result


def resumed_skips(saved: list[dict], fresh: list[dict], captions: dict[int, Caption]) -> tuple[list[dict], list[dict]]:
    """A resumed run's skips, and the captions left out since the saved ones: stage 1 runs anew,
    and a video unreadable now (deleted, storage down) drops its captions from training, which
    `left_out` must count; a caption readable again trains, so it is no longer left out."""
    known = {s["row_id"] for s in saved if s["round"] == 0}
    since = [s for s in fresh if s["row_id"] not in known]
    return [s for s in saved if s["round"] > 0 or s["row_id"] not in captions] + since, since


def skip_counts(skips: list[dict]) -> dict[str, int]:
    """`left_out`: training captions never trained on (round 0's skips); `unscored`: the times a
    round's teacher could not score a caption, which kept its clip and still trained."""
    left_out = sum(s["round"] == 0 for s in skips)
    return {"left_out": left_out, "unscored": len(skips) - left_out}


COLUMNS = ("round", "epoch", "edited", "mean_shift_s", "median_gain", "edited_tiou_before", "edited_tiou_after",
           "train_tiou", "mean_width_s", "val_r1", "val_r5", "val_r10", "val_rsum", "teacher_updated", "unscored",
           "seconds", "manifest")


def _csv(records: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(records)
    return buf.getvalue()


def _f(x: Optional[float], fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _plan_line(out: str, captions: int, e: EditConfig) -> str:
    """The run's plan, as it starts ("warm-up 1 epochs" was said of one)."""
    return (f"[edit] run {out}: {_plural(captions, 'training caption')}, init={e.init}, warm-up "
            f"{_plural(e.warmup_epochs, 'epoch')}, {_plural(e.rounds, 'round')} x "
            f"{_plural(e.epochs_per_round, 'epoch')}")


def _round_line(r: dict) -> str:
    return (f"[edit] round {r['round']} done: edited {r['edited']} (mean shift {r['mean_shift_s']:.2f}s, "
            f"median gain {_f(r.get('median_gain'), '.4f')}), train clips: tIoU {_f(r['train_tiou'])}, "
            f"mean width {r['mean_width_s']:.2f}s; val R@1 {r['val_r1']:.1f} R@5 {r['val_r5']:.1f} "
            f"R@10 {r['val_r10']:.1f}, teacher {'updated' if r['teacher_updated'] else 'kept'}")


def _summary(result: dict, out: str) -> str:
    from clipray.pipeline import CUT_REPORT, SKIP_REPORT, cut_line

    rows = [f"{'round':>5}{'epoch':>6}{'edited':>8}{'shift s':>8}{'tIoU':>7}{'width s':>8}{'val R@1':>8}{'R@5':>6}"
            f"{'R@10':>6}  teacher"]
    for r in result["rounds"]:
        rows.append(f"{r['round']:>5}{r['epoch']:>6}{r['edited']:>8}{r['mean_shift_s']:>8.2f}"
                    f"{_f(r['train_tiou']):>7}{_f(r.get('mean_width_s'), '.2f'):>8}{r['val_r1']:>8.1f}{r['val_r5']:>6.1f}"
                    f"{r['val_r10']:>6.1f}  "
                    f"{'updated' if r['teacher_updated'] else 'kept'}")
    t = result["test"]
    return "\n".join([
        "", *rows,
        f"test ({t['eval_split']} split, ground-truth clips, {t['num_test_videos']} clips): t2v R@1 {t['t2v_r1']:.1f} "
        f"R@5 {t['t2v_r5']:.1f} R@10 {t['t2v_r10']:.1f} MdR {t['t2v_mdr']:.1f}; v2t R@1 {t['v2t_r1']:.1f}",
        # (edit_result.json had them, the console not: a teacher that could not score captions
        # went unseen there)
        f"captions left out: {result.get('left_out', 0)}; times the teacher could not score one (kept its clip): "
        f"{result.get('unscored', 0)}  (clips/skips.jsonl)",
        # the decoders' skips, training to test, as `clipray train` counts them
        f"skipped clips: {t.get('skipped_clips', 0)}  (see {out.rstrip('/')}/{SKIP_REPORT})",
        *([cut_line(t["cut_clips"], f"{out.rstrip('/')}/{CUT_REPORT}")] if t.get("cut_clips") else []),
        f"run directory: {out}  (edits.csv, edit_result.json, clips/, teacher/, export/)"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray edit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config, e.g. train/configs/edit_demo.yaml")
    ap.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. edit.rounds=2 edit.step_s=0.5")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    from clipray.config import load_config

    run(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    # through the `clipray` entry point, as `python -m train`: a bad config is one line, exit 2
    from clipray.cli import main as cli

    raise SystemExit(cli(["edit", *sys.argv[1:]]))
