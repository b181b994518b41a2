"""Object storage for real: manifests, videos and skip reports on an S3 endpoint (moto server).

The dataset is uploaded to a loopback S3 bucket and the local copy that was uploaded is deleted
before streaming, so every byte the pipeline decodes comes over the S3 protocol: pyarrow reads
the manifest, s3fs reads the videos (inside Ray actors) and writes the skip files.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clipray.config import DataConfig, VideoConfig
from clipray.manifest import (ManifestWriter, default_root, iter_checked, manifest_files, read_manifest,
                              resolve_path, write_manifest)
from clipray.pipeline import clip_dataset, collect_skips
from clipray.video import decode_clip


@pytest.fixture(scope="module")
def s3(s3_server):
    if s3_server is None:
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    return s3_server.ensure_bucket()


@pytest.fixture(scope="module")
def s3_dataset(s3, synth_small, tmp_path_factory):
    """The synthetic set uploaded to s3://<bucket>/synth/, manifest with relative paths.

    Returns (manifest URI, rows as written, local reference copy of the videos, ghost row ids).
    One video's object is deleted from the bucket after upload but still exists locally, so a
    reader falling back to a local file would decode its rows (the whole-video row and its
    event rows) instead of reporting them missing.
    """
    src = synth_small["manifest"].rsplit("/", 1)[0]
    staging = tmp_path_factory.mktemp("s3-staging")
    shutil.copytree(f"{src}/videos", staging / "videos")
    fs = s3.fs()
    fs.put(str(staging / "videos"), f"{s3.bucket}/synth/videos", recursive=True)
    shutil.rmtree(staging)  # the uploaded copy is gone: only the bucket holds these bytes

    rows = read_manifest(synth_small["manifest"]).to_pylist() + \
        read_manifest(synth_small["events_manifest"]).to_pylist()
    for r in rows:
        assert not r["path"].startswith("/") and "://" not in r["path"]  # relative to the manifest
        r["split"] = "train"
    ghost_path = rows[5]["path"]
    fs.rm(f"{s3.bucket}/synth/{ghost_path}")
    ghosts = {i for i, r in enumerate(rows) if r["path"] == ghost_path}
    assert len(ghosts) >= 2  # the video's row and its event rows
    manifest = s3.url("synth/manifest.parquet")
    write_manifest(rows, manifest)  # pyarrow S3FileSystem writes it
    return manifest, rows, src, ghosts


def test_manifest_on_s3_resolves_to_s3_uris(s3, s3_dataset):
    manifest, rows, _, _ = s3_dataset
    fs, files = manifest_files(manifest)
    assert type(fs).__name__ == "S3FileSystem" and files == [f"{s3.bucket}/synth/manifest.parquet"]
    assert read_manifest(manifest).to_pylist() == [{**r, "row_id": i} for i, r in enumerate(rows)]
    root = default_root(manifest)
    assert root == s3.url("synth")
    assert resolve_path(rows[0]["path"], root) == s3.url(f"synth/{rows[0]['path']}")


def test_the_video_root_is_the_manifests_folder_whatever_the_manifest_is_named(s3, s3_dataset, tmp_path):
    """The root was told by the name: a manifest file `clips.pq` (or `MANIFEST.PARQUET`) was
    taken for a folder of shards and became its own root, so every clip resolved to
    `.../clips.pq/videos/...` and was skipped as a missing file; a folder of shards named
    `*.parquet` took its parent for the root. It is told by what the path is now."""
    manifest, rows, _, _ = s3_dataset
    fs = s3.fs()
    fs.copy(f"{s3.bucket}/synth/manifest.parquet", f"{s3.bucket}/synth/clips.pq")
    root = default_root(s3.url("synth/clips.pq"))
    assert root == s3.url("synth")
    assert fs.exists(resolve_path(rows[0]["path"], root).removeprefix("s3://"))
    fs.copy(f"{s3.bucket}/synth/manifest.parquet", f"{s3.bucket}/spark/out.parquet/part-00000.parquet")  # Spark's way
    assert manifest_files(s3.url("spark/out.parquet"))[1] == [f"{s3.bucket}/spark/out.parquet/part-00000.parquet"]
    assert default_root(s3.url("spark/out.parquet")) == s3.url("spark/out.parquet")
    write_manifest([dict(video_id="v", path="videos/v.mp4", caption="a clip", split="train")], str(tmp_path / "m.parquet"))
    for name in ("clips.pq", "MANIFEST.PARQUET"):
        (tmp_path / name).write_bytes((tmp_path / "m.parquet").read_bytes())
        assert read_manifest(str(tmp_path / name)).num_rows == 1 and default_root(str(tmp_path / name)) == str(tmp_path)
    # not written yet: by its name, as before
    assert default_root(str(tmp_path / "new" / "m.parquet")) == str(tmp_path / "new")
    assert default_root(str(tmp_path / "new" / "m")) == str(tmp_path / "new" / "m")


def test_a_video_root_in_a_bucket_that_holds_nothing_is_refused_not_an_empty_manifest(s3, s3_dataset, tmp_path):
    """A typo in an s3:// --root listed nothing, so every video was missing, and an existing
    manifest was replaced by an empty one, exit 0; a local root that is no folder was refused."""
    from clipray.sources import SourceError, prepare

    (tmp_path / "own.csv").write_text("path,caption\nvideos/synth00001.mp4,one\n")
    out = s3.url("kept/m")
    assert prepare("generic", s3.url("synth"), out, file=str(tmp_path / "own.csv")).rows == 1
    with pytest.raises(SourceError, match=r"^video root 's3://[^']+/synthh' not found: no object under it"):
        prepare("generic", s3.url("synthh"), out, file=str(tmp_path / "own.csv"))
    assert read_manifest(out).num_rows == 1  # kept


def test_generic_rows_find_hidden_and_parent_folder_videos_under_a_bucket_root(s3, tmp_path):
    """Under an s3:// root a row naming a hidden file or one in a parent folder ('../') was
    reported missing (the listing leaves dotfiles out and holds only the root's keys): each is
    looked up by itself now, within the root's bucket ('../' past it names no other bucket)."""
    from clipray.sources import prepare

    fs = s3.fs()
    for key in ("gen/root/a.mp4", "gen/root/clips/.take2.mp4", "gen/outside.mp4"):
        fs.pipe(f"{s3.bucket}/{key}", b"x")
    (tmp_path / "own.csv").write_text("path,caption\na.mp4,plain\nclips/.take2.mp4,hidden\n../outside.mp4,parent\n"
                                      "../../../other-bucket/x.mp4,past the bucket\nclips/.gone.mp4,missing\n")
    rep = prepare("generic", s3.url("gen/root"), tmp_path / "m.parquet", file=str(tmp_path / "own.csv"))
    got = [(r["path"], r["caption"]) for r in read_manifest(tmp_path / "m.parquet").to_pylist()]
    assert got == [(s3.url("gen/root/a.mp4"), "plain"), (s3.url("gen/root/clips/.take2.mp4"), "hidden"),
                   (s3.url("gen/outside.mp4"), "parent")]
    assert rep.missing_videos == ["../../../other-bucket/x.mp4", "clips/.gone.mp4"]


def test_a_prefix_named_as_a_video_is_not_a_regular_file_not_an_empty_one(s3):
    """A manifest row naming a prefix ("folder") of the bucket: s3fs opens it as a file of size 0,
    and the clip was skipped as an "empty file", sending the user to look for a cut upload. It
    is "not a regular file" now, as a local folder is; a real empty object stays "empty file"."""
    from clipray.video import SkipClip, open_source

    fs = s3.fs()
    fs.pipe(f"{s3.bucket}/prefix-test/videos/a.mp4", b"xyz")
    fs.pipe(f"{s3.bucket}/prefix-test/marker/", b"")  # a zero-byte "folder" object, as consoles make
    fs.pipe(f"{s3.bucket}/prefix-test/empty.mp4", b"")
    for key, reason in (("videos", "not a regular file"), ("videos/", "not a regular file"),
                        ("marker/", "not a regular file"), ("empty.mp4", "empty file"), ("gone.mp4", "missing file")):
        with pytest.raises(SkipClip) as got:
            open_source(s3.url(f"prefix-test/{key}"))
        assert str(got.value) == reason, key
    f = open_source(s3.url("prefix-test/videos/a.mp4"))
    assert f.read() == b"xyz"
    f.close()


def test_sharded_manifest_round_trips_on_s3(s3):
    rows = [dict(video_id=f"v{i}", path=f"videos/v{i}.mp4", caption=f"clip {i}", split="train")
            for i in range(25)]
    with ManifestWriter(s3.url("sharded/manifest"), rows_per_shard=10) as w:
        w.extend(rows)
    assert w.shards == [f"{s3.bucket}/sharded/manifest/part-{k:05d}.parquet" for k in range(3)]
    assert sorted(s3.fs().glob(f"{s3.bucket}/sharded/manifest/*.parquet")) == w.shards
    got = list(iter_checked(s3.url("sharded/manifest"), batch_rows=4))
    assert [(g["row_id"], g["video_id"], g["caption"]) for g in got] == \
        [(i, f"v{i}", f"clip {i}") for i in range(25)]
    # a resume finds the manifest copied to another prefix by its files' names and sizes
    from clipray.manifest import manifest_signature

    s3.fs().copy(f"{s3.bucket}/sharded/manifest", f"{s3.bucket}/moved/manifest", recursive=True)
    sig = manifest_signature(s3.url("sharded/manifest"))
    assert [n for n, _, _ in sig] == [f"part-{k:05d}.parquet" for k in range(3)] and all(b > 0 for _, b, _ in sig)
    assert manifest_signature(s3.url("moved/manifest")) == sig


def test_pipeline_streams_from_s3_and_reports_skips_to_s3(ray_local, s3, s3_dataset, tmp_path):
    manifest, rows, local_root, ghosts = s3_dataset
    cfg = VideoConfig(fps=2.0, max_frames=4, size=32, timeout_s=30.0)
    data = DataConfig(manifest=manifest, video=cfg, decode_actors=2, decode_cpus=0.5, decode_batch=4,
                      max_words=16)
    run = s3.url("run")
    got = {}
    for b in clip_dataset(data, run).iter_batches(batch_size=8, batch_format="numpy"):
        for i, rid in enumerate(b["row_id"]):
            assert int(rid) not in got
            got[int(rid)] = (b["frames"][i], b["frame_mask"][i], b["tokens"][i])
    assert set(got) == set(range(len(rows))) - ghosts  # every clip but the deleted video's, once
    for rid, (frames, mask, tokens) in got.items():  # bit-identical to decoding the local file
        r = rows[rid]
        ref = decode_clip(f"{local_root}/{r['path']}", r["start"], r["end"], cfg)
        assert np.array_equal(frames, ref.frames) and np.array_equal(mask, ref.mask), rid
        assert mask.sum() >= 1 and tokens[0] == 49406 and 49407 in tokens

    report = collect_skips(run)
    assert report["report"] == s3.url("run/skip_report.jsonl")
    assert report["skipped"] == len(ghosts) and report["by_reason"] == {"missing file": len(ghosts)}
    fs = s3.fs()
    assert fs.ls(f"{s3.bucket}/run/skips")  # the actors' own skip files went to the bucket
    lines = fs.cat(f"{s3.bucket}/run/skip_report.jsonl").decode().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"row_id": i, "video_id": rows[i]["video_id"], "path": rows[i]["path"], "reason": "missing file"}
        for i in sorted(ghosts)]
    assert not (tmp_path / "run").exists()


