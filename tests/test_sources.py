"""Dataset adapters against tiny fixtures in each release's real format, with hand-computed rows.

Every test prepares a manifest through the public `clipray.sources.prepare`, reads it back with
`clipray.manifest.read_manifest` and compares exact rows (times worked out by hand in the
comments), the videos reported missing and the entries rejected.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict

import pyarrow.parquet as pq
import pytest

from clipray.manifest import manifest_metadata, read_manifest, write_manifest
from clipray.sources import SOURCES, PrepareReport, SourceError, list_sources, prepare
from clipray.sources.didemo import moment
from clipray.sources.lsmdc import clip_folder, parse_time
from clipray.sources.msvd import parse_clip_name, restricted_load

try:  # tests/ may or may not become a package; the helpers live beside this file either way
    from tests import fixtures_sources as fx
except ImportError:
    import fixtures_sources as fx


def table(out, *cols):
    """Manifest rows as tuples of `cols`, in row order."""
    return [tuple(r[c] for c in cols) for r in read_manifest(str(out)).to_pylist()]


TRIPLE = ("video_id", "caption", "split")
TIMED = ("video_id", "start", "end", "caption", "split")


def test_registry_and_options(tmp_path):
    assert list_sources() == ["activitynet", "didemo", "generic", "howto100m", "lsmdc", "msrvtt",
                              "msvd", "youcook2"]
    with pytest.raises(SourceError, match=r"unknown option\(s\) \['view'\].*allowed: .*train_split.*expand"):
        prepare("msrvtt", tmp_path, tmp_path / "m.parquet", view="paragraph")
    with pytest.raises(SourceError, match="must be one of"):
        prepare("activitynet", tmp_path, tmp_path / "m.parquet", view="para")
    with pytest.raises(SourceError, match="unknown source 'kinetics'"):
        prepare("kinetics", tmp_path, tmp_path / "m.parquet")
    # the CLI's `-o key=value` turns '1000' into an int and 'false' into a bool
    assert SOURCES["lsmdc"].resolve_options({"test_set": 1000})["test_set"] == "1000"
    assert SOURCES["msrvtt"].resolve_options({"expand": "no", "rows_per_shard": 1e5}) == {
        "annotations": None, "rows_per_shard": 100000, "train_split": "9k", "expand": False}
    with pytest.raises(SourceError, match="rows_per_shard=2.5 is not of type int"):
        SOURCES["msrvtt"].resolve_options({"rows_per_shard": 2.5})
    with pytest.raises(SourceError, match="MSRVTT_data.json"):  # a wrong root fails before writing
        prepare("msrvtt", tmp_path, tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()


def test_msrvtt_9k_expand_and_report(tmp_path):
    fx.write_msrvtt(tmp_path)
    out = tmp_path / "out" / "msrvtt.parquet"
    rep = prepare("msrvtt", tmp_path, out)
    assert table(out, *TRIPLE) == [
        ("video0", "a red car drives along a wet road", "train"),
        ("video0", "a car on a road", "train"),
        ("video1", "a woman stirs soup in a pot", "train"),  # its "   " caption is rejected
        ("video2", "a dog runs", "train"),
        ("video7011", "a dog chases a ball, then naps", "test"),  # unquoted comma kept in sentence
    ]
    rows = read_manifest(str(out)).to_pylist()
    assert {(r["start"], r["end"]) for r in rows} == {(None, None)}
    assert [r["group"] for r in rows] == [r["video_id"] for r in rows]
    assert rows[3]["path"] == str(tmp_path / "MSRVTT_Videos" / "video2.webm")  # absolute, found by stem
    assert rep.rows == 5 and rep.videos == 4 and rep.captions == 5
    assert rep.per_split == {"train": 4, "test": 1}
    assert rep.missing_videos == ["video3", "video8450"] and rep.missing_count == 2
    assert rep.rejected == {"empty caption": 1} and rep.rejected_count == 1
    assert "sentences[3]" in rep.rejected_examples[0]
    text = str(rep)
    assert "rows      5 (test 1, train 4)" in text and "2 videos not found" in text
    assert "1 x empty caption" in text and "video3, video8450" in text
    assert manifest_metadata(str(out))["train_split"] == "9k"
    assert json.loads(json.dumps(rep.to_dict()))["missing_count"] == 2


@pytest.mark.parametrize("reverse", [False, True])
def test_a_folder_linked_twice_under_the_root_gives_the_same_paths_whatever_the_listing_order(
        tmp_path, monkeypatch, reverse):
    """The walk follows links and lists a folder reached twice once (a loop guard): which of
    its two paths the manifest names must not depend on the order the file system lists the
    root's folders in (ext4: by hash, so one machine's copy and another's differ)."""
    fx.write_msrvtt(tmp_path)
    (tmp_path / "MSRVTT_Videos").rename(tmp_path / "all")
    (tmp_path / "MSRVTT_Videos").symlink_to(tmp_path / "all")
    scandir = os.scandir

    class Listed:  # os.scandir's entries, sorted one way or the other
        def __init__(self, path):
            with scandir(path) as it:
                self.entries = iter(sorted(it, key=lambda e: e.name, reverse=reverse))

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.entries)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(os, "scandir", Listed)
    out = tmp_path / "out.parquet"
    prepare("msrvtt", tmp_path, out)
    paths = {os.path.relpath(r["path"], tmp_path) for r in read_manifest(str(out)).to_pylist()}
    assert paths == {"MSRVTT_Videos/video0.mp4", "MSRVTT_Videos/video1.mp4", "MSRVTT_Videos/video2.webm",
                     "MSRVTT_Videos/video7011.mp4"}


def test_a_second_prepare_into_a_manifest_being_written_is_refused(tmp_path):
    """Two prepares into one --out at once (a command started twice) both wrote the same
    part-00000.parquet.partial: one reported its rows written and left a file that failed every
    read (ArrowInvalid: its pages overwritten by the other's), the other failed renaming a file
    that was gone. The manifest's lock (held here, as a running prepare holds it) refuses the
    second before it writes anything, for a folder of shards as for one file."""
    import fcntl

    fx.write_msrvtt(tmp_path)
    for out in (tmp_path / "out" / "m.parquet", tmp_path / "out" / "shards"):
        out.parent.mkdir(exist_ok=True)
        with open(out.parent / f".{out.name}.prepare.lock", "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(SourceError, match=rf"^{out}: another `clipray data prepare` is writing this "
                                                  r"manifest now: let it finish, or give another --out$"):
                prepare("msrvtt", tmp_path, out)
        assert not out.exists() or not any(out.iterdir())
        assert prepare("msrvtt", tmp_path, out).rows == 5  # released: the next prepare writes it
        assert len(read_manifest(str(out))) == 5


def test_a_manifest_read_while_a_prepare_rewrites_it_says_it_is_being_written(tmp_path, monkeypatch):
    """A folder being written holds `.partial` shards (a rewrite, the old shards beside them
    until the new ones are whole): a run or `data check` reading it meanwhile was told the write
    'stopped midway; write it again', for as long as the prepare ran (hours for HowTo100M)."""
    from clipray.manifest import ManifestError, manifest_files
    from clipray.sources.base import SourceSpec

    out, said = tmp_path / "m", []

    def rows(ctx):
        for i in range(3):
            yield {"video_id": "v", "path": "/v.mp4", "caption": f"c{i}", "split": "train"}
            if i == 0 and ctx.options.get("read"):  # shard 0 written, under its .partial name
                with pytest.raises(ManifestError) as err:
                    manifest_files(str(out))
                said.append(str(err.value))

    monkeypatch.setitem(SOURCES, "fake", SourceSpec("fake", rows, {"read": False}))
    prepare("fake", tmp_path, out, rows_per_shard=1)
    prepare("fake", tmp_path, out, rows_per_shard=1, read=True)
    assert said == [f"{out}: an unfinished manifest (1 *.parquet.partial shard: a `clipray data prepare` is "
                    "writing it now); wait for it to finish"]
    assert table(out, "caption") == [("c0",), ("c1",), ("c2",)]


def test_msrvtt_7k_no_expand_and_semicolon_test_csv(tmp_path):
    fx.write_msrvtt(tmp_path, test_delimiter=";")
    out = tmp_path / "m.parquet"
    rep = prepare("msrvtt", tmp_path, out, train_split="7k", expand="false")  # CLI strings coerce
    assert rep.options["expand"] is False
    assert table(out, *TRIPLE) == [
        ("video0", "a red car drives along a wet road", "train"),  # first caption only
        ("video1", "a woman stirs soup in a pot", "train"),
        ("video7011", "a dog chases a ball, then naps", "test"),
    ]
    assert rep.missing_videos == ["video8450"]  # video3 is not in the 7k list


def test_msrvtt_uri_root_writes_uris(tmp_path):
    fx.write_msrvtt(tmp_path)
    root = f"file://{tmp_path}"
    prepare("msrvtt", root, tmp_path / "m.parquet")
    paths = [r["path"] for r in read_manifest(str(tmp_path / "m.parquet")).to_pylist()]
    assert paths[0] == f"file://{tmp_path}/MSRVTT_Videos/video0.mp4"
    assert all(p.startswith("file://") for p in paths)


def test_a_file_uri_root_and_out_are_paths_as_written(tmp_path):
    """A file:/// root or manifest is the local path after the scheme, as the video decoder
    opens the rows' file:// paths: pyarrow's URI parsing refused a space or an accent (a
    traceback), cut the root at '#' and decoded '%20', so the release was looked for elsewhere."""
    from clipray.video import open_source

    base = tmp_path / "my videos #2 %20 \u00e9"
    fx.write_msrvtt(base)
    rep = prepare("msrvtt", f"file://{base}", f"file://{base}/m.parquet")
    paths = [r["path"] for r in read_manifest(f"file://{base}/m.parquet").to_pylist()]
    assert rep.rows == len(paths) == 5 and (base / "m.parquet").is_file()
    assert paths[0] == f"file://{base}/MSRVTT_Videos/video0.mp4"
    (base / "MSRVTT_Videos/video0.mp4").write_bytes(b"x")
    assert open_source(paths[0]) == str(base / "MSRVTT_Videos/video0.mp4")  # the row's file


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_msvd_pickle_splits_and_multi_captions(tmp_path, protocol):
    fx.write_msvd(tmp_path, protocol=protocol)
    out = tmp_path / "msvd.parquet"
    rep = prepare("msvd", tmp_path, out)
    assert table(out, *TRIPLE, "group") == [
        ("AbCd-fG_hIj_12_20", "a cat plays a piano", "train", "AbCd-fG_hIj_12_20"),
        ("AbCd-fG_hIj_12_20", "a kitten is playing keys", "train", "AbCd-fG_hIj_12_20"),
        ("ZyXwVuT5srq_0_7", "a man slices bread", "val", "ZyXwVuT5srq_0_7"),
        ("cSDkshD2ME0_11_14", "a car turns", "test", "cSDkshD2ME0_11_14"),
    ]
    assert rep.missing_videos == ["gone_clip_1_2"]
    assert rep.rejected == {"empty caption": 1, "listed but absent from raw-captions.pkl": 1}


