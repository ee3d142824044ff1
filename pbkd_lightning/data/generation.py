"""Batched sampling from a causal LM with the KV cache: rollouts that keep what was sampled and its log π_old."""

import inspect
import logging
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt

from pbkd_lightning.config import TopP, validate_fields
from pbkd_lightning.data import shared_prefix as shared_prefix_decoding
from pbkd_lightning.losses import sampling_logits
from pbkd_lightning.parallel import is_sharded
from pbkd_lightning.sequences import Rollout, render_prompt

logger = logging.getLogger(__name__)


@dataclass
class GenerationConfig:
    """How responses are sampled. The same settings define π_old and π_θ in the policy losses."""

    max_new_tokens: PositiveInt = 40
    """Longest response, in tokens; a response cut here has no eos (it is not trained to stop)."""
    temperature: NonNegativeFloat = 1.0
    """Sampling temperature; 0 means greedy."""
    top_p: TopP = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: NonNegativeInt = 0
    """Sample among the k most likely tokens only; 0 turns it off."""

    def __post_init__(self):
        validate_fields(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Settings of a model's own generation_config that would change the sampled distribution behind our back.
_OWN_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
                   "min_p": None, "temperature": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_length": 0,
                   "min_new_tokens": None, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                   "forced_bos_token_id": None, "forced_eos_token_id": None, "encoder_repetition_penalty": 1.0,
                   "sequence_bias": None, "exponential_decay_length_penalty": None, "do_sample": False}
_warned_models: set[int] = set()


@contextmanager
def _decoding(tokenizer, *models):
    """Models in eval mode (dropout off, as in the policy losses), the tokenizer padding and truncating on the left
    (generation continues from the right edge), and each model's own ``generation_config`` set aside: the sampled
    distribution is the one our config names, nothing else. All restored afterwards."""
    modes = [m.training for m in models]
    own = [getattr(m, "generation_config", None) for m in models]
    sides = tokenizer.padding_side, tokenizer.truncation_side
    for model, config in zip(models, own):
        model.eval()
        if config is not None:
            changed = {k: getattr(config, k, None) for k, default in _OWN_PROCESSORS.items()
                       if getattr(config, k, None) not in (default, None)}
            changed.pop("do_sample", None)  # end tokens are kept (end_tokens), the rest is set aside
            if changed and id(model) not in _warned_models:
                _warned_models.add(id(model))
                logger.warning(f"sampling: the model's own generation_config settings {changed} are switched off; "
                               "the sampler draws from `data.generation` alone, the distribution π_old describes")
            model.generation_config = transformers.GenerationConfig()
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
        for model, mode, config in zip(models, modes, own):
            model.train(mode)
            if config is not None:
                model.generation_config = config


