"""The training driver: config -> Ray Data streams + TorchTrainer -> a run directory.

Run directory `<train.storage_path>/<train.run_name>/` (local or s3://) holds Ray's checkpoints
and, when the run ends: `result.json` (final metrics), `metrics.csv` (one row per epoch),
`curves.png` (loss and R@1 per epoch), `export/` (the model in the serving format),
`skip_report.jsonl` (clips that could not be decoded) and `config.yaml` (the resolved config).

Re-running the same command (same run name and storage path) resumes from the latest
checkpoint; `train.max_failures` lets Ray Train replace a killed worker and continue from it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from clipray.config import SAMPLING, Config, ConfigError, RunFailed, to_yaml
from clipray.manifest import (ManifestError, check_unique_ids, file_signature, filesystem, fsspec_path,
                              manifest_listing, manifest_signature, naming, reading, replace_whole)


def model_io(cfg: Config) -> Config:
    """Fit the data section to the model (frame size, tokenizer and caption length), and refuse
    the model options and evaluation settings that cannot work together."""
    from clipray.models import HEAD_NAMES, check_frames, check_options, check_pretrained, get_spec
    from clipray.models.backbone import open_clip_config, text_context
    from clipray.models.heads import HEADS
    from clipray.models.tuning import TUNINGS

    m = cfg.model
    for key, value, known in (("head", m.head, HEAD_NAMES), ("linear_patch", m.linear_patch, ("2d", "3d")),
                              ("tuning", m.tuning, sorted(TUNINGS))):
        if value is not None and value not in known:
            raise ConfigError(f"model.{key} must be one of {', '.join(known)}, got {value!r}")
    try:
        spec = get_spec(m.name)
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    head = m.head or spec.head
    if cfg.train.eval_dsl and not HEADS[head].indexable:
        # a cross-encoder's scores are logits of either sign and any size: sim x weight turns a
        # negative score's order around (a perfect ranking gave R@1 0) and a gap past ~7 logits
        # underflows the weight to 0, even in float64
        raise ConfigError(f"train.eval_dsl: dual softmax re-weights cosine similarities, and the {head} head "
                          "scores pairs with unbounded logits (a cross-encoder): set train.eval_dsl=false")
    try:
        check_options(m.linear_patch or spec.linear_patch, m.tuning or spec.tuning)
    except ValueError as e:
        raise ConfigError(f"model.linear_patch, model.tuning: {e}") from None
    try:  # else open_clip's RuntimeError in every training worker, once Ray is up
        check_pretrained(m.name, m.pretrained)
    except ValueError as e:
        raise ConfigError(f"model.pretrained={m.pretrained or spec.pretrained}: {e}") from None
    oc = open_clip_config(spec.open_clip_name)
    size = oc["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    ctx = text_context(oc)
    try:  # else a failure at the first batch in every worker
        check_frames(head, ctx, cfg.data.video.max_frames)
    except ValueError as e:
        raise ConfigError(f"data.video.max_frames={cfg.data.video.max_frames}: {e}") from None
    video = dataclasses.replace(cfg.data.video, size=size)
    data = dataclasses.replace(cfg.data, video=video, tokenizer=spec.tokenizer_name,
                               max_words=min(cfg.data.max_words, ctx))
    return dataclasses.replace(cfg, data=data)


def check_negatives(cfg: Config) -> None:
    """Refuse a batch in which the training loss has no negative: the contrastive loss of the
    loose heads scores each caption against the global batch (data.batch_size x
    train.num_workers), tightTransf's pair loss against each worker's own batch
    (data.batch_size). Over one clip, cross entropy is 0 at every step, with no gradient: the run
    trained nothing and exported its initial weights as finished."""
    from clipray.models import get_spec

    head = cfg.model.head or get_spec(cfg.model.name).head
    if head == "tightTransf" and cfg.data.batch_size < 2:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: the tightTransf head's loss scores each caption "
                          "against the clips of its worker's batch, and over one clip it is 0 at every step, so "
                          "nothing would train: give data.batch_size >= 2")
    if cfg.data.batch_size * cfg.train.num_workers < 2:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} x train.num_workers={cfg.train.num_workers} is a "
                          "batch of one clip: the contrastive loss scores each caption against the batch's "
                          "other clips, and with none it is 0 at every step, so nothing would train: give "
                          "data.batch_size >= 2")


def storage_root(cfg: Config) -> str:
    storage = cfg.train.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return storage.rstrip("/")


def ray_storage_args(storage: str) -> dict[str, Any]:
    """RunConfig's storage_path, and for a URI its filesystem: Ray reads a URI with pyarrow's
    FileSystem.from_uri, which cuts it at a '#' and decodes '%20' (a space or a letter past
    ASCII it refuses). A run stored at s3://b/runs#1 kept its checkpoints in s3://b/runs, and a
    new run at runs#2 resumed from them, trained nothing and exported the first run's model.
    The filesystem of `clipray.manifest.filesystem` takes the key as written, as clipray's own
    writes of the run folder do."""
    if "://" not in storage:
        return {"storage_path": storage}
    fs, path = filesystem(storage)
    return {"storage_path": path, "storage_filesystem": fs}


def ray_storage(cfg: Config, out: str) -> str:
    """The storage path Ray Train is given (its checkpoints go to <it>/<train.run_name>): the
    storage root. A run named with a '/' (group/one) and stopped before bd5de69 has them where
    Ray was given the run folder's parent, <storage>/group/group/one: it resumes from there, as
    it was, where the root would start it again from its first step without a word."""
    root = storage_root(cfg)
    if "/" not in cfg.train.run_name:
        return root
    parent = out.rsplit("/", 1)[0]
    fs, path = fsspec_path(out)
    legacy = f"{path.rsplit('/', 1)[0]}/{cfg.train.run_name}"
    try:
        if not fs.exists(f"{path}/{RAY_CHECKPOINT_RECORD}") and fs.exists(f"{legacy}/{RAY_CHECKPOINT_RECORD}"):
            print(f"[driver] resuming from {parent}/{cfg.train.run_name}, where clipray before bd5de69 kept "
                  "this run's checkpoints", flush=True)
            return parent
    except OSError:
        pass
    return root


def run_dir(cfg: Config) -> str:
    name = cfg.train.run_name
    # Ray Train takes the same name for the checkpoints' folder: an empty one it replaces with a
    # new generated name each start (never resumed), while the run's files went to the storage
    # root itself; an empty, "." or ".." part puts them beside it or in another folder
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ConfigError(f"train.run_name={name!r} is not a folder name under train.storage_path: give a name "
                          "(parts joined by '/', none empty, '.' or '..')")
    return f"{storage_root(cfg)}/{name}"


def job_working_dir() -> Path | None:
    """This process's working directory when it is the driver of a Ray job submitted with a
    working_dir (`ray job submit --working-dir .`): Ray's unpacked, temporary copy of the code."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor for the driver
    try:
        wd = (json.loads(raw).get("runtime_env") or {}).get("working_dir") if raw else None
    except (ValueError, AttributeError):
        return None
    # an uploaded package (gcs://_ray_pkg_...zip) or a remote zip is unpacked for the job; a
    # local:// one is used in place
    if not isinstance(wd, str) or "://" not in wd or wd.startswith("local://"):
        return None
    return Path.cwd().resolve()


