"""Batched sampling from a GPT with a KV cache, and a small CLI to try any checkpoint.

Prompts are left-padded so that every row's next token goes in the same column; the model takes position ids from the
attention mask, so a prompt produces the same tokens alone or beside longer ones (pitfall 2 in the README). Each step:

    logits = model.next_token_logits(last token, kv_cache) / temperature   # (B, V), fp32
    keep the top-k logits, then the smallest set whose probability reaches top_p (Holtzman et al. 2020)
    sample (or argmax when greedy); rows that already emitted EOS get PAD and mask 0 from then on

The result carries the masks PPO needs: ``response_mask`` is 1 on sampled tokens up to and including the first EOS
(pitfall 6: everything after EOS is masked, the EOS itself is kept and scored).

CLI::

    python -m minirlhf.generate --model out/sft --prompt "The movie was" --num-samples 3 --temperature 0.7

prints each sample as the prompt, ``|``, the continuation, and how it ended: `` [EOS]`` when the model wrote EOS (not
printed), `` [no EOS: cut at N tokens]`` when it reached ``--max-new-tokens`` first.
"""
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from minirlhf.config import UserError, option, run
from minirlhf.tokenizer import pad_sequences

# ---------------------------------------------------------------------------------------------------------------------
# Sampling filters


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. (B, V) -> (B, V).

    Nucleus: sort probabilities descending and keep a token if the mass strictly before it is below ``top_p`` (so the
    most likely token is always kept, and the kept set is the smallest whose mass reaches ``top_p``).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False  # the most likely token, whatever top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# ---------------------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class Generation:
    """Output of :func:`generate`. B rows, prompt length P, N = new tokens produced (<= max_new_tokens)."""

    sequences: torch.Tensor  # (B, P + N) prompt (left-padded) then response (PAD after EOS)
    attention_mask: torch.Tensor  # (B, P + N) 1 on real prompt tokens and on response tokens up to and including EOS
    response: torch.Tensor  # (B, N) the sampled tokens, PAD after EOS
    response_mask: torch.Tensor  # (B, N) 1 up to and including the first EOS
    ended: torch.Tensor  # (B,) bool: the response contains an EOS
    prompt_len: int  # P


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int, eos_id: int,
             pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             generator: Optional[torch.Generator] = None, use_cache: bool = True) -> Generation:
    """Sample continuations of left-padded prompts (B, P). ``use_cache=False`` recomputes the whole sequence every step
    (the reference the cache is tested against)."""
    if temperature <= 0 and not greedy:
        raise UserError("temperature must be > 0 (use greedy decoding for temperature 0)")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    B, P = prompt_ids.shape
    device = prompt_ids.device
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(B, P + max_new_tokens) if use_cache else None
    seqs, mask = prompt_ids, prompt_mask
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens = []
    step_ids, step_mask = prompt_ids, prompt_mask
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model.next_token_logits(step_ids, step_mask, kv_cache=cache)  # (B, V) fp32
        else:
            logits = model.next_token_logits(seqs, mask)
        if not new_tokens and not torch.isfinite(logits).all():  # checked once per call: one sync, not one a token
            raise UserError("the model's next-token logits are not finite: its weights hold NaN or inf, or have "
                            "diverged (sampling from them is meaningless)")
        if greedy:
            token = logits.argmax(-1)
        else:
            logits = filter_logits(logits / temperature, top_k, top_p)
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
        token = torch.where(done, torch.full_like(token, pad_id), token)  # (B,)
        alive = (~done).long()
        new_tokens.append(token)
        seqs = torch.cat([seqs, token[:, None]], 1)
        mask = torch.cat([mask, alive[:, None]], 1)
        done = done | (token == eos_id)
        step_ids, step_mask = token[:, None], alive[:, None]
        if bool(done.all()):
            break
    response = torch.stack(new_tokens, 1) if new_tokens else prompt_ids.new_zeros((B, 0))
    response_mask = mask[:, P:]
    model.train(was_training)
    return Generation(seqs, mask, response, response_mask, (response == eos_id).any(1), P)


def generate_batch(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, generator=None,
                   **sampling) -> Generation:
    """:func:`generate` on token-id prompts: left-padded into one batch on the model's device, with the tokenizer's
    EOS and PAD."""
    device = model.transformer.wte.weight.device
    ids, mask = pad_sequences(prompts, tokenizer.pad_id, side="left")  # (B, P)
    return generate(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                    pad_id=tokenizer.pad_id, generator=generator, **sampling)


def generate_text(model, tokenizer, prompts: list[str], *, max_new_tokens: int, generator=None, **sampling) -> list[str]:
    """Convenience: strings in, decoded continuations (up to the first EOS) out."""
    out = generate_batch(model, tokenizer, [tokenizer.encode_prompt(p) for p in prompts],
                         max_new_tokens=max_new_tokens, generator=generator, **sampling)
    return tokenizer.decode_batch(out.response.tolist(), stop_at_eos=True)


# ---------------------------------------------------------------------------------------------------------------------
# CLI


@dataclass
class GenerateConfig:
    """Sample continuations of a prompt from any policy checkpoint (minirlhf or Hugging Face GPT-2 layout)."""

    model: str = option("", "(required) checkpoint directory, .safetensors file, or hub name (gpt2 ... gpt2-xl, "
                            "needs a network)")
    prompt: list[str] = option([], "one or more prompts (each its own argument)")
    num_samples: int = option(1, "continuations per prompt")
    max_new_tokens: int = option(48, "tokens to generate at most (stops earlier at EOS)")
    temperature: float = option(0.7, "softmax temperature (> 0)")
    top_k: int = option(0, "keep only the k most likely tokens (0 = off)")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability (1 = off)")
    greedy: bool = option(False, "argmax decoding instead of sampling")
    seed: int = option(0, "random seed")
    device: str = option("auto", "cpu, cuda, or auto (cuda when available)")


def main(cfg: GenerateConfig) -> list[str]:
    from minirlhf.checkpoint import load_policy
    from minirlhf.run import resolve_device

    if not cfg.model:
        raise UserError("--model is required")
    if not cfg.prompt:
        raise UserError("give at least one --prompt")
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1:
        raise UserError("--num-samples and --max-new-tokens must be at least 1")
    device = resolve_device(cfg.device)
    model, tokenizer = load_policy(cfg.model)
    model.to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    prompts = [p for p in cfg.prompt for _ in range(cfg.num_samples)]
    gen = generate_batch(model, tokenizer, [tokenizer.encode_prompt(p) for p in prompts],
                         max_new_tokens=cfg.max_new_tokens, generator=generator, temperature=cfg.temperature,
                         top_k=cfg.top_k, top_p=cfg.top_p, greedy=cfg.greedy)
    outs = tokenizer.decode_batch(gen.response.tolist(), stop_at_eos=True)
    for prompt, out, ended in zip(prompts, outs, gen.ended.tolist()):
        end = " [EOS]" if ended else f" [no EOS: cut at {cfg.max_new_tokens} tokens]"
        print(f"{prompt}|\033[1m{out}\033[0m{end}" if sys.stdout.isatty() else f"{prompt}|{out}{end}")
        print("-" * 40)
    return outs


if __name__ == "__main__":
    run(main, GenerateConfig)
