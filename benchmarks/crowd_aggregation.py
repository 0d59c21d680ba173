"""What aggregating a crowd buys the reward model: the demo's reward model trained on the VADER movie-review sentences
with each sentence's training target made from its raters' scores in four ways, evaluated on the same held-out pairs.

Each of the 10,605 sentences was rated by 15 to 29 people on -4..+4 (minirlhf/demo/data.py). The demo trains its
reward model (Likert regression, ``(r - s / 4)^2``) on the MEAN of all of a sentence's raters. Here the target is, per
training sentence (:func:`minirlhf.crowd.stats.aggregate_scores`):

    mean     the mean of all its raters (the demo's setting)
    median   their median
    one      ONE rater's score, drawn at random (a crowd of one: what a single labeller per item gives)
    mean3    the mean of 3 raters drawn at random without replacement (a small crowd, overlap R = 3)

and the reward model's accuracy is measured on the demo's held-out metric: the fraction of pairs of held-out sentences
whose MEAN human ratings differ by at least 1 point that it orders as people did (``--eval-min-gap 1``), the same pairs
for every row. The split and the prompt/response cut are the demo's own (:func:`minirlhf.demo.data.write_demo_files`
with the same seed), so the held-out file is the demo's ``rm_val.jsonl``.

Why no per-rater z-normalisation: the ratings file (``movieReviewSnippets_anonDataRatings.txt``) is anonymous per
sentence. Each line holds one sentence's id, mean, standard deviation and a list of 15-29 scores whose positions are
NOT the same person across sentences, so no rater's own mean and spread can be computed, and
:func:`minirlhf.crowd.stats.zscore_by_rater` (what the crowd app's export uses on its own raters) cannot be applied.

Each reward model is trained by train_rm.py, run as ``python -m train_rm`` with the demo's flags (``--likert-loss
regression --score-scale=-4,4 --eval-min-gap 1``, batch 32, lr 1e-3) from the demo's SFT checkpoint, except that the
reward is normalised on the training responses (``--normalise-on responses``, no sampling: the gain and bias do not
change an ordering) and it evaluates only at the end.

    OMP_NUM_THREADS=1 python -m benchmarks.crowd_aggregation --init out/demo/sft --results   # ~10 min on 1 CPU core
"""
import json
import os
import pathlib
import random
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

from benchmarks._results import environment, write_section
from minirlhf.config import UserError, option, run
from minirlhf.crowd.stats import SCORE_AGGREGATES, aggregate_scores
from minirlhf.data import iter_jsonl, write_jsonl
from minirlhf.demo.data import default_cache_dir, fetch_sdist, parse_sentences, read_archive, write_demo_files

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO_RM_FLAGS = ["--likert-loss", "regression", "--score-scale=-4,4", "--eval-min-gap", "1"]


@dataclass
class Config:
    """Train the demo's reward model on each crowd aggregate of the VADER ratings; report held-out pairwise accuracy."""

    init: str = option("out/demo/sft", "the SFT checkpoint every reward model starts from (the demo's)")
    out: str = option("out/crowd_aggregation", "working folder: the data files and one reward model per aggregate")
    aggregates: str = option(",".join(SCORE_AGGREGATES), "comma-separated targets, from " + ", ".join(SCORE_AGGREGATES))
    steps: int = option(300, "reward-model optimizer steps per aggregate (the demo's quick preset's)")
    batch_size: int = option(32, "sentences per step (the demo's)")
    lr: float = option(1e-3, "peak learning rate (the demo's)")
    seed: int = option(0, "the demo's split seed (0 = the demo's held-out pairs), the training seed, and the seed of "
                          "the raters drawn for 'one' and 'mean3'")
    cache_dir: str = option("", "where the vaderSentiment sdist is kept (default: $XDG_CACHE_HOME/minirlhf)")
    device: str = option("cpu", "device of train_rm.py")
    results: bool = option(False, "write the table into benchmarks/RESULTS.md")


# ---------------------------------------------------------------------------------------------------------------------
# Data: the demo's files, then one training file per aggregate


def training_file(rm_train: pathlib.Path, ratings: dict[int, list[int]], how: str, seed: int,
                  out: pathlib.Path) -> tuple[pathlib.Path, float]:
    """``rm_train`` with each record's score replaced by the ``how`` aggregate of its sentence's ratings; returns the
    file and the root-mean-square difference of the new targets from the all-rater means (the noise added)."""
    rng = random.Random(f"{seed}-{how}")
    records, squares = [], 0.0
    for _, r in iter_jsonl(rm_train):
        target = aggregate_scores(ratings[r["id"]], how, rng)
        squares += (target - r["score"]) ** 2
        records.append({**r, "score": target})
    path = out / f"rm_train_{how}.jsonl"
    write_jsonl(path, records)
    return path, (squares / len(records)) ** 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Train and read back


