"""Step 3: a reward model trained on human feedback (comparisons, rankings, Likert scores).

InstructGPT (Ouyang et al. 2022, section 3.5) starts the reward model from the SFT model, replaces the output layer
with a scalar head read at the final token (here: the EOS closing ``prompt + response``), and trains it on
comparisons with the Bradley-Terry loss ``-log sigmoid(r(x, y_better) - r(x, y_worse))``, all K(K-1)/2 pairs of a
ranking in one batch element weighted so that each ranking counts once. Absolute Likert scores train either as
Bradley-Terry pairs between responses to the same prompt or by regression (``--likert-loss``); minirlhf/reward.py
gives the equations and the reasons. After training the scores are normalised to mean 0 and std 1 over responses that
the --init policy samples for the training prompts, drawn and read as train_ppo.py will (lm-human-preferences;
``--normalise-on responses``: over the training responses), a gain and bias stored in the checkpoint and applied when
it is loaded; the samples and their scores go to ``normalisation_samples.jsonl``.

    python train_rm.py --init out/sft --data prefs.jsonl --out out/rm
    python train_rm.py --init out/sft --data ratings.jsonl --score-scale=-4,4 --likert-loss regression --eval-min-gap 1
    python -m minirlhf.reward --model out/rm --prompt "..." --response "..."   # score a pair from the shell

Each evaluation reports the held-out loss and pairwise accuracy: the fraction of held-out pairs ordered as people
ordered them (InstructGPT's reward models reach about 72%; a separable toy set should reach 100%).

Departures from InstructGPT: normalisation by gain and bias (InstructGPT only adds a bias, so that labellers'
demonstrations score 0 on average); Likert scores and ``--ranking-loss plackett-luce`` are additions; the reward
model has the size of its --init trunk (InstructGPT: a 6B reward model for every policy size).
"""
import json
import pathlib
from dataclasses import dataclass

import torch

from minirlhf.config import UserError, option, run
from minirlhf.data import DataOrder, Truncations, read_preferences, split_holdout
from minirlhf.finetune import (RESUME_MAY_CHANGE, FinetuneConfig, context_length, init_policy, micro_batches,
                               schedule)
from minirlhf.model import RewardModel
from minirlhf.reward import (PolicySample, build_groups, collate_groups, holdout_key, normalisation,
                             pairwise_accuracy, parse_score_scale, preference_loss, recorded_scale, sample_policy,
                             score_sequences)
from minirlhf.run import Run, all_sum, log_print
from minirlhf.training import autocast, lr_factor, make_optimizer, set_lr

# what a run writes in --out (and metrics.jsonl)
FILES = ("config.json", "model.safetensors", "training_state.pt", "normalisation_samples.jsonl")


@dataclass
class Config(FinetuneConfig):
    """Train a reward model on comparisons {"prompt", "chosen", "rejected"}, rankings {"prompt", "responses",
    "ranking"} and Likert scores {"prompt", "response", "score"} (mixed freely). A batch element is one group: a
    comparison, a ranking with all its pairs, or a Likert score (with --likert-loss pairs, all scores of one prompt)."""

    out: str = option("out/rm", "output folder: the checkpoint (config.json, model.safetensors, training_state.pt), "
                                "metrics.jsonl, normalisation_samples.jsonl", group="run")
    init: str = option("out/sft", "trunk to start from: an SFT checkpoint (InstructGPT), any GPT-2 (hub name or "
                                  "Hugging Face folder), or 'scratch' (random, sized by --n-layer ..)")
    lr: float = option(1e-5, "peak learning rate of AdamW (InstructGPT: 9e-6 for its 6B reward model)")
    batch_size: int = option(8, "groups (a comparison, a ranking, a score) per micro-batch")
    ranking_loss: str = option("pairs", "rankings of K responses train as 'pairs' (all K(K-1)/2 Bradley-Terry pairs, "
                                        "weighted so a ranking counts once) or 'plackett-luce' (the whole ranking)",
                               choices=("pairs", "plackett-luce"), group="loss")
    likert_loss: str = option("regression", "Likert scores train by 'regression' (MSE on the score mapped to [-1, 1]) "
                                            "or as 'pairs' (Bradley-Terry within a prompt)",
                              choices=("regression", "pairs"), group="loss")
    score_scale: str = option("", "the Likert scale 'low,high', e.g. --score-scale=-4,4 (empty: the \"scale\" the "
                                  "records carry)", group="loss")
    eval_min_gap: float = option(0.0, "held-out accuracy on Likert data counts only pairs whose scores differ by at "
                                      "least this much", group="evaluation")
    normalise_on: str = option("policy", "bring the reward to mean 0, std 1 on 'policy' samples of --init (drawn as "
                                         "train_ppo.py draws them) or on the training 'responses'",
                               choices=("policy", "responses"), group="normalisation")
    normalise_samples: int = option(256, "--normalise-on policy: how many responses to sample",
                                    group="normalisation")
    normalise_temperature: float = option(0.7, "--normalise-on policy: their temperature (as train_ppo.py's)",
                                          group="normalisation")
    normalise_max_new_tokens: int = option(24, "--normalise-on policy: their longest length (as train_ppo.py's "
                                               "--max-new-tokens)", group="normalisation")


