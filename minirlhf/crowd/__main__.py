"""The crowd's commands: the lead's whole workflow, from raters and batches to the web app, the report and the export.

    python -m minirlhf.crowd add-rater    --db crowd.db --name alice [--lead]       # prints alice's login token
    python -m minirlhf.crowd create-batch --db crowd.db --name b1 --task rank --policy out/sft \\
        --prompts prompts.jsonl --responses 3 --overlap 3 [--gold gold.jsonl --gold-rate 0.1] [--likert 1,7]
    python -m minirlhf.crowd serve        --db crowd.db [--port 8000] [--policy out/sft --redteam-batch attacks]
    python -m minirlhf.crowd report       --db crowd.db                              # quality, as markdown
    python -m minirlhf.crowd export       --db crowd.db --batch b1 --out out/crowd/b1 [--ranking bradley-terry]
    python -m minirlhf.crowd alpha        --input ratings.jsonl --level interval      # {"item", "rater", "value"}
    python -m minirlhf.crowd alpha        --vader --level interval                   # the VADER crowd's ratings

A batch's responses are sampled once, here, from ``--policy`` (:mod:`minirlhf.crowd.sampling`): every rater of an
item sees the same texts. ``--prompts`` is a .jsonl of ``{"prompt", "category"}`` or a .txt with one prompt per line
(redteam.py's attack files). ``--gold`` is a .jsonl of ``{"prompt", "responses": [str, ...], "answer": value}``, the
answer in store.py's label format. Tasks: rank, likert (needs ``--likert lo,hi``), flag, ideal (write the ideal
response; the responses are shown for reference).
"""
import json
import pathlib
import sys
from dataclasses import dataclass

from minirlhf.redteaming.attacks import read_attack_file
from minirlhf.config import UserError, option, run
from minirlhf.crowd.quality import batch_quality, export, report_markdown
from minirlhf.crowd.sampling import Sampler, Sampling
from minirlhf.crowd.stats import LEVELS, krippendorff_alpha
from minirlhf.crowd.store import TASKS, Store, check_value
from minirlhf.data import iter_jsonl
from minirlhf.redteaming.labeling import parse_likert

# ---------------------------------------------------------------------------------------------------------------------
# Raters and batches


@dataclass
class AddRater:
    """Create a rater (or the lead) and print their login token (shown only now: it is stored hashed)."""

    db: str = option("crowd.db", "the SQLite file of the crowd")
    name: str = option("", "(required) the rater's name, unique")
    lead: bool = option(False, "the lead: may see every label and the quality pages")


def add_rater(cfg: AddRater) -> str:
    token = Store(cfg.db).add_rater(cfg.name, "lead" if cfg.lead else "rater")
    print(token)
    return token


@dataclass
class CreateBatch(Sampling):
    """Sample K responses per prompt from --policy once and store them as a batch of items to label."""

    db: str = option("crowd.db", "the SQLite file of the crowd")
    name: str = option("", "(required) the batch's name, unique")
    task: str = option("rank", "what raters do with each item", choices=list(TASKS))
    prompts: str = option("", "(required) prompts: .jsonl with {\"prompt\", \"category\"} per line, or .txt")
    responses: int = option(2, "responses sampled per prompt (K; identical texts are kept once)")
    overlap: int = option(3, "distinct raters per item (R)")
    gold: str = option("", "gold items: .jsonl of {\"prompt\", \"responses\", \"answer\"}")
    gold_rate: float = option(0.1, "chance that a rater's next item is a gold item they have not seen")
    likert: str = option("", "the Likert scale 'lo,hi' (task likert), e.g. 1,7")
    guideline: str = option("v1", "version of the labelling guideline, stored with every label")


