"""Shared by the kernel tests: the one per-dtype tolerance table, a closeness check, and the GPU marker.

Every check compares against an independent float64 computation; errors are measured as max |actual - expected|
over max(1, max |expected|), so gradients spread over a 50k vocabulary and log-probs of -20 are judged alike."""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16, real Triton compile)")

# dtype of the inputs -> tolerance on the scaled max error (fp32: a 50k-term fp32 matmul reduction alone is ~2e-5)
TOL = {torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(a).any(), f"{name}: NaN in the result"
    scale = max(e.abs().max().item(), 1.0) if e.numel() else 1.0
    err = (a - e).abs().max().item() / scale if e.numel() else 0.0
    assert err <= TOL[dtype], f"{name}: scaled max error {err:.3e} > {TOL[dtype]:.0e} ({dtype}, scale {scale:.3g})"


def devices_and_dtypes():
    """(device, dtype) pairs to run: fp32 on CPU (the interpreter has no bf16 dot) and, with a GPU, bf16 and fp32 there."""
    out = [pytest.param("cpu", torch.float32, id="cpu-fp32")]
    if torch.cuda.is_available():
        out = [pytest.param("cuda", torch.float32, id="cuda-fp32"), pytest.param("cuda", torch.bfloat16, id="cuda-bf16")]
    return out
