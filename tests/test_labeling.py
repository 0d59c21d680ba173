"""Human mode: a labelling session driven by piped input writes exactly the expected JSONL records, keeps what was
entered when the input stops midway, resumes without showing done prompts again, and its files load in the trainers'
readers (and trainers, for one step)."""
import io
import json
import pathlib
import subprocess
import sys

import pytest
import torch

from minirlhf.redteaming.attacks import Attack
from minirlhf.checkpoint import save_checkpoint
from minirlhf.config import UserError
from minirlhf.data import read_preferences, read_sft
from minirlhf.redteaming.judges import Sample
from minirlhf.redteaming.labeling import join_response, label, parse_flags, parse_likert, parse_ranking, parse_score
from minirlhf.model import GPT, GPTConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = [Attack("p1", "cat1"), Attack("p2", "cat2"), Attack("p3 ", "cat3")]


def respond(prompt):
    """Three fixed responses per prompt, from two made-up policies; the third repeats the first (shown once)."""
    return [Sample(prompt, f" A({prompt})", [1], True, policy="pol"),
            Sample(prompt, f" B({prompt})", [2, 3], False, policy="cmp"),
            Sample(prompt, f" A({prompt})", [1], True, policy="pol")]


def session(tmp_path, typed, likert=None):
    out = io.StringIO()
    counts = label(PROMPTS, respond, tmp_path, likert=likert, stdin=io.StringIO(typed), stdout=out)
    return counts, out.getvalue()


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_piped_session_writes_exact_records(tmp_path):
    typed = "\n".join([
        "",  # label p1
        "2=insult",  # response 2 fails
        "2 1",  # ranking: 2 best
        "A kind reply.",  # ideal response (a space is added: the prompt does not end with one)
        "",  # label p2
        "",  # no failures
        "?",  # help
        "1 1",  # not a permutation: asked again
        "1 2",
        "",  # no ideal response
        ":skip",  # skip p3
    ]) + "\n"
    counts, shown = session(tmp_path, typed)
    assert records(tmp_path / "failures.jsonl") == [
        {"policy": "cmp", "category": "insult", "judge": "human", "score": 1.0, "reason": "flagged by a person",
         "prompt": "p1", "output": " B(p1)"}]
    assert records(tmp_path / "preferences.jsonl") == [
        {"prompt": "p1", "responses": [" A(p1)", " B(p1)"], "ranking": [1, 0], "category": "cat1",
         "policies": ["pol", "cmp"]},
        {"prompt": "p2", "responses": [" A(p2)", " B(p2)"], "ranking": [0, 1], "category": "cat2",
         "policies": ["pol", "cmp"]}]
    assert records(tmp_path / "demonstrations.jsonl") == [{"prompt": "p1", "response": " A kind reply.",
                                                           "category": "cat1"}]
    assert records(tmp_path / "done_prompts.jsonl") == [
        {"prompt": "p1", "category": "cat1", "status": "labelled"},
        {"prompt": "p2", "category": "cat2", "status": "labelled"},
        {"prompt": "p3 ", "category": "cat3", "status": "skipped"}]
    assert counts == {"failure": 1, "preference": 2, "demonstration": 1, "done": 3}
    assert "Commands (at any question)" in shown and "list each response number 1..2 exactly once" in shown
    assert "(3 responses sampled, 2 distinct" in shown and "[no EOS: cut at 2 tokens]" in shown
    # the files are what the trainers read
    assert [r["kind"] for r in read_preferences(tmp_path / "preferences.jsonl")] == ["ranking", "ranking"]
    assert read_sft(tmp_path / "demonstrations.jsonl")[0]["kind"] == "demonstration"


