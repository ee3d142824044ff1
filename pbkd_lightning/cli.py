"""``python -m pbkd_lightning fit|validate|test|predict --config ...``: LightningCLI with omegaconf configs;
``python -m pbkd_lightning export --ckpt_path ... --out ...``: the student as a Hugging Face folder."""

import os
import re
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

from pbkd_lightning.callbacks import AtomicCheckpointIO  # noqa: E402
from pbkd_lightning.data.datamodule import PreferenceDataModule  # noqa: E402
from pbkd_lightning.data.records import DataError  # noqa: E402
from pbkd_lightning.sequences import PromptError  # noqa: E402
from pbkd_lightning.data.api import APIError  # noqa: E402
from pbkd_lightning.module import DistillationModule  # noqa: E402

DEFAULT_ROOT = os.path.join("runs", "default")

# A config file may build on others: its first line ``# extends: base.yaml [other.yaml ...]`` (paths relative to the
# file). jsonargparse has no include, so each ``--config FILE`` is expanded, before parsing, into a ``--config`` per
# file it extends (bases first, recursively) followed by FILE itself; later files win, as with several --config.
# Each file is read once on a command line, at its first place, so an overlay that shares a base with the method
# it is added to does not re-apply (and undo) that base.
_EXTENDS = re.compile(r"#\s*extends:(.*)")


class ConfigError(Exception):
    """An ``# extends:`` line names a file that does not exist, or files extend each other in a cycle."""


def _bases(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        match = _EXTENDS.match(handle.readline().strip())
    names = re.split(r"[\s,]+", match.group(1).strip()) if match else []
    return [os.path.normpath(os.path.join(os.path.dirname(path), name)) for name in names if name]


def _chain(path: str, seen: set, parents: tuple = ()) -> list[str]:
    """``path`` preceded by the files it extends, recursively; files already in ``seen`` are left out (and the
    returned ones added to it). ``parents``: the files whose ``# extends:`` led here, to name a cycle."""
    key = os.path.realpath(path)
    if key in [os.path.realpath(p) for p in parents]:
        raise ConfigError(f"{path}: '# extends:' cycle: {' -> '.join((*parents, path))}")
    if key in seen:
        return []
    chain = []
    for base in _bases(path):
        if not os.path.isfile(base):
            raise ConfigError(f"{path}: '# extends:' names {base}, which does not exist")
        chain += _chain(base, seen, (*parents, path))
    seen.add(key)
    return [*chain, path]


def expand_extends(args) -> list[str]:
    """Command-line arguments with each ``--config FILE`` (``-c FILE``, ``--config=FILE``) replaced by the
    ``--config`` arguments of FILE's chain (see ``_EXTENDS``). Everything else is kept as given."""
    args, out, seen, i = list(args), [], set(), 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args):
            value, i = str(args[i + 1]), i + 2
        elif isinstance(arg, str) and arg.startswith("--config="):
            value, i = arg[len("--config="):], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        # not a file (a YAML string, a typo): jsonargparse's to accept or refuse
        for path in _chain(value, seen) if os.path.isfile(value) else [value]:
            out += ["--config", path]
    return out


def continue_tensorboard_run(logger) -> None:
    """A resumed fit (``fit --ckpt_path=...``) logs on in the TensorBoard run it continues: a ``TensorBoardLogger``
    given no ``version`` takes the newest ``version_N`` already under its folder instead of starting ``version_N+1``
    (TensorBoard joins the event files; the steps go on from the checkpoint's). The checkpoint does not record which
    run wrote it, so the newest is taken; ``version=`` on the logger picks another. Other loggers are left as they
    are: a ``CSVLogger`` reusing a version folder would delete that folder's ``metrics.csv``, so it starts a new one."""
    if isinstance(logger, TensorBoardLogger) and logger._version is None:
        following = logger._get_next_version()
        if following > 0:
            logger._version = following - 1


class DistillationCLI(LightningCLI):
    """Checkpoints go to ``<default_root_dir>/checkpoints`` (``last.ckpt`` included; none with
    ``--trainer.enable_checkpointing=false``) and TensorBoard
    events to ``<default_root_dir>/tensorboard`` unless the config names its own loggers (``--trainer.logger``: one or
    a list, e.g. TensorBoard and CSV); a resumed fit continues the same TensorBoard run (``continue_tensorboard_run``).
    Config files may ``# extends:`` others (``expand_extends``)."""

    def parse_arguments(self, parser, args):
        if args is None:  # the command line: parse the expanded sys.argv here, as handing it to super() as args warns
            self.config = parser.parse_args(expand_extends(sys.argv[1:]))
        else:
            super().parse_arguments(parser, expand_extends(args) if isinstance(args, (list, tuple)) else args)

    def instantiate_trainer(self, **kwargs):
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        root = config.get("default_root_dir") or DEFAULT_ROOT
        config["default_root_dir"] = root
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_checkpointing", True) is not False and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), save_last=True))
        config["callbacks"] = callbacks
        if not config.get("plugins"):  # a user's own plugins are left as they are
            config["plugins"] = [AtomicCheckpointIO()]
        if config.get("logger") in (None, True):
            config["logger"] = TensorBoardLogger(root, name="tensorboard", default_hp_metric=False)
        if self.subcommand == "fit" and self._get(self.config, "ckpt_path") is not None:
            loggers = config["logger"] if isinstance(config["logger"], (list, tuple)) else [config["logger"]]
            for each in loggers:
                continue_tensorboard_run(each)
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
    except (DataError, ConfigError, PromptError, APIError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
