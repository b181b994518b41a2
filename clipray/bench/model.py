"""`clipray bench model`: cost per clip of each CLIP4Clip head and tuning method, forward and
forward+backward, in time and in memory kept for backward.

For every (size, head, tuning): build the registered model with random weights (no download),
wrap it in `RetrievalTask`, feed a fixed batch (uint8 frames with `--frames` frames per clip, all
valid, 32-token captions) and time
  - forward: the training loss under `no_grad` (encoders + head + loss);
  - forward+backward: the same with autograd and `loss.backward()`.
One warm-up step of each first; the median and best wall time and the median process CPU time
of `--repeats` steps, divided by the batch size, are printed as a Markdown table. Sizes: `tiny`
(the `test_*` models, 32 px) and `vitb32` (ViT-B/32 at 224 px, the paper's backbone). Runs on
CPU unless `--device` says otherwise, in fp32 unless `--dtype bf16` runs the model in bf16 (as
DeepSpeed's bf16 mode does). On CUDA each forward+backward is timed up to the GPU's finishing it.

Memory: "kept for backward" is the size of every tensor autograd saves during one training
forward (counted once per storage, parameters excluded), the activation memory a training step
holds at its peak on any device; what UniPT and frozen tuning cut. "trainable" counts the
parameters that get gradients and optimiser state. On CUDA the peak allocated memory of a
forward+backward step is printed as well. With `--rss`, each configuration also runs one
forward+backward step in a fresh process and prints how much that step raised the process's
peak resident memory: the CPU measurement of the same thing (activations, gradients, the
step's temporaries), independent of autograd's bookkeeping.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Optional, Sequence

from clipray.cli import at_least

SIZES = {"tiny": "test", "vitb32": "clip4clip_vitb32", "vitb16": "clip4clip_vitb16"}
HEADS = ("meanP", "seqLSTM", "seqTransf", "tightTransf")
TUNINGS = ("full", "frozen", "unipt")
DTYPES = ("fp32", "bf16")


def _usage(message: str) -> int:
    """A usage error as argparse gives one: on stderr, named by the command; exit status 2."""
    print(f"clipray bench model: error: {message}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipray bench model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,vitb32", help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--heads", default=",".join(HEADS), help="comma list of heads")
    p.add_argument("--tunings", default="full", help=f"comma list of {', '.join(TUNINGS)}")
    p.add_argument("--batch", type=at_least(1), default=2, help="clips per step")
    p.add_argument("--frames", type=at_least(1), default=12, help="frames per clip")
    p.add_argument("--words", type=at_least(1), default=32, help="tokens per caption")
    p.add_argument("--repeats", type=at_least(1), default=5, help="timed steps per measurement")
    p.add_argument("--threads", type=at_least(0), default=1,
                   help="torch threads (0 = torch default); 1 keeps CPU time meaningful on a shared machine")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="weights and activations: fp32, or bf16 as DeepSpeed's bf16 mode computes")
    p.add_argument("--rss", action="store_true",
                   help="also measure one step's rise in peak RSS, in a fresh process per row (CPU)")
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


def saved_for_backward(model, run_forward) -> int:
    """Bytes of the tensors autograd saves while `run_forward()` builds its graph, each storage
    once, the model's parameters left out (they are held anyway)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run_forward()
    del out
    return sum(saved.values())


def _inputs(model, batch: int, frames: int, words: int, device: str):
    import torch

    size = model.image_size
    video = torch.randint(0, 256, (batch, frames, 3, size, size), dtype=torch.uint8, device=device)
    mask = torch.ones(batch, frames, dtype=torch.bool, device=device)
    tokens = torch.randint(1, 49000, (batch, words), device=device)
    tokens[:, 0], tokens[:, -1] = 49406, 49407  # start and end-of-text tokens
    return video, mask, tokens


def _torch_dtype(dtype: str):
    import torch

    return torch.bfloat16 if dtype == "bf16" else torch.float32


def step_rss_mb(name: str, tuning: str, batch: int, frames: int, words: int, threads: int,
                dtype: str = "fp32") -> float:
    """Run in a fresh process: MiB by which one forward+backward step raises the resident set
    above what it was before the step (Linux: the peak is reset just before, and getrusage's
    ru_maxrss is no use here, since a spawned process inherits its parent's)."""
    import torch

    from clipray.models import create_model
    from clipray.runtime import proc_status_kb, reset_peak_rss
    from clipray.task import RetrievalTask

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    task = RetrievalTask(create_model(name, tuning=tuning).to(_torch_dtype(dtype))).train()
    inputs = _inputs(task.model, batch, frames, words, "cpu")
    reset_peak_rss()  # the peak (VmHWM) down to the current resident set (main checks it is Linux)
    before = proc_status_kb("VmRSS")
    task(*inputs)["loss"].backward()
    return (proc_status_kb("VmHWM") - before) / 1024


