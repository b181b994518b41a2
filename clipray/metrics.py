"""Retrieval metrics and the block-wise evaluation helpers behind them.

`retrieval_metrics(sim, video_of_text)` is a pure function of a similarity matrix
`[num_texts, num_videos]` and each text's ground-truth video index, so several captions per
video need no special case:

- text-to-video: one rank per caption, among all videos;
- video-to-text: per video, the best rank among its own captions (all texts are candidates;
  the video's other captions are matches too, so they never count against it);
- rank = 1 + the number of OTHER candidates scoring >= the match, so ties count against the
  query (the reference gives tied rows several ranks, which inflates R@1), and exactly one rank
  per query;
- NaN anywhere is an error (the reference silently drops such rows).

Keys: t2v_r1, t2v_r5, t2v_r10 (percent), t2v_mdr (median rank), t2v_mnr (mean rank), and the
same for v2t_. Ranks are computed over row blocks, so no temporary as large as `sim` is built.

Helpers used by training evaluation and the serving index build: `embed_texts`,
`embed_videos` and `similarity_in_blocks` (texts x videos for indexable heads; cross-encoder pair
blocks for tightTransf, bounded by `pair_block` passes at a time). Dual softmax (DSL,
`retrieval_metrics_dsl`) is transductive (needs every query at once): training evaluation adds
it, under separate `dsl_` keys, only with `train.eval_dsl`.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

METRIC_KEYS = tuple(f"{d}_{m}" for d in ("t2v", "v2t") for m in ("r1", "r5", "r10", "mdr", "mnr"))
_BLOCK_ELEMS = 1 << 24  # elements of `sim` compared per step while ranking


def _rows_per_block(n_cols: int) -> int:
    return max(1, _BLOCK_ELEMS // max(1, n_cols))


def _as_inputs(sim, video_of_text) -> tuple[torch.Tensor, torch.Tensor]:
    sim = torch.as_tensor(sim)
    if not sim.is_floating_point():
        sim = sim.double()
    gt = torch.as_tensor(video_of_text).reshape(-1)
    if gt.is_floating_point() and not bool((gt == gt.round()).all()):  # long() would truncate
        raise ValueError("video_of_text must hold integer video indices")
    gt = gt.long()
    if sim.ndim != 2 or gt.shape[0] != sim.shape[0]:
        raise ValueError(f"sim {tuple(sim.shape)} needs one video index per text, got {gt.shape[0]}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:  # would give NaN means and medians, silently
        raise ValueError(f"sim {tuple(sim.shape)}: no text or no video to rank")
    if gt.numel() and (gt.min() < 0 or gt.max() >= sim.shape[1]):
        raise ValueError("video_of_text holds an index outside [0, num_videos)")
    return sim, gt


def _checked(block: torch.Tensor) -> torch.Tensor:
    if torch.isnan(block).any():  # checked per block: no full-size mask is ever built
        raise ValueError("similarity matrix contains NaN")
    return block


def t2v_ranks(sim, video_of_text) -> torch.Tensor:
    """1-based rank of each text's video among all videos (ties count against the text)."""
    sim, gt = _as_inputs(sim, video_of_text)
    out, rows = [], _rows_per_block(sim.shape[1])
    for i in range(0, sim.shape[0], rows):
        s = _checked(sim[i : i + rows])
        match = s.gather(1, gt[i : i + rows, None])
        out.append((s >= match).sum(1))  # counts the match itself: 1 + others >= it
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def v2t_ranks(sim, video_of_text) -> torch.Tensor:
    """1-based rank, per video, of its best-ranked own caption among all texts."""
    sim, gt = _as_inputs(sim, video_of_text)
    n_text, n_video = sim.shape
    if int((torch.bincount(gt, minlength=n_video) == 0).sum()):
        raise ValueError("some videos have no caption in video_of_text: no video-to-text rank")
    own = sim[torch.arange(n_text), gt]
    best = torch.full((n_video,), -float("inf"), dtype=sim.dtype)
    best = best.scatter_reduce(0, gt, own, reduce="amax")  # each video's best own caption
    # Only other videos' captions compete: a second caption of the same video (MSVD repeats
    # sentences verbatim) is also a correct answer, so tying with it is not a miss.
    ranks, rows = torch.ones(n_video, dtype=torch.long), _rows_per_block(n_video)
    cols = torch.arange(n_video)
    for i in range(0, n_text, rows):
        ahead = _checked(sim[i : i + rows]) >= best
        ranks += (ahead & (gt[i : i + rows, None] != cols)).sum(0)
    return ranks