@torch.no_grad()
def evaluate(rm, groups, cfg: Config, pad_id: int) -> dict:
    """Held-out loss (mean over groups) and pairwise accuracy."""
    scores = score_sequences(rm, [s for g in groups for s in g.seqs], pad_id, batch_size=cfg.batch_size, raw=True)
    loss, _ = preference_loss(scores, collate_groups(groups, pad_id, cfg.ranking_loss))
    accuracy, n_pairs = pairwise_accuracy(scores, groups, cfg.eval_min_gap)
    return {"val_loss": loss.item() / len(groups), "val_accuracy": accuracy, "val_pairs": n_pairs}


def normalise(rm, groups, samples: list[PolicySample], cfg: Config, pad_id: int) -> tuple[dict, torch.Tensor]:
    """Set gain and bias so that the policy's samples (or, with ``--normalise-on responses``, the training responses)
    score mean 0, std 1; every later load applies them. Returns the metrics (with the training responses' mean and
    std in those units) and the samples' normalised scores."""
    responses = score_sequences(rm, [s for g in groups for s in g.seqs], pad_id, batch_size=cfg.batch_size, raw=True)
    raw = responses if cfg.normalise_on == "responses" else score_sequences(
        rm, [s.ids for s in samples], pad_id, batch_size=cfg.batch_size, raw=True)
    gain, bias = normalisation(raw)
    rm.gain.fill_(gain)
    rm.bias.fill_(bias)
    responses = gain * responses.double() + bias
    metrics = {"gain": gain, "bias": bias, "raw_mean": float(raw.mean()), "raw_std": float(raw.std(unbiased=False)),
               "train_responses_mean": float(responses.mean()),
               "train_responses_std": float(responses.std(unbiased=False))}
    return metrics, gain * raw.double() + bias


def write_samples(run: Run, samples: list[PolicySample], scores: torch.Tensor) -> None:
    """``normalisation_samples.jsonl``: the policy's samples the gain and bias were set on, with their scores."""
    run.write("normalisation_samples.jsonl", "".join(
        json.dumps({"prompt": s.prompt, "response": s.response, "ended": s.ended, "score": round(float(x), 4)}) + "\n"
        for s, x in zip(samples, scores)).encode())


