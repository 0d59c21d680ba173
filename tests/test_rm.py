"""Reward model: ranking -> pairs and weights, the Bradley-Terry loss by hand, Likert handling (scale, pairs,
regression), accuracy against brute force, padding invariance, normalisation stored and applied by the loader,
exact --resume, bad inputs, the score CLI, and an end-to-end SFT -> RM run on a separable toy preference set."""
import itertools
import json
import math
import random

import pytest
import torch

import train_rm
import train_sft
from minirlhf import reward
from minirlhf.checkpoint import load_policy, load_reward_model, read_meta
from minirlhf.config import UserError, run
from minirlhf.data import Truncations, read_preferences, split_holdout
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.reward import (Group, build_groups, collate_groups, holdout_key, likert_pairs, normalisation,
                             ordered_fraction, pairwise_accuracy, preference_loss, ranking_pairs, score_sequences,
                             score_texts)
from minirlhf.tokenizer import get_tokenizer, pad_sequences
from test_sft import ANIMALS, TINY, metrics_of, run_script, run_until_first_save_crashes, sft_data, tiny_gpt, \
    write_jsonl

GOOD, BAD = ["good", "great", "nice", "lovely"], ["bad", "awful", "poor", "ugly"]


def toy_preferences(path, n=60, seed=0):
    """Separable toy feedback: a response with a positive word beats a plain one beats one with a negative word.
    Comparisons, and every third record a ranking of three."""
    rnd = random.Random(seed)
    records = []
    for i in range(n):
        a = rnd.choice(ANIMALS)
        good, plain, bad = f" a {rnd.choice(GOOD)} {a}.", f" a {a}.", f" a {rnd.choice(BAD)} {a}."
        if i % 3 == 0:
            responses = [plain, bad, good]
            rnd.shuffle(responses)
            ranking = [responses.index(x) for x in (good, plain, bad)]
            records.append({"prompt": f"Say {a}:", "responses": responses, "ranking": ranking})
        else:
            records.append({"prompt": f"Say {a}:", "chosen": good, "rejected": bad})
    return write_jsonl(path, records)


def scored(prompt, response, score, where="f:1"):
    return {"kind": "score", "prompt": prompt, "response": response, "score": score, "where": where}


# ---------------------------------------------------------------------------------------------------------------------
# Pairs, weights, the loss


def test_ranking_pairs_and_weights():
    assert ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert len(ranking_pairs(list(range(5)))) == 10
    ranking = Group("f:1", [[1], [2], [3]], ranking_pairs([2, 0, 1]))
    comparison = Group("f:2", [[4], [5]], [(0, 1)])
    batch = collate_groups([ranking, comparison], pad_id=99)
    assert batch.better.tolist() == [2, 2, 0, 3] and batch.worse.tolist() == [0, 1, 1, 4]
    assert batch.pair_weight.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])  # each prompt counts once
    assert batch.n_groups == 2 and batch.ids[:, 0].tolist() == [1, 2, 3, 4, 5]


def test_bradley_terry_loss_by_hand():
    ranking = Group("f:1", [[1], [2], [3]], ranking_pairs([2, 0, 1]))
    comparison = Group("f:2", [[4], [5]], [(0, 1)])
    likert = Group("f:3", [[6]], targets=[0.5], scores=[5])
    batch = collate_groups([ranking, comparison, likert], pad_id=99)
    r = torch.tensor([0.3, -0.2, 1.0, 0.0, 0.5, 0.1])
    nll = lambda d: -math.log(1 / (1 + math.exp(-d)))  # noqa: E731
    expected = (nll(1.0 - 0.3) + nll(1.0 + 0.2) + nll(0.3 + 0.2)) / 3 + nll(0.0 - 0.5) + (0.1 - 0.5) ** 2
    loss, correct = preference_loss(r, batch)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert correct.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_plackett_luce_loss_by_hand():
    """Ranking [2, 0, 1] (response 2 best): choose 2 of {2, 0, 1}, then 0 of {0, 1}; a comparison is one stage, the
    same as Bradley-Terry; the ranking's pairs stay for the accuracy but weigh nothing."""
    ranking = Group("f:1", [[1], [2], [3]], ranking_pairs([2, 0, 1]), ranking=[2, 0, 1])
    comparison = Group("f:2", [[4], [5]], [(0, 1)], ranking=[0, 1])
    likert = Group("f:3", [[6]], targets=[0.5], scores=[5])
    batch = collate_groups([ranking, comparison, likert], pad_id=99, ranking_loss="plackett-luce")
    assert batch.pair_weight.tolist() == [0.0] * 4
    r = torch.tensor([0.3, -0.2, 1.0, 0.0, 0.5, 0.1])
    e = math.exp
    expected = (-math.log(e(1.0) / (e(1.0) + e(0.3) + e(-0.2))) - math.log(e(0.3) / (e(0.3) + e(-0.2)))
                - math.log(e(0.0) / (e(0.0) + e(0.5))) + (0.1 - 0.5) ** 2)
    loss, correct = preference_loss(r, batch)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert correct.tolist() == [1.0, 1.0, 1.0, 0.0]
    two = torch.tensor([0.0, 0.5])  # K = 2: Plackett-Luce is Bradley-Terry
    pl_loss, _ = preference_loss(two, collate_groups([comparison], pad_id=99, ranking_loss="plackett-luce"))
    assert pl_loss.item() == pytest.approx(preference_loss(two, collate_groups([comparison], pad_id=99))[0].item())


