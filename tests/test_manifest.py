"""The clip manifest: validation names the bad row; sharded writes read back exactly."""

import math

import numpy as np
import pytest

from clipray.manifest import (ManifestError, check_manifest, iter_checked, manifest_files,
                              manifest_metadata, read_manifest, write_manifest)


def rows(n):
    return [dict(video_id=f"v{i // 2}", path=f"videos/v{i // 2}.mp4", caption=f"  caption {i} ",
                 split="train" if i % 4 else "test", start=None if i % 3 else 1.0,
                 end=None if i % 3 else 2.5) for i in range(n)]


def test_sharded_roundtrip(tmp_path):
    out = tmp_path / "m"
    assert write_manifest(rows(25), out, rows_per_shard=10, metadata={"source": "unit"}) == 25
    fs, files = manifest_files(str(out))
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-00000.parquet", "part-00001.parquet",
                                                    "part-00002.parquet"]
    t = read_manifest(out)
    assert t.column("row_id").to_pylist() == list(range(25))
    assert t.column("caption").to_pylist()[3] == "caption 3"  # stripped
    assert t.column("group").to_pylist()[5] == "v2"  # defaults to video_id
    assert t.column("start").to_pylist()[:4] == [1.0, None, None, 1.0]
    assert read_manifest(out, split="test").num_rows == 7
    assert [r["row_id"] for r in iter_checked(out, batch_rows=4)] == list(range(25))
    assert manifest_metadata(out) == {"source": "unit"}
    s = check_manifest(out)
    assert (s.rows, len(s.videos), s.distinct_captions, s.per_split) == (25, 13, 25, {"train": 18, "test": 7})


def test_a_folder_write_killed_midway_reads_as_unfinished_not_as_a_smaller_manifest(tmp_path):
    """Shards are written as they fill. A process killed before close() (OOM, preemption) left
    complete-looking shards that `data check` called valid: 20 of 25 rows, without a word."""
    from clipray.manifest import ManifestWriter

    out = tmp_path / "m"
    w = ManifestWriter(out, rows_per_shard=10).extend(rows(25))  # two shards full, never closed
    assert len(w.shards) == 2
    with pytest.raises(ManifestError, match="an unfinished manifest"):
        check_manifest(out)
    w.close()  # the same write finished: every row, in order, under the usual names
    assert read_manifest(out).column("row_id").to_pylist() == list(range(25))
    assert sorted(p.name for p in out.iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]

    # a failed write removes what it wrote, finished or not
    for close in (False, True):
        w = ManifestWriter(tmp_path / f"gone{close}", rows_per_shard=10).extend(rows(25))
        if close:
            w.close()
        w.discard()
        assert list((tmp_path / f"gone{close}").iterdir()) == []


def test_a_write_stopped_while_renaming_its_shards_reads_as_unfinished_and_discards_whole(tmp_path):
    """close() gives the shards their final names one by one; on an object store each rename
    is a copy of up to ~150 MB. A write stopped after the first renames left a folder of some
    `part-*.parquet` and some `.partial` shards that data check read as a complete manifest of
    the renamed rows only; and discard() after a rename that failed removed only the `.partial`
    ones, leaving the renamed shards as that smaller manifest."""
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from clipray.manifest import ManifestWriter, manifest_files

    class SecondMoveFails(FSSpecHandler):  # the local filesystem, but a copy that breaks
        moves = 0

        def move(self, src, dest):
            SecondMoveFails.moves += 1
            if SecondMoveFails.moves == 2:
                raise OSError("connection reset during copy")
            super().move(src, dest)

    out = tmp_path / "m"
    w = ManifestWriter(out, rows_per_shard=10)
    w.fs = PyFileSystem(SecondMoveFails(fsspec.filesystem("file")))
    w.extend(rows(25))
    with pytest.raises(OSError, match="connection reset"):
        w.close()
    assert sorted(p.name for p in out.iterdir()) == [
        "part-00000.parquet", "part-00001.parquet.partial", "part-00002.parquet.partial"]
    for read in (check_manifest, read_manifest, manifest_files):
        with pytest.raises(ManifestError, match=r"an unfinished manifest \(2 \*.parquet.partial shards"):
            read(str(out))
    w.discard()  # what sources.prepare does when close() raises
    assert list(out.iterdir()) == []


def test_a_folder_manifest_written_again_holds_the_new_rows_only(tmp_path):
    """Only `data prepare` removed a folder's old shards: write_manifest (and a ManifestWriter)
    over 25 rows in 3 shards of 10 wrote 7 rows in 2 shards of 5 beside the old third shard,
    read back as 12 rows (7 new, then rows 20-24 of the old) and said valid by `data check`."""
    from clipray.manifest import ManifestWriter

    out = tmp_path / "m"
    write_manifest(rows(25), out, rows_per_shard=10)
    assert write_manifest(rows(7), out, rows_per_shard=5) == 7
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert read_manifest(out).column("caption").to_pylist() == [f"caption {i}" for i in range(7)]
    assert check_manifest(out).rows == 7
    with ManifestWriter(out, rows_per_shard=2) as w:  # 3 rows: 2 shards, the second shard replaced
        w.extend(rows(3))
    assert read_manifest(out).column("row_id").to_pylist() == [0, 1, 2]


def test_a_write_that_fails_midway_leaves_the_earlier_manifest_readable(tmp_path, monkeypatch):
    """write_manifest refusing a bad row (row 15, its first shard of 10 written) left that shard's
    part-00000.parquet.partial beside the earlier manifest's shards, which then read as "an
    unfinished manifest"; into one file it left x.parquet.partial beside x.parquet."""
    from clipray import manifest

    out = tmp_path / "m"
    write_manifest(rows(25), out, rows_per_shard=10)
    bad = rows(20)
    bad[15]["caption"] = " "
    with pytest.raises(ManifestError, match="row 15 .*empty caption"):
        write_manifest(bad, out, rows_per_shard=10)
    assert sorted(p.name for p in out.iterdir()) == [f"part-0000{i}.parquet" for i in range(3)]
    assert read_manifest(out).column("row_id").to_pylist() == list(range(25))

    monkeypatch.setattr(manifest, "ROWS_PER_GROUP", 4)  # rows 0-3 written before row 15 is met
    write_manifest(rows(3), tmp_path / "x.parquet")
    with pytest.raises(ManifestError, match="row 15 .*empty caption"):
        write_manifest(bad, tmp_path / "x.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "x.parquet"]
    assert read_manifest(tmp_path / "x.parquet").num_rows == 3


def test_a_single_file_manifest_streams_its_rows_to_disk(tmp_path, monkeypatch):
    """`--out x.parquet` held every row as a Python dict, then the whole table, until close():
    a HowTo100M prepare into one file (136M rows) ran out of memory instead of streaming. Now
    the rows go out a row group at a time, under a `.partial` name until the file is whole."""
    import pyarrow.parquet as pq

    from clipray import manifest
    from clipray.runtime import proc_status_kb, reset_peak_rss

    monkeypatch.setattr(manifest, "ROWS_PER_GROUP", 500, raising=False)
    out = tmp_path / "one.parquet"
    w = manifest.ManifestWriter(out)
    long = "x" * 2000  # 60k rows of 2 kB captions: 120 MB of text, more as dicts and a table
    reset_peak_rss()
    before = proc_status_kb("VmRSS")
    w.extend(dict(video_id=f"v{i}", path=f"v{i}.mp4", caption=f"{i} {long}", split="train")
             for i in range(60_000))
    grew_mb = (proc_status_kb("VmHWM") - before) / 1024
    assert grew_mb < 60, f"writing 60k rows grew the peak resident set by {grew_mb:.0f} MB"
    assert not out.exists()  # still being written: a reader is told so, not shown fewer rows
    with pytest.raises(ManifestError, match="an unfinished manifest"):
        check_manifest(out)
    w.close()
    assert pq.ParquetFile(out).num_row_groups == 120
    t = read_manifest(out)
    assert t.column("row_id").to_pylist() == list(range(60_000))
    assert t.column("caption")[59_999].as_py() == f"59999 {long}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.parquet"]


