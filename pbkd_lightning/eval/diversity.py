"""Diversity of K samples per prompt: distinct-n and self-BLEU (the quality–diversity trade-off).

Texts are split on whitespace. Each metric is computed per prompt over its K samples, then
averaged over prompts.
"""

from torchmetrics.functional.text import bleu_score


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(samples: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the samples (1.0 = no n-gram repeats; 0 when there are none).

    >>> distinct_n(["a b a b"], 2)
    0.6666666666666666
    """
    grams = [g for text in samples for g in _ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(samples: list[str], max_n: int = 4) -> float:
    """Mean BLEU of each sample against the other samples as references (1.0 = all identical).

    BLEU's order is capped at each sample's length, so short identical samples still score 1;
    empty samples are skipped; fewer than two samples give 0.
    """
    if len(samples) < 2:
        return 0.0
    scores = []
    for i, hypothesis in enumerate(samples):
        length = len(hypothesis.split())
        if length == 0:
            continue
        references = [s for j, s in enumerate(samples) if j != i]
        scores.append(float(bleu_score([hypothesis], [references], n_gram=min(max_n, length))))
    return sum(scores) / len(scores) if scores else 0.0


def diversity(groups: list[list[str]]) -> dict[str, float]:
    """``distinct_1``, ``distinct_2`` and ``self_bleu`` averaged over prompts; ``groups[i]`` = the K samples of prompt i."""
    groups = [g for g in groups if len(g) >= 2]
    if not groups:
        return {}
    return {
        "distinct_1": sum(distinct_n(g, 1) for g in groups) / len(groups),
        "distinct_2": sum(distinct_n(g, 2) for g in groups) / len(groups),
        "self_bleu": sum(self_bleu(g) for g in groups) / len(groups),
    }
