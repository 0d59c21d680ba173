"""Reward modelling from human feedback: preference pairs, the Bradley-Terry loss, Likert scores, normalisation,
scoring texts, and a CLI to score a pair from the shell.

The model (InstructGPT, Ouyang et al. 2022; Stiennon et al. 2020): a GPT trunk and a scalar head read at the last
real token, the EOS closing ``prompt + response`` (:class:`minirlhf.model.RewardModel`). Human feedback comes as

* **comparisons** ``{"prompt", "chosen", "rejected"}`` and **rankings** of K responses: under the Bradley-Terry model
  ``P(a better than b) = sigmoid(r(a) - r(b))``, so the loss of one pair is ``-log sigmoid(r_better - r_worse)``.
  A ranking gives all ``K(K-1)/2`` pairs of one prompt, trained together and weighted ``1 / (K(K-1)/2)`` so that each
  ranking counts once, like a comparison (InstructGPT section 3.5, where each prompt has one ranking: pairs of one
  prompt are highly correlated; shuffled apart they overfit).
  This all-pairs loss is InstructGPT's choice, not the likelihood of the ranking itself. ``--ranking-loss
  plackett-luce`` trains on that likelihood instead: under the Plackett-Luce model (Plackett 1975, Luce 1959) a
  ranking y_1 > ... > y_K is a sequence of choices, the best of all, then the best of the rest, ...::

      P(ranking) = prod_{i=1}^{K-1} exp(r_i) / sum_{j >= i} exp(r_j),   loss = sum_i logsumexp_{j >= i}(r_j) - r_i

  Its first factor alone (pick the best of K) is the loss of Ziegler et al. 2019; for K = 2 all of them are the same
  Bradley-Terry loss. A ranking's loss is its whole negative log-likelihood (K - 1 terms; log K! at equal scores),
  so beside comparisons a ranking of K > 2 weighs more than under the pairs loss, and held-out losses of the two
  settings are not comparable; held-out accuracy counts the ranking's pairs either way.
* **absolute (Likert) scores** ``{"prompt", "response", "score"}`` on a scale ``[lo, hi]`` (``--score-scale``), in one
  of two ways (``--likert-loss``):

  - ``regression`` (the default): ``(r - s')^2`` with ``s' = 2 (s - lo) / (hi - lo) - 1`` in [-1, 1]. Works when each
    prompt has a single rated response (e.g. sentences rated for sentiment by many people), and keeps the size of a
    difference, not only its sign.
  - ``pairs``: responses to the same prompt with different scores become Bradley-Terry pairs (higher score better),
    weighted like a ranking. Uses only the order of the scores, so an offset shared by all scores of one prompt cancels
    (a labeller's habit of scoring high, when one person scored that prompt's responses; not across labellers); a
    prompt with one response (or all scores equal) gives no pair and is reported as unused.

A **group** is what one record contributes (its responses, their pairs or regression targets; with ``--likert-loss
pairs`` all scored responses of one prompt); batches are groups and the loss is the mean over groups. The held-out
split keeps all records of a prompt on one side (:func:`holdout_key`), so the held-out accuracy is on prompts the
model never trained on; a Likert regression record is a unit of its own (such data often has one response per prompt,
or one shared prompt).

Held-out **pairwise accuracy**: the fraction of held-out pairs that the model orders like the people did (a tie counts
one half). For regression groups the pairs are all pairs of held-out scored responses, across prompts, whose scores
differ by at least ``--eval-min-gap`` (the only pairs that exist when each prompt has one response).

**Normalisation** (pitfall 8 in the README): after training, ``gain = 1/std`` and ``bias = -mean/std`` of raw scores,
stored in the checkpoint, so that the loaded model scores those responses with mean 0 and (population) std 1. Which
responses (``train_rm.py --normalise-on``): by default responses that the initial policy samples for the training
prompts (:func:`sample_policy`), as lm-human-preferences (Ziegler et al. 2019) normalises on samples of the policy
PPO starts from, so that the KL coefficient keeps its meaning from task to task: a score of -1 is one standard deviation
below what that policy writes, whatever the data or the reward model. Or the training responses themselves, which
may be written by people and score quite unlike the policy (Stiennon et al. 2020 and InstructGPT only shift the
mean, to reference summaries and to labellers' demonstrations).

CLI::

    python -m minirlhf.reward --model out/rm --prompt "The movie was" --response " wonderful." " a waste of time."
"""
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from minirlhf.config import UserError, option, run
from minirlhf.data import Truncations, encode_checked, encode_pair
from minirlhf.generate import generate_batch
from minirlhf.tokenizer import pad_sequences
from minirlhf.run import log_print, progress

