"""Video decoding: sample, decode, resize and crop one clip into fixed-shape uint8 frames.

Two backends behind one small interface (`open_video` -> `.fps`, `.num_frames`,
`.get(indices)`): decord (the default) and PyAV (the fallback, selectable in config). Sources
are local paths or any fsspec URI (s3://, gs://, ...). The decord backend reads with PyAV the
files decord cannot open (AV1) or decode (frames 16, 24, 48 or 72 pixels wide) or would number
wrongly (`_reader`): HEVC, MPEG-1/2, MPEG-4 Part 2 and WMV, a variable frame rate, negative
frame times (an edit list that hides frames; H.264 in AVI and MPEG-PS, where decord has no
valid times), an MP4 edit list that ends before the last frames or cuts out a middle part,
several video streams (decord takes another than the default one players show), and a
rotated MKV or WebM (decord does not turn it). Frames come back as players show them:
turned or mirrored by a display matrix (a phone's portrait video, an editor's mirror; but the
decord backend turns an MP4's mirror by 180 degrees, decord's own reading, which only a decoded
frame per file would catch), with the stored pixels' aspect (a
non-square pixel aspect ratio is not applied, by either backend) and counted from the video's
first frame (a video that starts after its audio is not shifted by that delay, by either
backend).

Frame selection follows CLIP4Clip: candidate frames at `fps` per second over the clip window,
then head / tail / uniform selection down to `max_frames`, plus a validity mask. Frames stay
uint8 here (normalisation happens on the training worker, so batches are 4x smaller).

Every failure becomes `SkipClip(reason)`: a missing, empty, truncated, corrupt or non-video
file, a window outside the video, or a decode that exceeds its timeout. Callers skip and
report; nothing ever substitutes an all-zero clip. A window that runs past the video's end is
cut there, not skipped: `Clip.cut` gives the video's length then, for callers to report.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from clipray.config import VideoConfig
from clipray.manifest import as_seconds

T = TypeVar("T")


class SkipClip(Exception):
    """This clip cannot be used; `reason` says why (goes to the skip report)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [max_frames, 3, size, size]; rows past n_valid are padding
    mask: np.ndarray  # uint8 [max_frames]: 1 for real frames, 0 for padding
    indices: list[int]  # decoded frame indices, in order
    cut: float | None = None  # the video's length where the window ran past it (`past_end`), else None


# ---------------------------------------------------------------- frame selection

def candidate_indices(num_frames: int, video_fps: float, start: float | None, end: float | None,
                      fps: float) -> list[int]:
    """Frame indices at `fps` per second over [start, end] (None or NaN = that end of the video).

    Raises SkipClip when the window lies outside the video.
    """
    if num_frames <= 0 or not video_fps or video_fps <= 0:
        raise SkipClip("video reports no frames")
    duration = num_frames / video_fps
    # None or NaN (a Parquet null read through numpy) means the window is open on that side
    start, end = as_seconds(start), as_seconds(end)
    lo = 0.0 if start is None else start
    hi = duration if end is None else min(end, duration)
    # a start at the video's length, to within a millionth of a frame, is at its end: 120 frames
    # at 30000/1001 fps last 4.004 s, 4.0040000000000004 in floats, and a start of 4.004 got
    # the last frame, from a window 4e-16 s long, where a start of 10.0 at 25 fps is a skip
    if lo * video_fps >= num_frames - 1e-6 or hi <= lo:
        raise SkipClip(f"window [{start}, {end}] outside video of {duration:.2f}s")
    # the times lo + k / fps before hi, counted from the window's length in steps, which is
    # rounded to within 1e-6 of a whole number first: np.arange(lo, hi, 1 / fps) counted the
    # float error of hi - lo, so [1.3, 8.3] at 1 fps got a frame at 8.3, its end, where
    # [1.0, 8.0] got none, and [0.4, 1.4], a step long, was taken as shorter (its midpoint)
    steps = (hi - lo) * fps
    if abs(steps - round(steps)) < 1e-6:
        steps = float(round(steps))
    times = lo + np.arange(math.ceil(steps)) / fps if steps >= 1 else np.array([(lo + hi) / 2])
    idx = np.clip(np.floor(times * video_fps + 1e-6).astype(np.int64), 0, num_frames - 1)
    return sorted(set(idx.tolist()))


