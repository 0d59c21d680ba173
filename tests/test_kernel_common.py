"""kernels/_common.py: how ``impl=`` resolves, and the device check that stops a Triton kernel from launching on
another CUDA device than its tensors'."""
from types import SimpleNamespace

import pytest
import torch

from kernels._common import check_current_device, use_triton


def test_impl_resolves_as_documented_on_cpu(monkeypatch):
    """"torch" never uses Triton; on CPU tensors "auto" and "triton" use it only under the interpreter, and "triton"
    without it is an error rather than a silent fallback to the reference; any other name is rejected."""
    cpu = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton("auto", cpu) and use_triton("triton", cpu) and not use_triton("torch", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton("auto", cpu)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        use_triton("triton", cpu)
    with pytest.raises(ValueError, match="impl must be"):
        use_triton("cuda", cpu)


def test_device_check_accepts_the_current_device_only():
    """One CUDA device that is the current one (or given without an index) passes; tensors on another device, or on
    several, are an error that names the fix."""
    check_current_device({torch.device("cuda:1")}, 1)
    check_current_device({torch.device("cuda")}, 0)
    with pytest.raises(RuntimeError, match=r"on cuda:1 but the current CUDA device is cuda:0.*set_device\(1\)"):
        check_current_device({torch.device("cuda:1")}, 0)
    with pytest.raises(ValueError, match="several devices"):
        check_current_device({torch.device("cuda:0"), torch.device("cuda:1")}, 0)


def test_use_triton_checks_the_device_of_cuda_tensors(monkeypatch):
    """use_triton runs the check on CUDA tensors (stand-ins here: only .is_cuda and .device are read): a tensor on
    cuda:1 while cuda:0 is current, or CUDA and CPU tensors mixed, stop before any kernel launches."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    on = lambda name: SimpleNamespace(is_cuda=name.startswith("cuda"), device=torch.device(name))  # noqa: E731
    assert use_triton("auto", on("cuda:0"), on("cuda:0"))
    with pytest.raises(RuntimeError, match="current CUDA device is cuda:0"):
        use_triton("auto", on("cuda:1"))
    with pytest.raises(ValueError, match="several devices"):
        use_triton("auto", on("cuda:0"), on("cpu"))