# ---------------------------------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score_sequences(rm, seqs: Sequence[Sequence[int]], pad_id: int, *, batch_size: int = 32, raw: bool = False,
                    padding_side: str = "right") -> torch.Tensor:
    """Scores (N,) of token sequences (each ``prompt + response + EOS``), in eval mode, without gradients, on the
    model's device. Sequences are batched by length (less padding; the score does not depend on it) and returned in
    the given order. ``raw`` skips the gain/bias normalisation."""
    device = rm.head.proj.weight.device
    was_training = rm.training
    rm.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_sequences([seqs[i] for i in idx], pad_id, side=padding_side)
        fn = rm.raw_score if raw else rm
        out[idx] = fn(ids.to(device), mask.to(device)).float().cpu()
    rm.train(was_training)
    return out


def score_texts(rm, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 32,
                max_len: Optional[int] = None, padding_side: str = "right") -> torch.Tensor:
    """Normalised reward scores (N,) of ``(prompt, response)`` pairs, tokenized like training
    (:func:`minirlhf.data.encode_pair`: prompt + response + EOS). ``max_len`` defaults to the model's context; longer
    pairs are truncated (prompt from the left, response from the right) with a printed warning that counts them."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_len = max_len or rm.gpt.config.n_positions
    pairs = [encode_pair(tokenizer, p, r, max_len) for p, r in zip(prompts, responses)]
    n_cut = sum(p.prompt_truncated or p.response_truncated for p in pairs)
    if n_cut:
        log_print(f"warning: {n_cut} of {len(pairs)} (prompt, response) pairs are longer than the reward model's "
                  f"{max_len} tokens; cut to fit before scoring (prompt from the left, response from the right)")
    return score_sequences(rm, [p.ids for p in pairs], tokenizer.pad_id, batch_size=batch_size,
                           padding_side=padding_side)


# ---------------------------------------------------------------------------------------------------------------------
# From feedback records to groups of pairs


def ranking_pairs(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """All ``K(K-1)/2`` (better, worse) pairs of a ranking given as indices best first: [2, 0, 1] ->
    [(2, 0), (2, 1), (0, 1)]."""
    return [(ranking[i], ranking[j]) for i in range(len(ranking)) for j in range(i + 1, len(ranking))]


def likert_pairs(scores: Sequence[float]) -> list[tuple[int, int]]:
    """(better, worse) index pairs of every two responses whose scores differ (higher is better); equal scores give
    no pair."""
    return [(i, j) if scores[i] > scores[j] else (j, i)
            for i in range(len(scores)) for j in range(i + 1, len(scores)) if scores[i] != scores[j]]


def recorded_scale(records: list[dict]) -> Optional[tuple[float, float]]:
    """The Likert scale written on the score records themselves (``"scale": [lo, hi]``, as ``redteam.py --mode human``
    writes it), when every score record has the same one; otherwise None."""
    scales = {tuple(r["scale"]) if isinstance(r.get("scale"), list) else None
              for r in records if r["kind"] == "score"}
    if len(scales) != 1 or None in scales:
        return None
    [scale] = scales
    if len(scale) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scale) \
            or not scale[0] < scale[1]:
        return None
    return float(scale[0]), float(scale[1])


def parse_score_scale(text: str) -> tuple[float, float]:
    """``"1,7"`` -> (1.0, 7.0); the low end first."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--score-scale {text!r}: expected two numbers 'low,high', e.g. '1,7' or '-4,4'") from None
    if not lo < hi:
        raise UserError(f"--score-scale {text!r}: low end must be below high end")
    return lo, hi


@dataclass
class Group:
    """What one record contributes to the loss (with ``--likert-loss pairs``: all scored responses of one prompt):
    its tokenized responses and either Bradley-Terry pairs over them or regression targets for them."""

    where: str  # file:line of the record(s)
    seqs: list[list[int]]  # token ids of prompt + response + EOS, one per response
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (better, worse) indices into seqs
    targets: Optional[list[float]] = None  # regression targets in [-1, 1] (Likert regression), one per seq
    scores: Optional[list[float]] = None  # the Likert scores as labelled (for --eval-min-gap)
    ranking: Optional[list[int]] = None  # a ranking record's order, best first (for --ranking-loss plackett-luce)


