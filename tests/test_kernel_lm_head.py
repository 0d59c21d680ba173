"""kernels/lm_head_logprobs.py: log-probs and entropy from hidden states and the LM head, against a float64 computation
that materialises the logits; gradients to hidden and weight; both ways of producing the logits tiles; as the SFT loss."""
import pytest
import torch

from kernels.lm_head_logprobs import CHUNK_BYTES, DH_MODE, LMHeadLogprobsFunction, lm_head_logprobs
from tests._kernel_helpers import assert_close, devices_and_dtypes, requires_cuda


def expected(hidden, weight, targets, temperature=1.0, mask=None, logits_dtype=None):
    """float64 logp and entropy; ``logits_dtype``: round the logits to it first (what matmul="torch" computes in)."""
    hidden = hidden.double()
    if mask is not None:  # masked rows are out of the computation entirely, whatever they hold
        hidden = torch.where(mask.unsqueeze(-1), hidden, 0.0)
    z = hidden @ weight.double().t()
    if logits_dtype is not None:
        z = z + (z.detach().to(logits_dtype).double() - z.detach())
    z = z / temperature
    logq = z - torch.logsumexp(z, -1, keepdim=True)
    logp = torch.gather(logq, -1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    if mask is not None:
        logp, ent = logp * mask, ent * mask
    return logp, ent


def make(rows, V, d, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*rows, d, generator=gen)).to(device, dtype)
    weight = (torch.randn(V, d, generator=gen) * (2.0 / d ** 0.5)).to(device, dtype)
    targets = torch.randint(0, V, rows, generator=gen).to(device)
    mask = (torch.rand(rows, generator=gen) > 0.3).to(device)
    mask.view(-1)[0] = True
    return hidden, weight, targets, mask


def with_plan(config=None, dh_mode=DH_MODE):
    """lm_head_logprobs' Triton path with a launch plan the public function fixes (the fused kernels' block shapes,
    how dh accumulates over vocabulary chunks), through its autograd function."""
    def fn(h, w, targets, *, temperature, mask, return_entropy, matmul, chunk_size=None):  # returns (logp, entropy)
        return LMHeadLogprobsFunction.apply(h, w, targets, mask, temperature, matmul, chunk_size, CHUNK_BYTES, config,
                                            dh_mode)
    return fn


