"""Training on a real local Ray with real DeepSpeed (gloo on CPU): outputs, ZeRO stages, bad
videos, resume after a stop, recovery from a killed worker, and UniPT under ZeRO-3.

The run's own evaluation is checked against a brute-force one: the exported model re-embeds
the test clips decoded directly (no Ray) and the metrics must match result.json.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bad_videos import plant
from runs import registered_state
from clipray.config import load_config
from clipray.manifest import read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "train" / "configs" / "demo.yaml"


def overrides(manifest, storage, name, **extra):
    # only the last epoch is evaluated: each evaluation starts a decode pool (~20 s on 2 cores)
    # and these tests check the final metrics; the edit and job-submit tests evaluate every epoch
    base = {"data.manifest": manifest, "train.storage_path": storage, "train.run_name": name,
            "train.epochs": 2, "data.batch_size": 4, "data.decode_cpus": 0.25,
            "train.cpus_per_worker": 1.0, "data.video.max_frames": 4, "train.eval_every_epochs": 100}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train_worker_pids() -> list[int]:
    """Ray titles each actor's process `ray::<Class>...`: find the training workers by it,
    among the descendants of this process (whose Ray started them), never anyone else's."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)
            if " ".join(p.cmdline() or []).startswith("ray::RayTrainWorker")]


def brute_force_metrics(export_dir: Path, manifest: str, keep: int | None = None) -> dict:
    """Re-evaluate the exported model on the test split without Ray: decode each clip, embed,
    score every text against every video and rank by hand. `keep`: the manifest repeats blocks
    of `keep` clips and one more (a corrupt video's, left out) under other captions: row i's
    clip is row i % (keep + 1)'s; v2t ranks a clip's best caption among other clips' captions."""
    import open_clip

    from clipray.config import VideoConfig
    from clipray.export import load_export
    from clipray.video import decode_clip

    model = load_export(export_dir).eval()
    cfg = json.loads((export_dir / "config.json").read_text())
    size = model.image_size
    rows = read_manifest(manifest, split="test").to_pylist()
    n = keep or len(rows)
    stride = n + 1 if keep else n  # keep: each wording block holds the kept clips and one bad
    texts = [r for i, r in enumerate(rows) if i % stride < n]
    clip_of = [i % stride for i, r in enumerate(rows) if i % stride < n]
    root = manifest.rsplit("/", 1)[0]
    vcfg = VideoConfig(fps=2.0, max_frames=4, size=size)
    clips = [decode_clip(r["path"] if r["path"].startswith("/") else f"{root}/{r['path']}", r["start"], r["end"], vcfg)
             for r in rows[:n]]
    tok = open_clip.get_tokenizer(cfg.get("tokenizer_name", "ViT-B-32"), context_length=32)
    with torch.no_grad():
        frames = torch.from_numpy(np.stack([c.frames for c in clips]))
        mask = torch.from_numpy(np.stack([c.mask for c in clips])).bool()
        v = model.encode_video(model.normalize(frames), mask)
        t = model.encode_text(tok([r["caption"] for r in texts]))
    sim = (t @ v.T).numpy()
    t2v = [1 + int((np.delete(sim[i], c) >= sim[i, c]).sum()) for i, c in enumerate(clip_of)]
    own = np.array(clip_of)
    best = [sim[own == c, c].max() for c in range(n)]  # a clip's best caption, among other clips' ones
    v2t = [1 + int((sim[own != c, c] >= best[c]).sum()) for c in range(n)]
    return {"t2v_r1": 100.0 * np.mean([r == 1 for r in t2v]), "t2v_r5": 100.0 * np.mean([r <= 5 for r in t2v]),
            "t2v_mnr": float(np.mean(t2v)), "v2t_r1": 100.0 * np.mean([r == 1 for r in v2t]),
            "v2t_mnr": float(np.mean(v2t)), "sim": sim, "video_of_text": clip_of}


@pytest.fixture(scope="module")
def finished_run(ray_local, synth_small, tmp_path_factory) -> dict:
    """One finished run, shared: 3 epochs that lose a training worker (SIGKILL) after the first
    checkpoint, named group/one, its paths relative to where the command runs. The killed-worker
    test checks what it wrote; the settings-check test re-runs it with other settings (it
    leaves the run as it found it)."""
    from train.driver import run

    storage = tmp_path_factory.mktemp("finished")
    # paths relative to where the command runs, as the demo configs give them (Ray Train's
    # workers run in another directory: they must get them absolute)
    here = Path(synth_small["manifest"]).parent.parent
    extra = {"train.epochs": 3, "train.max_failures": 1}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(here)
        args = overrides(Path(synth_small["manifest"]).relative_to(here), os.path.relpath(storage), "group/one",
                         **extra)
        cfg = load_config(DEMO, args)
        out = storage / "group" / "one"
        killed = {}

        def killer():
            deadline = time.time() + 300
            while time.time() < deadline and registered_state(str(out)) is None:
                time.sleep(0.3)
            workers = _train_worker_pids()
            if workers:
                killed["pid"] = workers[-1]
                os.kill(workers[-1], signal.SIGKILL)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        handler = signal.getsignal(signal.SIGINT)
        final = run(cfg, quiet_ray=True)
        t.join(timeout=5)
        handler_after = signal.getsignal(signal.SIGINT)
    return dict(storage=storage, here=here, extra=extra, args=args, cfg=cfg, out=out, killed=killed,
                handler=handler, handler_after=handler_after, final=final)