def test_interrupted_session_keeps_labels_and_resumes(tmp_path):
    counts, _ = session(tmp_path, "\n1\n1 2\nIdeal one\n\n2\n")  # input ends while p2 waits for its ranking
    assert counts == {"failure": 2, "preference": 1, "demonstration": 1, "done": 1}
    assert [r["prompt"] for r in records(tmp_path / "failures.jsonl")] == ["p1", "p2"]  # p2's flag was kept
    assert [r["prompt"] for r in records(tmp_path / "done_prompts.jsonl")] == ["p1"]

    counts, shown = session(tmp_path, "\n2 1\n\n:quit\n")  # rerun: p2 comes first, its flags are not asked again
    assert "Labelling 2 prompts (1 already done" in shown and "=== prompt 1 of 2 (category cat2)\np2\n" in shown
    assert "(resumed: the responses shown before" in shown and "Failures?" not in shown
    assert "p1" not in shown.split("already done")[1]
    assert counts == {"failure": 0, "preference": 1, "demonstration": 0, "done": 1}
    assert [(r["prompt"], r["ranking"]) for r in records(tmp_path / "preferences.jsonl")] == [("p1", [0, 1]),
                                                                                             ("p2", [1, 0])]
    assert [r["prompt"] for r in records(tmp_path / "done_prompts.jsonl")] == ["p1", "p2"]


def test_resume_shows_the_same_responses_not_new_samples(tmp_path):
    """The resume bug: a prompt interrupted after its flags were saved used to be sampled afresh on resume, so
    failures.jsonl kept a flag on an output nobody saw again, and the ranking entered then was of other texts. Now the
    responses shown are kept (shown_prompts.jsonl) and come back; the flags question is not asked twice (Likert
    scores already given neither)."""
    draws = iter(range(100))

    def fresh(prompt):  # a sampling policy: new texts at every call
        return [Sample(prompt, f" draw{next(draws)}", [1], True, policy="pol") for _ in range(2)]

    for likert, typed, resumed in ((None, "\n2\n", "1 2\n\n"), ((1, 5), "\n2\n4\n", "3\n\n")):
        out = tmp_path / f"likert{likert is not None}"
        label(PROMPTS[:1], fresh, out, likert=likert, stdin=io.StringIO(typed), stdout=io.StringIO())
        [flag] = records(out / "failures.jsonl")
        shown = io.StringIO()
        label(PROMPTS[:1], fresh, out, likert=likert, stdin=io.StringIO("\n" + resumed + ":quit\n"), stdout=shown)
        assert flag["output"] in shown.getvalue() and shown.getvalue().count("Failures?") == 0
        assert records(out / "failures.jsonl") == [flag]  # not asked again: no second flag
        prefs = records(out / "preferences.jsonl")
        texts = [t for p in prefs for t in p.get("responses", [p.get("response")])]
        assert flag["output"] in texts and all(t in shown.getvalue() for t in texts)
        assert [p.get("score") for p in prefs] == ([None] if likert is None else [4, 3])
        assert [r["status"] for r in records(out / "done_prompts.jsonl")] == ["labelled"]


def test_likert_scores_and_own_prompts(tmp_path):
    typed = "\n".join([
        "my own prompt",  # instead of p1 (which stays next)
        "", "9", "6", "",  # no flags; 9 is off the scale, so 6; response 2 unscored
        " ends with a space",  # ideal response already starts with a space
        "",  # now p1
        ":skip",  # skip it halfway
    ]) + "\n"
    counts, shown = session(tmp_path, typed, likert=(1, 7))
    assert "=== your prompt (the set's prompt 1 comes back next)\nmy own prompt\n" in shown  # headed as what it is
    assert "'9': give a whole number from 1 to 7" in shown
    assert records(tmp_path / "preferences.jsonl") == [
        {"prompt": "my own prompt", "response": " A(my own prompt)", "score": 6, "scale": [1, 7], "category": "own",
         "policy": "pol"}]
    assert records(tmp_path / "demonstrations.jsonl") == [
        {"prompt": "my own prompt", "response": " ends with a space", "category": "own"}]
    assert [(r["prompt"], r["status"]) for r in records(tmp_path / "done_prompts.jsonl")] == [
        ("my own prompt", "labelled"), ("p1", "skipped")]
    assert read_preferences(tmp_path / "preferences.jsonl")[0]["kind"] == "score"


def test_answer_parsers():
    assert parse_flags("1=insult 3", 3, "cat") == [(0, "insult"), (2, "cat")]
    assert parse_ranking("3, 1 2", 3) == [2, 0, 1]
    for bad in ("1 2", "1 2 2", "0 1 2", "a b c"):
        with pytest.raises(ValueError):
            parse_ranking(bad, 3)
    with pytest.raises(ValueError, match="from 1 to 2"):
        parse_flags("3", 2, "cat")
    assert parse_likert("") is None and parse_likert("1,7") == (1, 7) and parse_likert("-3, 3") == (-3, 3)
    with pytest.raises(UserError, match="--likert"):
        parse_likert("7,1")
    assert join_response("The movie was", "great") == " great"
    assert join_response("Q:\n", "great") == "great" and join_response("", "great") == "great"


