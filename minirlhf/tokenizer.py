"""GPT-2's byte-level BPE tokenizer through tiktoken, working offline, plus padding helpers and an export to Hugging
Face's GPT-2 tokenizer files.

tiktoken's own ``get_encoding("gpt2")`` downloads its vocabulary; minirlhf ships the same file inside the package
(``minirlhf/assets/gpt2.tiktoken.gz``, taken from the MIT-licensed ``openai-whisper==20250625`` sdist, byte-identical to
tiktoken's ``r50k_base``) and checks its sha256 every time it is loaded, so a corrupted file fails loudly instead of
tokenizing wrongly.

Names understood by :func:`get_tokenizer`:

* ``"gpt2"``: the real GPT-2 vocabulary, 50,256 BPE tokens + ``<|endoftext|>`` (id 50256). "Hello world" -> [15496, 995].
* ``"gpt2-8k"`` (any ``"gpt2-<N>"`` or ``"gpt2-<N>k"``): the first N merge ranks of the same BPE + ``<|endoftext|>`` at
  id N. BPE applies merges in rank order, so cutting the list keeps a valid tokenizer that encodes common English
  almost as compactly (about 1.2x more tokens for gpt2-8k) with an output layer N/50257 the size: what makes pre-training a small
  model on a 2-core CPU feasible (the demo uses it).

Special ids. GPT-2 has no padding token and its EOS is ``<|endoftext|>``. Pitfall 1 (README): PAD must never equal
EOS, or masking the padding also masks real EOS tokens and the model never learns to stop. Here ``pad_id =
vocab_size`` (one past the last real token): the model keeps an embedding row for it, but its logits are never computed,
so it can be neither sampled nor scored.

Export to Hugging Face (:meth:`Tokenizer.save_pretrained`, called by ``python -m minirlhf.export``). Hugging Face keeps
a GPT-2 tokenizer as two files, and tiktoken as one table, for the same byte-level BPE:

* tiktoken: ``ranks``, bytes -> rank. Encoding a pre-token (a piece cut by ``GPT2_PATTERN``) starts from its single
  bytes and repeatedly joins the adjacent pair whose concatenation has the lowest rank, until no concatenation is a
  token.
* Hugging Face: ``vocab.json``, token -> id, and ``merges.txt``, the merge rules "left right" in priority order (line i
  after the ``#version: 0.2`` header is merge i). Encoding repeatedly applies the highest-priority rule whose pair is
  adjacent. Tokens are JSON strings, so each byte is written as one printable character by GPT-2's
  :func:`bytes_to_unicode` (the 188 printable latin-1 bytes stand for themselves, the 68 others, space and control bytes
  among them, become U+0100.. in byte order: " the" is written "Ġthe").

Ids are ranks (GPT-2's first 256 ranks are the single bytes; rank 256 + i is the token made by merge i), so
``vocab.json`` is ``ranks`` in that alphabet plus ``<|endoftext|>`` at ``eos_id``. The merges are not stored; they are
recovered from the ranks (:func:`recover_merges`). The merge that makes token t (rank r >= 256) is the pair BPE holds on
t's bytes just before it joins them into t: run tiktoken's rule on t's bytes with the ranks below r only. Each step
joins two parts into a token of rank < r, so t itself is never formed, and the run stops with exactly two parts (a, b),
a + b = t: merge r - 256 is "a b". (A run that stops with more parts means t cannot be built from lower ranks: not a BPE
vocabulary, an error.) The two rules then take the same steps as long as every adjacent pair whose concatenation is a
token is that token's recorded merge, which holds for a vocabulary learned as merges, as GPT-2's was: the 50,000 merges
recovered from the full vocabulary are line for line GPT-2's published ``merges.txt`` (a test checks its hash), and the
tests compare both tokenizers on text. A "gpt2-<N>" tokenizer gets the first N - 256 of them (merges below rank N
depend only on those ranks). Two settings keep HF's tokenizer equal to :meth:`Tokenizer.encode`:
``split_special_tokens`` (the text "<|endoftext|>" is plain text, never EOS; EOS comes only from its id) and
``clean_up_tokenization_spaces`` off (decode gives back the text: " ," stays " ,").
"""
import base64
import gzip
import hashlib
import json
import pathlib
import re
from functools import cached_property, lru_cache
from typing import Optional, Sequence

import tiktoken
import torch

from minirlhf.config import UserError

VOCAB_FILE = pathlib.Path(__file__).resolve().parent / "assets" / "gpt2.tiktoken.gz"
VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # of the uncompressed file
# GPT-2's pre-tokenisation pattern (tiktoken's r50k_base): contractions, letters, numbers, other symbols, whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
GPT2_RANKS = 50256


