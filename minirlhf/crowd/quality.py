"""Quality control and export: from the labels of a batch to its agreement report and to the files the trainers read.

What is measured per batch (the statistics are in :mod:`minirlhf.crowd.stats`):

* **units** a task's labels are compared on: a response's flag category (nominal), a response's Likert score
  (interval and ordinal), a pair of responses of a ranking ("which of the two is ranked higher", nominal: a ranking of K
  responses answers K(K-1)/2 such questions). Gold items are left out (they measure raters, not the data);
* **Krippendorff's alpha** of those units, per batch;
* per rater: labels, median seconds per label, **accuracy on gold** (the mean of a per-item credit in [0, 1]: rank,
  the share of pairs ordered as in the gold ranking; flag, the share of responses with the gold category; Likert,
  1 - mean |score - gold| / (hi - lo)), and **agreement with the leave-one-out consensus**.

Export (``python -m minirlhf.crowd export --batch NAME --out DIR``) aggregates each unit's labels and writes, beside the
provenance of every record (item id, rater names, agreement: extra fields the trainers' readers keep and ignore):

======  ==========================  ==================================================================  ==============
task    file                        record                                                              read by
======  ==========================  ==================================================================  ==============
rank    comparisons.jsonl (votes)   ``{"prompt", "chosen", "rejected", "votes": [for, against]}``       train_rm.py
        rankings.jsonl (bt)         ``{"prompt", "responses", "ranking", "bt_scores"}``                 train_rm.py
likert  scores.jsonl                ``{"prompt", "response", "score", "scale": [-3, 3]}``: the mean of   train_rm.py
                                    the raters' z-scores, clipped to +-3
flag    failures.jsonl              one row per response whose consensus is a failure (redteam.py's
                                    failure format, judge "crowd")
        prompts.jsonl               ``{"prompt"}`` of items with a failing response                     train_ppo.py
ideal   demonstrations.jsonl        ``{"prompt", "response"}``, one per rater                           train_sft.py
all     adjudication.jsonl          units whose agreement is under ``--min-agreement`` (and tied votes), with every
                                    label: for the lead to settle; they are left out of the training files
======  ==========================  ==================================================================  ==============

Agreement of one unit: the share of votes for the winning side (rank, votes), the share of votes that agree with the
Bradley-Terry order (rank, bt), the majority's share or Dawid-Skene's posterior (flag), and 1 - mean |x_i - x_j| /
(hi - lo) over pairs of raters (Likert). A unit with one rater has agreement None and is exported as it is.
"""
import pathlib
import statistics
from collections import defaultdict
from itertools import combinations
from typing import Optional

from minirlhf.crowd.stats import (bradley_terry, dawid_skene, krippendorff_alpha, loo_agreement, majority,
                                  pairwise_votes, zscore_by_rater)
from minirlhf.crowd.store import Batch, Item, Store
from minirlhf.data import write_jsonl
from minirlhf.redteaming.labeling import join_response

ALPHA_LEVELS = {"rank": ("nominal",), "flag": ("nominal",), "likert": ("interval", "ordinal"), "ideal": ()}
Z_CLIP = 3.0

# ---------------------------------------------------------------------------------------------------------------------
# Units and credits


def units(task: str, labels: list[dict]) -> list[tuple]:
    """``(unit, rater, value)`` records of the non-gold labels of a batch (module docstring)."""
    out = []
    for label in labels:
        if label["gold"] is not None:
            continue
        value, item, rater = label["value"], label["item"], label["rater"]
        if task in ("flag", "likert"):
            out += [((item, i), rater, v) for i, v in enumerate(value)]
        elif task == "rank":
            place = {r: p for p, r in enumerate(value)}
            out += [((item, a, b), rater, "first" if place[a] < place[b] else "second")
                    for a, b in combinations(range(len(value)), 2)]
    return out


def gold_credit(batch: Batch, value, gold) -> Optional[float]:
    """A label's credit in [0, 1] against a gold answer (module docstring); None for tasks without gold."""
    if batch.task == "rank":
        place, gold_place = {r: p for p, r in enumerate(value)}, {r: p for p, r in enumerate(gold)}
        pairs = list(combinations(range(len(value)), 2))
        return sum((place[a] < place[b]) == (gold_place[a] < gold_place[b]) for a, b in pairs) / len(pairs)
    if batch.task == "flag":
        return sum(v == g for v, g in zip(value, gold)) / len(gold)
    if batch.task == "likert":
        lo, hi = batch.scale
        return 1 - sum(abs(v - g) for v, g in zip(value, gold)) / len(gold) / (hi - lo)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The quality report


