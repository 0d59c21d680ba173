"""KV-cache generation against full recomputation, padding independence, EOS handling and the sampling filters."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from minirlhf.checkpoint import save_checkpoint
from minirlhf import generate as generate_cli
from minirlhf.config import UserError
from minirlhf.generate import filter_logits, generate
from minirlhf.model import GPT, GPTConfig
from minirlhf.tokenizer import pad_sequences

V, EOS, PAD = 300, 299, 300


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, n_positions=64, n_layer=2, n_head=2, n_embd=32, tokenizer="gpt2-299")).eval()


PROMPTS = [[5, 17, 42, 7, 9], [11], [100, 3, 250]]


def test_cached_greedy_equals_recomputation():
    m = tiny_model()
    ids, mask = pad_sequences(PROMPTS, PAD)
    kw = dict(max_new_tokens=12, eos_id=EOS, pad_id=PAD, greedy=True)
    a, b = generate(m, ids, mask, **kw), generate(m, ids, mask, use_cache=False, **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.attention_mask, b.attention_mask)


def test_cached_sampling_equals_recomputation():
    m = tiny_model()
    ids, mask = pad_sequences(PROMPTS, PAD)
    kw = dict(max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0.8, top_k=50, top_p=0.9)
    a = generate(m, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(m, ids, mask, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert torch.equal(a.response, b.response)


def test_left_padded_batch_equals_each_prompt_alone():
    m = tiny_model()
    ids, mask = pad_sequences(PROMPTS, PAD)
    batch = generate(m, ids, mask, max_new_tokens=10, eos_id=EOS, pad_id=PAD, greedy=True)
    for i, p in enumerate(PROMPTS):
        one = generate(m, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), max_new_tokens=10,
                       eos_id=EOS, pad_id=PAD, greedy=True)
        n = one.response.shape[1]
        assert torch.equal(batch.response[i, :n], one.response[0])


class EosAfter11(torch.nn.Module):
    """A tiny GPT whose next token is forced to EOS whenever the current token is 11."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def new_kv_cache(self, batch_size, max_len):
        return self.gpt.new_kv_cache(batch_size, max_len)

    def next_token_logits(self, ids, mask=None, kv_cache=None):
        logits = self.gpt.next_token_logits(ids, mask, kv_cache=kv_cache)
        logits[:, EOS] += 1e4 * (ids[:, -1] == 11)
        logits[:, 11] -= 1e4  # never sampled, so only the prompt can trigger EOS
        return logits


def test_eos_stops_a_row_and_masks_what_follows():
    m = EosAfter11(tiny_model())
    ids, mask = pad_sequences([[11], [5, 17]], PAD)
    for use_cache in (True, False):
        g = generate(m, ids, mask, max_new_tokens=5, eos_id=EOS, pad_id=PAD, greedy=True, use_cache=use_cache)
        assert g.response.shape[1] == 5  # row 1 never ends, so generation runs to the limit
        assert g.response[0].tolist() == [EOS] + [PAD] * 4
        assert g.response_mask[0].tolist() == [1, 0, 0, 0, 0]  # the EOS itself is kept, what follows is masked
        assert g.response_mask[1].tolist() == [1] * 5 and EOS not in g.response[1].tolist()
        assert g.ended.tolist() == [True, False]
        assert g.attention_mask[0].tolist() == [0, 1, 1, 0, 0, 0, 0]


def test_generation_stops_when_all_rows_ended():
    m = tiny_model()
    with torch.no_grad():  # every hidden state points at EOS: all rows end after one token
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(m.transformer.wte.weight[EOS] * 10)
    ids, mask = pad_sequences(PROMPTS, PAD)
    g = generate(m, ids, mask, max_new_tokens=20, eos_id=EOS, pad_id=PAD, greedy=True)
    assert g.response.shape[1] == 1 and g.ended.all() and g.response_mask.sum() == 3