def holdout_key(record: dict, likert_loss: str) -> Optional[str]:
    """The unit of the held-out split (:func:`minirlhf.data.split_holdout`) a preference record belongs to: its prompt
    (records of one prompt are compared with one another, or written by several labellers about the same prompt), or
    None, a unit of its own, for a Likert score trained by regression."""
    return None if record["kind"] == "score" and likert_loss == "regression" else record["prompt"]


def build_groups(records: list[dict], tokenizer, *, max_len: int, truncate_prompts: bool, likert_loss: str,
                 score_scale: Optional[tuple[float, float]], truncations: Truncations, what: str = "data"
                 ) -> list[Group]:
    """Turn validated preference records (:func:`minirlhf.data.read_preferences`) into groups, tokenizing every
    response with the shared convention and checking Likert scores against the scale. ``what`` names the data in
    the error raised when no group is usable."""
    def encode(record, response):
        return encode_checked(tokenizer, record, response, max_len=max_len, truncate_prompts=truncate_prompts,
                              truncations=truncations).ids

    groups, by_prompt = [], {}
    for r in records:
        if r["kind"] == "comparison":
            groups.append(Group(r["where"], [encode(r, r["chosen"]), encode(r, r["rejected"])], [(0, 1)]))
        elif r["kind"] == "ranking":
            groups.append(Group(r["where"], [encode(r, x) for x in r["responses"]], ranking_pairs(r["ranking"]),
                                ranking=list(r["ranking"])))
        else:  # a Likert score
            if score_scale is None:
                raise UserError(f"{r['where']}: field 'score': score records need --score-scale (e.g. '1,7'), unless "
                                "every one carries the same \"scale\": [low, high]")
            lo, hi = score_scale
            if not lo <= r["score"] <= hi:
                raise UserError(f"{r['where']}: field 'score': {r['score']} is outside --score-scale [{lo:g}, {hi:g}]")
            if likert_loss == "regression":
                target = 2 * (r["score"] - lo) / (hi - lo) - 1
                groups.append(Group(r["where"], [encode(r, r["response"])], targets=[target], scores=[r["score"]]))
            else:
                g = by_prompt.setdefault(r["prompt"], Group(r["where"], [], scores=[]))
                g.seqs.append(encode(r, r["response"]))
                g.scores.append(r["score"])
    for g in by_prompt.values():
        g.pairs = likert_pairs(g.scores)
        if g.pairs:
            groups.append(g)
    unused = sum(len(g.seqs) for g in by_prompt.values() if not g.pairs)
    if unused:
        log_print(f"--likert-loss pairs: {unused} scored responses have no other response with a different score to "
                  "the same prompt and are not used (--likert-loss regression uses them)")
    if not groups:
        raise UserError(f"{what}: no usable preference data: the scored responses form no pairs; use --likert-loss "
                        "regression")
    return groups


# ---------------------------------------------------------------------------------------------------------------------
# Batches and the loss


@dataclass
class PreferenceBatch:
    """A batch of groups, flattened: every response is one row of ``ids``; pairs and targets index rows."""

    ids: torch.Tensor  # (N, T) right-padded
    mask: torch.Tensor  # (N, T)
    better: torch.Tensor  # (P,) row of the better response of each pair
    worse: torch.Tensor  # (P,)
    pair_weight: torch.Tensor  # (P,) 1 / (pairs of its group): each group's pairs sum to 1 (0: Plackett-Luce's)
    choice: torch.Tensor  # (S,) Plackett-Luce: the row chosen at each stage of a ranking
    candidates: torch.Tensor  # (S, K) the rows it was chosen from (itself and all ranked below it), -1 = none
    reg_index: torch.Tensor  # (R,) rows with a regression target
    reg_target: torch.Tensor  # (R,)
    reg_weight: torch.Tensor  # (R,) 1 / (targets of its group)
    n_groups: int

    def to(self, device) -> "PreferenceBatch":
        return PreferenceBatch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()})


