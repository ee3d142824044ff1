"""Batched sampling from a causal LM with the KV cache."""

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from pbkd_lightning.config import TopP, validate_fields
from pbkd_lightning.data.collate import render_prompt
from pbkd_lightning.parallel import is_sharded


@dataclass
class GenerationConfig:
    """How responses are sampled."""

    max_new_tokens: PositiveInt = 40
    """Longest response, in tokens."""
    temperature: NonNegativeFloat = 1.0
    """Sampling temperature; 0 means greedy."""
    top_p: TopP = 1.0
    """Nucleus sampling mass, in (0, 1]."""

    def __post_init__(self):
        validate_fields(self)


@contextmanager
def _decoding(tokenizer, *models):
    """Models in eval mode and the tokenizer padding and truncating on the left (generation continues
    from the right edge); both restored afterwards."""
    modes = [m.training for m in models]
    sides = tokenizer.padding_side, tokenizer.truncation_side
    for model in models:
        model.eval()
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
        for model, mode in zip(models, modes):
            model.train(mode)


def _encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int | None):
    return tokenizer([render_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False, truncation=max_prompt_tokens is not None, max_length=max_prompt_tokens)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    config: GenerationConfig,
    num_samples: int,
    batch_size: int,
    max_prompt_tokens: int | None = None,
):
    """Sample ``num_samples`` responses per prompt; a prompt over ``max_prompt_tokens`` keeps its end.

    Returns:
        ``(responses, stats)``: responses[i] is the list of num_samples texts for prompts[i]
        (cut at the first end-of-sequence token); stats has ``tokens`` and ``seconds``.
    """
    device = next(model.parameters()).device
    greedy = config.temperature == 0
    # A sharded model gathers its parameters in every forward: ranks must decode the same number of steps.
    synced = is_sharded(model) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    responses, new_tokens, start = [], 0, time.perf_counter()
    with _decoding(tokenizer, model):
        for begin in range(0, len(prompts), batch_size):
            encoded = _encode_prompts(tokenizer, prompts[begin : begin + batch_size], max_prompt_tokens).to(device)
            output = model.generate(
                **encoded,
                do_sample=not greedy,
                temperature=None if greedy else config.temperature,
                top_p=None if greedy else config.top_p,
                top_k=None,
                max_new_tokens=config.max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
                synced_gpus=synced,
            )
            generated = output[:, encoded["input_ids"].shape[1] :]
            new_tokens += int((generated != tokenizer.pad_token_id).sum())
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            responses.extend(texts[i : i + num_samples] for i in range(0, len(texts), num_samples))
    return responses, {"tokens": new_tokens, "seconds": time.perf_counter() - start}


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of each row outside the smallest set of tokens holding ``top_p`` of the mass."""
    if top_p >= 1.0:
        return probs
    ordered, order = probs.sort(dim=-1, descending=True)
    outside = ordered.cumsum(-1) - ordered > top_p
    return probs.scatter(-1, order, ordered.masked_fill(outside, 0.0))


@torch.no_grad()
def generate_mixed(
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
    sampling), both models decoding with their KV caches. Teacher and student share the tokenizer.

    Returns:
        ``(responses, stats)`` as :func:`generate`.
    """
    models = (student, teacher)
    devices = [next(m.parameters()).device for m in models]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses, new_tokens, start = [], 0, time.perf_counter()
    with _decoding(tokenizer, *models):
        for begin in range(0, len(prompts), batch_size):
            encoded = _encode_prompts(tokenizer, prompts[begin : begin + batch_size], max_prompt_tokens)
            ids = encoded["input_ids"].repeat_interleave(num_samples, 0)
            mask = encoded["attention_mask"].repeat_interleave(num_samples, 0)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
            outputs = [m(input_ids=ids.to(d), attention_mask=mask.to(d), position_ids=positions.to(d), use_cache=True)
                       for m, d in zip(models, devices)]
            finished = torch.zeros(ids.shape[0], dtype=torch.bool)
            generated = []
            for _ in range(config.max_new_tokens):
                logits_s, logits_t = (o.logits[:, -1, :vocabulary].float().cpu() for o in outputs)
                if config.temperature == 0:
                    probs = teacher_mix * logits_t.softmax(-1) + (1 - teacher_mix) * logits_s.softmax(-1)
                    token = probs.argmax(-1)
                else:
                    probs = teacher_mix * (logits_t / config.temperature).softmax(-1) + (1 - teacher_mix) * (
                        logits_s / config.temperature
                    ).softmax(-1)
                    token = torch.multinomial(_nucleus(probs, config.top_p), 1).squeeze(-1)
                token = token.masked_fill(finished, pad)
                generated.append(token)
                finished |= token == eos
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
            new_tokens += int((tokens != pad).sum())
            texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
            responses.extend(texts[i : i + num_samples] for i in range(0, len(texts), num_samples))
    return responses, {"tokens": new_tokens, "seconds": time.perf_counter() - start}
