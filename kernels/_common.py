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
    A Triton kernel launches on the current CUDA device, so CUDA tensors must all be on that one: anything else is an
    error here (it would be an illegal memory access in the kernel).
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if any(t.is_cuda for t in tensors):  # CUDA tensors mixed with CPU ones are an error here too
        check_current_device({t.device for t in tensors}, torch.cuda.current_device())
    if impl == "triton":
        if not (on_cuda or interpreter_on()):
            raise RuntimeError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing triton")
        return True
    return on_cuda or interpreter_on()


def check_current_device(devices: set, current: int) -> None:
    """Raise unless ``devices`` is the one CUDA device whose index is ``current``."""
    if len(devices) > 1:
        raise ValueError(f"the tensors are on several devices ({', '.join(sorted(map(str, devices)))}); move them to one")
    (device,) = devices
    if device.index is not None and device.index != current:
        raise RuntimeError(f"the tensors are on {device} but the current CUDA device is cuda:{current}, where the Triton "
                           f"kernel would launch: call torch.cuda.set_device({device.index}) first (the scripts' "
                           "--device does)")
