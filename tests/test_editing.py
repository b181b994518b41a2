"""Clip editing's pure parts against hand-computed answers: stage-1 clips from timestamps, the
candidate clips around a clip, the keep-or-replace rule, tIoU; and `decode_windows` against
`decode_clip` on real H.264 files."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from clipray.config import VideoConfig
from clipray.editing import Bounds, candidates, choose, initial_clips, neighbour_bounds, tiou


def test_midpoint_clips_span_between_neighbouring_timestamps_in_any_order():
    # timestamps 1, 5, 9 in a 12 s video: midpoints 3 and 7, then the video's ends
    assert initial_clips([1, 5, 9], 12) == [(0, 3), (3, 7), (7, 12)]
    assert initial_clips([9, 1, 5], 12) == [(7, 12), (0, 3), (3, 7)]  # same clips, given order
    assert initial_clips([4.0], 10) == [(0, 10)]  # one caption: the whole video


def test_window_clips_are_centred_and_clipped_to_the_video():
    assert initial_clips([1, 5, 11], 12, "window", window_s=4) == [(0, 3), (3, 7), (9, 12)]


def test_max_width_shrinks_towards_the_timestamp_and_min_width_grows_around_it():
    assert initial_clips([1, 5, 9], 12, max_width_s=2) == [(0, 2), (4, 6), (8, 10)]
    # three timestamps 0.2 s apart: the middle midpoint clip (4.1, 4.3) is too short, so it
    # grows to 1 s centred on 4.2; the first also (0 .. 4.1 is long enough: kept)
    assert initial_clips([4.0, 4.2, 4.4], 10, min_width_s=1.0) == [(0, 4.1), (3.7, 4.7), (4.3, 10)]
    # a clip grown near the video's start stays inside it
    assert initial_clips([0.1, 0.2], 10, "window", window_s=0.1, min_width_s=1.0)[0] == (0, 1)
    # where the neighbours leave room, it grows inside them: centred on 4.2 it was (3.7, 4.7),
    # past the previous timestamp 4.0, where no candidate is valid, so it was never edited
    clips = initial_clips([4.0, 4.2, 5.2], 20, min_width_s=1.0)
    assert clips == [(0, 4.1), (4.0, 5.0), (4.7, 20)]
    moves = candidates(*clips[1], neighbour_bounds([4.0, 4.2, 5.2], 20)[1], step_s=0.1, max_steps=2, min_width_s=1.0)
    assert sorted(moves) == [(4.0, 5.0), (4.0, 5.1), (4.0, 5.2), (4.1, 5.1), (4.1, 5.2), (4.2, 5.2)]


def test_a_gap_exactly_min_width_wide_holds_the_grown_clip():
    """A short clip grows inside its neighbour bounds "where they leave room for it" (`_widen`):
    a gap of exactly min_width does. Timestamps 4.0, 4.2, 5.0: the middle midpoint clip
    (4.1, 4.6) is 0.5 s, grown to 1 s centred on 4.2 = (3.7, 4.7), shifted into [4.0, 5.0]:
    (4.0, 5.0), not (3.7, 4.7) past the previous timestamp."""
    assert initial_clips([4.0, 4.2, 5.0], 20, min_width_s=1.0) == [(0, 4.1), (4.0, 5.0), (4.6, 20)]


def test_stage_one_clips_on_the_millisecond_grid_keep_their_minimum_width():
    """Each end was rounded to the millisecond on its own: three captions at one time with
    min_width_s=0.001 gave the middle one (1.0, 1.0), which failed `clipray edit` after Ray had
    started ("end 1.5 <= start 1.5"), and a widened 1 s clip could come out 0.999 s wide."""
    assert initial_clips([1.0] * 3, 60.0, min_width_s=0.001)[1] == (1.0, 1.001)
    assert initial_clips([15.9045] * 3, 60.0, min_width_s=1.0)[1] == (15.405, 16.405)
    assert initial_clips([12.38] * 3, 60.0, min_width_s=1.001)[1] == (11.88, 12.881)
    rng = np.random.default_rng(0)
    for _ in range(4000):  # against the rules by brute force
        duration = float(rng.choice([60.0, rng.uniform(0.5, 60)]))
        k, places = int(rng.integers(1, 6)), int(rng.choice([1, 3, 4]))
        ts = sorted(math.floor(rng.uniform(0, duration) * 10**places) / 10**places for _ in range(k))
        ts = [ts[0]] * k if rng.random() < 0.3 else ts
        width = float(rng.choice([0.001, 0.5, 1.0, 1.001, 1.0005, 2.0]))
        rule = str(rng.choice(["midpoint", "window"]))
        for (s, e), t in zip(initial_clips(ts, duration, rule, window_s=1.5, min_width_s=width), ts):
            assert s <= t <= e and e - s >= min(width, duration) - 1e-9, (ts, duration, width, rule, s, e)
            assert 0 <= s and e <= duration + 0.0015 and (s, e) == (min(round(s, 3), t), max(round(e, 3), t))


def test_a_clip_grown_to_a_width_off_the_millisecond_stays_short_of_the_next_timestamp():
    """min_width_s=1.0005 is 1.001 s on the millisecond grid. Timestamps 2, 3.9, 4 in a 10 s
    video: the middle midpoint clip (2.95, 3.95) is too short; centred on 3.9 it would end past
    4.0, so it ends at 4.0 and starts 1.001 s before, (2.999, 4.0). It was grown to 1.0005 s,
    (2.9995, 4.0), its start rounded up to 3.0 and its end then taken to 4.001, past the next
    caption's timestamp: no move by steps of 0.1 s was valid, and the clip was never edited."""
    ts = [2.0, 3.9, 4.0]
    clips = initial_clips(ts, 10.0, min_width_s=1.0005)
    assert clips == [(0.0, 2.95), (2.999, 4.0), (3.95, 10.0)]
    # by hand: starts 2.799 .. 3.199, ends 3.9 and 4.0 (3.8 misses t, 4.1 is past 4.0), at least
    # 1.0005 s wide
    got = candidates(*clips[1], neighbour_bounds(ts, 10.0)[1], step_s=0.1, max_steps=2, min_width_s=1.0005)
    assert got[0] == (2.999, 4.0)
    assert sorted(got) == [(2.799, 3.9), (2.799, 4.0), (2.899, 3.9), (2.899, 4.0), (2.999, 4.0)]


