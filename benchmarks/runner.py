"""Runs benchmark experiments, appending one JSON line per finished run to a records file.

A run whose record is already in the file (same mode, section, name, seed, arguments and measure) is skipped, so
an interrupted ``make bench`` continues where it stopped. Fits go through the CLI in this process, as
``python -m pbkd_lightning fit`` with the experiment's configs and overrides; measures are plain functions.
"""

import contextlib
import datetime
import glob
import importlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from typing import Optional

import torch
from tqdm.auto import tqdm

from benchmarks.experiments import Experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet_cli(args: list[str], run: bool = True):
    """The project's CLI with its output captured; a failed run raises with what it printed (a parse error would
    otherwise end the whole benchmark through a silent ``SystemExit``)."""
    from pbkd_lightning.cli import build_cli

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return build_cli(args, run=run)
    except SystemExit as error:
        raise RuntimeError(f"the run {' '.join(args)} exited ({error.code}):\n{err.getvalue()[-3000:]}") from None


_parsed: dict = {}


def parsed_config(arguments: tuple[str, ...]) -> dict:
    """The full config these fit arguments give, as ``--print_config`` prints it: files, overlays and defaults
    merged by the CLI itself."""
    import yaml

    from pbkd_lightning.cli import build_cli

    if arguments not in _parsed:
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                build_cli(["fit", *arguments, "--print_config"])
        except SystemExit as error:
            if error.code not in (0, None):
                raise RuntimeError(f"the arguments {' '.join(arguments)} do not parse:\n{err.getvalue()[-3000:]}") from None
        _parsed[arguments] = yaml.safe_load(out.getvalue())
    return _parsed[arguments]


def has_key(config: dict, override: str) -> bool:
    """Whether ``--a.b.c=value`` names a key the config has (through a class's ``init_args``, as the CLI reads
    it); a null section (``model.teacher: null``) has none."""
    node = config
    for part in override.removeprefix("--").split("=", 1)[0].split("."):
        if isinstance(node, dict) and part not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def method_config(experiment: Experiment) -> dict:
    """The parsed config of the experiment's configs and own overrides: what decides which shared overrides apply."""
    return parsed_config(tuple(config_args(experiment)) + experiment.overrides)


def config_args(experiment: Experiment) -> list[str]:
    return [arg for config in experiment.configs for arg in ("--config", config)]


def fit_args(experiment: Experiment, seed: int, budget_s: int | None = None, data: str = "") -> list[str]:
    """The fit's arguments that decide its result: configs, the size's overrides whose key the method's config
    has, the experiment's own overrides (``{data}`` in them: ``data``, the folder of its data files), epochs and
    seed (folders and caches come on top: :func:`folder_args`)."""
    config = method_config(experiment)
    own = [o.replace("{data}", data) for o in experiment.overrides]
    args = config_args(experiment) + [o for o in experiment.shared_overrides if has_key(config, o)] + own
    if budget_s is not None:
        args.append(f"--trainer.max_time=00:00:{budget_s // 60:02d}:{budget_s % 60:02d}")
    return args + [f"--trainer.max_epochs={experiment.epochs}", f"--seed_everything={seed}", f"--model.student.init_seed={seed}",
                   "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--model.num_threads=2"]


def data_folder(experiment: Experiment, work: str) -> str:
    """The experiment's data files, written by its ``data`` function under ``work`` (named relative to the
    repository when inside it, so its records read the same on every clone)."""
    if not experiment.data:
        return ""
    module, name = experiment.data.split(":")
    folder = os.path.join(work, "data", module.rsplit(".", 1)[-1])
    getattr(importlib.import_module(module), name)(folder, **experiment.data_params)
    inside = os.path.abspath(folder).startswith(ROOT + os.sep)
    return os.path.relpath(folder, ROOT) if inside else os.path.abspath(folder)


def folder_args(experiment: Experiment, root: str, cache: str) -> list[str]:
    """Where the fit writes: its own folder, and the warm-up (and teacher, if it has one) caches all runs share."""
    args = [f"--trainer.default_root_dir={root}", f"--model.warmup.cache_dir={cache}"]
    teacher_cache = f"--model.teacher.cache_dir={cache}"
    return args + ([teacher_cache] if has_key(method_config(experiment), teacher_cache) else [])


def fit(args: list[str], root: str) -> dict:
    """One fit; returns its wall seconds, summary.json, the held-out mean score per epoch (``curve``) and when each
    was measured (``curve_steps``: student optimizer steps; ``curve_seconds``: since the fit began)."""
    began, start = time.time(), time.perf_counter()
    quiet_cli(["fit", *args])
    seconds = time.perf_counter() - start
    with open(os.path.join(root, "summary.json")) as handle:
        summary = json.load(handle)
    return {"seconds": seconds, "summary": summary, **curve(root, summary, began)}


def curve(root: str, summary: dict, began: float) -> dict:
    """Held-out mean score at the start of fit and after each epoch, with the student steps and seconds since
    ``began`` at each (from the run's TensorBoard events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = glob.glob(os.path.join(root, "tensorboard", "version_*"))
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    tags = [t for t in accumulator.Tags()["scalars"] if t.startswith("eval/") and t.endswith("_score")]
    per_task = [accumulator.Scalars(t) for t in tags]
    epochs = min(len(v) for v in per_task)
    first = per_task[0]
    return {"curve": [summary["student_start"]["mean"]] + [statistics.fmean(v[i].value for v in per_task) for i in range(epochs)],
            "curve_steps": [0] + summary["student_steps_per_epoch"][:epochs],
            "curve_seconds": [0.0] + [first[i].wall_time - began for i in range(epochs)]}


def measure(experiment: Experiment, args: list[str]) -> dict:
    """The experiment's measuring function on its params (and, for one that times a method, the fit's arguments)."""
    module, name = experiment.measure.split(":")
    function = getattr(importlib.import_module(module), name)
    start = time.perf_counter()
    figures = function(args, **experiment.params) if experiment.configs else function(**experiment.params)
    return {"seconds": time.perf_counter() - start, "figures": figures}


def record_key(record: dict) -> str:
    return json.dumps([record["mode"], record["section"], record["name"], record["seed"], record["args"],
                       record["measure"], record["params"], record.get("data_params")], sort_keys=True)


def load_records(path: str) -> list[dict]:
    """The records in ``path`` (none if it does not exist); a line cut off by a kill is ignored."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def machine() -> dict:
    import lightning
    import transformers

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "memory_gib": round(memory, 1), "python": platform.python_version(), "torch": torch.__version__,
            "lightning": lightning.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "commit": measured_commit(ROOT)}


def measured_commit(root: str) -> str:
    """The checkout's commit, marked when its code has uncommitted changes: the bench's own records and report are
    its output, not the code it measures (``--fresh`` rewrites the records before anything runs)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    outputs = [f":!benchmarks/{name}" for name in ("runs.jsonl", "results.json", "RESULTS.md", "plots")]
    dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", *outputs], cwd=root, capture_output=True, text=True).stdout.strip()
    return commit + (" (with uncommitted changes)" if dirty else "")


def forget(records_path: str, mode: str, sections: set[str], rows: Optional[set[str]] = None) -> None:
    """Drop the records of these sections (of this mode), or only of their ``rows`` when given, so the next run
    measures them again."""
    kept = [r for r in load_records(records_path)
            if r["mode"] != mode or r["section"] not in sections or (rows is not None and r["name"] not in rows)]
    if os.path.exists(records_path):
        with open(records_path, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in kept)


def wall_clock_budget(records: list[dict], row: str, previous: Optional[dict] = None) -> tuple[float, str]:
    """Mean wall seconds over the seeds of ``row`` (``section/name``), its last record per seed counting, and where
    they come from. Without records, a quality row kept in ``previous`` (the report's results.json, carried from
    runs whose records were lost) gives its mean seconds."""
    section, name = row.split("/", 1)
    seconds = {r["seed"]: r["seconds"] for r in records if r["section"] == section and r["name"] == name}
    if seconds:
        return statistics.fmean(seconds.values()), "records"
    kept = (previous or {}).get(section, {}).get(name) if section == "quality" else None
    if kept and "seconds" in kept:
        meta = previous.get("sections", {}).get(section, {})
        return kept["seconds"][0], f"results.json (runs from {meta.get('started', '?')}, commit {', '.join(meta.get('commits', ['?']))})"
    raise ValueError(f"{row} has no recorded run yet: its wall-clock budget is unknown (run its section first)")


def run(experiments: list[Experiment], mode: str, records_path: str, work: str) -> None:
    """Run every experiment's seeds not yet recorded in ``records_path``, in order; fit folders and the shared
    caches go under ``work``."""
    records = [r for r in load_records(records_path) if r["mode"] == mode]
    done = {record_key(r) for r in records}
    from benchmarks.report import previous_results  # the report these records make: a wall-clock budget's fallback

    previous = previous_results(os.path.dirname(os.path.abspath(records_path)))
    previous = previous if previous and previous.get("mode") == mode else None
    if os.path.exists(records_path) and os.path.getsize(records_path):
        with open(records_path, "rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":  # a kill mid-write left half a line: the next record starts on its own
                handle.write(b"\n")
    here = machine()
    cache = os.path.join(work, "cache")
    os.makedirs(os.path.dirname(os.path.abspath(records_path)), exist_ok=True)
    total = sum(len(e.seeds) for e in experiments)
    skipped = 0
    with tqdm(total=total, desc=f"bench ({mode})", unit="run", dynamic_ncols=True) as progress:
        for experiment in experiments:
            data = data_folder(experiment, work)
            for seed in experiment.seeds:
                budget_s = budget_from = None
                if experiment.same_wall_clock_as:
                    budget_s, budget_from = wall_clock_budget(records, experiment.same_wall_clock_as, previous)
                    budget_s = max(1, round(budget_s))  # never 0 s
                args = fit_args(experiment, seed, budget_s, data) if experiment.configs else []
                record = {"mode": mode, "section": experiment.section, "name": experiment.name, "seed": seed, "args": args,
                          "measure": experiment.measure, "params": experiment.params, "tags": experiment.tags}
                if budget_s is not None:
                    record["max_time_s"], record["budget_from"] = budget_s, budget_from
                if experiment.data:  # other data settings, other data: measured again
                    record["data_params"] = {"function": experiment.data, **experiment.data_params}
                if record_key(record) in done:
                    skipped += 1
                    progress.update(1)
                    continue
                progress.set_postfix_str(f"{experiment.section}: {experiment.name}, seed {seed}")
                started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                if args:
                    slug = "".join(c if c.isalnum() else "-" for c in experiment.name.lower()).strip("-")
                    root = os.path.join(work, experiment.section, slug, f"seed{seed}")
                    shutil.rmtree(root, ignore_errors=True)  # a run interrupted before its record left a partial folder
                    args_with_folders = args + folder_args(experiment, root, cache)
                    outcome = measure(experiment, args_with_folders) if experiment.measure else fit(args_with_folders, root)
                else:
                    outcome = measure(experiment, args)
                record.update(outcome, started=started, machine=here)
                with open(records_path, "a") as handle:  # one line per finished run: a kill loses at most the current one
                    handle.write(json.dumps(record) + "\n")
                records.append(record)
                progress.update(1)
    if skipped:
        print(f"{skipped} of {total} runs were already recorded in {records_path} and were skipped (--fresh measures them again)")