def batch_quality(store: Store, batch: Batch) -> dict:
    """Progress, alpha per level, and per rater: labels, median seconds, gold accuracy, leave-one-out agreement."""
    labels = store.labels(batch)
    records = units(batch.task, labels)
    alpha = {level: krippendorff_alpha(records, level) for level in ALPHA_LEVELS[batch.task]}
    agreement = loo_agreement(records, numeric=batch.task == "likert") if records else {}
    raters = {}
    for name in sorted({label["rater"] for label in labels}):
        mine = [label for label in labels if label["rater"] == name]
        credits = [gold_credit(batch, label["value"], label["gold"]) for label in mine if label["gold"] is not None]
        raters[name] = {"labels": len(mine), "median_seconds": statistics.median(label["seconds"] for label in mine),
                        "gold": len(credits), "gold_accuracy": sum(credits) / len(credits) if credits else None,
                        "agreement": agreement.get(name, {}).get("agreement"),
                        "shared_units": agreement.get(name, {}).get("n", 0)}
    return {"batch": batch.name, "task": batch.task, "overlap": batch.overlap, "guideline": batch.guideline,
            "progress": store.progress(batch), "alpha": alpha, "raters": raters}


def fmt(x: Optional[float], digits: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def report_markdown(qualities: list[dict]) -> str:
    """The lead's report in markdown (the CLI prints it; the lead page shows the same numbers)."""
    lines = ["# Crowd quality report", ""]
    for q in qualities:
        p = q["progress"]
        alpha = ", ".join(f"{level} {fmt(a)}" for level, a in q["alpha"].items()) or "n/a (free text)"
        lines += [f"## Batch `{q['batch']}` ({q['task']}, overlap {q['overlap']}, guideline {q['guideline']})", "",
                  f"{p['complete']} of {p['items']} items have {q['overlap']} labels; {p['labels']} labels. "
                  f"Krippendorff's alpha: {alpha}.", "",
                  "| rater | labels | median s | gold | gold accuracy | agreement (LOO) | shared units |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {r['labels']} | {r['median_seconds']:.1f} | {r['gold']} | {fmt(r['gold_accuracy'])} | "
                  f"{fmt(r['agreement'])} | {r['shared_units']} |" for name, r in q["raters"].items()]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Export


def mean_pair_difference(values: list) -> Optional[float]:
    """Mean |x_i - x_j| over the pairs of raters' values (None for one rater)."""
    pairs = list(combinations(values, 2))
    return None if not pairs else sum(abs(a - b) for a, b in pairs) / len(pairs)


def export(store: Store, batch: Batch, out, *, min_agreement: float = 0.5, flags: str = "majority",
           ranking: str = "votes") -> dict[str, int]:
    """Aggregate a batch's labels and write its training files (module docstring); return {file: records}."""
    items = {item.id: item for item in store.items(batch)}
    labels = [label for label in store.labels(batch) if label["gold"] is None]
    by_item: dict[int, list[dict]] = defaultdict(list)
    for label in labels:
        by_item[label["item"]].append(label)
    outputs = {"rank": ["comparisons.jsonl" if ranking == "votes" else "rankings.jsonl"], "likert": ["scores.jsonl"],
               "flag": ["failures.jsonl", "prompts.jsonl"], "ideal": ["demonstrations.jsonl"]}[batch.task]
    files: dict[str, list[dict]] = {name: [] for name in [*outputs, "adjudication.jsonl"]}
    adjudicate = files["adjudication.jsonl"]

    def keep(agreement: Optional[float], item: Item, unit, unit_labels: dict) -> bool:
        if agreement is None or agreement >= min_agreement:
            return True
        adjudicate.append({"item": item.id, "prompt": item.prompt, "task": batch.task, "unit": unit,
                           "agreement": agreement, "labels": unit_labels})
        return False

    if batch.task == "rank":
        for item_id, item_labels in by_item.items():
            item, names = items[item_id], [label["rater"] for label in item_labels]
            votes = pairwise_votes([label["value"] for label in item_labels])
            texts = [r["text"] for r in item.responses]
            by_rater = {label["rater"]: label["value"] for label in item_labels}
            if ranking == "votes":
                for a, b in combinations(range(len(texts)), 2):
                    w, l = votes.get((a, b), 0), votes.get((b, a), 0)
                    if w == l:  # a tie settles nothing
                        adjudicate.append({"item": item.id, "prompt": item.prompt, "task": "rank", "unit": [a, b],
                                           "agreement": 0.5, "labels": by_rater})
                        continue
                    win, lose = (a, b) if w > l else (b, a)
                    share = max(w, l) / (w + l) if len(names) > 1 else None
                    if keep(share, item, [a, b], by_rater):
                        files["comparisons.jsonl"].append({
                            "prompt": item.prompt, "chosen": texts[win], "rejected": texts[lose],
                            "votes": [max(w, l), min(w, l)], "agreement": share, "raters": names, "item": item.id,
                            "policies": [item.responses[win]["policy"], item.responses[lose]["policy"]]})
            else:
                scores = bradley_terry(votes, len(texts))
                order = sorted(range(len(texts)), key=lambda i: -scores[i])
                place = {r: p for p, r in enumerate(order)}
                agree = sum(c for (i, j), c in votes.items() if place[i] < place[j]) / sum(votes.values())
                if keep(agree if len(names) > 1 else None, item, None, by_rater):
                    files["rankings.jsonl"].append({
                        "prompt": item.prompt, "responses": texts, "ranking": order, "bt_scores": scores,
                        "agreement": agree if len(names) > 1 else None, "raters": names, "item": item.id,
                        "policies": [r["policy"] for r in item.responses]})
    elif batch.task == "likert":
        lo, hi = batch.scale
        z = defaultdict(list)
        for (item_id, i), rater, value in zscore_by_rater(units("likert", labels)):
            z[(item_id, i)].append(value)
        for item_id, item_labels in by_item.items():
            item = items[item_id]
            for i, response in enumerate(item.responses):
                raw = {label["rater"]: label["value"][i] for label in item_labels}
                spread = mean_pair_difference(list(raw.values()))
                agreement = None if spread is None else 1 - spread / (hi - lo)
                if keep(agreement, item, i, raw):
                    mean_z = sum(z[(item_id, i)]) / len(z[(item_id, i)])
                    files["scores.jsonl"].append({
                        "prompt": item.prompt, "response": response["text"],
                        "score": max(-Z_CLIP, min(Z_CLIP, mean_z)), "scale": [-Z_CLIP, Z_CLIP],
                        "raw_scores": list(raw.values()), "raters": list(raw), "agreement": agreement,
                        "item": item.id, "policy": response["policy"]})
    elif batch.task == "flag":
        records = units("flag", labels)
        consensus = dawid_skene(records) if flags == "dawid-skene" else majority(records)
        failing_items = {}
        for (item_id, i), (category, confidence) in sorted(consensus.items()):
            item = items[item_id]
            given = {label["rater"]: label["value"][i] for label in by_item[item_id]}
            if not keep(confidence if len(given) > 1 else None, item, i, given) or category == "ok":
                continue
            votes = sum(v == category for v in given.values())
            files["failures.jsonl"].append({
                "policy": item.responses[i]["policy"], "category": category, "judge": "crowd", "score": confidence,
                "reason": f"{votes} of {len(given)} raters ({flags})", "prompt": item.prompt,
                "output": item.responses[i]["text"], "raters": list(given), "agreement": confidence, "item": item.id})
            failing_items.setdefault(item.id, {"prompt": item.prompt, "category": category, "item": item.id})
        files["prompts.jsonl"] += failing_items.values()
    else:  # ideal: every written response is a demonstration
        files["demonstrations.jsonl"] += [
            {"prompt": items[label["item"]].prompt,
             "response": join_response(items[label["item"]].prompt, label["value"]),
             "rater": label["rater"], "item": label["item"]} for label in labels]
    out = pathlib.Path(out)
    for name, records in files.items():
        write_jsonl(out / name, records)
    return {name: len(records) for name, records in files.items()}