def test_manifest_keys_with_spaces_hash_and_accents_are_read_where_written(ray_local, s3, synth_small):
    """An object key is taken as written, by pyarrow (the manifest) as by s3fs (its videos and
    skip files): pyarrow's URI parsing refused the space and the 'é', and cut the key at '#',
    writing and reading the manifest in another folder than the one its videos resolve to.
    A '::' in a video's key: fsspec read it as a chain of filesystems, and every such clip was
    skipped ("cannot read: TypeError ... 'target_options'")."""
    base = "odd/run #2/vidéos à b"
    src = synth_small["manifest"].rsplit("/", 1)[0]
    rows = read_manifest(synth_small["manifest"]).to_pylist()[:5]
    fs = s3.fs()
    for i, r in enumerate(rows):
        fs.put_file(f"{src}/{r['path']}", f"{s3.bucket}/{base}/m/clip #{i} é::take.mp4")
        r.update(path=f"clip #{i} é::take.mp4", split="train")
    with ManifestWriter(s3.url(f"{base}/m"), rows_per_shard=2) as w:
        w.extend(rows)
    shards = [f"{s3.bucket}/{base}/m/part-{k:05d}.parquet" for k in range(3)]
    assert sorted(fs.glob(f"{s3.bucket}/odd/**/*.parquet")) == w.shards == shards
    assert manifest_files(s3.url(f"{base}/m"))[1] == shards
    assert default_root(s3.url(f"{base}/m")) == s3.url(f"{base}/m")
    data = DataConfig(manifest=s3.url(f"{base}/m"), video=VideoConfig(fps=2.0, max_frames=2, size=32),
                      decode_actors=1, decode_cpus=0.5, decode_batch=4, max_words=16)
    run = s3.url(f"{base}/run")
    got = [int(i) for b in clip_dataset(data, run).iter_batches(batch_size=8) for i in b["row_id"]]
    assert sorted(got) == list(range(5)) and collect_skips(run)["skipped"] == 0