STORAGE_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # scheme -> the extra with its fsspec package


def make_run_dir(out: str) -> None:
    """A local run folder that cannot be made (a file in its path, no permission) fails now,
    not after Ray starts; one in object storage needs no folder. Nor may it be inside a Ray
    job's unpacked working_dir (a relative train.storage_path in a job)."""
    if "://" in out:
        import fsspec

        scheme = out.split("://", 1)[0]
        try:  # the run's files go through fsspec: s3fs, gcsfs are extras
            fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError) as e:  # ValueError: a scheme fsspec does not know
            extra = STORAGE_EXTRAS.get(scheme)
            raise ConfigError(f"train.storage_path: the run folder {out} cannot be opened here: {e}"
                              + (f" (pip install 'clipray[{extra}]')" if extra else "")) from None
        return
    job_dir = job_working_dir()
    if job_dir is not None and Path(out).resolve().is_relative_to(job_dir):
        raise ConfigError(f"train.storage_path: the run folder {out} is inside this Ray job's working directory "
                          f"{job_dir}, Ray's temporary copy of the submitted code, which a later job does not share "
                          "(a resume would start over) and Ray deletes: give s3://..., gs://... or an absolute path "
                          "that every node shares")
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.storage_path: cannot create the run folder {out} ({e})") from e


RUN_LOCK = ".run.lock"  # held by the one process training (or clip editing) in a local run folder
_LOCKED: set[str] = set()  # run folders this process holds: clip editing's rounds train in its own


@contextlib.contextmanager
def run_folder_lock(out: str) -> Iterator[None]:
    """A local run folder, locked for this process. Two runs under one train.run_name at once
    both found no checkpoint, each recorded its own settings in resume_key.json over the
    other's, and both wrote checkpoints, skip files, metrics and the export into the one folder:
    a later resume went on from whichever checkpoint was newest, another run's under other
    settings, without a word. The second is now refused before Ray starts. (A run folder in
    object storage cannot be locked.)"""
    if "://" in out or out in _LOCKED:
        yield
        return
    from clipray.runtime import exclusive

    with exclusive(str(Path(out) / RUN_LOCK),
                   ConfigError(f"{out}: another training or clip editing run is writing this run folder now "
                               "(the same train.run_name and train.storage_path): let it finish, or give "
                               "another train.run_name")):
        _LOCKED.add(out)
        try:
            yield
        finally:
            _LOCKED.discard(out)


RESUME_KEY = "resume_key.json"  # what a checkpoint of the run must match to be continued
# 2: data.video.size as training used it, the model's (`model_io`); before (no key_version),
# `clipray train` recorded the config's, which no frame was ever decoded at
KEY_VERSION = 2
RAY_CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints


def resume_key(cfg: Config, steps_per_epoch: int, stop_epoch: int = 0,
               manifest_files: list | None = None, command: str = "clipray train") -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoints: the model the weights load
    into, the steps, batch and schedule the saved step and epoch count in, and the optimiser's
    settings: the checkpoint's optimiser and schedule state bring back their own learning rates,
    weight decay, betas and eps over the config's (a new optim.lr was ignored without a word),
    while a new warm-up would move the schedule under the saved step. A call with `stop_epoch`
    (clip editing's rounds) names new data each round, so the manifest is left out.
    `manifest_files` (`clipray.manifest.manifest_signature`), and a local model.pretrained
    file's size and hash, let a resume find the same manifest or weights at another path
    (moved or copied with the project, to another disk or bucket). data.video.size is recorded as
    `cfg` holds it: the runs give a config fitted to the model (`model_io`), its size the model's."""
    from train.ds_config import precision

    key = {# `clipray train` and `clipray edit` each took the other's checkpoints for its own under
           # one run name: nothing trained, and the other's evaluation and export came out as its own
           "command": command,
           "key_version": KEY_VERSION,
           "model": dataclasses.asdict(cfg.model),
           # the clips the weights learn from, sampled and tokenised alike (a resumed run on other
           # frames exported one sampling for weights trained on both)
           "data.video": {k: getattr(cfg.data.video, k) for k in (*SAMPLING, "size")},
           "data.max_words": cfg.data.max_words, "data.batch_size": cfg.data.batch_size,
           "train.num_workers": cfg.train.num_workers, "train.epochs": cfg.train.epochs,
           "train.max_steps": cfg.train.max_steps, "train.grad_accum": cfg.train.grad_accum,
           "train.zero_stage": cfg.train.zero_stage,
           # as resolved (auto: bf16 on GPU, fp32 on CPU): DeepSpeed keeps the optimiser's state
           # of a bf16 run in other files and keys, and a checkpoint of the other precision
           # failed to load in every worker (KeyError, FileNotFoundError) once Ray had started
           "train.precision": precision(cfg.train),
           "train.checkpoint_every_steps": cfg.train.checkpoint_every_steps,
           # optim.grad_clip is left out: it reaches DeepSpeed's config anew at every start
           **{f"optim.{k}": v for k, v in dataclasses.asdict(cfg.optim).items() if k != "grad_clip"}}
    if not stop_epoch:
        manifest = cfg.data.manifest if "://" in cfg.data.manifest else str(Path(cfg.data.manifest).resolve())
        key.update({"data.manifest": manifest, "steps_per_epoch": steps_per_epoch})
        if manifest_files is not None:
            key["data.manifest_files"] = manifest_files
        if cfg.data.shard_stream:  # its checkpoints name its shards by path: not to be found moved
            key["data.shard_stream"] = True
    if cfg.model.pretrained and os.path.isfile(cfg.model.pretrained):
        key["model.pretrained_file"] = file_signature(*filesystem(cfg.model.pretrained))
    return json.loads(json.dumps(key))  # tuples as lists, as read back


def _moved(saved: dict[str, Any], key: dict[str, Any]) -> dict[str, tuple]:
    """The paths that differ from the checkpoints' key only because their files were moved or
    copied (the same files at another path: the project to another disk, a manifest to another
    bucket): {key: (setting named, old path, new path)}."""
    moved = {}
    if (saved.get("data.manifest", key.get("data.manifest")) != key.get("data.manifest")
            and not key.get("data.shard_stream")
            and key.get("data.manifest_files") is not None
            and saved.get("data.manifest_files") == key["data.manifest_files"]):
        moved["data.manifest"] = ("data.manifest", saved["data.manifest"], key["data.manifest"])
    was, now = saved.get("model"), key.get("model")
    # the model as built (`_as_built`): model.head=meanP spelled out on test_meanP is its own head
    if (isinstance(was, dict) and was != now
            and {**_as_built(was), "pretrained": None} == {**_as_built(now), "pretrained": None}
            and key.get("model.pretrained_file") is not None
            and saved.get("model.pretrained_file") == key["model.pretrained_file"]):
        moved["model"] = ("model.pretrained", was["pretrained"], now["pretrained"])
    return moved


@contextlib.contextmanager
def storage_access(cfg: Config, out: str) -> Iterator[None]:
    """Around a run's first touch of its folder in object storage: what fails there (no
    credentials, no such bucket, no permission) is a line naming train.storage_path, not a
    botocore or gcsfs traceback."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        if "://" not in out:
            raise
        raise ConfigError(f"train.storage_path={cfg.train.storage_path}: cannot read or write the run folder "
                          f"{out} ({type(e).__name__}: {e})") from e


def _as_built(model: Any) -> Any:
    """A resume key's model settings as the model is built: a setting left unset (None) is the
    registered model's. Compared as given, `model.head=meanP` on test_meanP (whose head is
    meanP) was refused as another model than the run's."""
    from clipray.models import get_spec

    try:
        spec = get_spec(model["name"])
    except (TypeError, KeyError, ValueError):  # not a model mapping, or a name no longer registered
        return model
    return {**model, **{k: getattr(spec, k) for k in ("pretrained", "head", "linear_patch", "tuning")
                        if model.get(k) is None}}