def read_gold(path: str, task: str, scale) -> list[dict]:
    """Gold items ``{"prompt", "responses", "answer"}``, each answer checked against the task."""
    gold = []
    for where, r in iter_jsonl(path):
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("responses"), list) or "answer" not in r:
            raise UserError(f"{where}: a gold item needs \"prompt\", \"responses\" (a list) and \"answer\"")
        try:
            check_value(task, r["answer"], len(r["responses"]), scale)
        except ValueError as e:
            raise UserError(f"{where}: field 'answer': gold answer {r['answer']!r} for task {task}: {e}") from None
        gold.append(r)
    return gold


def create_batch(cfg: CreateBatch) -> int:
    if not cfg.name or not cfg.prompts:
        raise UserError("--name and --prompts are required")
    scale = parse_likert(cfg.likert)
    attacks = read_attack_file(cfg.prompts)
    gold = read_gold(cfg.gold, cfg.task, scale) if cfg.gold else []
    store = Store(cfg.db)
    if cfg.name in {b.name for b in store.batches()}:
        raise UserError(f"a batch named {cfg.name!r} exists already in {cfg.db}")
    sampler = Sampler(cfg)
    sampled = sampler([a.prompt for a in attacks], cfg.responses)  # first the slow part, then one transaction
    items = [dict(prompt=a.prompt, responses=responses, category=a.category)
             for a, responses in zip(attacks, sampled)
             if cfg.task != "rank" or len(responses) >= 2]  # all K samples one text: nothing to rank
    items += [dict(prompt=r["prompt"], responses=[{"text": t, "policy": "gold", "ended": True} for t in r["responses"]],
                   category=r.get("category", "gold"), gold=r["answer"]) for r in gold]
    store.add_batch(cfg.name, cfg.task, overlap=cfg.overlap, gold_rate=cfg.gold_rate if gold else 0.0, scale=scale,
                    guideline=cfg.guideline, items=items,
                    source={**sampler.provenance(), "prompts": cfg.prompts, "responses": cfg.responses})
    added = len(items) - len(gold)
    skipped = len(attacks) - added
    print(f"batch {cfg.name}: {added} items ({skipped} prompts skipped: one distinct response), {len(gold)} gold")
    return added


# ---------------------------------------------------------------------------------------------------------------------
# Serving


@dataclass
class Serve(Sampling):
    """Serve the labelling web app. With --policy and --redteam-batch (a flag batch), raters can also red-team it."""

    db: str = option("crowd.db", "the SQLite file of the crowd")
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = option(8000, "port (0 = any free port; the address is printed)")
    redteam_batch: str = option("", "flag batch that receives the replies red-teamers flag in their chats")
    lease_s: float = option(3600.0, "seconds after which an unfinished assignment frees its slot for another rater")


def serve_app(cfg: Serve) -> None:
    from minirlhf.crowd.server import make_app, serve  # (the web library is only needed here)
    Store(cfg.db).close()  # create the file and tables before the first request
    sampler = Sampler(cfg) if cfg.policy else None
    if cfg.redteam_batch and sampler is None:
        raise UserError("--redteam-batch needs --policy: the policy the raters attack")
    serve(make_app(cfg.db, sampler=sampler, redteam_batch=cfg.redteam_batch, lease_s=cfg.lease_s), cfg.host,
          cfg.port)


# ---------------------------------------------------------------------------------------------------------------------
# Quality and export


@dataclass
class Report:
    """Print the quality report: progress, Krippendorff's alpha, per-rater gold accuracy and agreement."""

    db: str = option("crowd.db", "the SQLite file of the crowd")
    batch: str = option("", "one batch (empty = all)")
    json: bool = option(False, "print JSON instead of markdown")


def report(cfg: Report) -> list[dict]:
    store = Store(cfg.db)
    batches = [store.batch(cfg.batch)] if cfg.batch else store.batches()
    qualities = [batch_quality(store, b) for b in batches]
    print(json.dumps(qualities, indent=2) if cfg.json else report_markdown(qualities))
    return qualities


