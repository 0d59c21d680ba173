"""Data: validation errors name file:line:field, pair tokenization and truncation (hand-worked with a character
tokenizer), text splitting without loss, the held-out split and the resumable data order."""
import json

import pytest

from minirlhf.config import UserError
from minirlhf.data import (DataOrder, EncodedPair, Truncations, encode_checked, encode_pair, read_preferences,
                           read_sft, split_holdout, split_text)
from minirlhf.tokenizer import Tokenizer


class CharTokenizer:
    """One token per character (its code point), EOS = 0: makes truncation easy to work out by hand."""

    eos_id = 0
    encode_prompt = Tokenizer.encode_prompt  # the real convention (an empty prompt is [EOS]) over this encode

    def encode(self, text):
        return [ord(c) for c in text]


def ids(text):
    return [ord(c) for c in text]


EOS = CharTokenizer.eos_id


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return p


# ---------------------------------------------------------------------------------------------------------------------
# encode_pair


def test_encode_pair_fits():
    pair = encode_pair(CharTokenizer(), "ab", "cd", max_len=5)
    assert pair == EncodedPair(ids("abcd") + [EOS], 2, False, False)
    assert encode_pair(CharTokenizer(), "ab", "cd", 5, add_eos=False).ids == ids("abcd")


def test_encode_pair_cuts_response_from_the_right_with_its_eos():
    # prompt 2 + response 6 + EOS = 9 > 6: the short prompt stays, the response keeps 6 - 2 = 4 tokens, no EOS
    pair = encode_pair(CharTokenizer(), "ab", "cdefgh", max_len=6)
    assert pair == EncodedPair(ids("abcdef"), 2, False, True)


def test_encode_pair_cuts_long_prompt_from_the_left():
    # prompt 8 + "xy" + EOS = 11 > 6: the response needs 3 <= max(6 - 8, 6 // 2) = 3, so the prompt keeps its last 3
    pair = encode_pair(CharTokenizer(), "abcdefgh", "xy", max_len=6)
    assert pair == EncodedPair(ids("fghxy") + [EOS], 3, True, False)


def test_encode_pair_cuts_both_sides():
    # prompt 8, response 8 + EOS, max 6: the response gets half the context (3), the prompt the other 3
    pair = encode_pair(CharTokenizer(), "abcdefgh", "stuvwxyz", max_len=6)
    assert pair == EncodedPair(ids("fghstu"), 3, True, True)


def test_encode_checked_refuses_prompt_truncation_unless_allowed():
    record = {"prompt": "abcdefgh", "where": "f.jsonl:7"}
    with pytest.raises(UserError, match=r"^f\.jsonl:7: field 'prompt': 8 tokens .* --truncate-prompts"):
        encode_checked(CharTokenizer(), record, "xy", max_len=6, truncate_prompts=False, truncations=Truncations())
    counts = Truncations()
    pair = encode_checked(CharTokenizer(), record, "xy", max_len=6, truncate_prompts=True, truncations=counts)
    assert pair.n_prompt == 3 and (counts.total, counts.prompt, counts.response) == (1, 1, 0)
    encode_checked(CharTokenizer(), record, "stuvwxyz", max_len=6, truncate_prompts=True, truncations=counts)
    assert (counts.total, counts.prompt, counts.response) == (2, 2, 1)
    summary = counts.summary("train", 6)
    assert "2 prompts truncated from the left" in summary and "1 responses truncated from the right" in summary
    assert counts.as_metrics("train")["train_truncated_responses"] == 1


def test_split_text_drops_nothing():
    seq = list(range(10))
    chunks = split_text(seq, 4)
    assert chunks == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    targets = [t for c in chunks for t in c[1:]]  # what the loss sees: every token after a window's first
    assert targets == seq[1:]
    assert split_text(seq, 10) == [seq]
    assert [t for c in split_text(list(range(11)), 4) for t in c[1:]] == list(range(1, 11))


# ---------------------------------------------------------------------------------------------------------------------
# Held-out split and data order


