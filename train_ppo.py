"""Step 4 of RLHF: fine-tune the SFT policy with PPO against a reward, with a KL leash to the SFT model.

The objective (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Stiennon et al. 2020;
InstructGPT, Ouyang et al. 2022): maximise  E_{x ~ prompts, y ~ pi(.|x)} [ r(x, y) - beta KL(pi(.|x) || pi_ref(.|x)) ]
with PPO (Schulman et al. 2017), where pi_ref is a frozen copy of the starting policy (the SFT model, as in Stiennon
et al. and InstructGPT; Ziegler et al. start from and stay near the pre-trained model). Each iteration of the loop below
runs the numbered steps of lm-human-preferences' train_policy (and its PyTorch port, "The N implementation details of
RLHF with PPO", Huang et al. 2023); the math is in ``minirlhf/ppo.py``, and "pitfall N" is the README's list of
correctness pitfalls:

1. Rollout: sample one response per prompt from the policy (KV cache, left-padded prompts, temperature / top-k /
   top-p, at most ``--max-new-tokens``, stop at EOS; optionally cut after ``--stop-token``).
2. Score: the reward model's normalised score at the last real token of prompt + response (its EOS), or a Python
   function on the decoded strings. A response that never ended gets ``--missing-eos-penalty`` instead (pitfall 10).
3. Log-probs of the sampled tokens under the policy and the reference, fp32, logits / temperature; values from a
   zero-initialised value head on the policy's trunk (or a separate critic initialised from the reward model).
4. Per-token reward: -beta * KL estimate (k1 / k2 / k3) at every token, plus the score at the last one; beta fixed or
   adapted towards a target KL (Ziegler et al. 2019, 2.2).
5. Whiten the rewards (keeping their mean), GAE (gamma, lambda), whiten the advantages; masked after EOS everywhere.
6. PPO: epochs x minibatches (x gradient accumulation) of the clipped policy loss + vf_coef * clipped value loss
   (- an optional entropy bonus), gradient clipping, linear or constant learning rate. The first minibatch of every
   batch recomputes exactly the rollout's log-probs (ratio 1, logged as ``first_ratio_dev``; pitfall 5).
7. Metrics to ``metrics.jsonl`` and the progress bar, a table of samples every ``--sample-every`` steps (also
   ``samples.jsonl``), checkpoints (stage "ppo") that ``--resume`` continues exactly.

Run::

    python train_ppo.py --policy out/sft --reward out/rm --prompts prompts.jsonl --out out/ppo
    python train_ppo.py --policy out/sft --reward my_rewards.py:positivity --prompts prompts.jsonl   # programmatic
    python -m minirlhf.generate --model out/ppo --prompt "The movie was"                             # try the result

Departures from lm-human-preferences:

- Adam: PyTorch adds epsilon to sqrt(v) after the bias correction, TensorFlow before it (TF folds the correction into
  the step size), so PyTorch's epsilon acts like TF's epsilon * sqrt(1 - beta2^t): smaller in the first steps, whose
  updates are therefore a little larger (eps 1e-5 as in their PyTorch port).
- Masks: everything after a response's last real token (its EOS, or the stop token) is left out of every loss, KL and
  statistic, and the score sits on that token (pitfall 6); lm-human-preferences trains on all of its fixed-length
  columns, padding after the truncation token included, and adds the score at the last column.
- Gradient clipping at --max-grad-norm 1.0 (lm-human-preferences clips nothing); 0 turns it off.
- Reward and advantage whitening over the whole batch of rollouts rather than per minibatch; no minimum response
  length before the stop token.
- Every model runs in eval mode with dropout 0 (pitfall 4), the policy included, so rollout and training compute
  log-probs by the same code path.
- No pre-training term in the loss (InstructGPT's PPO-ptx mixes in the language-modelling loss on pre-training data to
  limit regressions on public NLP tasks).

Output (``--out``): the policy checkpoint (``config.json`` + ``model.safetensors``, loadable by every script), the
value head (``value_head.safetensors``) and critic trunk (``critic.safetensors``, with ``--critic separate``),
``training_state.pt`` for ``--resume``, ``metrics.jsonl``, ``samples.jsonl``.
"""
import copy
import dataclasses
import pathlib
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file

