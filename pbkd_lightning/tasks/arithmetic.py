"""GSM8K-format two-step arithmetic word problems with a chain of thought and ``#### <answer>``."""

import random
import re

from pbkd_lightning.tasks.base import Task

_NAMES = ["Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal"]
_ITEMS = ["pens", "cups", "eggs", "hats", "keys", "maps"]
_ANSWER = re.compile(r"####\s*(-?\d+)")


def extract_answer(text: str):
    """The number after the last ``####``, or None (GSM8K's answer convention)."""
    found = _ANSWER.findall(text)
    return found[-1] if found else None


class ArithmeticTask(Task):
    """Start with a, gain or lose b, then gain or lose c; scored by exact match of the final answer."""

    name = "arithmetic"

    def __init__(self, max_operand: int = 9):
        self.max_operand = max_operand

    def record(self, rng: random.Random) -> dict:
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a = rng.randint(2, self.max_operand)
        b = rng.randint(1, self.max_operand)
        first_gain = rng.random() < 0.5 or b > a
        mid = a + b if first_gain else a - b
        c = rng.randint(1, self.max_operand)
        second_gain = rng.random() < 0.5 or c > mid
        end = mid + c if second_gain else mid - c
        verb1 = "gets" if first_gain else "loses"
        verb2 = "gets" if second_gain else "loses"
        prompt = f"{name} has {a} {item}, {verb1} {b}, then {verb2} {c}. How many {item}?\n"
        step1 = f"{a}{'+' if first_gain else '-'}{b}={mid}"
        step2 = f"{mid}{'+' if second_gain else '-'}{c}={end}"
        return {"task": self.name, "prompt": prompt, "reference": f"{step1}. {step2}.\n#### {end}"}

    def check(self, record: dict):
        """What makes ``record`` unscorable by this task, or None."""
        if record.get("reference") is not None and extract_answer(record["reference"]) is None:
            return "the reference has no final answer '#### <number>' (GSM8K's format) to compare with"
        return None

    def score(self, prediction: str, record: dict) -> float:
        predicted, expected = extract_answer(prediction), extract_answer(record["reference"])
        return float(predicted is not None and predicted == expected)
