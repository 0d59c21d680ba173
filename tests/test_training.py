"""minirlhf/training.py: the learning-rate schedule against hand-worked values, AdamW's weight decay on matrices only,
and the progress bar of a trainer writing to a log file. (Seeds per rank: tests/test_run.py.)"""
import math

import pytest
import torch

from minirlhf.training import lr_factor, make_optimizer

# ---------------------------------------------------------------------------------------------------------------------
# Learning-rate schedule


@pytest.mark.parametrize("step, total, warmup, schedule, expected", [
    (0, 10, 4, "cosine", 0.25),  # warmup: (step + 1) / warmup
    (2, 10, 4, "linear", 0.75),
    (3, 10, 4, "constant", 1.0),  # the last warmup step reaches the peak
    (4, 10, 4, "cosine", 1.0),  # decay starts at the peak
    (7, 10, 4, "cosine", 0.55),  # halfway through the decay: 0.1 + 0.9 * 0.5 * (1 + cos(pi / 2))
    (8, 10, 4, "cosine", 0.1 + 0.45 * (1 - 0.5)),  # two thirds: cos(2 pi / 3) = -1/2
    (10, 10, 4, "cosine", 0.1),  # the floor: 10% of the peak
    (12, 10, 4, "cosine", 0.1),  # past the end (a run extended by --resume) stays on the floor
    (3, 8, 0, "linear", 0.625),  # no warmup: 1 - 3/8
    (8, 8, 0, "linear", 0.0),
    (6, 10, 2, "linear", 0.5),  # 1 - (6 - 2) / (10 - 2)
    (0, 10, 2, "constant", 0.5),
    (9, 10, 2, "constant", 1.0),
])
def test_lr_factor_hand_worked(step, total, warmup, schedule, expected):
    assert lr_factor(step, total, warmup, schedule) == pytest.approx(expected, abs=1e-12)


def test_lr_factor_rejects_an_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(5, 10, 0, "exponential")
    assert math.isclose(lr_factor(0, 1, 0, "cosine"), 1.0)  # a one-step run trains at the peak


def test_weight_decay_shrinks_matrices_only():
    """make_optimizer: AdamW's decoupled weight decay (p <- p - lr * wd * p) applies to weight matrices and
    embeddings, never to biases or LayerNorm gains (GPT-2's training). With all gradients zero, one step at lr 0.1 and
    weight decay 0.5 multiplies every matrix by 0.95 and leaves every vector as it was."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = make_optimizer(model, lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 0.95 if name in ("0.weight", "1.weight") else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=1e-6, atol=1e-7, msg=name)


def test_progress_bars_in_a_log_file_redraw_rarely(tmp_path, monkeypatch, capsys):
    """When stderr is a file (not a terminal), a trainer's bar is drawn when it opens and when it closes, not once per
    step: setting the loss shown beside it must not force a redraw (a 12-step SFT run, bars on). The bar still ends
    on the last step with its last loss."""
    import train_sft
    from test_sft import TINY, run_script, sft_data

    monkeypatch.setenv("MINIRLHF_NO_PROGRESS", "0")
    run_script(train_sft, TINY + ["--data", sft_data(tmp_path / "sft.jsonl", n=12), "--out", tmp_path / "out",
                                  "--max-steps", 12, "--batch-size", 2, "--val-fraction", 0, "--samples", 0])
    draws = [d for d in capsys.readouterr().err.split("\r") if d.startswith("sft")]
    assert len(draws) <= 3 and "12/12" in draws[-1] and "loss=" in draws[-1]


# ---------------------------------------------------------------------------------------------------------------------
# The fused optimizer and CPU bf16 autocast


def test_the_optimizer_is_fused_on_cpu_and_equals_the_per_tensor_loop():
    """make_optimizer fuses AdamW on CPU too (one kernel over all tensors); five steps on random gradients, with weight
    decay on the matrices, land where torch's per-tensor AdamW lands, to fp32 rounding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 5), torch.nn.Linear(5, 3), torch.nn.LayerNorm(3))
    twin = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    fused = make_optimizer(model, lr=0.05, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-5)
    assert all(group["fused"] for group in fused.param_groups)
    loop = torch.optim.AdamW([{"params": [t for t in twin if t.dim() >= 2], "weight_decay": 0.1},
                              {"params": [t for t in twin if t.dim() < 2], "weight_decay": 0.0}],
                             lr=0.05, betas=(0.9, 0.999), eps=1e-5, foreach=False)
    for _ in range(5):
        for p, t in zip(model.parameters(), twin):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.clone()
        fused.step()
        loop.step()
    for p, t in zip(model.parameters(), twin):
        torch.testing.assert_close(p.detach(), t.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(p.detach(), torch.zeros_like(p))


def test_cpu_bf16_autocast_only_when_asked_and_log_probs_stay_fp32():
    """autocast(cpu, bf16=True) alone keeps CPU in fp32 (exact CPU runs and tests); with cpu_bf16 the transformer's
    matmuls run in bf16, while GPT.token_logprobs still returns fp32 log-probs (pitfall 5), close to the fp32 ones
    (bf16 hidden states: ~1e-2 nats here), and bit-identical when the same rows are computed again."""
    from minirlhf.model import GPT, GPTConfig
    from minirlhf.training import autocast

    cpu = torch.device("cpu")
    x = torch.randn(4, 8)
    with autocast(cpu, True):
        assert (x @ x.T).dtype == torch.float32
    with autocast(cpu, False, cpu_bf16=True):
        assert (x @ x.T).dtype == torch.float32
    with autocast(cpu, True, cpu_bf16=True):
        assert (x @ x.T).dtype == torch.bfloat16

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=301, n_positions=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)).eval()
    ids = torch.randint(0, 301, (3, 11))

    seen = []  # the dtype of an MLP matmul's output in each forward
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda module, args, out: seen.append(out.dtype))

    def logprobs(cpu_bf16):
        with torch.no_grad(), autocast(cpu, True, cpu_bf16):
            h = model.hidden_states(ids)[:, :-1]  # (3, 10, d)
            return model.token_logprobs(h, ids[:, 1:], temperature=0.7)  # (3, 10)

    fp32, bf16 = logprobs(False), logprobs(True)
    assert seen == [torch.float32, torch.bfloat16]  # the trunk did run in bf16
    assert fp32.dtype == bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.1)
    assert not torch.equal(bf16, fp32)
    assert torch.equal(logprobs(True), bf16)
