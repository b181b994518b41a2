"""The training task: retrieval model + loss in one module, the thing `deepspeed.initialize` gets.

`RetrievalTask(model)(frames, frame_mask, tokens)` takes a batch exactly as the Ray Data
pipeline yields it (uint8 frames, so 4x less data crosses the object store; normalisation
happens here, on the worker's device) and returns `{"loss": scalar, "logit_scale": ...}`.
Which loss applies follows from the model: indexable heads use the gathered contrastive loss,
a cross-encoder its local pair loss.
"""

from __future__ import annotations

import torch
from torch import nn

from clipray.losses import ContrastiveLoss, PairLoss, scaled_temperature


class RetrievalTask(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss = ContrastiveLoss() if model.indexable else PairLoss()

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, tokens: torch.Tensor) -> dict:
        """frames uint8 `[B, T, 3, H, W]`, frame_mask `[B, T]` (bool or 0/1), tokens long `[B, L]`.

        Returns `loss` (scalar) and `logit_scale` (the temperature exp(logit_scale) actually
        used, detached, for logging; 1.0 for a cross-encoder, which has none)."""
        model = self.model
        device = model.logit_scale.device
        mask = frame_mask.to(device=device).bool()
        x = model.normalize(frames)
        text = model.encode_text(tokens.to(device))
        feats = model.encode_frames(x, mask)
        if model.indexable:
            loss = self.loss(text, model.pool_video(feats, mask), model.logit_scale)
            scale = scaled_temperature(model.logit_scale).detach().reshape(())
        else:
            loss = self.loss(model.similarity(text, feats, mask))
            scale = torch.ones((), device=device)
        return {"loss": loss, "logit_scale": scale}
