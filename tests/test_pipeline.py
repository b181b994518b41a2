"""The Ray Data pipeline on a real local Ray: good clips arrive exact, bad ones are reported."""

import json
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest

from bad_videos import GatedServer, plant
from clipray.config import DataConfig, VideoConfig
from clipray.manifest import read_manifest, write_manifest
from clipray.pipeline import NO_WORDS, ClipDecoder, clip_dataset, collect_skips
from clipray.video import decode_clip


@pytest.fixture
def planted_manifest(tmp_path, synth_small, real_video):
    root = synth_small["manifest"].rsplit("/", 1)[0]
    good = read_manifest(synth_small["manifest"]).to_pylist() + \
        read_manifest(synth_small["events_manifest"]).to_pylist()
    for r in good:
        r["path"] = f"{root}/{r['path']}"
        r["split"] = "train"
    bad_files = plant(real_video, tmp_path / "bad")
    server = GatedServer(real_video.read_bytes())  # never opened: every read of it hangs
    expected = {kind: reason for kind, reason in [
        ("missing", "missing file"), ("empty", "empty file"), ("truncated", "not a decodable video"),
        ("truncated_faststart", ("decode failed", "not a decodable video")), ("corrupt", "not a decodable video"),
        ("not_video", "not a decodable video"), ("outside", "window"), ("stall", "decode timed out")]}
    bad = [dict(video_id=k, path=str(p), caption=f"bad {k}", split="train") for k, p in bad_files.items()]
    bad.append(dict(video_id="outside", path=good[0]["path"], start=60.0, end=70.0,
                    caption="bad outside", split="train"))
    bad.append(dict(video_id="stall", path=server.url, caption="bad stall", split="train"))
    # windows past their 2 s video's end: 7 s past (a wrong end: cut and reported, not skipped),
    # and less than a frame (1/8 s) past (a rounded end: not worth a report)
    good.insert(3, dict(good[0], video_id="cut", start=0.5, end=9.0, caption="cut at the end"))
    good.insert(5, dict(good[0], video_id="rounded", start=0.5, end=2.1, caption="rounded end"))
    # eight bad rows in a row hold at least one whole decode batch (4 rows) with no good clip,
    # and one more ends the stream
    rows = good[:30] + bad + good[30:] + bad[:1]
    write_manifest(rows, tmp_path / "planted.parquet")
    yield tmp_path / "planted.parquet", rows, expected
    server.close()


def footer_readers() -> set[str]:
    """Ray Data's V2 Parquet reader starts these actors (32 by default) on every execution."""
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(filters=[("class_name", "=", "FooterReader")], limit=10_000)}


@pytest.mark.parametrize("pool", ["tasks", "actors"])
def test_bad_files_skipped_and_reported(ray_local, planted_manifest, tmp_path, pool):
    manifest, rows, expected = planted_manifest
    bad_ids = {i for i, r in enumerate(rows) if r["caption"].startswith("bad ")}
    assert 0.09 < len(bad_ids) / len(rows) < 0.2
    cfg = VideoConfig(fps=2.0, max_frames=6, size=48, timeout_s=4.0)
    data = DataConfig(manifest=str(manifest), video=cfg, decode_pool=pool, decode_actors=2,
                      decode_cpus=0.5, decode_batch=4, max_words=16)
    run = tmp_path / "run"
    readers = footer_readers()
    t0 = time.time()
    got = {}
    for b in clip_dataset(data, str(run)).iter_batches(batch_size=5, batch_format="numpy"):
        assert b["frames"].shape[1:] == (6, 3, 48, 48) and b["frames"].dtype == np.uint8
        assert b["tokens"].shape[1] == 16 and b["frame_mask"].shape[1] == 6
        for i, rid in enumerate(b["row_id"]):
            got[int(rid)] = (b["frames"][i], b["frame_mask"][i], b["tokens"][i])
    assert time.time() - t0 < 120, "pipeline stalled"
    assert footer_readers() == readers  # the manifest was read without starting an actor
    assert set(got) == set(range(len(rows))) - bad_ids  # every good clip, once
    tok = open_clip.get_tokenizer(data.tokenizer, context_length=16)
    for rid in got:  # every clip's frames are what a direct decode gives: none was overwritten
        r = rows[rid]
        ref = decode_clip(r["path"], r.get("start"), r.get("end"), cfg)
        frames, mask, tokens = got[rid]
        assert np.array_equal(frames, ref.frames) and np.array_equal(mask, ref.mask)
        assert mask.sum() >= 1 and frames[: mask.sum()].any()
        # its own caption's tokens, though the decoders dropped the bad rows between them
        assert tokens.tolist() == tok([r["caption"]])[0].tolist() and tokens[0] == 49406
    report = collect_skips(str(run))
    assert report["skipped"] == len(bad_ids)
    on_disk = [json.loads(line) for line in (run / "skip_report.jsonl").read_text().splitlines()]
    assert {r["row_id"] for r in on_disk} == bad_ids
    for rec in on_disk:
        assert rec["reason"].startswith(expected[rec["video_id"]]), rec
    assert sum(report["by_reason"].values()) == len(bad_ids)
    # the window past the video's end was decoded cut there, and is listed apart from the skips
    cut = rows[3]
    assert decode_clip(cut["path"], 0.5, 9.0, cfg).indices == decode_clip(cut["path"], 0.5, 2.0, cfg).indices == [4, 8, 12]
    assert report["cut"] == 1 and report["cut_report"] == f"{run}/cut_report.jsonl"
    assert [json.loads(line) for line in (run / "cut_report.jsonl").read_text().splitlines()] == [
        {"kind": "cut", "row_id": 3, "video_id": "cut", "path": cut["path"], "start": 0.5, "end": 9.0, "length": 2.0}]


