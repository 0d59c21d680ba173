"""Shared by the benchmark scripts: the environment line printed beside every number, and writing one script's
section of ``benchmarks/RESULTS.md`` (between ``<!-- BEGIN name -->`` / ``<!-- END name -->`` markers, so each script
replaces only its own section)."""
import datetime
import pathlib
import platform

import torch

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


def environment() -> str:
    """One line naming the device and the versions that produced a number."""
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    cuda = f", CUDA {torch.version.cuda}" if torch.cuda.is_available() else ""
    return (f"{device}; torch {torch.__version__}{cuda}; triton {triton.__version__}; "
            f"python {platform.python_version()}; {datetime.date.today().isoformat()}")


def write_section(name: str, markdown: str, path: pathlib.Path = RESULTS) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md with ``markdown``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n\nWritten by the scripts in `benchmarks/`; each section names its device, versions and date.\n"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