def checkpointed(out: str) -> bool:
    """Whether the run folder `out` holds checkpoints Ray Train resumes from: its record of the
    checkpoints it finished, not the folders (a run stopped while writing its first checkpoint
    left a checkpoint_* folder and no record, and Ray starts that run afresh)."""
    fs, root = fsspec_path(out)
    # listed, not globbed: a run folder named like "exp [2]" is no glob pattern for itself
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:  # a new run in object storage, which has no empty folders
        return False
    return RAY_CHECKPOINT_RECORD in names


def interrupted_line(out: str) -> str:
    """What a run stopped by Ctrl-C says: how to resume, or, stopped before its first checkpoint
    (it said "its checkpoints stay" of none), that the same command starts it again."""
    if not _checkpointed_now(out):
        return ("\n[driver] training interrupted before its first checkpoint: the same command "
                "(same train.run_name and train.storage_path) starts it again")
    return (f"\n[driver] training interrupted; its checkpoints stay in {out}: re-run the same command "
            "(same train.run_name and train.storage_path) to resume from the latest")


def _checkpointed_now(out: str) -> bool:
    """`checkpointed`, after a run failed: whether the run folder holds a checkpoint it resumes
    from, False where the folder cannot be read (the failure is what the error is about)."""
    try:
        fs, root = fsspec_path(out)
        fs.invalidate_cache(root)  # an object store's listing cached before the run
        return checkpointed(out)
    except Exception:
        return False


def check_resume(out: str, key: dict[str, Any]) -> None:
    """Refuse to continue a run's checkpoints with other settings (re-running with another batch
    size would resume at the saved step of another schedule and mix the two silently); record
    the settings of a run that has no checkpoint yet."""
    fs, root = fsspec_path(out)
    saved = None
    resuming = checkpointed(out)
    if resuming:
        try:
            saved = json.loads(fs.cat_file(f"{root}/{RESUME_KEY}"))  # cat() would glob "[2]"
        except FileNotFoundError:
            saved = None  # a run from before this record: nothing to compare with
        except ValueError:  # (UnicodeDecodeError too)
            saved = []
        if saved is not None and not isinstance(saved, dict):
            # cut by a write that stopped midway (in place, before 068b29e), or edited by hand:
            # every later run of the command ended in json's JSONDecodeError traceback
            raise ConfigError(f"{out}/{RESUME_KEY}, the record of the settings this run's checkpoints were "
                              "trained with, is not readable (cut by a write that stopped midway?): delete it to "
                              "resume without comparing the settings, or give a new train.run_name")
    if saved is None:
        if not resuming and fs.exists(f"{root}/skips"):  # (clipray.pipeline.SKIP_DIR)
            # an earlier attempt that stopped before a checkpoint (a wrong data.video_root: every
            # clip missing): its skips were reported as this fresh run's, every clip of it trained
            fs.rm(f"{root}/skips", recursive=True)
        put_text(f"{out}/{RESUME_KEY}", json.dumps(key, indent=1))
        return
    # a record from before "command" was kept: clip editing's names no manifest (its rounds' change)
    was = saved.get("command") or ("clipray train" if "data.manifest" in saved else "clipray edit")
    if was != key["command"]:
        raise ConfigError(f"{out} holds checkpoints of a `{was}` run, which `{key['command']}` would take for "
                          "its own: use a new train.run_name")
    if (saved.get("key_version", 1) < 2 and isinstance(saved.get("data.video"), dict)
            and isinstance(key.get("data.video"), dict) and "size" in key["data.video"]):
        # an older record's size is the config's as given (224 by default), never the frames':
        # both commands decode at the model's size (`model_io`), and the model is compared on
        # its own. Compared, `data.video.size=64` on a run that trained at its model's 32 was
        # refused as other frames (224 -> 64)
        saved["data.video"] = {**saved["data.video"], "size": key["data.video"]["size"]}
    # steps_per_epoch is no setting: it moves with the manifest's training rows
    name = {"steps_per_epoch": "steps per epoch (training rows of data.manifest / global batch)"}
    moved = _moved(saved, key)
    skip = {"data.manifest_files", "model.pretrained_file", "key_version", *moved}
    changed = [f"{name.get(k, k)}: {saved[k]!r} -> {v!r}" for k, v in key.items()
               if k in saved and k not in skip and (_as_built(saved[k]) != _as_built(v) if k == "model" else saved[k] != v)]
    # the same path, other files: the manifest written again (`clipray data prepare --out` it)
    # since the checkpoints, which a resume went on training on without a word
    if (saved.get("data.manifest") == key.get("data.manifest") and "data.manifest_files" in saved
            and key.get("data.manifest_files") is not None and saved["data.manifest_files"] != key["data.manifest_files"]):
        changed.append(f"data.manifest: {key['data.manifest']} holds other files than the checkpoints' "
                       "(written again since)")
    if moved and not changed:
        for what, was, now in moved.values():
            print(f"[driver] {what}: the run's {was} is now {now} (the same files): resuming", flush=True)
        put_text(f"{out}/{RESUME_KEY}", json.dumps(key, indent=1))
        return
    if changed:
        raise ConfigError(f"{out} holds checkpoints of a run with other settings ({'; '.join(changed)}); "
                          "resuming would mix the two: use a new train.run_name, or the run's settings")


