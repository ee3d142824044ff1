"""Two processes on CPU (gloo): DDP through configs/strategy/ddp.yaml, FSDP2 through configs/strategy/fsdp.yaml."""

import json
import os

import pytest
import torch

from conftest import ROOT, TINY_TEACHER, run_cli, tiny_args
from programs import run_program

pytestmark = pytest.mark.slow  # every test here but the last starts two processes


def _fit(root, *extra, strategy="ddp", config="configs/blackbox.yaml"):
    critic = [] if "seqkd" in config else ["--model.objective.critic_warmup_steps=0"]
    args = tiny_args(root, "--config", f"{ROOT}/configs/strategy/{strategy}.yaml", "--trainer.devices=2", "--model.num_threads=1",
                     *critic, *extra, config=config)
    # rank 0 is a program of its own (tests/programs.py), not pytest's process: Lightning starts rank 1 as a fresh
    # `python -m pbkd_lightning.__main__` with rank 0's arguments, which imports the recorder below from tests/
    return run_program(["fit", *args], env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests")})


def test_ddp_two_processes_train_store_each_pair_once_and_resume(tmp_path, server):
    root = tmp_path / "run"
    chat = server()  # a served teacher: rank 0 asks it, once per prompt
    teacher = ["--data.teacher=pbkd_lightning.data.OpenAITeacher", "--data.teacher.model=tiny", f"--data.teacher.base_url={chat.url}",
               f"--data.teacher.cache_dir={tmp_path}/api"]
    first = _fit(root, *teacher)
    assert first.returncode == 0, first.stderr[-3000:]
    groups = [json.loads(line) for line in (root / "buffer" / "iter_0000.jsonl").read_text().splitlines()]
    prompts = [g["prompt"] for g in groups]
    assert len(prompts) == 16 and len(set(prompts)) == 16  # sampled by two ranks, stored once
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary["student_final"]) == {"arithmetic", "reversal", "mean"}  # both tasks, reduced over ranks
    assert all(value == value for value in summary["student_final"].values())  # no NaN from a rank without a task
    ckpt = root / "checkpoints" / "last.ckpt"
    prompts_asked = [r["body"]["messages"][-1]["content"] for r in chat.requests]
    assert len(prompts_asked) == len(set(prompts_asked)) == 16 + 8  # training and held-out prompts, each asked once
    resumed = _fit(root, *teacher, "--trainer.max_epochs=2", f"--ckpt_path={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(chat.requests) == 16 + 8  # the resumed run asked nothing
    assert len([json.loads(line) for line in (root / "buffer" / "iter_0000.jsonl").read_text().splitlines()]) == 16
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout


def test_fsdp2_two_processes_shard_train_save_a_sharded_checkpoint_and_resume(tmp_path):
    root = tmp_path / "run"
    online = ["--config", f"{ROOT}/configs/online.yaml", f"--trainer.default_root_dir={root}"]  # the overlay names its own folder
    first = _fit(root, *online, "--trainer.max_epochs=1", strategy="fsdp")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard per rank
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(root / "student")  # gathered whole, a plain Hugging Face folder
    assert type(student).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in student.parameters()) > 10_000
    resumed = _fit(root, *online, "--trainer.max_epochs=2", f"--ckpt_path={ckpt}", strategy="fsdp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout
    assert sorted(p.name for p in (root / "buffer").iterdir()) == ["iter_0000.jsonl", "iter_0001.jsonl"]  # the first kept
    assert json.loads((root / "summary.json").read_text())["heldout_pref_acc_per_epoch"][-1]["epoch"] == 1


def test_fsdp2_two_processes_train_white_box_pbkd(tmp_path):
    root = tmp_path / "run"
    run = _fit(root, *TINY_TEACHER, f"--model.teacher.cache_dir={root}/cache", strategy="fsdp", config="configs/whitebox.yaml")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (root / "student" / "model.safetensors").exists() and len(list((root / "cache").glob("teacher-sft-*"))) == 1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_the_one_process_loss_on_the_same_global_batch(tmp_path, strategy):
    """SeqKD's first step: each rank's loss is its half's token sum over the global batch's token count (times the
    world size, as data parallelism averages), so their mean is exactly the one-process loss on the whole batch."""
    root = tmp_path / "run"
    run = _fit(root, "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.callbacks+=distributed_helpers.FirstBatchRecorder",
               f"--trainer.callbacks.path={tmp_path}/first", strategy=strategy, config="configs/baselines/seqkd.yaml")
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"first.rank{r}.json").read_text()) for r in (0, 1)]
    # one process, the same warmed-up student (from the run's cache), no training
    cli = run_cli("fit", *tiny_args(tmp_path / "single", f"--model.warmup.cache_dir={root}/cache", "--trainer.max_steps=0",
                                    config="configs/baselines/seqkd.yaml"))
    module, data = cli.model, cli.datamodule
    from pbkd_lightning.data.collate import StudentCollate
    from pbkd_lightning.objectives.base import Share

    teacher = {r["prompt"]: r["teacher"] for r in data.train_records}
    collate = StudentCollate(data.encoder(module.tokenizer))

    def loss(prompts):
        with torch.no_grad():
            batch = collate([{"prompt": p, "teacher": teacher[p]} for p in prompts])
            return float(module.objective.student_loss(module.players, batch, Share.whole(batch))["loss"]), float(batch.teacher.num_scored)

    assert len(ranks[0]["prompts"]) == len(ranks[1]["prompts"]) == 4 and not set(ranks[0]["prompts"]) & set(ranks[1]["prompts"])
    whole, total = loss(ranks[0]["prompts"] + ranks[1]["prompts"])
    for rank in ranks:
        half, tokens = loss(rank["prompts"])
        assert rank["loss"] == pytest.approx(half * tokens * 2 / total, rel=1e-5)
    assert sum(rank["loss"] for rank in ranks) / 2 == pytest.approx(whole, rel=1e-5)


def test_fsdp1_is_refused_with_a_pointer_to_fsdp2(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    from conftest import tiny_modules, tiny_trainer

    module, datamodule = tiny_modules(tmp_path)
    trainer = tiny_trainer(tmp_path / "run", max_steps=1)
    trainer.strategy._lightning_module = module
    module.trainer = trainer
    trainer.strategy.__class__ = FSDPStrategy  # what `--trainer.strategy=fsdp` gives (which needs CUDA to start)
    with pytest.raises(ValueError, match="configs/strategy/fsdp.yaml"):
        module.setup("fit")
