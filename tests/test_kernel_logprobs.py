"""kernels/logprobs.py: token log-probs and entropy against an independent float64 computation, forward and backward
(incoming gradients other than 1), on odd shapes, masks, temperatures and extreme logits."""
import pytest
import torch

from kernels.logprobs import token_logprobs
from tests._kernel_helpers import TOL, assert_close, devices_and_dtypes, requires_cuda


def expected(logits, targets, temperature=1.0, mask=None):
    """float64 logp and entropy, written independently of the kernel file's reference."""
    z = logits.double() / temperature
    if mask is not None:
        z = z.masked_fill(~mask.unsqueeze(-1), 0.0)
    logq = z - torch.logsumexp(z, -1, keepdim=True)
    logp = torch.gather(logq, -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    p = logq.exp()
    ent = -(p * logq.nan_to_num(neginf=0.0)).sum(-1)
    if mask is not None:
        logp, ent = logp * mask, ent * mask
    return logp, ent


def check_against_float64(logits, targets, temperature, mask, dtype, impl="auto", entropy=True):
    x = logits.detach().clone().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    out = token_logprobs(x, targets, temperature=temperature, mask=mask, return_entropy=entropy, impl=impl)
    logp, ent = out if entropy else (out, None)
    want_logp, want_ent = expected(x64, targets, temperature, mask)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert_close(logp, want_logp, dtype, "logp")
    g1 = torch.randn_like(want_logp) * 3  # incoming gradients != 1
    g2 = torch.randn_like(want_logp)
    loss, want_loss = (logp.double() * g1).sum(), (want_logp * g1).sum()
    if entropy:
        assert_close(ent, want_ent, dtype, "entropy")
        loss, want_loss = loss + (ent.double() * g2).sum(), want_loss + (want_ent * g2).sum()
    (dx,) = torch.autograd.grad(loss, x)
    (want_dx,) = torch.autograd.grad(want_loss, x64)
    assert dx.dtype == logits.dtype
    if mask is not None:
        assert (dx[~mask] == 0).all(), "masked rows must get a zero gradient"
    assert_close(dx, want_dx, dtype, "dlogits")


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("rows,V", [((1,), 7), ((3,), 1271), ((423,), 7), ((423,), 1271), ((3,), 50257), ((2, 5), 1271)])
def test_matches_float64_masked_temperature(device, dtype, rows, V):
    gen = torch.Generator().manual_seed(V + len(rows))
    logits = (torch.randn(*rows, V, generator=gen) * 4).to(device, dtype)
    targets = torch.randint(0, V, rows, generator=gen).to(device)
    mask = (torch.rand(rows, generator=gen) > 0.3).to(device)
    mask.view(-1)[0] = True
    check_against_float64(logits, targets, 0.7, mask, dtype)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_mask_no_entropy_both_impls(impl):
    gen = torch.Generator().manual_seed(1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    logits = (torch.randn(5, 1271, generator=gen) * 2).to(dev)
    targets = torch.randint(0, 1271, (5,), generator=gen).to(dev)
    check_against_float64(logits, targets, 1.0, None, torch.float32, impl=impl, entropy=False)


# V = 20011 (> 16384) runs the one-row-per-program kernels under the CPU interpreter too (as every wide row on a GPU)
@pytest.mark.parametrize("V", [1271, 20011])
def test_time_sliced_3d_logits_without_copy(V):
    """logits[:, :-1] (the usual shift) is read in place through its batch and time strides."""
    gen = torch.Generator().manual_seed(2)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    full = (torch.randn(3, 6, V, generator=gen) * 3).to(dev)
    logits = full[:, :-1]
    assert not logits.is_contiguous()
    targets = torch.randint(0, V, (3, 5), generator=gen).to(dev)
    mask = torch.rand(3, 5, generator=gen).to(dev) > 0.2
    check_against_float64(logits, targets, 1.3, mask, torch.float32)


@pytest.mark.parametrize("V", [1271, 20011])
def test_logits_broadcast_over_the_batch(V):
    """A batch stride of 0 (one row of logits expanded over the batch, read in place): the gradient sums over the
    copies."""
    gen = torch.Generator().manual_seed(4)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = (torch.randn(1, 2, V, generator=gen) * 3).to(dev).requires_grad_()
    base64 = base.detach().double().requires_grad_()
    targets = torch.randint(0, V, (3, 2), generator=gen).to(dev)
    g = torch.randn(3, 2, generator=gen, dtype=torch.float64).to(dev)  # incoming gradients != 1
    logp = token_logprobs(base.expand(3, 2, V), targets, impl="triton")
    want, _ = expected(base64.expand(3, 2, V), targets)
    assert_close(logp, want, torch.float32, "logp")
    (dx,) = torch.autograd.grad((logp.double() * g).sum(), base)
    (want_dx,) = torch.autograd.grad((want * g).sum(), base64)
    assert_close(dx, want_dx, torch.float32, "dlogits")


@pytest.mark.parametrize("V", [1271, 20011])
def test_extreme_logits_no_nan(V):
    """Large magnitudes, -inf entries in live rows, whole -inf rows where masked: finite results, right values."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, V, generator=gen) * 1e4
    logits[1, ::3] = -float("inf")  # excluded tokens (e.g. top-k filtered); the target stays finite
    logits[2] = -float("inf")      # a padded row: masked
    logits[3] = 0.0
    logits[3, 5] = 3e4             # nearly one-hot
    targets = torch.tensor([0, 1, 7, 5, 100, 9])
    mask = torch.tensor([True, True, False, True, True, True])
    check_against_float64(logits.to(dev), targets.to(dev), 1.0, mask.to(dev), torch.float32)


def test_one_hot_entropy_is_zero():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    logits = torch.full((2, 50257), -float("inf"))
    logits[0, 123] = 4.0  # exactly one finite logit
    logits[1] = 0.0
    logits[1, 7] = 1000.0  # every other probability underflows
    x = logits.to(dev).requires_grad_()
    logp, ent = token_logprobs(x, torch.tensor([123, 7], device=dev), return_entropy=True)
    assert torch.equal(ent.cpu(), torch.zeros(2)) and torch.equal(logp.cpu(), torch.zeros(2))
    (ent * torch.tensor([2.0, -3.0], device=dev)).sum().backward()
    assert not torch.isnan(x.grad).any() and (x.grad == 0).all()


@pytest.mark.parametrize("V", [1271, 20011])
def test_only_entropy_gradient(V):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(7, V, generator=gen).to(dev)
    x, x64 = logits.clone().requires_grad_(), logits.double().requires_grad_()
    _, ent = token_logprobs(x, torch.zeros(7, dtype=torch.long, device=dev), return_entropy=True)
    (dx,) = torch.autograd.grad(ent.sum() * 2, x)
    (want,) = torch.autograd.grad(expected(x64, torch.zeros(7, dtype=torch.long, device=dev))[1].sum() * 2, x64)
    assert_close(dx, want, torch.float32, "dlogits")


@pytest.mark.parametrize("V", [1271, 32767])
def test_spikes_at_the_row_edges(V):
    """Each row's first and last logits stand far above the rest, and targets sit on them. V = 32767 (V = 3 mod 4,
    just under two 16384-wide blocks) sends the CPU run through the one-row kernels, whose 16-byte aligned walk starts
    up to 3 elements before a row and then needs a third block to reach the row's end: a first block read without its
    mask (the previous row's spike leaks into this row's log-sum-exp) or a block count taken from the row's length
    instead of the aligned span (this row's own spike missed) is off by far more than rounding, forward and backward."""
    gen = torch.Generator().manual_seed(8)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    logits = torch.randn(4, V, generator=gen)
    logits[:, 0] += torch.tensor([20.0, 18.0, 22.0, 19.0])
    logits[:, -1] += torch.tensor([24.0, 26.0, 21.0, 25.0])
    targets = torch.tensor([V - 1, 0, V - 1, 7])
    check_against_float64(logits.to(dev), targets.to(dev), 0.9, torch.ones(4, dtype=torch.bool, device=dev),
                          torch.float32)


@pytest.mark.parametrize("V", [1271, 20011])
def test_masked_rows_may_hold_nan_and_inf(V):
    """Masked rows are never read, so they may hold anything: rows of NaN and of +inf (not only -inf, which a kernel
    reading them would turn into harmless zeros) must give 0 and an exactly zero gradient, and leave the live rows
    exact, through both the tile kernels (V = 1271) and the one-row kernels (V = 20011)."""
    gen = torch.Generator().manual_seed(9)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    logits = torch.randn(5, V, generator=gen) * 2
    logits[1] = float("nan")
    logits[3] = float("inf")
    logits[4, ::7] = float("nan")
    targets = torch.randint(0, V, (5,), generator=gen)
    mask = torch.tensor([True, False, True, False, False])
    check_against_float64(logits.to(dev), targets.to(dev), 1.1, mask.to(dev), torch.float32)


@pytest.mark.parametrize("V", [1271, 20011])
def test_target_out_of_range_is_nan_on_live_rows_only(V):
    """The documented contract for a target outside [0, V): NaN on a live row (loudly, not the logit of a neighbouring
    element such as the next row's first one), nothing at all on a masked row; the other rows stay exact."""
    gen = torch.Generator().manual_seed(10)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    logits = (torch.randn(5, V, generator=gen) * 2).to(dev)
    targets = torch.tensor([V, -1, 3, V, V - 1], device=dev)
    mask = torch.tensor([True, True, True, False, True], device=dev)
    logp = token_logprobs(logits, targets, mask=mask, impl="triton")
    assert torch.isnan(logp[:2]).all()
    assert logp[3].item() == 0.0
    want, _ = expected(logits.double(), targets.clamp(max=V - 1), mask=mask)
    assert_close(logp[[2, 4]], want[[2, 4]], torch.float32, "logp")


def test_bad_arguments():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    logits, targets = torch.randn(2, 7, device=dev), torch.zeros(2, dtype=torch.long, device=dev)
    with pytest.raises(ValueError):
        token_logprobs(logits, targets, impl="cuda")
    with pytest.raises(ValueError):
        token_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError):
        token_logprobs(logits, torch.zeros(3, dtype=torch.long, device=dev), impl="triton")


def test_impl_auto_takes_the_kernel(monkeypatch):
    """impl="auto" must run the Triton path wherever it can (CUDA tensors, or CPU tensors under the interpreter, as in
    the CPU run of these tests): the kernel and its reference agree numerically, so a spy on the launcher counts the
    calls. (How impl= resolves in general: tests/test_kernel_common.py.)"""
    import kernels.logprobs as lp
    calls, real = [], lp._logprob_fwd
    monkeypatch.setattr(lp, "_logprob_fwd", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    logits, targets = torch.randn(3, 50, device=dev), torch.zeros(3, dtype=torch.long, device=dev)
    token_logprobs(logits, targets)
    assert len(calls) == 1, "impl='auto' did not run the Triton kernel"
    token_logprobs(logits, targets, impl="torch")
    assert len(calls) == 1


@requires_cuda
@pytest.mark.parametrize("rows", [(4,), (8, 128)])
def test_gpu_bf16_gpt2_vocab(rows):
    """bf16 logits with the real vocabulary; few rows take the split-and-merge path."""
    gen = torch.Generator().manual_seed(6)
    V = 50257
    logits = (torch.randn(*rows, V, generator=gen) * 3).to("cuda", torch.bfloat16)
    targets = torch.randint(0, V, rows, generator=gen).cuda()
    mask = (torch.rand(rows, generator=gen) > 0.2).cuda()
    check_against_float64(logits, targets, 0.8, mask, torch.bfloat16)
    assert TOL[torch.bfloat16] >= 1e-2