def test_stage_one_clips_on_the_millisecond_grid_keep_under_their_maximum_width():
    """`max_width_s`: no initial clip wider than it. A 2 s cap around t = 7.2345 spans 6.2345 to
    8.2345; each end was rounded to the nearest millisecond, out to (6.234, 8.235), 2.001 s. By
    hand, taken inwards: (6.235, 8.234)."""
    assert initial_clips([7.2345], 20.0, max_width_s=2.0, min_width_s=1.0) == [(6.235, 8.234)]
    assert initial_clips([1, 5, 9], 12, max_width_s=2) == [(0, 2), (4, 6), (8, 10)]  # on the grid: as before
    rng = np.random.default_rng(1)
    for _ in range(3000):  # full-precision timestamps (YouCook2's `uniform` rule)
        duration = float(rng.uniform(5, 60))
        ts = sorted(float(x) for x in rng.uniform(0, duration, int(rng.integers(1, 6))))
        cap = float(rng.choice([1.0, 1.5, 2.0, 3.0, 2.0005]))
        rule = str(rng.choice(["midpoint", "window"]))
        for (s, e), t in zip(initial_clips(ts, duration, rule, window_s=4.0, max_width_s=cap, min_width_s=1.0), ts):
            assert s <= t <= e and 1.0 - 1e-9 <= e - s <= cap + 1e-9, (ts, duration, cap, rule, s, e)


