"""GPT-2, written out plainly, with a KV cache and scalar heads for reward and value models.

The architecture (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"): learned token and
position embeddings, ``n_layer`` pre-LayerNorm blocks ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``, a final
LayerNorm, and an output layer tied to the token embedding. Attention is causal multi-head attention; the MLP is
``c_proj(gelu_tanh(c_fc(x)))`` with a 4x hidden width.

What RLHF adds to a plain GPT-2 (the README's correctness pitfalls):

* **Padding.** Batches of prompts are left-padded. ``attention_mask`` (B, T) marks real tokens; padded keys are never
  attended and position ids come from the mask (``cumsum(mask) - 1``), so a prompt gets the same positions -- and the
  same logits -- whatever padding it sits beside (pitfall 2).
* **Vocabulary.** The embedding has ``padded_vocab`` rows (a multiple of 64, for fast matmuls), which includes the PAD
  token's row, but logits are computed for the ``vocab_size`` real tokens only: padded rows can never be sampled or
  scored.
* **KV cache** for generation (:class:`KVCache`): keys and values of past tokens, preallocated, with the padding mask
  and the count of real tokens per row for the position ids of new tokens.
* **Heads.** :class:`ScalarHead` maps the final hidden state to one number: a reward head starts at N(0, 1/(d+1))
  (variance; lm-human-preferences' output-layer default), a value head at zero (pitfall 8). :class:`RewardModel`
  reads it at the last real token.

Attention implementations (``GPTConfig.attn_impl``, an explicit choice): ``"torch"`` (the plain reference: scores,
mask, softmax), ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention`` with the mask), ``"triton"`` (the
flash-attention and decode kernels in ``kernels/``, which take left padding as per-row start offsets), and ``"auto"``:
Triton on CUDA tensors (head sizes 16, 32, 64, 128; not while training with dropout, which the kernels lack), SDPA
otherwise, decided per call (never at import time).

Loading and saving in the Hugging Face GPT-2 layout (``from_pretrained``, ``save_pretrained``) live in
``minirlhf/hf.py``.
"""
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minirlhf.config import UserError

# ---------------------------------------------------------------------------------------------------------------------
# Configuration


# The implementation choices of GPTConfig, and the help of the scripts' --attn-impl / --logprob-impl flags.
ATTN_IMPLS = ("auto", "triton", "sdpa", "torch")
ATTN_IMPL_HELP = ("attention: triton (flash kernels, with padding), sdpa, torch (plain reference), or auto (triton on "
                  "CUDA unless training with dropout or for an unsupported head size; sdpa otherwise)")
LOGPROB_IMPLS = ("auto", "triton", "chunked", "torch")
LOGPROB_IMPL_HELP = ("token log-probs: triton (fused LM-head kernel, no logits in memory), chunked (PyTorch over "
                     "cache-sized row chunks, one logits buffer), torch (the plain fp32 definition), or auto (triton "
                     "on CUDA, chunked elsewhere)")


