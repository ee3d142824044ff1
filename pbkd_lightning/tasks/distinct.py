"""Name k different numbers in a range that satisfy a rule: many answers are right (scored for validity and
distinctness), and the task program's answer is a uniform draw among them, so a mean-seeking student can learn the
teacher's spread and a mode-seeking one can settle on one answer per prompt."""

import random
import re

from pbkd_lightning.tasks.base import Task

# (name in the prompt, test): rules a number's last digit decides, so a small model can learn them
_RULES = {
    "even numbers": lambda n: n % 2 == 0,
    "odd numbers": lambda n: n % 2 == 1,
    "multiples of 5": lambda n: n % 5 == 0,
}
_PROMPT = re.compile(r"List (\d+) different (.+?) from (\d+) to (\d+)\.")


def _question(prompt: str):
    """``(k, rule, low, high)`` read back from a prompt of this task."""
    found = _PROMPT.search(prompt)
    if not found:
        raise ValueError(f"not a 'distinct' prompt: {prompt[:60]!r}")
    k, rule, low, high = found.groups()
    if rule not in _RULES:
        raise ValueError(f"unknown rule {rule!r} in {prompt[:60]!r}")
    return int(k), _RULES[rule], int(low), int(high)


class DistinctTask(Task):
    """``List 3 different odd numbers from 12 to 40.`` → ``17 25 33``; scored by the share of the k slots filled with
    distinct numbers that satisfy the rule, in any order (extra numbers count against it). The task program answers
    with k of the right numbers drawn uniformly, in ascending order."""

    name = "distinct"

    # Difficulty as measured with the 4,000-step embedded teacher (greedy, 500 held-out prompts): this range form,
    # k of 2-4, starts 10-150: 0.939, and 0.864 trained afresh after aaeecb8 (k = 2 0.951, 3 0.886, 4 0.754: a number
    # past either end, or one repeated); k of 2-3, starts 10-250: 0.908 (past the range's ends); numbers picked from a
    # list in the prompt ("from: 13 28 40 7"): 0.433 (it learnt the rule, not to copy the listed numbers). Tried and
    # not kept (each cost another task points, with arithmetic 0.986-0.990 and reversal 0.992-0.996 beside this
    # form): one decade of 5-digit numbers ("from 47210 to 47219"): distinct 1.000, arithmetic 0.940 (0.934 at 5,000
    # steps); k words out of k + 1 to k + 3 listed ones: distinct 0.936, arithmetic 0.970, reversal 0.982 (greedy
    # repeats the word it just wrote); out of k + 1 or k + 2: 0.878, 0.936, 0.976.
    def __init__(self, min_items: int = 2, max_items: int = 4, low: int = 10, high: int = 150, min_width: int = 20,
                 max_width: int = 40):
        self.min_items, self.max_items = min_items, max_items
        self.low, self.high, self.min_width, self.max_width = low, high, min_width, max_width

    def record(self, rng: random.Random) -> dict:
        k = rng.randint(self.min_items, self.max_items)
        rule = rng.choice(sorted(_RULES))
        low = rng.randint(self.low, self.high)
        high = low + rng.randint(self.min_width, self.max_width)
        valid = [n for n in range(low, high + 1) if _RULES[rule](n)]
        answer = sorted(rng.sample(valid, k))  # a width of 20 or more leaves 4 multiples of 5
        return {"task": self.name, "prompt": f"List {k} different {rule} from {low} to {high}.\n",
                "reference": " ".join(map(str, answer))}

    def check(self, record: dict):
        """What makes ``record`` unscorable by this task, or None."""
        try:
            _question(record["prompt"])
        except ValueError as error:
            return f"{error} (a 'distinct' prompt reads 'List <k> different <rule> from <low> to <high>.', the rule one of {sorted(_RULES)})"
        return None

    def score(self, prediction: str, record: dict) -> float:
        k, test, low, high = _question(record["prompt"])
        items = prediction.split()
        numbers = [int(i) for i in items if re.fullmatch(r"[0-9]+", i)]  # not str.isdigit: it takes '²', int() does not
        good = {n for n in numbers if low <= n <= high and test(n)}
        return min(len(good), k) / max(k, len(items))
