"""Decoding: frame selection by hand, decord == PyAV on real H.264, every bad file a SkipClip."""

import dataclasses
import sys
import threading

import numpy as np
import pytest

from bad_videos import GatedServer, faststart_copy, plant
from clipray.config import VideoConfig
from clipray.video import (SkipClip, candidate_indices, decode_clip, decode_clip_safe, open_video, probe_duration,
                           resize_crop, select)


def test_candidate_indices_by_hand():
    # 25 fps, 10 s video, 1 fps over [2, 5): frames at t=2,3,4 -> 50, 75, 100
    assert candidate_indices(250, 25.0, 2.0, 5.0, 1.0) == [50, 75, 100]
    # whole video at 2 fps: 20 candidates, every 12.5 frames floored
    assert candidate_indices(250, 25.0, None, None, 2.0)[:4] == [0, 12, 25, 37]
    # end past the video is clamped to its length
    assert candidate_indices(250, 25.0, 8.0, 99.0, 1.0) == [200, 225]
    # NaN, as a Parquet null arrives through numpy, is an open end like None (it used to give [0])
    assert candidate_indices(250, 25.0, float("nan"), float("nan"), 2.0) == \
        candidate_indices(250, 25.0, None, None, 2.0)
    # window shorter than one step: its midpoint
    assert candidate_indices(250, 25.0, 4.0, 4.2, 1.0) == [102]
    with pytest.raises(SkipClip, match="outside video"):
        candidate_indices(250, 25.0, 12.0, 14.0, 1.0)


def test_an_empty_window_is_skipped_and_a_whole_video_keeps_its_last_frame():
    """A window with end == start holds no time (the manifest refuses end <= start): SkipClip,
    not the frame at its midpoint. A 1 s video of 10 frames sampled at 10 fps: times 0, 0.1,
    ..., 0.9 s are frames 0..9, the last frame included."""
    with pytest.raises(SkipClip, match="outside video"):
        candidate_indices(250, 25.0, 3.0, 3.0, 1.0)
    assert candidate_indices(10, 10.0, None, None, 10.0) == list(range(10))


def test_a_start_at_the_videos_end_is_a_skip_at_any_frame_rate():
    """A window starting at the video's length holds no frame of it. 120 frames at 30000/1001
    fps last 120 * 1001 / 30000 = 4.004 s exactly, and 4.004 is at that end as 10.0 is for 250
    frames at 25 fps; n / fps in floats is 4.0040000000000004, so that start got the last frame
    (119) from a window of 4e-16 s. Brute force over NTSC rates: a start of exactly n frames'
    time (k * 1001 / 30000 s, k = n) is a skip, one a frame earlier gives the last frame."""
    with pytest.raises(SkipClip, match="outside video"):
        candidate_indices(120, 30000 / 1001, 4.004, None, 1.0)
    with pytest.raises(SkipClip, match="outside video"):
        candidate_indices(250, 25.0, 10.0, None, 1.0)
    for num, den in ((30000, 1001), (24000, 1001), (60000, 1001)):
        for n in range(1, 400):
            end = n * den / num  # the length, as a manifest's decimal seconds round it to a float
            with pytest.raises(SkipClip, match="outside video"):
                candidate_indices(n, num / den, end, None, 1.0)
            with pytest.raises(SkipClip, match="outside video"):
                candidate_indices(n, num / den, end, end + 3.0, 1.0)
            assert candidate_indices(n, num / den, (n - 1) * den / num, None, 1.0) == [n - 1]


def test_candidate_times_are_those_before_the_windows_end_in_exact_arithmetic():
    """Times start + k / fps before end, as exact fractions of the decimal bounds a manifest
    holds, and the frame shown at each: np.arange counted the float error of end - start, so
    [1.3, 8.3] at 1 fps got 8 frames, one at its end, where [1.0, 8.0] got 7, and [0.4, 1.4]
    was taken as shorter than a step (one frame at its midpoint, 0.9 s)."""
    import math
    from fractions import Fraction

    def brute(n, video_fps, start, end, fps):
        vf, lo, step = Fraction(video_fps).limit_denominator(10**5), Fraction(start), 1 / Fraction(fps)
        hi = min(Fraction(end), n / vf)
        times = [lo + k * step for k in range(int((hi - lo) / step) + 1) if lo + k * step < hi]
        return sorted({min(n - 1, math.floor(t * vf)) for t in (times if hi - lo >= step else [(lo + hi) / 2])})

    assert candidate_indices(500, 25.0, 1.3, 8.3, 1.0) == [32, 57, 82, 107, 132, 157, 182]
    assert candidate_indices(500, 25.0, 0.4, 1.4, 1.0) == [10]
    for video_fps in (25.0, 30000 / 1001, 60.0):
        for fps in (1.0, 2.0, 2.5, 0.5):
            for a in range(0, 60, 3):
                for b in range(a + 1, a + 80, 2):
                    got = candidate_indices(int(20 * video_fps), video_fps, a / 10, b / 10, fps)
                    want = brute(int(20 * video_fps), video_fps, Fraction(a, 10), Fraction(b, 10), fps)
                    assert got == want, (video_fps, fps, a / 10, b / 10)


def test_select_head_tail_uniform():
    idx = list(range(0, 100, 10))  # 10 candidates
    assert select(idx, 4, "head") == [0, 10, 20, 30]
    assert select(idx, 4, "tail") == [60, 70, 80, 90]
    assert select(idx, 4, "uniform") == [0, 30, 60, 90]  # linspace(0, 9, 4) = 0, 3, 6, 9
    assert select(idx, 12, "uniform") == idx
    # CLIP4Clip's uniform pick rounds each linspace position down (np.linspace(..., dtype=int)):
    # 20 candidates to 12 are positions 0, 1.73, 3.45, 5.18, ... -> 0, 1, 3, 5, ..., not 0, 2, 3, 5
    assert select(list(range(20)), 12, "uniform") == [0, 1, 3, 5, 6, 8, 10, 12, 13, 15, 17, 19]
    assert select(list(range(31)), 23, "uniform")[11] == 15  # 11 * 30 / 22 = 15 exactly
    assert select(idx, 1, "uniform") == [0]
    for n in range(2, 120):  # brute force: the largest index i with i <= k (n - 1) / (m - 1)
        for m in range(2, n):
            assert select(list(range(n)), m, "uniform") == \
                [max(i for i in range(n) if i * (m - 1) <= k * (n - 1)) for k in range(m)]
    with pytest.raises(ValueError):
        select(idx, 4, "middle")