def read_json(uri: str, keys: dict[str, type] | None = None, unreadable: Exception | None = None) -> dict | None:
    """The JSON object at `uri` (None when there is none); `keys`, with their types, it must
    hold. One that is no such object (cut by a write that stopped midway, edited by hand)
    raises `unreadable`, or is None without it."""
    fs, path = fsspec_path(uri)
    if not fs.exists(path):
        return None
    try:
        got = json.loads(fs.cat_file(path))  # cat() would glob a "[2]" in it
    except ValueError:  # (UnicodeDecodeError too)
        got = None
    if not isinstance(got, dict) or any(not isinstance(got.get(k), t) for k, t in (keys or {}).items()):
        if unreadable is None:
            return None
        raise unreadable
    return got


def finished_run(tag: str, out: str, name: str, what: str, done: Callable[[dict], bool],
                 summary: Callable[[dict], str], unreadable: Exception | None = None) -> dict | None:
    """The result `<out>/<name>` of a run that has finished (`done(result)`), said with its
    `summary` as a re-run of the run's command answers, before Ray starts; None for a run to go
    on with. (`clipray edit` and `clipray train` alike.)"""
    result = read_json(f"{out}/{name}", unreadable=unreadable)
    if result is None or not done(result):
        return None
    print(f"[{tag}] {out} has finished {what}; its result:{summary(result)}", flush=True)
    return result


def trained(result: dict, cfg: Config, total: int, stop_epoch: int = 0) -> bool:
    """Whether result.json is of a run that trained all it was to (the loop's own end: every epoch,
    or the step budget's `total` steps; with `stop_epoch`, clip editing's round, that epoch).
    Re-run, such a run resumed its last checkpoint (43 s on the demo, Ray started, "resumed from
    step 2 (epoch 2)"), trained nothing and wrote its outputs and table again. One without the
    table's metrics (another version's) goes on as then."""
    from clipray.metrics import METRIC_KEYS

    # what the results table (`_table`) reads of result.json
    table = ("total_steps", "train_seconds", "seconds", "num_test_videos", "eval_split", *METRIC_KEYS)
    if not all(isinstance(result.get(k), (int, float, str)) for k in table) \
            or not isinstance(result["total_steps"], int):  # (a hand-edited one: resumed, not a TypeError)
        return False
    epoch = result.get("epoch")
    if stop_epoch:  # (a round's result.json is written last, after its export)
        return isinstance(epoch, int) and epoch >= stop_epoch
    return result["total_steps"] >= total or (not cfg.train.max_steps and isinstance(epoch, int)
                                              and epoch >= cfg.train.epochs)


def check_latest_checkpoint(out: str, needs: Sequence[str]) -> None:
    """The checkpoint a resume starts from (Ray Train's record names the latest) holds each of
    `needs` (DeepSpeed's folder, the loop's state): one deleted or copied in part failed every
    worker in DeepSpeed's bare `assert len(self.ckpt_list) > 0`, naming no file. (A record that
    cannot be read is Ray Train's to refuse, said by `_run`.)"""
    fs, root = fsspec_path(out)
    try:
        name = json.loads(fs.cat_file(f"{root}/{RAY_CHECKPOINT_RECORD}"))["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    gone = [n for n in needs if not fs.exists(f"{root}/{name}/{n}") or
            (fs.isdir(f"{root}/{name}/{n}") and not fs.ls(f"{root}/{name}/{n}"))]
    if gone:
        raise ConfigError(f"{out}/{name}, the checkpoint this run resumes from, lacks {' and '.join(gone)} (deleted, "
                          "or copied in part): copy the run folder again, or give a new train.run_name to start over")


# {path: (its signature, its listing)}: the listing a check in this process last found with
# those files (changed_manifests)
_confirmed: dict[str, tuple[list, list]] = {}


def changed_manifests(watched: dict[str, list]) -> list[str]:
    """The manifests of `watched` ({path: its manifest_signature when the run began}) whose files
    are other now: written again at their path (`clipray data prepare --out` them), or removed.

    Signing a manifest reads both ends of every file: for a streamed manifest in object storage,
    hundreds of shards, at every checkpoint, while the other workers wait. A manifest listed as
    it was when this process last found its files unchanged (the same names, sizes and times)
    is not read again. Object stores keep whole seconds: a listing is trusted only once its
    newest file is 2 s old, so that a write of the same sizes within that second is read."""
    changed = []
    for path, files in watched.items():
        try:
            listed = manifest_listing(path)
            if _confirmed.get(path) == (files, listed):
                continue
            now = manifest_signature(path)
        except (ManifestError, FileNotFoundError):  # gone, or being written (its .partial shards)
            now = None
        except OSError:
            # the store not answering, or a file of it that cannot be read now (a permission
            # taken away): not known to have changed. Taken for changed, it was said as the
            # manifest written again, with the advice to start over under a new run name
            continue
        if now != files:
            changed.append(path)
        elif all(t is not None and t < time.time_ns() - 2 * 10**9 for _, _, t in listed):
            _confirmed[path] = (files, listed)
    return changed


def manifest_changed(paths: list[str]) -> ConfigError:
    """The error of a run whose manifest was written again while it read it: Ray Data reads
    the files listed when the run began, each epoch again, so its later epochs trained on new
    files beside old ones without a word, or failed on a removed shard's FileNotFoundError."""
    return ConfigError(f"{', '.join(paths)}: the manifest changed while this run read it (its files are not "
                       "those the run began with: written again, e.g. by `clipray data prepare --out`, or "
                       "removed); its epochs would mix the old rows and the new: train on the manifest once "
                       "written, under a new train.run_name")


def check_steps(cfg: Config, n_train: int | None, what: str = "training rows") -> tuple[int, int]:
    """Steps per epoch (0 for a streamed run, which counts no rows) and in all, refusing a run that
    trains nothing: too few rows for one step, or fewer steps than one optimiser step takes; or
    one that names rows it would not train on."""
    if cfg.data.split != "train":  # training read the train rows all the same, without a word
        raise ConfigError(f"data.split={cfg.data.split}: training reads the manifest's train rows (data.split "
                          "picks the rows of a bare clip_dataset stream); evaluation reads data.eval_split")
    per_step = cfg.data.batch_size * cfg.train.num_workers
    steps_per_epoch = 0 if n_train is None else n_train // per_step
    if n_train is not None and steps_per_epoch < 1:
        raise ConfigError(f"{n_train} {what} cannot fill one step of {per_step} clips "
                          f"(data.batch_size x train.num_workers)")
    total = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    if total < cfg.train.grad_accum:
        # DeepSpeed steps the optimiser once per train.grad_accum batches: the run would train
        # nothing and export its initial weights as finished
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} is more than the run's {total} steps (batches), "
                          "so no optimiser step would be taken: lower train.grad_accum, or train for more steps")
    return steps_per_epoch, total


