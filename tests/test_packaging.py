"""The package as a user installs it: our `kernels` package must not break `transformers`, which probes for an
unrelated Hugging Face package of the same import name; every script answers --help."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_transformers_imports_beside_our_kernels_package():
    """``import kernels`` finds this repository's package (not a namesake earlier on the path), and transformers,
    imported after it, loads GPT-2 and does not take it for Hugging Face's ``kernels``."""
    code = ("import kernels, transformers; from transformers import GPT2LMHeadModel; "
            "from transformers.utils import import_utils as u; "
            "print(kernels.__file__); print(getattr(u, 'is_kernels_available', lambda: False)())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kernels_file, available = r.stdout.strip().splitlines()
    assert pathlib.Path(kernels_file).resolve().parent == ROOT / "kernels"
    assert available == "False"


@pytest.mark.parametrize("script", ["train_sft.py", "train_rm.py", "train_ppo.py", "redteam.py"])
def test_scripts_explain_their_flags(script):
    if not (ROOT / script).exists():
        pytest.fail(f"{script} is missing")
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--out" in r.stdout and "--seed" in r.stdout
