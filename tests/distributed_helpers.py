"""Imported by the two-process runs of test_distributed.py (they run as their own programs)."""

import json

from lightning.pytorch import Callback


class FirstBatchRecorder(Callback):
    """Writes each rank's first training batch (its prompts) and the student loss it logged to ``<path>.rank<r>.json``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 0:
            batch = batch["student"] if isinstance(batch, dict) else batch
            with open(f"{self.path}.rank{trainer.global_rank}.json", "w") as handle:
                json.dump({"prompts": batch.prompts, "loss": float(trainer.callback_metrics["student/loss"])}, handle)
