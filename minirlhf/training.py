"""The optimisation every trainer shares: AdamW with weight decay on matrices only, the learning-rate schedule, and
mixed precision. The rest of a run's machinery (seeds, logging, the optimizer step that skips non-finite gradients,
checkpoints) is :mod:`minirlhf.run`."""
import contextlib
import math

import torch

# ---------------------------------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, LayerNorm gains or scalars), as in GPT-2 training."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warmup over ``warmup_steps``, then
    ``"cosine"`` decay to ``min_ratio``, ``"linear"`` decay to 0, or ``"constant"``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; a no-op on CPU (fp32 there, which keeps CPU tests exact)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