def bench_one(name: str, batch: int, frames: int, words: int, repeats: int, device: str,
              tuning: str = "full", dtype: str = "fp32") -> dict:
    import torch

    from clipray.models import create_model
    from clipray.task import RetrievalTask

    torch.manual_seed(0)
    model = create_model(name, tuning=tuning).to(device, _torch_dtype(dtype))
    task = RetrievalTask(model).train()
    video, mask, tokens = _inputs(model, batch, frames, words, device)
    cuda = torch.device(device).type == "cuda"

    def forward():
        with torch.no_grad():
            task(video, mask, tokens)["loss"].item()  # .item() waits for the GPU

    def forward_backward():
        task.zero_grad(set_to_none=True)
        task(video, mask, tokens)["loss"].backward()
        if cuda:  # backward() returns once its kernels are queued: time them, not their launch
            torch.cuda.synchronize()

    forward()  # warm-up: allocator, kernels, lazy imports
    forward_backward()
    kept = saved_for_backward(model, lambda: task(video, mask, tokens)["loss"])
    peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        forward_backward()
        peak = torch.cuda.max_memory_allocated()
    fwd, fwd_bwd = _seconds(forward, repeats), _seconds(forward_backward, repeats)
    return {
        "model": name,
        "tuning": tuning,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "kept_mb": kept / batch / 2**20,
        "peak_mb": None if peak is None else peak / 2**20,
        "fwd_ms": [1000 * t / batch for t in fwd],
        "fwd_bwd_ms": [1000 * t / batch for t in fwd_bwd],
    }


def _past_positions(sizes: Sequence[str], heads: Sequence[str], words: int, frames: int) -> Optional[str]:
    """What is wrong when --words or --frames do not fit a model's positions: captions get the
    text tower's context length, and seqTransf / tightTransf copy those positions for frames
    (tightTransf puts the caption in front of them)."""
    from clipray.models import get_spec
    from clipray.models.backbone import open_clip_config, text_context

    for size in sizes:
        for head in heads:
            name = f"{SIZES[size]}_{head}"
            ctx = text_context(open_clip_config(get_spec(name).open_clip_name))
            if words > ctx:
                return f"--words {words}: {name} reads captions of at most {ctx} tokens"
            most = {"seqTransf": ctx, "tightTransf": ctx - 1}.get(head)
            if most is not None and frames > most:
                return f"--frames {frames}: {name} has positions for at most {most} frames"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: never touch the network
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [s for s in args.sizes.split(",") if s]
    heads = [h for h in args.heads.split(",") if h]
    tunings = [t for t in args.tunings.split(",") if t]
    bad = ([s for s in sizes if s not in SIZES] + [h for h in heads if h not in HEADS]
           + [t for t in tunings if t not in TUNINGS])
    if bad:
        return _usage(f"unknown size/head/tuning: {', '.join(bad)}")
    if not (sizes and heads and tunings):  # else a header over an empty table, and exit 0
        return _usage("no size, head or tuning to measure: give comma lists (--sizes tiny --heads meanP --tunings full)")
    too_long = _past_positions(sizes, heads, args.words, args.frames)
    if too_long:  # else a ValueError traceback from the first model that cannot take them
        return _usage(too_long)
    try:
        cuda = torch.device(args.device).type == "cuda"
    except RuntimeError as e:  # "gpu0"
        return _usage(f"--device {args.device}: {e}")
    if cuda and not torch.cuda.is_available():
        return _usage(f"--device {args.device}: torch sees no CUDA GPU on this machine")
    gpus = torch.cuda.device_count() if cuda else 0
    if cuda and (torch.device(args.device).index or 0) >= gpus:  # else CUDA's "invalid device ordinal"
        return _usage(f"--device {args.device}: torch sees {gpus} CUDA GPU(s) on this machine, the last cuda:{gpus - 1}")
    if args.rss and (cuda or not os.path.exists("/proc/self/clear_refs")):
        return _usage("--rss measures CPU memory on Linux; leave it out with --device cuda or elsewhere")
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} batch={args.batch} "
          f"frames={args.frames} words={args.words} repeats={args.repeats} torch={torch.__version__}")
    print("| size | head | tuning | params (M) | trainable (M) | kept for backward (MiB/clip) |"
          + (" peak allocated (MiB/step) |" if cuda else "")
          + (" step's rise in peak RSS (MiB/clip) |" if args.rss else "")
          + " forward ms/clip: wall median (best), CPU | forward+backward ms/clip: wall median (best), CPU |")
    print("|---|---|---|---:|---:|---:|" + ("---:|" if cuda or args.rss else "") + "---:|---:|")
    for size in sizes:
        for head in heads:
            for tuning in tunings:
                r = bench_one(f"{SIZES[size]}_{head}", args.batch, args.frames, args.words, args.repeats,
                              args.device, tuning, args.dtype)
                cells = [f"{m:.1f} ({b:.1f}), {c:.1f}" for m, b, c in (r["fwd_ms"], r["fwd_bwd_ms"])]
                peak = f" {r['peak_mb']:.0f} |" if cuda else ""
                if args.rss:
                    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                        rss = pool.submit(step_rss_mb, f"{SIZES[size]}_{head}", tuning, args.batch,
                                          args.frames, args.words, args.threads, args.dtype).result()
                    peak = f" {rss / args.batch:.1f} |"
                print(f"| {size} | {head} | {tuning} | {r['params_m']:.1f} | {r['trainable_m']:.2f} | "
                      f"{r['kept_mb']:.1f} |{peak} {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
