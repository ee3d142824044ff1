"""An OpenAI-compatible chat-completions client (vLLM, llama.cpp's server, hosted APIs): concurrent requests,
retries with backoff, and every answer cached on disk the moment it arrives.

Only the name of the environment variable that holds the API key is ever kept (in configs, hyperparameters,
checkpoints, caches); the key itself is read from the environment when a request is sent.
"""

import hashlib
import http.client
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from tqdm.auto import tqdm

RETRIED_STATUS = (408, 409, 429)  # and every 5xx: rate limits, a busy, overloaded or restarting server


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
    api_key_env: Optional[str] = None
    """The environment variable holding the API key, sent as a bearer token (None: none, as local servers need)."""
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
        if not re.match(r"^https?://[^/\s]+", self.base_url):
            raise ValueError(f"`base_url` must be an http(s) URL such as http://127.0.0.1:8000/v1, got {self.base_url!r}")
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            # a key pasted here would be written into every config, hyperparameter file and checkpoint
            raise ValueError("`api_key_env` names the environment variable that holds the key (e.g. OPENAI_API_KEY), "
                             "not the key itself")
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
            with open(self.path, "a+", encoding="utf-8") as handle:
                handle.seek(0, os.SEEK_END)
                if handle.tell() and not _ends_with_newline(self.path):  # a killed writer's torn line: end it first
                    handle.write("\n")
                handle.write(json.dumps({"key": key, "answer": answer}) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.answers[key] = answer


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _plain_numbers(value):
    """0 and 0.0 the same in a request's key: numbers as floats (ints that are counts, like max_tokens, stay)."""
    if isinstance(value, dict):
        return {k: _plain_numbers(v) if k != "max_tokens" else v for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_numbers(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def request_key(endpoint: Endpoint, body: dict) -> str:
    return hashlib.sha256(json.dumps([endpoint.base_url, _plain_numbers(body)], sort_keys=True).encode()).hexdigest()


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

            futures = [pool.submit(ask, key) for key in missing]
            try:
                for future in futures:
                    future.result()
            except BaseException:  # the first failure stops the run: the queued requests are not sent
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    return [cache.answers[key] for key in keys]


def _post(endpoint: Endpoint, body: dict) -> dict:
    url = endpoint.base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    key = (os.environ.get(endpoint.api_key_env) or "").strip() if endpoint.api_key_env else ""
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    last = ""
    for attempt in range(endpoint.max_retries + 1):
        wait = min(60.0, endpoint.retry_delay * 2 ** attempt) * (0.5 + random.random() / 2)
        try:
            with urllib.request.urlopen(request, timeout=endpoint.timeout) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as error:
            try:
                said = " ".join(error.read().decode("utf-8", "replace").split())[:300]
            except (OSError, http.client.HTTPException):
                said = ""
            last = _redact(f"HTTP {error.code} {error.reason}: {said}", key)
            if error.code not in RETRIED_STATUS and error.code < 500:
                hint = f" (is ${endpoint.api_key_env} set?)" if error.code in (401, 403) else ""
                raise APIError(f"{url}: {last}{hint}") from None
            after = error.headers.get("Retry-After") if error.headers else None
            if after and after.replace(".", "", 1).isdigit():
                wait = min(float(after), 300.0)
        except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, a truncated reply
            reason = getattr(error, "reason", error)
            last = _redact(f"{type(reason).__name__}: {reason}", key)
        except ValueError as error:  # http.client's refusal of a header value
            raise APIError(f"{url}: the request could not be sent ({_redact(str(error), key)})") from None
        else:
            try:
                return _answer(url, json.loads(raw.decode("utf-8")))
            except ValueError as error:  # a reply cut short or not JSON: asked again
                last = f"the answer is not JSON ({error})"
        if attempt < endpoint.max_retries:
            time.sleep(wait)
    raise APIError(f"{url}: no answer after {endpoint.max_retries + 1} tries; last: {last}")


def _redact(text: str, key: str) -> str:
    return text.replace(key, "<API key>") if key else text


def _answer(url: str, reply: dict) -> dict:
    try:
        choice = reply["choices"][0]
        text = choice["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise APIError(f"{url}: the answer holds no choices[0].message.content: {json.dumps(reply)[:300]}") from None
    usage = reply.get("usage") or {}
    return {"text": text, "finish_reason": choice.get("finish_reason"), "tokens": int(usage.get("completion_tokens") or 0)}