def test_rm_learns_rankings_with_plackett_luce(sft_then_rm, tmp_path):
    tmp, sft_dir, _ = sft_then_rm
    run_script(train_rm, ["--init", sft_dir, "--data", tmp / "prefs.jsonl", "--out", tmp_path / "rm",
                          "--max-steps", 40, "--lr", 1e-3, "--val-fraction", 0.25, "--eval-every", 0,
                          "--ranking-loss", "plackett-luce"])
    [final] = [r for r in metrics_of(tmp_path / "rm") if "val_accuracy" in r]
    assert final["val_pairs"] >= 20 and final["val_accuracy"] >= 0.9  # chance is 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Likert scores


def test_likert_pairs_and_regression_targets(capsys):
    assert likert_pairs([3, 1, 3, 2]) == [(0, 1), (0, 3), (2, 1), (3, 1), (2, 3)]  # (0, 2): equal, no pair
    tok = get_tokenizer("gpt2-1k")
    records = [scored("p", " a", 1, "f:1"), scored("q", " b", 4, "f:2"), scored("p", " c", 7, "f:3"),
               scored("p", " d", 7, "f:4"), scored("r", " e", 2.5, "f:5")]
    options = dict(max_len=64, truncate_prompts=False, score_scale=(1.0, 7.0), truncations=Truncations())
    groups = build_groups(records, tok, likert_loss="regression", **options)
    assert [g.targets for g in groups] == [[-1.0], [0.0], [1.0], [1.0], [-0.5]]
    assert groups[0].seqs == [tok.encode("p") + tok.encode(" a") + [tok.eos_id]]
    [g] = build_groups(records, tok, likert_loss="pairs", **options)
    assert "2 scored responses have no other response" in capsys.readouterr().out  # q and r stand alone: reported
    assert g.scores == [1, 7, 7] and g.pairs == [(1, 0), (2, 0)] and g.targets is None


@pytest.mark.parametrize("record, scale, message", [
    (scored("p", "a", 8, "f.jsonl:4"), (1.0, 7.0), r"^f\.jsonl:4: field 'score': 8 is outside --score-scale \[1, 7\]"),
    (scored("p", "a", -5, "f.jsonl:2"), (-4.0, 4.0), r"^f\.jsonl:2: field 'score': -5 is outside"),
    (scored("p", "a", 3, "f.jsonl:9"), None, r"^f\.jsonl:9: field 'score': score records need --score-scale"),
])
def test_likert_scale_is_checked(record, scale, message):
    with pytest.raises(UserError, match=message):
        build_groups([record], get_tokenizer("gpt2-1k"), max_len=64, truncate_prompts=False, likert_loss="regression",
                     score_scale=scale, truncations=Truncations())


def test_score_scale_parsing():
    assert reward.parse_score_scale("-4,4") == (-4.0, 4.0)
    for bad in ("4", "a,b", "7,1", "1,1"):
        with pytest.raises(UserError, match="--score-scale"):
            reward.parse_score_scale(bad)


# ---------------------------------------------------------------------------------------------------------------------
# Accuracy and normalisation


