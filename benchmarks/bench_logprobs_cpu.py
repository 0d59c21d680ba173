"""The LM-head log-probs on a CPU: ``GPT.token_logprobs`` with logprob_impl "torch" (the plain definition: logits,
log-softmax, gather, entropy) against "chunked" (kernels/lm_head_logprobs_cpu.py, several row-chunk sizes), on the
shapes of a PPO step at GPT-2 124M: hidden states (32, 36, 768) of which the 32 response positions are scored,
V = 50257, temperature 0.7, fp32.

Per implementation, interleaved over ``--repeats`` rounds (median): the forward without autograd (the rollout and
reference passes), forward + backward of the log-probs alone (PPO at --ent-coef 0) and with the entropy too, and the
bytes autograd keeps between forward and backward (counted through saved-tensor hooks, parameters aside). The results
are checked to agree before anything is timed.

    python -m benchmarks.bench_logprobs_cpu [--threads 2 --repeats 5]
"""
import argparse
import statistics
import time

import torch

from benchmarks._results import environment, write_section
from minirlhf.model import GPT, GPTConfig

IMPLS = [("torch", None), ("chunked", 4), ("chunked", 16), ("chunked", 64)]  # (logprob_impl, rows per chunk)


def run_once(model: GPT, hidden, targets, mask, rows, mode: str) -> float:
    """Seconds for one call in ``mode``: "forward" (no autograd), "backward" (logp only) or "entropy" (logp and H)."""
    import kernels.lm_head_logprobs_cpu as cpu

    cpu.ROWS = rows or cpu.ROWS
    h = hidden.detach().requires_grad_(mode != "forward")
    t0 = time.perf_counter()
    with torch.set_grad_enabled(mode != "forward"):
        logp, entropy = model.token_logprobs(h, targets, temperature=0.7, mask=mask, return_entropy=True)
        if mode != "forward":
            (logp.sum() + (entropy.sum() if mode == "entropy" else 0)).backward()
    return time.perf_counter() - t0


def saved_bytes(model: GPT, hidden, targets, mask) -> int:
    """Bytes autograd holds for the backward of the log-probs and entropy (parameters aside)."""
    params, total = {p.data_ptr() for p in model.parameters()}, [0]

    def pack(t):
        if t.data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.token_logprobs(hidden.detach().requires_grad_(), targets, temperature=0.7, mask=mask,
                             return_entropy=True)
    return total[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the table shows medians")
    ap.add_argument("--no-write", action="store_true", help="print only; don't update RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {impl: GPT(GPTConfig(logprob_impl=impl)) for impl in ("torch", "chunked")}
    models["chunked"].load_state_dict(models["torch"].state_dict())
    hidden = torch.randn(32, 36, 768)[:, 3:-1]  # (B, N, d): the response positions of prompt + response states
    targets, mask = torch.randint(0, 50257, (32, 32)), torch.ones(32, 32)
    with torch.no_grad():  # sane before timed: the same log-probs and entropy
        want = models["torch"].token_logprobs(hidden, targets, temperature=0.7, mask=mask, return_entropy=True)
        got = models["chunked"].token_logprobs(hidden, targets, temperature=0.7, mask=mask, return_entropy=True)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)

    modes = ("forward", "backward", "entropy")
    times = {(impl, rows, mode): [] for impl, rows in IMPLS for mode in modes}
    for _ in range(args.repeats + 1):  # the first round warms up
        for impl, rows in IMPLS:
            for mode in modes:
                times[(impl, rows, mode)].append(run_once(models[impl], hidden, targets, mask, rows, mode))
    lines = ["| implementation | forward, no autograd (s) | forward + backward, logp (s) | forward + backward, logp "
             "and entropy (s) | kept for the backward (MiB) |", "|---|---|---|---|---|"]
    for impl, rows in IMPLS:
        med = [statistics.median(times[(impl, rows, m)][1:]) for m in modes]
        name = "torch (the definition)" if rows is None else f"chunked, {rows} rows a chunk"
        lines.append(f"| {name} | " + " | ".join(f"{t:.3f}" for t in med)
                     + f" | {saved_bytes(models[impl], hidden, targets, mask) / 2 ** 20:.0f} |")
    env = environment()
    md = (f"## LM-head log-probs on a CPU: the definition vs the chunked path\n\n{env}; {args.threads} torch "
          f"threads\n\nGPT.token_logprobs on (32, 32) response positions of GPT-2 124M (d 768, V 50257), "
          f"temperature 0.7, fp32; median of {args.repeats} interleaved rounds after a warm-up.\n\n"
          + "\n".join(lines))
    print(env)
    print("\n".join(lines))
    if not args.no_write:
        write_section("logprobs-cpu", md)


if __name__ == "__main__":
    main()