def check_stream_rows(cfg: Config) -> None:
    """Refuse a streamed manifest whose shards cannot give every worker a batch, from their
    footers' row counts (every split; no row is read). Shards without rows are dealt to the
    workers like the others, and a worker dealt only such shards ends every pass at once, as
    one dealt none; rows fewer than one step (data.batch_size x train.num_workers) leave some
    worker short of a batch in every pass. Either way the run failed only after Ray Train had
    started, with "a whole pass over the shards gave no batch"."""
    from clipray.manifest import shard_rows

    manifest, workers = cfg.data.manifest, cfg.train.num_workers
    counts = shard_rows(manifest)
    per_step = cfg.data.batch_size * workers
    if sum(counts) < per_step:
        raise ConfigError(f"data.shard_stream: the {sum(counts)} rows of {manifest} (every split, as its shards' "
                          f"footers count them) cannot fill one step of {per_step} clips (data.batch_size x "
                          "train.num_workers)")
    full = sum(n > 0 for n in counts)
    if full < workers:
        raise ConfigError(f"data.shard_stream: {manifest} has {len(counts)} shard file(s), {len(counts) - full} of them "
                          f"without rows: {full} with rows, fewer than train.num_workers={workers}, and each worker "
                          "streams shards of its own: write the manifest in more shards, or use fewer workers")


def read_eval_split(manifest: str, split: str) -> tuple[int, str | None]:
    """The evaluation split's rows, and a note for a split of fewer than 10 clips (video_id,
    start, end; a NaN time is the whole file, as evaluation keys them) or None, from one read
    of the split: ranked among n clips every caption finds its own within the top n, so
    text-to-video R@K for K >= n is 100 whatever the model (one clip: R@1 100), which the metrics
    table printed without a word. Video-to-text is not bounded so: a clip ranks its best caption
    among all other clips' captions, which can be more than n (MSVD's ~40 per clip)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from clipray.manifest import SCHEMA, manifest_files, nan_as_null

    fs, files = manifest_files(manifest)
    with reading(manifest):
        t = pads.dataset(files, filesystem=fs, schema=SCHEMA).to_table(
            columns=["video_id", "start", "end"], filter=pads.field("split") == split)
    # + 0.0 makes a -0.0 0.0: one clip as evaluation keys them (Python's 0.0 == -0.0), two as Arrow groups
    t = pa.table({"video_id": t["video_id"], **{k: pc.add(nan_as_null(t[k]), 0.0) for k in ("start", "end")}})
    n = t.group_by(["video_id", "start", "end"]).aggregate([]).num_rows
    if not 0 < n < 10:
        return t.num_rows, None
    ks = [k for k in (1, 5, 10) if k >= n]
    return t.num_rows, (
        f"[driver] note: the {split!r} split of {manifest} has {n} clip{'s' * (n > 1)}: every caption finds "
        f"its own among them within the top {n}, so t2v R@{'/'.join(map(str, ks))} "
        f"{'is' if len(ks) == 1 else 'are'} 100 whatever the model")


def count_rows(manifest: str, split: str) -> int:
    import pyarrow.dataset as pads

    from clipray.manifest import SCHEMA, manifest_files

    fs, files = manifest_files(manifest)
    with reading(manifest):
        return pads.dataset(files, filesystem=fs, schema=SCHEMA).count_rows(filter=pads.field("split") == split)


def checked_count(manifest: str, split: str) -> int:
    """The rows of `split`, every row of the manifest checked on the way as `clipray data check`
    checks it, a bad one named by its file and row. Counted unchecked, training read rows no one
    had validated: a null caption trained as the text 'None', a start of -5 s was decoded, a
    split ' train' left its row out without a word. 90 ms for 180k rows (11 ms counted unchecked)."""
    from clipray.manifest import checked_batches

    return sum(batch.num_rows for batch in checked_batches(manifest, split))


def _data_config():
    import ray.train

    class EvalSplit(ray.train.DataConfig):
        """Training shards stay equal (workers step in lock-step); the test stream is split
        unequally, because equal shards would silently drop test clips from the metrics."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k != "test"}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if "test" in datasets:
                test = datasets["test"]
                test.set_name("test")
                for i, split in enumerate(test.streaming_split(world_size, equal=False)):
                    out[i]["test"] = split
            return out

        @staticmethod
        def default_ingest_options():
            """Ray Train's own (DataConfig.default_ingest_options) but for exclude_resources,
            which Ray 2.60 deprecates (label_selector replaces it) and which it passed on always,
            zero: every run's console had Ray's RayDeprecationWarning `ExecutionOptions.exclude_resources`
            from its dataset manager."""
            from ray.data import DataContext, ExecutionOptions

            options = DataContext.get_current().execution_options
            return ExecutionOptions(resource_limits=options.resource_limits, preserve_order=options.preserve_order,
                                    verbose_progress=options.verbose_progress,
                                    label_selector=options.label_selector)

    return EvalSplit()


def run(cfg: Config, quiet_ray: bool = False, stop_epoch: int = 0, table: bool = True,
        command: str = "clipray train") -> dict[str, Any]:
    """Train, evaluate and export; returns the final metrics (also in result.json). `command`
    names the command whose run this is, recorded with its checkpoints (`resume_key`).

    `stop_epoch` > 0 ends this call after that epoch (evaluated and exported as a last one);
    calling again with the same run name continues from there, on whatever data the new call
    names, with the learning-rate schedule still spanning `train.epochs`: clip editing trains
    its rounds this way."""
    with contextlib.ExitStack() as held:  # the run folder's lock, once it is made
        return _run(cfg, quiet_ray, stop_epoch, table, held, command)


