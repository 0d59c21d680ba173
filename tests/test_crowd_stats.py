"""Crowd statistics: Krippendorff's alpha against hand-worked examples, Krippendorff's own published example and the
PyPI package `krippendorff`; leave-one-out agreement; votes, Bradley-Terry, z-scores, majority and Dawid-Skene; score aggregates; the
alpha command; and alpha on the real VADER crowd (skipped only when its sdist cannot be fetched)."""
import json
import math
import random

import numpy as np
import pytest

from minirlhf.config import UserError
from minirlhf.crowd.__main__ import Alpha, alpha, vader_ratings
from minirlhf.crowd.stats import (LEVELS, aggregate_scores, bradley_terry, dawid_skene, krippendorff_alpha,
                                  loo_agreement, majority, pairwise_votes, zscore_by_rater)

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the reliability data of section C: 4 observers
# (rows) x 12 units (columns), None = not rated; the paper's results for the four levels.
KRIPPENDORFF_2011 = [[1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
                     [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
                     [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
                     [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]]
PUBLISHED = {"nominal": 0.743, "ordinal": 0.815, "interval": 0.849, "ratio": 0.797}


def records_of(matrix):
    return [(unit, rater, v) for rater, row in enumerate(matrix) for unit, v in enumerate(row) if v is not None]


# ---------------------------------------------------------------------------------------------------------------------
# Krippendorff's alpha


@pytest.mark.parametrize("level", LEVELS)
def test_alpha_matches_krippendorffs_published_example(level):
    assert krippendorff_alpha(records_of(KRIPPENDORFF_2011), level) == pytest.approx(PUBLISHED[level], abs=5e-4)


def test_alpha_hand_worked():
    # nominal, 2 raters x 3 units (a,a) (a,b) (b,b): o_aa = o_bb = 2, o_ab = o_ba = 1, n_a = n_b = 3, n = 6
    # alpha = 1 - (n-1) (o_ab + o_ba) / (n_a n_b + n_b n_a) = 1 - 5 * 2 / 18 = 4/9
    recs = [(0, "x", "a"), (0, "y", "a"), (1, "x", "a"), (1, "y", "b"), (2, "x", "b"), (2, "y", "b")]
    assert krippendorff_alpha(recs, "nominal") == pytest.approx(4 / 9)
    # interval, units (1,2) (3,4): sum o d2 = 4 * 1; sum n_c n_k d2 = 2 * (1+4+9+1+4+1) = 40; alpha = 1 - 3*4/40
    recs = [(0, "x", 1), (0, "y", 2), (1, "x", 3), (1, "y", 4)]
    assert krippendorff_alpha(recs, "interval") == pytest.approx(0.7)
    # a unit with one value is not pairable and changes nothing; perfect agreement is 1; no variation is undefined
    assert krippendorff_alpha(recs + [(2, "x", 100)], "interval") == pytest.approx(0.7)
    assert krippendorff_alpha([(0, "x", 1), (0, "y", 1), (1, "x", 2), (1, "y", 2)], "ordinal") == 1.0
    assert math.isnan(krippendorff_alpha([(0, "x", 1), (0, "y", 1)], "nominal"))
    assert math.isnan(krippendorff_alpha([(0, "x", 1)], "nominal"))
    with pytest.raises(ValueError, match="twice"):
        krippendorff_alpha([(0, "x", 1), (0, "x", 2)])


def test_alpha_agrees_with_the_krippendorff_package_on_random_data():
    krippendorff = pytest.importorskip("krippendorff", reason="cross-check needs pip install krippendorff ('.[test]')")
    rng = np.random.default_rng(0)
    for trial in range(6):
        raters, units = rng.integers(2, 7), rng.integers(5, 40)
        truth = rng.integers(1, 6, size=units)
        data = np.clip(truth + rng.integers(-1, 2, size=(raters, units)) * (rng.random((raters, units)) < 0.4), 1, 5)
        data = np.where(rng.random((raters, units)) < 0.2, np.nan, data.astype(float))
        recs = [(u, r, float(data[r, u])) for r in range(raters) for u in range(units) if not np.isnan(data[r, u])]
        for level in LEVELS:
            ours = krippendorff_alpha(recs, level)
            theirs = krippendorff.alpha(reliability_data=data, level_of_measurement=level)
            assert ours == pytest.approx(theirs, abs=1e-9), (trial, level)


# ---------------------------------------------------------------------------------------------------------------------
# Agreement and aggregation


def test_leave_one_out_agreement():
    # unit 0: a a b -> x (a) agrees with {a, b}: a tie, credit 1/2; y likewise; z (b) vs {a, a}: 0
    # unit 1: a a a -> everyone 1
    recs = [(0, "x", "a"), (0, "y", "a"), (0, "z", "b"), (1, "x", "a"), (1, "y", "a"), (1, "z", "a")]
    got = loo_agreement(recs, numeric=False)
    assert got == {"x": {"n": 2, "agreement": 0.75}, "y": {"n": 2, "agreement": 0.75}, "z": {"n": 2, "agreement": 0.5}}
    # numeric: x and y follow the others' means, z runs against them; with two raters only, the "others" of one
    # rater are one rater, whose values do vary
    recs = [(u, r, v) for r, values in (("x", [1, 2, 3, 4]), ("y", [1, 2, 3, 5]), ("z", [4, 3, 2, 1]))
            for u, v in enumerate(values)]
    got = loo_agreement(recs, numeric=True)
    assert got["x"]["agreement"] > 0.5 and got["z"]["agreement"] < -0.9 and got["x"]["n"] == 4
    got = loo_agreement([r for r in recs if r[1] != "y"], numeric=True)
    assert got["x"]["agreement"] == pytest.approx(-1) and got["z"]["agreement"] == pytest.approx(-1)


def test_votes_and_bradley_terry():
    assert pairwise_votes([[2, 0, 1], [0, 2, 1]]) == {(2, 0): 1, (2, 1): 2, (0, 1): 2, (0, 2): 1}
    # a cycle of equal wins: equal strengths; a strict order: strengths in that order, finite for the unbeaten
    assert bradley_terry({(0, 1): 2, (1, 2): 2, (2, 0): 2}, 3) == pytest.approx([0, 0, 0], abs=1e-6)
    s = bradley_terry({(0, 1): 3, (1, 2): 3, (0, 2): 3}, 3)
    assert s[0] > s[1] > s[2] and all(map(math.isfinite, s)) and sum(s) == pytest.approx(0, abs=1e-9)
    # the MM fixed point: W_i = sum_j N_ij p_i / (p_i + p_j) (with the prior's 0.5 wins each way)
    p = np.exp(bradley_terry({(0, 1): 5, (1, 0): 1, (1, 2): 2}, 3))
    wins = np.array([[0, 5.5, 0.5], [1.5, 0, 2.5], [0.5, 0.5, 0]])
    games = wins + wins.T
    assert wins.sum(1) == pytest.approx((games * p[:, None] / (p[:, None] + p[None, :])).sum(1), rel=1e-6)


def test_zscores_majority_and_dawid_skene():
    z = dict(((u, r), v) for u, r, v in zscore_by_rater([(0, "x", 1), (1, "x", 3), (0, "y", 5), (1, "y", 5)]))
    assert z == {(0, "x"): -1.0, (1, "x"): 1.0, (0, "y"): 0.0, (1, "y"): 0.0}
    assert majority([(0, "x", "a"), (0, "y", "b"), (0, "z", "b")]) == {0: ("b", pytest.approx(2 / 3))}
    # two careful raters (95% right) and four careless ones (uniformly random): the majority is often the careless
    # raters' accident; Dawid-Skene learns who is careful and recovers the truth far more often
    rng = random.Random(0)
    classes = ["ok", "toxic", "false"]
    truth = {u: rng.choice(classes) for u in range(300)}
    recs = [(u, r, t if rng.random() < 0.95 else rng.choice(classes)) for u, t in truth.items() for r in "ab"]
    recs += [(u, r, rng.choice(classes)) for u in truth for r in "cdef"]
    rng.shuffle(recs)  # (majority breaks ties by the value seen first: not always a careful rater's)
    acc = {}
    for name, fn in (("majority", majority), ("ds", dawid_skene)):
        consensus = fn(recs)
        acc[name] = sum(consensus[u][0] == t for u, t in truth.items()) / len(truth)
    assert acc["ds"] > 0.9 and acc["ds"] > acc["majority"] + 0.1, acc


# ---------------------------------------------------------------------------------------------------------------------
# The alpha command and the real crowd


def test_score_aggregates_hand_worked():
    """[-4, 0, 1, 3, 3]: mean 3/5, median 1. One rater is one of the five scores, each drawn over many seeds; three
    raters drawn WITHOUT replacement from [0, 3, 6, 9] leave one out, so their mean is 6, 5, 4 or 3 (with replacement
    0 and 9 would be possible), and fewer than three raters are all taken."""
    ratings = [-4, 0, 1, 3, 3]
    assert aggregate_scores(ratings, "mean", random.Random(0)) == pytest.approx(0.6)
    assert aggregate_scores(ratings, "median", random.Random(0)) == 1.0
    assert aggregate_scores([2, -1], "median", random.Random(0)) == 0.5
    ones = {aggregate_scores(ratings, "one", random.Random(seed)) for seed in range(200)}
    assert ones == {-4.0, 0.0, 1.0, 3.0}
    threes = {aggregate_scores([0, 3, 6, 9], "mean3", random.Random(seed)) for seed in range(200)}
    assert threes == {3.0, 4.0, 5.0, 6.0}
    assert aggregate_scores([2, -1], "mean3", random.Random(0)) == 0.5
    with pytest.raises(ValueError, match="unknown aggregate"):
        aggregate_scores(ratings, "mode", random.Random(0))
    with pytest.raises(ValueError, match="no ratings"):
        aggregate_scores([], "mean", random.Random(0))


def test_alpha_command_on_a_jsonl_file(tmp_path, capsys):
    path = tmp_path / "ratings.jsonl"
    path.write_text("".join(json.dumps({"item": u, "rater": f"r{r}", "value": v}) + "\n"
                            for u, r, v in records_of(KRIPPENDORFF_2011)))
    assert alpha(Alpha(input=str(path), level="interval")) == pytest.approx(0.849, abs=5e-4)
    assert "Krippendorff's alpha (interval): 0.8491" in capsys.readouterr().out
    path.write_text('{"item": 1, "value": 2}\n')
    with pytest.raises(UserError, match="expected"):
        alpha(Alpha(input=str(path)))
    path.write_text('{"item": 1, "rater": "a", "value": 2}\n{"item": 1, "rater": "a", "value": 3}\n')
    with pytest.raises(UserError, match="twice"):
        alpha(Alpha(input=str(path)))
    with pytest.raises(UserError, match="--input FILE or --vader"):
        alpha(Alpha())


def test_alpha_of_the_vader_movie_review_crowd():
    """10,605 sentences, 15-29 ratings each on -4..4 (fetched with pip like make demo; skipped without an index)."""
    try:
        records = vader_ratings()
    except UserError as e:
        pytest.skip(f"vaderSentiment sdist not available: {e}")
    assert len({u for u, _, _ in records}) == 10605 and len(records) > 15 * 10605
    interval = krippendorff_alpha(records, "interval")
    assert 0.5 < interval < 0.9, interval  # sentiment of sentences: raters agree well, far from perfectly
    assert krippendorff_alpha(records, "ordinal") > krippendorff_alpha(records, "nominal")
