"""Turns the runner's records (one JSON line per run) into results.json, RESULTS.md and plots/.

    python -m benchmarks.report [--quick] [--out DIR] [--records FILE]   # rewrite them from the records alone

Every figure in RESULTS.md is one of results.json's, and each of those is computed here from the records:
a row is the mean ± std over its seeds' runs. When a run was recorded more than once, the last record counts.
"""

import argparse
import dataclasses
import json
import os
import statistics

from benchmarks.experiments import SECTIONS, SIZES, Size, experiments


def mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


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
    """Mean ± std over the seeds of a fit's held-out scores, diversity, reward-model accuracy and wall time."""
    summaries = [r["summary"] for r in runs]
    finals = [s["student_final"] for s in summaries]
    tasks = sorted(t for t in finals[0] if t != "mean") + ["mean"]
    row = {"tasks": {t: mean_std([f[t] for f in finals]) for t in tasks}, "seconds": mean_std([r["seconds"] for r in runs]),
           "start": mean_std([s["student_start"]["mean"] for s in summaries]),
           "untrained": mean_std([s.get("student_before_warmup", {}).get("mean", float("nan")) for s in summaries]),
           "curve": [statistics.fmean(c) for c in zip(*[r["curve"] for r in runs])],
           "teacher": summaries[0]["teacher"], "args": runs[0]["args"], "seeds": [r["seed"] for r in runs]}
    diversity = [s.get("student_final_diversity") for s in summaries]
    if all(diversity):
        row["diversity"] = {k: mean_std([d[k] for d in diversity]) for k in diversity[0]}
    history = [s.get("heldout_pref_acc_per_epoch") or [] for s in summaries]
    for key, name in (("all", "reward_acc_per_epoch"), ("sample_ranking", "ranking_acc_per_epoch")):
        epochs = min(map(len, history))
        if epochs and all(key in h[i] for h in history for i in range(epochs)):
            row[name] = [mean_std([h[i][key] for h in history]) for i in range(epochs)]
    if "teacher_model" in summaries[0]:
        row["teacher_model"] = summaries[0]["teacher_model"]
    if "max_time_s" in runs[0]:
        row["max_time_s"] = runs[0]["max_time_s"]
    return row


def best_pbkd_variant(records: list[dict]) -> tuple[str, float]:
    """The PbKD section's best variant (highest held-out mean over its seeds, SeqKD rows aside) and its mean
    wall seconds: the budget of the same-wall-clock SeqKD row."""
    runs = {}
    for r in records:
        if r["section"] == "pbkd" and not r["tags"].get("baseline"):
            runs.setdefault(r["name"], {})[r["seed"]] = r  # the last record of a seed counts
    if not runs:
        raise ValueError("no PbKD variant has been run yet")
    name = max(runs, key=lambda n: statistics.fmean(r["summary"]["student_final"]["mean"] for r in runs[n].values()))
    return name, statistics.fmean(r["seconds"] for r in runs[name].values())


def results(records: list[dict], size: Size, command: str) -> dict:
    """results.json: every figure the report shows, per section; sections without records are left out."""
    grouped = {section: by_row(records, size, section) for section in SECTIONS}
    out = {"mode": size.name, "command": command, "size": dataclasses.asdict(size)}
    if grouped["quality"]:
        out["quality"] = {name: fit_row(runs) for name, runs in grouped["quality"].items()}
    if grouped["ablations"]:
        out["ablations"] = {name: {**run["tags"], "mean": run["summary"]["student_final"]["mean"], "curve": run["curve"],
                                   "reward_acc": [h["all"] for h in run["summary"].get("heldout_pref_acc_per_epoch", [])],
                                   "seconds": run["seconds"], "args": run["args"]}
                            for name, [run] in grouped["ablations"].items()}
    if grouped["pbkd"]:
        rows = {}
        for name, runs in grouped["pbkd"].items():
            row = dict(fit_row(runs), baseline=bool(runs[0]["tags"].get("baseline")))
            rows[f"{name} ({row['max_time_s']} s)" if "max_time_s" in row else name] = row
        variants = [label for label, row in rows.items() if not row["baseline"]]
        out["pbkd"] = {"rows": rows, "variants": variants, "epochs": size.pbkd_epochs, "overrides": list(size.pbkd_overrides),
                       "best": max(variants, key=lambda label: rows[label]["tasks"]["mean"][0]) if variants else None}
    if grouped["speed"]:
        speed = out["speed"] = {"steps": {}, "sampling": None, "divergence": []}
        for name, [run] in grouped["speed"].items():
            if run["measure"] == "benchmarks.step_speed:measure":
                speed["steps"][name] = run["figures"]
            elif run["measure"] == "benchmarks.sampling_speed:measure":
                speed["sampling"] = run["figures"]
            else:
                speed["divergence"].append(run["figures"])
    if grouped["scaling"]:
        out["scaling"] = {"tokens": [], "vocab": []}
        for [run] in grouped["scaling"].values():
            out["scaling"][run["tags"]["axis"]].append({"x": run["tags"]["x"], **run["figures"]})
    runs = {section: [r for seeds in rows.values() for r in seeds] for section, rows in grouped.items()}
    out["sections"] = {section: {"started": min(r["started"] for r in done), "commits": sorted({r["machine"]["commit"] for r in done}),
                                 "minutes": sum(r["seconds"] for r in done) / 60} for section, done in runs.items() if done}
    every = sorted((r for done in runs.values() for r in done), key=lambda r: r["started"])
    out["machine"] = every[-1]["machine"] if every else {}
    out["seconds"] = sum(r["seconds"] for r in every)
    return out


def pm(pair, digits=3) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def per_epoch(pairs) -> str:
    return ", ".join(f"{m:.2f}" for m, _ in pairs) if pairs else "–"


def markdown(r: dict) -> str:
    lines = header(r)
    for section, render in (("quality", quality_table), ("ablations", ablation_table), ("pbkd", pbkd_table),
                            ("quality", diversity_table), ("speed", speed_tables), ("scaling", scaling_table)):
        if section in r:
            lines += render(r)
    lines += gpu(r) + commands(r)
    return "\n".join(lines)


def header(r: dict) -> list[str]:
    m, sections = r["machine"], r["sections"]
    lines = [f"# Benchmark results ({r['mode']})", "",
             f"Written by `{r['command']}` from the runs' records (one JSON line per run); every figure below comes from "
             "those runs (also in `results.json` next to this file)."]
    if m:
        lines += ["", f"Machine: {m['platform']}, {m['processor']}, {m['cpus']} CPUs, {m['memory_gib']} GiB. "
                  f"Python {m['python']}, torch {m['torch']}, lightning {m['lightning']}, transformers {m['transformers']}. "
                  f"Commit {m['commit']}. Total wall time of the runs {r['seconds'] / 60:.1f} min."]
    if len({c for v in sections.values() for c in v["commits"]}) > 1:  # e.g. a section re-run later with --fresh
        lines += ["", "Not every section comes from the same commit; each from:", ""]
        lines += [f"- {name}: runs from {v['started']}, commit {', '.join(v['commits'])}, {v['minutes']:.1f} min"
                  for name, v in sections.items()]
    missing = [s for s in SECTIONS if s not in r]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return lines


