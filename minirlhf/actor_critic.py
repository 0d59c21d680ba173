"""The models of PPO for language models: the trainable actor-critic (the policy and its value function), the
frozen reference, and the reward (a reward model, or a Python function on the decoded strings).

Every model runs in eval mode with dropout 0 (pitfall 4), the policy included, so that rollout and training compute
log-probs by the same code path. The log-prob of a response token is read from the hidden state of the position
before it (pitfall 3: the state at t scores the token at t + 1), by :meth:`minirlhf.model.GPT.token_logprobs`, which
writes out the definition ``log_softmax(logits / T).gather(token)`` and swaps in the Triton kernel at one marked place.
"""
import copy
import pathlib
from typing import Optional

import torch
import torch.nn as nn

from kernels.kl import full_kl
from minirlhf.checkpoint import load_policy, load_reward_model
from minirlhf.config import UserError, load_function
from minirlhf.model import GPT, ScalarHead
from minirlhf.rollout import Rollout

# ---------------------------------------------------------------------------------------------------------------------
# The policy, its value function and the reference


def response_hidden(model: GPT, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Hidden states (B, N, d) at the positions that predict the N response tokens: prompt_len - 1 ... end - 1
    (the state at t scores the token at t + 1; pitfall 3)."""
    return model.hidden_states(ids, mask)[:, prompt_len - 1:-1]


class ActorCritic(nn.Module):
    """The policy (a GPT) and its value function: a scalar head on the policy's own hidden states, or on a separate
    critic trunk. One forward gives, for the response tokens of prompt + response sequences, their log-probs (fp32,
    logits / temperature), the policy's entropy there, and the values V(s_t) of the states that precede them."""

    def __init__(self, policy: GPT, critic: Optional[GPT] = None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head = ScalarHead(policy.config.n_embd if critic is None else critic.config.n_embd, init="value")

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int, response: torch.Tensor,
                response_mask: torch.Tensor, temperature: float):
        h = response_hidden(self.policy, ids, mask, prompt_len)  # (B, N, d)
        logp, entropy = self.policy.token_logprobs(h, response, temperature=temperature, mask=response_mask,
                                                   return_entropy=True)  # (B, N) each
        hv = h if self.critic is None else response_hidden(self.critic, ids, mask, prompt_len)
        values = self.value_head(hv).float()  # (B, N)
        return logp, entropy, values


def reference_logprobs(ref: GPT, b: Rollout, temperature: float) -> torch.Tensor:
    """log pi_ref of the response tokens (B, N), fp32, by the same code path as the policy's (ActorCritic.forward)."""
    return ref.token_logprobs(response_hidden(ref, b.ids, b.mask, b.prompt_len), b.response, temperature=temperature,
                              mask=b.response_mask)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def exact_kl(policy: GPT, reference: GPT, b: Rollout, temperature: float, rows: int = 512) -> torch.Tensor:
    """The per-token KL over the whole vocabulary, (B, N) fp32, 0 after each response's end (``--exact-kl``):

        KL_t = sum_v p_v (log p_v - log q_v),   p = softmax(logits_t / T) of the policy, q the reference's

    at every response position t: what k1, k2 and k3 estimate from the one token sampled there (Schulman 2020), so the
    logged ``kl_exact`` shows how far the estimate in the reward is from it. A diagnostic, off by default: it runs
    both trunks again and makes both models' logits for the real response positions, ``rows`` at a time, for
    ``kernels/kl.py: full_kl``, which takes logits (its PyTorch reference holds a few more rows x V tensors while it
    works than the Triton kernel). With --top-k / --top-p the tokens come from a truncated distribution, so the
    estimators' expectation is no longer this KL."""
    live = b.response_mask.flatten().nonzero()[:, 0]  # (M,) real response positions of the flattened (B*N,)
    h = response_hidden(policy, b.ids, b.mask, b.prompt_len).flatten(0, 1)[live]  # (M, d)
    h_ref = response_hidden(reference, b.ids, b.mask, b.prompt_len).flatten(0, 1)[live]  # (M, d)
    kl = torch.zeros(b.response_mask.numel(), device=h.device)  # (B*N,)
    for i in range(0, len(live), rows):
        logits, ref_logits = policy.fp32_logits(h[i:i + rows]), reference.fp32_logits(h_ref[i:i + rows])  # (rows, V)
        kl[live[i:i + rows]] = full_kl(logits, ref_logits, temperature=temperature,
                                       impl="triton" if policy.logprob_kernel_impl(h) == "triton" else "torch")
    return kl.view(b.response_mask.shape)


# ---------------------------------------------------------------------------------------------------------------------
# The reward, and loading all four models


class RewardModelScorer:
    """Scores with a reward model (its normalised output) at the last real token of prompt + response."""

    def __init__(self, rm, path: str):
        self.rm, self.path = rm, path

    def __call__(self, ids, mask, prompts, responses) -> torch.Tensor:
        scores = self.rm(ids, mask).float()
        bad = (~torch.isfinite(scores)).nonzero()[:, 0].tolist()
        if bad:
            raise UserError(f"--reward {self.path}: the reward model gave non-finite scores to {len(bad)} of "
                            f"{len(scores)} responses (the first: {prompts[bad[0]]!r} + {responses[bad[0]]!r}); its "
                            "weights or its gain and bias are broken: retrain it")
        return scores


class FunctionScorer:
    """Scores with a user's Python function on the decoded strings (programmatic rewards)."""

    def __init__(self, fn, spec: str):
        self.fn, self.spec = fn, spec

    def __call__(self, ids, mask, prompts, responses) -> torch.Tensor:
        scores = self.fn(list(prompts), list(responses))
        try:
            out = torch.tensor([float(s) for s in scores], dtype=torch.float32, device=ids.device)
        except (TypeError, ValueError) as e:
            raise UserError(f"--reward {self.spec}: must return a list of numbers ({e})") from e
        if out.shape != (len(responses),):
            raise UserError(f"--reward {self.spec}: returned {out.numel()} scores for {len(responses)} responses")
        if not torch.isfinite(out).all():
            raise UserError(f"--reward {self.spec}: returned a non-finite score ({out.tolist()})")
        return out


def load_models(cfg, device: torch.device):
    """(actor_critic, reference, scorer, tokenizer, reward_model_or_None) from train_ppo.py's flags (--policy,
    --reward, --critic, the kernel choices), every model with dropout 0 (pitfall 4)."""
    impls = dict(dropout=0.0, attn_impl=cfg.attn_impl, logprob_impl=cfg.logprob_impl)
    policy, tokenizer = load_policy(cfg.policy, **impls)
    reference = freeze(load_policy(cfg.policy, **impls)[0])
    rm = None
    if pathlib.Path(cfg.reward).exists():
        rm, rm_tokenizer = load_reward_model(cfg.reward, **impls)
        if rm_tokenizer.vocab_size != tokenizer.vocab_size:  # every gpt2-<N> is a prefix of the same BPE ranks
            raise UserError(f"--reward {cfg.reward}: tokenizer {rm_tokenizer.name!r} ({rm_tokenizer.vocab_size} "
                            f"tokens) differs from the policy's {tokenizer.name!r} ({tokenizer.vocab_size}); the "
                            "reward model must read the policy's token ids")
        scorer = RewardModelScorer(freeze(rm).to(device), cfg.reward)
    elif ":" in cfg.reward:
        scorer = FunctionScorer(load_function(cfg.reward, "--reward"), cfg.reward)
    else:
        raise UserError(f"--reward {cfg.reward}: no such reward model checkpoint (or give a function as "
                        "module:function)")
    if cfg.critic == "separate" and rm is None:
        raise UserError("--critic separate initialises the critic from the reward model checkpoint; with a reward "
                        "function use --critic shared")
    critic = copy.deepcopy(rm.gpt).requires_grad_(True) if cfg.critic == "separate" else None
    actor_critic = ActorCritic(policy, critic).eval()  # eval throughout: rollout and training share one code path
    return actor_critic.to(device), reference.to(device), scorer, tokenizer, rm
