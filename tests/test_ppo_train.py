"""train_ppo.py end to end on tiny models (CPU, fp32): the loop's steps 3-6 against a recomputation written out here
(log-probs / temperature, values, KL penalty, whitening, GAE, one PPO step, the adaptive KL rule), ratio 1 on the
first minibatch (also through the Triton kernels under the interpreter), reference == policy before any update,
dropout off, the missing-EOS penalty, learning with a programmatic reward (and staying put under a large KL
coefficient), exact resume, input errors, and the chain SFT + RM checkpoints -> train_ppo.py -> generate.py."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_ppo
from minirlhf.checkpoint import load_policy, load_reward_model, save_checkpoint
from minirlhf.config import UserError, parse_args
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.ppo import masked_mean, policy_loss, value_loss
from minirlhf.tokenizer import get_tokenizer, pad_sequences
from test_model_triton_attention import count_calls
from minirlhf.actor_critic import ActorCritic, FunctionScorer, exact_kl, load_models, reference_logprobs
from minirlhf.rollout import Prompts, Rollout, chunked_forward, cut_after_token, load_prompts, scoring_input
from minirlhf.run import OptimizerStep
from train_ppo import Config

V, EOS, PAD = 300, 299, 300  # tokenizer "gpt2-299": 299 BPE ranks + EOS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["the cat sat", "a dog is", "hello there", "we went to", "it was", "so", "the end of the", "once upon a"]
REWARDS_PY = '''
def lowercase_share(prompts, responses):
    """Share of the response's characters that are ASCII lowercase letters (a dense programmatic reward)."""
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]


def constant(prompts, responses):
    return [5.0] * len(responses)
