"""Batched sampling from a causal LM with the KV cache: rollouts that keep what was sampled and its log π_old."""

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt

from pbkd_lightning.config import TopP, validate_fields
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


class _SampleAndRecord(transformers.LogitsProcessor):
    """The last logits processor: applies :func:`sampling_logits` (our temperature, top-k, top-p, vocabulary), and
    records log π of the token drawn at each step from exactly those logits (one ``(B,)`` column a step; the
    ``(B, V)`` log-softmax of the previous step is the only extra memory)."""

    def __init__(self, config: GenerationConfig, vocabulary: int | None):
        self.config, self.vocabulary = config, vocabulary
        self.columns: list[torch.Tensor] = []
        self._previous = None

    def __call__(self, input_ids, scores):
        self.take(input_ids[:, -1])
        if self.vocabulary is not None and self.vocabulary < scores.shape[-1]:
            scores = scores.clone()
            scores[:, self.vocabulary :] = float("-inf")
        scores = sampling_logits(scores.float(), self.config.temperature, self.config.top_k, self.config.top_p)
        self._previous = torch.log_softmax(scores, dim=-1)
        return scores

    def take(self, tokens):
        if self._previous is not None:
            self.columns.append(self._previous.gather(-1, tokens[:, None]).squeeze(-1))
            self._previous = None


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
            recorder = _SampleAndRecord(config, vocabulary)
            # The sampler's own warpers stay off (temperature 1, top-k 0, top-p 1): ours run in the recorder.
            warpers_off = {} if config.greedy else {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
            output = model.generate(
                **encoded,
                do_sample=not config.greedy,
                **warpers_off,
                logits_processor=[recorder],
                max_new_tokens=config.max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos_ids,
                use_cache=True,
                synced_gpus=synced,
            )
            generated = output[:, encoded["input_ids"].shape[1] :]
            if generated.shape[1]:
                recorder.take(generated[:, -1])
            logprobs = torch.stack(recorder.columns, dim=1) if recorder.columns else generated.float()
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
    devices = [next(m.parameters()).device for m in models]
    eos_ids, pad = end_tokens(student, tokenizer), tokenizer.pad_token_id
    rollouts, new_tokens, start = [], 0, time.perf_counter()
    warp = lambda logits: sampling_logits(logits, config.temperature, config.top_k, config.top_p).log_softmax(-1)  # noqa: E731
    with _decoding(tokenizer, *models):
        for begin in range(0, len(prompts), batch_size):
            encoded = _encode_prompts(tokenizer, prompts[begin : begin + batch_size], max_prompt_tokens)
            ids = encoded["input_ids"].repeat_interleave(num_samples, 0)
            mask = encoded["attention_mask"].repeat_interleave(num_samples, 0)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
            # the prompt's last position only through the heads: the prefill never holds N × T × V logits
            outputs = [m(input_ids=ids.to(d), attention_mask=mask.to(d), position_ids=positions.to(d), use_cache=True,
                         logits_to_keep=1) for m, d in zip(models, devices)]
            finished = torch.zeros(ids.shape[0], dtype=torch.bool)
            generated, student_logprobs = [], []
            for _ in range(config.max_new_tokens):
                log_s, log_t = (warp(o.logits[:, -1, :vocabulary].float().cpu()) for o in outputs)
                probs = teacher_mix * log_t.exp() + (1 - teacher_mix) * log_s.exp()
                token = probs.argmax(-1) if config.greedy else torch.multinomial(probs, 1).squeeze(-1)
                token = token.masked_fill(finished, pad)
                generated.append(token)
                student_logprobs.append(log_s.gather(-1, token[:, None]).squeeze(-1))
                finished |= torch.isin(token, torch.tensor(eos_ids))
                if bool(finished.all()):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1
                outputs = [
                    m(input_ids=token[:, None].to(d), attention_mask=mask.to(d), position_ids=positions.to(d),
                      past_key_values=o.past_key_values, use_cache=True)
                    for m, d, o in zip(models, devices, outputs)
                ]
            tokens = torch.stack(generated, dim=1) if generated else ids[:, :0]
            logprobs = torch.stack(student_logprobs, dim=1) if student_logprobs else tokens.float()
            batch = _rollouts(tokens, logprobs, tokenizer, eos_ids)
            new_tokens += sum(len(r.token_ids) + r.ended for r in batch)
            rollouts.extend(batch[i : i + num_samples] for i in range(0, len(batch), num_samples))
    return rollouts, {"tokens": new_tokens, "seconds": time.perf_counter() - start}
