"""The run machinery train_sft.py and train_rm.py share: their common flags (:class:`FinetuneConfig`), the model from
``--init`` (a hub name, a Hugging Face directory, a minirlhf policy checkpoint, or ``scratch`` with the size flags),
the number of steps, the learning-rate schedule (linear warmup, cosine decay), the micro-batches of a step, and
checkpoints that ``--resume`` continues exactly: model, optimizer, step, RNG states, and the run's :class:`Plan` (the
data order is a pure function of the seed, the data size and the step, :class:`minirlhf.data.DataOrder`). The losses live beside the scripts' data:
:mod:`minirlhf.sft` and :mod:`minirlhf.reward`.
"""
import dataclasses
import math
import pathlib
from dataclasses import dataclass
from typing import Optional

import torch

from minirlhf.checkpoint import load_policy, open_run, save_checkpoint, trim_logs
from minirlhf.config import UserError, option, to_dict
from minirlhf.data import DataOrder
from minirlhf.hf import read_weights
from minirlhf.model import ATTN_IMPL_HELP, ATTN_IMPLS, GPT, LOGPROB_IMPL_HELP, LOGPROB_IMPLS, GPTConfig
from minirlhf.tokenizer import get_tokenizer
from minirlhf.training import (MetricsLogger, is_main, log_print, lr_factor, make_optimizer, rng_state, set_lr,
                               set_rng_state)

# ---------------------------------------------------------------------------------------------------------------------
# Configuration both scripts share


@dataclass
class FinetuneConfig:
    """Flags shared by train_sft.py and train_rm.py."""

    data: str = option("", "training data, JSONL (required)")
    val_data: str = option("", "held-out data, JSONL (empty: hold out --val-fraction of --data)")
    val_fraction: float = option(0.05, "when --val-data is not given, hold out this fraction of --data's distinct "
                                       "prompts (at least one) with all their records, so evaluation is on prompts "
                                       "never trained on; plain texts and Likert regression scores count one each (a "
                                       "fixed split from --seed; 0 = no evaluation)")
    out: str = option("out/sft", "output directory: the checkpoint (config.json, model.safetensors, "
                                 "training_state.pt) and metrics.jsonl")
    resume: bool = option(False, "continue the run whose checkpoint is in --out exactly where it stopped (same "
                                 "flags and data; a larger --max-steps / --epochs extends it)")
    overwrite: bool = option(False, "start over even if --out already holds a checkpoint")
    init: str = option("gpt2", "starting weights: a hub name (gpt2 .. gpt2-xl, needs a network), a Hugging Face "
                               "GPT-2 directory, a minirlhf policy checkpoint, or 'scratch' (random, sized by the "
                               "flags below)")
    tokenizer: str = option("gpt2", "--init scratch only: 'gpt2' or a smaller 'gpt2-<N>[k]' such as gpt2-8k "
                                    "(a checkpoint brings its own)")
    n_layer: int = option(12, "--init scratch only: transformer blocks")
    n_head: int = option(12, "--init scratch only: attention heads")
    n_embd: int = option(768, "--init scratch only: width")
    n_positions: int = option(1024, "--init scratch only: context length")
    dropout: float = option(0.0, "dropout (0 for fine-tuning; 0.1 is usual for pre-training)")
    attn_impl: str = option("auto", ATTN_IMPL_HELP, choices=ATTN_IMPLS)
    logprob_impl: str = option("auto", LOGPROB_IMPL_HELP, choices=LOGPROB_IMPLS)
    max_len: int = option(0, "longest training sequence in tokens (0 = the model's context); a longer example has "
                             "its response cut from the right (counted and reported; a prompt that would be cut is "
                             "an error unless --truncate-prompts), a longer text is split into windows")
    truncate_prompts: bool = option(False, "cut prompts that do not fit from the left instead of stopping with an "
                                           "error")
    epochs: float = option(1.0, "passes over the training data (ignored when --max-steps > 0)")
    max_steps: int = option(0, "optimizer steps (0 = from --epochs)")
    batch_size: int = option(8, "examples per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step (effective batch = batch-size x grad-accum)")
    lr: float = option(5e-5, "peak learning rate of AdamW (about 1e-3 for a small model trained from scratch)")
    weight_decay: float = option(0.0, "AdamW weight decay on weight matrices")
    warmup: float = option(0.05, "fraction of the steps spent warming the learning rate up linearly")
    schedule: str = option("cosine", "learning-rate decay after warmup (cosine decays to 10%% of the peak)",
                           choices=("cosine", "linear", "constant"))
    grad_clip: float = option(1.0, "clip the gradient's global norm to this (0 = off)")
    bf16: bool = option(True, "bf16 autocast on CUDA (CPU always runs fp32)")
    eval_every: int = option(100, "evaluate every N steps (0 = only at the end)")
    save_every: int = option(0, "also save a resumable checkpoint every N steps (0 = only at the end)")
    seed: int = option(0, "random seed (initialisation, data order, held-out split, dropout)")
    device: str = option("auto", "cpu, cuda, or auto (cuda when available)")


