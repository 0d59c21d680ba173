"""Step 2: supervised fine-tuning of GPT-2 on demonstrations (or plain-text pre-training).

InstructGPT (Ouyang et al. 2022, section 3.5) fine-tunes GPT-3 on prompts paired with responses written by people;
Stiennon et al. (2020) do the same with reference summaries. Each ``{"prompt", "response"}`` record becomes
``prompt + response + EOS`` and the loss is the mean negative log-likelihood of the response tokens and the EOS
(the prompt is context, not a target; minirlhf/sft.py gives the equation). ``{"text"}`` records train on every token:
continued pre-training, the offline stand-in for step 1 when no pre-trained weights can be downloaded (``--init
scratch``). The checkpoint's stage is "sft", or "pretrain" when the data is only plain text.

    python train_sft.py --init gpt2 --data sft.jsonl --out out/sft
    python train_sft.py --init scratch --tokenizer gpt2-8k --n-layer 4 --n-head 4 --n-embd 256 --n-positions 128 \\
        --data corpus.jsonl --lr 1e-3 --dropout 0.1 --out out/pretrain
    python train_sft.py ... --resume          # continue an interrupted run exactly

Departures from the papers: no packing of several examples into one sequence (batches are right-padded to their
longest example); the schedule is warmup + cosine decay (InstructGPT used cosine decay as well, 16 epochs, and chose
the checkpoint by reward-model score; here the held-out loss is reported); dropout defaults to 0 (InstructGPT:
residual dropout 0.2).
"""
import math
from dataclasses import dataclass

import torch

from minirlhf.config import UserError, option, run
from minirlhf.data import DataOrder, Truncations, read_sft, split_holdout
from minirlhf.finetune import (RESUME_MAY_CHANGE, FinetuneConfig, context_length, init_policy, micro_batches,
                               schedule)
from minirlhf.run import Run, all_sum, log_print
from minirlhf.sft import build_sft_examples, collate_sft, loss_tokens, sample_texts, sft_nll
from minirlhf.training import autocast, lr_factor, make_optimizer, set_lr

FILES = ("config.json", "model.safetensors", "training_state.pt")  # what a run writes in --out (and metrics.jsonl)


@dataclass
class Config(FinetuneConfig):
    """Supervised fine-tuning: learn to write the responses of {"prompt", "response"} demonstrations (loss on the
    response and its EOS only), or plain language modelling on {"text"} records."""

    out: str = option("out/sft", "output folder: the checkpoint (config.json, model.safetensors, training_state.pt) "
                                 "and metrics.jsonl", group="run")
    samples: int = option(3, "prompts to sample a response for at each evaluation: held-out ones (training ones when "
                             "nothing is held out); 0 = none", group="evaluation")
    sample_tokens: int = option(32, "tokens per sample at evaluation (less than the model's context)",
                                group="evaluation")


@torch.no_grad()
def evaluate(model, examples, cfg: Config, pad_id: int, device) -> float:
    """Mean negative log-likelihood per target token over ``examples``."""
    model.eval()
    nll, n = 0.0, 0
    for s in range(0, len(examples), cfg.batch_size):
        batch = examples[s:s + cfg.batch_size]
        ids, mask, loss_mask = (t.to(device) for t in collate_sft(batch, pad_id))
        with autocast(device, cfg.bf16):
            nll += sft_nll(model, ids, mask, loss_mask).item()
        n += sum(loss_tokens(e) for e in batch)
    model.train()
    return nll / n


