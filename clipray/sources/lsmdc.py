"""LSMDC (LSMDC 2016 challenge files; access needs MPII's permission) -> clip manifest.

Each `.csv` is in fact TAB-separated, without a header, exactly 6 fields a line:
`clip_id, start_aligned, end_aligned, start_extracted, end_extracted, sentence`, times written
`hh.mm.ss.mmm` (positions in the whole movie). A clip id is NOT unique — several sentences can
describe one clip — so every line is a row (a dict keyed by clip id would silently keep only
the last sentence). Lines with another number of fields or unreadable times are rejected.

Splits (CLIP4Clip's): train = `LSMDC16_annos_training.csv`, val = `LSMDC16_annos_val.csv`, test
= the 1,000-clip retrieval set `LSMDC16_challenge_1000_publictect.csv` (sic), or with
`test_set="public"` the public test `LSMDC16_annos_test.csv`.

Video file: `<root>/<NNNN>_<MOVIE>/<clip_id>.avi`, the folder being the clip id minus its
trailing `_<start>-<end>` (split once from the right: movie names contain '_'); a clip stored
elsewhere under the root is found by stem, as CLIP4Clip does. Rows are whole clip files
(start/end null); `duration` = end_extracted - start_extracted, the length of the cut file.
"""

from __future__ import annotations

import os
import re
from typing import Iterator

from clipray.sources.base import Context, SourceSpec, open_text

SPLIT_FILES = {"train": "LSMDC16_annos_training.csv", "val": "LSMDC16_annos_val.csv"}
TEST_FILES = {"1000": "LSMDC16_challenge_1000_publictect.csv", "public": "LSMDC16_annos_test.csv"}
_TIME = re.compile(r"(\d+)\.(\d{1,2})\.(\d{1,2})\.(\d+)")


def parse_time(text: str) -> float:
    """Seconds of an `hh.mm.ss.mmm` time: '01.02.27.034' -> 3747.034. ValueError if malformed."""
    m = _TIME.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"time {text!r} is not hh.mm.ss.mmm")
    h, mnt, s, frac = m.groups()
    return int(h) * 3600 + int(mnt) * 60 + int(s) + int(frac) / 10 ** len(frac)


def clip_folder(clip_id: str) -> str:
    """'0005_Some_Movie_00.01.02.345-00.01.05.678' -> '0005_Some_Movie'."""
    return clip_id.rsplit("_", 1)[0]


def rows(ctx: Context) -> Iterator[dict]:
    test_name = TEST_FILES[ctx.options["test_set"]]
    paths = [(split, ctx.find(fname)) for split, fname in (*SPLIT_FILES.items(), ("test", test_name))]
    files = ctx.files()
    ctx.metadata.update(test_file=test_name, folder_rule="clip id minus trailing _<start>-<end>")
    for split, path in paths:
        name = os.path.basename(path)
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                where = f"{name} line {lineno}"
                fields = line.split("\t")
                while len(fields) > 6 and not fields[-1].strip():
                    fields.pop()  # a stray tab at the line's end (CLIP4Clip's reader strips the line)
                if len(fields) != 6:
                    ctx.reject(where, f"expected 6 tab-separated fields, got {len(fields)}",
                               category="not 6 tab-separated fields")
                    continue
                clip_id = fields[0].strip().strip('"')  # a stray '"' is seen in some copies
                if not clip_id:  # else said a missing video of no name, the line not named
                    ctx.reject(where, "no clip id in the first field", category="no clip id")
                    continue
                try:
                    times = [parse_time(t) for t in fields[1:5]]
                except ValueError as e:
                    ctx.reject(where, str(e), category="time not hh.mm.ss.mmm")
                    continue
                caption = ctx.caption(fields[5], where)
                if caption is None:
                    continue
                rel = f"{clip_folder(clip_id)}/{clip_id}.avi"
                if rel not in files:
                    rel = files.by_stem(clip_id)
                if rel is None:
                    ctx.missing(clip_id)
                    continue
                cut = round(times[3] - times[2], 3)
                yield {"video_id": clip_id, "path": ctx.path(rel), "start": None, "end": None,
                       "caption": caption, "split": split, "group": clip_id,
                       "duration": cut if cut > 0 else None, "_where": where}


SOURCE = SourceSpec(
    name="lsmdc", rows=rows, options={"test_set": "1000"}, choices={"test_set": ("1000", "public")},
    summary="LSMDC 2016: tab-separated training/val files, 1,000-clip retrieval test",
)
