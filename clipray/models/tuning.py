"""Tuning methods: how the backbone towers are run and which of their parameters train.

A tuning method is a small module that sits between the retrieval model and its backbone. The
model never calls the towers directly; it calls `tuning.encode_text(backbone, tokens)` and
`tuning.encode_frames(backbone, frames, mask)`. That keeps the three axes independent:
backbone x head x tuning.

- `full`: everything trains (CLIP4Clip fine-tuning).
- `frozen`: backbone weights frozen and the towers run under `no_grad` (no activations kept for
  backward); the head and `logit_scale` still train.
- `unipt` (UniPT, Diao et al. CVPR 2024; facts in specs/unipt.md): the backbone frozen and run
  without autograd, returning its final embedding (the anchor) and every layer's residual
  stream; a small side network per tower reads those states and adds a residual to the anchor.
  Only the side networks (and the head's own parameters, if it has any) train, and no backbone
  activation is kept for backward, so training memory is close to inference's.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

TUNINGS: dict[str, type["Tuning"]] = {}


def register_tuning(name: str) -> Callable[[type["Tuning"]], type["Tuning"]]:
    def deco(cls: type["Tuning"]) -> type["Tuning"]:
        cls.name = name
        TUNINGS[name] = cls
        return cls

    return deco


class Tuning(nn.Module):
    """Base: run the towers as they are; subclasses change what trains and how towers run."""

    name = "base"
    # False: the backbone runs without autograd, so nothing inside it (the 3d patch included)
    # can train.
    trains_backbone = True

    def prepare(self, backbone: nn.Module) -> None:
        """Called once when the model is assembled (after weights are loaded)."""

    def encode_text(self, backbone: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return backbone.encode_text(tokens)

    def encode_frames(self, backbone: nn.Module, frames: torch.Tensor, mask: torch.Tensor):
        return backbone.encode_frames(frames, mask)


@register_tuning("full")
class FullTuning(Tuning):
    """Every parameter trains."""


@register_tuning("frozen")
class FrozenTuning(Tuning):
    """Backbone frozen and run without autograd; the head and the temperature train."""

    trains_backbone = False

    def prepare(self, backbone: nn.Module) -> None:
        for name, p in backbone.named_parameters():
            # logit_scale lives inside the open_clip module but belongs to the similarity,
            # not to an encoder; keeping it trainable also leaves meanP with a parameter.
            if name != "clip.logit_scale":
                p.requires_grad_(False)

    def encode_text(self, backbone: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return backbone.encode_text(tokens)

    def encode_frames(self, backbone: nn.Module, frames: torch.Tensor, mask: torch.Tensor):
        with torch.no_grad():
            return backbone.encode_frames(frames, mask)


class SideNetwork(nn.Module):
    """UniPT's side network for one tower: reads the frozen anchor `[N, D]` and the tower's
    layer states (`[N, tokens, W_i]` each), returns the residual `[N, D]` to add to the anchor.

    Per layer i: project the tokens to D (`T_i`), weight them by their non-negative affinity to
    the projected anchor, normalised to sum 1 (L1, no softmax), add the token at `pos` (text:
    end-of-text, vision: class token) -> `M_i`. Each layer's confidence is a linear score of
    anchor * (mean valid token); the layers are mixed by the softmax of those scores.
    """

    def __init__(self, dim: int, widths: list[int]):
        super().__init__()
        self.anchor = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(nn.Linear(w, dim) for w in widths)
        self.confidence = nn.Linear(dim, 1)
        self.out = nn.Linear(dim, dim)

    def forward(self, anchor: torch.Tensor, states: list[torch.Tensor], pos: torch.Tensor,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        if len(states) != len(self.layers):
            raise ValueError(f"side network built for {len(self.layers)} layers, got {len(states)}")
        a = self.anchor(F.relu(anchor))  # [N, D]
        rows = torch.arange(anchor.shape[0], device=anchor.device)
        n_tok = states[0].shape[1]
        m = (torch.ones(anchor.shape[0], n_tok, dtype=anchor.dtype, device=anchor.device)
             if token_mask is None else token_mask.to(anchor.dtype))  # [N, L]
        mixed, scores, eps = [], [], max(1e-12, torch.finfo(anchor.dtype).tiny)
        for proj, h in zip(self.layers, states):
            t = proj(F.relu(h.to(anchor.dtype)))  # [N, L, D]
            # a row of all-zero weights stays zero: F.normalize's eps (1e-12) is 0 in float16
            weights = F.normalize(F.relu(torch.einsum("nd,nld->nl", a, t) * m), p=1, dim=-1, eps=eps)
            mixed.append(torch.einsum("nl,nld->nd", weights, t) + t[rows, pos])
            mean = torch.einsum("nl,nld->nd", m, t) / m.sum(1, keepdim=True).clamp(min=1)
            scores.append(self.confidence(a * mean))  # [N, 1]
        conf = torch.softmax(torch.cat(scores, dim=-1), dim=-1)  # [N, layers]
        merged = torch.einsum("nk,knd->nd", conf, torch.stack(mixed))
        return self.out(F.relu(merged))


@register_tuning("unipt")
class UniPTTuning(Tuning):
    """UniPT: frozen backbone run under `no_grad`, one trained `SideNetwork` per tower."""

    trains_backbone = False

    def prepare(self, backbone: nn.Module) -> None:
        for p in backbone.parameters():  # logit_scale too, as in the reference
            p.requires_grad_(False)
        clip, dim = backbone.clip, backbone.embed_dim
        if not hasattr(clip.visual, "class_embedding"):
            raise NotImplementedError("tuning 'unipt' needs a ViT image tower")
        # States: the input to the first block plus each block's output.
        self.text = SideNetwork(dim, [clip.transformer.width] * (clip.transformer.layers + 1))
        vt = clip.visual.transformer
        self.vision = SideNetwork(dim, [vt.width] * (vt.layers + 1))

    def encode_text(self, backbone: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            anchor, states = backbone.encode_text(tokens, with_states=True)
        # The caption's tokens are those up to its end-of-text token. Not `tokens != 0`: zero is
        # the padding id but also a real token ("!" before another symbol, as in "wow!(").
        eot = backbone.eot_index(tokens)
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None] <= eot[:, None]
        return anchor + self.text(anchor, states, eot, valid)

    def encode_frames(self, backbone: nn.Module, frames: torch.Tensor, mask: torch.Tensor):
        with torch.no_grad():
            feats, states = backbone.encode_frames(frames, mask, with_states=True)
        b, t, d = feats.shape
        where = mask.to(dtype=torch.bool, device=feats.device).reshape(b * t).nonzero().squeeze(1)
        anchor = feats.reshape(b * t, d)[where]
        cls = torch.zeros(anchor.shape[0], dtype=torch.long, device=feats.device)
        out = feats.reshape(b * t, d).index_put((where,), anchor + self.vision(anchor, states, cls))
        return out.view(b, t, d)


def build_tuning(name: str) -> Tuning:
    if name not in TUNINGS:
        raise ValueError(f"unknown tuning {name!r}; choose one of {sorted(TUNINGS)}")
    return TUNINGS[name]()