# options that may differ between a run and its --resume; any other difference would break exact continuation.
# --max-steps / --epochs may change the step count: a larger one extends a run, its decay stretched to the new total
# and its warmup kept (train_ppo.py's --steps likewise); one at or below the step reached leaves nothing to do.
RESUME_MAY_CHANGE = ("resume", "overwrite", "device", "eval_every", "save_every", "attn_impl", "logprob_impl",
                     "epochs", "max_steps")


# ---------------------------------------------------------------------------------------------------------------------
# Model, length and steps


SCRATCH_ONLY = ("tokenizer", "n_layer", "n_head", "n_embd", "n_positions")  # flags a loaded model brings itself


def init_policy(cfg: FinetuneConfig):
    """(GPT, Tokenizer) from ``--init`` with the configured dropout; 'scratch' builds a random GPT-2 of the given
    size (seed the RNG first for reproducible weights). Size flags given with a loaded model are reported as ignored."""
    if cfg.init != "scratch":
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        ignored = [f"--{name.replace('_', '-')}" for name in SCRATCH_ONLY if getattr(cfg, name) != defaults[name]]
        if ignored:
            log_print(f"warning: {', '.join(ignored)} ignored: they apply to --init scratch, and {cfg.init} brings "
                      "its own size and tokenizer")
        return load_policy(cfg.init, dropout=cfg.dropout, attn_impl=cfg.attn_impl, logprob_impl=cfg.logprob_impl)
    tokenizer = get_tokenizer(cfg.tokenizer)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=cfg.n_positions, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, tokenizer=cfg.tokenizer,
                       attn_impl=cfg.attn_impl, logprob_impl=cfg.logprob_impl)
    return GPT(config), tokenizer


def context_length(cfg: FinetuneConfig, config: GPTConfig) -> int:
    if cfg.max_len > config.n_positions:
        raise UserError(f"--max-len {cfg.max_len} exceeds the model's context of {config.n_positions} tokens")
    if cfg.max_len < 0 or cfg.max_len == 1:
        raise UserError(f"--max-len must be 0 (the model's context) or at least 2, got {cfg.max_len}")
    return cfg.max_len or config.n_positions


def total_steps(cfg: FinetuneConfig, n_train: int) -> int:
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise UserError("--batch-size and --grad-accum must be at least 1")
    if cfg.max_steps > 0:
        return cfg.max_steps
    if cfg.epochs <= 0:
        raise UserError(f"--epochs must be > 0 (or give --max-steps), got {cfg.epochs}")
    return max(1, math.ceil(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum)))


def due(every: int, step: int, steps: int) -> bool:
    """Whether a periodic evaluation or save (``--eval-every`` / ``--save-every`` N, 0 = never) falls after optimizer
    step ``step`` (1-based); the last step is left to the final evaluation and save."""
    return every > 0 and step % every == 0 and step < steps


@dataclass
class Plan:
    """A run's length and warmup, and the data they were computed for. ``--resume`` keeps the warmup of the run it
    continues (a run extended with a larger --max-steps does not warm up again) and refuses other data."""

    steps: int  # optimizer steps in all
    warmup_steps: int  # the first ones, with the learning rate rising linearly
    n_train: int  # training examples (SFT) or groups (RM): the data order and --epochs depend on it


