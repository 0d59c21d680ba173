"""kernels/lm_head_logprobs_cpu.py (the CPU path of the LM-head log-probs): log-probs and entropy against the float64
computation of tests/test_kernel_lm_head.py that materialises the logits, gradients to hidden and weight with and
without an entropy gradient, any row chunking, masked rows holding NaN; and through GPT.token_logprobs against the
plain definition (logprob_impl "torch")."""
import pytest
import torch

from kernels.lm_head_logprobs_cpu import LMHeadLogprobsCPU, lm_head_logprobs_cpu
from minirlhf.model import GPT, GPTConfig
from tests._kernel_helpers import assert_close
from tests.test_kernel_lm_head import expected, make

F32 = torch.float32


def assert_matches_float64(hidden, weight, targets, mask, temperature, rows, entropy_grad=True):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp, ent = lm_head_logprobs_cpu(h, w, targets, temperature=temperature, mask=mask, rows=rows)
    want_logp, want_ent = expected(h64, w64, targets, temperature, mask)
    assert logp.dtype == F32 and logp.shape == targets.shape == ent.shape
    assert_close(logp, want_logp, F32, "logp")
    assert_close(ent, want_ent, F32, "entropy")
    g1 = torch.randn_like(want_logp) * 2  # incoming gradients != 1
    g2 = torch.randn_like(want_logp) if entropy_grad else torch.zeros_like(want_logp)
    loss = (logp.double() * g1).sum() + ((ent.double() * g2).sum() if entropy_grad else 0)
    dh, dw = torch.autograd.grad(loss, (h, w))
    want_dh, want_dw = torch.autograd.grad((want_logp * g1).sum() + (want_ent * g2).sum(), (h64, w64))
    if mask is not None:
        assert (dh[~mask] == 0).all()
    assert_close(dh, want_dh, F32, "dhidden")
    assert_close(dw, want_dw, F32, "dweight")


@pytest.mark.parametrize("shape,V,d,rows", [
    ((1,), 7, 16, 16),          # one row, fewer than a chunk
    ((37,), 1271, 24, 16),      # a ragged last chunk
    ((37,), 1271, 24, 1),       # a chunk per row
    ((3, 11), 1271, 32, 4),     # (B, N) rows
    ((5,), 50257, 32, 2),       # GPT-2's vocabulary
])
@pytest.mark.parametrize("entropy_grad", [True, False], ids=["entropy-grad", "logp-grad-only"])
def test_matches_float64(shape, V, d, rows, entropy_grad):
    hidden, weight, targets, mask = make(shape, V, d, "cpu", F32, seed=len(shape) + V)
    assert_matches_float64(hidden, weight, targets, mask, 0.7, rows, entropy_grad)


def test_no_mask_and_extreme_logits_no_nan():
    """No mask, temperature 1; then |z| ~ 1e4 with a masked row of NaN (a fully masked attention row)."""
    hidden, weight, targets, mask = make((6,), 1271, 16, "cpu", F32, seed=5)
    assert_matches_float64(hidden, weight, targets, None, 1.0, 4)
    hidden = hidden * 300.0
    hidden[2], mask[2] = float("nan"), False
    assert_matches_float64(hidden, weight, targets, mask, 1.0, 4)


def test_frozen_weight_skips_its_gradient():
    hidden, weight, targets, mask = make((4, 5), 1271, 32, "cpu", F32, seed=4)
    h = hidden.clone().requires_grad_()
    logp, _ = lm_head_logprobs_cpu(h, weight, targets, mask=mask)
    (dh,) = torch.autograd.grad(logp.sum(), h)
    h64 = hidden.double().requires_grad_()
    (want_dh,) = torch.autograd.grad(expected(h64, weight.double(), targets, 1.0, mask)[0].sum(), h64)
    assert_close(dh, want_dh, F32, "dhidden")


def test_a_padded_table_uses_its_first_rows_and_gives_the_rest_no_gradient():
    hidden, weight, targets, mask = make((9,), 1271, 24, "cpu", F32, seed=6)
    padded = torch.cat([weight, torch.full((5, 24), float("nan"))]).requires_grad_()  # padding rows hold anything
    logp, ent = lm_head_logprobs_cpu(hidden, padded, targets, mask=mask, vocab_size=1271)
    (logp.sum() + ent.sum()).backward()
    w = weight.clone().requires_grad_()
    want_logp, want_ent = lm_head_logprobs_cpu(hidden, w, targets, mask=mask)
    (want_logp.sum() + want_ent.sum()).backward()
    assert torch.equal(logp, want_logp) and torch.equal(ent, want_ent)
    assert torch.equal(padded.grad[:1271], w.grad) and (padded.grad[1271:] == 0).all()


def test_misshaped_targets_are_an_error():
    hidden, weight, targets, _ = make((2, 3), 50, 16, "cpu", F32, seed=7)
    with pytest.raises(ValueError, match=r"targets shape .* must be hidden.shape\[:-1\] = \(2, 3\)"):
        lm_head_logprobs_cpu(hidden, weight, targets.t())


def test_gpt_token_logprobs_chunked_equals_the_definition():
    """GPT.token_logprobs: "auto" on CPU runs this path (once per call), and it gives the plain definition's log-probs,
    entropy and gradients (to the hidden states and the tied embedding) on a real model, at temperature 0.7."""
    torch.manual_seed(0)
    cfg = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=301, n_positions=16)
    models = {impl: GPT(GPTConfig(**cfg, logprob_impl=impl)) for impl in ("auto", "torch")}
    models["torch"].load_state_dict(models["auto"].state_dict())
    hidden = torch.randn(3, 7, 32)
    targets, mask = torch.randint(0, 301, (3, 7)), torch.rand(3, 7) > 0.2
    calls = []
    real = LMHeadLogprobsCPU.forward
    out = {}
    try:
        LMHeadLogprobsCPU.forward = staticmethod(lambda *a: calls.append(1) or real(*a))
        for impl, model in models.items():
            h = hidden.clone().requires_grad_()
            logp, ent = model.token_logprobs(h, targets, temperature=0.7, mask=mask, return_entropy=True)
            (logp.sum() + 0.3 * ent.sum()).backward()
            out[impl] = (logp, ent, h.grad, model.transformer.wte.weight.grad)
    finally:
        LMHeadLogprobsCPU.forward = staticmethod(real)
    assert calls == [1]
    for a, b, name in zip(out["auto"], out["torch"], ("logp", "entropy", "dhidden", "dweight")):
        assert_close(a, b, F32, name)
