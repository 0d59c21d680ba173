"""`python -m minirlhf.export`: it never destroys a checkpoint or a non-empty directory by accident."""
import pytest
import torch

from minirlhf import export
from minirlhf.checkpoint import read_meta, save_checkpoint
from minirlhf.config import run
from minirlhf.model import GPT, GPTConfig


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=1025, n_positions=32, n_layer=1, n_head=2, n_embd=32, tokenizer="gpt2-1024"))
    save_checkpoint(tmp_path / "sft", m, stage="sft", config=m.config, step=7)
    return tmp_path / "sft"


def export_cli(*argv):
    return run(export.main, export.ExportConfig, [str(a) for a in argv])


def test_export_refuses_to_replace_a_checkpoint(checkpoint, capsys):
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as e:
            export_cli("--checkpoint", checkpoint, "--out", checkpoint, *extra)
        assert e.value.code == 2 and "holds a minirlhf checkpoint" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert read_meta(checkpoint)["step"] == 7


def test_export_into_a_non_empty_directory_needs_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        export_cli("--checkpoint", checkpoint, "--out", out)
    assert e.value.code == 2 and "is not empty; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_cli("--checkpoint", checkpoint, "--out", out, "--overwrite")
    assert {"config.json", "model.safetensors", "notes.txt"} <= {p.name for p in out.iterdir()}
