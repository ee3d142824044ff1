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


def check_bench_output(folder):
    """RESULTS.md, results.json and the plots exist, and every table figure is the JSON's."""
    text = (folder / "RESULTS.md").read_text()
    figures = json.loads((folder / "results.json").read_text())
    for plot in ("learning_curves", "quality", "ablations", "pbkd", "scaling"):
        assert (folder / "plots" / f"{plot}.png").stat().st_size > 1000
    lines = [line for line in text.splitlines() if line.startswith("| ")]

    def row_of(name, marker):
        [line] = [line for line in lines if line.startswith(f"| {name} | ") and marker(line)]
        return line

    for name, row in figures["quality"].items():  # every method, its mean ± std as the JSON has it
        mean, std = row["tasks"]["mean"]
        assert f"{mean:.3f} ± {std:.3f}" in row_of(name, lambda line: "±" in line and line.count("|") > 6)
        assert len(row["curve"]) == figures["size"]["epochs"] + 1
    pbkd = figures["pbkd"]
    seqkd = pbkd["rows"]["SeqKD, same epochs"]["tasks"]["mean"][0]
    assert list(pbkd["rows"])[1:-1] == pbkd["variants"] and len(pbkd["rows"]) == len(pbkd["variants"]) + 2
    for label, row in pbkd["rows"].items():  # issue 8's table: each row's mean, its difference to SeqKD, its wall time
        mean, std = row["tasks"]["mean"]
        assert f"| {label} | " in text and f"| {mean:.3f} ± {std:.3f} | {mean - seqkd:+.3f} |" in row_of(label, lambda line: True)
    assert f"Best PbKD row: **{pbkd['best']}**" in text
    for name, row in figures["speed"]["steps"].items():  # library, baseline and their ratio from one run
        assert row["ratio"] == row["library_steps_per_s"] / row["manual_steps_per_s"]
        expected = f"| {name} | {row['library_steps_per_s']:.2f} | {row['manual_steps_per_s']:.2f} | {row['ratio']:.2f} |"
        assert expected in lines
    sampling = figures["speed"]["sampling"]
    assert f"| {sampling['library_tokens_per_s']:.0f} | {sampling['plain_tokens_per_s']:.0f} | {sampling['ratio']:.2f} |" in text
    for row in figures["speed"]["divergence"]:
        assert f"| {row['time_ratio']:.2f} |" in text and f"| {row['memory_ratio']:.2f} |" in text
    assert "no CUDA device" in text or figures["gpu"]["available"]
    assert figures["machine"]["commit"] and f"`{figures['command']}`" in text
    return figures


def test_bench_quick_writes_results_json_and_plots_that_agree(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", f"--out={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = check_bench_output(tmp_path)
    assert figures["mode"] == "quick" and "make bench-quick" in (tmp_path / "RESULTS.md").read_text()