def _run(cfg: Config, quiet_ray: bool, stop_epoch: int, table: bool, held: contextlib.ExitStack,
         command: str = "clipray train") -> dict[str, Any]:
    if not cfg.data.manifest:
        raise ConfigError("data.manifest is empty: give a manifest (e.g. data.manifest=PATH)")
    if cfg.train.checkpoint_every_steps and not cfg.train.max_steps:
        # else ignored without a word: a run by epochs checkpoints (and evaluates) at each epoch's end
        raise ConfigError(f"train.checkpoint_every_steps={cfg.train.checkpoint_every_steps} applies to a step "
                          "budget (train.max_steps), and train.max_steps is 0: a run by epochs checkpoints at "
                          "the end of each epoch; unset it, or give train.max_steps")
    out = run_dir(cfg)
    if cfg.data.shard_stream:
        # workers stream their own shards; counting 136M rows up front is not worth a pass
        if cfg.train.max_steps < 1:
            raise ConfigError("data.shard_stream trains by a step budget: set train.max_steps")
        if not cfg.data.eval_manifest:
            # else every evaluation filters the whole streamed manifest for its test split, and a
            # manifest without one fails only after the first checkpoint_every_steps steps
            raise ConfigError("data.shard_stream evaluates on data.eval_manifest, which is empty: give a "
                              f"manifest with a {cfg.data.eval_split!r} split (the streamed manifest is never "
                              "read whole)")
        from clipray.manifest import manifest_files

        shards = len(manifest_files(cfg.data.manifest)[1])
        if shards < cfg.train.num_workers:
            # a worker dealt no shard ends every pass at once (train.shards)
            raise ConfigError(f"data.shard_stream: {cfg.data.manifest} has {shards} shard file(s), fewer than "
                              f"train.num_workers={cfg.train.num_workers}, and each worker streams shards of its "
                              "own: write the manifest in more shards, or use fewer workers")
        n_train = None
    else:
        check_unique_ids(cfg.data.manifest)  # (first: a folder of two manifests, said as such)
        n_train = checked_count(cfg.data.manifest, "train")
    steps_per_epoch, total = check_steps(cfg, n_train)
    eval_manifest, eval_split = cfg.data.eval_manifest or cfg.data.manifest, cfg.data.eval_split
    # (a streamed HowTo100M manifest is not counted; its evaluation set is data.eval_manifest)
    if cfg.data.eval_manifest:
        check_unique_ids(eval_manifest)
    note = None  # a few-clips note, said once Ray is up: a run refused before it says only why
    eval_rows = None
    if cfg.data.eval_manifest or not cfg.data.shard_stream:
        eval_rows, note = read_eval_split(eval_manifest, eval_split)
        if eval_rows < 1:
            raise ConfigError(f"{eval_manifest} has no {eval_split!r} rows to evaluate on: give data.eval_manifest "
                              f"a manifest with a {eval_split} split, or set data.eval_split")
    # the manifest's files (names, sizes, footers) also identify it: a resume finds it moved, or
    # written again at its path. Reading both ends of each also finds a shard that is no Parquet
    # file, which a streamed run (never read whole) met only in a worker, in a traceback.
    files = manifest_signature(cfg.data.manifest, parquet=True)
    if cfg.data.shard_stream:
        check_stream_rows(cfg)
    # loads open_clip's model configs (~4 s): after the manifest checks, before the run folder
    # is made (a wrong model.* key leaves none behind)
    fitted = model_io(cfg)
    check_negatives(fitted)
    make_run_dir(out)
    held.enter_context(run_folder_lock(out))
    # the files the run reads, checked again at every checkpoint (changed_manifests)
    watched = {cfg.data.manifest: files}
    if eval_manifest != cfg.data.manifest:  # (read once: a streamed manifest has hundreds of shards)
        watched[eval_manifest] = manifest_signature(eval_manifest)
    # the resume key is the config as given, but for the frames' size as training decodes them,
    # the model's (data.video.size is set from the model whatever the config says: the config's
    # 224 recorded, a run that trained at 32 was refused a resume with data.video.size=64)
    keyed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, video=fitted.data.video))
    with storage_access(cfg, out):
        check_resume(out, resume_key(keyed, steps_per_epoch, stop_epoch, files, command))
        if checkpointed(out):
            from clipray.pipeline import collect_skips

            def summary(r: dict) -> str:
                if table:
                    return _table(r, out, collect_skips(out))
                return f" {r['eval_split']} t2v R@1 {r['t2v_r1']:.1f}, read from result.json" if stop_epoch else ""

            # a clip-editing round's call too: one stopped after its training (copying the new
            # teacher) started Ray Train again to resume at its last epoch and train nothing
            done = finished_run("driver", out, "result.json", f"epoch {stop_epoch}" if stop_epoch else "training",
                                lambda r: trained(r, cfg, total, stop_epoch), summary)
            if done is not None:
                return done
    cfg = fitted
    # imported after the checks above, so a wrong path or key fails in a second, not after
    # Ray Train and the pipeline load (~5 s)
    import ray.train
    from ray.train.torch import TorchTrainer

    from clipray.pipeline import caption_tokenizer, clip_dataset, collect_skips
    from clipray.runtime import check_fits, init_ray, quiet_data_progress
    from train.evaluate import first_rows
    from train.loop import STATE, TAG, train_loop

    check_latest_checkpoint(out, (TAG, STATE))
    init_ray(cfg.ray, quiet=quiet_ray)
    if note:
        print(note, flush=True)
    # the workers and one decode pool run at once (in shard_stream mode, one pool per worker)
    pools = cfg.train.num_workers if cfg.data.shard_stream else 1
    asks = {"train.num_workers x train.cpus_per_worker": cfg.train.num_workers * cfg.train.cpus_per_worker,
            "data.decode_actors x data.decode_cpus" + (" x train.num_workers" if pools > 1 else ""):
                pools * cfg.data.decode_actors * cfg.data.decode_cpus}
    if (cfg.data.shard_stream or cfg.train.max_steps) and cfg.data.decode_pool == "actors":
        # a worker evaluates mid-shard (or, by a step budget, mid-pass): its decode actors,
        # paused, keep their CPUs while the evaluation's pool starts, which would otherwise
        # wait for CPUs forever
        asks["data.decode_actors x data.decode_cpus (evaluation)"] = cfg.data.decode_actors * cfg.data.decode_cpus
    check_fits(asks)
    if cfg.train.use_gpu:  # one GPU per worker
        check_fits({"train.num_workers (train.use_gpu=true)": cfg.train.num_workers}, "GPU",
                   advice="set train.use_gpu=false, or submit the job to a GPU cluster")
    quiet_data_progress()
    eval_data = dataclasses.replace(cfg.data, manifest=eval_manifest)
    tokenize = caption_tokenizer(cfg.data.tokenizer, cfg.data.max_words)
    datasets = {"test": clip_dataset(eval_data, out, split=eval_split,
                                     rows=first_rows(eval_manifest, eval_split, tokenize), count=eval_rows)}
    if not cfg.data.shard_stream:
        datasets["train"] = clip_dataset(cfg.data, out, split="train", shuffle=cfg.data.shuffle_rows,
                                         count=n_train)
    print(f"[driver] run {out}: {n_train if n_train is not None else 'streamed'} training clips, "
          f"{total} steps, {cfg.train.num_workers} workers, ZeRO-{cfg.train.zero_stage}", flush=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "steps_per_epoch": steps_per_epoch, "run_dir": out,
                           "stop_epoch": stop_epoch, "manifests": watched, "train_rows": n_train},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        datasets=datasets,
        dataset_config=_data_config(),
        run_config=ray.train.RunConfig(
            # Ray's run folder is storage_path/name: the storage root, not the run folder's
            # parent, which differs when the name has a "/" in it
            name=cfg.train.run_name, **ray_storage_args(ray_storage(cfg, out)),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # the controller's INFO lines (resources requested, worker group started) off the
            # console; the workers quiet their own (train.loop.quiet_worker_logs)
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    t0 = time.perf_counter()
    try:
        with ray_sigint():
            result = trainer.fit()
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C: Ray Train aborts the run and its ray.get ends in a bare SystemExit(1), which
        # went past the CLI's Ctrl-C line and exit status 130 (as a process killed by SIGINT).
        # Disconnected first: Ray forwarded the stopping workers' lines after this one and the
        # CLI's, so the console did not end with what to do
        with contextlib.suppress(Exception, KeyboardInterrupt):
            ray.shutdown()
        print(interrupted_line(out), file=sys.stderr, flush=True)
        raise KeyboardInterrupt from None
    except ray.train.TrainingFailedError as e:
        # a shard of the manifest deleted under the run (written again) is a FileNotFoundError
        # of a Ray Data read task; the workers' own check is a ConfigError in their traceback
        changed = changed_manifests(watched)
        if changed:
            raise manifest_changed(changed) from None
        # often every clip was skipped (wrong video root, unreadable files): say so beside the error
        skips = collect_skips(out)
        if skips["skipped"]:
            print(f"[driver] training failed with {skips['skipped']} clips skipped so far "
                  f"{skips['by_reason']}; report: {skips['report']}", file=sys.stderr, flush=True)
        # (a run that failed before its first checkpoint has none to keep)
        kept = f"; its checkpoints stay in {out}" if _checkpointed_now(out) else ""
        raise RunFailed(f"training failed {failure_cause(e)}{kept}") from e
    except Exception as e:
        # Ray Train's record of the run's checkpoints (checkpoint_manager_snapshot.json) is cut
        # (a kill while Ray rewrote it), another Ray version's, or names a deleted checkpoint:
        # its controller dies as it starts (an ActorDiedError holding Ray's own, private, error)
        why = re.search(r"CheckpointManagerInitializationError: (.+)", str(e))
        if why is None:
            raise
        raise ConfigError(f"{out}: Ray Train cannot resume this run from its record of the checkpoints "
                          f"({why.group(1)[:300]}); give a new train.run_name to start over") from None
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint; see the logs under {out}")
    if "://" in out:  # the whole checkpoint (optimiser state too) comes down: minutes for a big model
        print(f"[driver] training done; fetching its last checkpoint from {out} for the export and metrics",
              flush=True)
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE).read_text())
        export_src = Path(d) / "export"
        # seconds: this call's (a resumed run's later part); train_seconds: every epoch of the run,
        # from the history its checkpoints carry, so that it goes with total_steps
        final = dict(state["history"][-1], total_steps=state["step"], seconds=time.perf_counter() - t0,
                     train_seconds=train_seconds(state["history"], cfg.data.batch_size * cfg.train.num_workers))
        if not cfg.train.max_steps and final["epoch"] == cfg.train.epochs:
            # the schedule's length, from the manifest's rows: clips skipped at decode end each
            # epoch early, and the learning rate stops short of its schedule's end, without a word
            final["planned_steps"] = total
        _write_outputs(out, cfg, state["history"], export_src)
    skips = collect_skips(out)
    final.update(skipped_clips=skips["skipped"], cut_clips=skips["cut"], eval_split=eval_split)
    put_text(f"{out}/result.json", json.dumps(final, indent=1))
    if table:
        print(_table(final, out, skips))
    return final