def test_rewriting_a_manifest_folder_with_a_hash_in_its_key_clears_only_that_folder(s3):
    """`data prepare --out` clears a folder manifest's old shards. pyarrow's URI parsing cut
    s3://.../m#2 at the '#', so the shards of the manifest m were deleted instead."""
    from clipray.manifest import remove_old_shards

    fs = s3.fs()
    for key in ("keep/m/part-00000.parquet", "keep/m#2/part-00000.parquet", "keep/m#2/part-00001.parquet.partial",
                "keep/m#2/notes.txt"):
        fs.pipe_file(f"{s3.bucket}/{key}", b"x")
    remove_old_shards(s3.url("keep/m#2"), [f"{s3.bucket}/keep/m#2/part-00001.parquet"])  # the new shards kept
    left = sorted(p for p in fs.find(f"{s3.bucket}/keep") if not p.endswith("/"))  # pyarrow leaves a folder marker
    assert left == [f"{s3.bucket}/keep/m#2/notes.txt", f"{s3.bucket}/keep/m#2/part-00001.parquet.partial",
                    f"{s3.bucket}/keep/m/part-00000.parquet"]


def test_a_folder_manifest_written_again_on_s3_holds_the_new_rows_only(s3):
    """The writer left an earlier, longer manifest's shards in the folder: 10 rows in 5 shards,
    then 3 rows in 2, read back as 9 rows."""
    rows = [dict(video_id=f"v{i}", path=f"v{i}.mp4", caption=f"c{i}", split="train") for i in range(10)]
    write_manifest(rows, s3.url("again/m"), rows_per_shard=2)
    write_manifest(rows[:3], s3.url("again/m"), rows_per_shard=2)
    assert manifest_files(s3.url("again/m"))[1] == [f"{s3.bucket}/again/m/part-0000{k}.parquet" for k in (0, 1)]
    assert read_manifest(s3.url("again/m")).column("caption").to_pylist() == ["c0", "c1", "c2"]