def quality_table(r: dict) -> list[str]:
    q, size = r["quality"], r["size"]
    first = next(iter(q.values()))
    tasks = list(first["tasks"])
    lines = ["", "## Quality", "",
             f"Held-out scores after {size['epochs']} epoch(s) from the same warmed-up student, mean ± std over "
             f"seeds {size['seeds']} (seed of the run and of the student's initialisation; same data and teacher). "
             "Best per column in **bold**.", "",
             "| method | " + " | ".join(tasks) + " | distinct-2 | self-BLEU | wall s / run |", "|---" * (len(tasks) + 4) + "|",
             "| task program (teacher responses) | " + " | ".join(f"{first['teacher'].get(t, float('nan')):.3f}" for t in tasks) + " | | | |"]
    white_box = next((row for row in q.values() if "teacher_model" in row), None)
    if white_box:
        lines.append("| teacher model (white-box methods), greedy | "
                     + " | ".join(f"{white_box['teacher_model'].get(t, float('nan')):.3f}" for t in tasks) + " | | | |")
    blank = " | ".join("" for _ in tasks[:-1])
    lines += [f"| student, untrained | {blank} | {pm(first['untrained'])} | | | |",
              f"| student, after warm-up (start of every method) | {blank} | {pm(first['start'])} | | | |"]
    best = {t: max(row["tasks"][t][0] for row in q.values()) for t in tasks}
    for name, row in q.items():
        cells = [f"**{pm(row['tasks'][t])}**" if row["tasks"][t][0] == best[t] else pm(row["tasks"][t]) for t in tasks]
        div = row.get("diversity", {})
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {pm(div['distinct_2']) if div else ''} | "
                     f"{pm(div['self_bleu']) if div else ''} | {row['seconds'][0]:.0f} |")
    return lines


def ablation_table(r: dict) -> list[str]:
    a = r["ablations"]
    lines = ["", "## Ablations (black-box PbKD, one seed)", "",
             "| variant | held-out mean | reward model held-out accuracy per epoch / iteration | wall s |", "|---|---|---|---|"]
    for table in ("online", "beta"):
        for label, row in a.items():
            if row["table"] == table:
                lines.append(f"| {label} | {row['mean']:.3f} | {', '.join(f'{x:.3f}' for x in row['reward_acc'])} | {row['seconds']:.0f} |")
    accs = [x for row in a.values() if row["table"] == "online" for x in row["reward_acc"]]
    if accs:
        lines.append(f"\nReward model at or above 90% in {sum(x >= 0.9 for x in accs)} of {len(accs)} epochs/iterations above (the goal is all).")
    return lines


def pbkd_table(r: dict) -> list[str]:
    """Issue 8's table: every black-box PbKD variant against SeqKD from the same checkpoint (docs/pbkd-quality.md)."""
    t = r["pbkd"]
    rows = t["rows"]
    seqkd = rows.get("SeqKD, same epochs")
    tasks = [task for task in next(iter(rows.values()))["tasks"] if task != "mean"]
    lines = ["", "## Black-box PbKD against SeqKD (issue 8)", "",
             f"From the same warmed-up student as every method, {t['epochs']} epoch(s) (online: one iteration per epoch), "
             + (f"overrides `{' '.join(t['overrides'])}` on top of the quality section's" if t["overrides"] else "the quality section's overrides")
             + f"; mean ± std over seeds {r['size']['seeds']}. "
             "Reward model: held-out preference accuracy (teacher vs the current student's samples, as the labeler decides) "
             "and ranking accuracy (does it order a held-out prompt's samples as the task's verifier does: what the "
             "student's group advantages rely on), each the mean over seeds at each epoch's end. Variants: "
             "`configs/blackbox.yaml` plus the overrides listed under Exact commands.", "",
             "| variant | " + " | ".join(tasks) + " | mean | Δ vs SeqKD | reward model pref. acc per epoch | "
             "ranking acc per epoch | wall s |", "|---" * (len(tasks) + 6) + "|"]
    for label, row in rows.items():
        delta = f"{row['tasks']['mean'][0] - seqkd['tasks']['mean'][0]:+.3f}" if seqkd else "–"
        lines.append(f"| {label} | " + " | ".join(pm(row["tasks"][task]) for task in tasks) + f" | {pm(row['tasks']['mean'])} | "
                     f"{delta} | {per_epoch(row.get('reward_acc_per_epoch'))} | {per_epoch(row.get('ranking_acc_per_epoch'))} | "
                     f"{row['seconds'][0]:.0f} |")
    if t["best"] and seqkd:
        best = rows[t["best"]]
        seqkd_means = [row["tasks"]["mean"][0] for row in rows.values() if row["baseline"]]
        accs = [m for m, _ in best.get("reward_acc_per_epoch", [])]
        gap = best["tasks"]["mean"][0] - max(seqkd_means)
        met = gap >= 0.03 and accs and min(accs) >= 0.9
        lines += ["", f"Best PbKD row: **{t['best']}**, {gap * 100:+.1f} points over the better SeqKD row; its reward model's "
                  f"held-out accuracy {', '.join(f'{a:.2f}' for a in accs) or '–'} per epoch. Goal (≥ SeqKD + 3 points with the "
                  f"reward model ≥ 0.90 at every epoch): **{'met' if met else 'not met'}** — see docs/pbkd-quality.md."]
    return lines


def diversity_table(r: dict) -> list[str]:
    q = r["quality"]
    names = [n for n in ("X-KD, sequence-level", "X-KD, divergence-based", "GKD", "SeqKD") if "diversity" in q.get(n, {})]
    if not names:
        return []
    lines = ["", "Diversity against score (quality table, same runs):", "", "| method | held-out mean | distinct-2 | self-BLEU |", "|---|---|---|---|"]
    for name in names:
        row = q[name]
        lines.append(f"| {name} | {pm(row['tasks']['mean'])} | {pm(row['diversity']['distinct_2'])} | {pm(row['diversity']['self_bleu'])} |")
    return lines


def speed_tables(r: dict) -> list[str]:
    s = r["speed"]
    lines = ["", "## Speed", "", "Training steps per second: the library (Lightning, logging, manual optimization) against a "
             "hand-written loop doing the same losses, AdamW steps and clipping on the same batches, after 2 warm-up steps "
             f"({r['size']['speed_steps']} steps each). Target ≥ 0.9×. Reverse KL, skew KL/RKL and TVD share forward KL's step code.", "",
             "| method | library steps/s | hand loop steps/s | ratio |", "|---|---|---|---|"]
    for name, row in s["steps"].items():
        lines.append(f"| {name} | {row['library_steps_per_s']:.2f} | {row['manual_steps_per_s']:.2f} | {row['ratio']:.2f} |")
    if g := s["sampling"]:
        lines += ["", "Student sampling for online pairs (the data module's `generate`) against a plain `model.generate` loop with the KV "
                  "cache, same prompts, batch and settings, best of 3 each. Target ≥ 0.95×.", "",
                  "| library tokens/s | plain tokens/s | ratio |", "|---|---|---|",
                  f"| {g['library_tokens_per_s']:.0f} | {g['plain_tokens_per_s']:.0f} | {g['ratio']:.2f} |"]
    if s["divergence"]:
        lines += ["", "Chunked divergence (forward KL, forward + backward, float32) against the naive full-tensor formula, each in a fresh "
                  "process; peak extra memory = peak RSS above the inputs. Targets: memory ≤ 0.35×, time ≤ 1.2×.", "",
                  "| batch × tokens | vocabulary | naive s | chunked s | time × | naive MB | chunked MB | memory × |", "|---|---|---|---|---|---|---|---|"]
        for row in s["divergence"]:
            lines.append(f"| {row['batch']} × {row['tokens']} | {row['vocab']:,} | {row['naive']['seconds']:.2f} | {row['chunked']['seconds']:.2f} | "
                         f"{row['time_ratio']:.2f} | {row['naive']['peak_extra_mb']:.0f} | {row['chunked']['peak_extra_mb']:.0f} | {row['memory_ratio']:.2f} |")
    return lines


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
    lines = ["", "## Exact commands", "", f"`{r['command']}`" + ("; each fit is `python -m pbkd_lightning fit` with the method's "
             "config and (besides its own folder and the shared caches):" if rows else "."), ""]
    lines += [f"- {name}: `{' '.join(row['args'])}`" for name, row in rows]
    if drawn := plot_names(r):
        lines += ["", "Plots: " + ", ".join(f"`plots/{p}.png`" for p in drawn) + "."]
    return lines + [""]


