"""SFT: prompt masking (hand-worked), the loss against a plain loop, text splitting, exact --resume after a crash,
atomic checkpoints, bad inputs (file:line, exit 2, nothing written), the stage check, and --help.

Tiny models (2 layers, width 32, the 1,025-token gpt2-1k vocabulary, context 64) on one CPU thread."""
import json
import math
import subprocess
import sys

import pytest
import torch

import train_sft
from minirlhf import checkpoint
from minirlhf.checkpoint import load_policy, read_meta, save_checkpoint
from minirlhf.config import UserError, build_parser, parse_args, run
from minirlhf.data import DataOrder, EncodedPair, Truncations
from minirlhf.finetune import FinetuneConfig, context_length, schedule
from minirlhf.hf import read_weights
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.run import Run
from minirlhf.sft import build_sft_examples, collate_sft, loss_tokens, sft_nll
from minirlhf.tokenizer import get_tokenizer
from minirlhf.training import lr_factor

TINY = ["--init", "scratch", "--tokenizer", "gpt2-1k", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
        "--n-positions", "64"]
ANIMALS = ["cat", "dog", "bird", "fish", "cow", "fox"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sft_data(path, n=30):
    """Demonstrations with an easy pattern: "Say cat:" -> " cat cat."."""
    return write_jsonl(path, [{"prompt": f"Say {a}:", "response": f" {a} {a}."}
                              for a in (ANIMALS[i % len(ANIMALS)] for i in range(n))])


def run_script(module, argv):
    return module.main(parse_args(module.Config, [str(a) for a in argv]))


def run_until_first_save_crashes(module, argv, monkeypatch):
    """Run a training script whose first checkpoint save completes and then "crashes" the run (for resume tests)."""
    real_save = Run.save

    def save_then_crash(*a, **k):
        real_save(*a, **k)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(Run, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_script(module, argv)
    monkeypatch.setattr(Run, "save", real_save)


def metrics_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    tok = get_tokenizer("gpt2-1k")
    return GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_layer=2, n_head=2, n_embd=32,
                         tokenizer="gpt2-1k")), tok


# ---------------------------------------------------------------------------------------------------------------------
# Prompt masking and the loss


def test_collate_masks_the_prompt_hand_worked():
    examples = [EncodedPair([11, 12, 13, 14, 15], 2, False, False),  # prompt 11 12 | response 13 14 | EOS 15
                EncodedPair([21, 22, 23], 0, False, False)]  # a text: every token after the first is a target
    ids, mask, loss_mask = collate_sft(examples, pad_id=99)
    assert ids.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, 99, 99]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # loss_mask[b, t] says whether the token at t + 1 is scored: targets 12 13 14 15 | 22 23 pad pad
    assert loss_mask.tolist() == [[0, 1, 1, 1], [1, 1, 0, 0]]


def test_targets_are_response_and_eos_only():
    tok = get_tokenizer("gpt2-1k")
    record = {"kind": "demonstration", "prompt": "Say cat:", "response": " cat cat.", "where": "x:1"}
    [ex] = build_sft_examples([record], tok, max_len=64, truncate_prompts=False, truncations=Truncations())
    assert ex.ids == tok.encode("Say cat:") + tok.encode(" cat cat.") + [tok.eos_id]
    ids, mask, loss_mask = collate_sft([ex], tok.pad_id)
    targets = ids[0, 1:][loss_mask[0].bool()].tolist()
    assert targets == tok.encode(" cat cat.") + [tok.eos_id]


