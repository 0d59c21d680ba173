"""Per-token log-probs (and entropy) from hidden states and the LM head on the CPU: the function of
``kernels/lm_head_logprobs.py``, written in PyTorch operations that a CPU runs well.

For rows h_i (hidden states, d wide), the tied embedding W (V x d), targets t_i and temperature T:

    z_iv = (h_i / T) . W_v,   logp_i = z_it - lse_i,   H_i = lse_i - sum_v p_iv z_iv      (p_iv = e^(z_iv - lse_i))

The plain definition (``GPT.token_logprobs`` with logprob_impl "torch": ``log_softmax(h W^T / T).gather(t)``, the
entropy from ``exp(log p) * log p``) makes about ten passes over N x V tensors, each a fresh allocation of
N V 4 bytes (196 MiB at N = 1024, V = 50257), and autograd keeps five of them for the backward (985 MiB). Here:

* one matmul writes the N x V logits into one buffer (the temperature is folded into h, N x d, before it);
* the rows are then visited a few at a time (``rows`` per chunk, a few MB, so the passes stay in the cache):
  m = max_v z, z <- z - m in place, e = exp(z) into a small reused buffer, S = sum_v e, A = sum_v e z (a batched
  dot product, no temporary); then lse = m + log S, logp = z_t - log S, H = log S - A / S;
* the backward reuses the same buffer, row chunk by row chunk: with g = dL/dlogp and g_H = dL/dH,

      dz_iv = -p_iv (g_i + g_H,i (log p_iv + H_i)) + g_i [v == t_i]

  (the entropy term only when its gradient is not zero), then dh = dz W / T and dW = dz^T (h / T): two matmuls.

So one N x V buffer is kept for the backward instead of five (199 MiB against 985), and the passes run at cache
speed: on the race's CPU (benchmarks/RESULTS.md, "LM-head log-probs on a CPU", GPT-2 124M, N = 1024, 2 threads)
0.93 s against 1.29 for the forward, 2.1-2.4 s against 2.9-3.1 with the backward. The results equal
the definition's up to fp32 rounding (tests/test_kernel_lm_head_cpu.py, forward and backward). Rows where ``mask``
is 0 are zeroed in a copy of the hidden states first (whatever they hold, NaN from a fully masked attention row
included, reaches neither the results nor the gradients) and give logp = H = 0 and no gradient.

Shapes: hidden (..., d) and weight (V, d) fp32, or a padded table (V', d) with ``vocab_size=V``; targets (...)
integer in [0, V); mask (...) or None. Returns fp32 (logp, entropy), each of shape hidden.shape[:-1].

Test: ``python -m pytest tests/test_kernel_lm_head_cpu.py``. Bench: ``python -m benchmarks.bench_logprobs_cpu``.
"""
import torch

ROWS = 16  # rows of logits per chunk of the passes: 16 x 50257 x 4 bytes = 3.2 MB (4 to 64: alike, within noise)


class LMHeadLogprobsCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, keep, temperature: float, rows: int, vocab_size: int):
        # hidden (N, d), weight (V', d) of which the first vocab_size = V rows are used, targets (N,) long, keep (N,)
        hs = torch.where(keep[:, None], hidden, 0.0) / temperature  # (N, d) h / T, masked rows zeroed
        targets = torch.where(keep, targets, 0)
        z = hs @ weight[:vocab_size].t()  # (N, V) logits / T
        log_s, entropy = z.new_empty(len(z)), z.new_empty(len(z))  # (N,) each
        e = z.new_empty(min(rows, len(z)), z.shape[1])  # (rows, V) exp, reused
        for i in range(0, len(z), rows):
            c = z[i:i + rows]  # (r, V) a view of the buffer
            r = len(c)
            c.sub_(c.amax(1, keepdim=True))  # z - m: the largest is 0
            torch.exp(c, out=e[:r])
            s = e[:r].sum(1)  # (r,) S
            a = torch.bmm(e[:r, None, :], c[:, :, None]).view(r)  # (r,) A = sum_v e_v (z_v - m)
            log_s[i:i + r] = s.log()
            entropy[i:i + r] = log_s[i:i + r] - a / s
        logp = z.gather(1, targets[:, None]).squeeze(1) - log_s  # (N,) (z_t - m) - log S
        logp, entropy = logp * keep, entropy * keep
        ctx.save_for_backward(hs, weight, targets, keep, z, log_s, entropy)
        ctx.temperature, ctx.rows, ctx.vocab_size = temperature, rows, vocab_size
        return logp, entropy

    @staticmethod
    def backward(ctx, g, g_entropy):
        hs, weight, targets, keep, z, log_s, entropy = ctx.saved_tensors
        g = g * keep  # (N,)
        with_entropy = g_entropy is not None and bool(g_entropy.any())
        p = z.new_empty(min(ctx.rows, len(z)), z.shape[1])  # (rows, V) probabilities, reused
        for i in range(0, len(z), ctx.rows):
            c = z[i:i + ctx.rows]  # (r, V): z - m on the way in, dz on the way out
            r = len(c)
            c.sub_(log_s[i:i + r, None])  # log p
            torch.exp(c, out=p[:r])
            if with_entropy:  # c <- g + g_H (log p + H)
                c.add_(entropy[i:i + r, None]).mul_((g_entropy[i:i + r] * keep[i:i + r])[:, None])
                c.add_(g[i:i + r, None])
                c.mul_(p[:r]).neg_()
            else:
                torch.mul(p[:r], -g[i:i + r, None], out=c)
        z.view(-1)[torch.arange(len(z), device=z.device) * z.shape[1] + targets] += g  # + g [v == t]
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (z @ weight[:ctx.vocab_size]) / ctx.temperature  # (N, d)
        if ctx.needs_input_grad[1]:  # (V', d), written in place: no second V' x d buffer for the padding rows
            grad_weight = torch.empty_like(weight)
            grad_weight[ctx.vocab_size:].zero_()
            torch.mm(z.t(), hs, out=grad_weight[:ctx.vocab_size])
        return grad_hidden, grad_weight, None, None, None, None, None


def lm_head_logprobs_cpu(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         temperature: float = 1.0, mask: torch.Tensor | None = None, rows: int | None = None,
                         vocab_size: int | None = None):
    """(logp, entropy) of ``targets`` under softmax(hidden @ weight[:vocab_size]^T / temperature), fp32, shape
    hidden.shape[:-1]; 0 where ``mask`` is 0. Gradients flow to ``hidden`` and ``weight`` (0 on the rows past
    ``vocab_size``: a padded embedding table is passed whole, so its gradient needs no copy; default: every row).
    ``rows``: rows of logits per chunk of the passes (default ``ROWS``, read at the call)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = hidden.shape[:-1]
    if targets.shape != shape or (mask is not None and mask.shape != shape):
        raise ValueError(f"targets shape {tuple(targets.shape)} (and mask's) must be hidden.shape[:-1] = "
                         f"{tuple(shape)}")
    keep = torch.ones(shape, dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
    logp, entropy = LMHeadLogprobsCPU.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).long(),
                                            keep.reshape(-1), float(temperature), rows or ROWS,
                                            len(weight) if vocab_size is None else vocab_size)
    return logp.view(shape), entropy.view(shape)
