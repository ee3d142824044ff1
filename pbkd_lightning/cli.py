"""``python -m pbkd_lightning fit|validate|test|predict --config ...``: LightningCLI with omegaconf configs;
``python -m pbkd_lightning export --ckpt_path ... --out ...``: the student as a Hugging Face folder."""

import os
import sys
import warnings

# Everything runs offline: models are local folders, never downloads. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# The frozen reference model is in eval mode on purpose; Lightning warns about any such module.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
# Under DDP a rank may hold no held-out sample of a task; its metric is then computed (and synced) empty on purpose.
warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from pbkd_lightning.data.datamodule import PreferenceDataModule  # noqa: E402
from pbkd_lightning.data.records import DataError  # noqa: E402
from pbkd_lightning.module import DistillationModule  # noqa: E402

DEFAULT_ROOT = os.path.join("runs", "default")


class DistillationCLI(LightningCLI):
    """Checkpoints go to ``<default_root_dir>/checkpoints`` (``last.ckpt`` included) and TensorBoard
    events to ``<default_root_dir>/tensorboard`` unless the config names its own."""

    def instantiate_trainer(self, **kwargs):
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        root = config.get("default_root_dir") or DEFAULT_ROOT
        config["default_root_dir"] = root
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), save_last=True))
        config["callbacks"] = callbacks
        if config.get("logger") in (None, True):
            config["logger"] = TensorBoardLogger(root, name="tensorboard", default_hp_metric=False)
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        return self._instantiate_trainer(config, extra)


def build_cli(args=None, run: bool = True) -> DistillationCLI:
    """The CLI exactly as ``python -m pbkd_lightning`` builds it (``args``: its arguments, None = ``sys.argv``);
    ``run=False`` only instantiates the trainer, model and data module. Benchmarks and tests call it in-process."""
    return DistillationCLI(
        DistillationModule,
        PreferenceDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:  # not a Trainer method, so not a LightningCLI subcommand
        from pbkd_lightning.export import main as export_main

        return export_main(argv[1:])
    try:
        build_cli(args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