def past_end(num_frames: int, video_fps: float, end: float | None) -> float | None:
    """The video's length when the window's `end` runs past it by more than a frame interval
    (`candidate_indices` cuts the window there), else None. Less is not worth a word: manifests
    round their times, and ActivityNet's ends often sit a little past the video's."""
    end, length = as_seconds(end), num_frames / video_fps
    return length if end is not None and end - length > 1 / video_fps + 1e-6 else None


def select(indices: Sequence[int], max_frames: int, how: str) -> list[int]:
    """Keep at most `max_frames` of `indices`: head, tail or uniform (linspace over them, floored)."""
    n = len(indices)
    if n <= max_frames:
        return list(indices)
    if how == "head":
        return list(indices[:max_frames])
    if how == "tail":
        return list(indices[-max_frames:])
    if how == "uniform":
        # CLIP4Clip's pick, np.linspace(0, n - 1, max_frames, dtype=int): each position rounded
        # down, not to the nearest, here in exact integers (linspace's float gave 14 for 15)
        if max_frames == 1:
            return [indices[0]]
        return [indices[i * (n - 1) // (max_frames - 1)] for i in range(max_frames)]
    raise ValueError(f"video.slice must be head, tail or uniform, got {how!r}")


# ---------------------------------------------------------------- backends

def open_source(path: str) -> Any:
    """A local path stays a path (decord/PyAV read it directly). A URI becomes a seekable
    fsspec file: the decoders then read only the byte ranges they need (the index and the
    frames of the window), not the whole object, which matters for minutes-long videos cut
    into seconds-long clips. The caller closes it (`close_source`)."""
    if "://" in path and not path.startswith("file://"):
        from clipray.manifest import fsspec_path

        try:
            fs, fs_path = fsspec_path(path)
            f = fs.open(fs_path, "rb", block_size=1 << 20)
        except FileNotFoundError:
            raise SkipClip("missing file") from None
        except Exception as e:  # credentials, network, bucket errors
            raise SkipClip(f"cannot read: {_short(e)}") from None
        # a prefix (a "folder") opens as a file of size 0: said as the local folder is, where
        # it was an "empty file" (s3fs and gcsfs keep the listing's type in `details`)
        folder = (getattr(f, "details", None) or {}).get("type") == "directory"
        if folder or not getattr(f, "size", None):
            f.close()
            raise SkipClip("not a regular file" if folder else "empty file")
        return f
    path = path.removeprefix("file://")
    if not os.path.exists(path):
        raise SkipClip("missing file")
    if not os.path.isfile(path):
        raise SkipClip("not a regular file")
    if os.path.getsize(path) == 0:
        raise SkipClip("empty file")
    return path


def close_source(src: Any) -> None:
    if hasattr(src, "close"):
        src.close()


class DecordVideo:
    def __init__(self, src: Any):
        import decord

        self._src = src
        try:
            self._vr = decord.VideoReader(src, ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # decord raises RuntimeError/DECORDError for any bad file
            raise SkipClip(f"not a decodable video: {_short(e)}") from None
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())
        # Files where decord's index i is not the frame shown at i / fps are read with PyAV,
        # which finds frames by their times (`_reader`):
        # - an MP4 cut without re-encoding (`ffmpeg -ss ... -c copy`) keeps the frames from the
        #   keyframe before the cut and hides them with an edit list, at negative times. decord
        #   counts some of them and numbers from them after a seek, so its index i is an earlier
        #   frame there than when reading from the start;
        # - a variable frame rate (phones, screen recordings, frames dropped while still): the
        #   frames' times stray from i / fps, by 40 frames in a 6 s MKV of 25 and 5 fps parts.
        #   (decord's index of every frame's time: 0.5 ms for 10,800 frames.)
        try:
            n, ts = self.num_frames, self._vr.get_frame_timestamp(range(self.num_frames))[:, 0]
            uneven = n > 1 and self.fps > 0 and bool(np.all(np.diff(ts) > 0)) and \
                float(np.abs(ts - ts[0] - np.arange(n) / self.fps).max()) * self.fps > 0.5
            self.hides_frames = bool(n) and (ts[0] < 0 or uneven)
        except Exception:
            self.hides_frames = False

    def get(self, indices: Sequence[int]) -> np.ndarray:
        try:
            return self._vr.get_batch(list(indices)).asnumpy()
        except Exception as e:  # truncated files open fine and fail here (DECORDError)
            failed = _short(e)
        # and so do some files PyAV decodes: frames 16, 24, 48 or 72 pixels wide as shown (its
        # copy of a frame out of FFmpeg's checks a size that FFmpeg's row padding breaks, in
        # `clipray data synth --width 48` too), a one-frame FLV. Frame i is the same frame in both
        # (`_reader` keeps decord only then); a file broken for both is a skip with decord's reason
        _rewind(self._src)
        try:
            return PyAVVideo(self._src).get(indices)
        except SkipClip:
            raise SkipClip(f"decode failed: {failed}") from None


class PyAVVideo:
    def __init__(self, src: Any):
        import av

        try:
            self._container = av.open(src)
        except Exception as e:
            raise SkipClip(f"not a decodable video: {_short(e)}") from None
        if not self._container.streams:  # an MP4 cut inside its index opens with none
            self._container.close()
            raise SkipClip("not a decodable video: no stream found (a truncated file, or not a media file)")
        if not _moving(self._container):  # an audio file (with its cover picture), subtitles only
            self._container.close()
            raise SkipClip("no video stream")
        fmt = self._container.format.name
        if fmt in ("image2", "image2pipe") or fmt.endswith("_pipe"):
            # FFmpeg's image demuxers: a PNG or JPEG named .mp4 (a thumbnail saved under the
            # video's name) opened as a one-frame video of 25 fps, and was trained on and indexed
            self._container.close()
            raise SkipClip(f"not a video: a still image ({fmt.removesuffix('_pipe')})")
        # the stream decord and players pick (libavformat's best: the default one, then the one
        # with more frames), not the first listed, which can be a cover picture
        self._stream = _main_video(self._container)
        s = self._stream
        # with no average rate (an MPEG-TS of one frame, an MPEG-PS of one or two: too few
        # times to average), the rate the stream's own header states, not libavformat's guess,
        # which took H.264's and MPEG-2's 50 fields a second for 25 frames: a 2-frame MPEG-PS
        # gave frame 0 for index 1, and a 1-frame video lasted half its frame
        self.fps = float(s.average_rate or s.codec_context.framerate or s.guessed_rate or 0)
        n = s.frames
        if not n and self._container.format.name == "mpeg":
            # MPEG-PS stores no frame count, and libavformat estimates the duration from the
            # timestamps it finds in the file's tail, which falls frames short when small frames
            # share a PES packet (it stamps only one of them): count the packets instead, one a
            # frame, as decord does
            n = len(self._packet_times(src))
            s = self._stream
        # MKV, WebM, FLV and NUT store no duration per stream: libavformat's is the file's where
        # it finds none of the video's times while it probes (a video starting 5 s after its audio)
        own = s.duration and s.time_base and not any(f in fmt for f in ("matroska", "flv", "nut"))
        self._seconds = float(s.duration * s.time_base) if own else None  # the stream's length, as its header says
        by_duration = int(round(self._seconds * self.fps)) if own else 0
        if n and by_duration and "mp4" in self._container.format.name:
            # an edit list that hides frames (see DecordVideo) shortens the duration, not the count
            n = min(n, by_duration)
        elif not n and by_duration:
            n = by_duration
        if not n and self.fps > 0 and s.time_base:
            # no count and no duration of the stream's own, as in MKV, WebM, FLV and NUT (and a
            # WebM from a browser's MediaRecorder or a live-streamed MKV, no duration at all).
            # The frames' times say how long it is. The file's duration is not the video's: it
            # runs to the end of the longest stream (an audio track that goes on after the
            # picture stops), and MKV's to the last time, not from the first (a stream whose
            # times start at 5 s), which counted frames past the video's end and gave its last
            # frame in their place
            times = self._packet_times(src)
            pts, s = [t for t in times if t is not None], self._stream
            if pts:
                n = int(round(float((max(pts) - min(pts)) * s.time_base) * self.fps)) + 1
            elif times and not self._container.duration:
                # a raw stream (a camera's .h264) has frames but no time for any of them
                self._container.close()
                raise SkipClip(f"a raw {fmt} stream, no container to time its frames: remux it, "
                               "e.g. ffmpeg -i in.h264 -c copy out.mp4")
        if not n and self._container.duration:  # no frame with a time (a raw stream): a guess
            n = int(round(self._container.duration / 1e6 * self.fps))
        self.num_frames = int(n)

    def _packet_times(self, src: Any) -> list[int | None]:
        """The times of the stream's packets (demuxing only, no decoding: 4 ms for a 20 s 360p
        file), the file then opened anew for `get`: a seek back to its start lost the frame of
        a one-frame FLV."""
        import av

        try:
            times = [p.pts for p in self._container.demux(self._stream) if p.size]
            self._container.close()
            _rewind(src)
            self._container = av.open(src)
            self._stream = _main_video(self._container)
        except Exception as e:
            raise SkipClip(f"not a decodable video: {_short(e)}") from None
        return times

    def get(self, indices: Sequence[int]) -> np.ndarray:
        """Decode linearly from a keyframe before the first wanted frame (faster than a seek
        per frame), keeping the wanted indices by presentation time. Frame i is the one shown
        i / fps after the first frame (as decord counts), not after the stream's start_time,
        which some containers (H.264 in AVI) set a frame early. Seeking in MPEG-TS/PS and FLV
        can land after the wanted frame; then the clip is decoded from the start instead."""
        want = sorted(set(indices))
        s, c = self._stream, self._container
        try:
            frames = c.decode(s)
            first = next((f for f in frames if f.pts is not None), None)
            if first is None:
                raise SkipClip("decode failed: the stream holds no frame")
            t0 = float(first.pts * s.time_base)
            if want[0] == 0:
                got = self._collect(itertools.chain([first], frames), want, t0)
            else:
                c.seek(int((want[0] / self.fps + t0) / s.time_base), stream=s, backward=True, any_frame=False)
                got = self._collect(c.decode(s), want, t0)
                if want[0] not in got:
                    # the file's start: in MPEG-PS, a seek to t0 itself can land past it; an
                    # MPEG-TS whose times wrap past 2**33 soon after its start has them from
                    # below 0 (a broadcast capture), where time 0 lies past the frames wanted
                    c.seek(min(0, c.start_time or 0))
                    got = self._collect(c.decode(s), want, t0)
        except SkipClip:
            raise
        except Exception as e:
            raise SkipClip(f"decode failed: {_short(e)}") from None
        finally:
            c.close()
        if self._end is not None and self._seconds and want[-1] / self.fps > self._end \
                and self._seconds - self._end > max(1.0, 2 / self.fps):
            # a file cut short where a frame ends: an MP4 whose header (moov first) lists every
            # frame decodes to where the bytes stop, and the clip's frames past it came back as
            # its last frame again, with no error
            raise SkipClip(f"truncated: the video stops at {self._end:.2f} s of the {self._seconds:.2f} s it reports")
        missing = [i for i in want if i not in got]
        if missing:
            if min(missing) < min(got, default=want[-1] + 1):
                raise SkipClip(f"decode failed: frame {min(missing)} not found")
            # a file that over-reports its length: reuse the nearest earlier decoded frame
            for i in missing:
                got[i] = got[max(k for k in got if k < i)]
        return np.stack(_one_size([got[i] for i in indices]))

    def _collect(self, frames: Iterable[Any], want: list[int], t0: float) -> dict[int, np.ndarray]:
        """Index i is the frame shown at i / fps: the one at that time or, where a variable
        frame rate leaves a gap, the last one before it (a file that stops early: its last)."""
        got: dict[int, np.ndarray] = {}
        k, prev, shown = 0, None, None  # next wanted slot, the last frame decoded, as RGB
        self._end = None  # where the stream's last frame ends, once decoding has reached it (s)
        for frame in frames:
            if frame.pts is None:
                continue
            i = int(round((float(frame.pts * self._stream.time_base) - t0) * self.fps))
            while k < len(want) and want[k] < i:  # slots between the previous frame and this one
                if prev is not None:
                    shown = _upright(prev) if shown is None else shown
                    got[want[k]] = shown
                k += 1
            prev, shown = frame, None
            if k < len(want) and want[k] == i:
                got[i] = shown = _upright(frame)
                k += 1
            if i >= want[-1]:
                break
        else:
            if prev is not None:  # a frame shows until the next one, the last for its duration
                self._end = float((prev.pts + (prev.duration or 0)) * self._stream.time_base) - t0
            if prev is not None and k < len(want):
                shown = _upright(prev)
                got.update((j, shown) for j in want[k:])
        return got


def _one_size(frames: list[np.ndarray]) -> list[np.ndarray]:
    """A clip's frames at one size, the first frame's: a stream whose picture size changes (a
    broadcast recording at an ad break, 64x48 then 128x96) gave frames of two sizes, and every
    clip across the change was skipped ("all input arrays must have the same shape"). decord
    gives them at one size too."""
    h, w = frames[0].shape[:2]
    out = []
    for f in frames:
        if f.shape[:2] != (h, w):
            x = torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)[None]
            x = F.interpolate(x, size=[h, w], mode="bicubic", align_corners=False, antialias=True)
            f = x[0].permute(1, 2, 0).numpy()
        out.append(f)
    return out


def _upright(frame: Any) -> np.ndarray:
    """A PyAV frame as RGB, turned and mirrored as players show it. A phone's portrait video
    is stored landscape with a display matrix saying to rotate it, which decord applies and
    PyAV's `to_ndarray` does not; an editor's mirror is a matrix with a flip, which PyAV's
    `rotation` (and decord) read as a 180-degree turn: a mirrored video came back upside down.
    A matrix off the right angles (a 45-degree tilt) is turned by its nearest right angle."""
    rgb = frame.to_ndarray(format="rgb24")
    m = _display_matrix(frame)
    if m is None or m == (1, 0, 0, 1):
        return rgb
    a, b, c, d = m  # FFmpeg's layout: the point (x, y), y down, is shown at (a*x + c*y, b*x + d*y)
    if a == d == 0:
        rgb, a, d = rgb.swapaxes(0, 1), c, b
    elif b or c:
        return np.rot90(rgb, int(round(frame.rotation / 90)) % 4)
    return np.ascontiguousarray(rgb[::d, ::a])


def _display_matrix(frame: Any) -> tuple[int, int, int, int] | None:
    """The a, b, c, d entries (rounded to -1, 0 or 1) of a PyAV frame's display matrix, or
    None when it has none."""
    from av.sidedata.sidedata import Type

    sd = frame.side_data.get(Type.DISPLAYMATRIX)
    if sd is None:
        return None
    m = np.frombuffer(bytes(sd), np.int32)
    return tuple(int(round(v / 65536)) for v in (m[0], m[1], m[3], m[4]))


BACKENDS: dict[str, Callable[[Any], Any]] = {"decord": DecordVideo, "pyav": PyAVVideo}


# Codecs whose streams decord 0.6 misnumbers after a seek, with no error: HEVC, MPEG-1/2 and
# MPEG-4 Part 2 streams have open GOPs (x265's default; DVD and broadcast MPEG-2; MPEG-4 with
# B-frames), whose first frames after a keyframe refer to the GOP before it and are dropped when
# decoding starts there, and decord counts frames from the keyframe it seeks to, so index i came
# back as a frame 1 to 11 later (tests/test_video.py). WMV returned frame 0 for every index.
# H.264 (open GOP too), VP8/VP9, MJPEG, H.263, FLV and ProRes came back right.
_DECORD_MISNUMBERS = frozenset({"hevc", "mpeg1video", "mpeg2video", "mpeg4", "wmv1", "wmv2"})


def _main_video(container: Any) -> Any:
    return container.streams.best("video") or container.streams.video[0]


def _moving(container: Any) -> list[Any]:
    """The file's video streams but cover pictures (attached_pic: an MP4 or M4A's cover art, a
    picture and no video; an audio download with its thumbnail was a skip that said 'decode
    failed: the stream holds no frame')."""
    import av

    return [v for v in container.streams.video if not v.disposition & av.stream.Disposition.attached_pic]


def _rewind(src: Any) -> None:
    """Back to the start of an open file, for the next reader (a path needs nothing)."""
    if hasattr(src, "seek"):
        src.seek(0)


def _decord_misreads(src: Any) -> bool:
    """Whether decord would give other frames than PyAV (a PyAV open: 0.3 ms locally; False if
    PyAV cannot open the file): a codec it misnumbers, x264's intra refresh, more than one video
    stream (a cover picture aside), or a rotated MKV or WebM. Of several streams, decord 0.6's FFmpeg takes the
    one of the highest bit rate, where PyAV, as players, takes the default one (an MP4's first
    track): a recording beside its preview, or a second camera, gave the other stream's frames.
    Nor does it read an MKV's rotation (FFmpeg 7 writes a phone video's display matrix there:
    `ffmpeg -i phone.mp4 -c copy phone.mkv`), and gave its frames sideways or upside down; only
    a decoded frame tells the rotation or mirror (2-3 ms for 720p), so only MKV and WebM are asked. A
    file of no video stream is PyAV's too, which says so."""
    import av

    try:
        with av.open(src) as c:
            if len(_moving(c)) != 1:
                return True
            main = _main_video(c)
            if main.codec_context.name in _DECORD_MISNUMBERS:
                return True
            # an MP4/MOV edit list that ends before the last frames (a trim without re-encoding,
            # as phones write) or cuts out a middle part: players show fewer frames than the
            # stream holds, and decord numbers them all (frames past the end given as real,
            # frame 16 at 1.0 s where players show 60). Its duration is the edit's
            if "mp4" in c.format.name and main.frames and main.duration and main.average_rate and \
                    round(main.duration * main.time_base * main.average_rate) < main.frames:
                return True
            packets = c.demux(main)
            head = next(packets, None)
            # H.264 with periodic intra refresh: its keyframes are recovery points, where FFmpeg
            # drops frames after a seek until the picture is whole, and decord counts from the
            # frames it gets: index 12 gave frame 23 at 320x240, silently. x264 writes its
            # settings into the first frame; other encoders' intra refresh is not recognised
            if head is not None and main.codec_context.name == "h264" and b"intra_refresh=1" in bytes(head):
                return True
            if head is None or "matroska" not in c.format.name:
                return False
            first = next((f for p in itertools.chain([head], packets) for f in p.decode()), None)
            return first is not None and _display_matrix(first) not in (None, (1, 0, 0, 1))
    except Exception:
        return False
    finally:
        _rewind(src)


_decord_missing: str | None = None  # why `import decord` failed in this process, once it has


def decord_importable() -> bool:
    """Whether decord imports here. decord has no wheel for ARM (Apple Silicon, aarch64 Linux),
    where pyproject leaves it out: there the decord backend reads every file with PyAV, saying
    so once per process. Every clip was a skip ('decode failed: ModuleNotFoundError') and an
    index's duration probe a traceback."""
    global _decord_missing
    if _decord_missing is None:
        try:
            import decord  # noqa: F401
            _decord_missing = ""
        except Exception as e:  # ImportError, or a broken install's OSError
            _decord_missing = _short(e)
            logging.getLogger(__name__).warning(
                "video.backend=decord but decord does not import (%s): every video is read with PyAV, "
                "slower; pip install decord (wheels for x86-64 only), or set video.backend=pyav (data.video.backend "
                "to train)", _decord_missing)
    return not _decord_missing


def _reader(src: Any, backend: str) -> Any:
    """The backend's reader of an open source; PyAV's where decord cannot open the file or
    would number its frames wrongly or take another stream, or is not installed."""
    if backend == "pyav" or not decord_importable():
        return PyAVVideo(src)
    if not _decord_misreads(src):
        try:
            video = DecordVideo(src)
            if not video.hides_frames:
                return video
            del video
        except SkipClip:
            # decord 0.6's FFmpeg has no AV1 decoder (YouTube serves AV1 in MP4 and WebM): it
            # finds no video stream it can decode. PyAV's can, or names what the file lacks.
            pass
        _rewind(src)
    return PyAVVideo(src)


def open_video(path: str, backend: str = "decord") -> Any:
    if backend not in BACKENDS:
        raise ValueError(f"video.backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    return _reader(open_source(path), backend)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


# ---------------------------------------------------------------- resize / crop

MAX_ASPECT = 64  # frames wider (or taller) than this many times their other side are a skip


def resize_crop(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> uint8 [N, 3, size, size]: shorter side to `size`, centre crop.

    torchvision's tensor `resize` (bicubic, antialiased) and `center_crop`, pixel for pixel
    (tests/test_video.py compares them), written with torch alone: importing torchvision took
    1.7 s of every decode actor's start-up, paid on every dataset execution.
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    if max(h, w) > MAX_ASPECT * min(h, w):
        # resized whole before its centre is cut: a 16384x16 video's frames took 2.5 GB
        raise SkipClip(f"frames {w}x{h}: one side over {MAX_ASPECT} times the other, no picture to "
                       "take a centre square of")
    # torchvision's output size: the shorter side becomes `size`, the longer keeps the aspect
    # ratio, rounded down; a square frame counts its width as the shorter side
    nh, nw = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
    if (nh, nw) != (h, w):
        # uint8 in and out: torch's native uint8 kernel on CPU, as torchvision uses
        x = F.interpolate(x, size=[nh, nw], mode="bicubic", align_corners=False, antialias=True)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return x[..., top:top + size, left:left + size]


# ---------------------------------------------------------------- one clip

def _decode(path: str, start: float | None, end: float | None,
            cfg: VideoConfig) -> tuple[torch.Tensor, list[int], float | None]:
    """The clip's real frames, resized and cropped (uint8 [n, 3, size, size]), their indices,
    and the video's length where the window was cut there (`past_end`)."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"video.backend must be one of {sorted(BACKENDS)}, got {cfg.backend!r}")
    src = open_source(path)
    try:
        video = _reader(src, cfg.backend)
        idx = select(candidate_indices(video.num_frames, video.fps, start, end, cfg.fps),
                     cfg.max_frames, cfg.slice)
        cut = past_end(video.num_frames, video.fps, end)
        raw = video.get(idx)
    finally:
        close_source(src)
    if raw.ndim != 4 or raw.shape[0] != len(idx) or raw.shape[-1] != 3:
        raise SkipClip(f"decoder returned frames of shape {raw.shape}")
    return resize_crop(raw, cfg.size), idx, cut


def _pad(frames: torch.Tensor, idx: list[int], cut: float | None, cfg: VideoConfig,
         out: np.ndarray | None) -> Clip:
    """Write the real frames, then zero padding, into `out` (a new array if None)."""
    if out is None:
        out = np.empty((cfg.max_frames, 3, cfg.size, cfg.size), dtype=np.uint8)
    n = len(idx)
    out[:n] = frames.numpy()
    out[n:] = 0
    mask = np.zeros(cfg.max_frames, dtype=np.uint8)
    mask[:n] = 1
    return Clip(out, mask, idx, cut)


def decode_clip(path: str, start: float | None, end: float | None, cfg: VideoConfig,
                out: np.ndarray | None = None) -> Clip:
    """Decode one clip window into `cfg.max_frames` frames + mask (raises SkipClip).

    `out` (uint8 [max_frames, 3, size, size]), if given, receives the frames: a caller that
    builds a batch passes its row of the batch array and saves a copy of every frame.
    """
    return _pad(*_decode(path, start, end, cfg), cfg, out)


def call_with_timeout(fn: Callable[[], T], timeout_s: float) -> T:
    """Run fn in a daemon thread and give up after timeout_s.

    A C decoder stuck on a bad file cannot be interrupted from Python; the thread is left to
    finish (or hang) on its own while the caller moves on, so one file cannot stall a pipeline.
    """
    out: queue.Queue = queue.Queue(maxsize=1)

    def run() -> None:
        try:
            out.put((True, fn()))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out.put((False, e))

    threading.Thread(target=run, daemon=True, name="clipray-decode").start()
    try:
        ok, value = out.get(timeout=timeout_s)
    except queue.Empty:
        raise SkipClip(f"decode timed out after {timeout_s:g}s") from None
    if ok:
        return value
    raise value


def _bounded(fn: Callable[[], T], cfg: VideoConfig) -> T:
    """fn() bounded by `cfg.timeout_s`, any decoder error turned into a SkipClip."""
    def run() -> T:
        try:
            return fn()
        except SkipClip:
            raise
        except Exception as e:  # any other decoder error is still a skip, never a crash
            raise SkipClip(f"decode failed: {_short(e)}") from None

    # past threading.TIMEOUT_MAX (~292 years) a wait is no limit either: Python's lock wait
    # refused it (OverflowError) once the decode took any time, and the decode task failed
    if not math.isfinite(cfg.timeout_s) or cfg.timeout_s <= 0 or cfg.timeout_s > threading.TIMEOUT_MAX:
        return run()
    return call_with_timeout(run, cfg.timeout_s)


def decode_clip_safe(path: str, start: float | None, end: float | None, cfg: VideoConfig,
                     out: np.ndarray | None = None) -> Clip:
    """`decode_clip` bounded by `cfg.timeout_s`; every failure is a SkipClip with a reason.

    Only this thread writes into `out`, after the decode thread has returned: a decode that
    times out and finishes later cannot overwrite a row that has since been given to another clip.
    """
    return _pad(*_bounded(lambda: _decode(path, start, end, cfg), cfg), cfg, out)


def _decode_windows(path: str, windows: Sequence[tuple[float | None, float | None]],
                    cfg: VideoConfig) -> list[Clip | SkipClip]:
    if cfg.backend not in BACKENDS:
        raise ValueError(f"video.backend must be one of {sorted(BACKENDS)}, got {cfg.backend!r}")
    src = open_source(path)
    try:
        video = _reader(src, cfg.backend)
        picks: list[list[int] | SkipClip] = []
        for start, end in windows:
            try:
                picks.append(select(candidate_indices(video.num_frames, video.fps, start, end, cfg.fps),
                                    cfg.max_frames, cfg.slice))
            except SkipClip as e:
                picks.append(e)
        union = sorted({i for p in picks if not isinstance(p, SkipClip) for i in p})
        raw = video.get(union) if union else None
    finally:
        close_source(src)
    if raw is None:
        return picks  # type: ignore[return-value]  # every window was outside the video
    if raw.ndim != 4 or raw.shape[0] != len(union) or raw.shape[-1] != 3:
        raise SkipClip(f"decoder returned frames of shape {raw.shape}")
    frames, row = resize_crop(raw, cfg.size), {f: k for k, f in enumerate(union)}
    # (no `cut`: clip editing's windows lie within the length it measured)
    return [p if isinstance(p, SkipClip) else _pad(frames[[row[i] for i in p]], p, None, cfg, None) for p in picks]


def decode_windows(path: str, windows: Sequence[tuple[float | None, float | None]],
                   cfg: VideoConfig) -> list[Clip | SkipClip]:
    """Several windows of one video, each sampled as `decode_clip` would, from one open file
    and one decode of the union of their frames (clip editing scores ~20 overlapping windows
    per caption). A window outside the video comes back as its SkipClip; a file that cannot
    be read, or a decode past `cfg.timeout_s`, raises SkipClip for all of them."""
    return _bounded(lambda: _decode_windows(path, windows, cfg), cfg)


def frame_size(path: str) -> tuple[int, int]:
    """(width, height) of the video stream a decode of a local file reads, from its header: its
    one video stream (a cover picture aside), or of several the one PyAV decodes (`_main_video`);
    (0, 0) when it has none or cannot be opened (decoding it then says why). The first stream
    listed was measured: a file whose small first stream stood beside a default one of 4000x2200
    passed the served app's pixel cap as 64x48, and its large frames were decoded whole."""
    import av

    try:
        with av.open(path) as c:
            if not c.streams.video:
                return 0, 0
            moving = _moving(c)
            v = (moving[0] if len(moving) == 1 else _main_video(c)).codec_context
            return v.width, v.height
    except Exception:  # noqa: BLE001 - any unreadable file: the decoder's SkipClip names it
        return 0, 0


PROBE_THREADS = 16  # videos opened at once to find their lengths (a million in object storage took a day one by one)


def video_length(path: str, backend: str = "decord") -> float:
    """The video's length in seconds (frames / fps); SkipClip, with its reason, when it cannot
    be opened or has no frame rate."""
    src = open_source(path)
    try:
        v = _reader(src, backend)
        if not v.fps:
            raise SkipClip("no frame rate")
        return v.num_frames / v.fps
    finally:
        close_source(src)


def probe_duration(path: str, backend: str = "decord") -> float | None:
    """The video's length in seconds (frames / fps), or None when it cannot be opened."""
    try:
        return video_length(path, backend)
    except SkipClip:
        return None
