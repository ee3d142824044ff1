import json
import os

import pytest

from conftest import ROOT
from programs import run_program

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "bench_runs.jsonl")  # a few records of every kind, round numbers


def test_divergence_memory_benchmark_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "memory.json"
    result = run_program(["--quick", "--threads=1", f"--json={out}"], module="benchmarks.divergence_memory", timeout=300)
    assert result.returncode == 0, result.stderr
    [row] = json.loads(out.read_text())
    assert row["naive"]["loss"] == row["chunked"]["loss"] or abs(row["naive"]["loss"] - row["chunked"]["loss"]) < 1e-4
    assert row["memory_ratio"] == row["chunked"]["peak_extra_mb"] / row["naive"]["peak_extra_mb"]
    assert "memory ×" in result.stdout
    fused = run_program(["--quick", "--fused", "--threads=1", f"--json={out}"], module="benchmarks.divergence_memory", timeout=300)
    assert fused.returncode == 0, fused.stderr
    [row] = json.loads(out.read_text())
    assert row["fused"]["loss"] == pytest.approx(row["naive"]["loss"], rel=1e-4)
    assert row["memory_ratio"] == row["fused"]["peak_extra_mb"] / row["naive"]["peak_extra_mb"] and "fused MB" in fused.stdout


PLOTS = {"quality": ("learning_curves", "quality"), "iterations": ("iterations",), "pbkd": ("pbkd",), "scaling": ("scaling",)}


def check_bench_output(folder):
    """RESULTS.md, results.json and the plots of every section that ran exist, and every table figure is the JSON's."""
    from benchmarks.report import pm, signed

    text = (folder / "RESULTS.md").read_text()
    figures = json.loads((folder / "results.json").read_text())
    for section, plots in PLOTS.items():
        for plot in plots if section in figures else ():
            assert (folder / "plots" / f"{plot}.png").stat().st_size > 1000
    lines = [line for line in text.splitlines() if line.startswith("| ")]

    def row_of(name, marker=lambda line: True):
        [line] = [line for line in lines if line.startswith(f"| {name} | ") and marker(line)]
        return line

    for name, row in figures.get("quality", {}).items():  # every method: its mean, interval and paired Δ as the JSON has them
        line = row_of(name, lambda line: "±" in line and line.count("|") > 9)  # the quality table: 9 columns or more
        assert f"{pm(row['tasks']['mean'])}" in line
        assert (f"| {signed(row['delta'])} |" if name != "SeqKD" else "| baseline |") in line
        assert len(row["curve"]) == len(row["curve_steps"]) == len(row["curve_seconds"]) == figures["size"]["epochs"] + 1
    for n, row in figures.get("iterations", {}).get("at", {}).items():  # each count: both sides, their paired difference
        if "offline" in row and "online" in row:
            assert row_of(n).startswith(f"| {n} | {pm(row['offline']['score'])} | {pm(row['online']['score'])} | {signed(row['delta'])} | ")
    for name, row in figures.get("outside", {}).get("rows", {}).items():
        line = row_of(name, lambda line: "±" in line and line.count("|") == 9)  # the outside table: 8 columns
        assert line.startswith(f"| {name} | {pm(row['tasks']['mean'])} | {'baseline' if name == 'SeqKD' else signed(row['delta'])} |")
    if "pbkd" in figures:
        for label, row in figures["pbkd"]["rows"].items():
            assert f"| {pm(row['tasks']['mean'])} | {signed(row['delta'])} |" in row_of(label)
    for name, (mean, half, seeds) in figures.get("headline", {}).items():
        assert f"- {name} − SeqKD, same student steps: **{signed([mean, half])} points**" in text
    check_speed_and_scaling(figures, lines, row_of)
    assert "no CUDA device" in text or figures["machine"]["cuda"]
    assert figures["machine"]["commit"] and f"`{figures['command']}`" in text
    return figures