def test_decord_and_pyav_agree_on_real_h264(real_video):
    cfg = VideoConfig(fps=1.5, max_frames=6, size=96)
    a = decode_clip(str(real_video), 1.0, 8.0, cfg)
    b = decode_clip(str(real_video), 1.0, 8.0, VideoConfig(**{**cfg.__dict__, "backend": "pyav"}))
    # 11 candidates at t=1, 1.67, ..., 7.67 s; uniform picks 0,2,4,6,8,10 of them
    assert a.indices == b.indices == [25, 58, 91, 125, 158, 191]
    assert a.mask.tolist() == [1] * 6
    diff = np.abs(a.frames.astype(int) - b.frames.astype(int))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 12
    assert a.frames.std() > 20  # real content, not a blank frame


def test_the_decord_backend_reads_with_pyav_where_decord_does_not_import(real_video, monkeypatch, caplog):
    """decord has no wheel for ARM (Apple Silicon, aarch64 Linux). There every clip of the default
    backend was a skip ('decode failed: ModuleNotFoundError'), and probe_duration a traceback."""
    import clipray.video as video

    cfg = VideoConfig(fps=1.5, max_frames=6, size=96)
    want = decode_clip(str(real_video), 1.0, 8.0, VideoConfig(**{**cfg.__dict__, "backend": "pyav"}))
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` raises ImportError
    monkeypatch.setattr(video, "_decord_missing", None, raising=False)
    with caplog.at_level("WARNING", logger="clipray.video"):
        got = decode_clip_safe(str(real_video), 1.0, 8.0, cfg)
        assert video.probe_duration(str(real_video)) == 10.0  # 250 frames at 25 fps
    assert got.indices == want.indices == [25, 58, 91, 125, 158, 191]
    assert np.array_equal(got.frames, want.frames)
    said = [r.getMessage() for r in caplog.records if r.name == "clipray.video"]
    assert len(said) == 1 and "pip install decord" in said[0]  # once per process


def _numbered_video(path, n: int, fmt: str | None = None, size: tuple[int, int] = (64, 48), bframes: int = 2) -> None:
    """H.264 (lossless, `bframes` B-frames, a keyframe every 12) whose frame i shows i: the left half
    is grey (i // 16) * 16 + 8, the right half (i % 16) * 16 + 8. MPEG-PS (fmt "mpeg") gets
    MPEG-2 (B-frames, a keyframe every 12) in 64-byte packets: each of these small frames then
    starts a PES packet of its own and keeps its timestamp, as real frames, larger, do."""
    import av

    mpeg, (w, h) = fmt == "mpeg", size
    with av.open(str(path), "w", format=fmt, options={"packetsize": "64"} if mpeg else {}) as c:
        s = c.add_stream("mpeg2video" if mpeg else "libx264", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"bf": "2", "g": "12", "b": "2M"} if mpeg else {"crf": "0", "bf": str(bframes), "g": "12"}
        for i in range(n):
            img = np.empty((h, w, 3), np.uint8)
            img[:, :w // 2], img[:, w // 2:] = (i // 16) * 16 + 8, (i % 16) * 16 + 8
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())


def _shown(frames: np.ndarray) -> list[int]:
    """The numbers `_numbered_video` drew on decoded frames [n, 3, 32, 32]."""
    left, right = np.median(frames[:, :, 8:24, 2:12], axis=(1, 2, 3)), np.median(frames[:, :, 8:24, 20:30], axis=(1, 2, 3))
    return [int(a // 16) * 16 + int(b // 16) for a, b in zip(left, right)]


@pytest.mark.parametrize("ext, fmt", [("mp4", None), ("avi", None), ("ts", "mpegts"), ("flv", None),
                                      ("mkv", None), ("mpg", "mpeg")])
def test_pyav_decodes_the_frame_at_each_index_in_any_container(tmp_path, ext, fmt):
    """The PyAV fallback returns frame i for index i: in AVI, where H.264's stream start_time
    is a frame before the first frame's; in MPEG-TS and FLV, where a seek can land after the
    wanted frame (or, at the last frame, on none), which once gave a later frame or a skip.
    In MPEG-PS the retry's seek to the first frame's time landed past it too, which gave
    frame 3 for frame 6 here (or a skip): the retry now seeks to the start of the file."""
    path = tmp_path / f"numbered.{ext}"
    _numbered_video(path, 100, fmt)
    for (start, end), fps, n, how in [((1.4, 2.9), 7.0, 3, "head"), ((0.0, None), 1.0, 3, "tail"),
                                      ((2.0, 2.04), 1.0, 4, "uniform"), ((3.99, 4.0), 1.0, 4, "uniform"),
                                      ((0.0, 0.5), 1.0, 4, "uniform"), ((0.5, 3.5), 2.5, 12, "uniform")]:
        cfg = VideoConfig(backend="pyav", fps=fps, max_frames=n, slice=how, size=32, timeout_s=0)
        clip = decode_clip(str(path), start, end, cfg)
        assert clip.indices == select(candidate_indices(100, 25.0, start, end, fps), n, how)
        assert _shown(clip.frames[:len(clip.indices)]) == clip.indices, (start, end)


@pytest.mark.parametrize("ext, fmt", [("mpg", "mpeg"), ("mp4", None), ("avi", None), ("ts", "mpegts"),
                                      ("flv", None), ("mkv", None)])
def test_pyav_counts_every_frame(tmp_path, ext, fmt):
    """MPEG-PS stores no frame count, and the duration libavformat estimates from the last
    timestamps in the file came out 2 frames short of this 100-frame file: the last two frames
    could never be sampled. Every container counts all 100, and the last frames are the ones
    decoded."""
    path = tmp_path / f"numbered.{ext}"
    _numbered_video(path, 100, fmt)
    assert open_video(str(path), "pyav").num_frames == 100
    clip = decode_clip(str(path), 3.88, None, VideoConfig(backend="pyav", fps=25.0, max_frames=4, size=32, timeout_s=0))
    assert clip.indices == [97, 98, 99] and _shown(clip.frames[:3]) == [97, 98, 99]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_a_video_too_short_for_an_average_rate_is_read_at_its_own_frame_rate(tmp_path, backend):
    """A 1-frame MPEG-TS and a 2-frame MPEG-PS at 25 fps have no average rate (too few times),
    and libavformat's guess is 50 (H.264's and MPEG-2's field rate): the 2-frame video lasted
    0.04 s, index 1 (0.02 s) gave frame 0 and frame 1 could never be sampled; the 1-frame video
    lasted 0.02 s, and [0.03, 1.0] was a skip. By hand at 25 fps: 0.08 s and 0.04 s long; all
    frames at 25 fps are [0, 1] and [0]; at 1 fps a window shorter than a step is its midpoint,
    0.04 s (frame 1) and 0.035 s (frame 0). decord opens neither: both backends read them with PyAV."""
    ps, ts = tmp_path / "two.mpg", tmp_path / "one.ts"
    _numbered_video(ps, 2, "mpeg")
    _numbered_video(ts, 1, "mpegts")
    for path, n, start, end, want in ((ps, 2, None, None, [0, 1]), (ts, 1, None, None, [0]),
                                      (ps, 2, 0.0, 1.0, [1]), (ts, 1, 0.03, 1.0, [0])):
        video = open_video(str(path), backend)
        assert (video.num_frames, video.fps) == (n, 25.0)
        fps = 25.0 if end is None else 1.0
        clip = decode_clip(str(path), start, end, VideoConfig(backend=backend, fps=fps, max_frames=4, size=32, timeout_s=0))
        assert clip.indices == _shown(clip.frames[:len(clip.indices)]) == want, (path.name, start)
        assert clip.mask.tolist() == [1] * len(want) + [0] * (4 - len(want))


def _cut_without_reencoding(src, dst, hidden: int) -> None:
    """What `ffmpeg -ss T -c copy` writes: the same packets, the first `hidden` frames at
    negative times, which the MP4 muxer hides behind an edit list."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        shift = int(round(hidden / 25 / s_in.time_base))
        for p in inp.demux(s_in):
            if p.dts is None:  # the demuxer's end-of-stream packet
                continue
            p.pts, p.dts, p.stream = p.pts - shift, p.dts - shift, s_out
            out.mux(p)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_an_mp4_cut_without_reencoding_gives_the_frames_it_shows(tmp_path, backend):
    """An edit list hides 18 frames (the cut is at 18, after the keyframe at 12): the video has
    82 frames, and frame i of it shows frame i + 18 of the original. decord counted 84 (the
    hidden frames at -0.08 and -0.04 s) and, after a seek, numbered from them: index 40 gave
    frame 38, while index 0, read from the start, gave frame 0. PyAV counted all 100."""
    _numbered_video(tmp_path / "whole.mp4", 100)
    path = tmp_path / "cut.mp4"
    _cut_without_reencoding(tmp_path / "whole.mp4", path, hidden=18)
    assert open_video(str(path), backend).num_frames == 82
    for (start, end), fps, n, how in [((1.4, 2.9), 7.0, 3, "head"), ((0.0, None), 1.0, 3, "tail"),
                                      ((2.0, 2.04), 1.0, 4, "uniform"), ((0.0, 0.5), 1.0, 4, "uniform"),
                                      ((0.5, 3.28), 2.5, 12, "uniform")]:
        cfg = VideoConfig(backend=backend, fps=fps, max_frames=n, slice=how, size=32, timeout_s=0)
        clip = decode_clip(str(path), start, end, cfg)
        assert clip.indices == select(candidate_indices(82, 25.0, start, end, fps), n, how)
        assert _shown(clip.frames[:len(clip.indices)]) == [i + 18 for i in clip.indices], (start, end)


def _edited_mp4(path, edits: list[tuple[float, float]]) -> None:
    """`_numbered_video`'s 100 frames (no B-frames) in an MP4 whose edit list shows the media
    spans `edits` ((start, seconds) each), one after another, as a trim or a cut of the middle
    without re-encoding writes them."""
    import struct

    import av

    _numbered_video(path, 100, bframes=0)
    with av.open(str(path)) as c:
        media = c.streams.video[0].time_base.denominator  # elst's media times count in it
    b = bytearray(path.read_bytes())
    movie = struct.unpack(">I", b[b.index(b"mvhd") + 16:][:4])[0]  # version 0: its durations' scale
    new = struct.pack(">I4sII", 16 + 12 * len(edits), b"elst", 0, len(edits)) + b"".join(
        struct.pack(">IiI", round(n * movie), round(t * media), 1 << 16) for t, n in edits)
    at = b.index(b"elst") - 4
    old = struct.unpack(">I", b[at:at + 4])[0]
    for box in (b"moov", b"trak", b"edts"):  # the boxes around it grow with it (moov is last)
        k = b.index(box) - 4
        struct.pack_into(">I", b, k, struct.unpack(">I", b[k:k + 4])[0] + len(new) - old)
    b[at:at + old] = new
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_an_mp4_edit_list_that_ends_early_or_cuts_the_middle_gives_the_frames_players_show(tmp_path, backend):
    """A trim of the end without re-encoding (a phone's) leaves every frame in the file and an
    edit list that shows the first 3 s; a cut of the middle shows media 0-1 s, then 2.4-3.4 s.
    decord numbered every frame the file holds: 81 frames where players show 75, frames past
    the end given as real and a window after it decoded, and frame 16 at 1.0 s where players
    show 60. Such files are read with PyAV, which follows the edits."""
    trimmed, cut = tmp_path / "trimmed.mp4", tmp_path / "cut.mp4"
    _edited_mp4(trimmed, [(0.0, 3.0)])
    _edited_mp4(cut, [(0.0, 1.0), (2.4, 1.0)])
    for path, n, shown in ((trimmed, 75, lambda i: i), (cut, 50, lambda i: i if i < 25 else i + 35)):
        assert open_video(str(path), backend).num_frames == n
        for (start, end), fps, k, how in [((0.0, None), 5.0, 12, "uniform"), ((0.5, 1.9), 7.0, 4, "head")]:
            cfg = VideoConfig(backend=backend, fps=fps, max_frames=k, slice=how, size=32, timeout_s=0)
            clip = decode_clip(str(path), start, end, cfg)
            assert clip.indices == select(candidate_indices(n, 25.0, start, end, fps), k, how)
            assert _shown(clip.frames[:len(clip.indices)]) == [shown(i) for i in clip.indices], (path.name, start)
    with pytest.raises(SkipClip, match=r"outside video of 3\.00s"):
        decode_clip_safe(str(trimmed), 3.05, 3.2, VideoConfig(backend=backend, fps=1.0, max_frames=4, size=32))


def test_padding_and_crop(real_video):
    cfg = VideoConfig(fps=1.0, max_frames=8, size=64)
    c = decode_clip(str(real_video), 2.0, 5.0, cfg)  # 3 candidates -> 3 real + 5 padded
    assert c.frames.shape == (8, 3, 64, 64) and c.frames.dtype == np.uint8
    assert c.mask.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert not c.frames[3:].any() and c.frames[:3].any()


@pytest.mark.parametrize("shape", [(12, 72, 96), (1, 96, 72), (3, 50, 50), (2, 224, 300), (2, 301, 224),
                                   (2, 224, 224), (4, 360, 640), (2, 17, 400)])
@pytest.mark.parametrize("size", [224, 33])
def test_resize_crop_is_torchvisions_resize_and_centre_crop(shape, size):
    """The decoders resize with torch alone (importing torchvision slowed every decode actor's
    start-up); the pixels must stay those of torchvision's bicubic antialiased `resize` and
    `center_crop`, which trained models saw: landscape, portrait, square, already the size,
    odd crops and a single frame."""
    import torch
    import torchvision.transforms.v2.functional as TF

    frames = np.random.default_rng(sum(shape) + size).integers(0, 256, (*shape, 3), dtype=np.uint8)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    want = TF.center_crop(TF.resize(x, [size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True), [size, size])
    got = resize_crop(frames, size)
    assert got.shape == (shape[0], 3, size, size) and got.dtype == torch.uint8
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_frames_of_an_extreme_aspect_ratio_are_a_skip(tmp_path, backend):
    """Frames are resized whole before their centre square is cut: 1024:1 frames (16384x16)
    took 2.5 GB for one clip. Past MAX_ASPECT:1 a clip is a skip that says why; 64:1 still reads."""
    import av

    from clipray.video import MAX_ASPECT

    cfg = VideoConfig(backend=backend, fps=2.0, max_frames=4, size=32, timeout_s=20)
    for w, h in ((2048, 16), (16, 1040), (1024, 16)):
        path = tmp_path / f"{w}x{h}.mp4"
        with av.open(str(path), "w") as c:
            s = c.add_stream("libx264", rate=10)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            for i in range(10):
                img = np.full((h, w, 3), 20 * i, np.uint8)
                c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            c.mux(s.encode())
        if max(w, h) > MAX_ASPECT * min(w, h):
            with pytest.raises(SkipClip) as e:
                decode_clip_safe(str(path), None, None, cfg)
            assert e.value.reason == f"frames {w}x{h}: one side over 64 times the other, no picture to take a centre square of"
        else:
            assert decode_clip_safe(str(path), None, None, cfg).mask.tolist() == [1, 1, 0, 0]


def test_decode_into_a_batch_row(real_video):
    # the pipeline decodes each clip into its row of an uninitialised batch array: the row must
    # end up exactly as a fresh decode, padding zeroed, neighbouring rows untouched
    cfg = VideoConfig(fps=1.0, max_frames=8, size=64)
    ref = decode_clip(str(real_video), 2.0, 5.0, cfg)  # 3 real frames + 5 padded
    batch = np.full((3, 8, 3, 64, 64), 255, dtype=np.uint8)
    for decode in (decode_clip, decode_clip_safe):
        c = decode(str(real_video), 2.0, 5.0, cfg, out=batch[1])
        assert np.shares_memory(c.frames, batch[1])
        assert np.array_equal(batch[1], ref.frames) and c.mask.tolist() == ref.mask.tolist()
        assert (batch[0] == 255).all() and (batch[2] == 255).all()
        batch[1] = 255


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_a_video_whose_picture_size_changes_midway_decodes_at_one_size(tmp_path, backend):
    """An MPEG-2 transport stream going from 64x48 to 128x96 after 16 frames (a broadcast
    recording at an ad break): PyAV gave frames of both sizes, and every clip across the change
    was skipped ("all input arrays must have the same shape"; decord hands MPEG-2 to PyAV).
    Frame k is one grey, 7k mod 256, so each decoded frame is checked by hand."""
    from fractions import Fraction

    import av

    path = tmp_path / "resize.ts"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg2video", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        k = 0
        for w, h in ((64, 48), (128, 96)):
            enc = av.CodecContext.create("mpeg2video", "w")
            enc.width, enc.height, enc.pix_fmt, enc.time_base = w, h, "yuv420p", Fraction(1, 25)
            enc.options = {"g": "8", "bf": "0", "qmin": "1", "qmax": "2"}  # near-lossless greys
            packets = []
            for i in range(16):
                f = av.VideoFrame.from_ndarray(np.full((h, w, 3), (k + i) * 7 % 256, np.uint8), format="rgb24")
                f = f.reformat(format="yuv420p")
                f.pts, f.time_base = i, Fraction(1, 25)
                packets += enc.encode(f)
            for p in packets + enc.encode(None):
                p.stream, p.pts, p.dts, p.time_base = stream, k, k, Fraction(1, 25)
                out.mux(p)
                k += 1
    cfg = VideoConfig(backend=backend, fps=25.0, max_frames=32, size=32)
    for start, end, first in ((None, None, 0), (0.4, 0.9, 10)):  # across the change
        clip = decode_clip_safe(str(path), start, end, cfg)
        n = int(clip.mask.sum())
        assert clip.indices[0] == first and 16 in clip.indices
        for frame, i in zip(clip.frames[:n], clip.indices):
            # FFmpeg's MPEG-2 decoder drops the last frame before the new size: slot 15 shows
            # frame 14, as a frame shows until the next one
            assert abs(frame.astype(int) - (14 if i == 15 else i) * 7 % 256).max() <= 3, i


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_every_bad_file_is_a_skip_with_reason(tmp_path, real_video, backend):
    bad = plant(real_video, tmp_path)
    cfg = VideoConfig(backend=backend, fps=1.0, max_frames=4, size=32, timeout_s=20)
    reasons = {}
    for kind, path in bad.items():
        with pytest.raises(SkipClip) as e:
            decode_clip_safe(str(path), None, None, cfg)
        reasons[kind] = e.value.reason
    assert reasons["missing"] == "missing file"
    assert reasons["empty"] == "empty file"
    for kind in ("truncated", "corrupt", "not_video"):
        assert reasons[kind].startswith("not a decodable video"), (kind, reasons[kind])
    assert reasons["truncated_faststart"].startswith(("decode failed", "not a decodable")), reasons
    # cut inside its index (moov, at the end): FFmpeg opens it with no stream at all, which was
    # said as "no video stream", an audio file's reason
    data = real_video.read_bytes()
    (tmp_path / "cut_index.mp4").write_bytes(data[: data.rindex(b"moov") + 40])
    with pytest.raises(SkipClip, match=r"^not a decodable video: no stream found \(a truncated file"):
        decode_clip_safe(str(tmp_path / "cut_index.mp4"), None, None, cfg)
    with pytest.raises(SkipClip, match="outside video"):
        decode_clip_safe(str(real_video), 30.0, 40.0, cfg)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_still_image_named_as_video_is_a_skip(tmp_path, real_video, backend):
    """A PNG or JPEG saved under a video's name opened as a one-frame video of 25 fps (FFmpeg's
    image demuxers) and was trained on and indexed; it is a skip that says what it is."""
    from PIL import Image

    cfg = VideoConfig(backend=backend, fps=1.0, max_frames=4, size=32, timeout_s=20)
    pixels = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    for fmt, name in (("PNG", "png"), ("JPEG", "jpeg")):
        path = tmp_path / f"thumb_{name}.mp4"
        Image.fromarray(pixels).save(path, format=fmt)
        with pytest.raises(SkipClip) as e:
            decode_clip_safe(str(path), None, None, cfg)
        assert e.value.reason == f"not a video: a still image ({name})"
    assert decode_clip_safe(str(real_video), 0.0, 2.0, cfg).mask.sum() == 2  # a video still reads


def test_hanging_source_times_out(real_video):
    server = GatedServer(real_video.read_bytes())  # never opened: the read hangs
    try:
        with pytest.raises(SkipClip, match="timed out after 1.5s"):
            decode_clip_safe(server.url, None, None, VideoConfig(timeout_s=1.5))
    finally:
        server.close()


def test_decode_given_up_never_writes_its_row(real_video):
    # a decode that outlives its timeout finishes later, in its own thread, when the caller has
    # given the clip's batch row to the next clip: its late frames must not land there
    cfg = VideoConfig(fps=1.0, max_frames=8, size=64, timeout_s=1.0)
    ref = decode_clip(str(real_video), 2.0, 5.0, cfg)
    server = GatedServer(real_video.read_bytes())
    try:
        row = np.full((8, 3, 64, 64), 255, dtype=np.uint8)
        before = set(threading.enumerate())
        with pytest.raises(SkipClip, match="timed out after 1s"):
            decode_clip_safe(server.url, 2.0, 5.0, cfg, out=row)
        (late,) = [t for t in threading.enumerate() if t.name == "clipray-decode" and t not in before]
        server.open()  # the given-up decode now reads the file and finishes
        late.join(timeout=60)
        assert not late.is_alive()
        assert (row == 255).all()
        # waited for, the same request decodes into the row exactly as the local file does: the
        # late decode above did all of this work too, short of the write
        c = decode_clip_safe(server.url, 2.0, 5.0, VideoConfig(fps=1.0, max_frames=8, size=64), out=row)
        assert np.array_equal(row, ref.frames) and c.mask.tolist() == ref.mask.tolist()
    finally:
        server.close()


def _quadrants(h: int, w: int) -> np.ndarray:
    """A picture whose orientation shows: four flat quadrants, red, green, blue and white."""
    img = np.empty((h, w, 3), np.uint8)
    img[:h // 2, :w // 2], img[:h // 2, w // 2:] = (220, 30, 30), (30, 220, 30)
    img[h // 2:, :w // 2], img[h // 2:, w // 2:] = (30, 30, 220), (230, 230, 230)
    return img


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_a_rotated_phone_video_comes_back_as_players_show_it(tmp_path, backend, degrees, ext):
    """Phones store a portrait video landscape with a display matrix that says to turn it.
    decord turns the frames; PyAV's to_ndarray did not, so the pyav backend, and the decord
    backend's own hand-over to PyAV (an MP4 cut without re-encoding), gave sideways frames:
    the two backends disagreed on the same file. In an MKV (a phone video remuxed by FFmpeg 7,
    which keeps the rotation there) decord does not turn them, and the decord backend gave them
    as stored: such files are read with PyAV."""
    import av

    img, path = _quadrants(96, 128), tmp_path / f"rotated{degrees}.{ext}"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt, s.options = 128, 96, "yuv444p", {"crf": "0"}
        s.set_display_rotation(degrees)  # counterclockwise, as np.rot90 turns
        for _ in range(5):
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    want = np.rot90(img, degrees // 90)
    got = open_video(str(path), backend).get([0, 3])
    assert got.shape == (2, *want.shape)
    assert np.abs(got.astype(int) - want).max() <= 3
    clip = decode_clip(str(path), None, None, VideoConfig(backend=backend, fps=25.0, max_frames=2, size=32, timeout_s=0))
    want_clip = resize_crop(np.stack([want] * 2), 32).numpy()
    assert np.abs(clip.frames.astype(int) - want_clip).max() <= 3


@pytest.mark.parametrize("reader", [("mp4", "pyav"), ("mkv", "pyav"), ("mkv", "decord")], ids="-".join)
@pytest.mark.parametrize("flip", ["left-right", "top-bottom", "mirrored quarter turn"])
def test_a_mirrored_video_comes_back_mirrored_not_turned(tmp_path, reader, flip):
    """An editor's mirror is a display matrix with a flip. PyAV's frame.rotation reads a
    left-right mirror as a 180-degree turn and a top-bottom one as no turn at all, so frames
    came back upside down, or not mirrored. The matrix itself says where each pixel goes.
    (The decord backend's own reading of an MP4's matrix has the same fault and stays: finding
    the matrix costs a decoded frame per file, see clipray/video.py.)"""
    import av

    one = 1 << 16  # the display matrix is 16.16 fixed point, its last entry 2.30
    matrix, want_of = {"left-right": ([-one, 0, 0, 0, one, 0, 0, 0, 1 << 30], lambda im: im[:, ::-1]),
                       "top-bottom": ([one, 0, 0, 0, -one, 0, 0, 0, 1 << 30], lambda im: im[::-1]),
                       "mirrored quarter turn": ([0, one, 0, one, 0, 0, 0, 0, 1 << 30], lambda im: im.swapaxes(0, 1)),
                       }[flip]
    ext, backend = reader
    img, path = _quadrants(96, 128), tmp_path / f"mirror.{ext}"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt, s.options = 128, 96, "yuv444p", {"crf": "0"}
        s.set_display_matrix(matrix)
        for _ in range(3):
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    want = want_of(img)
    got = open_video(str(path), backend).get([0, 2])
    assert got.shape == (2, *want.shape)
    assert np.abs(got.astype(int) - want).max() <= 3


@pytest.mark.parametrize("ext", ["webm", "mp4"])
@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_av1_decodes_with_either_backend(tmp_path, ext, backend):
    """YouTube serves AV1 (in WebM and MP4), so re-downloaded ActivityNet or HowTo100M videos
    are often AV1. decord 0.6's FFmpeg has no AV1 decoder: it found 'no video stream' and the
    decord backend skipped every such file. It now reads them with PyAV, frame i for index i."""
    import av

    if "libsvtav1" not in av.codecs_available:
        pytest.skip("this PyAV build cannot write AV1")
    path = tmp_path / f"av1.{ext}"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libsvtav1", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.options = {"crf": "10", "g": "12", "svtav1-params": "log-level=0"}
        for i in range(60):
            img = np.empty((48, 64, 3), np.uint8)
            img[:, :32], img[:, 32:] = (i // 16) * 16 + 8, (i % 16) * 16 + 8
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    assert open_video(str(path), backend).num_frames == 60
    cfg = VideoConfig(backend=backend, fps=4.0, max_frames=6, size=32, timeout_s=0)
    clip = decode_clip(str(path), 0.5, 2.0, cfg)
    assert clip.indices == [12, 18, 25, 31, 37, 43] and _shown(clip.frames) == clip.indices


@pytest.mark.parametrize("cover", [False, True])
@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_an_audio_file_is_a_skip_that_says_so(tmp_path, backend, cover):
    """An audio-only file named like a video (a download that kept only the audio) is a skip
    saying so; the reasons were decord's 'Check failed: st_nb >= 0 ... cannot find video stream
    with wanted index: -1' and PyAV's 'IndexError: tuple index out of range'. With its cover
    picture (an attached_pic stream, as a download with its thumbnail embedded) it said 'decode
    failed: the stream holds no frame'."""
    import av

    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=44100)
        if cover:
            pic = c.add_stream("mjpeg", rate=1)
            pic.width, pic.height, pic.pix_fmt, pic.disposition = 64, 48, "yuvj420p", av.stream.Disposition.attached_pic
            c.mux(pic.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 200, np.uint8), format="rgb24")))
            c.mux(pic.encode())
        for k in range(40):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 44100, k * 1024
            c.mux(s.encode(f))
        c.mux(s.encode())
    with pytest.raises(SkipClip) as e:
        decode_clip_safe(str(path), None, None, VideoConfig(backend=backend, timeout_s=20))
    assert e.value.reason == "no video stream"


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_a_raw_h264_stream_is_a_skip_that_says_to_remux_it(tmp_path, backend):
    """A camera's raw .h264 (an elementary stream, no container) holds frames but no time for
    any of them. The skip said 'video reports no frames', as if the file were empty."""
    import av

    path = tmp_path / "camera.h264"
    with av.open(str(path), "w", format="h264") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")))
        c.mux(s.encode())
    with pytest.raises(SkipClip) as e:
        decode_clip_safe(str(path), None, None, VideoConfig(backend=backend, timeout_s=20))
    assert e.value.reason.startswith("a raw h264 stream, no container to time its frames: remux it")


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_an_mp4_cut_where_a_frame_ends_gives_no_frame_past_the_cut(tmp_path, backend):
    """A faststart MP4 (header first) of 100 numbered frames (4 s), cut where frame packet 50
    ends: its header still lists 100 frames. PyAV decoded up to the cut and gave its last frame
    for every index past it: a whole-video clip at 2 fps came back as frames 0, 12, 25, 37, 50,
    50, 50, 50, with no error. Now a clip that runs past the cut is a skip saying so, and one
    inside what the file holds decodes right. (decord counts the frames it finds: it samples
    the 2 s left.)"""
    import av

    _numbered_video(tmp_path / "n.mp4", 100)
    whole = faststart_copy(tmp_path / "n.mp4", tmp_path / "fs.mp4").read_bytes()
    with av.open(str(tmp_path / "fs.mp4")) as c:
        cut = sorted(p.pos + p.size for p in c.demux(c.streams.video[0]) if p.size)[50]
    (tmp_path / "cut.mp4").write_bytes(whole[:cut])
    cfg = VideoConfig(backend=backend, fps=2.0, max_frames=24, size=32, timeout_s=0)
    if backend == "pyav":
        with pytest.raises(SkipClip, match=r"^truncated: the video stops at 2\.04 s of the 4\.00 s it reports$"):
            decode_clip(str(tmp_path / "cut.mp4"), None, None, cfg)
    else:
        clip = decode_clip(str(tmp_path / "cut.mp4"), None, None, cfg)
        assert clip.indices == _shown(clip.frames[:len(clip.indices)]) == [0, 12, 25, 37, 50]
    clip = decode_clip(str(tmp_path / "cut.mp4"), 0.0, 1.5, cfg)
    assert clip.indices == _shown(clip.frames[:len(clip.indices)]) == [0, 12, 25]


@pytest.mark.parametrize("ext", ["mkv", "mp4"])
@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_a_variable_frame_rate_gives_the_frames_shown_at_the_sampled_times(tmp_path, ext, backend):
    """2 s at 25 fps, 2 s at 5 fps (a phone or screen recording that slows while the picture
    is still), 2 s at 25 fps: 110 frames over 6 s. decord numbers frames by their order, so
    index i was not the frame shown at i / fps: in the MKV (fps 25) the 1.6 s after frame 110's
    place were cut off and [4, 5) gave frames 100 and 106 for 60, 66, 72, 78; in the MP4 (its
    average, 18.3 fps) [0.5, 1.5) gave 9, 13, 18, 22. PyAV found frames by time but filled the
    gaps of the slow part with the previous wanted frame (50, 50, 50, 50 for 50, 51, 52, 53)."""
    import av
    from fractions import Fraction

    times = [k / 25 for k in range(50)] + [2 + k / 5 for k in range(10)] + [4 + k / 25 for k in range(50)]
    path = tmp_path / f"vfr.{ext}"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt, s.time_base = 64, 48, "yuv420p", Fraction(1, 100)
        s.options = {"crf": "0", "bf": "2", "g": "12"}
        for i, t in enumerate(times):
            img = np.empty((48, 64, 3), np.uint8)
            img[:, :32], img[:, 32:] = (i // 16) * 16 + 8, (i % 16) * 16 + 8
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = round(t * 100), Fraction(1, 100)
            c.mux(s.encode(f))
        c.mux(s.encode())
    video = open_video(str(path), backend)
    assert abs(video.num_frames / video.fps - 6.0) < 0.05  # the whole 6 s can be sampled

    def shown_at(t):  # the frame a player shows at time t
        return max(i for i, x in enumerate(times) if x <= t + 1e-6)

    for (start, end) in [(0.5, 1.5), (2.0, 4.0), (4.0, 5.0), (5.0, None)]:
        cfg = VideoConfig(backend=backend, fps=4.0, max_frames=8, size=32, timeout_s=0)
        clip = decode_clip(str(path), start, end, cfg)
        assert len(clip.indices) == 8 if (start, end) == (2.0, 4.0) else 4
        got, fps = _shown(clip.frames[:len(clip.indices)]), video.fps
        # frames are found by time rounded to the index grid: in the MP4, a grid of its average
        # rate, the frame shown within half a step of i / fps; in the MKV (25), exactly at it
        assert all(shown_at((i - 0.5) / fps) <= g <= shown_at((i + 0.5) / fps) for i, g in zip(clip.indices, got))
        if ext == "mkv":
            assert got == [shown_at(i / fps) for i in clip.indices], (start, end)


def _tens(i: int) -> np.ndarray:
    """Frame i of a 128x96 video for lossy codecs: the left half shows i // 10, the right i % 10,
    as greys 25 apart."""
    img = np.empty((96, 128, 3), np.uint8)
    img[:, :64], img[:, 64:] = (i // 10) * 25 + 12, (i % 10) * 25 + 12
    return img


def _tens_shown(frames: np.ndarray) -> list[int]:
    left, right = np.median(frames[:, :, 8:24, 2:12], axis=(1, 2, 3)), np.median(frames[:, :, 8:24, 20:30], axis=(1, 2, 3))
    return [int(a // 25) * 10 + int(b // 25) for a, b in zip(left, right)]


@pytest.mark.parametrize("name, codec, fmt, options", [
    ("hevc.mp4", "libx265", None, {"x265-params": "lossless=1:bframes=3:keyint=12:log-level=none"}),
    ("hevc.mkv", "libx265", None, {"x265-params": "lossless=1:bframes=3:keyint=12:log-level=none"}),
    ("mpeg2.ts", "mpeg2video", "mpegts", {"qscale": "2", "bf": "2", "g": "12"}),
    ("mpeg2.mkv", "mpeg2video", None, {"qscale": "2", "bf": "2", "g": "12"}),
    ("mpeg4.mp4", "mpeg4", None, {"qscale": "2", "bf": "2", "g": "12"}),
    ("mpeg4.mov", "mpeg4", "mov", {"qscale": "2", "bf": "2", "g": "12"}),
    ("wmv2.wmv", "wmv2", "asf", {"qscale": "2", "g": "12"}),
    # H.264 with periodic intra refresh: keyframes that are recovery points, after which FFmpeg
    # drops frames until the picture is whole; decord gave frame 23 for index 12 at 320x240
    ("intra-refresh.mp4", "libx264", None, {"crf": "18", "bf": "0", "x264-params": "intra-refresh=1:keyint=12:scenecut=0"}),
    ("intra-refresh.mkv", "libx264", None, {"crf": "18", "bf": "0", "x264-params": "intra-refresh=1:keyint=12:scenecut=0"}),
])
def test_decord_backend_gives_frame_i_for_open_gop_codecs(tmp_path, name, codec, fmt, options):
    """decord counts frames from the keyframe it seeks to; in an open GOP (x265's default, MPEG-2,
    MPEG-4 Part 2 with B-frames) the frames after a keyframe that refer to the GOP before it are
    dropped there, so index 35 gave frame 24 (HEVC in MKV), 37 (MPEG-4 in MP4) or 40 (MPEG-2
    in TS), silently; WMV gave frame 0 for every index. Such files are now read with PyAV."""
    import av

    path = tmp_path / name
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt, s.options = 128, 96, "yuv420p", options
        for i in range(100):
            c.mux(s.encode(av.VideoFrame.from_ndarray(_tens(i), format="rgb24")))
        c.mux(s.encode())
    assert open_video(str(path)).num_frames == 100
    for (start, end), fps, n, how in [((1.4, 2.9), 7.0, 3, "head"), ((0.0, None), 1.0, 3, "tail"),
                                      ((2.0, 2.04), 1.0, 4, "uniform"), ((0.5, 3.5), 2.5, 12, "uniform"),
                                      ((3.88, None), 25.0, 4, "head")]:
        cfg = VideoConfig(fps=fps, max_frames=n, slice=how, size=32, timeout_s=0)  # decord, the default
        clip = decode_clip(str(path), start, end, cfg)
        assert clip.indices == select(candidate_indices(100, 25.0, start, end, fps), n, how)
        assert _tens_shown(clip.frames[:len(clip.indices)]) == clip.indices, (start, end)


@pytest.mark.parametrize("codec, options", [("mpeg2video", {"qscale": "2", "bf": "2", "g": "12"}),
                                            ("libx264", {"crf": "0", "bf": "2", "g": "12"})])
@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_an_mpeg_ts_whose_times_wrap_soon_after_its_start_is_read(tmp_path, codec, options, backend):
    """A broadcast capture's 33-bit times can wrap within a minute of its start: libavformat
    then gives them from below 0 (-30 s here). PyAV's seek to a wanted frame landed past it, and
    the retry from time 0 lay past every frame: each clip was a skip, 'frame N not found'
    (MPEG-2, read with PyAV under either backend; H.264 under backend=pyav)."""
    import av

    src, path = tmp_path / "src.ts", tmp_path / "wrapped.ts"
    with av.open(str(src), "w", format="mpegts") as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt, s.options = 128, 96, "yuv420p", options
        for i in range(100):
            c.mux(s.encode(av.VideoFrame.from_ndarray(_tens(i), format="rgb24")))
        c.mux(s.encode())
    shift = (1 << 33) - 30 * 90000  # the times start 30 s before they wrap
    with av.open(str(src)) as inp, av.open(str(path), "w", format="mpegts") as out:
        si = inp.streams.video[0]
        so = out.add_stream_from_template(si)
        for packet in inp.demux(si):
            if packet.dts is not None:
                packet.pts, packet.dts, packet.stream = packet.pts + shift, packet.dts + shift, so
                out.mux(packet)
    clip = decode_clip(str(path), 1.0, 3.0, VideoConfig(backend=backend, fps=1.0, max_frames=12, size=32, timeout_s=0))
    assert clip.indices == [25, 50] and _tens_shown(clip.frames[:2]) == [25, 50]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_a_webm_without_duration_is_read(tmp_path, backend):
    """A browser's MediaRecorder and live streams write WebM/MKV with no duration, frame count
    or cues. decord refuses it ('broken metadata') and PyAV found no frames in it: every such
    file was a 'video reports no frames' skip. Its length comes from its frames' times now."""
    import av

    path = tmp_path / "recorded.webm"
    with av.open(str(path), "w", options={"live": "1"}) as c:
        s = c.add_stream("libvpx-vp9", rate=25)
        s.width, s.height, s.pix_fmt, s.options = 64, 48, "yuv420p", {"lossless": "1", "g": "12"}
        for i in range(100):
            img = np.empty((48, 64, 3), np.uint8)
            img[:, :32], img[:, 32:] = (i // 16) * 16 + 8, (i % 16) * 16 + 8
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    with av.open(str(path)) as c:
        assert c.duration is None and not c.streams.video[0].frames  # what the browser writes
    assert open_video(str(path), backend).num_frames == 100
    for (start, end), fps, n, how in [((1.4, 2.9), 7.0, 3, "head"), ((0.0, None), 1.0, 3, "tail"),
                                      ((0.5, 3.5), 2.5, 12, "uniform"), ((3.88, None), 25.0, 4, "head")]:
        cfg = VideoConfig(backend=backend, fps=fps, max_frames=n, slice=how, size=32, timeout_s=0)
        clip = decode_clip(str(path), start, end, cfg)
        assert clip.indices == select(candidate_indices(100, 25.0, start, end, fps), n, how)
        assert _shown(clip.frames[:len(clip.indices)]) == clip.indices, (start, end)


@pytest.mark.parametrize("ext, start_s, audio_s", [("mkv", 0.0, 5.0), ("flv", 0.0, 5.0), ("mkv", 5.0, 0.0),
                                                   ("mkv", 5.0, 7.0)])
def test_pyav_counts_the_videos_frames_not_the_files_duration(tmp_path, ext, start_s, audio_s):
    """MKV, FLV and NUT keep no frame count or duration per stream, and PyAV took the file's:
    that of its longest stream (5 s of audio beside 2.4 s of picture) or, in MKV, its last
    time (a video whose times run from 5 s to 7.4 s; with 7 s of audio from 0 s, libavformat
    gave the video stream that duration as its own). It counted 126 or 185 frames for 60, so
    a whole-video clip at 1 fps gave frames 0, 25, 50 and three more copies of frame 59."""
    import av
    from fractions import Fraction

    path = tmp_path / f"av.{ext}"
    with av.open(str(path), "w") as c:
        a = c.add_stream("aac", rate=44100) if audio_s else None
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt, s.time_base = 64, 48, "yuv420p", Fraction(1, 1000)
        s.options = {"crf": "0", "bf": "2", "g": "12"}
        for k in range(int(audio_s * 44100 / 1024)):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 44100, k * 1024
            c.mux(a.encode(f))
        if a:
            c.mux(a.encode())
        for i in range(60):
            img = np.empty((48, 64, 3), np.uint8)
            img[:, :32], img[:, 32:] = (i // 16) * 16 + 8, (i % 16) * 16 + 8
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = round((start_s + i / 25) * 1000), Fraction(1, 1000)
            c.mux(s.encode(f))
        c.mux(s.encode())
    assert open_video(str(path), "pyav").num_frames == 60
    assert probe_duration(str(path), "pyav") == pytest.approx(2.4)  # an index's sliding windows
    for (start, end), fps, want in [((None, None), 1.0, [0, 25, 50]), ((1.8, None), 4.0, [45, 51, 57])]:
        cfg = VideoConfig(backend="pyav", fps=fps, max_frames=8, size=32, timeout_s=0)
        clip = decode_clip(str(path), start, end, cfg)
        assert clip.indices == want and _shown(clip.frames[:len(want)]) == want


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_files_decord_opens_but_cannot_decode_are_read_with_pyav(tmp_path, backend):
    """decord 0.6 opens some files PyAV decodes and then fails on every frame: frames 16, 24, 48
    or 72 pixels wide as shown ('DECORDArrayCopyFromTo: The size must exactly match'), which
    `clipray data synth --width 48` wrote, and a one-frame FLV ('Unable to handle EOF'). Every
    clip of them was a skip under the decord backend; PyAV now reads them."""
    narrow, single = tmp_path / "narrow.mp4", tmp_path / "single.flv"
    _numbered_video(narrow, 50, size=(48, 36))
    _numbered_video(single, 1)
    cfg = VideoConfig(backend=backend, fps=4.0, max_frames=4, size=32, timeout_s=0)
    clip = decode_clip(str(narrow), 0.5, 1.5, cfg)
    assert clip.indices == [12, 18, 25, 31] and _shown(clip.frames) == clip.indices
    clip = decode_clip(str(single), None, None, cfg)
    assert clip.indices == [0] and _shown(clip.frames[:1]) == [0]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_the_main_video_stream_is_decoded_when_a_picture_stream_comes_first(tmp_path, backend):
    """An MKV whose first stream is a still picture (a cover put first when muxed) and whose
    second is the video: decord, as players, takes libavformat's best stream, and PyAV took
    the first listed, which gave a two-frame clip of the cover (and the decord backend hands
    many files to PyAV)."""
    import av

    path = tmp_path / "cover_first.mkv"
    with av.open(str(path), "w") as c:
        cover = c.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 48, "yuvj420p"
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt, s.options = 64, 48, "yuv420p", {"crf": "0", "bf": "2", "g": "12"}
        c.mux(cover.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 250, np.uint8), format="rgb24")))
        c.mux(cover.encode())
        for i in range(50):
            img = np.empty((48, 64, 3), np.uint8)
            img[:, :32], img[:, 32:] = (i // 16) * 16 + 8, (i % 16) * 16 + 8
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    video = open_video(str(path), backend)
    assert (video.num_frames, video.fps) == (50, 25.0)
    clip = decode_clip(str(path), 0.5, 1.5, VideoConfig(backend=backend, fps=4.0, max_frames=4, size=32, timeout_s=0))
    assert clip.indices == [12, 18, 25, 31] and _shown(clip.frames) == clip.indices


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_the_default_video_stream_is_decoded_of_two(tmp_path, backend):
    """An MP4 of two video streams (a recording and a second camera, or a preview beside it):
    players and PyAV show the default one, its first track. decord 0.6's FFmpeg takes the one
    of the highest bit rate, here the second (noise), so the backends gave two different
    videos' frames for one file, without a word. The decord backend now reads it with PyAV."""
    import av

    path, rng = tmp_path / "two_cameras.mp4", np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        main, other = c.add_stream("libx264", rate=25), c.add_stream("libx264", rate=25)
        for s in (main, other):
            s.width, s.height, s.pix_fmt, s.options = 64, 48, "yuv420p", {"crf": "0", "g": "12"}
        for i in range(50):
            img = np.empty((48, 64, 3), np.uint8)
            img[:, :32], img[:, 32:] = (i // 16) * 16 + 8, (i % 16) * 16 + 8
            c.mux(main.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            c.mux(other.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), np.uint8), format="rgb24")))
        c.mux(main.encode())
        c.mux(other.encode())
    clip = decode_clip(str(path), 0.5, 1.5, VideoConfig(backend=backend, fps=4.0, max_frames=4, size=32, timeout_s=0))
    assert clip.indices == [12, 18, 25, 31] and _shown(clip.frames) == clip.indices


def test_a_timeout_too_long_for_a_thread_wait_is_no_limit(real_video):
    """video.timeout_s takes any positive number (`inf` is no limit), but one past Python's
    threading.TIMEOUT_MAX (~292 years; 1e10 here) made the wait for the decode thread an
    OverflowError ("timestamp out of range for platform time_t") as soon as the decode took any
    time: no SkipClip, the decode task and the run failed. It is no limit, as `inf` is."""
    cfg = VideoConfig(backend="pyav", fps=1.0, max_frames=4, size=32)
    want = decode_clip_safe(str(real_video), 0.0, 3.0, dataclasses.replace(cfg, timeout_s=float("inf")))
    got = decode_clip_safe(str(real_video), 0.0, 3.0, dataclasses.replace(cfg, timeout_s=1e10))
    assert np.array_equal(got.frames, want.frames) and got.mask.tolist() == want.mask.tolist() == [1, 1, 1, 0]