@dataclass
class Export:
    """Aggregate a batch's labels into training files (comparisons, rankings, scores, failures, demonstrations) and an
    adjudication list."""

    db: str = option("crowd.db", "the SQLite file of the crowd")
    batch: str = option("", "(required) the batch to export")
    out: str = option("", "(required) output directory")
    min_agreement: float = option(0.5, "units whose agreement is below this go to adjudication.jsonl instead")
    flags: str = option("majority", "how flags are aggregated", choices=["majority", "dawid-skene"])
    ranking: str = option("votes", "rankings as pairwise votes (comparisons.jsonl) or one Bradley-Terry ranking per "
                          "item (rankings.jsonl)", choices=["votes", "bradley-terry"])


def export_batch(cfg: Export) -> dict[str, int]:
    if not cfg.batch or not cfg.out:
        raise UserError("--batch and --out are required")
    store = Store(cfg.db)
    counts = export(store, store.batch(cfg.batch), cfg.out, min_agreement=cfg.min_agreement, flags=cfg.flags,
                    ranking=cfg.ranking)
    for name, n in counts.items():
        print(f"{pathlib.Path(cfg.out) / name}: {n} records")
    return counts


@dataclass
class Alpha:
    """Krippendorff's alpha of a JSONL file of {"item", "rater", "value"} records, or of the VADER crowd's ratings."""

    input: str = option("", "JSONL file of {\"item\", \"rater\", \"value\"} (one value per item and rater)")
    level: str = option("nominal", "level of measurement", choices=list(LEVELS))
    vader: bool = option(False, "use the per-rater ratings of the 10,605 movie-review sentences in the "
                         "vaderSentiment==3.3.2 sdist (fetched with pip, as make demo does)")
    cache_dir: str = option("", "where the sdist is kept (default: $XDG_CACHE_HOME/minirlhf)")


def read_ratings(path) -> list[tuple]:
    records = []
    for where, r in iter_jsonl(path):
        if not all(k in r for k in ("item", "rater", "value")):
            raise UserError(f"{where}: expected {{\"item\", \"rater\", \"value\"}}, got fields {sorted(r)}")
        records.append((json.dumps(r["item"]), json.dumps(r["rater"]), r["value"]))
    return records


def vader_ratings(cache_dir: str = "") -> list[tuple]:
    """``(sentence id, position, rating)`` of the VADER movie-review crowd. Its raters are anonymous: the file keeps
    each sentence's ratings as a list, so a position is not one person across sentences (alpha does not need it)."""
    from minirlhf.demo.data import default_cache_dir, fetch_sdist, parse_sentences, read_archive
    sentences = parse_sentences(*read_archive(fetch_sdist(cache_dir or default_cache_dir())))
    return [(s.id, i, r) for s in sentences for i, r in enumerate(s.ratings)]


def alpha(cfg: Alpha) -> float:
    if bool(cfg.input) == cfg.vader:
        raise UserError("give --input FILE or --vader")
    records = vader_ratings(cfg.cache_dir) if cfg.vader else read_ratings(cfg.input)
    try:
        value = krippendorff_alpha(records, cfg.level)
    except ValueError as e:
        raise UserError(f"{cfg.input or 'vader'}: {e}") from None
    except TypeError:
        raise UserError(f"{cfg.input}: --level {cfg.level} needs numbers as values") from None
    n_units = len({unit for unit, _, _ in records})
    print(f"Krippendorff's alpha ({cfg.level}): {value:.4f}  ({len(records)} values, {n_units} items)")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Entry point

COMMANDS = {"add-rater": (add_rater, AddRater), "create-batch": (create_batch, CreateBatch),
            "serve": (serve_app, Serve),
            "report": (report, Report), "export": (export_batch, Export), "alpha": (alpha, Alpha)}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    fn, cls = COMMANDS[argv[0]]
    sys.argv[0] = f"python -m minirlhf.crowd {argv[0]}"  # the name argparse shows in usage lines
    run(fn, cls, argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
