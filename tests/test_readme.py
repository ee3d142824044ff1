"""The README's Python example runs as written (in a scratch folder)."""

import os
import re

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_readme_python_api_example_fits(tmp_path, monkeypatch, capsys):
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Python API") :]
    [code] = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ", 5)], flags=re.S)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    module = namespace["module"]
    assert set(module.summary["student_final"]) == {"arithmetic", "distinct", "reversal", "mean"}
    assert (tmp_path / "runs" / "api" / "summary.json").exists() and (tmp_path / "runs" / "api" / "student").is_dir()
    assert "'mean'" in capsys.readouterr().out
