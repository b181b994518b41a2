"""`clipray bench model`: time per clip of each CLIP4Clip head, forward and forward+backward.

For every (size, head): build the registered model with random weights (no download), wrap it
in `RetrievalTask`, feed a fixed batch (uint8 frames with `--frames` frames per clip, all valid,
32-token captions) and time
  - forward: the training loss under `no_grad` (encoders + head + loss);
  - forward+backward: the same with autograd and `loss.backward()`.
One warm-up step of each first; the median and best wall time and the median process CPU time
of `--repeats` steps, divided by the batch size, are printed as a Markdown table. Sizes: `tiny` (the `test_*` models, 32 px) and `vitb32` (ViT-B/32 at
224 px, the paper's backbone). Runs on CPU unless `--device` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Optional, Sequence

from clipray.cli import at_least

SIZES = {"tiny": "test", "vitb32": "clip4clip_vitb32", "vitb16": "clip4clip_vitb16"}
HEADS = ("meanP", "seqLSTM", "seqTransf", "tightTransf")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipray bench model", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,vitb32", help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--heads", default=",".join(HEADS), help="comma list of heads")
    p.add_argument("--batch", type=at_least(1), default=2, help="clips per step")
    p.add_argument("--frames", type=at_least(1), default=12, help="frames per clip")
    p.add_argument("--words", type=at_least(1), default=32, help="tokens per caption")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed steps per measurement")
    p.add_argument("--threads", type=at_least(1), default=1,
                   help="torch threads (0 = torch default); 1 keeps CPU time meaningful on a shared machine")
    p.add_argument("--device", default="cpu")
    return p


def _seconds(step, repeats: int) -> tuple[float, float, float]:
    """(median wall, best wall, median CPU) seconds of `repeats` calls. On a shared machine the
    best wall time and the process CPU time (with one thread: the work itself) are the figures
    least disturbed by other processes."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), min(wall), statistics.median(cpu)


def bench_one(name: str, batch: int, frames: int, words: int, repeats: int, device: str) -> dict:
    import torch

    from clipray.models import create_model
    from clipray.task import RetrievalTask

    torch.manual_seed(0)
    model = create_model(name).to(device)
    task = RetrievalTask(model).train()
    size = model.image_size
    video = torch.randint(0, 256, (batch, frames, 3, size, size), dtype=torch.uint8, device=device)
    mask = torch.ones(batch, frames, dtype=torch.bool, device=device)
    tokens = torch.randint(1, 49000, (batch, words), device=device)
    tokens[:, 0], tokens[:, -1] = 49406, 49407  # start and end-of-text tokens

    def forward():
        with torch.no_grad():
            task(video, mask, tokens)["loss"].item()

    def forward_backward():
        task.zero_grad(set_to_none=True)
        task(video, mask, tokens)["loss"].backward()

    forward()  # warm-up: allocator, kernels, lazy imports
    forward_backward()
    fwd, fwd_bwd = _seconds(forward, repeats), _seconds(forward_backward, repeats)
    return {
        "model": name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "fwd_ms": [1000 * t / batch for t in fwd],
        "fwd_bwd_ms": [1000 * t / batch for t in fwd_bwd],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: never touch the network
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [s for s in args.sizes.split(",") if s]
    heads = [h for h in args.heads.split(",") if h]
    bad = [s for s in sizes if s not in SIZES] + [h for h in heads if h not in HEADS]
    if bad:
        print(f"unknown size/head: {', '.join(bad)}")
        return 2
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} "
          f"frames={args.frames} words={args.words} repeats={args.repeats} torch={torch.__version__}")
    print("| size | head | params (M) | forward ms/clip: wall median (best), CPU "
          "| forward+backward ms/clip: wall median (best), CPU |")
    print("|---|---|---:|---:|---:|")
    for size in sizes:
        for head in heads:
            r = bench_one(f"{SIZES[size]}_{head}", args.batch, args.frames, args.words, args.repeats, args.device)
            cells = [f"{m:.1f} ({b:.1f}), {c:.1f}" for m, b, c in (r["fwd_ms"], r["fwd_bwd_ms"])]
            print(f"| {size} | {head} | {r['params_m']:.1f} | {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
