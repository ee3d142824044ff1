"""Labelers decide which of two responses to a prompt is preferred.

A label is +1 (the teacher's response preferred), -1 (the student's) or 0 (a tie: no
preference information, left out of the Bradley–Terry term and of preference accuracy).
"""

import hashlib
import re
from typing import Optional

from pbkd_lightning.data.api import Endpoint, complete
from pbkd_lightning.sequences import chat_messages, prompt_text
from pbkd_lightning.tasks import get_task

LABELERS = ("teacher", "verifier", "both", "judge")


def label_pair(labeler: str, record: dict, teacher: str, student: str) -> int:
    """Label one pair.

    ``teacher``: the teacher is always preferred (the paper's choice), except when both texts
    are identical. ``verifier``: the response the task scores higher is preferred; equal scores tie.
    ``both``: the verifier where it decides, else the teacher (the paper's rule breaks the verifier's ties).
    """
    if labeler not in LABELERS or labeler == "judge":
        raise ValueError(f"unknown labeler {labeler!r}; choose one of {LABELERS[:3]} (the judge labels in batches: "
                         "OpenAIJudge.compare)")
    if teacher.strip() == student.strip():
        return 0
    if labeler == "teacher":
        return 1
    verdict = verify(record, teacher, student)
    return verdict if verdict != 0 or labeler == "verifier" else 1


def verify(record: dict, first: str, second: str) -> int:
    """+1 when the task scores ``first`` higher than ``second``, -1 when lower, 0 when equal."""
    task = get_task(record.get("task", "text"))
    if record.get("reference") is None:
        raise ValueError("the verifier labeler needs a 'reference' on every prompt")
    first_score, second_score = task.score(first, record), task.score(second, record)
    return (first_score > second_score) - (first_score < second_score)


def sample_pairs(record: dict, samples: list[str]) -> list[tuple[str, str]]:
    """``(better, worse)`` for every two of a prompt's samples that the verifier tells apart: what the
    student step's group advantages compare, so the reward model learns to rank them too."""
    distinct = list(dict.fromkeys(s.strip() for s in samples))
    pairs = []
    for i, first in enumerate(distinct):
        for second in distinct[i + 1 :]:
            verdict = verify(record, first, second)
            if verdict:
                pairs.append((first, second) if verdict > 0 else (second, first))
    return pairs


JUDGE_TEMPLATE = """Which response answers the prompt better? Judge correctness first, then helpfulness and brevity.

[Prompt]
{prompt}

[Response A]
{a}

[Response B]
{b}

Reply with exactly one of [[A]], [[B]] or [[tie]]."""
_VERDICT = re.compile(r"\[\[\s*(A|B|tie)\s*\]\]", re.IGNORECASE)


def parse_verdict(text: str) -> Optional[str]:
    """``"A"``, ``"B"`` or ``"tie"`` from a judge's answer holding exactly one distinct ``[[...]]`` verdict, else None."""
    found = {m.upper() if m.lower() != "tie" else "tie" for m in _VERDICT.findall(text)}
    return found.pop() if len(found) == 1 else None


