"""The whole chain on a GPU: train_sft.py -> train_rm.py -> train_ppo.py on CUDA with bf16 autocast and every Triton
kernel in the loop (flash attention forward/backward, KV-cache decode, fused LM-head log-probs). Runs wherever a GPU is
present; the CPU chain is covered by test_rm.py and test_ppo_train.py."""
import json

import pytest
import torch

import train_ppo
import train_rm
import train_sft
from minirlhf.checkpoint import load_policy
from minirlhf.data import write_jsonl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16, compiled Triton)")

SIZE = dict(init="scratch", tokenizer="gpt2-1k", n_layer=2, n_head=2, n_embd=128, n_positions=64)  # head dim 64
KERNELS = dict(attn_impl="triton", logprob_impl="triton", device="cuda")


def metrics(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def test_sft_rm_ppo_chain_on_cuda(tmp_path):
    words = ["good", "great", "fine", "bad", "awful", "dull"]
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"The {w} film", "response": f" was {w}."} for w in words * 8])
    write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"The {a} film", "chosen": " was great.", "rejected": " was awful."}
                                           for a in words * 6])
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"The {w} film"} for w in words])
    sft = train_sft.main(train_sft.Config(data=str(tmp_path / "sft.jsonl"), out=str(tmp_path / "sft"), max_steps=30,
                                          batch_size=8, lr=3e-3, eval_every=0, samples=0, **SIZE, **KERNELS))
    losses = [r["loss"] for r in metrics(tmp_path / "sft") if "loss" in r]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    rm = train_rm.main(train_rm.Config(init=str(sft), data=str(tmp_path / "prefs.jsonl"), out=str(tmp_path / "rm"),
                                       max_steps=20, batch_size=8, lr=1e-3, eval_every=0, **KERNELS))
    ppo = train_ppo.main(train_ppo.Config(policy=str(sft), reward=str(rm), prompts=str(tmp_path / "prompts.jsonl"),
                                          out=str(tmp_path / "ppo"), steps=3, batch_size=8, max_new_tokens=12,
                                          sample_every=0, save_every=0, **KERNELS))
    records = metrics(tmp_path / "ppo")
    assert records[0]["first_ratio_dev"] < 1e-4  # same code path at rollout and in training (pitfall 5)
    for key in ("policy_loss", "value_loss", "score", "kl_k1", "entropy"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in records), key
    model, _ = load_policy(str(ppo))
    assert model.config.n_embd == 128
