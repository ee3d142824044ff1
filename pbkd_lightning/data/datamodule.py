"""PreferenceDataModule: prompts, teacher responses, student samples, preference pairs, the on-disk buffer."""

import glob
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from pbkd_lightning.config import plain
from pbkd_lightning.data.collate import CriticCollate, StudentCollate, collate_records
from pbkd_lightning.data.generation import GenerationConfig
from pbkd_lightning.data.api import APIError
from pbkd_lightning.data.labelers import OpenAIJudge, label_pair, sample_pairs, verify
from pbkd_lightning.data.formats import ROLES, Format, read_prompts
from pbkd_lightning.data.records import DataError, read_jsonl, remove_partial_outputs, write_jsonl_atomic
from pbkd_lightning.data.teachers import ResponseFileTeacher, TaskProgramTeacher, Teacher
from pbkd_lightning.sequences import Encoder, Rollout, as_prompt, prompt_text
from pbkd_lightning.tasks import get_task, split_prompts


CRITIC_STREAM, LOADER_STREAM = 500_009, 900_001  # offsets of the epoch's own random streams (_epoch_generator)


@dataclass
class DataConnection:
    """What the data module learns from the module once the models are loaded (:meth:`PreferenceDataModule.connect`).

    The data module never reads the LightningModule: it samples through ``rollout`` and tokenises with these
    tokenizers, and the module never writes into it.
    """

    tokenizer: object
    """The student's tokenizer."""
    critic_tokenizer: object = None
    """The critic's, when it has its own (a reward model copied from the teacher); None: the student's."""
    rollout: Optional[Callable] = None
    """``rollout(prompts, k) -> (rollouts, stats)``: K :class:`~pbkd_lightning.sequences.Rollout` per prompt from the
    current policy; needed when ``needs_samples``."""
    needs_samples: bool = False
    needs_pairs: bool = False
    critic_steps: int = 1
    critic_takes_sample_pairs: bool = False
    teacher_cache: object = None
    """A finished :class:`~pbkd_lightning.data.teacher_cache.TeacherCache` of the training teacher sequences, or None."""