from kernels.kl import full_kl
from minirlhf.checkpoint import load_policy, load_reward_model, open_run, resolve_device, save_checkpoint, trim_logs
from minirlhf.config import UserError, load_function, option, run, to_dict
from minirlhf.data import read_prompts, write_jsonl
from minirlhf.generate import generate
from minirlhf.model import ATTN_IMPL_HELP, ATTN_IMPLS, GPT, LOGPROB_IMPL_HELP, LOGPROB_IMPLS, ScalarHead
from minirlhf.ppo import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, compute_gae, explained_variance,
                          kl_estimate, masked_mean, policy_loss, token_rewards, value_loss, whiten)
from minirlhf.tokenizer import Tokenizer, pad_sequences
from minirlhf.training import (MetricsLogger, autocast, clipped_step, is_main, log_print, lr_factor, make_optimizer,
                               progress, rng_state, seed_everything, set_lr, set_rng_state)

# ---------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    """Fine-tune a policy with PPO against a reward model (or a Python reward function), with a KL penalty to the
    starting policy. Defaults follow lm-human-preferences (Ziegler et al. 2019) and "The N implementation details of
    RLHF with PPO"; each flag says why."""

    # what to train, against what, on what
    policy: str = option("", "(required) policy to start from, also the frozen reference: a minirlhf checkpoint "
                             "(train_sft.py output) or a Hugging Face GPT-2 directory")
    reward: str = option("", "(required) reward model checkpoint (train_rm.py output), or a Python function "
                             "'module:function' / 'file.py:function' called as f(prompts: list[str], responses: "
                             "list[str]) -> list[float]")
    prompts: str = option("", "(required) JSONL file of {\"prompt\": str} records; each step draws --batch-size of "
                              "them (a fresh shuffle per pass over the file) and samples one response to each")
    out: str = option("out/ppo", "output directory: the PPO policy checkpoint, metrics.jsonl, samples.jsonl")
    # 1. rollout
    steps: int = option(100, "PPO iterations; each samples --batch-size responses and trains on them")
    batch_size: int = option(64, "responses per iteration (lm-human-preferences: 64 per GPU); rewards and advantages "
                                 "are whitened over it, which is noisy below about 8 (a warning says so)")
    max_new_tokens: int = option(24, "longest response in tokens (lm-human-preferences' sentiment task: 24)")
    temperature: float = option(0.7, "sampling temperature; the log-probs divide the logits by it too, so PPO's ratio "
                                     "is about the distribution that sampled. 0.7 as in lm-human-preferences: more "
                                     "coherent samples than 1.0")
    top_k: int = option(0, "sample only from the k most likely tokens (0 = off; PPO assumes the full distribution)")
    top_p: float = option(1.0, "nucleus sampling mass (1 = off; PPO assumes the full distribution)")
    truncate_prompts: bool = option(False, "cut prompts that leave no room for the response from the LEFT (counted and "
                                           "reported) instead of stopping with an error naming the line")
    # 2. score
    stop_token: str = option("", "cut each response after the first occurrence of this single-token string (e.g. "
                                 "'.'; lm-human-preferences' truncate_token); a cut response counts as ended and is "
                                 "scored with EOS appended. '' = responses end only at EOS")
    penalize_missing_eos: bool = option(True, "replace the score of a response that never ended (no EOS or stop token "
                                              "within --max-new-tokens) by --missing-eos-penalty")
    missing_eos_penalty: float = option(-1.0, "score of an unfinished response (lm-human-preferences: -1, about one "
                                              "standard deviation below a normalised reward model's mean)")
    # 3.-4. KL penalty
    kl_coef: float = option(0.15, "initial KL coefficient beta (lm-human-preferences' sentiment task: 0.15)")
    adaptive_kl: bool = option(True, "adapt beta towards --kl-target (Ziegler et al. 2019); --no-adaptive-kl keeps it "
                                     "fixed")
    kl_target: float = option(6.0, "target KL per response in nats for the adaptive controller (lm-human-preferences)")
    kl_horizon: int = option(10000, "adaptive controller horizon in episodes (lm-human-preferences): larger = slower")
    kl_estimator: str = option("k1", "per-token KL estimator in the reward (Schulman 2020), with the log-ratio l = "
                                     "log pi - log pi_ref at the sampled token: k1 = l (unbiased, as in "
                                     "lm-human-preferences), k2 = l^2 / 2, k3 = exp(-l) - 1 + l (unbiased, >= 0). Only "
                                     "k1's policy gradient is the KL's gradient; k2 and k3 change the penalty "
                                     "(minirlhf/ppo.py)", choices=KL_ESTIMATORS)
    kl_clamp: float = option(20.0, "clamp per-token log-ratios to [-c, c] before the estimator, so one extreme token "
                                   "cannot dominate the reward")
    # 5. advantages
    whiten_rewards: bool = option(True, "whiten per-token rewards over the batch keeping their mean "
                                        "(lm-human-preferences' default)")
    gamma: float = option(1.0, "discount; 1 (lm-human-preferences): the responses are short and the score comes at "
                                "their end")
    lam: float = option(0.95, "GAE lambda (lm-human-preferences): trades the variance of Monte-Carlo returns against "
                              "the bias of the value function")
    # 6. PPO
    ppo_epochs: int = option(4, "passes over each batch of rollouts (lm-human-preferences: 4)")
    num_minibatches: int = option(1, "optimizer steps per epoch, each on batch_size / num_minibatches rollouts "
                                     "(lm-human-preferences: 1)")
    grad_accum: int = option(1, "split each minibatch into this many forward/backward passes (same gradient, less "
                                "memory)")
    clip_range: float = option(0.2, "PPO ratio clip epsilon (Schulman et al. 2017; lm-human-preferences: 0.2)")
    clip_range_value: float = option(0.2, "value clip: how far a value may move from its rollout estimate before the "
                                          "loss stops rewarding it (lm-human-preferences: 0.2)")
    vf_coef: float = option(0.1, "weight of the value loss (lm-human-preferences: 0.1; the value head shares the "
                                 "policy's trunk, a larger weight disturbs the policy)")
    ent_coef: float = option(0.0, "entropy bonus weight (lm-human-preferences: none; the KL penalty already keeps the "
                                  "policy from collapsing)")
    lr: float = option(1e-5, "peak learning rate (lm-human-preference-details' GPT-2 124M: 1e-5)")
    lr_schedule: str = option("linear", "linear decay to 0 over --steps (lm-human-preferences) or constant",
                              choices=("linear", "constant"))
    warmup_steps: int = option(0, "linear learning-rate warmup, in PPO iterations")
    adam_eps: float = option(1e-5, "Adam epsilon (lm-human-preferences: 1e-5; PyTorch's 1e-8 makes early updates "
                                   "larger)")
    weight_decay: float = option(0.0, "AdamW weight decay on matrices (none in lm-human-preferences)")
    max_grad_norm: float = option(1.0, "clip the gradient's global norm (0 = off; lm-human-preferences does not "
                                       "clip, 1.0 is a safeguard against a rare huge step)")
    critic: str = option("shared", "value function: 'shared' = a zero-initialised value head on the policy's trunk "
                                   "(Ziegler et al. 2019), 'separate' = its own trunk initialised from the reward "
                                   "model checkpoint (Stiennon et al. 2020), with a zero-initialised head",
                         choices=("shared", "separate"))
    # 7. logging, checkpoints, machine
    sample_every: int = option(10, "print a table of sample responses (and append the batch to samples.jsonl) every N "
                                   "steps (0 = never)")
    samples_shown: int = option(4, "rows of the printed sample table")
    save_every: int = option(50, "save a resumable checkpoint every N steps (0 = only at the end)")
    resume: bool = option(False, "continue the run saved in --out exactly where it stopped (same flags; --steps may "
                                 "grow)")
    overwrite: bool = option(False, "start over even if --out already holds a checkpoint")
    seed: int = option(0, "random seed (prompt order, sampling, minibatch order)")
    device: str = option("auto", "cpu, cuda, or auto (cuda when available)")
    attn_impl: str = option("auto", ATTN_IMPL_HELP, choices=ATTN_IMPLS)
    logprob_impl: str = option("auto", LOGPROB_IMPL_HELP, choices=LOGPROB_IMPLS)
    bf16: bool = option(True, "bf16 autocast for the transformer on CUDA; log-probs, KL and losses stay fp32")
    exact_kl: bool = option(False, "also log kl_exact: the KL summed over the whole vocabulary at every response "
                                   "token, which the kl_k1/k2/k3 estimates approximate from the sampled token (costs "
                                   "a second forward of policy and reference, and their logits; counted in "
                                   "time_logprobs)")


