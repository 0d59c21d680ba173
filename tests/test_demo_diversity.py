"""The demo's length and variety statistics against hand-worked cases."""
import pytest

from minirlhf.demo.diversity import distinct_n, text_stats


def test_text_stats_hand_worked():
    """Five continuations, 1 + 3 + 1 + 3 + 2 = 10 words. Unigrams: funny. the best film funny. the best film the best.
    -> 5 distinct of 10. Bigrams (never across continuations): (the best),
    (best film), (the best), (best film), (the best.) -> 3 distinct of 5. Strings, ends stripped: "funny." x2,
    "the best film" x2, "the best." -> 3 distinct of 5; the tie between the first two goes to the first seen."""
    texts = ["funny.", "the best film", " funny.", "the best film", "the best."]
    stats = text_stats(texts, top=2)
    assert stats["mean_words"] == pytest.approx(2.0)
    assert stats["distinct_1"] == pytest.approx(0.5)
    assert stats["distinct_2"] == pytest.approx(0.6)
    assert stats["distinct_continuations"] == 3 and stats["distinct_share"] == pytest.approx(0.6)
    assert stats["top"] == [["funny.", 2], ["the best film", 2]]
    assert text_stats(texts)["top"][2] == ["the best.", 1]


def test_short_and_empty_continuations_have_no_ngrams():
    """A continuation shorter than n adds no n-gram; with none at all, distinct-n is 0. The empty continuation counts
    as one (of length 0)."""
    assert distinct_n(["", "good", "very good"], 2) == pytest.approx(1.0)  # one bigram: (very good)
    assert distinct_n(["", "good"], 2) == 0.0
    stats = text_stats(["", "good", "good"])
    assert stats["mean_words"] == pytest.approx(2 / 3)
    assert stats["distinct_1"] == pytest.approx(0.5)
    assert stats["top"] == [["good", 2], ["", 1]] and stats["distinct_share"] == pytest.approx(2 / 3)
