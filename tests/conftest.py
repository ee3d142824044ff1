import glob
import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # two tests' worth of threads on a 2-core CI machine only slows both down

# The tests of 15-60 s each (a real 135M model, two-process fits, the quick bench): run first, so that with two
# workers (make test) neither ends the suite alone on one of them while the other is idle.
LONG_TESTS = ("test_real_teacher.py::", "test_distributed.py::", "test_crash.py::", "test_bench_quick_", "test_two_data_parallel_processes")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not any(name in item.nodeid for name in LONG_TESTS))  # stable: else collection order


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TEACHER = ["--model.teacher.layers=1", "--model.teacher.hidden=64", "--model.teacher.heads=2", "--model.teacher.train_steps=20"]


def tiny_args(root, *extra, config="configs/blackbox.yaml"):
    """CLI arguments for a seconds-long fit of the default config at toy size."""
    return [
        "--config", os.path.join(ROOT, config),
        f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        "--model.student.layers=1",
        "--model.student.hidden=32",
        "--model.student.heads=2",
        "--model.warmup.steps=5",
        f"--model.warmup.cache_dir={root}/cache",
        "--data.tasks=[arithmetic,reversal]",
        "--data.train_size=8",
        "--data.val_size=4",
        "--data.samples_per_prompt=2",
        "--data.batch_size=4",
        "--data.critic_batch_size=8",
        "--data.generation.max_new_tokens=12",
        "--model.val_generation.max_new_tokens=12",
        *extra,
    ]


def run_cli(*args):
    """Run ``python -m pbkd_lightning`` in this process (the CLI exactly as ``main`` builds it); returns the CLI object."""
    from pbkd_lightning.cli import build_cli

    return build_cli(list(args))


def whitebox_fit(root, *extra, config="configs/whitebox.yaml"):
    """A white-box fit at toy size with the tiny embedded teacher (trained once into the run's cache)."""
    return run_cli("fit", *tiny_args(root, *TINY_TEACHER, f"--model.teacher.cache_dir={root}/cache", *extra, config=config))


@pytest.fixture
def tiny_fit(tmp_path):
    def fit(*extra, config="configs/blackbox.yaml", root=None):
        return run_cli("fit", *tiny_args(root or tmp_path / "run", *extra, config=config))

    return fit


def tiny_modules(root, objective=None, online=False, **data_kwargs):
    """The Python API at toy size: ``(module, datamodule)``."""
    from pbkd_lightning.data import GenerationConfig, PreferenceDataModule
    from pbkd_lightning.models import ModelSpec
    from pbkd_lightning.module import DistillationModule
    from pbkd_lightning.objectives import BlackBoxPbKD
    from pbkd_lightning.models.warmup import WarmupConfig

    module = DistillationModule(
        objective=objective or BlackBoxPbKD(critic_warmup_steps=0),
        student=ModelSpec(layers=1, hidden=32, heads=2),
        warmup=WarmupConfig(steps=5, cache_dir=os.path.join(root, "cache")),
        val_generation=GenerationConfig(max_new_tokens=12, temperature=0.0),
    )
    settings = dict(tasks=["arithmetic", "reversal"], train_size=8, val_size=4, samples_per_prompt=2, batch_size=4, critic_batch_size=8,
                    generation=GenerationConfig(max_new_tokens=12), online=online)
    settings.update(data_kwargs)
    return module, PreferenceDataModule(**settings)


def tiny_trainer(root, callbacks=(), online=False, **kwargs):
    from lightning.pytorch import Trainer

    settings = dict(default_root_dir=str(root), max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, log_every_n_steps=1, callbacks=list(callbacks), accelerator="cpu",
                    reload_dataloaders_every_n_epochs=1 if online else 0)
    settings.update(kwargs)
    return Trainer(**settings)


def scalars(root, folder="tensorboard", version=None):
    """Logged scalars of the run in ``root`` (``folder``: the CLI's ``tensorboard`` or Lightning's default; ``version``:
    which of several, e.g. a resumed run's)."""
    accumulator = _events(root, folder, version)
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def scalar_steps(root, folder="tensorboard", version=None):
    """The x value (step) of each logged scalar of the run in ``root``, by tag."""
    accumulator = _events(root, folder, version)
    return {tag: [e.step for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def _events(root, folder, version):
    [events] = glob.glob(os.path.join(root, folder, "version_*" if version is None else f"version_{version}"))
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    return accumulator


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def checksum(model):
    return sum(p.detach().double().sum().item() for p in model.parameters())


@pytest.fixture
def server(monkeypatch):
    """``server(judge=..., faults=..., delay_s=...)`` starts an OpenAI-compatible server on 127.0.0.1
    (tests/api_server.py); every one started is shut down after the test."""
    from api_server import ChatServer

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy in the environment is not between these tests and the server
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    started = []

    def start(**kwargs):
        started.append(ChatServer(**kwargs))
        return started[-1]

    yield start
    for running in started:
        running.close()