def load_ranks(path: pathlib.Path = VOCAB_FILE, sha256: str = VOCAB_SHA256) -> dict[bytes, int]:
    """Read a gzipped ``.tiktoken`` file (one ``base64(token) rank`` per line) after checking its hash."""
    try:
        raw = gzip.decompress(pathlib.Path(path).read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read the tokenizer vocabulary {path}: {e}") from e
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise UserError(f"tokenizer vocabulary {path} is corrupted: sha256 {digest}, expected {sha256}; "
                        "reinstall minirlhf")
    ranks = {}
    for line in raw.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table for writing tokens as text: the printable bytes "!".."~", "¡".."¬" and "®".."ÿ"
    stand for themselves; the other 68 bytes (control bytes, space, DEL, NBSP, soft hyphen, ...) take U+0100, U+0101,
    ... in byte order, so every token is a string of printable characters with no whitespace."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge rules of a BPE given as tiktoken ranks: entry i is the pair joined into the token of rank 256 + i.

    For each token t of rank r >= 256, in rank order, run BPE on t's bytes joining only pairs whose concatenation has
    rank < r (lowest first, leftmost on ties, as tiktoken does); it stops at two parts, which are t's merge (module
    docstring). The ranks must be 0 .. len - 1 with the 256 single bytes first.
    """
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in by_rank] != list(range(len(by_rank))) or sorted(t for t, _ in by_rank[:256]) != [
            bytes([b]) for b in range(256)]:
        raise ValueError("not a byte-level BPE: ranks must be 0..n-1 with the 256 single bytes first")
    get = ranks.get
    merges = []
    for token, rank in by_rank[256:]:
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            joined = [get(a + b, rank) for a, b in zip(parts, parts[1:])]  # rank of each adjacent pair, r if none
            best = min(joined)
            if best >= rank:
                break
            i = joined.index(best)
            parts[i: i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower ranks: not a BPE vocabulary")
        merges.append((parts[0], parts[1]))
    return merges


class Tokenizer:
    """A tiktoken BPE with an EOS id and a PAD id that differs from it.

    ``vocab_size`` counts the real tokens (EOS included); the model computes logits over exactly these.
    """

    def __init__(self, name: str, ranks: dict[bytes, int]):
        self.name = name
        self.ranks = ranks  # bytes -> rank (= id), the BPE without EOS
        self.eos_id = len(ranks)
        self.vocab_size = len(ranks) + 1
        self.pad_id = self.vocab_size  # never EOS (pitfall 1), never a real token
        self.enc = tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={EOT: self.eos_id})

    def encode(self, text: str) -> list[int]:
        """Text -> ids. The string "<|endoftext|>" inside user text is encoded as plain text, never as EOS."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts))

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt -> ids, at least one: the empty prompt starts from EOS, GPT-2's document boundary (as its
        unconditional samples do), so that a model always has a token to condition on and the first response token
        is a prediction target like every other."""
        return self.encode(text) or [self.eos_id]

    def decode(self, ids: Sequence[int], stop_at_eos: bool = False) -> str:
        """Ids -> text, dropping PAD; with ``stop_at_eos`` the text ends before the first EOS."""
        ids = [int(i) for i in ids if int(i) != self.pad_id]
        if stop_at_eos and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.enc.decode(ids)

    def decode_batch(self, rows: Sequence[Sequence[int]], stop_at_eos: bool = False) -> list[str]:
        return [self.decode(r, stop_at_eos) for r in rows]

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"

    @cached_property
    def merges(self) -> list[tuple[bytes, bytes]]:
        """The BPE as merge rules, in priority order (:func:`recover_merges`; about a second for "gpt2", computed once
        per tokenizer)."""
        return recover_merges(self.ranks)

    def save_pretrained(self, directory, model_max_length: int = 1024) -> pathlib.Path:
        """Write the tokenizer in Hugging Face's GPT-2 format: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``
        and ``special_tokens_map.json`` (see the module docstring), so that ``AutoTokenizer.from_pretrained(directory)``
        encodes like :meth:`encode`. PAD is not written: Hugging Face's GPT-2 has none, and ours is not a real token.
        ``model_max_length`` is the model's ``n_positions``."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        alphabet = bytes_to_unicode()

        def spell(token: bytes) -> str:
            return "".join(alphabet[b] for b in token)

        vocab = {spell(token): rank for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1])}
        vocab[EOT] = self.eos_id
        merges = "".join(f"{spell(a)} {spell(b)}\n" for a, b in self.merges)
        eot = {"content": EOT, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
               "special": True}  # as in GPT-2's own files
        config = {
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
            "bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": None,
            "add_bos_token": False, "add_prefix_space": False, "errors": "replace",
            "split_special_tokens": True,  # "<|endoftext|>" in text is plain text, as in encode()
            "clean_up_tokenization_spaces": False,  # decode(encode(text)) == text
            "added_tokens_decoder": {str(self.eos_id): eot},
        }
        files = {
            "vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + merges,
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, indent=2),
        }
        for fname, text in files.items():
            (directory / fname).write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        return directory


@lru_cache(maxsize=None)
def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """The tokenizer called ``name``: "gpt2" or "gpt2-<N>[k]" (the first N BPE ranks; see the module docstring)."""
    if name == "gpt2":
        return Tokenizer(name, load_ranks())
    m = re.fullmatch(r"gpt2-(\d+)(k?)", name)
    if not m:
        raise UserError(f"unknown tokenizer {name!r}: use 'gpt2' or 'gpt2-<N>' / 'gpt2-<N>k' (e.g. 'gpt2-8k')")
    n = int(m.group(1)) * (1024 if m.group(2) else 1)
    if not 256 <= n <= GPT2_RANKS:
        raise UserError(f"tokenizer {name!r}: N must be between 256 (the bytes) and {GPT2_RANKS}")
    return Tokenizer(name, {tok: rank for tok, rank in load_ranks().items() if rank < n})


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left",
                  length: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad lists of ids into a batch. Returns ``ids`` (B, T) int64 and ``mask`` (B, T) int64, 1 on real tokens.

    Prompts for generation are left-padded so that every row's next token goes in the same column; the model then
    derives position ids from the mask (pitfall 2).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    T = max([len(s) for s in seqs] + [length or 0])
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask
