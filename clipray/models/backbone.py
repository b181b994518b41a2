"""The CLIP backbone of every clipray retrieval model: open_clip towers, used frame by frame.

`ClipBackbone` wraps one `open_clip.CLIP` (any open_clip model name whose towers are a ViT or
ModifiedResNet image encoder and the standard text transformer) and adds what CLIP4Clip needs:

- frames `[B, T, 3, H, W]` encoded as independent images -> per-frame projected embeddings
  `[B, T, D]`; only valid frames run through the image tower, padded slots come back as zeros;
- the `3d` linear patch: a Conv3d (kernel (3, p, p), stride (1, p, p), temporal padding 1)
  inflated from the 2d patch kernel (centre time slice = 2d weights, outer slices zero), so at
  initialisation 3d == 2d; padded frames are zeroed before it, so they cannot leak into the last
  real frame once it has trained;
- text: the projected hidden state at the end-of-text token (largest token id), for any token
  length up to the model's context length (CLIP4Clip uses 32 or 64 words, not 77);
- on request (`with_states=True`), both towers also return every layer's residual stream,
  which UniPT's side networks read (clipray/models/tuning.py).

Weights come from `open_clip.create_model(name, pretrained=tag_or_path)`, the same call a user
makes, or from an explicit open_clip config dict (export reload, no download). `logit_scale` is
held with shape [1]: DeepSpeed 0.19.8 fails on 0-dim parameters; open_clip's `load_checkpoint`
reshapes the scalar of a stock checkpoint on load.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from clipray.models.heads import check_video_mask

TINY_OPEN_CLIP_NAME = "clipray-tiny"
_CONFIG_DIR = Path(__file__).parent / "configs"


def register_tiny_configs() -> None:
    """Make our tiny test towers known to open_clip (idempotent; called by the builders only,
    so importing clipray changes nothing in open_clip)."""
    import open_clip

    if TINY_OPEN_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR / f"{TINY_OPEN_CLIP_NAME}.json")


def open_clip_config(name: str) -> dict[str, Any]:
    """The open_clip model config dict of `name` (what an export stores to rebuild offline)."""
    import open_clip

    register_tiny_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    return cfg


def text_context(cfg: dict[str, Any]) -> int:
    """The text tower's positions of an open_clip config: a caption's most tokens, and the
    frames seqTransf / tightTransf can place (open_clip's default, 77, where it says none)."""
    return int(cfg.get("text_cfg", {}).get("context_length", 77))


def load_open_clip(
    name: str, pretrained: Optional[str] = None, cfg: Optional[dict[str, Any]] = None
) -> nn.Module:
    """An `open_clip.CLIP` with a [1]-shaped logit_scale.

    `pretrained`: an open_clip tag ("openai", "laion2b_s34b_b79k", ...) or a local checkpoint
    file, exactly as `open_clip.create_model` takes it; None = random init. `cfg`: build from this
    config dict instead of the registered one (then `pretrained` must be None).
    """
    import open_clip

    register_tiny_configs()
    if cfg is not None:
        if pretrained:
            raise ValueError("pass either an explicit open_clip cfg or pretrained weights, not both")
        cfg = copy.deepcopy(cfg)
        if cfg.pop("custom_text", False):
            raise NotImplementedError("open_clip CustomTextCLIP (HF text towers) is not supported")
        clip = open_clip.CLIP(**cfg, nonscalar_logit_scale=True)
    elif pretrained:
        clip = open_clip.create_model(name, pretrained=pretrained, nonscalar_logit_scale=True)
    else:  # random weights, as asked: open_clip's "No pretrained weights loaded" line (one per
        # training worker, evaluation and index actor) says only that
        quiet = _DropLine("No pretrained weights loaded for model ")
        logging.getLogger().addFilter(quiet)
        try:
            clip = open_clip.create_model(name, pretrained=None, nonscalar_logit_scale=True)
        finally:
            logging.getLogger().removeFilter(quiet)
    if not isinstance(clip, open_clip.CLIP):
        raise NotImplementedError(f"{name}: only open_clip.CLIP models are supported, got {type(clip)}")
    return clip


class _DropLine(logging.Filter):
    """Drops the log records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


class ClipBackbone(nn.Module):
    """open_clip CLIP towers applied per frame, with an optional inflated 3d patch embedding."""

    def __init__(self, clip: nn.Module, linear_patch: str = "2d"):
        super().__init__()
        import open_clip

        if linear_patch not in ("2d", "3d"):
            raise ValueError(f"linear_patch must be '2d' or '3d', got {linear_patch!r}")
        self.clip = clip
        self.linear_patch = linear_patch
        visual = clip.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.context_length = int(clip.context_length)
        self.embed_dim = int(clip.text_projection.shape[-1]) if not isinstance(
            clip.text_projection, nn.Linear) else int(clip.text_projection.out_features)

        pp = open_clip.get_model_preprocess_cfg(clip)
        mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = pp.get("std", open_clip.OPENAI_DATASET_STD)
        # Plain floats, not buffers: they follow from the config (checkpoints stay pure weights),
        # and `.to(torch.bfloat16)` would round a buffer's mean/std (0.4815 -> 0.4805).
        self.set_pixel_stats(mean, std)

        if linear_patch == "3d":
            conv2d = getattr(visual, "conv1", None)
            if not isinstance(conv2d, nn.Conv2d) or not hasattr(visual, "class_embedding"):
                raise NotImplementedError("linear_patch='3d' needs a ViT image tower")
            out_ch, in_ch, kh, kw = conv2d.weight.shape
            self.patch3d = nn.Conv3d(
                in_ch, out_ch, kernel_size=(3, kh, kw), stride=(1,) + tuple(conv2d.stride),
                padding=(1, 0, 0), bias=False,
            )
            with torch.no_grad():
                w = torch.zeros_like(self.patch3d.weight)
                w[:, :, 1] = conv2d.weight  # inflation: centre slice = 2d kernel, so 3d == 2d
                self.patch3d.weight.copy_(w)
            # The 2d kernel is unused in 3d mode. Frozen, so optimiser state and DeepSpeed's
            # gradient bookkeeping cover only parameters that get a gradient (it stays in the
            # state dict, so checkpoints keep the stock open_clip layout).
            conv2d.weight.requires_grad_(False)
        else:
            self.patch3d = None

    # ---- input ---------------------------------------------------------------------------
    def pixel_stats(self) -> dict[str, list[float]]:
        return {"mean": list(self._pixel_mean), "std": list(self._pixel_std)}

    def set_pixel_stats(self, mean: list[float], std: list[float]) -> None:
        """Restore the normalisation a pretrained tag chose (an export rebuilt from a bare
        config would otherwise fall back to the OpenAI mean/std)."""
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"pixel mean and std need 3 values each, got {list(mean)} and {list(std)}")
        self._pixel_mean, self._pixel_std = tuple(map(float, mean)), tuple(map(float, std))

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.token_embedding.weight.dtype

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, T, 3, H, W]` (0..255) -> float normalised with the model's mean/std, on
        the model's device and in its parameter dtype (computed in fp32 first)."""
        if frames.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 frames, got {frames.dtype}")
        device = self.clip.token_embedding.weight.device
        x = frames.to(device, non_blocking=True).float().div_(255.0)
        mean, std = (torch.tensor(v, device=device).view(1, 1, 3, 1, 1) for v in (self._pixel_mean, self._pixel_std))
        return ((x - mean) / std).to(self.dtype)

    # ---- towers --------------------------------------------------------------------------
    def encode_text(self, tokens: torch.Tensor, with_states: bool = False):
        """Token ids `[N, L]` (L <= context_length, zero padded) -> projected EOT feature
        `[N, D]` (not normalised). Position embedding and causal mask are cut to L, so
        32-word captions cost 32 positions, not 77. `with_states=True` also returns the
        residual stream of every layer, `[N, L, W]` x (blocks + 1): the input to the first
        block, then each block's output (what UniPT's side network reads)."""
        from open_clip.transformer import text_global_pool

        clip = self.clip
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [N, L], got shape {tuple(tokens.shape)}")
        n_tok = tokens.shape[-1]
        if n_tok > self.context_length:
            raise ValueError(f"{n_tok} tokens > context length {self.context_length}")
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:n_tok].to(cast)
        mask = clip.attn_mask[:n_tok, :n_tok] if clip.attn_mask is not None else None
        x, states = _run_blocks(clip.transformer, x, mask, with_states)
        x = clip.ln_final(x)
        # CLIP's pooling: the position of the largest token id, the end-of-text token.
        x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=clip.text_eos_id)
        proj = clip.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return (x, states) if with_states else x

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[N]` position of the token `encode_text` pools (the end-of-text token)."""
        pool = self.clip.text_pool_type
        if pool == "argmax":
            return tokens.argmax(dim=-1)
        if pool == "eos":
            return (tokens == self.clip.text_eos_id).int().argmax(dim=-1)
        raise NotImplementedError(f"text pooling {pool!r}: no single end-of-text position")

    def encode_frames(self, frames: torch.Tensor, mask: torch.Tensor, with_states: bool = False):
        """Normalised frames `[B, T, 3, H, W]` + mask `[B, T]` -> per-frame projected
        embeddings `[B, T, D]`; padded positions are exactly zero and never enter the tower.
        `with_states=True` (ViT towers only) also returns each layer's residual stream for the
        valid frames only, `[N_valid, tokens, W]` x (blocks + 1), in `mask`'s row-major order."""
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, T, 3, H, W], got shape {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        if tuple(mask.shape) != (b, t):
            raise ValueError(f"mask {tuple(mask.shape)} must be [B, T] = [{b}, {t}]")
        if tuple(frames.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"frames are {tuple(frames.shape[-2:])}, model wants {self.image_size}px")
        # before the tower: a batch with no valid frame at all gave it zero images and failed
        # inside with "cannot reshape tensor of 0 elements"
        valid = check_video_mask(mask.to(frames.device)).reshape(b * t)
        visual = self.clip.visual
        if with_states and not hasattr(visual, "class_embedding"):
            raise NotImplementedError("per-layer states need a ViT image tower")
        states = None
        if self.patch3d is not None:
            # Zero the padding first: the temporal kernel of the last real frame reads t+1. A
            # select, not a product: NaN * 0 is NaN, which reached the last real frame.
            x = frames.masked_fill(~valid.view(b, t, 1, 1, 1), 0)
            x = self.patch3d(x.transpose(1, 2))  # [B, W, T, g, g]
            x = x.transpose(1, 2).reshape(b * t, *x.shape[1:2], *x.shape[3:])
            feats, states = _vit_from_patches(visual, x[valid], with_states)
        elif with_states:
            images = frames.reshape(b * t, *frames.shape[2:])[valid]
            feats, states = _vit_from_patches(visual, visual.conv1(images), with_states)
        else:
            feats = visual(frames.reshape(b * t, *frames.shape[2:])[valid])
        out = feats.new_zeros(b * t, feats.shape[-1])
        out = out.index_put((valid.nonzero().squeeze(1),), feats)
        out = out.view(b, t, -1)
        return (out, states) if with_states else out


def _run_blocks(transformer: nn.Module, x: torch.Tensor, attn_mask, with_states: bool):
    """open_clip `Transformer` over `x`; with states, also [input, block 1 out, ...]."""
    if not with_states:
        return transformer(x, attn_mask=attn_mask), None
    out, inter = transformer.forward_intermediates(x, attn_mask=attn_mask)
    return out, [x, *inter]


def _vit_from_patches(visual: nn.Module, x: torch.Tensor, with_states: bool = False):
    """open_clip VisionTransformer.forward from the patch-embedding output `[N, W, g, g]` on:
    class token, position embedding, ln_pre, blocks, pooling, projection (same steps as
    `VisionTransformer._embeds` after `conv1`, so 3d at init reproduces 2d). Returns the
    projected features and the per-layer states (None unless `with_states`)."""
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(visual.patch_dropout(x))
    x, states = _run_blocks(visual.transformer, x, None, with_states)
    pooled, _ = visual._pool(x)
    return (pooled @ visual.proj if visual.proj is not None else pooled), states
