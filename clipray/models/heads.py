"""CLIP4Clip similarity heads: what turns per-frame features into text-video scores.

Loose heads (meanP, seqLSTM, seqTransf) make one video vector that does not depend on the text,
so videos can be embedded once and indexed: optional temporal module (added as a residual),
L2-normalise each frame, masked mean over valid frames, L2-normalise again. Scores are cosine
similarities; the loss multiplies them by exp(logit_scale).

tightTransf is a cross-encoder: [text EOT feature; T frame features] + position embeddings ->
4 transformer blocks -> first token -> LayerNorm -> Linear -> QuickGELU -> Linear(D, 1). It
scores (text, video) pairs and cannot be indexed.

The transformers of seqTransf and tightTransf start as copies of CLIP *text* blocks 0-3 and the
text position embedding (public CLIP4Clip code; the paper says "image", the author confirmed
the code, issue #60), with LayerNorm eps 1e-12 as in that code. Padding enters attention as an
additive mask of -1e6 per head, so padded frames get zero weight.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

CROSS_LAYERS = 4
CROSS_LN_EPS = 1e-12
MASK_VALUE = -1e6


def copy_text_blocks(clip: nn.Module, layers: int = CROSS_LAYERS) -> nn.ModuleList:
    """Independent copies of CLIP text blocks 0..layers-1, LayerNorm eps set to 1e-12."""
    blocks = clip.transformer.resblocks
    if len(blocks) < layers:
        raise ValueError(f"text tower has {len(blocks)} blocks; this head copies {layers}")
    out = nn.ModuleList(copy.deepcopy(blocks[i]) for i in range(layers))
    for m in out.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = CROSS_LN_EPS
    for p in out.parameters():  # a frozen backbone must not freeze the new head
        p.requires_grad_(True)
    return out


def copy_text_positions(clip: nn.Module) -> nn.Embedding:
    pos = clip.positional_embedding.detach()
    emb = nn.Embedding(pos.shape[0], pos.shape[1])
    with torch.no_grad():
        emb.weight.copy_(pos)
    return emb


def embed_dim_of(clip: nn.Module) -> int:
    proj = clip.text_projection
    return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[-1]


def _check_width(clip: nn.Module) -> int:
    width, dim = clip.transformer.width, embed_dim_of(clip)
    if width != dim:  # CLIP4Clip runs text blocks on D-dim frame features
        raise ValueError(f"text width {width} != embed dim {dim}: cannot reuse text blocks")
    return dim


def padding_attn_mask(mask: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """`[B, S]` valid mask -> additive `[B*heads, S, S]` mask, -1e6 on padded keys."""
    s = mask.shape[1]
    add = (1.0 - mask.to(torch.float32)).mul(MASK_VALUE).unsqueeze(1).expand(-1, s, -1)
    return add.repeat_interleave(heads, dim=0).to(dtype)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    attn = padding_attn_mask(mask, blocks[0].attn.num_heads, x.dtype)
    for blk in blocks:
        x = blk(x, attn_mask=attn)
    return x


def check_video_mask(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(torch.bool)
    if not bool(mask.any(dim=1).all()):
        # The reference gives NaN (meanP) or crashes (seqLSTM); such clips must be skipped
        # and reported upstream, never padded into a batch.
        raise ValueError("a clip has no valid frame (mask all zero)")
    return mask


class LooseHead(nn.Module):
    """Base of the indexable heads: temporal residual module + normalised masked mean."""

    indexable = True

    def temporal(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, frame_feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`[B, T, D]` frame features + `[B, T]` mask -> `[B, D]` L2-normalised video vectors."""
        mask = check_video_mask(mask.to(frame_feats.device))
        # the padded frames, zero, after normalising: in float16 (an export's dtype) F.normalize's
        # eps is 0, and their 0 / 0 made every clip with a padded frame NaN
        x = F.normalize(self.temporal(frame_feats, mask), dim=-1).masked_fill(~mask.unsqueeze(-1), 0)
        w = mask.to(x.dtype).unsqueeze(-1)
        return F.normalize((x * w).sum(1) / w.sum(1), dim=-1)

    def similarity(self, text: torch.Tensor, frame_feats: torch.Tensor, mask: torch.Tensor):
        return text @ self(frame_feats, mask).t()


class MeanP(LooseHead):
    """Parameter-free: the normalised mean of normalised frame features."""

    def __init__(self, clip: nn.Module | None = None):
        super().__init__()


