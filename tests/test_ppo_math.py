"""The PPO math of minirlhf/ppo.py against hand-worked numbers and plain-loop references (pitfalls 3, 5, 6, 7, 11)."""
import math

import pytest
import torch

from minirlhf.ppo import (AdaptiveKLController, FixedKLController, compute_gae,
                          explained_variance, kl_estimate, masked_mean, masked_var, policy_loss,
                          token_rewards, value_loss, whiten)

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton cases: compiled on a GPU, interpreted on CPU


def assert_near(a, b, **tol):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               **(tol or TOL))


# ---------------------------------------------------------------------------------------------------------------------
# Masked statistics and whitening


def test_masked_mean_and_var_ignore_masked_garbage():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), -7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert_near(masked_mean(x, mask), 2.0)
    assert_near(masked_var(x, mask), 2.0 / 3.0)  # biased: ((1-2)^2 + 0 + (3-2)^2) / 3
    assert_near(masked_mean(x, mask, dim=1), [1.5, 3.0])


def test_whiten_hand_worked_with_and_without_mean_shift():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    s = math.sqrt(2.0 / 3.0 + 1e-8)  # biased variance of 1, 2, 3
    assert_near(whiten(x, mask), [[-1 / s, 0.0, 1 / s, 0.0]])
    assert_near(whiten(x, mask, shift_mean=False), [[2 - 1 / s, 2.0, 2 + 1 / s, 0.0]])  # keeps the mean 2


def test_whiten_statistics_on_random_masked_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g) * 3 + 2
    mask = (torch.rand(5, 7, generator=g) > 0.3).long()
    w = whiten(x, mask)
    assert_near(masked_mean(w, mask), 0.0, atol=1e-5, rtol=0)
    assert_near(masked_var(w, mask), 1.0, atol=1e-5, rtol=0)
    kept = whiten(x, mask, shift_mean=False)
    assert_near(masked_mean(kept, mask), masked_mean(x, mask), atol=1e-5, rtol=0)
    assert (w[mask == 0] == 0).all() and (kept[mask == 0] == 0).all()


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert_near(explained_variance(returns, returns, mask), 1.0)
    assert_near(explained_variance(torch.full_like(returns, 2.0), returns, mask), 0.0)  # predicting the mean


# ---------------------------------------------------------------------------------------------------------------------
# Log-probs and entropy


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_logprobs_against_a_loop_with_temperature_and_masked_pad(impl):
    """GPT.token_logprobs' two implementations (fp32 reference, fused Triton kernel under the interpreter) against
    log-softmax written out by hand."""
    from kernels.lm_head_logprobs import lm_head_logprobs

    g = torch.Generator().manual_seed(1)
    B, N, d, V, T = 2, 3, 4, 5, 0.7
    h, W = torch.randn(B, N, d, generator=g), torch.randn(V, d, generator=g)
    targets = torch.tensor([[1, 4, 0], [2, 3, V]])  # V = PAD: not a class, must be masked
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logp, ent = (t.cpu() for t in lm_head_logprobs(h.to(DEVICE), W.to(DEVICE), targets.to(DEVICE), temperature=T,
                                                   mask=mask.to(DEVICE), return_entropy=True, impl=impl))
    for b in range(B):
        for t in range(N):
            if not mask[b, t]:
                assert logp[b, t] == 0 and ent[b, t] == 0
                continue
            z = [sum(h[b, t, k].item() * W[v, k].item() for k in range(d)) / T for v in range(V)]
            lse = math.log(sum(math.exp(zi) for zi in z))
            assert_near(logp[b, t], z[targets[b, t]] - lse)
            assert_near(ent[b, t], -sum(math.exp(zi - lse) * (zi - lse) for zi in z))


def test_model_logprob_impls_agree(monkeypatch):
    """The switch ``GPTConfig.logprob_impl`` changes how, not what: torch and triton give the same log-probs and
    gradients for a tiny GPT, and "triton" really launches the fused kernel's forward and backward (spies)."""
    from kernels import lm_head_logprobs
    from minirlhf.model import GPT, GPTConfig
    from test_model_triton_attention import count_calls

    launches = [count_calls(monkeypatch, lm_head_logprobs, name) for name in ("_lm_head_fwd", "_lm_head_bwd")]
    out = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=70, n_positions=16, n_layer=1, n_head=2, n_embd=16, logprob_impl=impl,
                          attn_impl="torch")).to(DEVICE)
        ids = torch.randint(0, 70, (2, 6), generator=torch.Generator().manual_seed(2)).to(DEVICE)
        h = m.hidden_states(ids)[:, :-1]
        logp, ent = m.token_logprobs(h, ids[:, 1:], temperature=0.7, return_entropy=True)
        (logp.sum() + 0.5 * ent.sum()).backward()
        out[impl] = (logp.detach().cpu(), ent.detach().cpu(), m.transformer.wte.weight.grad.cpu())
        assert [len(calls) for calls in launches] == ([0, 0] if impl == "torch" else [1, 1])
    for a, b in zip(out["torch"], out["triton"]):
        assert_near(b, a, rtol=1e-4, atol=1e-5)