def test_stage_one_rejects_unknown_rules():
    with pytest.raises(ValueError, match="edit.init must be one of midpoint, window"):
        initial_clips([1], 5, "middle")
    with pytest.raises(ValueError, match="window_s > 0"):
        initial_clips([1], 5, "window")


def test_neighbour_bounds():
    assert neighbour_bounds([5, 1, 9], 12) == [Bounds(1, 5, 9), Bounds(0, 1, 5), Bounds(5, 9, 12)]


def test_candidates_are_every_valid_move_with_the_current_clip_first():
    b = Bounds(lo=1, t=3, hi=7)
    got = candidates(2, 6, b, step_s=1, max_steps=2, min_width_s=1)
    assert got[0] == (2, 6)
    # by hand: starts 0..4 less those before lo=1 or after t=3; ends 4..8 less those past hi=7
    assert sorted(got) == sorted(itertools.product([1, 2, 3], [4, 5, 6, 7]))
    assert len(got) == len(set(got))
    # a minimum width removes the short ones; steps of 0.1 do not drift by float error
    got = candidates(2.9, 3.3, Bounds(2.5, 3.0, 3.6), step_s=0.1, max_steps=1, min_width_s=0.4)
    assert sorted(got) == [(2.8, 3.2), (2.8, 3.3), (2.8, 3.4), (2.9, 3.3), (2.9, 3.4), (3.0, 3.4)]


def test_a_last_clip_ending_at_the_videos_end_rounded_up_may_keep_that_end():
    """The video's end counts to the millisecond, as clips do (`candidates`): in a 10.0006 s
    video the last midpoint clip ends at 10.001, and moves keeping that end stay candidates.
    By hand for timestamps 1 and 5: clip (3, 10.001), starts 2, 3, 4 (from 1, 2 s steps of 1 s,
    none before 1 or after 5), ends 9.001 and 10.001 (11.001 is past the end)."""
    ts, duration = [1.0, 5.0], 10.0006
    clip = initial_clips(ts, duration)[1]
    assert clip == (3.0, 10.001)
    got = candidates(*clip, neighbour_bounds(ts, duration)[1], step_s=1.0, max_steps=1, min_width_s=0.5)
    assert got[0] == clip and sorted(got) == sorted(itertools.product([2.0, 3.0, 4.0], [9.001, 10.001]))


def test_a_window_clip_past_its_neighbours_moves_from_them():
    """init=window clips span a fixed width whatever the neighbours: (5, 15) around t=10 holds the
    next caption's timestamp 12 (and its own clip (7, 17) holds 10). Every move of an end more
    than max_steps x step_s past a neighbour stayed past it, so the only candidate was the clip
    itself, never edited in any round. Its boundaries past a neighbour now move from it."""
    ts, duration = [10.0, 12.0], 30.0
    clips = initial_clips(ts, duration, "window", window_s=10.0)
    assert clips == [(5.0, 15.0), (7.0, 17.0)]
    first, second = (candidates(*c, b, step_s=1.0, max_steps=2, min_width_s=1.0)
                     for c, b in zip(clips, neighbour_bounds(ts, duration)))
    # by hand: the first clip's end moves from 12 (its next timestamp), its start from 5; the
    # second's start from 10, its end from 17
    assert first[0] == (5.0, 15.0)
    assert sorted(first[1:]) == sorted(itertools.product([3.0, 4.0, 5.0, 6.0, 7.0], [10.0, 11.0, 12.0]))
    assert second[0] == (7.0, 17.0)
    assert sorted(second[1:]) == sorted(itertools.product([10.0, 11.0, 12.0], [15.0, 16.0, 17.0, 18.0, 19.0]))
    # one boundary past: only that one is cut back; within the bounds nothing changes
    got = candidates(0.5, 15.0, Bounds(1.0, 3.0, 20.0), step_s=1.0, max_steps=1, min_width_s=1.0)
    assert got[0] == (0.5, 15.0) and sorted(got[1:]) == sorted(itertools.product([1.0, 2.0], [14.0, 15.0, 16.0]))