def trl_machine_cells(p):
    """A TRL row's GFLOP/step, fraction-of-peak and goal cells as the report must print them: from the record's own
    FLOP count and the matmul peak of the same process; dashes for a record from before they were measured."""
    library, trl = p["library"], p["trl"]
    if "flops_per_step" not in library:
        return "– | – | –"
    assert library["fraction_of_peak"] == library["flops_per_s"] / library["matmul_peak_flops_per_s"]
    goal = "–"
    if "goal" in p:
        needs = p["goal"] * trl["steps_per_s"] * library["flops_per_step"] / library["matmul_peak_flops_per_s"]
        assert p["goal_fraction_of_peak"] == pytest.approx(needs)
        goal = f"{needs:.0%} (at {p['goal']:g}×)"
    return (f"{library['flops_per_step'] / 1e9:.2f} / {trl['flops_per_step'] / 1e9:.2f} | "
            f"{library['fraction_of_peak']:.0%} / {trl['fraction_of_peak']:.0%} | {goal}")


def check_speed_and_scaling(figures, lines, row_of):
    for name, row in figures.get("speed", {}).get("steps", {}).items():  # library, baseline and their ratio from one run
        assert row["ratio"] == row["library_steps_per_s"] / row["manual_steps_per_s"]
        means = f"{row['ratio_of_means']:.3f}" if "ratio_of_means" in row else "–"
        mark = " ‡" if row.get("interleaved") else ""  # the two loops alternated step for step
        assert f"| {name}{mark} | {row['library_steps_per_s']:.2f} | {row['manual_steps_per_s']:.2f} | {row['ratio']:.3f} | {means} |" in "\n".join(lines)
        if "ratio_of_means" in row:
            assert row["ratio_of_means"] == row["library_mean_steps_per_s"] / row["manual_mean_steps_per_s"]
        if "flops_per_step" in row:  # achieved FLOP/s from the same run's steps/s and peak
            assert row["library_flops_per_s"] == row["flops_per_step"] * row["library_steps_per_s"]
            assert f"| {row['flops_per_step'] / 1e9:.2f} | {row['library_flops_per_s'] / 1e9:.1f} | {100 * row['fraction_of_peak']:.0f}% " in "\n".join(lines)
    for name, sampling in figures.get("speed", {}).get("sampling", {}).items():  # each row: its shape, both rates, their ratio
        mixed = f"{sampling['mixed_tokens_per_s']:.0f} | {sampling['mixed_ratio']:.2f} |" if "mixed_ratio" in sampling else "– | – |"
        both = (f" {sampling['teacher_tokens_per_s']:.0f} | {sampling['mixed_bound_ratio']:.2f} |" if "mixed_bound_ratio" in sampling
                else " – | – |")
        graphs = f" ({sampling['compiled_graphs']}, {sampling['graphs_compiled_while_timed']})" if "compiled_graphs" in sampling else ""
        compiled = (f"{sampling['compiled_plain_tokens_per_s']:.0f} | {sampling['compiled_ratio']:.2f} | {sampling['compile_seconds']:.0f}{graphs} | "
                    if "compiled_ratio" in sampling else "– | – | – | ")
        if "compiled_ratio" in sampling:  # the library against the compiled plain loop of the same rounds
            assert sampling["compiled_ratio"] == sampling["library_tokens_per_s"] / sampling["compiled_plain_tokens_per_s"]
        assert sampling["ratio"] == sampling["library_tokens_per_s"] / sampling["plain_tokens_per_s"]
        assert row_of(name) == (f"| {name} | {sampling['prompts']} × {sampling['samples']}, {sampling['max_new_tokens']} | "
                                f"{sampling['library_tokens_per_s']:.0f} | {sampling['plain_tokens_per_s']:.0f} | {sampling['ratio']:.2f} | "
                                f"{compiled}{mixed}{both}")
    for row in figures.get("speed", {}).get("divergence", []):
        assert f"| {row['time_ratio']:.2f} | {row['naive']['peak_extra_mb']:.0f} | {row['chunked']['peak_extra_mb']:.0f} | " \
               f"{row['memory_ratio']:.2f} |" in row_of(f"{row['batch']} × {row['tokens']}", lambda line, v=row["vocab"]: f"| {v:,} |" in line)
    for row in figures.get("speed", {}).get("fused", []):
        assert row["memory_ratio"] == row["fused"]["peak_extra_mb"] / row["naive"]["peak_extra_mb"]
        assert f"| {row['rows']:,} | {row['vocab']:,} | {row['naive']['seconds']:.2f} | {row['fused']['seconds']:.2f} | " \
               f"{row['time_ratio']:.2f} | {row['naive']['peak_extra_mb']:.0f} | {row['fused']['peak_extra_mb']:.0f} | " \
               f"{row['memory_ratio']:.2f} |" in lines
    for row in figures.get("trl", []):  # both sides and the equal-math check from one run of the section
        if "skipped" in row:
            assert f"| {row['vocab']:,} | – | skipped: {row['skipped']} |" in "\n".join(lines)
            continue
        for policy in ("off", "on"):
            p = row[policy]
            assert p["ratio"] == p["library"]["steps_per_s"] / p["trl"]["steps_per_s"]
            assert f"| {row['vocab']:,} | {policy} | {p['library']['steps_per_s']:.2f} | {p['trl']['steps_per_s']:.2f} | " \
                   f"{p['ratio']:.2f} | {p['library']['peak_rss_mb']:.0f} | {p['trl']['peak_rss_mb']:.0f} | " \
                   f"{p['library']['scored_tokens_per_step']:.0f} / {p['trl']['scored_tokens_per_step']:.0f} | " \
                   f"{trl_machine_cells(p)} | {row['equal_math']['loss_rel_diff']:.1e}, {row['equal_math']['grad_rel_diff']:.1e} |" in lines
    for axis, rows in figures.get("scaling", {}).items():
        for row in rows:
            assert f"| {axis} | {row['x']:,} | {row['naive']['seconds']:.2f} | {row['chunked']['seconds']:.2f} | " \
                   f"{row['naive']['peak_extra_mb']:.0f} | {row['chunked']['peak_extra_mb']:.0f} |" in lines