@dataclass
class GPTConfig:
    """Shape of a GPT-2. The defaults are GPT-2 small (124M parameters)."""

    vocab_size: int = 50257  # real tokens, EOS included; logits are computed over exactly these
    n_positions: int = 1024  # longest sequence (learned position embeddings)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # pre-training value 0.1; RL needs 0 (pitfall 4); the trainers set it
    layer_norm_eps: float = 1e-5
    attn_impl: str = "auto"  # "auto" | "torch" | "sdpa" | "triton"
    logprob_impl: str = "auto"  # "auto" | "triton" | "chunked" | "torch": how token_logprobs runs the LM head
    tokenizer: str = "gpt2"  # name for minirlhf.tokenizer.get_tokenizer

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.attn_impl not in ATTN_IMPLS:
            raise UserError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {self.attn_impl!r}")
        if self.logprob_impl not in LOGPROB_IMPLS:
            raise UserError(f"logprob_impl must be one of {', '.join(LOGPROB_IMPLS)}, got {self.logprob_impl!r}")

    @property
    def padded_vocab(self) -> int:
        """Embedding rows: the real vocabulary + the PAD row, rounded up to a multiple of 64."""
        return (self.vocab_size + 1 + 63) // 64 * 64

    @classmethod
    def from_dict(cls, d: dict, where: str = "the model config") -> "GPTConfig":
        """A config from a checkpoint's dict; the shape fields are required (a default would build another model,
        and fail later with a shape mismatch far from the cause)."""
        missing = [k for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd", "tokenizer") if k not in d]
        if missing:
            raise UserError(f"{where}: lacks {', '.join(missing)}; the checkpoint's shape cannot be guessed")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to ``max_len`` positions.

    ``mask`` (B, max_len) records which cached positions are real tokens (prompt padding is 0); ``n_real`` (B,) counts
    them, so the next token of row b sits at position ``n_real[b]``. ``key_start`` (B,) is the number of leading padded
    slots (what the Triton kernels take instead of a mask; left padding only).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device):
        if max_len > config.n_positions:
            raise UserError(f"prompt + new tokens = {max_len} exceeds the model's context of {config.n_positions}")
        H, D = config.n_head, config.n_embd // config.n_head
        self.shape = (config.n_layer, batch_size, H, max_len, D)
        self.k: Optional[torch.Tensor] = None  # allocated at the first update, in the dtype attention computes in
        self.v: Optional[torch.Tensor] = None  # (fp32, or bf16 under autocast)
        self.mask = torch.zeros((batch_size, max_len), device=device, dtype=torch.long)
        self.n_real = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.key_start: Optional[torch.Tensor] = None
        self.length = 0  # positions filled (same for every row)
        self.max_len = max_len

    def append_mask(self, mask: torch.Tensor) -> None:
        """Record the padding mask (B, T) of the tokens about to be added (called once per forward, before layers)."""
        T = mask.shape[1]
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {T} > {self.max_len}")
        self.mask[:, self.length:self.length + T] = mask
        if self.key_start is None:  # first call: the prompt, whose leading zeros are the left padding
            self.key_start = (mask.cumsum(1) == 0).sum(1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, H, T, D); return all of them so far (B, H, length + T, D)."""
        T = k.shape[2]
        if self.k is None:
            self.k = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
            self.v = torch.zeros(self.shape, device=v.device, dtype=v.dtype)
        self.k[layer, :, :, self.length:self.length + T] = k
        self.v[layer, :, :, self.length:self.length + T] = v
        return self.k[layer, :, :, :self.length + T], self.v[layer, :, :, :self.length + T]

    def advance(self, mask: torch.Tensor) -> None:
        """After all layers ran on T new tokens: move the fill pointer and count real tokens."""
        self.length += mask.shape[1]
        self.n_real += mask.sum(1)


# ---------------------------------------------------------------------------------------------------------------------
# Attention


TRITON_HEAD_DIMS = (16, 32, 64, 128)  # what kernels/flash_attention.py and decode_attention.py take


def _resolve_attn_impl(config: GPTConfig, x: torch.Tensor, training: bool) -> str:
    """"auto": the Triton kernels on CUDA when they take this head size and no attention dropout is needed (they have
    none), SDPA otherwise."""
    if config.attn_impl == "auto":
        triton_ok = config.n_embd // config.n_head in TRITON_HEAD_DIMS and not (training and config.dropout > 0)
        return "triton" if x.is_cuda and triton_ok else "sdpa"
    return config.attn_impl


def _attention_bias(key_mask: torch.Tensor, Tq: int, dtype) -> torch.Tensor:
    """Additive mask (B, 1, Tq, Tk): 0 where query i may see key j (j real and j <= Tk - Tq + i), a large negative
    number elsewhere. Finite, so a query that sees nothing (a padded query) gets a harmless uniform average instead
    of NaN; its output is never used."""
    B, Tk = key_mask.shape
    q_pos = torch.arange(Tk - Tq, Tk, device=key_mask.device)[:, None]  # (Tq, 1) absolute query positions
    k_pos = torch.arange(Tk, device=key_mask.device)[None, :]  # (1, Tk)
    allowed = (k_pos <= q_pos)[None, None] & key_mask.bool()[:, None, None, :]  # (B, 1, Tq, Tk)
    bias = torch.zeros(allowed.shape, device=key_mask.device, dtype=dtype)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.config, self.layer, self.n_head = config, layer, config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v together
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout, self.resid_dropout = nn.Dropout(config.dropout), nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, key_start: Optional[torch.Tensor],
                kv_cache: Optional[KVCache]) -> torch.Tensor:
        B, T, C = x.shape  # batch, time, channels
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, H, Tk, D), Tk = past + T
        impl = _resolve_attn_impl(self.config, x, self.training)  # read per call: switchable on a built model
        if impl == "triton":
            y = self._triton(q, k, v, key_start, kv_cache)
        else:
            dtype = q.dtype
            if impl == "sdpa" and q.device.type == "cpu":  # the CPU's bf16 SDPA is slower than its fp32 one (its
                q, k, v = q.float(), k.float(), v.float()  # backward, in torch 2.13); attention is a few % of the FLOPs
            bias = _attention_bias(key_mask, T, q.dtype)
            if impl == "sdpa":
                p = self.attn_dropout.p if self.training else 0.0
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p).to(dtype)
            else:  # "torch": the reference
                att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1]) + bias  # (B, H, T, Tk)
                y = self.attn_dropout(F.softmax(att.float(), dim=-1).to(q.dtype)) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _triton(self, q, k, v, key_start, kv_cache):
        if self.training and self.attn_dropout.p > 0:
            raise UserError("attn_impl='triton' has no attention dropout: use dropout=0 or attn_impl='sdpa'")
        if kv_cache is not None and q.shape[2] < k.shape[2] and not torch.is_grad_enabled():
            from kernels.decode_attention import MAX_QUERIES, decode_attention
            if q.shape[2] <= MAX_QUERIES:  # (a longer chunk of new tokens goes to flash attention, which takes Tq < Tk)
                return decode_attention(q, kv_cache.k[self.layer], kv_cache.v[self.layer], key_start,
                                        kv_len=k.shape[2])
        from kernels.flash_attention import flash_attention
        return flash_attention(q, k, v, key_start)


class GeluProjection(torch.autograd.Function):
    """``y = gelu_tanh(u) W^T + b`` (the MLP's second half), keeping only u for the backward: the GELU output, with u
    the widest activation of a block (4d per token), is recomputed there instead of held from forward to backward
    (about a fifth of a block's saved activations: 12 x 1152 x 3072 fp32 = 0.16 GiB per GPT-2 124M in a PPO step of
    32 x 36 tokens; the recomputation is one elementwise pass). The matmuls run in the dtype the forward gave y
    (bf16 under autocast, as ``F.linear`` would), and each gradient comes back in its input's dtype."""

    @staticmethod
    def forward(ctx, u, weight, bias):  # u (..., 4d), weight (d, 4d), bias (d,)
        ctx.save_for_backward(u, weight, bias)
        return F.linear(F.gelu(u, approximate="tanh"), weight, bias)  # (..., d)

    @staticmethod
    def backward(ctx, dy):  # dy (..., d)
        u, weight, bias = ctx.saved_tensors
        a = F.gelu(u, approximate="tanh").to(dy.dtype).flatten(0, -2)  # (M, 4d), recomputed
        dy2 = dy.flatten(0, -2)  # (M, d)
        du = torch.ops.aten.gelu_backward((dy @ weight.to(dy.dtype)).to(u.dtype), u, approximate="tanh")
        return du, (dy2.t() @ a).to(weight.dtype), dy2.sum(0).to(bias.dtype)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # c_proj(gelu_tanh(c_fc(x)))
        return self.dropout(GeluProjection.apply(self.c_fc(x), self.c_proj.weight, self.c_proj.bias))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, key_mask, key_start, kv_cache):
        x = x + self.attn(self.ln_1(x), key_mask, key_start, kv_cache)
        return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------------------------------------------------------------