def test_msvd_clip_names_split_from_the_right():
    assert parse_clip_name("bQJQGoJF7_k_162_169") == ("bQJQGoJF7_k", 162, 169)
    assert parse_clip_name("AbCd-fG_hIj_12_20") == ("AbCd-fG_hIj", 12, 20)
    assert parse_clip_name("cSDkshD2ME0_11_14") == ("cSDkshD2ME0", 11, 14)
    assert parse_clip_name("no_numbers_here") is None


class _Evil:
    """Pickles to a call of os.system: what a hostile 'captions' file would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    fx.write_msvd(tmp_path)
    evil = pickle.dumps({"AbCd-fG_hIj_12_20": _Evil(marker)}, protocol=protocol)
    (tmp_path / "msvd_data/raw-captions.pkl").write_bytes(evil)
    with pytest.raises(SourceError, match=r"raw-captions.pkl: refused: .*(posix|os)\.system"):
        prepare("msvd", tmp_path, tmp_path / "m.parquet")
    assert not marker.exists() and not (tmp_path / "m.parquet").exists()
    # any class reference is refused, even a harmless one
    with pytest.raises(SourceError, match="collections.OrderedDict"):
        restricted_load(__import__("io").BytesIO(pickle.dumps(OrderedDict(a=[["x"]]))), "p")


def test_lsmdc_tabs_times_folders_and_repeated_clips(tmp_path):
    assert parse_time("01.02.27.034") == pytest.approx(3747.034)
    assert parse_time("00.00.03.5") == pytest.approx(3.5)
    with pytest.raises(ValueError):
        parse_time("01:02:27.034")
    assert clip_folder(fx.LSMDC_C) == "0007_Movie_With_Under_Scores"
    fx.write_lsmdc(tmp_path)
    out = tmp_path / "lsmdc.parquet"
    rep = prepare("lsmdc", tmp_path, out)
    got = table(out, "video_id", "caption", "split", "duration", "path")
    A, B, C = fx.LSMDC_A, fx.LSMDC_B, fx.LSMDC_C
    assert [g[:3] for g in got] == [
        (A, "SOMEONE opens the door.", "train"),  # a repeated clip id keeps every sentence
        (A, "He looks around the room.", "train"),
        (B, "SOMEONE smiles.", "train"),
        (C, "SOMEONE runs.", "val"),
        (B, "SOMEONE nods.", "test"),
    ]
    # duration = extracted end - start: 65.678 - 62.345, 4285 - 4283, 3.75 - 0.75
    assert [g[3] for g in got] == pytest.approx([3.333, 3.333, 2.0, 3.0, 2.0])
    assert got[0][4] == str(tmp_path / "0005_Some_Movie" / f"{A}.avi")
    assert got[3][4] == str(tmp_path / "elsewhere" / f"{C}.avi")
    assert rep.missing_videos == ["0009_Gone_00.00.01.000-00.00.02.000"]
    assert rep.rejected == {"not 6 tab-separated fields": 1, "time not hh.mm.ss.mmm": 1}
    assert any("LSMDC16_annos_training.csv line 4" in e for e in rep.rejected_examples)


def test_a_line_without_its_video_id_is_a_rejected_line_not_a_missing_video(tmp_path):
    """A test line of MSR-VTT with an empty video_id, or an LSMDC line with an empty clip id,
    was reported as a missing video of no name ('rows dropped: '), its line not named."""
    fx.write_msrvtt(tmp_path / "msrvtt")
    test_csv = tmp_path / "msrvtt" / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv"
    test_csv.write_text(test_csv.read_text() + "ret2,msr9000,,a girl sings\n")
    rep = prepare("msrvtt", tmp_path / "msrvtt", tmp_path / "m.parquet")
    assert rep.missing_videos == ["video3", "video8450"]
    assert rep.rejected == {"empty caption": 1, "no video_id": 1}
    assert "MSRVTT_JSFUSION_test.csv line 4: no video_id" in rep.rejected_examples
    fx.write_lsmdc(tmp_path / "lsmdc")
    public = tmp_path / "lsmdc" / "LSMDC16_challenge_1000_publictect.csv"
    public.write_text(public.read_text() + "\t".join(["", "00.00.01.000", "00.00.02.000", "00.00.01.000",
                                                      "00.00.02.000", "Someone waves."]) + "\n")
    rep = prepare("lsmdc", tmp_path / "lsmdc", tmp_path / "l.parquet")
    assert rep.missing_videos == ["0009_Gone_00.00.01.000-00.00.02.000"]
    assert rep.rejected == {"not 6 tab-separated fields": 1, "time not hh.mm.ss.mmm": 1, "no clip id": 1}
    assert "LSMDC16_challenge_1000_publictect.csv line 3: no clip id in the first field" in rep.rejected_examples


def test_a_video_listed_without_captions_is_reported_not_dropped_in_silence(tmp_path):
    """An MSVD clip whose caption list is empty, or a YouCook2 training or validation video with
    no annotations, gave no row and nothing said so (the testing subset has none in the public
    release: those stay quiet)."""
    import pickle

    fx.write_msvd(tmp_path / "msvd")
    caps = {**fx.MSVD_CAPTIONS, "Empty-Caps_1_2": []}
    (tmp_path / "msvd" / "msvd_data" / "raw-captions.pkl").write_bytes(pickle.dumps(caps))
    (tmp_path / "msvd" / "msvd_data" / "val_list.txt").write_text("ZyXwVuT5srq_0_7\nEmpty-Caps_1_2\n")
    fx.touch(tmp_path / "msvd", "YouTubeClips/Empty-Caps_1_2.avi")
    rep = prepare("msvd", tmp_path / "msvd", tmp_path / "m.parquet")
    assert rep.rejected.get("clip with no captions") == 1
    assert "raw-captions.pkl Empty-Caps_1_2: no captions" in rep.rejected_examples

    fx.write_youcook2(tmp_path / "yc")
    db_path = tmp_path / "yc" / "annotations" / "youcookii_annotations_trainval.json"
    db = json.loads(db_path.read_text())
    db["database"]["DDDDDDDDDDD"] = {"duration": 30.0, "subset": "training", "recipe_type": "101"}
    db["database"]["EEEEEEEEEEE"] = {"duration": 30.0, "subset": "testing", "recipe_type": "101"}
    db_path.write_text(json.dumps(db))
    fx.touch(tmp_path / "yc", "raw_videos/training/101/DDDDDDDDDDD.mp4", "raw_videos/testing/101/EEEEEEEEEEE.mp4")
    rep = prepare("youcook2", tmp_path / "yc", tmp_path / "y.parquet")
    assert rep.rejected.get("training/validation video with no annotations") == 1
    assert any("DDDDDDDDDDD" in e and "no annotations" in e for e in rep.rejected_examples)
    assert not any("EEEEEEEEEEE" in e for e in rep.rejected_examples)


def test_activitynet_sentences_clamped_and_empty_spans_dropped(tmp_path):
    fx.write_activitynet(tmp_path)
    out = tmp_path / "anet.parquet"
    rep = prepare("activitynet", tmp_path, out)
    assert table(out, *TIMED, "group", "duration") == [
        ("v_AAAAAAAAAAA", 0.0, 12.4, "A man stands on a dock holding a rod.", "train", "v_AAAAAAAAAAA", 82.73),
        ("v_AAAAAAAAAAA", 10.9, 82.73, "He casts and reels in a fish.", "train", "v_AAAAAAAAAAA", 82.73),
        ("v_AAAAAAAAAAA", 0.0, 5.0, "Before.", "train", "v_AAAAAAAAAAA", 82.73),  # -3 -> 0
        ("v_BBB-BB_BBBB", 2.1, 30.5, "Two kids build a sand castle.", "train", "v_BBB-BB_BBBB", 30.5),  # 31 -> 30.5
        ("v_EEEEEEEEEEE", 1.0, 2.0, "a boy jumps.", "test", "v_EEEEEEEEEEE", 10.0),
        ("v_EEEEEEEEEEE", 3.0, 9.5, "he lands.", "test", "v_EEEEEEEEEEE", 10.0),
    ]
    # [40, 45] clamps to [30.5, 30.5] and [7, 7] is empty: both dropped; v_DDD is not in train_ids
    assert rep.rejected == {"empty span after clamping to [0, duration]": 2}
    assert rep.missing_videos == ["v_CCCCCCCCCCC"]
    paths = {r["video_id"]: r["path"] for r in read_manifest(str(out)).to_pylist()}
    assert paths["v_AAAAAAAAAAA"].endswith("videos/AAAAAAAAAAA.mp4")  # stored without v_
    assert paths["v_BBB-BB_BBBB"].endswith("videos/v_BBB-BB_BBBB.mkv")  # stored with v_
    # train_ids.json lists A twice and Z (no captions); train.json has D, which it does not list
    assert rep.notes == ["1 ids of train_ids.json have no captions in train.json; skipped",
                         "1 ids repeat in train_ids.json; each video is used once",
                         "1 videos of train.json are not in train_ids.json; left out"]


def test_activitynet_paragraph_view(tmp_path):
    fx.write_activitynet(tmp_path)
    out = tmp_path / "anet_p.parquet"
    prepare("activitynet", tmp_path, out, view="paragraph", eval_split="val")
    assert table(out, *TIMED) == [
        ("v_AAAAAAAAAAA", None, None,
         "A man stands on a dock holding a rod. He casts and reels in a fish. Before.", "train"),
        ("v_BBB-BB_BBBB", None, None, "Two kids build a sand castle. past the end zero length", "train"),
        ("v_EEEEEEEEEEE", None, None, "a boy jumps. he lands.", "val"),
    ]


def test_didemo_moment_formula():
    # starts 2,2,3,2 -> mean 2.25 -> 11.25 s; ends 3,2,3,3 -> mean 2.75 -> 5 * 3.75 = 18.75 s
    assert moment([[2, 3], [2, 2], [3, 3], [2, 3]]) == (11.25, 18.75)
    assert moment([[5, 5]] * 4) == (25.0, 30.0)
    assert moment([[5, 5]] * 4, num_segments=5) == (25.0, 25.0)  # clamped to 5 * num_segments
    # a count that is no whole number is the usual 6 segments: true was read as 1, cutting to 5 s
    assert moment([[2, 3]], num_segments=True) == moment([[2, 3]], num_segments="6") == (10.0, 20.0)
    with pytest.raises(ValueError):
        moment([[1, 2, 3]])


def test_didemo_sentence_view(tmp_path):
    fx.write_didemo(tmp_path)
    out = tmp_path / "didemo.parquet"
    rep = prepare("didemo", tmp_path, out)
    got = table(out, *TIMED)
    assert got == [
        (fx.DIDEMO_V1, 11.25, 18.75, "the dog jumps into the lake", "train"),
        (fx.DIDEMO_V1, 0.0, 6.25, "a man waves at the camera", "train"),  # ends 0,0,1,0 -> 5*1.25
        # 5 annotators: starts 1,1,2,1,0 -> 1.0 -> 5 s; ends 1,2,2,1,1 -> 1.4 -> 5*2.4 = 12 s
        ("v2_x_y.avi", 5.0, 12.0, "five annotators", "train"),
        # 7 annotators: starts sum 31 -> 5*31/7; ends all 5 -> 30 s
        ("v3_bare.", pytest.approx(5 * 31 / 7), 30.0, "seven annotators", "train"),
        ("v4_short.mp4", 20.0, 25.0, "short video", "train"),  # 30 clamped to 5 * 5 segments
        ("vv.mov", 0.0, 5.0, "val desc", "val"),
        ("tv.avi", 5.0, 10.0, "test desc", "test"),  # 'unlisted.avi' is not in test_list.txt
    ]
    paths = {r["video_id"]: r["path"] for r in read_manifest(str(out)).to_pylist()}
    assert paths["v2_x_y.avi"].endswith("videos/v2_x_y.avi.mp4")
    assert paths["v3_bare."].endswith("videos/v3_bare.")
    assert rep.missing_videos == ["missing.mov"] and rep.rejected == {"empty caption": 1}
    assert rep.notes == ["1 descriptions of 1 videos in test_data.json are not in test_list.txt; left out"]


def test_didemo_paragraph_view(tmp_path):
    fx.write_didemo(tmp_path)
    out = tmp_path / "didemo_p.parquet"
    prepare("didemo", tmp_path, out, view="paragraph")
    assert table(out, *TIMED) == [
        (fx.DIDEMO_V1, None, None, "the dog jumps into the lake a man waves at the camera", "train"),
        ("v2_x_y.avi", None, None, "five annotators", "train"),
        ("v3_bare.", None, None, "seven annotators", "train"),
        ("v4_short.mp4", None, None, "short video", "train"),
        ("vv.mov", None, None, "val desc", "val"),
        ("tv.avi", None, None, "test desc", "test"),
    ]


def test_youcook2_segments_and_midpoint_timestamps(tmp_path):
    fx.write_youcook2(tmp_path)
    out = tmp_path / "yc2.parquet"
    rep = prepare("youcook2", tmp_path, out)
    assert table(out, *TIMED, "timestamp", "duration") == [
        ("AAAAAAAAAAA", 25.0, 37.0, "cut the onion in half and dice", "val", 31.0, 241.6),
        ("AAAAAAAAAAA", 37.0, 50.0, "peel and chop the carrots", "val", 43.5, 241.6),
        ("BBBBBBBBBBB", 50.0, 60.0, "stir the sauce", "train", 55.0, 60.0),  # 70 clamped to 60
    ]
    assert rep.missing_videos == ["CCCCCCCCCCC"]
    assert rep.rejected == {"empty segment after clamping to [0, duration]": 1, "empty caption": 1}
    paths = [r["path"] for r in read_manifest(str(out)).to_pylist()]
    assert paths[2] == str(tmp_path / "raw_videos/training/101/BBBBBBBBBBB.webm")
    assert manifest_metadata(str(out))["timestamp_rule"] == "midpoint"


def test_youcook2_uniform_rule_is_seeded_and_inside_segments(tmp_path):
    fx.write_youcook2(tmp_path)
    runs = {}
    for seed in (7, 7, 8):
        out = tmp_path / f"yc2_{seed}_{len(runs)}.parquet"
        prepare("youcook2", tmp_path, out, timestamp_rule="uniform", seed=seed)
        rows = read_manifest(str(out)).to_pylist()
        assert all(r["start"] <= r["timestamp"] <= r["end"] for r in rows)
        assert manifest_metadata(str(out))["timestamp_rule"] == "uniform"
        assert manifest_metadata(str(out))["seed"] == seed
        runs.setdefault(seed, []).append([r["timestamp"] for r in rows])
    assert runs[7][0] == runs[7][1] and runs[7][0] != runs[8][0]
    assert runs[7][0] != [31.0, 43.5, 55.0]


HOWTO_EXPECTED = [
    ("AAAAAAAAAAA", 0.41, 3.91, "pick the ripe berries", "train"),
    ("AAAAAAAAAAA", 3.92, 5.9, "pick the ripe berries into a bowl", "train"),
    ("AAAAAAAAAAA", 5.91, 10.25, "into a bowl tonight", "train"),
    ("BBB-BB_BBBB", 68.46000000000001, 70.0, "wash them, then dry", "train"),
    ("DDDDDDDDDDD", 1.0, 2.5, "first", "val"),  # listed in val_list.csv
    ("DDDDDDDDDDD", 2.5, 4.0, "second", "val"),
]


def _check_howto(rep, out):
    assert table(out, *TIMED) == HOWTO_EXPECTED
    assert [pq.read_metadata(s).num_rows for s in rep.shards] == [4, 2]
    assert sorted(os.listdir(out)) == ["part-00000.parquet", "part-00001.parquet"]
    assert rep.missing_videos == ["CCCCCCCCCCC"]
    assert rep.rejected == {"end <= start, or a negative or non-finite time": 1, "empty caption": 1}
    assert rep.per_split == {"train": 4, "val": 2}


BIG = "1" + "0" * 400  # a JSON integer past float's range: float() raised OverflowError


def test_times_that_are_no_finite_seconds_are_rejected_not_written_as_whole_videos(tmp_path):
    """A NaN start and end (Python's json writes and reads NaN) passed every check (`max(nan,
    0.0)` is NaN and `nan >= nan` is False) and the row was written as the whole video, its
    caption given to all of it; an integer past float's range was an OverflowError traceback,
    and a YouCook2 segment written as the text "39" read as [3, 9]. Each is one rejected entry
    now, and the good entry beside it is written."""
    def source(name, files):
        root = tmp_path / name
        (root / "videos").mkdir(parents=True)
        for video in ("A.mp4", "v.mov"):
            (root / "videos" / video).touch()
        for file, text in files.items():
            (root / file).write_text(text)
        out = tmp_path / f"{name}.parquet"
        rep = prepare(name.split("-")[0], root, out)
        assert out.exists() == (rep.rows > 0)  # no rows: no manifest written
        return rep, table(out, "video_id", "start", "end", "caption") if rep.rows else []

    anet = {"v_A": {"duration": 80, "timestamps": [[float("nan"), float("nan")], [1, 5], [1, "inf"], "15"],
                    "sentences": ["nan", "ok", "inf", "text"]}}
    rep, rows = source("activitynet", {"train.json": json.dumps(anet), "val_1.json": "{}"})
    assert rows == [("v_A", 1.0, 5.0, "ok")]
    assert rep.rejected == {"timestamp is not a [start, end] pair of finite seconds": 3}
    rep, rows = source("activitynet-big", {"train.json": '{"v_A": {"duration": %s, "timestamps": [[1, 5]], '
                                           '"sentences": ["x"]}, "v_v": {"duration": 8, "timestamps": [[1, %s]], '
                                           '"sentences": ["y"]}}' % (BIG, BIG), "val_1.json": "{}"})
    assert rows == [] and rep.rejected == {"duration is not a finite number": 1,
                                           "timestamp is not a [start, end] pair of finite seconds": 1}

    def yc(segments, **entry):
        anns = ", ".join('{"segment": %s, "id": %d, "sentence": "s%d"}' % (seg, k, k) for k, seg in enumerate(segments))
        extra = "".join(f', "{k}": {v}' for k, v in entry.items())
        return '{"database": {"A": {"duration": 60, "subset": "training"%s, "annotations": [%s]}}}' % (extra, anns)

    rep, rows = source("youcook2", {"youcookii_annotations_trainval.json": yc(
        ["[NaN, NaN]", "[4, 8]", '"39"', f"[0, {BIG}]", "[1, Infinity]"])})
    assert rows == [("A", 4.0, 8.0, "s1")]
    assert rep.rejected == {"segment is not a [start, end] pair of finite seconds": 4}
    rep, rows = source("youcook2-big", {"youcookii_annotations_trainval.json": yc(["[4, 8]"], duration=BIG)})
    assert rows == [("A", 4.0, 8.0, "s0")] and rep.rejected == {}  # no duration to clamp to, as when absent
    rep, rows = source("youcook2-types", {"youcookii_annotations_trainval.json": yc(["[4, 8]"]).replace(
        '"training"', '["training"]')})
    assert rows == [] and rep.rejected == {"entry has no known subset (training/validation/testing)": 1}
    rep, rows = source("youcook2-anns", {"youcookii_annotations_trainval.json":
                                         '{"database": {"A": {"subset": "training", "annotations": 5}}}'})
    assert rows == [] and rep.rejected == {"annotations is not a list (int)": 1}

    def dd(*items):
        return "[" + ", ".join('{"annotation_id": %d, "description": "d%d", "video": "v.mov", "times": %s, '
                               '"num_segments": %s}' % (k, k, t, n) for k, (t, n) in enumerate(items)) + "]"

    rep, rows = source("didemo", {"train_data.json": dd(("[[NaN, NaN]]", 6), ("[[1, 2]]", 6), (f"[[0, {BIG}]]", 6),
                                                        ('["12"]', 6), ("[[1, 2]]", BIG)),
                                  "val_data.json": "[]", "test_data.json": "[]"})
    # [1, 2] -> 5 * 1 = 5 to 5 * (2 + 1) = 15; a count past float's range is taken as the usual 6
    assert rows == [("v.mov", 5.0, 15.0, "d1"), ("v.mov", 5.0, 15.0, "d4")]
    assert rep.rejected == {"malformed times": 3}


def test_annotation_values_of_the_wrong_json_type_are_one_line_errors(tmp_path, capsys):
    """A list where a video id belongs (MSR-VTT's sentences, ActivityNet's id list) was a
    TypeError traceback (unhashable); a NaN in HowTo100M's caption JSON, which its parser does
    not take, printed the parser's message over four lines."""
    from clipray.cli import main

    fx.write_msrvtt(tmp_path / "ms")
    data = json.loads((tmp_path / "ms" / "msrvtt_data" / "MSRVTT_data.json").read_text())
    data["sentences"][0]["video_id"] = [data["sentences"][0]["video_id"]]
    (tmp_path / "ms" / "msrvtt_data" / "MSRVTT_data.json").write_text(json.dumps(data))
    with pytest.raises(SourceError, match=r"^MSRVTT_data.json: sentences\[0\] lacks 'video_id' \(a string\)"):
        prepare("msrvtt", tmp_path / "ms", tmp_path / "ms.parquet")
    fx.write_activitynet(tmp_path / "an")
    (tmp_path / "an" / "train_ids.json").write_text('["v_AAAAAAAAAAA", ["v_BBB-BB_BBBB"]]')
    with pytest.raises(SourceError, match=r"^train_ids.json: expected a JSON list of video ids \(strings\)$"):
        prepare("activitynet", tmp_path / "an", tmp_path / "an.parquet")
    (tmp_path / "h" / "videos").mkdir(parents=True)
    (tmp_path / "h" / "videos" / "A.mp4").touch()
    (tmp_path / "h" / "raw_caption.json").write_text('{"A": {"start": [0.5, NaN], "end": [1, 2], "text": ["a", "b"]}}')
    assert main(["data", "prepare", "howto100m", "--root", str(tmp_path / "h"), "--out", str(tmp_path / "h.parquet")]) == 2
    err = capsys.readouterr().err
    assert err == ('clipray data: error: raw_caption.json: invalid JSON (lexical error: invalid char in json text '
                   'near: {"A": {"start": [0.5, NaN], "end": [1, 2], "text": [")\n')  # yajl's excerpt
    assert not (tmp_path / "ms.parquet").exists() and not (tmp_path / "an.parquet").exists()


def test_howto100m_lists_with_quoted_headers_and_captions_of_the_wrong_json_type(tmp_path, capsys):
    """A val_list or subset CSV with quoted column names ("video_id", pandas' QUOTE_ALL) was read
    as plain lines: subset= kept no video (exit 0, an empty manifest) and val_list= marked none.
    A caption JSON whose top level is an array gave 0 rows and exit 0, where the other adapters
    refuse it; JSON true/false were read as times 1 and 0, and a number as an empty caption."""
    from clipray.cli import main

    fx.write_howto100m(tmp_path, "json")
    (tmp_path / "val_list.csv").write_text('"video_path","category"\n"DDDDDDDDDDD.mp4","food"\n')
    (tmp_path / "subset.csv").write_text('"video_id";"category"\n"AAAAAAAAAAA";"x"\n"DDDDDDDDDDD";"y"\n')
    rep = prepare("howto100m", tmp_path, tmp_path / "q", val_list="val_list.csv", subset="subset.csv")
    assert rep.per_split == {"train": 3, "val": 2}  # A's 3 lines, D's 2: B is outside the subset
    assert sorted({r["video_id"] for r in read_manifest(tmp_path / "q").to_pylist()}) == ["AAAAAAAAAAA", "DDDDDDDDDDD"]

    caption_json = tmp_path / "raw_caption.json"
    caption_json.write_text(" \n" + json.dumps(list(fx.HOWTO_CAPTIONS.values())))
    assert main(["data", "prepare", "howto100m", "--root", str(tmp_path), "--out", str(tmp_path / "arr")]) == 2
    assert capsys.readouterr().err == ("clipray data: error: raw_caption.json: expected an object keyed by video "
                                       "id, found JSON starting with '['\n")
    assert not (tmp_path / "arr").exists()

    caption_json.write_text(json.dumps({"AAAAAAAAAAA": {"start": [True, 0, 2, 4], "end": [3, False, 3, 5],
                                                        "text": ["a", "b", 7, "d"]}}))
    rep = prepare("howto100m", tmp_path, tmp_path / "types")
    assert table(tmp_path / "types", *TIMED) == [("AAAAAAAAAAA", 4.0, 5.0, "d", "train")]
    assert rep.rejected == {"unreadable time": 2, "caption is not text": 1}


def test_howto100m_giant_json_is_streamed_into_shards(tmp_path, monkeypatch):
    fx.write_howto100m(tmp_path, "json")
    out = tmp_path / "howto"
    prepare("howto100m", tmp_path, out, rows_per_shard=1)  # 6 shards first ...

    def no_whole_file_parse(*a, **k):
        raise AssertionError("json.load/loads must not read the caption file whole")

    monkeypatch.setattr(json, "load", no_whole_file_parse)
    monkeypatch.setattr(json, "loads", no_whole_file_parse)
    rep = prepare("howto100m", tmp_path, out, rows_per_shard=4, val_list="val_list.csv")
    monkeypatch.undo()
    _check_howto(rep, out)  # ... and no stale shard of the first run survives the second
    assert manifest_metadata(str(out))["captions_form"] == "json"


def test_a_rewrite_stopped_while_the_old_shards_go_reads_as_unfinished(tmp_path, monkeypatch):
    """A re-run deletes the folder's old shards, one by one, once it has written its own under
    `.partial` names: stopped among those deletes (~545 deletes on S3 for HowTo100M), the old
    shards left must not read back as a smaller, complete manifest, which the `.partial` names
    exist to rule out (datasets/README.md)."""
    import sys

    import clipray.manifest as manifest_mod
    from clipray.manifest import ManifestError, ManifestWriter, manifest_files

    fx.write_howto100m(tmp_path, "json")
    out = tmp_path / "howto"
    prepare("howto100m", tmp_path, out, rows_per_shard=1)  # 6 shards
    real = manifest_mod.filesystem

    class StoppedAtThirdDelete:  # the real filesystem, interrupted as it deletes a third file
        def __init__(self, fs):
            self.fs, self.deletes = fs, 0

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def delete_file(self, path):
            self.deletes += 1
            if self.deletes == 3:
                raise KeyboardInterrupt
            self.fs.delete_file(path)

    def stopping(path):  # the deletes' filesystem only: the writer's is pyarrow's own
        fs, p = real(path)
        return (StoppedAtThirdDelete(fs) if sys._getframe(1).f_code.co_name == "old_shards" else fs), p

    monkeypatch.setattr(manifest_mod, "filesystem", stopping)
    with pytest.raises(KeyboardInterrupt):
        prepare("howto100m", tmp_path, out, rows_per_shard=4, val_list="val_list.csv")
    monkeypatch.undo()
    assert len([n for n in os.listdir(out) if n.endswith(".parquet")]) == 4  # 2 of the 6 went
    with pytest.raises(ManifestError, match="unfinished manifest"):
        manifest_files(str(out))
    # a run failing over that folder (here stopped at its third row, two shards written) removed
    # its own .partial shards, and the 4 old ones left read as a smaller, complete manifest
    real_add = ManifestWriter.add

    def stopped_at_the_third_row(self, row):
        if self.rows == 2:
            raise KeyboardInterrupt
        real_add(self, row)

    monkeypatch.setattr(ManifestWriter, "add", stopped_at_the_third_row)
    with pytest.raises(KeyboardInterrupt):
        prepare("howto100m", tmp_path, out, rows_per_shard=1, val_list="val_list.csv")
    monkeypatch.undo()
    with pytest.raises(ManifestError, match="no .parquet files under"):
        manifest_files(str(out))
    _check_howto(prepare("howto100m", tmp_path, out, rows_per_shard=4, val_list="val_list.csv"), out)


def test_howto100m_caption_json_with_a_bom_or_a_byte_not_utf8(tmp_path, capsys):
    """datasets/README.md: annotation files are UTF-8, a BOM is fine, and a file in another
    encoding stops the run naming the file and the line of the first bad byte. The streamed
    caption JSON was read as bytes by the JSON parser, which called a BOM an invalid character
    and a cp1252 byte an invalid JSON without the line."""
    from clipray.cli import main

    fx.write_howto100m(tmp_path, "json")
    caption_json = tmp_path / "raw_caption.json"
    text = json.dumps(fx.HOWTO_CAPTIONS, indent=1).encode()
    caption_json.write_bytes(b"\xef\xbb\xbf" + text)
    rep = prepare("howto100m", tmp_path, tmp_path / "bom", rows_per_shard=4, val_list="val_list.csv")
    _check_howto(rep, tmp_path / "bom")  # the rows of the file without a BOM

    line = next(n for n, ln in enumerate(text.split(b"\n"), 1) if b'"pick the ripe berries into a bowl"' in ln)
    caption_json.write_bytes(text.replace(b"into a bowl\"", "into a caf\u00e9\"".encode("cp1252")))
    assert main(["data", "prepare", "howto100m", "--root", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"clipray data: error: {caption_json}: line {line} is not UTF-8 text "
                                       "(invalid byte); re-save the file as UTF-8\n")


def test_howto100m_sharded_csv_folder_in_worker_processes(tmp_path, capsys):
    fx.write_howto100m(tmp_path, "csv")
    out = tmp_path / "howto"
    rep = prepare("howto100m", tmp_path, out, rows_per_shard=4, val_list="val_list.csv", workers=2,
                  progress_s=0)
    _check_howto(rep, out)
    # progress_s=0: the time to the first row, then one line per row, counting up to the report's total
    first, *lines = capsys.readouterr().err.splitlines()
    assert first.startswith("  howto100m: first row after ") and first.endswith("s (annotations read, videos listed)")
    assert [int(ln.split()[1].replace(",", "")) for ln in lines] == list(range(1, rep.rows + 1))
    # rows are checked and written 4 at a time here (a shard's room): the last 2 are not yet
    assert lines[-1].startswith(f"  howto100m: {rep.rows} rows read, {rep.rows - 2} written, "
                                f"{len(rep.shards) - 1} shards, ")
    assert manifest_metadata(str(out))["captions_form"] == "csv-folder"


def test_howto100m_caption_folder_two_levels_down_and_a_comma_not_quoted(tmp_path):
    """A clone of MIL-NCE keeps its captions in data/small_train_captions/: only a folder right
    in the root was looked for, where caption JSON files are found two levels down. And a
    caption with a comma written without quotes (a hand-made or re-exported CSV) was cut at the
    comma without a word; it is whole again where text is the last column, else rejected."""
    import shutil

    fx.write_howto100m(tmp_path, "csv")
    (tmp_path / "data").mkdir()
    shutil.move(tmp_path / "small_train_captions", tmp_path / "data" / "small_train_captions")
    folder = tmp_path / "data" / "small_train_captions"
    (folder / "BBB-BB_BBBB.csv").write_text(
        "start,end,text\n68.46000000000001,70.0,wash them, then dry\n70.0,69.0,end before start\n72.0,75.5,  \n")
    out = tmp_path / "howto"
    rep = prepare("howto100m", tmp_path, out, rows_per_shard=4, val_list="val_list.csv", workers=1)
    _check_howto(rep, out)  # "wash them, then dry" whole
    assert manifest_metadata(str(out))["captions_form"] == "csv-folder"
    (folder / "DDDDDDDDDDD.csv").write_text("text,start,end\nfirst, then more,1.0,2.5\nsecond,2.5,4.0\n")
    rep = prepare("howto100m", tmp_path, tmp_path / "again", val_list="val_list.csv", workers=1)
    assert [r for r in table(tmp_path / "again", *TIMED) if r[0] == "DDDDDDDDDDD"] == [("DDDDDDDDDDD", 2.5, 4.0, "second", "val")]
    assert "DDDDDDDDDDD.csv line 2: more fields than the header (a comma in a caption that is not quoted)" \
        in rep.rejected_examples


@pytest.mark.parametrize("form", ["json", "csv"])
def test_a_howto100m_video_with_no_captions_is_a_rejected_entry(tmp_path, form):
    """`{"start": [], "end": [], "text": []}`, or a CSV of its header only, gave no row and no
    word, where MSVD and YouCook2 report such an entry."""
    fx.write_howto100m(tmp_path, form)
    fx.touch(tmp_path, "videos/EEEEEEEEEEE.mp4")
    if form == "json":
        data = dict(fx.HOWTO_CAPTIONS, EEEEEEEEEEE={"start": [], "end": [], "text": []})
        fx.write(tmp_path, "raw_caption.json", json.dumps(data))
    else:
        fx.write(tmp_path, "small_train_captions/EEEEEEEEEEE.csv", "start,end,text\n")
    rep = prepare("howto100m", tmp_path, tmp_path / "out", val_list="val_list.csv", workers=1)
    assert rep.rows == 6 and rep.rejected == {"end <= start, or a negative or non-finite time": 1,
                                              "empty caption": 1, "video with no captions": 1}
    assert "EEEEEEEEEEE: no captions" in rep.rejected_examples


def test_a_howto100m_row_the_writer_refuses_is_named_by_its_own_line(tmp_path):
    """A caption file whose name is not UTF-8 gives a video id that is no text: the writer
    refuses its rows, which were named by the count of kept lines ("line 0", "line 1") where
    the file's line 3 was rejected before them. Each is named by its file line now."""
    (tmp_path / "small_train_captions").mkdir()
    (tmp_path / "videos").mkdir()
    name = os.fsdecode(b"BAD\xff0000000")
    (tmp_path / "small_train_captions" / f"{name}.csv").write_text("start,end,text\n1,2,first\n5,3,backwards\n6,7,third\n")
    (tmp_path / "videos" / f"{name}.mp4").touch()
    fx.write(tmp_path, "val_list.csv", "video_path\nX.mp4\n")
    rep = prepare("howto100m", tmp_path, tmp_path / "out", workers=1)
    assert rep.rows == 0 and [ex.split(":")[0] for ex in rep.rejected_examples] == [
        f"{name}.csv line 3", f"{name}.csv line 2", f"{name}.csv line 4"]
    assert rep.rejected_examples[1].endswith("'video_id' holds a lone surrogate (half of a pair: a JSON escape cut "
                                             "from an emoji's, or a file name that is not UTF-8), which is not text")


def test_howto100m_workers_from_a_script_without_a_main_guard_still_read_every_row(tmp_path):
    """A spawned worker runs the calling script again: prepare() in a script without `if
    __name__ == "__main__":` (as datasets/README.md's example is) ended every worker in a
    RuntimeError and the call in BrokenProcessPool. The captions are read in the calling
    process then, with a line saying why, and every row is written."""
    import subprocess
    import sys

    fx.write_howto100m(tmp_path, "csv")
    script = tmp_path / "prep.py"
    script.write_text("import sys\nfrom clipray.sources import prepare\n"
                      "rep = prepare('howto100m', sys.argv[1], sys.argv[2], rows_per_shard=4, "
                      "val_list='val_list.csv', workers=2)\nprint('rows', rep.rows)\n")
    out = tmp_path / "howto"
    run = subprocess.run([sys.executable, str(script), str(tmp_path), str(out)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout == "rows 6\n", run.stderr[-2000:]
    assert "howto100m: the worker processes ended (a script that calls prepare() must do so under" in run.stderr
    assert table(out, *TIMED) == HOWTO_EXPECTED


def test_generic_csv_rows_and_rejects(tmp_path):
    fx.touch(tmp_path, "clips/cat.mp4", "long/kitchen.mp4")
    fx.write(tmp_path, "ann.csv", "\n".join([
        "path,caption,start,end,split,timestamp,extra",
        "clips/cat.mp4,a cat jumps onto a sofa,,,train,,",
        "long/kitchen.mp4,someone cracks two eggs,12.0,18.5,val,13,",
        "long/kitchen.mp4,   ,1,2,train,,",  # empty caption
        "long/kitchen.mp4,bad span,5,5,train,,",  # end <= start
        "clips/missing.mp4,gone,,,train,,",  # no file
        "long/kitchen.mp4,ts outside,1,2,train,3,",
        'long/kitchen.mp4,"quoted, comma",0,1,test,,',
        "clips/cat.mp4,weird split,,,validation,,",
        "./clips/cat.mp4,only start,4,,train,,",
        "clips/cat.mp4,a cat, unquoted,,,train,,",  # 8 fields for 7 columns: rejected, not cut
    ]) + "\n")
    out = tmp_path / "g.parquet"
    rep = prepare("generic", tmp_path, out, file="ann.csv")
    assert table(out, *TIMED, "timestamp", "group") == [
        ("cat", None, None, "a cat jumps onto a sofa", "train", None, "cat"),
        ("kitchen", 12.0, 18.5, "someone cracks two eggs", "val", 13.0, "kitchen"),
        ("kitchen", 0.0, 1.0, "quoted, comma", "test", None, "kitchen"),
    ]
    assert read_manifest(str(out)).to_pylist()[0]["path"] == str(tmp_path / "clips/cat.mp4")
    assert rep.missing_videos == ["clips/missing.mp4"]
    assert rep.rejected == {"empty caption": 1, "need 0 <= start < end": 1,
                            "timestamp outside [start, end]": 1, "unknown split": 1,
                            "give both start and end, or neither": 1, "wrong number of fields": 1}
    assert "ignored columns: extra" in rep.notes


def test_generic_jsonl_and_video_level_jsonl(tmp_path):
    fx.touch(tmp_path, "clips/cat.mp4", "long/kitchen.mp4")
    lines = [
        {"path": "long/kitchen.mp4", "caption": "whisk the eggs", "timestamp": 21.3, "split": "train"},
        {"path": "clips/cat.mp4", "video_id": "cat", "split": "test",
         "captions": [{"text": "a cat sits", "start": 0, "end": 2.5}, "a cat naps",
                      {"text": " ", "start": 1, "end": 2}]},
        {"path": "clips/cat.mp4", "caption": "clamped", "start": 1, "end": 9, "duration": 5},
        # `text`, as a caption object has it, was rejected as an empty caption
        {"path": "long/kitchen.mp4", "text": "crack two eggs", "split": "train"},
        # end clamped to 5, then rejected (start 6 >= end): one reason, not also a clamp
        {"path": "clips/cat.mp4", "caption": "late", "start": 6, "end": 9, "duration": 5},
        # no row, and counted, as msvd and howto100m count a video without captions
        {"path": "clips/cat.mp4", "video_id": "cat2", "captions": []},
    ]
    fx.write(tmp_path, "ann.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "g.parquet"
    rep = prepare("generic", tmp_path, out, file=str(tmp_path / "ann.jsonl"))
    assert table(out, *TIMED, "timestamp", "duration") == [
        ("kitchen", None, None, "whisk the eggs", "train", 21.3, None),
        ("cat", 0.0, 2.5, "a cat sits", "test", None, None),
        ("cat", None, None, "a cat naps", "test", None, None),
        ("cat", 1.0, 5.0, "clamped", "train", None, 5.0),  # end 9 clamped to duration 5
        ("kitchen", None, None, "crack two eggs", "train", None, None),
    ]
    assert rep.rejected == {"empty caption": 1, "need 0 <= start < end": 1, "video with no captions": 1}
    assert "ann.jsonl line 6: no captions" in rep.rejected_examples
    assert "1 rows had end past their duration; end clamped to duration" in rep.notes


def test_generic_refuses_hhmmss_and_clashing_ids(tmp_path):
    fx.touch(tmp_path, "a/x.mp4", "b/x.mp4")
    fx.write(tmp_path, "t.csv", "path,caption,start,end\na/x.mp4,ok,1,2\na/x.mp4,bad,00:01:02,00:01:05\n")
    with pytest.raises(SourceError, match=r"t.csv line 3: start='00:01:02' looks like hh:mm:ss"):
        prepare("generic", tmp_path, tmp_path / "g.parquet", file="t.csv")
    # what is no finite number of seconds is refused as the release adapters refuse it, naming the line
    for value, says in (("NaN", "end=nan is not a finite number of seconds"),
                        ("true", "end=True is not a number of seconds"),
                        (BIG, f"end={BIG} is past float's range"), ('"2s"', "end='2s' is not a number of seconds")):
        fx.write(tmp_path, "t.jsonl", '{"path": "a/x.mp4", "caption": "ok", "start": 1, "end": 2}\n'
                                      '{"path": "a/x.mp4", "caption": "bad", "start": 1, "end": %s}\n' % value)
        with pytest.raises(SourceError) as e:
            prepare("generic", tmp_path, tmp_path / "g.parquet", file="t.jsonl")
        assert str(e.value) == f"t.jsonl line 2: {says}"
    fx.write(tmp_path, "c.csv", "path,caption\na/x.mp4,one\nb/x.mp4,two\n")  # both default to 'x'
    with pytest.raises(SourceError, match="video_id 'x'"):
        prepare("generic", tmp_path, tmp_path / "g.parquet", file="c.csv")
    with pytest.raises(SourceError, match="-o file=PATH"):
        prepare("generic", tmp_path, tmp_path / "g.parquet")
    # one clip under two ids (an id given in one row, the path's stem in the other): two
    # retrieval targets of the same frames, one counted as a miss; windows of one file under
    # ids of their own are the user's choice, and kept
    fx.write(tmp_path, "d.csv", "path,caption,video_id\na/x.mp4,one,clip7\na/x.mp4,two,\n")
    with pytest.raises(SourceError, match=r"^d.csv line 3: 'a/x.mp4' \(the whole video\) is video_id 'x' here and "
                                          r"'clip7' at d.csv line 2; give one clip one video_id$"):
        prepare("generic", tmp_path, tmp_path / "g.parquet", file="d.csv")
    fx.write(tmp_path, "w.csv", "path,caption,video_id,start,end\na/x.mp4,one,w1,0,2\na/x.mp4,two,w2,2,4\n"
                                "a/x.mp4,three,w1,0,2\n")
    assert prepare("generic", tmp_path, tmp_path / "g.parquet", file="w.csv").rows == 3
    # one file written relative to the root in one row and absolute in another is one video,
    # not one id naming two videos (refused), and under two ids it is one clip under two ids
    fx.write(tmp_path, "r.csv", f"path,caption,video_id\na/x.mp4,one,v\n{tmp_path}/a/./x.mp4,two,v\n")
    assert prepare("generic", tmp_path, tmp_path / "g.parquet", file="r.csv").rows == 2
    assert set(table(tmp_path / "g.parquet", "video_id", "path")) == {("v", str(tmp_path / "a" / "x.mp4"))}
    fx.write(tmp_path, "r2.csv", f"path,caption,video_id\na/x.mp4,one,v\n{tmp_path}/a/x.mp4,two,w\n")
    with pytest.raises(SourceError, match=r"^r2.csv line 3: .* is video_id 'w' here and 'v' at r2.csv line 2; give one clip"):
        prepare("generic", tmp_path, tmp_path / "g.parquet", file="r2.csv")


def test_a_failed_run_leaves_no_partial_shards(tmp_path):
    fx.touch(tmp_path, "a/x.mp4")
    fx.write(tmp_path, "t.csv", "path,caption,start,end\n" + "a/x.mp4,ok,1,2\n" * 3 + "a/x.mp4,bad,0:01,0:02\n")
    out = tmp_path / "shards"
    with pytest.raises(SourceError, match="t.csv line 5"):
        prepare("generic", tmp_path, out, file="t.csv", rows_per_shard=1)  # 3 shards written first
    assert list(out.iterdir()) == []
    # over an earlier manifest, which stays as it was: its shards were deleted before the new
    # ones were written, and the failed re-run left an empty folder
    fx.write(tmp_path, "good.csv", "path,caption,start,end\na/x.mp4,one,1,2\na/x.mp4,two,2,3\n")
    prepare("generic", tmp_path, out, file="good.csv", rows_per_shard=1)
    with pytest.raises(SourceError, match="t.csv line 5"):
        prepare("generic", tmp_path, out, file="t.csv", rows_per_shard=1)
    assert table(out, "caption") == [("one",), ("two",)]
    assert sorted(os.listdir(out)) == ["part-00000.parquet", "part-00001.parquet"]


def test_rows_breaking_manifest_rules_are_rejected_not_fatal(tmp_path, monkeypatch):
    from clipray.sources.base import SourceSpec

    def bad_rows(ctx):
        yield {"video_id": "v", "path": "/v.mp4", "start": 0.0, "end": 1.0, "caption": "ok", "split": "train"}
        yield {"video_id": "v", "path": "/v.mp4", "start": 5.0, "end": 3.0, "caption": "x",
               "split": "train", "_where": "f line 3"}

    monkeypatch.setitem(SOURCES, "fake", SourceSpec("fake", bad_rows, {}))
    rep = prepare("fake", tmp_path, tmp_path / "f.parquet")
    assert rep.rows == 1 and rep.rejected == {"invalid row: end # <= start #": 1}
    assert rep.rejected_examples == ["f line 3: end 3.0 <= start 5.0"]


def test_report_str_is_readable(tmp_path):
    rep = PrepareReport(source="x", root="/r", out="/o.parquet", rows=0, videos=0, captions=0,
                        per_split={}, missing_videos=[f"v{i}" for i in range(12)],
                        rejected={"empty caption": 3}, rejected_examples=["f line 2: empty caption"],
                        shards=["/o.parquet"])
    text = str(rep)
    assert text.splitlines()[0].startswith("x: /r -> /o.parquet (1 file")
    assert "12 videos not found" in text and "(2 more)" in text
    assert "3 x empty caption" in text and "e.g. f line 2: empty caption" in text
    assert "ERROR     no rows, so no manifest written (/o.parquet is as it was)" in text


@pytest.mark.parametrize("shards", [False, True])
def test_a_prepare_that_finds_no_rows_fails_and_keeps_the_earlier_manifest(tmp_path, capsys, shards):
    """Every video missing (a wrong --root): an empty manifest replaced the good one an earlier
    run had written, and the command warned and exited 0. Now nothing is written and it exits 1,
    with the report saying which videos were missing."""
    from clipray.cli import main

    fx.touch(tmp_path, "clips/cat.mp4")
    fx.write(tmp_path, "ann.csv", "path,caption\nclips/cat.mp4,a cat jumps\n")
    out = tmp_path / ("g" if shards else "g.parquet")
    args = ["data", "prepare", "generic", "--root", str(tmp_path), "--out", str(out), "-o", "file=ann.csv"]
    assert main(args) == 0
    before = read_manifest(str(out)).to_pylist()
    fx.write(tmp_path, "ann.csv", "path,caption\nclips/gone.mp4,a dog runs\nclips/lost.mp4,a bird sings\n")
    assert main(args) == 1
    report = capsys.readouterr().out
    assert "missing   2 videos not found under the root, rows dropped: clips/gone.mp4, clips/lost.mp4" in report
    assert "no rows, so no manifest written" in report
    assert [r["caption"] for r in read_manifest(str(out)).to_pylist()] == ["a cat jumps"] and len(before) == 1
    assert not [p for p in tmp_path.rglob("*.partial")]
    # with no manifest there before, none is left behind
    fresh = tmp_path / ("h" if shards else "h.parquet")
    assert main(args[:6] + [str(fresh)] + args[7:]) == 1
    assert not fresh.is_file() and not (fresh.is_dir() and any(fresh.iterdir()))


def test_dataset_cards_match_the_registry():
    import pathlib

    import yaml

    folder = pathlib.Path(__file__).resolve().parents[1] / "datasets"
    assert not (folder / "__init__.py").exists()  # never a package: it would shadow HF datasets
    cards = {p.stem: yaml.safe_load(p.read_text()) for p in folder.glob("*.yaml")}
    assert sorted(cards) == list_sources()
    readme = (folder / "README.md").read_text()
    for name, card in cards.items():
        assert card["name"] == name and card["files"] and card["splits" if name != "generic" else "columns"]
        assert card["prepare"].startswith(f"clipray data prepare {name} --root ")
        assert f"clipray data prepare {name} --root DIR --out MANIFEST" in readme
        for option in card.get("options") or {}:  # every documented option is a real one
            assert option in SOURCES[name].options or option in ("annotations", "rows_per_shard"), (name, option)


def test_prepare_then_check_through_the_cli(tmp_path, capsys):
    from clipray.cli import main

    fx.write_msrvtt(tmp_path)
    out = tmp_path / "m"
    assert main(["data", "prepare", "msrvtt", "--root", str(tmp_path), "--out", str(out),
                 "-o", "rows_per_shard=2"]) == 0
    report = capsys.readouterr().out
    assert report.startswith(f"msrvtt: {tmp_path} -> {out} (3 files, ") and "  rows      5 (test 1, train 4)" in report
    assert main(["data", "check", str(out)]) == 0
    rows = read_manifest(str(out)).to_pylist()
    assert capsys.readouterr().out.splitlines()[0] == (
        f"{out}: valid; {len(rows)} rows (test 1, train 4), {len({r['video_id'] for r in rows})} videos, "
        f"{len({r['caption'] for r in rows})} distinct captions")
    assert main(["data", "check", str(tmp_path / "msrvtt_data" / "MSRVTT_data.json")]) == 2
    assert "MSRVTT_data.json: not a Parquet manifest" in capsys.readouterr().err


def _latin1_line(path, line: int) -> None:
    """Re-save line `line` (1-based) of a UTF-8 file as cp1252, as a spreadsheet would."""
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1] + " caf\u00e9".encode("cp1252")
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, capsys, fmt):
    """A cp1252 byte in an annotation file: an error line naming the file and the line it is on,
    not a UnicodeDecodeError traceback."""
    from clipray.cli import main

    fx.touch(tmp_path, "a.mp4", "b.mp4", "c.mp4")
    if fmt == "csv":
        fx.write(tmp_path, "own.csv", "path,caption\na.mp4,one\nb.mp4,two\nc.mp4,three\n")
    else:
        fx.write(tmp_path, "own.jsonl", "".join(json.dumps({"path": f"{v}.mp4", "caption": v}) + "\n"
                                                for v in "abc"))
    _latin1_line(tmp_path / f"own.{fmt}", 3)
    assert main(["data", "prepare", "generic", "--root", str(tmp_path), "--out", str(tmp_path / "m.parquet"),
                 "-o", f"file=own.{fmt}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"clipray data: error: {tmp_path / f'own.{fmt}'}: line 3 is not UTF-8 text "
                   "(invalid continuation byte); re-save the file as UTF-8\n")


def test_a_report_prints_in_a_locale_that_cannot_spell_its_names(tmp_path, monkeypatch):
    """Under a latin-1 locale (LC_ALL=de_DE.ISO-8859-1) the report's missing-video line names a
    Chinese file with escapes; before, printing it raised UnicodeEncodeError after the manifest
    was written, so the command ended in a traceback and the report was lost."""
    import io
    import sys

    from clipray.cli import main

    fx.touch(tmp_path, "a.mp4")
    fx.write(tmp_path, "own.csv", "path,caption\na.mp4,one\n\u89c6\u9891.mp4,two\n")
    out = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["data", "prepare", "generic", "--root", str(tmp_path), "--out", str(tmp_path / "m.parquet"),
                 "-o", "file=own.csv"]) == 0
    out.flush()
    assert "\\u89c6\\u9891.mp4" in out.buffer.getvalue().decode("latin-1")


def test_the_bad_utf8_line_is_found_across_read_chunks(tmp_path):
    """`first_bad_utf8_line` reads 1 MiB at a time; a multi-byte character split across two
    chunks is not an error, and the line of the first bad byte matches a line-by-line decode."""
    from clipray.sources.base import first_bad_utf8_line

    good = "caf\u00e9 \u6f22\u5b57 \U0001f600\n".encode()  # 2-, 3- and 4-byte characters
    body = good * ((1 << 21) // len(good) + 7)
    for cut in (1 << 20) - 1, (1 << 20) + 5, (1 << 21) + 3:
        data = body[:cut] + b"\xff" + body[cut:]
        (tmp_path / "f.txt").write_bytes(data)
        want = next(n for n, ln in enumerate(data.split(b"\n"), 1) if not _decodes(ln))
        assert first_bad_utf8_line(str(tmp_path / "f.txt")) == want
    (tmp_path / "f.txt").write_bytes(body)
    assert first_bad_utf8_line(str(tmp_path / "f.txt")) == 0


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_howto100m_skips_an_unreadable_caption_csv_and_names_file_lines(tmp_path):
    """One caption CSV that is not UTF-8 and one with a field over csv's size limit, among
    good ones: both are rejected whole and counted; the rest are written; rejected lines of a
    good file are named by their line in the file (header = line 1)."""
    fx.write_howto100m(tmp_path, "csv")
    folder = tmp_path / "small_train_captions"
    _latin1_line(folder / "AAAAAAAAAAA.csv", 3)
    (folder / "DDDDDDDDDDD.csv").write_text("start,end,text\n1.0,2.0," + "x" * 200_000 + "\n")
    rep = prepare("howto100m", tmp_path, tmp_path / "out", val_list="val_list.csv", workers=1)
    assert table(tmp_path / "out", *TIMED) == [("BBB-BB_BBBB", 68.46000000000001, 70.0, "wash them, then dry", "train")]
    assert rep.rejected == {"not UTF-8 text; file skipped": 1,
                            "unreadable CSV (field larger than field limit (131072)); file skipped": 1,
                            "end <= start, or a negative or non-finite time": 1, "empty caption": 1}
    assert sorted(rep.rejected_examples) == [
        "AAAAAAAAAAA.csv line 3: not UTF-8 text; file skipped",
        "BBB-BB_BBBB.csv line 3: end <= start, or a negative or non-finite time",
        "BBB-BB_BBBB.csv line 4: empty caption",
        "DDDDDDDDDDD.csv line 2: unreadable CSV (field larger than field limit (131072)); file skipped"]


def test_msvd_caption_json_that_is_not_json_is_named(tmp_path):
    fx.write_msvd(tmp_path)
    for p in tmp_path.rglob("raw-captions.pkl"):
        p.unlink()
        fx.write(p.parent, "raw-captions.json", '{"a": [')
    with pytest.raises(SourceError, match=r"^raw-captions.json: not valid JSON \(Expecting value"):
        prepare("msvd", tmp_path, tmp_path / "m.parquet")


def test_options_from_the_command_line_keep_their_text(tmp_path, capsys):
    """`-o` values are typed by each option's default: a path option that looks like a number
    stays the path it names (a folder `2016`, a file `0123`), a count must be at least 1."""
    from clipray.cli import main

    fx.write_msrvtt(tmp_path / "root")
    (tmp_path / "root" / "msrvtt_data").rename(tmp_path / "root" / "2016")  # relative to --root
    assert main(["data", "prepare", "msrvtt", "--root", str(tmp_path / "root"), "--out",
                 str(tmp_path / "m.parquet"), "-o", "annotations=2016", "-o", "expand=false"]) == 0
    assert "  rows      4 (test 1, train 3)" in capsys.readouterr().out
    fx.touch(tmp_path, "v.mp4")
    fx.write(tmp_path, "0123", json.dumps({"path": "v.mp4", "caption": "a red square"}) + "\n")
    assert main(["data", "prepare", "generic", "--root", str(tmp_path), "--out", str(tmp_path / "g.parquet"),
                 "-o", "file=0123"]) == 0
    assert table(tmp_path / "g.parquet", "caption") == [("a red square",)]
    capsys.readouterr()
    assert main(["data", "prepare", "generic", "--root", str(tmp_path), "--out", str(tmp_path / "g"),
                 "-o", "file=0123", "-o", "rows_per_shard=0"]) == 2
    assert capsys.readouterr().err == ("clipray data: error: source 'generic': option rows_per_shard=0 "
                                       "must be at least 1\n")


def test_an_output_of_the_wrong_kind_is_refused_before_reading(tmp_path, capsys):
    """`--out x.parquet` that is a folder, or a shard folder's name that is a file: an error
    line before any annotation is read, and what is there is left as it was. So is a folder
    holding other Parquet files (`clipray data synth`'s, with its manifest.parquet and
    events.parquet), which every read takes as part of a folder manifest: the prepare said it
    had written the manifest, and each read of it then failed on row ids repeated."""
    from clipray.cli import main

    fx.write_youcook2(tmp_path)
    (tmp_path / "dir.parquet").mkdir()
    (tmp_path / "dir.parquet" / "keep.txt").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    for name in ("manifest.parquet", "events/part-00000.parquet"):
        write_manifest([{"video_id": "v", "path": "v.mp4", "caption": "mine", "split": "train"}],
                       tmp_path / "synth" / name)
    for out, msg in ((tmp_path / "dir.parquet", "is a folder; a manifest named *.parquet is written as one file"),
                     (tmp_path / "afile", "is a file; a manifest not named *.parquet is a folder of shards"),
                     (tmp_path / "synth", "holds other Parquet files (events/part-00000.parquet, manifest.parquet), "
                                          "which a folder manifest would be read with")):
        assert main(["data", "prepare", "youcook2", "--root", str(tmp_path), "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"clipray data: error: {out}: {msg}")
    assert (tmp_path / "dir.parquet" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "afile").read_text() == "mine"
    assert sorted(str(p.relative_to(tmp_path / "synth")) for p in (tmp_path / "synth").rglob("*")) == [
        "events", "events/part-00000.parquet", "manifest.parquet"]
    # a folder of this manifest's own shards is written again, as before
    assert prepare("youcook2", tmp_path, tmp_path / "m").rows == prepare("youcook2", tmp_path, tmp_path / "m").rows == 3


def test_a_csv_line_the_csv_module_cannot_read_is_named(tmp_path):
    fx.touch(tmp_path, "a.mp4", "b.mp4")
    fx.write(tmp_path, "own.csv", "path,caption\na.mp4,one\nb.mp4," + "x" * 200_000 + "\n")
    with pytest.raises(SourceError, match=r"^own.csv line 3: unreadable CSV \(field larger than field limit"):
        prepare("generic", tmp_path, tmp_path / "m.parquet", file="own.csv")


@pytest.mark.parametrize("text, line, says", [
    # an unclosed quote took every later line into one caption: 4 rows came out as 1, exit 0
    ("path,caption\na.mp4,one\nb.mp4,\"the dog says woof\na.mp4,three\nb.mp4,four\n", 3,
     "unexpected end of data, a '\"' opened in this record is never closed"),
    # a stray quote inside a quoted field: stored as 'a cat" jumps"'
    ("path,caption\na.mp4,\"a \"cat\" jumps\"\nb.mp4,two\n", 2, "',' expected after '\"'"),
])
def test_a_bad_quote_in_a_csv_is_an_error_naming_its_line_not_merged_rows(tmp_path, text, line, says):
    fx.touch(tmp_path, "a.mp4", "b.mp4")
    fx.write(tmp_path, "own.csv", text)
    with pytest.raises(SourceError) as e:
        prepare("generic", tmp_path, tmp_path / "m.parquet", file="own.csv")
    assert str(e.value) == (f"own.csv line {line}: unreadable CSV ({says}; quote a field that holds '\"' and "
                            "double each '\"' in it (RFC 4180))")
    # doubled quotes, RFC 4180's way, are a caption's own
    fx.write(tmp_path, "own.csv", 'path,caption\na.mp4,"a ""cat"" jumps"\nb.mp4,"two,\nlines"\n')
    assert prepare("generic", tmp_path, tmp_path / "m.parquet", file="own.csv").rows == 2


def test_generic_jsonl_numeric_ids_zero_are_kept(tmp_path):
    # JSONL ids are often numbers counted from 0: video_id 0 and group 0 are given values, not
    # absent ones (spec section 8: video_id defaults to the path stem only when not given)
    fx.touch(tmp_path, "clips/a.mp4", "clips/b.mp4")
    lines = [{"path": "clips/a.mp4", "video_id": 0, "caption": "first", "group": 0},
             {"path": "clips/b.mp4", "video_id": 1, "caption": "second", "group": 0}]
    fx.write(tmp_path, "ann.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "g.parquet"
    prepare("generic", tmp_path, out, file="ann.jsonl")
    assert table(out, "video_id", "caption", "group") == [("0", "first", "0"), ("1", "second", "0")]


def test_one_sentence_that_is_no_text_drops_itself_not_its_paragraph(tmp_path):
    """A sentence holding a lone surrogate (JSON's "\\ud83d", an emoji's escape cut in half) is
    no text Parquet can store: joined into its ActivityNet paragraph, the writer refused the
    whole paragraph, every good sentence of the video with it. The sentence alone is rejected
    now, as an empty one is; in the sentence view its row, as before."""
    fx.touch(tmp_path, "videos/A.mp4")
    fx.write(tmp_path, "train.json", '{"v_A": {"duration": 20, "timestamps": [[0, 5], [5, 9], [9, 12]], '
                                     '"sentences": ["a man walks.", "he waves \\ud83d.", "he sits."]}}')
    fx.write(tmp_path, "val_1.json", "{}")
    why = ("invalid row: 'caption' holds a lone surrogate (half of a pair: a JSON escape cut from an emoji's, "
           "or a file name that is not UTF-8), which is not text")
    rep = prepare("activitynet", tmp_path, tmp_path / "p.parquet", view="paragraph")
    assert table(tmp_path / "p.parquet", "video_id", "caption") == [("v_A", "a man walks. he sits.")]
    assert rep.rejected == {why: 1} and rep.rejected_examples[0].startswith("train.json v_A sentence 1: ")
    rep = prepare("activitynet", tmp_path, tmp_path / "s.parquet")
    assert [c for _, c in table(tmp_path / "s.parquet", "video_id", "caption")] == ["a man walks.", "he sits."]
    assert rep.rejected == {why: 1}


def test_a_video_in_train_json_and_val_1_json_is_said_in_the_report(tmp_path):
    """The report said nothing of a video captioned in both of ActivityNet's files (it is kept
    in both splits); it says how many now, as for every source."""
    fx.touch(tmp_path, "videos/A.mp4", "videos/B.mp4")
    entry = {"duration": 20, "timestamps": [[0, 5]], "sentences": ["a man walks"]}
    fx.write(tmp_path, "train.json", json.dumps({"v_A": entry, "v_B": entry}))
    fx.write(tmp_path, "val_1.json", json.dumps({"v_B": entry}))
    rep = prepare("activitynet", tmp_path, tmp_path / "a.parquet")
    assert rep.per_split == {"train": 2, "test": 1}
    assert rep.notes == ["1 video has rows in more than one split (e.g. v_B): a split evaluated on them "
                         "shares videos with the others"]


def test_generic_finds_hidden_files_a_row_names(tmp_path):
    """The root's listing leaves dotfiles out (macOS's '._a.mp4' forks), and a row naming one,
    or a file under a hidden folder, was reported missing though it was there."""
    root = tmp_path / "root"
    fx.touch(root, "clips/.take2.mp4", ".cache/b.mp4", "clips/a.mp4")
    fx.touch(tmp_path, "outside.mp4")  # named '../outside.mp4': outside the listed root, found as before
    fx.write(root, "ann.csv", "path,caption\nclips/.take2.mp4,second take\n.cache/b.mp4,cached\n"
                              "clips/a.mp4,plain\nclips/.gone.mp4,not there\n../outside.mp4,outside\n")
    out = tmp_path / "g.parquet"
    rep = prepare("generic", root, out, file="ann.csv")
    assert [(r["path"], r["video_id"], r["caption"]) for r in read_manifest(str(out)).to_pylist()] == [
        (str(root / "clips/.take2.mp4"), ".take2", "second take"), (str(root / ".cache/b.mp4"), "b", "cached"),
        (str(root / "clips/a.mp4"), "a", "plain"), (str(tmp_path / "outside.mp4"), "outside", "outside")]
    assert rep.missing_videos == ["clips/.gone.mp4"]


def test_generic_blank_split_cell_defaults_to_train(tmp_path):
    # spec section 8: split defaults to train; a cell holding only spaces is empty, as it is
    # for start/end (seconds() reads "  " as no time), not an unknown split
    fx.touch(tmp_path, "clips/a.mp4")
    fx.write(tmp_path, "ann.csv", "path,caption,start,end,split\nclips/a.mp4,a cat,  ,  ,  \n")
    out = tmp_path / "g.parquet"
    rep = prepare("generic", tmp_path, out, file="ann.csv")
    assert table(out, *TIMED) == [("a", None, None, "a cat", "train")]
    assert rep.rejected == {}


def test_generic_odd_text_round_trips_and_a_lone_surrogate_is_one_rejected_row(tmp_path):
    # captions and names in any script come back exactly; JSON's "\ud83d" (an emoji's escape cut
    # in half by a bad exporter) is no text Parquet can store: it failed the writer's whole row
    # group (a UnicodeEncodeError traceback, no manifest), where the row is rejected, and a path
    # holding one is reported missing in a report that prints
    odd = ["clips/a b #1 %20 +&.mp4", "clips/-lead.mp4", "clips/ÉCOLE é.mp4", "clips/字幕.mp4"]
    fx.touch(tmp_path, *odd, "clips/other.mp4")
    caps = ["Café naïve 😀", 'tab\there, "quoted", <b>x</b>\nnew line\x00nul', "مرحبا بالعالم", "视频 字幕"]
    lines = [json.dumps({"path": p, "caption": c}) for p, c in zip(odd, caps)] + [
        '{"path": "clips/-lead.mp4", "caption": "cut \\ud83d emoji"}',
        '{"path": "clips/other.mp4", "video_id": "v\\udc80", "caption": "bad id"}',
        '{"path": "clips/gone \\ud83d.mp4", "caption": "missing"}',
    ]
    fx.write(tmp_path, "ann.jsonl", "\n".join(lines) + "\n")
    out = tmp_path / "g.parquet"
    rep = prepare("generic", tmp_path, out, file="ann.jsonl")
    assert [(r["path"], r["video_id"], r["caption"]) for r in read_manifest(str(out)).to_pylist()] == [
        (str(tmp_path / p), os.path.splitext(os.path.basename(p))[0], c) for p, c in zip(odd, caps)]
    assert rep.rejected_count == 2 and all("lone surrogate" in k for k in rep.rejected)
    assert rep.missing_videos == ["clips/gone \\ud83d.mp4"]
    assert "gone \\ud83d.mp4" in str(rep).encode("utf-8").decode()


def test_generic_finds_a_video_whose_name_is_the_same_text_in_another_unicode_form(tmp_path):
    # a Mac writes 'é' as 'e' + a combining accent (NFD), and a copy keeps those bytes; an
    # annotation typed elsewhere has the one letter (NFC). The two look alike in every listing,
    # and the video was reported missing; the manifest names the file as it is on disk.
    import unicodedata

    nfd, nfc = (unicodedata.normalize(f, "clips/vidéo à.mp4") for f in ("NFD", "NFC"))
    other_nfc, other_nfd = (unicodedata.normalize(f, "ÉCOLE.mp4") for f in ("NFC", "NFD"))
    fx.touch(tmp_path, nfd, other_nfc)
    fx.write(tmp_path, "ann.csv", "\n".join([
        "path,caption,video_id", f"{nfc},relative NFC,", f"{tmp_path / nfc},absolute NFC,",
        f"{other_nfd},relative NFD,", "clips/gone é.mp4,missing,"]) + "\n")
    out = tmp_path / "g.parquet"
    rep = prepare("generic", tmp_path, out, file="ann.csv")
    assert table(out, "path", "caption") == [(str(tmp_path / nfd), "relative NFC"),
                                             (str(tmp_path / nfd), "absolute NFC"),
                                             (str(tmp_path / other_nfc), "relative NFD")]
    assert rep.missing_videos == ["clips/gone é.mp4"]


def test_prepare_counts_rows_per_second_from_the_first_row(tmp_path, monkeypatch, capsys):
    """The rows/s of `clipray data prepare`'s progress lines was spread over the time before the
    first row too: reading HowTo100M's annotations and listing its 1.2M videos in object
    storage takes minutes, so the rate read a fraction of the real one for a long while. Now it
    counts from the first row, and a long wait for it is a line of its own. A fake clock here:
    100 s to the first row, then a second a row."""
    import dataclasses
    import types

    import clipray.sources as sources

    fx.touch(tmp_path, *[f"v{i}.mp4" for i in range(4)])
    fx.write(tmp_path, "own.csv", "path,caption\n" + "".join(f"v{i}.mp4,clip {i}\n" for i in range(4)))
    now = [0.0]
    spec = sources.SOURCES["generic"]

    def slow(ctx):
        for k, row in enumerate(spec.rows(ctx)):
            now[0] += 100.0 if k == 0 else 1.0
            yield row

    monkeypatch.setitem(sources.SOURCES, "generic", dataclasses.replace(spec, rows=slow))
    monkeypatch.setattr(sources, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    rep = prepare("generic", tmp_path, tmp_path / "m.parquet", progress_s=50, file="own.csv")
    assert rep.rows == 4
    first, *lines = capsys.readouterr().err.splitlines()
    assert first == "  generic: first row after 100s (annotations read, videos listed)"
    assert lines == []  # (progress lines go by the real clock: none in this test's instant)
    capsys.readouterr()
    now[0] = 0.0
    prepare("generic", tmp_path, tmp_path / "n.parquet", progress_s=0, file="own.csv")
    first, *lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "  generic: 4 rows read, 0 written, 0 shards, 1 rows/s"  # 4 rows in the 3 s after the first