@pytest.mark.parametrize("bad, msg", [
    (dict(start=-1.0, end=2.0), "negative start"),
    (dict(start=3.0, end=2.0), "end 2.0 <= start 3.0"),
    (dict(caption="   "), "empty caption"),
    (dict(start=1.0, end=2.0, timestamp=5.0), "timestamp 5.0 outside"),
    (dict(split="training"), "split must be one of"),
    (dict(start=1.0), "both start and end"),
    (dict(start="00:01:02", end=3.0), "times must be seconds"),
    (dict(start=0, end=10 ** 400), "times must be seconds: int too large"),  # was an OverflowError traceback
])
def test_bad_rows_are_named(tmp_path, bad, msg):
    rs = rows(4)
    rs[2].update(bad)
    with pytest.raises(ManifestError) as e:
        write_manifest(rs, tmp_path / "m.parquet")
    assert "row 2" in str(e.value) and msg in str(e.value)
    assert "v1" in str(e.value) or "split" in str(e.value)


def test_a_shard_named_in_another_case_is_refused_not_left_out(tmp_path):
    """A folder's part-00001.PARQUET (or .Parquet, as a copy tool may write) was left out of the
    read without a word, like a stray README: 25 rows read as 10, and said valid."""
    out = tmp_path / "m"
    write_manifest(rows(25), out, rows_per_shard=10)
    (out / "part-00001.parquet").rename(out / "part-00001.PARQUET")
    for read in (read_manifest, check_manifest):
        with pytest.raises(ManifestError, match=rf"^{out}: part-00001.PARQUET is read as no shard of the manifest: "
                                                r"its name does not end in \.parquet, in lower case"):
            read(str(out))
    (out / "part-00001.PARQUET").rename(out / "part-00001.parquet")
    (out / "notes.txt").write_text("other files are left out, as before")
    assert read_manifest(str(out)).num_rows == 25


def test_a_manifest_is_not_written_beside_a_shard_named_in_another_case(tmp_path):
    """The writer refused a folder holding other *.parquet files, but matched the name in lower
    case only: written again into a folder holding part-00001.PARQUET (which every reader
    refuses), it said 25 rows written, left that file beside the new shards, and every read of
    the manifest it had just written failed. It is refused before a row is written."""
    from clipray.manifest import ManifestWriter

    out = tmp_path / "m"
    write_manifest(rows(25), out, rows_per_shard=10)
    (out / "part-00001.parquet").rename(out / "part-00001.PARQUET")
    with pytest.raises(ManifestError, match=rf"^{out}: holds other Parquet files \(part-00001.PARQUET\)"):
        ManifestWriter(out, rows_per_shard=10)
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.PARQUET", "part-00002.parquet"]
    (out / "part-00001.PARQUET").unlink()
    assert write_manifest(rows(3), out) == 3 and read_manifest(out).num_rows == 3


