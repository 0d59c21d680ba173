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
    ids, mask = pad_sequences([[1, 2], []], pad_id=9, side="left", length=4)  # at least `length` columns
    assert ids.tolist() == [[9, 9, 1, 2], [9, 9, 9, 9]] and mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]


def test_empty_prompt_starts_from_eos():
    """An empty prompt is GPT-2's document boundary <|endoftext|> (id 50256), never PAD (whose logits and embedding
    are not trained); any other prompt is its plain encoding."""
    tok = get_tokenizer("gpt2")
    assert tok.encode_prompt("") == [50256]
    assert tok.encode_prompt("Hello world") == [15496, 995]


def test_recovered_merges_are_gpt2s_published_merges(tmp_path):
    """The files save_pretrained writes for "gpt2" hold GPT-2's own merges and vocabulary. Reference: GPT-2's published
    ``merges.txt`` and ``vocab.json`` (in the sdist ``openai-whisper==20230124`` as ``whisper/assets/gpt2/``, MIT): the
    sha256 of the merges after the header line, and of the vocabulary as ``json.dumps(vocab, sort_keys=True)``."""
    import hashlib
    import json

    from minirlhf.tokenizer import recover_merges

    full = get_tokenizer("gpt2")
    full.save_pretrained(tmp_path)
    header, merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n", 1)
    assert header == "#version: 0.2" and merges.startswith("\u0120 t\n\u0120 a\nh e\n") and merges.count("\n") == 50000
    assert hashlib.sha256(merges.encode()).hexdigest() == \
        "ac33235097fe06d4a8fff0feac994644809e6eb6ab70669e1e9fd40ae032428e"
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["\u0120the"] == 262 and vocab["<|endoftext|>"] == 50256
    assert hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest() == \
        "855ec41a9d90094ebb1189ee8082e915505cf2dfe0691a4f39da9c020f9476b2"
    # A truncated vocabulary has the first N - 256 merges; a table that is not a BPE is refused.
    assert get_tokenizer("gpt2-1k").merges == full.merges[:1024 - 256]
    single = {bytes([b]): b for b in range(256)}
    assert recover_merges({**single, b"ab": 256, b"abc": 257}) == [(b"a", b"b"), (b"ab", b"c")]
    with pytest.raises(ValueError, match="cannot be built"):
        recover_merges({**single, b"abc": 256})
    with pytest.raises(ValueError, match="single bytes first"):
        recover_merges({**single, b"ab": 300})
