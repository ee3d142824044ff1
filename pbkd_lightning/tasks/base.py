"""What every built-in task shares: records drawn one at a time from a seeded generator."""

import random


class Task:
    """A task draws one prompt record with ``record(rng)`` and scores with ``score(prediction, record)``."""

    name = ""

    def record(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def generate(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        return [self.record(rng) for _ in range(n)]

    def check(self, record: dict):
        """What makes ``record`` unscorable by this task, or None (any text is scorable by default)."""
        return None
