"""Turns the runner's records (one JSON line per run) into results.json, RESULTS.md and plots/.

    python -m benchmarks.report [--quick] [--out DIR] [--records FILE]   # rewrite them from the records alone

Every figure in RESULTS.md is one of results.json's, and each of those is computed here from the records:
a row is the mean and 95% confidence interval over its seeds' runs, and its difference to SeqKD is paired over
the seeds both ran (benchmarks/stats.py). When a run was recorded more than once, the last record counts.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
from typing import Optional

from benchmarks.experiments import BASELINE, HEADLINE, SECTIONS, SIZES, WALL_CLOCK_OF, Size, experiments
from benchmarks.stats import mean_ci, paired_difference


def by_row(records: list[dict], size: Size, section: str) -> dict[str, list[dict]]:
    """The section's records per row, rows in the experiments' order and each row's seeds in order; a run
    recorded twice counts once, by its last record."""
    last = {(r["name"], r["seed"]): r for r in records if r["section"] == section}
    rows = {}
    for experiment in experiments(size):
        if experiment.section == section:
            runs = [last[(experiment.name, seed)] for seed in experiment.seeds if (experiment.name, seed) in last]
            if runs:
                rows[experiment.name] = runs
    return rows


def fit_row(runs: list[dict]) -> dict:
    """Mean and 95% interval over the seeds of a fit's held-out scores, diversity, reward-model accuracy and wall
    time; ``by_seed`` keeps each seed's final mean for the paired differences."""
    summaries = [r["summary"] for r in runs]
    finals = [s["student_final"] for s in summaries]
    tasks = sorted(t for t in finals[0] if t != "mean") + ["mean"]
    points = min(len(r["curve"]) for r in runs)
    row = {"tasks": {t: mean_ci([f[t] for f in finals]) for t in tasks}, "seconds": mean_ci([r["seconds"] for r in runs]),
           "by_seed": {str(r["seed"]): r["summary"]["student_final"]["mean"] for r in runs},
           "start": mean_ci([s["student_start"]["mean"] for s in summaries]),
           "untrained": mean_ci([s.get("student_before_warmup", {}).get("mean", float("nan")) for s in summaries]),
           "curve": [statistics.fmean(r["curve"][i] for r in runs) for i in range(points)],
           "teacher": summaries[0]["teacher"], "args": runs[0]["args"], "seeds": [r["seed"] for r in runs]}
    if all("curve_steps" in r for r in runs):
        row["curve_steps"] = [statistics.fmean(r["curve_steps"][i] for r in runs) for i in range(points)]
        row["curve_seconds"] = [statistics.fmean(r["curve_seconds"][i] for r in runs) for i in range(points)]
        row["student_steps"] = statistics.fmean(r["curve_steps"][-1] for r in runs)  # a time budget: seeds differ
    diversity = [s.get("student_final_diversity") for s in summaries]
    if all(diversity):
        row["diversity"] = {k: mean_ci([d[k] for d in diversity]) for k in diversity[0]}
    history = [s.get("heldout_pref_acc_per_epoch") or [] for s in summaries]
    for key, name in (("all", "reward_acc_per_epoch"), ("sample_ranking", "ranking_acc_per_epoch")):
        epochs = min(map(len, history))
        if epochs and all(key in h[i] for h in history for i in range(epochs)):
            row[name] = [mean_ci([h[i][key] for h in history]) for i in range(epochs)]
    if "teacher_model" in summaries[0]:
        row["teacher_model"] = summaries[0]["teacher_model"]
    if "max_time_s" in runs[0]:
        row["max_time_s"] = runs[0]["max_time_s"]
        row["budget_from"] = runs[0].get("budget_from", "records")
    return row


def iterations_at(rows: dict[str, list[dict]], counts: tuple[int, ...]) -> dict:
    """Offline against online after each of ``counts`` epochs / iterations, read off the long runs' per-epoch held-out
    scores: each side's mean and interval over seeds, online − offline paired by seed, the online reward model's
    held-out accuracy at that iteration, and the student steps and seconds it took."""
    sides = {"offline" if runs[0]["tags"]["iterations"] == 0 else "online": runs for runs in rows.values()}
    at = {}
    for n in counts:
        row = {}
        for side, runs in sides.items():
            runs = [r for r in runs if len(r["curve"]) > n]
            if not runs:
                continue
            row[side] = {"score": mean_ci([r["curve"][n] for r in runs]), "by_seed": {str(r["seed"]): r["curve"][n] for r in runs},
                         "steps": statistics.fmean(r["curve_steps"][n] for r in runs),
                         "seconds": statistics.fmean(r["curve_seconds"][n] for r in runs)}
            history = [r["summary"].get("heldout_pref_acc_per_epoch") or [] for r in runs]
            if all(len(h) >= n and "all" in h[n - 1] for h in history):
                row[side]["reward_acc"] = mean_ci([h[n - 1]["all"] for h in history])
        if "offline" in row and "online" in row:
            row["delta"] = paired_difference(row["online"]["by_seed"], row["offline"]["by_seed"])
        if row:
            at[str(n)] = row
    return at


def ordering(means: dict[str, float]) -> str:
    """Names by mean, best first; equal means (to the reported 3 digits) joined by ``=``."""
    names = sorted(means, key=lambda n: -means[n])
    text = names[0] if names else ""
    for before, name in zip(names, names[1:]):
        text += (" = " if f"{means[before]:.3f}" == f"{means[name]:.3f}" else " > ") + name
    return text


def equal_on_every_seed(by_seed: dict, baseline: dict) -> bool:
    """Every seed both ran ended at the baseline's score exactly (e.g. black-box PbKD whose gate never opened: its
    student trained on SeqKD's loss alone)."""
    shared = by_seed.keys() & baseline.keys()
    return bool(shared) and all(by_seed[seed] == baseline[seed] for seed in shared)


def with_deltas(rows: dict, baseline: Optional[dict]) -> dict:
    """Each row with ``delta``: its paired difference to ``baseline`` over the seeds both ran (mean, 95% half-width)."""
    for row in rows.values():
        row["delta"] = paired_difference(row["by_seed"], baseline["by_seed"]) if baseline else [float("nan")] * 2
    return rows


SECTION_KEYS = {"quality": ("quality", "headline")}  # results.json's keys of each section (default: its own name)


def carried_sections(grouped: dict, previous: Optional[dict], forget: frozenset = frozenset()) -> dict:
    """The sections of ``previous`` (the results.json being rewritten, of the same mode) that have no records now,
    with their figures: a section measured before its records were kept next to the report is not lost by re-running
    another. ``forget``: sections measured afresh, never carried."""
    if not previous:
        return {}
    return {section: meta for section, meta in previous.get("sections", {}).items()
            if section in grouped and not grouped[section] and section not in forget}


def results(records: list[dict], size: Size, command: str, previous: Optional[dict] = None,
            forget: frozenset = frozenset()) -> dict:
    """results.json: every figure the report shows, per section; sections without records are taken from
    ``previous`` where it has them (marked ``carried``), else left out."""
    grouped = {section: by_row(records, size, section) for section in SECTIONS}
    out = {"mode": size.name, "command": command, "size": dataclasses.asdict(size)}
    previous = previous if previous and previous.get("mode") == size.name else None  # a report of another size keeps nothing
    carried = carried_sections(grouped, previous, forget)
    for section in carried:
        out.update({key: previous[key] for key in SECTION_KEYS.get(section, (section,)) if key in previous})
    quality = {name: fit_row(runs) for name, runs in grouped["quality"].items()}
    kept_rows, kept_speed = {}, []
    if quality and previous and "quality" not in forget:
        # a partial re-run of the quality section keeps the previous report's other rows (SeqKD's among them)
        kept_rows = {name: row for name, row in previous.get("quality", {}).items() if name not in quality}
    order = [e.name for e in experiments(size) if e.section == "quality"]
    merged = {**kept_rows, **quality} if quality else out.get("quality", {})
    quality = {name: merged[name] for name in order if name in merged}
    baseline = quality.get(BASELINE)
    if grouped["quality"]:
        out["quality"] = with_deltas(quality, baseline)
        out["headline"] = {name: quality[name]["delta"] + [len(quality[name]["by_seed"])] for name in HEADLINE[1:] if name in quality}
    if grouped["pbkd"]:
        rows = {}
        for name, runs in grouped["pbkd"].items():
            row = dict(fit_row(runs), baseline=bool(runs[0]["tags"].get("baseline")))
            rows[f"{name} ({row['max_time_s']} s)" if "max_time_s" in row else name] = row
        out["pbkd"] = {"rows": with_deltas(rows, baseline)}
        timed = [(label, row) for label, row in rows.items() if "max_time_s" in row]
        measured = quality.get(WALL_CLOCK_OF.split("/", 1)[1])
        if timed and measured:  # the PbKD row against SeqKD given the same seconds, seed by seed
            label, row = timed[0]
            out["pbkd"]["same_wall_clock"] = {"row": label, "of": WALL_CLOCK_OF.split("/", 1)[1],
                                              "delta": paired_difference(measured["by_seed"], row["by_seed"])}
    if grouped["iterations"]:
        out["iterations"] = {"runs": {name: dict(fit_row(runs), iterations=runs[0]["tags"]["iterations"])
                                      for name, runs in grouped["iterations"].items()},
                             "at": iterations_at(grouped["iterations"], size.online_iterations)}
    if grouped["outside"]:
        rows = {name: fit_row(runs) for name, runs in grouped["outside"].items()}
        out["outside"] = {"rows": with_deltas(rows, rows.get(BASELINE)),
                          "identical": [n for n in rows if n != BASELINE and BASELINE in rows
                                        and equal_on_every_seed(rows[n]["by_seed"], rows[BASELINE]["by_seed"])],
                          "order": ordering({n: rows[n]["tasks"]["mean"][0] for n in rows}),
                          "testbed_order": ordering({n: quality[n]["tasks"]["mean"][0] for n in rows if n in quality}),
                          "testbed_delta": {n: quality[n]["delta"] for n in rows if n in quality and "delta" in quality[n]}}
    if grouped["speed"]:
        speed = out["speed"] = {"steps": {}, "sampling": {}, "divergence": [], "fused": []}
        for name, [run] in grouped["speed"].items():
            if run["measure"] == "benchmarks.step_speed:measure":
                speed["steps"][name] = run["figures"]
            elif run["measure"] == "benchmarks.sampling_speed:measure":
                speed["sampling"][name] = dict(run["figures"], samples=run["params"]["samples"], prompts=run["params"]["prompts"],
                                               max_new_tokens=run["params"]["max_new_tokens"])
            elif run["measure"] == "benchmarks.divergence_memory:compare_fused":
                speed["fused"].append(run["figures"])
            else:
                speed["divergence"].append(run["figures"])
        if previous and "speed" not in forget and "speed" in previous:
            # a partial re-run (rows without a teacher model, say) keeps the previous report's other speed rows
            before = previous["speed"]
            sampling = before.get("sampling") or {}
            sampling = {"sampling": sampling} if "ratio" in sampling else sampling  # a report from before the sampling rows
            order = [e.name for e in experiments(size) if e.section == "speed"]
            for key, rows in (("steps", before.get("steps", {})), ("sampling", sampling)):
                kept_speed += [name for name in rows if name not in speed[key] and name in order]
                merged = {**rows, **speed[key]}  # a row no longer among the experiments is dropped, as quality's are
                speed[key] = {name: merged[name] for name in sorted(merged, key=order.index) if name in order}
            for key, label in (("divergence", "chunked divergence"), ("fused", "fused divergence")):
                if not speed[key] and before.get(key):
                    speed[key], kept_speed = before[key], kept_speed + [label]
    if grouped["trl"]:
        out["trl"] = [run["figures"] for [run] in grouped["trl"].values()]
    if grouped["scaling"]:
        out["scaling"] = {"tokens": [], "vocab": []}
        for [run] in grouped["scaling"].values():
            out["scaling"][run["tags"]["axis"]].append({"x": run["tags"]["x"], **run["figures"]})
    runs = {section: [r for seeds in rows.values() for r in seeds] for section, rows in grouped.items()}
    out["sections"] = {section: {"started": min(r["started"] for r in done), "commits": sorted({r["machine"]["commit"] for r in done}),
                                 "minutes": sum(r["seconds"] for r in done) / 60} for section, done in runs.items() if done}
    out["sections"].update({section: dict(meta, carried=True) for section, meta in carried.items()})
    for section, kept in (("quality", sorted(kept_rows)), ("speed", kept_speed)):
        if kept:
            meta = previous.get("sections", {}).get(section, {"started": "?", "commits": ["?"]})
            if set(kept) <= set(meta.get("kept_rows", ())):  # rows kept once before: their runs are the older ones
                meta = meta["kept_from"]
            meta = {k: v for k, v in meta.items() if k in ("started", "commits", "minutes")}
            out["sections"][section] = {**out["sections"][section], "kept_rows": kept, "kept_from": meta}
    out["sections"] = {section: out["sections"][section] for section in SECTIONS if section in out["sections"]}
    every = sorted((r for done in runs.values() for r in done), key=lambda r: r["started"])
    out["machine"] = every[-1]["machine"] if every else previous.get("machine", {}) if carried else {}
    out["seconds"] = sum(r["seconds"] for r in every) + sum(60 * meta["minutes"] for meta in carried.values())
    return out


