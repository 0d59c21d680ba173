"""Rollouts: the batches PPO learns from. The prompts (a stream of shuffled epochs, so any step's batch is known
without replaying the steps before it: exact ``--resume``), a batch of sampled responses with everything PPO computes
about them (:class:`Rollout`), the stop-token cut (lm-human-preferences' ``truncate_token``), the reward model's input
(an EOS appended where a response was cut), and forward passes in the training micro-batch shapes (pitfall 5: the
rollout's log-probs come from exactly the code and shapes the training forward uses).
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from minirlhf.config import UserError
from minirlhf.data import read_prompts
from minirlhf.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompts:
    ids: list[list[int]]  # token ids per prompt
    n_truncated: int  # prompts cut from the left to fit

    def batch(self, step: int, batch_size: int, seed: int) -> list[list[int]]:
        """The prompts of iteration ``step``: a stream of epochs, each a fresh permutation (fixed by seed and epoch),
        so any step's batch is known without replaying the ones before it (exact --resume)."""
        n, orders, out = len(self.ids), {}, []
        for i in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(i, n)
            if epoch not in orders:
                orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            out.append(self.ids[orders[epoch][pos]])
        return out


def load_prompts(path: str, tokenizer: Tokenizer, max_prompt_len: int, truncate: bool) -> Prompts:
    """Read and tokenize the prompt file; every prompt must leave room for the response (or be cut, if allowed)."""
    if max_prompt_len < 1:
        raise UserError("--max-new-tokens leaves no room for a prompt in the context (of the policy, or of the reward "
                        "model with an EOS appended)")
    ids, n_truncated = [], 0
    for record in read_prompts(path):
        p = tokenizer.encode_prompt(record["prompt"])
        if len(p) > max_prompt_len:
            if not truncate:
                raise UserError(f"{record['where']}: field 'prompt': {len(p)} tokens, but the context leaves room for "
                                f"{max_prompt_len} beside --max-new-tokens; shorten it or pass --truncate-prompts")
            p, n_truncated = p[-max_prompt_len:], n_truncated + 1
        ids.append(p)
    return Prompts(ids, n_truncated)


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    """A batch of sampled responses and everything PPO computes about them. B rows, P prompt columns, N response
    columns; the prompt is left-padded, the response right-padded (PAD and mask 0 after its end)."""

    ids: torch.Tensor  # (B, P + N) prompt + response
    mask: torch.Tensor  # (B, P + N) 1 on real tokens
    response: torch.Tensor  # (B, N)
    response_mask: torch.Tensor  # (B, N) 1 up to and including the response's last token (EOS or stop token)
    prompt_len: int  # P
    logp: Optional[torch.Tensor] = None  # (B, N) policy log-probs at sampling time ("old")
    values: Optional[torch.Tensor] = None  # (B, N) value estimates at sampling time
    advantages: Optional[torch.Tensor] = None  # (B, N)
    returns: Optional[torch.Tensor] = None  # (B, N)

    def rows(self, index: torch.Tensor) -> "Rollout":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def cut_after_token(response: torch.Tensor, response_mask: torch.Tensor, token_id: int, pad_id: int):
    """End each response at the first real occurrence of ``token_id`` (kept): later tokens become PAD with mask 0.
    Returns (response, response_mask, cut (B,) bool)."""
    hit = (response == token_id) & response_mask.bool()  # (B, N)
    after = (hit.long().cumsum(1) - hit.long()) > 0  # strictly after the first hit
    return response.masked_fill(after, pad_id), response_mask.masked_fill(after, 0), hit.any(1)


def scoring_input(rollout: Rollout, append_eos: torch.Tensor, eos_id: int, pad_id: int):
    """prompt + response ids and mask for the reward model, with EOS appended to the rows in ``append_eos`` (responses
    cut at the stop token: the reward model was trained to read its score at an EOS)."""
    if not append_eos.any():
        return rollout.ids, rollout.mask
    B = rollout.ids.shape[0]
    ids = torch.cat([rollout.ids, torch.full((B, 1), pad_id, device=rollout.ids.device)], 1)  # (B, P + N + 1)
    mask = torch.cat([rollout.mask, torch.zeros((B, 1), dtype=rollout.mask.dtype, device=rollout.mask.device)], 1)
    end = rollout.prompt_len + rollout.response_mask.sum(1)  # (B,) first free column of each row
    rows = torch.nonzero(append_eos).squeeze(1)
    ids[rows, end[rows]] = eos_id
    mask[rows, end[rows]] = 1
    return ids, mask


def chunked_forward(fn, rollout: Rollout, chunk: int, grad: bool = False):
    """Apply ``fn`` to the rollout in row chunks of the training micro-batch size and concatenate the outputs: the
    rollout's log-probs then come from exactly the shapes (and code) the training forward uses (pitfall 5). Without
    autograd unless ``grad`` (the outputs then keep their graph)."""
    with torch.set_grad_enabled(grad):
        outs = [fn(rollout.rows(torch.arange(i, min(i + chunk, len(rollout.ids)), device=rollout.ids.device)))
                for i in range(0, len(rollout.ids), chunk)]
        return [torch.cat(parts) for parts in zip(*outs)] if isinstance(outs[0], tuple) else torch.cat(outs)
