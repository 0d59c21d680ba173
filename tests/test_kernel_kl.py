"""kernels/kl.py: the full-distribution KL(policy || reference) against a float64 computation, forward and backward
(incoming gradients other than 1), with masks, temperature, extreme logits."""
import pytest
import torch

from kernels.kl import full_kl
from tests._kernel_helpers import assert_close, devices_and_dtypes, requires_cuda

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def expected_full_kl(x, y, temperature=1.0, mask=None):
    x, y = x.double() / temperature, y.double() / temperature
    if mask is not None:
        x, y = x.masked_fill(~mask.unsqueeze(-1), 0.0), y.masked_fill(~mask.unsqueeze(-1), 0.0)
    logp = x - torch.logsumexp(x, -1, keepdim=True)
    logq = y - torch.logsumexp(y, -1, keepdim=True)
    live = logp > -float("inf")  # p = 0 contributes 0 (and no 0 * (-inf - -inf) in the gradient)
    kl = (logp.exp() * (torch.where(live, logp, 0.0) - torch.where(live, logq, 0.0))).sum(-1)
    return kl * mask if mask is not None else kl


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("rows,V", [((1,), 7), ((3,), 1271), ((423,), 7), ((3,), 50257), ((2, 3), 1271)])
def test_full_kl_matches_float64(device, dtype, rows, V):
    gen = torch.Generator().manual_seed(V)
    x = (torch.randn(*rows, V, generator=gen) * 3).to(device, dtype)
    y = (x.float() + torch.randn(*rows, V, generator=gen).to(device) * 1.5).to(dtype)
    mask = (torch.rand(rows, generator=gen) > 0.3).to(device)
    mask.view(-1)[0] = True
    check_full_kl(x, y, 0.8, mask, dtype)


def check_full_kl(x, y, temperature, mask, dtype):
    xg, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    kl = full_kl(xg, y, temperature=temperature, mask=mask)
    want = expected_full_kl(x64, y, temperature, mask)
    assert kl.dtype == torch.float32
    assert_close(kl, want, dtype, "kl")
    g = torch.randn(want.shape, dtype=torch.float64, device=x.device) * 2
    (dx,) = torch.autograd.grad((kl.double() * g).sum(), xg)
    (want_dx,) = torch.autograd.grad((want * g).sum(), x64)
    assert dx.dtype == x.dtype
    assert_close(dx, want_dx, dtype, "dlogits")


def test_full_kl_extreme_and_identical():
    V = 1271
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, V, generator=gen) * 1e4  # huge magnitudes
    y = x + torch.randn(5, V, generator=gen) * 10
    x[1, ::2] = -float("inf")  # excluded tokens in both
    y[1, ::2] = -float("inf")
    y[3] = x[3]                # identical rows: KL exactly 0, zero gradient
    x[4] = -float("inf")       # a padded row: masked
    y[4] = -float("inf")
    mask = torch.tensor([True, True, True, True, False])
    check_full_kl(x.to(DEV), y.to(DEV), 1.0, mask.to(DEV), torch.float32)
    xg = x.to(DEV).requires_grad_()
    kl = full_kl(xg, y.to(DEV), mask=mask.to(DEV))
    assert kl[3].item() == 0.0
    kl.sum().backward()
    assert (xg.grad[3:] == 0).all() and not torch.isnan(xg.grad).any()


def test_full_kl_masked_rows_may_hold_anything():
    """Masked rows are never read: a policy row of +inf and a reference row of NaN (beside live rows) give KL 0 and an
    exactly zero, finite gradient; a kernel that read them and only zeroed the incoming gradient would produce
    0 * inf = NaN. The live rows stay exact."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 1271, generator=gen) * 3
    y = x + torch.randn(4, 1271, generator=gen)
    x[1] = float("inf")
    y[3] = float("nan")
    mask = torch.tensor([True, False, True, False])
    check_full_kl(x.to(DEV), y.to(DEV), 0.9, mask.to(DEV), torch.float32)


def test_full_kl_impl_torch_and_sliced_input():
    gen = torch.Generator().manual_seed(2)
    full = torch.randn(2, 6, 1271, generator=gen).to(DEV)
    x, y = full[:, :-1], (full[:, :-1] * 0.5).contiguous()
    for impl in ("torch", "triton"):
        xg, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
        kl = full_kl(xg[:, :], y, temperature=1.5, impl=impl)
        want = expected_full_kl(x64, y, 1.5)
        assert_close(kl, want, torch.float32, f"kl {impl}")
    xs = full[:, :-1].clone().requires_grad_()
    kl = full_kl(xs[:, ::1], y)  # a non-contiguous view of a leaf keeps its gradient path
    kl.sum().backward()
    assert xs.grad is not None and xs.grad.shape == xs.shape


@requires_cuda
def test_gpu_bf16_full_kl_gpt2_vocab():
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 50257, generator=gen) * 3).to("cuda", torch.bfloat16)
    y = (x.float() + torch.randn(64, 50257, generator=gen).cuda()).to(torch.bfloat16)
    check_full_kl(x, y, 1.0, None, torch.bfloat16)
