"""`python -m minirlhf.export`: it never destroys a checkpoint or a non-empty directory by accident, and the tokenizer
it writes makes Hugging Face's GPT-2 tokenizer (the independent reference) encode exactly like ours."""
import json
import random

import pytest
import regex
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, GPT2Tokenizer, GPT2TokenizerFast

from minirlhf import export
from minirlhf.checkpoint import read_meta, save_checkpoint
from minirlhf.config import build_parser, run
from minirlhf.model import GPT, GPTConfig
from minirlhf.tokenizer import get_tokenizer


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=1025, n_positions=32, n_layer=1, n_head=2, n_embd=32, tokenizer="gpt2-1024"))
    save_checkpoint(tmp_path / "sft", m, stage="sft", config=m.config, step=7)
    return tmp_path / "sft"


def export_cli(*argv):
    return run(export.main, export.ExportConfig, [str(a) for a in argv])


def test_export_refuses_to_replace_a_checkpoint(checkpoint, capsys):
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as e:
            export_cli("--checkpoint", checkpoint, "--out", checkpoint, *extra)
        assert e.value.code == 2 and "holds a minirlhf checkpoint" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert read_meta(checkpoint)["step"] == 7


def test_export_into_a_non_empty_directory_needs_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        export_cli("--checkpoint", checkpoint, "--out", out)
    assert e.value.code == 2 and "is not empty; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_cli("--checkpoint", checkpoint, "--out", out, "--overwrite")
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "notes.txt"} <= {
        p.name for p in out.iterdir()}


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer: Hugging Face's GPT-2 tokenizer reading the exported files encodes like ours

