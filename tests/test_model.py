"""Our GPT-2 against transformers' GPT2LMHeadModel (the independent reference), both directions, plus padding,
attention implementations, heads, and clear errors on bad checkpoints."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import kernels.flash_attention
from minirlhf.config import UserError
from minirlhf.hf import from_pretrained, save_pretrained
from minirlhf.model import GPT, MLP, GPTConfig, RewardModel, ScalarHead, last_token_index, left_pad_start
from test_model_triton_attention import count_calls

TOL = {torch.float32: 1e-4}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=64, n_embd=48, n_layer=3, n_head=3,  # head size 16 (Triton)
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random biases and LayerNorm gains, so a mix-up of any of them shows
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.normal_(0, 0.1 if name.endswith("bias") else 1.0)
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    return d


def left_padded_batch(V=50257):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, 13), generator=g)
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    mask[2, :1] = 0
    return x, mask


def test_logits_match_transformers(hf_dir):
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = from_pretrained(str(hf_dir)).eval()
    x, mask = left_padded_batch()
    with torch.no_grad():
        ref = hf(x).logits
        assert (ours(x) - ref).abs().max() < TOL[torch.float32]
        # Left padding: transformers needs the position ids spelled out; ours derives them from the mask.
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        ref = hf(x, attention_mask=mask, position_ids=pos).logits
        diff = (ours(x, mask) - ref).abs() * mask[..., None]
        assert diff.max() < TOL[torch.float32]


def test_export_loads_in_transformers(hf_dir, tmp_path):
    ours = from_pretrained(str(hf_dir)).eval()
    save_pretrained(ours, tmp_path / "export")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    x, _ = left_padded_batch()
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() < TOL[torch.float32]


def test_pytorch_bin_and_single_file(hf_dir, tmp_path):
    """pytorch_model.bin (read with weights_only=True) and a bare .safetensors path load the same weights."""
    from safetensors.torch import load_file

    state = load_file(str(hf_dir / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save(state, tmp_path / "pytorch_model.bin")
    a, b = from_pretrained(str(tmp_path)), from_pretrained(str(hf_dir / "model.safetensors"))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_left_padding_does_not_change_real_logits():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=300, n_positions=32, n_layer=2, n_head=2, n_embd=32, tokenizer="gpt2-299")).eval()
    x = torch.randint(0, 300, (1, 7))
    pad = torch.full((1, 4), 300)  # the PAD id
    padded = torch.cat([pad, x], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(m(padded, mask)[:, 4:], m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl, module, launcher", [
    ("sdpa", torch.nn.functional, "scaled_dot_product_attention"),
    ("triton", kernels.flash_attention, "_flash_fwd"),  # the interpreter on CPU
])
def test_attention_implementations_agree(impl, module, launcher, hf_dir, monkeypatch):
    """SDPA and the Triton flash kernel against the plain attention reference (attn_impl="torch") on a left-padded
    batch with Hugging Face weights, at the real positions (padded ones only need to be finite); a spy checks that the
    implementation under test ran, once per layer."""
    ref = from_pretrained(str(hf_dir), attn_impl="torch").eval()
    other = from_pretrained(str(hf_dir), attn_impl=impl).eval()
    x, mask = left_padded_batch()
    with torch.no_grad():
        want = ref(x, mask)
        calls = count_calls(monkeypatch, module, launcher)
        got = other(x, mask)
    assert len(calls) == other.config.n_layer
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=TOL[torch.float32])
    assert torch.isfinite(got).all()


def test_padded_vocab_rows_are_never_scored():
    m = GPT(GPTConfig(vocab_size=1000, n_positions=16, n_layer=1, n_head=2, n_embd=16, tokenizer="gpt2-999"))
    assert m.transformer.wte.weight.shape[0] == 1024  # 1000 + PAD, rounded up to 64
    assert m(torch.zeros(1, 3, dtype=torch.long)).shape[-1] == 1000  # logits only over real tokens


def test_heads_initialisation():
    torch.manual_seed(0)
    d = 768
    reward, value = ScalarHead(d, "reward"), ScalarHead(d, "value")
    assert abs(reward.proj.weight.std().item() - 1 / (d + 1) ** 0.5) < 0.1 / (d + 1) ** 0.5
    assert value.proj.weight.abs().max() == 0 and value.proj.bias.abs().max() == 0


def test_reward_model_reads_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    rm = RewardModel(GPT(GPTConfig(vocab_size=300, n_positions=32, n_layer=2, n_head=2, n_embd=32))).eval()
    x = torch.randint(0, 300, (1, 6))
    left = torch.cat([torch.full((1, 3), 300), x], 1)
    right = torch.cat([x, torch.full((1, 5), 300)], 1)
    ones, z3, z5 = torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)
    assert last_token_index(torch.cat([ones, z5], 1)).item() == 5
    with torch.no_grad():
        s = rm(x)
        torch.testing.assert_close(rm(left, torch.cat([z3, ones], 1)), s, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rm(right, torch.cat([ones, z5], 1)), s, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one clear error, no traceback soup


def test_bad_checkpoints_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such"):
        from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no config.json"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="only 'gpt2'"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        from_pretrained(str(tmp_path))


def test_too_long_input_is_a_user_error():
    """A sequence longer than the learned position table is one clear error naming the context, not an IndexError
    from the position embedding."""
    m = GPT(GPTConfig(vocab_size=300, n_positions=16, n_layer=1, n_head=2, n_embd=16, tokenizer="gpt2-299"))
    m(torch.zeros(1, 16, dtype=torch.long))  # exactly the context: fine
    with pytest.raises(UserError, match="exceeds the model's context of 16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_hub_name_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="local directory"):
        from_pretrained("gpt2-xl")


@pytest.mark.parametrize("setup", ["missing", "not_a_checkpoint", "unknown_arch"])
def test_cli_bad_model_exits_nonzero_with_one_line(tmp_path, setup):
    path = tmp_path / "m"
    if setup != "missing":
        path.mkdir()
    if setup == "unknown_arch":
        (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    r = subprocess.run([sys.executable, "-m", "minirlhf.generate", "--model", str(path), "--prompt", "Hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:")


def test_export_cli_round_trip(tmp_path):
    """A minirlhf checkpoint -> `python -m minirlhf.export` -> transformers: the same logits."""
    from minirlhf.checkpoint import save_checkpoint

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=1025, n_positions=32, n_layer=2, n_head=2, n_embd=32, tokenizer="gpt2-1024")).eval()
    save_checkpoint(tmp_path / "ppo", m, stage="ppo", config=m.config)
    r = subprocess.run([sys.executable, "-m", "minirlhf.export", "--checkpoint", str(tmp_path / "ppo"), "--out",
                        str(tmp_path / "hf")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 1025, (2, 9))
    with torch.no_grad():
        assert (hf(x).logits - m(x)).abs().max() < TOL[torch.float32]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 1024


def test_left_pad_start_per_row():
    """Start offsets for the Triton kernels: a fully padded row is allowed beside others; holes are not."""
    assert left_pad_start(torch.tensor([[0, 0, 0], [0, 1, 1], [1, 1, 0]])).tolist() == [3, 1, 0]
    with pytest.raises(RuntimeError, match="contiguous"):
        left_pad_start(torch.tensor([[1, 0, 1], [1, 1, 1]]))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_mlp_recomputes_its_gelu_and_equals_the_plain_composition(bf16):
    """MLP = c_proj(gelu_tanh(c_fc(x))) through GeluProjection: the same output and gradients as the plain
    composition of the three modules (fp32, and bf16 autocast on CPU), while the backward holds one 4d-wide activation
    per token instead of two (the GELU output is recomputed)."""
    torch.manual_seed(0)
    mlp = MLP(GPTConfig(n_embd=16, n_head=2, dropout=0.0))
    x = torch.randn(3, 5, 16, requires_grad=True)
    dy = torch.randn(3, 5, 16)

    def plain(x):
        return mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh"))

    def saved_activations(fn):  # elements autograd keeps for the backward, parameters aside
        params, sizes = {p.data_ptr() for p in mlp.parameters()}, []

        def pack(t):
            if t.data_ptr() not in params:
                sizes.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16,
                                                                                         enabled=bf16):
            out = fn(x)
        return out, sizes

    (ours, ours_saved), (want, want_saved) = saved_activations(mlp), saved_activations(plain)
    assert ours.dtype == want.dtype == (torch.bfloat16 if bf16 else torch.float32)
    torch.testing.assert_close(ours, want, rtol=0, atol=0)
    grads = torch.autograd.grad(ours, [x, *mlp.parameters()], dy.to(ours.dtype))
    want_grads = torch.autograd.grad(want, [x, *mlp.parameters()], dy.to(want.dtype))
    for g, w in zip(grads, want_grads):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    wide = 3 * 5 * 64  # a (3, 5, 4d) activation
    assert want_saved.count(wide) == 2 and ours_saved.count(wide) == 1, (ours_saved, want_saved)