def test_split_holdout_is_fixed_and_disjoint():
    items = list(range(20))
    train, val = split_holdout(items, 0.25, seed=3, what="x")
    assert len(val) == 5 and sorted(train + val) == items
    assert (train, val) == split_holdout(items, 0.25, seed=3, what="x")
    assert val != split_holdout(items, 0.25, seed=4, what="x")[1]
    assert split_holdout(items, 0.0, 0, "x") == (items, [])
    assert len(split_holdout(items[:3], 0.01, 0, "x")[1]) == 1  # at least one held out
    assert len(split_holdout(items[:10], 0.29, 0, "x")[1]) == 3  # the nearest whole number: 2.9 -> 3, not 2
    with pytest.raises(UserError, match="too few"):
        split_holdout(items[:1], 0.5, 0, "data.jsonl")


def test_split_holdout_keeps_a_prompt_on_one_side():
    items = [{"prompt": f"p{i % 7}", "i": i} for i in range(28)] + [{"prompt": None, "i": 100 + j} for j in range(3)]
    train, val = split_holdout(items, 0.3, 0, "x", key=lambda r: r["prompt"])
    assert sorted(r["i"] for r in train + val) == sorted(r["i"] for r in items)  # nothing lost, nothing twice
    val_prompts = {r["prompt"] for r in val} - {None}
    assert val_prompts.isdisjoint(r["prompt"] for r in train)
    assert len(val_prompts) + sum(r["prompt"] is None for r in val) == 3  # 30% of 10 units: 7 prompts, 3 unkeyed
    assert [r["i"] for r in val] == sorted(r["i"] for r in val)  # the file's order is kept
    with pytest.raises(UserError, match=r"1 distinct prompts are too few .*--val-fraction 0"):
        split_holdout([{"prompt": "same"}] * 5, 0.2, 0, "data.jsonl", key=lambda r: r["prompt"])


def test_data_order_epochs_and_resume():
    order = DataOrder(5, seed=1)
    stream = order.take(0, 12)
    assert sorted(stream[:5]) == sorted(stream[5:10]) == list(range(5))  # each epoch a permutation
    assert stream[:5] != stream[5:10]  # reshuffled (for this seed)
    assert DataOrder(5, seed=1).take(7, 5) == stream[7:12]  # a fresh object at a position: what --resume sees
    assert DataOrder(5, seed=2).take(0, 5) != stream[:5]


# ---------------------------------------------------------------------------------------------------------------------
# Validation errors name file, line and field


@pytest.mark.parametrize("lines, message", [
    ([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": 3}],
     r":2: field 'response': expected str, got int"),
    ([{"prompt": "a"}], r":1: record has fields \['prompt'\]; expected"),
    ([{"prompt": "a", "response": None}], r":1: field 'response' is null: write a str there, or drop the line"),
    (["", "{not json"], r":2: not valid JSON"),
    (["[1, 2]"], r":1: expected a JSON object"),
])
def test_sft_reader_errors(tmp_path, lines, message):
    p = write(tmp_path, lines)
    with pytest.raises(UserError, match=f"^{p}{message}"):
        read_sft(p)


def test_reader_empty_and_non_utf8(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match=f"^{empty}: empty"):
        read_sft(empty)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=f"^{bad}:2: not valid UTF-8"):
        read_sft(bad)
    bom = tmp_path / "bom.jsonl"  # some editors start a UTF-8 file with a byte-order mark
    bom.write_bytes('{"text": "a"}\n{"text": "b"}\n'.encode("utf-8-sig"))
    assert [r["text"] for r in read_sft(bom)] == ["a", "b"]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, "field 'ranking': .* not a permutation"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]}, "field 'ranking': .* not a permutation"),
    ({"prompt": "p", "responses": ["a", 1], "ranking": [0, 1]}, r"field 'responses'\[1\]: expected str"),
    ({"prompt": "p", "response": "a", "score": "7"}, "field 'score': expected int or float, got str"),
    ({"prompt": "p", "response": "a", "score": True}, "field 'score': expected int or float, got bool"),  # not 1
    ({"prompt": "p", "responses": ["a"], "ranking": [0]}, "field 'responses': a ranking needs at least 2 responses"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [True, False]}, "field 'ranking': .* not a permutation"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "fields 'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "responses": [" x", " y", " x"], "ranking": [0, 1, 2]}, r"field 'responses': \[0\] and \[2\] are "
                                                                             "identical"),
])
def test_preference_reader_errors(tmp_path, record, message):
    p = write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(UserError, match=f"^{p}:2: {message}"):
        read_preferences(p)
