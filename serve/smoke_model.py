"""A quick plain-PyTorch fit of a tiny registered model, exported in the serving format.

For tests and demos of serving only: real models come from the training app
(`python -m train ...` writes `<run>/export/`). A Ray Train run of the demo config takes minutes
on 2 cores; this fits `test_meanP` (32 px frames, width-64 towers) on the synthetic set's clips in
well under a minute, in one process, with the same symmetric contrastive objective, until a
caption finds its video. The synthetic whole-video rows and the single-event rows are both used,
so the model also learns what one event (one window of a longer video) looks like.

    fit_tiny([manifest, events_manifest], out_dir, steps=300) -> out_dir (an export)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from clipray.config import VideoConfig


def load_clips(manifests: Sequence[str], video: VideoConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every readable row of the manifests: frames [N,T,3,S,S] uint8, masks, captions."""
    from clipray.manifest import default_root, read_manifest, resolve_path
    from clipray.video import SkipClip, decode_clip_safe

    frames, masks, captions, cache = [], [], [], {}
    for m in manifests:
        root = default_root(m)
        for r in read_manifest(m).to_pylist():
            key = (resolve_path(r["path"], root), r["start"], r["end"])
            if key not in cache:
                try:
                    cache[key] = decode_clip_safe(*key, video)
                except SkipClip:
                    cache[key] = None
            if cache[key] is not None:
                frames.append(cache[key].frames)
                masks.append(cache[key].mask)
                captions.append(r["caption"])
    return np.stack(frames), np.stack(masks), captions


def fit_tiny(manifests: Sequence[str], out_dir: str | Path, name: str = "test_meanP", steps: int = 150,
             batch: int = 32, lr: float = 2e-3, seed: int = 0, video: VideoConfig | None = None,
             log_every: int = 0) -> Path:
    """Fit `name` on the manifests' clips and save it with `clipray.export.save_export`."""
    import torch

    from clipray.models import create_model

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    # one thread: on a shared 2-core machine, two spinning threads ran 3-10x slower than one
    torch.set_num_threads(1)
    try:
        return _fit(create_model(name), manifests, out_dir, steps, batch, lr, seed, video, log_every)
    finally:
        torch.set_num_threads(threads)


def _fit(model, manifests, out_dir, steps, batch, lr, seed, video, log_every) -> Path:
    import open_clip
    import torch
    import torch.nn.functional as F

    from clipray.export import save_export

    # The 49408 x 64 token table is most of the tiny model: kept fixed (random rows still tell
    # words apart), it makes each AdamW step several times cheaper.
    model.backbone.clip.token_embedding.weight.requires_grad_(False)
    video = dataclasses.replace(video or VideoConfig(fps=2.0, max_frames=8), size=model.image_size)
    frames, masks, captions = load_clips(manifests, video)
    tok = open_clip.get_tokenizer(model.tokenizer_name, context_length=32)
    uniq = sorted(set(captions))
    tokens = tok(uniq)
    cap_id = torch.tensor([uniq.index(c) for c in captions])
    x = model.normalize(torch.from_numpy(frames))
    m = torch.from_numpy(masks).bool()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:batch]
        # one row per caption in the batch: duplicates would be false negatives
        _, first = np.unique(cap_id[idx].numpy(), return_index=True)
        idx = idx[torch.from_numpy(np.sort(first))]
        v = model.encode_video(x[idx], m[idx])
        t = model.encode_text(tokens[cap_id[idx]])
        logits = model.logit_scale.exp().clamp(max=100) * t @ v.t()
        labels = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  fit_tiny step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    return save_export(model, out_dir, extra={"fit": "serve.smoke_model.fit_tiny", "steps": steps,
                                              "clips": len(x), "captions": len(uniq)})
