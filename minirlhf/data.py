"""Reading the JSONL files the scripts train on, with validation that names file, line and field.

One JSON object per line. The formats (the human data a labelling team produces; InstructGPT, Ouyang et al. 2022):

=============  ==================================================================  ===========================
kind           record                                                              read by
=============  ==================================================================  ===========================
demonstration  ``{"prompt": str, "response": str}``  (an ideal response by a person) train_sft.py
text           ``{"text": str}``  (plain language modelling, e.g. pre-training)     train_sft.py
comparison     ``{"prompt": str, "chosen": str, "rejected": str}``                  train_rm.py
ranking        ``{"prompt": str, "responses": [str, ...], "ranking": [int, ...]}``  train_rm.py
               (``ranking`` lists indices into ``responses``, best first)
score          ``{"prompt": str, "response": str, "score": number}`` (Likert)      train_rm.py
prompt         ``{"prompt": str}``                                                 train_ppo.py, redteam.py
=============  ==================================================================  ===========================

Every problem is a :class:`~minirlhf.config.UserError` of the form ``path:line: field 'x': what is wrong``, raised
before any training starts: an empty file, a line that is not UTF-8 or not JSON, a missing or mistyped field, a
ranking that is not a permutation of the responses. Unknown extra fields are allowed (kept for provenance).

Tokenizing. Every stage turns a (prompt, response) pair into ``encode(prompt) + encode(response) + [EOS]``: the texts are
joined exactly as written, so a response that continues the prompt's last word starts with its space (``"The movie
was"`` + ``" great."``; GPT-2's tokens carry their leading space), as in GPT-2's own text. Prompt and response are
encoded separately (:func:`encode_pair`; an empty prompt is a lone EOS, ``Tokenizer.encode_prompt``). Too
long for the context, the prompt is cut from the left and the response from the right, by one rule shared by SFT, the
reward model and PPO; every cut is counted (:class:`Truncations`) and reported, and a prompt that would lose tokens is
an error naming its file:line unless the user allows it (:func:`encode_checked`). Plain texts longer than the context
are split, not cut (:func:`split_text`).

Order. :func:`split_holdout` makes the fixed held-out split; :class:`DataOrder` is the shuffled stream of examples,
a pure function of the seed and the position, so a resumed run sees exactly the batches it would have seen.
"""
import json
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from minirlhf.config import UserError

# field -> accepted Python type(s), per record kind
SCHEMAS: dict[str, dict[str, Any]] = {
    "demonstration": {"prompt": str, "response": str},
    "text": {"text": str},
    "comparison": {"prompt": str, "chosen": str, "rejected": str},
    "ranking": {"prompt": str, "responses": list, "ranking": list},
    "score": {"prompt": str, "response": str, "score": (int, float)},
    "prompt": {"prompt": str},
}
# which kinds each reader accepts, tried in this order (the first whose fields are all present decides)
SFT_KINDS = ("demonstration", "text")
PREFERENCE_KINDS = ("comparison", "ranking", "score")
PROMPT_KINDS = ("prompt",)


