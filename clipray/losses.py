"""Training losses of the retrieval models and the temperature clamp.

Loose heads (one vector per video): symmetric cross entropy over exp(logit_scale) * text @
video.T, with negatives from the whole global batch. Each worker all-gathers text and video
vectors with gradient flowing back to its own slice and scores only its local rows against the
global columns (open_clip `ClipLoss(local_loss=True, gather_with_grad=True)`). The mean of the
workers' losses equals the loss of one process on the joined batch, and so does the mean of
their gradients, which is what DeepSpeed's gradient averaging computes.
Every worker must hold the same number of clips per step (iterate with `drop_last=True`).

Cross-encoder (tightTransf): the B_t x B_v pair logits of the local batch, symmetric cross
entropy, no gather (every pair costs a transformer pass) and no temperature.

`logit_scale` is capped at ln(100): `clamp_logit_scale(model)` after every optimiser step, as
the reference does, and the forward also uses the clamped value, because with DeepSpeed's bf16 or
ZeRO optimisers the fp32 master copy, not the module parameter, is what the next step updates.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE_MAX = math.log(100.0)


def symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """`(CE(S, diag) + CE(S.T, diag)) / 2` for a square text x video logit matrix."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:  # the diagonal = matching pairs
        raise ValueError(f"logits must be square (one clip per caption), got {tuple(logits.shape)}")
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def scaled_temperature(logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale), its value capped at 100 in the forward, its gradient always that of
    exp(logit_scale): a clamp's gradient is 0 at its bound, and `clamp_logit_scale` leaves the
    parameter exactly there, so a temperature at the cap (CLIP's own) never moved again."""
    x = logit_scale.float()
    return (x - (x - x.clamp(max=LOGIT_SCALE_MAX)).detach()).exp()


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over globally gathered text/video vectors (loose heads)."""

    def __init__(self) -> None:
        super().__init__()
        self._clip_loss = None
        self._world_key: tuple[int, int] | None = None

    def forward(self, text: torch.Tensor, video: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        if text.shape[0] != video.shape[0]:
            raise ValueError(f"{text.shape[0]} texts vs {video.shape[0]} videos: pairs expected")
        scale = scaled_temperature(logit_scale)
        text, video = text.float(), video.float()  # bf16 logits over a global batch lose ranks
        rank, world = _world()
        if world == 1:
            return symmetric_cross_entropy(scale * text @ video.t())
        if self._world_key != (rank, world):  # the group is read lazily: Ray Train builds it
            from open_clip.loss import ClipLoss  # after the model may have been constructed

            # open_clip's gather_with_grad calls torch.distributed.nn.all_gather, which torch
            # marks deprecated with a FutureWarning every step: it drowned the progress line
            warnings.filterwarnings("ignore", category=FutureWarning,
                                    message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
            self._clip_loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
            self._world_key = (rank, world)
        # open_clip's "image" side is our video side; the loss is symmetric either way.
        return self._clip_loss(video, text, scale)


class PairLoss(nn.Module):
    """Symmetric cross entropy over cross-encoder pair logits of the local batch."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return symmetric_cross_entropy(logits.float())


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Cap the model's `logit_scale` at LOGIT_SCALE_MAX in place (call after each optimiser step).

    Accepts the retrieval model, a `RetrievalTask`, or a DeepSpeed engine wrapping either (an
    optimiser's fp32 copy is reached through the engine only). Under ZeRO-3 the parameter's local
    shard (`ds_tensor`) is clamped too.
    """
    optimizer = getattr(model, "optimizer", None)  # a DeepSpeed engine's
    target = model
    for attr in ("module", "model"):  # DeepSpeed engine -> task -> model
        while hasattr(target, attr) and not hasattr(target, "logit_scale"):
            target = getattr(target, attr)
    param = target.logit_scale
    param.data.clamp_(max=LOGIT_SCALE_MAX)
    shard = getattr(param, "ds_tensor", None)
    if shard is not None:
        shard.data.clamp_(max=LOGIT_SCALE_MAX)
    if not param.requires_grad:
        return
    # ZeRO (stages 1-3) and DeepSpeed's bf16 optimiser step an fp32 copy of the weights and copy
    # it over the parameter: capped only above, the copy went on growing past the cap while the
    # gradient pushed up, and the parameter stayed at the cap for as many steps after the
    # gradient turned. Each rank caps its own part of the copy (a clamp is elementwise).
    mapping = getattr(param, "_hp_mapping", None)  # ZeRO-1/2, the bf16 optimiser; None: not here
    if mapping is not None:
        mapping.get_hp_fragment().clamp_(max=LOGIT_SCALE_MAX)  # a view into the flat fp32 partition
    elif hasattr(param, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        local = safe_get_local_fp32_param(param)
        if local is not None:
            safe_set_local_fp32_param(param, local.clamp(max=LOGIT_SCALE_MAX))
    else:  # bf16 without ZeRO: DeepSpeed's unfused optimiser keeps one fp32 copy per parameter
        for low, high in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups", ())):
            for p, copy in zip(low, high):
                if p is param:
                    copy.data.clamp_(max=LOGIT_SCALE_MAX)