def test_human_mode_end_to_end_files_train(tmp_path):
    """redteam.py --mode human on a tiny checkpoint with piped stdin; the files then train train_sft.py and
    train_rm.py for one step."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=300, n_positions=64, n_layer=1, n_head=2, n_embd=32, tokenizer="gpt2-299")
    save_checkpoint(tmp_path / "sft", GPT(cfg), stage="sft", config=cfg)
    (tmp_path / "prompts.txt").write_text("The movie was\nI think\n")
    out = tmp_path / "labels"
    cmd = [sys.executable, str(ROOT / "redteam.py"), "--mode", "human", "--policy", str(tmp_path / "sft"),
           "--attack-file", str(tmp_path / "prompts.txt"), "--samples-per-prompt", "2", "--max-new-tokens", "4",
           "--out", str(out)]
    typed = "\n1\n2 1\nfun to watch.\n\n\n1 2\nI do.\n"
    result = subprocess.run(cmd, input=typed, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "=== prompt 2 of 2" in result.stdout and "Saved in" in result.stdout
    demos = read_sft(out / "demonstrations.jsonl")
    assert [(d["prompt"], d["response"]) for d in demos] == [("The movie was", " fun to watch."), ("I think", " I do.")]
    prefs = read_preferences(out / "preferences.jsonl")
    assert [p["prompt"] for p in prefs] == ["The movie was", "I think"] and all(len(p["responses"]) == 2 for p in prefs)
    assert len(records(out / "failures.jsonl")) == 1
    common = ["--init", str(tmp_path / "sft"), "--max-steps", "1", "--batch-size", "2", "--val-fraction", "0",
              "--device", "cpu", "--eval-every", "0"]
    for script, data, extra in (("train_sft.py", "demonstrations.jsonl", ["--samples", "0"]),
                                ("train_rm.py", "preferences.jsonl", [])):
        run = subprocess.run([sys.executable, str(ROOT / script), "--data", str(out / data),
                              "--out", str(tmp_path / script), *common, *extra],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert run.returncode == 0, (script, run.stderr[-2000:])
        assert (tmp_path / script / "model.safetensors").is_file()


def test_parsers_refuse_out_of_range_answers():
    """Boundaries of the answers a person types: response numbers start at 1 (a "0" would silently flag the last
    response through index -1), a Likert score may be either end of the scale but not beyond, and a scale needs
    low < high."""
    for bad in ("0", "0=insult"):
        with pytest.raises(ValueError, match="from 1 to 3"):
            parse_flags(bad, 3, "cat")
    assert [parse_score(s, (1, 7)) for s in ("1", "7", " 4 ")] == [1, 7, 4]
    assert parse_score("-2", (-3, 3)) == -2
    for bad in ("0", "8", "4.5", "x"):
        with pytest.raises(ValueError, match="from 1 to 7"):
            parse_score(bad, (1, 7))
    with pytest.raises(UserError, match="low < high"):
        parse_likert("3,3")


def test_typed_line_breaks_and_single_responses(tmp_path):
    """A typed "\\n" becomes a line break in the stored ideal response (the help promises it); a prompt whose
    samples are all one text is not ranked (a one-item ranking teaches the reward model nothing), so the next
    answer is the ideal response."""
    def same(prompt):
        return [Sample(prompt, " same", [1], True, policy="pol")] * 2

    out = io.StringIO()
    counts = label(PROMPTS[:1], same, tmp_path, stdin=io.StringIO("\n\nline one\\nline two\n:quit\n"), stdout=out)
    assert "(only one distinct response: nothing to rank)" in out.getvalue()
    assert records(tmp_path / "demonstrations.jsonl") == [{"prompt": "p1", "response": " line one\nline two",
                                                           "category": "cat1"}]
    assert counts == {"failure": 0, "preference": 0, "demonstration": 1, "done": 1}


def test_human_mode_with_compare_shows_outputs_blind(tmp_path, monkeypatch):
    """With --compare, human mode shows the K outputs of each policy shuffled together, so the person cannot tell
    which policy wrote which (the order is not always --policy's first). Policies and the session are stand-ins:
    only redteam.run_human's respond() is exercised."""
    import redteam

    class Stub:
        def __init__(self, name):
            self.name = name

        def respond(self, prompts):
            return [Sample(p, f"{self.name}{i}", [], True, policy=self.name) for i, p in enumerate(prompts)]

        def encode(self, prompt):  # (prompt ids, tokens cut): every prompt fits
            return [], 0

    seen = []
    monkeypatch.setattr(redteam, "load_policies", lambda cfg, device: [Stub("pol"), Stub("cmp")])
    monkeypatch.setattr(redteam, "label",
                        lambda attacks, respond, out, **kw: seen.extend(respond("x") for _ in range(8)))
    redteam.main(redteam.Config(mode="human", policy="unused", samples_per_prompt=3, out=str(tmp_path), device="cpu"))
    orders = [[s.policy for s in samples] for samples in seen]
    assert all(sorted(o) == ["cmp"] * 3 + ["pol"] * 3 for o in orders)
    assert any(o != ["pol"] * 3 + ["cmp"] * 3 for o in orders)


def test_human_mode_skips_built_in_prompts_too_long_for_the_model(tmp_path, monkeypatch, capsys):
    """The demo's model size (128-token context) with --max-new-tokens 32 leaves 96 tokens for a prompt: of the
    built-in battery, only its two longer-than-the-context attacks (LONG_PROMPT, "a" x 3000) exceed that, so they are
    skipped with a count; the same long prompt from the person's own file is kept. The session is a stand-in that
    records the prompts it gets."""
    import redteam
    from minirlhf.redteaming.attacks import BATTERY, LONG_PROMPT, battery
    from minirlhf.tokenizer import get_tokenizer

    vocab = get_tokenizer("gpt2-4k").vocab_size
    cfg = GPTConfig(vocab_size=vocab, n_positions=128, n_layer=1, n_head=2, n_embd=16, tokenizer="gpt2-4k")
    save_checkpoint(tmp_path / "sft", GPT(cfg), stage="sft", config=cfg)
    given = []
    monkeypatch.setattr(redteam, "label", lambda attacks, respond, out, **kw: given.append(attacks))
    common = dict(mode="human", policy=str(tmp_path / "sft"), max_new_tokens=32, device="cpu")
    redteam.main(redteam.Config(**common, out=str(tmp_path / "a")))
    long = [LONG_PROMPT, "a" * 3000]
    assert all(p in BATTERY["empty_and_long"] for p in long)
    assert [a.prompt for a in given[0]] == [a.prompt for a in battery() if a.prompt not in long]
    assert ("skipped 2 built-in prompt(s) longer than the 96 tokens left for a prompt in the context beside "
            "--max-new-tokens 32") in capsys.readouterr().out
    (tmp_path / "mine.txt").write_text(LONG_PROMPT.replace("\n", " ") + "\n")
    redteam.main(redteam.Config(**common, attack_file=[str(tmp_path / "mine.txt")], out=str(tmp_path / "b")))
    assert [a.prompt for a in given[1]] == [LONG_PROMPT.replace("\n", " ")]
    assert "skipped" not in capsys.readouterr().out


def test_a_prompt_cut_to_fit_the_context_is_said_so(tmp_path):
    """A typed prompt the model saw left-truncated (Sample.prompt_truncated = tokens dropped) is labelled with a note
    saying how many tokens it lost; a prompt that fitted gets none."""
    def cut(prompt):
        return [Sample(prompt, " a", [1], True, prompt_truncated=7 if prompt == "p1" else 0, policy="pol"),
                Sample(prompt, " b", [2], True, prompt_truncated=7 if prompt == "p1" else 0, policy="pol")]

    out = io.StringIO()
    label(PROMPTS[:2], cut, tmp_path, stdin=io.StringIO("\n\n\n\n\n\n\n\n:quit\n"), stdout=out)
    first, second = out.getvalue().split("=== prompt 2")
    note = "(the prompt is longer than the model's context allows: it saw the prompt without its first 7 tokens)"
    assert note in first and "context allows" not in second
