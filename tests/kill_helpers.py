"""``python -m kill_helpers fit ...``: the project's CLI, which SIGKILLs its own process at the moment named by
``$PBKD_TEST_KILL`` (tests/test_crash.py). A real kill: no exception, no ``finally``, no atexit, buffers unflushed.

Moments (``<moment>:<iteration or shard>``):
    sampling:N      after a few tokens of iteration N's sampling
    buffer:N        with half of iteration N's groups handed to the writer of its temporary file
    checkpoint:N    with half the bytes of last.ckpt (saved at the end of epoch N) in its temporary file
    cache-shard:N   with half of teacher-cache shard N written

``$PBKD_TEST_SHARD_SIZE`` sets the teacher cache's sequences per shard (the tiny runs have too few for two shards).
"""

import functools
import os
import signal
import sys


def _die(moment: str):
    print(f"kill_helpers: SIGKILL {moment}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _arm_sampling(iteration: int):
    from pbkd_lightning.data import generation
    from pbkd_lightning.data.datamodule import PreferenceDataModule

    make_iteration, draw_tokens = PreferenceDataModule._make_iteration, generation.draw_tokens

    def patched(self, number):
        if number != iteration:
            return make_iteration(self, number)
        draws = [0]

        def counting(*args, **kwargs):
            draws[0] += 1
            if draws[0] == 3:
                _die(f"while sampling iteration {iteration}")
            return draw_tokens(*args, **kwargs)

        generation.draw_tokens = counting
        try:
            return make_iteration(self, number)
        finally:
            generation.draw_tokens = draw_tokens

    PreferenceDataModule._make_iteration = patched


def _arm_buffer(iteration: int):
    from pbkd_lightning.data import datamodule

    write = datamodule.write_jsonl_atomic

    def patched(path, records):
        if not path.endswith(f"iter_{iteration:04d}.jsonl"):
            return write(path, records)
        records = list(records)

        def half_then_die():
            yield from records[: len(records) // 2]  # (what reached the disk of them depends on the file's buffer)
            _die(f"while writing {os.path.basename(path)} ({len(records) // 2} of {len(records)} groups sent)")

        return write(path, half_then_die())

    datamodule.write_jsonl_atomic = patched


def _arm_checkpoint(epoch: int):
    import io

    import torch
    from lightning.pytorch import Trainer

    save_checkpoint, torch_save, saving = Trainer.save_checkpoint, torch.save, [None]

    def tracking(self, filepath, *args, **kwargs):
        saving[0] = (os.path.basename(str(filepath)), self.current_epoch)
        try:
            return save_checkpoint(self, filepath, *args, **kwargs)
        finally:
            saving[0] = None

    def patched(obj, f, *args, **kwargs):  # the checkpoint's bytes, half of them on disk, then the kill
        if saving[0] != ("last.ckpt", epoch) or not isinstance(f, (str, os.PathLike)):
            return torch_save(obj, f, *args, **kwargs)
        data = io.BytesIO()
        torch_save(obj, data, *args, **kwargs)
        with open(f, "wb") as handle:
            handle.write(data.getvalue()[: len(data.getvalue()) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            _die(f"while saving last.ckpt at the end of epoch {epoch}")

    Trainer.save_checkpoint, torch.save = tracking, patched


def _arm_cache_shard(shard: int):
    from pbkd_lightning.data import teacher_cache

    save_file, calls = teacher_cache.save_file, [0]

    def patched(tensors, path, *args, **kwargs):  # the pass's (shard + 1)-th shard file: shard `shard` of a fresh pass
        calls[0] += 1
        save_file(tensors, path, *args, **kwargs)
        if calls[0] == shard + 1:
            with open(path, "r+b") as handle:  # half of it on disk, as a kill mid-write leaves it
                handle.truncate(os.path.getsize(path) // 2)
            _die(f"while writing teacher-cache shard {shard}")

    teacher_cache.save_file = patched


def _set_shard_size(size: int):
    from pbkd_lightning import build

    write = build.write_teacher_cache
    build.write_teacher_cache = functools.partial(write, shard_size=size)


ARMS = {"sampling": _arm_sampling, "buffer": _arm_buffer, "checkpoint": _arm_checkpoint, "cache-shard": _arm_cache_shard}

if __name__ == "__main__":
    if os.environ.get("PBKD_TEST_SHARD_SIZE"):
        _set_shard_size(int(os.environ["PBKD_TEST_SHARD_SIZE"]))
    if os.environ.get("PBKD_TEST_KILL"):
        moment, _, number = os.environ["PBKD_TEST_KILL"].partition(":")
        ARMS[moment](int(number))
    from pbkd_lightning.cli import main

    main()
