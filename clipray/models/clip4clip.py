"""CLIP4Clip: a CLIP backbone + a similarity head + a tuning method, composed.

`CLIP4Clip` is the model interface that training, evaluation, serving and export code against:

    model.image_size, model.tokenizer_name, model.context_length, model.indexable
    model.normalize(frames_uint8)            [B,T,3,H,W] uint8 -> normalised float
    model.encode_text(tokens)                [N,L] -> [N,D] (L2-normalised; tight: raw EOT)
    model.encode_frames(frames, mask)        -> [B,T,D] per-frame features
    model.encode_video(frames, mask)         -> [B,D] L2-normalised (indexable heads only)
    model.pool_video(frame_feats, mask)      -> [B,D] from already encoded frames
    model.similarity(text_emb, frame_feats, mask) -> [Nt,Nv] (cosine; tight: cross-encoder)
    model.logit_scale                        nn.Parameter of shape [1]

No string branches on the head type: behaviour differs only through the head object
(`head.indexable`, `head.similarity`) and the tuning object.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipray.models.backbone import ClipBackbone
from clipray.models.tuning import Tuning


class CLIP4Clip(nn.Module):
    def __init__(self, backbone: ClipBackbone, head: nn.Module, tuning: Tuning, build_info: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.tuning = tuning
        # How this model was built: registry name, overrides, open_clip name and config.
        # `clipray.export` writes it so a model can be rebuilt with no download.
        self.build_info = dict(build_info)
        tuning.prepare(backbone)
        if not head.indexable:
            # A cross-encoder scores pairs without a temperature: frozen rather than left as a
            # trainable parameter that never gets a gradient.
            self.logit_scale.requires_grad_(False)

    # ---- facts the data pipeline and serving need ----------------------------------------
    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def context_length(self) -> int:
        """Longest token sequence `encode_text` accepts (shorter, e.g. 32 words, is fine)."""
        return self.backbone.context_length

    @property
    def tokenizer_name(self) -> str:
        return self.build_info["tokenizer_name"]

    @property
    def indexable(self) -> bool:
        return bool(self.head.indexable)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.backbone.clip.logit_scale

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    # ---- encoders --------------------------------------------------------------------------
    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        return self.backbone.normalize(frames)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        feats = self.tuning.encode_text(self.backbone, tokens.to(self.logit_scale.device))
        # The cross-encoder consumes the raw EOT feature, as in the reference.
        return F.normalize(feats, dim=-1) if self.indexable else feats

    def encode_frames(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.tuning.encode_frames(self.backbone, frames, mask.to(frames.device))

    def pool_video(self, frame_feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.indexable:
            raise TypeError(f"head {type(self.head).__name__} is a cross-encoder: no video vector; "
                            "keep frame features and call similarity()")
        return self.head(frame_feats, mask)

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.indexable:
            self.pool_video(frames, mask)  # raises with the explanation
        return self.pool_video(self.encode_frames(frames, mask), mask)

    def similarity(self, text_emb: torch.Tensor, frame_feats: torch.Tensor, mask: torch.Tensor):
        """Scores `[Nt, Nv]`: cosine for loose heads (no temperature), pair logits for tight."""
        return self.head.similarity(text_emb, frame_feats, mask.to(frame_feats.device))

    # ---- optimisation helpers ------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters split as the reference recipe does: `backbone` (CLIP weights
        and logit_scale, lr * coef_lr) and `new` (head, tuning modules, 3d patch conv, lr)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"backbone": [], "new": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            new = not name.startswith("backbone.clip.")
            groups["new" if new else "backbone"].append((name, p))
        return groups