def test_an_empty_prompt_starts_from_eos():
    """GPT-2's convention: an empty prompt is a lone EOS, so the first response token is a target like the others (and
    an empty demonstration still has one: its EOS)."""
    tok = get_tokenizer("gpt2-1k")
    records = [{"kind": "demonstration", "prompt": "", "response": r, "where": f"x:{i}"}
               for i, r in enumerate([" cat cat.", ""])]
    a, b = build_sft_examples(records, tok, max_len=64, truncate_prompts=False, truncations=Truncations())
    assert a.ids == [tok.eos_id] + tok.encode(" cat cat.") + [tok.eos_id] and a.n_prompt == 1
    assert b.ids == [tok.eos_id, tok.eos_id] and loss_tokens(b) == 1
    ids, mask, loss_mask = collate_sft([a, b], tok.pad_id)
    assert ids[0, 1:][loss_mask[0].bool()].tolist() == tok.encode(" cat cat.") + [tok.eos_id]


def test_sft_loss_matches_a_plain_loop():
    model, tok = tiny_gpt()
    examples = [EncodedPair([5, 6, 7, 8, 9, tok.eos_id], 3, False, False), EncodedPair([40, 41, 42], 1, False, False),
                EncodedPair([100, 101, 102, 103], 0, False, False)]
    ids, mask, loss_mask = collate_sft(examples, tok.pad_id)
    expected = 0.0
    for b, e in enumerate(examples):  # reference: the full forward pass of each example alone, position by position
        logits = model(torch.tensor([e.ids]))[0]
        for t in range(max(e.n_prompt, 1), len(e.ids)):
            expected -= torch.log_softmax(logits[t - 1], -1)[e.ids[t]].item()
    assert sft_nll(model, ids, mask, loss_mask).item() == pytest.approx(expected, rel=1e-5)


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """Each micro-batch's summed loss is divided by the target tokens of the whole step, so 3 micro-batches of 2
    examples of different lengths train like one batch of 6 (dropout 0, no clipping): the same logged losses and
    gradient norms (Adam would hide a uniform scale error in the weights) and the same final weights, to 2e-5: Adam
    divides each gradient by its own running size, so where the exact gradient is zero (the attention key biases)
    rounding noise moves the weights, differently in the two runs (by about 4e-6 here)."""
    records = [{"prompt": f"Say {ANIMALS[i % 6]}:", "response": " a" * (1 + 3 * (i % 4))} for i in range(12)]
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    args = TINY + ["--data", data, "--max-steps", 3, "--val-fraction", 0, "--samples", 0, "--lr", 3e-3,
                   "--grad-clip", 0, "--dropout", 0]
    run_script(train_sft, args + ["--batch-size", 6, "--grad-accum", 1, "--out", tmp_path / "one"])
    run_script(train_sft, args + ["--batch-size", 2, "--grad-accum", 3, "--out", tmp_path / "accum"])
    one, accum = metrics_of(tmp_path / "one"), metrics_of(tmp_path / "accum")
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in accum] == pytest.approx([r[key] for r in one], rel=1e-5), key
    w_one = read_weights(tmp_path / "one" / "model.safetensors")
    w_accum = read_weights(tmp_path / "accum" / "model.safetensors")
    for k in w_one:
        torch.testing.assert_close(w_accum[k], w_one[k], rtol=0, atol=2e-5, msg=k)


def test_long_text_is_split_not_truncated():
    tok = get_tokenizer("gpt2-1k")
    text = " ".join(ANIMALS * 10)
    counts = Truncations()
    examples = build_sft_examples([{"kind": "text", "text": text, "where": "x:1"}], tok, max_len=16,
                                  truncate_prompts=False, truncations=counts)
    full = tok.encode(text) + [tok.eos_id]
    assert len(examples) > 1 and all(len(e.ids) <= 16 for e in examples) and counts.split == 1
    assert [t for e in examples for t in e.ids[1:]] == full[1:]  # every target once, in order