'''


def tiny_config(**kw) -> GPTConfig:
    return GPTConfig(vocab_size=V, n_positions=64, n_layer=2, n_head=2, n_embd=32, tokenizer="gpt2-299", **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An SFT checkpoint, a reward-model checkpoint, a prompt file and a reward-function file."""
    d = tmp_path_factory.mktemp("ppo")
    torch.manual_seed(0)
    save_checkpoint(d / "sft", GPT(tiny_config()), stage="sft", config=tiny_config())
    rm = RewardModel(GPT(tiny_config()))
    rm.gain.fill_(2.0)
    save_checkpoint(d / "rm", rm, stage="rm", config=tiny_config())
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (d / "ppo_test_rewards.py").write_text(REWARDS_PY)
    return d


def make_config(files, out, **kw) -> Config:
    base = dict(policy=str(files / "sft"), reward=str(files / "rm"), prompts=str(files / "prompts.jsonl"),
                out=str(out), steps=1, batch_size=8, max_new_tokens=6, sample_every=0, save_every=0, device="cpu",
                lr=1e-3)
    return Config(**{**base, **kw})


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


# ---------------------------------------------------------------------------------------------------------------------
# Pieces of the loop


def test_cut_after_stop_token_and_scoring_input_with_eos():
    S = 13  # stop token
    response = torch.tensor([[5, S, 7, 8], [5, 6, EOS, PAD], [S, EOS, PAD, PAD], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    r, m, cut = cut_after_token(response, mask, S, PAD)
    assert r.tolist() == [[5, S, PAD, PAD], [5, 6, EOS, PAD], [S, PAD, PAD, PAD], [1, 2, 3, 4]]
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert cut.tolist() == [True, False, True, False]
    prompt = torch.tensor([[PAD, 9], [9, 9], [PAD, 9], [PAD, 9]])
    pmask = (prompt != PAD).long()
    batch = Rollout(torch.cat([prompt, r], 1), torch.cat([pmask, m], 1), r, m, prompt_len=2)
    ids, smask = scoring_input(batch, cut, EOS, PAD)
    assert ids[0].tolist() == [PAD, 9, 5, S, EOS, PAD, PAD] and smask[0].tolist() == [0, 1, 1, 1, 1, 0, 0]
    assert ids[2].tolist() == [PAD, 9, S, EOS, PAD, PAD, PAD]
    assert ids[1].tolist() == [9, 9, 5, 6, EOS, PAD, PAD]  # already ended at EOS: unchanged
    assert ids[3].tolist() == [PAD, 9, 1, 2, 3, 4, PAD] and smask[3].tolist() == [0, 1, 1, 1, 1, 1, 0]


def test_reference_equals_policy_and_dropout_is_off(files, tmp_path):
    """Pitfall 4 and 5: a checkpoint trained with dropout 0.1 is loaded with dropout 0 everywhere; two forwards give
    identical log-probs, and before any update the reference gives the policy's (to fp32 rounding: the two copies'
    weights live in different buffers, and CPU BLAS results can differ in the last bit between buffers)."""
    noisy = tiny_config(dropout=0.1)
    save_checkpoint(tmp_path / "sft_dropout", GPT(noisy), stage="sft", config=noisy)
    cfg = make_config(files, tmp_path / "out", policy=str(tmp_path / "sft_dropout"), critic="separate")
    actor_critic, reference, scorer, tokenizer, rm = load_models(cfg, torch.device("cpu"))
    for model in (actor_critic, reference, rm):
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        assert not model.training
    ids, mask = pad_sequences(tokenizer.encode_batch(["the cat sat on", "hello there"]), PAD, side="left")
    response, response_mask = ids[:, -2:], mask[:, -2:]
    args = (ids, mask, ids.shape[1] - 2, response, response_mask, 0.7)
    with torch.no_grad():
        logp, _, values = actor_critic(*args)
        assert torch.equal(logp, actor_critic(*args)[0])
        b = Rollout(ids, mask, response, response_mask, ids.shape[1] - 2)
        torch.testing.assert_close(reference_logprobs(reference, b, 0.7), logp, rtol=0, atol=1e-6)
    assert (values == 0).all()  # zero-initialised value head (pitfall 8)


def test_first_minibatch_ratio_is_exactly_one(files, tmp_path, monkeypatch):
    """Pitfall 5: the rollout's log-probs are recomputed bit for bit by the first minibatch (several micro-batches,
    rows permuted), so the ratio there is 1, as logged and as policy_loss receives it (a spy records its inputs);
    later minibatches move (the check can fail); KL is 0 before any update."""
    calls = []  # per batch: (logp, old_logp, real tokens) of each policy_loss call, in order
    real_update, real_loss = train_ppo.ppo_update, train_ppo.policy_loss

    def update_spy(*args):
        calls.append([])
        return real_update(*args)

    def loss_spy(logp, old_logp, advantages, mask, clip):
        calls[-1].append((logp.detach().clone(), old_logp.clone(), mask.bool()))
        return real_loss(logp, old_logp, advantages, mask, clip)

    monkeypatch.setattr(train_ppo, "ppo_update", update_spy)
    monkeypatch.setattr(train_ppo, "policy_loss", loss_spy)
    cfg = make_config(files, tmp_path / "out", steps=2, num_minibatches=2, grad_accum=2, ppo_epochs=2, lr=1e-2,
                      adaptive_kl=False)
    train_ppo.main(cfg)
    m = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [r["first_ratio_dev"] for r in m] == [0.0, 0.0]
    assert [len(c) for c in calls] == [8, 8]  # 2 epochs x 2 minibatches x 2 micro-batches
    for batch_calls in calls:
        for logp, old_logp, keep in batch_calls[:2]:  # the micro-batches of the first minibatch
            assert torch.equal(logp[keep], old_logp[keep])
        assert not all(torch.equal(logp[keep], old_logp[keep]) for logp, old_logp, keep in batch_calls[2:])
    assert abs(m[0]["kl_k1"]) < 1e-5 and m[0]["kl_k3"] < 1e-10  # policy == reference on the first rollout
    assert m[1]["kl_k3"] > 0 and m[0]["ratio_max"] > 1.001  # training moved the policy


def test_cpu_bf16_keeps_the_first_ratio_exactly_one_and_close_to_fp32(files, tmp_path):
    """--cpu-bf16 (bf16 autocast of the trunks on CPU): log-probs stay fp32 and come from the same shapes at rollout
    and in training, so the first minibatch's ratio is still exactly 1 (pitfall 5); the run's statistics stay near
    the fp32 run's (same prompts, same seed: the sampled tokens may differ where bf16 moved a probability)."""
    runs = {}
    for name, cpu_bf16 in (("fp32", False), ("bf16", True)):
        cfg = make_config(files, tmp_path / name, steps=2, num_minibatches=2, cpu_bf16=cpu_bf16, critic="separate")
        train_ppo.main(cfg)
        runs[name] = read_jsonl(tmp_path / name / "metrics.jsonl")
    assert [r["first_ratio_dev"] for r in runs["bf16"]] == [0.0, 0.0]
    for fp32, bf16 in zip(runs["fp32"], runs["bf16"]):
        assert all(math.isfinite(bf16[k]) for k in ("policy_loss", "value_loss", "kl_k1", "entropy"))
        assert abs(bf16["entropy"] - fp32["entropy"]) < 0.05 * fp32["entropy"]


def test_triton_kernels_keep_the_first_ratio_exactly_one(files, tmp_path, monkeypatch):
    """Pitfall 5 on the kernel path (flash attention in training, the decode kernel while sampling, the fused LM-head
    log-probs; the Triton interpreter on CPU): the first minibatch's ratio is exactly 1 on both steps, and every
    kernel ran."""
    from kernels import lm_head_logprobs
    from test_model_triton_attention import attention_launches

    launches = {**attention_launches(monkeypatch), **{name: count_calls(monkeypatch, lm_head_logprobs, name)
                                                      for name in ("_lm_head_fwd", "_lm_head_bwd")}}
    cfg = make_config(files, tmp_path / "out", steps=2, batch_size=4, max_new_tokens=4, ppo_epochs=1,
                      num_minibatches=2, attn_impl="triton", logprob_impl="triton")
    train_ppo.main(cfg)
    assert [r["first_ratio_dev"] for r in read_jsonl(tmp_path / "out" / "metrics.jsonl")] == [0.0, 0.0]
    assert all(launches.values()), {k: len(v) for k, v in launches.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Steps 3-6 against a recomputation written out here


def logprobs_from_logits(model: GPT, batch: Rollout, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) of the sampled tokens, in float64 from the full forward's logits at the
    positions before each response token, 0 after the response's end: (B, N)."""
    P = batch.prompt_len
    with torch.no_grad():
        logits = model(batch.ids, batch.mask)[:, P - 1:-1].double() / temperature  # (B, N, V)
    targets = torch.where(batch.response_mask.bool(), batch.response, 0)  # PAD is not a class
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0] * batch.response_mask


def whiten_by_hand(rows: list[list[float]], keep_mean: bool) -> list[list[float]]:
    """(x - mean) / sqrt(var + 1e-8) over every real token of the batch (biased variance), + mean if keep_mean."""
    flat = [x for row in rows for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / len(flat) + 1e-8)
    return [[(x - mean) / std + (mean if keep_mean else 0.0) for x in row] for row in rows]


def advantages_by_hand(score, logp, ref_logp, values, mask, kl_coef, kl, gamma, lam):
    """Steps 4-5 over Python floats, each row up to its last real token: reward -kl_coef * kl(log-ratio) at every
    token plus the score at the last, whitened keeping the mean; GAE with V = 0 after the end; returns = A + V; the
    advantages whitened. Returns (advantages, returns) as lists of rows."""
    n = mask.sum(1).tolist()
    logp, ref_logp, values = ([x[b, :n[b]].tolist() for b in range(len(n))] for x in (logp, ref_logp, values))
    rewards = [[-kl_coef * kl(a - r) for a, r in zip(row, ref_row)] for row, ref_row in zip(logp, ref_logp)]
    for row, s in zip(rewards, score.tolist()):
        row[-1] += s
    advantages, returns = [], []
    for r, v in zip(whiten_by_hand(rewards, keep_mean=True), values):
        a, next_a, next_v = [0.0] * len(r), 0.0, 0.0
        for t in reversed(range(len(r))):
            next_a = r[t] + gamma * next_v - v[t] + gamma * lam * next_a
            a[t], next_v = next_a, v[t]
        advantages.append(a)
        returns.append([x + y for x, y in zip(a, v)])
    return whiten_by_hand(advantages, keep_mean=False), returns


def assert_rows_close(actual: torch.Tensor, rows: list[list[float]], atol: float) -> None:
    """``actual`` (B, N) equals ``rows`` on each row's real tokens and is 0 after them."""
    for b, row in enumerate(rows):
        torch.testing.assert_close(actual[b, :len(row)].double(), torch.tensor(row, dtype=torch.float64), rtol=0,
                                   atol=atol, msg=lambda m: f"row {b}: {m}")
        assert (actual[b, len(row):] == 0).all()


def test_rollout_logprobs_values_and_advantages_against_a_recomputation(files, tmp_path, monkeypatch):
    """Steps 2-5 on the second batch (the policy has moved off the reference, so the KL penalty counts), with
    non-default temperature, KL coefficient and estimator (k3), gamma and lambda, against what the test recomputes:
    log-probs of the sampled tokens from the full forward's logits / temperature (the policy before the update, and
    the starting checkpoint as reference), values from the value head at the states before each token, the reward
    model's score, and advantages and returns from a plain-Python GAE on rewards whitened with their mean kept,
    advantages whitened after."""
    T, kl_coef, gamma, lam = 0.6, 0.3, 0.9, 0.8
    cfg = make_config(files, tmp_path / "out", steps=2, lr=1e-2, temperature=T, adaptive_kl=False, kl_coef=kl_coef,
                      kl_estimator="k3", gamma=gamma, lam=lam, penalize_missing_eos=False)
    start, _ = load_policy(cfg.policy)  # the frozen reference
    rm, _ = load_reward_model(cfg.reward)
    seen, real_update = [], train_ppo.ppo_update

    def spy(actor_critic, optimizer, batch, *args):
        policy, P = actor_critic.policy, batch.prompt_len
        with torch.no_grad():  # before this update: the weights that sampled the batch
            values = actor_critic.value_head(policy.hidden_states(batch.ids, batch.mask))[:, P - 1:-1]
        seen.append((batch, logprobs_from_logits(policy, batch, T), values))
        return real_update(actor_critic, optimizer, batch, *args)

    monkeypatch.setattr(train_ppo, "ppo_update", spy)
    train_ppo.main(cfg)
    batch, logp, values = seen[1]
    keep = batch.response_mask.bool()
    torch.testing.assert_close(batch.logp.double(), logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(batch.values[keep], values[keep], rtol=0, atol=1e-6)
    assert values[keep].abs().max() > 1e-3  # the value head has left its zero initialisation
    ref_logp = logprobs_from_logits(start, batch, T)
    assert (logp - ref_logp)[keep].abs().max() > 0.1  # the KL penalty is not negligible
    with torch.no_grad():
        score = rm(batch.ids, batch.mask)  # every response scored (--no-penalize-missing-eos)
    advantages, returns = advantages_by_hand(score, logp, ref_logp, batch.values, batch.response_mask, kl_coef,
                                             lambda r: math.exp(-r) - 1 + r, gamma, lam)
    assert_rows_close(batch.advantages, advantages, atol=1e-4)
    assert_rows_close(batch.returns, returns, atol=1e-4)


def test_adaptive_kl_coefficient_follows_the_controller(files, tmp_path):
    """beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon) after each step, with KL the batch mean of the
    per-response sum of the estimator the reward penalised (k3 here) and n the batch size. Step 1's KL is 0 (policy =
    reference), whose error the clip hides, so a first run measures step 2's KL and the second run sets the target
    10% below it: an unclipped error of +0.1."""
    kw = dict(kl_estimator="k3", kl_horizon=50, lr=1e-2)
    train_ppo.main(make_config(files, tmp_path / "probe", steps=2, **kw))
    kl_step2 = read_jsonl(tmp_path / "probe" / "metrics.jsonl")[1]["kl_k3"]
    assert kl_step2 > 1e-2
    target = kl_step2 / 1.1
    train_ppo.main(make_config(files, tmp_path / "out", steps=3, kl_target=target, **kw))
    m = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert m[1]["kl_k3"] == kl_step2  # steps 1-2 do not depend on the target (step 1's error is clipped)
    beta = 0.15
    for before, after in zip(m, m[1:]):
        assert before["kl_coef"] == pytest.approx(beta, rel=1e-12)
        beta *= 1 + min(max(before["kl_k3"] / target - 1, -0.2), 0.2) * 8 / 50
    assert m[2]["kl_coef"] == pytest.approx(beta, rel=1e-12)
    assert m[2]["kl_coef"] == pytest.approx(m[1]["kl_coef"] * (1 + 0.1 * 8 / 50), rel=1e-9)
    for r in m:  # the logged reward net of the penalty uses the estimator and the beta of that step's reward
        assert r["reward_with_kl"] == pytest.approx(r["score"] - r["kl_coef"] * r["kl_k3"], rel=1e-5, abs=1e-6)
    assert m[2]["kl_k3"] != pytest.approx(m[2]["kl_k1"], rel=1e-3)  # (k1 and k3 differ here: the check can fail)


def test_exact_kl_against_the_full_logits():
    """train_ppo.exact_kl (--exact-kl): sum_v p_v (log p_v - log q_v) with p, q = softmax(logits / T) of policy and
    reference at each position that predicts a response token, 0 after each response's end. Reference: float64 on
    the full forward's logits of both models; left-padded prompts of different lengths; chunks of 5 positions (not a
    divisor of B x N); through the PyTorch path and the Triton kernel (interpreter on CPU)."""
    torch.manual_seed(3)
    policy, reference = GPT(tiny_config()).eval(), GPT(tiny_config()).eval()
    prompt_ids, prompt_mask = pad_sequences([[5, 6, 7, 8], [9], [10, 11]], PAD, side="left")
    response = torch.tensor([[12, 13, 14], [15, EOS, PAD], [16, 17, EOS]])
    response_mask = (response != PAD).long()
    batch = Rollout(torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, response_mask], 1), response,
                    response_mask, prompt_ids.shape[1])
    P, T = batch.prompt_len, 0.7
    with torch.no_grad():
        logp = torch.log_softmax(policy(batch.ids, batch.mask)[:, P - 1:-1].double() / T, -1)  # (B, N, V)
        logq = torch.log_softmax(reference(batch.ids, batch.mask)[:, P - 1:-1].double() / T, -1)
    want = (logp.exp() * (logp - logq)).sum(-1) * response_mask  # (B, N)
    assert (want[response_mask.bool()] > 1e-3).all()
    for impl in ("torch", "triton"):
        policy.config.logprob_impl = impl
        got = exact_kl(policy, reference, batch, T, rows=5)
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def test_exact_kl_is_logged_and_changes_nothing_else(files, tmp_path):
    """--exact-kl adds kl_exact (nats per response): 0 at step 1, where the policy is the reference, positive after
    an update; the run is otherwise the same as without the flag (it draws no random numbers, changes no state)."""
    kw = dict(steps=2, lr=1e-2)
    train_ppo.main(make_config(files, tmp_path / "plain", **kw))
    train_ppo.main(make_config(files, tmp_path / "exact", exact_kl=True, **kw))
    plain, exact = read_jsonl(tmp_path / "plain" / "metrics.jsonl"), read_jsonl(tmp_path / "exact" / "metrics.jsonl")
    assert "kl_exact" not in plain[0]
    assert exact[0]["kl_exact"] == pytest.approx(0, abs=1e-6) and exact[1]["kl_exact"] > 1e-3
    for a, b in zip(plain, exact):
        assert {k: v for k, v in b.items() if k != "kl_exact" and not k.startswith("time")} == \
            {k: v for k, v in a.items() if not k.startswith("time")}


def random_rollout(actor_critic, temperature: float, seed: int = 0):
    """A batch of 8 random responses of lengths 1-5 with the policy's own values and log-probs, then noise on both
    (ratios away from 1, values away from their clip range) and random advantages and returns; and the policy
    forward ``ppo_update`` takes."""
    g = torch.Generator().manual_seed(seed)
    B, P, N = 8, 3, 5
    ids = torch.randint(0, V - 1, (B, P + N), generator=g)
    response_mask = (torch.arange(N)[None] < torch.tensor([5, 1, 3, 2, 5, 4, 1, 2])[:, None]).long()
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), response_mask], 1)
    batch = Rollout(ids, mask, ids[:, P:], response_mask, P)
    fn = lambda b: actor_critic(b.ids, b.mask, b.prompt_len, b.response, b.response_mask, temperature)  # noqa: E731
    batch.logp, _, batch.values = chunked_forward(fn, batch, B)
    batch.logp = batch.logp + 0.3 * torch.randn(B, N, generator=g)
    batch.values = batch.values + 0.3 * torch.randn(B, N, generator=g)
    batch.advantages, batch.returns = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    return batch, fn


def test_ppo_step_is_the_step_on_the_composed_loss(files, tmp_path):
    """One epoch, one minibatch, SGD with lr 1: the update equals one step on policy_loss + vf_coef * value_loss -
    ent_coef * entropy, composed here from the tested pieces of minirlhf/ppo.py with the configured clip ranges (a
    dropped value loss, a swapped clip range or a flipped entropy sign would show)."""
    cfg = make_config(files, tmp_path, ppo_epochs=1, max_grad_norm=0.0, ent_coef=0.05, vf_coef=0.5, clip_range=0.1,
                      clip_range_value=0.3, temperature=0.8)
    actor_critic, _, _, _, _ = load_models(cfg, torch.device("cpu"))
    batch, fn = random_rollout(actor_critic, cfg.temperature)
    start = {k: v.clone() for k, v in actor_critic.state_dict().items()}
    logp, entropy, values = fn(batch)
    keep = batch.response_mask
    loss = (policy_loss(logp, batch.logp, batch.advantages, keep, 0.1)[0]
            + 0.5 * value_loss(values, batch.values, batch.returns, keep, 0.3)[0] - 0.05 * masked_mean(entropy, keep))
    params = dict(actor_critic.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()))
    expected = {name: p.detach() - g for (name, p), g in zip(params.items(), grads)}  # SGD, lr 1
    actor_critic.load_state_dict(start)
    sgd = torch.optim.SGD(actor_critic.parameters(), lr=1.0)
    train_ppo.ppo_update(actor_critic, sgd, batch, cfg, len(batch.ids), torch.Generator().manual_seed(1),
                         fn, OptimizerStep(5))
    assert max((p.detach() - start[n]).abs().max().item() for n, p in actor_critic.named_parameters()) > 1e-3
    for name, p in actor_critic.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_one_minibatch_takes_the_rollout_forward_as_epoch_0(files, tmp_path, monkeypatch):
    """With one minibatch of one micro-batch, the rollout's forward keeps its graph and is epoch 0's forward: the
    actor-critic runs once per epoch, not once more; and the run equals one that recomputes it (--grad-accum 2 gives
    the same token-weighted update from two forwards of half the batch)."""
    calls = []
    real = ActorCritic.forward
    monkeypatch.setattr(ActorCritic, "forward", lambda self, ids, *a: calls.append(len(ids)) or real(self, ids, *a))
    runs = {}
    for name, accum in (("reuse", 1), ("recompute", 2)):
        calls.clear()
        train_ppo.main(make_config(files, tmp_path / name, steps=2, ppo_epochs=3, grad_accum=accum,
                                   critic="separate", adaptive_kl=False))
        runs[name] = list(calls), load_file(tmp_path / name / "model.safetensors"), read_jsonl(
            tmp_path / name / "metrics.jsonl")
    assert runs["reuse"][0] == [8, 8, 8] * 2  # per step: the rollout, epochs 1 and 2
    assert runs["recompute"][0] == [4] * 8 * 2  # per step: the rollout in two halves, 3 epochs x 2 halves
    (_, reused, m_reuse), (_, recomputed, m_recompute) = runs["reuse"], runs["recompute"]
    assert max((reused[k] - recomputed[k]).abs().max().item() for k in reused) < 1e-5
    assert [r["first_ratio_dev"] for r in m_reuse] == [0.0, 0.0]
    for a, b in zip(m_reuse, m_recompute):
        for k in ("score", "kl_k1", "policy_loss", "value_loss", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_missing_eos_penalty_replaces_the_score(files, tmp_path):
    """Pitfall 10: responses that never reach EOS score --missing-eos-penalty instead of the reward; a policy that
    stops with probability 0.3 per token gives both kinds."""
    policy = GPT(tiny_config())
    with torch.no_grad():  # logits independent of the context: EOS gets probability 0.3 at every step
        policy.transformer.ln_f.weight.zero_()
        policy.transformer.ln_f.bias.zero_()
        policy.transformer.ln_f.bias[0] = 1.0
        policy.transformer.wte.weight[:, 0] = 0.0
        policy.transformer.wte.weight[EOS, 0] = torch.log(torch.tensor(0.3 / 0.7 * (V - 1)))
    save_checkpoint(tmp_path / "eos", policy, stage="sft", config=tiny_config())
    reward = f"{files / 'ppo_test_rewards.py'}:constant"
    for penalize in (True, False):
        out = tmp_path / f"out_{penalize}"
        train_ppo.main(make_config(files, out, policy=str(tmp_path / "eos"), reward=reward, batch_size=16,
                                   max_new_tokens=4, temperature=1.0, sample_every=1, missing_eos_penalty=-1.5,
                                   penalize_missing_eos=penalize))
        samples = read_jsonl(out / "samples.jsonl")
        assert 0 < sum(s["ended"] for s in samples) < len(samples)
        for s in samples:
            assert s["score"] == (5.0 if s["ended"] or not penalize else -1.5)
        m = read_jsonl(out / "metrics.jsonl")[0]
        assert m["score_raw"] == 5.0 and m["eos_rate"] == sum(s["ended"] for s in samples) / len(samples)


def test_responses_shorter_than_min_new_tokens_score_the_penalty(files, tmp_path, monkeypatch):
    """--min-new-tokens 3: a response that reached EOS after fewer than 3 tokens scores the penalty like an
    unfinished one; one of 3 or more tokens before its EOS keeps its reward. A policy that stops with probability 0.3
    per token gives every kind (the EOS itself is not counted: "a b EOS" is 2 tokens long)."""
    stop_and_eos_policy(tmp_path / "eos", p_eos=0.3, p_stop=0.7 / (V - 1), stop=1)  # token 1: as likely as any other
    seen, real_update = [], train_ppo.ppo_update
    monkeypatch.setattr(train_ppo, "ppo_update",
                        lambda ac, opt, batch, *a: (seen.append(batch), real_update(ac, opt, batch, *a))[1])
    out = tmp_path / "out"
    cfg = make_config(files, out, policy=str(tmp_path / "eos"), reward=f"{files / 'ppo_test_rewards.py'}:constant",
                      batch_size=32, max_new_tokens=5, min_new_tokens=3, temperature=1.0, sample_every=1,
                      missing_eos_penalty=-1.5)
    train_ppo.main(cfg)
    kinds = []
    for s, response in zip(read_jsonl(out / "samples.jsonl"), seen[0].response):
        tokens = response.tolist()
        n = tokens.index(EOS) if EOS in tokens else None
        kind = "open" if n is None else "short" if n < 3 else "long"
        kinds.append(kind)
        assert s["ended"] == (n is not None) and s["score"] == (5.0 if kind == "long" else -1.5), (s, tokens)
    assert {"open", "short", "long"} <= set(kinds), kinds
    m = read_jsonl(out / "metrics.jsonl")[0]
    assert m["short_rate"] == kinds.count("short") / len(kinds)
    with pytest.raises(UserError, match="--min-new-tokens 6: must be between 0 and --max-new-tokens"):
        train_ppo.main(dataclasses.replace(cfg, min_new_tokens=6, out=str(tmp_path / "other")))


def test_gradient_accumulation_equals_one_large_minibatch(files, tmp_path):
    """Micro-batch losses are weighted by their share of the minibatch's tokens, so accumulating 4 micro-batches of
    responses of different lengths gives the gradient of one pass over all of them (checked through an SGD step)."""
    cfg = make_config(files, tmp_path, ppo_epochs=1, max_grad_norm=0.0, ent_coef=0.01)
    actor_critic, _, _, _, _ = load_models(cfg, torch.device("cpu"))
    batch, fn = random_rollout(actor_critic, 1.0)
    start = {k: v.clone() for k, v in actor_critic.state_dict().items()}
    after = []
    for micro in (len(batch.ids), 2):
        actor_critic.load_state_dict(start)
        sgd = torch.optim.SGD(actor_critic.parameters(), lr=1.0)
        train_ppo.ppo_update(actor_critic, sgd, batch, cfg, micro, torch.Generator().manual_seed(1),
                         fn, OptimizerStep(5))
        after.append({k: v.clone() for k, v in actor_critic.state_dict().items()})
    moved = max((after[0][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3
    for k in start:
        torch.testing.assert_close(after[1][k], after[0][k], rtol=0, atol=1e-6, msg=k)


# ---------------------------------------------------------------------------------------------------------------------
# Learning


def learning_run(files, out, kl_coef):
    """16 PPO steps on the share of lowercase letters in the response; (reward before, reward after, KL after), each
    averaged over 3 steps."""
    cfg = make_config(files, out, reward=f"{files / 'ppo_test_rewards.py'}:lowercase_share", steps=16, batch_size=32,
                      max_new_tokens=8, num_minibatches=2, lr=1e-3, lr_schedule="constant", kl_coef=kl_coef,
                      adaptive_kl=False, penalize_missing_eos=False, temperature=1.0)
    train_ppo.main(cfg)
    m = read_jsonl(out / "metrics.jsonl")
    return (sum(r["score"] for r in m[:3]) / 3, sum(r["score"] for r in m[-3:]) / 3,
            sum(r["kl_k3"] for r in m[-3:]) / 3)


def test_learns_a_programmatic_reward_and_the_kl_leash_holds(files, tmp_path):
    """A random tiny policy raises a programmatic reward clearly (batch-mean noise is ~0.03) at a finite KL; the same
    run with a large KL coefficient stays near the reference and does not chase the reward."""
    before, after, kl = learning_run(files, tmp_path / "free", kl_coef=0.01)
    print(f"lowercase share before {before:.3f} after {after:.3f}, KL {kl:.2f} nats")
    assert after > before + 0.1 and 0 < kl < 20
    leashed_before, leashed_after, leashed_kl = learning_run(files, tmp_path / "leashed", kl_coef=20.0)
    print(f"with kl_coef 20: before {leashed_before:.3f} after {leashed_after:.3f}, KL {leashed_kl:.3f} nats")
    assert leashed_kl < kl / 4 and leashed_after - leashed_before < (after - before) / 2


# ---------------------------------------------------------------------------------------------------------------------
# Resume, errors, the chain


def test_resume_equals_uninterrupted(files, tmp_path):
    kw = dict(lr_schedule="constant", batch_size=8, num_minibatches=2, lr=3e-3, critic="separate")
    train_ppo.main(make_config(files, tmp_path / "a", steps=2, **kw))
    train_ppo.main(make_config(files, tmp_path / "b", steps=1, **kw))
    train_ppo.main(make_config(files, tmp_path / "b", steps=2, resume=True, **kw))
    a, b = load_policy(str(tmp_path / "a"))[0], load_policy(str(tmp_path / "b"))[0]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-5, msg=name)
    ma, mb = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in mb] == [1, 2]
    for ra, rb in zip(ma, mb):
        for k in ("score", "kl_k1", "kl_coef", "policy_loss", "value_loss"):
            assert ra[k] == pytest.approx(rb[k], abs=1e-5), k
    with pytest.raises(UserError, match="already holds a checkpoint"):  # never overwritten by accident
        train_ppo.main(make_config(files, tmp_path / "a", steps=2, **kw))
    with pytest.raises(UserError, match=r"other settings \(--lr 0.003 -> 0.01\)"):
        train_ppo.main(make_config(files, tmp_path / "b", steps=3, resume=True, **{**kw, "lr": 1e-2}))


def test_resume_on_another_device_goes_on_with_a_warning(files, tmp_path, capsys):
    """A CPU generator's state cannot seed a CUDA one (or back): the sampler is reseeded and the user told."""
    train_ppo.main(make_config(files, tmp_path / "b", steps=1))
    state_file = tmp_path / "b" / "training_state.pt"
    state = torch.load(state_file, weights_only=False)
    device, sample_state = state["generators"]["sample"]
    assert device == "cpu"
    state["generators"]["sample"] = ("cuda", sample_state)  # as if the first step had run on a GPU
    torch.save(state, state_file)
    train_ppo.main(make_config(files, tmp_path / "b", steps=2, resume=True))
    assert "generator 'sample' resumes on cpu: reseeded" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2]


def test_an_empty_prompt_starts_from_eos(files, tmp_path):
    """GPT-2's convention: the empty prompt is a lone EOS (never an empty row), and a run on it trains."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": ""}) + "\n" + json.dumps({"prompt": "ok"}) + "\n")
    tokenizer = get_tokenizer("gpt2-299")
    ok = tokenizer.encode("ok")
    assert load_prompts(str(prompts), tokenizer, 8, truncate=False).ids == [[EOS], ok] and len(ok) >= 1
    train_ppo.main(make_config(files, tmp_path / "e", prompts=str(prompts), batch_size=2, num_minibatches=1))
    assert read_jsonl(tmp_path / "e" / "metrics.jsonl")[0]["step"] == 1


def test_input_errors_name_the_problem(files, tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "word " * 80}) + "\n")
    with pytest.raises(UserError, match=r"long.jsonl:2: field 'prompt': .*--truncate-prompts"):
        train_ppo.main(make_config(files, tmp_path / "x", prompts=str(long)))
    assert not (tmp_path / "x" / "model.safetensors").exists()
    train_ppo.main(make_config(files, tmp_path / "t", prompts=str(long), truncate_prompts=True, batch_size=2))
    assert read_jsonl(tmp_path / "t" / "metrics.jsonl")[0]["prompts_truncated"] == 1
    other = GPTConfig(vocab_size=V + 1, n_positions=64, n_layer=1, n_head=2, n_embd=32, tokenizer=f"gpt2-{V}")
    save_checkpoint(tmp_path / "rm_other", RewardModel(GPT(other)), stage="rm", config=other)
    cases = [(dict(reward=str(tmp_path / "nope")), "no such reward model"),
             (dict(reward=str(tmp_path / "rm_other")), rf"tokenizer 'gpt2-{V}' \({V + 1} tokens\) differs"),
             (dict(reward="no_such_module_xyz:f"), "cannot import"),
             (dict(reward=f"{files / 'ppo_test_rewards.py'}:missing"), "no function 'missing'"),
             (dict(reward=f"{files / 'ppo_test_rewards.py'}:constant", critic="separate"), "--critic shared"),
             (dict(policy=str(files / "rm")), "'rm' checkpoint"),
             (dict(batch_size=6, num_minibatches=4), "not divisible"),
             (dict(max_new_tokens=64), "leaves no room"),
             (dict(stop_token="hello world"), "exactly one"),
             (dict(top_p=0.0), r"--top-p must be in \(0, 1\]"),
             (dict(kl_target=0.0), "adaptive KL controller needs --kl-target > 0")]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            train_ppo.main(make_config(files, tmp_path / "x", **overrides))


def test_reward_function_as_module_name(files, tmp_path, monkeypatch):
    (tmp_path / "ppo_cwd_rewards.py").write_text(REWARDS_PY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    train_ppo.main(make_config(files, tmp_path / "out", reward="ppo_cwd_rewards:constant", penalize_missing_eos=False))
    assert read_jsonl(tmp_path / "out" / "metrics.jsonl")[0]["score"] == 5.0


def test_chain_sft_and_rm_checkpoints_to_ppo_to_generate(files, tmp_path):
    """The command line end to end: train_ppo.py on SFT + RM checkpoints writes a stage "ppo" checkpoint that
    minirlhf.generate loads; a bad prompt file exits 2 with one line naming file:line."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "MINIRLHF_NO_PROGRESS": "1"}
    out = tmp_path / "ppo"
    cmd = [sys.executable, os.path.join(ROOT, "train_ppo.py"), "--policy", str(files / "sft"), "--reward",
           str(files / "rm"), "--prompts", str(files / "prompts.jsonl"), "--out", str(out), "--steps", "2",
           "--batch-size", "8", "--max-new-tokens", "6", "--sample-every", "1", "--stop-token", " the",
           "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "samples at step 2" in done.stdout
    assert json.loads((out / "config.json").read_text())["stage"] == "ppo"
    assert (out / "value_head.safetensors").is_file() and len(read_jsonl(out / "metrics.jsonl")) == 2
    gen = subprocess.run([sys.executable, "-m", "minirlhf.generate", "--model", str(out), "--prompt", "the cat",
                          "--max-new-tokens", "5", "--device", "cpu"], capture_output=True, text=True, env=env,
                         timeout=120, cwd=ROOT)
    assert gen.returncode == 0 and gen.stdout.startswith("the cat"), gen.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    failed = subprocess.run(cmd[:6] + ["--prompts", str(bad), "--out", str(tmp_path / "bad_out")], capture_output=True,
                            text=True, env=env, timeout=120)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "bad.jsonl:2" in failed.stderr
    assert not (tmp_path / "bad_out" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Outside the update: prompt batches, truncation, the stop token, validation, gradient clipping


def test_prompt_batches_walk_a_fresh_shuffle_per_pass():
    """Prompts.batch(step) draws the stream of passes over the file, each pass a permutation: any 5 consecutive
    positions of a pass over 5 prompts hold each prompt once (batches of 3 straddle the pass boundary), the next step
    draws the next prompts (not the same batch again), and the passes are shuffled differently (the check can fail:
    two of 5! orders could coincide)."""
    prompts = Prompts([[i] for i in range(5)], 0)
    stream = [p[0] for step in range(5) for p in prompts.batch(step, 3, seed=7)]  # 3 passes over 5 prompts
    passes = [stream[i:i + 5] for i in (0, 5, 10)]
    assert all(sorted(p) == [0, 1, 2, 3, 4] for p in passes), passes
    assert len({tuple(p) for p in passes}) == 3
    assert prompts.batch(1, 3, seed=7) != prompts.batch(0, 3, seed=7)
    assert prompts.batch(4, 3, seed=7) == [[x] for x in stream[12:15]]  # no replay of earlier steps needed


def test_truncated_prompts_keep_their_end(tmp_path):
    """--truncate-prompts cuts a long prompt from the LEFT: the response continues the prompt's last tokens."""
    tokenizer = get_tokenizer("gpt2-299")
    text = "one two three four five six seven eight nine ten"
    full = tokenizer.encode(text)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": text}) + "\n" + json.dumps({"prompt": "ok"}) + "\n")
    prompts = load_prompts(str(path), tokenizer, 6, truncate=True)
    assert len(full) > 6 and prompts.n_truncated == 1
    assert prompts.ids == [full[len(full) - 6:], tokenizer.encode("ok")]


def stop_and_eos_policy(path, p_eos: float, p_stop: float, stop: int) -> None:
    """Save a tiny policy whose next-token distribution ignores the context: EOS with p_eos, ``stop`` with p_stop,
    every other token alike (the trick of test_missing_eos_penalty_replaces_the_score)."""
    policy = GPT(tiny_config())
    p_other = (1 - p_eos - p_stop) / (V - 2)
    with torch.no_grad():
        policy.transformer.ln_f.weight.zero_()
        policy.transformer.ln_f.bias.zero_()
        policy.transformer.ln_f.bias[0] = 1.0
        policy.transformer.wte.weight[:, 0] = 0.0
        policy.transformer.wte.weight[EOS, 0] = math.log(p_eos / p_other)
        policy.transformer.wte.weight[stop, 0] = math.log(p_stop / p_other)
    save_checkpoint(path, policy, stage="sft", config=tiny_config())


def test_stop_token_ends_a_response_that_is_scored_with_eos_appended(files, tmp_path, monkeypatch):
    """--stop-token: a response cut at the stop token counts as ended (no missing-EOS penalty) and the reward model
    reads its score at an EOS appended after the stop token; a response that reached EOS is scored as it is; one that
    reached neither gets the penalty. Expected scores come from the reward model run here on each row alone, unpadded
    (pitfall 9), and eos_rate / ended_rate from the rows' last tokens."""
    stop = get_tokenizer("gpt2-299").encode(" the")
    assert len(stop) == 1
    S = stop[0]
    stop_and_eos_policy(tmp_path / "pol", p_eos=0.2, p_stop=0.3, stop=S)
    seen, real_update = [], train_ppo.ppo_update
    monkeypatch.setattr(train_ppo, "ppo_update", lambda ac, opt, batch, *a: (seen.append(batch), real_update(ac, opt, batch, *a))[1])
    out = tmp_path / "out"
    train_ppo.main(make_config(files, out, policy=str(tmp_path / "pol"), batch_size=32, max_new_tokens=3,
                               temperature=1.0, stop_token=" the", sample_every=1, missing_eos_penalty=-1.5))
    batch, samples = seen[0], read_jsonl(out / "samples.jsonl")
    rm, _ = load_reward_model(str(files / "rm"))
    kinds = []
    for b, s in enumerate(samples):
        prompt = batch.ids[b, :batch.prompt_len][batch.mask[b, :batch.prompt_len].bool()].tolist()
        response = batch.response[b][batch.response_mask[b].bool()].tolist()
        assert S not in response[:-1] and EOS not in response[:-1]  # nothing after the first stop or EOS
        kind = {EOS: "eos", S: "stop"}.get(response[-1], "open")
        kinds.append(kind)
        assert s["ended"] == (kind != "open"), (b, response)
        with torch.no_grad():
            ids = torch.tensor([prompt + response + ([EOS] if kind == "stop" else [])])
            expected = -1.5 if kind == "open" else rm(ids, torch.ones_like(ids)).item()
            if kind == "stop":  # the appended EOS matters (the check can fail)
                assert abs(expected - rm(ids[:, :-1], torch.ones_like(ids[:, :-1])).item()) > 1e-3
        assert s["score"] == pytest.approx(expected, abs=2e-4), (b, kind)
    assert {"eos", "stop", "open"} <= set(kinds), kinds
    m = read_jsonl(out / "metrics.jsonl")[0]
    assert m["eos_rate"] == pytest.approx(kinds.count("eos") / len(kinds))
    assert m["ended_rate"] == pytest.approx(1 - kinds.count("open") / len(kinds))


def test_check_config_rejects_each_bad_flag():
    """Flags that cannot make a run stop before any model loads, each with a message naming the flag."""
    ok = dict(policy="p", reward="r", prompts="q", batch_size=8)
    train_ppo.check_config(Config(**ok))  # the baseline passes
    cases = [(dict(policy=""), "--policy is required"), (dict(reward=""), "--reward is required"),
             (dict(prompts=""), "--prompts is required"), (dict(steps=0), "--steps must be at least 1"),
             (dict(ppo_epochs=0), "--ppo-epochs must be at least 1"),
             (dict(max_new_tokens=0), "--max-new-tokens must be at least 1"),
             (dict(grad_accum=3), "not divisible by --grad-accum 3"), (dict(temperature=0.0), "--temperature"),
             (dict(top_p=1.5), "--top-p"), (dict(kl_horizon=0), "--kl-horizon >= 1")]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message):
            train_ppo.check_config(Config(**{**ok, **overrides}))
    train_ppo.check_config(Config(**ok, kl_horizon=0, adaptive_kl=False))  # a fixed beta needs no horizon


def test_stop_token_reserves_a_position_for_the_appended_eos(files, tmp_path):
    """With --stop-token the reward model may read one token more than prompt + response (the EOS appended after a
    cut), so a prompt that exactly fills the context beside --max-new-tokens without it is refused with it."""
    prompts = tmp_path / "p.jsonl"
    text = "one two three four five six seven eight nine ten"
    n = len(get_tokenizer("gpt2-299").encode(text))
    prompts.write_text(json.dumps({"prompt": text}) + "\n")
    kw = dict(prompts=str(prompts), batch_size=1, max_new_tokens=64 - n, ppo_epochs=1)
    train_ppo.main(make_config(files, tmp_path / "fits", **kw))  # n + max_new_tokens = 64 = n_positions
    with pytest.raises(UserError, match=rf"{n} tokens, but the context leaves room for {n - 1}"):
        train_ppo.main(make_config(files, tmp_path / "x", stop_token=" the", **kw))


def test_gradient_clipping_bounds_the_step(files, tmp_path):
    """--max-grad-norm: the gradient is scaled to that global norm when it is larger, so one SGD step of lr 1 moves
    the parameters by exactly max_grad_norm (in the norm over all of them); the logged grad_norm is the norm before
    clipping."""
    cfg = make_config(files, tmp_path, ppo_epochs=1, max_grad_norm=1e-3)
    actor_critic, _, _, _, _ = load_models(cfg, torch.device("cpu"))
    batch, fn = random_rollout(actor_critic, 1.0)
    start = {n: p.detach().clone() for n, p in actor_critic.named_parameters()}
    sgd = torch.optim.SGD(actor_critic.parameters(), lr=1.0)
    stats = train_ppo.ppo_update(actor_critic, sgd, batch, cfg, len(batch.ids), torch.Generator().manual_seed(1),
                         fn, OptimizerStep(5))
    step = math.sqrt(sum(((p.detach() - start[n]) ** 2).sum().item() for n, p in actor_critic.named_parameters()))
    assert stats["grad_norm"] > 1e-2  # the clip is active
    assert step == pytest.approx(1e-3, rel=1e-3)


def test_function_scorer_rejects_bad_returns():
    """A reward function must return one finite number per response; anything else stops the run naming --reward."""
    ids = torch.zeros(2, 3, dtype=torch.long)
    good = FunctionScorer(lambda p, r: [1, 2.5], "f.py:good")
    assert good(ids, None, ["a", "b"], ["x", "y"]).tolist() == [1.0, 2.5]
    for fn, message in ((lambda p, r: [1.0], "returned 1 scores for 2 responses"),
                        (lambda p, r: [1.0, float("nan")], "returned a non-finite score"),
                        (lambda p, r: [1.0, float("inf")], "returned a non-finite score"),
                        (lambda p, r: ["x", 1.0], "must return a list of numbers")):
        with pytest.raises(UserError, match=rf"--reward f.py:bad: {message}"):
            FunctionScorer(fn, "f.py:bad")(ids, None, ["a", "b"], ["x", "y"])


def test_overwrite_starts_samples_afresh(files, tmp_path):
    """--overwrite starts a new run: samples.jsonl holds only the new run's samples, not the old run's before them."""
    for _ in range(2):
        train_ppo.main(make_config(files, tmp_path / "o", overwrite=True, sample_every=1, ppo_epochs=1))
    rows = read_jsonl(tmp_path / "o" / "samples.jsonl")
    assert len(rows) == 8 and {r["step"] for r in rows} == {1}


def test_flags_parse_into_the_config(capsys):
    """The dataclass -> argparse conversion on train_ppo.Config: field_name is --field-name with the field's type, a
    bool is --flag / --no-flag, a flag with choices refuses others (exit 2, argparse's message), defaults stay."""
    cfg = parse_args(Config, ["--policy", "p", "--batch-size", "16", "--kl-coef", "0.5", "--no-adaptive-kl",
                              "--resume", "--kl-estimator", "k3", "--stop-token", "."])
    assert cfg == Config(policy="p", batch_size=16, kl_coef=0.5, adaptive_kl=False, resume=True, kl_estimator="k3",
                         stop_token=".")
    assert type(cfg.batch_size) is int and type(cfg.kl_coef) is float and cfg.whiten_rewards is True
    assert parse_args(Config, ["--adaptive-kl"]).adaptive_kl is True
    for bad, message in ((["--kl-estimator", "k4"], "invalid choice: 'k4'"), (["--critic", "both"], "invalid choice"),
                         (["--lr-schedule", "cosine"], "invalid choice"), (["--batch-size", "1.5"], "invalid int")):
        with pytest.raises(SystemExit) as e:
            parse_args(Config, bad)
        assert e.value.code == 2 and message in capsys.readouterr().err, bad
