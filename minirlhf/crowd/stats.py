"""The statistics of a rating crowd: how far raters agree, how good each one is, and how many labels become one.

Every function takes plain records ``(unit, rater, value)`` (a unit is what was rated: an item's response, a pair of
responses, a sentence), so the same code serves the web app's store, a JSONL file and the VADER crowd data.

Krippendorff's alpha (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"). Units rated by fewer than two
raters are not pairable and drop out. For the remaining units u with m_u values, the coincidence matrix counts every
ordered pair of values from different raters of one unit, each unit weighing 1:

    o_ck = sum_u  #{ordered pairs (c, k) in u} / (m_u - 1),    n_c = sum_k o_ck,    n = sum_c n_c

    alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_{c,k} o_ck d2(c, k) / sum_{c,k} n_c n_k d2(c, k)

with the difference function d2 of the level of measurement:

    nominal   d2 = [c != k]
    interval  d2 = (c - k)^2
    ratio     d2 = ((c - k) / (c + k))^2
    ordinal   d2 = (sum_{g from c to k} n_g - (n_c + n_k) / 2)^2      (g runs over the values between c and k, in order)

alpha = 1 is perfect agreement, 0 is what raters drawing values at random from the pooled values would reach. When
every pairable value is the same, D_e = 0 and alpha is undefined (NaN here).

Agreement with the leave-one-out consensus. For each label of a rater on a unit that others rated too, the consensus is
the others' labels without it: their majority (nominal; a tie between t values credits 1/t when the rater's value is
one of them), or their mean (numeric). A rater's agreement is the mean credit (nominal) or the Pearson correlation of
their values with the others' means (numeric).

Aggregation (what the export trains on):

* rankings -> pairwise votes: every rater's ranking of K responses votes on each of its K(K-1)/2 pairs;
  :func:`bradley_terry` fits strengths across raters instead, P(i beats j) = p_i / (p_i + p_j), by the MM algorithm of
  Hunter (2004, "MM algorithms for generalized Bradley-Terry models"): p_i <- W_i / sum_{j != i} N_ij / (p_i + p_j),
  W_i the wins of i, N_ij the games of i and j, with ``prior`` virtual wins of each over each so that an unbeaten
  response keeps a finite strength.
* Likert scores -> per-rater z-scores z = (x - mean_r) / std_r, averaged over raters (a harsh rater and a lenient one
  then count alike). Where raters are anonymous (the VADER crowd), :func:`aggregate_scores` makes one unit's raw
  ratings one target: mean, median, one random rater, or the mean of three (benchmarks/crowd_aggregation.py trains a
  reward model on each).
* categories (failure flags) -> majority vote, or Dawid & Skene (1979, "Maximum Likelihood Estimation of Observer
  Error-Rates Using the EM Algorithm"): each rater r has a confusion matrix theta_r[true, given]; EM alternates
  E: T_uk ∝ pi_k prod_r theta_r[k, x_ur]   and   M: pi_k = mean_u T_uk, theta_r[k, l] ∝ sum_u T_uk [x_ur = l] + eps,
  starting from the vote shares, so that a reliable rater outweighs a careless one.

Check alpha on a file of ``{"item", "rater", "value"}`` records::

    python -m minirlhf.crowd alpha --input ratings.jsonl --level interval
"""
import math
import random
from collections import Counter, defaultdict
from typing import Hashable, Iterable, Optional, Sequence

import numpy as np

LEVELS = ("nominal", "ordinal", "interval", "ratio")
Record = tuple[Hashable, Hashable, object]  # (unit, rater, value)


# ---------------------------------------------------------------------------------------------------------------------
# Krippendorff's alpha


def by_unit(records: Iterable[Record]) -> dict[Hashable, dict[Hashable, object]]:
    """``{unit: {rater: value}}``; a rater rating one unit twice is a ValueError (the later label would hide one)."""
    units: dict[Hashable, dict[Hashable, object]] = defaultdict(dict)
    for unit, rater, value in records:
        if rater in units[unit]:
            raise ValueError(f"rater {rater!r} rated unit {unit!r} twice")
        units[unit][rater] = value
    return units