# ---------------------------------------------------------------------------------------------------------------------
# Resume, atomic save


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    data = sft_data(tmp_path / "sft.jsonl", n=12)  # 10 train examples, 6 per step: crosses epoch boundaries
    args = TINY + ["--data", data, "--max-steps", 6, "--batch-size", 3, "--grad-accum", 2, "--dropout", 0.1,
                   "--lr", 3e-3, "--warmup", 0.3, "--val-fraction", 0.2, "--eval-every", 2, "--save-every", 3,
                   "--samples", 1, "--sample-tokens", 4]
    run_script(train_sft, args + ["--out", tmp_path / "a"])
    run_until_first_save_crashes(train_sft, args + ["--out", tmp_path / "b"], monkeypatch)
    assert read_meta(tmp_path / "b")["step"] == 3
    with pytest.raises(UserError, match="already holds a checkpoint"):
        run_script(train_sft, args + ["--out", tmp_path / "b"])
    with pytest.raises(UserError, match=r"other settings \(--lr 0.003 -> 0.001\)"):
        run_script(train_sft, args + ["--out", tmp_path / "b", "--resume", "--lr", 1e-3])
    run_script(train_sft, args + ["--out", tmp_path / "b", "--resume"])

    a, b = metrics_of(tmp_path / "a"), metrics_of(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 2, 3, 4, 4, 5, 6, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "lr", "grad_norm", "val_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)
    wa = read_weights(tmp_path / "a" / "model.safetensors")
    wb = read_weights(tmp_path / "b" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch, capsys):
    """A full disk during the second save (the write of its weights fails with ENOSPC): the run stops with one line
    naming the cause and the step still there, the previous checkpoint is intact and loadable, the run's metrics
    survive, and no staging folder is left behind."""
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"the {a} sat on the mat."} for a in ANIMALS * 2])
    args = TINY + ["--data", data, "--out", tmp_path / "out", "--max-steps", 4, "--save-every", 2,
                   "--val-fraction", 0, "--samples", 0]
    calls = []
    real_write = checkpoint._write_synced

    def failing_write(path, data):  # the second checkpoint dies while writing into its staging folder
        calls.append(str(path))
        if len(calls) > 4 and path.name == "model.safetensors":
            raise OSError(28, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(checkpoint, "_write_synced", failing_write)
    with pytest.raises(SystemExit) as e:
        run(train_sft.main, train_sft.Config, [str(a) for a in args])
    assert e.value.code == 2 and "/.staging/" in calls[-1]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: could not save step 4 to {tmp_path / 'out'}: No space left on device (errno 28); "
                   f"{tmp_path / 'out'} keeps its checkpoint of step 2")
    meta = read_meta(tmp_path / "out")
    assert meta["step"] == 2 and meta["stage"] == "pretrain"  # the previous checkpoint is intact and loadable
    load_policy(str(tmp_path / "out"))
    assert [r["step"] for r in metrics_of(tmp_path / "out")] == [1, 2, 3, 4]  # the run's metrics survived too
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "metrics.jsonl", "model.safetensors", "run.json", "training_state.pt"]  # no staging, no lock


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs: file:line in the message, exit status 2, no checkpoint