def pm(pair, digits=3) -> str:
    """``mean ± half-width``; a single seed has no interval (``±  –``)."""
    half = "–" if math.isnan(pair[1]) else f"{pair[1]:.{digits}f}"
    return f"{pair[0]:.{digits}f} ± {half}"


def signed(pair) -> str:
    """A paired difference in points: ``+3.1 ± 1.2``."""
    if math.isnan(pair[0]):
        return "–"
    half = "–" if math.isnan(pair[1]) else f"{pair[1] * 100:.1f}"
    return f"{pair[0] * 100:+.1f} ± {half}"


def per_epoch(pairs) -> str:
    return ", ".join(f"{m:.2f}" for m, _ in pairs) if pairs else "–"


def markdown(r: dict) -> str:
    lines = header(r)
    for section, render in (("quality", quality_table), ("headline", headline), ("pbkd", pbkd_table),
                            ("iterations", iterations_table), ("outside", outside_table), ("quality", diversity_table), ("speed", speed_tables),
                            ("trl", trl_table), ("scaling", scaling_table)):
        if section in r:
            lines += render(r)
    lines += gpu(r) + commands(r)
    return "\n".join(lines)


def header(r: dict) -> list[str]:
    m, sections = r["machine"], r["sections"]
    lines = [f"# Benchmark results ({r['mode']})", "",
             f"Written by `{r['command']}` from the runs' records (one JSON line per run); every figure below comes from "
             "those runs (also in `results.json` next to this file). `a ± b`: the mean over seeds and the half-width of "
             "its 95% confidence interval (Student's t); `Δ vs SeqKD`: the difference to SeqKD seed by seed (same "
             "initialisation, warm-up and data order), in points, with its 95% interval."]
    if m:
        lines += ["", f"Machine: {m['platform']}, {m['processor']}, {m['cpus']} CPUs, {m['memory_gib']} GiB. "
                  f"Python {m['python']}, torch {m['torch']}, lightning {m['lightning']}, transformers {m['transformers']}. "
                  f"Commit {m['commit']}. Total wall time of the runs {r['seconds'] / 60:.1f} min."]
    if len({c for v in sections.values() for c in v["commits"]}) > 1 or any(v.get("carried") for v in sections.values()):
        lines += ["", "Not every section comes from the same commit; each from:", ""]
        lines += [f"- {name}: runs from {v['started']}, commit {', '.join(v['commits'])}, {v['minutes']:.1f} min"
                  + (" (kept from the previous report: its runs' records are not in runs.jsonl)" if v.get("carried") else "")
                  + (f"; its rows {', '.join(v['kept_rows'])} kept from the previous report (runs from {v['kept_from']['started']}, "
                     f"commit {', '.join(v['kept_from']['commits'])})" if v.get("kept_rows") else "")
                  for name, v in sections.items()]
    missing = [s for s in SECTIONS if s not in r]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return lines


def _steps(row: dict) -> str:
    return f"{row['student_steps']:.0f}" if "student_steps" in row else "–"


