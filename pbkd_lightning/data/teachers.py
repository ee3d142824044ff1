"""Black-box teachers: anything that turns prompt records into response text."""

from typing import Literal, Optional

import torch

from pbkd_lightning.data.api import Endpoint, complete
from pbkd_lightning.data.generation import GenerationConfig, sample_rollouts
from pbkd_lightning.data.records import DataError, read_responses
from pbkd_lightning.models.loading import ModelSpec, load_frozen_model, load_tokenizer
from pbkd_lightning.sequences import chat_messages, prompt_text


class Teacher:
    """Returns one response text per prompt record. Black-box: only text crosses this boundary."""

    def respond(self, records: list[dict]) -> list[str]:
        raise NotImplementedError

    def answer(self, records: list[dict]) -> tuple[list[str], list[bool]]:
        """``(texts, ended)``: ``ended[i]`` is False when the answer was cut at the teacher's length limit, so it is
        never trained on with an eos. Text teachers give whole answers."""
        texts = self.respond(records)
        return texts, [True] * len(texts)

    def describe(self) -> str:
        return type(self).__name__


class TaskProgramTeacher(Teacher):
    """The task program's own solution (the record's ``reference``): an always-correct teacher."""

    def respond(self, records: list[dict]) -> list[str]:
        missing = [i for i, r in enumerate(records) if not r.get("reference")]
        if missing:
            raise DataError(f"TaskProgramTeacher needs a 'reference' on every prompt; record {missing[0]} has none")
        return [r["reference"] for r in records]


class ResponseFileTeacher(Teacher):
    """Responses read from a JSONL file of ``{"prompt", "teacher"}`` records (``"response"`` also accepted).

    Read once, on the first :meth:`load` (the data module calls it before any model loads, so a bad file stops the
    run at once). A prompt given twice with different responses is an error naming both lines.
    """

    def __init__(self, path: str):
        self.path = path
        self._responses: Optional[dict[str, str]] = None
        self.empty_prompts: set = set()  # prompts whose only responses were empty (dropped: ``data.empty: drop``)

    def load(self, empty: Literal["error", "drop"] = "error", dropped: Optional[list] = None) -> None:
        """Read the file; ``empty``, ``dropped``: as in :func:`~pbkd_lightning.data.records.read_responses`."""
        if self._responses is None:
            self._responses = read_responses(self.path, empty, dropped, self.empty_prompts)

    def has_response(self, prompt: str) -> bool:
        self.load()
        return prompt in self._responses

    def respond(self, records: list[dict]) -> list[str]:
        missing = [r["prompt"] for r in records if not self.has_response(r["prompt"])]
        if missing:
            raise DataError(f"{self.path}: no teacher response for prompt {prompt_text(missing[0])[:60]!r} "
                            f"({len(missing)} missing)")
        return [self._responses[r["prompt"]] for r in records]

    def describe(self) -> str:
        return f"ResponseFileTeacher({self.path})"


class HFModelTeacher(Teacher):
    """A local Hugging Face causal LM answering through ``generate`` with its own tokenizer,
    optionally quantized to 4-bit NF4 or 8-bit by bitsandbytes to fit a big teacher in memory."""

    def __init__(
        self,
        path: str,
        max_new_tokens: Optional[int] = None,
        temperature: float = 0.0,
        batch_size: int = 16,
        quantization: Optional[Literal["nf4", "int8"]] = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gguf_file: Optional[str] = None,
    ):
        """
        Args:
            path: a local model folder, or ``pkg:<module>`` (an installed package's folder).
            max_new_tokens: longest response; None: the data's response limit (``data.generation.max_new_tokens``),
                so no answer is cut.
            temperature: 0 = greedy.
            batch_size: prompts per ``generate`` call.
            quantization: ``nf4`` or ``int8`` through bitsandbytes.
            dtype: weights' dtype when not quantized.
            gguf_file: a GGUF file inside ``path`` to load.
        """
        self.path, self.batch_size, self.gguf_file = path, batch_size, gguf_file
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.quantization, self.dtype = quantization, dtype
        self.generation = GenerationConfig(max_new_tokens=max_new_tokens or 64, temperature=temperature)

    def set_max_new_tokens(self, max_new_tokens: int) -> None:
        """Answer with up to this many tokens (the data module's response limit, when none was given)."""
        self.max_new_tokens = max_new_tokens
        self.generation = GenerationConfig(max_new_tokens=max_new_tokens, temperature=self.temperature)

    def respond(self, records: list[dict]) -> list[str]:
        return self.answer(records)[0]

    def answer(self, records: list[dict]) -> tuple[list[str], list[bool]]:
        tokenizer = load_tokenizer(ModelSpec(path=self.path, gguf_file=self.gguf_file))
        model = load_frozen_model(self.path, self.quantization, self.dtype, self.gguf_file)
        with torch.inference_mode():
            rollouts, _ = sample_rollouts(model, tokenizer, [r["prompt"] for r in records], self.generation, 1, self.batch_size)
        del model
        return [group[0].text for group in rollouts], [group[0].ended for group in rollouts]

    def describe(self) -> str:
        return (f"HFModelTeacher({self.path}, {self.generation}, quantization={self.quantization}, dtype={self.dtype}, "
                f"gguf_file={self.gguf_file})")


