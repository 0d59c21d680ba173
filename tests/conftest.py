"""Test configuration, applied before any test module is imported.

* Without a GPU, Triton kernels run under the CPU interpreter: TRITON_INTERPRET=1 must be set before anything imports
  triton. (The interpreter's numpy emits RuntimeWarnings for log(0) on fully masked rows; the kernels discard those
  values, and the tests assert that no NaN escapes, so the warnings are silenced.)
* One torch thread: the tests' models are tiny, and on a 2-core machine running other work, contended threads made
  them several times slower. Progress bars are off in tests (MINIRLHF_NO_PROGRESS=1).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["MINIRLHF_NO_PROGRESS"] = "1"
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")