def test_interval_rates_take_the_median_step_and_the_mean():
    """A step descheduled for 8 s moves the mean rate, not the median one."""
    from benchmarks.step_speed import interval_rates

    assert interval_rates([1.0, 1.0, 8.0]) == (1.0, 0.3)


def test_step_speed_takes_a_hand_step_after_each_library_step_and_keeps_it_out_of_the_librarys_time(tmp_path, monkeypatch):
    """The two loops alternate: hand steps made slower by 0, 0.05, 0.1, ... s slow the hand loop's rate alone, since
    each library interval has the hand step taken inside it subtracted (paired with the wrong one, an interval would
    come out negative); an epoch too short for the steps asked is an error."""
    import time

    from benchmarks import step_speed
    from benchmarks.experiments import SIZES

    args = ["--config", "configs/baselines/seqkd.yaml", *(a for a in SIZES["quick"].overrides if "critic_warmup" not in a),
            f"--trainer.default_root_dir={tmp_path}/run", f"--model.teacher.cache_dir={tmp_path}/cache", "--model.num_threads=1"]
    one_step, taken = step_speed.HandLoop.one_step, []

    def slower(self, *batch):
        time.sleep(0.05 * len(taken))
        taken.append(1)
        one_step(self, *batch)

    monkeypatch.setattr(step_speed.HandLoop, "one_step", slower)
    monkeypatch.setattr(step_speed, "FLOP_STEPS", 1)
    result = step_speed.measure(args, warm=1, steps=3)
    assert result["manual_steps_per_s"] < 15.0 < 30.0 < result["library_steps_per_s"] < 10_000
    assert result["ratio"] == result["library_steps_per_s"] / result["manual_steps_per_s"]
    with pytest.raises(ValueError, match="an epoch holds"):
        step_speed.measure(args, warm=1, steps=100)


