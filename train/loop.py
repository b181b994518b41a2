"""The per-worker training function: one linear story, run by every Ray Train worker.

build model + task -> deepspeed.initialize -> resume from ray.train.get_checkpoint() ->
for each epoch: stream batches from the dataset shard, engine.backward / engine.step, clamp
logit_scale -> evaluate -> every rank saves its DeepSpeed shard -> ray.train.report(metrics,
checkpoint). The last report also carries the model exported for serving.

Workers stay in lock-step: before each step they agree (one tiny all-reduce) that every worker
still has a batch, so a shard that came up short (skipped clips) ends the epoch for all instead
of leaving the others waiting in a collective forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from clipray.config import Config
from clipray.runtime import proc_status_kb, reset_peak_rss

STATE = "state.json"  # epoch, step and the metric history, beside the DeepSpeed shards
TAG = "deepspeed"


def say(msg: str) -> None:
    """Rank 0's lines to the driver. Ray Train patches `print` to tee into its logger, which
    shows every line twice on the driver; a plain stream write is forwarded once."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def collective_device() -> torch.device:
    """Where a tensor handed to a collective must live: the CPU when the process group has a
    backend for CPU tensors (gloo), else this worker's GPU. NCCL, the group on GPU workers,
    serves CUDA tensors only; a CPU tensor fails with "No backend type associated with device
    type cpu" (the first GPU run did, at its first batch)."""
    devices = {part.split(":")[0] for part in dist.get_backend_config().split(",")}
    return torch.device("cpu") if "cpu" in devices else torch.device("cuda", torch.cuda.current_device())


