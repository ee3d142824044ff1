"""What happens around a fit rather than in it: the end-of-fit summary (``summary.json``, the printed table, the
saved student) and the dashboard's sample table. The module adds them itself (``configure_callbacks``)."""

import json
import os

import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from transformers import AutoModelForCausalLM

from pbkd_lightning.data.records import atomic_output, remove_partial_outputs
from pbkd_lightning.models.loading import save_student
from pbkd_lightning.parallel import full_state_dict, is_sharded
from pbkd_lightning.sequences import prompt_text


class FitSummary(Callback):
    """At the end of fit: held-out scores at each stage, diversity and the reward model's accuracy to
    ``<default_root_dir>/summary.json`` and the log, and (``save_student``) the student as a Hugging Face folder."""

    def __init__(self, save_student: bool = True):
        self.save_student = save_student

    def on_fit_end(self, trainer, module) -> None:
        metrics, summary = trainer.callback_metrics, module.summary
        final = {k[len("eval/") : -len("_score")]: float(v) for k, v in metrics.items() if k.startswith("eval/") and k.endswith("_score")}
        if final:
            final["mean"] = sum(final.values()) / len(final)
            summary["student_final"] = final
        spread = {name: float(metrics[f"eval/{name}"]) for name in ("distinct_1", "distinct_2", "self_bleu") if f"eval/{name}" in metrics}
        if spread:
            summary["student_final_diversity"] = spread
        if "critic/heldout_pref_acc" in metrics:
            summary["reward_model_heldout_pref_acc"] = float(metrics["critic/heldout_pref_acc"])
        summary["objective"] = repr(module.objective)
        summary["nonfinite_skips"] = dict(module.nonfinite_skips)
        # A sharded student is gathered whole (every rank takes part) before rank 0 writes it.
        state = full_state_dict(module.student) if self.save_student and is_sharded(module.student) else None
        self._write(trainer.default_root_dir, module, state)

    @rank_zero_only
    def _write(self, root: str, module, student_state=None) -> None:
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, "summary.json"), "w") as handle:
            json.dump(module.summary, handle, indent=2)
        if self.save_student:
            student = module.student
            if student_state is not None:  # an unsharded copy of the student's class, for a plain Hugging Face folder
                student = AutoModelForCausalLM.from_config(module.student.config)
                student.load_state_dict(student_state)
            save_student(student, module.tokenizer, os.path.join(root, "student"))
        rank_zero_info(format_summary(module.summary) + f"\nsummary written to {os.path.join(root, 'summary.json')}")


class SampleTable(Callback):
    """The first validation batch's prompts with the teacher's and the student's responses, as a TensorBoard text
    panel (``samples``) at each validation."""

    def __init__(self, rows: int = 4):
        self.rows = rows

    @rank_zero_only
    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        board = next((each for each in trainer.loggers if isinstance(each, TensorBoardLogger)), None)  # also in a list
        if batch_idx != 0 or self.rows <= 0 or not outputs or board is None:
            return
        lines = ["| prompt | teacher | student |", "|---|---|---|"]
        for record, response in list(zip(batch, outputs["responses"]))[: self.rows]:
            cells = [prompt_text(record["prompt"]), record["teacher"], response]
            lines.append("| " + " | ".join(c.replace("\n", " ⏎ ").replace("|", "\\|") for c in cells) + " |")
        board.experiment.add_text("samples", "\n".join(lines), trainer.global_step)


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a single-file checkpoint to a temporary file next to it, then renames it into place: a kill mid-save
    leaves the previous ``last.ckpt`` whole. (Lightning's own writes to the system's temporary folder and moves the
    file, which is a copy, and not atomic, when that folder is on another file system.) A sharded FSDP2 checkpoint,
    a folder, is written by its strategy and does not come here."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        remove_partial_outputs(os.path.dirname(os.path.abspath(str(path))))  # a save a kill cut short (one writer: rank 0)
        with atomic_output(str(path)) as tmp:
            torch.save(checkpoint, tmp)
            with open(tmp, "rb+") as handle:  # on disk before the rename
                os.fsync(handle.fileno())