def test_ordered_fraction_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    truth = torch.randint(-4, 5, (1500,), generator=gen).float()  # many ties in truth
    pred = torch.randint(0, 6, (1500,), generator=gen).float() + truth  # ties in pred too
    for gap in (0.0, 2.0):
        correct, total = 0.0, 0
        t, p = truth[:200].tolist(), pred[:200].tolist()
        for i, j in itertools.combinations(range(200), 2):
            if t[i] != t[j] and abs(t[i] - t[j]) >= gap:
                total += 1
                correct += 1.0 if (p[i] - p[j]) * (t[i] - t[j]) > 0 else 0.5 if p[i] == p[j] else 0.0
        assert ordered_fraction(pred[:200], truth[:200], gap) == (pytest.approx(correct), total)
    c, n = ordered_fraction(pred, truth)  # > one 1024-row chunk
    assert n == sum(int((truth[i] > truth).sum()) for i in range(1500))


def test_pairwise_accuracy_groups():
    groups = [Group("f:1", [[1], [2], [3]], ranking_pairs([0, 1, 2])),  # 3 pairs
              Group("f:2", [[1], [2]], [(1, 0)], scores=[2, 5]),  # a Likert pair with gap 3
              Group("f:3", [[1]], targets=[-1.0], scores=[1]), Group("f:4", [[1]], targets=[1.0], scores=[7]),
              Group("f:5", [[1]], targets=[0.0], scores=[4])]
    scores = torch.tensor([3.0, 1.0, 2.0, 0.0, 1.0, -1.0, 0.5, 0.5])
    # ranking: (0,1) ok, (0,2) ok, (1,2) wrong; Likert pair ok; regression: (7>1) ok, (4>1) ok, (7 vs 4) tie = 0.5
    assert pairwise_accuracy(scores, groups) == (pytest.approx(5.5 / 7), 7)
    assert pairwise_accuracy(scores, groups, min_gap=3.0) == (pytest.approx(5.5 / 7), 7)
    assert pairwise_accuracy(scores, groups, min_gap=4.0) == (pytest.approx(3 / 4), 4)  # ranking pairs + (7 > 1)


def test_normalisation():
    raw = torch.tensor([1.0, 2.0, 3.0, 6.0])
    gain, bias = normalisation(raw)
    z = gain * raw + bias
    assert float(z.mean()) == pytest.approx(0, abs=1e-6) and float(z.std(unbiased=False)) == pytest.approx(1)
    with pytest.raises(UserError, match="same score"):
        normalisation(torch.ones(3))


# ---------------------------------------------------------------------------------------------------------------------
# The score does not depend on padding


