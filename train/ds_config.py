"""The one place the DeepSpeed config, optimiser and learning-rate schedule are built.

CLIP4Clip's recipe: two parameter groups (backbone at lr * coef_lr, new modules at lr), weight
decay on matrices only (not biases, LayerNorm gains, the class embedding or logit_scale), Adam betas
(0.9, 0.98) eps 1e-6, linear warm-up over `warmup_ratio` of the steps then cosine decay,
gradients clipped to a global norm of 1.0 (`optim.grad_clip`). ZeRO stage 0-3 from config; bf16 on GPU, fp32 on CPU.

The optimiser is a plain torch AdamW handed to `deepspeed.initialize` (DeepSpeed wraps it for
ZeRO), so the same code runs where DeepSpeed's fused CUDA kernels do not exist.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from clipray.config import OptimConfig, TrainConfig


def precision(train: TrainConfig) -> str:
    if train.precision == "auto":
        return "bf16" if train.use_gpu else "fp32"
    return train.precision  # fp32 or bf16 (any other value fails when the config loads)


def build(train: TrainConfig, batch_size: int, grad_clip: float = 1.0) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": grad_clip,  # the global norm's cap; 0 turns clipping off
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": precision(train) == "bf16"},
        "steps_per_print": 10**9,  # our own progress line reports
        "wall_clock_breakdown": False,
    }


def initialize(task: torch.nn.Module, opt: Any, sched: Any, train: TrainConfig, batch_size: int,
               grad_clip: float = 1.0) -> Any:
    """`deepspeed.initialize` with `build`'s config; returns the engine.

    DeepSpeed's communication backend loads a shared-memory all-reduce op (deepspeed_shm_comm)
    on CPU, compiling it with the system C++ compiler the first time an installation runs: 55-95
    s on 2 cores, in the demo and the first training test. Only DeepSpeed's inference tensor
    parallelism calls that op; training reduces through torch.distributed, so it is marked
    unavailable and never built. DeepSpeed keeps the table it checks (`__compatible_ops__`) as
    one dict for the process, so the change holds. Where the accelerator has no such op (CUDA),
    the table is left unread, as DeepSpeed leaves it: reading it first probes every op.

    A CPU run names DeepSpeed's accelerator (`DS_ACCELERATOR=cpu`, unless the user set one)
    instead of letting it probe and warn on every worker that it found no GPU.
    """
    if os.environ.get("DS_ACCELERATOR") == "":  # set but empty: DeepSpeed's ValueError on every worker
        del os.environ["DS_ACCELERATOR"]
    if not train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().create_op_builder("ShareMemCommBuilder") is not None:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, *_ = deepspeed.initialize(model=task, optimizer=opt, lr_scheduler=sched,
                                      config=build(train, batch_size, grad_clip))
    _undo_warm_up_step(engine.optimizer)
    return engine


def _undo_warm_up_step(wrapped: Any) -> None:
    """bf16 without ZeRO: DeepSpeed wraps the optimiser in FP16_UnfusedOptimizer, which creates
    its state by one step on zero gradients. For AdamW that step counts: every real step t was
    bias-corrected as step t+1 (the first update 0.74 x lr, not lr) and the fp32 copy of each
    weight was decayed once (x (1 - lr * weight_decay)) before training, unlike fp32 or ZeRO 1-3.
    The state is dropped (AdamW makes it anew at the first real step) and each fp32 copy set
    back to its bf16 weight, which the step left as it was."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(wrapped, FP16_UnfusedOptimizer):
        return
    wrapped.optimizer.state.clear()
    with torch.no_grad():
        for weights, copies in zip(wrapped.fp16_groups, wrapped.fp32_groups):
            for weight, copy in zip(weights, copies):
                copy.copy_(weight)


def _decays(p: torch.nn.Parameter) -> bool:
    """Weight decay on every matrix and kernel, position embeddings included (the spec exempts
    biases and LayerNorm weights; open_clip's training decays them too); biases, norm gains,
    CLIP's class embedding and logit_scale are 0/1-dim and stay undecayed. CLIP's own
    positional_embedding was exempted by name, so the copies seqTransf and tightTransf start
    their position embeddings from were decayed and the original was not."""
    return p.ndim >= 2


def param_groups(model: Any, optim: OptimConfig) -> list[dict[str, Any]]:
    groups = []
    for part, params in model.parameter_groups().items():
        lr = optim.lr * (optim.coef_lr if part == "backbone" else 1.0)
        for decay in (True, False):
            ps = [p for _, p in params if _decays(p) == decay]
            if ps:
                groups.append({"params": ps, "lr": lr, "name": f"{part}{'' if decay else '_no_decay'}",
                               "weight_decay": optim.weight_decay if decay else 0.0})
    return groups


def optimizer_and_schedule(model: Any, optim: OptimConfig, total_steps: int):
    opt = torch.optim.AdamW(param_groups(model, optim), betas=tuple(optim.betas), eps=optim.eps)
    # floored, past float error: 0.29 x 100 is 28.999999999999996, which gave 28 steps, not 29
    warmup = max(1, math.floor(optim.warmup_ratio * total_steps + 1e-9))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
