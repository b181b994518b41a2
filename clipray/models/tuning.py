"""Tuning methods: how the backbone towers are run and which of their parameters train.

A tuning method is a small module that sits between the retrieval model and its backbone. The
model never calls the towers directly; it calls `tuning.encode_text(backbone, tokens)` and
`tuning.encode_frames(backbone, frames, mask)`. That keeps the three axes independent:
backbone x head x tuning.

- `full`: everything trains (CLIP4Clip fine-tuning).
- `frozen`: backbone weights frozen and the towers run under `no_grad` (no activations kept for
  backward); the head and `logit_scale` still train.
- `unipt` (to come, see specs/unipt.md): subclass `Tuning`, hold the side networks as
  submodules, run the backbone under `no_grad` for its intermediate states
  (`backbone.clip.forward_intermediates` / `visual.forward_intermediates`), return the anchor
  plus the side-network residual, and register with `@register_tuning("unipt")`.
"""

from __future__ import annotations

from typing import Callable

import torch
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


def build_tuning(name: str) -> Tuning:
    if name not in TUNINGS:
        raise ValueError(f"unknown tuning {name!r}; choose one of {sorted(TUNINGS)}")
    return TUNINGS[name]()