@pytest.mark.parametrize("attn_impl", ["sdpa", "triton"])  # triton: the flash kernel under the CPU interpreter
def test_score_ignores_padding(attn_impl, monkeypatch):
    import kernels.flash_attention
    calls = []
    real = kernels.flash_attention.flash_attention
    monkeypatch.setattr(kernels.flash_attention, "flash_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    gpt, tok = tiny_gpt()
    gpt.config.attn_impl = attn_impl
    torch.manual_seed(1)
    rm = RewardModel(gpt).eval()
    seqs = [[5, 6, 7, tok.eos_id], [8, 9, 10, 11, 12, 13, 14, tok.eos_id], [15, tok.eos_id]]
    alone = torch.stack([rm(torch.tensor([s]))[0] for s in seqs])
    with torch.no_grad():
        for side in ("left", "right"):
            for extra in (0, 5):
                ids, mask = pad_sequences(seqs, tok.pad_id, side=side, length=8 + extra)
                assert torch.allclose(rm(ids, mask), alone, atol=1e-5), (side, extra)
    texts = (["Say cat:", "Say dog, please, now:"], [" a cat.", " a good and lovely dog."])
    left = score_texts(rm, tok, *texts, padding_side="left")
    right = score_texts(rm, tok, *texts, padding_side="right", batch_size=1)
    assert torch.allclose(left, right, atol=1e-5)
    assert bool(calls) == (attn_impl == "triton")


# ---------------------------------------------------------------------------------------------------------------------
# Scripts


@pytest.fixture(scope="module")
def sft_then_rm(tmp_path_factory):
    """SFT on the toy demonstrations, then a reward model from it on the toy preferences."""
    tmp = tmp_path_factory.mktemp("chain")
    sft = run_script(train_sft, TINY + ["--data", sft_data(tmp / "sft.jsonl", 40), "--out", tmp / "sft",
                                        "--max-steps", 40, "--lr", 3e-3, "--batch-size", 8, "--eval-every", 0,
                                        "--samples", 0])
    rm = run_script(train_rm, ["--init", sft, "--data", toy_preferences(tmp / "prefs.jsonl"), "--out", tmp / "rm",
                               "--max-steps", 40, "--lr", 1e-3, "--val-fraction", 0.25, "--eval-every", 20])
    return tmp, sft, rm


def test_end_to_end_sft_then_rm(sft_then_rm):
    tmp, sft, rm = sft_then_rm
    losses = [r["loss"] for r in metrics_of(tmp / "sft") if "loss" in r]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5  # SFT loss falls
    assert read_meta(sft)["stage"] == "sft" and read_meta(rm)["stage"] == "rm"
    evals = [r for r in metrics_of(tmp / "rm") if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [20, 40] and evals[-1]["val_pairs"] >= 20
    assert evals[-1]["val_accuracy"] >= 0.9  # chance is 0.5


def training_sequences(tmp, tok):
    """prompt + response + EOS of every training response, from the split train_rm.py made (val fraction 0.25)."""
    options = dict(max_len=64, truncate_prompts=False, likert_loss="regression", score_scale=None)
    records, _ = split_holdout(read_preferences(tmp / "prefs.jsonl"), 0.25, 0, "x",
                               key=lambda r: holdout_key(r, "regression"))
    return [s for g in build_groups(records, tok, truncations=Truncations(), **options) for s in g.seqs], records


def test_rm_normalisation_is_stored_and_applied(sft_then_rm):
    """By default the gain and bias make the SFT policy's own samples score mean 0, std 1: samples drawn again here
    from the SFT checkpoint (not from the trained trunk, whose tied output layer has moved) with the same settings."""
    tmp, sft_dir, rm_dir = sft_then_rm
    rm, tok = load_reward_model(rm_dir)
    seqs, records = training_sequences(tmp, tok)
    policy, _ = load_policy(sft_dir)
    samples, n_cut = reward.sample_policy(policy, tok, [r["prompt"] for r in records], n=256, temperature=0.7,
                                          max_new_tokens=24, max_len=64, seed=0)
    assert n_cut == 0 and len(samples) == 256
    scores = score_sequences(rm, [s.ids for s in samples], tok.pad_id)
    assert float(scores.mean()) == pytest.approx(0, abs=1e-4)
    assert float(scores.std(unbiased=False)) == pytest.approx(1, abs=1e-4)
    written = [json.loads(line) for line in (tmp / "rm" / "normalisation_samples.jsonl").read_text().splitlines()]
    assert [(w["prompt"], w["response"], w["ended"]) for w in written] == [(s.prompt, s.response, s.ended)
                                                                           for s in samples]
    assert [w["score"] for w in written] == pytest.approx(scores.tolist(), abs=1e-4)
    metrics = read_meta(rm_dir)["metrics"]  # the training responses, in the policy's units
    responses = score_sequences(rm, seqs, tok.pad_id)
    assert metrics["train_responses_mean"] == pytest.approx(float(responses.mean()), abs=1e-4)
    assert metrics["train_responses_std"] == pytest.approx(float(responses.std(unbiased=False)), abs=1e-4)
    good, bad = reward.main(reward.ScoreConfig(model=str(rm_dir), prompt=["Say dog:"],
                                               response=[" a lovely dog.", " a ugly dog."]))
    assert good > bad
    assert (good, bad) == pytest.approx(score_texts(rm, tok, ["Say dog:"] * 2, [" a lovely dog.", " a ugly dog."])
                                        .tolist(), abs=1e-6)


def test_rm_normalised_on_the_training_responses(sft_then_rm, tmp_path):
    """--normalise-on responses, run with --overwrite over a default run: the training responses score N(0, 1), and
    the earlier run's normalisation_samples.jsonl does not stay behind to describe another normalisation."""
    tmp, sft_dir, _ = sft_then_rm
    args = ["--init", sft_dir, "--data", tmp / "prefs.jsonl", "--out", tmp_path / "rm", "--max-steps", 2,
            "--val-fraction", 0.25, "--eval-every", 0]
    run_script(train_rm, args)
    assert (tmp_path / "rm" / "normalisation_samples.jsonl").is_file()
    out = run_script(train_rm, args + ["--overwrite", "--normalise-on", "responses"])
    rm, tok = load_reward_model(out)
    scores = score_sequences(rm, training_sequences(tmp, tok)[0], tok.pad_id)
    assert float(scores.mean()) == pytest.approx(0, abs=1e-4)
    assert float(scores.std(unbiased=False)) == pytest.approx(1, abs=1e-4)
    assert not (tmp_path / "rm" / "normalisation_samples.jsonl").exists()


def test_sample_policy_cycles_prompts_and_keeps_responses_as_ppo_scores_them():
    """A policy that always writes token 7 (never EOS): every response is 5 x 7 with no EOS added (train_ppo.py reads
    a response that ran out of tokens at its last token); each distinct prompt is used once per pass; a prompt too
    long for the context keeps its end."""
    gpt, tok = tiny_gpt()
    with torch.no_grad():  # every hidden state points at token 7
        gpt.transformer.ln_f.weight.zero_()
        gpt.transformer.ln_f.bias.copy_(gpt.transformer.wte.weight[7] * 1e4)
    long_prompt = " cat" * 60
    prompts = ["Say cat:", "Say dog:", "Say cat:", long_prompt]  # three distinct
    samples, n_cut = reward.sample_policy(gpt, tok, prompts, n=7, temperature=0.7, max_new_tokens=5, max_len=64,
                                          seed=1, batch_size=3)
    assert [s.prompt for s in samples[:3]].count("Say cat:") == 1 and len({s.prompt for s in samples[:3]}) == 3
    assert {s.prompt for s in samples[3:6]} == set(prompts)
    assert n_cut == sum(s.prompt == long_prompt for s in samples) >= 2
    for s in samples:
        ids = tok.encode_prompt(s.prompt)[-(64 - 5 - 1):]
        assert s.ids == ids + [7] * 5 and not s.ended and s.response == tok.decode([7] * 5)


def test_policy_expected_rm_given(sft_then_rm, tmp_path, capsys):
    _, _, rm_dir = sft_then_rm
    for module, data in ((train_rm, toy_preferences(tmp_path / "p.jsonl")),
                         (train_sft, sft_data(tmp_path / "s.jsonl"))):
        with pytest.raises(SystemExit) as e:
            run(module.main, module.Config, ["--init", rm_dir, "--data", str(data), "--out", str(tmp_path / "out")])
        assert e.value.code == 2 and "is a 'rm' checkpoint; a policy" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_likert_regression_learns_from_one_response_per_prompt(tmp_path):
    """Movie-sentence style data: each prompt (here empty) has one rated response; accuracy over held-out pairs."""
    rnd = random.Random(0)
    records = []
    for i in range(80):
        k = rnd.randint(-2, 2)
        words = rnd.sample(GOOD, k) if k > 0 else rnd.sample(BAD, -k)
        records.append({"prompt": "", "response": " the " + " ".join(words + [rnd.choice(ANIMALS)]), "score": k * 2})
    data = write_jsonl(tmp_path / "likert.jsonl", records)
    out = run_script(train_rm, TINY + ["--data", data, "--out", tmp_path / "rm", "--score-scale=-4,4",
                                       "--max-steps", 60, "--lr", 3e-3, "--val-fraction", 0.25, "--eval-min-gap", 2,
                                       "--eval-every", 0])
    [final] = [r for r in metrics_of(tmp_path / "rm") if "val_accuracy" in r]
    assert final["val_pairs"] > 100 and final["val_accuracy"] >= 0.8
    assert read_meta(out)["metrics"]["val_accuracy"] == final["val_accuracy"]


def test_rm_resume_equals_uninterrupted(tmp_path, monkeypatch):
    data = toy_preferences(tmp_path / "prefs.jsonl", n=12)
    args = TINY + ["--data", data, "--max-steps", 4, "--batch-size", 2, "--grad-accum", 2, "--dropout", 0.1,
                   "--lr", 1e-3, "--val-fraction", 0.2, "--eval-every", 2, "--save-every", 2]
    run_script(train_rm, args + ["--out", tmp_path / "a"])
    run_until_first_save_crashes(train_rm, args + ["--out", tmp_path / "b"], monkeypatch)
    run_script(train_rm, args + ["--out", tmp_path / "b", "--resume"])
    a, b = metrics_of(tmp_path / "a"), metrics_of(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 2, 3, 4, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "val_loss", "val_accuracy"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)
    assert read_meta(tmp_path / "b")["metrics"]["gain"] == pytest.approx(read_meta(tmp_path / "a")["metrics"]["gain"])


def test_likert_scale_written_on_the_records(tmp_path, capsys):
    """Human-mode labels carry "scale": [lo, hi]; train_rm.py uses it when --score-scale is not given, and only when
    every score record agrees."""
    records = [{"prompt": f"Say {a}:", "response": f" a {w} {a}.", "score": s, "scale": [1, 7]}
               for a in ANIMALS for w, s in (("good", 7), ("bad", 1))]
    data = write_jsonl(tmp_path / "labels.jsonl", records)
    run_script(train_rm, TINY + ["--data", data, "--out", tmp_path / "rm", "--max-steps", 1, "--eval-every", 0,
                                 "--likert-loss", "pairs"])
    assert "Likert scale 1,7: written on the score records" in capsys.readouterr().out
    assert reward.recorded_scale(read_preferences(data)) == (1.0, 7.0)
    records[3]["scale"] = [1, 5]
    assert reward.recorded_scale(read_preferences(write_jsonl(tmp_path / "mixed.jsonl", records))) is None


def test_holdout_unit_is_the_prompt_except_for_likert_regression():
    comparison = {"kind": "comparison", "prompt": "p", "chosen": "a", "rejected": "b"}
    score = {"kind": "score", "prompt": "p", "response": "a", "score": 3}
    assert holdout_key(comparison, "regression") == holdout_key(score, "pairs") == "p"
    assert holdout_key(score, "regression") is None


def test_rm_counts_truncations_per_side(tmp_path):
    """Ten prompts, each with one over-long response: the held-out prompts' cuts are counted as held-out ones."""
    records = [{"prompt": f"Say {a}{i}:", "chosen": " cat" * 80, "rejected": " dog."}
               for i, a in enumerate(ANIMALS + ANIMALS[:4])]
    data = write_jsonl(tmp_path / "long.jsonl", records)
    out = run_script(train_rm, TINY + ["--data", data, "--out", tmp_path / "rm", "--val-fraction", 0.2,
                                       "--max-steps", 1, "--eval-every", 0])
    metrics = read_meta(out)["metrics"]
    assert (metrics["train_truncated_responses"], metrics["val_truncated_responses"]) == (8, 2)


@pytest.mark.parametrize("extra, message", [
    (["--normalise-on", "responses"], "{data}: the training data gives 1 response; the reward's normalisation (mean 0, "
                                      "std 1 over the training responses) needs at least 2"),
    (["--normalise-samples", "1"], "--normalise-samples must be at least 2, got 1"),
    (["--max-len", "20"], "--normalise-max-new-tokens 24: must be between 1 and 18, to leave room for a prompt and an "
                          "EOS in 20 tokens (the context, or --max-len)"),
])
def test_rm_normalisation_flags_are_checked_before_training(tmp_path, capsys, extra, message):
    data = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "response": "a", "score": 3}])
    with pytest.raises(SystemExit) as e:
        run(train_rm.main, train_rm.Config, [str(a) for a in TINY + ["--data", data, "--out", tmp_path / "out",
                                                                      "--score-scale", "1,7", "--val-fraction", 0]
                                             + extra])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: " + message.format(data=data) + "\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("record, extra, message", [
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 2]}, [], ":2: field 'ranking'"),
    ({"prompt": "p", "response": "a", "score": 9}, ["--score-scale", "1,7"], ":2: field 'score': 9 is outside"),
    ({"prompt": "p", "response": "a", "score": 5}, [], ":2: field 'score': score records need --score-scale"),
    ({"prompt": "p " * 70, "chosen": "a", "rejected": "b"}, [], ":2: field 'prompt': 71 tokens do not fit"),
])
def test_rm_bad_input_stops_before_training(tmp_path, capsys, record, extra, message):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(SystemExit) as e:
        run(train_rm.main, train_rm.Config, [str(a) for a in TINY + ["--data", data, "--out", tmp_path / "out"]]
            + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}{message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_rm_names_its_default_init_when_it_is_missing(tmp_path, capsys, monkeypatch):
    """Run where no out/sft exists, without --init: the error names the default and the flag, before --out is
    touched."""
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(SystemExit) as e:
        run(train_rm.main, train_rm.Config, ["--data", str(data), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --init defaults to out/sft, which does not exist: pass --init with the "
                                       "SFT checkpoint to start from (or any GPT-2: a hub name or a Hugging Face "
                                       "folder; or 'scratch')\n")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Scoring order and eval mode, ties, the held-out loss, the normalisation samples, gradient accumulation and the
# held-out split of train_rm.py


def dropout_rm(seed=0):
    """A tiny reward model with heavy dropout, in training mode: scores differ from call to call unless dropout is
    off."""
    torch.manual_seed(seed)
    tok = get_tokenizer("gpt2-1k")
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_layer=2, n_head=2, n_embd=32, dropout=0.5,
                        tokenizer="gpt2-1k", attn_impl="torch"))
    rm = RewardModel(gpt)
    with torch.no_grad():
        rm.gain.fill_(2.0)
        rm.bias.fill_(-0.5)
    return rm.train(), tok


