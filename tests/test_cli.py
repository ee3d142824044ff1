"""The command line: config files, overrides and the errors a user sees before any model loads."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli, tiny_args
from programs import run_program

OVERLAYS = {"online.yaml", "ddp.yaml"}  # partial configs, used on top of a method's config


def config_files():
    return sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", config_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_parses(path, capsys):
    configs = ["--config", os.path.join(ROOT, "configs", "blackbox.yaml")] if os.path.basename(path) in OVERLAYS else []
    with pytest.raises(SystemExit) as done:
        run_cli("fit", *configs, "--config", path, "--print_config")
    assert done.value.code in (0, None)
    assert "objective" in capsys.readouterr().out


def test_configs_merge_in_order_and_dotted_overrides_win(capsys):
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", f"{ROOT}/configs/blackbox.yaml", "--config", f"{ROOT}/configs/online.yaml",
                "--model.objective.beta=0.25", "--print_config")
    out = capsys.readouterr().out
    assert "online: true" in out and "reload_dataloaders_every_n_epochs: 1" in out and "beta: 0.25" in out


def test_yaml_interpolation_works(tmp_path, capsys):
    extra = tmp_path / "interp.yaml"
    extra.write_text("data:\n  train_size: 24\n  val_size: ${data.train_size}\n")
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", f"{ROOT}/configs/blackbox.yaml", "--config", str(extra), "--print_config")
    assert "val_size: 24" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, key",
    [
        ("--model.objective.beta=-1", "beta"),
        ("--model.objective.clip_eps=1.5", "clip_eps"),
        ("--model.objective.clip_eps=0", "clip_eps"),
        ("--data.samples_per_prompt=0", "samples_per_prompt"),
        ("--data.labeler=oracle", "labeler"),
        ("--model.bogus_key=1", "bogus_key"),
        ("--data.batch_size=many", "batch_size"),
        ("--model.warmup.lr=-0.1", "model.warmup.lr"),
        ("--model.student.dtype=int8", "model.student.dtype"),
        ("--data.generation.top_p=0", "data.generation.top_p"),
        ("--model.critic_optimizer.grad_clip=-1", "model.critic_optimizer.grad_clip"),
        ("--model.objective.trust_threshold=0.3", "trust_threshold"),  # an accuracy below chance: (0.5, 1) only
        ("--data.generation.top_k=-1", "data.generation.top_k"),
        ("--model.micro_batch_size=0", "model.micro_batch_size"),
    ],
)
def test_config_errors_name_the_key_before_any_model_loads(tmp_path, capsys, override, key):
    with pytest.raises(SystemExit) as done:
        run_cli("fit", *tiny_args(tmp_path / "run"), override)
    assert done.value.code == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was loaded, trained or written


def test_python_api_refuses_the_same_values():
    from pbkd_lightning.data import GenerationConfig
    from pbkd_lightning.models import ModelSpec
    from pbkd_lightning.objectives import BlackBoxPbKD

    with pytest.raises(ValueError, match="`model.objective.init_args.beta`"):
        BlackBoxPbKD(beta=-1)
    with pytest.raises(ValueError, match="`model.objective.init_args.clip_eps`"):
        BlackBoxPbKD(clip_eps=1.0)
    with pytest.raises(ValueError, match="`top_p`"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        ModelSpec(dtype="int8")


def test_bad_jsonl_exits_nonzero_naming_file_line_and_field_before_models_load(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "1+1?", "reference": "#### 2"}\n{"prompt": 7}\n')
    val = tmp_path / "val.jsonl"
    val.write_text('{"prompt": "2+2?", "reference": "#### 4"}\n')
    result = run_program(["fit", *tiny_args(tmp_path / "run"), f"--data.train_file={train}", f"--data.val_file={val}"], timeout=300)
    assert result.returncode == 2
    assert f"{train}:2: field 'prompt' must be str or list, got int" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "cache").exists()  # the student was never loaded or warmed up


def test_broken_files_are_one_error_line_with_exit_code_2_and_nothing_written(tmp_path, capsys):
    """Issue 17's corpus through the CLI (the rest of it is in test_data.py): a UTF-16 file as Windows tools write it,
    binary junk, an empty prompt, a record of no known format, a bad chat role and a file named .parquet that is not
    one each stop the run with one ``error:`` line naming the file, before the trainer
    or its logger writes anything."""
    val = tmp_path / "val.jsonl"
    val.write_text('{"prompt": "2+2?", "reference": "#### 4"}\n')
    broken = {
        "utf16.jsonl": ('{"prompt": "1+1?", "reference": "#### 2"}\r\n'.encode("utf-16"), ": not UTF-8 text"),
        "junk.jsonl": (bytes(range(256)) * 4, ":1: not UTF-8 text"),
        "empty.jsonl": (b'\xef\xbb\xbf{"prompt": "1+1?", "reference": "#### 2"}\r\n{"prompt": " ", "reference": "#### 3"}\r\n',
                        ":2: field 'prompt' is empty"),
        "no_format.jsonl": (b'{"text": "1+1?"}\n', ":1: fits no prompt format (fields 'text')"),
        "chat_bad_role.jsonl": (b'{"messages": [{"role": "human", "content": "1+1?"}]}\n',
                                ":1: field 'messages' entry 0: 'role' must be one of"),
        "not.parquet": (b"PAR1 but not really", ": not a readable Parquet file"),
    }
    from pbkd_lightning.cli import main

    for index, (name, (content, expected)) in enumerate(broken.items()):
        train, run = tmp_path / name, tmp_path / f"run-{name}"
        train.write_bytes(content)
        args = ["fit", *tiny_args(run), f"--data.train_file={train}", f"--data.val_file={val}"]
        if index == 0:  # a real `python -m pbkd_lightning` process once; main() in this process for the others
            result = subprocess.run([sys.executable, "-m", "pbkd_lightning", *args], capture_output=True, text=True,
                                    cwd=ROOT, timeout=300)
            code, stderr = result.returncode, result.stderr
        else:
            with pytest.raises(SystemExit) as done:
                main(args)
            code, stderr = done.value.code, capsys.readouterr().err
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2, (name, stderr[-2000:])
        assert len(errors) == 1 and errors[0].startswith(f"error: {train}") and expected in errors[0], (name, stderr)
        assert "Traceback" not in stderr
        assert not run.exists() or not any(run.iterdir()), (name, sorted(map(str, run.rglob("*"))))


def test_export_writes_a_student_that_plain_transformers_loads_and_generates_the_same(tiny_fit, tmp_path):
    tiny_fit("--model.objective.critic_warmup_steps=0")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "student-hf"
    result = run_program(["export", f"--ckpt_path={ckpt}", f"--out={out}", "--reward_model"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").exists() and (out / "reward_model" / "model.safetensors").exists()
    # a fresh interpreter without this package's imports: plain transformers only
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "ids = t('Reverse: cat dog\\n', return_tensors='pt', add_special_tokens=False)['input_ids']\n"
        "print(repr(t.decode(m.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:])))"
    )
    exported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    from pbkd_lightning.models import ModelSpec, load_causal_lm

    before, tokenizer = load_causal_lm(ModelSpec(layers=1, hidden=32, heads=2))
    before.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
    ids = tokenizer("Reverse: cat dog\n", return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = tokenizer.decode(before.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:])
    assert exported.stdout.strip() == repr(expected)


def test_export_names_a_missing_checkpoint(tmp_path, capsys):
    from pbkd_lightning.cli import main  # the command as `python -m pbkd_lightning export` runs it, in this process

    with pytest.raises(SystemExit) as done:
        main(["export", f"--ckpt_path={tmp_path}/none.ckpt", f"--out={tmp_path}/out"])
    assert done.value.code == 2 and "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------- loggers
SHORT = ("--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")


def logger_args(root, *names):
    """``--trainer.logger`` as a list: each of ``names`` (classes of lightning.pytorch.loggers) writing under ``root``."""
    args = []
    for name in names:
        args += [f"--trainer.logger+=lightning.pytorch.loggers.{name}", f"--trainer.logger.save_dir={root}"]
        args += ["--trainer.logger.name=tensorboard"] if name == "TensorBoardLogger" else []
    return args


def tensorboard_run(folder):
    """``(steps of critic/loss, tensor tags)`` of one TensorBoard version folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return [e.step for e in accumulator.Scalars("critic/loss")], accumulator.Tags()["tensors"]