# ---------------------------------------------------------------------------------------------------------------------
# Models: the trainable actor-critic, the frozen reference, the reward


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


def reference_logprobs(ref: GPT, ids, mask, prompt_len, response, response_mask, temperature) -> torch.Tensor:
    """log pi_ref of the response tokens (B, N), fp32, by the same code path as the policy's (ActorCritic.forward)."""
    return ref.token_logprobs(response_hidden(ref, ids, mask, prompt_len), response, temperature=temperature,
                              mask=response_mask)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class RewardModelScorer:
    """Scores with a reward model (its normalised output) at the last real token of prompt + response."""

    def __init__(self, rm):
        self.rm = rm

    def __call__(self, ids, mask, prompts, responses) -> torch.Tensor:
        return self.rm(ids, mask).float()


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


def load_models(cfg: Config, device: torch.device):
    """(actor_critic, reference, scorer, tokenizer, reward_model_or_None), every model with dropout 0 (pitfall 4)."""
    impls = dict(dropout=0.0, attn_impl=cfg.attn_impl, logprob_impl=cfg.logprob_impl)
    policy, tokenizer = load_policy(cfg.policy, **impls)
    reference = freeze(load_policy(cfg.policy, **impls)[0])
    rm = None
    if pathlib.Path(cfg.reward).exists():
        rm, rm_tokenizer = load_reward_model(cfg.reward, **impls)
        if rm_tokenizer.vocab_size != tokenizer.vocab_size:  # every gpt2-<N> is a prefix of the same BPE ranks
            raise UserError(f"--reward {cfg.reward}: tokenizer {rm_tokenizer.name!r} ({rm_tokenizer.vocab_size} tokens) "
                            f"differs from the policy's {tokenizer.name!r} ({tokenizer.vocab_size}); the reward model "
                            "must read the policy's token ids")
        scorer = RewardModelScorer(freeze(rm).to(device))
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