@pytest.mark.parametrize("content, where", [
    (b"", ": empty"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": ["b"]}\n', ":2: field 'response': expected str"),
    (b'{"text": "fine"}\n\n{"text": "na\xefve"}\n', ":3: not valid UTF-8"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "a" "response": "b"}\n', ":2: not valid JSON"),
    (json.dumps({"prompt": "word " * 80, "response": "b"}).encode() + b"\n",
     ":1: field 'prompt': 161 tokens do not fit"),  # (gpt2-1k has no " word": 2 tokens each)
    (b'{"text": ""}\n', ":1: field 'text': empty"),
])
def test_bad_input_stops_before_training(tmp_path, capsys, content, where):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        run(train_sft.main, train_sft.Config, [str(a) for a in TINY + ["--data", data, "--out", tmp_path / "out",
                                                                        "--val-fraction", 0]])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}{where}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--sample-tokens", 64], "--sample-tokens 64: must be at least 1 and less than the model's context of 64 tokens"),
    (["--device", "gpu"], "--device gpu: not a device"),
    (["--out", "sft.jsonl"], "--out sft.jsonl: is a file, not a folder"),
])
def test_bad_flags_stop_before_training(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    data = sft_data(tmp_path / "sft.jsonl")
    with pytest.raises(SystemExit) as e:
        run(train_sft.main, train_sft.Config, [str(a) for a in TINY + ["--data", data, "--out", "out"] + flags])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.jsonl"]  # not even an empty --out


def test_a_reward_model_is_not_a_policy(tmp_path):
    gpt, _ = tiny_gpt()
    save_checkpoint(tmp_path / "rm", RewardModel(gpt), stage="rm", config=gpt.config)
    data = sft_data(tmp_path / "sft.jsonl")
    proc = subprocess.run([sys.executable, "train_sft.py", "--init", str(tmp_path / "rm"), "--data", str(data),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'rm'}: is a 'rm' checkpoint; a policy (pretrain, sft, ppo) is " \
                          "expected here\n"
    assert not (tmp_path / "out").exists()


def test_size_flags_with_a_loaded_model_are_reported_as_ignored(tmp_path, capsys):
    gpt, _ = tiny_gpt()
    save_checkpoint(tmp_path / "base", gpt, stage="pretrain", config=gpt.config)
    out = run_script(train_sft, ["--init", tmp_path / "base", "--n-layer", 5, "--n-embd", 64, "--data",
                                 sft_data(tmp_path / "d.jsonl"), "--out", tmp_path / "out", "--max-steps", 1,
                                 "--eval-every", 0, "--samples", 0])
    assert (f"warning: --n-layer, --n-embd ignored: they apply to --init scratch, and {tmp_path / 'base'} brings its "
            "own size and tokenizer") in capsys.readouterr().out
    assert (read_meta(out)["model"]["n_layer"], read_meta(out)["model"]["n_embd"]) == (2, 32)


def test_help_explains_every_flag():
    text = build_parser(train_sft.Config).format_help()
    for name, field in train_sft.Config.__dataclass_fields__.items():
        assert "--" + name.replace("_", "-") in text and len(field.metadata["help"]) > 10, name


# ---------------------------------------------------------------------------------------------------------------------
# The held-out loss and split; steps, schedule, resumed logs and data order of the shared run machinery


def test_held_out_loss_is_the_mean_nll_per_target_token_with_dropout_off():
    """train_sft.evaluate: the total NLL of every target token divided by their number (not a mean of per-example or
    per-batch means), over several batches of examples of different lengths, a plain text among them (whose first
    token is no target), computed with dropout off and the model left in training mode. Reference: each example alone
    in eval mode, position by position."""
    torch.manual_seed(0)
    tok = get_tokenizer("gpt2-1k")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_layer=2, n_head=2, n_embd=32, dropout=0.5,
                          tokenizer="gpt2-1k", attn_impl="torch"))
    examples = [EncodedPair([5, 6, 7, 8, 9, tok.eos_id], 3, False, False),
                EncodedPair([100, 101, 102, 103], 0, False, False),  # a text: its first token is no target
                EncodedPair([40, 41, 42], 1, False, False),
                EncodedPair([200, 201, 202, 203, 204, tok.eos_id], 2, False, False),
                EncodedPair([300, 301], 0, False, False)]
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e.ids]))[0]
            for t in range(max(e.n_prompt, 1), len(e.ids)):
                total -= torch.log_softmax(logits[t - 1], -1)[e.ids[t]].item()
                n += 1
    assert n == 3 + 3 + 2 + 4 + 1
    model.train()
    val_loss = train_sft.evaluate(model, examples, train_sft.Config(batch_size=2), tok.pad_id, torch.device("cpu"))
    assert val_loss == pytest.approx(total / n, rel=1e-5)
    assert model.training


