"""Triton kernels for minirlhf's hot path, each file beside the plain PyTorch reference that defines it.

Every public function takes ``impl="auto" | "triton" | "torch"``: "auto" runs Triton on CUDA tensors (or on CPU tensors
when ``TRITON_INTERPRET=1`` was set before triton was imported) and the PyTorch reference otherwise. Each kernel file
reads alone (docstring, reference, kernels, launchers, autograd function, public function); the files whose names start
with an underscore hold what several of them share (``_common``, ``_logprob_common``, ``_attention_common``).

Note on the name: Hugging Face publishes an unrelated package also imported as ``kernels``; ``transformers`` probes for
it. This package deliberately exposes nothing at import time so such a probe finds nothing it can use
(``tests/test_packaging.py`` keeps ``import transformers`` working).
"""
