"""`clipray bench train`: what Ray Train + DeepSpeed, and then Ray Data decoding, cost per step.

Same model, batch, optimiser and cores in one run:
  (a) a plain PyTorch loop in this process on pre-made tensors (the floor);
  (b) one Ray Train worker running the DeepSpeed engine (ZeRO-0) on the same pre-made tensors;
  (c) the same Ray Train loop fed from decoded synthetic video through the Ray Data pipeline.
The step gets `--threads` cores in every variant (it stands in for the GPU); in (c) the decode
actors run on the cores the step leaves, as CPU decode workers do beside a GPU.
Targets: (b)/(a) <= 1.10 and (c)/(b) <= 1.15. Steps after `--warmup` are timed; the median
step time is reported (start-up costs are listed apart, they are paid once per run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from clipray.bench import scratch_dir
from clipray.cli import at_least
from clipray.models import list_models


def _batch(model: Any, batch: int, frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = model.image_size
    return {"frames": torch.randint(0, 256, (batch, frames, 3, s, s), generator=g, dtype=torch.uint8),
            "frame_mask": torch.ones(batch, frames, dtype=torch.uint8),
            "tokens": torch.randint(1, 49000, (batch, 32), generator=g)}


def plain_loop(name: str, batch: int, frames: int, steps: int, warmup: int, threads: int) -> list[float]:
    from clipray.config import OptimConfig
    from clipray.models import create_model
    from clipray.task import RetrievalTask
    from train.ds_config import optimizer_and_schedule

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = create_model(name)
    task = RetrievalTask(model)
    opt, sched = optimizer_and_schedule(model, OptimConfig(), steps + warmup)
    b = _batch(model, batch, frames)
    times = []
    for i in range(steps + warmup):
        t = time.perf_counter()
        loss = task(b["frames"], b["frame_mask"], b["tokens"])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        opt.step()
        sched.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def _ray_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed engine, pre-made tensors or the dataset shard."""
    import ray.train

    from clipray.config import OptimConfig, TrainConfig
    from clipray.models import create_model
    from clipray.task import RetrievalTask
    from train import ds_config

    torch.manual_seed(0)
    torch.set_num_threads(config["threads"])
    model = create_model(config["model"])
    steps, warmup = config["steps"], config["warmup"]
    opt, sched = ds_config.optimizer_and_schedule(model, OptimConfig(), steps + warmup)
    engine = ds_config.initialize(RetrievalTask(model), opt, sched, TrainConfig(zero_stage=0), config["batch"])
    if config["from_video"]:
        it = iter(ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=config["batch"], drop_last=True, prefetch_batches=4))
        next_batch = lambda: next(it)  # noqa: E731
    else:
        b = _batch(model, config["batch"], config["frames"])
        next_batch = lambda: b  # noqa: E731
    times = []
    for i in range(steps + warmup):
        t = time.perf_counter()
        b = next_batch()
        loss = engine(b["frames"], b["frame_mask"], b["tokens"])["loss"]
        engine.backward(loss)
        engine.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    Path(config["out"]).write_text(json.dumps(times))


def ray_loop(name: str, batch: int, frames: int, steps: int, warmup: int, threads: int,
             manifest: str | None, work: Path, decode_cores: int = 1) -> tuple[list[float], float]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from clipray.config import DataConfig, VideoConfig
    from clipray.bench.data import repeated_manifest
    from clipray.models import create_model
    from clipray.pipeline import clip_dataset

    work.mkdir(parents=True, exist_ok=True)
    out = work / "times.json"
    datasets = {}
    if manifest:
        # enough clips for every step, in one manifest (a union of copies of the dataset
        # would start one decode pool per copy)
        rep = repeated_manifest(manifest, work / "repeated.parquet",
                                at_least=(steps + warmup + 2) * batch)
        size = create_model(name).image_size
        # decode actors, as the recipe configs run beside GPUs (and as the recorded figures
        # were measured), not DataConfig's default of tasks
        data = DataConfig(manifest=rep, video=VideoConfig(fps=3.0, max_frames=frames, size=size),
                          decode_pool="actors", decode_actors=decode_cores, decode_cpus=1.0,
                          decode_batch=batch)
        datasets["train"] = clip_dataset(data, str(work), split="train")
    t0 = time.perf_counter()
    TorchTrainer(_ray_loop, train_loop_config=dict(model=name, batch=batch, frames=frames, steps=steps,
                                                   warmup=warmup, threads=threads, out=str(out),
                                                   from_video=bool(manifest)),
                 scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
                 datasets=datasets,
                 run_config=ray.train.RunConfig(storage_path=str(work), name="bench")).fit()
    wall = time.perf_counter() - t0
    times = json.loads(out.read_text())
    return times, wall - sum(times)


