"""configs/: the `# extends:` chains, every key real and every comment true to the code, and every method config
trains two steps at toy size (configs/real/*: test_real_configs.py; configs/smollm2.yaml: test_real_teacher.py)."""

import contextlib
import functools
import glob
import importlib
import inspect
import io
import operator
import os
import re
import sys
import types
import typing
from dataclasses import MISSING, fields, is_dataclass

import pytest
import yaml

from conftest import ROOT, TINY_TEACHER, run_cli, scalars, tiny_args
from programs import run_program

CONFIGS = os.path.join(ROOT, "configs")
# Add-on overlays: used on top of a method's config, so checked on top of configs/blackbox.yaml.
HOSTED = {"online.yaml", "teacher_model.yaml", "strategy/ddp.yaml", "strategy/fsdp.yaml"}
# The embedded methods; a new baseline under configs/baselines/ is picked up. divergence.yaml is their shared base.
METHODS = ["blackbox.yaml", "whitebox.yaml", "xkd.yaml", *sorted(
    os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "baselines", "*.yaml")) if not p.endswith("divergence.yaml"))]


def config_files():
    return sorted(os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))


def used_with(name):
    """The ``--config`` files ``name`` is run with."""
    host = [os.path.join(CONFIGS, "blackbox.yaml")] if name in HOSTED else []
    return (*host, os.path.join(CONFIGS, name))


@functools.lru_cache(maxsize=None)
def printed(files):
    """``fit --config F... --print_config``, loaded."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        run_cli("fit", *(a for f in files for a in ("--config", f)), "--print_config")
    assert done.value.code in (0, None), err.getvalue()[-2000:]  # a key no class takes fails the parse
    return yaml.safe_load(out.getvalue())


def dotted(tree, prefix=""):
    """Every key of a nested mapping, as dotted paths (parents included)."""
    keys = set()
    for key, value in (tree or {}).items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= dotted(value, f"{prefix}{key}.")
    return keys


_LINE = re.compile(r"^( *)([A-Za-z_]\w*):(?: +([^#\s][^#]*?))?\s*(?:#\s?(.*))?$")


def keyed_lines(path):
    """``(dotted key, value text or None for a mapping, comment or None)`` per key line of a YAML file."""
    stack, rows = [], []
    with open(path, encoding="utf-8") as handle:
        for text in handle:
            match = _LINE.match(text.rstrip("\n"))
            if not match:
                continue  # blank or comment-only
            indent, key, value, comment = len(match[1]), match[2], match[3], match[4]
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, key))
            rows.append((".".join(k for _, k in stack), value, comment))
    return rows


def type_text(kind) -> str:
    """A type annotation as the comments write it: ``int > 0``, ``float in (0, 1]``, ``nf4 | int8 | null``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_text(a) for a in args)
    if origin is list:
        return f"list[{type_text(args[0])}]"
    restrictions = getattr(kind, "_restrictions", None)  # jsonargparse's restricted numbers (PositiveInt, ...)
    if restrictions:
        base, signs = kind._type.__name__, {operator.gt: ">", operator.ge: "≥", operator.lt: "<", operator.le: "≤"}
        if len(restrictions) == 1:
            (op, bound), = restrictions
            return f"{base} {signs[op]} {bound}"
        (low_op, low), (high_op, high) = restrictions
        return f"{base} in {'(' if low_op is operator.gt else '['}{low}, {high}{')' if high_op is operator.lt else ']'}"
    return kind.__name__


def value_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    return str(value)


def _parameters(kind):
    """``{name: (annotation, default or MISSING)}`` of a dataclass's fields or a class's constructor."""
    if is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return {f.name: (hints[f.name], f.default if f.default is not MISSING else
                         f.default_factory() if f.default_factory is not MISSING else MISSING) for f in fields(kind) if f.init}
    hints = typing.get_type_hints(kind.__init__)
    return {n: (hints.get(n), MISSING if p.default is inspect.Parameter.empty else p.default)
            for n, p in inspect.signature(kind.__init__).parameters.items() if n not in ("self", "args", "kwargs")}


