"""Reverse a short list of words; scored by ROUGE-L F1 against the reversed list (partial credit)."""

import random

from torchmetrics.functional.text.rouge import rouge_score

from pbkd_lightning.tasks.base import Task

_WORDS = ["red", "sun", "cat", "dog", "sky", "map", "cup", "owl", "fig", "jam", "box", "ice"]


class ReversalTask(Task):
    name = "reversal"

    def __init__(self, min_words: int = 3, max_words: int = 6):
        self.min_words, self.max_words = min_words, max_words

    def record(self, rng: random.Random) -> dict:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(self.min_words, self.max_words))]
        return {"task": self.name, "prompt": f"Reverse: {' '.join(words)}\n", "reference": " ".join(reversed(words))}

    def score(self, prediction: str, record: dict) -> float:
        reference = record["reference"]
        if not prediction.strip():
            return 0.0
        # use_stemmer=False: the stemmer needs nltk data that cannot be downloaded offline.
        return float(rouge_score(prediction, reference, rouge_keys="rougeL", use_stemmer=False)["rougeL_fmeasure"])