class PreferenceDataModule(LightningDataModule):
    """Prompts with teacher responses; on-policy student samples; teacher-vs-student preference pairs.

    Every epoch trains on its own ``prompts_per_epoch`` prompts of the training pool (the built-in tasks'
    ``train_size`` per task, or ``train_file``). Offline (``online: false``), the student's samples and the
    pairs are made once, from the student at the start of fit, for the prompts of every epoch. Online (``online: true`` with
    ``trainer.reload_dataloaders_every_n_epochs: 1``), every epoch is an iteration: new samples from
    the current student, new pairs appended to the buffer. The buffer lives in
    ``<trainer.default_root_dir>/buffer/iter_NNNN.jsonl``, one file per iteration written
    atomically, so a run resumed from ``last.ckpt`` continues with the same pairs.
    """

    def __init__(
        self,
        tasks: list[str] = ["arithmetic", "reversal", "distinct"],
        train_size: PositiveInt = 20_000,
        val_size: PositiveInt = 500,
        seed: int = 1234,
        train_file: Optional[str] = None,
        val_file: Optional[str] = None,
        format: Format = "auto",
        teacher: Optional[Teacher] = None,
        labeler: Literal["teacher", "verifier", "both", "judge"] = "teacher",
        judge: Optional[OpenAIJudge] = None,
        sample_pairs: bool = False,
        samples_per_prompt: PositiveInt = 4,
        prompts_per_epoch: Optional[PositiveInt] = None,
        online: bool = False,
        generation: GenerationConfig = GenerationConfig(),
        batch_size: PositiveInt = 8,
        critic_batch_size: PositiveInt = 32,
        val_batch_size: PositiveInt = 64,
        val_sampled_prompts: Optional[PositiveInt] = None,
        generation_batch_size: PositiveInt = 64,
        max_prompt_tokens: PositiveInt = 96,
        truncation: Literal["truncate", "error"] = "truncate",
        empty: Literal["error", "drop"] = "error",
        buffer_iterations: Optional[PositiveInt] = None,
        buffer_decay: float = 1.0,
        num_workers: NonNegativeInt = 0,
        teacher_cache: Optional[str] = None,
        teacher_cache_k: PositiveInt = 64,
    ):
        """
        Args:
            tasks: built-in tasks to generate prompts from (when no ``train_file``).
            train_size: distinct training prompts per task: the pool each epoch's prompts are drawn from.
            val_size: distinct held-out prompts per task, none of them in the training pool.
            seed: seed of the generated prompts (held-out prompts use ``seed + 1``) and of the epochs' draws.
            train_file: the training prompts: a JSONL file, a Parquet file or a folder saved by ``datasets``
                (``save_to_disk``), of records in one of the formats of ``format``.
            val_file: held-out prompts, read the same way; required with ``train_file``.
            format: the records' format: ``prompt`` ``{"prompt", "reference"?, "task"?}``, ``gsm8k``
                ``{"question", "answer"}``, ``chat`` ``{"messages"}`` (the last assistant turn is the teacher's
                response), ``completion`` ``{"prompt", "completion"}`` or ``preference`` ``{"prompt", "chosen",
                "rejected"}`` (the chosen response is the teacher's; black-box PbKD's reward model also learns the
                pair); ``auto``: detected from each file's first record. A response in the file is what the default
                teacher answers and what held-out answers are scored against (ROUGE-L).
            teacher: who answers the prompts; default: the task program (``TaskProgramTeacher``).
            labeler: ``teacher`` (teacher always preferred, as in the paper), ``verifier`` (higher task score
                preferred, ties dropped), ``both`` (the verifier, with its ties going to the teacher) or ``judge``
                (``judge`` compares the two; its ties, unparseable and order-dependent verdicts dropped).
            judge: the judge model of ``labeler: judge`` (an ``OpenAIJudge``); with ``sample_pairs`` it also ranks each
                prompt's samples against each other.
            sample_pairs: black-box PbKD: also pair each prompt's samples with each other, the one the task
                scores higher preferred (needs references): the rankings the student's advantages use.
            samples_per_prompt: K student samples per prompt.
            prompts_per_epoch: training prompts per epoch, for every method: the pool (``train_size`` per task, or
                ``train_file``) is walked in a fixed shuffled order, a new window each epoch, so no prompt repeats
                before the pool is used up; needs ``trainer.reload_dataloaders_every_n_epochs: 1``. Offline
                sampling methods sample the prompts of all ``trainer.max_epochs`` epochs once, from the student at
                the start of fit. None: every training prompt every epoch. The warm-up and the embedded teacher
                train on the whole pool.
            online: regenerate samples and pairs every epoch from the current student.
            generation: how the student samples (temperature, top-p, max new tokens).
            batch_size: prompts per student step (K sequences each).
            critic_batch_size: pairs per critic step.
            val_batch_size: prompts per validation step.
            val_sampled_prompts: the first this-many held-out prompts also get K samples at the generation settings each
                validation: the diversity metrics and the reward model's held-out accuracy are measured on them (every
                held-out prompt is scored greedily); None: all.
            generation_batch_size: prompts per ``generate`` call when sampling.
            max_prompt_tokens: longer prompts keep their last tokens (``truncate``) or stop the run (``error``).
            truncation: what to do with a prompt longer than ``max_prompt_tokens``.
            empty: a record whose prompt, reference, rejected or teacher response is empty or whitespace, in ``train_file``,
                ``val_file`` or a ``ResponseFileTeacher``'s file: ``error`` (naming file:line:field) or ``drop`` it
                (with its prompt), counted in one warning.
            buffer_iterations: the critic trains on the pairs of the last this-many iterations; None: all.
            buffer_decay: a pair made n iterations ago is drawn with weight ``buffer_decay ** n``, in (0, 1].
            num_workers: DataLoader workers.
            teacher_cache: white-box methods only: a folder for the teacher model's top-k log-probabilities on
                the training teacher sequences. Written by the first fit that names it (resumable), then read
                with no teacher forward pass; the teacher stays out of memory unless the method also scores
                student samples with it.
            teacher_cache_k: tokens kept per position in the cache.
        """
        super().__init__()
        settings = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        # Logged as ``response_teacher``: Lightning merges the module's and the data's hparams, and the
        # module's ``teacher`` is the white-box teacher model, a different thing.
        settings["response_teacher"] = settings.pop("teacher")
        self.judge = judge
        self.save_hyperparameters(plain(settings))
        if labeler == "judge" and judge is None:
            raise ValueError("`data.labeler: judge` needs `data.judge` (e.g. class_path: pbkd_lightning.data.OpenAIJudge)")
        if not 0 < buffer_decay <= 1:
            raise ValueError(f"`data.buffer_decay` must be in (0, 1], got {buffer_decay}")
        if train_file is not None and val_file is None:
            raise ValueError("`data.val_file` is required with `data.train_file`: held-out prompts are never trained on")
        for task in tasks:
            get_task(task)
        self.teacher = teacher if teacher is not None else TaskProgramTeacher()
        self.generation = generation  # hparams may hold it as a plain dict under LightningCLI
        # A model teacher answers within the response limit unless told otherwise; a longer answer would be cut.
        if hasattr(self.teacher, "max_new_tokens") and self.teacher.max_new_tokens is None:
            self.teacher.set_max_new_tokens(generation.max_new_tokens)
        elif getattr(self.teacher, "max_new_tokens", 0) > generation.max_new_tokens:
            rank_zero_warn(f"the teacher answers with up to {self.teacher.max_new_tokens} tokens but responses are cut at "
                           f"`data.generation.max_new_tokens` ({generation.max_new_tokens}); raise it to keep whole answers")
        self.connection: Optional[DataConnection] = None
        self.train_records: list[dict] = []
        self.val_records: list[dict] = []
        self.stats: dict[str, float] = {}
        self._groups: list[dict] = []
        self._groups_iteration: Optional[int] = None
        self._order: Optional[list[int]] = None  # the pool's shuffled order that epochs walk (epoch_rows)
        self._shuffle_seed = 0  # the student batches' shuffle (set in setup from the run's seed)
        self._buffer_checked = False
        # The files are read here, before the trainer (and its logger) writes anything: a bad one stops the run at once.
        self.dropped: list[str] = []  # ``file:line:field`` of each record left out for an empty field (``empty: drop``)
        if isinstance(self.teacher, ResponseFileTeacher):
            self.teacher.load(empty, self.dropped)
        self._file_prompts = self._read_prompt_files() if train_file is not None else None
        if self.dropped:
            rank_zero_warn(f"data: dropped {len(self.dropped)} records with an empty prompt, reference or teacher response "
                           f"(`data.empty: drop`): {', '.join(self.dropped[:3])}{', ...' if len(self.dropped) > 3 else ''}")

    # ------------------------------------------------------------------ setup (no model needed)
    def setup(self, stage: str) -> None:
        # seed_everything's seed (random without one; then rank 0's, so the ranks still split one order between them)
        seed = os.environ.get("PL_GLOBAL_SEED")
        self._shuffle_seed = int(seed) % 2**31 if seed is not None else torch.initial_seed() % 2**31
        if self.trainer is not None and self.trainer.world_size > 1:
            self._shuffle_seed = self.trainer.strategy.broadcast(self._shuffle_seed, src=0)
        if self.train_records and self.val_records:
            return
        h = self.hparams
        if self._file_prompts is not None:
            train, val = ([dict(r) for r in split] for split in self._file_prompts)  # held-out split already checked
        else:
            per_task = [split_prompts(get_task(name), h.train_size, h.val_size, seed=h.seed + 1000 * offset)
                        for offset, name in enumerate(h.tasks)]
            # Interleaved, so every batch (and the dashboard's sample panel) mixes the tasks.
            train = [r for group in zip(*(t for t, _ in per_task)) for r in group]
            val = [r for group in zip(*(v for _, v in per_task)) for r in group]
        # One request for both splits: a model teacher is loaded once.
        texts, ended = self._teacher_responses(train + val)
        for record, response, whole in zip(train + val, texts, ended):
            record["teacher"] = response
            if not whole:
                record["teacher_ended"] = False  # cut at the teacher's own limit: no eos target
        for row, record in enumerate(train):
            record["row"] = row  # the sequence's place in the teacher-logit cache
        self.train_records, self.val_records = train, val
        if stage == "fit" and self.trainer is not None:
            self._check_online_settings()

    def _read_prompt_files(self) -> tuple[list[dict], list[dict]]:
        """``train_file`` and ``val_file``, checked (file:line:field) against the teacher: the task program needs a
        reference on every prompt, a response file a response to every prompt."""
        h, splits = self.hparams, []
        for path in (h.train_file, h.val_file):
            records = []
            # who needs each record's response (its reference): the default teacher answers with it, the verifier scores
            # samples against it
            needs_response = ""
            if isinstance(self.teacher, TaskProgramTeacher):
                needs_response = ("the default teacher, TaskProgramTeacher, answers with the record's response; give one "
                                  "or set `data.teacher`")
            elif h.labeler in ("verifier", "both") or (h.sample_pairs and h.labeler != "judge"):
                needs_response = (f"`data.labeler: {h.labeler}`{' and `data.sample_pairs`' if h.sample_pairs else ''} "
                                  "score samples against the record's response; give one, or set `data.labeler: teacher` "
                                  "and `data.sample_pairs: false`")
            for where, record in read_prompts(path, h.format, h.empty, self.dropped, True, needs_response):
                problem = get_task(record["task"]).check(record)
                if problem:
                    raise DataError(f"{where}: task {record['task']!r}: {problem}")
                if isinstance(self.teacher, ResponseFileTeacher) and not isinstance(record["prompt"], str):
                    raise DataError(f"{where}: a conversation of {len(record['prompt'])} turns has no response in "
                                    f"{self.teacher.path} (a response file answers text prompts); give the response as "
                                    "the record's last assistant turn, or ask a model teacher")
                if isinstance(self.teacher, ResponseFileTeacher) and not self.teacher.has_response(record["prompt"]):
                    if h.empty == "drop" and record["prompt"] in self.teacher.empty_prompts:
                        self.dropped.append(f"{where}:prompt")  # its teacher response was empty
                        continue
                    raise DataError(f"{where}: no teacher response for this prompt ({prompt_text(record['prompt'])[:60]!r}) in "
                                    f"{self.teacher.path}")
                records.append(record)
            if not records:
                raise DataError(f"{path}: no records left once those with an empty teacher response are dropped "
                                "(`data.empty: drop`)")
            splits.append(records)
        return splits[0], _held_out(*splits, h.val_file)

    def _teacher_responses(self, records: list[dict]) -> tuple[list[str], list[bool]]:
        """Teacher responses and whether each ended, cached in the run folder for teachers that are expensive to ask."""
        if isinstance(self.teacher, TaskProgramTeacher) or self.trainer is None:
            return self.teacher.answer(records)
        key = hashlib.sha256(
            json.dumps([self.teacher.describe(), [r["prompt"] for r in records], "ended"]).encode()
        ).hexdigest()[:16]
        path = os.path.join(self.trainer.default_root_dir, "teacher", f"{key}.jsonl")
        if self.trainer.world_size > 1:  # rank 0 asks the teacher once (a served one would be asked once per rank)
            strategy = self.trainer.strategy
            if not strategy.broadcast(os.path.exists(path), src=0):
                failure = None
                if self.trainer.is_global_zero:
                    try:
                        self._ask_teacher(records, path)
                    except Exception as error:  # every rank stops, none waits at the barrier for rank 0
                        failure = f"{type(error).__name__}: {error}"
                failure = strategy.broadcast(failure, src=0)
                if failure is not None:
                    raise DataError(f"the teacher could not answer on rank 0: {failure}")
                strategy.barrier("teacher")
        if os.path.exists(path):
            stored = read_jsonl(path, {"teacher": str, "ended": bool})
            if len(stored) != len(records):
                raise DataError(f"{path}: {len(stored)} cached teacher responses for {len(records)} prompts; remove the "
                                "file to ask the teacher again")
            return [r["teacher"] for r in stored], [r["ended"] for r in stored]
        return self._ask_teacher(records, path)

    def _ask_teacher(self, records: list[dict], path: str) -> tuple[list[str], list[bool]]:
        rank_zero_info(f"data: asking {self.teacher.describe()} for {len(records)} responses")
        responses, ended = self.teacher.answer(records)
        write_jsonl_atomic(path, ({"prompt": r["prompt"], "teacher": t, "ended": e} for r, t, e in zip(records, responses, ended)))
        return responses, ended

    def _check_online_settings(self) -> None:
        reload_every = self.trainer.reload_dataloaders_every_n_epochs
        if self.hparams.online and reload_every != 1:
            raise ValueError("`data.online: true` needs `trainer.reload_dataloaders_every_n_epochs: 1`")
        if self._draws_prompts and reload_every != 1:
            raise ValueError("`data.prompts_per_epoch` draws new prompts every epoch: it needs "
                             "`trainer.reload_dataloaders_every_n_epochs: 1`")

    @property
    def _draws_prompts(self) -> bool:
        size = self.hparams.prompts_per_epoch
        return size is not None and size < len(self.train_records)

    def epoch_rows(self, epoch: int) -> list[int]:
        """Indices into the training records of epoch ``epoch``'s prompts: consecutive windows of one fixed shuffled
        order of the pool (seeded by ``data.seed``), wrapping around when it is used up; every row without
        ``prompts_per_epoch``."""
        count = len(self.train_records)
        if not self._draws_prompts:
            return list(range(count))
        if self._order is None:
            self._order = list(range(count))
            random.Random(self.hparams.seed).shuffle(self._order)
        start = epoch * self.hparams.prompts_per_epoch
        return [self._order[i % count] for i in range(start, start + self.hparams.prompts_per_epoch)]

    def _sampled_rows(self, iteration: int) -> list[int]:
        """The rows an iteration samples: online, its epoch's; offline (iteration 0), those of every epoch the trainer
        will run, each once, so every epoch finds its prompts sampled by the student at the start of fit."""
        if self.hparams.online or not self._draws_prompts:
            return self.epoch_rows(iteration)
        return list(dict.fromkeys(row for epoch in range(self._planned_epochs()) for row in self.epoch_rows(epoch)))

    def _planned_epochs(self) -> int:
        """The epochs the trainer will run: ``max_epochs``, or enough for ``max_steps`` when that is the limit."""
        trainer = self.trainer
        if trainer is None:
            return 1
        if (trainer.max_epochs or 0) > 0:
            return trainer.max_epochs
        if trainer.max_steps > 0:
            return math.ceil(trainer.max_steps / self.batches_per_epoch(trainer.world_size))
        raise DataError("offline sampling with `data.prompts_per_epoch` samples every epoch's prompts at the start: it "
                        "needs `trainer.max_epochs` or `trainer.max_steps`")

    # ------------------------------------------------------------------ the buffer
    @property
    def buffer_dir(self) -> str:
        return os.path.join(self.trainer.default_root_dir, "buffer")

    def _iteration_path(self, iteration: int) -> str:
        return os.path.join(self.buffer_dir, f"iter_{iteration:04d}.jsonl")

    def _clear_buffer(self) -> None:
        if self.trainer.is_global_zero:
            for path in glob.glob(os.path.join(self.buffer_dir, "iter_*.jsonl")):
                os.unlink(path)

    def _load_iteration(self, iteration: int) -> list[dict]:
        path = self._iteration_path(iteration)
        fields = {"prompt": (str, list), "teacher": str, "samples": list, "sample_ids": list, "old_logprobs": list, "ended": list,
                  "preferences": list}
        return [_restored(g) for g in read_jsonl(path, fields, {"eos": list, "rejected": list, "reference": (str, type(None)),
                                                                "judged_sample_pairs": list},
                                                 check=_buffer_problem)]

    def connect(self, connection: DataConnection) -> None:
        """Late settings from the module (tokenizers, the rollout function, what the objective needs), called once
        the models are loaded and before any training data is built; checks the training teacher texts against the
        response limit."""
        self.connection = connection
        self._check_chat_templates(connection)
        encoder = self.encoder(connection.tokenizer)
        cut_by_teacher = sum(not r.get("teacher_ended", True) for r in self.train_records)
        lengths = encoder.response_lengths([r["teacher"] for r in self.train_records])
        too_long = sum(length > encoder.max_response_tokens for length in lengths)
        self.stats["data/truncated_teacher_responses"] = float(too_long + cut_by_teacher)
        self.stats["data/truncated_responses"] = float(too_long + cut_by_teacher)
        self._warn_truncated(too_long, "teacher responses")
        if cut_by_teacher:
            rank_zero_warn(f"{cut_by_teacher} teacher answers stopped at the teacher's own token limit without eos; they "
                           "are trained on without one (raise the teacher's `max_new_tokens` to get whole answers)")

    def _check_chat_templates(self, connection: DataConnection) -> None:
        """Conversations are rendered by each tokenizer's chat template; say so when one has none (they are then
        ``role: content`` lines, see :func:`~pbkd_lightning.sequences.render_prompt`)."""
        turns = sum(not isinstance(r["prompt"], str) for r in self.train_records + self.val_records)
        tokenizers = {"student's": connection.tokenizer, "critic's": connection.critic_tokenizer}
        for whose, tokenizer in tokenizers.items():
            if whose == "critic's" and tokenizer is connection.tokenizer:
                continue
            if turns and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
                rank_zero_warn(f"data: {turns} prompts are conversations of several turns and the {whose} tokenizer has no "
                               "chat template: they are given to it as 'role: content' lines ending in 'assistant: '; give "
                               "`model.student.tokenizer` (or `model.teacher.tokenizer`) a folder with a chat template to "
                               "render them as a chat model expects")

    def _warn_truncated(self, count: int, what: str) -> None:
        if count:
            rank_zero_warn(f"{count} {what} are longer than `data.generation.max_new_tokens` "
                           f"({self.generation.max_new_tokens} tokens): they are cut there and get no eos (the student "
                           "is not taught to stop mid-answer); raise `data.generation.max_new_tokens` to keep them whole")

    def _connected(self) -> DataConnection:
        if self.connection is None:
            raise RuntimeError("the data module is not connected: the module calls `datamodule.connect(...)` in its setup")
        return self.connection

    def _make_iteration(self, iteration: int) -> list[dict]:
        """Sample K responses per training prompt from the current policy and label them."""
        connection, h = self._connected(), self.hparams
        records = [self.train_records[row] for row in self._sampled_rows(iteration)]
        # Each rank samples every world-th prompt; the pieces are gathered so every rank holds the whole
        # iteration (and rank 0 stores each group once).
        world, rank = self.trainer.world_size, self.trainer.global_rank
        prompts = [r["prompt"] for r in records[rank::world]]
        share = -(-len(records) // world)  # every rank samples as many prompts (a sharded student decodes in step)
        padded = prompts + [records[0]["prompt"]] * (share - len(prompts))
        mine, stats = connection.rollout(padded, h.samples_per_prompt)
        mine = mine[: len(prompts)]
        rollouts, tokens_per_s = mine, stats["tokens"] / max(stats["seconds"], 1e-9)
        if world > 1:
            pieces = [None] * world
            torch.distributed.all_gather_object(pieces, (mine, tokens_per_s))
            rollouts = [pieces[i % world][0][i // world] for i in range(len(records))]
            tokens_per_s = sum(rate for _, rate in pieces)  # the ranks sample at the same time
        self.stats["gen/tokens_per_s"] = tokens_per_s
        cut = sum(not r.ended for group in rollouts for r in group)
        self.stats["data/truncated_samples"] = float(cut)
        # every response cut at the limit (no eos target): the training teacher texts and this iteration's samples
        self.stats["data/truncated_responses"] = self.stats.get("data/truncated_teacher_responses", 0.0) + cut
        if cut:
            rank_zero_info(f"data: iteration {iteration}: {cut} samples reached `data.generation.max_new_tokens` "
                           f"({self.generation.max_new_tokens}) without eos; they are scored without one")
        groups = []
        judged = self._judge(records, rollouts) if h.labeler == "judge" else None
        for index, (record, group) in enumerate(zip(records, rollouts)):
            preferences = judged[0][index] if judged else [label_pair(h.labeler, record, record["teacher"], r.text)
                                                           for r in group]
            groups.append({**record, "rollouts": group, "preferences": preferences, "iteration": iteration})
            if judged and h.sample_pairs:
                groups[-1]["judged_sample_pairs"] = judged[1][index]
        if self.trainer.is_global_zero:
            write_jsonl_atomic(self._iteration_path(iteration), (_stored(g) for g in groups))
        return groups

    def _judge(self, records: list[dict], rollouts: list[list[Rollout]]) -> tuple[list, list]:
        """The judge's labels of an iteration: per prompt, teacher vs each sample, and with ``sample_pairs`` the
        ``[better, worse]`` texts of every two distinct samples it tells apart. Asked by rank 0 only (every rank then
        holds its answers); the counts and the agreement with the task's verifier (where records have references)
        go to the logged stats."""
        result = [None]
        if self.trainer is None or self.trainer.is_global_zero:
            try:
                items = [(r["prompt"], r["teacher"], s.text) for r, group in zip(records, rollouts) for s in group]
                # every two distinct samples of a prompt, with the prompt's index
                among = []
                for index, group in enumerate(rollouts) if self.hparams.sample_pairs else ():
                    texts = list(dict.fromkeys(s.text.strip() for s in group))
                    among += [(index, texts[i], texts[j]) for i in range(len(texts)) for j in range(i + 1, len(texts))]
                verdicts, counts = self.judge.compare(items + [(records[i]["prompt"], a, b) for i, a, b in among])
                k = len(rollouts[0]) if rollouts else 0
                preferences = [verdicts[i * k: (i + 1) * k] for i in range(len(records))]
                ranked = [[] for _ in records]
                for (index, a, b), verdict in zip(among, verdicts[len(items):]):
                    if verdict:
                        ranked[index].append([a, b] if verdict > 0 else [b, a])
                # agreement with the verifier on the teacher-vs-sample pairs both decide (tasks with a reference)
                both = [(v, verify(r, r["teacher"], s.text)) for r, group, row in zip(records, rollouts, preferences)
                        if r.get("reference") is not None for s, v in zip(group, row) if v]
                agree = [v == checked for v, checked in both if checked != 0]
                stats = {f"data/judge_{name}": float(value) for name, value in counts.items()}
                if agree:
                    stats["data/judge_verifier_agreement"] = sum(agree) / len(agree)
                result = [(preferences, ranked, stats)]
            except APIError as error:  # every rank stops with it, none waits for a broadcast that never comes
                result = [str(error)]
        if self.trainer is not None and self.trainer.world_size > 1:
            torch.distributed.broadcast_object_list(result, src=0)
        if isinstance(result[0], str):  # rank 0's failure
            raise APIError(result[0])
        preferences, ranked, stats = result[0]
        self.stats.update(stats)
        rank_zero_info(f"data: judge: {stats['data/judge_pairs']:.0f} pairs, {stats['data/judge_asked']:.0f} requests, "
                       f"{stats['data/judge_ties']:.0f} ties, {stats['data/judge_unparsed']:.0f} unparseable, "
                       f"{stats['data/judge_inconsistent']:.0f} order-dependent (no label)")
        return preferences, ranked

    def _groups_for(self, iteration: int) -> list[dict]:
        if not self._buffer_checked:
            # Decided here, not in setup: Lightning sets ckpt_path only once it restores the checkpoint.
            if self.trainer.ckpt_path is None:
                self._clear_buffer()  # a fresh run never reuses pairs made by another run's student
            if self.trainer.is_global_zero and os.path.isdir(self.buffer_dir):
                remove_partial_outputs(self.buffer_dir)  # an iteration a killed run was writing: sampled again below
            self.trainer.strategy.barrier("buffer")  # every rank then sees the same buffer files
            self._buffer_checked = True
        if self._groups_iteration != iteration:
            path = self._iteration_path(iteration)
            if os.path.exists(path):
                rank_zero_info(f"data: iteration {iteration}: reusing the buffered samples in {path}")
                self._groups = self._load_iteration(iteration)
            else:
                self._groups = self._make_iteration(iteration)
            self._groups_iteration = iteration
        return self._groups

    def critic_pairs(self, upto_iteration: int) -> list[dict]:
        """Teacher pairs of the buffered iterations (teacher response vs each sample; identical texts carry no
        information and are left out), a preference file's own pair of each prompt (chosen vs rejected,
        ``teacher_pair`` False), and with ``sample_pairs`` the verifier's better-vs-worse pairs among each prompt's
        samples (``teacher_pair`` False, ``row`` None). Each pair keeps the ``iteration`` that made it."""
        first = 0
        if self.hparams.buffer_iterations is not None:
            first = max(0, upto_iteration - self.hparams.buffer_iterations + 1)
        # a preference file's pairs are not (teacher, student sample) pairs: only a critic that takes any pair learns them
        file_pairs = self.connection is not None and self.connection.critic_takes_sample_pairs
        pairs = []
        for iteration in range(first, upto_iteration + 1):
            groups = self._groups if iteration == self._groups_iteration else self._load_iteration(iteration)
            for group in groups:
                for rollout, preference in zip(group["rollouts"], group["preferences"]):
                    if rollout.text.strip() != group["teacher"].strip():
                        pairs.append({"prompt": group["prompt"], "chosen": group["teacher"], "rejected": rollout,
                                      "chosen_ended": group.get("teacher_ended", True), "preference": preference,
                                      "teacher_pair": True, "row": group.get("row"), "iteration": iteration})
                # the file's own pairs (a preference record), once, as made now: chosen as written in the file (the
                # teacher's answer is another text when `data.teacher` names a model)
                for rejected in group.get("rejected", []) if file_pairs and iteration == upto_iteration else ():
                    if rejected.strip() != group["reference"].strip():
                        pairs.append({"prompt": group["prompt"], "chosen": group["reference"], "rejected": rejected,
                                      "preference": 1, "teacher_pair": False, "row": None, "iteration": iteration})
                if self.hparams.sample_pairs:
                    by_text = {r.text.strip(): r for r in group["rollouts"]}
                    ranked = group.get("judged_sample_pairs")  # the judge's, else the verifier's
                    if ranked is None:
                        ranked = sample_pairs(group, [r.text for r in group["rollouts"]])
                    pairs += [{"prompt": group["prompt"], "chosen": by_text[better], "rejected": by_text[worse],
                               "preference": 1, "teacher_pair": False, "row": None, "iteration": iteration}
                              for better, worse in ranked]
        return pairs

    # ------------------------------------------------------------------ loaders
    def encoder(self, tokenizer) -> Encoder:
        return Encoder(tokenizer, self.hparams.max_prompt_tokens, self.generation.max_new_tokens)

    def _check_prompt_lengths(self, encoder: Encoder) -> None:
        records = self.train_records + self.val_records
        lengths = encoder.prompt_lengths([r["prompt"] for r in records])
        too_long = [r for r, length in zip(records, lengths) if length > encoder.max_prompt_tokens]
        self.stats["data/truncated_prompts"] = float(len(too_long))
        if too_long and self.hparams.truncation == "error":
            raise DataError(
                f"{len(too_long)} prompts are longer than `data.max_prompt_tokens` ({encoder.max_prompt_tokens}), "
                f"e.g. {prompt_text(too_long[0]['prompt'])[:60]!r}; raise the limit or set `data.truncation: truncate`"
            )
        if too_long:
            rank_zero_warn(f"{len(too_long)} prompts are longer than {encoder.max_prompt_tokens} tokens; keeping their end")

    def train_dataloader(self):
        connection = self._connected()
        student_encoder = self.encoder(connection.tokenizer)
        if "data/truncated_prompts" not in self.stats:
            self._check_prompt_lengths(student_encoder)
        epoch = self.trainer.current_epoch
        # Every epoch's randomness (its sampling, the critic's draws, on-policy rollouts) starts from the run's seed and
        # the epoch: a run resumed from an epoch's checkpoint goes on exactly as the uninterrupted run did.
        torch.manual_seed(self._shuffle_seed * 1_000_003 + 7_919 * (epoch + 1) + self.trainer.global_rank)
        iteration = epoch if self.hparams.online else 0
        rows = self.epoch_rows(epoch)
        if not connection.needs_samples:
            items = [{"prompt": r["prompt"], "teacher": r["teacher"], "row": r["row"], "teacher_ended": r.get("teacher_ended", True)}
                     for r in (self.train_records[row] for row in rows)]
            collate = StudentCollate(student_encoder, teacher_cache=connection.teacher_cache)
            return self._loader(items, self.hparams.batch_size, collate, shuffle=True, epoch=epoch)
        groups = self._groups_for(iteration)
        if not self.hparams.online and self._draws_prompts:  # offline: this epoch's prompts among those sampled
            by_row = {g.get("row"): g for g in groups}
            if missing := [row for row in rows if row not in by_row]:
                raise DataError(f"{self._iteration_path(0)}: the offline samples hold no prompt for {len(missing)} of epoch "
                                f"{epoch}'s {len(rows)} (the run was started with other `trainer.max_epochs` or "
                                "`data.prompts_per_epoch`); resume with the same settings or start a fresh run")
            groups = [by_row[row] for row in rows]
        own_critic_tokenizer = connection.critic_tokenizer is not None and connection.critic_tokenizer is not connection.tokenizer
        critic_encoder = self.encoder(connection.critic_tokenizer) if own_critic_tokenizer else None
        collate = StudentCollate(student_encoder, critic_encoder, connection.teacher_cache)
        student_loader = self._loader(groups, self.hparams.batch_size, collate, True, epoch=epoch)
        if not connection.needs_pairs:
            return student_loader
        if self.hparams.sample_pairs and not connection.critic_takes_sample_pairs:
            raise ValueError("`data.sample_pairs` is for black-box PbKD's reward model; this objective's critic reads "
                             "the chosen side of every pair as a teacher sequence")
        pairs = self.critic_pairs(iteration)
        self.stats["data/buffer_pairs"] = float(len(pairs))
        self.stats["data/teacher_pairs"] = float(sum(p["teacher_pair"] for p in pairs))
        self.stats["data/file_pairs"] = float(sum(isinstance(p["rejected"], str) for p in pairs))
        self.stats["data/pairs_teacher_preferred"] = float(sum(p["preference"] > 0 and p["teacher_pair"] for p in pairs))
        if not pairs:
            raise DataError("no preference pair differs from its teacher response: nothing for the critic to learn")
        # `critic_steps` critic batches per student batch, drawn from the whole buffer, so a step costs the same in
        # every iteration; older pairs drawn less often when `buffer_decay` < 1.
        steps = connection.critic_steps
        count = len(student_loader) * self.hparams.critic_batch_size * steps
        # Drawn here, once, from their own generator (as the student batches' order): the same whether or not this
        # epoch sampled (a resumed run reads its samples back from the buffer) and however often Lightning iterates the
        # loader (a resumed run builds and iterates it more than once)
        generator = self._epoch_generator(epoch, CRITIC_STREAM)
        if self.hparams.buffer_decay < 1:
            weights = torch.tensor([self.hparams.buffer_decay ** (iteration - p["iteration"]) for p in pairs], dtype=torch.float64)
            sampler = Draws(torch.multinomial(weights, count, replacement=True, generator=generator).tolist(), weights)
        else:  # without replacement, one permutation after another, as RandomSampler(num_samples=count) draws
            rounds = -(-count // len(pairs))
            sampler = Draws(torch.cat([torch.randperm(len(pairs), generator=generator) for _ in range(rounds)])[:count].tolist())
        critic_tokenizer = connection.critic_tokenizer or connection.tokenizer
        critic_loader = DataLoader(
            pairs,
            batch_size=self.hparams.critic_batch_size * steps,
            sampler=sampler,
            collate_fn=CriticCollate(self.encoder(critic_tokenizer), connection.teacher_cache, steps,
                                     sampled_tokens=not own_critic_tokenizer),
            num_workers=self.hparams.num_workers,
            generator=self._epoch_generator(epoch, LOADER_STREAM),
        )
        return {"student": student_loader, "critic": critic_loader}

    def batches_per_epoch(self, world_size: int = 1) -> int:
        """Student batches per epoch on each rank (what :meth:`train_dataloader` will give), without sampling."""
        items = len(self.train_records)
        if self.hparams.prompts_per_epoch is not None:
            items = min(items, self.hparams.prompts_per_epoch)
        per_rank = math.ceil(items / world_size)  # a DistributedSampler pads every rank to the same share
        return math.ceil(per_rank / self.hparams.batch_size)

    def val_dataloader(self):
        return self._loader(self.val_records, self.hparams.val_batch_size, collate_records, shuffle=False)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return self.val_dataloader()

    def _loader(self, items, batch_size, collate, shuffle, epoch: int = 0):
        # The student's batches are shuffled by their own generator (the run's seed and the epoch), not the global one
        # that sampling, dropout and the critic's draws also consume: every method run with the same seed sees the
        # same prompts in the same batches, so its difference to SeqKD is paired on the data order too.
        # The order is drawn once, here: a DataLoader's shuffle draws a new one each time it is iterated, and a resumed
        # run iterates its loaders a different number of times than the uninterrupted one. (Under data parallelism
        # Lightning's DistributedSampler shuffles this order again, by the run's seed and the epoch, alike on every
        # rank, and gives each rank its own share.)
        if shuffle:
            order = torch.randperm(len(items), generator=self._epoch_generator(epoch))
            items = [items[i] for i in order.tolist()]
        return DataLoader(items, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=self.hparams.num_workers,
                          generator=self._epoch_generator(epoch, LOADER_STREAM))

    def _epoch_generator(self, epoch: int, stream: int = 0) -> torch.Generator:
        """A generator of its own for one of the epoch's random streams (0: the student order; ``CRITIC_STREAM``: the
        critic's draws; ``LOADER_STREAM``: a DataLoader's workers' base seed, which it draws on every iteration, from
        the global generator without one), from the run's seed and the epoch."""
        return torch.Generator().manual_seed(self._shuffle_seed * 1_000_003 + epoch + stream)


class Draws(Sampler):
    """Indices drawn once (the same sequence each time it is iterated) and the weights they were drawn with (None:
    uniform). Under data parallelism Lightning splits them between the ranks (``DistributedSamplerWrapper``)."""

    def __init__(self, indices: list[int], weights: Optional[torch.Tensor] = None):
        self.indices, self.weights = indices, weights

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _held_out(train: list[dict], val: list[dict], val_file: Optional[str]) -> list[dict]:
    """``val`` without the prompts that also occur in ``train``."""
    train_prompts = {r["prompt"] for r in train}
    kept = [r for r in val if r["prompt"] not in train_prompts]
    if len(kept) < len(val):
        rank_zero_info(f"data: dropped {len(val) - len(kept)} held-out prompts that also occur in the training prompts")
    if not kept:
        raise DataError(f"{val_file + ': ' if val_file else ''}no held-out prompt is left once those seen in training "
                        "are removed")
    return kept


def _buffer_problem(stored: dict) -> Optional[str]:
    """What is wrong with a buffer line (one prompt's samples), or None: the per-sample lists must agree."""
    if not all(isinstance(r, str) for r in stored.get("rejected", [])):
        return "field 'rejected' must be a list of texts"
    prompt = stored["prompt"]
    if isinstance(prompt, list) and not (prompt and all(
            isinstance(t, list) and len(t) == 2 and t[0] in ROLES and isinstance(t[1], str) for t in prompt)):
        return f"field 'prompt' must be a text or a list of [role, content] turns (roles {', '.join(ROLES)})"
    count = len(stored["samples"])
    for field in ("sample_ids", "old_logprobs", "ended", "preferences", "eos"):
        if field in stored and len(stored[field]) != count:
            return f"field {field!r} has {len(stored[field])} entries for {count} samples"
    for i in range(count):
        ids, logprobs, ended = stored["sample_ids"][i], stored["old_logprobs"][i], stored["ended"][i]
        if not isinstance(stored["samples"][i], str):
            return f"field 'samples' entry {i} must be str, got {type(stored['samples'][i]).__name__}"
        if not isinstance(ended, bool):
            return f"field 'ended' entry {i} must be bool, got {type(ended).__name__}"
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            return f"field 'sample_ids' entry {i} must be a list of token ids"
        scored = len(ids) + ended  # the response tokens, then the eos when it ended
        if not isinstance(logprobs, list) or len(logprobs) != scored or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in logprobs):
            return f"field 'old_logprobs' entry {i} must be a list of {scored} numbers (one per scored token)"
        if stored["preferences"][i] not in (-1, 0, 1) or isinstance(stored["preferences"][i], bool):
            return f"field 'preferences' entry {i} must be -1, 0 or 1, got {stored['preferences'][i]!r}"
        eos = stored.get("eos", [None] * count)[i]
        if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool)):
            return f"field 'eos' entry {i} must be a token id or null, got {eos!r}"
    return None


def _stored(group: dict) -> dict:
    """A buffer group as JSON: each sample's text, its tokens as sampled, log π_old and whether it ended."""
    stored = {k: v for k, v in group.items() if k != "rollouts"}
    rollouts = group["rollouts"]
    stored.update(samples=[r.text for r in rollouts], sample_ids=[r.token_ids for r in rollouts],
                  old_logprobs=[r.logprobs for r in rollouts], ended=[r.ended for r in rollouts])
    if any(r.eos_token_id is not None for r in rollouts):
        stored["eos"] = [r.eos_token_id for r in rollouts]
    return stored


def _restored(stored: dict) -> dict:
    group = {k: v for k, v in stored.items() if k not in ("samples", "sample_ids", "old_logprobs", "ended", "eos")}
    group["prompt"] = as_prompt(group["prompt"])  # a conversation comes back from JSON as lists
    eos = stored.get("eos", [None] * len(stored["samples"]))
    group["rollouts"] = [Rollout(*fields) for fields in zip(stored["samples"], stored["sample_ids"], stored["old_logprobs"],
                                                            stored["ended"], eos)]
    return group