def rank_summary(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    r = ranks.double().numpy()
    return {
        f"{prefix}_r1": float(100.0 * np.mean(r <= 1)),
        f"{prefix}_r5": float(100.0 * np.mean(r <= 5)),
        f"{prefix}_r10": float(100.0 * np.mean(r <= 10)),
        f"{prefix}_mdr": float(np.median(r)),
        f"{prefix}_mnr": float(np.mean(r)),
    }


def retrieval_metrics(sim, video_of_text) -> dict[str, float]:
    """R@1/5/10 (percent), median and mean rank, both directions (see module docstring)."""
    return {**rank_summary(t2v_ranks(sim, video_of_text), "t2v"), **rank_summary(v2t_ranks(sim, video_of_text), "v2t")}


def dual_softmax(sim: torch.Tensor, temperature: float = 100.0, dim: int = 0) -> torch.Tensor:
    """DSL re-weighting: `sim * softmax(temperature * sim, dim)`. dim=0 (a prior over texts per
    video) for text-to-video, dim=1 for video-to-text. Inference only; transductive. `sim` holds
    cosines (in [-1, 1]), as the method is defined on; a cross-encoder's logits do not rank
    under it (`train.eval_dsl` is refused for one, `train.driver.model_io`)."""
    # float64: in float32, exp(-100 * gap) underflows to 0 once two cosines differ by ~0.87,
    # and the pairs it zeroes tie with each other (a tie counts against the query)
    sim = torch.as_tensor(sim).double()
    return sim * F.softmax(sim * temperature, dim=dim)


def retrieval_metrics_dsl(sim, video_of_text, temperature: float = 100.0) -> dict[str, float]:
    t2v = t2v_ranks(dual_softmax(sim, temperature, dim=0), video_of_text)
    v2t = v2t_ranks(dual_softmax(sim, temperature, dim=1), video_of_text)
    both = {**rank_summary(t2v, "t2v"), **rank_summary(v2t, "v2t")}
    return {f"dsl_{k}": v for k, v in both.items()}


# ---- block-wise embedding and scoring ------------------------------------------------------
class _EvalMode:
    """no_grad + eval() for the duration, then the caller's mode back."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.grad = torch.no_grad()
        self.grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        self.grad.__exit__(*exc)


def _device(model) -> torch.device:
    return model.logit_scale.device


def embed_texts(model, tokens_iter: Iterable[torch.Tensor]) -> torch.Tensor:
    """Token batches `[b, L]` -> `[N, D]` float32 on CPU (normalised for indexable heads)."""
    out = []
    with _EvalMode(model):
        for tokens in tokens_iter:
            out.append(model.encode_text(torch.as_tensor(tokens).to(_device(model))).float().cpu())
    return torch.cat(out)


def embed_videos(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]):
    """(frames, mask) batches -> (embeddings, masks) on CPU. Frames may be uint8 (normalised
    here) or already normalised floats. Indexable heads give `[N, D]` video vectors, a
    cross-encoder `[N, T, D]` frame features (what its `similarity` needs)."""
    embs, masks = [], []
    with _EvalMode(model):
        for frames, mask in batches:
            frames = torch.as_tensor(frames).to(_device(model))
            mask = torch.as_tensor(mask).to(_device(model)).bool()
            # floats in the model's dtype, as normalize gives (a bf16 model refused fp32 frames)
            x = model.normalize(frames) if frames.dtype == torch.uint8 else frames.to(model.backbone.dtype)
            feats = model.encode_frames(x, mask)
            emb = model.pool_video(feats, mask) if model.indexable else feats
            embs.append(emb.float().cpu())
            masks.append(mask.cpu())
    return torch.cat(embs), torch.cat(masks)


def similarity_in_blocks(
    model,
    text_emb: torch.Tensor,
    video_emb: torch.Tensor,
    video_mask: Optional[torch.Tensor] = None,
    text_block: int = 1024,
    pair_block: int = 4096,
) -> torch.Tensor:
    """Full `[Nt, Nv]` float32 CPU score matrix, filled block by block on the model's device.

    `video_emb [Nv, D]` (indexable heads): text row blocks against all videos.
    `video_emb [Nv, T, D]` + `video_mask` (cross-encoder): at most `pair_block` pairs per call.
    """
    n_text, n_video = text_emb.shape[0], video_emb.shape[0]
    out = torch.empty(n_text, n_video, dtype=torch.float32)
    dev = _device(model)
    with _EvalMode(model):
        if video_emb.ndim == 2:
            # float32 products even under the training loop's bf16 autocast (GPU): bf16 scores
            # keep ~3 digits, so near neighbours tie (and ties count against the query) or swap,
            # and evaluation would rank otherwise than the float32 index that serves the model
            vids = video_emb.to(dev, torch.float32)
            with torch.autocast(dev.type, enabled=False):
                for i in range(0, n_text, text_block):
                    t = text_emb[i : i + text_block].to(dev, torch.float32)
                    out[i : i + text_block] = (t @ vids.t()).cpu()
            return out
        if video_mask is None:
            raise ValueError("a cross-encoder needs the frame mask of every video")
        tb = max(1, min(text_block, pair_block))
        vb = max(1, pair_block // tb)
        for i in range(0, n_text, tb):
            t = text_emb[i : i + tb].to(dev)
            for j in range(0, n_video, vb):
                v, m = video_emb[j : j + vb].to(dev), video_mask[j : j + vb].to(dev)
                out[i : i + tb, j : j + vb] = model.similarity(t, v, m).float().cpu()
    return out

