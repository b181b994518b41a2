"""Benchmark helpers whose arithmetic the printed figures rest on, and the usage errors of the
commands that take counts."""

import os

import pytest

from clipray.bench.data import CAN_PIN, cpu_split, decoding


def test_cpu_split_groups_processes_by_role_over_the_window(monkeypatch):
    import clipray.bench.data

    # idle is of the cores this process may use (a container's), not the host's os.cpu_count()
    monkeypatch.setattr(clipray.bench.data, "usable_cores", lambda: 3)
    me = os.getpid()
    # a decode worker is known by pid: between two tasks Ray titles it ray::IDLE
    before = {me: ("python bench", 10.0), 101: ("ray::MapBatches(decode_batch)", 5.0),
              102: ("raylet", 1.0), 104: ("ray::IDLE", 0.0)}
    after = {me: ("python bench", 10.5), 101: ("ray::IDLE", 8.0),
             102: ("raylet", 1.5),
             103: ("gcs_server", 0.5),  # started inside the window: all its time counts
             104: ("ray::MapBatches(decode_batch)", 4.0)}
    # pid 105 exited inside the window: its time is unknown and not counted
    assert decoding(before) | decoding(after) == {101, 104}  # each seen busy in one snapshot
    # a decode actor keeps its title, busy or idle; other actors are not decoders
    assert decoding({106: ("ray::MapWorker(MapBatches(ClipDecoder))", 1.0),
                     107: ("ray::MapWorker(MapBatches(Tokenise))", 1.0)}) == {106}
    split = cpu_split(before | {105: ("ray::IDLE", 2.0)}, after, wall=5.0, decoders={101, 104, 105})
    assert split["decode workers"] == pytest.approx((3.0 + 4.0) / 5.0)
    assert split["consumer"] == pytest.approx(0.5 / 5.0)
    assert split["Ray + system"] == pytest.approx((0.5 + 0.5) / 5.0)
    assert split["idle"] == pytest.approx(3 - 1.4 - 0.1 - 0.2)


def test_elsewhere_is_the_machine_busy_time_less_the_loops_own_and_steal_apart():
    from collections import namedtuple

    from clipray.bench.data import elsewhere

    T = namedtuple("T", "user nice system idle iowait irq softirq steal guest guest_nice")
    before = T(100.0, 50.0, 20.0, 500.0, 3.0, 0.0, 1.0, 2.0, 0.0, 0.0)
    # over 4 s on 2 cores: 3.0 s of user, 1.0 nice, 0.8 system, 0.2 softirq busy; 1.0 s stolen;
    # idle and iowait never count, and guest time is already inside user
    after = T(103.0, 51.0, 20.8, 503.0, 4.0, 0.0, 1.2, 3.0, 0.7, 0.0)
    rest, host = elsewhere(before, after, own_cpu=4.0, wall=4.0)
    assert rest == pytest.approx((5.0 - 4.0) / 4.0)
    assert host == pytest.approx(1.0 / 4.0)
    # a loop whose own CPU exceeds the machine's busy count (clock ticks) reads 0, not negative
    assert elsewhere(before, after, own_cpu=5.5, wall=4.0)[0] == 0.0
    # macOS reports user, nice, system and idle only: no steal, and the same busy time
    Mac = namedtuple("Mac", "user nice system idle")
    assert elsewhere(Mac(100.0, 50.0, 20.0, 500.0), Mac(103.0, 51.0, 21.0, 503.0), own_cpu=4.0,
                     wall=4.0) == pytest.approx((1.0 / 4.0, 0.0))


def test_the_bare_loops_label_names_the_library_it_decodes_with(monkeypatch):
    """Without decord (no ARM wheel) the decord backend reads with PyAV: row (a) said 'bare
    decord loop' over figures of PyAV."""
    import clipray.video
    from clipray.bench.data import bare_label

    monkeypatch.setattr(clipray.video, "_decord_missing", "")
    assert (bare_label(), bare_label(again=True)) == ("(a) bare decord loop, 1 core", "(a) bare decord loop, again")
    monkeypatch.setattr(clipray.video, "_decord_missing", "ModuleNotFoundError: No module named 'decord'")
    assert (bare_label(), bare_label(again=True)) == ("(a) bare PyAV loop, 1 core", "(a) bare PyAV loop, again")


@pytest.mark.skipif(not CAN_PIN, reason="no CPU affinity on this OS")
def test_bare_loop_counts_every_frame_on_one_core_and_unpins_after(tmp_path):
    from clipray.bench.data import bare_loop
    from clipray.config import VideoConfig
    from clipray.manifest import default_root, read_manifest, resolve_path
    from clipray.synth import generate
    from clipray.video import decode_clip

    manifest = generate(tmp_path, videos=4, seed=0)["manifest"]
    cfg = VideoConfig(fps=3, max_frames=4, size=32)
    rows, root = read_manifest(manifest, split="train").to_pylist(), default_root(manifest)
    expected = sum(int(decode_clip(resolve_path(r["path"], root), r["start"], r["end"], cfg).mask.sum())
                   for r in rows)
    before = os.sched_getaffinity(0)
    clips, frames, wall, cores_used, _ = bare_loop(manifest, cfg, repeat=2)
    assert (clips, frames) == (2 * len(rows), 2 * expected)
    assert os.sched_getaffinity(0) == before  # Ray, started after the loop, must get every core
    assert cores_used <= 1.05  # pinned: at most one core, whatever threads decord starts


