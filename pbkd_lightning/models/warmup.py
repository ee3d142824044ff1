"""Warm-starting the student by SFT on teacher responses, cached on disk by its settings."""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from pbkd_lightning.config import validate_fields
from pbkd_lightning.losses import sequence_nll
from pbkd_lightning.models.critic import response_token_logprobs
from pbkd_lightning.sequences import Encoder


@dataclass
class WarmupConfig:
    """SFT of the student on the teacher's training responses before distillation starts."""

    steps: NonNegativeInt = 0
    """Optimizer steps; 0 turns the warm-up off."""
    lr: PositiveFloat = 3e-3
    """AdamW learning rate (after a linear ramp over the first tenth of the steps, at most 100: linear decay to 0)."""
    batch_size: PositiveInt = 32
    """Sequences per step."""
    cache_dir: str = "runs/cache"
    """Warmed-up students are saved here, one folder per settings, and reused."""

    def __post_init__(self):
        validate_fields(self)


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sft_folder(config: WarmupConfig, seed: int, key_parts, role: str = "student") -> str:
    """Where :func:`warm_start` keeps the model trained with these settings: a key of every setting but where the
    cache lives, so ``runs/cache`` and its absolute path (or a moved cache) find the same model."""
    settings = {name: value for name, value in asdict(config).items() if name != "cache_dir"}
    return os.path.join(config.cache_dir, f"{role}-sft-{cache_key(settings, seed, key_parts)}")


def _adopt_earlier_key(config: WarmupConfig, seed: int, key_parts, role: str, folder: str) -> None:
    """A model cached under the earlier key, which also hashed the spelling of ``cache_dir``, is moved to ``folder``
    instead of being trained again (only when it was written with this same spelling)."""
    earlier = os.path.join(config.cache_dir, f"{role}-sft-{cache_key(asdict(config), seed, key_parts)}")
    if not _is_cached(folder) and _is_cached(earlier):
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished folder (a crashed run) is not a cache
        os.replace(earlier, folder)


def warm_start(
    student, encoder: Encoder, records: list[dict], config: WarmupConfig, seed: int, key_parts, role: str = "student"
) -> object:
    """Return the model after ``config.steps`` SFT steps, from the cache when the same settings ran before.

    The trained model is saved to :func:`sft_folder` (``role`` names it: the student's warm-up, or
    the embedded teacher's training).
    """
    folder = sft_folder(config, seed, key_parts, role)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:  # before rank 0 decides for everyone
        _adopt_earlier_key(config, seed, key_parts, role, folder)
    if distributed:
        # Rank 0 decides for everyone (a rank arriving late must not find rank 0's fresh copy and skip the barrier
        # rank 0 waits in), trains and writes the one copy (transformers saves on the main process only).
        decision = [_is_cached(folder)]
        torch.distributed.broadcast_object_list(decision, src=0)
        if not decision[0] and torch.distributed.get_rank() != 0:
            torch.distributed.barrier()  # until rank 0 has written it
        if decision[0] or torch.distributed.get_rank() != 0:
            cached = _load_cached(student, folder, role)
            if cached is None:
                raise RuntimeError(f"rank 0 did not leave a trained {role} in {folder}")
            return cached
    cached = _load_cached(student, folder, role)
    if cached is not None:
        return cached
    _train(student, encoder, records, config, seed, role)
    os.makedirs(config.cache_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=config.cache_dir, prefix=".tmp-")
    student.save_pretrained(staging)
    if _is_cached(folder):
        shutil.rmtree(staging)  # another process finished first; keep theirs
    else:
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished folder (a crashed run) is not a cache
        os.replace(staging, folder)
    if distributed:
        torch.distributed.barrier()
    return student


def _is_cached(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("config.json", "adapter_config.json"))


def _load_cached(student, folder: str, role: str):
    """The cached model (a LoRA student: its adapter loaded into ``student``), or None."""
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):  # a LoRA student: its adapter was trained
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        rank_zero_info(f"warm-up: reusing the cached {role} adapter in {folder}")
        set_peft_model_state_dict(student, load_file(os.path.join(folder, "adapter_model.safetensors")))
        return student
    if os.path.isfile(os.path.join(folder, "config.json")):
        rank_zero_info(f"warm-up: reusing the cached {role} in {folder}")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=next(student.parameters()).dtype)
    return None


def _train(student, encoder: Encoder, records: list[dict], config: WarmupConfig, seed: int, role: str) -> None:
    device = next(student.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    ramp = max(1, min(100, config.steps // 10))  # a short linear warm-up of the learning rate, then linear decay to 0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / ramp) * (1.0 - step / max(1, config.steps)))
    student.train()
    interactive = sys.stderr.isatty()  # in a log file, one line every 10 s rather than every step
    progress = tqdm(
        range(config.steps), desc=f"{role} SFT on teacher responses", dynamic_ncols=True, mininterval=0.1 if interactive else 10
    )
    for _ in progress:
        rows = torch.randint(len(records), (config.batch_size,), generator=generator).tolist()
        batch = encoder.batch([records[i]["prompt"] for i in rows], [records[i]["teacher"] for i in rows],
                              [records[i].get("teacher_ended", True) for i in rows])
        batch = batch.to(device)
        loss = sequence_nll(response_token_logprobs(student, batch.input_ids, batch.attention_mask, batch.loss_mask),
                            batch.loss_mask[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix(nll=f"{loss.item():.3f}", refresh=False)
