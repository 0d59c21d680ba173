"""The mathematics of RLHF with PPO, as pure functions of tensors and masks, each tested alone (tests/test_ppo_math.py).

``train_ppo.py`` calls them in the order of the algorithm. Shapes: B responses of up to N tokens; ``mask`` (B, N) is 1
on the sampled tokens up to and including the first EOS and 0 after it (pitfall 6: nothing after EOS counts anywhere).

Log-probs (pitfall 3, 5). The hidden state at position t scores the token at t + 1; the sampling distribution was
``softmax(logits / temperature)``, so the log-probs of the sampled tokens divide the logits by the same temperature, in
fp32 (bf16 log-probs change with the batch shape, and then the PPO ratio is not 1 where it must be)::

    logp_t = log_softmax(h_t W^T / temperature)[a_t]                                  GPT.token_logprobs (model.py)

where a_t is the t-th response token and h_t the hidden state just before it (actor_critic.response_hidden).

Symbols, one meaning each: l_t the log-ratio to the reference, r_t the per-token reward, A_t the advantage, G_t the
return (the value target), rho_t the PPO ratio to the rollout policy. In the code and flags: beta = ``kl_coef``,
eps = ``--clip-range``, eps_v = ``--clip-range-value``, gamma = ``--gamma``, lambda = ``--lam``.

KL penalty (Schulman 2020, "Approximating KL divergence"), with the log-ratio l_t = logp_t - ref_logp_t clamped to
[-clamp, clamp] (pitfall 11): k1 = l (unbiased, can be negative), k2 = l^2 / 2 (biased, >= 0), k3 = exp(-l) - 1 + l
(unbiased, >= 0). Per-token reward (Ziegler et al. 2019, eq. 2; Stiennon et al. 2020): the reward model's score at the
last real token minus the KL penalty at every token::

    r_t = -beta * kl_t + [t == last] * score                                                  token_rewards

Only k1 makes the penalty's policy gradient the gradient of the KL: as a reward, kl_t is a constant that multiplies
grad log pi, and E[l grad log pi] = grad KL(pi || pi_ref) because E[grad log pi] = 0. k2 and k3 estimate the KL's
value well (k3 without bias, both with low variance), but E[k grad log pi] is not grad KL for them, so as rewards
they optimise a different penalty: log them to watch the KL, or know that the objective changed.

beta is fixed (:class:`FixedKLController`) or adapted towards a target KL (:class:`AdaptiveKLController`): Ziegler et
al. 2019 (section 2.2) write beta <- beta (1 + K_beta e) with e = clip(KL / target - 1, -0.2, 0.2) and K_beta = 0.1;
their code (lm-human-preferences) makes the step proportional to the episodes seen, beta <- beta (1 + e n / horizon),
n = episodes per batch, which is what runs here.

Advantages: generalised advantage estimation (Schulman et al. 2016) with the episode ending at the last real token::

    delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last real token is 0)
    A_t = delta_t + gamma * lambda * A_{t+1},      G_t = A_t + V_t                             compute_gae

A response cut by the token budget (no EOS) is treated as finished too, not bootstrapped from V: its score is the
missing-EOS penalty (train_ppo.py, by default), so the episode is over, as in lm-human-preferences. A true time limit
in RL would instead add gamma * V of the state after the cut.

Whitening (pitfall 7; "The N implementation details of RLHF with PPO", Huang et al. 2023): masked mean, biased variance,
``(x - mean) / sqrt(var + 1e-8)``; the rewards r_t are whitened before GAE keeping their mean (``shift_mean=False``),
the advantages after GAE without it.

PPO (Schulman et al. 2017), with the ratio rho_t = exp(logp_t - old_logp_t), averaged over the real tokens of a
minibatch. The losses to minimise (the policy loss is the negated clipped surrogate objective)::

    L_policy = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))                     policy_loss
    L_value  = 0.5 mean_t max((V_t - G_t)^2, (V_old_t + clip(V_t - V_old_t, -eps_v, eps_v) - G_t)^2)   value_loss

Log-probs come from ``GPT.token_logprobs``, which runs the fused Triton kernel ``kernels.lm_head_logprobs`` on CUDA
(never materialising the logits) and ``kernels.lm_head_logprobs_cpu`` elsewhere (one fp32 logits buffer, visited in
cache-sized row chunks); ``logprob_impl="torch"`` is the plain fp32 log-softmax both are tested against.
"""
from typing import Optional

import torch

from minirlhf.distributed import all_sum
from minirlhf.model import last_token_index