def _all_have(has_batch: bool) -> bool:
    """Whether every worker has a batch this step (so all of them step, or none)."""
    if not dist.is_initialized():
        return has_batch
    flag = torch.tensor([1 if has_batch else 0], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _mean_over_workers(loss: torch.Tensor) -> float:
    """The step's loss over the global batch. Each worker's contrastive loss scores only its own
    rows (against every worker's columns) and a cross-encoder's only its own pairs, so the
    batch's loss is the mean of the workers' (clipray.losses); rank 0's alone is one share."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return loss.item()
    t = loss.detach().float().reshape(1).to(collective_device())
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _full_params(engine: Any, stage: int):
    """ZeRO-3 partitions every parameter; export needs them whole."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def eval_model(engine: Any, cfg: Config, replica: Any) -> Any:
    """The model to evaluate. Under ZeRO-3 every forward all-gathers parameters, and ranks
    with unequal test shards would issue different numbers of collectives (a deadlock or a
    gloo size mismatch), so evaluation runs on a plain replica holding the gathered weights."""
    if cfg.train.zero_stage != 3:
        return engine.module.model
    with _full_params(engine, 3):
        state = {k: v.detach().clone() for k, v in engine.module.model.state_dict().items()}
    replica.load_state_dict(state)
    return replica


class EpochClock:
    """Where an epoch's wall time went: waiting for the next batch, or elsewhere (the step,
    agreeing with the other workers). The first wait is also kept apart: it carries the data
    pipeline's start-up, which Ray Data pays again every epoch. A run whose later waits are a
    large share of the epoch is short of decode cores (README, "The data pipeline and sizing
    decode workers")."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.t0 = clock()
        self.wait, self.first = 0.0, None

    @contextlib.contextmanager
    def waiting(self):
        t = self.clock()
        try:
            yield
        finally:
            dt = self.clock() - t
            self.wait += dt
            if self.first is None:
                self.first = dt

    def summary(self, clips: int) -> dict[str, float]:
        """Seconds of the epoch, of its waits and of its first wait; clips/s over the whole epoch
        and over the time outside the waits (what the step would sustain if never starved)."""
        total = self.clock() - self.t0
        busy = max(total - self.wait, 1e-9)
        return {"epoch_s": total, "data_wait_s": self.wait, "first_batch_s": self.first or 0.0,
                "clips_per_s": clips / max(total, 1e-9), "step_clips_per_s": clips / busy}


def order_frames(frames: torch.Tensor, mask: torch.Tensor, order: str,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each clip's real frames (`mask` 1) in `order` (data.train_frame_order): as decoded
    ("ordinal"), last to first ("reverse"), or shuffled ("random", from `generator`); padded
    slots stay where they are. frames [B, T, ...], mask [B, T]."""
    if order == "ordinal":
        return frames, mask
    B, T = mask.shape
    real = mask.bool()
    slot = torch.arange(T, dtype=torch.float64).expand(B, T)
    # sort keys: real frames first, in the wanted order; padding after them, as it was
    key = -slot if order == "reverse" else torch.rand(B, T, generator=generator, dtype=torch.float64)
    key = torch.where(real, key, slot + T + 2)
    idx = key.argsort(dim=1)
    rows = torch.arange(B).unsqueeze(1)
    return frames[rows, idx], mask[rows, idx]


class PeakMemory:
    """A worker's peak memory over an epoch's training steps, MB (specs/unipt.md: peak memory is
    a first-class metric, what UniPT and frozen tuning are for). On a GPU, the most torch held
    allocated on it (`torch.cuda.max_memory_allocated`); on a CPU, the process's peak resident
    set (Linux VmHWM, brought down to the current one by /proc/self/clear_refs at each reset).
    `read_mb` is None where neither can be read."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def read_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        kb = proc_status_kb("VmHWM")
        return None if kb is None else kb / 1024


def _max_over_workers(value: float | None) -> float | None:
    """The largest worker's value (None if some worker has none)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([0.0 if value is None else float(value), float(value is None)], dtype=torch.float64,
                     device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return None if t[1].item() else t[0].item()


class Progress:
    """Rank 0's progress line (Ray forwards worker stdout to the driver)."""

    def __init__(self, total: int, start_step: int, clips_per_step: int):
        self.total, self.start_step, self.clips = total, start_step, clips_per_step
        self.t0 = self.last = time.perf_counter()
        self.epoch_t0, self.epoch_step = self.t0, start_step

    def epoch_start(self, step: int) -> None:
        """The clips/s count from here: over the run so far, they took in the evaluations and
        checkpoints between epochs, and a run that evaluates every epoch read slower than it
        trains. (The ETA keeps them: later epochs have theirs too.)"""
        self.epoch_t0, self.epoch_step = time.perf_counter(), step

    def __call__(self, epoch: int, epochs: int, step: int, loss: float, lr: float, epoch_end=False) -> None:
        """A line at most every 5 s with this step's loss, and one at the end of each epoch with
        the epoch's mean loss."""
        now = time.perf_counter()
        if not epoch_end and now - self.last < 5.0:
            return
        self.last = now
        done = step - self.start_step
        rate = (step - self.epoch_step) * self.clips / max(now - self.epoch_t0, 1e-9)
        eta = (self.total - step) * (now - self.t0) / max(done, 1)
        what = "epoch mean loss" if epoch_end else "loss"
        say(f"[train] epoch {epoch}/{epochs} step {step}/{self.total} {what} {loss:.4f} "
            f"lr {lr:.2e} {rate:.1f} clips/s ETA {int(eta) // 60:02d}:{int(eta) % 60:02d}")


def no_batch(epoch: int, rows: int | None, skipped: int, batch: int, world: int, report: str) -> str:
    """Why an epoch got no training batch: the clips decoded of the manifest's `rows` training
    rows (None: streamed, not counted) when `skipped` of them were skipped, against the global
    batch one step takes. The clips that decoded were fewer than a step, and the run's error said
    only "check the skip report", which listed the bad clips but not that the good ones were too
    few, and named no file."""
    step = f"the {batch * world} one step takes (data.batch_size {batch} x train.num_workers {world})"
    if rows is None:
        got = f"its clips fell short of {step}"
    else:
        decoded = rows - skipped
        got = (f"{decoded} of the {rows} training clips decoded, "
               + (f"fewer than {step}" if decoded < batch * world else f"each worker short of a batch of {batch}"))
    return (f"epoch {epoch} got no training batch: {got}; {skipped} clip{'s' * (skipped != 1)} "
            f"{'were' if skipped != 1 else 'was'} skipped this epoch (skip report: {report})")


def quiet_worker_logs() -> None:
    """In a Ray Train worker: Ray Train logs every report at INFO from every rank (one line under
    a logger named by its file path, which only the root logger's level reaches) and open_clip
    logs each model it builds at INFO. Our progress lines say what matters; warnings still show,
    but torch's FutureWarnings for the collectives DeepSpeed's ZeRO-3 calls (`torch.distributed.
    all_gather_into_tensor` is deprecated ...), which no user can act on."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def train_loop(config: dict[str, Any]) -> None:
    import ray.train

    from clipray.losses import clamp_logit_scale
    from clipray.models import build_model
    from clipray.pipeline import SKIP_REPORT, caption_tokenizer, skipped_since
    from clipray.task import RetrievalTask
    from train import ds_config
    from train.driver import changed_manifests, manifest_changed
    from train.evaluate import evaluate

    quiet_worker_logs()
    cfg: Config = config["cfg"]
    steps_per_epoch: int = config["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)  # same init everywhere (DeepSpeed also broadcasts rank 0's)
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))

    model = build_model(cfg.model)
    if cfg.train.activation_checkpointing:
        model.backbone.clip.set_grad_checkpointing(True)
    B = cfg.data.batch_size
    shard_mode = cfg.data.shard_stream
    total = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    # a segment ends in evaluation + checkpoint: an epoch, or N steps of a step budget
    seg_steps = (cfg.train.checkpoint_every_steps or steps_per_epoch) if cfg.train.max_steps else steps_per_epoch
    seg_steps = seg_steps or total
    segments = -(-total // seg_steps)
    # a run may stop early and be continued by a later call (clip editing's rounds); the
    # schedule still spans every segment
    stop = min(segments, config.get("stop_epoch") or segments)
    opt, sched = ds_config.optimizer_and_schedule(model, cfg.optim, max(1, total // cfg.train.grad_accum))
    engine = ds_config.initialize(RetrievalTask(model), opt, sched, cfg.train, B, cfg.optim.grad_clip)
    # on the worker's device (its GPU, not the CPU); its fp32 weights run under the same autocast
    replica = build_model(cfg.model).to(engine.device) if cfg.train.zero_stage == 3 else None
    dtype = torch.bfloat16 if ds_config.precision(cfg.train) == "bf16" else torch.float32
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=TAG)
            state = json.loads((Path(d) / STATE).read_text())
        # DeepSpeed restores its optimiser steps but not its micro-step count, from which it
        # finds the train.grad_accum boundaries: left at 0, a resume that is not on a boundary
        # shifts every later one, and the run takes fewer optimiser (and schedule) steps than
        # one never stopped. Every engine.step() is one of our steps.
        engine.micro_steps = state["step"]
        if rank == 0:
            say(f"[train] resumed from step {state['step']} (epoch {state['epoch']})")

    if shard_mode:
        from train.shards import ShardStream

        stream = ShardStream(cfg.data, config["run_dir"], B, rank, world, cfg.train.seed, state)
    else:
        train_shard = ray.train.get_dataset_shard("train")
    test_shard = ray.train.get_dataset_shard("test")
    eval_manifest = cfg.data.eval_manifest or cfg.data.manifest
    tokenize = caption_tokenizer(cfg.data.tokenizer, cfg.data.max_words)  # the captions evaluation queries with
    progress = Progress(total, state["step"], B * world)
    memory = PeakMemory(engine.device)
    dev = engine.device

    def data_pass(n: int) -> Iterator[dict[str, torch.Tensor]]:
        reading["seed"], reading["taken"] = n, 0
        return iter(train_shard.iter_torch_batches(
            batch_size=B, drop_last=True, local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.train.seed + n if cfg.data.shuffle_buffer else None))

    def check_manifests() -> None:
        """Every worker fails when rank 0 finds the manifests changed since the run began
        (train.driver.changed_manifests): before reading, and before a checkpoint records an
        epoch that read them (Ray Data reads the files listed when the run began)."""
        watched = config.get("manifests") or {}
        if not _all_have(rank != 0 or not changed_manifests(watched)):
            raise manifest_changed(list(watched))

    run_dir = config["run_dir"]
    check_manifests()
    batches, passes = None, 0  # without shard_stream: the pass being read, passes started
    # a step budget's pass (its seed, the batches each worker took from it, passes started), in
    # the checkpoint: a resumed run reads on where the pass was, as a run never stopped does
    reading: dict[str, int] = {"seed": 0, "taken": 0}
    resumed_pass = state.get("data_pass") if cfg.train.max_steps and not shard_mode else None
    while state["epoch"] < stop and state["step"] < total:
        epoch = state["epoch"] + 1
        losses, clock = [], EpochClock()
        memory.reset()
        began_ns = time.time_ns()  # the skip files of this epoch are named from later times
        # Without shard_stream an epoch is one pass over the data (a new order with
        # data.shuffle_rows). A step budget's segment goes on with the pass the last segment
        # left, and starts another when it ends, until it has its seg_steps (a new pass per
        # segment trained each pass's first seg_steps batches only: without shuffle_rows, the
        # same rows every segment and never the rest). A decode actor pool, paused on it, keeps
        # its CPUs while the segment's evaluation decodes (the driver counts both, as for
        # shard_stream).
        if not shard_mode:
            if resumed_pass:
                # the pass the checkpoint's segment was reading, past the batches it trained on
                # (decoded again: a new pass in its place trained on the pass's first batches
                # again, and without data.shuffle_rows the same rows after every resume)
                batches, passes = data_pass(resumed_pass["seed"]), resumed_pass["passes"]
                with clock.waiting():
                    for _ in range(resumed_pass["taken"]):
                        next(batches, None)
                reading["taken"], resumed_pass = resumed_pass["taken"], None
                pass_start = -1
            elif batches is None or not cfg.train.max_steps:
                batches = data_pass(epoch)
                pass_start = 0  # the segment's steps when this pass began
            else:
                pass_start = -1  # carried over: it has given batches
        progress.epoch_start(state["step"])
        while len(losses) < seg_steps and state["step"] < total:
            with clock.waiting():
                batch = stream.next() if shard_mode else next(batches, None)
            if not _all_have(batch is not None):
                if not shard_mode:
                    if not cfg.train.max_steps or len(losses) == pass_start:
                        break  # the epoch's data has ended, or a new pass gave no batch
                    passes, pass_start = passes + 1, len(losses)
                    batches = data_pass(epoch + 1000 * passes)
                    continue
                stream.new_pass()  # one worker ran out of shards: everyone starts the next pass
                continue
            order = cfg.data.train_frame_order
            shuffle = (torch.Generator().manual_seed(cfg.train.seed + world * state["step"] + rank)
                       if order == "random" else None)
            frames, frame_mask = order_frames(batch["frames"], batch["frame_mask"], order, shuffle)
            out = engine(frames.to(dev), frame_mask.to(dev), batch["tokens"].to(dev))
            loss = out["loss"]
            step_loss = _mean_over_workers(loss)  # every worker stops together on a non-finite one
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"non-finite loss {step_loss} at step {state['step']}")
            engine.backward(loss)
            lr = sched.get_last_lr()[-1]  # the rate this step uses: engine.step() moves the schedule on
            engine.step()
            clamp_logit_scale(engine)
            state["step"] += 1
            reading["taken"] += 1
            losses.append(step_loss)
            if shard_mode:
                stream.steps += 1
            if rank == 0:
                progress(epoch, segments, state["step"], losses[-1], lr)
        if not losses:
            raise RuntimeError(no_batch(epoch, config.get("train_rows"), skipped_since(run_dir, began_ns),
                                        B, world, f"{run_dir}/{SKIP_REPORT}"))
        record = {"epoch": epoch, "step": state["step"], "loss": sum(losses) / len(losses),
                  "lr": lr, **clock.summary(len(losses) * B * world)}
        peak = _max_over_workers(memory.read_mb())  # the training steps' peak, before evaluation
        if peak is not None:
            record["peak_mem_mb"] = peak
        if rank == 0:
            progress(epoch, segments, state["step"], record["loss"], record["lr"], epoch_end=True)
            say(f"[train] epoch {epoch}: {record['epoch_s']:.1f} s, {record['data_wait_s']:.1f} s of it waiting "
                f"for batches ({record['first_batch_s']:.1f} s for the first); outside the waits "
                f"{record['step_clips_per_s']:.1f} clips/s")
        last = epoch >= stop or state["step"] >= total
        if last or epoch % cfg.train.eval_every_epochs == 0:
            m = eval_model(engine, cfg, replica)
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                record.update(evaluate(m, test_shard, eval_manifest, cfg.data.eval_split, B, tokenize,
                                       cfg.train.eval_dsl))
            if rank == 0:
                say(f"[eval] epoch {epoch} ({cfg.data.eval_split}): t2v R@1 {record['t2v_r1']:.1f} "
                    f"R@5 {record['t2v_r5']:.1f} R@10 {record['t2v_r10']:.1f} MdR {record['t2v_mdr']:.1f} "
                    f"({record['num_test_videos']} clips)")
        state["epoch"] = epoch
        state["history"].append(record)
        if cfg.train.max_steps and not shard_mode:
            state["data_pass"] = dict(reading, passes=passes)
        if shard_mode:
            stream.sync()
        check_manifests()
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=TAG)
            if last:
                with _full_params(engine, cfg.train.zero_stage):
                    if rank == 0:
                        from clipray.export import save_export

                        # the decode settings travel with the weights: indexing and serving
                        # must sample and crop clips the way training did
                        save_export(engine.module.model, Path(d) / "export", extra={
                            **{k: v for k, v in record.items() if isinstance(v, (int, float))},
                            "video": dataclasses.asdict(cfg.data.video), "max_words": cfg.data.max_words})
            if rank == 0:
                (Path(d) / STATE).write_text(json.dumps(state))
            ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))},
                             checkpoint=ray.train.Checkpoint.from_directory(d))