def _unwrap(kind):
    """The class inside ``Optional[X]``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1 else kind


def _class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def expected_comment(key: str, config: dict):
    """``"<type>, default <value>"`` for a ``model.*``/``data.*`` key, from the code (the classes the merged
    ``config`` names for ``class_path`` keys); None for keys it does not cover (trainer, class_path)."""
    from pbkd_lightning.cli import DistillationModule, PreferenceDataModule

    parts = key.split(".")
    if parts[0] not in ("model", "data") or len(parts) < 2 or parts[-1] == "class_path":
        return None
    kind, default, node = (DistillationModule if parts[0] == "model" else PreferenceDataModule), MISSING, config[parts[0]]
    i = 1
    while i < len(parts):
        if parts[i] == "init_args":  # a class named by the merged config's class_path
            kind, default, node, i = _class(node["class_path"]), MISSING, node["init_args"], i + 1
        if i == len(parts):
            return None
        owner, owner_default = _unwrap(kind), default
        kind, default = _parameters(owner)[parts[i]]
        if owner_default is not MISSING and owner_default is not None:  # e.g. OptimizerConfig(lr=1e-3) as the default
            default = getattr(owner_default, parts[i])
        node = node.get(parts[i]) if isinstance(node, dict) else None
        i += 1
    return f"{type_text(kind)}, " + ("required" if default is MISSING else f"default {value_text(default)}")


def chain_of(name):
    from pbkd_lightning.cli import expand_extends

    return expand_extends(a for f in used_with(name) for a in ("--config", f))[1::2]


@pytest.mark.parametrize("name", config_files())
def test_every_key_is_a_real_key_and_every_comment_gives_the_codes_type_and_default(name):
    path = os.path.join(CONFIGS, name)
    rows = keyed_lines(path)
    with open(path, encoding="utf-8") as handle:
        assert {k for k, _, _ in rows} == dotted(yaml.safe_load(handle)), "keyed_lines misread the file"
    config = printed(used_with(name))
    assert not (unknown := {k for k, _, _ in rows} - dotted(config)), f"not in --print_config: {sorted(unknown)}"
    wrong = []
    for key, value, comment in rows:
        expected = expected_comment(key, config) if value is not None else None
        if expected and not (comment or "").startswith(expected):
            wrong.append(f"{key}: {value}  # {comment}  (expected '# {expected}…')")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", METHODS)
def test_method_chains_write_every_model_and_data_key(name):
    """The embedded methods' files together list every model and data setting --print_config has."""
    config, written = printed(used_with(name)), set()
    for path in chain_of(name):
        with open(path, encoding="utf-8") as handle:
            written |= dotted(yaml.safe_load(handle))
    leaves = {k for k in dotted(config) if k.split(".")[0] in ("model", "data")
              and not any(other.startswith(k + ".") for other in dotted(config))}
    assert not (missing := sorted(leaves - written)), f"{name}: not in {chain_of(name)}: {missing}"


def test_a_method_expands_to_its_bases_first_each_once():
    chain = [os.path.relpath(p, CONFIGS) for p in chain_of("baselines/gkd.yaml")]
    assert chain == ["base.yaml", "teacher_model.yaml", "baselines/divergence.yaml", "baselines/gkd.yaml"]
    # an overlay that shares a base with the method does not re-apply it (which would undo the method's values)
    from pbkd_lightning.cli import expand_extends

    blackbox, base = os.path.join(CONFIGS, "blackbox.yaml"), os.path.join(CONFIGS, "base.yaml")
    assert expand_extends(["fit", f"--config={blackbox}", "-c", base, "--data.seed=3"]) == \
        ["fit", "--config", base, "--config", blackbox, "--data.seed=3"]
    assert printed((blackbox, os.path.join(CONFIGS, "online.yaml")))["data"]["sample_pairs"] is True


def test_extends_errors_are_one_line_naming_the_file(tmp_path):
    from pbkd_lightning.cli import ConfigError, expand_extends

    (tmp_path / "a.yaml").write_text("# extends: sub/b.yaml\nseed_everything: 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("# extends: ../a.yaml\n")  # relative to b.yaml's folder: a cycle
    with pytest.raises(ConfigError, match=r"a\.yaml: '# extends:' cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        expand_extends(["--config", str(tmp_path / "a.yaml")])
    (tmp_path / "c.yaml").write_text("# extends: nowhere.yaml\n")
    result = run_program(["fit", "--config", str(tmp_path / "c.yaml")], timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path}/c.yaml: '# extends:' names {tmp_path}/nowhere.yaml, which does not exist"


def test_the_command_line_expands_extends_and_prints_the_whole_config():
    result = run_program(["fit", "--config", "configs/baselines/gkd.yaml", "--print_config"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert "args parameter" not in result.stderr  # LightningCLI warns when given args and sys.argv both
    printed_config = yaml.safe_load(result.stdout)
    assert printed_config == printed((os.path.join(CONFIGS, "baselines/gkd.yaml"),))
    assert printed_config["model"]["teacher"]["layers"] == 4 and printed_config["trainer"]["max_epochs"] == 4


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # one warm-up and one tiny teacher for all the fits below


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_method_config_trains_two_steps_at_toy_size(tmp_path, shared_cache, name):
    teacher = [*TINY_TEACHER, f"--model.teacher.cache_dir={shared_cache}"] if printed(used_with(name))["model"]["teacher"] else []
    cli = run_cli("fit", *tiny_args(tmp_path / "run", *teacher, f"--model.warmup.cache_dir={shared_cache}",
                                    "--trainer.max_steps=2", "--trainer.limit_val_batches=0", config=f"configs/{name}"))
    assert cli.trainer.global_step >= 2  # optimizer steps: black-box PbKD takes 4 critic steps on its first batch
    assert all(n == 0 for n in cli.model.nonfinite_skips.values())
    logged = scalars(tmp_path / "run")
    if "DivergenceKD" in repr(cli.model.objective):  # a divergence baseline: its loss, per step, never negative
        assert len(logged["student/divergence"]) == 2 and all(v >= 0 for v in logged["student/divergence"])
        if name.endswith("gkd.yaml"):  # λ = 0.5: the draws are logged, each batch either on- or off-policy
            assert set(logged["student/on_policy"]) <= {0.0, 1.0}