def test_a_later_shard_that_is_no_parquet_is_one_line_from_every_reader_and_train(tmp_path, capsys):
    """Every shard's footer is checked (`_check_headers`), but a later one that is no Parquet is
    left to the read, which names it. Read as one dataset, an empty or cut later shard was pyarrow's ArrowInvalid traceback out of `clipray
    train`, where `clipray data check` said it in a line."""
    from clipray.cli import main
    from train.driver import check_unique_ids, count_rows, read_eval_split

    out = tmp_path / "m"
    write_manifest(rows(25), out, rows_per_shard=10)
    shard = out / "part-00001.parquet"
    whole = shard.read_bytes()
    for cut in (b"", whole[: len(whole) // 2]):
        shard.write_bytes(cut)
        for read in (check_unique_ids, read_manifest, lambda p: count_rows(p, "train"),
                     lambda p: read_eval_split(p, "test")):
            # (read_manifest reads as iter_checked, file by file, naming the file first)
            with pytest.raises(ManifestError, match=rf"^{out}( \(part-00001.parquet\))?: cannot be read as a "
                                                    rf"manifest \(.*part-00001.parquet"):
                read(str(out))
        repo = __import__("pathlib").Path(__file__).resolve().parents[1]
        assert main(["train", str(repo / "train/configs/demo.yaml"), f"data.manifest={out}",
                     f"train.storage_path={tmp_path / 'runs'}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"clipray train: error: {out}: cannot be read as a manifest (") and err.count("\n") == 1
    shard.write_bytes(whole)
    assert read_manifest(str(out)).num_rows == 25 and count_rows(str(out), "test") == 7
    assert not (tmp_path / "runs").exists()


def test_a_footer_is_read_again_only_when_its_file_changed(tmp_path, monkeypatch):
    """One command asks for a manifest's files several times (a training start: 4-5), and each
    footer is a read; a file listed with the size and time it was checked at is not read again,
    but a shard written since is, and a wrong one is still named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    read = []
    real = pq.read_schema
    monkeypatch.setattr(pq, "read_schema", lambda f, **kw: read.append(f.rsplit("/", 1)[-1]) or real(f, **kw))
    out = tmp_path / "m"
    write_manifest(rows(25), out, rows_per_shard=10)
    shards = ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for _ in range(3):
        assert [f.rsplit("/", 1)[-1] for f in manifest_files(str(out))[1]] == shards
    assert read_manifest(str(out)).num_rows == 25 and sorted(read) == shards  # each footer once
    read.clear()
    later = {"row_id": [90, 91], "video_id": [7, 8], "path": ["a.mp4", "b.mp4"], "start": [1.0, 2.0],
             "end": [2.0, 3.0], "caption": ["a cat", "a dog"], "split": ["train", "train"]}
    pq.write_table(pa.table(later), out / "part-00001.parquet")  # rewritten: another size and time
    for _ in range(2):  # not taken as checked after it failed
        with pytest.raises(ManifestError, match=r"\(part-00001.parquet\): column types differ .* video_id is int64"):
            manifest_files(str(out))
    assert read == ["part-00001.parquet"] * 2
    read.clear()
    later["video_id"] = ["v7", "v8"]
    pq.write_table(pa.table(later), out / "part-00001.parquet")
    pq.write_table(pa.table({**later, "row_id": [92, 93]}), out / "part-00003.parquet")  # a new shard
    assert read_manifest(str(out)).num_rows == 10 + 2 + 5 + 2 and sorted(read) == ["part-00001.parquet", "part-00003.parquet"]


@pytest.mark.parametrize("uri, fixed", [("s3://b//m", "s3://b/m"), ("s3:///b/m", "s3://b/m"),
                                        ("gs://b/a//c/", "gs://b/a/c")])
def test_a_uri_with_an_empty_name_between_slashes_is_one_line(uri, fixed):
    """`$PREFIX/` + `/m`: pyarrow's ArrowInvalid ("Empty path component") traceback out of `data
    check`, `data prepare --out` and `--root`, at the first read. Named before any request."""
    with pytest.raises(ManifestError) as e:
        manifest_files(uri)
    assert str(e.value) == f"{uri}: an empty name between two '/' (a key is taken as written: write {fixed})"


@pytest.mark.parametrize("uri", ["s3://", "s3:///", "gs://"])
def test_a_uri_with_no_bucket_is_one_line_before_any_request(uri):
    """`data check s3://` (an unset $BUCKET) listed every bucket of the account as the manifest."""
    with pytest.raises(ManifestError) as e:
        manifest_files(uri)
    assert str(e.value) == f"{uri}: no bucket (write {uri.split(':')[0]}://BUCKET/manifest)"


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.parquet")


def test_a_file_that_is_not_a_manifest_is_named_before_any_read(tmp_path):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    text = tmp_path / "notes.parquet"
    text.write_text("video_id,path,caption\nv0,a.mp4,a cat\n")
    with pytest.raises(ManifestError, match="notes.parquet: not a Parquet manifest .*magic bytes"):
        manifest_files(str(text))
    other = tmp_path / "other.parquet"  # Parquet, but some other table: only video_id and path
    pq.write_table(pa.table({"video_id": ["v0"], "path": ["a.mp4"], "n": [1]}), other)
    with pytest.raises(ManifestError, match="it has no row_id, caption, split column"):
        read_manifest(other)
    # a directory is judged by its first shard, as the readers open it
    write_manifest(rows(4), tmp_path / "d" / "part-00001.parquet")
    pq.write_table(pa.table({"n": [1]}), tmp_path / "d" / "part-00000.parquet")
    with pytest.raises(ManifestError, match="no row_id, video_id, path, caption, split"):
        read_manifest(tmp_path / "d")
    later = read_manifest(tmp_path / "d" / "part-00001.parquet")  # (its row ids after part-00000's)
    pq.write_table(later.set_column(0, "row_id", pc.add(later["row_id"], 4)), tmp_path / "d" / "part-00000.parquet")
    assert read_manifest(tmp_path / "d").num_rows == 8


@pytest.mark.parametrize("column, values, says", [
    ("video_id", [7, 8], "video_id is int64, not string"),
    ("caption", [123, 456], "caption is int64, not string"),
    ("caption", [b"x", b"y"], "caption is binary, not string"),
    ("start", ["0.5", None], "start is string, not double"),
    ("start", [False, None], "start is bool, not double"),
    ("row_id", [10.0, 11.0], "row_id is double, not int64"),
])
def test_a_later_shard_of_another_column_type_is_named_by_every_reader(tmp_path, column, values, says):
    """Only the first file's footer was checked: a second shard with an int video_id, an int or
    bytes caption, a text or bool start or a float row_id was converted without a word (video
    '7', caption '123', start 0.5) by read_manifest, iter_checked, `data check` and training."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipray.manifest import check_unique_ids

    out = tmp_path / "m"
    write_manifest(rows(2), out)
    later = {"row_id": [10, 11], "video_id": ["v7", "v8"], "path": ["a.mp4", "b.mp4"], "start": [1.0, None],
             "end": [2.0, None], "caption": ["a cat", "a dog"], "split": ["train", "train"], column: values}
    pq.write_table(pa.table(later), out / "part-00001.parquet")
    for read in (read_manifest, lambda p: list(iter_checked(p)), check_manifest, check_unique_ids, manifest_files):
        with pytest.raises(ManifestError) as e:
            read(str(out))
        assert str(e.value) == f"{out} (part-00001.parquet): column types differ from the manifest schema: {says}"
    if column == "start":  # optional: a shard without it holds whole videos
        return
    del later[column]  # a later shard without a column every row must have
    pq.write_table(pa.table(later), out / "part-00001.parquet")
    with pytest.raises(ManifestError, match=rf"^{out} \(part-00001.parquet\): not a clipray manifest, it has "
                                            rf"no {column} column"):
        read_manifest(out)


def test_check_streams_every_shard_and_names_a_bad_row_in_a_later_one(tmp_path, capsys):
    import pyarrow.parquet as pq

    out = tmp_path / "m"
    write_manifest(rows(25), out, rows_per_shard=10)
    # counts against a brute-force pass over the whole table
    whole = read_manifest(out).to_pylist()
    s = check_manifest(out, progress_s=0)
    assert s.rows == len(whole) and set(s.videos) == {r["video_id"] for r in whole}
    assert s.distinct_captions == len({r["caption"] for r in whole})
    assert s.per_split == {sp: sum(r["split"] == sp for r in whole) for sp in ("train", "test")}
    # rows 4k (test) and 4k + 1 (train) are video v2k's: v0, v2, ..., v10 are in both splits
    assert str(s) == ("25 rows (test 7, train 18), 13 videos, 25 distinct captions; 6 videos have rows in more "
                      "than one split (e.g. v0): a split evaluated on them shares videos with the others")
    # progress_s=0: a line after each batch (here each shard), of the total its three shards'
    # footers give (a bare "checked N rows" said nothing of how far a big manifest had got)
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(", ")[0] for ln in lines] == [f"  checked {n}/25 rows ({n * 4}%)" for n in (10, 20, 25)]
    assert all(ln.split(", ")[1].endswith(" rows/s") for ln in lines) and lines[-1].endswith(", ETA 0s")
    assert [r["caption"] for r in iter_checked(out, split="test")] == [r["caption"] for r in whole
                                                                      if r["split"] == "test"]
    # a row broken behind the writer's back, fourth row of the second shard
    shard = out / "part-00001.parquet"
    t = pq.read_table(shard)
    captions = t.column("caption").to_pylist()
    captions[3] = "  "
    pq.write_table(t.set_column(t.schema.get_field_index("caption"), "caption", [captions]), shard)
    with pytest.raises(ManifestError, match=r"\(part-00001.parquet\) row 3 \(video v6\): empty caption"):
        check_manifest(out)
    # a split with spaces around it: check_row reads it as "train", but the pipeline, the
    # driver's row count and read_manifest(split=) filter as written, so training found no row
    captions[3] = "fixed again"
    splits = t.column("split").to_pylist()
    splits[3] = splits[3] + " "
    t = t.set_column(t.schema.get_field_index("caption"), "caption", [captions])
    pq.write_table(t.set_column(t.schema.get_field_index("split"), "split", [splits]), shard)
    with pytest.raises(ManifestError, match=rf"\(part-00001.parquet\) row 3: split '{splits[3]}' has spaces "
                                            rf"around it, and the readers take a split as written: write '{splits[3][:-1]}'"):
        check_manifest(out)


def test_a_validated_read_refuses_and_names_the_rows_iter_checked_refuses(tmp_path):
    """read_manifest(validate=True) checked rows its own way: a null or repeated row_id passed, a
    split ' train' passed (check_row strips it) and was then dropped by split='train', and a bad
    row was numbered after the split filter, across files, with no file named ("row 0" where
    iter_checked said "(part-00001.parquet) row 1"). It now gives iter_checked's rows and errors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipray.manifest import SCHEMA

    out = tmp_path / "m"
    write_manifest(rows(4), out)  # rows 0-3 (0: test, 1-3: train) in part-00000
    shard = f"{out} (part-00001.parquet) row 1"
    for change, want in ((dict(row_id=None), f"{shard}: row_id is missing (None)"),
                         (dict(row_id=2), f"{shard}: row_id 2 repeats an earlier row's; a manifest folder must hold "
                                          "the shards of one manifest only (its files: part-00000.parquet, "
                                          "part-00001.parquet): give one file or one manifest's folder"),
                         (dict(split=" train"), f"{shard}: split ' train' has spaces around it, and the readers take "
                                                "a split as written: write 'train'"),
                         (dict(caption=" "), f"{shard} (video w1): empty caption")):
        later = [dict(row_id=10, video_id="w0", path="w0.mp4", caption="one", split="test"),
                 {**dict(row_id=11, video_id="w1", path="w1.mp4", caption="two", split="train"), **change}]
        pq.write_table(pa.Table.from_pylist(later, schema=pa.schema([f.with_nullable(True) for f in SCHEMA])),
                       out / "part-00001.parquet")
        for read in (lambda: list(iter_checked(out, split="train")), lambda: read_manifest(out, split="train"),
                     lambda: read_manifest(out)):
            with pytest.raises(ManifestError) as e:
                read()
            assert str(e.value) == want, change
    later[1] = dict(later[1], caption="  two ")  # a good row, read back as iter_checked gives it
    pq.write_table(pa.Table.from_pylist(later), out / "part-00001.parquet")
    assert read_manifest(out, split="train").column("caption").to_pylist() == ["caption 1", "caption 2",
                                                                                "caption 3", "two"]
    assert read_manifest(out).to_pylist() == list(iter_checked(out))


def test_a_video_id_naming_two_files_is_refused_with_both_rows_named(tmp_path):
    """The writer and `data check` took a video_id naming two paths (only the generic adapter
    refused it): evaluation keys clips by video id, and scored one file's captions against the
    other's clip. Refused, naming the row and the earlier row that gave the video its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipray.manifest import ManifestWriter

    rs = [dict(video_id=f"v{i % 3}", path=f"v{i % 3}.mp4", caption=f"c{i}", split="train") for i in range(10)]
    rs[7]["path"] = " x.mp4"  # v1's, first named at row 1 (compared as stripped)
    says = "row 7: video_id 'v1' names 'x.mp4', but row 1 gave it 'v1.mp4'; give each video its own video_id"
    for by_columns in (True, False):
        with pytest.raises(ManifestError) as e:
            w = ManifestWriter(tmp_path / "m.parquet")
            w.by_columns = by_columns
            w.extend(rs).close()
        assert str(e.value) == says
    refused = []
    w = ManifestWriter(tmp_path / "kept.parquet", on_bad=lambda row, e: refused.append(str(e))).extend(rs).close()
    assert refused == [says] and read_manifest(tmp_path / "kept.parquet").num_rows == 9

    rs[7]["path"] = "./x/../v1.mp4"  # one file written two ways: one video
    write_manifest(rs, tmp_path / "sh", rows_per_shard=4)  # rows 4-7 in part-00001
    assert check_manifest(tmp_path / "sh").rows == 10
    shard = tmp_path / "sh" / "part-00001.parquet"
    t = pq.read_table(shard)
    pq.write_table(t.set_column(2, "path", pa.array(["v1.mp4", "v2.mp4", "v0.mp4", "x.mp4"])), shard)
    says = (f"{tmp_path / 'sh'} (part-00001.parquet) row 3: video_id 'v1' names 'x.mp4', but {tmp_path / 'sh'} "
            "(part-00000.parquet) row 1 gave it 'v1.mp4'; give each video its own video_id")
    for read in (check_manifest, read_manifest, lambda p: list(iter_checked(p, batch_rows=2)),
                 lambda p: list(iter_checked(p, batch_rows=4))):
        with pytest.raises(ManifestError) as e:
            read(tmp_path / "sh")
        assert str(e.value) == says


def test_row_ids_repeated_across_a_folder_are_caught_by_every_reader(tmp_path):
    """Two manifests in one folder (as `clipray data synth --out DIR` leaves manifest.parquet and
    events.parquet) both number their rows from 0: read as one folder, their rows would share ids,
    which batches, skip reports and evaluation join on. A folder of one manifest's shards passes."""
    from clipray.manifest import check_unique_ids

    write_manifest(rows(6), tmp_path / "mixed" / "a.parquet")
    write_manifest(rows(4), tmp_path / "mixed" / "b.parquet")
    hint = r"a manifest folder must hold the shards of one manifest only \(its files: a.parquet, b.parquet\)"
    with pytest.raises(ManifestError, match=r"mixed \(b.parquet\) row 0: row_id 0 repeats an earlier row's; " + hint):
        check_manifest(tmp_path / "mixed")
    with pytest.raises(ManifestError, match=r"mixed: row_id (0|1|2|3) is used by more than one row; " + hint):
        check_unique_ids(str(tmp_path / "mixed"))
    write_manifest(rows(25), tmp_path / "sharded", rows_per_shard=10)
    check_unique_ids(str(tmp_path / "sharded"))
    assert check_manifest(tmp_path / "sharded").rows == 25
    # one file with a repeat among ids above the dense range (kept from a rewrite): no folder hint
    big = [dict(r, row_id=2**40 + i % 3) for i, r in enumerate(rows(5))]
    import pyarrow as pa
    import pyarrow.parquet as pq
    from clipray.manifest import SCHEMA

    pq.write_table(pa.Table.from_pylist([dict(r, group=r["video_id"], timestamp=None, duration=None)
                                         for r in big], schema=SCHEMA), tmp_path / "big.parquet")
    with pytest.raises(ManifestError, match=rf"big.parquet row 3: row_id {2**40} repeats an earlier row's$"):
        check_manifest(tmp_path / "big.parquet")
    with pytest.raises(ManifestError, match=rf"row_id {2**40 + 0}|row_id {2**40 + 1}"):
        check_unique_ids(str(tmp_path / "big.parquet"))


def test_the_row_id_check_of_a_counted_manifest_costs_bytes_a_row_not_a_hash_table(tmp_path):
    """check_unique_ids (every `clipray train` without data.shard_stream, before Ray starts)
    counted distinct ids with Arrow's hash table, about 90 bytes a row where its docstring said
    8: 0.9 GB in the driver for a 10M-row manifest. A sorted copy of the ids finds a repeat as
    well, the one a brute force finds."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    import subprocess
    import sys

    from clipray.manifest import SCHEMA
    from clipray.runtime import proc_status_kb

    if proc_status_kb("VmHWM") is None:
        pytest.skip("needs Linux /proc to read the peak resident set")
    n = 1_000_000
    ids = np.random.default_rng(0).permutation(n)
    ids[123_456] = ids[654_321]  # one id used twice, far apart
    (tmp_path / "m").mkdir()
    for k, part in enumerate(np.array_split(ids, 2)):
        m = len(part)
        pq.write_table(pa.table({"row_id": part, "video_id": pa.array(["v"] * m), "path": pa.array(["v.mp4"] * m),
                                 "start": pa.nulls(m, pa.float64()), "end": pa.nulls(m, pa.float64()),
                                 "caption": pa.array(["a cat"] * m), "split": pa.array(["train"] * m),
                                 "timestamp": pa.nulls(m, pa.float64()), "group": pa.nulls(m, pa.string()),
                                 "duration": pa.nulls(m, pa.float64())}, schema=SCHEMA),
                       tmp_path / "m" / f"part-{k:05d}.parquet")
    # in a process of its own: Arrow's memory pool keeps what this one freed, and reuses it
    code = ("import sys\nfrom clipray.manifest import ManifestError, check_unique_ids\n"
            "from clipray.runtime import proc_status_kb\nbefore = proc_status_kb('VmRSS')\n"
            "try:\n    check_unique_ids(sys.argv[1])\nexcept ManifestError as e:\n    print(e)\n"
            "print(proc_status_kb('VmHWM') - before)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    assert f"row_id {ids[654_321]} is used by more than one row" in out[0]
    per_row = int(out[-1]) * 1024 / n
    assert per_row < 80, f"{per_row:.0f} bytes a row"


def test_row_id_tracker_agrees_with_a_set():
    import random

    from clipray.manifest import RowIds

    rng = random.Random(0)
    ids, seen = RowIds(), set()
    for _ in range(20000):
        rid = rng.choice([rng.randrange(300), rng.randrange(200_000), rng.randrange(2**28 - 5, 2**28 + 5),
                          rng.randrange(2**62)])
        assert ids.add(rid) == (rid not in seen)
        seen.add(rid)
    # a batch at a time: every id recorded, or none when one repeats an earlier id or another of the batch
    import numpy as np

    ids, seen = RowIds(), set()
    assert ids.add_all(np.array([], np.int64))
    for _ in range(300):
        batch = [rng.choice([rng.randrange(3000), rng.randrange(2**28 - 5, 2**28 + 5), rng.randrange(2**62)])
                 for _ in range(rng.randrange(1, 8))]
        new = len(set(batch)) == len(batch) and seen.isdisjoint(batch)
        assert ids.add_all(np.array(batch, np.int64)) == new
        if not new:  # none of the batch was recorded
            assert all(ids.add(r) for r in set(batch) - seen)
        seen.update(batch)
        assert not any(ids.add(r) for r in batch)


def test_check_piped_into_a_reader_that_leaves_exits_quietly(tmp_path):
    """`clipray data check M | head -1`: the closed pipe ends the command with SIGPIPE's status
    and nothing on stderr, not a BrokenPipeError traceback."""
    import subprocess
    import sys

    write_manifest(rows(8), tmp_path / "m.parquet")
    proc = subprocess.Popen([sys.executable, "-m", "clipray.cli", "data", "check", str(tmp_path / "m.parquet")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == b""


def test_an_output_under_a_file_is_an_error_line_not_a_traceback(tmp_path, capsys):
    """`--out` beneath a regular file: the command exits 2 with the path and the reason."""
    from clipray.cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "own.csv").write_text("video_id,path,caption\nv1,v1.mp4,a red square moves left\n")
    assert main(["data", "synth", "--out", str(afile / "synth"), "--videos", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipray data: error: [Errno 20] Not a directory:") and str(afile) in err
    assert main(["data", "prepare", "generic", "--root", str(tmp_path), "--out", str(afile / "m.parquet"),
                 "-o", f"file={tmp_path / 'own.csv'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clipray data: error: {afile / 'm.parquet'}: cannot create the folder {afile}")


def test_a_manifest_written_on_a_full_disk_is_an_error_line_naming_it(tmp_path, file_size_limit):
    """pyarrow's OSError for a full disk (here a file size limit, EFBIG) names no file, so
    `clipray data synth` (and every ManifestWriter's caller) ended in its traceback; it is now
    one line naming the file, and the cut manifest stays unfinished, never read as whole."""
    out = tmp_path / "synth"  # 3000 bytes: the videos fit, the manifest not
    res = file_size_limit(3000, "sys.exit(main(sys.argv[1:]))", "data", "synth", "--out", out, "--videos", 4,
                          "--width", 32, "--height", 24, setup="from clipray.cli import main\n")
    assert res.returncode == 2, res.stderr
    assert res.stderr == f"clipray data: error: [Errno 27] File too large: '{out / 'manifest.parquet.partial'}'\n"
    with pytest.raises(ManifestError, match="an unfinished manifest"):
        manifest_files(str(out / "manifest.parquet"))


def test_columns_of_another_type_and_null_row_ids_are_named_not_tracebacks(tmp_path, capsys):
    """A manifest written by other tools: columns that read into the schema (int32 ids, whole
    seconds as ints, large strings) are accepted; a text `start` or a null row_id is an error
    line naming the file, the column or the row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipray.cli import main

    base = {"row_id": pa.array([0, 1], pa.int32()), "video_id": pa.array(["v0", "v1"], pa.large_string()),
            "path": ["a.mp4", "b.mp4"], "start": pa.array([1, 2], pa.int64()), "end": [3.0, 4.5],
            "caption": ["one", "two"], "split": ["train", "test"], "group": pa.nulls(2)}
    pq.write_table(pa.table(base), tmp_path / "ok.parquet")
    assert [(r["row_id"], r["start"]) for r in iter_checked(tmp_path / "ok.parquet")] == [(0, 1.0), (1, 2.0)]
    assert read_manifest(tmp_path / "ok.parquet").column("start").to_pylist() == [1.0, 2.0]

    pq.write_table(pa.table({**base, "start": ["1", "x"], "end": ["3", "4"]}), tmp_path / "text.parquet")
    pq.write_table(pa.table({**base, "row_id": pa.array([0, None], pa.int64())}), tmp_path / "null.parquet")
    for name, msg in (("text.parquet", ": column types differ from the manifest schema: start is string, not "
                                       "double; end is string, not double"),
                      ("null.parquet", " row 1: row_id is missing (None)")):
        assert main(["data", "check", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err == f"clipray data: error: {tmp_path / name}{msg}\n"


def test_a_manifest_in_object_storage_that_cannot_be_reached_is_an_error_line(tmp_path):
    """pyarrow's OSError for an object store it cannot reach (no network, credentials, bucket or
    permission) has no file name, so `clipray data check s3://...` (and train, index: every
    reader lists the manifest first) ended in its traceback."""
    import os
    import subprocess
    import sys

    from ports import free_ports

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_ports()[0]}", AWS_ACCESS_KEY_ID="x",
               AWS_SECRET_ACCESS_KEY="y", AWS_EC2_METADATA_DISABLED="true")  # nothing listens there
    out = subprocess.run([sys.executable, "-m", "clipray.cli", "data", "check", "s3://clipray-none/m.parquet"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("clipray data: error: s3://clipray-none/m.parquet: cannot read the manifest "
                                 "(When getting information for key 'm.parquet' in bucket 'clipray-none'")


def test_a_gcs_manifest_without_credentials_is_an_error_within_the_retry_limit(tmp_path):
    """pyarrow's GCS filesystem retries a failing request for 15 minutes: `clipray data check
    gs://...` without Google credentials (or network) hung that long without a word. It is
    built with clipray.manifest.GCS_RETRY_S, here 1 s (30 s in use): an error line in seconds."""
    import os
    import subprocess
    import sys
    from datetime import timedelta

    from ports import free_ports

    # no credentials: no key file, no gcloud login (HOME), no metadata server that answers
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GCE_", "CLOUDSDK_"))}
    env.update(HOME=str(tmp_path), GCE_METADATA_ROOT=f"127.0.0.1:{free_ports()[0]}")
    code = ("import clipray.manifest as m\nm.GCS_RETRY_S = 1\ntry:\n    m.manifest_files('gs://clipray-none/m.parquet')\n"
            "except m.ManifestError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("gs://clipray-none/m.parquet: cannot read the manifest (google::cloud::Status("), \
        out.stdout + out.stderr
    from clipray.manifest import GCS_RETRY_S, filesystem

    assert filesystem("gs://b/m")[0].__reduce__()[1][0]["retry_time_limit"] == timedelta(seconds=GCS_RETRY_S)


def test_data_prepare_to_or_from_object_storage_that_cannot_be_reached_is_an_error_line(tmp_path):
    """`clipray data prepare ... --out s3://...` (or --root s3://...) on a store it cannot reach
    ended in pyarrow's OSError traceback (no file name for the CLI to name)."""
    import os
    import subprocess
    import sys

    from ports import free_ports

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_ports()[0]}", AWS_ACCESS_KEY_ID="x",
               AWS_SECRET_ACCESS_KEY="y", AWS_EC2_METADATA_DISABLED="true")  # nothing listens there
    (tmp_path / "own.csv").write_text("video_id,path,caption\nv1,v1.mp4,a red square moves left\n")
    for args, says in (
            (["--root", str(tmp_path), "--out", "s3://clipray-none/m.parquet", "-o", f"file={tmp_path / 'own.csv'}"],
             f"generic: cannot read {tmp_path} or write s3://clipray-none/m.parquet (When getting information for "
             "key 'm.parquet' in bucket 'clipray-none'"),
            (["--root", "s3://clipray-none/r", "--out", str(tmp_path / "m.parquet"), "-o", "file=s3://clipray-none/a.csv"],
             f"generic: cannot read s3://clipray-none/r or write {tmp_path / 'm.parquet'} (When getting information "
             "for key 'r' in bucket 'clipray-none'")):
        out = subprocess.run([sys.executable, "-m", "clipray.cli", "data", "prepare", "generic", *args],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
        assert out.stderr.startswith(f"clipray data: error: {says}"), out.stderr
    assert not (tmp_path / "m.parquet").exists()


def _varied_rows(n):
    """Good rows of every shape check_row takes: padded text (with the whitespace str.strip()
    strips beyond ASCII's), NaN times, timestamps with and without bounds, groups none,
    empty and padded, row ids out of order and past RowIds' dense range."""
    import math

    out = []
    for i in range(n):
        whole = i % 3 == 0
        s = None if whole else (float("nan") if i % 7 == 0 else 0.5 * i)
        r = dict(row_id=(2**40 + i) if i % 11 == 0 else n - i, video_id=f"\x1c v{i // 4}\u3000",
                 path=f" videos/v{i // 4}.mp4\x85", caption=f"\u2003 caption {i % 50} ",
                 split=("train", "val", "test")[i % 3], start=s, end=None if whole else 0.5 * i + 2,
                 timestamp=None, group=(None, "", "  g", f"g{i % 5}")[i % 4], duration=None)
        if whole and i % 2:
            r.update(duration=float(i + 1), timestamp=float(i % 5))
        elif not whole and i % 7:
            r.update(timestamp=0.5 * i + 1)
        if s is not None and math.isnan(s):
            r.update(end=float("nan"), timestamp=None)
        elif i % 13 == 0:
            r.update(start=None if whole else 1.0, end=None if whole else 0.5 * i + 9, timestamp=None)
        out.append(r)
    return out


def _write_raw(rows, out):
    """Rows as they are (no ManifestWriter to strip, default or refuse them), as another tool writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipray.manifest import SCHEMA

    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([f.with_nullable(True) for f in SCHEMA])), out)
    return str(out)


def _per_row(path):
    """The reference: every row of a one-file manifest through check_rows (check_row) one by one."""
    import pyarrow.parquet as pq

    from clipray.manifest import RowIds, check_rows

    return check_rows(pq.read_table(path).to_pylist(), path, 0, RowIds(), [path])


def test_videos_with_rows_in_several_splits_are_counted_and_said(tmp_path, capsys):
    """A video with rows in train and test (a generic CSV's typo, an MSVD or ActivityNet list that
    overlaps) went by without a word, but in MSR-VTT: evaluation then scores clips the model
    trained on. `data check` and `data prepare` say how many, against a brute-force count over
    rows whose videos' splits meet in one shard and across shards."""
    import random

    from clipray.cli import main

    rng = random.Random(3)
    rs = [dict(video_id=f"v{rng.randrange(40)}", path="videos/x.mp4", caption=f"c{i}",
               split=rng.choice(["train"] * 8 + ["val", "test"])) for i in range(400)]
    out = tmp_path / "m"
    write_manifest(rs, out, rows_per_shard=37)
    splits: dict[str, set] = {}
    for r in rs:
        splits.setdefault(r["video_id"], set()).add(r["split"])
    shared = {v for v, s in splits.items() if len(s) > 1}
    assert 0 < len(shared) < len(splits)
    tally = check_manifest(out)
    assert set(tally.shared) == shared and set(tally.videos) == set(splits)
    assert main(["data", "check", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert f"; {len(shared)} videos have rows in more than one split (e.g. " in line
    # one split per video: nothing said
    write_manifest([dict(r, split="train") for r in rs], tmp_path / "one.parquet")
    assert check_manifest(tmp_path / "one.parquet").shared_note() is None


def test_checking_a_batch_at_a_time_gives_what_checking_each_row_gives(tmp_path):
    """`clipray data check` ran check_row on every row (6 s a million rows, 14 minutes for
    HowTo100M); a batch is now checked a column at a time, and only a batch with a bad row is
    read row by row. Both give the same rows, the same counts, and the same message for a bad
    row of each rule."""
    import pyarrow.parquet as pq

    from clipray.manifest import RowIds, Tally, _checked_batch, iter_checked

    good = _varied_rows(300)
    path = _write_raw(good, tmp_path / "good.parquet")
    want = _per_row(path)
    assert list(iter_checked(path, batch_rows=64)) == want
    assert list(iter_checked(path, split="val", batch_rows=64)) == [r for r in want if r["split"] == "val"]
    splits = {}  # the counts by hand
    for r in want:
        splits[r["split"]] = splits.get(r["split"], 0) + 1
    got = check_manifest(path)
    assert (got.rows, got.per_split, set(got.videos), got.captions) == (
        len(want), splits, {r["video_id"] for r in want}, {hash(r["caption"]) for r in want})
    ids = RowIds()  # (each good batch was checked whole: none was read row by row)
    assert all(_checked_batch(b, ids) is not None for b in pq.read_table(path).to_batches(max_chunksize=64))

    bad = [dict(video_id=None), dict(path=None), dict(caption=None), dict(split=None), dict(video_id=" \x1f"),
           dict(path="\u3000"), dict(caption="\x85 \u2028"), dict(split="training"), dict(split="train "),
           dict(start=1.0, end=None), dict(start=None, end=2.0), dict(start=float("nan"), end=2.0),
           dict(start=-1.0, end=2.0), dict(start=2.0, end=2.0), dict(start=1.0, end=2.0, timestamp=2.5),
           dict(start=None, end=None, duration=3.0, timestamp=3.5), dict(start=None, end=None, timestamp=-0.5),
           dict(duration=0.0, timestamp=None), dict(duration=-1.0, timestamp=None), dict(row_id=None),
           # inf: "to the end" when decoded, but no index key (clip_key) or JSON answer holds it
           dict(start=1.0, end=float("inf")), dict(start=float("-inf"), end=2.0),
           dict(start=None, end=None, duration=float("inf"), timestamp=None),
           dict(start=None, end=None, duration=None, timestamp=float("inf")),
           dict(row_id=300 - 200), dict(row_id=300 - 10), dict(row_id=2**40 + 11)]  # rows 200, 10, 11's
    for i, change in enumerate(bad):
        rows = [dict(r) for r in good]
        rows[207].update(change)  # in the fourth batch of 64 rows
        path = _write_raw(rows, tmp_path / f"bad{i}.parquet")
        with pytest.raises(ManifestError) as ref:
            _per_row(path)
        assert " row 207" in str(ref.value), change
        for read in (check_manifest, lambda p: list(iter_checked(p, batch_rows=64))):
            with pytest.raises(ManifestError) as got:
                read(path)
            assert str(got.value) == str(ref.value), change


def test_the_writer_checks_by_columns_what_check_row_checks_row_by_row(tmp_path, monkeypatch):
    """`clipray data prepare` ran check_row on every row it wrote: about half of a HowTo100M
    prepare's time. The writer now checks a buffer a column at a time and goes row by row only
    for a buffer with a bad row, or with a value that is not plain text or a number (check_row
    reads a time given as text, and names a bytes caption). Both ways write the same table,
    count the same, and refuse the same row with the same message: raised, or given to on_bad
    with the write going on."""
    import numpy as np

    from clipray import manifest
    from clipray.manifest import ManifestWriter, Tally

    monkeypatch.setattr(manifest, "ROWS_PER_GROUP", 64)
    checked = []  # the rows check_row saw
    real_check = manifest.check_row
    monkeypatch.setattr(manifest, "check_row", lambda row, where: checked.append(row) or real_check(row, where))

    def write(rows, by_columns, name, keep_row_ids=False, refuse=True):
        refused, tally = [], Tally()
        w = ManifestWriter(tmp_path / name, rows_per_shard=100, keep_row_ids=keep_row_ids, tally=tally,
                           on_bad=None if refuse else lambda row, e: refused.append((rows.index(row), str(e))))
        w.by_columns = by_columns
        w.extend(rows).close()
        return read_manifest(tmp_path / name, validate=False), tally, refused

    good = [{k: v for k, v in r.items() if k != "row_id"} for r in _varied_rows(300)]
    for i, r in enumerate(good):  # ints and numpy floats for seconds are plain numbers too
        if i % 5 == 1 and r["start"] is not None and not math.isnan(r["start"]):
            r.update(start=np.float64(r["start"]), end=int(r["end"]) + 1)
        if i % 5 == 2 and r["timestamp"] is not None:
            r.update(timestamp=np.float32(r["timestamp"]))
    rows_way = write(good, False, "rows")
    assert len(checked) == 300
    checked.clear()
    assert write(good, True, "columns") == rows_way
    assert checked == []  # no row of a good manifest went through check_row
    t = rows_way[0]
    assert t.column("row_id").to_pylist() == list(range(300)) and t.column("video_id")[4].as_py() == "v1"

    # values check_row converts: the buffers holding them go row by row, to the same rows
    odd = [dict(r) for r in good]
    odd[10].update(split=" val"), odd[150].update(group=7), odd[250].update(start="1.5", end=" 2", timestamp=None)
    assert write(odd, True, "odd") == write(odd, False, "odd-rows")

    bad = [dict(video_id=None), dict(caption="\x85 \u2028"), dict(split="training"), dict(start=1.0, end=None),
           dict(start=float("nan"), end=2.0), dict(start=-1.0, end=2.0), dict(start=2.0, end=2.0),
           dict(start=1.0, end=2.0, timestamp=2.5), dict(start=None, end=None, duration=0.0, timestamp=None),
           dict(start=1.0, end=float("inf")), dict(start="one", end=2.0), dict(caption=b"bytes"),
           dict(caption="\ud83d cut from a pair")]
    for change in bad:
        rows = [dict(r) for r in good]
        rows[207].update(change)  # in the buffer of rows 200-263 (shards of 100, buffers of 64)
        errors = []
        for by_columns in (False, True):
            with pytest.raises(ManifestError) as e:
                write(rows, by_columns, "bad")
            errors.append(str(e.value))
        assert errors[0] == errors[1] and errors[0].startswith("row 207"), change
        checked.clear()
        kept = write(rows, True, "kept", refuse=False)
        assert len(checked) == 64, change  # that buffer only, row by row
        assert kept == write(rows, False, "kept-rows", refuse=False)
        assert kept[2] == [(207, errors[0])] and kept[0].num_rows == 299

    # a rewrite keeping its row ids: a repeated one is refused either way, with the same message
    ids = [dict(r, row_id=1000 - i) for i, r in enumerate(good)]
    assert write(ids, True, "ids", keep_row_ids=True) == write(ids, False, "ids-rows", keep_row_ids=True)
    ids[207]["row_id"] = 1000 - 150
    errors = []
    for by_columns in (False, True):
        with pytest.raises(ManifestError, match="row 207: row_id 850 is missing, not an int64 or repeated") as e:
            write(ids, by_columns, "ids-bad", keep_row_ids=True)
        errors.append(str(e.value))
    assert errors[0] == errors[1]


def test_a_kept_row_id_that_is_no_int64_is_a_row_refused(tmp_path):
    """ManifestWriter(keep_row_ids=True) took True, 2**63 and -2**63-1 as ints (Python's), and
    Arrow then failed the write with an ArrowTypeError or OverflowError, past on_bad. numpy's
    ints were taken in a batch checked by columns but refused in one checked row by row (one bad
    row beside them): they are taken in both."""
    from clipray.manifest import ManifestWriter

    rs = [dict(row_id=rid, video_id=f"v{i}", path=f"v{i}.mp4", caption="a cat", split="train")
          for i, rid in enumerate([5, True, 2**63, -2**63 - 1, 2**63 - 1, -2**63, np.int64(7)])]
    for i, rid in ((1, True), (2, 2**63), (3, -2**63 - 1)):
        with pytest.raises(ManifestError) as e:
            write_manifest([rs[0], rs[i]], tmp_path / "m.parquet", keep_row_ids=True)
        assert str(e.value) == f"row 1: row_id {rid!r} is missing, not an int64 or repeated"
    refused = []
    ManifestWriter(tmp_path / "kept.parquet", keep_row_ids=True,
                   on_bad=lambda row, e: refused.append(row["row_id"])).extend(rs).close()
    assert refused == [True, 2**63, -2**63 - 1]
    assert read_manifest(tmp_path / "kept.parquet").column("row_id").to_pylist() == [5, 2**63 - 1, -2**63, 7]
    write_manifest([rs[0], rs[6]], tmp_path / "np.parquet", keep_row_ids=True)  # by columns
    assert read_manifest(tmp_path / "np.parquet").column("row_id").to_pylist() == [5, 7]


def test_whitespace_is_what_str_strip_strips():
    import sys

    from clipray.manifest import WHITESPACE

    assert WHITESPACE == "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())


def test_text_that_is_not_utf8_is_a_row_named_not_a_traceback(tmp_path):
    """A manifest written by another tool whose writer does not check UTF-8: a caption (video_id,
    path, split or group) of bytes that are not UTF-8 failed the check by columns, and the row by
    row read then ended `clipray data check`, read_manifest and training's check in to_pylist's
    UnicodeDecodeError traceback. The row is named; an earlier bad row still comes first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "m"
    write_manifest(rows(4), out)

    def later(column, first_caption="one"):
        cols = dict(row_id=[10, 11, 12], video_id=["w0", "w1", "w2"], path=["w0.mp4", "w1.mp4", "w2.mp4"],
                    caption=[first_caption, "two", "three"], split=["train", "train", "test"],
                    group=["g", "g", "h"])
        cols[column] = pa.array([cols[column][0].encode(), b"\xff\xfe bad", cols[column][2].encode()],
                                pa.binary()).view(pa.string())
        pq.write_table(pa.table(cols), out / "part-00001.parquet")

    for column in ("video_id", "path", "caption", "split", "group"):
        later(column)
        for read in (check_manifest, read_manifest, lambda p: list(iter_checked(p, split="train"))):
            with pytest.raises(ManifestError) as e:
                read(str(out))
            assert str(e.value) == (f"{out} (part-00001.parquet) row 1: '{column}' is not UTF-8 text "
                                    r"(b'\xff\xfe bad'): write it again as UTF-8"), column
    later("path", first_caption=" ")  # row 0's empty caption, before row 1's bytes
    with pytest.raises(ManifestError, match=r"\(part-00001.parquet\) row 0 \(video w0\): empty caption"):
        check_manifest(str(out))


def test_metadata_that_is_not_utf8_is_printed_escaped_not_a_traceback(tmp_path, capsys):
    """`clipray data check` printed "valid; ..." and then ended in a UnicodeDecodeError traceback
    when another tool had written a metadata key or value of bytes that are not UTF-8."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipray.cli import main

    write_manifest(rows(2), tmp_path / "m.parquet", metadata={"source": "unit"})
    t = pq.read_table(tmp_path / "m.parquet")
    meta = {**t.schema.metadata, b"tool": b"\xff\xfe v1", b"k\xe9y": b"7", b"note": b"plain text"}
    pq.write_table(t.replace_schema_metadata(meta), tmp_path / "m.parquet")
    assert manifest_metadata(tmp_path / "m.parquet") == {"source": "unit", "tool": r"\xff\xfe v1", r"k\xe9y": 7,
                                                         "note": "plain text"}
    assert main(["data", "check", str(tmp_path / "m.parquet")]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        r"metadata: {'source': 'unit', 'tool': '\\xff\\xfe v1', 'k\\xe9y': 7, 'note': 'plain text'}")
