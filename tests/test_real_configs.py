"""configs/real/*: the full-size configs, instantiated and run one step with tiny stand-ins of the same architectures."""

import json

import pytest

from conftest import ROOT, run_cli

ARCHITECTURES = {  # config → (student folder, teacher folder, transformers config class of that family)
    "qwen2.5-7b-to-0.5b": ("models/Qwen2.5-0.5B-Instruct", "models/Qwen2.5-7B-Instruct", "Qwen2Config"),
    "llama3-8b-to-1b": ("models/Llama-3.2-1B-Instruct", "models/Llama-3.1-8B-Instruct", "LlamaConfig"),
}


def _stand_in(folder, config_class: str, hidden: int):
    """A randomly initialised model of the family, 2 blocks wide ``hidden``, with the project's character tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM

    from pbkd_lightning.models.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                 max_position_embeddings=256, tie_word_embeddings=True,
                                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_full_size_config_runs_a_step_with_tiny_models_of_its_architecture(tmp_path, name):
    config = f"{ROOT}/configs/real/{name}.yaml"
    text = open(config).read()
    student_path, teacher_path, config_class = ARCHITECTURES[name]
    assert student_path in text and teacher_path in text  # the stand-ins replace exactly these folders
    assert "ModelParallelStrategy" in text and "bf16-mixed" in text and "quantization: nf4" in text
    _stand_in(tmp_path / "student", config_class, 32)
    _stand_in(tmp_path / "teacher", config_class, 64)
    for split, numbers in (("train", range(8)), ("test", range(10, 14))):
        with open(tmp_path / f"{split}.jsonl", "w") as handle:
            for i in numbers:
                handle.write(json.dumps({"question": f"What is {i} + {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"}) + "\n")
    cli = run_cli(
        "fit", "--config", config, f"--trainer.default_root_dir={tmp_path}/run",
        # one CPU process stands in for the 4 GPUs: FSDP itself is tested in test_distributed.py
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        f"--model.student.path={tmp_path}/student", f"--data.teacher.init_args.path={tmp_path}/teacher",
        f"--data.train_file={tmp_path}/train.jsonl", f"--data.val_file={tmp_path}/test.jsonl",
        "--data.teacher.init_args.max_new_tokens=8", "--data.generation.max_new_tokens=8", "--model.val_generation.max_new_tokens=8",
        "--data.prompts_per_epoch=4", "--data.val_batch_size=4", "--model.objective.critic_warmup_steps=0",
    )
    module = cli.model
    assert type(module.student).__name__ == config_class.replace("Config", "ForCausalLM")
    assert cli.trainer.precision == "bf16-mixed" and cli.datamodule.teacher.quantization == "nf4"
    assert module.nonfinite_skips == {"student": 0, "critic": 0} and cli.trainer.global_step > 0
