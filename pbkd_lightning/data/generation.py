"""Batched sampling from a causal LM with the KV cache."""

import time
from dataclasses import dataclass

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveInt

from pbkd_lightning.config import TopP, validate_fields
from pbkd_lightning.data.collate import render_prompt


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
    was_training = model.training
    model.eval()
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # generation continues from the right edge
    device = next(model.parameters()).device
    greedy = config.temperature == 0
    responses, new_tokens, start = [], 0, time.perf_counter()
    try:
        for begin in range(0, len(prompts), batch_size):
            chunk = [render_prompt(tokenizer, p) for p in prompts[begin : begin + batch_size]]
            encoded = tokenizer(
                chunk,
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                truncation=max_prompt_tokens is not None,
                max_length=max_prompt_tokens,
            ).to(device)
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
            )
            generated = output[:, encoded["input_ids"].shape[1] :]
            new_tokens += int((generated != tokenizer.pad_token_id).sum())
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            responses.extend(texts[i : i + num_samples] for i in range(0, len(texts), num_samples))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
        model.train(was_training)
    return responses, {"tokens": new_tokens, "seconds": time.perf_counter() - start}