class SeqLSTM(LooseHead):
    """One-layer LSTM(D, D) over the valid frames (packed), padded slots refilled with the
    input features, then added to the input."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        dim = embed_dim_of(clip)
        self.lstm = nn.LSTM(dim, dim, num_layers=1, batch_first=True, bidirectional=False)

    def temporal(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1)
        t = x.shape[1]
        prefix = torch.arange(t, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
        if not torch.equal(prefix, mask):  # packing by length assumes ones then zeros
            raise ValueError("seqLSTM needs masks that are a run of ones followed by zeros")
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=t)
        out = torch.where(mask.unsqueeze(-1), out.to(x.dtype), x)
        return out + x


class SeqTransf(LooseHead):
    """Frame position embedding + 4 CLIP-text-initialised blocks (no causal mask), residual."""

    def __init__(self, clip: nn.Module, layers: int = CROSS_LAYERS):
        super().__init__()
        _check_width(clip)
        self.frame_position_embeddings = copy_text_positions(clip)
        self.blocks = copy_text_blocks(clip, layers)

    def temporal(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.frame_position_embeddings.num_embeddings:
            raise ValueError(f"{t} frames > {self.frame_position_embeddings.num_embeddings} positions")
        h = x + self.frame_position_embeddings.weight[:t].to(x.dtype)
        return _run_blocks(self.blocks, h, mask) + x


class TightTransf(nn.Module):
    """Cross-encoder over [text EOT feature; frame features]; scores pairs, not indexable."""

    indexable = False

    def __init__(self, clip: nn.Module, layers: int = CROSS_LAYERS):
        super().__init__()
        from open_clip.transformer import QuickGELU

        dim = _check_width(clip)
        self.position_embeddings = copy_text_positions(clip)
        self.blocks = copy_text_blocks(clip, layers)
        self.ln_pool = nn.LayerNorm(dim, eps=CROSS_LN_EPS)
        self.dense = nn.Linear(dim, dim)
        self.act = QuickGELU()
        self.score = nn.Linear(dim, 1)
        for lin in (self.dense, self.score):  # fresh, BERT-style as the reference's cross model
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, text: torch.Tensor, frame_feats: torch.Tensor, mask: torch.Tensor):
        """Row-paired inputs: text `[N, D]`, frames `[N, T, D]`, mask `[N, T]` -> logits `[N]`."""
        mask = check_video_mask(mask.to(frame_feats.device))
        n, t = mask.shape
        if t + 1 > self.position_embeddings.num_embeddings:
            raise ValueError(f"1 + {t} frames > {self.position_embeddings.num_embeddings} positions")
        # The head's own dtype: stored float32 embeddings may meet a bf16 model at evaluation.
        dtype = self.score.weight.dtype
        x = torch.cat([text.unsqueeze(1).to(dtype), frame_feats.to(dtype)], dim=1)
        x = x + self.position_embeddings.weight[: t + 1].to(x.dtype)
        full = torch.cat([mask.new_ones(n, 1), mask], dim=1)  # the text position is always valid
        x = self.ln_pool(_run_blocks(self.blocks, x, full))
        h = self.act(self.dense(x[:, 0]))
        # the score in float32, whatever the model's dtype or autocast: a bf16 score keeps ~3
        # digits, so a query's candidates tie (a tie counts against it in R@k) or swap
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(h.float(), self.score.weight.float(), self.score.bias.float()).squeeze(-1)

    def similarity(self, text: torch.Tensor, frame_feats: torch.Tensor, mask: torch.Tensor):
        """Every text against every video: `[Nt, D]` x `[Nv, T, D]` -> `[Nt, Nv]` (Nt*Nv passes)."""
        nt, nv = text.shape[0], frame_feats.shape[0]
        txt = text.unsqueeze(1).expand(nt, nv, -1).reshape(nt * nv, -1)
        vid = frame_feats.unsqueeze(0).expand(nt, *frame_feats.shape).reshape(nt * nv, *frame_feats.shape[1:])
        msk = mask.unsqueeze(0).expand(nt, *mask.shape).reshape(nt * nv, -1)
        return self(txt, vid, msk).view(nt, nv)


HEADS: dict[str, type[nn.Module]] = {
    "meanP": MeanP,
    "seqLSTM": SeqLSTM,
    "seqTransf": SeqTransf,
    "tightTransf": TightTransf,
}


def build_head(name: str, clip: nn.Module) -> nn.Module:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    return HEADS[name](clip)