@pytest.mark.parametrize("argv, says", [
    (["data", "synth", "--videos", "0"], "argument --videos: must be 1 or more, got 0"),
    (["data", "synth", "--width", "33"], "--width and --height must be even for H.264 (yuv420p), got 33x72"),
    # libx264's limit: past it the encoder failed to open, as an av.error traceback
    (["data", "synth", "--width", "16386"], "--width and --height must be 16384 or less for libx264, got 16386x72"),
    # each side allowed, the frame past FFmpeg's check: 8.5 GB of frames drawn, then PyAV's traceback
    (["data", "synth", "--width", "16384", "--height", "16384"],
     "--width x --height 16384x16384 is past FFmpeg's largest frame: (width + 128) x (height + 128)"),
    # half a billion events planned in memory before the first video
    (["data", "synth", "--max-events", "1000000000"], "argument --max-events: must be 16 or less, got 1000000000"),
    (["demo", "--videos", "-2"], "argument --videos: must be 1 or more, got -2"),
    # planned in memory before the first video, without a line: ran on, silent, until stopped
    (["data", "synth", "--videos", "99999999999999999999"], "argument --videos: must be 100000 or less, got 9999"),
    (["demo", "--videos", "100001"], "argument --videos: must be 100000 or less, got 100001"),
    (["bench", "data", "--cores", "0"], "argument --cores: must be 1 or more, got 0"),
    (["bench", "data", "--repeat", "two"], "argument --repeat: not a number: 'two'"),
    (["data", "synth", "--fps", "7.5"], "argument --fps: not a whole number: '7.5'"),  # was "not a number"
    (["bench", "serve", "--scale", "0"], "argument --scale: must be 0.01 or more, got 0"),
    (["bench", "train", "--warmup", "-1"], "argument --warmup: must be 0 or more, got -1"),
    (["bench", "startup", "--rounds", "1"], "argument --rounds: must be 2 or more, got 1"),
    (["bench", "shuffle", "--batch", "1"], "argument --batch: must be 2 or more, got 1"),
    (["bench", "poll", "--runs", "0"], "argument --runs: must be 1 or more, got 0"),
    (["bench", "prepare", "--lines", "0"], "argument --lines: must be 1 or more, got 0"),
    # `nan < 0` is false, so nan passed the floor, as inf did: both were tracebacks from the
    # frame arithmetic once generation had started
    (["data", "synth", "--idle-seconds", "nan"], "argument --idle-seconds: must be a finite number, got nan"),
    (["data", "synth", "--idle-seconds", "inf"], "argument --idle-seconds: must be a finite number, got inf"),
    (["bench", "edit", "--idle-seconds", "NaN"], "argument --idle-seconds: must be a finite number, got NaN"),
    # numpy refuses a negative seed: it was a ValueError traceback from the generator
    (["data", "synth", "--seed", "-1"], "argument --seed: must be 0 or more, got -1"),
    # an OverflowError or MemoryError traceback from the frame count, or hours of frames
    (["data", "synth", "--idle-seconds", "1e300"], "argument --idle-seconds: must be 3600 or less, got 1e300"),
    (["data", "synth", "--fps", "1000000"], "argument --fps: must be 240 or less, got 1000000"),
    (["bench", "edit", "--idle-seconds", "1e9"], "argument --idle-seconds: must be 3600 or less, got 1e9"),
    # a MemoryError (or numpy's "Unable to allocate 335. GiB") traceback after the set was made
    (["bench", "data", "--size", "100000"], "argument --size: must be 1024 or less, got 100000"),
    (["bench", "data", "--frames", "5000"], "argument --frames: must be 256 or less, got 5000"),
    # refused once Ray had started, after the clip sets and the bare loops (~34 s here)
    (["bench", "data", "--cores", "64", "--workdir", "sets"], "needs 65 CPUs at once (--cores (decoders of run (c)"),
    # written to a local folder ./s3:/b/set, said written, and nothing reached the bucket
    (["data", "synth", "--out", "s3://b/set"], "--out s3://b/set: the synthetic set is written to a local folder"),
])
def test_counts_below_their_floor_are_usage_errors_before_any_work(argv, says, tmp_path, capsys, monkeypatch):
    from clipray.cli import main

    monkeypatch.chdir(tmp_path)
    if argv[:2] == ["data", "synth"] and "--out" not in argv:
        argv = argv + ["--out", str(tmp_path / "synth")]
    try:
        code = main(argv)  # a ConfigError is returned as 2
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    assert code == 2 and says in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing generated, no run folder


@pytest.mark.parametrize("bench, bad, says", [
    ("heads", "train.epocs=3", "bad key 'train.epocs'"),
    ("heads", "model.tuning=frozn", "model.tuning must be one of frozen, full, unipt, got 'frozn'"),
    ("edit", "edit.rounds=-1", "edit.rounds must be >= 0, got -1"),
    ("edit", "model.head=meanp", "model.head must be one of meanP, seqLSTM, seqTransf, tightTransf, got 'meanp'"),
    ("heads", "data.batch_size=1", "data.batch_size=1: the tightTransf head's loss"),  # meanP,tightTransf
    ("edit", "model.head=tightTransf data.batch_size=1", "data.batch_size=1: the tightTransf head's loss"),
    ("poll", "train.epocs=3", "bad key 'train.epocs'"),
])
def test_bench_heads_and_edit_check_their_overrides_before_making_videos(bench, bad, says, tmp_path, capsys):
    """A typo in an override used to surface only after the synthetic set was made (600 videos
    by default for heads, minutes on 2 cores): now it is the usual one-line error at once."""
    from clipray.cli import main

    heads = ["--heads", "meanP,tightTransf"] if bench == "heads" else []
    assert main(["bench", bench, "--data", str(tmp_path / "synth"), "--videos", "2", *heads, *bad.split()]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "synth").exists()