@torch.no_grad()
def chunked_forward(fn, rollout: Rollout, chunk: int):
    """Apply ``fn`` to the rollout in row chunks of the training micro-batch size and concatenate the outputs: the
    rollout's log-probs then come from exactly the shapes (and code) the training forward uses (pitfall 5)."""
    outs = [fn(rollout.rows(torch.arange(i, min(i + chunk, len(rollout.ids)), device=rollout.ids.device)))
            for i in range(0, len(rollout.ids), chunk)]
    return [torch.cat(parts) for parts in zip(*outs)] if isinstance(outs[0], tuple) else torch.cat(outs)


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
                                       impl=policy.logprob_kernel_impl(h))
    return kl.view(b.response_mask.shape)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


LOG_FILES = ("metrics.jsonl", "samples.jsonl")  # files of the run in --out that are not part of the checkpoint
# flags that may differ between a run and its --resume (raising --steps extends a run; with --lr-schedule linear the
# decay then stretches to the new total); any other difference would break exact continuation
RESUME_MAY_CHANGE = ("resume", "overwrite", "device", "steps", "sample_every", "samples_shown", "save_every",
                     "attn_impl", "logprob_impl", "exact_kl")


def save(out: pathlib.Path, actor_critic: ActorCritic, cfg: Config, step: int, metrics: dict, training_state: dict):
    """The policy as a stage "ppo" checkpoint (value head and critic beside it) in ``out``; save_checkpoint carries
    the run's logs, which live in the same directory, across its atomic swap."""
    extra = {"value_head.safetensors": actor_critic.value_head.state_dict()}
    if actor_critic.critic is not None:
        extra["critic.safetensors"] = actor_critic.critic.state_dict()
    policy = actor_critic.policy
    save_checkpoint(out, policy, stage="ppo", config=policy.config, step=step, train_config=to_dict(cfg),
                    metrics=metrics, training_state=training_state, extra_files=extra)