def test_train_outputs_match_brute_force_eval_with_a_killed_worker_replaced(finished_run, synth_small):
    """A 3-epoch run loses a training worker (SIGKILL) after its first checkpoint: Ray Train
    replaces it and goes on from that checkpoint (train.max_failures=1). The run still ends
    with every epoch's steps, and what it writes (result.json, metrics.csv, curves.png, the
    export) holds what a brute-force evaluation of the export finds."""
    cfg, out, final = finished_run["cfg"], finished_run["out"], finished_run["final"]
    assert cfg.data.manifest == synth_small["manifest"] and cfg.train.storage_path == str(finished_run["storage"])
    assert "pid" in finished_run["killed"], "no worker was killed"
    assert finished_run["handler_after"] is finished_run["handler"]  # not Ray Train's, which fit left behind
    result = json.loads((out / "result.json").read_text())
    assert result == pytest.approx(final)
    for key in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_mdr", "t2v_mnr", "v2t_r1", "v2t_r5", "v2t_r10",
                "v2t_mdr", "v2t_mnr", "num_test_videos"):
        assert key in result
    n_test = read_manifest(synth_small["manifest"], split="test").num_rows
    n_train = read_manifest(synth_small["manifest"], split="train").num_rows
    assert result["num_test_videos"] == n_test
    assert result["total_steps"] == 3 * (n_train // 8) and result["epoch"] == 3
    assert np.isfinite(result["loss"])
    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("epoch,step")
    with open(out / "metrics.csv") as f:  # train.eval_every_epochs=100: the last epoch alone
        rows = list(csv.DictReader(f))
    assert [bool(r["t2v_r1"]) for r in rows] == [False, False, True]
    clips = (n_train // 8) * 8  # per epoch: 2 workers x 4 clips per step
    for r in rows:  # where each epoch's time went (EpochClock): the waits are a part of it
        epoch_s, wait, first = float(r["epoch_s"]), float(r["data_wait_s"]), float(r["first_batch_s"])
        assert 0 < first <= wait < epoch_s
        assert float(r["clips_per_s"]) == pytest.approx(clips / epoch_s, rel=1e-6)
        assert float(r["step_clips_per_s"]) == pytest.approx(clips / (epoch_s - wait), rel=1e-6)
    # each epoch's peak memory (a CPU worker's peak resident set): a process holding torch,
    # open_clip and Ray holds hundreds of MB
    assert all(100 < float(r["peak_mem_mb"]) < 64 * 1024 for r in rows)
    assert result["peak_mem_mb"] == pytest.approx(float(rows[-1]["peak_mem_mb"]))
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bf = brute_force_metrics(out / "export", synth_small["manifest"])
    assert result["t2v_r1"] == pytest.approx(bf["t2v_r1"])
    assert result["t2v_mnr"] == pytest.approx(bf["t2v_mnr"], abs=1e-6)


def test_evaluation_decodes_each_clip_once_and_ranks_every_caption(ray_local, synth_small, real_video, tmp_path):
    """A clip with several captions (MSVD: ~40 per test video) was decoded and embedded once per
    caption row, all but the first thrown away. Evaluation now decodes each clip's first row
    only and queries with every caption. 2 workers over 3 captions per clip (one clip corrupt):
    the metrics are a brute force's over the good clips, and the corrupt clip is tried once."""
    from clipray.export import save_export
    from clipray.metrics import retrieval_metrics
    from clipray.models import create_model
    from train.driver import evaluate_export

    root = synth_small["manifest"].rsplit("/", 1)[0]
    test = read_manifest(synth_small["manifest"], split="test").to_pylist()
    corrupt = plant(real_video, tmp_path / "bad")["corrupt"]
    clips = [dict(video_id=r["video_id"], path=f"{root}/{r['path']}", start=r["start"], end=r["end"],
                  caption=r["caption"]) for r in test]
    clips.append(dict(video_id="bad", path=str(corrupt), start=None, end=None, caption="broken"))
    wording = ("{}", "here {}", "{} again")
    # a clip's captions are rows apart: its first row is in the first third
    rows = [dict(c, caption=w.format(c["caption"]), split="test") for w in wording for c in clips]
    write_manifest(rows, tmp_path / "m.parquet")
    torch.manual_seed(0)
    export = save_export(create_model("test_meanP"), tmp_path / "export")
    cfg = load_config(DEMO, overrides(str(tmp_path / "m.parquet"), tmp_path, "three"))
    got = evaluate_export(cfg, str(export), "test", "eval-test")

    skipped = [json.loads(x) for f in sorted((tmp_path / "three" / "skips").iterdir())
               for x in f.read_text().splitlines()]
    assert [r["row_id"] for r in skipped] == [len(clips) - 1]  # once, not once per caption
    # counted, and in the run's merged report (clipray edit's final test evaluation: neither)
    report = [json.loads(x) for x in (tmp_path / "three" / "skip_report.jsonl").read_text().splitlines()]
    assert got["skipped_clips"] == 1 and [r["row_id"] for r in report] == [len(clips) - 1]
    assert got["cut_clips"] == 0 and json.loads((tmp_path / "three" / "eval-test.json").read_text()) == got
    assert got["num_test_videos"] == len(test) and got["num_test_texts"] == 3 * len(test)
    # brute force, no Ray: each good clip decoded and embedded, every caption against every clip
    bf = brute_force_metrics(export, str(tmp_path / "m.parquet"), keep=len(test))
    for k in ("t2v_r1", "t2v_r5", "t2v_mnr", "v2t_r1", "v2t_mnr"):
        assert got[k] == pytest.approx(bf[k], abs=1e-6), k
    assert got["t2v_r1"] == pytest.approx(retrieval_metrics(bf["sim"], bf["video_of_text"])["t2v_r1"])


def test_the_reported_loss_is_the_global_batch_loss_not_rank_0s_share(ray_local, synth_small, tmp_path):
    """8 training rows, 2 workers x 4: one step whose global batch is the whole training split,
    in some order (the symmetric loss does not depend on it). The epoch's loss must be that
    batch's loss under the initial model, computed here in one process. It was rank 0's own:
    its 4 rows scored against the 8 clips, one share of the mean."""
    import open_clip

    from clipray.config import VideoConfig
    from clipray.models import build_model
    from clipray.task import RetrievalTask
    from clipray.video import decode_clip
    from train.driver import model_io, run

    root = synth_small["manifest"].rsplit("/", 1)[0]
    rows = read_manifest(synth_small["manifest"]).to_pylist()
    for r in rows:
        r["path"] = f"{root}/{r['path']}"
    train = [r for r in rows if r["split"] == "train"][:8]
    write_manifest(train + [r for r in rows if r["split"] == "test"], tmp_path / "m.parquet")
    cfg = load_config(DEMO, overrides(str(tmp_path / "m.parquet"), tmp_path, "loss", **{"train.epochs": 1}))
    final = run(cfg, quiet_ray=True, table=False)
    assert final["total_steps"] == 1

    cfg = model_io(cfg)
    torch.manual_seed(cfg.train.seed)  # the workers' initial model
    model = build_model(cfg.model)
    vcfg = VideoConfig(fps=2.0, max_frames=4, size=model.image_size)
    clips = [decode_clip(r["path"], r["start"], r["end"], vcfg) for r in train]
    tokens = open_clip.get_tokenizer(cfg.data.tokenizer, context_length=cfg.data.max_words)([r["caption"] for r in train])
    with torch.no_grad():
        loss = RetrievalTask(model)(torch.from_numpy(np.stack([c.frames for c in clips])),
                                    torch.from_numpy(np.stack([c.mask for c in clips])), tokens)["loss"]
    assert final["loss"] == pytest.approx(loss.item(), abs=1e-5)


def test_workers_and_decode_pool_too_big_for_the_local_ray_fail_before_training(ray_local, synth_small, tmp_path):
    from clipray.config import ConfigError
    from train.driver import run

    # 2 workers x 1 CPU + 2 actors x 0.75 + 1 for reads = 4.5 of the session's 4 CPUs
    cfg = load_config(DEMO, overrides(synth_small["manifest"], tmp_path, "too-big", **{"data.decode_cpus": 0.75}))
    with pytest.raises(ConfigError, match=r"train.num_workers x train.cpus_per_worker = 2; "
                                          r"data.decode_actors x data.decode_cpus = 1.5"):
        run(cfg, quiet_ray=True)
    assert not (tmp_path / "too-big" / "result.json").exists()
    # a step budget's pass goes on after each checkpoint's evaluation: its paused decode actors
    # keep their CPUs beside the evaluation's (1 worker + 1.5 + 1.5 + 1 for reads > 4)
    cfg = load_config(DEMO, overrides(synth_small["manifest"], tmp_path, "budget-actors", **{
        "data.decode_pool": "actors", "data.decode_cpus": 0.75, "train.num_workers": 1,
        "train.max_steps": 4, "train.checkpoint_every_steps": 2}))
    with pytest.raises(ConfigError, match=r"data.decode_actors x data.decode_cpus \(evaluation\) = 1.5"):
        run(cfg, quiet_ray=True)
    assert not (tmp_path / "budget-actors" / "result.json").exists()
    # GPU workers on a Ray without GPUs: Ray Train would wait for them forever
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    cfg = load_config(DEMO, overrides(synth_small["manifest"], tmp_path, "no-gpu",
                                      **{"train.use_gpu": "true", "train.num_workers": int(gpus) + 1}))
    with pytest.raises(ConfigError, match=rf"needs {int(gpus) + 1} GPUs at once \(train.num_workers "
                                          rf"\(train.use_gpu=true\) = {int(gpus) + 1}\), but the local Ray has {gpus:g}: "
                                          r"set train.use_gpu=false"):
        run(cfg, quiet_ray=True)


def test_an_eval_manifest_without_test_rows_fails_before_training(synth_small, tmp_path):
    from clipray.config import ConfigError
    from train.driver import run

    rows = [dict(r, split="train") for r in read_manifest(synth_small["manifest"]).to_pylist()]
    write_manifest(rows, tmp_path / "no_test.parquet")
    cfg = load_config(DEMO, overrides(synth_small["manifest"], tmp_path, "no-test",
                                      **{"data.eval_manifest": tmp_path / "no_test.parquet"}))
    with pytest.raises(ConfigError, match=r"no_test.parquet has no 'test' rows to evaluate on"):
        run(cfg, quiet_ray=True)
    assert not (tmp_path / "no-test").exists()


def test_a_grad_accum_longer_than_the_run_fails_before_training(synth_small, tmp_path):
    """DeepSpeed steps the optimiser once per train.grad_accum batches: 2 epochs of 2 steps
    (16 training rows at 2 workers x 4) with grad_accum=5 took no optimiser step, and the run
    exported its initial weights as a finished, trained model."""
    from clipray.config import ConfigError
    from train.driver import run

    n_train = read_manifest(synth_small["manifest"], split="train").num_rows
    total = 2 * (n_train // 8)
    for accum, key in ((total + 1, {}), (3, {"train.max_steps": 2})):
        cfg = load_config(DEMO, overrides(synth_small["manifest"], tmp_path, "accum",
                                          **{"train.grad_accum": accum, **key}))
        steps = key.get("train.max_steps", total)
        with pytest.raises(ConfigError, match=rf"train.grad_accum={accum} is more than the run's {steps} steps"):
            run(cfg, quiet_ray=True)
    # data.split names rows that training does not read: it trained on the train rows, silently
    with pytest.raises(ConfigError, match=r"^data.split=test: training reads the manifest's train rows"):
        run(load_config(DEMO, overrides(synth_small["manifest"], tmp_path, "accum", **{"data.split": "test"})),
            quiet_ray=True)
    assert not (tmp_path / "accum").exists()


def test_a_batch_of_one_clip_that_would_train_nothing_fails_before_training(synth_small, tmp_path):
    """Over one clip the contrastive loss (the global batch: data.batch_size x train.num_workers)
    and tightTransf's pair loss (each worker's batch) are a softmax over one logit: 0 at every
    step, with no gradient. Training and clip editing ran such a batch to the end and exported
    the initial weights as a trained model."""
    import torch

    from clipray.config import ConfigError
    from clipray.models import create_model
    from clipray.task import RetrievalTask
    from train import driver, edit

    # what such a run trained: one clip, loss 0 and no gradient
    task = RetrievalTask(create_model("test_meanP"))
    size = task.model.image_size
    loss = task(torch.randint(0, 256, (1, 2, 3, size, size), dtype=torch.uint8), torch.ones(1, 2),
                torch.tensor([[49406, 320, 49407]]))["loss"]
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad is None or not p.grad.any() for p in task.parameters())

    cases = ((driver.run, DEMO, synth_small["manifest"], "test_meanP", 1, r"data.batch_size=1 x train.num_workers=1 "
              r"is a batch of one clip"),
             (edit.run, REPO / "train/configs/edit_demo.yaml", synth_small["events_manifest"], "test_meanP", 1,
              r"data.batch_size=1 x train.num_workers=1 is a batch of one clip"),
             (driver.run, DEMO, synth_small["manifest"], "test_tightTransf", 2,
              r"data.batch_size=1: the tightTransf head's loss scores each caption against the clips of its "
              r"worker's batch"))
    for run, config, manifest, name, workers, says in cases:
        cfg = load_config(config, overrides(manifest, tmp_path, "one", **{
            "model.name": name, "data.batch_size": 1, "train.num_workers": workers}))
        with pytest.raises(ConfigError, match=says):
            run(cfg, quiet_ray=True)
    assert not (tmp_path / "one").exists()
    # one clip per worker on two workers: each caption has the other worker's clip as a negative
    driver.check_negatives(load_config(DEMO, ["data.batch_size=1", "train.num_workers=2"]))


def test_more_frames_than_a_temporal_head_has_positions_fails_before_training(synth_small, tmp_path):
    """seqTransf and tightTransf take CLIP's 77 text positions for frames (tightTransf: one for
    the caption): more frames failed in every worker at the first batch, after Ray and decoding."""
    from clipray.config import ConfigError
    from train.driver import run

    for head, frames, most in (("seqTransf", 78, 77), ("tightTransf", 77, 76)):
        cfg = load_config(DEMO, overrides(synth_small["manifest"], tmp_path, "long", **{
            "model.name": f"test_{head}", "data.video.max_frames": frames}))
        with pytest.raises(ConfigError, match=rf"data.video.max_frames={frames}: the {head} head has 77 "
                                              rf"positions.*so at most {most} frames"):
            run(cfg, quiet_ray=True)
    cfg = load_config(DEMO, overrides(synth_small["manifest"], tmp_path, "long", **{"model.head": "meanp"}))
    with pytest.raises(ConfigError, match="model.head must be one of meanP, seqLSTM, seqTransf, tightTransf"):
        run(cfg, quiet_ray=True)
    # a refused model leaves no run folder (it held a resume_key.json of the refused settings)
    assert not (tmp_path / "long").exists()
    # at the limit it loads: the head's own check agrees
    from train.driver import model_io

    model_io(load_config(DEMO, overrides(synth_small["manifest"], tmp_path, "ok", **{
        "model.name": "test_seqTransf", "data.video.max_frames": 77})))


def test_a_run_folder_that_cannot_be_made_fails_before_ray_starts(synth_small, tmp_path):
    from clipray.config import ConfigError
    from train import driver, edit

    (tmp_path / "afile").write_text("x")
    for run, config, manifest in ((driver.run, DEMO, synth_small["manifest"]),
                                  (edit.run, REPO / "train/configs/edit_demo.yaml", synth_small["events_manifest"])):
        cfg = load_config(config, overrides(manifest, tmp_path / "afile" / "runs", "nowhere"))
        with pytest.raises(ConfigError, match=rf"train.storage_path: cannot create the run folder "
                                              rf"{tmp_path}/afile/runs/nowhere \(\[Errno 20\] Not a directory"):
            run(cfg, quiet_ray=True)


def test_a_second_run_in_a_run_folder_in_use_is_refused_before_ray_starts(synth_small, tmp_path, monkeypatch):
    """Two runs under one train.run_name at once (a command started twice, two shells): both
    found no checkpoint, each wrote its settings into resume_key.json over the other's, and both
    wrote checkpoints, skip files and the export into the one folder, so a resume went on from
    another run's checkpoint without a word. The folder's lock (held here, as a running
    `clipray train` or `clipray edit` holds it) refuses the second before Ray starts."""
    import fcntl

    import clipray.runtime
    from clipray.config import ConfigError
    from train import driver, edit

    monkeypatch.setattr(clipray.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / ".run.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for run, config, manifest in ((driver.run, DEMO, synth_small["manifest"]),
                                      (edit.run, REPO / "train/configs/edit_demo.yaml", synth_small["events_manifest"])):
            with pytest.raises(ConfigError, match=rf"^{tmp_path}/busy: another training or clip editing run is "
                                                  r"writing this run folder now .*give another train.run_name"):
                run(load_config(config, overrides(manifest, tmp_path, "busy")), quiet_ray=True)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == [".run.lock"]  # nothing of either written
    with driver.run_folder_lock(f"{tmp_path}/busy"):  # one process: clip editing's rounds train in its folder
        with driver.run_folder_lock(f"{tmp_path}/busy"):
            pass


def test_an_empty_run_name_or_part_fails_before_ray_starts(synth_small, tmp_path):
    """`train.run_name=` (an unset shell variable): Ray Train named the checkpoints' folder anew
    at every start (ray_train_run-<date>), so a re-run never resumed, while result.json, the export
    and resume_key.json went to the storage root itself. A trailing '/' or a '..' part likewise put
    the run's files elsewhere than its checkpoints."""
    from clipray.config import ConfigError
    from train import driver, edit

    for name in ("", "group/", "/abs", "a//b", "../up", "."):
        cfg = load_config(DEMO, overrides(synth_small["manifest"], tmp_path, name))
        with pytest.raises(ConfigError, match=r"train.run_name=.* is not a folder name under train.storage_path"):
            driver.run_dir(cfg)
    for run, config, manifest in ((driver.run, DEMO, synth_small["manifest"]),
                                  (edit.run, REPO / "train/configs/edit_demo.yaml", synth_small["events_manifest"])):
        with pytest.raises(ConfigError, match=r"train.run_name='' is not a folder name"):
            run(load_config(config, overrides(manifest, tmp_path, "")), quiet_ray=True)
    assert list(tmp_path.iterdir()) == []  # nothing written at the storage root
    assert driver.run_dir(load_config(DEMO, overrides(synth_small["manifest"], tmp_path, "group/one"))) == \
        f"{tmp_path}/group/one"


def test_checkpoint_every_steps_without_a_step_budget_is_refused_before_ray_starts(synth_small, tmp_path):
    """train.checkpoint_every_steps only sets a step budget's segments: a run by epochs (or clip
    editing, which trains by epochs) ignored it without a word and checkpointed once per epoch."""
    from clipray.config import ConfigError
    from train import driver, edit

    cfg = load_config(DEMO, overrides(synth_small["manifest"], tmp_path, "every", **{"train.checkpoint_every_steps": 2}))
    with pytest.raises(ConfigError, match=r"^train.checkpoint_every_steps=2 applies to a step budget "
                                          r"\(train.max_steps\), and train.max_steps is 0"):
        driver.run(cfg, quiet_ray=True)
    cfg = load_config(REPO / "train/configs/edit_demo.yaml", overrides(
        synth_small["events_manifest"], tmp_path, "every-edit", **{"train.checkpoint_every_steps": 2}))
    with pytest.raises(ConfigError, match="clip editing trains by epochs: unset .*train.checkpoint_every_steps"):
        edit.run(cfg, quiet_ray=True)
    assert list(tmp_path.iterdir()) == []  # refused before the run folder is made


def test_a_storage_scheme_without_its_fsspec_package_is_a_config_error(synth_small, tmp_path):
    """train.storage_path=gs://... on an install without gcsfs (the `gcs` extra): the resume
    check opened it through fsspec and `clipray train` stopped with an ImportError traceback
    (exit 1); it is a one-line error naming the extra, before Ray starts."""
    import importlib.util

    from clipray.config import ConfigError
    from train import driver, edit

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    for run, config, manifest in ((driver.run, DEMO, synth_small["manifest"]),
                                  (edit.run, REPO / "train/configs/edit_demo.yaml", synth_small["events_manifest"])):
        cfg = load_config(config, overrides(manifest, "gs://bucket/runs", "r"))
        with pytest.raises(ConfigError, match=r"train.storage_path: the run folder gs://bucket/runs/r cannot be opened "
                                              r"here: .*gcsfs.* "
                                              r"\(pip install 'clipray\[gcs\]'\)"):
            run(cfg, quiet_ray=True)


def test_a_missing_manifest_fails_before_ray_or_a_model_loads(tmp_path):
    """`clipray train` and `clipray edit` check their manifest before importing Ray Train, the
    pipeline or open_clip (~5 s together), so a wrong path fails in about a second."""
    code = f"""
import sys
from clipray.config import load_config
from train import driver, edit
for run, path in ((driver.run, {str(DEMO)!r}), (edit.run, {str(REPO / "train/configs/edit_demo.yaml")!r})):
    try:
        run(load_config(path, ["data.manifest={tmp_path}/missing.parquet"]))
    except Exception as e:
        print(type(e).__name__, e)
print("loaded:", sorted(m for m in ("ray", "open_clip", "deepspeed") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0] == f"ManifestError manifest not found: {tmp_path}/missing.parquet"
    assert lines[1].startswith(f"ConfigError manifest not found: {tmp_path}/missing.parquet; a manifest with timestamps")
    assert lines[2] == "loaded: []"


@pytest.mark.parametrize("bad, says", [
    (dict(caption=None), "row 5: 'caption' is missing or not a string (None)"),
    (dict(start=-5.0, end=0.5), "row 5 (video v5): negative start -5.0"),
    (dict(split=" train"), "row 5: split ' train' has spaces around it, and the readers take a split as written: "
                           "write 'train'"),
])
def test_a_manifest_row_breaking_a_rule_is_refused_before_ray_starts(tmp_path, monkeypatch, bad, says):
    """A counted (unstreamed) manifest was read for its row ids and its train rows' count only:
    a null caption trained as the text 'None', a start of -5 s was decoded, and a split ' train'
    left its row out without a word. Every row is now checked as `clipray data check` checks it,
    before the model or Ray loads. A streamed manifest is not read up front (README: check it
    once with `clipray data check`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipray.manifest import SCHEMA, ManifestError
    from train import driver

    def past_the_manifest_checks(cfg):
        raise RuntimeError("past the manifest checks")

    monkeypatch.setattr(driver, "model_io", past_the_manifest_checks)  # (the next step: open_clip's configs)
    rows = [dict(row_id=i, video_id=f"v{i}", path=f"v{i}.mp4", start=None, end=None, caption=f"caption {i}",
                 split="test" if i % 4 == 0 else "train") for i in range(12)]
    rows[5].update(bad)
    (tmp_path / "m").mkdir()
    for k in range(2):  # two shards of 6 rows: row 5 is the first's
        pq.write_table(pa.Table.from_pylist(rows[6 * k:6 * k + 6], schema=pa.schema([f.with_nullable(True)
                                                                                     for f in SCHEMA])),
                       tmp_path / "m" / f"part-0000{k}.parquet")
    with pytest.raises(ManifestError) as e:
        driver.run(load_config(DEMO, overrides(tmp_path / "m", tmp_path / "runs", "bad", **{"data.batch_size": 2})))
    assert str(e.value) == f"{tmp_path / 'm'} (part-00000.parquet) {says}"
    good = tmp_path / "good.parquet"
    write_manifest([dict(r, caption=f"caption {i}", start=None, end=None, split="test") for i, r in enumerate(rows)],
                   good)
    with pytest.raises(RuntimeError, match="past the manifest checks"):
        driver.run(load_config(DEMO, overrides(tmp_path / "m", tmp_path / "runs", "streamed", **{
            "data.shard_stream": "true", "train.max_steps": 2, "data.eval_manifest": good})))
    assert not (tmp_path / "runs").exists()


def test_a_job_server_or_dead_address_in_ray_address_is_a_one_line_error(synth_small, tmp_path):
    """cluster/README exports RAY_ADDRESS=http://127.0.0.1:8265 for `ray job submit`; a
    `clipray train` in that shell (or ray.address=http://...) ended in Ray's ValueError
    traceback from ray.init. Both are a one-line error naming where the address came from, as is
    an address where nothing answers (a cluster that is down), which ray.init retried for minutes."""
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    code = f"""
import os, sys
from clipray.cli import main
base = [{str(DEMO)!r}, *{overrides(synth_small["manifest"], tmp_path, "http")!r}]
os.environ["RAY_ADDRESS"] = "http://127.0.0.1:8265"
print(main(["train", *base]))
del os.environ["RAY_ADDRESS"]
print(main(["train", *base, "ray.address=https://head:8265"]))
print(main(["train", *base, "ray.address=127.0.0.1:{dead}"]))
# `auto` (a shell's RAY_ADDRESS=auto), as ray.init finds it: no `ray start` here and no Ray
# running (this test's own Ray is hidden), then a `ray start` whose head has since died
from ray._private import services
none = lambda: set()
none.cache_clear = lambda: None  # ray.shutdown at exit calls it
services.find_gcs_addresses, services.find_bootstrap_address = none, lambda temp_dir: None
os.environ["RAY_ADDRESS"] = "auto"
print(main(["train", *base]))
services.find_bootstrap_address = lambda temp_dir: "127.0.0.1:{dead}"
print(main(["train", *base]))
print("ray started:", __import__("ray").is_initialized())
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == ["2", "2", "2", "2", "2", "ray started: False"], out.stderr
    from ray._private.services import resolve_ip_for_localhost

    here = resolve_ip_for_localhost("127.0.0.1")  # as ray.init reads a local address: this node's IP
    says = "is a Ray dashboard / job-server address (what `ray job submit` takes), not a cluster to join"
    assert out.stderr.splitlines() == [f"clipray train: error: RAY_ADDRESS=http://127.0.0.1:8265 {says}: unset "
                                       "it to run on an embedded local Ray, or give the cluster's GCS address "
                                       "(host:6379)",
                                       f"clipray train: error: ray.address=https://head:8265 {says}: unset it to "
                                       "run on an embedded local Ray, or give the cluster's GCS address (host:6379)",
                                       # a cluster that is down: Ray's connect loop retried for minutes
                                       f"clipray train: error: ray.address=127.0.0.1:{dead}: nothing answers there "
                                       "(Connection refused): start the cluster, or unset it to run on an embedded "
                                       "local Ray",
                                       # ray.init's ConnectionError traceback; then minutes of retries
                                       "clipray train: error: RAY_ADDRESS=auto: no Ray cluster runs on this machine: "
                                       "start one (`ray start --head`), or unset it to run on an embedded local Ray",
                                       "clipray train: error: RAY_ADDRESS=auto, the cluster last started on this "
                                       f"machine ({here}:{dead}): nothing answers there (Connection refused): "
                                       "start the cluster, or unset it to run on an embedded local Ray"]


def test_a_tmpdir_too_long_for_rays_sockets_is_a_one_line_error(synth_small, tmp_path):
    """On Linux the local Ray keeps its sockets under $TMPDIR (a batch job's scratch folder is
    often long), and a socket's path holds 107 bytes: ray.init failed with an OSError traceback."""
    long = tmp_path / ("t" * 90)
    long.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    out = subprocess.run([sys.executable, "-m", "train", str(DEMO), *overrides(synth_small["manifest"], tmp_path, "t")],
                         cwd=REPO, env=dict(env, TMPDIR=str(long)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.splitlines()[-1] == (
        f"clipray train: error: TMPDIR={long} is too long a path for the local Ray's sockets (a Unix socket's "
        "path holds at most 107 bytes): set RAY_TMPDIR to a short folder, e.g. RAY_TMPDIR=/tmp"), out.stderr


def test_a_home_where_ray_cannot_keep_its_token_is_a_one_line_error(synth_small, tmp_path):
    """A new local Ray writes its authentication token to ~/.ray/auth_token: with a HOME that
    cannot be written (read-only, or here a file) ray.init failed on 'No such file or directory'
    or 'Not a directory' naming ~/.ray, or (no HOME and a user without a passwd entry: a
    container's) on a RuntimeError traceback."""
    home = tmp_path / "home"
    home.write_text("")  # not a folder: nothing can be made under it, root or not
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                            "RAY_AUTH_TOKEN_PATH")}
    out = subprocess.run([sys.executable, "-m", "train", str(DEMO), *overrides(synth_small["manifest"], tmp_path, "h")],
                         cwd=REPO, env=dict(env, HOME=str(home)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.splitlines()[-1] == (
        "clipray train: error: the local Ray keeps its authentication token in ~/.ray/auth_token, which cannot "
        f"be written here ({home}/.ray: Not a directory): set HOME to a writable folder, or give the token in "
        "RAY_AUTH_TOKEN (a random string, e.g. RAY_AUTH_TOKEN=$(openssl rand -hex 32))"), out.stderr


def test_behind_an_http_proxy_the_local_ray_reaches_its_loopback_directly():
    """HTTP clients send every request to $http_proxy unless $no_proxy names the host; behind a
    proxy, Ray Train's placement-group cleaner asked the dashboard (127.0.0.1:8265) through it and
    warned 'Failed to query Ray Train Controller actor state' (a demo run under http_proxy, by
    hand). init_ray adds the loopback to no_proxy for itself and the Ray it starts, keeping the
    user's entries; with no proxy set it leaves them alone. (A job-server address: refused
    before Ray starts.)"""
    code = "import os, clipray.runtime as r\n" \
           "try: r.init_ray(r.RayConfig(address='http://h:1'))\nexcept r.ConfigError: pass\n" \
           "print(os.environ.get('no_proxy'), os.environ.get('NO_PROXY'))"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
    run = lambda **e: subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(env, **e), capture_output=True,
                                     text=True, timeout=60).stdout.split()
    assert run(http_proxy="http://proxy:3128", no_proxy="corp.example, 127.0.0.1") == [
        "corp.example,127.0.0.1,localhost,::1", "127.0.0.1,localhost,::1"]
    assert run(HTTPS_PROXY="http://proxy:3128") == ["127.0.0.1,localhost,::1"] * 2
    assert run(no_proxy="corp.example") == ["corp.example", "None"]


def test_usable_cores_count_the_affinity_and_the_containers_quota(tmp_path):
    """The embedded Ray and the benches' defaults were sized from os.cpu_count(), the host's
    cores: in a container of 4 CPUs on a 64-core host, for 64."""
    from clipray.runtime import usable_cores

    mine = len(os.sched_getaffinity(0))
    for text, want in (("max 100000", mine), ("100000 100000", 1), ("50000 100000", 1),
                       (f"{150000 * mine} 100000", mine), ("garbage", mine)):
        (tmp_path / "cpu.max").write_text(text + "\n")
        assert usable_cores(str(tmp_path / "cpu.max"), str(tmp_path / "no-v1")) == want, text
    assert usable_cores(str(tmp_path / "none"), str(tmp_path / "no-v1")) == mine
    # cgroup v1 (Docker on a CentOS 7 / Amazon Linux 2 host): cpu.cfs_quota_us, -1 for none
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    for text, want in (("-1", mine), ("100000", 1), ("50000", 1), (f"{150000 * mine}", mine), ("x", mine)):
        (v1 / "cpu.cfs_quota_us").write_text(text + "\n")
        assert usable_cores(str(tmp_path / "none"), str(v1)) == want, text
    assert usable_cores(str(tmp_path / "none"), str(tmp_path / "no-v1")) == mine
    # a driver's torch and faiss threads (one OpenMP) follow a quota below the cores it sees,
    # unless OMP_NUM_THREADS is set: init_ray caps them first, whatever Ray it then finds
    # (a job-server address: init_ray refuses it without starting Ray)
    code = "import clipray.runtime as r, faiss, torch\nr.usable_cores = lambda: 1\n" \
           "try: r.init_ray(r.RayConfig(address='http://h:1'))\nexcept r.ConfigError: pass\n" \
           "print(torch.get_num_threads(), faiss.omp_get_max_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["1", "1"], out.stderr
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(env, OMP_NUM_THREADS="2"),
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["2", "2"], out.stderr
    # a process pinned to one core (taskset) may use one, whatever the host has
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); " \
           "from clipray.runtime import usable_cores; print(usable_cores(), os.cpu_count())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.split()[0] == "1", out.stderr


def test_ray_address_local_is_the_embedded_ray_sized_and_checked_as_such(tmp_path):
    """`ray.address=local` (or RAY_ADDRESS=local), Ray's word for a new local instance, started
    one with Ray's exact CPU count and without check_fits (not counted as embedded): on 2 cores
    the demo's workers and decoders then waited for CPUs forever, silently."""
    code = """
import os, ray
os.environ["RAY_ADDRESS"] = "127.0.0.1:1"  # a cluster that ray.address=local overrides
from clipray import runtime
from clipray.config import ConfigError, RayConfig
runtime.init_ray(RayConfig(address="local", num_cpus=3), quiet=True)
print(runtime.is_embedded(), ray.cluster_resources().get("CPU"))
try:
    runtime.check_fits({"train.num_workers x train.cpus_per_worker": 3.0})
except ConfigError as e:
    print(str(e).split(":")[0])
ray.shutdown()
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == ["True 3.0", "this run needs 4 CPUs at once (train.num_workers x "
                                       "train.cpus_per_worker = 3; 1 for Ray Data's read tasks), but the local "
                                       "Ray has 3 (ray.num_cpus)"], out.stderr


def test_with_no_address_the_embedded_ray_starts_beside_a_ray_start_cluster(tmp_path):
    """With neither ray.address nor RAY_ADDRESS, init_ray called ray.init(address=None), which
    joins the cluster a `ray start` on this machine recorded in $RAY_TMPDIR/ray/ray_current_cluster
    (cluster/README's one-machine head, or one killed without `ray stop`): with the embedded
    Ray's num_cpus, every command failed with Ray's "When connecting to an existing cluster,
    num_cpus and num_gpus must not be provided" traceback, where the docs (and the advice to
    unset RAY_ADDRESS) promise an embedded local Ray. ray.init is a stub that says where Ray
    would go: None is a new local instance."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    code = """
import ray
from ray._private import services
from clipray import runtime
def init(address=None, **kwargs):
    print(services.canonicalize_bootstrap_address(address, None), kwargs.get("num_cpus") == runtime.local_cpus())
    raise SystemExit(0)
ray.init = init
runtime.init_ray(quiet=True)
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(env, RAY_TMPDIR=str(tmp_path)),
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["None", "True"], out.stdout + out.stderr


def test_ray_address_auto_with_a_ray_address_in_the_shell_says_which_cluster(monkeypatch):
    """Ray's `auto` is RAY_ADDRESS first, where that is set. ray.address=auto in a shell that
    exports a job server's address (cluster/README's `export RAY_ADDRESS=http://127.0.0.1:8265`)
    ended in Ray's ValueError traceback ("Invalid address format"); with a cluster address there
    that is down, the error called it "the cluster last started on this machine". Both fail
    before ray.init, which is a stub that fails the test if reached."""
    import ray

    from clipray import runtime
    from clipray.config import ConfigError, RayConfig
    from clipray.runtime import init_ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init reached"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    # this process's threads and proxy variables stay as they are
    monkeypatch.setattr(runtime, "cap_threads", lambda: None)
    monkeypatch.setattr(runtime, "loopback_direct", lambda: None)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ConfigError, match=r"^ray.address=auto takes RAY_ADDRESS=http://127.0.0.1:8265 where that "
                                          r"is set, which is no cluster address \(Invalid address format"):
        init_ray(RayConfig(address="auto"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"^ray.address=auto, RAY_ADDRESS's cluster \(.*:1\): nothing answers there"):
        init_ray(RayConfig(address="auto"))


def test_a_ray_address_with_spaces_around_it_is_read_as_the_config_check_reads_it(monkeypatch):
    """The config's check strips ray.address (a quoted YAML value, an interpolated variable), and
    init_ray did not: " local" reached ray.init as a cluster's address ("Invalid address format"
    traceback) and "127.0.0.1:1 " went unchecked (its port "1 " is no number) into ray.init's
    minutes of retries. ray.init is a stub that says what it was given."""
    import ray

    from clipray import runtime
    from clipray.config import ConfigError

    class Embedded(Exception):
        pass

    def embedded(cfg=None):
        raise Embedded

    monkeypatch.setattr(ray, "init", lambda address=None, **k: pytest.fail(f"ray.init({address!r})"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    # this process's threads, proxy variables and Ray settings stay as they are
    monkeypatch.setattr(runtime, "cap_threads", lambda: None)
    monkeypatch.setattr(runtime, "loopback_direct", lambda: None)
    monkeypatch.setattr(runtime, "local_cpus", embedded)  # the embedded Ray's first step
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=r"^ray.address=127.0.0.1:1: nothing answers there"):
        runtime.init_ray(load_config(DEMO, ['ray.address=" 127.0.0.1:1 "']).ray)
    with pytest.raises(Embedded):  # the embedded Ray, not a cluster named " local"
        runtime.init_ray(load_config(DEMO, ['ray.address=" local"']).ray)


def test_object_storage_that_cannot_be_reached_is_a_line_naming_the_storage_path(synth_small, tmp_path):
    """train.storage_path=s3://... without credentials (or bucket, or permission) ended `clipray
    train` and `clipray edit` in a botocore traceback from the run's first look at its folder."""
    code = f"""
from clipray.cli import main
store = ["train.storage_path=s3://clipray-none/runs", "data.batch_size=4"]
print(main(["train", {str(DEMO)!r}, "data.manifest={synth_small['manifest']}", *store]))
print(main(["edit", {str(REPO / "train/configs/edit_demo.yaml")!r}, "data.manifest={synth_small['events_manifest']}",
            *store]))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == ["2", "2"], out.stderr
    assert out.stderr.splitlines() == [
        f"clipray {cmd}: error: train.storage_path=s3://clipray-none/runs: cannot read or write the run folder "
        f"s3://clipray-none/runs/{run} (NoCredentialsError: Unable to locate credentials)"
        for cmd, run in (("train", "demo"), ("edit", "edit-demo"))]


def test_deepspeed_starts_on_cpu_without_compiling_a_cpp_op(tmp_path):
    """`ds_config.initialize` on one CPU process: the engine takes an optimiser step and
    DeepSpeed built nothing into TORCH_EXTENSIONS_DIR. Left to itself it compiles its
    shared-memory all-reduce op there on first use, 55-95 s on 2 cores, for inference only.
    A CPU run also names its accelerator, so DeepSpeed does not warn that it found no GPU."""
    from ports import free_ports

    code = """
import torch
from clipray.config import TrainConfig
from train import ds_config
task = torch.nn.Linear(4, 1)
before = task.weight.detach().clone()
opt = torch.optim.AdamW(task.parameters(), lr=0.1)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
engine = ds_config.initialize(task, opt, sched, TrainConfig(zero_stage=0), batch_size=2)
engine.backward(engine(torch.ones(2, 4)).sum())
engine.step()
print("moved:", bool((task.weight != before).all()), flush=True)
torch.distributed.destroy_process_group()  # else gloo's threads can abort the exit (SIGABRT)
"""
    ext = tmp_path / "torch_extensions"
    # set but empty (`export DS_ACCELERATOR=`) is unset: it was DeepSpeed's ValueError ('DS_ACCELERATOR
    # must be one of [...]. Value "" is not supported') on every training worker
    env = dict(os.environ, DS_ACCELERATOR="")
    env.update(TORCH_EXTENSIONS_DIR=str(ext), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_ports(1)[0]))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "moved: True"
    assert not ext.exists() or not any(ext.iterdir()), sorted(p.name for p in ext.rglob("*"))
    assert "unable to detect it" not in out.stdout + out.stderr, out.stdout[-3000:]


def _one_rank(code: str) -> subprocess.CompletedProcess:
    """`code` run as rank 0 of a one-process torch.distributed world (DeepSpeed without Ray)."""
    from ports import free_ports

    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_ports(1)[0])}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_grad_clip_caps_the_gradient_norm_the_optimiser_steps_with(tmp_path):
    """`optim.grad_clip` reaches DeepSpeed: with SGD at lr 1 a step moves the weights by minus
    the gradient it was given, so the move's norm is min(norm, cap). The loss's gradient is
    10 * 2 rows = 20 per weight, norm 40; 0 turns clipping off. (It was fixed at 1.0.)"""
    code = """
import torch
from clipray.config import TrainConfig
from train import ds_config
for cap in (0.5, 0.0, 100.0):
    task = torch.nn.Linear(4, 1, bias=False)
    before = task.weight.detach().clone()
    opt = torch.optim.SGD(task.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    engine = ds_config.initialize(task, opt, sched, TrainConfig(zero_stage=0), 2, grad_clip=cap)
    engine.backward(10 * engine(torch.ones(2, 4)).sum())
    engine.step()
    print(cap, round(float((task.weight - before).norm()), 4), flush=True)
torch.distributed.destroy_process_group()
"""
    out = _one_rank(code)
    assert out.stdout.splitlines()[-3:] == ["0.5 0.5", "0.0 40.0", "100.0 40.0"]


def test_logit_scale_is_capped_in_the_optimiser_s_fp32_copy_too(tmp_path):
    """ZeRO steps an fp32 copy of the weights and copies it over the model's: capping only the
    model's logit_scale left the copy growing past ln(100) while the gradient pushed it up, so
    after the gradient turned the scale stayed at the cap (5 steps of +0.1 from 4.5, then 3 of
    -0.1: 4.7 in the copy, the cap for 3 more steps). As in the reference (one fp32 weight,
    capped), it must leave the cap at the first step down, at every ZeRO stage and under bf16
    (without ZeRO too: DeepSpeed's bf16 then keeps an fp32 copy per parameter, in other fields).
    AdamW with betas (0, 0) moves a weight by exactly lr per step."""
    code = """
import torch
from clipray.config import TrainConfig
from clipray.losses import clamp_logit_scale
from train import ds_config

class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor([4.5]))
        self.w = torch.nn.Linear(2, 1)

    def forward(self, sign):
        return (sign * self.logit_scale).sum() + 0 * self.w(torch.ones(1, 2, dtype=self.w.weight.dtype)).sum()

for stage, precision in ((0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (1, "bf16")):
    task = Scale()
    opt = torch.optim.AdamW(task.parameters(), lr=0.1, betas=(0.0, 0.0), eps=1e-12, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    engine = ds_config.initialize(task, opt, sched, TrainConfig(zero_stage=stage, precision=precision), 1, 0.0)
    seen = []
    for sign in [-1.0] * 5 + [1.0] * 3:  # the loss -scale pushes it up, +scale down
        engine.backward(engine(torch.tensor(sign)))
        engine.step()
        clamp_logit_scale(engine)
        seen.append(round(float(task.logit_scale.detach().float()[0]), 2))
    print(stage, precision, seen, flush=True)
torch.distributed.destroy_process_group()
"""
    out = _one_rank(code)
    ref = [4.6] + [math.log(100)] * 4 + [math.log(100) - 0.1 * k for k in (1, 2, 3)]
    fp32 = [round(v, 2) for v in ref]
    bf16 = [round(float(torch.tensor(v).bfloat16()), 2) for v in ref]  # the model's bf16 weight
    assert fp32[-3:] == [4.51, 4.41, 4.31] and bf16[-3:] == [4.5, 4.41, 4.31]
    assert out.stdout.splitlines()[-6:] == [f"{s} {p} {fp32 if p == 'fp32' else bf16}" for s, p in
                                            ((0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (1, "bf16"))]


def test_bf16_without_zero_takes_no_step_before_training():
    """DeepSpeed's bf16 optimiser without ZeRO set up its state by one AdamW step on zero
    gradients: the first real step was bias-corrected as the second (a move of 0.074, not lr
    0.1) and the weight decayed once before it (x 0.95 at lr 0.1, weight decay 0.5). By hand,
    with gradient 1: AdamW's first two steps move the weight by exactly lr after decaying it,
    1 -> 0.95 - 0.1 = 0.85 -> 0.85 x 0.95 - 0.1 = 0.7075, at every stage and precision. The
    old code gave 0.83 (bf16 of 0.8284) after the first step under bf16 without ZeRO."""
    code = """
import torch
from clipray.config import TrainConfig
from train import ds_config

class One(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return (self.w * x).sum()

for stage, precision in ((0, "bf16"), (1, "bf16"), (0, "fp32")):
    task = One()
    opt = torch.optim.AdamW(task.parameters(), lr=0.1, eps=1e-12, weight_decay=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    engine = ds_config.initialize(task, opt, sched, TrainConfig(zero_stage=stage, precision=precision), 1, 0.0)
    seen = []
    for _ in range(2):
        engine.backward(engine(torch.tensor([0.5, 0.5], dtype=task.w.dtype)))
        engine.step()
        seen.append(float(task.w.detach().float()[0]))
    print(stage, precision, seen, flush=True)
torch.distributed.destroy_process_group()
"""
    out = _one_rank(code)
    by_hand = [0.85, 0.85 * 0.95 - 0.1]
    bf16 = [float(torch.tensor(v).bfloat16()) for v in by_hand]  # the model's bf16 weight
    seen = {tuple(line.split()[:2]): eval(line.split(" ", 2)[2]) for line in out.stdout.splitlines()[-3:]}
    assert seen[("0", "fp32")] == pytest.approx(by_hand, abs=1e-6)
    assert seen[("1", "bf16")] == bf16
    assert seen[("0", "bf16")] == bf16


def test_the_step_agreement_all_reduces_on_the_device_the_process_group_serves(monkeypatch):
    """GPU workers talk NCCL, which serves CUDA tensors only: the first GPU run crashed at its
    first batch all-reducing a CPU flag. A "cuda:gloo" group, with no backend for CPU tensors
    either, stands in for NCCL on this GPU-less machine."""
    import torch.distributed as dist

    from ports import free_ports
    from train.loop import _all_have, collective_device

    first, second = free_ports(2)
    dist.init_process_group("cuda:gloo", init_method=f"tcp://127.0.0.1:{first}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.tensor([1]))  # what the loop used to do
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the worker's GPU, had it one
        assert collective_device() == torch.device("cuda", 0)
    finally:
        dist.destroy_process_group()
    monkeypatch.undo()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{second}", rank=0, world_size=1)
    try:
        assert collective_device() == torch.device("cpu")
        assert _all_have(True) is True and _all_have(False) is False
    finally:
        dist.destroy_process_group()
    assert _all_have(True) is True and _all_have(False) is False  # no group: nothing to agree on


def test_the_epoch_clock_splits_an_epoch_into_waits_for_batches_and_the_rest():
    """Hand-timed: an epoch of 10 s whose three waits for a batch took 4, 0.5 and 0.5 s."""
    from train.loop import EpochClock

    now = [100.0]
    clock = EpochClock(clock=lambda: now[0])
    for wait, step in ((4.0, 1.0), (0.5, 1.5), (0.5, 2.5)):
        with clock.waiting():
            now[0] += wait
        now[0] += step
    assert clock.summary(clips=48) == pytest.approx({"epoch_s": 10.0, "data_wait_s": 5.0, "first_batch_s": 4.0,
                                                     "clips_per_s": 4.8, "step_clips_per_s": 9.6})
    with pytest.raises(StopIteration), clock.waiting():  # a wait that ends in an error still counts
        now[0] += 2.0
        raise StopIteration
    assert clock.summary(clips=48)["data_wait_s"] == pytest.approx(7.0)


def test_train_frame_order_reorders_each_clips_real_frames_and_keeps_padding_last():
    """specs/clip4clip.md: frames train in ordinal (default), reverse or random order; the
    option was missing. Each clip's real frames only: its padded slots stay at the end."""
    from clipray.config import ConfigError
    from train.loop import order_frames

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    frames = (torch.arange(12).view(3, 4) * 10).view(3, 4, 1, 1, 1).expand(3, 4, 3, 2, 2).to(torch.uint8)
    got, got_mask = order_frames(frames, mask, "ordinal")
    assert got is frames and got_mask is mask
    got, got_mask = order_frames(frames, mask, "reverse")
    assert got[:, :, 0, 0, 0].tolist() == [[20, 10, 0, 30], [70, 60, 50, 40], [80, 90, 100, 110]]
    assert torch.equal(got_mask, mask) and torch.equal(got, got[:, :, :1, :1, :1].expand_as(got))
    runs = [order_frames(frames, mask, "random", torch.Generator().manual_seed(s))[0][:, :, 0, 0, 0] for s in
            (0, 0, 1, 2, 3)]
    assert torch.equal(runs[0], runs[1])  # a seed gives one order
    for r in runs:
        assert sorted(r[0, :3].tolist()) == [0, 10, 20] and r[0, 3] == 30
        assert sorted(r[1].tolist()) == [40, 50, 60, 70] and r[2].tolist() == [80, 90, 100, 110]
    assert len({tuple(r[:2].flatten().tolist()) for r in runs}) > 1  # seeds give other orders
    with pytest.raises(ConfigError, match=r"data.train_frame_order.*one of ordinal, reverse, random"):
        load_config(None, ["data.train_frame_order=backwards"])


def test_peak_memory_is_the_epochs_own_peak_resident_set():
    """specs/unipt.md: peak memory is a first-class metric of a run (metrics.csv had none). On a
    CPU worker it is the process's peak resident set since the epoch's start: 96 MB touched
    during the epoch raise it by at least 96 MB over the resident set at the reset, and the next
    epoch's reset forgets them once freed."""
    from clipray.runtime import proc_status_kb
    from train.loop import PeakMemory

    import mmap

    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    before = proc_status_kb("VmRSS") / 1024
    # pages of a new mapping, every one written: resident. (np.ones could reuse memory the
    # allocator held resident already, and the peak then rose by nothing: seen once in a full run)
    block = mmap.mmap(-1, 96 * 2**20)
    pages = np.frombuffer(block, dtype=np.uint8)
    pages[:] = 1
    peak = memory.read_mb()
    assert peak >= before + 96 - 1
    del pages
    block.close()  # unmapped: no longer resident
    memory.reset()
    assert memory.read_mb() < peak - 64


def test_the_synthetic_folder_given_as_the_manifest_is_refused_before_training(synth_small, tmp_path):
    """`data synth --out DIR` writes two manifests into DIR (manifest.parquet, events.parquet);
    DIR itself read as one manifest would mix their rows under the same row ids."""
    from clipray.manifest import ManifestError
    from train.driver import run

    folder = str(Path(synth_small["manifest"]).parent)
    cfg = load_config(DEMO, overrides(folder, tmp_path, "mixed"))
    with pytest.raises(ManifestError, match=r"row_id \d+ is used by more than one row; a manifest folder must "
                                            r"hold the shards of one manifest only \(its files: events.parquet, "
                                            r"manifest.parquet\)"):
        run(cfg, quiet_ray=True)
    assert not (tmp_path / "mixed").exists()


def test_when_every_clip_is_skipped_the_failure_points_at_the_skip_report(ray_local, synth_small, tmp_path, capfd):
    """The failure is one line, the first failed worker's error (`clipray train: error: ...`,
    exit 1), not Ray's hundred-line traceback of it; and Ray Train's Ctrl-C handler is not left
    behind (after fit, two Ctrl-C's aborted a finished run and the third exited 0, writing
    nothing)."""
    import signal

    import ray.train

    from clipray.config import RunFailed
    from train.driver import run

    rows = read_manifest(synth_small["manifest"]).to_pylist()
    for r in rows:
        r["path"] = f"{tmp_path}/nowhere/{r['path']}"
    write_manifest(rows, tmp_path / "gone.parquet")
    cfg = load_config(DEMO, overrides(str(tmp_path / "gone.parquet"), tmp_path, "gone", **{"train.epochs": 1}))
    handler = signal.getsignal(signal.SIGINT)
    n = sum(r["split"] == "train" for r in rows)
    with pytest.raises(RunFailed) as e:
        run(cfg, quiet_ray=True)
    # no checkpoint was written: none is said to stay
    assert str(e.value) == (f"training failed on worker 0: RuntimeError: epoch 1 got no training batch: 0 of the "
                            f"{n} training clips decoded, fewer than the 8 one step takes (data.batch_size 4 x "
                            f"train.num_workers 2); {n} clips were skipped this epoch (skip report: "
                            f"{tmp_path}/gone/skip_report.jsonl)")
    assert isinstance(e.value.__cause__, ray.train.TrainingFailedError)
    assert signal.getsignal(signal.SIGINT) is handler
    report = [json.loads(line) for line in (tmp_path / "gone" / "skip_report.jsonl").read_text().splitlines()]
    # every training row was tried and reported (test rows too, if evaluation had started)
    assert {r["row_id"] for r in report} >= {i for i, r in enumerate(rows) if r["split"] == "train"}
    assert {r["reason"].split(":")[0] for r in report} == {"missing file"}
    assert f"[driver] training failed with {len(report)} clips skipped so far {{'missing file': {len(report)}}}; " \
           f"report: {tmp_path}/gone/skip_report.jsonl" in capfd.readouterr().err


def test_too_few_decoded_clips_for_a_step_is_said_with_the_counts_and_the_skip_report(ray_local, synth_small,
                                                                                      tmp_path):
    """6 training clips at data.batch_size=2 on 2 workers; after the first epoch's checkpoint,
    3 of the videos go bad under the manifest: the 3 that still decode are fewer than one step's
    4. The run printed "6 training clips" and failed with "epoch 2 got no training batch: check
    the skip report": the skip report listed the 3 bad clips but not that the good ones were too
    few, and no file was named. The failure now gives the counts, names the report, and keeps the
    checkpoint, saying so; its count is of this epoch's skips. (A run with no checkpoint yet says
    none stays: test_when_every_clip_is_skipped_the_failure_points_at_the_skip_report.)"""
    from clipray.config import RunFailed
    from train.driver import run

    root = Path(synth_small["manifest"]).parent
    rows = read_manifest(synth_small["manifest"]).to_pylist()
    train = [r for r in rows if r["split"] == "train"][:6]
    test = [r for r in rows if r["split"] == "test"][:2]
    videos = tmp_path / "videos"
    videos.mkdir()
    for r in train + test:
        (videos / Path(r["path"]).name).write_bytes((root / r["path"]).read_bytes())
        r["path"] = str(videos / Path(r["path"]).name)

    write_manifest(train + test, tmp_path / "later.parquet")
    args = {"data.batch_size": 2, "train.epochs": 2}
    cfg = load_config(DEMO, overrides(str(tmp_path / "later.parquet"), tmp_path, "later", **args))
    run(cfg, quiet_ray=True, stop_epoch=1, table=False)  # epoch 1 and its checkpoint
    for r in train[:3]:  # three videos go bad under the manifest
        Path(r["path"]).write_bytes(b"not a video" * 100)
    with pytest.raises(RunFailed) as e:
        run(cfg, quiet_ray=True, stop_epoch=2, table=False)
    assert str(e.value) == ("training failed on worker 0: RuntimeError: epoch 2 got no training batch: 3 of the 6 "
                            "training clips decoded, fewer than the 4 one step takes (data.batch_size 2 x "
                            "train.num_workers 2); 3 clips were skipped this epoch (skip report: "
                            f"{tmp_path}/later/skip_report.jsonl); its checkpoints stay in {tmp_path}/later")
    report = [json.loads(line) for line in (tmp_path / "later" / "skip_report.jsonl").read_text().splitlines()]
    assert sorted(r["row_id"] for r in report) == [0, 1, 2]  # the manifest's first rows: the videos made bad


def test_zero2_trains_through_planted_bad_videos(ray_local, synth_small, real_video, tmp_path):
    from train.driver import run

    root = synth_small["manifest"].rsplit("/", 1)[0]
    rows = read_manifest(synth_small["manifest"]).to_pylist()
    for r in rows:
        r["path"] = f"{root}/{r['path']}"
    bad = plant(real_video, tmp_path / "bad")
    bad_rows = [dict(video_id=f"bad_{k}", path=str(p), caption=f"broken {k}", split="train")
                for k, p in bad.items() if k in ("missing", "empty", "truncated", "corrupt")]
    write_manifest(rows + bad_rows, tmp_path / "m.parquet")
    # a step budget whose segments (7 steps) outrun a pass over the data (18 good clips at a
    # global batch of 8: 2 steps)
    cfg = load_config(DEMO, overrides(str(tmp_path / "m.parquet"), tmp_path, "zero2",
                                      **{"train.zero_stage": 2, "data.shuffle_rows": True,
                                         "train.max_steps": 10, "train.checkpoint_every_steps": 7}))
    final = run(cfg, quiet_ray=True)
    assert np.isfinite(final["loss"]) and final["skipped_clips"] == 4
    assert final["step"] == 10  # was 4: each of the two segments ended with its pass
    report = [json.loads(x) for x in (tmp_path / "zero2" / "skip_report.jsonl").read_text().splitlines()]
    assert sorted(r["video_id"] for r in report) == sorted(r["video_id"] for r in bad_rows)
    assert all(r["reason"] for r in report)


def test_a_schedule_cut_short_by_skipped_clips_is_said(ray_local, synth_small, real_video, tmp_path, capsys):
    """The schedule's length comes from the manifest's training rows: 8 rows that cannot be
    decoded beside the 18 good ones plan 26 // 8 = 3 steps an epoch, but the good clips give
    each of the 2 workers 9, two batches of 4: 2 steps. The learning rate stopped short of its
    schedule's end, and the run said only 'finished: 2 steps'."""
    from train.driver import run

    root = synth_small["manifest"].rsplit("/", 1)[0]
    rows = [dict(r, path=f"{root}/{r['path']}") for r in read_manifest(synth_small["manifest"]).to_pylist()]
    bad = plant(real_video, tmp_path / "bad")
    bad_rows = [dict(video_id=f"bad_{k}_{i}", path=str(bad[k]), caption=f"broken {k} {i}", split="train")
                for i in range(2) for k in ("missing", "empty", "truncated", "corrupt")]
    write_manifest(rows + bad_rows, tmp_path / "m.parquet")
    assert sum(r["split"] == "train" for r in rows) == 18
    final = run(load_config(DEMO, overrides(str(tmp_path / "m.parquet"), tmp_path, "short", **{"train.epochs": 1})))
    assert (final["total_steps"], final["planned_steps"], final["skipped_clips"]) == (2, 3, 8)
    assert json.loads((tmp_path / "short" / "result.json").read_text())["planned_steps"] == 3
    assert (f"note: the epochs gave 2 of the 3 steps planned from the manifest's training rows (skipped clips), "
            f"so the learning rate stopped at {final['lr']:.3g}, short of its schedule's end") in capsys.readouterr().out


def log_trained_captions(synth_small, tmp_path, monkeypatch):
    """The 24 synthetic videos all as training rows (tmp_path/m.parquet), and a log file to which
    the workers write the captions (tokens) every step trains on."""
    import train.loop

    root = synth_small["manifest"].rsplit("/", 1)[0]
    rows = read_manifest(synth_small["manifest"]).to_pylist()
    for r in rows:
        r["path"], r["split"] = f"{root}/{r['path']}", "train"
    write_manifest(rows, tmp_path / "m.parquet")
    log = tmp_path / "trained.txt"

    def logged_loop(config):  # in each Ray Train worker (pickled by value: a local function)
        import train.loop as loop  # the worker's own module: the real loop
        from clipray.task import RetrievalTask

        forward = RetrievalTask.forward

        def logged(self, frames, frame_mask, tokens):
            with open(log, "a") as f:
                f.write("".join(" ".join(map(str, t)) + "\n" for t in tokens.tolist()))
            return forward(self, frames, frame_mask, tokens)

        RetrievalTask.forward = logged
        loop.train_loop(config)

    monkeypatch.setattr(train.loop, "train_loop", logged_loop)
    return rows, log


def test_a_step_budget_resumed_mid_pass_and_mid_accumulation_goes_on_as_a_straight_run(ray_local, synth_small,
                                                                                      tmp_path, monkeypatch):
    """24 training rows, 2 workers x 3 clips: a pass is 4 steps. A budget of 8 steps in segments
    of 3 (checkpoint_every_steps) is two whole passes, so every caption trains exactly twice;
    the workers log the captions (tokens) every step trains on. The run stops after its first
    segment (3 of its pass's 4 steps) and is resumed. Three faults each broke it:
    - each segment started a new pass and trained its first steps: in manifest order
      (data.shuffle_rows=false) the same captions every segment and others never (segment 3
      here reads on from segment 2 in the same call);
    - the resumed run started a new pass and trained its first batches again: the captions of
      segment 1 a second time;
    - with train.grad_accum=2 the optimiser steps after micro-steps 2, 4, 6 and 8, and segment 1
      ends half-way through an accumulation. DeepSpeed counted micro-steps from 0 again after
      the resume, so the resumed run stepped after 5 and 7 alone: 3 steps in all, and its
      schedule stopped short (lr 2.5e-4 at the end, not 0)."""
    import collections

    from train.driver import run

    rows, log = log_trained_captions(synth_small, tmp_path, monkeypatch)
    args = overrides(str(tmp_path / "m.parquet"), tmp_path, "budget-resume", **{
        "data.eval_manifest": synth_small["manifest"], "data.shuffle_rows": False, "data.batch_size": 3,
        "train.grad_accum": 2, "train.max_steps": 8, "train.checkpoint_every_steps": 3})
    first = run(load_config(DEMO, args), quiet_ray=True, stop_epoch=1, table=False)
    assert first["total_steps"] == 3
    # its checkpoint as a run stopped before 9c803a8 saved it: the epoch's time only as its
    # clips_per_s (the resumed run failed at its end on a KeyError: no result.json, no export)
    clips = 3 * 3 * 2  # segment 1: 3 steps of 3 clips x 2 workers
    snap = json.loads((tmp_path / "budget-resume" / "checkpoint_manager_snapshot.json").read_text())
    state_file = tmp_path / "budget-resume" / snap["latest_checkpoint_result"]["checkpoint_dir_name"] / "state.json"
    state = json.loads(state_file.read_text())
    old = {k: v for k, v in state["history"][0].items()
           if k not in ("epoch_s", "data_wait_s", "first_batch_s", "step_clips_per_s", "peak_mem_mb")}
    state["history"][0] = dict(old, clips_per_s=clips / first["epoch_s"])
    state_file.write_text(json.dumps(state))
    final = run(load_config(DEMO, args), quiet_ray=True, table=False)
    assert final["total_steps"] == 8
    with open(tmp_path / "budget-resume" / "metrics.csv") as f:
        segments = list(csv.DictReader(f))
    assert [int(r["step"]) for r in segments] == [3, 6, 8]
    # the run's time goes with its steps: every epoch's, the first call's too (was this call's only)
    epoch_s = [float(r["epoch_s"] or clips / float(r["clips_per_s"])) for r in segments]
    assert epoch_s[0] == pytest.approx(first["epoch_s"])
    assert final["train_seconds"] == pytest.approx(sum(epoch_s)) and final["train_seconds"] > final["epoch_s"]
    assert json.loads((tmp_path / "budget-resume" / "result.json").read_text())["train_seconds"] == \
        pytest.approx(final["train_seconds"])
    trained = collections.Counter(log.read_text().splitlines())
    assert len(trained) == len(rows) == 24
    assert set(trained.values()) == {2}, sorted(collections.Counter(trained.values()).items())
    # demo: lr 1e-3 for every group, 10% warm-up; the schedule spans 8 // 2 = 4 optimiser steps,
    # of which max(1, int(0.4)) = 1 warms up; "lr" is the rate a segment's last step used: the
    # schedule after the optimiser steps before it (steps 3, 6 and 8 follow 1, 2 and 3 of them).
    # It was the rate after the step, one ahead: the last row always said 0.0, a rate never used
    n, warm = 4, 1

    def lr_after(k):  # k optimiser steps taken
        return 1e-3 * ((k + 1) / warm if k < warm else 0.5 * (1 + math.cos(math.pi * min(1, (k - warm) / (n - warm)))))

    assert [float(r["lr"]) for r in segments] == pytest.approx([lr_after(1), lr_after(2), lr_after(3)], abs=1e-12)


def test_unipt_under_zero3_trains_its_side_networks_and_leaves_clip_bit_identical(ray_local, synth_small, tmp_path):
    """ZeRO-3 partitions the frozen CLIP weights too and gathers them for every forward and for
    the export: they must come back exactly as initialised, while every side-network tensor moved."""
    from safetensors.torch import load_file

    from clipray.models import build_model
    from train.driver import run

    cfg = load_config(DEMO, overrides(synth_small["manifest"], tmp_path, "unipt",
                                      **{"model.tuning": "unipt", "train.epochs": 1, "train.zero_stage": 3,
                                         "data.train_frame_order": "random"}))
    final = run(cfg, quiet_ray=True)
    assert np.isfinite(final["loss"])
    torch.manual_seed(cfg.train.seed)  # the workers' initial model
    before = build_model(cfg.model).state_dict()
    after = load_file(tmp_path / "unipt" / "export" / "model.safetensors")
    assert after.keys() == before.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    side = {k for k in before if k.startswith("tuning.")}
    # weight and bias of 3 Linears + one per layer state, text (4 blocks + input), vision (2 + 1)
    assert len(side) == 2 * ((3 + 5) + (3 + 3))
    assert moved == side


def _gcs_address(ray) -> str:
    return ray.get_runtime_context().gcs_address


def test_zero3_stopped_by_ctrl_c_says_how_to_resume_and_resumes_at_its_saved_step(ray_local, synth_small, tmp_path):
    """Run the CLI, Ctrl-C (SIGINT) the driver after its first checkpoint, re-run the same
    command: the second run starts at the saved step and finishes with the same total steps.
    Ray Train aborts the run and its ray.get ends in a bare SystemExit(1), which printed nothing
    at all; the driver says where the checkpoints are and that re-running the command resumes,
    which the second run then does. (A driver killed outright: test_posttrain's resume.)

    The re-run is `clipray train` on its own embedded Ray, as a user runs it, and its console
    is checked for Ray's noise. Every run's console had Ray's error line for Ray Train's
    preemption watcher ("core_worker.cc:...: Actor with class name: 'PreemptionWatcher' ...
    max_restarts > 0"), and Ray's "RayDeprecationWarning: `ExecutionOptions.exclude_resources`"
    from its dataset manager; an evaluation split of one block (here one test clip; clip
    editing's 1-clip validation split, every round) had Ray Data's "UserWarning: The maximum
    number of concurrent tasks for 'MapBatches(decode_batch)' is set to 2, but the operator only
    received 1 input(s)"."""
    epochs = 4  # the first checkpoint comes after epoch 1: three more keep the run going past the SIGINT
    root = Path(synth_small["manifest"]).parent
    rows = [dict(r, path=str(root / r["path"])) for r in read_manifest(synth_small["manifest"]).to_pylist()]
    rows = [r for r in rows if r["split"] == "train"] + [r for r in rows if r["split"] == "test"][:1]
    write_manifest(rows, tmp_path / "m.parquet")
    args = [sys.executable, "-m", "train", str(DEMO),
            *overrides(str(tmp_path / "m.parquet"), tmp_path, "resume",
                       **{"train.zero_stage": 3, "train.epochs": epochs})]
    env = dict(os.environ, RAY_ADDRESS=_gcs_address(ray_local), PYTHONUNBUFFERED="1")
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        p = subprocess.Popen(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while registered_state(str(tmp_path / "resume")) is None:
            assert p.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        os.kill(p.pid, signal.SIGINT)
        # exit status 130, as a process killed by SIGINT, with the CLI's line: Ray's bare
        # SystemExit(1) went past both
        assert p.wait(timeout=120) == 130
    finally:  # a run left behind keeps the session's Ray CPUs (tests/runs.py)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    said = log.read_text()
    assert f"training interrupted; its checkpoints stay in {tmp_path / 'resume'}" in said, said[-3000:]
    assert said.rstrip().splitlines()[-1] == "clipray train: interrupted", said[-3000:]
    saved = registered_state(str(tmp_path / "resume"))
    assert saved["epoch"] < epochs and not (tmp_path / "resume" / "result.json").exists()
    # the settings init_ray gives its embedded Ray are not this session's: the command sets its own
    own = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_DATA_LOGGING_CONFIG")}
    second = subprocess.run(args, cwd=REPO, env=dict(own, PYTHONUNBUFFERED="1"), capture_output=True, text=True,
                            timeout=600)
    said = second.stdout + second.stderr
    assert second.returncode == 0, said[-3000:]
    assert f"resumed from step {saved['step']} (epoch {saved['epoch']})" in said
    assert f"[eval] epoch {epochs} (test)" in said and "(1 clips)" in said, said[-3000:]
    for noise in ("PreemptionWatcher", "max_restarts", "RayDeprecationWarning", "exclude_resources",
                  "The maximum number of concurrent tasks"):
        assert noise not in said, said[-5000:]
    result = json.loads((tmp_path / "resume" / "result.json").read_text())
    steps_per_epoch = saved["step"] // saved["epoch"]
    assert result["total_steps"] == epochs * steps_per_epoch and result["epoch"] == epochs
    epochs_logged = [line.split(",")[0] for line in (tmp_path / "resume" / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs_logged == [str(e) for e in range(1, epochs + 1)]  # no epoch trained twice: the history continues


def test_resuming_with_other_settings_is_refused_before_ray_and_leaves_the_run(finished_run, synth_small, tmp_path,
                                                                              monkeypatch, capsys):
    """A finished run (the shared 3-epoch one) re-run with another batch size: its checkpoint
    counts steps of batch 4; continuing would resume at that step on another schedule (seen: a
    plan of 18 steps that finished at 8), so the call is refused and the run's history is left
    as it was. So are optimiser settings: the checkpoint restores its own learning rate, and a
    new one was ignored without a word. The same settings again print the finished run's
    result, Ray not started (they resumed the finished run and changed nothing).

    The run is named group/one: its run folder is <storage>/group/one, and Ray's checkpoints
    belong in it, beside result.json, where the settings check looks for them. Ray was given
    <storage>/group as its storage path and the name again, so they went to
    <storage>/group/group/one and a resume with other settings went unchecked."""
    import shutil

    from clipray.config import ConfigError
    from train.driver import run

    monkeypatch.chdir(finished_run["here"])  # its paths are relative to there
    args, first, out, storage = finished_run["args"], finished_run["final"], finished_run["out"], finished_run["storage"]
    n_train = read_manifest(synth_small["manifest"], split="train").num_rows
    assert first["total_steps"] == 3 * (n_train // 8) and first["epoch"] == 3
    assert (out / "result.json").exists() and any(p.name.startswith("checkpoint_") for p in out.iterdir())
    assert not (storage / "group" / "group").exists()
    history = (out / "metrics.csv").read_text()
    with pytest.raises(ConfigError, match=r"data\.batch_size: 4 -> 2"):
        run(load_config(DEMO, args + ["data.batch_size=2"]), quiet_ray=True, table=False)
    with pytest.raises(ConfigError, match=r"model"):
        run(load_config(DEMO, args + ["model.head=seqTransf"]), quiet_ray=True, table=False)
    # the checkpoint's optimiser and schedule bring back lr 1e-3: a new rate was ignored silently
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 -> 0\.002"):
        run(load_config(DEMO, args + ["optim.lr=2e-3"]), quiet_ray=True, table=False)
    with pytest.raises(ConfigError, match=r"optim\.warmup_ratio: 0\.1 -> 0\.5"):
        run(load_config(DEMO, args + ["optim.warmup_ratio=0.5"]), quiet_ray=True, table=False)
    # DeepSpeed keeps a bf16 run's optimiser state in other files and keys: the fp32 checkpoint
    # failed to load in every worker (KeyError 'dynamic_loss_scale' at ZeRO-0) once Ray had started
    with pytest.raises(ConfigError, match=r"train\.precision: 'fp32' -> 'bf16'"):
        run(load_config(DEMO, args + ["train.precision=bf16"]), quiet_ray=True, table=False)
    # the manifest copied elsewhere (the same files): not named among the settings that differ
    copy = tmp_path / "synth-copy"
    shutil.copytree(Path(synth_small["manifest"]).parent, copy)
    moved = overrides(str(copy / Path(synth_small["manifest"]).name), storage, "group/one", **finished_run["extra"])
    with pytest.raises(ConfigError, match=r"other settings \(optim\.lr: 0\.001 -> 0\.002\); resuming"):
        run(load_config(DEMO, moved + ["optim.lr=2e-3"]), quiet_ray=True, table=False)
    assert (out / "metrics.csv").read_text() == history
    # the same command again: the finished run's result, from result.json, before Ray starts
    # (it resumed the last checkpoint, trained nothing and wrote the outputs again)
    with monkeypatch.context() as m:
        m.setattr("clipray.runtime.init_ray", lambda *a, **k: pytest.fail("Ray started"))
        assert run(load_config(DEMO, args), quiet_ray=True, table=False) == first
    assert f"[driver] {out} has finished training; its result:" in capsys.readouterr().out
    # Ray Train's record of the checkpoints cut (a kill while Ray rewrote it): every later start
    # ended in a long traceback, CheckpointManagerInitializationError; now one line and the way out.
    # (A run stopped before its end, which has no result.json yet.) Both files are put back after:
    # the run is shared.
    snapshot = out / "checkpoint_manager_snapshot.json"
    kept = {p: p.read_bytes() for p in (out / "result.json", snapshot)}
    try:
        (out / "result.json").unlink()
        snapshot.write_text("")
        with pytest.raises(ConfigError, match=rf"^{out}: Ray Train cannot resume this run from its record of the "
                                              r"checkpoints \(.+\); give a new train.run_name to start over$"):
            run(load_config(DEMO, args), quiet_ray=True, table=False)
    finally:
        for p, data in kept.items():
            p.write_bytes(data)


def test_a_run_named_with_a_slash_before_bd5de69_resumes_where_ray_kept_its_checkpoints(tmp_path, capsys):
    """Before bd5de69 a run named group/one had Ray's checkpoints (and its record of them) in
    <storage>/group/group/one. Stopped then and re-run now, Ray was pointed at <storage>/group/one,
    found nothing and trained again from step 0, the old checkpoints left aside without a word.
    Ray is now given the old place for such a run, and only for it."""
    from train.driver import RAY_CHECKPOINT_RECORD, ray_storage, run_dir

    cfg = load_config(DEMO, overrides(str(tmp_path / "m.parquet"), tmp_path, "group/one"))
    out = run_dir(cfg)
    assert ray_storage(cfg, out) == str(tmp_path)  # a new run: the storage root
    legacy = tmp_path / "group" / "group" / "one"
    legacy.mkdir(parents=True)
    (legacy / RAY_CHECKPOINT_RECORD).write_text("{}")
    assert ray_storage(cfg, out) == str(tmp_path / "group")  # Ray's run folder: <it>/group/one = legacy
    assert f"resuming from {tmp_path / 'group'}/group/one" in capsys.readouterr().out
    Path(out).mkdir(parents=True)
    (Path(out) / RAY_CHECKPOINT_RECORD).write_text("{}")  # a run of this version's: its own folder
    assert ray_storage(cfg, out) == str(tmp_path)
    plain = load_config(DEMO, overrides(str(tmp_path / "m.parquet"), tmp_path, "one"))
    assert ray_storage(plain, run_dir(plain)) == str(tmp_path)


@pytest.mark.parametrize("name", ["exp [2]", "exp::2"])
def test_resume_check_finds_the_checkpoints_of_a_run_folder_named_like_a_glob(tmp_path, name):
    """"exp::2": fsspec read '::' as a chain of filesystems and took the run folder for a file
    "exp" beside it: a re-run with other settings was not refused, and its resume key,
    config.yaml, metrics.csv, curves and export were written over one another there."""
    import json
    import re

    from clipray.config import ConfigError, load_config
    from train.driver import RAY_CHECKPOINT_RECORD, RESUME_KEY, _write_outputs, check_resume, resume_key

    out = tmp_path / name
    (out / "checkpoint_000001").mkdir(parents=True)
    (out / RAY_CHECKPOINT_RECORD).write_text("{}")
    cfg = load_config(None, ["data.batch_size=8"])
    (out / RESUME_KEY).write_text(json.dumps(resume_key(cfg, 5)))
    check_resume(str(out), resume_key(cfg, 5))  # the same settings: resumes
    # the registered model's own settings written out are the same model: this was refused as
    # "other settings (model: {... 'head': None ...} -> {... 'head': 'meanP' ...})"
    check_resume(str(out), resume_key(load_config(None, ["data.batch_size=8", "model.head=meanP",
                                                         "model.linear_patch=2d", "model.tuning=full"]), 5))
    with pytest.raises(ConfigError, match=r"other settings \(model: .*'head': None.* -> .*'head': 'seqTransf'"):
        check_resume(str(out), resume_key(load_config(None, ["data.batch_size=8", "model.head=seqTransf"]), 5))
    with pytest.raises(ConfigError, match=r"data.batch_size: 8 -> 4"):
        check_resume(str(out), resume_key(load_config(None, ["data.batch_size=4"]), 5))
    # a manifest with more training rows: said as what moved, not as an internal key
    with pytest.raises(ConfigError, match=r"\(steps per epoch \(training rows of data.manifest / global batch\): 5 -> 6\)"):
        check_resume(str(out), resume_key(cfg, 6))
    # a record cut by a write that stopped midway (in place, before 068b29e): a line, not
    # json's JSONDecodeError traceback out of every later run
    good = (out / RESUME_KEY).read_text()
    for cut in (good[:100], "[1, 2]", b"\xff"):
        (out / RESUME_KEY).write_bytes(cut if isinstance(cut, bytes) else cut.encode())
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(out / RESUME_KEY))}, the record of the settings "
                                              r"this run's checkpoints were trained with, is not readable"):
            check_resume(str(out), resume_key(cfg, 5))
    (out / RESUME_KEY).write_text(good)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    _write_outputs(str(out), cfg, [{"epoch": 1, "loss": 1.0}], tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", name])
    assert {"config.yaml", "metrics.csv", "curves.png"} <= {p.name for p in out.iterdir()}
    assert (out / "export" / "config.json").read_text() == "{}"


def test_train_and_edit_refuse_each_others_checkpoints_and_other_frames(tmp_path):
    """`clipray train` on a `clipray edit` run's name (or the other way) resumed its checkpoints
    as its own: "resumed from step 10", nothing trained, and the other's metrics and export came
    out as its own, exit 0 (the edit record names no manifest, so none was compared). A resume
    on frames sampled otherwise, or captions cut at another length, was taken too. Records from
    before the command was kept are told apart by the manifest only a train run records."""
    import re

    from clipray.config import ConfigError, load_config
    from train.driver import RAY_CHECKPOINT_RECORD, RESUME_KEY, check_resume, resume_key

    cfg = load_config(None, ["data.manifest=m.parquet"])
    edit = resume_key(cfg, 0, stop_epoch=2, command="clipray edit")
    for name, made, other in (("t", resume_key(cfg, 5), edit), ("e", edit, resume_key(cfg, 5))):
        out = tmp_path / name
        out.mkdir()
        (out / RAY_CHECKPOINT_RECORD).write_text("{}")
        (out / RESUME_KEY).write_text(json.dumps(made))
        check_resume(str(out), made)
        was, now = ("clipray train", "clipray edit") if name == "t" else ("clipray edit", "clipray train")
        with pytest.raises(ConfigError, match=f"holds checkpoints of a `{was}` run, which `{now}` would take for its own"):
            check_resume(str(out), other)
        old = {k: v for k, v in made.items() if k not in ("command", "data.video", "data.max_words")}
        (out / RESUME_KEY).write_text(json.dumps(old))  # a record from before these keys
        check_resume(str(out), made)
        with pytest.raises(ConfigError, match=f"a `{was}` run"):
            check_resume(str(out), other)
    (tmp_path / "t" / RESUME_KEY).write_text(json.dumps(resume_key(cfg, 5)))
    for change, said in (("data.video.max_frames=4", "data.video: "), ("data.video.fps=2", "data.video: "),
                         ("data.video.slice=head", "data.video: "), ("data.max_words=16", "data.max_words: 32 -> 16")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            check_resume(str(tmp_path / "t"), resume_key(load_config(None, ["data.manifest=m.parquet", change]), 5))
    # how the files are read may change: the same frames
    check_resume(str(tmp_path / "t"), resume_key(load_config(None, ["data.manifest=m.parquet", "data.video.backend=pyav",
                                                                    "data.video.timeout_s=5"]), 5))


def test_a_resume_compares_the_frame_size_training_used_not_the_configs(synth_small, tmp_path, monkeypatch):
    """data.video.size is the model's whatever the config says (`model_io`): the demo's
    test_meanP decodes at 32. `clipray train` recorded the config's value in resume_key.json, so
    a run re-run with data.video.size=64 was refused ("other settings (data.video: {... 'size':
    224} -> {... 'size': 64})") though it trained, and would train, at 32. The key holds the
    size training used; an older key's recorded size (the config's) is not held against a
    resume, since the model, compared on its own, sets it. Other frames are still refused. The
    fake checkpoint record stops each accepted resume at the checkpoint's check, before Ray."""
    import dataclasses

    from clipray.config import ConfigError
    from clipray.manifest import manifest_signature
    from train.driver import RAY_CHECKPOINT_RECORD, RESUME_KEY, model_io, resume_key, run

    args = overrides(synth_small["manifest"], tmp_path, "t2", **{"train.epochs": 6})
    cfg = load_config(DEMO, args)
    assert cfg.data.video.size == 224 and model_io(cfg).data.video.size == 32
    out = tmp_path / "t2"
    out.mkdir()
    record = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_x"}}
    (out / RAY_CHECKPOINT_RECORD).write_text(json.dumps(record))
    files = manifest_signature(cfg.data.manifest, parquet=True)
    old = resume_key(cfg, 2, 0, files)  # as `clipray train` recorded it: the config's 224
    old.pop("key_version", None)
    trained = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, video=model_io(cfg).data.video))
    new = resume_key(trained, 2, 0, files)
    assert new["data.video"]["size"] == 32
    resumed = rf"^{out}/checkpoint_x, the checkpoint this run resumes from, lacks deepspeed and state.json "
    for saved in (old, new):
        (out / RESUME_KEY).write_text(json.dumps(saved))
        for size in (224, 64):
            with pytest.raises(ConfigError, match=resumed):
                run(load_config(DEMO, args + [f"data.video.size={size}"]), quiet_ray=True)
        with pytest.raises(ConfigError) as e:
            run(load_config(DEMO, args + ["data.video.fps=4", "data.video.size=64"]), quiet_ray=True)
        assert str(e.value) == (
            f"{out} holds checkpoints of a run with other settings (data.video: {{'fps': 2.0, 'max_frames': 4, "
            "'slice': 'uniform', 'size': 32} -> {'fps': 4.0, 'max_frames': 4, 'slice': 'uniform', 'size': 32}); "
            "resuming would mix the two: use a new train.run_name, or the run's settings")
    # a new run records the size it trains at (stopped before Ray, once it has)
    (out / RAY_CHECKPOINT_RECORD).unlink()
    (out / RESUME_KEY).unlink()

    def stop(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr("train.driver.check_latest_checkpoint", stop)
    with pytest.raises(KeyboardInterrupt):
        run(load_config(DEMO, args + ["data.video.size=64"]), quiet_ray=True)
    assert json.loads((out / RESUME_KEY).read_text()) == new


def test_a_finished_run_run_again_prints_its_result_without_starting_ray(synth_small, tmp_path, monkeypatch,
                                                                        capsys):
    """The same `clipray train` again on a finished run started Ray (43 s on the demo), logged
    "[train] resumed from step 2 (epoch 2)", trained nothing and printed its table again, where
    `clipray edit` answers at once "has finished every round; its result:". Train does the same
    now: its result.json says every epoch trained, under the same settings (checked first). A
    run short of its end goes on to Ray. (Here Ray is never started: init_ray stops the call.)"""
    from train.driver import RAY_CHECKPOINT_RECORD, run

    class RayStarted(Exception):
        pass

    def no_ray(*_, **__):
        raise RayStarted

    monkeypatch.setattr("clipray.runtime.init_ray", no_ray)
    args = overrides(synth_small["manifest"], tmp_path, "t1")  # 18 training clips, 2 steps an epoch
    out = tmp_path / "t1"
    with pytest.raises(RayStarted):
        run(load_config(DEMO, args))  # records the run's settings
    (out / RAY_CHECKPOINT_RECORD).write_text("{}")
    metrics = {"t2v_r1": 50.0, "t2v_r5": 100.0, "t2v_r10": 100.0, "t2v_mdr": 1.5, "t2v_mnr": 1.8,
               "v2t_r1": 33.3, "v2t_r5": 83.3, "v2t_r10": 100.0, "v2t_mdr": 2.0, "v2t_mnr": 2.2}
    result = {"epoch": 2, "step": 4, "loss": 1.25, "lr": 1e-4, **metrics, "num_test_videos": 6, "total_steps": 4,
              "seconds": 40.4, "train_seconds": 12.6, "planned_steps": 4, "skipped_clips": 0, "eval_split": "test"}
    (out / "result.json").write_text(json.dumps(result))
    capsys.readouterr()
    assert run(load_config(DEMO, args)) == result
    assert capsys.readouterr().out == (
        f"[driver] {out} has finished training; its result:\n"
        "finished: 4 steps, 13s of training epochs (40s in this call), 6 test clips (chance R@1 16.7%)\n"
        "                R@1    R@5   R@10    MdR     MnR\n"
        "text->video    50.0  100.0  100.0    1.5     1.8\n"
        "video->text    33.3   83.3  100.0    2.0     2.2\n"
        "skipped clips: 0\n"
        f"run directory: {out}  (result.json, metrics.csv, curves.png, export/, skip_report.jsonl)\n")
    # a caller that prints no table (clipray bench) gets the line alone
    assert run(load_config(DEMO, args), table=False) == result
    assert capsys.readouterr().out == f"[driver] {out} has finished training; its result:\n"
    # stopped after its first epoch, or a count edited by hand (a TypeError before): it goes on
    for short in (dict(result, epoch=1, step=2, total_steps=2), dict(result, total_steps="4")):
        (out / "result.json").write_text(json.dumps(short))
        with pytest.raises(RayStarted):
            run(load_config(DEMO, args))
        assert "has finished" not in capsys.readouterr().out
    # a clip-editing round's call (stop_epoch) whose training reached its epoch, stopped before
    # the round was recorded: Ray Train was started again to resume there and train nothing
    first = dict(result, epoch=1, step=2, total_steps=2)
    (out / "result.json").write_text(json.dumps(first))
    assert run(load_config(DEMO, args), stop_epoch=1, table=False) == first
    assert capsys.readouterr().out == f"[driver] {out} has finished epoch 1; its result: test t2v R@1 50.0, " \
                                      "read from result.json\n"
    with pytest.raises(RayStarted):  # epoch 1 of the 2 this call is to reach: it goes on
        run(load_config(DEMO, args), stop_epoch=2, table=False)
    assert "has finished" not in capsys.readouterr().out


def test_the_results_tables_skipped_clips_line_ends_with_its_last_word():
    """"skipped clips: 0 " ended in a space where no clip was skipped. (No Ray.)"""
    from train.driver import _table

    m = {"total_steps": 4, "train_seconds": 12.6, "seconds": 40.4, "num_test_videos": 6, "eval_split": "test",
         **{f"{d}_{k}": 1.0 for d in ("t2v", "v2t") for k in ("r1", "r5", "r10", "mdr", "mnr")}}
    lines = _table(m, "/runs/t", {"skipped": 0, "by_reason": {}}).splitlines()
    assert "skipped clips: 0" in lines and all(line == line.rstrip() for line in lines)
    lines = _table(m, "/runs/t", {"skipped": 3, "by_reason": {"missing file": 3}}).splitlines()
    assert "skipped clips: 3 {'missing file': 3}" in lines
    # the windows cut at their video's end are no skips: a line of their own, after the skips'
    lines = _table(m, "/runs/t", {"skipped": 3, "by_reason": {"missing file": 3}, "cut": 2,
                                  "cut_report": "/runs/t/cut_report.jsonl"}).splitlines()
    at = lines.index("skipped clips: 3 {'missing file': 3}")
    assert lines[at + 1] == "2 clips cut at their video's end (see /runs/t/cut_report.jsonl)"


def test_a_fresh_start_drops_the_skips_of_an_attempt_that_left_no_checkpoint(tmp_path):
    """A run that failed before its first checkpoint (a wrong data.video_root: every clip missing)
    left its skip files, and the same command, fixed, reported them as its own: "skipped clips:
    18", every clip having trained. A run with checkpoints keeps its skips (the report spans
    every epoch, over resumes)."""
    from clipray.config import load_config
    from clipray.pipeline import SKIP_DIR, collect_skips
    from train.driver import RAY_CHECKPOINT_RECORD, check_resume, resume_key

    key = resume_key(load_config(None, ["data.manifest=m.parquet"]), 5)
    out = tmp_path / "run"
    (out / SKIP_DIR).mkdir(parents=True)
    line = '{"row_id": 0, "video_id": "v", "path": "/v.mp4", "reason": "missing file"}\n'
    (out / SKIP_DIR / "decode-000001.jsonl").write_text(line)
    check_resume(str(out), key)  # no checkpoint: a fresh start
    assert collect_skips(str(out))["skipped"] == 0
    (out / SKIP_DIR).mkdir()
    (out / SKIP_DIR / "decode-000001.jsonl").write_text(line)
    (out / RAY_CHECKPOINT_RECORD).write_text("{}")
    check_resume(str(out), key)  # a resume: its skips are the run's
    assert collect_skips(str(out))["skipped"] == 1


def test_ctrl_c_before_the_first_checkpoint_says_the_command_starts_again_not_that_checkpoints_stay(tmp_path):
    """Stopped by Ctrl-C before its first checkpoint, a run said "its checkpoints stay in <run>"
    of none; with Ray Train's record of a checkpoint it still says how to resume."""
    from train.driver import RAY_CHECKPOINT_RECORD, interrupted_line

    out = tmp_path / "run"
    out.mkdir()
    assert interrupted_line(str(out)) == ("\n[driver] training interrupted before its first checkpoint: the same "
                                          "command (same train.run_name and train.storage_path) starts it again")
    (out / RAY_CHECKPOINT_RECORD).write_text("{}")
    assert interrupted_line(str(out)) == (f"\n[driver] training interrupted; its checkpoints stay in {out}: re-run "
                                          "the same command (same train.run_name and train.storage_path) to "
                                          "resume from the latest")


def test_an_epochs_skips_are_counted_from_the_skip_files_named_since_it_began(tmp_path):
    """The loop counted an epoch's skips (for the error of an epoch without a batch) by listing
    the run's skip folder at every epoch's start on every worker: up to millions of objects on a
    long run in object storage. Skip files are named from their time of writing, and the count
    takes those named since the epoch began, each clip once; an older run's name (its process
    id first) reads as an early time."""
    from clipray.pipeline import SKIP_DIR, ClipDecoder, skipped_since

    skips = tmp_path / "run" / SKIP_DIR
    skips.mkdir(parents=True)
    line = lambda row: json.dumps({"row_id": row, "video_id": "v", "path": "/v.mp4", "reason": "missing file"}) + "\n"
    (skips / "4242-1a2b3c4d-000001.jsonl").write_text(line(0) + line(1))  # an older run's name: pid first
    decoder = ClipDecoder.__new__(ClipDecoder)  # its writer alone
    decoder.skip_dir, decoder.name, decoder.calls = str(tmp_path / "run"), "77-cd", 0
    decoder._report([json.loads(line(2))])
    began = time.time_ns()
    assert skipped_since(str(tmp_path / "run"), began) == 0
    decoder._report([json.loads(line(3)), json.loads(line(4))])
    decoder._report([json.loads(line(3))])  # a row skipped again (a re-executed block) counts once
    assert skipped_since(str(tmp_path / "run"), began) == 2
    assert skipped_since(str(tmp_path / "run"), 0) == 5  # every file, the older name's (as time 4242 ns) too
    assert sorted(int(p.name.split("-")[0]) >= began for p in skips.iterdir()) == [False, False, True, True]


def test_a_latest_checkpoint_missing_its_files_is_said_before_ray_starts(tmp_path):
    """A checkpoint deleted or copied in part under Ray Train's record: every worker failed in
    DeepSpeed's bare `assert len(self.ckpt_list) > 0`, naming no file, once Ray had started."""
    import json

    from clipray.config import ConfigError
    from train.driver import RAY_CHECKPOINT_RECORD, check_latest_checkpoint

    out = tmp_path / "run"
    for name in ("checkpoint_a", "checkpoint_b"):
        (out / name / "deepspeed").mkdir(parents=True)
        (out / name / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"x")
        (out / name / "state.json").write_text("{}")
    record = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_b"}}
    (out / RAY_CHECKPOINT_RECORD).write_text(json.dumps(record))
    check_latest_checkpoint(str(out), ("deepspeed", "state.json"))
    (out / "checkpoint_b" / "deepspeed" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ConfigError, match=rf"^{out}/checkpoint_b, the checkpoint this run resumes from, lacks "
                                          r"deepspeed \(deleted, or copied in part\)"):
        check_latest_checkpoint(str(out), ("deepspeed", "state.json"))
    (out / "checkpoint_b" / "deepspeed").rmdir()
    (out / "checkpoint_b" / "state.json").unlink()
    with pytest.raises(ConfigError, match="lacks deepspeed and state.json"):
        check_latest_checkpoint(str(out), ("deepspeed", "state.json"))
    (out / RAY_CHECKPOINT_RECORD).write_text("{cut")  # Ray Train's own refusal says so (`_run`)
    check_latest_checkpoint(str(out), ("deepspeed", "state.json"))


def test_a_run_resumes_on_its_manifest_moved_or_copied_to_another_path(tmp_path, capsys):
    """resume_key.json keeps data.manifest as an absolute path: the project (manifest and run
    folder) moved or copied to another disk, or a manifest copied to another bucket, and the same
    command was refused ('data.manifest: /old/... -> /new/...'), with no way to give the run's
    settings (the old path is gone). The manifest's files (names, sizes, footers) now identify
    it too; another manifest with as many training rows, even of the same size, is still refused."""
    import json
    import shutil

    from clipray.config import ConfigError, load_config
    from clipray.manifest import manifest_signature, write_manifest
    from train.driver import RAY_CHECKPOINT_RECORD, RESUME_KEY, check_resume, resume_key

    def rows(caption):
        return [{"video_id": f"v{i}", "path": f"v{i}.mp4", "start": None, "end": None,
                 "caption": f"{caption} {i}", "split": "train"} for i in range(4)]

    def key(manifest):
        cfg = load_config(None, [f"data.manifest={manifest}"])
        return resume_key(cfg, 2, 0, manifest_signature(cfg.data.manifest))

    for shards in (0, 2):  # one file, and a folder of shards
        base = tmp_path / f"shards{shards}"
        old = base / "project" / ("m.parquet" if not shards else "m")
        write_manifest(rows("a dog runs"), old, **({"rows_per_shard": shards} if shards else {}))
        out = base / "run"
        (out / "checkpoint_000001").mkdir(parents=True)
        check_resume(str(out), key(old))  # the first run records its key
        (out / RAY_CHECKPOINT_RECORD).write_text("{}")
        shutil.move(base / "project", base / "moved")
        new = base / "moved" / old.name
        check_resume(str(out), key(new))  # resumes
        assert f"data.manifest: the run's {old} is now {new} (the same files): resuming" in capsys.readouterr().out
        assert json.loads((out / RESUME_KEY).read_text())["data.manifest"] == str(new)
        check_resume(str(out), key(new))  # and again, now at its new path
        other = base / "other" / old.name
        write_manifest(rows("a dog sits"), other, **({"rows_per_shard": shards} if shards else {}))
        assert [s[:2] for s in manifest_signature(str(other))] == [s[:2] for s in manifest_signature(str(new))]
        with pytest.raises(ConfigError, match=rf"data.manifest: '{new}' -> '{other}'"):
            check_resume(str(out), key(other))


@pytest.mark.parametrize("stream", [False, True])
def test_a_resume_on_its_manifest_written_again_at_its_path_is_refused(tmp_path, stream):
    """A manifest written again at the run's path (`clipray data prepare --out` it: other
    captions, as many training rows) was resumed on without a word: the files were compared
    only to find the manifest moved, and a streamed run's (data.shard_stream) not recorded. The
    same files written again resume; a streamed manifest moved is still refused (its
    checkpoints name its shards by path)."""
    import shutil

    from clipray.config import ConfigError, load_config
    from clipray.manifest import manifest_signature, write_manifest
    from train.driver import RAY_CHECKPOINT_RECORD, check_resume, resume_key

    def rows(caption):
        return [{"video_id": f"v{i}", "path": f"v{i}.mp4", "start": None, "end": None,
                 "caption": f"{caption} {i}", "split": "train"} for i in range(4)]

    def key(manifest):
        cfg = load_config(None, [f"data.manifest={manifest}", f"data.shard_stream={stream}"])
        return resume_key(cfg, 0 if stream else 2, 0, manifest_signature(cfg.data.manifest))

    m, out = tmp_path / "m", tmp_path / "run"
    write_manifest(rows("a dog runs"), m, rows_per_shard=2)
    (out / "checkpoint_000001").mkdir(parents=True)
    check_resume(str(out), key(m))
    (out / RAY_CHECKPOINT_RECORD).write_text("{}")
    write_manifest(rows("a dog runs"), m, rows_per_shard=2)
    check_resume(str(out), key(m))  # the same rows written again: the same files
    write_manifest(rows("a cat sits"), m, rows_per_shard=2)
    with pytest.raises(ConfigError, match=rf"\(data.manifest: {m} holds other files than the checkpoints' "
                                          r"\(written again since\)\)"):
        check_resume(str(out), key(m))
    if stream:
        write_manifest(rows("a dog runs"), m, rows_per_shard=2)
        shutil.copytree(m, tmp_path / "moved")
        with pytest.raises(ConfigError, match=rf"data.manifest: '{m}' -> '{tmp_path / 'moved'}'"):
            check_resume(str(out), key(tmp_path / "moved"))


def test_a_manifest_written_again_while_a_run_reads_it_is_found_changed(tmp_path):
    """Ray Data reads the files a run listed when it began, each epoch again: a manifest written
    again meanwhile (`clipray data prepare --out` it) had the later epochs train on its new files
    beside the old, without a word, or fail on a removed shard's FileNotFoundError traceback. The
    workers (before reading and before each checkpoint) and the driver (on a failed run) compare
    its files with those the run began with; a change is one line naming the manifest."""
    from clipray.manifest import PARTIAL, manifest_signature, write_manifest
    from train.driver import changed_manifests, manifest_changed

    def rows(caption):
        return [{"video_id": f"v{i}", "path": f"v{i}.mp4", "start": None, "end": None,
                 "caption": f"{caption} {i}", "split": "train"} for i in range(4)]

    m, one = tmp_path / "m", tmp_path / "one.parquet"
    write_manifest(rows("a dog runs"), m, rows_per_shard=1)
    write_manifest(rows("a dog runs"), one)
    watched = {str(m): manifest_signature(str(m)), str(one): manifest_signature(str(one))}
    write_manifest(rows("a dog runs"), m, rows_per_shard=1)  # the same rows again: the same files
    assert changed_manifests(watched) == []
    write_manifest(rows("a cat sits"), m, rows_per_shard=1)  # the same shard names, other rows
    assert changed_manifests(watched) == [str(m)]
    write_manifest(rows("a dog runs"), m, rows_per_shard=1)
    (m / f"part-00004.parquet{PARTIAL}").write_bytes(b"")  # being written now
    assert changed_manifests(watched) == [str(m)]
    (m / f"part-00004.parquet{PARTIAL}").unlink()
    write_manifest(rows("a dog runs"), m, rows_per_shard=2)  # fewer shards, the last ones removed
    for p in sorted(m.iterdir())[2:]:
        p.unlink()
    one.unlink()
    assert changed_manifests(watched) == [str(m), str(one)]
    said = str(manifest_changed([str(m)]))
    assert said.startswith(f"{m}: the manifest changed while this run read it") and "\n" not in said


def test_a_manifest_that_cannot_be_read_now_is_not_said_changed(tmp_path, monkeypatch):
    """A store that stops answering, or a shard that cannot be read now (its permission taken
    away), was taken for a manifest written again: a run that failed on it ended in "the
    manifest changed while this run read it ... under a new train.run_name", advice to drop the
    run's checkpoints, in place of the workers' own error; and rank 0's check before a
    checkpoint failed the segment on it. Such a manifest is not known to have changed; one
    removed (a shard gone, FileNotFoundError) still is."""
    import clipray.manifest
    from clipray.manifest import manifest_signature, write_manifest
    from train import driver

    m = tmp_path / "m"
    write_manifest([{"video_id": f"v{i}", "path": f"v{i}.mp4", "caption": f"a dog runs {i}", "split": "train"}
                    for i in range(4)], m, rows_per_shard=2)
    watched = {str(m): manifest_signature(str(m))}
    monkeypatch.setattr(driver, "_confirmed", {}, raising=False)
    sign = clipray.manifest.file_signature

    def unreadable(error):
        def signature(fs, f, *a):
            if f.endswith("part-00001.parquet"):
                raise error
            return sign(fs, f, *a)
        return signature

    monkeypatch.setattr(clipray.manifest, "file_signature", unreadable(OSError("AWS Error ACCESS_DENIED during "
                                                                               "GetObject operation")))
    assert driver.changed_manifests(watched) == []
    monkeypatch.setattr(clipray.manifest, "file_signature", unreadable(FileNotFoundError("part-00001.parquet")))
    assert driver.changed_manifests(watched) == [str(m)]
    monkeypatch.setattr(clipray.manifest, "file_signature", sign)

    def not_answering(path):
        raise OSError("When getting information for key 'm' in bucket 'b': AWS Error NETWORK_CONNECTION")

    monkeypatch.setattr(driver, "manifest_listing", not_answering)
    assert driver.changed_manifests(watched) == []


def test_a_manifest_listed_as_it_was_found_is_not_read_again(tmp_path, monkeypatch):
    """Rank 0 checks the run's manifests before reading and before every checkpoint while the
    other workers wait, and signing a manifest reads both ends of each file: hundreds of shards
    in object storage, every time. A manifest listed as this process last found it (the same
    files, sizes and times) is not read again. Any other listing is read, and judged by its
    files; so is a listing whose newest file is under 2 s old (object stores keep whole
    seconds: a write of the same sizes within that second would list the same)."""
    import clipray.manifest
    from clipray.manifest import manifest_signature, write_manifest
    from train import driver

    def rows(caption):
        return [{"video_id": f"v{i}", "path": f"v{i}.mp4", "start": None, "end": None,
                 "caption": f"{caption} {i}", "split": "train"} for i in range(4)]

    def written_ago(seconds):
        for p in m.iterdir():
            os.utime(p, (time.time() - seconds,) * 2)

    m = tmp_path / "m"
    write_manifest(rows("a dog runs"), m, rows_per_shard=1)  # 4 shards
    written_ago(60)
    watched = {str(m): manifest_signature(str(m))}
    reads = []
    sign = clipray.manifest.file_signature
    monkeypatch.setattr(clipray.manifest, "file_signature", lambda fs, f, *a: reads.append(f) or sign(fs, f, *a))
    monkeypatch.setattr(driver, "_confirmed", {}, raising=False)  # this process has checked nothing yet

    def check():
        before = len(reads)
        return driver.changed_manifests(watched), len(reads) - before

    assert check() == ([], 4)
    assert check() == ([], 0)  # listed as found: not read
    written_ago(50)  # the same files, other times (a copy over them): read, and unchanged
    assert check() == ([], 4)
    assert check() == ([], 0)
    write_manifest(rows("a dog runs"), m, rows_per_shard=1)  # the same files, written just now
    assert check() == ([], 4)
    assert check() == ([], 4)  # under 2 s old: read every time
    written_ago(40)
    assert check() == ([], 4)
    assert check() == ([], 0)
    write_manifest(rows("a cat sits"), m, rows_per_shard=1)  # other rows: read, and changed
    written_ago(30)
    assert check() == ([str(m)], 4)
    assert check() == ([str(m)], 4)  # a changed manifest is never taken as found


def test_a_run_folder_file_rewritten_on_a_full_disk_keeps_the_old_one(tmp_path, file_size_limit):
    """resume_key.json (rewritten when a run resumes on its manifest or weights moved), and
    result.json, metrics.csv, config.yaml, were written in place: a write that failed midway (a
    full disk; here a file size limit, EFBIG) left the file cut, and every later run of the
    command failed on the cut record's JSONDecodeError traceback. The old file now stays whole,
    no `.partial` is left, and the error names the file."""
    import json

    out = tmp_path / "run"
    out.mkdir()
    old = json.dumps({"data.batch_size": 8}, indent=1)
    (out / "resume_key.json").write_text(old)
    res = file_size_limit(4096, "put_text(sys.argv[1], json.dumps({'x': 'y' * 100_000}))", out / "resume_key.json",
                          setup="import json\nfrom train.driver import put_text\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(out / "resume_key.json"), "27"]  # EFBIG, named
    assert (out / "resume_key.json").read_text() == old
    assert sorted(p.name for p in out.iterdir()) == ["resume_key.json"]


def test_curves_drawn_again_on_a_full_disk_keep_the_last_ones(tmp_path, file_size_limit):
    """curves.png was opened in place, before the plot was drawn: a full disk midway (here a
    file size limit, EFBIG) in a continued run (clip editing's rounds, a resume) left the last
    call's curves cut. It is now written whole or not at all, as the run's other files."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "curves.png").write_bytes(b"old curves")
    res = file_size_limit(
        8192, "_write_outputs(sys.argv[1], load_config(None, []), [{'epoch': 1, 'loss': 1.0}], Path(sys.argv[2]))",
        out, tmp_path, setup="from pathlib import Path\nfrom clipray.config import load_config\n"
                             "from train.driver import _write_outputs\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(out / "curves.png"), "27"]  # EFBIG, named
    assert (out / "curves.png").read_bytes() == b"old curves"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "curves.png", "metrics.csv"]


def test_an_export_copied_over_the_last_one_on_a_full_disk_keeps_the_last_one(tmp_path, file_size_limit):
    """A run continued (clip editing's rounds, a resumed run) copies its export over the last
    call's: copied in place, a full disk midway (here a file size limit, EFBIG) left the
    weights cut beside the old config.json, an export that no longer loaded, the old one gone.
    Each file is now moved in whole or not at all, and the error names it."""

    out, src = tmp_path / "run", tmp_path / "new-export"
    (out / "export").mkdir(parents=True)
    (out / "export" / "model.safetensors").write_bytes(b"old weights")
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"w" * 200_000)
    res = file_size_limit(
        100_000, "_write_outputs(sys.argv[1], load_config(None, []), [{'epoch': 1, 'loss': 1.0}], Path(sys.argv[2]))",
        out, src, setup="from pathlib import Path\nfrom clipray.config import load_config\n"
                        "from train.driver import _write_outputs\n")
    assert res.returncode == 0, res.stderr
    assert (out / "export" / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in (out / "export").iterdir()) == ["model.safetensors"]
    assert res.stdout.split() == [str(out / "export" / "model.safetensors"), "27"]


def test_run_outputs_written_to_an_object_store_that_drops_are_a_line_naming_the_file(tmp_path):
    """The run's outputs (result.json, metrics.csv, config.yaml, curves, the export) go to the
    run folder after every epoch has trained: an object store gone by then (its connection
    dropped, a permission taken away) ended the command in botocore's traceback. It is a line
    naming the file, and how to write it again."""
    import os
    import subprocess
    import sys

    from ports import free_ports

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_ports()[0]}", AWS_ACCESS_KEY_ID="x",  # nothing listens
               AWS_SECRET_ACCESS_KEY="y", AWS_EC2_METADATA_DISABLED="true", AWS_MAX_ATTEMPTS="1")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    script = ("import sys\n"
              "from pathlib import Path\n"
              "from clipray.config import ConfigError, load_config\n"
              "from train.driver import _write_outputs, put_text\n"
              "for write in (lambda: put_text('s3://clipray-gone/run/result.json', '{}'),\n"
              "              lambda: _write_outputs('s3://clipray-gone/run', load_config(None, []),\n"
              "                                     [{'epoch': 1, 'loss': 1.0}], Path(sys.argv[1]))):\n"
              "    try:\n"
              "        write()\n"
              "    except ConfigError as e:\n"
              "        print(e)\n")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "export")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2, res.stdout
    for line, name in zip(lines, ("result.json", "config.yaml")):
        assert line.startswith(f"s3://clipray-gone/run/{name}: cannot write it (EndpointConnectionError: "), line
        assert line.endswith("; run the same command again to write the run's outputs"), line


def _checkpointed_on_weights_then_moved(tmp_path):
    """A run folder with a checkpoint, begun on model.pretrained=<tmp>/a/w.pt, and that folder
    then moved to <tmp>/b: (the run folder, the weights' new path)."""
    import shutil

    from clipray.config import load_config
    from train.driver import RAY_CHECKPOINT_RECORD, check_resume, resume_key

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.pt").write_bytes(bytes(range(256)) * 1024)
    out = tmp_path / "run"
    (out / "checkpoint_000001").mkdir(parents=True)
    check_resume(str(out), resume_key(load_config(None, [f"model.pretrained={tmp_path / 'a' / 'w.pt'}"]), 5))
    (out / RAY_CHECKPOINT_RECORD).write_text("{}")
    shutil.move(tmp_path / "a", tmp_path / "b")
    return out, tmp_path / "b" / "w.pt"


def test_a_run_resumes_on_its_pretrained_weights_moved_to_another_path(tmp_path, capsys):
    """A local model.pretrained file (open_clip weights kept in the project) is recorded by its
    absolute path in resume_key.json's model: the project moved, and the run was refused
    ('model: {... 'pretrained': '/old/w.pt' ...} -> {...}'). Its size and hash identify it too;
    other weights at the new path, or another model setting, are still refused."""
    from clipray.config import ConfigError, load_config
    from train.driver import check_resume, resume_key

    out, weights = _checkpointed_on_weights_then_moved(tmp_path)
    check_resume(str(out), resume_key(load_config(None, [f"model.pretrained={weights}"]), 5))
    assert (f"model.pretrained: the run's {tmp_path / 'a' / 'w.pt'} is now {weights} (the same files): resuming"
            in capsys.readouterr().out)
    with pytest.raises(ConfigError, match=r"\(model: .*'head': None.* -> .*'head': 'seqTransf'"):
        check_resume(str(out), resume_key(load_config(None, [f"model.pretrained={weights}", "model.head=seqTransf"]), 5))
    other = tmp_path / "c" / "w.pt"
    other.parent.mkdir()
    other.write_bytes(bytes(range(255, -1, -1)) * 1024)  # as large, other bytes
    with pytest.raises(ConfigError, match=r"\(model: "):
        check_resume(str(out), resume_key(load_config(None, [f"model.pretrained={other}"]), 5))


def test_pretrained_weights_moved_are_the_same_with_the_models_own_head_spelled_out(tmp_path, capsys):
    """Each alone resumed: the weights moved, and model.head=meanP given on test_meanP (whose
    head is meanP, the same model as built). Together the run was refused ("model: {...
    'pretrained': '/a/w.pt', 'head': None ...} -> {... '/b/w.pt', 'head': 'meanP' ...}"): the
    move was recognised only where the model's other settings were written alike."""
    from clipray.config import ConfigError, load_config
    from train.driver import check_resume, resume_key

    out, weights = _checkpointed_on_weights_then_moved(tmp_path)
    check_resume(str(out), resume_key(load_config(None, [f"model.pretrained={weights}", "model.head=meanP"]), 5))
    assert (f"model.pretrained: the run's {tmp_path / 'a' / 'w.pt'} is now {weights} (the same files): resuming"
            in capsys.readouterr().out)
    # recorded anew at its new path; another head is still another model
    with pytest.raises(ConfigError, match=r"\(model: .*'head': 'meanP'.* -> .*'head': 'seqTransf'"):
        check_resume(str(out), resume_key(load_config(None, [f"model.pretrained={weights}", "model.head=seqTransf"]), 5))


def test_a_checkpoint_folder_ray_never_finished_does_not_hold_a_new_run_to_old_settings(tmp_path):
    """A run stopped while Ray wrote its first checkpoint leaves a checkpoint_* folder, and no
    record of it: Ray Train starts such a run afresh. The resume check counted the folder and
    refused a run with other settings; now it goes by Ray's record of finished checkpoints."""
    import json

    from clipray.config import ConfigError, load_config
    from train.driver import RAY_CHECKPOINT_RECORD, RESUME_KEY, check_resume, resume_key

    out = tmp_path / "cut"
    check_resume(str(out), resume_key(load_config(None, ["data.batch_size=8"]), 5))  # the first run
    (out / "checkpoint_2026-12-05_14-00-00.000000").mkdir()  # stopped while writing its checkpoint
    check_resume(str(out), resume_key(load_config(None, ["data.batch_size=4"]), 5))  # starts afresh
    assert json.loads((out / RESUME_KEY).read_text())["data.batch_size"] == 4  # recorded anew
    (out / RAY_CHECKPOINT_RECORD).write_text("{}")  # once Ray lists a checkpoint, the key holds
    with pytest.raises(ConfigError, match=r"data.batch_size: 4 -> 8"):
        check_resume(str(out), resume_key(load_config(None, ["data.batch_size=8"]), 5))


def test_resuming_on_cpu_a_run_checkpointed_on_gpu_is_refused_naming_the_precision(tmp_path):
    """train.precision=auto is bf16 on GPU workers and fp32 on CPU ones: the same config resumed
    with train.use_gpu=false would load a bf16 DeepSpeed checkpoint into an fp32 engine, which
    failed in every worker after Ray started (ZeRO-0: KeyError 'dynamic_loss_scale'; ZeRO-2: no
    bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt). Refused before, with what it resolved to."""
    from clipray.config import ConfigError, load_config
    from train.driver import RAY_CHECKPOINT_RECORD, check_resume, resume_key

    out = tmp_path / "gpu-run"
    (out / "checkpoint_000001").mkdir(parents=True)
    (out / RAY_CHECKPOINT_RECORD).write_text("{}")
    check_resume(str(out), resume_key(load_config(None, ["train.use_gpu=true"]), 5))  # records the key
    check_resume(str(out), resume_key(load_config(None, ["train.use_gpu=true", "train.precision=bf16"]), 5))
    with pytest.raises(ConfigError, match=r"train\.precision: 'bf16' -> 'fp32'"):
        check_resume(str(out), resume_key(load_config(None, ["train.use_gpu=false"]), 5))


def test_the_train_progress_rate_counts_this_epochs_steps_not_the_evaluations_before(monkeypatch, capsys):
    """Mid-run, `[train] ... clips/s` divided every clip trained by the whole run's time, the
    evaluations and checkpoints between epochs in it: a run that evaluated every epoch read
    slower than it trained. The rate is now this epoch's; the ETA keeps the whole run's pace
    (later epochs evaluate too). By hand, 8 clips a step: epoch 1, 10 steps in 10 s; 30 s of
    evaluation; epoch 2, 10 steps in 10 s: 8.0 clips/s, where the old line said 160/50 = 3.2."""
    import types

    import train.loop as loop

    now = [0.0]
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    progress = loop.Progress(total=40, start_step=0, clips_per_step=8)
    progress.epoch_start(0)
    now[0] = 10.0
    progress(1, 4, 10, 1.0, 1e-4, epoch_end=True)
    now[0] = 40.0  # evaluation and checkpoint
    progress.epoch_start(10)
    now[0] = 50.0
    progress(2, 4, 20, 0.5, 1e-4, epoch_end=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("lr 1.00e-04 8.0 clips/s ETA 00:30")
    # 20 steps left at the run's 2.5 s a step so far
    assert lines[1] == "[train] epoch 2/4 step 20/40 epoch mean loss 0.5000 lr 1.00e-04 8.0 clips/s ETA 00:50"


def test_an_evaluation_split_of_few_clips_is_said_to_measure_little(tmp_path):
    """Ranked among n clips, every caption finds its own within the top n: a test split of one
    clip gave R@1 100 whatever the model, and one of four R@5 and R@10 100, printed without a
    word. The driver says so in a line (refusing it would refuse clip editing on a small
    synthetic set, whose val split is one clip). Clips are keyed as evaluation keys them: a NaN
    time is the whole file, and captions of one clip are one clip. The same read counts the
    split's rows, which the driver refuses at 0."""
    from train.driver import read_eval_split

    def manifest(clips, name):
        rows = [{"video_id": v, "path": f"{v}.mp4", "start": s, "end": e, "caption": f"{v} {k}", "split": "test"}
                for v, s, e in clips for k in range(3)]
        write_manifest(rows + [{"video_id": "t", "path": "t.mp4", "caption": "train", "split": "train"}],
                       tmp_path / name)
        return str(tmp_path / name)

    one = manifest([("v", None, None)], "one.parquet")
    assert read_eval_split(one, "test") == (3, f"[driver] note: the 'test' split of {one} has 1 clip: every caption "
                                                "finds its own among them within the top 1, so t2v R@1/5/10 are 100 "
                                                "whatever the model")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipray.manifest import SCHEMA

    # NaN times as another tool writes them (ManifestWriter writes nulls): one clip, two spellings
    raw = [dict(row_id=i, video_id="v", path="v.mp4", start=s, end=s, caption=f"c{i}", split="test",
                timestamp=None, duration=None, group=None) for i, s in enumerate([None, float("nan")])]
    pq.write_table(pa.Table.from_pylist(raw, schema=pa.schema([f.with_nullable(True) for f in SCHEMA])),
                   tmp_path / "nan.parquet")
    rows, note = read_eval_split(str(tmp_path / "nan.parquet"), "test")
    assert rows == 2 and " has 1 clip: " in note
    four = manifest([("v", 0.0, 2.0), ("v", 2.0, 4.0), ("w", None, None), ("x", 1.0, 3.0)], "four.parquet")
    rows, note = read_eval_split(four, "test")
    assert rows == 12 and note.endswith("has 4 clips: every caption finds its own among them within the "
                                        "top 4, so t2v R@5/10 are 100 whatever the model")
    ten = manifest([(f"v{i}", None, None) for i in range(10)], "ten.parquet")
    assert read_eval_split(ten, "test") == (30, None) and read_eval_split(ten, "val") == (0, None)


def test_a_few_clips_note_counts_a_start_of_minus_zero_as_its_clip_at_zero(tmp_path):
    """Evaluation keys a clip as Python's (video_id, start, end), where -0.0 == 0.0; Arrow's
    group_by kept them apart: a clip captioned twice, its start written 0.0 and -0.0 (which the
    manifest's check accepts), was "2 clips: ... R@5/10 are 100" where evaluation ranked among
    one clip (num_test_videos 1, R@1 100 too)."""
    from train.driver import read_eval_split
    from train.evaluate import read_split

    rows = [{"video_id": "v", "path": "v.mp4", "start": s, "end": 2.0, "caption": f"a dog {i}", "split": "test"}
            for i, s in enumerate([0.0, -0.0])]
    write_manifest(rows + [{"video_id": "t", "path": "t.mp4", "caption": "train", "split": "train"}],
                   tmp_path / "m.parquet")
    manifest = str(tmp_path / "m.parquet")
    assert len(set(read_split(manifest, "test")[1])) == 1  # evaluation's clips
    rows, note = read_eval_split(manifest, "test")
    assert rows == 2 and note == (f"[driver] note: the 'test' split of {manifest} has 1 clip: every caption finds its "
                                  "own among them within the top 1, so t2v R@1/5/10 are 100 whatever the model")


def test_a_few_clips_note_claims_no_video_to_text_recall_the_metrics_do_not_give(tmp_path):
    """The note said "R@5/10 are 100 whatever the model" for a split of 2 clips, but only
    text-to-video is bounded by the clip count: video-to-text ranks a clip's best caption among
    the other clips' captions. 2 clips of 6 captions, clip 0's captions all scoring clip 1 above
    clip 1's own: clip 1 ranks its caption 7th, v2t R@5 50 (by hand), while t2v R@5 is 100."""
    from clipray.metrics import retrieval_metrics
    from train.driver import read_eval_split

    rows = [{"video_id": v, "path": f"{v}.mp4", "caption": f"{v} {k}", "split": "test"} for v in "vw" for k in range(6)]
    write_manifest(rows + [{"video_id": "t", "path": "t.mp4", "caption": "train", "split": "train"}],
                   tmp_path / "m.parquet")
    got = retrieval_metrics(torch.tensor([[0.9, 0.8]] * 6 + [[0.1, 0.5]] * 6), [0] * 6 + [1] * 6)
    assert (got["t2v_r5"], got["t2v_r10"], got["v2t_r5"], got["v2t_r10"]) == (100.0, 100.0, 50.0, 100.0)
    rows, note = read_eval_split(str(tmp_path / "m.parquet"), "test")
    assert rows == 12 and note.endswith("has 2 clips: every caption finds its own among them within the top 2, "
                                        "so t2v R@5/10 are 100 whatever the model")


@pytest.mark.parametrize("head", ["seqTransf", "tightTransf"])
def test_weight_decay_spares_exactly_the_one_dimensional_parameters(head):
    """The spec decays every weight but biases and LayerNorm gains. CLIP's positional_embedding
    was spared by name while the heads' position embeddings, copied from it, were decayed: one
    tensor decayed or not by where it lived. (No Ray.)"""
    from clipray.config import OptimConfig
    from clipray.models import create_model
    from train.ds_config import param_groups

    model = create_model(f"test_{head}")
    groups = param_groups(model, OptimConfig(weight_decay=0.2))
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.2 for p in g["params"]}
    by_hand = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2}
    assert spared == by_hand and not spared & decayed
    assert "backbone.clip.positional_embedding" in decayed
    assert any("position" in n for n in decayed if n.startswith("head."))
    assert "backbone.clip.visual.class_embedding" in spared
    # tightTransf scores pairs without the temperature, which then does not train
    assert ("backbone.clip.logit_scale" in spared) == (head != "tightTransf")


@pytest.mark.parametrize("ratio, total, warmup", [(0.29, 100, 29), (0.1, 15, 1), (0.1, 150, 15), (0.0, 10, 1)])
def test_the_warm_up_takes_its_share_of_the_steps(ratio, total, warmup):
    """0.29 x 100 is 28.999999999999996 in floats: the warm-up took 28 steps. The learning rate
    reaches its peak at the last warm-up step and not before. (No Ray.)"""
    from clipray.config import OptimConfig
    from clipray.models import create_model
    from train.ds_config import optimizer_and_schedule

    _, sched = optimizer_and_schedule(create_model("test_meanP"), OptimConfig(warmup_ratio=ratio), total)
    factors = [sched.lr_lambdas[0](step) for step in range(total)]
    assert factors[warmup - 1] == 1.0 and all(f < 1.0 for f in factors[:warmup - 1])
    assert factors[warmup] == 1.0 > factors[warmup + 1]  # the cosine starts from the peak


def test_a_training_workers_warnings_leave_out_torchs_deprecation_of_zero3s_collectives():
    """A ZeRO-3 run's console had torch's FutureWarning for each collective DeepSpeed calls
    ("`torch.distributed.all_gather_into_tensor` is deprecated ..."), two lines each, which no
    user can act on; other warnings still show. (No Ray: the worker's set-up, called here.)"""
    import logging
    import warnings

    import torch
    import torch.distributed as dist

    from train.loop import quiet_worker_logs

    level = logging.getLogger().level
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            quiet_worker_logs()
            for call in (lambda: dist.all_gather_into_tensor(torch.zeros(2), torch.zeros(1)),
                         lambda: dist.reduce_scatter_tensor(torch.zeros(1), torch.zeros(2))):
                with pytest.raises(Exception):  # no process group here; torch warns before it looks
                    call()
            warnings.warn("`torch.distributed.all_gather_into_tensor` is slow", FutureWarning)
            warnings.warn("another `torch.distributed.x` is deprecated", DeprecationWarning)
    finally:
        logging.getLogger().setLevel(level)
    assert [str(w.message) for w in seen] == ["`torch.distributed.all_gather_into_tensor` is slow",
                                              "another `torch.distributed.x` is deprecated"]
