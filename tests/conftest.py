"""Test configuration. Without a GPU, Triton kernels run under the CPU interpreter: TRITON_INTERPRET=1 must be set
before anything imports triton, which is why it happens here, before any test module is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 and real Triton compile)")
