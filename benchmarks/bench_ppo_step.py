"""Seconds per PPO step of train_ppo.py end to end (rollout, scoring, log-probs, training), GPT-2 124M shapes, with the
Triton kernels (flash attention + decode, fused LM-head log-probs) against the PyTorch paths (SDPA + fp32 log-softmax).

Random weights (policy, reference and reward model all GPT-2 small), so every response runs to the full length. Each
configuration runs ``--steps`` PPO iterations through ``train_ppo.main``; the first is warm-up (Triton compiles), the
table shows the median of the rest, split as train_ppo.py logs it, and the peak GPU memory.

    python -m benchmarks.bench_ppo_step [--batch 64 --new-tokens 32 --steps 4]
"""
import argparse
import json
import statistics
import tempfile

import torch

import train_ppo
from benchmarks._results import environment, write_section
from minirlhf.checkpoint import save_checkpoint
from minirlhf.data import write_jsonl
from minirlhf.model import GPT, GPTConfig, RewardModel

PROMPTS = ["The movie was", "I think this film", "Honestly, the acting", "What a story:", "The ending felt",
           "My favourite scene", "The director", "In the second half"]
SPLITS = ("time_generate", "time_score", "time_logprobs", "time_train")


def write_inputs(folder: str, cfg: GPTConfig, seed: int = 0) -> None:
    """train_ppo.py's inputs in ``folder``, random weights of shape ``cfg``: an SFT policy (sft/), a reward model
    (rm/) and the prompts (prompts.jsonl). Random weights make EOS rare, so every response runs to full length."""
    torch.manual_seed(seed)
    save_checkpoint(f"{folder}/sft", GPT(cfg), stage="sft", config=cfg)
    save_checkpoint(f"{folder}/rm", RewardModel(GPT(cfg)), stage="rm", config=cfg)
    write_jsonl(f"{folder}/prompts.jsonl", [{"prompt": p} for p in PROMPTS])


def inputs(folder: str) -> dict[str, str]:
    """The train_ppo.Config fields naming what ``write_inputs`` wrote."""
    return dict(policy=f"{folder}/sft", reward=f"{folder}/rm", prompts=f"{folder}/prompts.jsonl")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-write", action="store_true", help="print only; don't update RESULTS.md")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp()
    write_inputs(tmp, GPTConfig())  # GPT-2 small: 12 layers, 768 wide, vocab 50257

    rows = []
    impls = [("triton", "triton"), ("sdpa", "torch")] if args.device == "cuda" else [("sdpa", "torch")]
    for attn, logprob in impls:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out = f"{tmp}/ppo-{attn}-{logprob}"
        train_ppo.main(train_ppo.Config(
            **inputs(tmp), out=out, steps=args.steps,
            batch_size=args.batch, max_new_tokens=args.new_tokens, sample_every=0, save_every=0, device=args.device,
            attn_impl=attn, logprob_impl=logprob))
        records = [json.loads(line) for line in open(f"{out}/metrics.jsonl")][1:]  # drop the warm-up step
        times = {k: statistics.median(r[k] for r in records) for k in SPLITS}
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device == "cuda" else float("nan")
        rows.append((f"attn={attn}, logprobs={logprob}", times, peak))

    env = environment()
    head = "| implementation | generate | score | log-probs | train | total | peak GPU GiB |"
    table = [head, "|---|---|---|---|---|---|---|"]
    for name, t, peak in rows:
        table.append(f"| {name} | " + " | ".join(f"{t[k]:.2f}" for k in SPLITS) +
                     f" | **{sum(t.values()):.2f}** | {peak:.1f} |")
    md = (f"## PPO step, end to end (train_ppo.py)\n\n{env}\n\nGPT-2 124M policy, reference and reward model (random "
          f"weights), batch {args.batch}, {args.new_tokens} new tokens, 4 PPO epochs, bf16 autocast on CUDA; seconds "
          f"per step, median of steps 2..{args.steps}.\n\n" + "\n".join(table))
    print(env)
    print("\n".join(table))
    if not args.no_write:
        write_section(f"ppo-step-{args.device}", md)


if __name__ == "__main__":
    main()
