import json
import subprocess
import sys

from conftest import ROOT


def test_divergence_memory_benchmark_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "memory.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/divergence_memory.py", "--quick", "--threads=1", f"--json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    [row] = json.loads(out.read_text())
    assert row["naive"]["loss"] == row["chunked"]["loss"] or abs(row["naive"]["loss"] - row["chunked"]["loss"]) < 1e-4
    assert row["memory_ratio"] == row["chunked"]["peak_extra_mb"] / row["naive"]["peak_extra_mb"]
    assert "memory ×" in result.stdout