def schedule_lr(cfg: FinetuneConfig, optimizer, step: int, plan: Plan) -> float:
    """Set and return the learning rate of ``step`` (0-based): warmup, then the configured decay over the plan."""
    lr = cfg.lr * lr_factor(step, plan.steps, plan.warmup_steps, cfg.schedule)
    set_lr(optimizer, lr)
    return lr


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints, resume


def prepare_out(cfg: FinetuneConfig, model: torch.nn.Module, optimizer, plan: Plan) -> tuple[int, Plan]:
    """Check ``--out`` and, with ``--resume``, load the saved model, optimizer and RNG states into place. Returns the
    step to start from and the plan, with the resumed run's warmup. Call it after the data was validated, so a bad
    input never touches ``--out``."""
    resumed = open_run(cfg, may_change=RESUME_MAY_CHANGE, stages=("pretrain", "sft", "rm"))
    if resumed is None:
        return 0, plan
    _, state = resumed
    n_train = state.get("n_train", plan.n_train)  # (checkpoints written before the plan was saved carry none)
    if n_train != plan.n_train:
        raise UserError(f"--resume: the run in {cfg.out} trained on {n_train} items (examples, or the RM's groups), "
                        f"the data now gives {plan.n_train}; the data order would not continue: resume with the same "
                        "data")
    plan = dataclasses.replace(plan, warmup_steps=state.get("warmup_steps", plan.warmup_steps))
    model.load_state_dict(read_weights(pathlib.Path(cfg.out) / "model.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    if is_main():
        trim_logs(cfg.out, state["step"])
        log_print(f"resuming {cfg.out} at step {state['step']} of {plan.steps}")
    return state["step"], plan


def start_training(cfg: FinetuneConfig, model: torch.nn.Module, device, n_train: int):
    """Model on ``device``, AdamW, the plan (steps, warmup), and --resume (model, optimizer and RNG put back where the
    run stopped). Returns ``(optimizer, plan, start_step, metrics_logger, data_order)``."""
    model.to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    steps = total_steps(cfg, n_train)
    start, plan = prepare_out(cfg, model, optimizer, Plan(steps, round(cfg.warmup * steps), n_train))
    return optimizer, plan, start, MetricsLogger(cfg.out, resume=cfg.resume), DataOrder(n_train, cfg.seed)


def nothing_to_do(cfg: FinetuneConfig, start: int, plan: Plan) -> bool:
    """True (and said) when a resumed run is already at or past the step count asked: the checkpoint stays as it is."""
    if start < plan.steps:
        return False
    log_print(f"{cfg.out} is already at step {start} of the {plan.steps} steps asked; nothing to do")
    return True


def micro_batches(examples: list, order: DataOrder, step: int, cfg: FinetuneConfig) -> list[list]:
    """The ``--grad-accum`` micro-batches of ``--batch-size`` examples that optimizer step ``step`` trains on: a pure
    function of the seed and the step, which is what lets ``--resume`` continue the data order exactly."""
    return [[examples[i] for i in order.take((step * cfg.grad_accum + k) * cfg.batch_size, cfg.batch_size)]
            for k in range(cfg.grad_accum)]


def save_run(cfg: FinetuneConfig, model: torch.nn.Module, optimizer, *, stage: str, config: GPTConfig, step: int,
             plan: Plan, metrics: Optional[dict] = None) -> pathlib.Path:
    """Write the checkpoint to ``--out`` atomically with everything ``--resume`` needs (main process only);
    ``save_checkpoint`` keeps the run's own files (metrics.jsonl) across the directory swap."""
    out = pathlib.Path(cfg.out)
    if not is_main():
        return out
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), "warmup_steps": plan.warmup_steps,
             "n_train": plan.n_train}
    save_checkpoint(out, model, stage=stage, config=config, step=step, train_config=to_dict(cfg),
                    metrics=metrics or {}, training_state=state)
    return out
