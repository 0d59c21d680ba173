"""What every training script shares: seeding, the optimizer and its schedule, mixed precision, metrics and the
progress bar, rank-aware printing, and RNG state for exact resumption.

Written so the scripts can later run under ``torchrun``: nothing here keeps global state; ``rank()`` reads the
environment ``torchrun`` sets, only rank 0 prints, logs and saves (:func:`is_main`), and each rank seeds with
``seed + rank`` (pitfall 10).
"""
import contextlib
import json
import math
import os
import pathlib
import random
import sys
import time
from typing import Optional

import torch

# ---------------------------------------------------------------------------------------------------------------------
# Processes and seeds


def rank() -> int:
    """This process's rank under torchrun (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Only the main process prints, writes metrics and saves checkpoints."""
    return rank() == 0


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch with ``seed + rank`` (distinct streams per rank); return a CPU generator for data order."""
    s = seed + rank()
    random.seed(s)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def rng_state() -> dict:
    """Every random state a run consumes, for exact --resume."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def clipped_step(optimizer: torch.optim.Optimizer, params, max_norm: float) -> torch.Tensor:
    """One optimizer step on the accumulated gradients, their global norm clipped to ``max_norm`` first (0 = no
    clipping); the gradients are cleared after it. Returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; a no-op on CPU (fp32 there, which keeps CPU tests exact)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------------
# Metrics and progress


class MetricsLogger:
    """Appends one JSON object per call to ``out_dir/metrics.jsonl`` (main process only) and keeps the last values
    for the progress bar."""

    def __init__(self, out_dir, resume: bool = False):
        self.path: Optional[pathlib.Path] = None
        self.start = time.time()
        if is_main():
            out = pathlib.Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.path = out / "metrics.jsonl"
            if not resume and self.path.exists():
                self.path.unlink()

    def log(self, step: int, **metrics) -> dict:
        record = {"step": step, "time": round(time.time() - self.start, 3),
                  **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in metrics.items()}}
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record


def progress(total: int, desc: str, initial: int = 0):
    """A tqdm progress bar on the main process (disabled elsewhere and when ``MINIRLHF_NO_PROGRESS=1``); when stderr
    is not a terminal (a log file), it redraws at most every 30 s instead of filling the log."""
    from tqdm.auto import tqdm

    disable = not is_main() or os.environ.get("MINIRLHF_NO_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


def log_print(*args) -> None:
    """print() on the main process only."""
    if is_main():
        print(*args, flush=True)
