"""make bench / make bench-quick: quality, ablations, speed and scaling, written to benchmarks/RESULTS.md.

    python -m benchmarks.run                     # the full suite (2 CPU cores: hours; resumable)
    python -m benchmarks.run --quick             # the same tables at toy size (minutes)
    python -m benchmarks.run --sections pbkd     # only these sections' experiments
    python -m benchmarks.run --quick --out DIR   # everything (runs, caches, records, report) under DIR

The experiments are data (benchmarks/experiments.py); benchmarks/runner.py runs them, appending one JSON line
per finished run to ``runs.jsonl`` next to the report (committed with it: a fresh clone continues the bench, and
re-running one section keeps the others' runs), and skips runs already there, so an interrupted bench continues
where it stopped (``--fresh`` measures the selected sections, or with ``--rows`` those rows, again). benchmarks/report.py then writes RESULTS.md,
results.json and plots/ from every recorded run of the mode.
"""

import argparse
import dataclasses
import logging
import os
import sys

import torch

from benchmarks import report, runner
from benchmarks.experiments import SECTIONS, SIZES, experiments

ROOT = runner.ROOT
OUT = os.path.join(ROOT, "benchmarks")


def records_file(out: str) -> str:
    """The runs' records: next to the report they make."""
    return os.path.join(os.path.abspath(out), "runs.jsonl")


def default_out(mode: str) -> str:
    """The full report is the repository's; a quick one goes under runs/ (keeping the committed one whole)."""
    return OUT if mode == "full" else os.path.join(ROOT, "runs", f"bench-{mode}")


def default_work(out: str, mode: str) -> str:
    """Fit folders and caches: runs/bench-<mode> for the repository's report, else under ``out``."""
    if os.path.abspath(out) == OUT:
        return os.path.join(ROOT, "runs", f"bench-{mode}")
    return os.path.join(out, "work")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: the same tables in minutes")
    parser.add_argument("--out", help="folder for RESULTS.md, results.json, plots/ and runs.jsonl (default: benchmarks/, "
                                      "the committed report; with --quick runs/bench-quick, so a toy run never touches it)")
    parser.add_argument("--work", help="folder for the fits and the shared caches "
                                       "(default: runs/bench-<mode>, or <out>/work when --out is given)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} to run; the report still shows every "
                             "recorded section")
    parser.add_argument("--rows", help="only these rows of the selected sections, names separated by ';' "
                                       "(e.g. 'SeqKD;Black-box PbKD, offline')")
    parser.add_argument("--fresh", action="store_true", help="forget the selected sections' records (with --rows, those "
                                                              "rows' only) and measure them again")
    parser.add_argument("--seeds", type=int, help="run only each experiment's first N seeds (a smoke run; the report's "
                                                   "± is then over fewer seeds, 0 for one)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, this machine's cores)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    sections = [name for name in args.sections.split(",") if name]
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    out = os.path.abspath(args.out or default_out(mode))
    work = os.path.abspath(args.work or default_work(out, mode))
    records_path = records_file(out)

    os.chdir(ROOT)  # configs are named relative to the repository root
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric", "pbkd_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the runs' own logs would bury the progress bar
    torch.set_num_threads(args.threads)

    size = SIZES[mode]
    chosen = [e for e in experiments(size) if e.section in sections]
    wanted = None
    if args.rows:
        wanted = {name.strip() for name in args.rows.split(";")}
        if unknown := wanted - {e.name for e in chosen}:
            parser.error(f"no row named {sorted(unknown)} in sections {','.join(sections)}")
        chosen = [e for e in chosen if e.name in wanted]
    if args.fresh:  # with --rows, only those rows: the sections' other rows keep their records and their report rows
        runner.forget(records_path, mode, set(sections), wanted)
    if args.seeds:
        chosen = [dataclasses.replace(e, seeds=e.seeds[: args.seeds]) for e in chosen]
    runner.run(chosen, mode, records_path, work)

    command = "make bench-quick" if args.quick else "make bench"
    if set(sections) != set(SECTIONS) or args.seeds or args.rows:
        command = f"python -m benchmarks.run{' --quick' if args.quick else ''} --sections {','.join(sections)}"
        command += f" --rows '{args.rows}'" if args.rows else ""
        command += f" --seeds {args.seeds}" if args.seeds else ""
    records = [r for r in runner.load_records(records_path) if r["mode"] == mode]
    print(report.write(records, size, command, out, forget=frozenset(sections) if args.fresh and not wanted else frozenset()))


if __name__ == "__main__":
    main(sys.argv[1:])