def prepare_out(cfg: Config, actor_critic: ActorCritic) -> Optional[dict]:
    """Check ``--out`` (a finished or running PPO run there is never overwritten by accident); with ``--resume``, load
    the saved weights into ``actor_critic`` and return the training state (None for a fresh run)."""
    out = pathlib.Path(cfg.out)
    resumed = open_run(cfg, may_change=RESUME_MAY_CHANGE, stages=("ppo",))
    if resumed is None:
        return None
    _, state = resumed
    device = actor_critic.value_head.proj.weight.device
    actor_critic.policy.load_state_dict(load_policy(str(out))[0].state_dict())
    actor_critic.value_head.load_state_dict(load_file(str(out / "value_head.safetensors"), device=str(device)))
    if actor_critic.critic is not None:
        actor_critic.critic.load_state_dict(load_file(str(out / "critic.safetensors"), device=str(device)))
    trim_logs(out, state["step"], LOG_FILES)
    return state


# ---------------------------------------------------------------------------------------------------------------------
# The PPO loop


def ppo_update(actor_critic: ActorCritic, optimizer, batch: Rollout, cfg: Config, micro: int,
               data_gen: torch.Generator, policy_fn) -> dict[str, float]:
    """PPO epochs over one batch of rollouts. Returns the mean of each statistic over the optimizer steps (the max for
    ``ratio_max``) and ``first_ratio_dev``, the largest |ratio - 1| on the first minibatch: 0 up to rounding, the
    check of pitfall 5. Statistics stay on the device until the end (no synchronisation per micro-batch)."""
    B = len(batch.ids)
    minibatch = B // cfg.num_minibatches
    sums: dict[str, torch.Tensor] = {}
    ratio_max = first_ratio_dev = torch.zeros((), device=batch.ids.device)
    params = [p for p in actor_critic.parameters() if p.requires_grad]
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=data_gen).to(batch.ids.device)
        for start in range(0, B, minibatch):
            rows = order[start:start + minibatch]
            n_tokens = batch.response_mask[rows].sum().clamp(min=1)
            for part in rows.split(micro):
                mb = batch.rows(part)
                logp, entropy, values = policy_fn(mb)
                pg_loss, pg_stats = policy_loss(logp, mb.logp, mb.advantages, mb.response_mask, cfg.clip_range)
                vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mb.response_mask, cfg.clip_range_value)
                loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * masked_mean(entropy, mb.response_mask)
                weight = mb.response_mask.sum() / n_tokens  # token-weighted: accumulation = one large minibatch
                (loss * weight).backward()
                ratio_max = torch.maximum(ratio_max, pg_stats.pop("ratio_max"))
                if epoch == 0 and start == 0:
                    dev = torch.where(mb.response_mask.bool(), torch.exp(logp.detach() - mb.logp) - 1, 0).abs().max()
                    first_ratio_dev = torch.maximum(first_ratio_dev, dev)
                for k, v in {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), **pg_stats,
                             **vf_stats}.items():
                    sums[k] = sums.get(k, 0) + v * weight
            sums["grad_norm"] = sums.get("grad_norm", 0) + clipped_step(optimizer, params, cfg.max_grad_norm)
    n_updates = cfg.ppo_epochs * cfg.num_minibatches
    return {**{k: (v / n_updates).item() for k, v in sums.items()}, "ratio_max": ratio_max.item(),
            "first_ratio_dev": first_ratio_dev.item()}


