"""Small helpers shared by the kernel files: choosing the implementation for ``impl="auto"``."""
import os

import torch


def interpreter_on() -> bool:
    """True when Triton's CPU interpreter is enabled (``TRITON_INTERPRET=1`` set before triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    """Resolve ``impl`` ("auto" | "triton" | "torch") for these input tensors.

    "auto" picks Triton when every tensor is on CUDA, or when the interpreter is on (CPU tensors, fp32 only);
    otherwise the PyTorch reference. "triton" on CPU tensors without the interpreter is an error, not a silent fallback.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "triton":
        if not (on_cuda or interpreter_on()):
            raise RuntimeError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing triton")
        return True
    return on_cuda or interpreter_on()
