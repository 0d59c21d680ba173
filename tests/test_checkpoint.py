"""Checkpoint directories: the stage check, and run files surviving the atomic swap."""
import pytest
import torch

from minirlhf.checkpoint import load_policy, load_reward_model, read_meta, save_checkpoint
from minirlhf.config import UserError
from minirlhf.model import GPT, GPTConfig, RewardModel

CFG = GPTConfig(vocab_size=1025, n_positions=16, n_layer=1, n_head=2, n_embd=16, tokenizer="gpt2-1024")


def test_wrong_stage_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(GPT(CFG))
    rm.gain.fill_(2.0)
    save_checkpoint(tmp_path / "rm", rm, stage="rm", config=CFG, step=3)
    save_checkpoint(tmp_path / "sft", GPT(CFG), stage="sft", config=CFG)
    with pytest.raises(UserError, match="'rm' checkpoint; a policy"):
        load_policy(str(tmp_path / "rm"))
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