def quality_table(r: dict) -> list[str]:
    q, size = r["quality"], r["size"]
    first = next(iter(q.values()))
    tasks = list(first["tasks"])
    lines = ["", "## Quality", "",
             f"Held-out scores after {size['epochs']} epoch(s) from the same warmed-up student (seeds {size['seeds']}; "
             f"{', '.join(HEADLINE)}: seeds {size['headline_seeds']}). Best mean per column in **bold**.", "",
             "| method | " + " | ".join(tasks) + " | Δ vs SeqKD | student steps | distinct-2 | self-BLEU | wall s / run |",
             "|---" * (len(tasks) + 6) + "|",
             "| task program (teacher responses) | " + " | ".join(f"{first['teacher'].get(t, float('nan')):.3f}" for t in tasks) + " | | | | | |"]
    white_box = next((row for row in q.values() if "teacher_model" in row), None)
    if white_box:
        lines.append("| teacher model (white-box methods), greedy | "
                     + " | ".join(f"{white_box['teacher_model'].get(t, float('nan')):.3f}" for t in tasks) + " | | | | | |")
    blank = " | ".join("" for _ in tasks[:-1])
    lines += [f"| student, untrained | {blank} | {pm(first['untrained'])} | | | | | |",
              f"| student, after warm-up (start of every method) | {blank} | {pm(first['start'])} | | | | | |"]
    best = {t: max(row["tasks"][t][0] for row in q.values()) for t in tasks}
    for name, row in q.items():
        cells = [f"**{pm(row['tasks'][t])}**" if row["tasks"][t][0] == best[t] else pm(row["tasks"][t]) for t in tasks]
        div = row.get("diversity", {})
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {signed(row['delta']) if name != BASELINE else 'baseline'} | "
                     f"{_steps(row)} | {pm(div['distinct_2']) if div else ''} | {pm(div['self_bleu']) if div else ''} | "
                     f"{row['seconds'][0]:.0f} |")
    return lines


def headline(r: dict) -> list[str]:
    """The mission's question in one paragraph: black-box PbKD against SeqKD, same steps and same wall-clock."""
    lines = ["", "### Does black-box PbKD beat SeqKD?", ""]
    for name, (mean, half, seeds) in r["headline"].items():
        lines.append(f"- {name} − SeqKD, same student steps: **{signed([mean, half])} points** (95% interval, {seeds} paired seeds).")
    same = r.get("pbkd", {}).get("same_wall_clock")
    if same:
        lines.append(f"- {same['of']} − {same['row']}: **{signed(same['delta'])} points** (same wall-clock).")
    return lines


def pbkd_table(r: dict) -> list[str]:
    """Black-box PbKD variants against SeqKD from the same checkpoint (docs/pbkd-quality.md)."""
    rows = dict(r["pbkd"]["rows"])
    for name in HEADLINE[1:]:  # the recommended settings' rows are the quality table's
        if name in r.get("quality", {}):
            rows[f"recommended: {name}"] = r["quality"][name]
    tasks = [task for task in next(iter(rows.values()))["tasks"] if task != "mean"]
    lines = ["", "## Black-box PbKD variants", "",
             f"From the same warmed-up student as every method, {r['size']['epochs']} epoch(s) (online: one iteration per epoch). "
             "Reward model: held-out preference accuracy (teacher vs the current student's samples, as the labeler decides) "
             "and ranking accuracy (does it order a held-out prompt's samples as the task's verifier does: what the "
             "student's group advantages rely on), each the mean over seeds at each epoch's end. Variants: "
             "`configs/blackbox.yaml` plus the overrides listed under Exact commands; the SeqKD row with a time budget "
             "stops at the recommended offline row's mean wall time"
             + "".join(f" (taken from {row['budget_from']})" for row in rows.values() if row.get("budget_from", "records") != "records")
             + ".", "",
             "| variant | " + " | ".join(tasks) + " | mean | Δ vs SeqKD | reward model pref. acc per epoch | "
             "ranking acc per epoch | student steps | wall s |", "|---" * (len(tasks) + 7) + "|"]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(pm(row["tasks"][task]) for task in tasks) + f" | {pm(row['tasks']['mean'])} | "
                     f"{signed(row['delta'])} | {per_epoch(row.get('reward_acc_per_epoch'))} | "
                     f"{per_epoch(row.get('ranking_acc_per_epoch'))} | {_steps(row)} | {row['seconds'][0]:.0f} |")
    return lines


def iterations_table(r: dict) -> list[str]:
    at = r["iterations"]["at"]
    lines = ["", "## Offline against online iterations (black-box PbKD, recommended settings)", "",
             "Read off one offline and one online run per seed, each as long as the longest count: after n iterations is "
             "the held-out score after epoch n (an online run's first n iterations do not depend on how many follow; "
             "offline, epoch n of a run whose samples were drawn for all its epochs at the start). `online − offline`: "
             "paired by seed, in points. Reward model: its held-out preference accuracy at that epoch's end (the "
             "student's surrogate opens at 0.9).", "",
             "| after n epochs / iterations | offline held-out | online held-out | online − offline | reward model acc, offline | "
             "reward model acc, online | student steps | seconds, offline / online |", "|---|---|---|---|---|---|---|---|"]

    def cell(row, side, key):
        return pm(row[side][key]) if side in row and key in row[side] else "–"

    for n, row in at.items():
        any_side = row.get("online") or row.get("offline")
        seconds = " / ".join(f"{row[side]['seconds']:.0f}" if side in row else "–" for side in ("offline", "online"))
        lines.append(f"| {n} | {cell(row, 'offline', 'score')} | {cell(row, 'online', 'score')} | "
                     f"{signed(row['delta']) if 'delta' in row else '–'} | {cell(row, 'offline', 'reward_acc')} | "
                     f"{cell(row, 'online', 'reward_acc')} | {any_side['steps']:.0f} | {seconds} |")
    accs = [m for row in r["iterations"]["runs"].values() for m, _ in row.get("reward_acc_per_epoch", [])]
    if accs:
        lines.append(f"\nReward model at or above 90% in {sum(x >= 0.9 for x in accs)} of {len(accs)} epochs/iterations "
                     "(both runs, every epoch, means over seeds).")
    return lines