# The model


def position_ids_from_mask(mask: torch.Tensor, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Position of each token counted over real tokens only: ``cumsum(mask) - 1`` (+ tokens already cached), 0 on pads.
    (B, T) -> (B, T). With left padding, "<pad> <pad> Hello" gets positions 0 0 0 and "Hi there you" 0 1 2."""
    pos = mask.long().cumsum(1) - 1
    if offset is not None:
        pos = pos + offset[:, None]
    return pos.clamp(min=0)


def left_pad_start(mask: torch.Tensor) -> torch.Tensor:
    """Leading padded slots per row (B,), for kernels that take start offsets. Checks (without a GPU sync) that the
    real tokens of each row are contiguous; trailing padding is harmless under a causal mask."""
    start = (mask.cumsum(1) == 0).sum(1)
    n_real = mask.sum(1)
    last = mask.shape[1] - (mask.flip(1).cumsum(1) == 0).sum(1)  # one past the last real token
    torch._assert_async((((last - start) == n_real) | (n_real == 0)).all(),
                        "attn_impl='triton' needs each row's real tokens to be contiguous (left or right padding)")
    return start


class GPT(nn.Module):
    """GPT-2 language model. ``forward`` returns logits (B, T, vocab_size); ``hidden_states`` the final hidden states
    (B, T, n_embd) that the LM head, the reward head and the fused log-prob kernels read."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The tied output layer (vocab_size, n_embd): the token embedding without the PAD and padding rows."""
        return self.transformer.wte.weight[: self.config.vocab_size]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      position_ids: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, n_embd) after the final LayerNorm.

        ``attention_mask`` (B, T) marks real tokens (default: all). With a ``kv_cache`` the ids are the new tokens only
        and the cache supplies (and records) everything before them.
        """
        B, T = input_ids.shape  # batch, time
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if kv_cache is not None:
            kv_cache.append_mask(attention_mask)
            key_mask = kv_cache.mask[:, :kv_cache.length + T]  # (B, Tk)
            key_start = kv_cache.key_start
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask, offset=kv_cache.n_real)
        else:
            key_mask = attention_mask
            key_start = None
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask)
        if _resolve_attn_impl(self.config, input_ids, self.training) == "triton" and kv_cache is None:
            key_start = left_pad_start(attention_mask)
        if kv_cache is None and T > self.config.n_positions:  # (with a cache, KVCache checked its length)
            raise UserError(f"sequence of {T} tokens exceeds the model's context of {self.config.n_positions}")
        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, key_mask, key_start, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(attention_mask)
        return self.transformer.ln_f(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """(B, T) ids -> logits (B, T, vocab_size). Logits at position t score the token at t + 1 (pitfall 3)."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, kv_cache)
        return h @ self.lm_head_weight.T

    def next_token_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                          kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """fp32 logits (B, vocab_size) for the token after the last position: what generation samples from.

        Only the last position goes through the output layer, and in fp32 with autocast off: under bf16 autocast
        ``h @ W^T`` rounds GPT-2's logits (magnitudes around 100, where bf16's spacing is 0.5) before the sampler sees
        them, so the tokens would come from a different distribution than the fp32 log-probs PPO computes for them
        (``token_logprobs``), an error of several hundredths of a nat per token at temperature 0.7.
        """
        return self.fp32_logits(self.hidden_states(input_ids, attention_mask, kv_cache=kv_cache)[:, -1])  # (B, V)

    def fp32_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ W^T`` in fp32 with autocast off: (..., d) -> (..., vocab_size)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return hidden.float() @ self.lm_head_weight.float().T

    def logprob_kernel_impl(self, x: torch.Tensor) -> str:
        """``config.logprob_impl`` resolved for tensors like ``x``: "auto" is Triton on CUDA, chunked elsewhere."""
        if self.config.logprob_impl == "auto":
            return "triton" if x.is_cuda else "chunked"
        return self.config.logprob_impl

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                       mask: Optional[torch.Tensor] = None, return_entropy: bool = False):
        """``log softmax(hidden @ W^T / temperature)[targets]`` in fp32 (and the entropy), for final hidden states
        (..., d) and targets (...): the one place SFT, PPO and the reference pass turn hidden states into log-probs.

        Written out below in plain PyTorch. ``config.logprob_impl`` swaps in a faster implementation of the same
        function at one marked place: "triton", the fused kernel of ``kernels/lm_head_logprobs.py`` (the N x V logits
        never reach memory), or "chunked", ``kernels/lm_head_logprobs_cpu.py`` (one logits buffer, visited in
        cache-sized row chunks); "auto" takes the first on CUDA tensors, the second elsewhere. Rows where ``mask`` is 0
        give 0 (their target may be PAD). Autocast is off inside: log-probs in bf16 would change with the batch shape
        and break PPO's ratio = 1 check (pitfall 5).
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        weight = self.lm_head_weight
        with torch.autocast(hidden.device.type, enabled=False):
            hidden = hidden.to(weight.dtype)
            impl = self.logprob_kernel_impl(hidden)
            if impl == "triton":  # ---- a faster implementation takes over here, and only here ----
                from kernels.lm_head_logprobs import lm_head_logprobs
                return lm_head_logprobs(hidden, weight, targets, temperature=temperature, mask=mask,
                                        return_entropy=return_entropy, impl=impl)
            if impl == "chunked":
                from kernels.lm_head_logprobs_cpu import lm_head_logprobs_cpu
                logp, entropy = lm_head_logprobs_cpu(hidden, self.transformer.wte.weight, targets, mask=mask,
                                                     temperature=temperature, vocab_size=self.config.vocab_size)
                return (logp, entropy) if return_entropy else logp
            logits = self.fp32_logits(hidden) / temperature  # (..., V)
            if mask is not None:  # masked rows may hold anything and their target may be PAD: score them on zeros
                keep = mask.bool()
                logits = torch.where(keep[..., None], logits, 0.0)
                targets = torch.where(keep, targets, 0)
            logq = torch.log_softmax(logits, dim=-1)  # (..., V) log p_v
            logp = logq.gather(-1, targets.long()[..., None]).squeeze(-1)  # (...) log p of the target
            entropy = -(logq.exp() * logq).sum(-1)  # (...) H = -sum_v p_v log p_v
            if mask is not None:
                logp, entropy = torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)
        return (logp, entropy) if return_entropy else logp

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_len, self.transformer.wte.weight.device)


# ---------------------------------------------------------------------------------------------------------------------
# Scalar heads: reward and value


class ScalarHead(nn.Module):
    """Linear map from a hidden state (..., d) to one number (...).

    ``init="reward"``: weight ~ N(0, 1/(d+1)) (std 1/sqrt(d+1), the default of lm-human-preferences' dense layers), so
    initial rewards have unit scale. ``init="value"``: weight and bias zero, so the initial value estimate is 0 and
    the first advantages equal the returns (pitfall 8).
    """

    def __init__(self, n_embd: int, init: str = "reward"):
        super().__init__()
        self.proj = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.proj.bias)
        if init == "reward":
            nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(n_embd + 1))
        elif init == "value":
            nn.init.zeros_(self.proj.weight)
        else:
            raise ValueError(f"init must be 'reward' or 'value', got {init!r}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).squeeze(-1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the last real token of each row, for left or right padding (pitfall 6)."""
    T = mask.shape[1]
    return (mask.long() * torch.arange(1, T + 1, device=mask.device)).argmax(1)


class RewardModel(nn.Module):
    """A GPT trunk with a scalar head read at the last real token: ``score = gain * head(h_last) + bias``.

    ``gain`` and ``bias`` are buffers set after training so that samples of the initial policy score mean 0, std 1
    (lm-human-preferences; pitfall 8), or the training responses with ``--normalise-on responses``; they are saved
    with the checkpoint and applied by the loader.
    """

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        self.head = ScalarHead(gpt.config.n_embd, init="reward")
        self.register_buffer("gain", torch.ones(()))
        self.register_buffer("bias", torch.zeros(()))

    def raw_score(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) -> (B,) head output at each row's last real token, before normalisation."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.gpt.hidden_states(input_ids, attention_mask)  # (B, T, d)
        last = last_token_index(attention_mask)
        return self.head(h[torch.arange(h.shape[0], device=h.device), last])

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.gain * self.raw_score(input_ids, attention_mask) + self.bias