def test_the_skip_report_lists_skip_files_written_after_this_process_listed_the_run(s3):
    """Decoders in other processes write the skip files; the driver merges them. s3fs keeps the
    listings this process made: after the resume check listed a resumed run's folder (no skips/
    then), a failed run's report found no skip file (the 'clips skipped' hint missing, an empty
    skip_report.jsonl written), and a second report in one process (clip editing's rounds) read
    the first one's listing of skips/ and left out every file written since."""
    import fsspec

    from train.driver import check_resume, put_text, resume_key
    from clipray.config import load_config

    def rec(i):
        return json.dumps({"row_id": i, "video_id": f"v{i}", "path": f"p{i}", "reason": "decode failed: x"}) + "\n"

    worker = s3.fs()  # a decode actor's own client
    out = s3.url("cache/run")
    cfg = load_config(None, ["data.batch_size=8"])
    worker.pipe_file(f"{s3.bucket}/cache/run/checkpoint_000001/state.json", b"{}")
    worker.pipe_file(f"{s3.bucket}/cache/run/checkpoint_manager_snapshot.json", b"{}")
    worker.pipe_file(f"{s3.bucket}/cache/run/resume_key.json", json.dumps(resume_key(cfg, 5)).encode())
    check_resume(out, resume_key(cfg, 5))  # a resumed run: lists the run folder, writes nothing
    worker.pipe_file(f"{s3.bucket}/cache/run/skips/a-000001.jsonl", rec(1).encode())
    assert collect_skips(out)["skipped"] == 1
    assert fsspec.open(f"{out}/skip_report.jsonl", "r").open().read() == rec(1)
    worker.pipe_file(f"{s3.bucket}/cache/run/skips/b-000001.jsonl", rec(2).encode())  # a later round
    put_text(f"{out}/config.yaml", "x")  # what the driver writes between two reports
    report = collect_skips(out)
    on_disk = fsspec.open(f"{out}/skip_report.jsonl", "r").open().read().splitlines()
    assert report["skipped"] == 2 and [json.loads(r)["row_id"] for r in on_disk] == [1, 2]
