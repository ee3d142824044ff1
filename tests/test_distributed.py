"""Two processes on CPU (gloo): DDP through configs/strategy/ddp.yaml."""

import json
import subprocess
import sys

from conftest import ROOT, tiny_args


def _fit(root, *extra):
    args = tiny_args(root, "--config", f"{ROOT}/configs/strategy/ddp.yaml", "--trainer.devices=2", "--model.num_threads=1",
                     "--model.objective.critic_warmup_steps=0", *extra)
    # Lightning relaunches the command line for rank 1, so this runs as its own program, not in pytest's process
    return subprocess.run([sys.executable, "-m", "pbkd_lightning", "fit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_ddp_two_processes_train_store_each_pair_once_and_resume(tmp_path):
    root = tmp_path / "run"
    first = _fit(root)
    assert first.returncode == 0, first.stderr[-3000:]
    groups = [json.loads(line) for line in (root / "buffer" / "iter_0000.jsonl").read_text().splitlines()]
    prompts = [g["prompt"] for g in groups]
    assert len(prompts) == 16 and len(set(prompts)) == 16  # sampled by two ranks, stored once
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary["student_final"]) == {"arithmetic", "reversal", "mean"}  # both tasks, reduced over ranks
    assert all(value == value for value in summary["student_final"].values())  # no NaN from a rank without a task
    ckpt = root / "checkpoints" / "last.ckpt"
    resumed = _fit(root, "--trainer.max_epochs=2", f"--ckpt_path={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len([json.loads(line) for line in (root / "buffer" / "iter_0000.jsonl").read_text().splitlines()]) == 16
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout
