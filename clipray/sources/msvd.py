"""MSVD (the files of CLIP4Clip's `msvd_data.zip`) -> clip manifest.

`raw-captions.pkl` maps a clip id to its captions, each a list of word tokens, joined here with
single spaces as CLIP4Clip and mmaction2 do. Splits come from `train_list.txt`, `val_list.txt`,
`test_list.txt` (one clip id per line); every split keeps every caption, one row per (clip,
caption), `group` = clip id (val/test are multi-caption-per-video evaluation). Clips are whole
`.avi` files named `<youtube_id>_<start>_<end>`, found anywhere under the root by stem.

Safety: a pickle downloaded from the internet can run any code when loaded with `pickle.load`.
The captions file holds only dicts, lists and strings, which the pickle protocol rebuilds
without looking up any global; only classes and functions go through `Unpickler.find_class`.
`restricted_load` uses an unpickler whose `find_class` always raises, so the real file loads
and anything that would import or call code (os.system, numpy arrays, ...) is refused before
it runs. A `raw-captions.json` ({clip_id: [caption, ...]}) is read instead when no pickle is
there.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any, BinaryIO, Iterator

from clipray.sources.base import Context, SourceError, SourceSpec, open_binary, open_text, read_lines

SPLIT_FILES = (("train", "train_list.txt"), ("val", "val_list.txt"), ("test", "test_list.txt"))


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refused: the pickle references {module}.{name}; only plain dicts, lists, strings "
            "and numbers are loaded (a data file should not need code)")


def restricted_load(f: BinaryIO, name: str = "pickle") -> Any:
    """Unpickle builtins only; anything referencing a class or function raises SourceError."""
    try:
        return _NoGlobalsUnpickler(f).load()
    except Exception as e:  # malformed or hostile input fails in many ways; name the file
        raise SourceError(f"{name}: {e}") from None


def parse_clip_name(clip_id: str) -> tuple[str, int, int] | None:
    """('bQJQGoJF7_k', 162, 169) for 'bQJQGoJF7_k_162_169': split from the RIGHT, because
    YouTube ids themselves contain '_' and '-'. None when the name is not of that form."""
    parts = clip_id.rsplit("_", 2)
    if len(parts) != 3 or not parts[0]:
        return None
    try:
        return parts[0], int(parts[1]), int(parts[2])
    except ValueError:
        return None


def load_captions(path: str) -> dict[str, list]:
    name = os.path.basename(path)
    if path.endswith(".json"):
        with open_text(path) as f:
            try:
                data = json.load(f)
            except ValueError as e:
                raise SourceError(f"{name}: not valid JSON ({e})") from None
    else:
        with open_binary(path) as f:
            data = restricted_load(f, name)
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, list)
                                             for k, v in data.items()):
        raise SourceError(f"{name}: expected a dict of clip id -> list of captions")
    return data


def _join(caption: Any) -> Any:
    if isinstance(caption, list) and all(isinstance(t, str) for t in caption):
        return " ".join(t.strip() for t in caption if t.strip())
    return caption  # a plain string passes; anything else is rejected by ctx.caption


def rows(ctx: Context) -> Iterator[dict]:
    cap_path = ctx.find("raw-captions.pkl", "raw-captions.json")
    captions = load_captions(cap_path)
    cap_name = os.path.basename(cap_path)
    lists = [(split, ctx.find(fname)) for split, fname in SPLIT_FILES]
    files = ctx.files()
    ctx.metadata.update(captions_file=cap_name, caption_join="tokens joined with one space")
    sources: set[str] = set()
    for split, list_path in lists:
        list_name = os.path.basename(list_path)
        for i, vid in enumerate(dict.fromkeys(read_lines(list_path))):
            if vid not in captions:
                ctx.reject(f"{list_name} {vid}", f"listed but absent from {cap_name}")
                continue
            rel = files.by_stem(vid)
            if rel is None:
                ctx.missing(vid)
                continue
            parsed = parse_clip_name(vid)
            sources.add(parsed[0] if parsed else vid)
            if not captions[vid]:  # else the clip gave no row and nothing said so
                ctx.reject(f"{cap_name} {vid}", "no captions", category="clip with no captions")
                continue
            for j, tokens in enumerate(captions[vid]):
                where = f"{cap_name} {vid} caption {j}"
                caption = ctx.caption(_join(tokens), where)
                if caption is not None:
                    yield {"video_id": vid, "path": ctx.path(rel), "start": None, "end": None,
                           "caption": caption, "split": split, "group": vid, "_where": where}
    ctx.notes.append(f"clips come from {len(sources)} distinct YouTube videos")


SOURCE = SourceSpec(
    name="msvd", rows=rows, options={},
    summary="MSVD: raw-captions.pkl (restricted unpickler) + train/val/test lists",
)