def test_score_sequences_keeps_the_given_order_in_eval_mode():
    """score_sequences batches by length but must return the scores in the order given (longest first here, so the
    length order differs), computed with dropout off (eval mode), and leave a training model in training mode.
    Reference: each sequence scored alone by the model in eval mode; raw = the head output, normalised = 2 raw - 0.5."""
    rm, tok = dropout_rm()
    seqs = [[8, 9, 10, 11, 12, 13, 14, tok.eos_id], [15, tok.eos_id], [5, 6, 7, tok.eos_id],
            [20, 21, 22, 23, tok.eos_id]]
    rm.eval()
    with torch.no_grad():
        alone = torch.stack([rm.raw_score(torch.tensor([s]))[0] for s in seqs])
    rm.train()
    raw = score_sequences(rm, seqs, tok.pad_id, batch_size=3, raw=True)
    assert rm.training
    torch.testing.assert_close(raw, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(score_sequences(rm, seqs, tok.pad_id, batch_size=3), 2 * alone - 0.5, atol=1e-5, rtol=0)


def test_a_tied_pair_counts_one_half():
    """The per-pair accuracy terms of preference_loss: ordered right 1, wrong 0, tied 0.5 (like the held-out
    accuracy), and a tie costs log 2 in the loss."""
    batch = collate_groups([Group("f:1", [[1], [2]], [(0, 1)]), Group("f:2", [[3], [4]], [(0, 1)]),
                            Group("f:3", [[5], [6]], [(0, 1)])], pad_id=99)
    loss, correct = preference_loss(torch.tensor([1.0, 0.0, 0.3, 0.3, 0.0, 2.0]), batch)
    assert correct.tolist() == [1.0, 0.5, 0.0]
    nll = lambda d: math.log(1 + math.exp(-d))  # noqa: E731
    assert loss.item() == pytest.approx(nll(1.0) + math.log(2) + nll(-2.0), rel=1e-6)


def test_held_out_loss_and_accuracy_use_raw_scores_with_dropout_off():
    """train_rm.evaluate reports the held-out loss on the raw scores (the scale the training loss is on; after a
    --save-every checkpoint the model carries a gain and bias that must not leak into it), as the mean over groups,
    with dropout off. Reference: each response scored alone in eval mode, the Bradley-Terry and regression losses
    written out by hand."""
    rm, tok = dropout_rm(seed=1)
    groups = [Group("f:1", [[5, 6, tok.eos_id], [7, 8, 9, tok.eos_id], [10, tok.eos_id]], ranking_pairs([1, 0, 2])),
              Group("f:2", [[11, 12, tok.eos_id], [13, 14, 15, 16, tok.eos_id]], [(1, 0)]),
              Group("f:3", [[17, tok.eos_id]], targets=[0.5], scores=[5])]
    rm.eval()
    with torch.no_grad():
        r = [[rm.raw_score(torch.tensor([s]))[0].item() for s in g.seqs] for g in groups]
    rm.train()
    nll = lambda d: math.log(1 + math.exp(-d))  # noqa: E731
    ranking = (nll(r[0][1] - r[0][0]) + nll(r[0][1] - r[0][2]) + nll(r[0][0] - r[0][2])) / 3
    expected = (ranking + nll(r[1][1] - r[1][0]) + (r[2][0] - 0.5) ** 2) / 3
    pairs = [r[0][1] > r[0][0], r[0][1] > r[0][2], r[0][0] > r[0][2], r[1][1] > r[1][0]]
    cfg = train_rm.Config(batch_size=2)
    result = train_rm.evaluate(rm, groups, cfg, tok.pad_id)
    assert result["val_loss"] == pytest.approx(expected, rel=1e-4)
    assert result["val_accuracy"] == pytest.approx(sum(pairs) / 4) and result["val_pairs"] == 4
    assert rm.training


def test_normalisation_samples_are_a_shuffled_pass_over_the_prompts():
    """sample_policy draws every distinct prompt once per pass, each pass in a random order from the seed: with fewer
    samples than prompts, different seeds pick different prompts (not always the first ones in sorted order), and a
    pass never repeats a prompt."""
    gpt, tok = tiny_gpt()
    prompts = [f"Say {a}{i}:" for i, a in enumerate(ANIMALS * 2)]  # 12 distinct
    picked = []
    for seed in range(4):
        samples, _ = reward.sample_policy(gpt, tok, prompts, n=4, temperature=1.0, max_new_tokens=1, max_len=64,
                                          seed=seed)
        chosen = [s.prompt for s in samples]
        assert len(set(chosen)) == 4 and set(chosen) <= set(prompts)
        picked.append(tuple(chosen))
    assert len(set(picked)) > 1 and len({p for c in picked for p in c}) > 4


def test_rm_gradient_accumulation_equals_one_large_batch(tmp_path):
    """Each micro-batch's summed group loss is divided by the groups of the whole optimizer step, so 2 micro-batches
    of 2 groups (rankings and comparisons mixed) train like one batch of 4: the same logged losses and gradient norms
    (no clipping, no dropout)."""
    data = toy_preferences(tmp_path / "prefs.jsonl", n=12)
    args = TINY + ["--data", data, "--max-steps", 2, "--val-fraction", 0, "--lr", 1e-3, "--grad-clip", 0,
                   "--normalise-on", "responses"]
    run_script(train_rm, args + ["--batch-size", 4, "--grad-accum", 1, "--out", tmp_path / "one"])
    run_script(train_rm, args + ["--batch-size", 2, "--grad-accum", 2, "--out", tmp_path / "accum"])
    one, accum = metrics_of(tmp_path / "one"), metrics_of(tmp_path / "accum")
    assert len(one) == len(accum) == 2
    for key in ("loss", "grad_norm", "accuracy"):
        assert [r[key] for r in accum] == pytest.approx([r[key] for r in one], rel=1e-5), key


def test_rm_holds_out_whole_prompts(tmp_path, monkeypatch):
    """train_rm.py's held-out split keeps every record of a prompt on one side (comparisons of one prompt are
    correlated; a prompt on both sides would inflate the held-out accuracy): 4 prompts x 3 comparisons, 25% held out
    = exactly one whole prompt."""
    records = [{"prompt": f"Say {a}:", "chosen": f" a {g} {a}.", "rejected": f" a {b} {a}."}
               for a in ANIMALS[:4] for g, b in zip(GOOD[:3], BAD[:3])]
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    seen = []
    real = train_rm.build_groups
    monkeypatch.setattr(train_rm, "build_groups", lambda recs, *a, **k: seen.append(recs) or real(recs, *a, **k))
    run_script(train_rm, TINY + ["--data", data, "--out", tmp_path / "rm", "--max-steps", 1, "--eval-every", 0,
                                 "--val-fraction", 0.25, "--normalise-on", "responses"])
    train, val = seen
    assert len(val) == 3 and len({r["prompt"] for r in val}) == 1
    assert {r["prompt"] for r in val}.isdisjoint(r["prompt"] for r in train) and len(train) == 9


def test_score_texts_truncates_only_what_does_not_fit(capsys):
    """score_texts scores prompt + response + EOS whole when it fits the model's context (64 here, however long the
    pair), and cuts only a pair longer than that, by the shared rule (a short prompt stays, the response loses its end
    and its EOS), saying how many it cut. Reference: the model on the token ids written out by hand."""
    gpt, tok = tiny_gpt()
    torch.manual_seed(2)
    rm = RewardModel(gpt).eval()
    prompt, p = "Say cat:", tok.encode("Say cat:")
    fits, too_long = " cat" * 20, " cat" * 40  # 40 and 80 tokens (" cat" is two in gpt2-1k)
    assert len(tok.encode(fits)) == 40 and len(p) + 41 <= 64
    expected = [p + tok.encode(fits) + [tok.eos_id], p + tok.encode(too_long)[:64 - len(p)]]
    with torch.no_grad():
        reference = torch.stack([rm(torch.tensor([ids]))[0] for ids in expected])
    scores = score_texts(rm, tok, [prompt, prompt], [fits, too_long])
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)
    assert "warning: 1 of 2 (prompt, response) pairs are longer than the reward model's 64 tokens" in \
        capsys.readouterr().out


def test_sample_policy_keeps_the_eos_a_response_ends_with():
    """A policy that always writes EOS: every response is the lone EOS, kept in the ids the reward model reads (it
    scores a finished response at its EOS, as train_ppo.py does), marked ended, and decodes to the empty string."""
    gpt, tok = tiny_gpt()
    with torch.no_grad():  # every hidden state points at EOS
        gpt.transformer.ln_f.weight.zero_()
        gpt.transformer.ln_f.bias.copy_(gpt.transformer.wte.weight[tok.eos_id] * 1e4)
    samples, _ = reward.sample_policy(gpt, tok, ["Say cat:", "Say dog:"], n=3, temperature=0.7, max_new_tokens=5,
                                      max_len=64, seed=0)
    for s in samples:
        assert s.ids == tok.encode_prompt(s.prompt) + [tok.eos_id] and s.ended and s.response == ""