def collate_groups(groups: Sequence[Group], pad_id: int, ranking_loss: str = "pairs") -> PreferenceBatch:
    """Flatten groups into one batch. ``ranking_loss="plackett-luce"``: a ranking's loss is its Plackett-Luce stages
    (its pairs stay in the batch with weight 0, for the accuracy)."""
    seqs, better, worse, pw, ri, rt, rw, choice, candidates = [], [], [], [], [], [], [], [], []
    for g in groups:
        base = len(seqs)
        seqs.extend(g.seqs)
        plackett_luce = ranking_loss == "plackett-luce" and g.ranking is not None
        for b, w in g.pairs:
            better.append(base + b)
            worse.append(base + w)
            pw.append(0.0 if plackett_luce else 1.0 / len(g.pairs))
        if plackett_luce:
            for i in range(len(g.ranking) - 1):
                choice.append(base + g.ranking[i])
                candidates.append([base + j for j in g.ranking[i:]])
        for i, t in enumerate(g.targets or []):
            ri.append(base + i)
            rt.append(t)
            rw.append(1.0 / len(g.targets))
    ids, mask = pad_sequences(seqs, pad_id, side="right")
    k = max((len(c) for c in candidates), default=1)
    candidates = torch.tensor([c + [-1] * (k - len(c)) for c in candidates], dtype=torch.long).reshape(-1, k)
    long, flt = dict(dtype=torch.long), dict(dtype=torch.float32)
    return PreferenceBatch(ids, mask, torch.tensor(better, **long), torch.tensor(worse, **long),
                           torch.tensor(pw, **flt), torch.tensor(choice, **long), candidates,
                           torch.tensor(ri, **long), torch.tensor(rt, **flt), torch.tensor(rw, **flt), len(groups))


