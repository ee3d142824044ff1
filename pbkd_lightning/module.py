"""DistillationModule: the student, the critic and their two optimizers; the objective holds the method."""

import math
from typing import Literal, Optional

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torchmetrics import MeanMetric

from pbkd_lightning.build import build_players
from pbkd_lightning.callbacks import FitSummary, SampleTable
from pbkd_lightning.config import plain
from pbkd_lightning.data.datamodule import DataConnection
from pbkd_lightning.data.generation import GenerationConfig, generate, sample_rollouts
from pbkd_lightning.eval import score_responses
from pbkd_lightning.eval.diversity import diversity
from pbkd_lightning.eval.preferences import HeldoutPreferences
from pbkd_lightning.models.critic import CriticConfig
from pbkd_lightning.models.loading import ModelSpec
from pbkd_lightning.models.teacher import TeacherModel
from pbkd_lightning.objectives.base import Objective, accumulate_gradients
from pbkd_lightning.optim import OptimizerConfig, build_optimizer
from pbkd_lightning.parallel import is_sharded, same_count_on_every_rank, shard
from pbkd_lightning.players import Players
from pbkd_lightning.models.warmup import WarmupConfig


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
            optimizer: AdamW for both players: ``adamw`` (torch's, fused where the device and dtype have the kernel), or bitsandbytes' ``adamw8bit`` /
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
        critic_from_teacher = objective.needs_critic and critic.init == "teacher"
        if critic_from_teacher and (teacher is None or teacher.quantization is not None):
            raise ValueError("`model.critic.init: teacher` needs `model.teacher`, not quantized: the reward model "
                             "trains a copy of its weights")
        self.automatic_optimization = False
        self.strict_loading = False  # the frozen reference is rebuilt in setup, not stored in checkpoints
        self.save_hyperparameters(plain({k: v for k, v in locals().items() if k not in ("self", "__class__", "critic_from_teacher")}))
        # hparams hold the config as plain data (LightningCLI stores its own copy there); use the objects.
        self.objective = objective
        self.student_spec, self.critic_config, self.warmup_config = student, critic, warmup
        self.teacher_config = teacher if objective.needs_teacher_logits or critic_from_teacher else None
        self.student_optimizer_config, self.critic_optimizer_config = student_optimizer, critic_optimizer
        self.val_generation = val_generation
        self.players: Optional[Players] = None  # built in setup
        # Registered children, so Lightning moves, checkpoints and shards them; the teacher stays in `players` only
        # (out of checkpoints, optimizers and device moves: a quantized model cannot be moved).
        self.student: Optional[nn.Module] = None
        self.critic: Optional[nn.Module] = None
        self.reference: Optional[nn.Module] = None
        self.tokenizer = self.critic_tokenizer = self.teacher_tokenizer = None
        self.summary: dict = {}
        self._nonfinite_counts: dict = {}  # role -> steps skipped so far, a tensor on the loss's device (no sync to count)
        self.critic_heldout_acc: Optional[float] = None  # the latest held-out preference accuracy (critic trust)
        self.training_batches_seen = 0  # counts the critic-only warm-up; saved in checkpoints
        self.step_means = StepMeans()  # each step's losses and terms, logged as means every log_every_n_steps batches
        self.last_step_means: dict = {}  # the means written last (what a callback or a benchmark can read)

    @property
    def nonfinite_skips(self) -> dict[str, int]:
        """Optimizer steps skipped for a non-finite loss or gradient, per player (reading it waits for the device)."""
        return {role: int(self._nonfinite_counts.get(role, 0)) for role in ("student", "critic")}

    @property
    def needs_samples(self) -> bool:
        return self.objective.needs_samples

    @property
    def needs_pairs(self) -> bool:
        return self.objective.needs_critic and self.objective.critic_uses_pairs

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self.players.teacher if self.players is not None else None

    @property
    def vocabulary(self) -> Optional[int]:
        return self.players.vocabulary if self.players is not None else None

    def configure_callbacks(self):
        return [FitSummary(self.hparams.save_student), SampleTable(self.hparams.samples_to_show)]

    # ------------------------------------------------------------------ models
    def setup(self, stage: str) -> None:
        if self.players is not None:
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError("FSDPStrategy (FSDP1) wraps the LightningModule as one root, which the methods bypass when "
                             "they call student and critic directly (generation, rewards); use FSDP2: --config "
                             "configs/strategy/fsdp.yaml (ModelParallelStrategy, also on GPUs)")
        if self.hparams.num_threads:
            torch.set_num_threads(self.hparams.num_threads)
        data = self.trainer.datamodule
        built = build_players(self.objective, self.student_spec, self.teacher_config, self.critic_config,
                              self.warmup_config, data, stage, self.greedy_responses)
        self.players, self.summary = built.players, dict(built.scores)
        self.student, self.critic, self.reference = self.players.student, self.players.critic, self.players.reference
        self.tokenizer, self.critic_tokenizer = self.players.tokenizer, self.players.critic_tokenizer
        self.teacher_tokenizer = built.teacher_tokenizer
        objective, players, h = self.objective, self.players, data.hparams

        def rollout(prompts, k):
            # under the precision the step runs in (bf16-mixed autocast), so π_old is computed as π_θ will be
            with self.trainer.precision_plugin.forward_context():
                return objective.rollout(players, prompts, k, data.generation, h.generation_batch_size, h.max_prompt_tokens)

        data.connect(DataConnection(
            tokenizer=self.tokenizer, critic_tokenizer=self.critic_tokenizer, rollout=rollout,
            needs_samples=self.needs_samples, needs_pairs=self.needs_pairs, critic_steps=objective.critic_steps,
            critic_takes_sample_pairs=objective.critic_takes_sample_pairs, teacher_cache=built.teacher_cache,
        ))
        tasks = sorted({r.get("task", "text") for r in data.val_records})
        self.task_scores = nn.ModuleDict({t: MeanMetric() for t in tasks})
        self.diversity = nn.ModuleDict({name: MeanMetric() for name in ("distinct_1", "distinct_2", "self_bleu")})
        self.heldout = HeldoutPreferences(tasks)

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

    def configure_optimizers(self):
        """The critic's optimizer first, then the student's (``opt_critic, opt_student = self.optimizers()``)."""
        total = self._training_batches()  # one step per optimizer per batch
        players = [(self.student, self.student_optimizer_config, total)]
        if self.critic is not None:
            players.insert(0, (self.critic, self.critic_optimizer_config, total * self.objective.critic_steps))
        built = [build_optimizer(self.hparams.optimizer, model, config, steps) for model, config, steps in players]
        return [optimizer for optimizer, _ in built], [scheduler for _, scheduler in built]

    def _training_batches(self) -> int:
        """Training batches in the whole fit, counted without building the training data: under FSDP the
        optimizers are set up before a checkpoint is restored, and the data module must not sample (or clear its
        buffer) before it knows whether the run resumes."""
        trainer, data = self.trainer, self.trainer.datamodule
        if not hasattr(data, "batches_per_epoch"):
            return max(1, int(trainer.estimated_stepping_batches))
        per_epoch = data.batches_per_epoch(trainer.world_size)
        limit = trainer.limit_train_batches
        per_epoch = min(per_epoch, limit) if isinstance(limit, int) else int(per_epoch * limit)
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else 1000
        total = per_epoch * epochs
        return max(1, min(total, trainer.max_steps) if trainer.max_steps != -1 else total)

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        if self.critic is not None:
            (opt_critic, opt_student), (sched_critic, sched_student) = self.optimizers(), self.lr_schedulers()
        else:
            opt_student, sched_student = self.optimizers(), self.lr_schedulers()
        objective, players = self.objective, self.players
        paired = self.needs_pairs  # {"student": ..., "critic": ...} batches; else one batch for both steps
        student_batch = batch["student"] if paired else batch  # moved by Lightning (batch_to_device calls each typed batch's `to`)
        if self.critic is not None:
            critic_batches = batch["critic"] if paired else batch
            for critic_batch in critic_batches if isinstance(critic_batches, list) else [critic_batches]:
                self._step("critic", opt_critic, sched_critic, self.critic, critic_batch,
                           lambda piece, share: objective.critic_loss(players, piece, share), self.hparams.critic_micro_batch_size)
        if self.training_batches_seen >= objective.critic_warmup_steps:
            # on-policy objectives score π_θ with dropout off, as the sampler drew π_old; others leave the mode alone
            # (a transformers model's train() walks every submodule, for nothing)
            mode = self.student.training if objective.needs_samples else None
            if mode is not None:
                self.student.eval()
            try:
                student_batch = objective.prepare_student_batch(players, student_batch)
                trust = self.critic_heldout_acc
                self._step("student", opt_student, sched_student, self.student, student_batch,
                           lambda piece, share: objective.student_loss(players, piece, share, trust), self.hparams.micro_batch_size)
            finally:
                if mode is not None:
                    self.student.train(mode)
        self.training_batches_seen += 1
        every = self.trainer.log_every_n_steps
        # the batches at which Lightning writes step metrics to the loggers (its count of batches equals ours, both
        # restored on resume): only there are the means of the steps since the last write logged
        if every and self.training_batches_seen % every == 0:
            self._log_step_means()

    def _log_step_means(self) -> None:
        """The means of the steps since the last write: each player's loss through ``self.log`` (the progress bar,
        ``trainer.callback_metrics``, a checkpoint's ``monitor``), every other term straight to the loggers. A
        ``self.log`` call costs about 0.5 ms on CPU (Lightning moves its whole result record to the value's device
        each call): ten terms logged that way were 0.44 ms of X-KD's 29 ms step."""
        means = self.step_means.pop()
        self.last_step_means = dict(means)
        for name in [name for name in means if name.endswith("/loss")]:
            self.log(name, means.pop(name), prog_bar=True)
        if means and self.loggers:
            terms = {name: float(value) for name, value in means.items()}
            # at the x value Lightning gives this batch's own step metrics: the batches before it
            for logger in self.loggers:
                logger.log_metrics(terms, step=self.training_batches_seen - 1)

    def _step(self, role, optimizer, scheduler, model, batch, compute, micro_batch_size) -> None:
        """toggle → zero_grad → (forward → manual_backward) per micro-batch → clip → step → untoggle (a method with one
        player, no critic, skips the toggling).

        Every mean in the loss is weighted by its micro-batch's share of the whole step (all micro-batches on all
        ranks), so the accumulated gradient is the whole batch's. A non-finite loss or gradient skips the step (with
        a fused optimizer, the default, decided on the device; see :meth:`_skips_on_device`).
        """
        config = self.critic_optimizer_config if role == "critic" else self.student_optimizer_config
        toggle = self.critic is not None  # one player: no other player's gradients to keep out
        if toggle:
            self.toggle_optimizer(optimizer)
        optimizer.zero_grad(set_to_none=True)
        reduce_sum = lambda tensor: self.trainer.strategy.reduce(tensor, reduce_op="sum")  # noqa: E731
        loss, terms = accumulate_gradients(compute, batch, micro_batch_size, self.manual_backward, reduce_sum,
                                           self.trainer.world_size, self.objective.term_units())
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf) if params else loss * 0
        nonfinite = ~(torch.isfinite(loss) & torch.isfinite(norm))
        inner = optimizer.optimizer  # the torch optimizer LightningOptimizer wraps
        if self._skips_on_device(inner):
            # the fused kernel leaves parameters, moments and step count alone where `found_inf` is 1 (GradScaler's
            # protocol): the skip is decided on the device, without a host sync. The step still counts: the
            # schedule and Lightning's global_step move on (the host check below moves neither)
            inner.found_inf = nonfinite.float()
            try:
                optimizer.step()
            finally:
                inner.__dict__.pop("found_inf", None)
            scheduler.step()
        elif not bool(nonfinite):  # other optimizers (bitsandbytes' 8-bit ones): a host sync per step
            optimizer.step()
            scheduler.step()
        self._nonfinite_counts[role] = self._nonfinite_counts.get(role, 0) + nonfinite.long()
        optimizer.zero_grad(set_to_none=True)  # free this player's gradients before the other one runs
        if toggle:
            self.untoggle_optimizer(optimizer)
        self.step_means.add({f"{role}/loss": loss, **{(k if "/" in k else f"{role}/{k}"): v for k, v in terms.items()}})
        self.step_means.set(f"{role}/nonfinite_skips", self._nonfinite_counts[role])

    def _skips_on_device(self, optimizer) -> bool:
        """Whether ``optimizer`` can be handed a non-finite step to skip on the device: every parameter group fused
        (a checkpoint of an unfused optimizer brings its groups back unfused), and no gradient scaler of 16-bit
        mixed precision, which sets and removes ``found_inf`` itself."""
        return (getattr(optimizer, "_step_supports_amp_scaling", False)
                and all(group.get("fused") for group in optimizer.param_groups)
                and getattr(self.trainer.precision_plugin, "scaler", None) is None)

    def on_train_epoch_start(self) -> None:
        # kept reference log-probs are an epoch's: a run resumed from an epoch's checkpoint computes what the
        # uninterrupted run did, to the bit
        self.players.forget_reference_logprobs()
        stats = getattr(self.trainer.datamodule, "stats", {})
        for name, value in stats.items():
            self.log(name, value, on_step=False, on_epoch=True, sync_dist=False)

    # ------------------------------------------------------------------ evaluation
    def greedy_responses(self, model, tokenizer, records: list[dict]) -> list[str]:
        """One response per record from ``model`` with its ``tokenizer`` at ``model.val_generation`` (greedy by
        default); the student's shared-vocabulary crop applies to the student's own tokenizer only."""
        data = self.trainer.datamodule.hparams
        vocabulary = self.vocabulary if tokenizer is self.tokenizer else None
        responses, _ = generate(model, tokenizer, [r["prompt"] for r in records], self.val_generation, 1,
                                data.val_batch_size, data.max_prompt_tokens, vocabulary)
        return [group[0] for group in responses]

    def validation_step(self, records: list[dict], batch_idx: int):
        responses = self.greedy_responses(self.student, self.tokenizer, records)
        for task, score in score_responses(records, responses):
            self.task_scores[task].update(torch.tensor(score, device=self.device))
        # K samples per held-out prompt at the data's generation settings: their diversity, and, with a
        # critic, held-out pairs made exactly as training pairs are (the reward model's generalisation).
        data, h = self.trainer.datamodule, self.trainer.datamodule.hparams
        if h.get("val_sampled_prompts") is not None:  # the first n held-out prompts (this rank's share of them)
            share = -(-h.val_sampled_prompts // self.trainer.world_size)
            records = records[: max(0, share - batch_idx * h.val_batch_size)]
            if not records:
                return {"responses": responses}
        rollouts, _ = sample_rollouts(self.student, self.tokenizer, [r["prompt"] for r in records], data.generation,
                                      h.samples_per_prompt, h.val_batch_size, h.max_prompt_tokens, self.vocabulary)
        samples = [[r.text for r in group] for group in rollouts]
        for name, value in diversity(samples).items():
            self.diversity[name].update(torch.tensor(value, device=self.device), weight=len(samples))
        if self.critic is not None and self.objective.critic_ranks_pairs:
            # a sample cut at the length limit is scored without an eos, as in training
            cut = {(i, r.text.strip()) for i, group in enumerate(rollouts) for r in group if not r.ended}
            cut |= {(i, r["teacher"]) for i, r in enumerate(records) if not r.get("teacher_ended", True)}
            # a judge is not asked again every validation: its runs are measured against the teacher's labels
            labeler = "teacher" if h.labeler == "judge" else h.labeler
            self.heldout.update(records, samples, labeler, lambda texts: self.score_texts(records, texts, cut))
        return {"responses": responses}

    def test_step(self, records: list[dict], batch_idx: int):
        return self.validation_step(records, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    @torch.no_grad()
    def score_texts(self, records: list[dict], texts: list[tuple[int, str]], cut: frozenset = frozenset()) -> Optional[torch.Tensor]:
        """The critic's reward of each ``(index into records, response)``, in chunks of ``data.val_batch_size``
        (``cut``: the pairs among them that stopped at the length limit, scored without eos). A sharded critic gathers
        its parameters in each forward: every rank scores as many chunks (padding with a throw-away one)."""
        data = self.trainer.datamodule
        encoder, size = data.encoder(self.critic_tokenizer), data.hparams.val_batch_size
        chunks = -(-len(texts) // size)
        total = same_count_on_every_rank(chunks, self.device) if is_sharded(self.critic) else chunks
        scored = []
        for index in range(total):
            chunk = texts[index * size : (index + 1) * size] if index < chunks else [(0, data.val_records[0]["teacher"])]
            prompts = [records[i]["prompt"] if index < chunks else data.val_records[0]["prompt"] for i, _ in chunk]
            ended = [pair not in cut for pair in chunk]
            rewards = self.objective.sequence_reward(self.players, encoder.batch(prompts, [t for _, t in chunk], ended).to(self.device))
            if index < chunks:
                scored.append(rewards)
        return torch.cat(scored) if scored else None

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            # the learning curve's x axis: the student's optimizer steps (batches after the critic-only warm-up)
            steps = max(0, self.training_batches_seen - self.objective.critic_warmup_steps)
            self.summary.setdefault("student_steps_per_epoch", []).append(steps)
        for name, metric in [*((f"eval/{t}_score", m) for t, m in self.task_scores.items()),
                             *((f"eval/{n}", m) for n, m in self.diversity.items())]:
            if (value := _computed(metric)) is not None:
                self.log(name, value)
        accuracy, ranking = _computed(self.heldout.all), _computed(self.heldout.ranking)
        per_task = {task: _computed(metric) for task, metric in self.heldout.per_task.items()}
        if ranking is not None:
            self.log("critic/heldout_rank_acc", ranking)
        if accuracy is None:
            return
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

    def predict_step(self, records: list[dict], batch_idx: int):
        return [{"prompt": r["prompt"], "response": s} for r, s in zip(records, self.greedy_responses(self.student, self.tokenizer, records))]

    # ------------------------------------------------------------------ checkpoints
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


class StepMeans:
    """Per-step values kept where they are (no host sync, no arithmetic in the step) and handed out as means
    since the last ``pop``.

    A step logs about ten values, while Lightning writes step metrics to its loggers only every ``log_every_n_steps``
    batches: ``self.log`` and Lightning's step-metric update were 12% of SeqKD's step time under cProfile."""

    def __init__(self):
        self.values: dict = {}

    def add(self, values: dict) -> None:
        for name, value in values.items():
            self.values.setdefault(name, []).append(value.detach() if isinstance(value, torch.Tensor) else float(value))

    def set(self, name: str, value) -> None:
        """A value that is not averaged (a count so far), kept where it is."""
        self.values[name] = [value.detach() if isinstance(value, torch.Tensor) else float(value)]

    def pop(self) -> dict:
        """The means since the last ``pop``, as float32 CPU tensors brought over in one transfer: Lightning reads a
        logged progress-bar value back to the host at every batch (``.item()``), which for a GPU tensor would wait
        for the GPU at every batch, not once a logging interval."""
        values, self.values = self.values, {}
        if not values:
            return {}
        device = next((v.device for vs in values.values() for v in vs if isinstance(v, torch.Tensor)), torch.device("cpu"))
        means = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in vs]).mean()
                             for vs in values.values()]).cpu()
        return dict(zip(values, means.unbind()))


def _computed(metric) -> Optional[torch.Tensor]:
    """The metric over all ranks (torchmetrics reduces its states), or None when no rank saw any data; reset after.
    Every rank calls this in the same order: the reduction is collective."""
    value = metric.compute()
    metric.reset()
    return None if bool(torch.isnan(value)) else value