def test_decode_pool_too_big_for_the_local_ray_fails_at_once(ray_local, synth_small, tmp_path):
    """The embedded Ray never grows: a pool that cannot fit it beside one CPU for Ray Data's
    read tasks would wait forever (`clipray bench data --cores 8` did, on 4 CPUs), so it fails
    when the dataset is built, naming the keys and the CPUs there are."""
    import ray

    from clipray.config import ConfigError
    from clipray.runtime import check_fits

    assert ray.cluster_resources()["CPU"] == 4  # the session's Ray (conftest), which init_ray started
    data = DataConfig(manifest=synth_small["manifest"], decode_actors=4, decode_cpus=0.8)
    with pytest.raises(ConfigError, match=r"needs 4.2 CPUs at once \(data.decode_actors x "
                                          r"data.decode_cpus = 3.2; 1 for Ray Data's read tasks\), "
                                          r"but the local Ray has 4 \(ray.num_cpus\)"):
        clip_dataset(data, str(tmp_path))
    check_fits({"a": 2.0, "b": 1.0})  # 3 + 1 for reads: exactly the 4 there are
    with pytest.raises(ConfigError, match=r"a = 2; b = 1.5"):
        check_fits({"a": 2.0, "b": 1.5})


def test_a_batch_whose_clips_are_all_skipped_returns_no_columns_but_the_report(synth_small, tmp_path):
    """Ray Data cannot make a block of a zero-row tensor column (it warns and pickles it), and a
    partly downloaded HowTo100M has whole batches of one missing video's captions."""
    rows = read_manifest(synth_small["manifest"]).to_pylist()[:4]
    data = DataConfig(manifest="unused", video=VideoConfig(fps=2.0, max_frames=4, size=32))
    root = str(Path(synth_small["manifest"]).parent)
    dec = ClipDecoder(data, root, str(tmp_path))

    def batch(paths):
        return {"row_id": np.arange(len(paths)), "video_id": np.array([r["video_id"] for r in rows]),
                "path": np.array(paths), "start": np.array([None] * 4), "end": np.array([None] * 4),
                "caption": np.array([r["caption"] for r in rows])}

    assert dec(batch([f"gone/{i}.mp4" for i in range(4)])) == {}
    report = [json.loads(line) for f in sorted((tmp_path / "skips").iterdir()) for line in f.read_text().splitlines()]
    assert [(r["row_id"], r["reason"].split(":")[0]) for r in report] == [(i, "missing file") for i in range(4)]
    out = dec(batch([rows[0]["path"], "gone/x.mp4", rows[2]["path"], rows[3]["path"]]))
    assert out["row_id"].tolist() == [0, 2, 3] and out["frames"].shape == (3, 4, 3, 32, 32)
    assert out["frame_mask"].sum(axis=1).min() >= 1  # real frames, no zero stand-in
    assert (out["tokens"] == dec.tokenize([rows[i]["caption"] for i in (0, 2, 3)]).numpy()).all()

    # a caption the tokenizer cleans to no words trained as the empty text: skipped, with its reason
    rows[1]["caption"], rows[3]["caption"] = "&nbsp;", "\x00 \x07"
    out = dec(batch([r["path"] for r in rows]))
    assert out["row_id"].tolist() == [0, 2]
    assert (out["tokens"] == dec.tokenize([rows[0]["caption"], rows[2]["caption"]]).numpy()).all()
    report = [json.loads(line) for f in sorted((tmp_path / "skips").iterdir()) for line in f.read_text().splitlines()]
    assert [(r["row_id"], r["reason"]) for r in report[-2:]] == [(1, NO_WORDS), (3, NO_WORDS)]