def _difference_matrix(values: list, n_v: np.ndarray, level: str) -> np.ndarray:
    """d2(c, k) for the sorted distinct values (module docstring)."""
    if level == "nominal":
        return 1.0 - np.eye(len(values))
    v = np.asarray(values, dtype=float)
    if level == "interval":
        return (v[:, None] - v[None, :]) ** 2
    if level == "ratio":
        total = v[:, None] + v[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total == 0, 0.0, ((v[:, None] - v[None, :]) / total) ** 2)
    if level == "ordinal":
        cum = np.concatenate([[0.0], np.cumsum(n_v)])  # cum[i] = n of the values below the i-th
        i, k = np.meshgrid(np.arange(len(values)), np.arange(len(values)), indexing="ij")
        lo, hi = np.minimum(i, k), np.maximum(i, k)
        return (cum[hi + 1] - cum[lo] - (n_v[i] + n_v[k]) / 2) ** 2
    raise ValueError(f"level {level!r}: expected one of {', '.join(LEVELS)}")


def krippendorff_alpha(records: Iterable[Record], level: str = "nominal") -> float:
    """Krippendorff's alpha of ``(unit, rater, value)`` records at ``level`` (module docstring). NaN when undefined
    (no pairable values, or no variation among them)."""
    units = [list(raters.values()) for raters in by_unit(records).values() if len(raters) >= 2]
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: expected one of {', '.join(LEVELS)}")
    if not units:
        return math.nan
    values = sorted({v for unit in units for v in unit}, key=lambda v: (str(type(v)), v)) if level == "nominal" \
        else sorted({v for unit in units for v in unit})
    index = {v: i for i, v in enumerate(values)}
    counts = np.zeros((len(units), len(values)))  # (U, V): how often unit u holds value v
    for u, unit in enumerate(units):
        for v in unit:
            counts[u, index[v]] += 1
    weight = 1.0 / (counts.sum(1) - 1)  # (U,) 1 / (m_u - 1)
    o = (counts * weight[:, None]).T @ counts - np.diag(weight @ counts)  # (V, V) coincidences, self-pairs removed
    n_v = o.sum(1)
    n = n_v.sum()
    d2 = _difference_matrix(values, n_v, level)
    expected = (np.outer(n_v, n_v) * d2).sum()
    if expected == 0:
        return math.nan
    return float(1.0 - (n - 1) * (o * d2).sum() / expected)


# ---------------------------------------------------------------------------------------------------------------------
# Agreement with the leave-one-out consensus


def mode_credit(value, others: Sequence) -> float:
    """1/t when ``value`` is one of the t most common of ``others``, else 0."""
    counts = Counter(others)
    top = max(counts.values())
    modes = [v for v, c in counts.items() if c == top]
    return 1.0 / len(modes) if value in modes else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Pearson's r; None with fewer than 3 points or no variation."""
    if len(x) < 3:
        return None
    a, b = np.asarray(x, float), np.asarray(y, float)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else None