def check_against_float64(hidden, weight, targets, mask, temperature, dtype, fn=lm_head_logprobs, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp, ent = fn(h, w, targets, temperature=temperature, mask=mask, return_entropy=True, **kw)
    # matmul="torch" keeps each chunk's logits in the input dtype (as a plain model does): compare with that rounding
    rounded = dtype if kw.get("matmul") == "torch" and dtype != torch.float32 else None
    want_logp, want_ent = expected(h64, w64, targets, temperature, mask, rounded)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert_close(logp, want_logp, dtype, "logp")
    assert_close(ent, want_ent, dtype, "entropy")
    g1 = torch.randn_like(want_logp) * 2  # incoming gradients != 1
    g2 = torch.randn_like(want_logp)
    dh, dw = torch.autograd.grad((logp.double() * g1).sum() + (ent.double() * g2).sum(), (h, w))
    want_dh, want_dw = torch.autograd.grad((want_logp * g1).sum() + (want_ent * g2).sum(), (h64, w64))
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    if mask is not None:
        assert (dh[~mask] == 0).all()
    assert_close(dh, want_dh, dtype, "dhidden")
    assert_close(dw, want_dw, dtype, "dweight")


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("rows,V,d,matmul,chunk", [
    ((1,), 7, 16, "torch", None),
    ((3,), 1271, 48, "torch", 512),      # three vocabulary chunks, the last one ragged
    ((423,), 1271, 32, "torch", None),
    ((3,), 50257, 32, "torch", None),
    ((2, 5), 1271, 40, "triton", None),  # fused tiles: d not a multiple of the K block
    ((37,), 1271, 64, "triton", None),
])
def test_matches_float64(device, dtype, rows, V, d, matmul, chunk):
    hidden, weight, targets, mask = make(rows, V, d, device, dtype, seed=V + d)
    check_against_float64(hidden, weight, targets, mask, 0.8, dtype, matmul=matmul, chunk_size=chunk)


@pytest.mark.parametrize("dh_mode", ["mm", "transposed"])
def test_dh_accumulation_modes(dh_mode):
    """The other two ways of accumulating dh over vocabulary chunks (see _accumulate_dh) give the same gradients."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, mask = make((2, 7), 1271, 24, dev, torch.float32, seed=7)
    for matmul in ("torch", "triton"):
        check_against_float64(hidden, weight, targets, mask, 1.0, torch.float32, with_plan(dh_mode=dh_mode),
                              matmul=matmul, chunk_size=384)


def test_fused_tiles_split_over_several_programs():
    """matmul="triton" with 16-wide tiles (the launch plan's ``config``): 1063 / 16 -> 67 vocabulary tiles, more than
    the 64 one program folds, so each row's vocabulary is split over two programs (the second ending in a ragged tile)
    and their partial (m, S, A) are merged. With the default tiles the CPU run never splits (one program holds every
    tile), so only this test checks that split j starts at vocabulary id j * TILES * BLOCK_V and that the merge is
    exact."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, mask = make((2, 5), 1063, 16, dev, torch.float32, seed=8)
    targets[0, 0], targets[0, 1] = 1062, 64 * 16  # the last token; the first of split 2 (CPU plan)
    plan = with_plan(config=(16, 16, 16, 4, 1, "ieee"))
    check_against_float64(hidden, weight, targets, mask, 0.9, torch.float32, plan, matmul="triton")


def test_no_mask_temperature_one_auto():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, _ = make((2, 3), 1271, 24, dev, torch.float32, seed=1)
    check_against_float64(hidden, weight, targets, None, 1.0, torch.float32)


def test_impl_torch_matches_float64():
    hidden, weight, targets, mask = make((5,), 1271, 24, "cpu", torch.float32, seed=2)
    check_against_float64(hidden, weight, targets, mask, 1.2, torch.float32, impl="torch")


def test_as_sft_loss():
    """-(logp * mask).sum() / mask.sum() is the masked mean cross-entropy, gradients included."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, mask = make((3, 11), 1271, 32, dev, torch.float32, seed=3)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp = lm_head_logprobs(h, w, targets, mask=mask)
    loss = -(logp * mask).sum() / mask.sum()
    labels = targets.masked_fill(~mask, -100)
    want = torch.nn.functional.cross_entropy((h64 @ w64.t()).flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert_close(loss, want, torch.float32, "loss")
    dh, dw = torch.autograd.grad(loss, (h, w))
    want_dh, want_dw = torch.autograd.grad(want, (h64, w64))
    assert_close(dh, want_dh, torch.float32, "dhidden")
    assert_close(dw, want_dw, torch.float32, "dweight")


@pytest.mark.parametrize("matmul", ["torch", "triton"])
def test_frozen_weight(matmul):
    """Only hidden needs a gradient (a frozen head): the backward skips dW and dh is still exact."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, mask = make((4, 5), 1271, 32, dev, torch.float32, seed=4)
    h, h64 = hidden.clone().requires_grad_(), hidden.double().requires_grad_()
    logp = lm_head_logprobs(h, weight, targets, mask=mask, matmul=matmul)
    want_logp, _ = expected(h64, weight.double(), targets, 1.0, mask)
    assert_close(logp, want_logp, torch.float32, "logp")
    g = torch.randn(4, 5, dtype=torch.float64, device=dev)
    (dh,) = torch.autograd.grad((logp.double() * g).sum(), h)
    (want_dh,) = torch.autograd.grad((want_logp * g).sum(), h64)
    assert_close(dh, want_dh, torch.float32, "dhidden")


def test_misshaped_targets_are_an_error():
    hidden, weight, targets, _ = make((2, 3), 50, 16, "cpu", torch.float32, seed=7)
    with pytest.raises(ValueError, match=r"targets shape .* must be hidden.shape\[:-1\] = \(2, 3\)"):
        lm_head_logprobs(hidden, weight, targets.t(), impl="triton")


def test_extreme_hidden_no_nan():
    """Huge logits (|z| ~ 1e4) and a row of -inf in a masked position: finite, right values."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, mask = make((6,), 1271, 16, dev, torch.float32, seed=5)
    hidden = hidden * 300.0
    hidden[2] = float("nan")  # masked below (a fully masked attention row): must reach no result, dW included
    mask[2] = False
    for matmul in ("torch", "triton"):
        check_against_float64(hidden, weight, targets, mask, 1.0, torch.float32, matmul=matmul)


@requires_cuda
@pytest.mark.parametrize("matmul", ["torch", "triton"])
def test_gpu_bf16_gpt2_shapes(matmul):
    hidden, weight, targets, mask = make((2, 300), 50257, 768, "cuda", torch.bfloat16, seed=6)
    check_against_float64(hidden, weight, targets, mask, 1.0, torch.bfloat16, matmul=matmul)
