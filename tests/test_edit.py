"""Clip editing on a real local Ray with real DeepSpeed, on the synthetic events (real H.264).

- The teacher's edit job (Ray Data actors) picks what a brute-force pass picks: every candidate
  clip decoded on its own, embedded, scored by hand.
- `clipray edit` end to end: stage-1 clips equal hand-computed midpoints; every round's clips,
  counts, shifts and tIoU agree with its manifest; the teacher changes exactly when validation
  improves; the final test metrics equal a brute-force evaluation of the exported student on the
  ground-truth clips; re-running a finished run trains nothing and prints its result.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clipray.config import load_config
from clipray.editing import tiou
from clipray.manifest import read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
EDIT_DEMO = REPO / "train" / "configs" / "edit_demo.yaml"
STEP, MIN_WIDTH = 0.25, 0.5


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> dict:
    """30 synthetic videos (seed 1): 29 training, 6 validation and 7 test events (one per caption)."""
    from clipray.synth import generate

    return generate(tmp_path_factory.mktemp("edit-synth"), videos=30, seed=1, val_frac=0.2, test_frac=0.2)


def overrides(manifest: str, storage: Path, name: str, **extra) -> list[str]:
    base = {"data.manifest": manifest, "train.storage_path": storage, "train.run_name": name,
            "data.batch_size": 4, "data.decode_cpus": 0.25, "data.video.max_frames": 4,
            "edit.warmup_epochs": 1, "edit.rounds": 1, "edit.epochs_per_round": 1,
            "edit.step_s": STEP, "edit.max_steps": 1, "edit.min_width_s": MIN_WIDTH}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def embed(model, tok, captions: list[str], clips: list[tuple], vcfg) -> np.ndarray:
    """Brute force: each (path, start, end) decoded on its own (decode_clip, no Ray) and
    embedded; returns the cosine of every caption with every clip."""
    from clipray.video import decode_clip

    decoded = [decode_clip(p, s, e, vcfg) for p, s, e in clips]
    with torch.no_grad():
        v = model.encode_video(model.normalize(torch.from_numpy(np.stack([c.frames for c in decoded]))),
                               torch.from_numpy(np.stack([c.mask for c in decoded])).bool())
        t = model.encode_text(tok(captions))
    return (t @ v.T).numpy()


def encode(model, tok, caption: str, path: str, windows: list, vcfg) -> dict:
    """The caption's cosine with each window of one video."""
    return dict(zip(windows, embed(model, tok, [caption], [(path, s, e) for s, e in windows], vcfg)[0].tolist()))


def by_hand_candidates(clip, lo, t, hi) -> list:
    eps = 1e-6  # times are whole milliseconds; float sums of them are not
    return [(round(clip[0] + a, 3), round(clip[1] + b, 3)) for a in (-STEP, 0, STEP) for b in (-STEP, 0, STEP)
            if lo - eps <= clip[0] + a <= t + eps and t - eps <= clip[1] + b <= hi + eps
            and clip[1] + b - clip[0] - a >= MIN_WIDTH - eps]


def test_stage_one_measures_every_video_and_says_why_one_is_unreadable(events, tmp_path):
    """A video shorter than its manifest `duration` says: a caption past its real end was given
    a clip reaching past it, trained on the frames before the end (decoding stops there), never
    edited and never reported. And every unreadable video was "unreadable video", whatever the
    reason. Each video is measured now; a caption past its real end is left out, saying so."""
    from clipray.manifest import write_manifest
    from clipray.video import video_length
    from train.edit import initial_captions

    root = Path(events["events_manifest"]).parent
    first = next(r for r in read_manifest(events["events_manifest"]).to_pylist() if r["split"] == "train")
    path = str(root / first["path"])
    real = video_length(path)
    base = dict(start=None, end=None, split="train", group=None)
    rows = [dict(base, row_id=0, video_id="v", path=path, caption="early", timestamp=real / 2, duration=2 * real),
            dict(base, row_id=1, video_id="v", path=path, caption="past the end", timestamp=1.5 * real, duration=2 * real),
            dict(base, row_id=2, video_id="gone", path=str(tmp_path / "gone.mp4"), caption="x", timestamp=1.0,
                 duration=10.0)]
    write_manifest(rows, tmp_path / "m.parquet", keep_row_ids=True)
    cfg = load_config(EDIT_DEMO, overrides(str(tmp_path / "m.parquet"), tmp_path, "short"))
    captions, left_out = initial_captions(str(tmp_path / "m.parquet"), str(root), cfg.edit, "decord")
    assert list(captions) == [0] and captions[0].clip == (0.0, round(real, 3))
    assert [(s["row_id"], s["reason"]) for s in left_out] == [(1, f"timestamp past the video's end {real:.2f}s"),
                                                             (2, "missing file")]


def test_edit_job_picks_the_best_candidate_as_brute_force_scoring_does(ray_local, events, tmp_path, monkeypatch):
    import open_clip
    import ray.data

    from clipray.export import load_export, save_export
    from clipray.models import create_model
    from train.driver import model_io
    from train.edit import edit_clips, initial_captions

    torch.manual_seed(0)
    export = save_export(create_model("test_meanP"), tmp_path / "teacher")  # any model can teach
    cfg = model_io(load_config(EDIT_DEMO, overrides(events["events_manifest"], tmp_path, "job")))
    root = events["events_manifest"].rsplit("/", 1)[0]
    captions, left_out = initial_captions(events["events_manifest"], root, cfg.edit, "decord")
    assert not left_out and len(captions) == 29
    gone = [captions[r] for r in sorted(captions)[::14]]  # captions whose video has gone missing since stage 1
    for c in gone:
        c.path = str(tmp_path / "deleted.mp4")
    # the scoring actors' batches arrive in the order they finish: reversed here, the results
    # still come in row order (the round's means, skips.jsonl and the state repeat run to run)
    iter_batches = ray.data.Dataset.iter_batches
    monkeypatch.setattr(ray.data.Dataset, "iter_batches", lambda self, **kw: reversed(list(iter_batches(self, **kw))))
    new, gains, unscored = edit_clips(cfg, captions, str(export), round_no=1, quiet=True)
    monkeypatch.undo()
    assert [(u["row_id"], u["reason"]) for u in unscored] == [(c.row_id, "missing file") for c in gone]
    assert list(new) == list(gains) == sorted(set(captions) - {c.row_id for c in gone})

    model = load_export(export)
    tok = open_clip.get_tokenizer(model.tokenizer_name, context_length=cfg.data.max_words)
    edited = 0
    for rid, chosen in new.items():
        c = captions[rid]
        scores = encode(model, tok, c.caption, c.path, by_hand_candidates(c.clip, c.bounds.lo, c.bounds.t, c.bounds.hi),
                        cfg.data.video)
        best = max(scores.values())
        assert gains[rid] == pytest.approx(best - scores[c.clip], abs=1e-5)
        assert chosen in scores  # a candidate by hand: within the neighbours, holds t, moved by steps
        if chosen == c.clip:  # kept: nothing beat it (margin 0)
            assert best <= scores[c.clip] + 1e-5
        else:  # replaced: by the best one (up to float noise between batched and lone encodes)
            edited += 1
            assert scores[chosen] >= best - 1e-5 and scores[chosen] > scores[c.clip]
    assert edited > 0  # a random teacher has preferences too: the job did edit


def test_the_gain_is_the_best_candidates_also_where_a_margin_keeps_the_clip(events, tmp_path):
    """edits.csv's median_gain is how much the teacher's best candidate beat the current clip,
    the scale to set edit.margin against. Under a margin the kept clips reported a gain of 0
    (their own score less their own), so every run with a margin showed a median of 0.0000.
    The scorer runs here without Ray, as one actor would."""
    import open_clip

    from clipray.export import load_export, save_export
    from clipray.models import create_model
    from train.driver import model_io
    from train.edit import ClipScorer, initial_captions

    torch.manual_seed(0)
    export = save_export(create_model("test_meanP"), tmp_path / "teacher")
    cfg = model_io(load_config(EDIT_DEMO, overrides(events["events_manifest"], tmp_path, "gain",
                                                    **{"edit.margin": 1000.0})))  # no cosine beats by that
    root = events["events_manifest"].rsplit("/", 1)[0]
    captions = list(initial_captions(events["events_manifest"], root, cfg.edit, "decord")[0].values())[:6]
    scorer = ClipScorer(str(export), cfg.data.video, cfg.data.max_words, cfg.edit, use_gpu=False)
    batch = {"row_id": np.array([c.row_id for c in captions]), "path": np.array([c.path for c in captions]),
             "caption": np.array([c.caption for c in captions]),
             **{k: np.array([c.clip[j] for c in captions]) for j, k in enumerate(("start", "end"))},
             **{k: np.array([getattr(c.bounds, k) for c in captions]) for k in ("lo", "t", "hi")}}
    out = scorer(batch)
    model = load_export(export)
    tok = open_clip.get_tokenizer(model.tokenizer_name, context_length=cfg.data.max_words)
    gains = []
    for i, c in enumerate(captions):
        scores = encode(model, tok, c.caption, c.path, by_hand_candidates(c.clip, c.bounds.lo, c.bounds.t, c.bounds.hi),
                        cfg.data.video)
        assert (out["start"][i], out["end"][i]) == c.clip  # kept: the margin is out of reach
        assert out["current"][i] == pytest.approx(scores[c.clip], abs=1e-5)
        assert out["best"][i] - out["current"][i] == pytest.approx(max(scores.values()) - scores[c.clip], abs=1e-5)
        gains.append(max(scores.values()) - scores[c.clip])
    assert max(gains) > 1e-4  # some candidate did beat its clip: the old code said 0 for all


@pytest.mark.parametrize("name", ["test_meanP", "test_tightTransf"])
def test_a_bf16_teacher_scores_candidates_with_float32_products(events, tmp_path, name):
    """A GPU run's export is bf16. The teacher took its scores as the bf16 product of bf16
    embeddings: ~3 digits, so candidates that differ tied (and a tie keeps the current clip),
    where evaluation scores in float32. Its scores are now those of the same embeddings
    multiplied in float32."""
    from clipray.export import save_export
    from clipray.models import create_model
    from clipray.video import decode_windows
    from train.driver import model_io
    from train.edit import ClipScorer, initial_captions

    torch.manual_seed(0)
    export = save_export(create_model(name).to(torch.bfloat16), tmp_path / "teacher")
    cfg = model_io(load_config(EDIT_DEMO, overrides(events["events_manifest"], tmp_path, "bf16")))
    root = events["events_manifest"].rsplit("/", 1)[0]
    c = list(initial_captions(events["events_manifest"], root, cfg.edit, "decord")[0].values())[0]
    scorer = ClipScorer(str(export), cfg.data.video, cfg.data.max_words, cfg.edit, use_gpu=False)
    assert scorer.model.logit_scale.dtype == torch.bfloat16
    wins = by_hand_candidates(c.clip, c.bounds.lo, c.bounds.t, c.bounds.hi)
    clips = decode_windows(c.path, wins, scorer.video)
    got = scorer.scores(c.caption, clips)
    m = scorer.model
    with torch.no_grad():  # the same bf16 embeddings, their products in float64
        text = m.encode_text(scorer.tokenize([c.caption]))
        frames = torch.from_numpy(np.stack([x.frames for x in clips]))
        mask = torch.from_numpy(np.stack([x.mask for x in clips])).bool()
        feats = m.encode_frames(m.normalize(frames), mask)
        if m.indexable:
            want = (text.double() @ m.pool_video(feats, mask).double().T)[0]
        else:  # the cross-encoder's pair scores, which it gives in float32 from bf16 weights
            want = m.similarity(text, feats, mask)[0].double()
    assert len(got) == len(wins) > 3
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)


def midpoint_clips_by_hand(rows: list[dict]) -> dict[int, tuple]:
    out = {}
    for vid in {r["video_id"] for r in rows}:
        rs = sorted((r for r in rows if r["video_id"] == vid), key=lambda r: r["timestamp"])
        for k, r in enumerate(rs):
            s = 0.0 if k == 0 else (rs[k - 1]["timestamp"] + r["timestamp"]) / 2
            e = r["duration"] if k == len(rs) - 1 else (r["timestamp"] + rs[k + 1]["timestamp"]) / 2
            out[r["row_id"]] = (round(s, 3), round(e, 3))
    return out


def brute_force_test_metrics(export: Path, manifest: str, vcfg) -> dict:
    """The final evaluation by hand: every test event is its own target (same video, other
    clip), decoded without Ray, embedded, ranked."""
    import open_clip

    from clipray.export import load_export

    model = load_export(export)
    tok = open_clip.get_tokenizer(model.tokenizer_name, context_length=32)
    root = manifest.rsplit("/", 1)[0]
    rows = read_manifest(manifest, split="test").to_pylist()
    sim = embed(model, tok, [r["caption"] for r in rows], [(f"{root}/{r['path']}", r["start"], r["end"]) for r in rows],
                vcfg)
    ranks = [1 + int((np.delete(sim[i], i) >= sim[i, i]).sum()) for i in range(len(rows))]
    return {"t2v_r1": 100.0 * np.mean([r == 1 for r in ranks]), "t2v_mnr": float(np.mean(ranks)),
            "num_test_videos": len(rows)}


def read_clips(manifest: str) -> dict[int, tuple]:
    return {r["row_id"]: (r["start"], r["end"]) for r in read_manifest(manifest, split="train").to_pylist()}


def test_clip_editing_end_to_end(ray_local, events, tmp_path, capsys):
    from clipray.config import ConfigError
    from train.edit import main

    # the evaluation manifest in a folder of its own, its relative paths valid there only (they
    # were resolved under the source manifest's folder, so every evaluation clip was skipped)
    rows = read_manifest(events["events_manifest"]).to_pylist()
    for r in rows:
        r["path"] = r["path"].replace("videos/", "clips/", 1)
    (tmp_path / "evalset").mkdir()
    (tmp_path / "evalset" / "clips").symlink_to(Path(events["events_manifest"]).parent / "videos")
    write_manifest(rows, tmp_path / "evalset" / "events.parquet")
    args = [str(EDIT_DEMO), *overrides(events["events_manifest"], tmp_path, "edit"),
            f"data.eval_manifest={tmp_path / 'evalset' / 'events.parquet'}"]
    assert main(args) == 0
    out = tmp_path / "edit"
    result = json.loads((out / "edit_result.json").read_text())
    rounds = result["rounds"]
    # (one round: every Ray Train run costs ~80 s of start-up here; bench edit runs three)
    assert [r["round"] for r in rounds] == [0, 1] and [r["epoch"] for r in rounds] == [1, 2]
    with open(out / "edits.csv") as f:
        assert [int(r["edited"]) for r in csv.DictReader(f)] == [r["edited"] for r in rounds]

    # stage 1: midpoints between neighbouring timestamps, by hand
    truth_rows = read_manifest(events["events_manifest"], split="train").to_pylist()
    truth = {r["row_id"]: (r["start"], r["end"]) for r in truth_rows}
    ts = {r["row_id"]: r["timestamp"] for r in truth_rows}
    clips = [read_clips(r["manifest"]) for r in rounds]
    assert clips[0] == midpoint_clips_by_hand(truth_rows)
    # every round: what it reports is what its manifest holds
    for k, r in enumerate(rounds):
        assert r["train_tiou"] == pytest.approx(np.mean([tiou(clips[k][i], truth[i]) for i in truth]))
        assert r["mean_width_s"] == pytest.approx(np.mean([e - s for s, e in clips[k].values()]))
        if k == 0:
            continue
        moved = [i for i in truth if clips[k][i] != clips[k - 1][i]]
        assert r["edited"] == len(moved) > 0  # the warm-up student edits as the first teacher
        if moved:
            shifts = [(abs(clips[k][i][0] - clips[k - 1][i][0]) + abs(clips[k][i][1] - clips[k - 1][i][1])) / 2
                      for i in moved]
            assert r["mean_shift_s"] == pytest.approx(np.mean(shifts))
        for i in truth:  # each clip holds its timestamp, moved by at most one step per side
            s, e = clips[k][i]
            assert s <= ts[i] <= e and e - s >= MIN_WIDTH - 1e-9
            assert round(abs(s - clips[k - 1][i][0]), 6) in (0, STEP)
            assert round(abs(e - clips[k - 1][i][1]), 6) in (0, STEP)
    # the teacher is replaced exactly when validation beats the best so far
    best = -1.0
    for r in rounds:
        assert r["teacher_updated"] == (r["val_rsum"] > best)
        best = max(best, r["val_rsum"])
    # one training run continued round after round: one metrics row per epoch
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 2
    # the final evaluation: ground-truth test clips, each event its own target
    cfg = load_config(EDIT_DEMO, overrides(events["events_manifest"], tmp_path, "edit"))
    from train.driver import model_io

    bf = brute_force_test_metrics(out / "export", events["events_manifest"], model_io(cfg).data.video)
    test = result["test"]
    assert test["eval_split"] == "test" and test["num_test_videos"] == bf["num_test_videos"] == 7
    assert test["t2v_r1"] == pytest.approx(bf["t2v_r1"]) and test["t2v_mnr"] == pytest.approx(bf["t2v_mnr"])

    # a re-run of a finished run trains nothing and prints its result
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "has finished every round" in said and "[edit] round" not in said
    assert f"t2v R@1 {test['t2v_r1']:.1f}" in said
    with pytest.raises(ConfigError, match="other edit.\\* settings"):
        main([*args, "edit.margin=0.1"])


# ---------------------------------------------------------------- the pure parts, no Ray

def test_initial_clips_hold_their_timestamp_after_rounding_to_the_millisecond():
    """A timestamp at a video's end that is not a whole millisecond (durations are frames / fps),
    or two timestamps under a millisecond apart: rounding a clip's end down (or its start up)
    must not leave the timestamp outside it (the round's manifest would then be refused)."""
    from clipray.editing import initial_clips

    for ts, duration, kw in (([4.0, 10.0374], 10.0374, {}),  # midpoint: last end = duration
                             ([3.0, 6.0004], 6.0004, {"rule": "window", "window_s": 2.0}),
                             ([1.0005, 1.0006], 5.0, {})):  # midpoint 1.00055 rounds up to 1.001
        for t, (s, e) in zip(ts, initial_clips(ts, duration, **kw)):
            assert s <= t <= e, (ts, duration, kw, (s, e))


def test_candidates_of_a_clip_ending_at_a_video_end_rounded_up():
    """A video of 10.0376 s: its last clip ends at 10.038 (the end rounded to the millisecond).
    Keeping that end while moving the start is a valid edit, as it is for every other clip;
    only the end moved a step further out is past the video."""
    from clipray.editing import Bounds, candidates, initial_clips

    clip = initial_clips([6.0, 8.0], 10.0376)[1]
    assert clip == (7.0, 10.038)
    got = candidates(*clip, Bounds(6.0, 8.0, 10.0376), step_s=0.25, max_steps=1, min_width_s=0.5)
    by_hand = [(7.0, 10.038)] + [(s, e) for s in (6.75, 7.0, 7.25) for e in (9.788, 10.038)
                                 if (s, e) != (7.0, 10.038)]
    assert got[0] == clip and sorted(got) == sorted(by_hand)