def iter_jsonl(path) -> Iterator[tuple[str, dict]]:
    """Yield ``("path:line", record)`` for each non-blank line; errors name the line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark some editors write
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from e
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _kind_of(record: dict, kinds: tuple[str, ...], where: str) -> str:
    for kind in kinds:
        if all(field in record for field in SCHEMAS[kind]):
            return kind
    expected = " or ".join("{" + ", ".join(f'"{f}"' for f in SCHEMAS[k]) + "}" for k in kinds)
    raise UserError(f"{where}: record has fields {sorted(record)}; expected {expected}")


def validate(record: dict, kind: str, where: str) -> dict:
    """Check field types (and ranking permutations); return the record with ``kind`` and ``where`` added."""
    for field, types in SCHEMAS[kind].items():
        value = record[field]
        if isinstance(value, bool) or not isinstance(value, types):
            want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            if value is None:  # e.g. a line of redteam.py's demonstrations_todo.jsonl not filled in yet
                raise UserError(f"{where}: field '{field}' is null: write a {want} there, or drop the line")
            raise UserError(f"{where}: field '{field}': expected {want}, got {type(value).__name__}")
    if kind == "ranking":
        responses, ranking = record["responses"], record["ranking"]
        if len(responses) < 2:
            raise UserError(f"{where}: field 'responses': a ranking needs at least 2 responses, got {len(responses)}")
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise UserError(f"{where}: field 'responses'[{i}]: expected str, got {type(r).__name__}")
        if (any(isinstance(i, bool) or not isinstance(i, int) for i in ranking)
                or sorted(ranking) != list(range(len(responses)))):
            raise UserError(f"{where}: field 'ranking': {ranking} is not a permutation of 0..{len(responses) - 1}")
        first = {}
        for i, r in enumerate(responses):
            if r in first:
                raise UserError(f"{where}: field 'responses': [{first[r]}] and [{i}] are identical")
            first[r] = i
    if kind == "comparison" and record["chosen"] == record["rejected"]:
        raise UserError(f"{where}: fields 'chosen' and 'rejected' are identical")
    return {**record, "kind": kind, "where": where}


def read_records(path, kinds: tuple[str, ...]) -> list[dict]:
    """All records of a JSONL file, each validated as one of ``kinds``. An empty file is an error."""
    records = [validate(r, _kind_of(r, kinds, where), where) for where, r in iter_jsonl(path)]
    if not records:
        raise UserError(f"{path}: empty (no records)")
    return records


def read_sft(path) -> list[dict]:
    """Demonstrations ``{"prompt", "response"}`` and/or plain ``{"text"}`` records."""
    return read_records(path, SFT_KINDS)


def read_preferences(path) -> list[dict]:
    """Comparisons, rankings and Likert scores (mixed freely in one file)."""
    return read_records(path, PREFERENCE_KINDS)


def read_prompts(path) -> list[dict]:
    """``{"prompt"}`` records (other fields, e.g. a category, are kept)."""
    return read_records(path, PROMPT_KINDS)


def write_jsonl(path, records, append: bool = False) -> None:
    """Write records one per line (UTF-8, flushed). ``append`` adds to an existing file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizing (prompt, response) pairs, with explicit truncation


@dataclass(frozen=True)
class EncodedPair:
    """A tokenized (prompt, response) pair: ``ids = prompt ids + response ids (+ EOS)``, at most ``max_len`` long."""

    ids: list[int]
    n_prompt: int  # the first n_prompt ids are the (possibly left-truncated) prompt
    prompt_truncated: bool  # prompt tokens were dropped from its start
    response_truncated: bool  # response tokens were dropped from its end (the EOS with them: the text did not end)


