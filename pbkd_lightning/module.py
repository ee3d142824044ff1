"""DistillationModule: the student, the critic and their two optimizers; the objective holds the method."""

import copy
import json
import math
import os
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy
from transformers import AutoModelForCausalLM

from pbkd_lightning.config import plain, validate_fields
from pbkd_lightning.data.datamodule import DataConnection
from pbkd_lightning.data.generation import GenerationConfig, generate
from pbkd_lightning.data.labelers import label_pair, sample_pairs
from pbkd_lightning.eval import mean_scores, score_responses
from pbkd_lightning.eval.diversity import diversity
from pbkd_lightning.models.critic import ImplicitReward, ScalarReward
from pbkd_lightning.data.teacher_cache import TeacherCache, cache_fingerprint, cache_is_complete, write_teacher_cache
from pbkd_lightning.models.loading import ModelSpec, load_causal_lm, save_student, shared_vocabulary_size, weights_key
from pbkd_lightning.models.teacher import TeacherModel, load_teacher, teacher_vocabulary
from pbkd_lightning.objectives.base import Objective, accumulate_gradients
from pbkd_lightning.players import Players
from pbkd_lightning.parallel import full_state_dict, is_sharded, same_count_on_every_rank, shard
from pbkd_lightning.warmup import WarmupConfig, warm_start


@dataclass
class CriticConfig:
    """The reward model of black-box PbKD."""

    kind: Literal["scalar", "implicit"] = "implicit"
    """``scalar``: a linear head on a backbone's last hidden state (the paper's). ``implicit``: a trainable
    LM copy scored by ``scale · mean log(π_φ/π_ref)`` over the response (learned far faster in the prototype)."""
    init: Literal["student", "teacher", "scratch"] = "student"
    """Start from the (warmed-up) student's weights, from the teacher model's (``model.teacher``, not quantized;
    the reward model then reads the teacher's tokenizer, and an implicit reward's reference is the frozen teacher),
    or from a fresh model of the student's architecture."""
    pooling: Literal["last", "mean"] = "last"
    """Scalar head only: the last non-pad token's hidden state, or the mean over response tokens."""
    scale: PositiveFloat = 10.0
    """Implicit reward only: the factor on the mean log-ratio."""

    def __post_init__(self):
        validate_fields(self)


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up then constant or cosine learning rate, and gradient-norm clipping."""

    lr: PositiveFloat = 1e-3
    """Peak learning rate."""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW weight decay."""
    warmup_steps: NonNegativeInt = 0
    """Linear learning-rate warm-up, in optimizer steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant, or cosine decay to 0 at the end of training."""
    grad_clip: NonNegativeFloat = 1.0
    """Clip the gradient's global norm to this; 0 turns clipping off."""

    def __post_init__(self):
        validate_fields(self)


