"""Real SIGKILLs (tests/kill_helpers.py) at the moments a crash could lose or corrupt something: while sampling, while a
buffer iteration is written, while a checkpoint is saved, while a teacher-cache shard is written. Each killed run
resumes, and ends where the uninterrupted run ends."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_TEACHER, tiny_args
from programs import run_program

pytestmark = pytest.mark.slow


def _run(root, *extra, kill="", shard_size="", config="configs/blackbox.yaml"):
    args = tiny_args(root, "--model.num_threads=1", "--trainer.enable_model_summary=false", *extra, config=config)
    return run_program(["fit", *args], module="kill_helpers", env={**os.environ, "PBKD_TEST_KILL": kill, "PBKD_TEST_SHARD_SIZE": shard_size})


def _killed(run, moment):
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert f"kill_helpers: SIGKILL {moment}" in run.stderr


def _finished(run):
    assert run.returncode == 0, run.stderr[-3000:]


def _buffer(root):
    return {path.name: [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((root / "buffer").glob("iter_*.jsonl"))}


def test_online_fit_killed_while_sampling_writing_the_buffer_and_saving_a_checkpoint_resumes_to_the_same_end(tmp_path):
    def online(root, *extra, **kw):
        return _run(root, "--config", f"{ROOT}/configs/online.yaml", f"--trainer.default_root_dir={root}", "--trainer.max_epochs=2",
                    "--model.objective.critic_warmup_steps=0", f"--model.warmup.cache_dir={tmp_path}/cache", *extra, **kw)

    reference = tmp_path / "uninterrupted"
    _finished(online(reference))

    root, last = tmp_path / "killed", tmp_path / "killed" / "checkpoints" / "last.ckpt"
    _killed(online(root, kill="sampling:1"), "while sampling iteration 1")
    assert list(_buffer(root)) == ["iter_0000.jsonl"] and last.is_file()

    _killed(online(root, f"--ckpt_path={last}", kill="buffer:1"), "while writing iter_0001.jsonl")
    assert list(_buffer(root)) == ["iter_0000.jsonl"]  # the interrupted iteration is not under its name
    assert list((root / "buffer").glob(".tmp-*"))  # its temporary file is on disk, where no reader looks

    _killed(online(root, f"--ckpt_path={last}", kill="checkpoint:1"), "while saving last.ckpt at the end of epoch 1")
    assert list(_buffer(root)) == ["iter_0000.jsonl", "iter_0001.jsonl"]
    assert torch.load(last, weights_only=False, map_location="cpu")["epoch"] == 0  # the previous last.ckpt, whole
    assert list((root / "checkpoints").glob(".tmp-*.ckpt"))  # beside it, the half-written new one

    _finished(online(root, f"--ckpt_path={last}"))
    assert not list((root / "buffer").glob(".tmp-*")) and not list((root / "checkpoints").glob(".tmp-*"))  # cleared
    assert _buffer(root) == _buffer(reference)  # no pair lost, none twice, every sample as the uninterrupted run drew it
    resumed, uninterrupted = load_file(root / "student" / "model.safetensors"), load_file(reference / "student" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_a_teacher_cache_killed_mid_shard_resumes_at_that_shard_and_equals_an_uninterrupted_one(tmp_path):
    def cached(root, cache, **kw):
        return _run(root, *TINY_TEACHER, f"--model.teacher.cache_dir={tmp_path}/teacher", f"--data.teacher_cache={cache}",
                    "--data.teacher_cache_k=8", "--trainer.max_steps=1", shard_size="4", config="configs/baselines/fkl.yaml", **kw)

    _finished(cached(tmp_path / "first", tmp_path / "whole"))
    cache = tmp_path / "resumed"
    _killed(cached(tmp_path / "killed", cache, kill="cache-shard:2"), "while writing teacher-cache shard 2")
    assert [s["file"] for s in json.loads((cache / "index.json").read_text())["shards"]] == ["shard_00000.safetensors",
                                                                                             "shard_00001.safetensors"]
    assert list(cache.glob(".tmp-*")) and not (cache / "shard_00002.safetensors").exists()  # half a shard, unnamed
    kept = {name: (cache / name).stat().st_mtime_ns for name in ("shard_00000.safetensors", "shard_00001.safetensors")}
    _finished(cached(tmp_path / "again", cache))
    assert {name: (cache / name).stat().st_mtime_ns for name in kept} == kept  # the finished shards were not redone
    whole = json.loads((tmp_path / "whole" / "index.json").read_text())
    assert json.loads((cache / "index.json").read_text())["shards"] == whole["shards"] and len(whole["shards"]) == 4
    for shard in whole["shards"]:
        a, b = load_file(cache / shard["file"]), load_file(tmp_path / "whole" / shard["file"])
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert not list(cache.glob(".tmp-*"))