def preference_loss(scores: torch.Tensor, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed group losses of a batch (divide by the groups of the optimizer step for the mean) and the pair
    accuracy terms: ``sum_pairs w * -log sigmoid(r_better - r_worse) + sum_targets w * (r - target)^2`` plus, for
    Plackett-Luce rankings, ``sum_stages logsumexp(r_candidates) - r_choice``.
    Returns (loss, correct pairs (P,) as 1 / 0.5 / 0)."""
    margin = scores[batch.better] - scores[batch.worse]  # (P,)
    loss = (batch.pair_weight * -F.logsigmoid(margin)).sum()
    if len(batch.choice):
        candidate_scores = scores[batch.candidates.clamp(min=0)].masked_fill(batch.candidates < 0, float("-inf"))
        loss = loss + (torch.logsumexp(candidate_scores, 1) - scores[batch.choice]).sum()  # (S, K) -> ()
    loss = loss + (batch.reg_weight * (scores[batch.reg_index] - batch.reg_target) ** 2).sum()
    return loss, (torch.sign(margin.detach()) + 1) / 2


# ---------------------------------------------------------------------------------------------------------------------
# Held-out accuracy


def ordered_fraction(pred: torch.Tensor, truth: torch.Tensor, min_gap: float = 0.0) -> tuple[float, int]:
    """Over all pairs (i, j) with ``|truth_i - truth_j| >= min_gap`` and truth_i != truth_j: the number ordered by
    ``pred`` like ``truth`` (a tie in ``pred`` counts one half), and the number of pairs. O(N^2), in row chunks."""
    pred, truth = pred.double(), truth.double()
    correct, total = 0.0, 0
    for s in range(0, len(pred), 1024):
        dt = truth[s:s + 1024, None] - truth[None, :]  # (chunk, N)
        dp = pred[s:s + 1024, None] - pred[None, :]
        keep = (dt > 0) & (dt >= min_gap)  # each unordered pair once: the row holds the higher truth
        correct += float(((torch.sign(dp) + 1) / 2)[keep].sum())
        total += int(keep.sum())
    return correct, total


def pairwise_accuracy(scores: torch.Tensor, groups: Sequence[Group], min_gap: float = 0.0) -> tuple[float, int]:
    """Held-out accuracy and pair count. ``scores`` (N,) holds the scores of the groups' responses in order.
    Pairs: every group's (better, worse) pairs (Likert ones only where the scores differ by ``min_gap``), plus all
    pairs across the regression groups (see the module docstring)."""
    correct, total, start = 0.0, 0, 0
    reg_pred, reg_truth = [], []
    for g in groups:
        s = scores[start:start + len(g.seqs)]
        start += len(g.seqs)
        if g.targets is not None:
            reg_pred.append(s)
            reg_truth.append(torch.tensor(g.scores, dtype=torch.float64))  # exact gaps
            continue
        for b, w in g.pairs:
            if g.scores is None or g.scores[b] - g.scores[w] >= min_gap:
                correct += 0.5 * (1 + float(torch.sign(s[b] - s[w])))
                total += 1
    if reg_pred:
        c, n = ordered_fraction(torch.cat(reg_pred), torch.cat(reg_truth), min_gap)
        correct, total = correct + c, total + n
    return (correct / total if total else float("nan")), total


# ---------------------------------------------------------------------------------------------------------------------
# Normalisation


@dataclass
class PolicySample:
    prompt: str
    response: str  # decoded, without the EOS
    ended: bool  # the policy emitted EOS within the token budget
    ids: list[int]  # prompt + response (with its EOS when the policy wrote one), as train_ppo.py's reward reads it


@torch.no_grad()
def sample_policy(policy, tokenizer, prompts: Sequence[str], *, n: int, temperature: float, max_new_tokens: int,
                  max_len: int, seed: int, batch_size: int = 64) -> tuple[list[PolicySample], int]:
    """``n`` responses of ``policy`` to ``prompts`` (every distinct prompt once per pass, passes shuffled with
    ``seed``), sampled as train_ppo.py samples them (left-padded prompts, ``temperature``, at most ``max_new_tokens``,
    no top-k / top-p or stop token) and kept as its reward model reads them: a response that ran out of tokens gets
    no EOS (train_ppo.py scores it at its last token, then replaces that score by its missing-EOS penalty when asked;
    the normalisation takes the reward model's own score). A prompt longer than ``max_len - max_new_tokens - 1``
    tokens keeps its end. Returns the samples and how many of them had their prompt cut that way."""
    distinct = sorted(set(prompts))
    if not distinct or n < 1:
        raise UserError("sampling the policy for the reward's normalisation needs at least one prompt and one sample")
    room = max_len - max_new_tokens - 1
    if room < 1:
        raise UserError(f"{max_new_tokens} new tokens leave no room for a prompt in {max_len} tokens")
    order, rng = [], random.Random(seed)
    while len(order) < n:
        order += rng.sample(distinct, len(distinct))
    order = order[:n]
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples, n_cut = [], 0
    bar = progress(n, "sampling the policy")
    for start in range(0, n, batch_size):
        texts = order[start:start + batch_size]
        encoded = [tokenizer.encode_prompt(t) for t in texts]
        n_cut += sum(len(x) > room for x in encoded)
        encoded = [x[-room:] for x in encoded]
        gen = generate_batch(policy, tokenizer, encoded, max_new_tokens=max_new_tokens, temperature=temperature,
                             generator=generator)
        for text, prompt_ids, row, ended in zip(texts, encoded, gen.response.tolist(), gen.ended.tolist()):
            response = [t for t in row if t != tokenizer.pad_id]  # up to and including the first EOS
            samples.append(PolicySample(text, tokenizer.decode(response, stop_at_eos=True), ended,
                                        prompt_ids + response))
        bar.update(len(texts))
    bar.close()
    return samples, n_cut


def normalisation(raw_scores: torch.Tensor) -> tuple[float, float]:
    """(gain, bias) with ``gain * raw + bias`` of mean 0 and (population) std 1 over ``raw_scores``."""
    std = float(raw_scores.double().std(unbiased=False))
    if std < 1e-6 * max(1.0, float(raw_scores.double().abs().mean())):  # fp32 noise, not a spread of scores
        raise UserError("the reward model gives every response it is normalised on the same score; cannot normalise it")
    return 1.0 / std, -float(raw_scores.double().mean()) / std


# ---------------------------------------------------------------------------------------------------------------------
# CLI


@dataclass
class ScoreConfig:
    """Score (prompt, response) pairs with a trained reward model; prints one normalised score per response
    (0 = the mean over the responses the model was normalised on, by default the initial policy's samples; 1 = one
    standard deviation better)."""

    model: str = option("", "(required) reward model checkpoint directory (stage 'rm', written by train_rm.py)")
    prompt: list[str] = option([], "one prompt for all responses, or one prompt per response")
    response: list[str] = option([], "one or more responses (each its own argument)")
    batch_size: int = option(32, "pairs scored per forward pass")
    device: str = option("auto", "cpu, cuda, or auto (cuda when available)")


def main(cfg: ScoreConfig) -> list[float]:
    from minirlhf.checkpoint import load_reward_model
    from minirlhf.run import resolve_device

    if not cfg.model:
        raise UserError("--model is required")
    if not cfg.response:
        raise UserError("give at least one --response")
    if len(cfg.prompt) not in (1, len(cfg.response)):
        raise UserError(f"give one --prompt or one per response ({len(cfg.response)}), got {len(cfg.prompt)}")
    rm, tokenizer = load_reward_model(cfg.model)
    rm.to(resolve_device(cfg.device))
    prompts = cfg.prompt * len(cfg.response) if len(cfg.prompt) == 1 else cfg.prompt
    scores = score_texts(rm, tokenizer, prompts, cfg.response, batch_size=cfg.batch_size).tolist()
    for prompt, response, s in zip(prompts, cfg.response, scores):
        print(f"{s:+.4f}\t{prompt!r} -> {response!r}")
    return scores


if __name__ == "__main__":
    run(main, ScoreConfig)
