"""Checkpoint directories: the stage check, clear errors, run files surviving the atomic swap, --out guarded, and
what Ctrl-C reports."""
import dataclasses
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from minirlhf import checkpoint
from minirlhf.checkpoint import load_policy, load_reward_model, open_run, read_meta, save_checkpoint
from minirlhf.config import UserError, option, run
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


def test_run_files_survive_a_new_save(tmp_path):
    out = tmp_path / "run"
    save_checkpoint(out, GPT(CFG), stage="sft", config=CFG, step=1)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    save_checkpoint(out, GPT(CFG), stage="sft", config=CFG, step=2)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n' and read_meta(out)["step"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left behind


@pytest.mark.parametrize("content, message", [("{oops", "not valid JSON"), ('["a list"]', "not a JSON object")])
def test_a_broken_config_json_is_a_clear_error(tmp_path, content, message):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(content)
    for load in (load_policy, load_reward_model):
        with pytest.raises(UserError, match=f"ck/config.json: {message}"):
            load(str(tmp_path / "ck"))


def test_a_failed_swap_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save_checkpoint(out, GPT(CFG), stage="sft", config=CFG, step=1)
    real_replace, calls = os.replace, []

    def replace_failing_second(src, dst):  # old -> trash works, new -> target fails, then the old one goes back
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace_failing_second)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(out, GPT(CFG), stage="sft", config=CFG, step=2)
    assert len(calls) == 3 and read_meta(out)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary directories left behind


def test_open_run_guards_out(tmp_path, monkeypatch):
    def cfg(out, **flags):
        return SimpleNamespace(out=str(out), resume=False, overwrite=False, **flags)

    monkeypatch.chdir(tmp_path)
    for out in (".", tmp_path, tmp_path.parent):  # replacing --out as a whole would take the working directory along
        with pytest.raises(UserError, match="holds the current directory"):
            open_run(cfg(out), may_change=(), stages=("sft",))
    save_checkpoint(tmp_path / "run", GPT(CFG), stage="sft", config=CFG, step=1)
    with pytest.raises(UserError, match="already holds a checkpoint; pass --resume"):
        open_run(cfg(tmp_path / "run"), may_change=(), stages=("sft",))
    # a save interrupted between its two renames leaves the checkpoint in .old-run-*/ckpt: say where it is
    (tmp_path / ".old-run-x").mkdir()
    os.replace(tmp_path / "run", tmp_path / ".old-run-x" / "ckpt")
    with pytest.raises(UserError, match=r"holds no checkpoint, but .*\.old-run-x/ckpt does"):
        open_run(cfg(tmp_path / "run"), may_change=(), stages=("sft",))


@dataclasses.dataclass
class RunConfig:
    out: str = option("", "output directory")
    resume: bool = option(False, "continue")


@pytest.mark.parametrize("saves, resume", [(False, False), (True, False), (False, True)])
def test_ctrl_c_says_what_the_run_saved(tmp_path, capsys, saves, resume):
    """A trainer stopped by Ctrl-C exits with 130 and says whether --resume has a checkpoint of this run to go on from;
    a checkpoint an earlier run left there does not count, unless this run resumed it (then it is still there)."""
    out = tmp_path / "run"
    save_checkpoint(out, GPT(CFG), stage="sft", config=CFG, step=2, training_state={"step": 2})
    os.utime(out / "config.json", (0, 0))  # written long before this run started

    def main(cfg):
        if saves:
            save_checkpoint(out, GPT(CFG), stage="sft", config=CFG, step=5, training_state={"step": 5})
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        run(main, RunConfig, ["--out", str(out)] + (["--resume"] if resume else []))
    assert e.value.code == 130
    if saves:
        expected = f"interrupted; {out} holds this run's checkpoint of step 5: the same command with --resume continues " \
                   "from there"
    elif resume:
        expected = f"interrupted; this run saved nothing new: {out} still holds the checkpoint of step 2, where " \
                   "--resume starts again"
    else:
        expected = f"interrupted; this run saved nothing in {out} (a trainer saves at the end, and every " \
                   "--save-every steps if set)"
    assert capsys.readouterr().err == expected + "\n"


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


def test_resume_checks_the_stage_and_the_training_state(tmp_path):
    """open_run with --resume continues only a checkpoint of the trainer's own stages that has a training_state.pt:
    an 'rm' run is not continued by a trainer of pretrain/sft runs (even with the same flags), a final export without
    training state is not resumable, and a matching run returns its meta and state."""
    def cfg(out):
        return RunConfig(out=str(out), resume=True)

    save_checkpoint(tmp_path / "rm", RewardModel(GPT(CFG)), stage="rm", config=CFG, step=4,
                    train_config={"out": str(tmp_path / "rm"), "resume": False}, training_state={"step": 4})
    with pytest.raises(UserError, match=r"holds a 'rm' checkpoint, not a pretrain/sft run"):
        open_run(cfg(tmp_path / "rm"), may_change=("resume",), stages=("pretrain", "sft"))
    meta, state = open_run(cfg(tmp_path / "rm"), may_change=("resume",), stages=("sft", "rm"))
    assert meta["stage"] == "rm" and meta["step"] == 4 and state == {"step": 4}
    save_checkpoint(tmp_path / "final", GPT(CFG), stage="sft", config=CFG, step=4)  # no training state
    with pytest.raises(UserError, match="has no training_state.pt"):
        open_run(cfg(tmp_path / "final"), may_change=("resume",), stages=("sft",))


def test_resolve_device_names_and_errors():
    """--device: "auto" is CUDA when there is one, else the CPU; "cpu" as given; a CUDA device on a machine without
    CUDA, or with fewer devices than the index, and a name that is no device are errors that say so (not a traceback
    from deep inside torch). A CUDA device becomes the current one, where the Triton kernels launch."""
    resolve = checkpoint.resolve_device
    assert resolve("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="not a device"):
        resolve("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve("cuda:0")
    else:
        with pytest.raises(UserError, match="CUDA device"):
            resolve(f"cuda:{torch.cuda.device_count()}")
        current = torch.cuda.current_device()
        try:
            assert resolve(f"cuda:{torch.cuda.device_count() - 1}").index == torch.cuda.current_device()
        finally:
            torch.cuda.set_device(current)