# ---------------------------------------------------------------------------------------------------------------------
# Masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None,
                across_ranks: bool = False) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1. Masked positions may hold anything (even inf or NaN); they
    are never read. With ``dim``, the mean along that dimension (0 where a row has no real position).
    ``across_ranks``: the mean over the masked positions of every torchrun rank, ``sum_r s_r / sum_r n_r`` (all-reduced
    sums and counts); alone the same as without."""
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros_like(x))
    if dim is None:
        s, n = total.sum(), keep.sum()
        if across_ranks:
            s, n = all_sum(s), all_sum(n)
        return s / n.clamp(min=1)
    return total.sum(dim) / keep.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, across_ranks: bool = False) -> torch.Tensor:
    """Biased (population) variance of ``x`` over the masked positions, as TensorFlow's ``tf.nn.moments`` computes it
    in lm-human-preferences (pitfall 7); two passes, each a :func:`masked_mean` (over every rank with
    ``across_ranks``)."""
    mean = masked_mean(x, mask, across_ranks=across_ranks)
    return masked_mean((x - mean) ** 2, mask, across_ranks=across_ranks)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           across_ranks: bool = False) -> torch.Tensor:
    """Scale the masked entries of ``x`` to unit variance; ``shift_mean`` also moves their mean to 0 (advantages),
    ``shift_mean=False`` keeps it (rewards: a positive reward stays positive on average). Masked entries become 0.
    ``across_ranks``: with the mean and variance of the whole batch, over every torchrun rank's rows."""
    mean, var = masked_mean(x, mask, across_ranks=across_ranks), masked_var(x, mask, across_ranks)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       across_ranks: bool = False) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked positions (of every rank with ``across_ranks``): 1 for
    a perfect value function, 0 for one that predicts the mean, negative for worse."""
    unexplained = masked_var(returns - values, mask, across_ranks)
    return 1 - unexplained / masked_var(returns, mask, across_ranks).clamp(min=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# KL penalty and rewards

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1", clamp: float = 20.0) -> torch.Tensor:
    """Per-token estimate ``kind`` (k1, k2 or k3: the module docstring defines them and says which to use) of
    KL(pi || pi_ref) from the log-probs of the sampled tokens, fp32, on the clamped log-ratio l."""
    log_ratio = (logp.float() - ref_logp.float()).clamp(-clamp, clamp)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio * log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # expm1: no cancellation when the log-ratio is small
    raise ValueError(f"kl estimator must be one of {', '.join(KL_ESTIMATORS)}, got {kind!r}")


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, N): ``-kl_coef * kl`` (-beta * kl_t) at every real token, plus the sequence ``score``
    (B,) at the last real token (the response's EOS when it has one); 0 after it."""
    keep = mask.bool()
    rewards = torch.where(keep, -kl_coef * kl, torch.zeros_like(kl))
    last = last_token_index(mask)  # (B,) the last real token
    return rewards.index_put((torch.arange(mask.shape[0], device=mask.device), last), score.to(rewards.dtype),
                             accumulate=True)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2, in the form of their code (lm-human-preferences): steer beta so that the KL per
    response approaches ``target``.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon), with n_steps the number of
    episodes since the last update (the batch size); the paper writes the step as K_beta * e with K_beta = 0.1. A KL
    above the target grows beta, below it shrinks beta; the clip bounds each update so one noisy batch cannot swing
    it."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# ---------------------------------------------------------------------------------------------------------------------
# Advantages


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses (B, N).

    The episode ends at each row's last real token: rewards and values after it are treated as 0, so V_{t+1} = 0 at
    the last real token and nothing after EOS leaks into earlier advantages. One reverse loop over N, vectorised over
    the batch.
    Returns ``(advantages, returns)``, both (B, N) and 0 on masked positions; ``returns = advantages + values``."""
    keep = mask.bool()
    rewards = torch.where(keep, rewards, torch.zeros_like(rewards)).float()
    values = torch.where(keep, values, torch.zeros_like(values)).float()
    B, N = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, device=rewards.device)  # V_{t+1}
    next_advantage = torch.zeros(B, device=rewards.device)  # A_{t+1}
    for t in reversed(range(N)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    returns = torch.where(keep, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------------------
# Losses


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), a masked mean over tokens. Returns ``(loss, stats)``; the stats
    (detached) are ``clip_frac`` (share of tokens where the clipped term is the active one), two estimates of
    KL(pi_old || pi) from the same tokens, ``approx_kl_k2`` = mean 0.5 (log rho)^2 and ``approx_kl_k3`` = mean
    (rho - 1) - log rho, and ``ratio_mean`` and ``ratio_max``."""
    keep = mask.bool()
    log_rho = torch.where(keep, logp - old_logp, torch.zeros_like(logp))  # masked: ratio 1, no inf/NaN gradients
    ratio = torch.exp(log_rho)  # (B, N) rho_t
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl_k2": masked_mean(0.5 * log_rho ** 2, mask),
            "approx_kl_k3": masked_mean(torch.expm1(log_rho) - log_rho, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(keep, ratio, torch.zeros_like(ratio)).max(),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (lm-human-preferences): the new value may move at most ``clip`` from the rollout's value
    before the loss stops rewarding the move; 0.5 * masked mean of the larger squared error. Returns ``(loss, stats)``
    with ``value_clip_frac`` (share of tokens where the clipped error is the larger)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((err_clipped > err).float(), mask)}
    return loss, stats