def _encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int | None):
    return tokenizer([render_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False, truncation=max_prompt_tokens is not None, max_length=max_prompt_tokens)


def end_tokens(model, tokenizer) -> list[int]:
    """The tokens that end a response: the tokenizer's eos, then any other the model's own generation_config names
    (instruct models often ship several, e.g. an end-of-turn token); kept while the rest of that config is set aside."""
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    own = [own] if isinstance(own, int) else list(own or [])
    return list(dict.fromkeys([tokenizer.eos_token_id, *own]))


def _rollouts(tokens: torch.Tensor, logprobs: torch.Tensor, tokenizer, eos_ids: list[int]) -> list[Rollout]:
    """Cut each row of sampled tokens at its first end token; keep the tokens and their log π_old as sampled."""
    ends = set(eos_ids)
    out = []
    for row, row_logprobs in zip(tokens.tolist(), logprobs.tolist()):
        length = next((t for t, token in enumerate(row) if token in ends), len(row))
        ended = length < len(row)
        ids = row[:length]
        eos = row[length] if ended and row[length] != tokenizer.eos_token_id else None
        out.append(Rollout(tokenizer.decode(ids, skip_special_tokens=True), ids,
                           row_logprobs[: length + (1 if ended else 0)], ended, eos))
    return out


def cache_keyword(model) -> str:
    """The name a model's forward takes its KV cache by: ``cache`` (transformers ≥ 5.x) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper takes **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def new_cache(model):
    """An empty dynamic KV cache laid out for ``model`` (sliding-window and other layer kinds from its config, as
    ``generate`` builds it)."""
    try:
        return transformers.DynamicCache(config=model.config)
    except TypeError:  # a transformers whose DynamicCache takes no config
        return transformers.DynamicCache()


def _write_in_place(layer, key_states, value_states, *args, **kwargs):
    """A preallocated layer's update: the step's keys and values written into its buffers, views of them returned."""
    length, new = layer.keys.shape[-2], key_states.shape[-2]
    if length + new > layer.buffers[0].shape[-2]:  # longer than planned: grow as DynamicLayer does
        layer.keys, layer.values = torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)
        return layer.keys, layer.values
    for buffer, states in zip(layer.buffers, (key_states, value_states)):
        buffer[:, :, length : length + new] = states
    layer.keys, layer.values = (buffer[:, :, : length + new] for buffer in layer.buffers)
    return layer.keys, layer.values


def _preallocate(cache, steps: int) -> None:
    """Room for ``steps`` more positions in each plain layer of a dynamic cache, written in place: DynamicLayer
    concatenates on every step (a copy of the whole cache a token; 38% of the decode time of the default student).
    Layers of other kinds (sliding window, quantized) keep their own update."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # a transformers without cache layers: nothing to do
        return
    for layer in getattr(cache, "layers", ()):
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.dim() != 4:
            continue
        length = layer.keys.shape[-2]
        layer.buffers = []
        for states in (layer.keys, layer.values):
            buffer = states.new_empty(*states.shape[:2], length + steps, states.shape[-1])
            buffer[:, :, :length] = states
            layer.buffers.append(buffer)
        layer.keys, layer.values = (buffer[:, :, :length] for buffer in layer.buffers)
        layer.update = types.MethodType(_write_in_place, layer)


class _Decoder:
    """One model decoding ``num_samples`` continuations of each encoded (left-padded) prompt: the prompts prefilled
    once each (``generate`` with ``num_return_sequences`` prefills every copy, and projects every position to
    logits; here only the last), then :meth:`step` gives the next logits of all B·K rows (prompt 0's K samples
    first). A Llama or Qwen2 model keeps each prompt's keys and values once for its K samples
    (:mod:`pbkd_lightning.data.shared_prefix`); another has its KV cache expanded to the K samples and written in
    place. ``shared=False`` (a sharded model, whose ranks decode in step) always takes the model's own forward."""

    def __init__(self, model, encoded, num_samples: int, steps: int, shared: bool = True):
        self.model, self.keyword, self.cache = model, cache_keyword(model), new_cache(model)
        self.device = next(model.parameters()).device
        mask = encoded["attention_mask"].to(self.device)
        positions = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1)  # generate's own position ids
        out = model(input_ids=encoded["input_ids"].to(self.device), attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{self.keyword: self.cache})
        self.logits = out.logits[:, -1].repeat_interleave(num_samples, 0)  # the first token's, (B·K, vocab)
        self.last = positions[:, -1].repeat_interleave(num_samples, 0)
        self.shared = None
        if shared and shared_prefix_decoding.supports(model):
            self.shared = shared_prefix_decoding.SharedPrefixDecoder(model, self.cache, mask, num_samples, steps)
            self.cache = None  # the shared decoder holds what it needs of the prefill's keys and values
        else:
            if num_samples > 1:
                self.cache.batch_repeat_interleave(num_samples)
            _preallocate(self.cache, steps)
            self.mask = mask.repeat_interleave(num_samples, 0)  # what the model's own forward is given each step

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The next logits ``(B·K, vocab)`` after each row's ``tokens`` ``(B·K,)``."""
        tokens, self.last = tokens.to(self.device), self.last + 1
        if self.shared is not None:
            return self.shared.step(tokens, self.last)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
        return self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.last[:, None], use_cache=True,
                          **{self.keyword: self.cache}).logits[:, -1]


