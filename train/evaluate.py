"""Evaluation on the test split inside the training workers.

Each worker embeds its shard of the test stream (texts and videos, in batches), the pieces are
gathered across workers, and every rank scores the joined set block-wise with the retrieval
metrics. Rows are tied back to clips through the manifest's `row_id`. A retrieval target is a
clip, (video_id, start, end), decoded once, from its first row (`first_rows`: MSVD's ~40
captions per test video were ~40 decodes of it); every row's caption is a query, tokenized from
the manifest and embedded a share per worker. The segments of one video (YouCook2, DiDeMo
moments, the synthetic events) are targets of their own.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from clipray.manifest import as_seconds, manifest_metadata, read_manifest
from clipray.metrics import embed_texts, embed_videos, retrieval_metrics, retrieval_metrics_dsl, similarity_in_blocks
from clipray.pipeline import wordless


def _gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def read_split(manifest: str, split: str) -> tuple[list[int], list[tuple], list[str]]:
    """The split's row ids (ascending), each row's clip (video_id, start, end) and caption."""
    table = read_manifest(manifest, columns=["row_id", "video_id", "start", "end", "caption"],
                          split=split).sort_by("row_id")
    # a NaN time is the whole file, as a null is (the manifest and the decoder read both so); as
    # a key, every NaN differs from every other and each caption became a clip of its own
    times = [[as_seconds(t) for t in table.column(c).to_pylist()] for c in ("start", "end")]
    clips = list(zip(table.column("video_id").to_pylist(), *times))
    return table.column("row_id").to_pylist(), clips, table.column("caption").to_pylist()


def has_words(captions: list[str], tokenize: Callable[[list[str]], Any]) -> list[bool]:
    """Whether each caption keeps a word once cleaned for the tokenizer. The decoders skip a row
    whose caption keeps none (`pipeline.NO_WORDS`: `&nbsp;`, control characters), and
    evaluation leaves such a caption out as a query and as the row its clip is decoded from."""
    out: list[bool] = []
    for s in range(0, len(captions), 4096):
        out += (~wordless(tokenize(captions[s:s + 4096]), tokenize)).tolist()
    return out


def first_rows(manifest: str, split: str, tokenize: Callable[[list[str]], Any]) -> list[int] | None:
    """The rows whose videos evaluation decodes: each clip's first whose caption has words (a
    row without is skipped by the decoder, and its clip with it); None when every row is a
    clip of its own (nothing to leave out)."""
    ids, clips, captions = read_split(manifest, split)
    first: dict[tuple, int] = {}
    for rid, clip, words in zip(ids, clips, has_words(captions, tokenize)):
        if words:
            first.setdefault(clip, rid)
    return None if len(first) == len(ids) else sorted(first.values())


def clip_name(clip: tuple) -> str:
    """A clip key (video_id, start, end) as a message names it: 'v3', or 'v3' 2-4.5 s."""
    vid, start, end = clip
    if start is None and end is None:
        return repr(vid)
    return f"{vid!r} {start or 0:g}-{'end' if end is None else f'{end:g}'} s"


def check_finite(emb: torch.Tensor, split: str, what: str, name: Callable[[int], str]) -> None:
    """A NaN or inf embedding is an error naming its clip or caption (`name(i)`): the metrics
    refused the NaN scores it gives (`similarity matrix contains NaN`), and named nothing."""
    bad = (~torch.isfinite(emb.reshape(len(emb), -1)).all(1)).nonzero().flatten()
    if len(bad):
        raise RuntimeError(f"evaluation on the {split!r} split: the model's embedding of {len(bad)} of {len(emb)} "
                           f"{what} is not finite (NaN/inf), the first {name(int(bad[0]))}")


def shard_videos(model: Any, shard: Any, batch_size: int) -> dict[str, torch.Tensor]:
    """Embed this worker's share of the test clips (`metrics.embed_videos`): row ids, video
    embeddings (a tight head's frame features) and frame masks; {} for an empty share."""
    rows: list[torch.Tensor] = []

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=False):
            rows.append(b["row_id"])
            yield b["frames"], b["frame_mask"]

    it = batches()
    first = next(it, None)
    if first is None:
        return {}
    video, mask = embed_videos(model, itertools.chain([first], it))
    return {"row_id": torch.cat(rows), "video": video, "mask": mask}