def test_a_resumed_fit_takes_the_newest_tensorboard_version_unless_one_is_given(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from pbkd_lightning.cli import continue_tensorboard_run

    first = TensorBoardLogger(tmp_path, name="tensorboard")
    continue_tensorboard_run(first)
    assert first.version == 0  # nothing to continue
    for version in (0, 2):
        (tmp_path / "tensorboard" / f"version_{version}").mkdir(parents=True)
    newest, given = TensorBoardLogger(tmp_path, name="tensorboard"), TensorBoardLogger(tmp_path, name="tensorboard", version=0)
    csv = CSVLogger(tmp_path, name="tensorboard")
    for each in (newest, given, csv):
        continue_tensorboard_run(each)
    assert (newest.version, given.version, csv.version) == (2, 0, 3)  # a CSV logger reusing a folder would delete its metrics


@pytest.mark.slow
def test_a_csv_logger_alone_writes_every_metric(tmp_path):
    root = tmp_path / "run"
    run_cli("fit", *tiny_args(root, *SHORT, "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}"))
    with open(root / "lightning_logs" / "version_0" / "metrics.csv") as handle:
        header, *rows = handle.read().splitlines()
    assert {"critic/loss", "eval/arithmetic_score"} <= set(header.split(",")) and rows
    assert not (root / "tensorboard").exists()


@pytest.mark.slow
def test_tensorboard_and_csv_together_and_a_resumed_fit_logs_on_in_the_same_tensorboard_run(tmp_path):
    root = tmp_path / "run"
    loggers = logger_args(root, "CSVLogger", "TensorBoardLogger")  # TensorBoard not first
    run_cli("fit", *tiny_args(root, *SHORT, *loggers))
    steps, tags = tensorboard_run(root / "tensorboard" / "version_0")
    assert steps and "samples/text_summary" in tags  # the sample table found the TensorBoard logger in the list
    run_cli("fit", *tiny_args(root, *SHORT, *loggers, "--trainer.max_epochs=2"), f"--ckpt_path={root}/checkpoints/last.ckpt")
    assert os.listdir(root / "tensorboard") == ["version_0"]
    resumed, _ = tensorboard_run(root / "tensorboard" / "version_0")
    assert resumed[: len(steps)] == steps and len(resumed) > len(steps) and min(resumed[len(steps):]) > max(steps)
    assert sorted(os.listdir(root / "lightning_logs")) == ["version_0", "version_1"]  # CSV: each fit its own metrics.csv


@pytest.mark.slow
def test_a_resumed_fit_continues_the_default_tensorboard_run(tmp_path):
    root = tmp_path / "run"
    run_cli("fit", *tiny_args(root, *SHORT))
    steps, _ = tensorboard_run(root / "tensorboard" / "version_0")
    run_cli("fit", *tiny_args(root, *SHORT, "--trainer.max_epochs=2"), f"--ckpt_path={root}/checkpoints/last.ckpt")
    assert os.listdir(root / "tensorboard") == ["version_0"]
    assert len(tensorboard_run(root / "tensorboard" / "version_0")[0]) > len(steps)


@pytest.mark.slow
def test_the_default_run_is_deterministic(tmp_path):
    """The default config twice from scratch (own warm-up caches, own folders): the same summary, to the last digit."""
    summaries = []
    for name in ("first", "second"):
        run_cli("fit", *tiny_args(tmp_path / name, "--trainer.max_epochs=2", "--data.tasks=[arithmetic,reversal,distinct]",
                                  "--data.train_size=6", "--data.prompts_per_epoch=8"))
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    assert summaries[0] == summaries[1]
    assert summaries[0]["student_steps_per_epoch"] == [2, 4]  # 8 of the 18 prompts per epoch, 4 per batch
