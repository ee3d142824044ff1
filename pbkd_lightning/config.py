"""Value checks shared by the CLI and the Python API.

Config fields are annotated with jsonargparse's restricted types (``PositiveInt``,
``OpenUnitInterval``, ...) or ``Literal``: the CLI rejects a bad value at parse time naming
the full key (``model.objective.beta``). The same annotations are checked again here when a
class is built from Python, so both routes refuse the same values.
"""

import dataclasses
import inspect
import json
from typing import Literal, get_args, get_origin

from jsonargparse.typing import restricted_number_type

TopP = restricted_number_type("TopP", float, [(">", 0), ("<=", 1)])
AboveHalfBelowOne = restricted_number_type("AboveHalfBelowOne", float, [(">", 0.5), ("<", 1)])
"""An accuracy strictly better than chance and below certainty, in (0.5, 1)."""


def check(name: str, kind, value) -> None:
    """Raise ValueError naming ``name`` when ``value`` is outside what ``kind`` allows."""
    if value is None:
        return
    if get_origin(kind) is Literal:
        if value not in get_args(kind):
            raise ValueError(f"`{name}` must be one of {list(get_args(kind))}, got {value!r}")
    elif isinstance(kind, type) and issubclass(kind, (int, float)) and kind not in (int, float, bool):
        try:
            kind(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"`{name}`: {error}") from None


def class_spec(instance) -> dict:
    """``{"class_path", "init_args"}`` of an object whose constructor arguments are kept as attributes of
    the same names: the form LightningCLI parses, so a checkpoint's hyperparameters can be read back."""
    kind = type(instance)
    names = [n for n in inspect.signature(kind.__init__).parameters if n != "self"]
    return {
        "class_path": f"{kind.__module__}.{kind.__qualname__}",
        "init_args": {n: getattr(instance, n) for n in names if hasattr(instance, n)},
    }


def plain(values: dict) -> dict:
    """Hyperparameters as plain JSON types (dataclasses to dicts, objects to their class spec, restricted
    numbers to int/float), so checkpoints load with ``torch.load(weights_only=True)``."""

    def convert(value):
        # A dataclass picked by class_path (an objective) keeps its class; a plain config dataclass is its fields.
        if dataclasses.is_dataclass(value) and not getattr(value, "picked_by_class_path", False):
            return dataclasses.asdict(value)
        return class_spec(value)

    return json.loads(json.dumps(values, default=convert))


def validate_fields(instance, key: str = "") -> None:
    """Check every annotated field of a dataclass instance (call from ``__post_init__``); errors name ``key`` +
    the field (e.g. ``model.objective.init_args.beta``). Restricted numbers are stored as plain int/float, so
    they pickle into checkpoints and optimizer states as such."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        check(key + field.name, field.type, value)
        kind = field.type
        if value is not None and isinstance(kind, type) and issubclass(kind, (int, float)) and kind not in (int, float, bool):
            setattr(instance, field.name, int(value) if issubclass(kind, int) else float(value))