def normalisation_samples(cfg: Config, gpt, tokenizer, train_records: list[dict], max_len: int, device
                          ) -> list[PolicySample]:
    """With --normalise-on policy: responses of the --init policy to the training prompts, sampled now, before any
    training (also on --resume), as train_ppo.py will sample them; the reward's gain and bias are set on them."""
    if cfg.normalise_on != "policy":
        return []
    if cfg.normalise_samples < 2:
        raise UserError(f"--normalise-samples must be at least 2, got {cfg.normalise_samples}")
    if cfg.normalise_temperature <= 0:
        raise UserError(f"--normalise-temperature must be > 0, got {cfg.normalise_temperature}")
    if cfg.init == "scratch":
        log_print("warning: --init scratch: the reward is normalised on samples of random weights, which no PPO "
                  "run starts from (--normalise-on responses uses the training responses instead)")
    if cfg.normalise_max_new_tokens < 1 or cfg.normalise_max_new_tokens > max_len - 2:
        raise UserError(f"--normalise-max-new-tokens {cfg.normalise_max_new_tokens}: must be between 1 and "
                        f"{max_len - 2}, to leave room for a prompt and an EOS in {max_len} tokens (the context, "
                        "or --max-len)")
    with autocast(device, cfg.bf16):
        samples, n_cut = sample_policy(gpt.to(device), tokenizer, [r["prompt"] for r in train_records],
                                       n=cfg.normalise_samples, temperature=cfg.normalise_temperature,
                                       max_new_tokens=cfg.normalise_max_new_tokens, max_len=max_len, seed=cfg.seed)
    cut_note = f" ({n_cut} of them with the prompt cut from the left to fit)" if n_cut else ""
    log_print(f"sampled {len(samples)} responses of the --init policy to normalise the reward on{cut_note}; "
              f"{sum(s.ended for s in samples)} ended with EOS")
    return samples


