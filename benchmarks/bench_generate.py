"""KV-cache generation vs full recomputation, GPT-2 124M shapes (random weights).

Without a cache, step s re-runs the model over all P + s tokens: O(N^2) work for N new tokens. With the cache each
step runs one token through the model and attends to the cached keys: O(N). Both paths must produce the same tokens
(asserted first; greedy decoding).

    python -m benchmarks.bench_generate [--batch 8 --prompt-len 32 --new-tokens 64 --device cpu]
"""
import argparse
import time

import torch

from benchmarks._results import environment, write_section
from minirlhf.generate import generate
from minirlhf.model import GPT, GPTConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only; don't update RESULTS.md")
    args = ap.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = GPT(GPTConfig(attn_impl="sdpa")).to(device).eval()  # GPT-2 small: 12 x 768, vocab 50257
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size - 1, (args.batch, args.prompt_len), device=device)
    mask = torch.ones_like(prompt)
    kw = dict(max_new_tokens=args.new_tokens, eos_id=cfg.vocab_size + 5, pad_id=cfg.vocab_size, greedy=True)

    def timed(use_cache):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = generate(model, prompt, mask, use_cache=use_cache, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best, out

    t_cache, a = timed(True)
    t_full, b = timed(False)
    assert torch.equal(a.sequences, b.sequences), "cached and recomputed generations differ"
    env = environment()
    rows = [("KV cache", t_cache), ("recompute", t_full)]
    tokens = args.batch * args.new_tokens
    table = ["| method | seconds | new tokens/s |", "|---|---|---|"]
    table += [f"| {name} | {t:.2f} | {tokens / t:.1f} |" for name, t in rows]
    md = (f"## Generation: KV cache vs recomputation\n\n{env}\n\nGPT-2 124M shapes, random weights, batch "
          f"{args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, fp32, best of "
          f"{args.repeats}. Same tokens asserted.\n\n" + "\n".join(table) +
          f"\n\nSpeed-up of the cache: **{t_full / t_cache:.1f}x**.")
    print(env)
    print("\n".join(table))
    print(f"speed-up: {t_full / t_cache:.2f}x")
    if not args.no_write:
        write_section(f"generate-{device.type}", md)


if __name__ == "__main__":
    main()
