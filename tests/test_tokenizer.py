"""The offline GPT-2 tokenizer: known ids, round trips, PAD != EOS, truncated vocabularies, and the hash check."""
import gzip

import pytest

from minirlhf.config import UserError
from minirlhf.tokenizer import get_tokenizer, load_ranks, pad_sequences


def test_known_gpt2_ids():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.vocab_size == 50257 and tok.eos_id == 50256


@pytest.mark.parametrize("text", ["", "  leading and trailing  ", "tabs\tand\nnewlines\n\n", "naïve café — 東京 🚀",
                                  "<|endoftext|> is plain text here", "x" * 300])
def test_round_trip(text):
    for name in ("gpt2", "gpt2-1k"):
        tok = get_tokenizer(name)
        assert tok.decode(tok.encode(text)) == text


def test_special_token_text_is_not_eos():
    tok = get_tokenizer("gpt2")
    assert tok.eos_id not in tok.encode("<|endoftext|>")


def test_pad_is_never_eos_and_decode_drops_it():
    for name in ("gpt2", "gpt2-8k"):
        tok = get_tokenizer(name)
        assert tok.pad_id != tok.eos_id and tok.pad_id >= tok.vocab_size
        ids = tok.encode("Hi there") + [tok.eos_id] + tok.encode(" after")
        assert tok.decode([tok.pad_id] + ids) == "Hi there<|endoftext|> after"
        assert tok.decode(ids, stop_at_eos=True) == "Hi there"


def test_truncated_vocabulary_uses_only_low_ranks():
    full, small = get_tokenizer("gpt2"), get_tokenizer("gpt2-8k")
    assert small.vocab_size == 8193 and small.eos_id == 8192
    text = "This movie is a wonderfully charming, unpretentious delight."
    ids = small.encode(text)
    assert max(ids) < 8192 and len(ids) >= len(full.encode(text))
    # Tokens of the first ranks are shared: a common word keeps its GPT-2 id.
    assert small.encode(" the") == full.encode(" the")


def test_bad_tokenizer_names():
    for name in ("bert", "gpt2-10", "gpt2-100k"):
        with pytest.raises(UserError):
            get_tokenizer(name)


def test_corrupted_vocabulary_fails_loudly(tmp_path):
    from minirlhf.tokenizer import VOCAB_FILE

    raw = bytearray(gzip.decompress(VOCAB_FILE.read_bytes()))
    raw[100] ^= 1  # one flipped bit
    bad = tmp_path / "gpt2.tiktoken.gz"
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(UserError, match="corrupted"):
        load_ranks(bad)
    (tmp_path / "junk.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot read"):
        load_ranks(tmp_path / "junk.gz")


def test_pad_sequences_left_and_right():
    ids, mask = pad_sequences([[1, 2, 3], [4]], pad_id=9, side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_sequences([[1, 2, 3], [4]], pad_id=9, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
