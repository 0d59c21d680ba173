"""Launch helpers shared by the attention kernels, ``kernels/flash_attention.py`` and ``kernels/decode_attention.py``:
what their Triton paths accept, the layout they need, the left-padding offsets as a kernel argument, and the precision
of ``tl.dot``."""
import torch


def check_triton_inputs(q):
    """Raise unless q's head dim and dtype are ones the Triton attention kernels take."""
    D = q.shape[-1]
    if D not in (16, 32, 64, 128):
        raise ValueError(f"the Triton attention kernels take head dims 16, 32, 64 or 128; got {D}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton attention kernels take fp32, fp16 or bf16; got {q.dtype}")


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x, or a copy of it whose last dimension is contiguous (what the kernels' loads assume)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def key_start_arg(key_start, q):
    """(pointer tensor, HAS_KS): the key offsets on q's device (any integer dtype; read as int32 in the kernels, so no
    conversion kernel per call), or q itself as an unused dummy pointer."""
    if key_start is None:
        return q, False
    return key_start.to(device=q.device).contiguous(), True


def dot_precision(dtype) -> str:
    """``input_precision`` of tl.dot for inputs of this dtype."""
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 in full precision; 16-bit inputs ignore it