def test_bench_prepare_runs_both_checks_over_one_release_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """A small `clipray bench prepare`: the real howto100m prepare, each way of checking rows,
    the same rows written; its work folder goes, and the writer is left checking by columns."""
    import tempfile

    from clipray.bench.prepare import main
    from clipray.manifest import ManifestWriter

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["--videos", "3", "--lines", "4", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 videos x 4 lines = 12 rows, 2 runs each" in out
    runs = [ln for ln in out.splitlines() if ln.startswith("  run ")]
    assert [ln.split(":")[1].split()[:3] for ln in runs] == [
        ["(a)", "row", "by"], ["(a)", "row", "by"], ["(b)", "by", "columns"], ["(b)", "by", "columns"],
        ["(a)", "row", "by"]]
    # the first run of the process pays its imports: a warm-up, left out of (a)'s median
    assert runs[0].endswith("s (warm-up, not counted)") and not any("warm-up" in ln for ln in runs[1:])
    table = {ln.split()[0]: float(ln.split()[-2]) for ln in out.splitlines() if ln.startswith(("(a) ", "(b) "))}
    timed = lambda way: [float(ln.split()[-2]) for ln in runs[1:] if f": {way}" in ln]  # noqa: E731
    assert all(abs(table[w] - sum(timed(w)) / 2) <= 0.006 for w in ("(a)", "(b)")), (table, runs)  # the medians
    assert "the manifests written are equal" in out
    assert list(tmp_path.iterdir()) == [] and ManifestWriter.by_columns is True


def test_bench_data_with_no_training_clip_says_so_before_ray(tmp_path, monkeypatch, capsys):
    """`clipray bench data --videos 1` makes one test video: its bare loop timed 0 clips and the
    pipeline run was a ZeroDivisionError traceback, after Ray had started."""
    import clipray.runtime
    from clipray.cli import main

    _no_work(monkeypatch, (clipray.runtime, "init_ray"))
    with pytest.raises(SystemExit) as e:
        main(["bench", "data", "--videos", "1", "--skip-real", "--workdir", str(tmp_path)])
    # a usage error: exit 2, on stderr, named by the command (it was exit 1, as a bare SystemExit)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "clipray bench data: error: synthetic (96x72, 2-4 s): --videos 1 put no video in the train split, "
        "nothing to decode; raise --videos")


