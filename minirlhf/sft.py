"""Supervised fine-tuning (step 2 of InstructGPT, Ouyang et al. 2022): the loss, the examples and their batches.

The loss. A demonstration is ``x = prompt + response + EOS`` (:func:`minirlhf.data.encode_pair`); the model learns to
write the response, not the prompt, so the loss is the mean negative log-likelihood over the response tokens and the
closing EOS only (the EOS teaches it to stop)::

    L = -(1 / |M|) * sum_{t in M} log p(x_t | x_<t),     M = response positions + the EOS

Logits at position t score the token at t + 1 (pitfall 3), so the log-prob of ``x_t`` is read from the logits at
``t - 1`` (:func:`next_token_logprobs`), through ``GPT.token_logprobs``, the one place SFT, PPO and the reference turn
hidden states into log-probs (the fused Triton kernel on CUDA, its fp32 PyTorch reference elsewhere).
An empty prompt is a lone EOS (``Tokenizer.encode_prompt``), so the first response token is a target too. Plain
``{"text"}`` records (continued pre-training) are all "response": every token after the first and the EOS.
:func:`sft_nll` returns the sum over M; train_sft.py divides by |M| counted over every loss token of the optimizer
step (all its gradient-accumulation micro-batches), so accumulation equals one large batch exactly.

The run around it (flags, ``--init``, schedule, ``--resume``) is :mod:`minirlhf.finetune`, shared with train_rm.py.
"""
import torch

from minirlhf.config import UserError
from minirlhf.data import EncodedPair, Truncations, encode_checked, split_text
from minirlhf.generate import generate_batch
from minirlhf.model import GPT
from minirlhf.tokenizer import pad_sequences

# ---------------------------------------------------------------------------------------------------------------------
# Log-probs and the SFT loss


def next_token_logprobs(model: GPT, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log p(ids[:, t + 1] | ids[:, :t + 1])`` for every position, in fp32. (B, T) -> (B, T - 1).

    Positions whose target is padding hold 0 (PAD is not a real token); mask them."""
    h = model.hidden_states(ids, mask)[:, :-1]  # (B, T-1, d): the state at t predicts token t+1
    return model.token_logprobs(h, ids[:, 1:], mask=mask[:, 1:])  # (B, T-1); fused Triton kernel on CUDA


def sft_nll(model: GPT, ids: torch.Tensor, mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the target tokens marked by ``loss_mask`` (B, T - 1)."""
    return -(next_token_logprobs(model, ids, mask) * loss_mask).sum()


# ---------------------------------------------------------------------------------------------------------------------
# Examples and batches


def build_sft_examples(records: list[dict], tokenizer, *, max_len: int, truncate_prompts: bool,
                       truncations: Truncations) -> list[EncodedPair]:
    """Tokenize SFT records. Demonstrations: prompt + response + EOS, truncated by the shared rule (a prompt that
    would be cut is an error unless ``truncate_prompts``). Texts: text + EOS, split into overlapping windows when
    longer than ``max_len`` (nothing dropped)."""
    examples = []
    for r in records:
        if r["kind"] == "demonstration":
            examples.append(encode_checked(tokenizer, r, r["response"], max_len=max_len,
                                           truncate_prompts=truncate_prompts, truncations=truncations))
            continue
        if not r["text"]:
            raise UserError(f"{r['where']}: field 'text': empty")
        chunks = split_text(tokenizer.encode(r["text"]) + [tokenizer.eos_id], max_len)
        truncations.split += len(chunks) > 1
        examples.extend(truncations.add(EncodedPair(c, 0, False, False)) for c in chunks)
    return examples


def first_target(example: EncodedPair) -> int:
    """Position of the first loss token: the first response token, or the second token of a text (the first has no
    context to be predicted from)."""
    return max(example.n_prompt, 1)


def loss_tokens(example: EncodedPair) -> int:
    """Target tokens of an example: the response and EOS, or every token after the first of a text."""
    return len(example.ids) - first_target(example)


def collate_sft(examples: list[EncodedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``ids`` (B, T), ``mask`` (B, T), and ``loss_mask`` (B, T - 1): 1 where the target token at
    t + 1 is a response token or the EOS (for texts: every real token after the first)."""
    ids, mask = pad_sequences([e.ids for e in examples], pad_id, side="right")
    positions = torch.arange(1, ids.shape[1])[None, :]  # (1, T-1) position of each target
    start = torch.tensor([first_target(e) for e in examples])[:, None]  # (B, 1) first target position
    loss_mask = (positions >= start).float() * mask[:, 1:]  # (B, T-1)
    return ids, mask, loss_mask


@torch.no_grad()
def sample_texts(model: GPT, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, seed: int) -> list[str]:
    """Continuations of token-id prompts (each cut from the left to leave room), from a generator of its own so that
    sampling at eval time does not move the training RNG."""
    room = model.config.n_positions - max_new_tokens
    generator = torch.Generator(model.transformer.wte.weight.device).manual_seed(seed)
    out = generate_batch(model, tokenizer, [p[-room:] for p in prompts], max_new_tokens=max_new_tokens,
                         temperature=0.7, generator=generator)
    return tokenizer.decode_batch(out.response.tolist(), stop_at_eos=True)