def test_choose_keeps_the_current_clip_unless_beaten_by_more_than_the_margin():
    assert choose([0.5, 0.7, 0.6], margin=0.1) == 1
    assert choose([0.5, 0.7, 0.6], margin=0.25) == 0
    assert choose([0.5, 0.5], margin=0.0) == 0  # a tie keeps the clip
    assert choose([0.5, math.nan, 0.4], margin=0.0) == 0  # NaN (not decoded) never wins
    assert choose([math.nan, 0.2, 0.3], margin=1.0) == 2  # the current clip undecodable: best


def test_choose_needs_more_than_the_margin_and_keeps_the_first_of_tied_best():
    """`choose`: a candidate replaces the current clip only when it beats it by MORE than the
    margin: 0.75 = 0.5 + 0.25 exactly keeps the clip. Of candidates tied for best the first
    (candidates come in a fixed order, current first) wins, so an edit is reproducible."""
    assert choose([0.5, 0.75], margin=0.25) == 0
    assert choose([0.5, 0.7500001], margin=0.25) == 1
    assert choose([0.1, 0.9, 0.9], margin=0.0) == 1
    assert choose([math.nan, 0.9, 0.9], margin=0.0) == 1


def test_tiou():
    assert tiou((0, 2), (1, 3)) == pytest.approx(1 / 3)
    assert tiou((0, 1), (2, 3)) == 0.0
    assert tiou((1.5, 4), (1.5, 4)) == 1.0


def test_decode_windows_gives_the_frames_decode_clip_gives(synth_small, real_video, tmp_path):
    from clipray.video import SkipClip, decode_clip, decode_windows

    for path, windows in ((real_video, [(0.0, 4.0), (1.5, 6.0), (2.0, 3.0), (50.0, 60.0)]),
                          (f"{synth_small['manifest'].rsplit('/', 1)[0]}/videos/synth00003.mp4",
                           [(0.0, 2.0), (0.25, 2.5), (1.75, 4.0), (None, None)])):
        for backend in ("decord", "pyav"):
            cfg = VideoConfig(backend=backend, fps=2.0, max_frames=6, size=32)
            got = decode_windows(str(path), windows, cfg)
            assert len(got) == len(windows)
            for (s, e), clip in zip(windows, got):
                if s == 50.0:  # past the 10 s video: skipped, with its reason, not an error
                    assert isinstance(clip, SkipClip) and "outside video" in clip.reason
                    continue
                want = decode_clip(str(path), s, e, cfg)
                assert clip.indices == want.indices
                np.testing.assert_array_equal(clip.mask, want.mask)
                np.testing.assert_array_equal(clip.frames, want.frames)
    with pytest.raises(SkipClip, match="missing file"):
        decode_windows(str(tmp_path / "nope.mp4"), [(0, 1)], VideoConfig())


def test_candidates_hold_a_timestamp_a_hair_off_the_millisecond_grid():
    """A timestamp under a microsecond from a whole millisecond (YouCook2's `uniform` rule draws
    full-precision floats): moved boundaries are whole milliseconds, and one at 3.0 does not hold
    t = 3.0000004 (nor a start at 3.0 t = 2.9999996). Such a clip, if chosen, was refused by the
    round's manifest ("timestamp outside [start, end]") after the whole scoring job, every time
    the run was resumed."""
    from clipray.manifest import check_row

    for t in (3.0000004, 2.9999996):
        got = candidates(2.0, 4.0, Bounds(0.0, t, 10.0), step_s=1.0, max_steps=1, min_width_s=0.5)
        # by hand: starts 1, 2, 3 and ends 3, 4, 5, those holding t
        want = [(s, e) for s in (1.0, 2.0, 3.0) for e in (3.0, 4.0, 5.0) if s <= t <= e]
        assert got[0] == (2.0, 4.0) and sorted(got) == sorted(want)
        for s, e in got:  # each is a valid training row of the round's manifest
            check_row({"video_id": "v", "path": "v.mp4", "caption": "c", "split": "train",
                       "start": s, "end": e, "timestamp": t}, "row")


