"""Step 4 of RLHF: fine-tune the SFT policy with PPO against a reward, on a KL leash to the SFT model.

The objective (Ziegler et al. 2019; Stiennon et al. 2020; InstructGPT, Ouyang et al. 2022):

    maximise  E_{x ~ prompts, y ~ pi(.|x)} [ r(x, y) - beta KL(pi(.|x) || pi_ref(.|x)) ]

with PPO (Schulman et al. 2017), pi_ref a frozen copy of the starting policy. Each iteration of ``main`` runs the
numbered steps of lm-human-preferences' train_policy ("The N implementation details of RLHF with PPO", Huang et al.
2023, port them to PyTorch): 1. sample responses, 2. score them, 3. log-probs under policy and reference and values,
4. per-token rewards with the KL penalty, 5. whitening and GAE, 6. PPO epochs, 7. metrics. Every equation is written
once, in minirlhf/ppo.py; the models are in minirlhf/actor_critic.py, the rollout batch in minirlhf/rollout.py, and
output folders, resume, signals and logs in minirlhf/run.py. "Pitfall N" is the README's list of RLHF pitfalls.

    python train_ppo.py --policy out/sft --reward out/rm --prompts prompts.jsonl --out out/ppo
    python train_ppo.py --policy out/sft --reward my_rewards.py:positivity --prompts prompts.jsonl   # programmatic
    python -m minirlhf.generate --model out/ppo --prompt "The movie was"                             # try it

Departures from lm-human-preferences:
- everything after a response's last real token (EOS or --stop-token) is masked out of every loss, KL and statistic,
  and the score sits on that token (pitfall 6); they train on all fixed-length columns and score the last one;
- reward and advantage whitening over the whole batch, not per minibatch; no minimum length before the stop token;
- gradient clipping at --max-grad-norm 1.0 (they clip nothing); Adam's epsilon is added after the bias correction
  (PyTorch), before it in TensorFlow, so early updates are a little larger;
- every model in eval mode with dropout 0 (pitfall 4); no pre-training term (InstructGPT's PPO-ptx).

Output (--out): the policy checkpoint (loadable by every script), value_head.safetensors (and critic.safetensors with
--critic separate), training_state.pt for --resume, metrics.jsonl, samples.jsonl.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from minirlhf.actor_critic import ActorCritic, exact_kl, load_models, reference_logprobs
from minirlhf.config import UserError, option, run
from minirlhf.generate import generate
from minirlhf.model import ATTN_IMPL_HELP, ATTN_IMPLS, LOGPROB_IMPL_HELP, LOGPROB_IMPLS
from minirlhf.ppo import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, compute_gae, explained_variance,
                          kl_estimate, masked_mean, policy_loss, token_rewards, value_loss, whiten)
from minirlhf.rollout import Rollout, chunked_forward, cut_after_token, load_prompts, scoring_input
from minirlhf.run import OptimizerStep, Run, TrainRunConfig, all_max, all_sum, gathered, log_print, timer, world_size
from minirlhf.tokenizer import pad_sequences
from minirlhf.training import autocast, lr_factor, make_optimizer, set_lr

FILES = ("config.json", "model.safetensors", "training_state.pt", "value_head.safetensors", "critic.safetensors",
         "samples.jsonl")  # what a run writes in --out (and metrics.jsonl)
# flags that may differ between a run and its --resume (a larger --steps extends a run; its linear decay stretches)
RESUME_MAY_CHANGE = ("steps", "sample_every", "samples_shown", "attn_impl", "logprob_impl", "exact_kl")

# ---------------------------------------------------------------------------------------------------------------------
# Configuration (defaults: lm-human-preferences' sentiment task, Ziegler et al. 2019)


@dataclass
class Config(TrainRunConfig):
    """Fine-tune a policy with PPO against a reward model (or a Python reward function), with a KL penalty to the
    starting policy."""

    policy: str = option("", "(required) starting policy, also the frozen reference: a train_sft.py checkpoint or a "
                             "Hugging Face GPT-2 folder")
    reward: str = option("", "(required) a train_rm.py checkpoint, or a function 'module:fn' / 'file.py:fn' called as "
                             "fn(prompts, responses) -> list of floats")
    prompts: str = option("", "(required) JSONL of {\"prompt\": str}; each step draws --batch-size of them")
    steps: int = option(100, "PPO iterations, each on --batch-size fresh responses")
    batch_size: int = option(64, "responses per iteration, whitened together (noisy below about 8)")
    kl_coef: float = option(0.15, "initial KL coefficient beta")
    clip_range: float = option(0.2, "PPO ratio clip epsilon")
    ppo_epochs: int = option(4, "passes over each batch of rollouts")
    lr: float = option(1e-5, "peak learning rate (linear decay to 0 over --steps)")
    out: str = option("out/ppo", "output folder: the PPO policy checkpoint, metrics.jsonl, samples.jsonl", group="run")
    save_every: int = option(50, "also save a resumable checkpoint every N steps (0 = at the end and on SIGTERM)",
                             group="run")
    max_new_tokens: int = option(24, "longest response in tokens", group="1. rollout")
    temperature: float = option(0.7, "sampling temperature; log-probs divide the logits by it too (pitfall 3)",
                                group="1. rollout")
    top_k: int = option(0, "sample from the k most likely tokens only (0 = off; PPO assumes the full distribution)",
                        group="1. rollout")
    top_p: float = option(1.0, "nucleus sampling mass (1 = off; PPO assumes the full distribution)",
                          group="1. rollout")
    truncate_prompts: bool = option(False, "cut prompts that leave no room for the response from the left (counted) "
                                           "instead of stopping", group="1. rollout")
    stop_token: str = option("", "end each response after this single-token string, e.g. '.' (lm-human-preferences' "
                                 "truncate_token); '' = at EOS only", group="2. score")
    penalize_missing_eos: bool = option(True, "a response that never ended scores --missing-eos-penalty instead "
                                              "(pitfall 10: unfinished responses)", group="2. score")
    missing_eos_penalty: float = option(-1.0, "score of an unfinished response, and of one shorter than "
                                              "--min-new-tokens (a normalised reward's -1 sigma)", group="2. score")
    min_new_tokens: int = option(0, "a response that ends (EOS or --stop-token) before this many tokens scores "
                                    "--missing-eos-penalty instead: the shortest positive ending cannot win "
                                    "(lm-human-preferences' truncate_after); 0 = off", group="2. score")
    kl_estimator: str = option("k1", "per-token KL estimate in the reward: k1, k2 or k3 (minirlhf/ppo.py)",
                               choices=KL_ESTIMATORS, group="4. KL penalty")
    kl_clamp: float = option(20.0, "clamp per-token log-ratios to [-c, c] (pitfall 11: no token dominates)",
                             group="4. KL penalty")
    adaptive_kl: bool = option(True, "adapt beta towards --kl-target (Ziegler et al. 2019)", group="4. KL penalty")
    kl_target: float = option(6.0, "target KL per response, nats (adaptive controller)", group="4. KL penalty")
    kl_horizon: int = option(10000, "adaptive controller horizon in episodes: larger = slower", group="4. KL penalty")
    exact_kl: bool = option(False, "also log kl_exact, the KL over the whole vocabulary (a second forward of both "
                                   "models)", group="4. KL penalty")
    whiten_rewards: bool = option(True, "whiten per-token rewards over the batch, keeping their mean (pitfall 7)",
                                  group="5. advantages")
    gamma: float = option(1.0, "discount", group="5. advantages")
    lam: float = option(0.95, "GAE lambda: Monte-Carlo variance against value-function bias", group="5. advantages")
    num_minibatches: int = option(1, "optimizer steps per epoch", group="6. PPO")
    grad_accum: int = option(1, "forward/backward passes per minibatch (same gradient, less memory)", group="6. PPO")
    clip_range_value: float = option(0.2, "value clip epsilon_v", group="6. PPO")
    vf_coef: float = option(0.1, "weight of the value loss (small: the value head shares the policy's trunk)",
                            group="6. PPO")
    ent_coef: float = option(0.0, "entropy bonus weight", group="6. PPO")
    critic: str = option("shared", "'shared': a zero-initialised value head on the policy's trunk (Ziegler et al.); "
                                   "'separate': its own trunk from the reward model (Stiennon et al.)",
                         choices=("shared", "separate"), group="6. PPO")
    lr_schedule: str = option("linear", "linear decay to 0 over --steps, or constant", choices=("linear", "constant"),
                              group="6. PPO")
    warmup_steps: int = option(0, "linear learning-rate warmup, in iterations", group="6. PPO")
    adam_eps: float = option(1e-5, "Adam epsilon", group="6. PPO")
    weight_decay: float = option(0.0, "AdamW weight decay on matrices", group="6. PPO")
    max_grad_norm: float = option(1.0, "clip the gradient's global norm (0 = off)", group="6. PPO")
    sample_every: int = option(10, "print samples and append the batch to samples.jsonl every N steps (0 = never)",
                               group="7. logging")
    samples_shown: int = option(4, "rows of the printed sample table", group="7. logging")
    bf16: bool = option(True, "bf16 autocast for the transformer on CUDA (log-probs, KL, losses stay fp32)",
                        group="machine")
    cpu_bf16: bool = option(False, "bf16 autocast on CPU too, with --bf16: much faster on CPUs with AMX or "
                                   "AVX512-BF16 units (log-probs, KL, losses stay fp32)", group="machine")
    attn_impl: str = option("auto", ATTN_IMPL_HELP, choices=ATTN_IMPLS, group="machine")
    logprob_impl: str = option("auto", LOGPROB_IMPL_HELP, choices=LOGPROB_IMPLS, group="machine")


def check_config(cfg: Config) -> None:
    for name in ("policy", "reward", "prompts"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    for name in ("steps", "batch_size", "max_new_tokens", "ppo_epochs", "num_minibatches", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.batch_size % (world_size() * cfg.num_minibatches):
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by --num-minibatches {cfg.num_minibatches}"
                        + (f" times {world_size()} ranks" if world_size() > 1 else ""))
    if (cfg.batch_size // world_size() // cfg.num_minibatches) % cfg.grad_accum:
        raise UserError(f"the minibatch of {cfg.batch_size // world_size() // cfg.num_minibatches} rollouts"
                        f"{' per rank' if world_size() > 1 else ''} is not divisible by --grad-accum {cfg.grad_accum}")
    if not 0 <= cfg.min_new_tokens <= cfg.max_new_tokens:
        raise UserError(f"--min-new-tokens {cfg.min_new_tokens}: must be between 0 and --max-new-tokens "
                        f"({cfg.max_new_tokens})")
    if cfg.temperature <= 0:
        raise UserError("--temperature must be > 0")
    if not 0 < cfg.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.adaptive_kl and (cfg.kl_target <= 0 or cfg.kl_horizon < 1):
        raise UserError("the adaptive KL controller needs --kl-target > 0 and --kl-horizon >= 1 (or --no-adaptive-kl)")
    if cfg.batch_size < 8:
        log_print(f"warning: --batch-size {cfg.batch_size}: rewards and advantages are whitened over the batch, which "
                  "is noisy below about 8 responses (and makes every advantage 0 for one response of one token)")


# ---------------------------------------------------------------------------------------------------------------------
# The PPO update


def ppo_update(actor_critic: ActorCritic, optimizer, batch: Rollout, cfg: Config, micro: int,
               data_gen: torch.Generator, policy_fn, optimizer_step: OptimizerStep, first=None) -> dict[str, float]:
    """PPO epochs over one batch of rollouts. Returns the mean of each statistic over the optimizer steps (the max for
    ``ratio_max``) and ``first_ratio_dev``, the largest |ratio - 1| on the first minibatch: 0 up to rounding, the
    check of pitfall 5. Statistics stay on the device until the end (no synchronisation per micro-batch). Under
    torchrun each minibatch takes 1/W of it from every rank's rows, token-weighted by the global token count.
    ``first``: the rollout's forward of the whole batch with its graph, used as epoch 0's forward (rows in order)."""
    B = len(batch.ids)
    minibatch = B // cfg.num_minibatches
    sums: dict[str, torch.Tensor] = {}
    ratio_max = first_ratio_dev = torch.zeros((), device=batch.ids.device)
    params = [p for p in actor_critic.parameters() if p.requires_grad]
    for epoch in range(cfg.ppo_epochs):
        reuse = epoch == 0 and first is not None  # (the rollout's forward has the rows in batch order)
        order = (torch.arange(B) if reuse else torch.randperm(B, generator=data_gen)).to(batch.ids.device)
        for start in range(0, B, minibatch):
            rows = order[start:start + minibatch]
            n_tokens = all_sum(batch.response_mask[rows].sum()).clamp(min=1)  # of the minibatch on every rank
            for part in rows.split(micro):
                mb = batch.rows(part)
                logp, entropy, values = first if reuse else policy_fn(mb)
                pg_loss, pg_stats = policy_loss(logp, mb.logp, mb.advantages, mb.response_mask, cfg.clip_range)
                vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mb.response_mask, cfg.clip_range_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                if cfg.ent_coef:  # (a term times 0 would still cost a backward through B x N x V probabilities)
                    loss = loss - cfg.ent_coef * masked_mean(entropy, mb.response_mask)
                weight = mb.response_mask.sum() / n_tokens  # token-weighted: accumulation = one large minibatch
                (loss * weight).backward()
                ratio_max = torch.maximum(ratio_max, pg_stats.pop("ratio_max"))
                if epoch == 0 and start == 0:
                    dev = torch.where(mb.response_mask.bool(), torch.exp(logp.detach() - mb.logp) - 1, 0).abs().max()
                    first_ratio_dev = torch.maximum(first_ratio_dev, dev)
                for k, v in {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), **pg_stats,
                             **vf_stats}.items():
                    sums[k] = sums.get(k, 0) + v * weight
            sums["grad_norm"] = sums.get("grad_norm", 0) + optimizer_step(optimizer, params, cfg.max_grad_norm)
    n_updates = cfg.ppo_epochs * cfg.num_minibatches
    grad_norm = sums.pop("grad_norm")  # the same on every rank; the rest are each rank's shares of the means
    return {**{k: (all_sum(v) / n_updates).item() for k, v in sums.items()},
            "grad_norm": (grad_norm / n_updates).item(), "ratio_max": all_max(ratio_max).item(),
            "first_ratio_dev": all_max(first_ratio_dev).item()}


def show_samples(run: Run, step: int, prompts: list[str], responses: list[str], score: torch.Tensor,
                 ended: torch.Tensor, shown: int) -> None:
    """Append the batch to samples.jsonl and print its first rows as a table."""
    rows = [{"step": step, "prompt": p, "response": r, "score": round(s, 4), "ended": e}
            for p, r, s, e in zip(prompts, responses, score.tolist(), ended.tolist())]
    run.append("samples.jsonl", rows)
    log_print("\n".join([f"samples at step {step}:", f"  {'score':>7}  {'ended':5}  prompt | response"] + [
        f"  {r['score']:7.3f}  {str(r['ended']):5}  {r['prompt']!r} | {r['response']!r}" for r in rows[:shown]]))


def stop_token_id(cfg: Config, tokenizer) -> Optional[int]:
    if not cfg.stop_token:
        return None
    ids = tokenizer.encode(cfg.stop_token)
    if len(ids) != 1:
        raise UserError(f"--stop-token {cfg.stop_token!r} is {len(ids)} tokens; it must be exactly one")
    return ids[0]


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def main(cfg: Config) -> str:
    check_config(cfg)
    with Run(cfg, stage="ppo", writes=FILES, inputs=[cfg.policy, cfg.reward], data=[cfg.prompts],
             may_change=RESUME_MAY_CHANGE) as run:
        device = run.device
        actor_critic, reference, scorer, tokenizer, rm = load_models(cfg, device)
        trained, _, _ = run.wrap(actor_critic), run.wrap(reference), run.wrap(rm)  # DDP / FSDP under torchrun
        policy, eos_id, pad_id = actor_critic.policy, tokenizer.eos_id, tokenizer.pad_id
        stop_id = stop_token_id(cfg, tokenizer)
        # the prompt and the response must fit the policy's context, and the reward model's with an EOS appended
        contexts = [policy.config.n_positions] + ([rm.gpt.config.n_positions - (stop_id is not None)] if rm else [])
        prompts = load_prompts(cfg.prompts, tokenizer, min(contexts) - cfg.max_new_tokens, cfg.truncate_prompts)
        log_print(f"{len(prompts.ids)} prompts from {cfg.prompts}"
                  + (f"; {prompts.n_truncated} cut from the left to fit" if prompts.n_truncated else ""))
        optimizer = make_optimizer(actor_critic, cfg.lr, cfg.weight_decay, betas=(0.9, 0.999), eps=cfg.adam_eps)
        kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                  else FixedKLController(cfg.kl_coef))
        data_gen, sample_gen = run.new_generator("data"), run.new_generator("sample", device)  # minibatches, tokens
        start = run.restore(actor_critic.policy, optimizer, value_head=actor_critic.value_head,
                            **({"critic": actor_critic.critic} if actor_critic.critic is not None else {}))
        kl_ctl.value = run.state["kl_coef"] if run.state else kl_ctl.value
        micro = cfg.batch_size // world_size() // cfg.num_minibatches // cfg.grad_accum  # rows per forward pass

        def policy_fn(b: Rollout):  # the one forward of the policy: at rollout time (no grad) and in training
            with autocast(device, cfg.bf16, cfg.cpu_bf16):
                return trained(b.ids, b.mask, b.prompt_len, b.response, b.response_mask, cfg.temperature)

        def reference_fn(b: Rollout):
            with autocast(device, cfg.bf16, cfg.cpu_bf16):
                return reference_logprobs(reference, b, cfg.temperature)

        def save(step: int) -> None:
            run.save(step, policy, config=policy.config, optimizer=optimizer, metrics=metrics, state={
                "kl_coef": kl_ctl.value}, extra={
                "value_head": actor_critic.value_head, **({"critic": actor_critic.critic} if actor_critic.critic
                                                          is not None else {})})

        for step in run.steps(start, cfg.steps, "ppo"):
            set_lr(optimizer, cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.lr_schedule))
            times = {}

            # 1. Rollout: sample a response to each prompt (KV cache, left-padded prompts, stop at EOS); under
            #    torchrun each rank its share of the prompts, with its own seed (pitfall 10).
            with timer(device, times, "time_generate"):
                prompt_ids, prompt_mask = (t.to(device) for t in pad_sequences(
                    run.shard(prompts.batch(step, cfg.batch_size, cfg.seed)), pad_id, side="left"))
                with autocast(device, cfg.bf16, cfg.cpu_bf16), gathered(policy):
                    gen = generate(policy, prompt_ids, prompt_mask, max_new_tokens=cfg.max_new_tokens, eos_id=eos_id,
                                   pad_id=pad_id, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                   generator=sample_gen)
                response, response_mask, cut = gen.response, gen.response_mask, torch.zeros_like(gen.ended)  # (B, N)
                if stop_id is not None:  # lm-human-preferences' truncate_token
                    response, response_mask, cut = cut_after_token(response, response_mask, stop_id, pad_id)
                has_eos = ((response == eos_id) & response_mask.bool()).any(1)  # (B,)
                ended = has_eos | cut
                batch = Rollout(torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, response_mask], 1),
                                response, response_mask, gen.prompt_len)

            # 2. Score: the reward at the last real token; an unfinished one gets the penalty (pitfall 10: no EOS),
            #    and so does one that ended before --min-new-tokens.
            with timer(device, times, "time_score"), torch.no_grad(), autocast(device, cfg.bf16, cfg.cpu_bf16):
                prompt_texts = tokenizer.decode_batch(prompt_ids.tolist())
                response_texts = tokenizer.decode_batch(response.tolist(), stop_at_eos=True)
                score_ids, score_mask = scoring_input(batch, cut & ~has_eos, eos_id, pad_id)
                raw_score = scorer(score_ids, score_mask, prompt_texts, response_texts).float()  # (B,)
                length = response_mask.sum(1) - has_eos.long()  # (B,) tokens before the EOS
                too_short = ended & (length < cfg.min_new_tokens)
                penalized = too_short | (~ended if cfg.penalize_missing_eos else torch.zeros_like(ended))
                score = torch.where(penalized, torch.full_like(raw_score, cfg.missing_eos_penalty), raw_score)

            with timer(device, times, "time_logprobs"):
                # 3. Log-probs of the sampled tokens under policy and reference, and values (pitfall 3: logits / T
                # score the next token; pitfall 5: fp32, in the shapes training uses). When one forward takes the
                # whole batch (one minibatch, one micro-batch), it keeps its graph: it is also epoch 0's forward.
                first = chunked_forward(policy_fn, batch, micro, grad=micro == len(batch.ids))
                batch.logp, entropy, batch.values = (t.detach() for t in first)  # (B, N) each
                ref_logp = chunked_forward(reference_fn, batch, micro)  # (B, N)

                # 4. Per-token reward: the KL penalty at every token, the score at the last one (Ziegler et al. eq. 2).
                kl = {k: kl_estimate(batch.logp, ref_logp, k, cfg.kl_clamp) for k in KL_ESTIMATORS}  # (B, N) each
                rewards = token_rewards(score, kl[cfg.kl_estimator], response_mask, kl_ctl.value)

                # 5. Whiten rewards, GAE, whiten advantages (pitfall 7: rewards keep their mean; 6: masked after EOS),
                #    with the moments of the whole batch, over every rank.
                if cfg.whiten_rewards:
                    rewards = whiten(rewards, response_mask, shift_mean=False, across_ranks=True)
                advantages, batch.returns = compute_gae(rewards, batch.values, response_mask, cfg.gamma, cfg.lam)
                batch.advantages = whiten(advantages, response_mask, shift_mean=True, across_ranks=True)
                exact = {}
                if cfg.exact_kl:  # a diagnostic
                    with gathered(policy, reference):
                        exact["kl_exact"] = chunked_forward(lambda b: exact_kl(policy, reference, b, cfg.temperature),
                                                            batch, micro).sum(1).mean()

            # 6. PPO: epochs x minibatches x micro-batches (pitfall 5: the first minibatch sees ratio 1 exactly).
            with timer(device, times, "time_train"):
                train_stats = ppo_update(actor_critic, optimizer, batch, cfg, micro, data_gen, policy_fn,
                                         run.optimizer_step, first if first[0].requires_grad else None)

            # 7. Metrics (run.log averages over ranks' equal shares), the adaptive KL update, samples, checkpoints.
            kl_sum = {k: torch.where(response_mask.bool(), v, 0).sum(1) for k, v in kl.items()}  # (B,) nats each
            metrics = run.log(
                step + 1, show=("score", "kl_" + cfg.kl_estimator, "kl_coef", "entropy", "clip_frac"),
                score=score.mean(), score_raw=raw_score.mean(),
                reward_with_kl=(score - kl_ctl.value * kl_sum[cfg.kl_estimator]).mean(),
                **{f"kl_{k}": v.mean() for k, v in kl_sum.items()}, kl_coef=kl_ctl.value,
                entropy=masked_mean(entropy, response_mask, across_ranks=True),
                response_len=response_mask.sum(1).float().mean(),
                eos_rate=has_eos.float().mean(), ended_rate=ended.float().mean(), short_rate=too_short.float().mean(),
                explained_variance=explained_variance(batch.values, batch.returns, response_mask, across_ranks=True),
                lr=optimizer.param_groups[0]["lr"], **train_stats, **exact, **times,
                prompts_truncated=prompts.n_truncated)
            kl_ctl.update(metrics["kl_" + cfg.kl_estimator], cfg.batch_size)  # the global mean KL
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                show_samples(run, step + 1, prompt_texts, response_texts, score, ended, cfg.samples_shown)
            run.checkpoint(step + 1, save)  # every --save-every, at the end, and on SIGTERM / Ctrl-C
    if start < cfg.steps:
        log_print(f"saved {cfg.out} (step {cfg.steps}; try it: python -m minirlhf.generate --model {cfg.out})")
    return cfg.out


if __name__ == "__main__":
    run(main, Config)