def test_skip_report_keeps_rows_of_two_manifests_that_share_a_row_id(synth_small, tmp_path):
    """Training and evaluation on data.eval_manifest write their skips into one run folder, and
    both manifests number their rows from 0: the report counts each row once (a re-executed
    block reports its rows again), not each row id."""
    data = DataConfig(manifest="unused", video=VideoConfig(fps=2.0, max_frames=4, size=32))
    train, test = ClipDecoder(data, str(tmp_path / "train"), str(tmp_path)), \
        ClipDecoder(data, str(tmp_path / "eval"), str(tmp_path))

    def batch(videos):
        n = len(videos)
        return {"row_id": np.arange(n), "video_id": np.array(videos), "path": np.array([f"{v}.mp4" for v in videos]),
                "start": np.array([None] * n), "end": np.array([None] * n), "caption": np.array(["a cat"] * n)}

    assert train(batch(["t0", "t1", "t2"])) == {} and test(batch(["e0", "e1"])) == {}
    assert train(batch(["t0", "t1", "t2"])) == {}  # the same rows again
    report = collect_skips(str(tmp_path))
    assert report["skipped"] == 5 and report["by_reason"] == {"missing file": 5}
    on_disk = [json.loads(line) for line in (tmp_path / "skip_report.jsonl").read_text().splitlines()]
    assert [(r["row_id"], r["video_id"]) for r in on_disk] == [(0, "e0"), (0, "t0"), (1, "e1"), (1, "t1"), (2, "t2")]


def test_a_decoder_reports_a_cut_clip_once_and_a_run_begun_again_drops_the_old_cut_report(tmp_path, synth_small):
    """Each pass over the rows (every epoch, every evaluation) reported a cut clip again: a skip
    file for each batch that held one, in each epoch, where skips are rare and cuts of a whole
    dataset's rounded-up ends may not be. A decoder reports each once. And the cut report was
    written only when there were cuts: a run begun again in the same folder (its skips/ removed)
    with none kept the earlier attempt's list."""
    root = synth_small["manifest"].rsplit("/", 1)[0]
    row = read_manifest(synth_small["manifest"]).to_pylist()[0]
    batch = {"row_id": np.array([0, 1]), "video_id": np.array(["cut", "whole"]),
             "path": np.array([f"{root}/{row['path']}"] * 2), "start": np.array([0.5, np.nan]),
             "end": np.array([9.0, np.nan]), "caption": np.array(["a", "b"])}
    dec = ClipDecoder(DataConfig(manifest="unused", video=VideoConfig(fps=2.0, max_frames=4, size=32)),
                      root, str(tmp_path))
    for _ in range(3):  # three passes: three epochs
        assert dec(batch)["row_id"].tolist() == [0, 1]
    assert len(list((tmp_path / "skips").iterdir())) == 1
    report = collect_skips(str(tmp_path))
    assert (report["skipped"], report["cut"]) == (0, 1)
    assert [json.loads(line)["row_id"] for line in (tmp_path / "cut_report.jsonl").read_text().splitlines()] == [0]
    for f in (tmp_path / "skips").iterdir():  # begun again: driver.check_resume removes skips/
        f.unlink()
    report = collect_skips(str(tmp_path))
    assert (report["skipped"], report["cut"]) == (0, 0) and not (tmp_path / "cut_report.jsonl").exists()


def test_a_skip_file_cut_by_a_full_disk_is_not_read_into_the_report(tmp_path, file_size_limit):
    """A decoder's skip file written in place and cut midway (a full disk; here a file size
    limit, EFBIG) left a line cut, and the skip report at the run's end (or beside a failed
    run's error) failed on its JSONDecodeError traceback after every epoch had trained. It is
    now written whole or not at all: the report reads the files that are."""
    res = file_size_limit(
        4096, "dec._report([{'row_id': i, 'video_id': f'v{i}', 'path': f'/videos/v{i}.mp4',\n"
              "              'reason': 'missing file'} for i in range(1, 1000)])", tmp_path,
        setup="from clipray.config import DataConfig\nfrom clipray.pipeline import ClipDecoder\n"
              "dec = ClipDecoder(DataConfig(manifest='unused'), '/videos', sys.argv[1])\n"
              "dec._report([{'row_id': 0, 'video_id': 'v0', 'path': '/videos/v0.mp4', 'reason': 'missing file'}])\n")
    assert res.returncode == 0 and res.stdout.split()[-1] == "27", res.stderr
    report = collect_skips(str(tmp_path))
    assert report["skipped"] == 1 and report["by_reason"] == {"missing file": 1}