def past_positions(name: str, frames: int) -> str | None:
    """What is wrong when --frames does not fit the model's head (seqTransf and tightTransf take
    one of CLIP's text positions per frame, tightTransf one more for the caption); None if it fits."""
    from clipray.models import check_frames, get_spec
    from clipray.models.backbone import open_clip_config, text_context

    spec = get_spec(name)
    ctx = text_context(open_clip_config(spec.open_clip_name))
    try:
        check_frames(spec.head, ctx, frames)
    except ValueError as e:
        return f"--frames {frames}: {name}: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clipray bench train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="test_meanP", choices=list_models(), metavar="MODEL",
                    help="a registered model (default: test_meanP): " + ", ".join(list_models()))
    ap.add_argument("--batch", type=at_least(1), default=32)
    ap.add_argument("--frames", type=at_least(1), default=8)
    ap.add_argument("--steps", type=at_least(1), default=60)
    ap.add_argument("--warmup", type=at_least(0), default=3)
    ap.add_argument("--threads", type=at_least(1), default=1,
                    help="cores (torch threads) for the training step in every variant")
    ap.add_argument("--decode-cores", type=at_least(1), default=None,
                    help="decode actors for (c), one core each (default: the cores the step leaves)")
    ap.add_argument("--videos", type=at_least(1), default=150, help="synthetic videos for (c)")
    args = ap.parse_args(argv)
    too_many = past_positions(args.model, args.frames)
    if too_many:  # else a ValueError traceback from (a)'s first step, after the videos and Ray
        ap.error(too_many)

    from clipray.runtime import check_fits, init_ray, quiet_data_progress, usable_cores
    from clipray.synth import generate

    init_ray(quiet=True)
    decode = args.decode_cores or max(1, usable_cores() - args.threads)
    # now, not after (a) and (b): what does not fit the embedded Ray would wait for CPUs forever
    check_fits({"--threads (the train worker)": float(args.threads),
                "--decode-cores (decode actors of (c), 1 CPU each)": float(decode)},
               advice="lower --threads or --decode-cores")
    quiet_data_progress()
    common = (args.model, args.batch, args.frames, args.steps, args.warmup, args.threads)
    with scratch_dir("clipray-bench-train-") as work:
        manifest = generate(work / "synth", videos=args.videos, seed=0, test_frac=0.0, val_frac=0.0)["manifest"]
        a = plain_loop(*common)
        b, b_start = ray_loop(*common, manifest=None, work=work / "b")
        c, c_start = ray_loop(*common, manifest=manifest, work=work / "c", decode_cores=decode)
    med = {k: statistics.median(v) for k, v in (("a", a), ("b", b), ("c", c))}
    print(f"clipray bench train: {args.model}, batch {args.batch} x {args.frames} frames, step on "
          f"{args.threads} core(s), (c) decodes on {decode} more; median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    print(f"{'variant':54} {'step ms':>8} {'clips/s':>8} {'ratio':>7}")
    rows = [("(a) plain PyTorch loop, pre-made tensors", "a", None, ""),
            ("(b) Ray Train + DeepSpeed ZeRO-0, pre-made tensors", "b", "a", f"  (start-up {b_start:.0f}s)"),
            ("(c) Ray Train + DeepSpeed fed by Ray Data decoding", "c", "b", f"  (start-up {c_start:.0f}s)")]
    for label, k, base, note in rows:
        ratio = f"{med[k] / med[base]:.2f}x" if base else "1.00x"
        print(f"{label:54} {1000 * med[k]:8.1f} {args.batch / med[k]:8.1f} {ratio:>7}{note}")
    print(f"targets: (b)/(a) <= 1.10 -> {med['b'] / med['a']:.2f}; (c)/(b) <= 1.15 -> {med['c'] / med['b']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