def test_model_logprobs_are_fp32_under_bf16_autocast_and_batch_invariant():
    """Pitfall 5: GPT.token_logprobs turns autocast off, so under bf16 autocast it returns the fp32 result bit for
    bit (logits of a few tens, where bf16 rounding would move log-probs by ~0.1), and a row's log-probs do not depend
    on the rows beside it: a batch of 8 and its first 2 rows agree exactly, as a rollout and a training micro-batch
    must for the first PPO ratio to be 1."""
    from minirlhf.model import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=300, n_positions=16, n_layer=1, n_head=2, n_embd=32, logprob_impl="torch",
                      attn_impl="torch"))
    ids = torch.randint(0, 300, (8, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m.transformer.wte.weight.mul_(100)
        h, targets = m.hidden_states(ids)[:, :-1], ids[:, 1:]  # fp32 (8, 6, 32)
        fp32 = m.token_logprobs(h, targets, temperature=0.7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            batch8 = m.token_logprobs(h, targets, temperature=0.7)
            batch2 = m.token_logprobs(h[:2], targets[:2], temperature=0.7)
            bf16_logits = h @ m.lm_head_weight.T  # what autocast would have done to the LM head
    assert bf16_logits.dtype == torch.bfloat16 and fp32.min() < -5
    assert batch8.dtype == torch.float32 and torch.equal(batch8, fp32)
    assert torch.equal(batch2, batch8[:2])
    leaked = torch.log_softmax(bf16_logits.float() / 0.7, -1).gather(-1, targets[..., None])[..., 0]
    assert (leaked - fp32).abs().max() > 1e-2  # (the check can fail: bf16 logits give other log-probs)


# ---------------------------------------------------------------------------------------------------------------------
# KL estimators and controllers


def test_kl_estimators_hand_worked():
    logp, ref = torch.tensor([math.log(0.2)]), torch.tensor([math.log(0.5)])  # r = log 0.4, rho = pi_ref/pi = 2.5
    r = math.log(0.4)
    assert_near(kl_estimate(logp, ref, "k1"), [r])
    assert_near(kl_estimate(logp, ref, "k2"), [0.5 * r * r])
    assert_near(kl_estimate(logp, ref, "k3"), [2.5 - 1 - math.log(2.5)])
    assert_near(kl_estimate(torch.tensor([50.0]), torch.tensor([0.0]), "k1", clamp=20.0), [20.0])  # clamped log-ratio


def test_k1_and_k3_are_unbiased_k2_k3_nonnegative():
    """Averaged over tokens drawn from pi (exactly: weighted by pi), k1 and k3 give KL(pi || pi_ref)."""
    g = torch.Generator().manual_seed(2)
    logp = torch.log_softmax(torch.randn(50, generator=g), 0)
    ref = torch.log_softmax(torch.randn(50, generator=g), 0)
    true_kl = (logp.exp() * (logp - ref)).sum()
    for kind in ("k1", "k3"):
        assert_near((logp.exp() * kl_estimate(logp, ref, kind)).sum(), true_kl)
    for kind in ("k2", "k3"):
        assert (kl_estimate(logp, ref, kind) >= 0).all()
    assert_near(kl_estimate(torch.tensor([1e-4]), torch.tensor([0.0]), "k3"), [0.5e-8], rtol=1e-3, atol=0)  # no cancel


def test_adaptive_kl_controller_hand_worked():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=64)  # KL twice the target: error clipped to +0.2
    assert_near(ctl.value, 0.1 * (1 + 0.2 * 64 / 10000))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(5.4, n_steps=100)  # 10% under target: error -0.1
    assert_near(ctl.value, 0.1 * (1 - 0.1 * 100 / 10000))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(0.0, n_steps=100)  # far under: clipped to -0.2
    assert_near(ctl.value, 0.1 * (1 - 0.2 * 100 / 10000))
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 64)
    assert fixed.value == 0.3


def test_token_rewards_score_at_last_real_token():
    score = torch.tensor([2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert_near(token_rewards(score, kl, mask, kl_coef=0.5), [[-0.05, -0.1, -0.15 + 2.0], [-0.2, -0.25 + 3.0, 0.0]])


# ---------------------------------------------------------------------------------------------------------------------
# GAE


def gae_reference(rewards, values, mask, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over each row's real tokens, delta_t = r_t + gamma V_{t+1} - V_t with
    V = 0 after the last real token; plain Python lists."""
    B, N = rewards.shape
    adv = [[0.0] * N for _ in range(B)]
    for b in range(B):
        L = int(mask[b].sum())
        r, v = rewards[b].tolist()[:L], values[b].tolist()[:L] + [0.0]
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(L)]
        for t in range(L):
            adv[b][t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(L - t))
    return torch.tensor(adv)


def test_gae_hand_worked_4_tokens():
    # row 0: 3 real tokens, then garbage after EOS; row 1: 4 real tokens, gamma 0.5 and lambda 1 = discounted returns
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.25, 0.5, 9.0]])
    adv, ret = compute_gae(rewards, values, torch.tensor([[1, 1, 1, 0]]), gamma=1.0, lam=0.5)
    assert_near(adv, [[0.0, 0.5, 0.5, 0.0]])
    assert_near(ret, [[0.5, 0.75, 1.0, 0.0]])
    adv, ret = compute_gae(torch.tensor([[1.0, 0.0, 0.0, 2.0]]), torch.ones(1, 4), torch.ones(1, 4), gamma=0.5, lam=1.0)
    assert_near(adv, [[0.25, -0.5, 0.0, 1.0]])
    assert_near(ret, [[1.25, 0.5, 1.0, 2.0]])  # 1 + 0.5^3 * 2, 0.5^2 * 2, 0.5 * 2, 2


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_plain_loop(gamma, lam):
    g = torch.Generator().manual_seed(4)
    B, N = 6, 9
    rewards, values = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    lengths = torch.tensor([9, 1, 4, 7, 2, 5])
    mask = (torch.arange(N)[None] < lengths[:, None]).long()
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref = gae_reference(rewards, values, mask, gamma, lam)
    assert_near(adv, ref)
    assert_near(ret, (ref + values) * mask)


# ---------------------------------------------------------------------------------------------------------------------
# Policy and value losses


def test_policy_loss_clipping_hand_worked():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.5, 50.0]])  # the last token is masked (after EOS)
    old = torch.zeros(1, 5)
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip=0.2)
    # per token max(-A rho, -A clip(rho)): -1.2 (clipped), -0.5, 1.1, 0.8 (clipped)
    assert_near(loss, (-1.2 - 0.5 + 1.1 + 0.8) / 4)
    assert_near(stats["clip_frac"], 0.5)
    assert_near(stats["ratio_mean"], (1.5 + 0.5 + 1.1 + 0.5) / 4)
    assert_near(stats["ratio_max"], 1.5)
    assert_near(stats["approx_kl_k2"], sum(0.5 * math.log(r) ** 2 for r in (1.5, 0.5, 1.1, 0.5)) / 4)
    assert_near(stats["approx_kl_k3"], sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 0.5)) / 4)
    loss.backward()
    # gradient -A rho / n where unclipped, 0 where the clip is active or masked
    assert_near(logp.grad, [[0.0, -0.5 / 4, 1.1 / 4, 0.0, 0.0]])


def test_policy_loss_ratio_one_gives_zero_kl_and_no_clipping():
    logp = torch.randn(3, 4)
    loss, stats = policy_loss(logp, logp.clone(), torch.randn(3, 4), torch.ones(3, 4), clip=0.2)
    assert stats["clip_frac"] == 0 and stats["approx_kl_k2"] == 0 and stats["approx_kl_k3"] == 0
    assert stats["ratio_max"] == 1 and stats["ratio_mean"] == 1


def test_value_loss_clipping_hand_worked():
    values = torch.tensor([[0.5, 0.1, 7.0]], requires_grad=True)
    old, returns = torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, torch.tensor([[1, 1, 0]]), clip=0.2)
    # token 0: clipped value 0.2 -> error 0.64 > 0.25 (clipped active); token 1: 1.21 both
    assert_near(loss, 0.5 * (0.64 + 1.21) / 2)
    assert_near(stats["value_clip_frac"], 0.5)
    loss.backward()
    assert_near(values.grad, [[0.0, 0.5 * 2 * 1.1 / 2, 0.0]])  # no gradient through the clipped term or masked token


def test_nothing_after_eos_reaches_losses_advantages_or_kl():
    """Pitfall 6: garbage after the end of a response changes no loss, gradient, advantage or KL."""
    g = torch.Generator().manual_seed(5)
    B, N = 3, 6
    mask = (torch.arange(N)[None] < torch.tensor([6, 2, 4])[:, None]).long()
    after = mask == 0
    base = {k: torch.randn(B, N, generator=g) for k in ("logp", "old", "ref", "adv", "values", "old_values", "ret",
                                                           "rewards")}
    garbage = {k: torch.where(after, torch.randn(B, N, generator=g) * 100, v) for k, v in base.items()}

    def everything(t):
        logp = t["logp"].clone().requires_grad_(True)
        values = t["values"].clone().requires_grad_(True)
        pl, _ = policy_loss(logp, t["old"], t["adv"], mask, 0.2)
        vl, _ = value_loss(values, t["old_values"], t["ret"], mask, 0.2)
        (pl + vl).backward()
        adv, ret = compute_gae(t["rewards"], t["values"], mask, 1.0, 0.95)
        kl = kl_estimate(t["logp"], t["ref"], "k3")
        kl_sum = torch.where(mask.bool(), kl, 0).sum(1)
        return pl, vl, logp.grad * mask, values.grad * mask, adv, ret, kl_sum, token_rewards(kl_sum, kl, mask, 0.1)

    for a, b in zip(everything(base), everything(garbage)):
        assert_near(a, b)


# ---------------------------------------------------------------------------------------------------------------------
# Edges: empty rows, a single token, the negative side of the clips


def test_masked_mean_of_nothing_is_zero_not_nan():
    """A row (or a whole tensor) without one real position averages to 0, as the docstring promises, instead of
    0 / 0 = NaN, which would poison every mean taken over it."""
    x = torch.tensor([[1.0, 3.0], [float("nan"), 5.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    assert_near(masked_mean(x, mask, dim=1), [2.0, 0.0])
    assert masked_mean(x, torch.zeros(2, 2)).item() == 0.0


def test_whiten_a_constant_gives_zero_advantages_and_keeps_the_mean():
    """One response of one token (or any constant batch) has variance 0: the epsilon in sqrt(var + 1e-8) makes the
    whitened advantages exactly 0 (what train_ppo.py's small-batch warning says) and the mean-keeping reward whitening
    return the mean, never 0 / 0 = NaN."""
    x, mask = torch.tensor([[2.5, 7.0]]), torch.tensor([[1, 0]])
    assert whiten(x, mask).tolist() == [[0.0, 0.0]]
    assert whiten(x, mask, shift_mean=False).tolist() == [[2.5, 0.0]]
    flat = torch.full((2, 3), -1.5)
    assert whiten(flat, torch.ones(2, 3), shift_mean=False).tolist() == [[-1.5] * 3] * 2


def test_kl_log_ratio_is_clamped_on_both_sides():
    """Pitfall 11: a token far less likely under the policy than under the reference (log-ratio -50) counts as -clamp
    in every estimator: k1 = -20, k2 = 200, k3 = e^20 - 1 - 20."""
    logp, ref = torch.tensor([-50.0]), torch.tensor([0.0])
    assert_near(kl_estimate(logp, ref, "k1", clamp=20.0), [-20.0])
    assert_near(kl_estimate(logp, ref, "k2", clamp=20.0), [200.0])
    assert_near(kl_estimate(logp, ref, "k3", clamp=20.0), [math.exp(20.0) - 21.0])


def test_value_loss_clips_a_move_downwards_too():
    """The value clip is symmetric: a value that fell 0.5 below its rollout estimate (clip 0.2) towards a return of
    -1 is scored as if it had fallen only 0.2 (error 0.8^2 = 0.64, larger than the unclipped 0.5^2 = 0.25), and gets
    no gradient; one that fell 0.1 is inside the range."""
    values = torch.tensor([[-0.5, -0.1]], requires_grad=True)
    loss, stats = value_loss(values, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2), clip=0.2)
    assert_near(loss, 0.5 * (0.64 + 1.21) / 2)
    assert_near(stats["value_clip_frac"], 0.5)
    loss.backward()
    assert_near(values.grad, [[0.0, 0.5 * 2 * (-1.1) / 2]])


def test_policy_loss_ratio_max_sees_only_real_tokens():
    """ratio_max is the largest ratio over the real tokens: a policy that made every real token less likely reports
    a value below 1 (masked positions, whose ratio is pinned to 1, do not count)."""
    logp = torch.log(torch.tensor([[0.5, 0.8, 1.0]]))
    _, stats = policy_loss(logp, torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([[1, 1, 0]]), clip=0.2)
    assert_near(stats["ratio_max"], 0.8)
    assert_near(stats["ratio_mean"], 0.65)