class OpenAIJudge:
    """A judge model behind an OpenAI-compatible endpoint that says which of two responses to a prompt is better.

    Each pair is asked in both orders (``both_orders``): a verdict counts only when the two agree, so a judge that
    favours a position yields no label instead of a biased one; with one order, the order is drawn per pair (from the
    pair's texts, so the same pair is always asked the same way) and undone. Ties, unparseable answers and
    disagreeing orders are counted and give no label (0). Verdicts are cached like teacher answers.
    """

    def __init__(
        self,
        model: str,
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key_env: Optional[str] = None,
        template: str = JUDGE_TEMPLATE,
        system_prompt: Optional[str] = None,
        both_orders: bool = True,
        max_new_tokens: int = 16,
        concurrency: int = 8,
        max_retries: int = 6,
        timeout: float = 120.0,
        retry_delay: float = 1.0,
        cache_dir: Optional[str] = None,
    ):
        """
        Args:
            model: the judge model's name on the server.
            base_url, api_key_env, concurrency, max_retries, timeout, retry_delay, cache_dir: as in
                :class:`~pbkd_lightning.data.teachers.OpenAITeacher`.
            template: the request, with ``{prompt}``, ``{a}`` and ``{b}``; the answer must hold ``[[A]]``, ``[[B]]``
                or ``[[tie]]``.
            system_prompt: a system turn before it.
            both_orders: ask every pair as (A, B) and (B, A), keeping only verdicts that agree.
            max_new_tokens: the judge's answer length (greedy).
        """
        if not all(field in template for field in ("{prompt}", "{a}", "{b}")):
            raise ValueError("`data.judge.template` must hold {prompt}, {a} and {b}")
        try:
            template.format(prompt="", a="", b="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"`data.judge.template` has other braces than {{prompt}}, {{a}} and {{b}} ({error!r}); "
                             "write a literal brace as {{ or }}") from None
        self.model, self.base_url, self.api_key_env, self.template = model, base_url, api_key_env, template
        self.system_prompt, self.both_orders, self.max_new_tokens = system_prompt, both_orders, max_new_tokens
        self.concurrency, self.max_retries, self.timeout, self.retry_delay = concurrency, max_retries, timeout, retry_delay
        self.cache_dir = cache_dir
        self.endpoint = Endpoint(base_url, model, api_key_env, concurrency, max_retries, timeout, retry_delay, cache_dir)

    def _request(self, prompt, a: str, b: str) -> dict:
        question = self.template.format(prompt=prompt_text(prompt), a=a, b=b)
        return {"messages": chat_messages(question, self.system_prompt), "temperature": 0.0, "max_tokens": self.max_new_tokens}

    def compare(self, items: list[tuple]) -> tuple[list[int], dict[str, int]]:
        """Verdicts on ``(prompt, first, second)`` items: +1 ``first`` better, -1 ``second``, 0 no label; and the counts
        ``pairs``, ``asked`` (requests), ``ties``, ``unparsed``, ``inconsistent`` (the two orders disagree)."""
        counts = {"pairs": len(items), "asked": 0, "ties": 0, "unparsed": 0, "inconsistent": 0}
        asks, plans = [], []  # per item: the requests' indices and whether each had ``first`` as A
        for prompt, first, second in items:
            if first.strip() == second.strip():
                plans.append([])
                continue
            orders = [True, False] if self.both_orders else [_first_as_a(first, second)]
            plans.append([(len(asks) + i, first_as_a) for i, first_as_a in enumerate(orders)])
            asks += [self._request(prompt, first, second) if first_as_a else self._request(prompt, second, first)
                     for first_as_a in orders]
        answers = complete(self.endpoint, asks, f"judge {self.model}") if asks else []
        counts["asked"] = len(asks)
        verdicts = []
        for plan in plans:
            if not plan:
                verdicts.append(0)
                continue
            said = [parse_verdict(answers[index]["text"]) for index, _ in plan]
            if None in said:
                counts["unparsed"] += 1
                verdicts.append(0)
                continue
            signs = [0 if v == "tie" else (1 if (v == "A") == first_as_a else -1) for v, (_, first_as_a) in zip(said, plan)]
            if len(set(signs)) > 1:
                counts["inconsistent"] += 1
                verdicts.append(0)
            elif signs[0] == 0:
                counts["ties"] += 1
                verdicts.append(0)
            else:
                verdicts.append(signs[0])
        return verdicts, counts

    def describe(self) -> str:
        return f"OpenAIJudge({self.base_url}, {self.model}, both_orders={self.both_orders})"


def _first_as_a(first: str, second: str) -> bool:
    """A fixed coin for the pair: the same pair is always asked in the same order (and so found in the cache)."""
    return hashlib.sha256(f"{first}\x00{second}".encode()).digest()[0] % 2 == 0
