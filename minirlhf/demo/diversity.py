"""How long and how varied a policy's continuations are: the signs of reward hacking in the demo's judge step.

A policy that learns the reward model's favourite words can also learn that the shortest positive ending wins ("funny.")
and write it for every prompt; its sentiment rises while its continuations shrink and repeat. For a list of
continuations (words = whitespace-separated pieces, as written)::

    mean_words    = total words / continuations
    distinct_n    = distinct n-grams / total n-grams, over all continuations together (Li et al. 2016, "A
                    Diversity-Promoting Objective Function for Neural Conversation Models"; n-grams never cross from
                    one continuation to the next, and a continuation shorter than n has none)
    distinct_share = distinct continuations / continuations (exact strings, whitespace at the ends ignored)
    top           = the most repeated continuations with their counts

The judge (:func:`minirlhf.demo.pipeline.judge`) writes them to ``judge.json`` for SFT and PPO, and the report puts them
beside the sentiment gain.
"""
import collections


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / total n-grams over all ``texts`` (0 when there are none)."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_stats(texts: list[str], top: int = 5) -> dict:
    """Mean length in words, distinct-1, distinct-2, the share of distinct continuations, and the ``top`` most
    repeated continuations as ``[[text, count], ...]`` (most frequent first; ties in order of first appearance)."""
    counts = collections.Counter(t.strip() for t in texts)
    return {"mean_words": sum(len(t.split()) for t in texts) / len(texts),
            "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "distinct_continuations": len(counts), "distinct_share": len(counts) / len(texts),
            "top": [[text, count] for text, count in counts.most_common(top)]}

