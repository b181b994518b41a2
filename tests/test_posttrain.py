"""Post-pretraining from a sharded manifest in object storage (a real S3 server on loopback):
step budget, per-worker shard streaming, stop mid-pass, restart, and no consumed shard re-read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipray.manifest import read_manifest, write_manifest
from runs import registered_state, stop_at_first_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def s3_shards(s3_server, synth_small):
    if s3_server is None:
        pytest.skip("moto is not installed (the dev extra)")
    s3 = s3_server.ensure_bucket()
    fs = s3.fs()
    root = synth_small["manifest"].rsplit("/", 1)[0]
    rows = read_manifest(synth_small["manifest"]).to_pylist()
    for r in rows:
        fs.put_file(f"{root}/{r['path']}", s3.url(f"pp/{r['path']}"))
        r["path"] = s3.url(f"pp/{r['path']}")
    test = [dict(r) for r in rows if r["split"] == "test"]
    for r in rows:
        r["split"] = "train"
    write_manifest(rows, s3.url("pp/train"), rows_per_shard=4)  # 24 rows -> 6 shards
    write_manifest(test, s3.url("pp/eval.parquet"))
    return s3


def test_posttrain_resumes_mid_pass_without_rereading_shards(ray_local, s3_shards, tmp_path):
    """(The storage path has a '#': Ray read it as a URI and cut it there, keeping checkpoints
    where another run's path, runs#2, found them and resumed from them, training nothing.)"""
    s3, fs = s3_shards, s3_shards.fs()
    run = s3.url("pp/runs#1/howto")
    args = [sys.executable, "-m", "train", str(REPO / "train/configs/demo.yaml"),
            f"data.manifest={s3.url('pp/train')}", f"data.eval_manifest={s3.url('pp/eval.parquet')}",
            "data.shard_stream=true", "data.shuffle_rows=true", "data.shuffle_buffer=4", "data.batch_size=2",
            "data.video.max_frames=4", "data.decode_actors=1", "data.decode_cpus=0.25",
            "train.max_steps=6", "train.checkpoint_every_steps=2", "train.num_workers=2",
            "train.eval_every_epochs=100",  # only the final evaluation is checked
            f"train.storage_path={s3.url('pp/runs#1')}", "train.run_name=howto"]
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
    # to a file, as test_train does: a pipe nobody reads until the end blocks the run once it fills
    log1 = tmp_path / "first.log"
    with open(log1, "w") as f:
        first = subprocess.Popen(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        stop_at_first_checkpoint(first, run, 400, log1.read_text)  # stopped mid-pass
    saved = registered_state(run)
    assert saved["step"] < 6 and saved["pass"] == 0 and saved["consumed"]
    assert not fs.exists(f"{run}/result.json")

    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert f"resumed from step {saved['step']}" in log
    # the last checkpoint comes down from object storage: said, not minutes of silence
    assert f"[driver] training done; fetching its last checkpoint from {run} for the export" in log
    final = registered_state(run)
    result = json.loads(fs.cat(f"{run}/result.json"))
    assert result["total_steps"] == final["step"] == 6
    assert final["pass"] == 0, "the budget fits one pass: no shard may be read twice"
    reread = set(final["reads"][len(saved["reads"]):]) & set(saved["consumed"])
    assert not reread, f"consumed shards read again after the restart: {reread}"
    assert len(set(final["consumed"])) == len(final["consumed"]) == 6
    assert result["num_test_videos"] == len(read_manifest(s3.url("pp/eval.parquet")))
    assert fs.exists(f"{run}/export/model.safetensors")


def _streamed(data, batch_size, world, run_dir, seed=0):
    """Every rank's batches (row ids) and state after one pass of its ShardStream."""
    from train.shards import ShardStream

    out = []
    for rank in range(world):
        stream = ShardStream(data, str(run_dir), batch_size, rank, world, seed, {})
        shards, batches = stream.my_shards(), []
        while (b := stream.next()) is not None:
            assert len(b["row_id"]) == batch_size and b["frames"].shape[0] == batch_size
            batches.append(b["row_id"].tolist())
        stream.sync()
        out.append((shards, batches, stream.state))
    return out


def test_shard_ends_carry_their_rows_into_the_next_batch(ray_local, synth_small, tmp_path):
    """Shards of 2 rows and batches of 3: every batch but the pass's last partial one is
    filled across shard ends, so no row is lost (each shard's drop_last lost them all), and a
    shard counts as consumed once all its rows have been handed out."""
    import pyarrow.parquet as pq

    from clipray.config import DataConfig, VideoConfig
    from clipray.manifest import manifest_files

    root = synth_small["manifest"].rsplit("/", 1)[0]
    rows = read_manifest(synth_small["manifest"]).to_pylist()[:14]
    for r in rows:
        r["path"], r["split"] = f"{root}/{r['path']}", "train"
    write_manifest(rows, tmp_path / "m", rows_per_shard=2)  # 7 shards
    data = DataConfig(manifest=str(tmp_path / "m"), video=VideoConfig(fps=2.0, max_frames=2, size=32),
                      decode_actors=1, decode_cpus=0.5, decode_batch=4, max_words=16)
    fs, files = manifest_files(data.manifest)
    ids = {f: pq.read_table(f, filesystem=fs)["row_id"].to_pylist() for f in files}
    seen_all = []
    for shards, batches, state in _streamed(data, 3, 2, tmp_path / "run"):
        mine = [i for f in shards for i in ids[f]]
        seen = [i for b in batches for i in b]
        assert len(seen) == len(set(seen)) == len(mine) // 3 * 3  # all but the pass's remainder
        assert set(seen) <= set(mine)
        assert sorted(state["consumed"]) == sorted(f for f in shards if set(ids[f]) <= set(seen))
        seen_all += seen
    assert len(seen_all) == len(set(seen_all)) == 12  # rank 0: 8 rows -> 6, rank 1: 6 rows -> 6


def test_a_restart_reads_only_the_rows_not_trained_of_a_shard_read_partly(ray_local, synth_small, tmp_path):
    """Checkpoints counted whole shards consumed: a restart read every open shard again from
    its start, and trained its rows a second time (at HowTo100M's settings up to ~15,600 steps
    a worker). They now record the row ids trained of each open shard, and a resumed stream
    reads only the others: stopped after 3 batches, the two streams together train every row
    of the pass once, as one stream never stopped does."""
    from clipray.config import DataConfig, VideoConfig
    from train.shards import ShardStream

    root = synth_small["manifest"].rsplit("/", 1)[0]
    rows = read_manifest(synth_small["manifest"]).to_pylist()[:14]
    for r in rows:
        r["path"], r["split"] = f"{root}/{r['path']}", "train"
    write_manifest(rows, tmp_path / "m", rows_per_shard=5)  # shards of 5, 5 and 4 rows
    data = DataConfig(manifest=str(tmp_path / "m"), video=VideoConfig(fps=2.0, max_frames=2, size=32),
                      decode_actors=1, decode_cpus=0.5, decode_batch=4, max_words=16, shuffle_rows=True)
    ((_, whole, _),) = _streamed(data, 2, 1, tmp_path / "whole")
    assert sorted(i for b in whole for i in b) == sorted(r["row_id"] for r in read_manifest(str(tmp_path / "m")).to_pylist())
    first = ShardStream(data, str(tmp_path / "run"), 2, 0, 1, 0, {})
    before = [first.next()["row_id"].tolist() for _ in range(3)]
    first.sync()  # the checkpoint's state, as it is stored and read back
    state = json.loads(json.dumps(first.state))
    held = [i for ids in state["trained"].values() for i in ids]  # of the shards still open
    assert held and set(held) <= {i for b in before for i in b}
    second = ShardStream(data, str(tmp_path / "run"), 2, 0, 1, 0, state)
    after = []
    while (b := second.next()) is not None:
        after.append(b["row_id"].tolist())
    trained = [i for b in before + after for i in b]
    assert len(trained) == len(set(trained)), "rows trained before the restart were trained again"
    assert sorted(trained) == sorted(i for b in whole for i in b)
    second.sync()
    assert second.state["trained"] == {} and len(second.state["consumed"]) == 3


def test_shards_that_become_unreadable_stop_the_run_after_two_empty_passes(ray_local, synth_small, tmp_path):
    """A store that stops answering mid-run (every clip skipped from then on) used to go on
    starting passes forever once the segment had taken a step: the loop counted empty passes
    per segment. Two passes in a row without a step now stop it, whenever they come."""
    import shutil

    from clipray.config import DataConfig, VideoConfig

    root = synth_small["manifest"].rsplit("/", 1)[0]
    rows = read_manifest(synth_small["manifest"]).to_pylist()[:4]
    for r in rows:
        shutil.copy(f"{root}/{r['path']}", tmp_path / Path(r["path"]).name)
        r["path"], r["split"] = str(tmp_path / Path(r["path"]).name), "train"
    write_manifest(rows, tmp_path / "m", rows_per_shard=2)  # 2 shards
    data = DataConfig(manifest=str(tmp_path / "m"), video=VideoConfig(fps=2.0, max_frames=2, size=32),
                      decode_actors=1, decode_cpus=0.5, decode_batch=4, max_words=16)
    from train.shards import ShardStream

    stream = ShardStream(data, str(tmp_path / "run"), 2, 0, 1, 0, {})

    def one_pass() -> int:  # as the training loop takes them: a step per batch
        n = 0
        while stream.next() is not None:
            stream.steps, n = stream.steps + 1, n + 1
        return n

    assert one_pass() == 2
    stream.new_pass()
    assert one_pass() == 2  # a pass after a pass with steps
    # a worker whose shards hold fewer clips than a batch: said so, not "no train row"
    short = ShardStream(data, str(tmp_path / "run"), 5, 0, 1, 0, {})
    short.steps = 0
    assert short.next() is None
    short.new_pass()
    assert short.next() is None
    with pytest.raises(RuntimeError, match=r"no batch: the shards of worker 0 gave 4 train clips, fewer than "
                                           r"data.batch_size=5"):
        short.new_pass()
    for r in rows:
        os.remove(r["path"])
    stream.new_pass()
    assert one_pass() == 0
    stream.new_pass()  # one empty pass may be the rest of a pass a resume took up
    assert one_pass() == 0
    with pytest.raises(RuntimeError, match="a whole pass over the shards gave no batch"):
        stream.new_pass()
    assert stream.state["pass"] == 3


def test_fewer_shards_than_workers_is_a_clear_error_before_ray(synth_small, tmp_path):
    """A worker dealt no shard ends every pass at its first step, so the run could only fail,
    after Ray Train had started, with 'a whole pass over the shards gave no batch'."""
    from clipray.config import ConfigError, load_config
    from train.driver import run

    rows = read_manifest(synth_small["manifest"]).to_pylist()[:6]
    write_manifest(rows, tmp_path / "m", rows_per_shard=2)  # 3 shards
    cfg = load_config(REPO / "train/configs/demo.yaml", [
        f"data.manifest={tmp_path / 'm'}", f"data.eval_manifest={synth_small['manifest']}",
        "data.shard_stream=true", "train.max_steps=2", "train.num_workers=4", "train.cpus_per_worker=0.5",
        "data.decode_cpus=0.25", "data.decode_actors=1", f"train.storage_path={tmp_path}", "train.run_name=few"])
    with pytest.raises(ConfigError, match=r"has 3 shard file\(s\), fewer than train.num_workers=4"):
        run(cfg, quiet_ray=True)
    assert not (tmp_path / "few").exists()


def _shards(folder: Path, sizes: list[int]) -> Path:
    """A streamed manifest written by hand: a shard of each size (0: a file without rows, as
    Spark or Dask write for an empty partition), row ids 0, 1, ... across them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipray.manifest import SCHEMA

    folder.mkdir()
    first = 0
    for i, n in enumerate(sizes):
        rows = [{"row_id": first + k, "video_id": f"v{first + k}", "path": f"v{first + k}.mp4", "start": 0.0,
                 "end": 2.0, "caption": f"caption {first + k}", "split": "train"} for k in range(n)]
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / f"part-{i:05d}.parquet")
        first += n
    return folder


@pytest.mark.parametrize("sizes, workers, batch, said", [
    ([0, 6, 0], 2, 2, r"has 3 shard file\(s\), 2 of them without rows: 1 with rows, fewer than train.num_workers=2"),
    ([3], 1, 4, r"the 3 rows of .* cannot fill one step of 4 clips \(data.batch_size x train.num_workers\)"),
    ([3, 2], 2, 3, r"the 5 rows of .* cannot fill one step of 6 clips"),
])
def test_streamed_shards_that_cannot_give_every_worker_a_batch_are_refused_before_ray(tmp_path, sizes, workers,
                                                                                    batch, said):
    """Only the shard files were counted: shards without rows (here 2 of 3, on 2 workers) leave a
    worker dealt only those in every pass, and a manifest of fewer rows than one step leaves a
    worker short of a batch in every pass. Both passed every check, started Ray Train, built the
    model and decoded two passes before failing with "a whole pass over the shards gave no
    batch"; an unstreamed manifest of as few rows is refused at once. The shards' footers count
    their rows."""
    from clipray.config import ConfigError, load_config
    from train.driver import run

    write_manifest([{"video_id": f"t{k}", "path": f"t{k}.mp4", "caption": f"query {k}", "split": "test"}
                    for k in range(4)], tmp_path / "eval.parquet")
    cfg = load_config(REPO / "train/configs/demo.yaml", [
        f"data.manifest={_shards(tmp_path / 'm', sizes)}", f"data.eval_manifest={tmp_path / 'eval.parquet'}",
        "data.shard_stream=true", "train.max_steps=2", f"train.num_workers={workers}", f"data.batch_size={batch}",
        "train.cpus_per_worker=0.5", "data.decode_cpus=0.25", "data.decode_actors=1",
        f"train.storage_path={tmp_path}", "train.run_name=short"])
    with pytest.raises(ConfigError, match=said):
        run(cfg, quiet_ray=True)
    assert not (tmp_path / "short").exists()


@pytest.mark.parametrize("damage", ["cut", "not parquet"])
def test_a_streamed_shard_that_is_no_parquet_file_is_one_line_before_ray(synth_small, tmp_path, capsys, damage):
    """A streamed manifest is never read whole: a shard cut short or overwritten by another
    file failed only when a worker reached it, in pyarrow's traceback after steps had run (or
    never, under a budget that ended before it). Unstreamed, `check_unique_ids` names it."""
    from clipray.cli import main

    rows = read_manifest(synth_small["manifest"]).to_pylist()
    write_manifest([dict(r, split="train") for r in rows], tmp_path / "m", rows_per_shard=6)
    shard = tmp_path / "m" / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-9] if damage == "cut" else b'{"not": "parquet"}\n' * 50)
    size = shard.stat().st_size
    assert main(["train", str(REPO / "train/configs/demo.yaml"), f"data.manifest={tmp_path / 'm'}",
                 f"data.eval_manifest={synth_small['manifest']}", "data.shard_stream=true", "train.max_steps=2",
                 f"train.storage_path={tmp_path / 'runs'}"]) == 2
    assert capsys.readouterr().err == (
        f"clipray train: error: {tmp_path / 'm'}: cannot be read as a manifest ({shard}: not a Parquet file "
        f"({size} bytes without Parquet's magic bytes at both ends: cut short, or of another format))\n")
    assert not (tmp_path / "runs").exists()


def test_a_streamed_run_without_an_eval_manifest_is_a_clear_error_before_ray(synth_small, tmp_path):
    """data.shard_stream never reads the training manifest whole, so nothing counted its test
    rows: a run without data.eval_manifest trained its first checkpoint_every_steps steps and
    then failed in every worker with "no clip of the 'test' split could be decoded"."""
    from clipray.config import ConfigError, load_config
    from train.driver import run

    rows = [dict(r, split="train") for r in read_manifest(synth_small["manifest"]).to_pylist()]
    write_manifest(rows, tmp_path / "m", rows_per_shard=6)
    cfg = load_config(REPO / "train/configs/demo.yaml", [
        f"data.manifest={tmp_path / 'm'}", "data.shard_stream=true", "train.max_steps=2",
        f"train.storage_path={tmp_path}", "train.run_name=noeval"])
    with pytest.raises(ConfigError, match=r"data.shard_stream evaluates on data.eval_manifest, which is empty"):
        run(cfg, quiet_ray=True)
    assert not (tmp_path / "noeval").exists()


def test_decode_actors_that_leave_no_room_for_the_evaluation_pool_are_refused(ray_local, synth_small, tmp_path):
    """Each worker's decode actors stay up, paused, while it evaluates mid-shard: the
    evaluation's pool must fit beside them, or it waits for CPUs forever (seen: a stream held
    by backpressure kept its 2 CPUs and a 2-actor evaluation pool never started)."""
    from clipray.config import ConfigError, load_config
    from train.driver import run

    root = synth_small["manifest"].rsplit("/", 1)[0]
    rows = read_manifest(synth_small["manifest"]).to_pylist()
    for r in rows:
        r["path"], r["split"] = f"{root}/{r['path']}", "train"
    write_manifest(rows, tmp_path / "m", rows_per_shard=12)
    # 1 worker x 1 CPU + its 2 decode actors x 1 CPU + 1 for read tasks fill the 4 CPUs; the
    # evaluation's 2 actors cannot start
    cfg = load_config(REPO / "train/configs/demo.yaml", [
        f"data.manifest={tmp_path / 'm'}", f"data.eval_manifest={synth_small['manifest']}",
        "data.shard_stream=true", "data.decode_pool=actors", "data.decode_actors=2", "data.decode_cpus=1",
        "data.batch_size=2", "data.video.max_frames=4", "train.max_steps=2", "train.num_workers=1",
        "train.cpus_per_worker=1", f"train.storage_path={tmp_path}", "train.run_name=full"])
    with pytest.raises(ConfigError, match=r"needs 6 CPUs at once .*data.decode_actors x data.decode_cpus "
                                          r"\(evaluation\) = 2.* the local Ray has 4"):
        run(cfg, quiet_ray=True)
