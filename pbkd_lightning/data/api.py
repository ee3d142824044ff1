"""An OpenAI-compatible chat-completions client (vLLM, llama.cpp's server, hosted APIs): concurrent requests,
retries with backoff, and every answer cached on disk the moment it arrives.

Only the name of the environment variable that holds the API key is ever kept (in configs, hyperparameters,
checkpoints, caches); the key itself is read from the environment when a request is sent.
"""

import hashlib
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from tqdm.auto import tqdm

RETRIED_STATUS = (408, 409, 429, 500, 502, 503, 504)  # rate limits and a busy or restarting server


class APIError(RuntimeError):
    """A request that failed for good (after its retries, or at once for a refused one); the message says why."""


def api_cache_root() -> str:
    """Where answers are cached: ``$PBKD_LIGHTNING_CACHE/api``, by default ``~/.cache/pbkd_lightning/api``."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pbkd_lightning")
    return os.path.join(os.environ.get("PBKD_LIGHTNING_CACHE") or default, "api")


@dataclass
class Endpoint:
    """Where and how to send chat-completion requests."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """The server's OpenAI-compatible root (``.../v1``); requests go to ``{base_url}/chat/completions``."""
    model: str = "default"
    """The model name the server knows."""
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    """The environment variable holding the API key (sent as a bearer token when set; local servers need none)."""
    concurrency: int = 8
    """Requests in flight at once."""
    max_retries: int = 6
    """Retries of a failed request (rate limit, server error, timeout, dropped connection) before giving up."""
    timeout: float = 120.0
    """Seconds to wait for one answer."""
    retry_delay: float = 1.0
    """The first retry's wait in seconds, doubled each retry (up to 60 s, with jitter); a ``Retry-After`` header wins."""
    cache_dir: Optional[str] = None
    """Folder of the answer cache; None: :func:`api_cache_root`."""

    def __post_init__(self):
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout <= 0 or self.retry_delay < 0:
            raise ValueError("an API endpoint needs concurrency >= 1, max_retries >= 0, timeout > 0 and retry_delay >= 0")


class AnswerCache:
    """Answers keyed by their request, in one JSONL file per endpoint and model: one line appended (and fsynced) per
    answer as it arrives, so a killed run loses none it received; a torn last line is ignored when read back."""

    def __init__(self, endpoint: Endpoint):
        folder = endpoint.cache_dir or api_cache_root()
        name = hashlib.sha256(f"{endpoint.base_url}|{endpoint.model}".encode()).hexdigest()[:16]
        self.path = os.path.join(folder, f"{name}.jsonl")
        self.answers: dict[str, dict] = {}
        self._lock = threading.Lock()
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        stored = json.loads(line)
                        self.answers[stored["key"]] = stored["answer"]
                    except (ValueError, KeyError, TypeError):
                        continue  # the line a killed run was writing

    def add(self, key: str, answer: dict) -> None:
        with self._lock:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "answer": answer}) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.answers[key] = answer


def request_key(endpoint: Endpoint, body: dict) -> str:
    return hashlib.sha256(json.dumps([endpoint.base_url, body], sort_keys=True).encode()).hexdigest()


def complete(endpoint: Endpoint, bodies: list[dict], what: str = "requests") -> list[dict]:
    """``{"text", "finish_reason", "tokens"}`` for each request body (``messages`` and sampling settings; the model is
    added), from the cache where it holds the answer, else asked ``endpoint.concurrency`` at a time.

    Raises:
        APIError: when a request fails for good, naming the server, the status and what it said.
    """
    cache = AnswerCache(endpoint)
    bodies = [{"model": endpoint.model, **body} for body in bodies]
    keys = [request_key(endpoint, body) for body in bodies]
    missing = list(dict.fromkeys(key for key in keys if key not in cache.answers))
    if missing:
        by_key = dict(zip(keys, bodies))
        tokens, started, counting = [0], time.monotonic(), threading.Lock()
        with tqdm(total=len(missing), desc=what, unit="answer", dynamic_ncols=True, mininterval=1.0) as bar, \
                ThreadPoolExecutor(endpoint.concurrency) as pool:
            def ask(key):
                answer = _post(endpoint, by_key[key])
                cache.add(key, answer)
                with counting:
                    tokens[0] += answer["tokens"]
                    bar.update(1)
                    rate = tokens[0] / max(time.monotonic() - started, 1e-9)
                    bar.set_postfix(tokens=tokens[0], tokens_per_s=f"{rate:.0f}")

            for future in [pool.submit(ask, key) for key in missing]:
                future.result()  # the first failure stops the run (the answers received are cached)
    return [cache.answers[key] for key in keys]


def _post(endpoint: Endpoint, body: dict) -> dict:
    url = endpoint.base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode()
    last = ""
    for attempt in range(endpoint.max_retries + 1):
        wait = min(60.0, endpoint.retry_delay * 2 ** attempt) * (0.5 + random.random() / 2)
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=endpoint.timeout) as reply:
                return _answer(url, json.loads(reply.read().decode("utf-8")))
        except urllib.error.HTTPError as error:
            said = " ".join(error.read().decode("utf-8", "replace").split())[:300]
            last = f"HTTP {error.code} {error.reason}: {said}"
            if error.code not in RETRIED_STATUS:
                hint = f" (is ${endpoint.api_key_env} set?)" if error.code in (401, 403) and endpoint.api_key_env else ""
                raise APIError(f"{url}: {last}{hint}") from None
            after = error.headers.get("Retry-After") if error.headers else None
            if after and after.replace(".", "", 1).isdigit():
                wait = min(float(after), 300.0)
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
            reason = getattr(error, "reason", error)
            last = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
        except ValueError as error:  # not JSON
            raise APIError(f"{url}: the server's answer is not JSON ({error})") from None
        if attempt < endpoint.max_retries:
            time.sleep(wait)
    raise APIError(f"{url}: no answer after {endpoint.max_retries + 1} tries; last: {last}")


def _answer(url: str, reply: dict) -> dict:
    try:
        choice = reply["choices"][0]
        text = choice["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise APIError(f"{url}: the answer holds no choices[0].message.content: {json.dumps(reply)[:300]}") from None
    usage = reply.get("usage") or {}
    return {"text": text, "finish_reason": choice.get("finish_reason"), "tokens": int(usage.get("completion_tokens") or 0)}