def _eval_loop(config: dict[str, Any]) -> None:
    """Worker function of `evaluate_export`: load the export, evaluate this worker's share."""
    import tempfile

    import ray.train
    import ray.train.torch

    from clipray.export import fetch_export, load_export
    from clipray.pipeline import caption_tokenizer
    from train.evaluate import evaluate
    from train.loop import quiet_worker_logs

    quiet_worker_logs()
    with tempfile.TemporaryDirectory() as d:
        model = load_export(fetch_export(config["export"], d), ray.train.torch.get_device())
    metrics = evaluate(model, ray.train.get_dataset_shard("test"), config["manifest"], config["split"],
                       config["batch_size"], caption_tokenizer(config["tokenizer"], config["max_words"]),
                       config["dsl"])
    with tempfile.TemporaryDirectory() as d:  # Result.metrics holds only what came with a checkpoint
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


@contextlib.contextmanager
def ray_sigint() -> Iterator[None]:
    """Around trainer.fit(): Ray Train installs its own Ctrl-C handler and leaves it. After fit
    returned, the driver's last minutes (the checkpoint fetched from object storage, the export,
    the report) ran under it: two Ctrl-C's aborted a run already done, and the third exited 0
    having written no result, export or metrics."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, handler)


def failure_cause(e: Exception) -> str:
    """Where and why a Ray Train run failed, from the first failed worker's error (or the
    controller's): its last line, e.g. 'on worker 0: RuntimeError: epoch 3 got no training batch'."""
    failures = getattr(e, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        where, cause = f"on worker {rank}", failures[rank]
    else:
        where, cause = "in its controller", getattr(e, "controller_failure", e)
    # the error itself (one line: its type is added), or a traceback's text (its last line has it)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    said = f"{type(cause).__name__}: {lines[0]}" if len(lines) == 1 else lines[-1] if lines else type(cause).__name__
    return f"{where}: {said[:500]}"


def evaluate_export(cfg: Config, export: str, split: str, name: str) -> dict[str, Any]:
    """Evaluate an exported model on `split` of `data.eval_manifest` (else `data.manifest`), with
    the run's workers, decode pool and batch size; a Ray Train run named `name` beside the
    training run. Returns the metrics, also written to `<run>/<name>.json`, with the run's
    skipped and cut clips (this evaluation's too) counted and merged into its reports."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from clipray.pipeline import caption_tokenizer, clip_dataset, collect_skips
    from clipray.runtime import init_ray
    from train.evaluate import first_rows

    cfg = model_io(cfg)
    manifest, out = cfg.data.eval_manifest or cfg.data.manifest, run_dir(cfg)
    rows, note = read_eval_split(manifest, split)
    if rows < 1:
        raise ConfigError(f"{manifest} has no {split!r} rows to evaluate on")
    init_ray(cfg.ray, quiet=True)
    if note:
        print(note, flush=True)
    data = dataclasses.replace(cfg.data, manifest=manifest)
    trainer = TorchTrainer(
        _eval_loop,
        train_loop_config={"export": export, "manifest": manifest, "split": split, "batch_size": cfg.data.batch_size,
                           "tokenizer": cfg.data.tokenizer, "max_words": cfg.data.max_words,
                           "dsl": cfg.train.eval_dsl},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        datasets={"test": clip_dataset(data, out, split=split, rows=first_rows(
            manifest, split, caption_tokenizer(cfg.data.tokenizer, cfg.data.max_words)), count=rows)},
        dataset_config=_data_config(),
        run_config=ray.train.RunConfig(name=name, **ray_storage_args(f"{out}/evaluations"),
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    try:
        with ray_sigint():
            metrics = dict(trainer.fit().metrics, eval_split=split, export=export)
    except ray.train.TrainingFailedError as e:
        raise RunFailed(f"evaluating {export} failed {failure_cause(e)}") from e
    # its decoders' skip files went beside the training run's, merged before it began
    skips = collect_skips(out)
    metrics.update(skipped_clips=skips["skipped"], cut_clips=skips["cut"])
    put_text(f"{out}/{name}.json", json.dumps(metrics, indent=1))
    return metrics


@contextlib.contextmanager
def stored(uri: str) -> Iterator[None]:
    """Around a write of the run folder's file `uri` in object storage: the store failing (its
    connection dropped, throttled past the retries, a permission taken away) is a line naming the
    file, not a botocore or gcsfs traceback after every epoch had trained; a re-run of the
    command writes it again from the run's last checkpoint."""
    try:
        yield
    except Exception as e:
        if "://" not in uri or isinstance(e, (ConfigError, ManifestError)) or (isinstance(e, OSError) and e.filename):
            raise
        raise ConfigError(f"{uri}: cannot write it ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                          "run the same command again to write the run's outputs") from e


def put_text(uri: str, text: str | bytes) -> None:
    """Write a file of the run folder (text, or bytes) whole or not at all. A local one is
    written under a `.partial` name and moved over the old one when complete (an object store's
    PUT is whole already): written in place, a write that failed midway (a full disk) left
    resume_key.json cut, the record a resume is checked against, and every later run with a
    checkpoint failed on its JSONDecodeError traceback. A failed write is one line naming the
    file."""
    fs, path = fsspec_path(uri)

    def write(tmp: str) -> None:
        with fs.open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)

    with stored(uri), naming(uri):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # as fsspec.open does for a write
        replace_whole(fs, path, "://" not in uri, write)


