"""GPT-2's byte-level BPE tokenizer through tiktoken, working offline, plus padding helpers.

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
"""
import base64
import gzip
import hashlib
import pathlib
import re
from functools import lru_cache
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


class Tokenizer:
    """A tiktoken BPE with an EOS id and a PAD id that differs from it.

    ``vocab_size`` counts the real tokens (EOS included); the model computes logits over exactly these.
    """

    def __init__(self, name: str, ranks: dict[bytes, int]):
        self.name = name
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