def test_an_edit_pool_too_big_for_the_local_ray_fails_before_the_warm_up(ray_local, events, tmp_path):
    """The teacher's actor pool first runs in round 1, after the warm-up (hours on a real set):
    a pool the local Ray cannot hold must be refused before any training, not after it."""
    from clipray.config import ConfigError
    from train.edit import main

    args = [str(EDIT_DEMO), *overrides(events["events_manifest"], tmp_path, "big-pool"), "edit.actors=64"]
    with pytest.raises(ConfigError, match="edit.actors x edit.actor_cpus"):
        main(args)
    assert not (tmp_path / "big-pool" / "metrics.csv").exists()  # nothing trained


def test_candidates_keep_an_unrounded_end_that_holds_the_timestamp():
    """A timestamp at the end of a video of 10.0374 s: its clip ends at 10.0374 (10.037 would
    lose it). The teacher's candidates, the current clip first, must all still hold it: an
    unmoved end stays as it is, only the start moves."""
    from clipray.editing import Bounds, candidates

    clip, b = (7.019, 10.0374), Bounds(4.0, 10.0374, 10.0374)
    got = candidates(*clip, b, step_s=0.25, max_steps=1, min_width_s=0.5)
    assert got == [(7.019, 10.0374), (6.769, 10.0374), (7.269, 10.0374)]


def finished_run(out, cfg, source: str) -> dict:
    """Write the state and result of a two-round editing run of `source` into `out`, as `run`
    leaves them at its end; the test metrics it records."""
    import dataclasses

    out.mkdir()
    rec = {"round": 0, "epoch": 1, "edited": 0, "mean_shift_s": 0.0, "train_tiou": 0.5, "mean_width_s": 2.0,
           "val_r1": 10.0, "val_r5": 50.0, "val_r10": 100.0, "val_rsum": 160.0, "teacher_updated": True}
    records = [rec, dict(rec, round=1, epoch=2, teacher_updated=False)]
    (out / "edit_state.json").write_text(json.dumps({"edit": dataclasses.asdict(cfg.edit), "records": records,
                                                     "skips": [], "clips": {}, "source": source}))
    test = {"eval_split": "test", "num_test_videos": 13, **{f"t2v_{k}": 1.0 for k in ("r1", "r5", "r10", "mdr")},
            "v2t_r1": 1.0}
    (out / "edit_result.json").write_text(json.dumps({"rounds": records, "test": test, "left_out": 0}))
    return test


@pytest.mark.parametrize("extra, says", [
    (["edit.max_width_s=0.4"], "edit.max_width_s=0.4 is below edit.min_width_s=0.5, which every clip is widened to"),
    (["edit.init=window", "edit.window_s=0.25"], "edit.window_s=0.25 is below edit.min_width_s=0.5, which every clip is widened to"),
    # init=midpoint never reads window_s: a width asked for was dropped without a word
    (["edit.init=midpoint", "edit.window_s=4"], "edit.window_s=4 is read only with edit.init=window"),
])
def test_a_clip_width_that_would_be_dropped_is_refused_before_ray_starts(extra, says, tmp_path):
    """edit_demo.yaml keeps clips >= 0.5 s: with edit.max_width_s=0.4 (or a 0.25 s window) every
    initial clip was widened to 0.5 s, past the cap the run was given, and nothing said so
    (initial_clips([2, 5, 8], 10, max_width_s=0.4, min_width_s=0.5) gives clips of 0.5 s)."""
    from clipray.config import ConfigError
    from clipray.editing import initial_clips
    from train.edit import run

    assert {round(e - s, 3) for s, e in initial_clips([2.0, 5.0, 8.0], 10.0, max_width_s=0.4, min_width_s=0.5)} == {0.5}
    with pytest.raises(ConfigError, match=f"^{says}"):
        run(load_config(EDIT_DEMO, [f"data.manifest={tmp_path / 'none.parquet'}", *extra]))
    assert not list(tmp_path.iterdir())  # refused before the manifest or a run folder


def test_a_run_of_another_manifest_is_not_resumed(events, tmp_path):
    """The same config and run name on another manifest (the demo's `edit-demo` run name on a
    new synthetic set) is a new run: the old run's clips (joined by row id) and its finished
    result belong to the manifest they came from. Refused before Ray starts."""
    import shutil

    from clipray.config import ConfigError
    from train.edit import run

    other = tmp_path / "other-events.parquet"
    shutil.copy(events["events_manifest"], other)
    shutil.copytree(Path(events["events_manifest"]).parent / "videos", tmp_path / "videos")  # (stage 1 opens them)
    cfg = load_config(EDIT_DEMO, overrides(str(other), tmp_path, "reused"))
    finished_run(tmp_path / "reused", cfg, events["events_manifest"])
    with pytest.raises(ConfigError, match="another data.manifest"):
        run(cfg)

    # the run's own set moved with its run folder (the project to another disk): its manifest
    # recorded by path alone was taken for another, and the run could never be resumed
    from clipray.manifest import manifest_signature

    src = Path(events["events_manifest"])
    shutil.copytree(src.parent, tmp_path / "moved")
    cfg = load_config(EDIT_DEMO, overrides(str(tmp_path / "moved" / src.name), tmp_path, "moved-run"))
    test = finished_run(tmp_path / "moved-run", cfg, str(src))
    state = json.loads((tmp_path / "moved-run" / "edit_state.json").read_text())
    (tmp_path / "moved-run" / "edit_state.json").write_text(json.dumps(
        {**state, "source_files": manifest_signature(str(src))}))
    assert run(cfg)["test"] == test  # its finished result, before Ray starts
    # written again at its path with other captions (`clipray data prepare --out` it): resumed
    # on without a word, its clips joined by row id to other rows
    from clipray.manifest import read_manifest, write_manifest

    moved = str(tmp_path / "moved" / src.name)
    (tmp_path / "moved-run" / "edit_state.json").write_text(json.dumps(
        {**state, "source": moved, "source_files": manifest_signature(moved)}))  # as a run there records it
    assert run(cfg)["test"] == test
    rows = read_manifest(moved).to_pylist()
    write_manifest([dict(r, caption=f"{r['caption']}, again") for r in rows], moved, keep_row_ids=True)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'moved-run'} holds an editing run of {moved} as it "
                                          r"was: it holds other files now \(written again since\)"):
        run(cfg)