def test_sft_holds_out_whole_prompts(tmp_path, monkeypatch):
    """train_sft.py's held-out split keeps every demonstration of a prompt on one side (the held-out loss is on
    prompts never trained on), while each plain text is a unit of its own: 4 prompts x 3 demonstrations and 4 texts,
    25% of the 8 units held out. Data that mixes demonstrations and texts makes an 'sft' checkpoint."""
    records = [{"prompt": f"Say {a}:", "response": f" {a}" * k} for a in ANIMALS[:4] for k in (1, 2, 3)]
    records += [{"text": f"the {a} sat."} for a in ANIMALS[:4]]
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    seen = []
    real = train_sft.build_sft_examples
    monkeypatch.setattr(train_sft, "build_sft_examples", lambda recs, *a, **k: seen.append(recs) or real(recs, *a, **k))
    out = run_script(train_sft, TINY + ["--data", data, "--out", tmp_path / "out", "--max-steps", 1, "--eval-every", 0,
                                        "--samples", 0, "--val-fraction", 0.25])
    assert read_meta(out)["stage"] == "sft"  # demonstrations among the texts: an SFT model, not a pre-trained one
    train, val = seen
    assert len(train) + len(val) == 16
    val_prompts = {r["prompt"] for r in val if "prompt" in r}
    assert val_prompts.isdisjoint(r.get("prompt") for r in train)
    assert len(val_prompts) + sum("text" in r for r in val) == 2  # two units
    assert len(val) == 3 * len(val_prompts) + sum("text" in r for r in val)  # a held-out prompt takes all three


@pytest.mark.parametrize("flags, n_train, steps", [
    (dict(epochs=1.0, batch_size=3), 10, 4),  # ceil(10 / 3): the last, partial batch is a step too
    (dict(epochs=0.5, batch_size=3), 10, 2),  # ceil(5 / 3)
    (dict(epochs=2.0, batch_size=2, grad_accum=3), 10, 4),  # ceil(20 / 6)
    (dict(epochs=0.01, batch_size=8), 10, 1),  # at least one step
    (dict(epochs=3.0, max_steps=7), 10, 7),  # --max-steps wins
])
def test_total_steps_hand_worked(flags, n_train, steps):
    assert schedule(FinetuneConfig(**flags), n_train, None)[0] == steps


def test_warmup_steps_round_the_fraction_and_max_len_may_equal_the_context(tmp_path):
    """--warmup 0.3 of 6 steps is round(1.8) = 2 warmup steps (lr 1/2, then the peak), then cosine decay to 10% (the
    same schedule test_training checks for lr_factor); a resumed run keeps its own warmup; --max-len may be the whole
    context."""
    cfg = FinetuneConfig(lr=2.0, warmup=0.3, max_steps=6, out=str(tmp_path / "run"))
    steps, warmup = schedule(cfg, 10, None)
    assert (steps, warmup) == (6, 2) and schedule(cfg, 10, {"warmup_steps": 1}) == (6, 1)
    lrs = [cfg.lr * lr_factor(step, 6, warmup, cfg.schedule) for step in range(6)]
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx([1.0, 2.0] + [2.0 * c for c in cosine])
    config = GPTConfig(vocab_size=1025, n_positions=64, n_layer=1, n_head=2, n_embd=16)
    assert context_length(FinetuneConfig(max_len=64), config) == 64
    assert context_length(FinetuneConfig(max_len=0), config) == 64
    with pytest.raises(UserError, match="exceeds the model's context of 64"):
        context_length(FinetuneConfig(max_len=65), config)