def test_step_speeds_hand_loop_does_the_librarys_steps_with_its_own_state(tmp_path, monkeypatch):
    """X-KD (a reward model and the student, each its own optimizer): the hand loop takes as many critic and student
    steps as the library, through its own players (its own kept reference log-probs) and its own optimizers, and
    leaves the other player trainable after each step."""
    from benchmarks import step_speed
    from benchmarks.experiments import SIZES
    from pbkd_lightning.objectives import XKD

    args = ["--config", "configs/xkd.yaml", *(a for a in SIZES["quick"].overrides if "critic_warmup" not in a),
            f"--trainer.default_root_dir={tmp_path}/run", f"--model.teacher.cache_dir={tmp_path}/cache", "--model.num_threads=1"]
    calls, hands = [], []
    for name in ("critic_loss", "student_loss"):
        def counted(self, players, *rest, _name=name, _original=getattr(XKD, name)):
            calls.append((_name, id(players)))
            return _original(self, players, *rest)
        monkeypatch.setattr(XKD, name, counted)
    init = step_speed.HandLoop.__init__

    def kept(self, module, datamodule):
        init(self, module, datamodule)
        hands.append((self, module))

    monkeypatch.setattr(step_speed.HandLoop, "__init__", kept)
    monkeypatch.setattr(step_speed, "FLOP_STEPS", 1)
    step_speed.measure(args, warm=1, steps=3)
    [(hand, module)] = hands
    assert hand.players is not module.players and hand.players._reference_logprobs is not module.players._reference_logprobs
    assert all(hand.optimizers[role][0] is not optimizer
               for role, optimizer in zip(("critic", "student"), module.trainer.optimizers))
    library = [name for name, who in calls if who == id(module.players)]
    by_hand = [name for name, who in calls if who == id(hand.players)]
    # the library's 5 batches (warm + steps + 1), the hand loop's 4 and its one counted for FLOPs
    assert library.count("student_loss") == 5 and by_hand.count("student_loss") == 4 + 1
    assert library.count("critic_loss") == 5 * module.objective.critic_steps and by_hand.count("critic_loss") == 5 * hand.objective.critic_steps
    assert all(p.requires_grad for p in module.critic.parameters()) and all(p.requires_grad for p in module.student.parameters())