def verdict(delta) -> str:
    """Where a paired difference's 95% interval lies: above 0, below 0, or across it."""
    mean, half = delta
    if math.isnan(mean) or math.isnan(half):
        return "–"
    return "better" if mean - half > 0 else "worse" if mean + half < 0 else "same"


def outside_table(r: dict) -> list[str]:
    """The method ordering on the task outside the project, beside the testbed's."""
    o = r["outside"]
    rows, testbed = o["rows"], o["testbed_delta"]
    first = next(iter(rows.values()))
    lines = ["", "## The ordering on a task outside the project", "",
             "`benchmarks/outside_task.py`: sorting digits by value and spelling numbers digit by digit, mixed in one data "
             "set and scored by ROUGE-L against the reference (no built-in task has either; the student, warm-up and method "
             f"configs are the testbed's); {r['size']['outside']['train_size']:,} training and "
             f"{r['size']['outside']['val_size']:,} held-out prompts as JSONL files, a response-file teacher with one "
             "mistake in about 5% of its answers, through the CLI "
             f"(`data.train_file`, `data.val_file`, `data.teacher: ResponseFileTeacher`); {r['size']['epochs']} epoch(s), the "
             "testbed's settings otherwise. Black-box methods only (a response file has no probabilities). `vs SeqKD`: "
             "where the paired difference's 95% interval lies (better, worse, or same: across 0).", "",
             "| method | held-out score | Δ vs SeqKD | vs SeqKD | testbed Δ vs SeqKD | testbed vs SeqKD | reward model acc per epoch | wall s / run |",
             "|---|---|---|---|---|---|---|---|",
             f"| teacher responses | {first['teacher'].get('mean', float('nan')):.3f} | | | | | | |",
             f"| student, after warm-up | {pm(first['start'])} | | | | | | |"]
    identical = set(o["identical"])
    for name, row in rows.items():
        base = name == BASELINE
        mark = testbed.get(name)
        said = "identical (every seed)" if name in identical else verdict(row["delta"])
        lines.append(f"| {name} | {pm(row['tasks']['mean'])} | {'baseline' if base else signed(row['delta'])} | "
                     f"{'' if base else said} | {'' if base or not mark else signed(mark)} | "
                     f"{'' if base or not mark else verdict(mark)} | {per_epoch(row.get('reward_acc_per_epoch'))} | "
                     f"{row['seconds'][0]:.0f} |")
    compared = [n for n in rows if n != BASELINE and n in testbed and n not in identical]
    agree = sum(verdict(rows[n]["delta"]) == verdict(testbed[n]) for n in compared)
    lines += ["", f"Order by mean, outside: {o['order']}."]
    if o["testbed_order"]:
        lines += [f"Order by mean, testbed: {o['testbed_order']}.",
                  f"Against SeqKD, the two agree for {agree} of {len(compared)} methods"
                  + (f" (not counted: {', '.join(sorted(identical))}, equal to SeqKD on every seed, so it says nothing about "
                     "the method)" if identical else "") + "; a verdict of `same` from a wide interval is weak evidence."]
    return lines


def diversity_table(r: dict) -> list[str]:
    q = r["quality"]
    names = [n for n in q if "diversity" in q[n]]
    if not names:
        return []
    lines = ["", "## Quality against diversity", "", "K samples per held-out prompt at the sampling temperature; "
             "distinct-2 higher and self-BLEU lower = more varied (the `distinct` task has many right answers).", "",
             "| method | held-out mean | distinct score | distinct-2 | self-BLEU |", "|---|---|---|---|---|"]
    for name in names:
        row = q[name]
        task = pm(row["tasks"]["distinct"]) if "distinct" in row["tasks"] else "–"
        lines.append(f"| {name} | {pm(row['tasks']['mean'])} | {task} | {pm(row['diversity']['distinct_2'])} | "
                     f"{pm(row['diversity']['self_bleu'])} |")
    return lines