def train_seconds(history: list[dict], clips_per_step: int) -> float:
    """The seconds of every epoch in a run's history. An epoch recorded before 9c803a8 (a run
    stopped then and resumed now) has no epoch_s: its clips_per_s was its steps' clips over its
    seconds, which give them back."""
    total, step = 0.0, 0
    for h in history:
        if "epoch_s" in h:
            total += h["epoch_s"]
        elif h.get("clips_per_s"):
            total += (h["step"] - step) * clips_per_step / h["clips_per_s"]
        step = h["step"]
    return total


def _write_outputs(out: str, cfg: Config, history: list[dict], export_src: Path) -> None:
    put_text(f"{out}/config.yaml", to_yaml(cfg))
    keys = sorted({k for h in history for k in h}, key=lambda k: (k not in ("epoch", "step"), k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    put_text(f"{out}/metrics.csv", buf.getvalue())
    # whole or not at all: opened in place (before the plot was drawn), a full disk midway or a
    # failed plot left the last call's curves cut or empty
    put_text(f"{out}/curves.png", _plot(history, cfg.data.eval_split))
    fs, root = fsspec_path(out)  # (a folder put_text made)
    root = f"{root}/export"
    with stored(f"{out}/export"):
        fs.makedirs(root, exist_ok=True)
    for p in export_src.iterdir():
        copy_whole(f"{out}/export/{p.name}", lambda tmp: fs.put_file(str(p), tmp))


def copy_whole(uri: str, copy: Callable[[str], Any]) -> None:
    """`copy(path)` writes the run folder's file `uri` at the path given, whole or not at all, as
    `put_text`: an export copied over the last one (a run continued, clip editing's teacher) was
    copied in place, and a full disk midway (or a kill) left its weights cut beside the old
    config.json, an export that no longer loaded, the old one gone. A failed copy's error names
    `uri` (shutil's names the file copied from)."""
    fs, path = fsspec_path(uri)
    try:
        with stored(uri):
            replace_whole(fs, path, "://" not in uri, copy)
    except OSError as e:
        if e.errno:
            raise OSError(e.errno, os.strerror(e.errno), uri) from e
        raise


def _plot(history: list[dict], split: str = "test") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o")
    ax[0].set(title="training loss", xlabel="epoch")
    ev = [h for h in history if "t2v_r1" in h]
    ax[1].plot([h["epoch"] for h in ev], [h["t2v_r1"] for h in ev], marker="o", label="text->video")
    ax[1].plot([h["epoch"] for h in ev], [h["v2t_r1"] for h in ev], marker="s", label="video->text")
    ax[1].set(title=f"{split} R@1 (%)", xlabel="epoch")
    ax[1].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _table(m: dict, out: str, skips: dict) -> str:
    from clipray.pipeline import cut_line

    rows = [f"{'':12}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'MdR':>7}{'MnR':>8}"]
    for d, name in (("t2v", "text->video"), ("v2t", "video->text")):
        rows.append(f"{name:12}{m[f'{d}_r1']:7.1f}{m[f'{d}_r5']:7.1f}{m[f'{d}_r10']:7.1f}"
                    f"{m[f'{d}_mdr']:7.1f}{m[f'{d}_mnr']:8.1f}")
    extra = f"; event-order accuracy {m['order_acc']:.1f}% over {m['order_pairs']} twin captions" \
        if "order_acc" in m else ""
    short = [f"note: the epochs gave {m['total_steps']} of the {m['planned_steps']} steps planned from the manifest's "
             f"training rows (skipped clips), so the learning rate stopped at {m['lr']:.3g}, short of its "
             "schedule's end"] if m.get("planned_steps", 0) > m["total_steps"] else []
    cut = [cut_line(skips["cut"], skips["cut_report"])] if skips.get("cut") else []
    return "\n".join([
        f"\nfinished: {m['total_steps']} steps, {m['train_seconds']:.0f}s of training epochs "
        f"({m['seconds']:.0f}s in this call), {m['num_test_videos']} {m['eval_split']} clips "
        f"(chance R@1 {100 / m['num_test_videos']:.1f}%){extra}", *rows,
        f"skipped clips: {skips['skipped']}" + (f" {skips['by_reason']}" if skips["by_reason"] else ""),
        *cut, *short,
        f"run directory: {out}  (result.json, metrics.csv, curves.png, export/, skip_report.jsonl)"])