def test_sampling_divides_the_logits_by_the_temperature():
    """One sampled token per row equals torch.multinomial(softmax(logits / T)) drawn with the same seed, the logits
    taken from the full forward at the last position (not from next_token_logits, the path under test). The logits
    are scaled to a spread of a few nats, where T = 0.37 and T = 1 draw different tokens (checked: the test can
    fail)."""
    m = tiny_model()
    with torch.no_grad():  # logits of standard deviation ~2 (about 0.1 at initialisation)
        m.transformer.ln_f.weight.mul_(20)
    prompts = [[i, 3 * i + 1, 5 * i + 2] for i in range(16)]
    ids, mask = pad_sequences(prompts, PAD)
    with torch.no_grad():
        logits = m(ids, mask)[:, -1]  # (B, V)

    def draw(T):
        probs = torch.softmax(logits / T, -1)
        return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5)).squeeze(1)

    g = generate(m, ids, mask, max_new_tokens=1, eos_id=EOS, pad_id=PAD, temperature=0.37,
                 generator=torch.Generator().manual_seed(5))
    assert torch.equal(g.response[:, 0], draw(0.37))
    assert not torch.equal(draw(0.37), draw(1.0))


def test_top_k_and_top_p_never_sample_outside_their_sets():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    k_kept = filter_logits(logits, top_k=5)
    assert (torch.isfinite(k_kept).sum(1) == 5).all()
    top5 = torch.topk(logits, 5).indices
    for row in range(4):
        assert set(torch.nonzero(torch.isfinite(k_kept[row])).flatten().tolist()) == set(top5[row].tolist())
    p_kept = filter_logits(logits, top_p=0.5)
    probs = torch.softmax(logits, -1)
    for row in range(4):  # the kept set is the smallest prefix of the sorted probabilities reaching 0.5
        sorted_p, order = probs[row].sort(descending=True)
        n = int((sorted_p.cumsum(0) < 0.5).sum()) + 1
        assert set(torch.nonzero(torch.isfinite(p_kept[row])).flatten().tolist()) == set(order[:n].tolist())
    assert torch.isfinite(filter_logits(logits, top_p=1e-9)).sum(1).tolist() == [1] * 4  # the argmax is always kept
    # Sampling many times only ever hits the kept sets.
    m = tiny_model()
    ids, mask = pad_sequences(PROMPTS, PAD)
    with torch.no_grad():
        step_logits = m(ids, mask)[:, -1]
    allowed = torch.isfinite(filter_logits(step_logits, top_k=3))
    for seed in range(20):
        g = generate(m, ids, mask, max_new_tokens=1, eos_id=EOS, pad_id=PAD, top_k=3,
                     generator=torch.Generator().manual_seed(seed))
        assert allowed[torch.arange(3), g.response[:, 0]].all()