def loo_agreement(records: Iterable[Record], numeric: bool) -> dict[Hashable, dict]:
    """``{rater: {"n": units shared with others, "agreement": float or None}}`` (module docstring)."""
    units = by_unit(records)
    credit: dict[Hashable, list[float]] = defaultdict(list)
    pairs: dict[Hashable, tuple[list, list]] = defaultdict(lambda: ([], []))
    for raters in units.values():
        for rater, value in raters.items():
            others = [v for r, v in raters.items() if r != rater]
            if not others:
                continue
            if numeric:
                mine, theirs = pairs[rater]
                mine.append(float(value))
                theirs.append(sum(map(float, others)) / len(others))
            else:
                credit[rater].append(mode_credit(value, others))
    if numeric:
        return {r: {"n": len(x), "agreement": pearson(x, y)} for r, (x, y) in pairs.items()}
    return {r: {"n": len(c), "agreement": sum(c) / len(c)} for r, c in credit.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation


def pairwise_votes(rankings: Sequence[Sequence[int]]) -> dict[tuple[int, int], int]:
    """``{(better, worse): votes}`` over several rankings (each best first) of the same responses."""
    votes: Counter = Counter()
    for ranking in rankings:
        for a, better in enumerate(ranking):
            for worse in ranking[a + 1:]:
                votes[(better, worse)] += 1
    return dict(votes)


def bradley_terry(votes: dict[tuple[int, int], float], n: int, prior: float = 0.5, iters: int = 200,
                  tol: float = 1e-9) -> list[float]:
    """Log-strengths (mean 0) of ``n`` responses from ``{(winner, loser): count}`` (module docstring)."""
    wins = np.full((n, n), prior) - np.eye(n) * prior  # wins[i, j]: times i beat j, prior included
    for (i, j), c in votes.items():
        wins[i, j] += c
    games = wins + wins.T
    p = np.ones(n)
    for _ in range(iters):
        new = wins.sum(1) / (games / (p[:, None] + p[None, :])).sum(1)
        new /= np.exp(np.log(new).mean())
        done = np.abs(new - p).max() < tol
        p = new
        if done:
            break
    return np.log(p).tolist()


def zscore_by_rater(records: Iterable[Record]) -> list[Record]:
    """Each rater's values as z-scores over all of that rater's values (a rater with one distinct value gets 0)."""
    records = list(records)
    mine: dict[Hashable, list[float]] = defaultdict(list)
    for _, rater, value in records:
        mine[rater].append(float(value))
    moments = {r: (float(np.mean(v)), float(np.std(v))) for r, v in mine.items()}
    return [(unit, rater, (float(value) - moments[rater][0]) / moments[rater][1] if moments[rater][1] > 0 else 0.0)
            for unit, rater, value in records]


SCORE_AGGREGATES = ("mean", "median", "one", "mean3")


def aggregate_scores(ratings: Sequence[float], how: str, rng: random.Random) -> float:
    """One unit's numeric ratings as one training target: their ``mean`` or ``median``, ``one`` rater's score drawn
    at random (a crowd of one), or the ``mean3`` of three raters drawn without replacement (all of them when fewer).
    ``rng`` draws the raters (unused by mean and median)."""
    if not ratings:
        raise ValueError("no ratings to aggregate")
    if how == "mean":
        return float(np.mean(ratings))
    if how == "median":
        return float(np.median(ratings))
    if how == "one":
        return float(rng.choice(ratings))
    if how == "mean3":
        return float(np.mean(rng.sample(list(ratings), min(3, len(ratings)))))
    raise ValueError(f"unknown aggregate {how!r}: expected one of {', '.join(SCORE_AGGREGATES)}")


def majority(records: Iterable[Record]) -> dict[Hashable, tuple[object, float]]:
    """``{unit: (most common value, its share)}``; ties go to the value seen first."""
    out = {}
    for unit, raters in by_unit(records).items():
        counts = Counter(raters.values())
        value, c = counts.most_common(1)[0]
        out[unit] = (value, c / len(raters))
    return out


def dawid_skene(records: Iterable[Record], iters: int = 100, eps: float = 0.01, tol: float = 1e-8
                ) -> dict[Hashable, tuple[object, float]]:
    """``{unit: (most probable true class, its posterior)}`` by Dawid-Skene EM (module docstring)."""
    units = by_unit(records)
    names = list(units)
    classes = sorted({v for raters in units.values() for v in raters.values()}, key=str)
    raters = sorted({r for rs in units.values() for r in rs}, key=str)
    ci, ri = {c: i for i, c in enumerate(classes)}, {r: i for i, r in enumerate(raters)}
    K, R, U = len(classes), len(raters), len(names)
    given = np.zeros((U, R, K))  # given[u, r, l] = 1 when rater r labelled unit u with class l
    for u, name in enumerate(names):
        for r, v in units[name].items():
            given[u, ri[r], ci[v]] = 1.0
    post = given.sum(1) / given.sum((1, 2))[:, None]  # (U, K) start from the vote shares
    for _ in range(iters):
        prior = post.mean(0)  # (K,)
        theta = np.einsum("uk,url->rkl", post, given) + eps  # (R, K, K) confusion counts, smoothed
        theta /= theta.sum(2, keepdims=True)
        log_post = np.log(prior)[None, :] + np.einsum("url,rkl->uk", given, np.log(theta))
        new = np.exp(log_post - log_post.max(1, keepdims=True))
        new /= new.sum(1, keepdims=True)
        done = np.abs(new - post).max() < tol
        post = new
        if done:
            break
    return {name: (classes[int(post[u].argmax())], float(post[u].max())) for u, name in enumerate(names)}