def test_a_round_of_a_manifest_written_again_since_the_run_began_is_refused(tmp_path):
    """Each round's manifest is the source read again, its rows joined by row id to the clips
    and captions the run holds: the source written again while the run went on (`clipray data
    prepare --out` it) gave a round of other rows under the old clips, without a word."""
    from clipray.config import ConfigError
    from clipray.manifest import manifest_signature, read_manifest, write_manifest
    from train.edit import write_round

    source = tmp_path / "events.parquet"
    rows = [{"video_id": f"v{i}", "path": f"v{i}.mp4", "start": 0.0, "end": 1.0, "caption": f"a cat {i}",
             "split": "val", "timestamp": 0.5, "duration": 2.0} for i in range(3)]
    write_manifest(rows, source)
    files = manifest_signature(str(source))
    write_round(str(source), str(tmp_path), str(tmp_path / "round-00.parquet"), {}, 0, files)
    assert read_manifest(tmp_path / "round-00.parquet").column("caption").to_pylist() == ["a cat 0", "a cat 1", "a cat 2"]
    write_manifest([dict(r, caption=f"a dog {i}") for i, r in enumerate(rows)], source)
    with pytest.raises(ConfigError, match=rf"^{source}: the manifest changed while this run read it"):
        write_round(str(source), str(tmp_path), str(tmp_path / "round-01.parquet"), {}, 1, files)
    assert not (tmp_path / "round-01.parquet").exists()


def test_the_plan_line_counts_one_epoch_and_one_round_in_the_singular():
    """The run's first line said "warm-up 1 epochs, 2 rounds x 1"."""
    from clipray.config import EditConfig
    from train.edit import _plan_line

    assert _plan_line("/runs/e", 32, EditConfig(warmup_epochs=1, rounds=2, epochs_per_round=1)) == (
        "[edit] run /runs/e: 32 training captions, init=midpoint, warm-up 1 epoch, 2 rounds x 1 epoch")
    assert _plan_line("/runs/e", 1, EditConfig(warmup_epochs=6, rounds=1, epochs_per_round=2)) == (
        "[edit] run /runs/e: 1 training caption, init=midpoint, warm-up 6 epochs, 1 round x 2 epochs")


def test_left_out_counts_only_captions_never_trained_on():
    from train.edit import skip_counts

    skips = [{"row_id": 1, "round": 0}, {"row_id": 2, "round": 0},  # unreadable at stage 1
             {"row_id": 3, "round": 1}, {"row_id": 3, "round": 2}, {"row_id": 4, "round": 2}]  # unscored
    assert skip_counts(skips) == {"left_out": 2, "unscored": 3}
    assert skip_counts([]) == {"left_out": 0, "unscored": 0}
    # and the console's summary says both (edit_result.json had them, the console not)
    from train.edit import _summary

    test = {"eval_split": "test", "num_test_videos": 5, "t2v_mdr": 2.0, "v2t_r1": 20.0,
            **{f"t2v_r{k}": 20.0 for k in (1, 5, 10)}}
    text = _summary({"rounds": [], "test": test, **skip_counts(skips)}, "/runs/e")
    assert "captions left out: 2; times the teacher could not score one (kept its clip): 3  (clips/skips.jsonl)" in text
    # and the clips its decoders skipped or cut, the final test evaluation's too (the console
    # had neither, and the test's were in no report)
    lines = _summary({"rounds": [], "test": dict(test, skipped_clips=3, cut_clips=1)}, "/runs/e/").splitlines()
    assert lines[-3:-1] == ["skipped clips: 3  (see /runs/e/skip_report.jsonl)",
                            "1 clip cut at its video's end (see /runs/e/cut_report.jsonl)"]


@pytest.mark.parametrize("name", ["exp [2]", "exp::2"])
def test_edit_state_is_read_back_from_a_run_folder_named_like_a_glob(tmp_path, name):
    """fsspec's cat() and copy() expand glob patterns: in a run folder "exp [2]" a resume failed
    to read edit_state.json, and the teacher's export could not be copied. fsspec reads '::' as
    a chain of filesystems: in "exp::2" it looked for both in "exp"."""
    from train.edit import _get_json

    out = tmp_path / name
    out.mkdir()
    (out / "edit_state.json").write_text(json.dumps({"records": [1, 2]}))
    assert _get_json(str(out / "edit_state.json")) == {"records": [1, 2]}
    assert _get_json(str(out / "missing.json")) is None
    from clipray.export import CONFIG, WEIGHTS
    from train.edit import _copy_export

    (out / "export").mkdir()
    for name in (WEIGHTS, CONFIG):
        (out / "export" / name).write_text(name)
    _copy_export(str(out / "export"), str(out / "teacher"))  # the teacher, after a better round
    assert sorted(p.read_text() for p in (out / "teacher").iterdir()) == sorted([WEIGHTS, CONFIG])


def test_edit_state_written_on_a_full_disk_is_an_error_naming_it(tmp_path, file_size_limit):
    """pyarrow's OSError for a full disk (here a file size limit, EFBIG) names no file, so a
    clip editing run whose edit_state.json, edits.csv or skips could not be written ended in
    its traceback; the error now names the file, and the old state stays whole."""
    state = tmp_path / "edit_state.json"
    state.write_text('{"records": []}')
    res = file_size_limit(4096, "put_text(sys.argv[1], 'x' * 100_000)", state,
                          setup="from train.driver import put_text\n")
    assert res.returncode == 0 and res.stdout.split() == [str(state), "27"], (res.stdout, res.stderr)
    assert state.read_text() == '{"records": []}'