def test_resume_may_raise_the_step_count(tmp_path, capsys):
    """--resume with a larger --max-steps extends a finished run: with a constant schedule (no warmup) 4 steps then 2
    more equal 6 steps in one run (losses, learning rates, weights: the data order and dropout continue exactly).
    With warmup and cosine decay the extension keeps the first run's warmup (--warmup 0.25 of 4 steps = 1, where 6
    steps would give round(1.5) = 2) and stretches the decay to 6 steps, by hand:
    lr(s) = 3e-3 (0.1 + 0.45 (1 + cos(pi (s - 1) / 5))). A count at or below the step reached, or other data, leaves
    the checkpoint and the log as they were."""
    data = sft_data(tmp_path / "sft.jsonl", n=12)
    args = TINY + ["--data", data, "--batch-size", 3, "--dropout", 0.1, "--lr", 3e-3, "--val-fraction", 0,
                   "--samples", 0]
    constant = args + ["--schedule", "constant", "--warmup", 0]
    run_script(train_sft, constant + ["--max-steps", 6, "--out", tmp_path / "whole"])
    run_script(train_sft, constant + ["--max-steps", 4, "--out", tmp_path / "ext"])
    run_script(train_sft, constant + ["--max-steps", 6, "--out", tmp_path / "ext", "--resume"])
    whole, ext = metrics_of(tmp_path / "whole"), metrics_of(tmp_path / "ext")
    assert [r["step"] for r in ext] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in ext] == pytest.approx([r[key] for r in whole], abs=1e-6), key
    wa = read_weights(tmp_path / "whole" / "model.safetensors")
    wb = read_weights(tmp_path / "ext" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)

    cosine = args + ["--schedule", "cosine", "--warmup", 0.25]
    run_script(train_sft, cosine + ["--max-steps", 4, "--out", tmp_path / "cos"])
    run_script(train_sft, cosine + ["--max-steps", 6, "--out", tmp_path / "cos", "--resume"])
    lrs = [r["lr"] for r in metrics_of(tmp_path / "cos")]
    assert lrs[0] == pytest.approx(3e-3)  # one warmup step: (0 + 1) / 1 of the peak
    assert lrs[4:] == pytest.approx([3e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - 1) / 5))) for s in (4, 5)])

    log = (tmp_path / "ext" / "metrics.jsonl").read_text()
    for count in (6, 5):
        capsys.readouterr()
        run_script(train_sft, constant + ["--max-steps", count, "--resume", "--out", tmp_path / "ext"])
        assert f"already at step 6 of the {count} steps asked; nothing to do" in capsys.readouterr().out
        assert read_meta(tmp_path / "ext")["step"] == 6 and (tmp_path / "ext" / "metrics.jsonl").read_text() == log
    sft_data(tmp_path / "sft.jsonl", n=18)  # the same file, grown
    with pytest.raises(UserError, match="the data files changed since the run"):
        run_script(train_sft, constant + ["--max-steps", 8, "--resume", "--out", tmp_path / "ext"])


def test_resume_drops_the_log_lines_of_steps_after_the_checkpoint(tmp_path, monkeypatch):
    """A run that crashed after logging steps 3 and 4 but before saving them resumes from its step-2 checkpoint: the
    log lines of steps 3 and 4 from the crashed attempt are dropped, so metrics.jsonl reads like an uninterrupted run
    (each step once, in order), with the resumed run's values."""
    data = sft_data(tmp_path / "sft.jsonl", n=8)
    args = TINY + ["--data", data, "--max-steps", 4, "--batch-size", 2, "--save-every", 2, "--val-fraction", 0,
                   "--samples", 0, "--lr", 3e-3]
    run_script(train_sft, args + ["--out", tmp_path / "a"])
    real_save, calls = Run.save, []

    def crash_on_second_save(run, step, *a, **k):  # the step-2 checkpoint is written; the run dies before the final
        calls.append(step)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real_save(run, step, *a, **k)

    monkeypatch.setattr(Run, "save", crash_on_second_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_script(train_sft, args + ["--out", tmp_path / "b"])
    monkeypatch.setattr(Run, "save", real_save)
    assert calls == [2, 4] and [r["step"] for r in metrics_of(tmp_path / "b")] == [1, 2, 3, 4]
    run_script(train_sft, args + ["--out", tmp_path / "b", "--resume"])
    a, b = metrics_of(tmp_path / "a"), metrics_of(tmp_path / "b")
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-6)


def test_the_data_order_follows_the_seed():
    """The data order is drawn from --seed: the same seed visits the examples in the same order (what --resume relies
    on), another seed in another order (runs with several seeds differ in their batches, not only their weights)."""
    def order(seed):
        return DataOrder(20, seed).take(0, 20)

    first = order(0)
    assert sorted(first) == list(range(20))
    assert order(0) == first and order(1) != first
