"""Evaluation on the test split inside the training workers.

Each worker embeds its shard of the test stream (texts and videos, in batches), the pieces are
gathered across workers, and every rank scores the joined set block-wise with the retrieval
metrics. Rows are tied back to clips through the manifest's `row_id`. A retrieval target is a
clip, (video_id, start, end): several captions of one clip (MSR-VTT's 20 per video) need no
special case, its embedding is taken once, from its first row; the segments of one video
(YouCook2, DiDeMo moments, the synthetic events) are targets of their own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from clipray.manifest import as_seconds, manifest_metadata, read_manifest
from clipray.metrics import retrieval_metrics, similarity_in_blocks


def _gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def embed_shard(model: Any, shard: Any, batch_size: int) -> dict[str, torch.Tensor]:
    """Embed this worker's share of the test stream: row ids, text and video embeddings."""
    rows, texts, videos, masks = [], [], [], []
    dev = model.logit_scale.device
    was = model.training
    model.eval()
    for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=False):
        mask = b["frame_mask"].to(dev).bool()
        feats = model.encode_frames(model.normalize(b["frames"].to(dev)), mask)
        videos.append((model.pool_video(feats, mask) if model.indexable else feats).float().cpu())
        texts.append(model.encode_text(b["tokens"].to(dev)).float().cpu())
        masks.append(mask.cpu())
        rows.append(b["row_id"].cpu())
    model.train(was)
    if not rows:
        return {}
    return {"row_id": torch.cat(rows), "text": torch.cat(texts), "video": torch.cat(videos),
            "mask": torch.cat(masks)}


def evaluate(model: Any, shard: Any, manifest: str, split: str, batch_size: int) -> dict[str, float]:
    """Metrics over the whole split, identical on every rank (all of them call this)."""
    parts = [p for p in _gather(embed_shard(model, shard, batch_size)) if p]
    if not parts:
        raise RuntimeError(f"no clip of the {split!r} split could be decoded; see the skip report")
    joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    order = torch.argsort(joined["row_id"])
    joined = {k: v[order] for k, v in joined.items()}
    table = read_manifest(manifest, columns=["row_id", "video_id", "start", "end", "caption"], split=split)
    ids = table.column("row_id").to_pylist()
    # a NaN time is the whole file, as a null is (the manifest and the decoder read both so); as
    # a key, every NaN differs from every other and each caption became a clip of its own
    times = [[as_seconds(t) for t in table.column(c).to_pylist()] for c in ("start", "end")]
    clip_of_row = dict(zip(ids, zip(table.column("video_id").to_pylist(), *times)))
    caption_of_row = dict(zip(ids, table.column("caption").to_pylist()))
    clips: dict[tuple, int] = {}
    first_row: list[int] = []
    video_of_text = []
    for i, rid in enumerate(joined["row_id"].tolist()):
        c = clip_of_row[rid]
        if c not in clips:
            clips[c] = len(clips)
            first_row.append(i)
        video_of_text.append(clips[c])
    idx = torch.tensor(first_row)
    sim = similarity_in_blocks(model, joined["text"], joined["video"][idx],
                               None if model.indexable else joined["mask"][idx])
    metrics = retrieval_metrics(sim, video_of_text)
    metrics["num_test_videos"] = len(clips)  # clips, strictly: the key predates moment manifests
    metrics["num_test_texts"] = len(video_of_text)
    if manifest_metadata(manifest).get("source") == "synthetic":
        captions = [caption_of_row[r] for r in joined["row_id"].tolist()]
        metrics.update(order_accuracy(sim.numpy(), video_of_text, captions))
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
