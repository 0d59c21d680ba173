"""train_ppo.py end to end on tiny models (CPU, fp32): ratio 1 on the first minibatch, reference == policy before any
update, dropout off, the missing-EOS penalty, learning with a programmatic reward (and staying put under a large KL
coefficient), exact resume, input errors, and the chain SFT + RM checkpoints -> train_ppo.py -> generate.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train_ppo
from minirlhf.checkpoint import load_policy, save_checkpoint
from minirlhf.config import UserError
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.tokenizer import pad_sequences
from train_ppo import Config, Rollout, cut_after_token, scoring_input

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
    actor_critic, reference, scorer, tokenizer, rm = train_ppo.load_models(cfg, torch.device("cpu"))
    for model in (actor_critic, reference, rm):
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        assert not model.training
    ids, mask = pad_sequences(tokenizer.encode_batch(["the cat sat on", "hello there"]), PAD, side="left")
    response, response_mask = ids[:, -2:], mask[:, -2:]
    args = (ids, mask, ids.shape[1] - 2, response, response_mask, 0.7)
    with torch.no_grad():
        logp, _, values = actor_critic(*args)
        assert torch.equal(logp, actor_critic(*args)[0])
        torch.testing.assert_close(train_ppo.reference_logprobs(reference, *args), logp, rtol=0, atol=1e-6)
    assert (values == 0).all()  # zero-initialised value head (pitfall 8)


def test_first_minibatch_ratio_is_exactly_one(files, tmp_path):
    """Pitfall 5: the rollout's log-probs are recomputed bit for bit by the first minibatch (several micro-batches,
    rows permuted), so the ratio there is 1; later minibatches move (the check can fail); KL is 0 before any update."""
    cfg = make_config(files, tmp_path / "out", steps=2, num_minibatches=2, grad_accum=2, ppo_epochs=2, lr=1e-2,
                      adaptive_kl=False)
    train_ppo.main(cfg)
    m = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [r["first_ratio_dev"] for r in m] == [0.0, 0.0]
    assert abs(m[0]["kl_k1"]) < 1e-5 and m[0]["kl_k3"] < 1e-10  # policy == reference on the first rollout
    assert m[1]["kl_k3"] > 0 and m[0]["ratio_max"] > 1.001  # training moved the policy


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


def test_gradient_accumulation_equals_one_large_minibatch(files, tmp_path):
    """Micro-batch losses are weighted by their share of the minibatch's tokens, so accumulating 4 micro-batches of
    responses of different lengths gives the gradient of one pass over all of them (checked through an SGD step)."""
    cfg = make_config(files, tmp_path, ppo_epochs=1, max_grad_norm=0.0, ent_coef=0.01)
    actor_critic, _, _, _, _ = train_ppo.load_models(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    B, P, N = 8, 3, 5
    ids = torch.randint(0, V - 1, (B, P + N), generator=g)
    response_mask = (torch.arange(N)[None] < torch.tensor([5, 1, 3, 2, 5, 4, 1, 2])[:, None]).long()
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), response_mask], 1)
    batch = Rollout(ids, mask, ids[:, P:], response_mask, P)
    fn = lambda b: actor_critic(b.ids, b.mask, b.prompt_len, b.response, b.response_mask, 1.0)  # noqa: E731
    batch.logp, _, batch.values = train_ppo.chunked_forward(fn, batch, B)
    batch.logp = batch.logp + 0.3 * torch.randn(B, N, generator=g)  # ratios away from 1: some clipping
    batch.advantages, batch.returns = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    start = {k: v.clone() for k, v in actor_critic.state_dict().items()}
    after = []
    for micro in (B, 2):
        actor_critic.load_state_dict(start)
        sgd = torch.optim.SGD(actor_critic.parameters(), lr=1.0)
        train_ppo.ppo_update(actor_critic, sgd, batch, cfg, micro, torch.Generator().manual_seed(1), fn)
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
    assert state["sample_device"] == "cpu"
    torch.save({**state, "sample_device": "cuda"}, state_file)  # as if the first step had run on a GPU
    train_ppo.main(make_config(files, tmp_path / "b", steps=2, resume=True))
    assert "the run sampled on cuda, resumes on cpu" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2]


def test_an_empty_prompt_starts_from_eos(files, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": ""}) + "\n" + json.dumps({"prompt": "ok"}) + "\n")
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