def test_a_skip_report_written_on_a_full_disk_is_an_error_naming_it(tmp_path, file_size_limit):
    """The skip report is written after every epoch has trained: a full disk (here a file size
    limit, EFBIG) was Python's OSError naming no file, and the run ended in its traceback."""

    (tmp_path / "skips").mkdir()
    (tmp_path / "skips" / "w-000001.jsonl").write_text("".join(
        json.dumps({"row_id": i, "video_id": f"v{i}", "path": f"/videos/v{i}.mp4", "reason": "missing file"}) + "\n"
        for i in range(1000)))
    before = '{"row_id": 0, "video_id": "v0", "path": "/videos/v0.mp4", "reason": "missing file"}\n'
    (tmp_path / "skip_report.jsonl").write_text(before)  # an earlier call's (a resumed run's)
    res = file_size_limit(4096, "collect_skips(sys.argv[1])", tmp_path,
                          setup="from clipray.pipeline import collect_skips\n")
    assert res.returncode == 0 and res.stdout.split() == [str(tmp_path / "skip_report.jsonl"), "27"], \
        (res.stdout, res.stderr)
    # left as it was, not cut midway through a line
    assert (tmp_path / "skip_report.jsonl").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["skip_report.jsonl", "skips"]


def test_skip_report_holds_each_skipped_row_once_not_every_file_read_first(tmp_path):
    """collect_skips read every skip file before parsing one, so the driver held every line
    the decoders ever wrote (a row skipped in every epoch or pass over a streamed manifest once
    per pass), then a dict per row, a list and the whole report as one string: 1M skipped rows
    took 1.3 GB at the end of a run. Now a window of files at a time, a line per row: the peak
    of Python's allocations stays far below the lines on disk."""
    import tracemalloc

    skips = tmp_path / "skips"
    skips.mkdir()
    reason = "decode failed: " + "x" * 60
    rows = [json.dumps({"row_id": i, "video_id": f"v{i}", "path": f"/videos/v{i}.mp4", "reason": reason})
            for i in range(500)]
    body = "".join(r + "\n" for r in rows)
    files = 400  # 200k lines: 500 rows skipped by each of 400 batches, epochs or passes
    for n in range(files):
        (skips / f"w{n % 7}-{n:06d}.jsonl").write_text(body)
    tracemalloc.start()
    try:
        report = collect_skips(str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report["skipped"] == 500 and report["by_reason"] == {"decode failed": 500}
    assert (tmp_path / "skip_report.jsonl").read_text().splitlines() == rows  # row order, each once
    assert peak < 0.4 * len(body) * files, f"peak {peak / 1e6:.1f} MB for {len(body) * files / 1e6:.1f} MB of lines"


@pytest.mark.parametrize("name", ["exp [2]", "exp::2"])
def test_skip_report_of_a_run_folder_whose_name_has_glob_brackets(synth_small, tmp_path, name):
    """A run named "exp [2]": its skip files were globbed with the folder's name in the
    pattern, where "[2]" matches "2" only, so the report came out empty and the run said 0.
    "exp::2": fsspec read '::' as a chain of filesystems, and every skip file was written over
    the one before as a file "exp" beside the run, the report empty."""
    run = tmp_path / name
    dec = ClipDecoder(DataConfig(manifest="unused", video=VideoConfig(fps=2.0, max_frames=4, size=32)),
                      str(tmp_path), str(run))
    assert dec({"row_id": np.arange(3), "video_id": np.array(["a", "b", "c"]),
                "path": np.array(["a.mp4", "b.mp4", "c.mp4"]), "start": np.array([None] * 3),
                "end": np.array([None] * 3), "caption": np.array(["x", "y", "z"])}) == {}
    report = collect_skips(str(run))
    assert report["skipped"] == 3 and report["by_reason"] == {"missing file": 3}
    on_disk = [json.loads(line) for line in (run / "skip_report.jsonl").read_text().splitlines()]
    assert [(r["row_id"], r["video_id"]) for r in on_disk] == [(0, "a"), (1, "b"), (2, "c")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_decoders_tokenizer_cache_stays_bounded_with_the_same_tokens(synth_small, tmp_path, monkeypatch):
    """A decoder lives through every shard and epoch of its process, and open_clip's tokenizer
    keeps the BPE of every word it has seen: over HowTo100M's ASR text (millions of distinct
    words) each decode process grew by ~210 bytes a word. Its cache starts afresh past
    pipeline.TOKEN_CACHE_MAX words, and the tokens stay open_clip's."""
    import random
    import string

    from clipray import pipeline

    monkeypatch.setattr(pipeline, "TOKEN_CACHE_MAX", 500)
    row = read_manifest(synth_small["manifest"]).to_pylist()[0]
    dec = ClipDecoder(DataConfig(manifest="unused", video=VideoConfig(fps=1.0, max_frames=2, size=32)),
                      str(Path(synth_small["manifest"]).parent), str(tmp_path))
    ref, rng = open_clip.get_tokenizer("ViT-B-32", context_length=DataConfig().max_words), random.Random(0)
    for step in range(40):  # 40 batches of 6 new words a row, 8 rows: 1,920 words
        caps = [" ".join("".join(rng.choices(string.ascii_lowercase, k=7)) for _ in range(6)) for _ in range(8)]
        out = dec({"row_id": np.arange(8), "video_id": np.array([row["video_id"]] + ["gone"] * 7),
                   "path": np.array([row["path"]] + ["gone.mp4"] * 7), "start": np.array([None] * 8),
                   "end": np.array([None] * 8), "caption": np.array(caps)})
        assert out["tokens"].tolist() == ref(caps[:1]).tolist(), step  # the one real clip's caption
        assert len(dec.tokenize.cache) <= 500 + 48 + 2, (step, len(dec.tokenize.cache))


def test_decode_tasks_keep_one_decoder_per_process_and_settings(synth_small, tmp_path):
    """Every decode task that lands on a warm worker reuses that process's ClipDecoder (its
    tokenizer and batch arrays) for the same settings, and only for the same settings."""
    from clipray import pipeline

    rows = read_manifest(synth_small["manifest"]).to_pylist()[:2]
    batch = {k: np.array([r[k] for r in rows]) for k in ("row_id", "video_id", "path", "caption")}
    batch["start"] = batch["end"] = np.array([None, None])
    root = str(Path(synth_small["manifest"]).parent)
    small = DataConfig(manifest="unused", video=VideoConfig(fps=2.0, max_frames=4, size=32))
    pipeline._DECODERS.clear()
    first = pipeline.decode_batch(batch, small, root, str(tmp_path / "a"))
    dec = next(iter(pipeline._DECODERS.values()))
    again = pipeline.decode_batch(batch, small, root, str(tmp_path / "a"))
    assert list(pipeline._DECODERS.values()) == [dec]  # the same decoder served both tasks
    assert again["row_id"].tolist() == first["row_id"].tolist() == [r["row_id"] for r in rows]
    assert (again["frames"] == ClipDecoder(small, root, str(tmp_path))(batch)["frames"]).all()
    # other frames or another run's skip folder: a decoder of its own, never the first one
    bigger = DataConfig(manifest="unused", video=VideoConfig(fps=2.0, max_frames=4, size=48))
    assert pipeline.decode_batch(batch, bigger, root, str(tmp_path / "a"))["frames"].shape == (2, 4, 3, 48, 48)
    for run in "bcde":
        pipeline.decode_batch(batch, small, root, str(tmp_path / run))
    assert len(pipeline._DECODERS) == 4 and dec not in pipeline._DECODERS.values()  # bounded, oldest out
    pipeline._DECODERS.clear()


def test_decoders_tokenise_as_open_clip_without_importing_it(synth_small, tmp_path):
    """A decode actor starts on every dataset execution (every epoch and evaluation); importing
    torchvision and the open_clip package took about 2 s of that (`clipray bench startup`). A
    decoder in a fresh interpreter imports neither, and its tokens are open_clip's own. Names
    whose tokenizer is not plain CLIP BPE (a Hugging Face one, options, no built-in config) go to
    open_clip."""
    import subprocess
    import sys

    rows = read_manifest(synth_small["manifest"]).to_pylist()[:3]
    captions = [r["caption"] for r in rows] + ["Ünïcode &amp; punctuation!!", "a " * 40]
    code = f"""
import json, sys, numpy as np
from clipray.config import DataConfig, VideoConfig
from clipray.pipeline import ClipDecoder, caption_tokenizer
rows = {[{k: r[k] for k in ("row_id", "video_id", "path", "caption")} for r in rows]!r}
batch = {{k: np.array([r[k] for r in rows]) for k in ("row_id", "video_id", "path", "caption")}}
batch["start"] = batch["end"] = np.array([None] * len(rows))
data = DataConfig(manifest="unused", video=VideoConfig(fps=2.0, max_frames=4, size=32), max_words=16)
out = ClipDecoder(data, {str(Path(synth_small["manifest"]).parent)!r}, {str(tmp_path)!r})(batch)
assert out["frames"].shape == (3, 4, 3, 32, 32)
tokens = {{name: caption_tokenizer(name, n)({captions!r}).tolist() for name, n in (("ViT-B-32", 16), ("ViT-L-14", 77))}}
imported = sorted(m for m in ("open_clip", "torchvision") if m in sys.modules)
try:  # the tokenizer another name gets, before anything here has imported open_clip
    other = type(caption_tokenizer(sys.argv[1], 16)).__module__
except Exception as e:
    other = type(e).__name__
print(json.dumps({{"decoder": out["tokens"].tolist(), "tokens": tokens, "imported": imported, "other": other}}))
"""
    others = {}
    routes = ("no-such-model", "mt5-base-ViT-B-32", "ViT-B-16-SigLIP")  # HF; HF + options
    for name in routes:  # a fresh interpreter each
        res = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        got = json.loads(res.stdout.splitlines()[-1])
        others[name] = got["other"]
        assert got["imported"] == []
        assert got["decoder"] == open_clip.get_tokenizer("ViT-B-32", context_length=16)(captions[:3]).tolist()
        for clip_name, n in (("ViT-B-32", 16), ("ViT-L-14", 77)):
            assert got["tokens"][clip_name] == open_clip.get_tokenizer(clip_name, context_length=n)(captions).tolist()
    assert others["no-such-model"] == "open_clip.tokenizer"  # open_clip's default, via open_clip
    for name in routes[1:]:  # these need transformers: the same class, or the same error, as open_clip's
        try:
            want = type(open_clip.get_tokenizer(name, context_length=16)).__module__
        except Exception as e:
            want = type(e).__name__
        assert others[name] == want and want != "clipray._open_clip_tokenizer"


def test_frames_buffer_reused_only_once_released(tmp_path):
    """A decoder writes the next batch into an earlier batch's array only when nothing
    holds it: here the holder is the block Ray Data builds from the returned batch."""
    from ray.data.block import BlockAccessor

    dec = ClipDecoder(DataConfig(manifest="unused"), str(tmp_path), str(tmp_path))
    shape = (4, 2, 3, 8, 8)
    first = dec._frames_buffer(shape)
    first[:] = 1
    block = BlockAccessor.batch_to_block({"frames": first[:3]})  # a view, wrapped without a copy
    addr = first.ctypes.data
    del first
    second = dec._frames_buffer(shape)
    assert second.ctypes.data != addr  # the block still holds the first: a new array
    second[:] = 2
    kept = BlockAccessor.for_block(block).to_numpy("frames")
    assert kept.shape == (3, 2, 3, 8, 8) and (kept == 1).all()  # the first batch is intact
    addr2 = second.ctypes.data
    del second
    assert dec._frames_buffer(shape).ctypes.data == addr2  # free again, so reused
    del block, kept
    held = [dec._frames_buffer(shape) for _ in range(5)]  # both free ones, then new ones
    assert {a.ctypes.data for a in held[:2]} == {addr, addr2}
    assert len({a.ctypes.data for a in held}) == 5 and len(dec._buffers) == 4  # the pool is bounded
    del held
    # every pooled array is free now, but none has this shape
    assert dec._frames_buffer((1, 2, 3, 8, 8)).shape == (1, 2, 3, 8, 8)


def test_consumed_batch_memory_is_reused(ray_local):
    """The embedded Ray deletes a consumed batch from the object store within a fraction of a
    second (clipray.runtime), so the next batch is written into store memory its writer has
    touched already instead of taking a page fault on every 4 kB of fresh memory."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Writer:  # a new process: none of the store's pages are mapped in it yet
        def run(self, rounds: int, nbytes: int) -> int:
            import resource

            batch = np.ones(nbytes, np.uint8)  # its own pages are touched before counting
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(rounds):
                ref = ray.put(batch)  # one copy into the object store, as a decoded batch
                del ref  # consumed: nothing holds it any more
                time.sleep(0.1)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    rounds, nbytes = 16, 32 << 20
    faults = ray.get(Writer.remote().run.remote(rounds, nbytes))
    pages = nbytes // 4096
    # measured: one batch's worth (the first); 9 with Ray's default of deleting once a second
    assert faults < 4 * pages, f"{faults} page faults for {rounds} batches of {pages} pages"


def test_ray_data_info_lines_stay_in_its_log_not_on_the_console(ray_local):
    """Ray Train runs each dataset's executor in a coordinator actor whose console Ray forwards
    to the driver: with Ray Data's default logging, every epoch and evaluation printed a
    "Dataset ... execution finished" line, and each coordinator a "Progress bars disabled"
    notice, in the middle of training's own lines. The embedded Ray keeps both in Ray Data's
    log file only (clipray/ray_data_logging.yaml)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    name = f"logcheck{time.time_ns()}"
    ds = ray.data.range(64).map_batches(lambda b: b)
    ds.set_name(name)

    @ray.remote(num_cpus=0)
    def consume(it) -> int:
        return sum(len(b["id"]) for b in it.iter_batches(batch_size=8))

    # streaming_split runs the executor in a SplitCoordinator actor, as Ray Train does
    assert sum(ray.get([consume.remote(it) for it in ds.streaming_split(2)])) == 64

    def lines_naming_it(files) -> list[str]:
        return [line for f in files for line in f.read_text(errors="replace").splitlines() if name in line]

    deadline = time.time() + 30
    while not any("execution finished" in line for line in lines_naming_it(logs.glob("ray-data/ray-data.log"))):
        assert time.time() < deadline, "Ray Data's log never recorded the execution"
        time.sleep(0.2)
    # the coordinator writes its console to its worker's .err/.out files, which Ray forwards
    console = [f for f in logs.glob("worker-*") if f.suffix in (".err", ".out")]
    assert console, "no worker console files to check"
    assert lines_naming_it(console) == []
    notices = [line for f in console for line in f.read_text(errors="replace").splitlines()
               if "Progress bars disabled" in line]
    assert notices == []


def test_shuffled_rows_mix_a_manifest_that_lists_each_videos_captions_together(ray_local, synth_small, tmp_path):
    """Manifests list a video's captions together (MSR-VTT: 20 in a row), and a batch holding
    two captions of one video scores one of them as the other's negative. With `shuffle` the
    rows are shuffled before decoding: a batch of B from N rows, k per video, then holds about
    B(B-1)/2 x (k-1)/(N-1) such pairs, as uniform sampling does; every row still arrives once,
    with its own video's frames, and each execution (epoch) draws a new order."""
    root = synth_small["manifest"].rsplit("/", 1)[0]
    first = {}
    for r in read_manifest(synth_small["manifest"]).to_pylist():
        first.setdefault(r["video_id"], r)
    videos, k, B = list(first.values())[:12], 8, 8
    rows = [dict(r, path=f"{root}/{r['path']}", caption=f"{r['caption']} ({j})", split="train")
            for r in videos for j in range(k)]  # each video's 8 captions in a row
    write_manifest(rows, tmp_path / "grouped.parquet")
    cfg = VideoConfig(fps=2.0, max_frames=2, size=32)
    data = DataConfig(manifest=str(tmp_path / "grouped.parquet"), video=cfg, decode_actors=2,
                      decode_cpus=0.5, decode_batch=4, max_words=16)
    ref = {r["video_id"]: decode_clip(r["path"], None, None, cfg).frames for r in rows[::k]}

    def epoch(shuffle: bool) -> tuple[list[int], float]:
        order, pairs = [], []
        for b in clip_dataset(data, str(tmp_path / "run"), shuffle=shuffle).iter_batches(
                batch_size=B, batch_format="numpy", drop_last=True):
            vids = [rows[int(rid)]["video_id"] for rid in b["row_id"]]
            for i, v in enumerate(vids):
                assert np.array_equal(b["frames"][i], ref[v])  # the row's own video, decoded
            pairs.append(sum(vids[i] == vids[j] for i in range(B) for j in range(i + 1, B)))
            order += [int(rid) for rid in b["row_id"]]
        return order, float(np.mean(pairs))

    uniform = B * (B - 1) / 2 * (k - 1) / (len(rows) - 1)  # 2.06 same-video pairs per batch
    grouped, grouped_pairs = epoch(shuffle=False)
    first_order, first_pairs = epoch(shuffle=True)
    second_order, second_pairs = epoch(shuffle=True)
    for order in (grouped, first_order, second_order):
        assert sorted(order) == list(range(len(rows)))  # every row once per epoch (12 full batches)
    assert grouped_pairs > 10  # read as listed, batches are one or two videos
    assert first_pairs < 2.5 * uniform and second_pairs < 2.5 * uniform
    assert first_order != second_order



def test_a_key_value_folder_or_a_question_mark_in_the_manifest_path_reads_every_row(ray_local, tmp_path):
    """Ray Data reads Parquet with hive partitioning unless told not to: a `split=test` or
    `caption=...` folder above the manifest replaced every row's split or caption with the
    folder's value (the train split then read no row), and `row_id=7` every row id with '7'.
    data check and read_manifest read the rows as written; the pipeline must too. A '?' in the
    path cut it for Ray Data's extension check, so no file was read and the split had no row."""
    from clipray.pipeline import manifest_rows

    rows = [dict(video_id=f"v{i}", path=f"/videos/{i}.mp4", caption=f"caption {i}", split="train")
            for i in range(5)]
    for sub in ("split=test", "caption=x y", "row_id=7", "what?", "a?b=c"):
        for out in (tmp_path / sub / "m.parquet", tmp_path / sub / "shards"):
            write_manifest(rows, out, rows_per_shard=2)
            got = manifest_rows(DataConfig(manifest=str(out)), "train").take_all()
            assert sorted((r["row_id"], r["video_id"], r["caption"]) for r in got) == \
                [(i, f"v{i}", f"caption {i}") for i in range(5)], (sub, out.name)


def test_a_manifest_without_the_optional_time_columns_reads_as_whole_files(ray_local, tmp_path):
    """A Parquet written by hand with only the required columns passes `clipray data check`
    (its readers fill the optional columns with nulls); the pipeline stopped with a KeyError
    from inside Ray Data ('Column start does not exist'). Its rows are whole files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipray.manifest import check_manifest
    from clipray.pipeline import manifest_rows

    out = tmp_path / "own.parquet"
    pq.write_table(pa.table({"row_id": [0, 1], "video_id": ["a", "b"], "path": ["a.mp4", "b.mp4"],
                             "caption": ["one", "two"], "split": ["train", "train"]}), out)
    assert check_manifest(str(out)).rows == 2
    got = manifest_rows(DataConfig(manifest=str(out)), "train").take_all()
    assert sorted(got, key=lambda r: r["row_id"]) == [
        {"row_id": 0, "video_id": "a", "path": "a.mp4", "start": None, "end": None, "caption": "one"},
        {"row_id": 1, "video_id": "b", "path": "b.mp4", "start": None, "end": None, "caption": "two"}]


def test_a_later_shard_of_another_column_type_is_refused_before_it_is_read(ray_local, tmp_path):
    """Only the first shard's column types were checked: the pipeline read a second shard's int
    video ids and captions as the text '7' and '123', and its text start '0.5' as 0.5 s. A worker
    streaming one shard of a folder has that shard's footer checked, not every other's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipray.manifest import ManifestError
    from clipray.pipeline import manifest_rows

    out = tmp_path / "m"
    write_manifest([dict(video_id="v0", path="a.mp4", caption="a cat", split="train")], out)
    pq.write_table(pa.table({"row_id": [10], "video_id": [7], "path": ["b.mp4"], "start": ["0.5"], "end": ["1.5"],
                             "caption": [123], "split": ["train"]}), out / "part-00001.parquet")
    with pytest.raises(ManifestError) as e:
        manifest_rows(DataConfig(manifest=str(out)), "train")
    assert str(e.value) == (f"{out} (part-00001.parquet): column types differ from the manifest schema: video_id "
                            "is int64, not string; start is string, not double; end is string, not double; "
                            "caption is int64, not string")
    got = manifest_rows(DataConfig(manifest=str(out)), "train", files=[str(out / "part-00000.parquet")]).take_all()
    assert [(r["row_id"], r["caption"]) for r in got] == [(0, "a cat")]


def test_a_path_with_stray_whitespace_decodes_as_the_manifest_check_and_the_index_read_it(synth_small, tmp_path):
    """`clipray data check` and `clipray index` read a manifest row as `check_row` normalises it,
    its path stripped; the decoder of training and evaluation took the raw value, so a
    hand-written manifest whose paths end in a space (CSV "path, caption") passed the check and
    was indexed and served, while training and evaluation skipped every clip as a missing file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipray.manifest import iter_checked

    rows = read_manifest(synth_small["manifest"]).to_pylist()[:2]
    root = str(Path(synth_small["manifest"]).parent)
    dec = ClipDecoder(DataConfig(manifest="unused", video=VideoConfig(fps=2.0, max_frames=4, size=32)),
                      root, str(tmp_path))

    def batch(paths):
        return {"row_id": np.arange(2), "video_id": np.array([r["video_id"] for r in rows]),
                "path": np.array(paths), "start": np.array([None] * 2), "end": np.array([None] * 2),
                "caption": np.array([r["caption"] for r in rows])}

    table = read_manifest(synth_small["manifest"])
    padded = tmp_path / "padded.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("path"), "path",
                                    pa.array([f" {p}\t" for p in table.column("path").to_pylist()])), padded)
    assert [r["path"] for r in iter_checked(padded)][:2] == [r["path"] for r in rows]  # what the index reads
    out = dec(batch([f" {r['path']}\t" for r in rows]))
    assert out and out["row_id"].tolist() == [0, 1], "every clip skipped"
    np.testing.assert_array_equal(out["frames"], dec(batch([r["path"] for r in rows]))["frames"])