def test_fresh_with_rows_forgets_those_rows_only(tmp_path):
    """`--fresh --rows A` drops A's records of the selected sections and keeps every other row's (it used to drop
    the whole section's, losing rows nobody asked to re-measure); without rows the whole section goes."""
    from benchmarks.runner import forget, load_records

    path = str(tmp_path / "runs.jsonl")
    records = [{"mode": "full", "section": "speed", "name": "A", "seed": 0}, {"mode": "full", "section": "speed", "name": "B", "seed": 0},
               {"mode": "full", "section": "quality", "name": "A", "seed": 0}, {"mode": "quick", "section": "speed", "name": "A", "seed": 0}]
    with open(path, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    forget(path, "full", {"speed"}, {"A"})
    assert load_records(path) == records[1:]
    forget(path, "full", {"speed"})
    assert load_records(path) == records[2:]


def test_a_records_commit_is_dirty_for_code_changes_not_for_the_benchs_own_output(tmp_path):
    """Rewriting runs.jsonl, the report or its plots (as --fresh does before a run) leaves the measured commit clean;
    an edit to code marks it."""
    import subprocess

    from benchmarks.runner import measured_commit

    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    (tmp_path / "benchmarks" / "plots").mkdir(parents=True)
    for name in ("benchmarks/runs.jsonl", "benchmarks/RESULTS.md", "benchmarks/plots/a.png", "code.py"):
        (tmp_path / name).write_text("x\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    for name in ("benchmarks/runs.jsonl", "benchmarks/RESULTS.md", "benchmarks/plots/a.png"):
        (tmp_path / name).write_text("y\n")
    assert not measured_commit(str(tmp_path)).endswith("(with uncommitted changes)")
    (tmp_path / "code.py").write_text("y\n")
    assert measured_commit(str(tmp_path)).endswith("(with uncommitted changes)")


def test_report_from_recorded_runs(tmp_path):
    """The report alone, from a fixture of records: means with 95% intervals over seeds, paired differences to SeqKD,
    the last record of a re-run seed, the wall-clock budget, provenance by commit; a line cut off by a kill is skipped."""
    from benchmarks.experiments import SIZES
    from benchmarks.report import markdown, ordering, results, write
    from benchmarks.runner import load_records, wall_clock_budget

    records = load_records(FIXTURE)
    assert len(records) == 33  # and the cut-off last line is ignored
    text = write(records, SIZES["quick"], "make bench-quick", str(tmp_path))
    figures = check_bench_output(tmp_path)
    assert text == (tmp_path / "RESULTS.md").read_text()

    seqkd = figures["quality"]["SeqKD"]  # seed 1 was recorded twice: 0.9 (first) then 0.5 (last, the one that counts)
    # two seeds 0.3 and 0.5: mean 0.4, 95% half-width t(1) · s / √2 = 12.706 · 0.1414 / 1.414
    assert seqkd["tasks"]["mean"] == pytest.approx([0.4, 1.2706]) and seqkd["seconds"][0] == pytest.approx(11.0)
    assert list(figures["quality"]) == ["SeqKD", "Black-box PbKD, offline", "White-box PbKD", "X-KD, sequence-level"]
    offline = figures["quality"]["Black-box PbKD, offline"]  # 0.5 and 0.6 against SeqKD's 0.3 and 0.5, seed by seed
    assert offline["delta"] == pytest.approx([0.15, 12.706 * 0.05])  # differences 0.2, 0.1: s = 0.0707, s/√2 = 0.05
    assert figures["headline"]["Black-box PbKD, offline"] == pytest.approx([0.15, 12.706 * 0.05, 2])
    assert "| teacher model (white-box methods), greedy | 0.000 | 0.750 | 0.375 | | | | | |" in text
    assert "| **0.550 ± 0.635** | +15.0 ± 63.5 | 4 |" in text  # the best mean of the column, its Δ, its student steps
    assert wall_clock_budget(records, "quality/Black-box PbKD, offline") == (52.0, "records")
    same = figures["pbkd"]["same_wall_clock"]  # PbKD (0.5, 0.6) against SeqKD given its 52 s (0.35, 0.35)
    assert same["row"] == "SeqKD, same wall-clock as Black-box PbKD, offline (52 s)" and same["delta"][0] == pytest.approx(0.2)
    assert "(52 s): **+20.0 ± 63.5 points** (same wall-clock)" in text
    # iterations, read off 2-epoch runs: after 1, offline 0.35, 0.3 and online 0.3, 0.32 (differences -0.05, +0.02)
    at = figures["iterations"]["at"]
    assert at["1"]["delta"] == pytest.approx([-0.015, 12.706 * 0.035]) and at["2"]["delta"] == pytest.approx([0.035, 12.706 * 0.015])
    assert at["1"]["online"]["reward_acc"] == pytest.approx([0.65, 12.706 * 0.05]) and at["2"]["online"]["seconds"] == 25.0
    assert "| 2 | 0.450 ± 0.635 | 0.485 ± 0.445 | +3.5 ± 19.1 | 0.860 ± 0.762 | 0.940 ± 0.127 | 8 | 20 / 25 |" in text
    assert "Reward model at or above 90% in 1 of 4 epochs/iterations" in text
    assert "Not every section comes from the same commit" in text and "- speed: runs from 2026-12-02 09:00 UTC, commit def5678" in text
    assert "Not run yet" not in text
    # outside: PbKD 0.5, 0.59 against SeqKD 0.6, 0.7: differences -0.10, -0.11, the interval below 0; the testbed's across 0
    assert figures["outside"]["rows"]["Black-box PbKD, offline"]["delta"] == pytest.approx([-0.105, 12.706 * 0.005], rel=1e-4)
    assert "| Black-box PbKD, offline | 0.545 ± 0.572 | -10.5 ± 6.4 | worse | +15.0 ± 63.5 | same | – | 52 |" in text
    assert "Order by mean, outside: SeqKD > Black-box PbKD, offline." in text and "agree for 0 of 1 methods;" in text
    assert ordering({"a": 0.5, "b": 0.5001, "c": 0.4}) == "b = a > c"  # equal to the digits shown: a tie
    same = [dict(r, name="Black-box PbKD, online") for r in records if r["section"] == "outside" and r["name"] == "SeqKD"]
    tied = results(records + same, SIZES["quick"], "x")["outside"]  # a row equal to SeqKD on every seed is not counted
    assert tied["identical"] == ["Black-box PbKD, online"] and "SeqKD = Black-box PbKD, online" in tied["order"]

    partial = markdown(results([r for r in records if r["section"] == "scaling"], SIZES["quick"], "make bench-quick"))
    assert "Not run yet: quality, pbkd, iterations, outside, speed, trl." in partial and "| tokens | 32 |" in partial
    others = [r for r in records if r["section"] != "quality"]
    with pytest.raises(ValueError, match="has no recorded run yet"):
        wall_clock_budget(others, "quality/Black-box PbKD, offline")
    # records lost, the row kept in the report: its mean seconds, and the budget says where it came from
    seconds, source = wall_clock_budget(others, "quality/Black-box PbKD, offline", figures)
    assert seconds == pytest.approx(52.0) and source.startswith("results.json (runs from ") and "commit" in source


def test_a_report_keeps_the_sections_of_its_previous_results_that_have_no_records(tmp_path):
    """Re-running one section (here: only scaling's records) rewrites it and keeps the others, marked as kept; the
    figures of a kept section are the previous report's, and a report of another mode keeps nothing."""
    from benchmarks.experiments import SIZES
    from benchmarks.report import write
    from benchmarks.runner import load_records

    records = load_records(FIXTURE)
    write(records, SIZES["quick"], "make bench-quick", str(tmp_path))
    before = json.loads((tmp_path / "results.json").read_text())
    scaling = [dict(r, figures={**r["figures"], "naive": {**r["figures"]["naive"], "seconds": 9.99}}) for r in records
               if r["section"] == "scaling"]
    text = write(scaling, SIZES["quick"], "python -m benchmarks.run --quick --sections scaling", str(tmp_path))
    after = check_bench_output(tmp_path)
    for key in ("quality", "headline", "pbkd", "iterations", "outside", "speed", "trl"):
        assert after[key] == before[key]
    assert after["scaling"] != before["scaling"] and {row["naive"]["seconds"] for row in after["scaling"]["tokens"]} == {9.99}
    assert after["sections"]["quality"] == dict(before["sections"]["quality"], carried=True) and "carried" not in after["sections"]["scaling"]
    assert "- quality: runs from 2026-12-01 08:00 UTC, commit abc1234" in text and "(kept from the previous report" in text
    assert "Not run yet" not in text
    # a partial re-run of a kept section keeps its other rows: SeqKD alone re-run, PbKD's row and Δ stay
    seqkd = [r for r in records if r["section"] == "quality" and r["name"] == "SeqKD"]
    partial = write(seqkd, SIZES["quick"], "python -m benchmarks.run --quick --sections quality --rows SeqKD", str(tmp_path))
    kept = json.loads((tmp_path / "results.json").read_text())
    assert list(kept["quality"]) == list(before["quality"]) and kept["headline"] == before["headline"]
    assert "its rows Black-box PbKD, offline, White-box PbKD, X-KD, sequence-level kept from the previous report" in partial
    # a partial re-run of speed (one step row) keeps the other step rows, the sampling row and the divergences
    one = [dict(r, figures={**r["figures"], "ratio": 0.5}) for r in records if r["section"] == "speed" and r["name"] == "SeqKD"]
    assert one and len([r for r in records if r["section"] == "speed"]) > 1
    speed_text = write(one, SIZES["quick"], "python -m benchmarks.run --quick --sections speed --rows SeqKD", str(tmp_path))
    speed = json.loads((tmp_path / "results.json").read_text())["speed"]
    assert speed["steps"]["SeqKD"]["ratio"] == 0.5 and list(speed["steps"]) == list(before["speed"]["steps"])
    assert {k: v for k, v in speed["steps"].items() if k != "SeqKD"} == {k: v for k, v in before["speed"]["steps"].items() if k != "SeqKD"}
    assert speed["sampling"] == before["speed"]["sampling"] and speed["divergence"] == before["speed"]["divergence"]
    assert "- speed: runs from" in speed_text and "kept from the previous report (runs from 2026-12-02 09:00 UTC" in speed_text
    fresh = write(seqkd, SIZES["quick"], "x", str(tmp_path), forget=frozenset({"quality", "speed"}))  # --fresh: nothing kept
    assert "| White-box PbKD |" not in fresh and "## Speed" not in fresh and "## Against TRL" in fresh
    full = write([], SIZES["full"], "make bench", str(tmp_path))  # the folder's results are quick ones: nothing kept
    assert "Not run yet: quality, pbkd, iterations, outside, speed, trl, scaling." in full


CALLS = []


def fake_measure(value):
    CALLS.append(value)
    return {"value": value}


def test_runner_records_each_run_once_and_skips_recorded_ones(tmp_path):
    from benchmarks.experiments import Experiment
    from benchmarks.runner import load_records, run

    def experiment(name, value):
        return Experiment(name, "scaling", measure="test_benchmarks:fake_measure", params={"value": value}, tags={"axis": "x"})

    path = str(tmp_path / "runs.jsonl")
    run([experiment("a", 1), experiment("b", 2)], "quick", path, str(tmp_path / "work"))
    with open(path, "a") as handle:
        handle.write('{"mode": "quick", "section": "scal')  # killed while writing a record
    run([experiment("a", 1), experiment("b", 3), experiment("c", 4)], "quick", path, str(tmp_path / "work"))
    assert CALLS == [1, 2, 3, 4]  # "a" ran once; "b" again, as its measure changed; "c" is new
    assert [(r["name"], r["figures"]) for r in load_records(path)] == [("a", {"value": 1}), ("b", {"value": 2}),
                                                                       ("b", {"value": 3}), ("c", {"value": 4})]


def test_size_overrides_apply_where_the_parsed_config_has_the_key(monkeypatch):
    from benchmarks.experiments import SIZES, experiments
    from benchmarks.runner import fit_args, folder_args

    monkeypatch.chdir(ROOT)
    quality = {e.name: e for e in experiments(SIZES["quick"]) if e.section == "quality"}
    seqkd, blackbox, white_box = (fit_args(quality[n], 0) for n in ("SeqKD", "Black-box PbKD, offline", "White-box PbKD"))
    assert "--model.student.layers=1" in seqkd and "--model.student.layers=1" in white_box
    # no model.teacher section in the black-box configs; no critic warm-up in SeqKD's objective
    assert not any(a.startswith("--model.teacher.") for a in seqkd + blackbox) and "--model.teacher.layers=1" in white_box
    assert "--model.objective.critic_warmup_steps=0" in blackbox and not any("critic_warmup_steps" in a for a in seqkd)
    assert folder_args(quality["White-box PbKD"], "root", "cache")[-1] == "--model.teacher.cache_dir=cache"
    assert folder_args(quality["SeqKD"], "root", "cache") == ["--trainer.default_root_dir=root", "--model.warmup.cache_dir=cache"]


def repository_files():
    """What the quick bench wrote in the repository before it took an output folder: benchmarks/, runs/bench-quick."""
    found = {}
    for top in ("benchmarks", os.path.join("runs", "bench-quick")):
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            found.update({os.path.join(folder, f): os.stat(os.path.join(folder, f)).st_mtime_ns for f in files})
    return found


# The rows the smoke run takes (every method's config trains in test_configs): of quality, the baseline, black-box PbKD
# (whose wall time the pbkd section's SeqKD row is given), a white-box method with the teacher model, X-KD's diversity.
SMOKE_ROWS = {"quality,pbkd": "SeqKD;Black-box PbKD, offline;White-box PbKD;X-KD, sequence-level;"
                              "paper: scalar head (last token), teacher labels, 1 critic step;"
                              "SeqKD, same wall-clock as Black-box PbKD, offline",
              # iterations: offline and one online row; of speed, a black-box and a white-box step-speed row (the
              # others run the same step code), sampling, one divergence size; the outside task's black-box PbKD
              # (JSONL files and a response-file teacher; the name also picks the speed row)
              "iterations,speed,outside": "offline, 2 epochs;online, 2 iterations;"
                                          "Black-box PbKD, offline;White-box PbKD;sampling;divergence, vocabulary 4096"}


@pytest.mark.slow
# Two parts, so two workers share them (pbkd's same-wall-clock row needs quality's runs). The scaling section is the
# divergence-memory script at a few sizes: it runs in test_divergence_memory_benchmark_runs_and_reports_ratios, and its
# table in test_report_from_recorded_runs.
@pytest.mark.parametrize("sections", list(SMOKE_ROWS))
def test_bench_quick_writes_only_under_its_folder_and_its_report_agrees_with_the_json(tmp_path, sections):
    from benchmarks.experiments import SIZES, experiments

    before = repository_files()
    rows = SMOKE_ROWS[sections]
    # one seed and one thread: the bench's own smoke size, while the other test worker runs beside it
    result = run_program(["--quick", f"--sections={sections}", "--seeds=1", "--threads=1", f"--out={tmp_path}",
                          *([f"--rows={rows}"] if rows else [])], module="benchmarks.run", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert repository_files() == before
    figures = check_bench_output(tmp_path)
    command = f"python -m benchmarks.run --quick --sections {sections}" + (f" --rows '{rows}'" if rows else "") + " --seeds 1"
    assert figures["mode"] == "quick" and figures["command"] == command
    assert set(sections.split(",")) <= set(figures)  # each section asked for ran and is reported
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    expected = [e for e in experiments(SIZES["quick"]) if e.section in sections.split(",")
                and (not rows or e.name in rows.split(";"))]
    assert len(records) == len(expected) and (not rows or {r["name"] for r in records} == set(rows.split(";")))  # first seeds
    assert "outside" not in sections or figures["outside"]["rows"]["Black-box PbKD, offline"]["teacher"]["mean"] > 0.9


def test_teacher_rows_benchmark_gives_the_same_rows_and_reports_its_speed_up(tmp_path, capsys):
    from benchmarks.teacher_rows import main

    [result] = main(["--quick", "--threads=1", f"--json={tmp_path}/rows.json"])
    assert result["max_abs_difference"] < 1e-5 and result["full_ms"] > 0 and result["scored_ms"] > 0
    assert result["scored_logits_mb"] < result["full_logits_mb"]  # 40 of 130 positions projected
    assert json.loads((tmp_path / "rows.json").read_text()) == [result] and "| 512 |" in capsys.readouterr().out


def test_reward_rows_benchmark_gives_the_same_rewards_and_gradient_both_ways(capsys):
    from benchmarks.reward_rows import main

    full, rows = main(["--quick", "--threads=1"])
    assert (full["variant"], rows["variant"]) == ("every position", "scored rows")
    assert max(abs(a - b) for a, b in zip(full["rewards"], rows["rewards"])) < 1e-5
    assert abs(full["gradient_norm"] - rows["gradient_norm"]) < 1e-4 * full["gradient_norm"]
    assert full["seconds"] > 0 and rows["seconds"] > 0 and "| scored rows |" in capsys.readouterr().out
