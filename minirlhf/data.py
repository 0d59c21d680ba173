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
"""
import json
import pathlib
from typing import Any, Iterator

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
                line = raw.decode("utf-8")
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