def test_captions_left_out_are_counted_by_kind_not_one_count_per_video(tmp_path):
    """Stage 1 leaves out a caption whose timestamp is past its video's end, with the video's
    duration in the reason; the counts were of whole reasons, one per video (hundreds on one
    line for a big set, and in the error when none is usable). Real H.264 videos of 1.0 to
    1.5 s, probed (the manifest gives no duration)."""
    from clipray.config import EditConfig
    from clipray.manifest import write_manifest
    from clipray.synth import write_mp4
    from train.edit import initial_captions

    for i in range(6):
        write_mp4(tmp_path / f"v{i}.mp4", (np.zeros((16, 16, 3), np.uint8) for _ in range(8 + i)), 16, 16, 8)
    rows = [dict(video_id=f"v{i}", path=f"v{i}.mp4", caption=f"clip {i}", split="train", start=None, end=None,
                 timestamp=9.0) for i in range(6)]
    write_manifest(rows, tmp_path / "n.parquet")
    with pytest.raises(Exception, match=r"no training caption is usable \(\{\"timestamp past the video's end\": 6\}\)"):
        initial_captions(str(tmp_path / "n.parquet"), str(tmp_path), EditConfig(), "pyav")
    from train.edit import reason_counts

    write_manifest(rows[:4] + [dict(rows[4], timestamp=0.5), dict(rows[5], timestamp=0.5)], tmp_path / "m.parquet")
    captions, left_out = initial_captions(str(tmp_path / "m.parquet"), str(tmp_path), EditConfig(), "pyav")
    assert len(captions) == 2 and len({s["reason"] for s in left_out}) == 4  # each keeps its duration
    assert reason_counts(left_out) == {"timestamp past the video's end": 4}
    assert reason_counts([{"reason": "decode failed: frame 3 not found"}, {"reason": "unreadable video"},
                          {"reason": "decode failed: moov atom not found"}]) == {"decode failed": 2, "unreadable video": 1}


def test_a_caption_with_no_words_is_left_out_and_still_bounds_its_neighbours(tmp_path):
    """A training caption that keeps no word for the tokenizer (`&nbsp;`) is skipped by the
    decoders in every round, yet stage 1 kept it: the teacher edited it and every round's
    edited count, shift, tIoU and width counted it, and `left_out` did not list it. It is left
    out now, saying why; its timestamp still bounds its neighbours' clips (midpoint rule)."""
    from clipray.config import EditConfig
    from clipray.manifest import write_manifest
    from clipray.pipeline import NO_WORDS, caption_tokenizer
    from clipray.synth import write_mp4
    from train.edit import initial_captions

    write_mp4(tmp_path / "v.mp4", (np.zeros((16, 16, 3), np.uint8) for _ in range(80)), 16, 16, 8)  # 10 s
    rows = [dict(video_id="v", path="v.mp4", caption=c, split="train", start=None, end=None, timestamp=t)
            for c, t in (("a dog runs", 2.0), ("&nbsp;", 5.0), ("a cat sits", 8.0))]
    write_manifest(rows, tmp_path / "m.parquet")
    tokenize = caption_tokenizer("ViT-B-32", 32)
    captions, left_out = initial_captions(str(tmp_path / "m.parquet"), str(tmp_path), EditConfig(), "pyav", tokenize)
    assert [c.caption for c in captions.values()] == ["a dog runs", "a cat sits"]
    assert [(s["row_id"], s["reason"]) for s in left_out] == [(1, NO_WORDS)]
    # by hand, midpoints between neighbouring timestamps, the wordless one's included
    assert [c.clip for c in captions.values()] == [(0.0, 3.5), (6.5, 10.0)]