def speed_tables(r: dict) -> list[str]:
    s = r["speed"]
    lines = ["", "## Speed", "", "Training steps per second: the library (Lightning, logging, manual optimization) against a "
             "hand-written loop doing the same losses, AdamW steps and clipping on the same batches, after 2 warm-up steps "
             f"({r['size']['speed_steps']} steps each; in rows marked ‡ the two alternate step for step, the hand loop's step taken "
             "after each of the library's on the same models, so the machine's slow spells fall on both alike; unmarked rows ran "
             "the library's steps first, then the hand loop's); "
             "steps/s and `ratio` from each side's median step time (a batch's start to the "
             "next's), `ratio of means` from their mean step times. Target ≥ 0.95×. Reverse KL, skew KL/RKL and TVD share forward KL's step code. "
             "FLOPs per step: the mean of 8 more hand-loop steps under torch's FlopCounterMode (critic and student steps, sampling included); "
             "the library's FLOP/s are those FLOPs at its steps/s, against the best float32 1024³ matmul measured in the same run.", "",
             "| method | library steps/s | hand loop steps/s | ratio | ratio of means | GFLOP/step | library GFLOP/s | of matmul peak |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in s["steps"].items():
        flops = (f"{row['flops_per_step'] / 1e9:.2f} | {row['library_flops_per_s'] / 1e9:.1f} | {100 * row['fraction_of_peak']:.0f}% "
                 f"(of {row['matmul_peak_flops_per_s'] / 1e9:.0f}) |" if "flops_per_step" in row else "– | – | – |")
        # three decimals: the goal is 0.95, and 0.947 must not print as it
        means = f"{row['ratio_of_means']:.3f}" if "ratio_of_means" in row else "–"  # not measured before the medians
        mark = " ‡" if row.get("interleaved") else ""
        lines.append(f"| {name}{mark} | {row['library_steps_per_s']:.2f} | {row['manual_steps_per_s']:.2f} | {row['ratio']:.3f} | {means} | {flops}")
    sampling = s.get("sampling") or {}
    if "ratio" in sampling:  # a report from before the sampling rows (one row, the default student)
        sampling = {"sampling": sampling}
    if sampling:
        lines += ["", "Student sampling (the data module's `generate`: one prefill per prompt for its K samples, the prompt's keys "
                  "and values held once for them, each step through the model's own modules) against a plain `model.generate` "
                  "loop with the KV cache, same prompts, batch and settings, best of 3 each; MiniLLM's teacher-mixed sampler "
                  "(the student and a teacher decoding together: a 4 × 192 one beside the default student, the model itself "
                  "beside SmolLM2) against the same plain loop of the student alone, and the teacher's own decode alone "
                  "(`both alone`: the ratio of the student's and the teacher's own decodes run in turn, what mixing costs at "
                  "least). `compiled plain`: the same plain loop with transformers' static cache under `torch.compile` (compiled "
                  "once before the rounds, off the clock; `compile s` its first call, with the graphs it compiled and those compiled "
                  "again while timed), and the library's rate against it. "
                  "Targets: ≥ 2× and, mixed, ≥ 0.8×.", "",
                  "| row | prompts × K, new tokens | library tokens/s | plain tokens/s | ratio | compiled plain tokens/s | "
                  "library ÷ compiled | compile s | mixed tokens/s | mixed ratio | teacher alone tokens/s | both alone ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, g in sampling.items():
            shape = f"{g['prompts']} × {g['samples']}, {g['max_new_tokens']}" if "samples" in g else "–"
            lines.append(f"| {name} | {shape} | {g['library_tokens_per_s']:.0f} | {g['plain_tokens_per_s']:.0f} | {g['ratio']:.2f} | "
                         + (f"{g['compiled_plain_tokens_per_s']:.0f} | {g['compiled_ratio']:.2f} | {g['compile_seconds']:.0f}"
                            + (f" ({g['compiled_graphs']}, {g['graphs_compiled_while_timed']})" if "compiled_graphs" in g else "") + " | "
                            if "compiled_ratio" in g else "– | – | – | ")
                         + (f"{g['mixed_tokens_per_s']:.0f} | {g['mixed_ratio']:.2f} | " if "mixed_ratio" in g else "– | – | ")
                         + (f"{g['teacher_tokens_per_s']:.0f} | {g['mixed_bound_ratio']:.2f} |" if "mixed_bound_ratio" in g else "– | – |"))
    if s["divergence"]:
        lines += ["", "Chunked divergence (forward KL, forward + backward, float32) against the naive full-tensor formula, each in a fresh "
                  "process; peak extra memory = peak RSS above the inputs. Targets: memory ≤ 0.35×, time ≤ 1.2×.", "",
                  "| batch × tokens | vocabulary | naive s | chunked s | time × | naive MB | chunked MB | memory × |", "|---|---|---|---|---|---|---|---|"]
        for row in s["divergence"]:
            lines.append(f"| {row['batch']} × {row['tokens']} | {row['vocab']:,} | {row['naive']['seconds']:.2f} | {row['chunked']['seconds']:.2f} | "
                         f"{row['time_ratio']:.2f} | {row['naive']['peak_extra_mb']:.0f} | {row['chunked']['peak_extra_mb']:.0f} | {row['memory_ratio']:.2f} |")
    if s.get("fused"):
        lines += ["", "Fused projection + divergence (`losses.fused_divergence`, forward KL, forward + backward, float32) from both models' "
                  "hidden states at the scored rows and their head weights (student 896 wide, teacher 1,536), against projecting "
                  "every row to logits and the naive formula; each in a fresh process, both ending with the student's hidden-state "
                  "and head-weight gradients. Targets: memory ≤ 0.15× and time ≤ 1.0× at vocabulary 151,936.", "",
                  "| scored rows | vocabulary | naive s | fused s | time × | naive MB | fused MB | memory × |", "|---|---|---|---|---|---|---|---|"]
        for row in s["fused"]:
            lines.append(f"| {row['rows']:,} | {row['vocab']:,} | {row['naive']['seconds']:.2f} | {row['fused']['seconds']:.2f} | "
                         f"{row['time_ratio']:.2f} | {row['naive']['peak_extra_mb']:.0f} | {row['fused']['peak_extra_mb']:.0f} | {row['memory_ratio']:.2f} |")
    return lines


def trl_table(r: dict) -> list[str]:
    lines = ["", "## Against TRL", "", "GKD (generalized JSD, β = 0.5) through this library's CLI against TRL's `GKDTrainer` "
             "(`benchmarks/against_trl.py`; TRL from the `bench` extra): the same random Qwen2 teacher (4 × 256) and student "
             "(2 × 128) over a word-level tokenizer, 256 chat examples of ~130 tokens, batch 8, AdamW 1e-4 with a linear "
             "schedule, clipping 1, on-policy samples of up to 72 tokens; each side in its own process, float32, 2 threads. "
             "Off-policy is λ = 0 (the data's answers), on-policy λ = 1 (fresh student samples every step). Equal math: one "
             "batch through both losses in float64, relative difference of the loss and of the student's gradient. "
             "Goals: ≥ 4× TRL at vocabulary 8,192 and ≥ 8× at 49,152, off- and on-policy. "
             "How close to the machine: a few more steps off the clock under torch's FlopCounterMode give each side's FLOPs "
             "per step (sampling included); `of peak` is that at its steps/s against the best float32 1024³ matmul measured "
             "in the same process, and `goal needs` the library's FLOPs per step at the goal's multiple of TRL's steps/s, "
             "as a fraction of that peak.", "",
             "| vocabulary | policy | library steps/s | TRL steps/s | × TRL | library peak RSS MB | TRL peak RSS MB | scored tokens/step (library/TRL) | GFLOP/step (library/TRL) | of peak (library/TRL) | goal needs | equal math: loss, gradient |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["trl"]:
        if "skipped" in row:
            lines.append(f"| {row['vocab']:,} | – | skipped: {row['skipped']} | | | | | | | | | |")
            continue
        check = row["equal_math"]
        for policy in ("off", "on"):
            p = row[policy]
            lines.append(f"| {row['vocab']:,} | {policy} | {p['library']['steps_per_s']:.2f} | {p['trl']['steps_per_s']:.2f} | "
                         f"{p['ratio']:.2f} | {p['library']['peak_rss_mb']:.0f} | {p['trl']['peak_rss_mb']:.0f} | "
                         f"{p['library']['scored_tokens_per_step']:.0f} / {p['trl']['scored_tokens_per_step']:.0f} | "
                         f"{_trl_machine(p)} | {check['loss_rel_diff']:.1e}, {check['grad_rel_diff']:.1e} |")
    return lines


def _trl_machine(p: dict) -> str:
    """The GFLOP/step, fraction-of-peak and goal cells of a policy's row; dashes for a record from before they were
    measured."""
    library, trl = p["library"], p["trl"]
    if "flops_per_step" not in library:
        return "– | – | –"
    goal = f"{p['goal_fraction_of_peak']:.0%} (at {p['goal']:g}×)" if "goal" in p else "–"
    return (f"{library['flops_per_step'] / 1e9:.2f} / {trl['flops_per_step'] / 1e9:.2f} | "
            f"{library['fraction_of_peak']:.0%} / {trl['fraction_of_peak']:.0%} | {goal}")


def scaling_table(r: dict) -> list[str]:
    sc, size = r["scaling"], r["size"]["scaling"]
    lines = ["", "## Scaling", "", f"Forward KL loss, forward + backward, batch {size['batch']}: time and peak extra memory as the "
             f"sequence doubles (vocabulary {size['vocab']:,}) and as the vocabulary grows ({size['at_tokens']} tokens). "
             "Plots: `plots/scaling.png`.", "", "| axis | value | naive s | chunked s | naive MB | chunked MB |", "|---|---|---|---|---|---|"]
    for axis in ("tokens", "vocab"):
        for row in sc[axis]:
            lines.append(f"| {axis} | {row['x']:,} | {row['naive']['seconds']:.2f} | {row['chunked']['seconds']:.2f} | "
                         f"{row['naive']['peak_extra_mb']:.0f} | {row['chunked']['peak_extra_mb']:.0f} |")
    return lines


def gpu(r: dict) -> list[str]:
    device = r["machine"].get("cuda")
    note = (f"a CUDA device was found ({device}), but the GPU speed table is not implemented yet" if device
            else "no CUDA device on this machine: the GPU section was skipped, not estimated")
    return ["", "## GPU", "", note + "."]


def commands(r: dict) -> list[str]:
    rows = [(name, row) for name, row in r.get("quality", {}).items()]
    rows += [(f"PbKD table: {label}", row) for label, row in r.get("pbkd", {}).get("rows", {}).items()]
    rows += [(f"Iterations table: {label}", row) for label, row in r.get("iterations", {}).get("runs", {}).items()]
    rows += [(f"Outside task: {label}", row) for label, row in r.get("outside", {}).get("rows", {}).items()]
    lines = ["", "## Exact commands", "", f"`{r['command']}`" + ("; each fit is `python -m pbkd_lightning fit` with the method's "
             "config and (besides its own folder and the shared caches):" if rows else "."), ""]
    lines += [f"- {name}: `{' '.join(row['args'])}`" for name, row in rows]
    if drawn := plot_names(r):
        lines += ["", "Plots: " + ", ".join(f"`plots/{p}.png`" for p in drawn) + "."]
    return lines + [""]


def plot_names(r: dict) -> list[str]:
    """The plots the sections in ``r`` draw."""
    per_section = {"quality": ["learning_curves", "quality"], "iterations": ["iterations"], "pbkd": ["pbkd"], "scaling": ["scaling"]}
    return [name for section, names in per_section.items() if section in r for name in names]


def plots(r: dict, folder: str) -> None:
    """The PNGs of the sections in ``r``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(folder, f"{name}.png"), dpi=100)
        plt.close(fig)

    if q := r.get("quality"):
        fig, (by_step, by_second) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
        for name, row in q.items():
            steps = row.get("curve_steps", list(range(len(row["curve"]))))
            by_step.plot(steps, row["curve"], marker="o", label=name)
            if "curve_seconds" in row:
                by_second.plot(row["curve_seconds"], row["curve"], marker="o", label=name)
        by_step.set(xlabel="student optimizer steps", ylabel="held-out mean score", title="Learning curves (mean over seeds)")
        by_second.set(xlabel="seconds since the fit began", title="… against wall-clock")
        by_step.legend(fontsize=7)
        save(fig, "learning_curves")

        fig, ax = plt.subplots(figsize=(9, 5))
        names = list(q)
        ax.bar(range(len(names)), [q[n]["tasks"]["mean"][0] for n in names],
               yerr=[0 if math.isnan(q[n]["tasks"]["mean"][1]) else q[n]["tasks"]["mean"][1] for n in names], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set(ylabel="held-out mean score", title="Quality (mean and 95% interval over seeds)")
        save(fig, "quality")

    if it := r.get("iterations"):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for label, row in it["runs"].items():
            accs = [m for m, _ in row.get("reward_acc_per_epoch", [])]
            left.plot(range(len(accs)), accs, marker="o", label=label)
            right.plot(row.get("curve_steps", list(range(len(row["curve"])))), row["curve"], marker="o", label=label)
        left.axhline(0.9, ls="--", c="grey")
        left.set(xlabel="epoch / iteration", ylabel="reward model held-out accuracy", title="Offline vs online")
        right.set(xlabel="student optimizer steps", ylabel="held-out mean score", title="Learning curves")
        left.legend(fontsize=7)
        save(fig, "iterations")

    if p := r.get("pbkd"):
        rows = p["rows"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = list(rows)
        deltas = [rows[n]["delta"] for n in labels]
        left.barh(range(len(labels)), [d[0] * 100 for d in deltas],
                  xerr=[0 if math.isnan(d[1]) else d[1] * 100 for d in deltas], capsize=3)
        left.set_yticks(range(len(labels)), labels, fontsize=6)
        left.axvline(0, ls="--", c="grey")
        left.set(xlabel="Δ held-out mean vs SeqKD (points, paired, 95% interval)", title="PbKD variants vs SeqKD")
        for label, row in rows.items():
            if row.get("reward_acc_per_epoch"):
                right.plot(range(len(row["reward_acc_per_epoch"])), [m for m, _ in row["reward_acc_per_epoch"]], marker="o", label=label)
        right.axhline(0.9, ls="--", c="grey")
        right.set(xlabel="epoch / iteration", ylabel="reward model held-out pref. accuracy", title="Reward model quality")
        right.legend(fontsize=6)
        save(fig, "pbkd")

    if sc := r.get("scaling"):
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        for column, axis in enumerate(("tokens", "vocab")):
            xs = [row["x"] for row in sc[axis]]
            for variant in ("naive", "chunked"):
                axes[0][column].plot(xs, [row[variant]["seconds"] for row in sc[axis]], marker="o", label=variant)
                axes[1][column].plot(xs, [row[variant]["peak_extra_mb"] for row in sc[axis]], marker="o", label=variant)
            axes[0][column].set(xscale="log", xlabel=axis, ylabel="seconds")
            axes[1][column].set(xscale="log", xlabel=axis, ylabel="peak extra MB")
            axes[0][column].legend()
        fig.suptitle("Forward KL loss, forward + backward")
        save(fig, "scaling")


def previous_results(out: str) -> Optional[dict]:
    """The results.json already in ``out`` (None if there is none)."""
    if not os.path.exists(os.path.join(out, "results.json")):
        return None
    with open(os.path.join(out, "results.json")) as handle:
        return json.load(handle)


def write(records: list[dict], size: Size, command: str, out: str, forget: frozenset = frozenset()) -> str:
    """results.json, plots/ and RESULTS.md in ``out``, from ``records`` (and the sections of the results.json already
    there that have no records); returns RESULTS.md's text."""
    previous = previous_results(out)
    figures = json.loads(json.dumps(results(records, size, command, previous, frozenset(forget))))  # rendered from exactly what results.json holds
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(figures, handle, indent=1)
    plots(figures, os.path.join(out, "plots"))
    for name in os.listdir(os.path.join(out, "plots")):  # a plot of a section this report no longer has is stale
        if name.endswith(".png") and name[: -len(".png")] not in plot_names(figures):
            os.unlink(os.path.join(out, "plots", name))
    text = markdown(figures)
    with open(os.path.join(out, "RESULTS.md"), "w") as handle:
        handle.write(text)
    return text


def main(argv=None) -> None:
    from benchmarks.run import default_out, records_file
    from benchmarks.runner import load_records

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick size's records")
    parser.add_argument("--out", help="folder for RESULTS.md, results.json and plots/ (default: benchmarks/; with --quick "
                                      "runs/bench-quick)")
    parser.add_argument("--records", help="the runner's records (default: runs.jsonl next to the report)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    args.out = args.out or default_out(mode)
    path = args.records or records_file(args.out)
    records = [r for r in load_records(path) if r["mode"] == mode]
    if not records:
        raise SystemExit(f"no {mode} records in {path}")
    print(write(records, SIZES[mode], f"python -m benchmarks.report{' --quick' if args.quick else ''}", args.out))


if __name__ == "__main__":
    main()