def draw_tokens(probs: torch.Tensor) -> torch.Tensor:
    """One token a row of ``probs`` (``(rows, V)``, non-negative, each row summing to about 1), from the
    distribution ``torch.multinomial(probs, 1)`` draws from: the row's cumulative sums inverted at one uniform
    number. On CPU ``multinomial`` draws an exponential number for every vocabulary entry (21 ms for 128 rows ×
    8,192, 125 ms for 128 × 49,152 on 2 cores, against 0.5 and 2.5 ms here). An entry of probability 0 is never
    drawn (its interval has no width, and the number is kept below the row's total). The sums are stored in
    float32, so a token's probability is resolved to about 2^-24 of the row's mass (multinomial's exponentials
    resolve smaller ones). Off the CPU ``multinomial`` is used: a parallel scan's sums need not keep a zero's
    interval empty, and the draw there is not the bottleneck."""
    if probs.device.type != "cpu":
        return torch.multinomial(probs, 1).squeeze(-1)
    cdf = probs.cumsum(-1)  # on CPU accumulated in float64, each sum rounded once
    total = cdf[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()):
        raise ValueError("cannot sample: a row of next-token probabilities is NaN, infinite or all zero "
                         "(the model's logits are not finite, or every token was filtered out)")
    point = torch.minimum(torch.rand_like(total) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).squeeze(-1)


