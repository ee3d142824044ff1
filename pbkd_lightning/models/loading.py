"""Loading a causal LM and its tokenizer: a local Hugging Face directory, or an embedded tiny Llama."""

import logging
import os
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from jsonargparse.typing import PositiveInt
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from pbkd_lightning.config import validate_fields
from pbkd_lightning.models.tokenizer import build_char_tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """Which causal LM to load."""

    path: Optional[str] = None
    """Local Hugging Face causal-LM directory (model and tokenizer). None: the embedded tiny Llama."""
    layers: PositiveInt = 2
    """Tiny model only: number of transformer blocks."""
    hidden: PositiveInt = 128
    """Tiny model only: hidden size (the MLP is 2× this)."""
    heads: PositiveInt = 4
    """Tiny model only: attention heads."""
    max_positions: PositiveInt = 256
    """Tiny model only: context length."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype: float32, bfloat16 or float16."""
    init_seed: int = 0
    """Tiny model only: seed of the random initialisation."""

    def __post_init__(self):
        validate_fields(self)
        if self.path is None and self.hidden % self.heads:
            raise ValueError(f"`hidden` ({self.hidden}) must be divisible by `heads` ({self.heads})")


def _require_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist (models are never downloaded)")


def load_tokenizer(spec: ModelSpec):
    if spec.path is None:
        return build_char_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(spec.path)
    if tokenizer.pad_token is None:  # many causal LMs ship without one; eos is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(spec: ModelSpec, tokenizer=None):
    """Returns ``(model, tokenizer)``; the tiny model is built from its seed, a directory is loaded offline."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    dtype = _DTYPES[spec.dtype]
    if spec.path is not None:
        _require_folder(spec.path)
        return AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype), tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=2 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(spec.init_seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype), tokenizer


QUANTIZATIONS = ("nf4", "int8")


def load_frozen_model(path: str, quantization: Optional[str] = None, dtype: str = "float32"):
    """A local causal LM for inference only (a teacher): in ``dtype``, or quantized by bitsandbytes to
    4-bit NF4 or 8-bit (``quantization``), on the GPU when there is one, else on the CPU."""
    _require_folder(path)
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"`quantization` must be one of {list(QUANTIZATIONS)} or null, got {quantization!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = None
    if quantization == "nf4":
        compute = torch.bfloat16 if device == "cuda" else torch.float32
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    elif quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], quantization_config=config, device_map=device)
    return model.eval().requires_grad_(False)


def shared_vocabulary_size(teacher_tokenizer, student_tokenizer, teacher_rows: int, student_rows: int) -> int:
    """How many logit columns a white-box loss may compare between teacher and student.

    White-box methods need one tokenizer on both sides. Models often pad their embedding
    matrices past the tokenizer (e.g. 151,936 vs 152,064 rows for one tokenizer); those rows
    are never real tokens, so both sides are cropped to the tokenizer's length. Tokenizers that
    map any token to another id are a real mismatch and stop the run.

    Raises:
        ValueError: naming both tokenizers, when their vocabularies differ or a model has fewer
            rows than its tokenizer has tokens.
    """
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    names = f"teacher {teacher_tokenizer.name_or_path or type(teacher_tokenizer).__name__!r}, " \
        f"student {student_tokenizer.name_or_path or type(student_tokenizer).__name__!r}"
    if teacher_vocab != student_vocab:
        differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda item: item[1])[:3]
        raise ValueError(
            f"white-box distillation needs one tokenizer, but the {names} differ "
            f"({len(teacher_vocab)} vs {len(student_vocab)} tokens; e.g. {differing}); use a black-box method"
        )
    size = len(teacher_tokenizer)
    if min(teacher_rows, student_rows) < size:
        raise ValueError(f"a model has fewer logit rows ({teacher_rows}, {student_rows}) than the tokenizer has tokens ({size}); {names}")
    if teacher_rows != student_rows:
        logger.info("vocabulary: teacher %d and student %d logit rows, both cropped to the tokenizer's %d", teacher_rows, student_rows, size)
    return size
