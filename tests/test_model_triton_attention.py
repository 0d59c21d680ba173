"""The whole GPT with attn_impl="triton" (kernels/flash_attention.py for full passes, kernels/decode_attention.py for
cached decoding) against attn_impl="torch" (the plain reference): logits and gradients of a left-padded batch at its
real positions, and a greedy generation with the KV cache. On CPU the kernels run under the Triton interpreter.
Counting spies on the kernels' launchers check that the Triton path really ran (a silent fallback to PyTorch would
agree with the reference too)."""
import copy

import pytest
import torch

import kernels.decode_attention
import kernels.flash_attention
from minirlhf.generate import generate
from minirlhf.model import GPT, GPTConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 97
PAD = VOCAB  # the PAD row sits right after the real vocabulary
EOS = VOCAB - 1


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` (its callers look it up at call time) so that every call appends ``name`` to the returned
    list: evidence that a code path ran, where agreeing numbers alone cannot tell a kernel from its fallback."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def attention_launches(monkeypatch) -> dict[str, list]:
    """Spies on the three attention launchers: flash forward, flash backward, decode."""
    return {name: count_calls(monkeypatch, module, name) for module, name in (
        (kernels.flash_attention, "_flash_fwd"), (kernels.flash_attention, "_flash_bwd"),
        (kernels.decode_attention, "_decode_fwd"))}


def tiny_models():
    torch.manual_seed(0)
    ref = GPT(GPTConfig(vocab_size=VOCAB, n_positions=64, n_layer=2, n_head=2, n_embd=32, attn_impl="torch"))
    with torch.no_grad():  # larger weights than GPT-2's init: logits far apart, so greedy picks are not near-ties
        for p in ref.parameters():
            p.mul_(4.0)
    ref = ref.to(DEVICE)
    tri = copy.deepcopy(ref)
    tri.config.attn_impl = "triton"
    return ref, tri


def left_padded_batch():
    g = torch.Generator().manual_seed(1)
    lengths = [12, 9, 4]
    P = max(lengths)
    ids = torch.full((len(lengths), P), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), P), dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, P - n:] = torch.randint(0, EOS, (n,), generator=g)
        mask[b, P - n:] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def test_logits_and_gradients_match_torch_attention(monkeypatch):
    ref, tri = tiny_models()
    ids, mask = left_padded_batch()
    real = mask.bool()
    w = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads = []
    launches = attention_launches(monkeypatch)
    for model in (ref, tri):
        logits = model(ids, mask)
        assert torch.isfinite(logits[real]).all()
        (logits * w)[real].sum().backward()  # a loss on real positions only, incoming gradient != 1
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad()
        if model is ref:
            ref_logits = logits.detach()
        else:
            torch.testing.assert_close(logits.detach()[real], ref_logits[real], atol=1e-4, rtol=1e-4)
    # one flash forward and backward per layer, all from the triton model
    assert {k: len(v) for k, v in launches.items()} == {"_flash_fwd": 2, "_flash_bwd": 2, "_decode_fwd": 0}
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        scale = grads[0][name].abs().max().item()
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4 * scale, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_greedy_generation_matches_torch_attention(use_cache, monkeypatch):
    """With the cache, the prompt goes through flash attention and each later token through the decode kernel;
    without it, every step is a full flash pass."""
    ref, tri = tiny_models()
    ids, mask = left_padded_batch()
    kw = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD, greedy=True, use_cache=use_cache)
    want = generate(ref, ids, mask, **kw)
    launches = attention_launches(monkeypatch)
    got = generate(tri, ids, mask, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(got.attention_mask, want.attention_mask)
    steps, n_layer = got.response.shape[1], tri.config.n_layer
    decoded = (steps - 1) * n_layer if use_cache else 0
    assert (len(launches["_flash_fwd"]), len(launches["_decode_fwd"])) == (steps * n_layer - decoded, decoded)


def test_a_long_chunk_through_the_cache_uses_flash_attention(monkeypatch):
    """More new tokens than the decode kernel takes (a prompt fed after a cached prefix): the same logits as torch."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, n_positions=128, n_layer=1, n_head=2, n_embd=32, attn_impl="torch")
    ref = GPT(config).to(DEVICE)
    tri = copy.deepcopy(ref)
    tri.config.attn_impl = "triton"
    ids = torch.randint(0, EOS, (2, 110), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    mask = torch.ones_like(ids)
    logits = []
    launches = attention_launches(monkeypatch)
    with torch.no_grad():
        for m in (ref, tri):
            cache = m.new_kv_cache(2, 110)
            m(ids[:, :10], mask[:, :10], kv_cache=cache)
            logits.append(m(ids[:, 10:], mask[:, 10:], kv_cache=cache))  # 100 new queries against 110 keys
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert (len(launches["_flash_fwd"]), len(launches["_decode_fwd"])) == (2, 0)  # the prefix, then the long chunk