def main(cfg: Config) -> str:
    # 1. read and validate the data: any problem stops here, before --out is touched
    if not cfg.data:
        raise UserError("--data is required (a JSONL file of comparisons, rankings or Likert scores)")
    if cfg.init == Config.init and not pathlib.Path(cfg.init).exists():
        raise UserError(f"--init defaults to {Config.init}, which does not exist: pass --init with the SFT checkpoint "
                        "to start from (or any GPT-2: a hub name or a Hugging Face folder; or 'scratch')")
    records = read_preferences(cfg.data)
    if cfg.val_data:
        train_records, val_records = records, read_preferences(cfg.val_data)
    else:  # all comparisons of a prompt on one side (holdout_key)
        train_records, val_records = split_holdout(records, cfg.val_fraction, cfg.seed, cfg.data,
                                                   key=lambda r: holdout_key(r, cfg.likert_loss))
    scale = parse_score_scale(cfg.score_scale) if cfg.score_scale else recorded_scale(records)
    if scale and not cfg.score_scale:
        log_print(f"Likert scale {scale[0]:g},{scale[1]:g}: written on the score records")

    with Run(cfg, stage="rm", writes=FILES, inputs=[cfg.init], data=[cfg.data, cfg.val_data],
             may_change=RESUME_MAY_CHANGE) as run:
        device = run.device

        # 2. the reward model: the --init trunk plus a scalar head N(0, 1/(d+1)), read at the last real token (the EOS)
        gpt, tokenizer = init_policy(cfg)
        rm = RewardModel(gpt)
        max_len = context_length(cfg, gpt.config)
        train_cut, val_cut = Truncations(), Truncations()
        options = dict(max_len=max_len, truncate_prompts=cfg.truncate_prompts, likert_loss=cfg.likert_loss,
                       score_scale=scale)
        train = build_groups(train_records, tokenizer, truncations=train_cut, what=cfg.data, **options)
        val_what = cfg.val_data or f"the held-out part of {cfg.data}"
        val = build_groups(val_records, tokenizer, truncations=val_cut, what=val_what, **options) if val_records else []
        if cfg.normalise_on == "responses" and sum(len(g.seqs) for g in train) < 2:
            raise UserError(f"{cfg.data}: the training data gives {sum(len(g.seqs) for g in train)} response; the "
                            "reward's normalisation (mean 0, std 1 over the training responses) needs at least 2")
        samples = normalisation_samples(cfg, gpt, tokenizer, train_records, max_len, device)
        n_pairs = sum(len(g.pairs) for g in train)
        n_targets = sum(len(g.targets or []) for g in train)
        n_prompts = [len({r["prompt"] for r in part}) for part in (train_records, val_records)]
        log_print(f"{rm.gpt.num_params() / 1e6:.1f}M parameters; {len(train)} training groups (a comparison, "
                  f"ranking or score each) from {n_prompts[0]} prompts, with {n_pairs} pairs and {n_targets} "
                  f"regression targets; {len(val)} held-out groups from {n_prompts[1]} prompts")
        log_print(train_cut.summary("train", max_len))
        if val_cut.total:
            log_print(val_cut.summary("held-out", max_len))

        # 3. optimizer and schedule; --resume puts model, optimizer and RNG back where the run stopped
        rm.to(device)
        score_of = run.wrap(rm, RewardModel.raw_score)  # under torchrun through DDP / FSDP
        optimizer = make_optimizer(rm, cfg.lr, cfg.weight_decay)
        start = run.restore(rm, optimizer)
        steps, warmup = schedule(cfg, len(train), run.state)
        order = DataOrder(len(train), cfg.seed)
        summary = {**train_cut.as_metrics("train"), **val_cut.as_metrics("val")}

        def eval_and_log(step: int) -> None:
            if val:
                summary.update(evaluate(rm, val, cfg, tokenizer.pad_id))
                run.log(step, **{k: summary[k] for k in ("val_loss", "val_accuracy", "val_pairs")})
                log_print(f"step {step}: held-out loss {summary['val_loss']:.4f}, pairwise accuracy "
                          f"{summary['val_accuracy']:.3f} over {summary['val_pairs']} pairs")

        def save(step: int) -> None:
            with autocast(device, cfg.bf16):  # the precision train_ppo.py scores in (its --bf16 defaults on too)
                metrics, sample_scores = normalise(rm, train, samples, cfg, tokenizer.pad_id)
            summary.update(metrics)
            run.save(step, rm, config=gpt.config, optimizer=optimizer, metrics=summary, state={"warmup_steps": warmup})
            if samples:
                write_samples(run, samples, sample_scores)

        # 4. train: the loss of a step is the mean over its groups of each group's weighted pair (or target) losses
        #    (under torchrun each rank takes its share of every micro-batch; gradients and loss add up over ranks)
        rm.train()
        for step in run.steps(start, steps, "rm"):
            lr = cfg.lr * lr_factor(step, steps, warmup, cfg.schedule)
            set_lr(optimizer, lr)
            micro = micro_batches(train, order, step, cfg)
            n_groups = sum(len(batch) for batch in micro)
            loss, correct, n_tokens = 0.0, [], 0
            for groups in micro:
                batch = collate_groups(run.shard(groups), tokenizer.pad_id, cfg.ranking_loss).to(device)
                with autocast(device, cfg.bf16):
                    scores = score_of(batch.ids, batch.mask).float()  # (N,)
                group_loss, pair_correct = preference_loss(scores, batch)
                (group_loss / n_groups).backward()
                loss += group_loss.item() / n_groups
                correct.append(pair_correct)
                n_tokens += int(batch.mask.sum())
            grad_norm = run.optimizer_step(optimizer, rm.parameters(), cfg.grad_clip)
            correct = torch.cat(correct)
            n_pairs = all_sum(len(correct))  # (no pairs: regression only)
            accuracy = {"accuracy": all_sum(float(correct.sum())) / n_pairs} if n_pairs else {}
            summary["loss"] = loss = all_sum(loss)
            run.log(step + 1, show=("loss", "accuracy", "lr"), loss=loss, **accuracy, lr=lr, grad_norm=grad_norm,
                    tokens=all_sum(n_tokens))
            if step + 1 == steps or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                eval_and_log(step + 1)
            run.checkpoint(step + 1, save)  # every --save-every, at the end (5. with the normalisation), on SIGTERM
        if start < steps:
            on = "the --init policy's samples" if samples else "the training responses"
            log_print(f"normalised on {on}: gain {summary['gain']:.4f}, bias {summary['bias']:+.4f}; the training "
                      f"responses score {summary['train_responses_mean']:+.3f} "
                      f"+- {summary['train_responses_std']:.3f}; "
                      f"saved {cfg.out}")
        return cfg.out


if __name__ == "__main__":
    run(main, Config)