class DistillationModule(LightningModule):
    """One LightningModule for every method: manual optimization with a critic step and a student step.

    Models are loaded in ``setup`` (not ``__init__``), so config and data errors surface first.
    """

    def __init__(
        self,
        objective: Objective,
        student: ModelSpec = ModelSpec(),
        teacher: Optional[TeacherModel] = None,
        critic: CriticConfig = CriticConfig(),
        warmup: WarmupConfig = WarmupConfig(),
        student_optimizer: OptimizerConfig = OptimizerConfig(lr=1e-3),
        critic_optimizer: OptimizerConfig = OptimizerConfig(lr=1e-3),
        val_generation: GenerationConfig = GenerationConfig(temperature=0.0),
        num_threads: Optional[PositiveInt] = None,
        samples_to_show: NonNegativeInt = 4,
        save_student: bool = True,
        optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw",
        micro_batch_size: Optional[PositiveInt] = None,
        critic_micro_batch_size: Optional[PositiveInt] = None,
    ):
        """
        Args:
            objective: the method (``BlackBoxPbKD``, ``SeqKD``, ...).
            student: the student model.
            teacher: the teacher model, for white-box objectives (their teacher sequences still come from
                the data module's teacher; this model gives the token distributions).
            critic: the reward model of black-box PbKD (white-box PbKD's critic is its Q-head).
            warmup: SFT of the student on teacher responses before fit (cached).
            student_optimizer: the student's optimizer.
            critic_optimizer: the critic's optimizer.
            val_generation: decoding on held-out prompts (greedy by default).
            num_threads: torch CPU threads; None keeps torch's choice.
            samples_to_show: prompts with teacher and student responses in the TensorBoard text panel.
            save_student: at the end of fit, ``save_pretrained`` the student to ``<default_root_dir>/student``.
            optimizer: AdamW for both players: ``adamw`` (torch), or bitsandbytes' ``adamw8bit`` /
                ``paged_adamw8bit`` (8-bit states for tensors of ≥ 4,096 elements; paging needs a GPU).
            micro_batch_size: prompts (each with its K samples) per forward pass of the student step; None: the
                whole batch. Gradients accumulate, and every mean is over the whole batch's scored tokens (across
                micro-batches and data-parallel ranks), so the step is the same as one forward of the whole batch.
            critic_micro_batch_size: pairs (or prompts, for critics of the student's batch) per forward pass of the
                critic step; None: the whole batch.
        """
        super().__init__()
        if objective.needs_teacher_logits and teacher is None:
            raise ValueError(f"{type(objective).__name__} is white-box: it needs `model.teacher` (a teacher model)")
        self.critic_from_teacher = objective.needs_critic and critic.init == "teacher"
        if self.critic_from_teacher and (teacher is None or teacher.quantization is not None):
            raise ValueError("`model.critic.init: teacher` needs `model.teacher`, not quantized: the reward model "
                             "trains a copy of its weights")
        self.automatic_optimization = False
        self.strict_loading = False  # the frozen reference is rebuilt in setup, not stored in checkpoints
        self.save_hyperparameters(plain({k: v for k, v in locals().items() if k not in ("self", "__class__")}))
        # hparams hold the config as plain data (LightningCLI stores its own copy there); use the objects.
        self.objective = objective
        self.student_spec, self.critic_config, self.warmup_config = student, critic, warmup
        self.teacher_config = teacher if objective.needs_teacher_logits or self.critic_from_teacher else None
        self.vocabulary: Optional[int] = None  # logit columns compared with the teacher's (white-box)
        self._frozen: dict[str, nn.Module] = {}  # the teacher: kept out of the module tree, so out of
        # checkpoints, optimizers and device moves (a quantized model cannot be moved)
        self.student_optimizer_config, self.critic_optimizer_config = student_optimizer, critic_optimizer
        self.val_generation = val_generation
        self.student: Optional[nn.Module] = None
        self.critic: Optional[nn.Module] = None
        self.reference: Optional[nn.Module] = None
        self.tokenizer = self.critic_tokenizer = self.teacher_tokenizer = None
        self.summary: dict = {}
        self.nonfinite_skips = {"student": 0, "critic": 0}
        self.critic_heldout_acc: Optional[float] = None  # the latest held-out preference accuracy (critic trust)
        self.players: Optional[Players] = None
        self._teacher_cache: Optional[TeacherCache] = None
        self.training_batches_seen = 0  # counts the critic-only warm-up; saved in checkpoints

    @property
    def needs_samples(self) -> bool:
        return self.objective.needs_samples

    @property
    def needs_pairs(self) -> bool:
        return self.objective.needs_critic and self.objective.critic_uses_pairs

    # ------------------------------------------------------------------ models
    def setup(self, stage: str) -> None:
        if self.student is not None:
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError("FSDPStrategy (FSDP1) wraps the LightningModule as one root, which the methods bypass when "
                             "they call student and critic directly (generation, rewards); use FSDP2: --config "
                             "configs/strategy/fsdp.yaml (ModelParallelStrategy, also on GPUs)")
        if self.hparams.num_threads:
            torch.set_num_threads(self.hparams.num_threads)
        datamodule = self.trainer.datamodule
        student, self.tokenizer = load_causal_lm(self.student_spec)
        self.critic_tokenizer = self.tokenizer
        self.student = student
        if self.teacher_config is not None:
            self._setup_teacher(datamodule, stage)
        if stage == "fit":
            self.summary["teacher"] = mean_scores(
                score_responses(datamodule.val_records, [r["teacher"] for r in datamodule.val_records])
            )
            if self.teacher is not None:
                self.summary["teacher_model"] = mean_scores(
                    score_responses(datamodule.val_records, self.greedy_responses(datamodule.val_records, self.teacher, self.teacher_tokenizer))
                )
            if self.warmup_config.steps > 0:
                self.summary["student_before_warmup"] = self.evaluate(datamodule.val_records)
                key = [weights_key(self.student_spec), [r["teacher"] for r in datamodule.train_records]]
                encoder = datamodule.encoder(self.tokenizer)
                self.student = warm_start(student, encoder, datamodule.train_records, self.warmup_config, self.student_spec.init_seed, key)
            self.summary["student_start"] = self.evaluate(datamodule.val_records)
        self.student.train()
        if self.student_spec.gradient_checkpointing and not self.student.is_gradient_checkpointing:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # a cached warm-up reloads without it
        if self.objective.uses_reference(self.critic_config.kind, self.critic_from_teacher):
            self.reference = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.objective.check_sampling(datamodule.generation)
        self.players = Players(
            self.student, self.tokenizer, datamodule.generation, datamodule.encoder(self.tokenizer),
            datamodule.hparams.generation_batch_size, reference=self.reference, teacher=self.teacher,
            implicit_reference=self.teacher if self.critic_from_teacher else self.reference, vocabulary=self.vocabulary,
        )
        if self.objective.needs_critic:
            self.critic = self.objective.build_critic(self.players) or self._build_reward_model()
        self.players.critic, self.players.critic_tokenizer = self.critic, self.critic_tokenizer
        h = datamodule.hparams
        datamodule.connect(DataConnection(
            tokenizer=self.tokenizer, critic_tokenizer=self.critic_tokenizer,
            rollout=lambda prompts, k: self.objective.rollout(self.players, prompts, k, datamodule.generation,
                                                             h.generation_batch_size, h.max_prompt_tokens),
            needs_samples=self.needs_samples, needs_pairs=self.needs_pairs, critic_steps=self.objective.critic_steps,
            critic_takes_sample_pairs=self.objective.critic_takes_sample_pairs, teacher_cache=self._teacher_cache,
        ))
        tasks = sorted({r.get("task", "text") for r in datamodule.val_records})
        self.task_scores = nn.ModuleDict({t: MeanMetric() for t in tasks})
        self.diversity = nn.ModuleDict({name: MeanMetric() for name in ("distinct_1", "distinct_2", "self_bleu")})
        self.heldout_pref_acc = BinaryAccuracy()
        self.heldout_rank_acc = BinaryAccuracy()
        self.task_pref_acc = nn.ModuleDict({t: BinaryAccuracy() for t in tasks})

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2, ``configs/strategy/fsdp.yaml``): shard student, critic and
        reference per transformer block over the data-parallel mesh. Other strategies: nothing to do."""
        if not isinstance(self.trainer.strategy, ModelParallelStrategy) or self.student is None:
            return
        if not self.objective.supports_sharding:
            raise ValueError(f"{type(self.objective).__name__} does not run under FSDP (ModelParallelStrategy) yet; "
                             "use configs/strategy/ddp.yaml")
        if hasattr(self.student, "peft_config"):
            raise ValueError("a LoRA student under FSDP (ModelParallelStrategy) is not supported yet; use DDP, "
                             "which LoRA's small trainable state suits anyway")
        mesh = self.device_mesh["data_parallel"]
        for model in (self.student, self.critic, self.reference):
            if model is not None:
                shard(model, mesh)

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._frozen.get("teacher")

    def _setup_teacher(self, datamodule, stage: str) -> None:
        """Load the teacher, unless a finished cache serves every batch, and check that it shares the student's tokenizer."""
        config, h = self.teacher_config, datamodule.hparams
        folder = h.get("teacher_cache") if stage == "fit" else None
        if folder:
            sequences = [(r["prompt"], r["teacher"]) for r in datamodule.train_records]
            fingerprint = cache_fingerprint(sequences, h.teacher_cache_k, config.describe())
            written = cache_is_complete(folder, fingerprint)
        if folder and written and not self.objective.needs_teacher_on_samples:
            teacher_tokenizer, rows = teacher_vocabulary(config)  # the weights are never read
        else:
            teacher, teacher_tokenizer = load_teacher(config, datamodule.train_records, h.max_prompt_tokens,
                                                      datamodule.generation.max_new_tokens)
            rows = teacher.config.vocab_size
            self._frozen["teacher"] = teacher
        self.teacher_tokenizer = teacher_tokenizer
        if not self.objective.needs_teacher_logits:
            return  # the teacher only initialises the reward model, which reads the teacher's own tokenizer
        self.vocabulary = shared_vocabulary_size(teacher_tokenizer, self.tokenizer, rows, self.student.config.vocab_size)
        if not folder:
            return
        if not written:
            rank_zero_info(f"teacher cache: writing the teacher's top-{h.teacher_cache_k} log-probabilities to {folder}")
            write_teacher_cache(self.teacher, datamodule.encoder(self.tokenizer), sequences, folder, h.teacher_cache_k,
                                vocabulary=self.vocabulary, tag=config.describe())
        self._teacher_cache = TeacherCache(folder, fingerprint)
        if not self.objective.needs_teacher_on_samples:
            self._frozen.pop("teacher", None)  # every teacher distribution now comes from the cache
            rank_zero_info(f"teacher cache: training from {folder}, no teacher in memory")

    def _build_reward_model(self) -> nn.Module:
        config = self.critic_config
        if config.init == "student":
            lm = copy.deepcopy(self.student)
        elif config.init == "teacher":
            lm = copy.deepcopy(self.teacher)
            self.critic_tokenizer = self.teacher_tokenizer
        else:  # the student's architecture with fresh weights (seeded by the global seed)
            lm = AutoModelForCausalLM.from_config(self.student.config).to(next(self.student.parameters()).dtype)
        lm.train()
        if not hasattr(lm, "peft_config"):  # a LoRA student's copy trains its adapter only, like the student
            lm.requires_grad_(True)
        if config.kind == "implicit":
            return ImplicitReward(lm, scale=config.scale)
        return ScalarReward(lm.get_decoder(), lm.config.hidden_size, pooling=config.pooling)

    def configure_optimizers(self):
        optimizers, schedulers = [], []
        groups = [(self.student, self.student_optimizer_config)]
        if self.critic is not None:
            groups.insert(0, (self.critic, self.critic_optimizer_config))
        total = self._training_batches()  # one step per optimizer per batch
        for model, config in groups:
            steps = total * (self.objective.critic_steps if model is self.critic else 1)
            params = [p for p in model.parameters() if p.requires_grad]
            # plain floats: jsonargparse's restricted types would be pickled into the optimizer state
            optimizer = _adamw(self.hparams.optimizer)(params, lr=float(config.lr), weight_decay=float(config.weight_decay))
            optimizers.append(optimizer)
            schedulers.append(torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps)))
        return optimizers, schedulers

    def _training_batches(self) -> int:
        """Training batches in the whole fit, counted without building the training data: under FSDP the
        optimizers are set up before a checkpoint is restored, and the data module must not sample (or clear its
        buffer) before it knows whether the run resumes."""
        trainer, data = self.trainer, self.trainer.datamodule
        if not hasattr(data, "batches_per_epoch"):
            return max(1, int(trainer.estimated_stepping_batches))
        per_epoch = data.batches_per_epoch(self.needs_samples, trainer.world_size)
        limit = trainer.limit_train_batches
        per_epoch = min(per_epoch, limit) if isinstance(limit, int) else int(per_epoch * limit)
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else 1000
        total = per_epoch * epochs
        return max(1, min(total, trainer.max_steps) if trainer.max_steps != -1 else total)

    def reward(self, sequences) -> torch.Tensor:
        """The critic's sequence reward for each sequence: ``(N,)`` (the objective says how it is induced)."""
        return self.objective.sequence_reward(self.players, sequences)

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        optimizers = self.optimizers()
        opt_critic, opt_student = optimizers if self.critic is not None else (None, optimizers)
        schedulers = self.lr_schedulers()
        sched_critic, sched_student = schedulers if self.critic is not None else (None, schedulers)
        paired = self.needs_pairs  # {"student": ..., "critic": ...} batches; else one batch for both steps
        student_batch = (batch["student"] if paired else batch).to(self.device)
        objective, players = self.objective, self.players
        if self.critic is not None:
            critic_batches = batch["critic"] if paired else batch
            for critic_batch in critic_batches if isinstance(critic_batches, list) else [critic_batches]:
                self._optimizer_step("critic", opt_critic, sched_critic, self.critic, critic_batch.to(self.device),
                                     lambda piece, share: objective.critic_loss(players, piece, share),
                                     self.hparams.critic_micro_batch_size)
        if self.training_batches_seen >= objective.critic_warmup_steps:
            # On-policy objectives score π_θ with dropout off, as the sampler drew from it (π_old).
            mode = self.student.training
            if objective.needs_samples:
                self.student.eval()
            try:
                student_batch = objective.prepare_student_batch(players, student_batch)
                trust = self.critic_heldout_acc
                self._optimizer_step("student", opt_student, sched_student, self.student, student_batch,
                                     lambda piece, share: objective.student_loss(players, piece, share, trust),
                                     self.hparams.micro_batch_size)
            finally:
                self.student.train(mode)
        self.training_batches_seen += 1

    def _optimizer_step(self, role, optimizer, scheduler, model, batch, compute, micro_batch_size) -> None:
        """toggle → zero_grad → (forward → backward) per micro-batch → clip → step → untoggle.

        Every mean in the loss is weighted by the micro-batch's :class:`Share` of the whole step (all micro-batches
        on all ranks), so the accumulated gradient is the whole batch's. A non-finite loss or gradient skips the step.
        """
        config = self.critic_optimizer_config if role == "critic" else self.student_optimizer_config
        self.toggle_optimizer(optimizer)
        optimizer.zero_grad(set_to_none=True)
        world = self.trainer.world_size
        reduce_sum = lambda tensor: self.trainer.strategy.reduce(tensor, reduce_op="sum")  # noqa: E731
        loss_sum, logged = accumulate_gradients(compute, batch, micro_batch_size, self.manual_backward, reduce_sum, world)
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf) if params else loss_sum * 0
        finite = bool(torch.isfinite(loss_sum) & torch.isfinite(norm))  # one host sync per step, cheap next to the forwards
        if finite:
            optimizer.step()
            scheduler.step()
        else:
            self.nonfinite_skips[role] += 1
        optimizer.zero_grad(set_to_none=True)  # free this player's gradients before the other one runs
        self.untoggle_optimizer(optimizer)
        self.log(f"{role}/loss", loss_sum, prog_bar=True)
        self.log(f"{role}/nonfinite_skips", float(self.nonfinite_skips[role]))
        self.log_dict({(k if "/" in k else f"{role}/{k}"): v for k, v in logged.items()})

    def on_train_epoch_start(self) -> None:
        stats = getattr(self.trainer.datamodule, "stats", {})
        for name, value in stats.items():
            self.log(name, value, on_step=False, on_epoch=True, sync_dist=False)

    # ------------------------------------------------------------------ evaluation
    def generate_responses(
        self, records: list[dict], config: Optional[GenerationConfig] = None, num_samples: int = 1, model=None, tokenizer=None
    ) -> list[list[str]]:
        """``num_samples`` responses per record from the current student or ``model`` (``val_generation`` unless told
        otherwise); ``tokenizer``: ``model``'s, when it is not the student's."""
        data = self.trainer.datamodule.hparams
        prompts = [r["prompt"] for r in records]
        config = config or self.val_generation
        model = model if model is not None else self.student
        responses, _ = generate(model, tokenizer or self.tokenizer, prompts, config, num_samples, data.val_batch_size,
                                data.max_prompt_tokens, self.vocabulary if tokenizer is None else None)
        return responses

    def greedy_responses(self, records: list[dict], model=None, tokenizer=None) -> list[str]:
        return [group[0] for group in self.generate_responses(records, model=model, tokenizer=tokenizer)]

    def evaluate(self, records: list[dict]) -> dict[str, float]:
        """Mean held-out score per task of the current student (greedy by default)."""
        return mean_scores(score_responses(records, self.greedy_responses(records)))

    def validation_step(self, records: list[dict], batch_idx: int):
        responses = self.greedy_responses(records)
        for task, score in score_responses(records, responses):
            self.task_scores[task].update(torch.tensor(score, device=self.device))
        # K samples per held-out prompt at the data's generation settings: their diversity, and, with a
        # critic, held-out pairs made exactly as training pairs are (the reward model's generalisation).
        data = self.trainer.datamodule
        samples = self.generate_responses(records, data.generation, data.hparams.samples_per_prompt)
        for name, value in diversity(samples).items():
            self.diversity[name].update(torch.tensor(value, device=self.device), weight=len(samples))
        if self.critic is not None and self.objective.critic_ranks_pairs:
            self._update_heldout_preferences(records, samples)
        if batch_idx == 0:
            self._show_samples(records, responses)

    def test_step(self, records: list[dict], batch_idx: int):
        self.validation_step(records, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    @torch.no_grad()
    def _update_heldout_preferences(self, records: list[dict], samples: list[list[str]]) -> None:
        """Does the reward model rank held-out (teacher, current student) pairs as the labeler does? Ties don't count.
        And, where prompts have references, does it order a prompt's samples as the task's score does (what the
        student's group advantages rely on)?

        ``samples[i]`` are the K student samples for ``records[i]``; each distinct text is scored once.
        """
        labeler = self.trainer.datamodule.hparams.labeler
        pairs = [(i, s, label_pair(labeler, r, r["teacher"], s)) for i, (r, group) in enumerate(zip(records, samples)) for s in group]
        pairs = [pair for pair in pairs if pair[2] != 0]
        rankings = [(i, better, worse) for i, (r, group) in enumerate(zip(records, samples)) if r.get("reference") is not None
                    for better, worse in sample_pairs(r, group)]
        sharded = is_sharded(self.critic)
        if not pairs and not rankings and not sharded:
            return
        texts = sorted({(i, records[i]["teacher"]) for i, _, _ in pairs} | {(i, s.strip()) for i, s, _ in pairs}
                       | {(i, s) for i, b, w in rankings for s in (b, w)})
        encoder = self.trainer.datamodule.encoder(self.critic_tokenizer)
        size = self.trainer.datamodule.hparams.val_batch_size
        chunks = -(-len(texts) // size)
        # A sharded critic gathers its parameters in each forward: every rank scores as many chunks.
        total = same_count_on_every_rank(chunks, self.device) if sharded else chunks
        scored = []
        for index in range(total):
            chunk = texts[index * size : (index + 1) * size] if index < chunks else [(0, records[0]["teacher"])]
            encoded = encoder.batch([records[i]["prompt"] for i, _ in chunk], [text for _, text in chunk])
            rewards = self.reward(encoded.to(self.device))
            if index < chunks:
                scored.append(rewards)
        if not texts:
            return
        reward = dict(zip(texts, torch.cat(scored)))
        for metric, per_task, items in ((self.heldout_pref_acc, self.task_pref_acc, pairs), (self.heldout_rank_acc, None, rankings)):
            if not items:
                continue
            if metric is self.heldout_pref_acc:
                margin = torch.stack([reward[(i, records[i]["teacher"])] - reward[(i, s.strip())] for i, s, _ in items])
                target = torch.tensor([label for _, _, label in items], device=self.device, dtype=margin.dtype)
            else:
                margin = torch.stack([reward[(i, b)] - reward[(i, w)] for i, b, w in items])
                target = torch.ones_like(margin)
            agreement = torch.sigmoid(margin * target)  # > 0.5 when the reward model ranks the pair as the labels do
            metric.update(agreement, torch.ones_like(target))
            if per_task is not None:
                tasks = [records[i].get("task", "text") for i, _, _ in items]
                for task in set(tasks):
                    rows = torch.tensor([t == task for t in tasks], device=self.device)
                    per_task[task].update(agreement[rows], torch.ones_like(target[rows]))

    def _computed(self, metric) -> Optional[torch.Tensor]:
        """The metric over all ranks, or None when no rank saw any data. Every rank must call this in the
        same order: under DDP a rank may hold no sample of a task, and the decision has to be collective."""
        seen = self.trainer.strategy.reduce(torch.tensor(float(metric.update_count), device=self.device), reduce_op="sum")
        value = metric.compute() if float(seen) > 0 else None
        metric.reset()
        return value

    def on_validation_epoch_end(self) -> None:
        for task, metric in self.task_scores.items():
            if (value := self._computed(metric)) is not None:
                self.log(f"eval/{task}_score", value)
        for name, metric in self.diversity.items():
            if (value := self._computed(metric)) is not None:
                self.log(f"eval/{name}", value)
        accuracy = self._computed(self.heldout_pref_acc)
        per_task = {task: self._computed(metric) for task, metric in self.task_pref_acc.items()}
        ranking = self._computed(self.heldout_rank_acc)
        if ranking is not None:
            self.log("critic/heldout_rank_acc", ranking)
        if accuracy is not None:
            self.log("critic/heldout_pref_acc", accuracy)
            self.critic_heldout_acc = float(accuracy)
            history = {"epoch": self.current_epoch, "all": float(accuracy)}
            if ranking is not None:
                history["sample_ranking"] = float(ranking)
            for task, value in per_task.items():
                if value is not None:
                    history[task] = float(value)
                    self.log(f"critic/heldout_pref_acc_{task}", history[task])
            if not self.trainer.sanity_checking:
                self.summary.setdefault("heldout_pref_acc_per_epoch", []).append(history)

    @rank_zero_only
    def _show_samples(self, records, responses) -> None:
        if not isinstance(self.logger, TensorBoardLogger) or self.hparams.samples_to_show <= 0:
            return
        rows = ["| prompt | teacher | student |", "|---|---|---|"]
        for record, response in list(zip(records, responses))[: self.hparams.samples_to_show]:
            cells = [record["prompt"], record["teacher"], response]
            rows.append("| " + " | ".join(c.replace("\n", " ⏎ ").replace("|", "\\|") for c in cells) + " |")
        self.logger.experiment.add_text("samples", "\n".join(rows), self.global_step)

    def predict_step(self, records: list[dict], batch_idx: int):
        return [{"prompt": r["prompt"], "response": s} for r, s in zip(records, self.greedy_responses(records))]

    # ------------------------------------------------------------------ end of fit, checkpoints
    def on_fit_end(self) -> None:
        metrics = self.trainer.callback_metrics
        final = {k[len("eval/") : -len("_score")]: float(v) for k, v in metrics.items() if k.startswith("eval/") and k.endswith("_score")}
        if final:
            final["mean"] = sum(final.values()) / len(final)
            self.summary["student_final"] = final
        spread = {name: float(metrics[f"eval/{name}"]) for name in self.diversity if f"eval/{name}" in metrics}
        if spread:
            self.summary["student_final_diversity"] = spread
        if "critic/heldout_pref_acc" in metrics:
            self.summary["reward_model_heldout_pref_acc"] = float(metrics["critic/heldout_pref_acc"])
        self.summary["objective"] = repr(self.objective)
        self.summary["nonfinite_skips"] = dict(self.nonfinite_skips)
        # A sharded student is gathered whole (every rank takes part) before rank 0 writes it.
        state = full_state_dict(self.student) if self.hparams.save_student and is_sharded(self.student) else None
        self._write_summary(state)

    @rank_zero_only
    def _write_summary(self, student_state: Optional[dict] = None) -> None:
        root = self.trainer.default_root_dir
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "summary.json"), "w") as handle:
            json.dump(self.summary, handle, indent=2)
        if self.hparams.save_student:
            student = self.student
            if student_state is not None:  # an unsharded copy of the student's class, for a plain Hugging Face folder
                student = AutoModelForCausalLM.from_config(self.student.config)
                student.load_state_dict(student_state)
            save_student(student, self.tokenizer, os.path.join(root, "student"))
        rank_zero_info(format_summary(self.summary) + f"\nsummary written to {os.path.join(root, 'summary.json')}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        # The frozen reference is rebuilt from the student in setup. A sharded checkpoint keeps it: its loader
        # reads every key the module has.
        if not is_sharded(self.student):
            for key in [k for k in state if k.startswith("reference.")]:
                del state[key]
        checkpoint["critic_heldout_acc"] = self.critic_heldout_acc  # a resumed run trusts its critic as before
        checkpoint["training_batches_seen"] = self.training_batches_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.critic_heldout_acc = checkpoint.get("critic_heldout_acc")
        self.training_batches_seen = checkpoint.get("training_batches_seen", 0)


def _adamw(name: str):
    """The AdamW class named by ``model.optimizer``; bitsandbytes is imported only when asked for."""
    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes.optim

    return {"adamw8bit": bitsandbytes.optim.AdamW8bit, "paged_adamw8bit": bitsandbytes.optim.PagedAdamW8bit}[name]


def _lr_lambda(config: OptimizerConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "cosine":
            progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def format_summary(summary: dict) -> str:
    """The end-of-fit table: held-out scores of teacher and student at each stage."""
    rows = [("teacher responses", "teacher"), ("teacher model, greedy", "teacher_model"), ("student, before warm-up", "student_before_warmup"),
            ("student, start of fit", "student_start"), ("student, end of fit", "student_final")]
    tasks = sorted({t for _, key in rows for t in summary.get(key, {}) if t != "mean"}) + ["mean"]
    lines = ["", f"{'held-out score':<26}" + "".join(f"{t:>12}" for t in tasks)]
    for label, key in rows:
        if key in summary:
            lines.append(f"{label:<26}" + "".join(f"{summary[key].get(t, float('nan')):>12.3f}" for t in tasks))
    if "reward_model_heldout_pref_acc" in summary:
        lines.append(f"{'reward model held-out preference accuracy':<42} {summary['reward_model_heldout_pref_acc']:.3f}")
    history = summary.get("heldout_pref_acc_per_epoch", [])
    if history:
        lines.append("  per epoch: " + ", ".join(f"{h['all']:.3f}" for h in history))
    ranking = [h["sample_ranking"] for h in history if "sample_ranking" in h]
    if ranking:
        lines.append(f"{'reward model orders held-out samples as the verifier':<42} " + ", ".join(f"{x:.3f}" for x in ranking))
    return "\n".join(lines)