def test_a_teacher_copied_on_a_full_disk_keeps_the_last_teacher(tmp_path, file_size_limit):
    """A round that beats the best so far copies its export over the teacher, the export a
    resumed run scores its next round with. Copied in place, a full disk midway (here a file
    size limit, EFBIG) left the teacher's weights cut, and every resume failed to load them.
    Each file is now copied whole or not at all, the error naming it."""
    run = tmp_path / "run"
    for name, weights in (("teacher", b"old weights"), ("export", b"w" * 200_000)):
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_bytes(weights)
        (run / name / "config.json").write_text("{}")
    res = file_size_limit(100_000, "_copy_export(sys.argv[1] + '/export', sys.argv[1] + '/teacher')", run,
                          setup="from train.edit import _copy_export\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [f"{run}/teacher/model.safetensors", "27"]  # EFBIG, named
    assert (run / "teacher" / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in (run / "teacher").iterdir()) == ["config.json", "model.safetensors"]


def test_edit_state_written_to_an_object_store_that_drops_is_a_line_naming_it(tmp_path):
    """A clip editing run in object storage writes its state, its rounds' manifests and the
    teacher's copy between rounds: the store gone by then (its connection dropped) ended the
    command in pyarrow's OSError or botocore's traceback, which name no file."""
    import os
    import subprocess
    import sys

    from ports import free_ports

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_ports()[0]}", AWS_ACCESS_KEY_ID="x",  # nothing listens
               AWS_SECRET_ACCESS_KEY="y", AWS_EC2_METADATA_DISABLED="true", AWS_MAX_ATTEMPTS="1")
    source = tmp_path / "events.parquet"
    write_manifest([{"video_id": "v0", "path": "v0.mp4", "start": 0.0, "end": 1.0, "caption": "a cat",
                     "split": "train", "timestamp": 0.5, "duration": 2.0}], source)
    script = ("import sys\n"
              "from concurrent.futures import ThreadPoolExecutor\n"
              "from clipray.config import ConfigError\n"
              "from train.driver import put_text\n"
              "from train.edit import _copy_export, write_round\n"
              "def said(write):\n"
              "    try:\n"
              "        write()\n"
              "    except ConfigError as e:\n"
              "        return str(e)\n"
              "writes = (lambda: put_text('s3://clipray-gone/run/edit_state.json', '{}'),\n"
              "          lambda: write_round(sys.argv[1], '/videos', 's3://clipray-gone/run/clips/round-01.parquet', {}, 1),\n"
              "          lambda: _copy_export('s3://clipray-gone/run/export', 's3://clipray-gone/run/teacher'))\n"
              "with ThreadPoolExecutor(3) as pool:  # at once: pyarrow retries each for seconds\n"
              "    print('\\n'.join(map(str, pool.map(said, writes))))\n")
    res = subprocess.run([sys.executable, "-c", script, str(source)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 3, res.stdout
    assert lines[0].startswith("s3://clipray-gone/run/edit_state.json: cannot write it (EndpointConnectionError: "), \
        lines[0]
    assert lines[1].startswith("s3://clipray-gone/run/clips/round-01.parquet: cannot write it (OSError: When "
                               "getting information for key 'run/clips/round-01.parquet'"), lines[1]
    assert lines[2].startswith("s3://clipray-gone/run/teacher: cannot write it (EndpointConnectionError: "), lines[2]


def test_a_resume_counts_the_captions_of_a_video_unreadable_since(events, tmp_path, monkeypatch, capsys):
    """Stage 1 runs anew on a resume: a video that cannot be read now (deleted, its storage
    down) drops its captions from training. The resume took the saved skips whole, so they
    went untrained with `left_out` still 0 and nothing said. Ray and the final evaluation are
    stubbed: the resume's bookkeeping all happens before them."""
    import dataclasses
    import shutil

    import clipray.runtime
    import train.driver
    from clipray.manifest import write_manifest
    from train.edit import run

    root = Path(events["events_manifest"]).parent
    rows = read_manifest(events["events_manifest"]).to_pylist()
    gone = next(r["video_id"] for r in rows if r["split"] == "train")
    copy = tmp_path / "gone.mp4"
    shutil.copy(root / next(r["path"] for r in rows if r["video_id"] == gone), copy)
    for r in rows:  # no durations: stage 1 reads each video's length from the file
        r.update(duration=None, path=str(copy) if r["video_id"] == gone else str(root / r["path"]))
    manifest = str(tmp_path / "events.parquet")
    write_manifest(rows, manifest, keep_row_ids=True)
    cfg = load_config(EDIT_DEMO, overrides(manifest, tmp_path, "resume", **{"edit.rounds": 0}))
    out = tmp_path / "resume"
    out.mkdir()
    rec = {"round": 0, "epoch": 1, "edited": 0, "mean_shift_s": 0.0, "train_tiou": 0.5, "mean_width_s": 2.0,
           "val_r1": 10.0, "val_r5": 50.0, "val_r10": 100.0, "val_rsum": 160.0, "teacher_updated": True}
    # the first run read every video: nothing left out; it stopped before its final evaluation
    (out / "edit_state.json").write_text(json.dumps({"edit": dataclasses.asdict(cfg.edit), "source": manifest,
                                                     "records": [rec], "skips": [], "clips": {}}))
    copy.unlink()
    test = {"eval_split": "test", "num_test_videos": 13, **{f"t2v_{k}": 1.0 for k in ("r1", "r5", "r10", "mdr")},
            "v2t_r1": 1.0}
    monkeypatch.setattr(clipray.runtime, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(train.driver, "evaluate_export", lambda *a, **k: test)
    result = run(cfg)
    lost = sum(r["video_id"] == gone and r["split"] == "train" for r in rows)
    assert lost >= 1 and result["left_out"] == lost
    assert f"{lost} more training captions left out since the last run" in capsys.readouterr().out
    # the first run stopped after saving its round and before writing the round's edits.csv line:
    # the resume, with no round left to train, wrote none
    with open(out / "edits.csv") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["0"]
    # and clips/skips.jsonl, which the summary points at for them, lists them: written only after
    # a round, it did not exist here, while edit_result.json and the console counted `lost`
    listed = [json.loads(line) for line in (out / "clips" / "skips.jsonl").read_text().splitlines()]
    assert sorted(s["row_id"] for s in listed) == sorted(r["row_id"] for r in rows
                                                         if r["video_id"] == gone and r["split"] == "train")
    assert {(s["round"], s["reason"]) for s in listed} == {(0, "missing file")}
    # and the other way: a caption left out before and readable now trains, so it is not counted
    from train.edit import resumed_skips

    saved = [{"row_id": 1, "round": 0, "reason": "unreadable video"}, {"row_id": 2, "round": 0, "reason": "x"},
             {"row_id": 1, "round": 1, "reason": "missing file"}]
    fresh = [{"row_id": 2, "round": 0, "reason": "x"}, {"row_id": 3, "round": 0, "reason": "unreadable video"}]
    skips, since = resumed_skips(saved, fresh, {1: None})
    assert [(s["row_id"], s["round"]) for s in skips] == [(2, 0), (1, 1), (3, 0)] and since == fresh[1:]


def test_a_resume_may_give_the_scoring_job_other_resources(events, tmp_path, capsys):
    """edit.actors, actor_cpus, actor_gpus and batch size the teacher's job, not its edits (each
    caption is scored on its own): a run resumed on another cluster, with fewer GPUs, must go
    on. Any edit.* change refused it, saying to start over. What the edits depend on (here
    edit.margin) is still refused, named."""
    from clipray.config import ConfigError
    from train.edit import run

    cfg = load_config(EDIT_DEMO, overrides(events["events_manifest"], tmp_path, "moved"))
    test = finished_run(tmp_path / "moved", cfg, events["events_manifest"])
    pool = {"edit.actors": 1, "edit.actor_cpus": 0.25, "edit.actor_gpus": 0, "edit.batch": 3}
    assert all(getattr(cfg.edit, k.split(".")[1]) != v for k, v in pool.items())
    moved = load_config(EDIT_DEMO, overrides(events["events_manifest"], tmp_path, "moved", **pool))
    assert run(moved)["test"] == test  # the finished run's result, nothing refused
    assert "has finished every round" in capsys.readouterr().out
    margin = load_config(EDIT_DEMO, overrides(events["events_manifest"], tmp_path, "moved", **{"edit.margin": 0.1}))
    with pytest.raises(ConfigError, match=r"other edit.\* settings \(edit.margin: 0.0 -> 0.1\)"):
        run(margin)


def test_a_finished_run_of_the_first_editing_version_prints_its_result(events, tmp_path, capsys):
    """A run folder from the first `clipray edit` (db24a62, before 86e0dfa): its rounds record no
    mean_width_s or median_gain and its state names no source. A re-run of its command printed
    nothing but a KeyError traceback (and a resumed such run failed so after its last round):
    the result table shows '-' for the width it never measured."""
    from train.edit import run

    cfg = load_config(EDIT_DEMO, overrides(events["events_manifest"], tmp_path, "old"))
    test = finished_run(tmp_path / "old", cfg, events["events_manifest"])
    for name in ("edit_state.json", "edit_result.json"):
        f = tmp_path / "old" / name
        saved = json.loads(f.read_text())
        saved.pop("source", None)
        for r in saved["rounds" if "rounds" in saved else "records"]:
            del r["mean_width_s"]
        f.write_text(json.dumps(saved))
    assert run(cfg)["test"] == test
    said = capsys.readouterr().out
    assert "has finished every round" in said
    assert [line.split()[5] for line in said.splitlines() if line.split()[:2] in (["0", "1"], ["1", "2"])] == ["-", "-"]


def test_a_failed_state_write_keeps_the_last_state(tmp_path):
    """edit_state.json is rewritten after every round; a write that fails midway (here a text
    that cannot be encoded, as a full disk or a killed job) must leave the last one whole, or
    no re-run can resume. Written in place, it was cut to nothing and the next run failed with
    a JSONDecodeError traceback."""
    from train.driver import put_text
    from train.edit import _get_json

    state = tmp_path / "exp [2]" / "edit_state.json"  # a run folder named like a glob, too
    state.parent.mkdir()
    put_text(str(state), json.dumps({"records": [1]}))
    with pytest.raises(UnicodeEncodeError):
        put_text(str(state), '{"records": [1, 2], "x": "\ud800"}')
    assert _get_json(str(state)) == {"records": [1]}
    put_text(str(state), json.dumps({"records": [1, 2]}))
    assert _get_json(str(state)) == {"records": [1, 2]}
    assert [p.name for p in state.parent.iterdir()] == ["edit_state.json"]  # no .partial left


def test_a_round_stopped_after_its_training_resumes_on_the_clips_it_trained_on(ray_local, events, tmp_path,
                                                                              monkeypatch, capsys):
    """Round 1 trains on its edits, beats round 0 and starts copying itself over the teacher;
    the job dies mid-copy (a cut weights file), before the round's state is saved. The re-run
    scored round 1 again, with that teacher: a cut one failed every re-run, a whole one (the
    round's own student) rewrote the round's manifest with clips its training never saw. Now the
    round's edits are saved before it trains and reused: no scoring, the same manifest, and the
    teacher copied whole. Validation is stubbed to improve every round (so the teacher moves),
    and the final test evaluation is stubbed (test_clip_editing_end_to_end checks it against a
    brute force); training and scoring are real. The round's training had reached its epoch:
    its result is read back, where Ray Train was started again to train nothing."""
    import train.driver
    import train.edit
    from clipray.export import WEIGHTS
    from train.edit import main

    vals = iter(range(1000))
    monkeypatch.setattr(train.edit, "_val", lambda final: {"val_r1": 0.0, "val_r5": 0.0, "val_r10": 0.0,
                                                           "val_rsum": float(next(vals))})
    copy, scored = train.edit._copy_export, []

    def dying_copy(src, dst):  # the second copy (round 1's student) is cut short
        if not scored or len(scored) > 1:
            return copy(src, dst)
        Path(dst, WEIGHTS).write_bytes(Path(src, WEIGHTS).read_bytes()[:1000])
        raise KeyboardInterrupt

    edit_clips = train.edit.edit_clips
    monkeypatch.setattr(train.edit, "_copy_export", dying_copy)
    monkeypatch.setattr(train.edit, "edit_clips", lambda *a, **k: scored.append(a[3]) or edit_clips(*a, **k))
    evaluated = []

    def evaluate(cfg, export, split, name):  # the final test evaluation: recorded, not run
        evaluated.append(export)
        return {"eval_split": split, "num_test_videos": 7,
                **dict.fromkeys(("t2v_r1", "t2v_r5", "t2v_r10", "t2v_mdr", "v2t_r1"), 0.0)}

    monkeypatch.setattr(train.driver, "evaluate_export", evaluate)
    args = [str(EDIT_DEMO), *overrides(events["events_manifest"], tmp_path, "cut")]
    with pytest.raises(KeyboardInterrupt):
        main(args)
    out = tmp_path / "cut"
    trained = read_clips(str(out / "clips" / "round-01.parquet"))
    assert scored == [1] and not (out / "edit_result.json").exists()
    scored.append("resumed")
    capsys.readouterr()
    assert main(args) == 0
    assert scored == [1, "resumed"]  # round 1 was not scored again
    said = capsys.readouterr().out
    assert f"[driver] {out} has finished epoch 2; its result: val t2v R@1 " in said, said[-3000:]
    assert "[driver] run" not in said.split("has finished epoch 2")[0]  # no training call before it
    result = json.loads((out / "edit_result.json").read_text())
    assert [r["teacher_updated"] for r in result["rounds"]] == [True, True]
    assert read_clips(result["rounds"][1]["manifest"]) == trained
    moved = sum(trained[i] != c for i, c in read_clips(str(out / "clips" / "round-00.parquet")).items())
    assert result["rounds"][1]["edited"] == moved > 0
    assert (out / "teacher" / WEIGHTS).read_bytes() == (out / "export" / WEIGHTS).read_bytes()
    assert evaluated == [f"{out}/export"]  # the final evaluation, once, of the trained student


class RayStarted(Exception):
    """Raised where a command would start Ray (`ray_stub`): what ran before it is what is checked."""


@pytest.fixture
def ray_stub(monkeypatch):
    import clipray.runtime

    def no_ray(*a, **k):
        raise RayStarted

    monkeypatch.setattr(clipray.runtime, "init_ray", no_ray)


def test_a_resume_with_another_training_setting_is_refused_before_ray_starts(events, tmp_path, ray_stub):
    """A stopped editing run re-run with another data.batch_size (the training run's settings
    check, as `clipray train` makes it): refused when its round's training started, after Ray
    and the round's scoring job, which scores every caption again (hours on a real set). Now
    refused before Ray starts. Ray is a stub that fails the test if reached."""
    import dataclasses

    from clipray.config import ConfigError
    from train.edit import run

    cfg = load_config(EDIT_DEMO, overrides(events["events_manifest"], tmp_path, "moved-batch"))
    with pytest.raises(RayStarted):
        run(cfg)  # a new run: its settings recorded, then Ray would start
    out = tmp_path / "moved-batch"
    (out / "checkpoint_2026-01-01_00-00-00.000000").mkdir()  # the warm-up's checkpoint
    (out / "checkpoint_manager_snapshot.json").write_text("{}")  # and Ray Train's record of it
    rec = {"round": 0, "epoch": 1, "edited": 0, "mean_shift_s": 0.0, "train_tiou": 0.5, "mean_width_s": 2.0,
           "val_r1": 10.0, "val_r5": 50.0, "val_r10": 100.0, "val_rsum": 160.0, "teacher_updated": True}
    (out / "edit_state.json").write_text(json.dumps({"edit": dataclasses.asdict(cfg.edit), "records": [rec],
                                                     "skips": [], "clips": {},
                                                     "source": events["events_manifest"]}))
    with pytest.raises(RayStarted):
        run(cfg)  # the same settings resume
    other = load_config(EDIT_DEMO, overrides(events["events_manifest"], tmp_path, "moved-batch",
                                             **{"data.batch_size": 2}))
    with pytest.raises(ConfigError, match=r"data\.batch_size: 4 -> 2"):
        run(other)
    # a state cut by a write that stopped midway (in place, before 01c7ad5): a line naming it,
    # not json's JSONDecodeError traceback out of every later run
    (out / "edit_state.json").write_text((out / "edit_state.json").read_text()[:40])
    with pytest.raises(ConfigError, match=rf"^{out / 'edit_state.json'}: not readable \(cut by a write that "
                                          r"stopped midway\?\), and the editing run cannot go on without it"):
        run(cfg)
    # edited by hand into an object without its keys: a KeyError or AttributeError traceback
    for edited in ({"source": events["events_manifest"]}, {"edit": [], "records": [], "skips": [], "clips": {}}):
        (out / "edit_state.json").write_text(json.dumps(edited))
        with pytest.raises(ConfigError, match=rf"^{out / 'edit_state.json'}: not readable"):
            run(cfg)


def test_a_run_stopped_in_its_warm_up_is_checked_against_its_edit_settings(events, tmp_path, ray_stub):
    """The edit.* settings and the manifest were recorded first after round 0: a run stopped in
    its warm-up (with a checkpoint) resumed with edit.init=window or another data.manifest,
    round 0's clips made anew from them, unchecked. They are recorded before the warm-up now;
    a record from a start that trained nothing yet (no checkpoint) does not hold a re-run."""
    from clipray.config import ConfigError
    from train.edit import run

    cfg = load_config(EDIT_DEMO, overrides(events["events_manifest"], tmp_path, "warm"))
    window = load_config(EDIT_DEMO, overrides(events["events_manifest"], tmp_path, "warm",
                                              **{"edit.init": "window", "edit.window_s": 1}))
    out = tmp_path / "warm"
    with pytest.raises(RayStarted):
        run(cfg)
    state = json.loads((out / "edit_state.json").read_text())
    assert state["records"] == [] and state["edit"]["init"] == "midpoint" and len(state["clips"]) == 29
    with pytest.raises(RayStarted):  # nothing trained yet: another setting starts afresh
        run(window)
    assert json.loads((out / "edit_state.json").read_text())["edit"]["init"] == "window"
    with pytest.raises(RayStarted):
        run(cfg)
    (out / "checkpoint_2026-01-01_00-00-00.000000").mkdir()  # the warm-up's checkpoint
    (out / "checkpoint_manager_snapshot.json").write_text("{}")  # and Ray Train's record of it
    with pytest.raises(ConfigError, match=r"other edit.\* settings \(edit.init: 'midpoint' -> 'window'; "
                                          r"edit.window_s: 0.0 -> 1.0\)"):
        run(window)
    with pytest.raises(RayStarted):  # the same settings resume
        run(cfg)


@pytest.mark.parametrize("extra, says", [
    ({"data.batch_size": 15}, "^29 training rows cannot fill one step of 30 clips"),
    # 29 // (4 x 2 workers) = 3 steps an epoch, over a warm-up epoch and one round's epoch: 6
    ({"train.grad_accum": 7}, r"^train.grad_accum=7 is more than the run's 6 steps"),
    ({"data.split": "val"}, r"^data.split=val: training reads the manifest's train rows"),
])
def test_too_few_training_captions_for_a_step_are_refused_before_ray_starts(events, tmp_path, monkeypatch,
                                                                            extra, says):
    """29 training captions and a batch of 2 x 15 (or fewer batches than one optimiser step takes):
    the warm-up's training refused it, after the run folder, the duration probes and Ray."""
    import clipray.runtime
    from clipray.config import ConfigError
    from train.edit import run

    assert read_manifest(events["events_manifest"])["split"].to_pylist().count("train") == 29

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(clipray.runtime, "init_ray", no_ray)
    with pytest.raises(ConfigError, match=says):
        run(load_config(EDIT_DEMO, overrides(events["events_manifest"], tmp_path, "few", **extra)))
    assert not (tmp_path / "few").exists()


def test_too_few_usable_training_captions_are_refused_before_ray_starts(events, tmp_path, monkeypatch):
    """22 of the 29 training timestamps past their video's end: the 7 captions left cannot fill
    a step of 2 x 4, which the warm-up's training found only after Ray started."""
    import clipray.runtime
    from clipray.config import ConfigError
    from clipray.manifest import write_manifest
    from train.edit import run

    root = Path(events["events_manifest"]).parent
    rows = read_manifest(events["events_manifest"]).to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    for r in train[7:]:
        r.update(timestamp=r["duration"] + 1, start=None, end=None, duration=None)  # probed from the file
    for r in rows:
        r["path"] = str(root / r["path"])
    manifest = str(tmp_path / "late.parquet")
    write_manifest(rows, manifest, keep_row_ids=True)

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(clipray.runtime, "init_ray", no_ray)
    with pytest.raises(ConfigError, match="^7 usable training captions cannot fill one step of 8 clips"):
        run(load_config(EDIT_DEMO, overrides(manifest, tmp_path, "late")))
    assert not (tmp_path / "late").exists()  # refused before its run folder was made