class OpenAITeacher(Teacher):
    """A served model answering through the OpenAI chat-completions protocol (vLLM, llama.cpp's server, a hosted API).

    Requests run ``concurrency`` at a time and are retried with backoff; every answer is cached on disk as it arrives
    (``cache_dir``), so an interrupted run resumes without asking again and a run with the same settings asks nothing.
    The API key is read from the environment variable ``api_key_env`` when a request is sent, never stored.
    """

    def __init__(
        self,
        model: str,
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key_env: Optional[str] = None,
        system_prompt: Optional[str] = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: Optional[int] = None,
        concurrency: int = 8,
        max_retries: int = 6,
        timeout: float = 120.0,
        retry_delay: float = 1.0,
        cache_dir: Optional[str] = None,
    ):
        """
        Args:
            model: the model name the server serves.
            base_url: the server's OpenAI-compatible root, e.g. ``http://127.0.0.1:8000/v1`` (vLLM),
                ``http://127.0.0.1:8080/v1`` (llama.cpp), ``https://api.openai.com/v1``.
            api_key_env: the environment variable that holds the API key, e.g. ``OPENAI_API_KEY`` (None: send
                none, as local servers need; never the key itself).
            system_prompt: a system turn before every prompt.
            temperature: 0 = greedy.
            top_p: nucleus sampling.
            max_new_tokens: ``max_tokens`` of each answer (the teacher's tokens); None: the data's response limit.
            concurrency: requests in flight at once.
            max_retries: retries of a rate-limited, failed or timed-out request.
            timeout: seconds to wait for one answer.
            retry_delay: the first retry's wait, doubled each retry (a ``Retry-After`` header wins).
            cache_dir: the answer cache's folder; None: ``$PBKD_LIGHTNING_CACHE/api`` (``~/.cache/pbkd_lightning/api``).
        """
        self.model, self.base_url, self.api_key_env, self.system_prompt = model, base_url, api_key_env, system_prompt
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.concurrency, self.max_retries, self.timeout, self.retry_delay = concurrency, max_retries, timeout, retry_delay
        self.cache_dir = cache_dir
        self.endpoint = Endpoint(base_url, model, api_key_env, concurrency, max_retries, timeout, retry_delay, cache_dir)

    def set_max_new_tokens(self, max_new_tokens: int) -> None:
        self.max_new_tokens = max_new_tokens

    def request(self, prompt) -> dict:
        body = {"messages": chat_messages(prompt, self.system_prompt), "temperature": self.temperature, "top_p": self.top_p}
        if self.max_new_tokens is not None:
            body["max_tokens"] = self.max_new_tokens
        return body

    def respond(self, records: list[dict]) -> list[str]:
        return self.answer(records)[0]

    def answer(self, records: list[dict]) -> tuple[list[str], list[bool]]:
        answers = complete(self.endpoint, [self.request(r["prompt"]) for r in records], f"teacher {self.model}")
        return [a["text"] for a in answers], [a["finish_reason"] != "length" for a in answers]

    def describe(self) -> str:
        return (f"OpenAITeacher({self.base_url}, {self.model}, system_prompt={self.system_prompt!r}, T={self.temperature}, "
                f"top_p={self.top_p}, max_new_tokens={self.max_new_tokens})")