TEXTS = [
    "Hello world", "", " ", "   ", " a", "  leading spaces", "trailing spaces   ", "many     spaces  between  words",
    "\n", "line one\nline two\n\n\nthree\n", "\t tabs\tand \r\n windows line ends \r\n", " \n \n  \n",
    "digits 0123456789, 3.14159 and 1,000,000; 2024-06-01 12:30", "punctuation!!! ?? ... --- (a) [b] {c} <d> @#$%^&*_~",
    "don't I'll we've they're she'd it's DON'T O'Neil's 's 're 've 'm 'll 'd", "naïve café résumé Ærøskøbing Ångström",
    "中文字符 東京 日本語のテキスト 한국어 Ελληνικά русский עברית العربية हिन्दी", "emoji 🚀🎉 👍🏽 👨‍👩‍👧 ❤️",
    "<|endoftext|>", "a<|endoftext|>b <|endoftext|> c", " <|endoftext|><|endoftext|>", "Ġ weird ĠĠ chars Ċ",
    "\u00a0nbsp, zero\u200bwidth, soft\u00adhyphen, \x00\x01 control", "camelCaseWords and MIXED case Words",
    "def f(x):\n    return x ** 2  # square\n", "x" * 300, "The movie was a charming, unpretentious delight.",
]
# GPT-2's pre-tokenisation, written as in its original encoder (independent of minirlhf.tokenizer.GPT2_PATTERN).
ORIGINAL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Text made of random GPT-2 tokens (partial UTF-8 shown as U+FFFD): pieces meet in every possible way."""
    rng = random.Random(seed)
    full = get_tokenizer("gpt2")
    return [full.decode([rng.randrange(full.eos_id) for _ in range(rng.randint(1, 12))]) for _ in range(n)]


def reference_encoder(directory):
    """GPT-2's original encoding rule (what transformers' pure-Python GPT2Tokenizer of version 4 does), on the files:
    cut the text with the GPT-2 pattern, spell each piece's UTF-8 bytes in vocab.json's alphabet, then repeatedly join
    the adjacent pair that comes first in merges.txt, and look the parts up in vocab.json."""
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    priority = {tuple(line.split(" ")): i for i, line in enumerate(lines[1:])}
    never = len(priority)
    token_of_id = {i: t for t, i in vocab.items()}
    ranks = get_tokenizer("gpt2").ranks  # which id each single byte has, hence its character in the files
    alphabet = {b: token_of_id[ranks[bytes([b])]] for b in range(256)}

    def encode(text: str) -> list[int]:
        ids = []
        for piece in regex.findall(ORIGINAL_PATTERN, text):
            parts = [alphabet[b] for b in piece.encode("utf-8")]
            while len(parts) > 1:
                order = [priority.get(pair, never) for pair in zip(parts, parts[1:])]
                i = min(range(len(order)), key=order.__getitem__)
                if order[i] == never:
                    break
                parts[i: i + 2] = [parts[i] + parts[i + 1]]
            ids += [vocab[p] for p in parts]
        return ids

    return encode


@pytest.fixture(scope="module", params=["gpt2", "gpt2-1k"])
def exported_tokenizer(request, tmp_path_factory):
    tok = get_tokenizer(request.param)
    directory = tok.save_pretrained(tmp_path_factory.mktemp(request.param), model_max_length=64)
    return tok, directory


# In transformers 5 GPT2Tokenizer is GPT2TokenizerFast (both Rust); in version 4 GPT2Tokenizer is the pure-Python one.
@pytest.mark.parametrize("cls", [GPT2TokenizerFast, GPT2Tokenizer, AutoTokenizer],
                         ids=["GPT2TokenizerFast", "GPT2Tokenizer", "AutoTokenizer"])
def test_hf_tokenizer_encodes_like_ours(exported_tokenizer, cls):
    tok, directory = exported_tokenizer
    assert sorted(p.name for p in directory.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    hf = cls.from_pretrained(directory)
    assert type(hf).__name__ in ("GPT2Tokenizer", "GPT2TokenizerFast")  # tokenizer_class was read
    assert hf.eos_token_id == hf.bos_token_id == tok.eos_id and hf.pad_token_id is None
    assert len(hf) == tok.vocab_size and hf.model_max_length == 64
    texts = TEXTS + random_texts(200)
    ours = tok.encode_batch(texts)
    assert hf(texts)["input_ids"] == ours
    for text, ids in zip(texts, ours):
        assert hf.encode(text) == ids, text
        assert hf.decode(ids) == tok.decode(ids)
        if "\ufffd" not in text:
            assert hf.decode(ids) == text
    ids = tok.encode("Hi there") + [tok.eos_id] + tok.encode(" after")
    assert hf.decode(ids) == tok.decode(ids) == "Hi there<|endoftext|> after"
    assert hf.decode(ids, skip_special_tokens=True) == "Hi there after"


def test_endoftext_in_text_is_plain_text_in_both(exported_tokenizer):
    tok, directory = exported_tokenizer
    hf = AutoTokenizer.from_pretrained(directory)
    for text in ("<|endoftext|>", "one<|endoftext|>two"):
        assert tok.eos_id not in tok.encode(text)
        assert hf.encode(text) == tok.encode(text)


def test_original_gpt2_rule_on_the_files_encodes_like_ours(exported_tokenizer):
    tok, directory = exported_tokenizer
    reference = reference_encoder(directory)
    for text in TEXTS + random_texts(200, seed=1):
        assert reference(text) == tok.encode(text), text


def test_export_writes_a_model_and_tokenizer_that_transformers_loads(checkpoint, tmp_path, capsys):
    out = tmp_path / "hf"
    export_cli("--checkpoint", checkpoint, "--out", out)
    assert "vocab.json" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                    "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    hf_tok = AutoTokenizer.from_pretrained(out)
    hf_model = GPT2LMHeadModel.from_pretrained(out)
    tok = get_tokenizer("gpt2-1024")
    assert len(hf_tok) == hf_model.config.vocab_size == tok.vocab_size == 1025
    assert hf_tok.eos_token_id == hf_model.config.eos_token_id == tok.eos_id == 1024
    assert hf_tok.model_max_length == hf_model.config.n_positions == 32
    text = "Hello, world! don't  stop\n"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    ids = hf_tok(text, return_tensors="pt")["input_ids"]
    assert hf_model(ids).logits.shape == (1, ids.shape[1], 1025)


def test_export_refuses_a_model_whose_vocabulary_is_not_its_tokenizers(tmp_path, capsys):
    m = GPT(GPTConfig(vocab_size=1000, n_positions=32, n_layer=1, n_head=2, n_embd=32, tokenizer="gpt2-1024"))
    save_checkpoint(tmp_path / "sft", m, stage="sft", config=m.config, step=1)
    with pytest.raises(SystemExit) as e:
        export_cli("--checkpoint", tmp_path / "sft", "--out", tmp_path / "hf")
    assert e.value.code == 2 and "the model has 1000 tokens but its tokenizer 'gpt2-1024' has 1025" in \
        capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_export_usage_names_its_required_flags():
    """--checkpoint and --out are marked "(required)" in their help, so the short usage line lists them."""
    usage = build_parser(export.ExportConfig, "python -m minirlhf.export").format_usage()
    assert usage == "usage: python -m minirlhf.export --checkpoint CHECKPOINT --out OUT [options]\n"