def train_reward_model(cfg: Config, data: pathlib.Path, val: pathlib.Path, out: pathlib.Path) -> dict:
    """Run train_rm.py on ``data``; return its final held-out evaluation (val_accuracy, val_pairs, val_loss)."""
    cmd = [sys.executable, "-m", "train_rm", "--init", cfg.init, "--data", str(data), "--val-data", str(val),
           "--out", str(out), "--overwrite", *DEMO_RM_FLAGS, "--max-steps", str(cfg.steps), "--batch-size",
           str(cfg.batch_size), "--lr", str(cfg.lr), "--warmup", "0.05", "--eval-every", "0", "--normalise-on",
           "responses", "--seed", str(cfg.seed), "--device", cfg.device]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"train_rm.py failed on {data}:\n{done.stderr[-2000:]}")
    evaluations = [r for _, r in iter_jsonl(out / "metrics.jsonl") if "val_accuracy" in r]
    return evaluations[-1]


def main(cfg: Config) -> list[dict]:
    aggregates = [a for a in cfg.aggregates.split(",") if a]
    if any(a not in SCORE_AGGREGATES for a in aggregates):
        raise UserError(f"--aggregates {cfg.aggregates}: each must be one of {', '.join(SCORE_AGGREGATES)}")
    if not (pathlib.Path(cfg.init) / "config.json").is_file():
        raise UserError(f"--init {cfg.init}: no checkpoint there (run make demo first, or pass an SFT checkpoint)")
    out = pathlib.Path(cfg.out)
    print(environment(), flush=True)

    # 1. the demo's data: the rated sentences, split and cut as the demo does
    sentences = parse_sentences(*read_archive(fetch_sdist(cfg.cache_dir or default_cache_dir())))
    files = write_demo_files(sentences, out / "data", seed=cfg.seed)
    ratings = {s.id: s.ratings for s in sentences}

    # 2. one reward model per aggregate, all evaluated on the demo's held-out pairs
    rows = []
    for how in aggregates:
        data, noise = training_file(files["rm_train"], ratings, how, cfg.seed, out / "data")
        start = time.time()
        evaluation = train_reward_model(cfg, data, files["rm_val"], out / f"rm_{how}")
        rows.append({"aggregate": how, "target_rmse": noise, "accuracy": evaluation["val_accuracy"],
                     "pairs": int(evaluation["val_pairs"]), "val_loss": evaluation["val_loss"],
                     "seconds": time.time() - start})
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(cfg, rows, len(ratings), files)
    print(table)
    if cfg.results:
        write_section("crowd-aggregation", table)
    return rows


def markdown(cfg: Config, rows: list[dict], n_sentences: int, files: dict) -> str:
    """The RESULTS.md section: what was run, the table, why per-rater z-scores are missing (wrapped at 120)."""
    n_train = sum(1 for _ in iter_jsonl(files["rm_train"]))
    names = {"mean": "mean of all raters (the demo)", "median": "median of all raters",
             "one": "one random rater", "mean3": "mean of 3 random raters"}
    setup = (f"{environment()}. {os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}. "
             f"Reward model from `{cfg.init}`, {cfg.steps} steps of batch {cfg.batch_size} (lr {cfg.lr:g}), trained by "
             f"`python -m train_rm` with the demo's flags (`{' '.join(DEMO_RM_FLAGS)}`; `--normalise-on responses`, "
             f"which does not change an ordering) on the {n_train} training sentences of the demo's split (seed "
             f"{cfg.seed}), each with the target named below; held-out pairwise accuracy on the demo's metric: "
             f"held-out sentence pairs whose mean human ratings differ by 1 point or more (the same pairs in every "
             f"row). Target "
             f"RMSE: the root-mean-square distance of the training targets from the all-rater means, in rating points "
             f"(-4..+4).")
    anonymous = (f"The VADER ratings ({n_sentences} sentences) are anonymous per sentence: each line of "
                 f"`movieReviewSnippets_anonDataRatings.txt` holds a sentence's id, mean, standard deviation and a "
                 f"list of 15-29 scores whose positions are NOT the same person across sentences, so per-rater "
                 f"z-normalisation (what the crowd app's export does with its own raters) cannot be computed on them "
                 f"and is not measured here.")
    table = ["| target per training sentence | target RMSE | held-out pairwise accuracy | pairs | train time |",
             "|---|---|---|---|---|"]
    table += [f"| {names[r['aggregate']]} | {r['target_rmse']:.3f} | {r['accuracy']:.4f} | {r['pairs']:,} | "
              f"{r['seconds']:.0f} s |" for r in rows]
    return "\n\n".join(["## What aggregating the crowd buys the reward model (python -m benchmarks.crowd_aggregation)",
                         textwrap.fill(setup, 120), "\n".join(table), textwrap.fill(anonymous, 120)])


if __name__ == "__main__":
    run(main, Config)