def encode_pair(tokenizer, prompt: str, response: str, max_len: int, add_eos: bool = True) -> EncodedPair:
    """Tokenize a pair the way every stage does: ``encode(prompt) + encode(response) + [eos]`` (encoded separately,
    then concatenated; the empty prompt is ``[eos]``), cut to ``max_len`` tokens when it is longer.

    Truncation rule: the prompt loses tokens from the LEFT (the text nearest the response survives), the response from
    the RIGHT (its EOS goes first: a cut response did not end, so the model must not learn to stop there, and a reward
    model reads it at its last real token). The response keeps ``min(len(response), max(max_len - len(prompt),
    max_len // 2))`` tokens: all the room a short prompt leaves, and at least half the context when the prompt is long.
    Callers count and report every truncation (see :class:`Truncations`); scripts refuse a prompt that would lose any
    token unless told to truncate it (:func:`encode_checked`).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    p = tokenizer.encode_prompt(prompt)
    r = tokenizer.encode(response) + ([tokenizer.eos_id] if add_eos else [])
    if len(p) + len(r) <= max_len:
        return EncodedPair(p + r, len(p), False, False)
    n_r = min(len(r), max(max_len - len(p), max_len // 2))
    n_p = min(len(p), max_len - n_r)
    return EncodedPair(p[len(p) - n_p:] + r[:n_r], n_p, n_p < len(p), n_r < len(r))


@dataclass
class Truncations:
    """Counts of truncated examples, reported once before training and stored in the metrics."""

    total: int = 0
    prompt: int = 0  # prompts cut from the left
    response: int = 0  # responses cut from the right
    split: int = 0  # plain texts longer than the context, split into several chunks (nothing dropped)

    def add(self, pair: EncodedPair) -> EncodedPair:
        self.total += 1
        self.prompt += pair.prompt_truncated
        self.response += pair.response_truncated
        return pair

    def summary(self, what: str, max_len: int) -> str:
        parts = [f"{n} {name}" for n, name in ((self.prompt, "prompts truncated from the left"),
                                               (self.response, "responses truncated from the right"),
                                               (self.split, "texts split into chunks")) if n]
        return f"{what}: {self.total} sequences of at most {max_len} tokens" + (f"; {', '.join(parts)}" if parts
                                                                              else "; nothing truncated")

    def as_metrics(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}_truncated_prompts": self.prompt, f"{prefix}_truncated_responses": self.response,
                f"{prefix}_split_texts": self.split}


def encode_checked(tokenizer, record: dict, response: str, *, max_len: int, truncate_prompts: bool,
                   truncations: Truncations) -> EncodedPair:
    """:func:`encode_pair` for a record read from a file: a prompt that would lose tokens is an error naming its
    file:line unless ``truncate_prompts``; every truncation is counted in ``truncations``."""
    pair = encode_pair(tokenizer, record["prompt"], response, max_len)
    if pair.prompt_truncated and not truncate_prompts:
        n = len(tokenizer.encode(record["prompt"]))
        raise UserError(f"{record['where']}: field 'prompt': {n} tokens do not fit beside the response within "
                        f"--max-len {max_len} (it would be cut to its last {pair.n_prompt}); raise --max-len, shorten "
                        "the prompt, or pass --truncate-prompts")
    return truncations.add(pair)


def split_text(ids: list[int], max_len: int) -> list[list[int]]:
    """Split a long token sequence into windows of ``max_len`` that overlap by one token, so that every token after
    the first is a prediction target exactly once (nothing is dropped). Short sequences come back whole."""
    if len(ids) <= max_len:
        return [ids]
    return [ids[i:i + max_len] for i in range(0, len(ids) - 1, max_len - 1)]


# ---------------------------------------------------------------------------------------------------------------------
# Held-out split and data order


def split_holdout(items: list, fraction: float, seed: int, what: str,
                  key: Optional[Callable[[Any], Optional[str]]] = None) -> tuple[list, list]:
    """A fixed random split (same ``seed`` -> same split) into (train, held-out), ``fraction`` of the units held out
    and at least one unit on each side when ``fraction > 0``. Items with the same ``key(item)`` (a prompt) form one
    unit and land on the same side, so the held-out score is on prompts never trained on; an item whose key is None
    (or every item, without ``key``) is a unit of its own. Both sides keep the items' order."""
    if not 0 <= fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return items, []
    units: dict[tuple, list[int]] = {}  # unit -> indices of its items, units in order of first appearance
    for i, item in enumerate(items):
        k = None if key is None else key(item)
        units.setdefault(("item", i) if k is None else ("key", k), []).append(i)
    groups = list(units.values())
    n_val = max(1, round(len(groups) * fraction))
    if n_val >= len(groups):
        raise UserError(f"{what}: {len(groups)} {'examples' if key is None else 'distinct prompts'} are too few to "
                        f"hold out {fraction:.0%}; give --val-data, more data, or --val-fraction 0 (no evaluation)")
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = {i for u in order[:n_val] for i in groups[u]}
    return ([x for i, x in enumerate(items) if i not in held_out], [x for i, x in enumerate(items) if i in held_out])


class DataOrder:
    """The order examples are visited in: an endless stream of epochs, each a fresh permutation drawn from
    ``(seed, epoch)``. A position in the stream is all a resumed run needs to continue with the same batches."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, []

    def take(self, position: int, count: int) -> list[int]:
        """Indices of the examples at stream positions ``position .. position + count - 1``."""
        out = []
        for pos in range(position, position + count):
            epoch, i = divmod(pos, self.n)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
            out.append(self._perm[i])
        return out