def test_cli_generates_from_a_checkpoint(tmp_path):
    m = GPT(GPTConfig(vocab_size=1025, n_positions=64, n_layer=1, n_head=2, n_embd=16, tokenizer="gpt2-1024"))
    save_checkpoint(tmp_path / "ckpt", m, stage="sft", config=m.config)
    r = subprocess.run([sys.executable, "-m", "minirlhf.generate", "--model", str(tmp_path / "ckpt"), "--prompt",
                        "The movie", "--max-new-tokens", "5", "--num-samples", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("The movie") == 2


def test_cli_takes_an_empty_prompt_and_checks_its_flags(tmp_path):
    """An empty prompt starts from EOS (GPT-2's document boundary), alone or beside another prompt."""
    m = GPT(GPTConfig(vocab_size=1025, n_positions=64, n_layer=1, n_head=2, n_embd=16, tokenizer="gpt2-1024"))
    save_checkpoint(tmp_path / "ckpt", m, stage="sft", config=m.config)
    cfg = generate_cli.GenerateConfig(model=str(tmp_path / "ckpt"), prompt=["", "The"], max_new_tokens=3, greedy=True,
                                      device="cpu")
    alone = generate_cli.main(generate_cli.GenerateConfig(**{**cfg.__dict__, "prompt": [""]}))
    assert generate_cli.main(cfg)[0] == alone[0]
    for bad in (dict(num_samples=0), dict(top_p=0.0)):
        with pytest.raises(UserError):
            generate_cli.main(generate_cli.GenerateConfig(**{**cfg.__dict__, **bad, "greedy": False}))


def test_cli_marks_the_prompt_and_how_each_sample_ended(tmp_path, capsys):
    """Each sample prints as prompt|continuation and [EOS] or [no EOS: cut at N tokens]. A model whose final
    LayerNorm outputs a constant vector that the EOS embedding points along writes EOS first (an empty continuation);
    the random one does not within 3 greedy tokens (the printed continuation is the returned one)."""
    m = GPT(GPTConfig(vocab_size=1025, n_positions=64, n_layer=1, n_head=2, n_embd=16, tokenizer="gpt2-1024"))
    save_checkpoint(tmp_path / "random", m, stage="sft", config=m.config)
    with torch.no_grad():
        ln_f = m.transformer.ln_f
        ln_f.weight.zero_()
        ln_f.bias.fill_(1.0)
        m.transformer.wte.weight[1024] = 10.0  # EOS of gpt2-1024 is id 1024: logit 160, every other one is small
    save_checkpoint(tmp_path / "eos", m, stage="sft", config=m.config)
    capsys.readouterr()
    cfg = generate_cli.GenerateConfig(model=str(tmp_path / "random"), prompt=["The"], max_new_tokens=3, greedy=True,
                                      device="cpu")
    out = generate_cli.main(cfg)[0]
    assert capsys.readouterr().out == f"The|{out} [no EOS: cut at 3 tokens]\n{'-' * 40}\n"
    assert generate_cli.main(dataclasses.replace(cfg, model=str(tmp_path / "eos"))) == [""]
    assert capsys.readouterr().out == f"The| [EOS]\n{'-' * 40}\n"


def test_context_overflow_is_a_clear_error():
    m = tiny_model()
    ids, mask = pad_sequences([[1] * 60], PAD)
    with pytest.raises(UserError, match="context"):
        generate(m, ids, mask, max_new_tokens=10, eos_id=EOS, pad_id=PAD, greedy=True)


def test_sampling_logits_are_fp32_under_bf16_autocast():
    """Generation samples from the distribution whose log-probs PPO computes (fp32 ``token_logprobs``), also under
    bf16 autocast: GPT-2-sized logits (about 100) rounded to bf16 would move each log-prob by a few hundredths."""
    m = tiny_model()
    with torch.no_grad():
        m.transformer.wte.weight.mul_(300)  # logits of GPT-2's magnitude
    ids, mask = pad_sequences(PROMPTS, PAD)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m.next_token_logits(ids, mask)  # (B, V)
        hidden = m.hidden_states(ids, mask)[:, -1]  # (B, d)
    assert logits.dtype == torch.float32 and logits.abs().max() > 50
    targets = torch.arange(len(PROMPTS)) + 3
    expected = m.token_logprobs(hidden, targets, temperature=0.7)  # fp32, autocast off inside
    got = torch.log_softmax(logits / 0.7, -1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_top_p_applies_to_the_tempered_distribution():
    """The nucleus is taken of softmax(logits / T), the distribution actually sampled (as Hugging Face's warpers
    order them: temperature, then top-k, then top-p), not of the untempered one: each drawn token equals
    torch.multinomial over a plain re-implementation of that nucleus with the same seed. At T = 0.5 the tempered
    nucleus is much smaller than the untempered one, so filtering before dividing draws other tokens."""
    m = tiny_model()
    with torch.no_grad():  # spread the logits (about 0.1 at initialisation): nuclei of a few to ~100 tokens
        m.transformer.ln_f.weight.mul_(8)
    prompts = [[i, 3 * i + 1, 5 * i + 2] for i in range(16)]
    ids, mask = pad_sequences(prompts, PAD)
    with torch.no_grad():
        logits = m(ids, mask)[:, -1]  # (B, V), from the full forward

    def nucleus_logits(scores, p):  # keep the smallest prefix of the sorted probabilities whose mass reaches p
        out = torch.full_like(scores, float("-inf"))
        for row in range(scores.shape[0]):
            sorted_p, order = torch.softmax(scores[row], -1).sort(descending=True)
            n = int((sorted_p.cumsum(0) < p).sum()) + 1
            out[row, order[:n]] = scores[row, order[:n]]
        return out

    T, p = 0.5, 0.9
    want = nucleus_logits(logits / T, p)
    untempered = nucleus_logits(logits, p)
    assert (torch.isfinite(want).sum(1) < torch.isfinite(untempered).sum(1)).all()  # the two sets differ
    for seed in range(3):
        g = generate(m, ids, mask, max_new_tokens=1, eos_id=EOS, pad_id=PAD, temperature=T, top_p=p,
                     generator=torch.Generator().manual_seed(seed))
        draw = torch.multinomial(torch.softmax(want, -1), 1, generator=torch.Generator().manual_seed(seed))[:, 0]
        assert torch.equal(g.response[:, 0], draw)


def test_bad_sampling_settings_are_user_errors():
    """temperature <= 0 without greedy (a division by zero) and top_p outside (0, 1] are refused with a clear error
    instead of sampling from NaNs or silently turning nucleus sampling off."""
    m = tiny_model()
    ids, mask = pad_sequences(PROMPTS, PAD)
    kw = dict(max_new_tokens=2, eos_id=EOS, pad_id=PAD)
    for bad in (dict(temperature=0.0), dict(temperature=-1.0), dict(top_p=1.5), dict(top_p=0.0)):
        with pytest.raises(UserError):
            generate(m, ids, mask, **kw, **bad)
    assert generate(m, ids, mask, **kw, temperature=0.0, greedy=True).response.shape == (3, 2)


def test_generate_text_left_pads_and_stops_at_eos():
    """generate_text (strings in, strings out): a short prompt beside a long one continues as it does alone (the
    batch is left-padded), and the text ends before the first EOS; a model that always says EOS gives ""."""
    from minirlhf.generate import generate_text
    from minirlhf.tokenizer import get_tokenizer

    tok = get_tokenizer("gpt2-299")
    m = tiny_model()
    prompts = ["The movie was a long and tiring", "Hi"]
    assert len(tok.encode(prompts[0])) > len(tok.encode(prompts[1]))
    batch = generate_text(m, tok, prompts, max_new_tokens=6, greedy=True)
    assert batch == [generate_text(m, tok, [p], max_new_tokens=6, greedy=True)[0] for p in prompts]
    with torch.no_grad():  # every hidden state points at EOS
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(m.transformer.wte.weight[EOS] * 10)
    assert generate_text(m, tok, prompts, max_new_tokens=6, greedy=True) == ["", ""]


def test_generation_runs_in_eval_mode_and_restores_training():
    """Dropout is off while sampling (pitfall 4) even when the caller's model is in training mode with dropout 0.5:
    greedy decoding with the cache equals full recomputation and repeats exactly; afterwards the model is back in
    training mode (and a model in eval mode stays there)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, n_positions=64, n_layer=2, n_head=2, n_embd=32, dropout=0.5, tokenizer="gpt2-299"))
    m.train()
    ids, mask = pad_sequences(PROMPTS, PAD)
    kw = dict(max_new_tokens=8, eos_id=EOS, pad_id=PAD, greedy=True)
    a, b = generate(m, ids, mask, **kw), generate(m, ids, mask, use_cache=False, **kw)
    assert m.training
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences, generate(m, ids, mask, **kw).sequences)
    m.eval()
    generate(m, ids, mask, **kw)
    assert not m.training


def test_non_finite_logits_are_a_clear_error():
    """A model whose weights hold a NaN (or diverged to inf) would die inside torch.multinomial; generation names the
    cause instead."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_positions=16, n_layer=1, n_head=2, n_embd=16, tokenizer="gpt2-299"))
    with torch.no_grad():
        model.transformer.ln_f.weight[3] = float("nan")
    ids, mask = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long)
    with pytest.raises(UserError, match="next-token logits are not finite"):
        generate(model, ids, mask, max_new_tokens=3, eos_id=299, pad_id=300)
