"""The package's layers: cli → module → objectives → losses, with data, models and the sequence layer below, and
no import back up (checked on the source, so a new import that breaks the order fails here)."""

import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "pbkd_lightning")

# What each part may import from the package (besides itself). Everything not listed sits above all of these.
ALLOWED = {
    "sequences": set(),
    "losses": set(),
    "config": set(),
    "parallel": set(),
    "tasks": set(),
    "models": {"config", "losses", "sequences", "parallel"},
    "data": {"config", "losses", "sequences", "parallel", "models", "tasks"},
    "eval": {"data", "tasks", "sequences"},
    "players": {"data", "losses", "models", "parallel", "sequences"},
    "objectives": {"config", "data", "losses", "sequences"},
    "optim": {"config"},
}


def _imports(path: str) -> list[tuple[str, bool]]:
    """``(first part of the imported pbkd_lightning module, imported inside a function)`` for each import."""
    tree = ast.parse(open(path).read())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("pbkd_lightning."):
                found.append((child.module.split(".")[1], in_function))
            elif isinstance(child, ast.Import):
                found.extend((a.name.split(".")[1], in_function) for a in child.names if a.name.startswith("pbkd_lightning."))
            visit(child, nested)

    visit(tree, False)
    return found


def _parts():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                part = os.path.relpath(path, PACKAGE).split(os.sep)[0].removesuffix(".py")
                yield part, path


def test_no_layer_imports_one_above_it():
    wrong = [(os.path.relpath(path, ROOT), target) for part, path in _parts() if part in ALLOWED
             for target, _ in _imports(path) if target != part and target not in ALLOWED[part]]
    assert wrong == []


def test_data_and_models_do_not_import_each_other_both_ways():
    data = {t for part, path in _parts() if part == "data" for t, _ in _imports(path)}
    models = {t for part, path in _parts() if part == "models" for t, _ in _imports(path)}
    assert not ("models" in data and "data" in models)


def test_no_import_inside_a_function_reaches_up():
    """Imports in a function body are only for optional or heavy packages, never to dodge a cycle in the package."""
    inside = [(os.path.relpath(path, ROOT), target) for part, path in _parts() for target, nested in _imports(path)
              if nested and part in ALLOWED and target not in ALLOWED[part] | {part}]
    assert inside == []