def _decode(model, encoded, config: GenerationConfig, num_samples: int, vocabulary, eos_ids: list[int], pad_id: int,
            synced: bool, shared_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` continuations of each encoded (left-padded) prompt (:class:`_Decoder`) and log π_old of every
    token drawn: one token a step for all rows, from the softmax of :func:`sampling_logits` of the step's logits
    (:func:`draw_tokens`: ``generate``'s distribution, drawn faster; argmax when greedy), a row that has ended
    continuing with padding.
    Returns ``(tokens, logprobs)``, both ``(B·K, steps)``; a sharded model decodes every step on every rank (they
    gather together)."""
    decoder = _Decoder(model, encoded, num_samples, config.max_new_tokens, shared=shared_prefix and not synced)
    logits = decoder.logits
    ends = torch.tensor(eos_ids, device=logits.device)
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    tokens, logprobs = [], []
    for step in range(config.max_new_tokens):
        scores = logits.float()
        if vocabulary is not None and vocabulary < scores.shape[-1]:
            scores[:, vocabulary:] = float("-inf")
        scores = sampling_logits(scores, config.temperature, config.top_k, config.top_p)
        log_pi = torch.log_softmax(scores, dim=-1)
        drawn = scores.argmax(-1) if config.greedy else draw_tokens(log_pi.exp())
        drawn = drawn.masked_fill(finished, pad_id)
        tokens.append(drawn)
        logprobs.append(log_pi.gather(-1, drawn[:, None]).squeeze(-1))
        finished |= torch.isin(drawn, ends)
        if step == config.max_new_tokens - 1 or (not synced and bool(finished.all())):  # one host sync a step, as generate
            break
        logits = decoder.step(drawn)
    if not tokens:
        empty = torch.zeros(logits.shape[0], 0, device=logits.device)
        return empty.long(), empty
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)


@torch.no_grad()
def sample_rollouts(
    model,
    tokenizer,
    prompts: list[str],
    config: GenerationConfig,
    num_samples: int,
    batch_size: int,
    max_prompt_tokens: int | None = None,
    vocabulary: int | None = None,
):
    """Sample ``num_samples`` responses per prompt; a prompt over ``max_prompt_tokens`` keeps its end.

    Args:
        vocabulary: sample only among the first this-many tokens (the vocabulary a white-box student shares with
            its teacher; the policy losses crop the same columns).

    Returns:
        ``(rollouts, stats)``: rollouts[i] is the list of num_samples :class:`Rollout` for prompts[i];
        stats has ``tokens`` and ``seconds``.
    """
    device = next(model.parameters()).device
    # A sharded model gathers its parameters in every forward: ranks must decode the same number of steps.
    synced = is_sharded(model) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    eos_ids = end_tokens(model, tokenizer)
    rollouts, new_tokens, start = [], 0, time.perf_counter()
    with _decoding(tokenizer, model):
        for begin in range(0, len(prompts), batch_size):
            encoded = _encode_prompts(tokenizer, prompts[begin : begin + batch_size], max_prompt_tokens).to(device)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
            generated, logprobs = _decode(model, encoded, config, num_samples, vocabulary, eos_ids, pad, synced)
            batch = _rollouts(generated.cpu(), logprobs.float().cpu(), tokenizer, eos_ids)
            new_tokens += sum(len(r.token_ids) + r.ended for r in batch)
            rollouts.extend(batch[i : i + num_samples] for i in range(0, len(batch), num_samples))
    return rollouts, {"tokens": new_tokens, "seconds": time.perf_counter() - start}


def generate(model, tokenizer, prompts, config, num_samples, batch_size, max_prompt_tokens=None, vocabulary=None):
    """:func:`sample_rollouts`, texts only: ``(responses, stats)`` with responses[i] the texts for prompts[i]."""
    rollouts, stats = sample_rollouts(model, tokenizer, prompts, config, num_samples, batch_size, max_prompt_tokens, vocabulary)
    return [[r.text for r in group] for group in rollouts], stats


@torch.no_grad()
def sample_mixed_rollouts(
    student,
    teacher,
    tokenizer,
    prompts: list[str],
    config: GenerationConfig,
    num_samples: int,
    batch_size: int,
    max_prompt_tokens: int | None = None,
    teacher_mix: float = 0.2,
    vocabulary: int | None = None,
):
    """Sample from ``teacher_mix · p_T + (1 − teacher_mix) · π_θ`` token by token (MiniLLM's teacher-mixed
    sampling), both models decoding with their KV caches; each distribution is :func:`sampling_logits` of its
    model's logits (temperature, top-k, top-p), cropped to ``vocabulary``. Teacher and student share the tokenizer.

    Returns:
        ``(rollouts, stats)`` as :func:`sample_rollouts`; a rollout's ``logprobs`` are the student's own
        log π_old of each token (what MiniLLM's ratio and importance weights divide by), not the mixture's.
    """
    models = (student, teacher)
    eos_ids, pad = end_tokens(student, tokenizer), tokenizer.pad_token_id
    ends = torch.tensor(eos_ids)
    rollouts, new_tokens, start = [], 0, time.perf_counter()
    warp = lambda logits: sampling_logits(logits, config.temperature, config.top_k, config.top_p).log_softmax(-1)  # noqa: E731
    with _decoding(tokenizer, *models):
        for begin in range(0, len(prompts), batch_size):
            encoded = _encode_prompts(tokenizer, prompts[begin : begin + batch_size], max_prompt_tokens)
            decoders = [_Decoder(m, encoded, num_samples, config.max_new_tokens) for m in models]
            logits = [d.logits for d in decoders]
            finished = torch.zeros(logits[0].shape[0], dtype=torch.bool)
            generated, student_logprobs = [], []
            for step in range(config.max_new_tokens):
                log_s, log_t = (warp(l[:, :vocabulary].float().cpu()) for l in logits)
                probs = teacher_mix * log_t.exp() + (1 - teacher_mix) * log_s.exp()
                token = probs.argmax(-1) if config.greedy else draw_tokens(probs)
                token = token.masked_fill(finished, pad)
                generated.append(token)
                student_logprobs.append(log_s.gather(-1, token[:, None]).squeeze(-1))
                finished |= torch.isin(token, ends)
                if step == config.max_new_tokens - 1 or bool(finished.all()):
                    break
                logits = [d.step(token) for d in decoders]
            tokens = torch.stack(generated, dim=1) if generated else torch.zeros(finished.shape[0], 0, dtype=torch.long)
            logprobs = torch.stack(student_logprobs, dim=1) if student_logprobs else tokens.float()
            batch = _rollouts(tokens, logprobs, tokenizer, eos_ids)
            new_tokens += sum(len(r.token_ids) + r.ended for r in batch)
            rollouts.extend(batch[i : i + num_samples] for i in range(0, len(batch), num_samples))
    return rollouts, {"tokens": new_tokens, "seconds": time.perf_counter() - start}
