"""Checkpoint directories: the stage check, clear errors, other files surviving a save, the staging protocol (a failed
save leaves the previous checkpoint, a committed one interrupted halfway is completed), non-finite tensors refused,
file modes, and a closed output pipe."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from minirlhf import checkpoint
from minirlhf.checkpoint import SaveError, load_policy, load_reward_model, read_meta, save_checkpoint
from minirlhf.config import UserError, option
from minirlhf.model import GPT, GPTConfig, RewardModel

CFG = GPTConfig(vocab_size=1025, n_positions=16, n_layer=1, n_head=2, n_embd=16, tokenizer="gpt2-1024")


def test_wrong_stage_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(GPT(CFG))
    rm.gain.fill_(2.0)
    save_checkpoint(tmp_path / "rm", rm, stage="rm", config=CFG, step=3)
    save_checkpoint(tmp_path / "sft", GPT(CFG), stage="sft", config=CFG)
    for path in (tmp_path / "rm", tmp_path / "rm" / "model.safetensors"):
        with pytest.raises(UserError, match="'rm' checkpoint; a policy"):
            load_policy(str(path))
    with pytest.raises(UserError, match="'sft' checkpoint; a reward model"):
        load_reward_model(str(tmp_path / "sft"))
    loaded, tok = load_reward_model(str(tmp_path / "rm"))
    assert loaded.gain.item() == 2.0 and tok.name == "gpt2-1024" and read_meta(tmp_path / "rm")["step"] == 3
    x = torch.randint(0, 1025, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), rm(x))


def test_a_config_json_without_a_shape_field_is_a_clear_error(tmp_path):
    """A config.json that lost a field (n_embd) once loaded as 768 wide and failed later with a shape mismatch; now
    loading names the file and the missing field."""
    save_checkpoint(tmp_path / "sft", GPT(CFG), stage="sft", config=CFG)
    save_checkpoint(tmp_path / "rm", RewardModel(GPT(CFG)), stage="rm", config=CFG)
    for name, load in (("sft", load_policy), ("rm", load_reward_model)):
        meta = json.loads((tmp_path / name / "config.json").read_text())
        del meta["model"]["n_embd"]
        (tmp_path / name / "config.json").write_text(json.dumps(meta))
        with pytest.raises(UserError, match=rf"{name}/config.json: \"model\": lacks n_embd; the checkpoint's shape"):
            load(str(tmp_path / name))


def test_other_files_survive_a_new_save(tmp_path):
    """A save replaces the checkpoint's own files only: the run's metrics, a user's notes and folders stay, and
    nothing is written beside the checkpoint folder."""
    out = tmp_path / "run"
    save_checkpoint(out, GPT(CFG), stage="sft", config=CFG, step=1)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes").mkdir()
    (out / "notes" / "n.txt").write_text("mine")
    save_checkpoint(out, GPT(CFG), stage="sft", config=CFG, step=2)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n' and read_meta(out)["step"] == 2
    assert (out / "notes" / "n.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing beside it
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "model.safetensors", "notes"]


def test_files_follow_the_umask(tmp_path):
    """Checkpoint files are created with the user's umask (0644 under the usual 022), so a teammate can load them."""
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "run", GPT(CFG), stage="sft", config=CFG, step=1, training_state={"step": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644, "training_state.pt": 0o644}


def test_a_non_finite_tensor_is_never_written(tmp_path):
    """A NaN in the weights, or an inf in the optimizer state, refuses the save before anything is written: the
    previous checkpoint stays, and the message names the file, the tensor and the step kept."""
    out = tmp_path / "run"
    model = GPT(CFG)
    save_checkpoint(out, model, stage="sft", config=CFG, step=1)
    before = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(SaveError, match=r"step 2: model.safetensors holds non-finite values \(transformer.h.0.mlp.c_fc"
                                        r".weight\); nothing was written, .*run keeps its checkpoint of step 1"):
        save_checkpoint(out, model, stage="sft", config=CFG, step=2)
    with pytest.raises(SaveError, match=r"training_state.pt holds non-finite values \(optimizer.state.0.exp_avg_sq\)"):
        save_checkpoint(out, GPT(CFG), stage="sft", config=CFG, step=2, training_state={
            "optimizer": {"state": {0: {"exp_avg_sq": torch.tensor([1.0, float("inf")])}}}})
    assert read_meta(out)["step"] == 1 and (out / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("content, message", [("{oops", "not valid JSON"), ('["a list"]', "not a JSON object")])
def test_a_broken_config_json_is_a_clear_error(tmp_path, content, message):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(content)
    for load in (load_policy, load_reward_model):
        with pytest.raises(UserError, match=f"ck/config.json: {message}"):
            load(str(tmp_path / "ck"))


def test_a_save_interrupted_before_its_commit_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A crash while the files are written to .staging (here: the second file's write fails) leaves the previous
    checkpoint byte for byte, and the staging folder is gone."""
    out = tmp_path / "run"
    save_checkpoint(out, GPT(CFG), stage="sft", config=CFG, step=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = checkpoint._write_synced, []

    def failing(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(13, "Permission denied")
        return real(path, data)

    monkeypatch.setattr(checkpoint, "_write_synced", failing)
    with pytest.raises(SaveError, match=r"could not save step 2 to .*run: Permission denied \(errno 13\); .*run keeps "
                                        r"its checkpoint of step 1"):
        save_checkpoint(out, GPT(CFG), stage="sft", config=CFG, step=2, training_state={"step": 2})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_committed_save_interrupted_halfway_is_completed_by_the_next_reader(tmp_path, monkeypatch, capsys):
    """A crash after the COMMIT, while the files move into place (here: after the first rename), leaves a mixed
    folder for an instant; the next reader completes the move, so it loads the new checkpoint whole."""
    out = tmp_path / "run"
    save_checkpoint(out, GPT(CFG), stage="sft", config=CFG, step=1)
    torch.manual_seed(1)
    new = GPT(CFG)
    real, calls = os.replace, []

    def crash_after_first(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, new, stage="sft", config=CFG, step=2)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    assert (out / ".staging" / "COMMIT").is_file() and json.loads((out / "config.json").read_text())["step"] == 1
    loaded, _ = load_policy(str(out))
    assert "completed a save that was interrupted" in capsys.readouterr().err
    assert read_meta(out)["step"] == 2 and not (out / ".staging").exists()
    x = torch.randint(0, 1025, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), new(x))


@dataclasses.dataclass
class RunConfig:
    out: str = option("", "output directory")
    resume: bool = option(False, "continue")


def test_output_piped_into_head_stops_quietly(tmp_path):
    """`redteam.py --mode human ... | head`: the reader goes away, the script exits 141 without a traceback."""
    code = ("from minirlhf.config import run\nfrom test_checkpoint import RunConfig\n"
            "def main(cfg):\n    for i in range(10 ** 6):\n        print('line', i)\n"
            "run(main, RunConfig, ['--out', 'x'])\n")
    reader = "import sys; sys.stdout.write(sys.stdin.readline())"
    here = pathlib.Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=tmp_path, env=env)
    head = subprocess.run([sys.executable, "-c", reader], stdin=writer.stdout, capture_output=True, text=True)
    writer.stdout.close()
    assert writer.wait(timeout=60) == 141 and head.stdout == "line 0\n"
    assert b"Traceback" not in writer.stderr.read()
