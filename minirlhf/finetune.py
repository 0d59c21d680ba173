"""What train_sft.py and train_rm.py share besides the run layer: their common flags (:class:`FinetuneConfig`), the
model from ``--init`` (a hub name, a Hugging Face folder, a minirlhf policy checkpoint, or ``scratch`` with the size
flags), the number of steps and warmup, and the micro-batches of a step (the data order is a pure function of the
seed, the data size and the step, :class:`minirlhf.data.DataOrder`, which is what lets ``--resume`` continue it
exactly). The losses live beside the scripts' data: :mod:`minirlhf.sft` and :mod:`minirlhf.reward`.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from minirlhf.checkpoint import load_policy
from minirlhf.config import UserError, option
from minirlhf.data import DataOrder
from minirlhf.model import ATTN_IMPL_HELP, ATTN_IMPLS, LOGPROB_IMPL_HELP, LOGPROB_IMPLS, GPT, GPTConfig
from minirlhf.run import TrainRunConfig, log_print
from minirlhf.tokenizer import get_tokenizer

# ---------------------------------------------------------------------------------------------------------------------
# Configuration both scripts share


@dataclass
class FinetuneConfig(TrainRunConfig):
    """Flags shared by train_sft.py and train_rm.py."""

    data: str = option("", "(required) training data, JSONL")
    init: str = option("gpt2", "starting weights: a hub name (gpt2 .. gpt2-xl, needs a network), a Hugging Face "
                               "GPT-2 folder, a minirlhf policy checkpoint, or 'scratch' (random, sized by --n-layer "
                               "..)")
    lr: float = option(5e-5, "peak learning rate of AdamW (about 1e-3 for a small model trained from scratch)")
    epochs: float = option(1.0, "passes over the training data (ignored when --max-steps > 0)")
    max_steps: int = option(0, "optimizer steps (0 = from --epochs)")
    batch_size: int = option(8, "examples per micro-batch")
    val_data: str = option("", "held-out data, JSONL (empty: hold out --val-fraction of --data)", group="data")
    val_fraction: float = option(0.05, "without --val-data, hold out this fraction of --data's distinct prompts with "
                                       "all their records (0 = no evaluation)", group="data")
    max_len: int = option(0, "longest training sequence in tokens (0 = the model's context); longer responses are cut "
                             "(counted), longer texts split into windows", group="data")
    truncate_prompts: bool = option(False, "cut prompts that do not fit from the left instead of stopping with an "
                                           "error", group="data")
    tokenizer: str = option("gpt2", "--init scratch only: 'gpt2' or a truncated 'gpt2-<N>[k]' such as gpt2-8k",
                            group="model (--init scratch)")
    n_layer: int = option(12, "--init scratch only: transformer blocks", group="model (--init scratch)")
    n_head: int = option(12, "--init scratch only: attention heads", group="model (--init scratch)")
    n_embd: int = option(768, "--init scratch only: width", group="model (--init scratch)")
    n_positions: int = option(1024, "--init scratch only: context length", group="model (--init scratch)")
    dropout: float = option(0.0, "dropout (0 for fine-tuning; 0.1 is usual for pre-training)", group="optimisation")
    grad_accum: int = option(1, "micro-batches per optimizer step (batch = batch-size x grad-accum)",
                             group="optimisation")
    weight_decay: float = option(0.0, "AdamW weight decay on weight matrices", group="optimisation")
    warmup: float = option(0.05, "fraction of the steps spent warming the learning rate up linearly",
                           group="optimisation")
    schedule: str = option("cosine", "learning-rate decay after warmup (cosine decays to 10%% of the peak)",
                           choices=("cosine", "linear", "constant"), group="optimisation")
    grad_clip: float = option(1.0, "clip the gradient's global norm to this (0 = off)", group="optimisation")
    eval_every: int = option(100, "evaluate every N steps (0 = only at the end)", group="run")
    bf16: bool = option(True, "bf16 autocast on CUDA (CPU always runs fp32)", group="machine")
    attn_impl: str = option("auto", ATTN_IMPL_HELP, choices=ATTN_IMPLS, group="machine")
    logprob_impl: str = option("auto", LOGPROB_IMPL_HELP, choices=LOGPROB_IMPLS, group="machine")


# flags that may differ between a run and its --resume (besides the run layer's own); any other difference would
# break exact continuation. A larger --max-steps / --epochs extends a run (its decay stretched to the new total, its
# warmup kept); one at or below the step reached leaves nothing to do.
RESUME_MAY_CHANGE = ("eval_every", "save_every", "attn_impl", "logprob_impl", "epochs", "max_steps")


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


def schedule(cfg: FinetuneConfig, n_train: int, state: Optional[dict]) -> tuple[int, int]:
    """(steps, warmup steps): ``--max-steps``, or ``--epochs`` over ``n_train`` examples in batches of
    batch-size x grad-accum; the warmup is ``--warmup`` of the steps, or that of the run being resumed (``state``: a
    run extended with a larger --max-steps does not warm up again)."""
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise UserError("--batch-size and --grad-accum must be at least 1")
    if cfg.max_steps > 0:
        steps = cfg.max_steps
    elif cfg.epochs <= 0:
        raise UserError(f"--epochs must be > 0 (or give --max-steps), got {cfg.epochs}")
    else:
        steps = max(1, math.ceil(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum)))
    return steps, state["warmup_steps"] if state else round(cfg.warmup * steps)


def micro_batches(examples: list, order: DataOrder, step: int, cfg: FinetuneConfig) -> list[list]:
    """The ``--grad-accum`` micro-batches of ``--batch-size`` examples that optimizer step ``step`` trains on: a pure
    function of the seed and the step, which is what lets ``--resume`` continue the data order exactly."""
    return [[examples[i] for i in order.take((step * cfg.grad_accum + k) * cfg.batch_size, cfg.batch_size)]
            for k in range(cfg.grad_accum)]