def caption_embeddings(model: Any, captions: list[str], tokenize: Callable[[list[str]], Any],
                       batch_size: int) -> tuple[list[int], torch.Tensor]:
    """The indices (ascending) and embeddings (`metrics.embed_texts`) of the captions that keep a
    word once tokenized (`pipeline.wordless`: as queries the others were the empty text). Each
    worker tokenizes, once, and embeds every world-th caption, then all gather."""
    rank, world = _rank_world()
    mine = list(range(rank, len(captions), world))
    tokens = [torch.as_tensor(tokenize([captions[i] for i in mine[s:s + batch_size]]))
              for s in range(0, len(mine), batch_size)]
    words = [torch.from_numpy(~wordless(t, tokenize)) for t in tokens]
    kept = [i for i, w in zip(mine, torch.cat(words).tolist()) if w] if words else []
    batches = [t[w] for t, w in zip(tokens, words) if w.any()]
    full: dict[int, torch.Tensor] = {}
    for idx, emb in _gather((kept, embed_texts(model, batches) if batches else torch.empty(0))):
        full.update(zip(idx, emb))
    order = sorted(full)
    return order, torch.stack([full[i] for i in order])


def evaluate(model: Any, shard: Any, manifest: str, split: str, batch_size: int,
             tokenize: Callable[[list[str]], Any], dsl: bool = False) -> dict[str, float]:
    """Metrics over the whole split, identical on every rank (all of them call this). `shard`:
    this worker's share of the split's decoded clips (`first_rows` of it, or every row);
    `tokenize`: the captions' tokenizer, as the training batches are cut; `dsl`
    (`train.eval_dsl`, an indexable head's cosines only): also the dual-softmax `dsl_*` ranks."""
    parts = [p for p in _gather(shard_videos(model, shard, batch_size)) if p]
    if not parts:
        raise RuntimeError(f"no clip of the {split!r} split could be decoded; see the skip report")
    joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    order = torch.argsort(joined["row_id"])
    joined = {k: v[order] for k, v in joined.items()}
    ids, clips_of, captions = read_split(manifest, split)
    clip_of_row = dict(zip(ids, clips_of))
    clips: dict[tuple, int] = {}  # each decoded clip's column: its first decoded row's
    first_row: list[int] = []
    for i, rid in enumerate(joined["row_id"].tolist()):
        c = clip_of_row[rid]
        if c not in clips:
            clips[c] = len(clips)
            first_row.append(i)
    # the queries: every caption of a clip that decoded (a skipped clip's leave with it), less
    # those the tokenizer cleans to no words, which were ranked as the empty text
    ours = [i for i, c in enumerate(clips_of) if c in clips]
    kept, texts = caption_embeddings(model, [captions[i] for i in ours], tokenize, batch_size)
    queries = [ours[k] for k in kept]
    video_of_text = [clips[clips_of[i]] for i in queries]
    idx = torch.tensor(first_row)
    video, names = joined["video"][idx], list(clips)
    check_finite(video, split, "clips", lambda i: f"clip {clip_name(names[i])}")
    check_finite(texts, split, "captions", lambda i: f"caption {captions[queries[i]]!r} "
                 f"(clip {clip_name(clips_of[queries[i]])})")
    sim = similarity_in_blocks(model, texts, video, None if model.indexable else joined["mask"][idx])
    metrics = retrieval_metrics(sim, video_of_text)
    if dsl:
        metrics.update(retrieval_metrics_dsl(sim, video_of_text))
    metrics["num_test_videos"] = len(clips)  # clips, strictly: the key predates moment manifests
    metrics["num_test_texts"] = len(video_of_text)
    if manifest_metadata(manifest).get("source") == "synthetic":
        metrics.update(order_accuracy(sim.numpy(), video_of_text, [captions[i] for i in queries]))
    return metrics


def order_accuracy(sim: np.ndarray, video_of_text: list[int], captions: list[str]) -> dict[str, float]:
    """Synthetic twins: for each caption of a two-event video whose swapped twin is also in the
    test set, does the caption score its own video strictly above the twin? Order-blind pooling
    scores both alike (a tie counts as a miss), so 0.5 is not reachable by chance alone."""
    by_caption = {c: v for c, v in zip(captions, video_of_text)}
    hits = total = 0
    for t, (c, v) in enumerate(zip(captions, video_of_text)):
        parts = c.split(", then ")
        twin = by_caption.get(", then ".join(reversed(parts))) if len(parts) > 1 else None
        if twin is None or twin == v:
            continue
        total += 1
        hits += bool(sim[t, v] > sim[t, twin])
    return {"order_acc": 100.0 * hits / total, "order_pairs": total} if total else {}