def show_samples(out: pathlib.Path, step: int, prompts: list[str], responses: list[str], score: torch.Tensor,
                 ended: torch.Tensor, shown: int) -> None:
    """Print a few samples as a table and append the whole batch to samples.jsonl (main process only)."""
    if not is_main():
        return
    rows = [{"step": step, "prompt": p, "response": r, "score": round(s, 4), "ended": e}
            for p, r, s, e in zip(prompts, responses, score.tolist(), ended.tolist())]
    write_jsonl(out / "samples.jsonl", rows, append=True)
    lines = [f"samples at step {step}:", f"  {'score':>7}  {'ended':5}  prompt | response"]
    lines += [f"  {r['score']:7.3f}  {str(r['ended']):5}  {r['prompt']!r} | {r['response']!r}" for r in rows[:shown]]
    log_print("\n".join(lines))


def check_config(cfg: Config) -> None:
    for name in ("policy", "reward", "prompts"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    for name in ("steps", "batch_size", "max_new_tokens", "ppo_epochs", "num_minibatches", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.batch_size % cfg.num_minibatches:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by --num-minibatches {cfg.num_minibatches}")
    if (cfg.batch_size // cfg.num_minibatches) % cfg.grad_accum:
        raise UserError(f"the minibatch of {cfg.batch_size // cfg.num_minibatches} rollouts is not divisible by "
                        f"--grad-accum {cfg.grad_accum}")
    if cfg.temperature <= 0:
        raise UserError("--temperature must be > 0")
    if not 0 < cfg.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.adaptive_kl and (cfg.kl_target <= 0 or cfg.kl_horizon < 1):
        raise UserError("the adaptive KL controller needs --kl-target > 0 and --kl-horizon >= 1 (or --no-adaptive-kl)")
    if cfg.batch_size < 8:
        log_print(f"warning: --batch-size {cfg.batch_size}: rewards and advantages are whitened over the batch, which "
                  "is noisy below about 8 responses (and makes every advantage 0 for one response of one token)")


def sync(device: torch.device) -> float:
    """Wall time after the device has finished its queued work (for honest generation/training timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main(cfg: Config) -> pathlib.Path:
    check_config(cfg)
    device = resolve_device(cfg.device)
    out = pathlib.Path(cfg.out)
    data_gen = seed_everything(cfg.seed)  # minibatch order
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)  # token sampling
    actor_critic, reference, scorer, tokenizer, rm = load_models(cfg, device)
    policy = actor_critic.policy
    eos_id, pad_id = tokenizer.eos_id, tokenizer.pad_id
    stop_id = None
    if cfg.stop_token:
        stop_ids = tokenizer.encode(cfg.stop_token)
        if len(stop_ids) != 1:
            raise UserError(f"--stop-token {cfg.stop_token!r} is {len(stop_ids)} tokens; it must be exactly one")
        stop_id = stop_ids[0]
    contexts = [policy.config.n_positions] + ([rm.gpt.config.n_positions - (stop_id is not None)] if rm else [])
    max_prompt_len = min(contexts) - cfg.max_new_tokens
    if max_prompt_len < 1:
        raise UserError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in a context of "
                        f"{min(contexts)} tokens")
    prompts = load_prompts(cfg.prompts, tokenizer, max_prompt_len, cfg.truncate_prompts)
    cut_note = f"; {prompts.n_truncated} cut from the left to {max_prompt_len} tokens" if prompts.n_truncated else ""
    log_print(f"{len(prompts.ids)} prompts from {cfg.prompts}{cut_note}")

    optimizer = make_optimizer(actor_critic, cfg.lr, cfg.weight_decay, betas=(0.9, 0.999), eps=cfg.adam_eps)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    start, state = 0, prepare_out(cfg, actor_critic)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        kl_ctl.value, start = state["kl_coef"], state["step"]
        set_rng_state(state["rng"])
        data_gen.set_state(state["data_rng"])
        if state.get("sample_device", device.type) == device.type:
            sample_gen.set_state(state["sample_rng"])
        else:  # a CPU generator's state means nothing to a CUDA one: the run goes on, not bit for bit
            sample_gen.manual_seed(cfg.seed + start)
            log_print(f"warning: the run sampled on {state['sample_device']}, resumes on {device.type}: token "
                      "sampling restarts from --seed + step, so the continuation is not bit-exact")
        log_print(f"resuming {out} at step {start}")
    else:
        (out / "samples.jsonl").unlink(missing_ok=True)
    logger = MetricsLogger(out, resume=cfg.resume)
    micro = cfg.batch_size // cfg.num_minibatches // cfg.grad_accum  # rows per forward pass

    def policy_fn(b: Rollout):  # the one forward of the policy: at rollout time (no grad) and in training
        with autocast(device, cfg.bf16):
            return actor_critic(b.ids, b.mask, b.prompt_len, b.response, b.response_mask, cfg.temperature)

    def reference_fn(b: Rollout):
        with autocast(device, cfg.bf16):
            return reference_logprobs(reference, b.ids, b.mask, b.prompt_len, b.response, b.response_mask,
                                      cfg.temperature)

    def exact_kl_fn(b: Rollout):
        with autocast(device, cfg.bf16):
            return exact_kl(policy, reference, b, cfg.temperature)

    bar = progress(cfg.steps, "ppo", initial=start)
    for step in range(start, cfg.steps):
        set_lr(optimizer, cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.lr_schedule))

        # 1. Rollout: sample a response to each prompt (KV cache, left-padded prompts, stop at EOS).
        t0 = sync(device)
        prompt_ids, prompt_mask = pad_sequences(prompts.batch(step, cfg.batch_size, cfg.seed), pad_id, side="left")
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        with autocast(device, cfg.bf16):
            gen = generate(policy, prompt_ids, prompt_mask, max_new_tokens=cfg.max_new_tokens, eos_id=eos_id,
                           pad_id=pad_id, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                           generator=sample_gen)
        response, response_mask = gen.response, gen.response_mask  # (B, N)
        cut = torch.zeros_like(gen.ended)
        if stop_id is not None:  # lm-human-preferences' truncate_token
            response, response_mask, cut = cut_after_token(response, response_mask, stop_id, pad_id)
        has_eos = ((response == eos_id) & response_mask.bool()).any(1)  # (B,)
        ended = has_eos | cut
        batch = Rollout(torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, response_mask], 1), response,
                        response_mask, gen.prompt_len)
        t1 = sync(device)

        # 2. Score: the reward at the last real token; a response that never ended gets the penalty instead.
        prompt_texts = tokenizer.decode_batch(prompt_ids.tolist())
        response_texts = tokenizer.decode_batch(response.tolist(), stop_at_eos=True)
        with torch.no_grad(), autocast(device, cfg.bf16):
            score_ids, score_mask = scoring_input(batch, cut & ~has_eos, eos_id, pad_id)
            raw_score = scorer(score_ids, score_mask, prompt_texts, response_texts).float()  # (B,)
        score = raw_score
        if cfg.penalize_missing_eos:
            score = torch.where(ended, raw_score, torch.full_like(raw_score, cfg.missing_eos_penalty))
        t2 = sync(device)

        # 3. Log-probs of the sampled tokens under policy and reference (fp32, / temperature), values (pitfall 3, 5).
        batch.logp, entropy, batch.values = chunked_forward(policy_fn, batch, micro)
        ref_logp = chunked_forward(reference_fn, batch, micro)  # (B, N)
        kl_exact = chunked_forward(exact_kl_fn, batch, micro).sum(1) if cfg.exact_kl else None  # (B,) nats

        # 4. Per-token KL penalty in the reward (Ziegler et al. 2019, eq. 2), the estimator selectable.
        kl = kl_estimate(batch.logp, ref_logp, cfg.kl_estimator, cfg.kl_clamp)  # (B, N)
        rewards = token_rewards(score, kl, response_mask, kl_ctl.value)
        kl_per_response = {k: torch.where(response_mask.bool(), kl_estimate(batch.logp, ref_logp, k, cfg.kl_clamp),
                                          0).sum(1) for k in KL_ESTIMATORS}  # (B,) nats per response, each estimator

        # 5. Whiten rewards (keep the mean), GAE, whiten advantages: masked after EOS (pitfalls 6, 7).
        if cfg.whiten_rewards:
            rewards = whiten(rewards, response_mask, shift_mean=False)
        advantages, batch.returns = compute_gae(rewards, batch.values, response_mask, cfg.gamma, cfg.lam)
        batch.advantages = whiten(advantages, response_mask, shift_mean=True)
        t3 = sync(device)

        # 6. PPO: epochs x minibatches x micro-batches; the first minibatch sees ratio 1 exactly (pitfall 5).
        train_stats = ppo_update(actor_critic, optimizer, batch, cfg, micro, data_gen, policy_fn)
        t4 = sync(device)

        # 7. Metrics, the adaptive KL update, samples, checkpoints.
        kl_sum = kl_per_response[cfg.kl_estimator]  # (B,) the KL the reward penalised
        metrics = logger.log(
            step + 1, score=score.mean(), score_raw=raw_score.mean(),
            reward_with_kl=(score - kl_ctl.value * kl_sum).mean(),
            **{f"kl_{k}": v.mean() for k, v in kl_per_response.items()},
            **({} if kl_exact is None else {"kl_exact": kl_exact.mean()}), kl_coef=kl_ctl.value,
            entropy=masked_mean(entropy, response_mask), response_len=response_mask.sum(1).float().mean(),
            eos_rate=has_eos.float().mean(), ended_rate=ended.float().mean(),
            explained_variance=explained_variance(batch.values, batch.returns, response_mask),
            lr=optimizer.param_groups[0]["lr"], **train_stats, time_generate=t1 - t0, time_score=t2 - t1,
            time_logprobs=t3 - t2, time_train=t4 - t3, prompts_truncated=prompts.n_truncated)
        kl_ctl.update(kl_sum.mean().item(), cfg.batch_size)
        bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl_' + cfg.kl_estimator]:.2f}",
                        beta=f"{kl_ctl.value:.3f}", ent=f"{metrics['entropy']:.2f}", clip=f"{metrics['clip_frac']:.2f}",
                        refresh=False)  # drawn by update(), which keeps to the bar's redraw interval
        bar.update(1)
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            show_samples(out, step + 1, prompt_texts, response_texts, score, ended, cfg.samples_shown)
        last = step + 1 == cfg.steps
        if is_main() and (last or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
            save(out, actor_critic, cfg, step + 1, metrics, {
                "optimizer": optimizer.state_dict(), "kl_coef": kl_ctl.value, "step": step + 1, "rng": rng_state(),
                "data_rng": data_gen.get_state(), "sample_rng": sample_gen.get_state(), "sample_device": device.type})
    bar.close()
    if start >= cfg.steps:
        log_print(f"{out} is already at step {start} of --steps {cfg.steps}; nothing to do")
    else:
        log_print(f"saved {out} (step {cfg.steps}; try it: python -m minirlhf.generate --model {out})")
    return out


if __name__ == "__main__":
    run(main, Config)