def test_an_unknown_benchmark_is_named(capsys):
    from clipray.cli import main

    assert main(["bench", "dta"]) == 2
    err = capsys.readouterr().err
    assert "clipray bench: error: unknown benchmark 'dta'" in err and "{data,model,train," in err
    assert main(["bench", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: clipray bench {data,")


@pytest.mark.parametrize("argv, says", [
    (["--heads", "meanP", "--words", "78"], "--words 78: test_meanP reads captions of at most 77 tokens"),
    (["--heads", "meanP,seqTransf", "--frames", "78"], "--frames 78: test_seqTransf has positions for at most 77 frames"),
    (["--heads", "tightTransf", "--frames", "77"], "--frames 77: test_tightTransf has positions for at most 76 frames"),
    # an empty list printed the table's header over no row, and exit 0
    (["--heads", ","], "no size, head or tuning to measure: give comma lists (--sizes tiny --heads meanP "
                       "--tunings full)"),
    (["--tunings", ""], "no size, head or tuning to measure"),
])
def test_bench_model_words_or_frames_past_the_positions_are_a_line_not_a_traceback(argv, says, capsys):
    """Captions get the text tower's 77 positions, and seqTransf / tightTransf copy them for the
    frames (tightTransf after the caption's one): past them, every row was a ValueError traceback."""
    from clipray.bench.model import main

    assert main(["--sizes", "tiny", "--repeats", "1", "--batch", "1", *argv]) == 2
    out = capsys.readouterr()  # on stderr, as argparse's errors (they were printed to stdout)
    assert out.out == "" and out.err.startswith("clipray bench model: error: ") and out.err.count("\n") == 1
    err = out.err.strip().removeprefix("clipray bench model: error: ")
    assert err.endswith(says) or err.startswith(says), err
    from clipray.bench.model import _past_positions

    # the edges themselves fit (meanP and seqLSTM take any number of frames)
    assert _past_positions(["tiny"], ["meanP", "seqLSTM", "seqTransf"], 77, 77) is None
    assert _past_positions(["tiny"], ["tightTransf"], 77, 76) is None
    assert _past_positions(["tiny"], ["meanP", "seqLSTM"], 77, 500) is None


def test_saved_for_backward_counts_activations_not_parameters():
    import torch

    from clipray.bench.model import saved_for_backward

    torch.manual_seed(0)
    layer, x = torch.nn.Linear(4, 3), torch.randn(5, 4)
    # the weight's gradient needs the input x (5 x 4 floats); the square needs its input, the
    # layer's output (5 x 3); the weight itself is a parameter and not counted
    assert saved_for_backward(layer, lambda: (layer(x) ** 2).sum()) == (5 * 4 + 5 * 3) * 4
    layer.requires_grad_(False)  # nothing needs a gradient: nothing is kept
    assert saved_for_backward(layer, lambda: (layer(x) ** 2).sum()) == 0


def test_bench_model_in_bf16_keeps_half_the_activations_of_fp32():
    """`--dtype bf16` runs the model as DeepSpeed's bf16 mode does: every activation kept for
    backward takes 2 bytes instead of 4, so the memory kept halves (the loss's few fp32 logits
    aside), and the trainable parameters are the same."""
    from clipray.bench.model import _parser, bench_one

    runs = {d: bench_one("test_meanP", batch=2, frames=4, words=16, repeats=1, device="cpu", dtype=d)
            for d in ("fp32", "bf16")}
    assert runs["bf16"]["trainable_m"] == runs["fp32"]["trainable_m"] > 0
    assert 0.48 < runs["bf16"]["kept_mb"] / runs["fp32"]["kept_mb"] < 0.52
    assert _parser().parse_args(["--threads", "0"]).threads == 0  # its help: 0 = torch's default


def test_bench_model_refuses_a_device_this_machine_lacks_in_a_line(capsys):
    """`--device cuda` without a GPU (or a device torch cannot parse) exits 2 with a line, not
    torch's traceback; its --help is the whole description, not its first line cut mid-sentence."""
    import torch

    from clipray.bench.model import _parser, main

    if not torch.cuda.is_available():
        assert main(["--device", "cuda", "--sizes", "tiny"]) == 2
        assert capsys.readouterr().err == "clipray bench model: error: --device cuda: torch sees no CUDA GPU on this machine\n"
    assert main(["--device", "gpu0", "--sizes", "tiny"]) == 2
    assert capsys.readouterr().err.startswith("clipray bench model: error: --device gpu0: ")
    assert "kept for backward" in _parser().format_help() and "--rss" in _parser().description


def test_bench_shuffle_counts_same_video_pairs_as_a_hand_count_does(ray_local, tmp_path, monkeypatch, capsys):
    """Read as listed, with batches as long as a video's run of captions, a batch holds 6 pairs
    of one video whenever it sits inside one run; shuffled, about what uniform sampling gives.
    The manifest it writes goes with its temp dir (every bench's temp dir stayed behind)."""
    import tempfile

    from clipray.bench.shuffle import grouped_manifest, main, read
    from clipray.config import DataConfig

    grouped_manifest(tmp_path / "m.parquet", videos=30, captions=4)
    data = DataConfig(manifest=str(tmp_path / "m.parquet"), decode_batch=4)
    listed, shuffled = read(data, False, 0, 4, 4), read(data, True, 0, 4, 4)
    assert listed["batches"] == shuffled["batches"] == 30
    assert listed["pairs"] > 3  # most batches are one video's 4 captions: 6 pairs each
    assert shuffled["pairs"] < 1.0  # uniform: 6 x 3/119 = 0.15 per batch
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert main(["--videos", "30", "--captions", "4", "--batch", "4", "--buffer", "8"]) == 0
    out = capsys.readouterr().out
    assert "120 rows, 4 captions per video" in out and "uniform sampling (expected)" in out
    assert out.rstrip().endswith("0.15")
    assert list(scratch.iterdir()) == []


def test_a_benchs_temp_dir_goes_even_when_it_fails_and_a_workdir_stays(tmp_path, monkeypatch):
    import tempfile

    from clipray.bench import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(RuntimeError, match="the bench failed"):
        with scratch_dir("clipray-bench-x-") as work:
            assert work.parent == tmp_path and work.name.startswith("clipray-bench-x-")
            (work / "clips").mkdir()
            (work / "clips" / "a.mp4").write_bytes(b"x")
            raise RuntimeError("the bench failed")
    assert list(tmp_path.iterdir()) == []
    keep = tmp_path / "mine" / "work"  # --workdir: made if absent, and kept with what was written
    with scratch_dir("clipray-bench-x-", str(keep)) as work:
        assert work == keep and keep.is_dir()
        (work / "m.parquet").write_bytes(b"x")
    assert [p.name for p in keep.iterdir()] == ["m.parquet"] and list(tmp_path.iterdir()) == [tmp_path / "mine"]



def test_bench_serve_overhead_compares_the_unbatched_call_with_the_in_process_one(tmp_path, monkeypatch, capsys):
    """The Serve overhead line compares the same single call served and in-process. In the
    batched app a lone request waits out the batch timeout (5 ms) before it runs, which is
    batching's cost, not the proxy's: the figure comes from the max_batch_size=1 app's p50. The
    measurements are faked here (no Ray, no model): only api_bench's arithmetic runs."""
    import types

    import clipray.export
    import clipray.synth
    import ray.serve
    import serve.__main__
    import serve.config
    import serve.demo_step
    import serve.index
    from clipray.bench import serve as bench

    p50 = {(32, "/encode/text", 1): 65.2, (1, "/encode/text", 1): 51.4}  # batched, unbatched

    def load_app_config(path, overrides):
        bs = int(next((o.split("=")[1] for o in overrides if o.startswith("serve.text_encoder.max_batch_size=")),
                      32))
        return types.SimpleNamespace(bs=bs, serve=types.SimpleNamespace(app_name="clipray-bench"))

    async def load(url, clients, total, body):
        bs, path = int(url.split("/")[2].removeprefix("bs")), "/" + url.split("/", 3)[3]
        return {"clients": clients, "requests": total, "failed": 0, "rps": 10.0 * clients / bs,
                "p50": p50.get((bs, path, clients), 100.0), "p95": 0.0, "p99": 0.0}

    async def handle_load(method, clients, total, arg):
        return {"clients": clients, "requests": total, "failed": 0, "rps": 10.0, "p50": 1.0, "p95": 1.0, "p99": 1.0}

    (tmp_path / "vitb32_export").mkdir()
    (tmp_path / "vitb32_export" / "config.json").write_text("{}")
    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "synth.json").write_text("{}")
    (tmp_path / "api_index").mkdir()
    (tmp_path / "api_index" / "index.json").write_text("{}")
    monkeypatch.setattr(serve.config, "load_app_config", load_app_config)
    monkeypatch.setattr(serve.__main__, "start", lambda cfg: f"http://bs{cfg.bs}")
    monkeypatch.setattr(serve.__main__, "stop", lambda cfg: None)
    monkeypatch.setattr(serve.demo_step, "port", lambda: 1)
    monkeypatch.setattr(clipray.export, "load_export", lambda path: None)
    monkeypatch.setattr(ray.serve, "get_deployment_handle", lambda *a, **k: types.SimpleNamespace(encode=None))
    monkeypatch.setattr(bench, "_load", load)
    monkeypatch.setattr(bench, "_handle_load", handle_load)
    monkeypatch.setattr(bench, "_direct_encode_ms", lambda model, queries, n: 28.6)
    for name, module in (("save_export", clipray.export), ("generate", clipray.synth), ("build_index", serve.index)):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("nothing is built: it exists"))

    out = bench.api_bench(tmp_path, 1.0)
    assert out["serve_overhead_share"] == pytest.approx((51.4 - 28.6) / 51.4)
    assert "p50 51.4 ms vs the same encoder in-process 28.6 ms -> 44%" in capsys.readouterr().out


def _no_work(monkeypatch, *targets):
    """Make each (module, name) fail the test if called: a usage error must come before it."""
    for module, name in targets:
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran before the usage error"))


def test_bench_train_refuses_an_unknown_model_before_any_work(monkeypatch, capsys):
    """A typo in --model was a ValueError traceback from create_model, after 150 videos were
    generated and Ray had started."""
    import clipray.runtime
    import clipray.synth
    from clipray.cli import main

    _no_work(monkeypatch, (clipray.synth, "generate"), (clipray.runtime, "init_ray"))
    with pytest.raises(SystemExit) as e:
        main(["bench", "train", "--model", "test_meanp"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --model: invalid choice: 'test_meanp'" in err and "test_meanP" in err


@pytest.mark.parametrize("model, frames, says", [
    ("test_seqTransf", 78, "--frames 78: test_seqTransf: the seqTransf head has 77 positions, so at most 77 frames"),
    ("test_tightTransf", 77, "--frames 77: test_tightTransf: the tightTransf head has 77 positions (one for the "
                             "caption), so at most 76 frames"),
])
def test_bench_train_frames_past_the_heads_positions_are_a_usage_error_before_any_work(model, frames, says,
                                                                                      monkeypatch, capsys):
    """seqTransf and tightTransf take CLIP's 77 text positions for frames: more were a ValueError
    traceback from (a)'s first step, after the videos were made and Ray had started."""
    import clipray.runtime
    import clipray.synth
    from clipray.cli import main

    _no_work(monkeypatch, (clipray.synth, "generate"), (clipray.runtime, "init_ray"))
    with pytest.raises(SystemExit) as e:
        main(["bench", "train", "--model", model, "--frames", str(frames)])
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(f"error: {says}")
    from clipray.bench.train import past_positions

    # the edges fit, and meanP takes any number of frames
    assert past_positions(model, frames - 1) is None and past_positions("test_meanP", 500) is None


def test_bench_train_feeds_c_from_decode_actors_as_its_help_and_figures_say(monkeypatch, tmp_path):
    """(c) stands in for CPU decode workers beside a GPU, which the recipe configs run as decode
    actors; its help ("decode actors for (c)") and docs/benchmarks.md's figures are actors'.
    Since decode tasks became DataConfig's default (787fae9) the bench built (c) with tasks,
    which decode at another rate (docs/benchmarks.md, "Decode tasks or decode actors")."""
    import clipray.bench.data
    import clipray.pipeline
    from clipray.bench.train import ray_loop

    seen = []

    class Built(Exception):
        pass

    def clip_dataset(data, skip_dir, split="train"):
        seen.append(data)
        raise Built

    monkeypatch.setattr(clipray.bench.data, "repeated_manifest", lambda manifest, out, **k: str(out))
    monkeypatch.setattr(clipray.pipeline, "clip_dataset", clip_dataset)
    with pytest.raises(Built):
        ray_loop("test_meanP", 2, 2, 1, 0, 1, manifest="m.parquet", work=tmp_path, decode_cores=3)
    assert [(d.decode_pool, d.decode_actors, d.decode_cpus) for d in seen] == [("actors", 3, 1.0)]


def test_bench_train_refuses_cores_the_local_ray_lacks_instead_of_waiting_forever(monkeypatch, capsys):
    """(c) runs the train worker (--threads CPUs) beside the decode actors (--decode-cores, one
    CPU each) and Ray Data's read tasks: on an embedded Ray too small for them Ray Train and
    Ray Data would wait for CPUs forever, silently. Ray is faked here: 4 CPUs, as init_ray
    gives a 2-core machine; the loops must not start."""
    import clipray.runtime
    import clipray.synth
    from clipray.bench import train as bench
    from clipray.cli import main

    monkeypatch.setattr(clipray.runtime, "init_ray",
                        lambda *a, **k: monkeypatch.setattr(clipray.runtime, "_embedded", {"CPU": 4.0, "GPU": 0.0}))
    monkeypatch.setattr(clipray.runtime, "quiet_data_progress", lambda: None)
    monkeypatch.setattr(clipray.synth, "generate", lambda *a, **k: {"manifest": "unused.parquet"})
    _no_work(monkeypatch, (bench, "plain_loop"), (bench, "ray_loop"))
    # 3 (step) + 1 (decode) + 1 (read tasks) = 5 CPUs > 4
    assert main(["bench", "train", "--threads", "3", "--decode-cores", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs 5 CPUs at once" in err and "--threads" in err and "--decode-cores" in err
    assert main(["bench", "train", "--threads", "1", "--decode-cores", "3"]) == 2  # 1 + 3 + 1
    assert "needs 5 CPUs at once" in capsys.readouterr().err


@pytest.mark.parametrize("heads, says", [("meanP,seqtransf", "meanP, seqLSTM, seqTransf, tightTransf"),
                                         ("", "meanP, seqLSTM, seqTransf, tightTransf"),
                                         ("meanP,seqTransf,meanP", "meanP named twice: give each head once")])
def test_bench_heads_refuses_an_unknown_head_before_any_work(heads, says, monkeypatch, capsys):
    """A misspelt head failed only when its turn came: after the 600-video set was written and,
    when it was not the first, after the heads before it had trained. A head named twice ran
    under the same run name, so its second row was the first run resumed, not a second run."""
    import clipray.demo
    import train.driver
    from clipray.cli import main

    _no_work(monkeypatch, (clipray.demo, "ensure_synth"), (train.driver, "run"))
    with pytest.raises(SystemExit) as e:
        main(["bench", "heads", "--heads", heads])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --heads:" in err and says in err


def test_a_grouped_manifest_smaller_than_one_batch_is_a_usage_error(monkeypatch, capsys):
    """`clipray bench shuffle --videos 2 --captions 1` (2 rows, batches of 16) gave not one
    batch and ended in a ZeroDivisionError traceback after Ray had started."""
    import clipray.runtime
    from clipray.bench import shuffle as bench
    from clipray.cli import main

    _no_work(monkeypatch, (bench, "grouped_manifest"), (clipray.runtime, "init_ray"))
    with pytest.raises(SystemExit) as e:
        main(["bench", "shuffle", "--videos", "2", "--captions", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "2 rows (--videos x --captions) do not fill one batch of 16 (--batch)" in err


def test_bench_model_refuses_a_gpu_index_past_the_last_gpu_in_a_line(monkeypatch, capsys):
    """`--device cuda:1` on a one-GPU machine was CUDA's 'invalid device ordinal' traceback once
    the first model was built. The GPU count is faked: the check runs before any CUDA call."""
    import torch

    from clipray.bench.model import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["--device", "cuda:1", "--sizes", "tiny", "--heads", "meanP"]) == 2
    assert capsys.readouterr().err == ("clipray bench model: error: --device cuda:1: torch sees 1 CUDA GPU(s) on this "
                                       "machine, the last cuda:0\n")


def test_bench_stream_removes_only_what_it_wrote_in_a_given_workdir(tmp_path, monkeypatch):
    """Without --keep the bench cleans up after itself, also when it fails; in a --workdir the
    user named (`--workdir .` is a checkout) that is its own files, not the whole folder. Ray
    is faked to fail once the manifest is written, so the clean-up runs without it."""
    import clipray.runtime
    from clipray.bench.stream import main

    work = tmp_path / "mine"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")

    def no_ray(*a, **k):
        raise RuntimeError("no Ray in this test")

    monkeypatch.setattr(clipray.runtime, "init_ray", no_ray)
    with pytest.raises(RuntimeError, match="no Ray in this test"):
        main(["--workdir", str(work), "--rows", "20", "--shard-rows", "10", "--videos", "1"])
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    with pytest.raises(RuntimeError, match="no Ray in this test"):  # a folder it made goes whole
        main(["--workdir", str(tmp_path / "new"), "--rows", "20", "--shard-rows", "10", "--videos", "1"])
    assert not (tmp_path / "new").exists()


def test_bench_serve_index_recall_of_fewer_vectors_than_k_counts_only_real_neighbours(tmp_path, monkeypatch):
    """--vectors below 10: faiss pads each top-10 row with -1, and the bench counted the pads
    as found neighbours, 0.6 for an IVF that returned all 5 of 5 vectors (nlist 1, every list
    probed: exhaustive, so recall 1 by hand). The vectors are random here, not the tiny model's."""
    import numpy as np

    from clipray.bench import serve as bench

    rng = np.random.default_rng(0)

    def vectors(work, n, dim, queries, seed=0):
        x, q = rng.standard_normal((n, dim)), rng.standard_normal((queries, dim))
        return [(v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32) for v in (x, q)]

    monkeypatch.setattr(bench, "realish_vectors", vectors)
    out = bench.index_bench(tmp_path, 5, 64, searcher=False)
    assert [out[f"ivf_sq8_nprobe{p}"]["recall@10"] for p in (8, 16, 32, 64)] == [1.0] * 4

    def near_copies(work, n, dim, queries, seed=0):
        """Three copies of 20 axis vectors, each 5e-7 apart: ties within `clipray index`'s 1e-5.
        SQ8 codes the copies alike and keeps the first id; exact search keeps the highest-scored
        copy. Ranked by the axis alone (SQ8 keeps that order), so recall 1 by hand, as the index
        counts it; counted by id it was 0.95."""
        x = np.concatenate([np.eye(dim, dtype=np.float32)[: n // 3] + c * 5e-7 for c in range(3)])
        return x, vectors(work, 1, dim, queries)[1]

    monkeypatch.setattr(bench, "realish_vectors", near_copies)
    out = bench.index_bench(tmp_path, 60, 64, searcher=False)
    assert [out[f"ivf_sq8_nprobe{p}"]["recall@10"] for p in (8, 16, 32, 64)] == [1.0] * 4


def test_bench_serve_writes_an_index_the_searcher_serves_with_exact_answers(tmp_path):
    """The Searcher part of `clipray bench serve` failed to deploy: the index folder it writes
    lacked index.json's format tag, which the Searcher has required since 25b5ba5. Its answers
    here are a brute force's over random vectors."""
    import faiss
    import numpy as np

    from clipray.bench.serve import flat_index_dir
    from serve.deployments import Searcher

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(64)
    exact.add(x)
    searcher = Searcher.func_or_class(str(flat_index_dir(tmp_path / "idx", x, exact)),
                                      {"max_batch_size": 4, "batch_wait_timeout_s": 0.0})
    q = rng.standard_normal((3, 64)).astype(np.float32)
    got = searcher.search_many([(v, 5) for v in q])
    assert [[h["clip_id"] for h in hits] for hits in got] == [list(np.argsort(-(x @ v))[:5]) for v in q]


def test_bench_serve_refuses_a_dim_below_the_embeddings_it_lifts(monkeypatch, capsys):
    """The 1M vectors are the tiny model's 64-d embeddings lifted by an orthonormal map, which
    needs --dim >= 64: --dim 32 was a matmul shape error after the whole API part had run."""
    import clipray.runtime
    from clipray.cli import main

    _no_work(monkeypatch, (clipray.runtime, "init_ray"))
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", "--dim", "32"])
    assert e.value.code == 2 and "argument --dim: must be 64 or more, got 32" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--json", "no-such-folder/serve.json"], "--json no-such-folder/serve.json: no folder"),
    (["--skip-api", "--skip-index"], "--skip-api and --skip-index leave nothing to run"),
])
def test_bench_serve_refuses_a_json_it_could_not_write_before_the_run(argv, says, tmp_path, monkeypatch, capsys):
    """--json in a folder that is not there failed with FileNotFoundError when writing it, after
    the whole run; skipping both parts started Ray to measure nothing."""
    import clipray.bench.serve as bench
    import clipray.runtime
    from clipray.cli import main

    monkeypatch.chdir(tmp_path)
    _no_work(monkeypatch, (clipray.runtime, "init_ray"), (bench, "api_bench"), (bench, "index_bench"))
    with pytest.raises(SystemExit) as e:
        main(["bench", "serve", *argv])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_bench_stream_refuses_more_actors_than_the_local_ray_can_run_beside_its_reads(monkeypatch, capsys):
    """Phase 2's tokenise actors take a CPU each; with all of the embedded Ray's CPUs held by
    them the read tasks never run and the stream waits forever, silently. Ray is faked here
    (4 CPUs); the stream must not start."""
    import clipray.runtime
    from clipray.bench import stream as bench
    from clipray.cli import main

    monkeypatch.setattr(clipray.runtime, "init_ray",
                        lambda *a, **k: monkeypatch.setattr(clipray.runtime, "_embedded", {"CPU": 4.0, "GPU": 0.0}))
    monkeypatch.setattr(clipray.runtime, "quiet_data_progress", lambda: None)
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    _no_work(monkeypatch, (bench, "read_tokenise_dataset"))
    assert main(["bench", "stream", "--actors", "4", "--rows", "20", "--shard-rows", "10", "--videos", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs 5 CPUs at once (--actors" in err and "lower --actors" in err


def test_bench_stream_refuses_a_cluster_address_but_runs_with_ray_address_local(tmp_path, monkeypatch, capsys):
    """RAY_ADDRESS=local is the embedded Ray (clipray.runtime), which the bench measures: it was
    refused as if it named a cluster. An address of a cluster is still a usage error."""
    import clipray.synth
    from clipray.cli import main

    class Reached(Exception):
        pass

    def generate(*a, **k):
        raise Reached

    monkeypatch.setattr(clipray.synth, "generate", generate)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(SystemExit) as e:
        main(["bench", "stream", "--workdir", str(tmp_path / "w")])
    assert e.value.code == 2 and "measures an embedded local Ray: unset RAY_ADDRESS" in capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", "local")
    with pytest.raises(Reached):  # past the check: the bench starts making its videos
        main(["bench", "stream", "--workdir", str(tmp_path / "w")])


def test_bench_startup_on_a_set_without_test_rows_says_so_before_ray_starts(tmp_path, monkeypatch, capsys):
    """It decodes the test split: a --data set without one timed 0 clips in every version and
    printed those times as figures."""
    import clipray.runtime
    from clipray.cli import main
    from clipray.synth import generate

    generate(tmp_path / "set", videos=2, seed=0, test_frac=0.0)

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(clipray.runtime, "init_ray", no_ray)
    with pytest.raises(SystemExit) as e:
        main(["bench", "startup", "--data", str(tmp_path / "set"), "--videos", "2"])
    assert e.value.code == 2  # a usage error (it was exit 1), on stderr
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("clipray bench startup: error: ") and "manifest.parquet has no 'test' rows to decode" in err


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="ru_maxrss in KiB: Linux")
def test_bench_stream_prints_the_drivers_peak_rss_not_the_resident_set_now(tmp_path, monkeypatch, capsys):
    """The line "driver peak RSS so far" printed psutil's rss, the resident set at that moment:
    memory the driver had held and given back was left out of a figure labelled peak. Here the
    manifest's writing is made to touch 384 MiB and free them, so the peak is that far above
    the resident set when the line is printed (and nothing after it allocates: Ray is faked)."""
    import re
    import resource

    import numpy as np

    import clipray.runtime
    from clipray.bench import stream as bench

    write = bench.write_big_manifest

    def write_and_give_back(*a, **k):
        out = write(*a, **k)
        big = np.ones(384 * 2**20, dtype=np.uint8)  # resident, then given back (munmap)
        del big
        return out

    def no_ray(*a, **k):
        raise RuntimeError("no Ray in this test")

    monkeypatch.setattr(bench, "write_big_manifest", write_and_give_back)
    monkeypatch.setattr(clipray.runtime, "init_ray", no_ray)
    with pytest.raises(RuntimeError, match="no Ray in this test"):
        bench.main(["--workdir", str(tmp_path / "w"), "--rows", "20", "--shard-rows", "10", "--videos", "1"])
    printed = float(re.search(r"driver peak RSS so far ([\d.]+) GiB", capsys.readouterr().out).group(1))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / bench.GIB  # KiB on Linux
    assert printed == pytest.approx(peak, abs=0.01)  # the resident set then was ~0.37 GiB less


def test_bench_data_charges_more_decoders_than_cores_for_the_cores_not_the_decoders(tmp_path, monkeypatch, capsys):
    """`--cores 3` on 2 cores (the embedded Ray has 4 CPUs, so it is accepted): run (c)'s
    frames/s were divided by 3 decoders, not by the 2 cores they shared, and its frames/s per
    core and both ratios read a third low. The loops are faked (no Ray, no decoding): only
    main's arithmetic runs. By hand: bare loop 100 frames/s on one core; (c) 300 frames/s on
    the 2 cores = 150 per core = 1.50x; (b), one decoder that used 1.2 cores: 120 / 1.2 = 1.00x."""
    import clipray.bench.data as bench
    import clipray.runtime
    import clipray.synth
    import psutil
    import ray
    from clipray.cli import main
    from clipray.manifest import write_manifest

    manifest = str(tmp_path / "m.parquet")
    write_manifest([{"video_id": "v", "path": "v.mp4", "start": 0.0, "end": 2.0, "caption": "c",
                     "split": "train"}], manifest)
    monkeypatch.setattr(bench, "usable_cores", lambda: 2)
    monkeypatch.setattr(clipray.synth, "generate", lambda *a, **k: {"manifest": manifest})
    monkeypatch.setattr(bench, "bare_loop", lambda manifest, cfg, passes: (10, 100, 1.0, 1.0, (0.0, 0.0)))
    monkeypatch.setattr(clipray.runtime, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(clipray.runtime, "quiet_data_progress", lambda: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    # nor wait for Ray's processes to exit: in the test session they are the session's Ray (30 s)
    monkeypatch.setattr(psutil, "wait_procs", lambda procs, timeout=None: (procs, []))

    def ray_pipeline(manifest, cfg, repeat, actors, pool, skip_dir, batch):
        used = {1: 1.2, 3: 1.9}[actors]
        split = {"decode workers": used, "consumer": 0.05, "Ray + system": 0.05, "idle": 0.0}
        return 10 * actors, {1: 120, 3: 300}[actors], 1.0, 1.0, split

    monkeypatch.setattr(bench, "ray_pipeline", ray_pipeline)
    assert main(["bench", "data", "--cores", "3", "--skip-real", "--pools", "tasks",
                 "--workdir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out.splitlines()
    # each pipeline row (frames/s per core, ratio), then its ratio against the mean of the two
    # (a) runs, both 100 frames/s here
    row = lambda label: [ln.split("ratio")[0].split()[-1] + " " + ln.split("ratio")[1].split()[0]  # noqa: E731
                         for ln in out if label in ln]
    assert row("(b) Ray Data, 1 decode task ") == ["100.0 1.00x", "task 1.00x"]
    assert row("(c) Ray Data, 3 decode tasks ") == ["150.0 1.50x", "tasks 1.50x"]
