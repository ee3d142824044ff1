"""Building the players before fit: the student (warmed up), the teacher model and its logit cache, the frozen
reference and the critic, and the held-out scores at each stage on the way."""

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import AutoModelForCausalLM

from pbkd_lightning.data.teacher_cache import TeacherCache, cache_fingerprint, cache_is_complete, write_teacher_cache
from pbkd_lightning.eval import mean_scores, score_responses
from pbkd_lightning.models.critic import CriticConfig, ImplicitReward, ScalarReward
from pbkd_lightning.models.loading import ModelSpec, load_causal_lm, shared_vocabulary_size, weights_key
from pbkd_lightning.models.teacher import TeacherModel, load_teacher, teacher_vocabulary
from pbkd_lightning.objectives.base import Objective
from pbkd_lightning.players import Players
from pbkd_lightning.models.warmup import WarmupConfig, warm_start


@dataclass
class BuiltPlayers:
    players: Players
    teacher_tokenizer: object = None
    teacher_cache: Optional[TeacherCache] = None
    """A finished cache of the teacher's top-k on the training teacher sequences, or None."""
    scores: dict = field(default_factory=dict)
    """Held-out scores before fit: ``teacher``, ``teacher_model``, ``student_before_warmup``, ``student_start``."""


def build_players(
    objective: Objective,
    student_spec: ModelSpec,
    teacher_config: Optional[TeacherModel],
    critic_config: CriticConfig,
    warmup: WarmupConfig,
    datamodule,
    stage: str,
    greedy: Callable,
) -> BuiltPlayers:
    """Load and prepare every model the objective needs.

    Args:
        teacher_config: the teacher model, when the objective is white-box or the reward model starts from it.
        datamodule: the set-up data module (its records, encoder and settings are read, nothing is written).
        greedy: ``greedy(model, tokenizer, records) -> texts``, the held-out decoding of the module.
    """
    student, tokenizer = load_causal_lm(student_spec)
    critic_from_teacher = objective.needs_critic and critic_config.init == "teacher"
    teacher = teacher_tokenizer = cache = None
    vocabulary = None
    if teacher_config is not None:
        teacher, teacher_tokenizer, vocabulary, cache = _teacher(objective, teacher_config, student, tokenizer, datamodule, stage)
    scores = {}
    if stage == "fit":
        val = datamodule.val_records
        held_out = lambda model, model_tokenizer: mean_scores(score_responses(val, greedy(model, model_tokenizer, val)))  # noqa: E731
        scores["teacher"] = mean_scores(score_responses(val, [r["teacher"] for r in val]))
        if teacher is not None:
            scores["teacher_model"] = held_out(teacher, teacher_tokenizer)
        if warmup.steps > 0:
            scores["student_before_warmup"] = held_out(student, tokenizer)
            key = [weights_key(student_spec), [r["teacher"] for r in datamodule.train_records]]
            student = warm_start(student, datamodule.encoder(tokenizer), datamodule.train_records, warmup,
                                 student_spec.init_seed, key)
        scores["student_start"] = held_out(student, tokenizer)
    student.train()
    if student_spec.gradient_checkpointing and not student.is_gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # a cached warm-up reloads without it
    reference = None
    if objective.uses_reference(critic_config.kind, critic_from_teacher):
        reference = copy.deepcopy(student).eval().requires_grad_(False)
    objective.check_sampling(datamodule.generation)
    players = Players(student, tokenizer, datamodule.generation, datamodule.encoder(tokenizer),
                      datamodule.hparams.generation_batch_size, reference=reference, teacher=teacher,
                      implicit_reference=teacher if critic_from_teacher else reference, vocabulary=vocabulary)
    players.critic_tokenizer = tokenizer
    if objective.needs_critic:
        players.critic = objective.build_critic(players)
        if players.critic is None:
            players.critic = _reward_model(critic_config, student, teacher)
            if critic_config.init == "teacher":
                players.critic_tokenizer = teacher_tokenizer
    return BuiltPlayers(players, teacher_tokenizer, cache, scores)


def _teacher(objective, config: TeacherModel, student, tokenizer, datamodule, stage: str):
    """``(teacher or None, its tokenizer, shared vocabulary or None, cache or None)``: the teacher is not loaded
    when a finished cache serves every batch; it must share the student's tokenizer for logit-level methods."""
    h = datamodule.hparams
    folder = h.get("teacher_cache") if stage == "fit" else None
    written = False
    if folder:
        sequences = [(r["prompt"], r["teacher"]) if r.get("teacher_ended", True) else (r["prompt"], r["teacher"], False)
                     for r in datamodule.train_records]
        fingerprint = cache_fingerprint(sequences, h.teacher_cache_k, config.describe())
        written = cache_is_complete(folder, fingerprint)
        if datamodule.trainer is not None and datamodule.trainer.world_size > 1:  # rank 0's view: all ranks take one path
            written = datamodule.trainer.strategy.broadcast(written, src=0)
    teacher = None
    if folder and written and not objective.needs_teacher_on_samples:
        teacher_tokenizer, rows = teacher_vocabulary(config)  # the weights are never read
    else:
        teacher, teacher_tokenizer = load_teacher(config, datamodule.train_records, h.max_prompt_tokens,
                                                  datamodule.generation.max_new_tokens)
        rows = teacher.config.vocab_size
    if not objective.needs_teacher_logits:
        return teacher, teacher_tokenizer, None, None  # it only initialises the reward model, with its own tokenizer
    vocabulary = shared_vocabulary_size(teacher_tokenizer, tokenizer, rows, student.config.vocab_size)
    if not folder:
        return teacher, teacher_tokenizer, vocabulary, None
    if not written:
        rank_zero_info(f"teacher cache: writing the teacher's top-{h.teacher_cache_k} log-probabilities to {folder}")
        trainer = datamodule.trainer
        if trainer is None or trainer.is_global_zero:  # one writer per folder; the other ranks read what it wrote
            write_teacher_cache(teacher, datamodule.encoder(tokenizer), sequences, folder, h.teacher_cache_k,
                                vocabulary=vocabulary, tag=config.describe())
        if trainer is not None:
            trainer.strategy.barrier("teacher cache")
    cache = TeacherCache(folder, fingerprint)
    if not objective.needs_teacher_on_samples:
        teacher = None  # every teacher distribution now comes from the cache
        rank_zero_info(f"teacher cache: training from {folder}, no teacher in memory")
    return teacher, teacher_tokenizer, vocabulary, cache


def _reward_model(config: CriticConfig, student: nn.Module, teacher: Optional[nn.Module]) -> nn.Module:
    """Black-box PbKD's reward model r_φ, from the student, the teacher model or fresh weights."""
    if config.init == "student":
        lm = copy.deepcopy(student)
    elif config.init == "teacher":
        lm = copy.deepcopy(teacher)
    else:  # the student's architecture with fresh weights (seeded by the global seed)
        lm = AutoModelForCausalLM.from_config(student.config).to(next(student.parameters()).dtype)
    lm.train()
    if not hasattr(lm, "peft_config"):  # a LoRA student's copy trains its adapter only, like the student
        lm.requires_grad_(True)
    if config.kind == "implicit":
        return ImplicitReward(lm, scale=config.scale)
    return ScalarReward(lm.get_decoder(), lm.config.hidden_size, pooling=config.pooling)