def main(cfg: Config) -> str:
    # 1. read and validate the data: any problem stops here, before --out is touched
    if not cfg.data:
        raise UserError("--data is required (a JSONL file of {\"prompt\", \"response\"} or {\"text\"} records)")
    records = read_sft(cfg.data)
    train_records, val_records = ((records, read_sft(cfg.val_data)) if cfg.val_data  # a prompt stays on one side
                                  else split_holdout(records, cfg.val_fraction, cfg.seed, cfg.data,
                                                     key=lambda r: r.get("prompt")))
    stage = "sft" if any(r["kind"] == "demonstration" for r in records) else "pretrain"
    with Run(cfg, stage=stage, stages=("pretrain", "sft"), writes=FILES, inputs=[cfg.init],
             data=[cfg.data, cfg.val_data], may_change=RESUME_MAY_CHANGE + ("samples",)) as run:
        device = run.device

        # 2. the model, and the data tokenized for it (prompt masking, truncation counted and reported)
        model, tokenizer = init_policy(cfg)
        max_len = context_length(cfg, model.config)
        if cfg.samples and not 0 < cfg.sample_tokens < model.config.n_positions:
            raise UserError(f"--sample-tokens {cfg.sample_tokens}: must be at least 1 and less than the model's "
                            f"context of {model.config.n_positions} tokens (or --samples 0)")
        cuts = {"train": Truncations(), "val": Truncations()}
        train, val = (build_sft_examples(part, tokenizer, max_len=max_len, truncate_prompts=cfg.truncate_prompts,
                                         truncations=cuts[name])
                      for name, part in (("train", train_records), ("val", val_records)))
        log_print(f"{model.num_params() / 1e6:.1f}M parameters, tokenizer {tokenizer.name}, stage {stage!r}")
        log_print(cuts["train"].summary("train", max_len))
        if val:
            log_print(cuts["val"].summary("held-out", max_len))

        # 3. optimizer and schedule; --resume puts model, optimizer and RNG back where the run stopped
        model.to(device)
        nll_of = run.wrap(model, sft_nll)  # sft_nll(model, ...); under torchrun through DDP / FSDP
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        start = run.restore(model, optimizer)
        steps, warmup = schedule(cfg, len(train), run.state)
        order = DataOrder(len(train), cfg.seed)
        sample_prompts = [e.ids[:e.n_prompt] if e.n_prompt else e.ids[:8] for e in (val or train)[:cfg.samples]]
        summary = {**cuts["train"].as_metrics("train"), **cuts["val"].as_metrics("val")}

        def eval_and_sample(step: int) -> None:
            if val:
                summary["val_loss"] = evaluate(model, val, cfg, tokenizer.pad_id, device)
                run.log(step, val_loss=summary["val_loss"], val_ppl=math.exp(min(summary["val_loss"], 50)))
                log_print(f"step {step}: held-out loss {summary['val_loss']:.4f}")
            if sample_prompts:
                texts = sample_texts(model, tokenizer, sample_prompts, max_new_tokens=cfg.sample_tokens, seed=cfg.seed)
                for p, t in zip(sample_prompts, texts):
                    log_print(f"  {tokenizer.decode(p)!r} -> {t!r}")

        def save(step: int) -> None:
            run.save(step, model, config=model.config, optimizer=optimizer, metrics=summary,
                     state={"warmup_steps": warmup})

        # 4. train: each step averages the loss over every target token of its grad-accum micro-batches (under
        #    torchrun each rank takes its share of every micro-batch; the gradients and the loss add up over ranks)
        model.train()
        for step in run.steps(start, steps, stage):
            lr = cfg.lr * lr_factor(step, steps, warmup, cfg.schedule)
            set_lr(optimizer, lr)
            micro = micro_batches(train, order, step, cfg)
            n_targets = sum(loss_tokens(e) for batch in micro for e in batch)
            loss, n_tokens = 0.0, 0
            for batch in micro:
                ids, mask, loss_mask = (t.to(device) for t in collate_sft(run.shard(batch), tokenizer.pad_id))
                with autocast(device, cfg.bf16):
                    nll = nll_of(ids, mask, loss_mask)
                (nll / n_targets).backward()
                loss += nll.item() / n_targets
                n_tokens += int(mask.sum())
            grad_norm = run.optimizer_step(optimizer, model.parameters(), cfg.grad_clip)
            summary["loss"] = loss = all_sum(loss)
            run.log(step + 1, show=("loss", "lr"), loss=loss, lr=lr, grad_norm=grad_norm, tokens=all_sum(n_tokens))
            if step + 1 == steps or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                eval_and_sample(step + 1)
            run.checkpoint(step + 1, save)  # every --save-every, at the end, and on SIGTERM / Ctrl-C
    if start < steps:
        log_print(f"saved {cfg.out}")
    return cfg.out


if __name__ == "__main__":
    run(main, Config)