def plot_names(r: dict) -> list[str]:
    """The plots the sections in ``r`` draw."""
    per_section = {"quality": ["learning_curves", "quality"], "ablations": ["ablations"], "pbkd": ["pbkd"], "scaling": ["scaling"]}
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
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, row in q.items():
            ax.plot(range(len(row["curve"])), row["curve"], marker="o", label=name)
        ax.set(xlabel="epochs of distillation", ylabel="held-out mean score", title="Learning curves (mean over seeds)")
        ax.legend(fontsize=7)
        save(fig, "learning_curves")

        fig, ax = plt.subplots(figsize=(9, 5))
        names = list(q)
        ax.bar(range(len(names)), [q[n]["tasks"]["mean"][0] for n in names], yerr=[q[n]["tasks"]["mean"][1] for n in names], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set(ylabel="held-out mean score", title="Quality (mean ± std over seeds)")
        save(fig, "quality")

    if a := r.get("ablations"):
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for label, row in a.items():
            if row["table"] == "online":
                left.plot(range(len(row["reward_acc"])), row["reward_acc"], marker="o", label=label)
        left.axhline(0.9, ls="--", c="grey")
        left.set(xlabel="epoch / iteration", ylabel="reward model held-out accuracy", title="Offline vs online")
        left.legend(fontsize=7)
        betas = [row for row in a.values() if row["table"] == "beta"]
        right.plot([row["beta"] for row in betas], [row["mean"] for row in betas], marker="o")
        right.set(xscale="log", xlabel="β", ylabel="held-out mean score", title="β of the Lagrangian")
        save(fig, "ablations")

    if p := r.get("pbkd"):
        rows = p["rows"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = list(rows)
        left.barh(range(len(labels)), [rows[n]["tasks"]["mean"][0] for n in labels], xerr=[rows[n]["tasks"]["mean"][1] for n in labels], capsize=3)
        left.set_yticks(range(len(labels)), labels, fontsize=6)
        if "SeqKD, same epochs" in rows:
            left.axvline(rows["SeqKD, same epochs"]["tasks"]["mean"][0], ls="--", c="grey")
        left.set(xlabel="held-out mean score", title="PbKD variants vs SeqKD")
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


def write(records: list[dict], size: Size, command: str, out: str) -> str:
    """results.json, plots/ and RESULTS.md in ``out``, from ``records``; returns RESULTS.md's text."""
    figures = json.loads(json.dumps(results(records, size, command)))  # rendered from exactly what results.json holds
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(figures, handle, indent=1)
    plots(figures, os.path.join(out, "plots"))
    text = markdown(figures)
    with open(os.path.join(out, "RESULTS.md"), "w") as handle:
        handle.write(text)
    return text


def main(argv=None) -> None:
    from benchmarks.run import OUT, default_work
    from benchmarks.runner import load_records

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick size's records")
    parser.add_argument("--out", default=OUT, help="folder for RESULTS.md, results.json and plots/")
    parser.add_argument("--records", help="the runner's records (default: runs.jsonl in the run's work folder)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    path = args.records or os.path.join(default_work(args.out, mode), "runs.jsonl")
    records = [r for r in load_records(path) if r["mode"] == mode]
    if not records:
        raise SystemExit(f"no {mode} records in {path}")
    print(write(records, SIZES[mode], f"python -m benchmarks.report{' --quick' if args.quick else ''}", args.out))


if __name__ == "__main__":
    main()
