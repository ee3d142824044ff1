"""make bench / make bench-quick: quality, ablations, speed and scaling, written to benchmarks/RESULTS.md.

    python -m benchmarks.run            # the full suite (2 CPU cores: under an hour)
    python -m benchmarks.run --quick    # the same tables at toy size (minutes)

Every figure in RESULTS.md comes from this run; results.json holds them all and plots/ the PNGs.
Each fit runs through the same CLI a user runs, with the overrides listed in RESULTS.md.
"""

import argparse
import contextlib
import datetime
import glob
import io
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
from tqdm.auto import tqdm

from pbkd_lightning.objectives.base import Share

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks")

METHODS = [  # (name, config, extra arguments)
    ("SeqKD", "configs/baselines/seqkd.yaml", []),
    ("Black-box PbKD, offline", "configs/blackbox.yaml", []),
    ("Black-box PbKD, online", "configs/blackbox.yaml", ["--config", "configs/online.yaml"]),
    ("White-box PbKD", "configs/whitebox.yaml", []),
    ("Forward KL", "configs/baselines/fkl.yaml", []),
    ("Reverse KL", "configs/baselines/rkl.yaml", []),
    ("GKD", "configs/baselines/gkd.yaml", []),
    ("Skew KL", "configs/baselines/skew_kl.yaml", []),
    ("Skew reverse KL", "configs/baselines/skew_rkl.yaml", []),
    ("TVD", "configs/baselines/tvd.yaml", []),
    ("MiniLLM", "configs/baselines/minillm.yaml", []),
    ("X-KD, sequence-level", "configs/xkd.yaml", []),
    ("X-KD, divergence-based", "configs/xkd.yaml", ["--model.objective.kd=generalized_jsd"]),
]

# Black-box PbKD variants against SeqKD from the same warmed-up student (issue 8; docs/pbkd-quality.md).
# Each runs configs/blackbox.yaml (the recommended defaults) with these overrides, over the size's seeds.
PBKD_VARIANTS = [
    ("paper: scalar head (last token), teacher labels, 1 critic step", ["--model.critic.kind=scalar", "--model.objective.critic_steps=1",
                                                                         "--data.sample_pairs=false", "--model.objective.critic_trust=always"]),
    ("implicit reward, 1 critic step", ["--model.objective.critic_steps=1", "--data.sample_pairs=false", "--model.objective.critic_trust=always"]),
    ("implicit, 4 critic steps, sample pairs, no gate", ["--model.objective.critic_steps=4", "--data.sample_pairs=true", "--model.objective.critic_trust=always"]),
    ("recommended (configs/blackbox.yaml)", []),
    ("recommended, online (one iteration per epoch)", ["--config", "configs/online.yaml"]),
]

SIZES = {
    # Toy size: every table and plot, in minutes.
    "quick": dict(seeds=[0, 1], epochs=1, online=[1, 2], betas=[0.1, 10.0], steps=4, overrides=[
        "--model.student.layers=1", "--model.student.hidden=32", "--model.student.heads=2",
        "--model.teacher.layers=1", "--model.teacher.hidden=64", "--model.teacher.heads=2", "--model.teacher.train_steps=20",
        "--model.warmup.steps=5", "--data.train_size=8", "--data.val_size=4", "--data.samples_per_prompt=2",
        "--data.batch_size=4", "--data.critic_batch_size=8", "--data.generation.max_new_tokens=12",
        "--model.val_generation.max_new_tokens=12", "--model.objective.critic_warmup_steps=0",
    ], divergence=dict(batch=2, tokens=64, vocabs=[4096, 16384]),
        scaling=dict(batch=2, tokens=[32, 64, 128], vocab=4096, vocabs=[1024, 4096, 16384], at_tokens=64),
        pbkd=dict(epochs=1, variants=[0, 3], overrides=[])),
    # The default models (2x128 student, 4x192 teacher) on half the default's prompts, 2 epochs a run.
    "full": dict(seeds=[0, 1, 2], epochs=2, online=[1, 3, 5], betas=[0.1, 10.0], steps=20, overrides=[
        "--data.train_size=128", "--data.val_size=32", "--model.objective.critic_warmup_steps=16",
    ], divergence=dict(batch=4, tokens=512, vocabs=[32000, 151936]),
        scaling=dict(batch=4, tokens=[128, 256, 512, 1024], vocab=32000, vocabs=[8192, 32000, 65536, 151936], at_tokens=512),
        # 4 epochs (online: 3 iterations) and 128 held-out prompts per task: a 3-point gap is ~8 prompts, not 2
        pbkd=dict(epochs=4, variants=list(range(len(PBKD_VARIANTS))), overrides=["--data.val_size=128"])),
}
def _applies(override: str, config: str, extra: list[str]) -> bool:
    """Not every config has every key: an override the method's config lacks is dropped for it."""
    text = open(os.path.join(ROOT, config)).read()
    if override.startswith("--model.teacher."):
        return _has_teacher_model(config)
    if override.startswith("--model.objective.critic_warmup_steps"):
        return "critic_warmup_steps" in text
    return True


def _has_teacher_model(config: str) -> bool:
    """Whether the config has a ``model.teacher`` section (white-box methods, X-KD)."""
    model_section = open(os.path.join(ROOT, config)).read().split("\ndata:")[0]
    return re.search(r"^  teacher:\s", model_section, re.MULTILINE) is not None


def _run_args(config: str, extra: list[str], size: dict, root: str, seed: int, epochs: int) -> list[str]:
    """CLI arguments of one benchmark run: the method's config and overlays, its overrides, the size's, and
    the run's folder, seed and shared caches."""
    args = ["--config", config]  # relative to the repository root, where the run starts
    for i in range(0, len(extra), 2):  # overlays first, then the overrides win
        if extra[i] == "--config":
            args += ["--config", extra[i + 1]]
    args += [e for e in extra if e.startswith("--model.") or e.startswith("--data.")]
    args += [o for o in size["overrides"] if _applies(o, config, extra)]
    args += [f"--trainer.default_root_dir={root}", f"--trainer.max_epochs={epochs}", f"--seed_everything={seed}",
             f"--model.student.init_seed={seed}", f"--model.warmup.cache_dir={os.path.join(OUT, '.cache')}",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--model.num_threads=2"]
    if _has_teacher_model(config):
        args.append(f"--model.teacher.cache_dir={os.path.join(OUT, '.cache')}")
    return args


def fit(config: str, extra: list[str], root: str, seed: int, size: dict, epochs: int) -> dict:
    """One fit through the CLI, in this process; returns its summary and per-epoch scores."""
    args = ["fit", *_run_args(config, extra, size, root, seed, epochs)]
    start = time.perf_counter()
    _quiet_cli(args)
    seconds = time.perf_counter() - start
    with open(os.path.join(root, "summary.json")) as handle:
        summary = json.load(handle)
    return {"summary": summary, "curve": _curve(root, summary), "seconds": seconds, "args": args[1:]}


def _quiet_cli(args: list[str], run: bool = True):
    """The CLI with its output captured; a failed run raises with what it printed (a parse error would
    otherwise end the whole benchmark through a silent ``SystemExit``)."""
    from pbkd_lightning.cli import DistillationCLI, DistillationModule, PreferenceDataModule

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return DistillationCLI(DistillationModule, PreferenceDataModule, parser_kwargs={"parser_mode": "omegaconf"},
                                   save_config_kwargs={"overwrite": True}, args=args, run=run)
    except SystemExit as error:
        raise RuntimeError(f"the run {' '.join(args)} exited ({error.code}):\n{err.getvalue()[-3000:]}") from None


def _curve(root: str, summary: dict) -> list[float]:
    """Held-out mean score at the start of fit and after each epoch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = glob.glob(os.path.join(root, "tensorboard", "version_*"))[-1:]
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    tags = [t for t in accumulator.Tags()["scalars"] if t.startswith("eval/") and t.endswith("_score")]
    per_task = [[e.value for e in accumulator.Scalars(t)] for t in tags]
    epochs = min(len(v) for v in per_task)
    return [summary["student_start"]["mean"]] + [sum(v[i] for v in per_task) / len(per_task) for i in range(epochs)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ------------------------------------------------------------------------------------------ quality
def quality(size: dict, runs_dir: str, progress) -> dict:
    rows = {}
    for name, config, extra in METHODS:
        results = []
        for seed in size["seeds"]:
            progress.set_postfix_str(f"{name}, seed {seed}")
            root = os.path.join(runs_dir, "quality", _slug(name), f"seed{seed}")
            results.append(fit(config, extra, root, seed, size, size["epochs"]))
            progress.update(1)
        rows[name] = _aggregate(results)
    return rows


def _aggregate(results: list[dict]) -> dict:
    finals = [r["summary"]["student_final"] for r in results]
    tasks = sorted(t for t in finals[0] if t != "mean") + ["mean"]
    row = {"tasks": {t: _mean_std([f[t] for f in finals]) for t in tasks}, "seconds": _mean_std([r["seconds"] for r in results])}
    row["start"] = _mean_std([r["summary"]["student_start"]["mean"] for r in results])
    row["untrained"] = _mean_std([r["summary"].get("student_before_warmup", {}).get("mean", float("nan")) for r in results])
    row["curve"] = [statistics.fmean(c[i] for c in [r["curve"] for r in results]) for i in range(min(len(r["curve"]) for r in results))]
    diversity = [r["summary"].get("student_final_diversity") for r in results]
    if all(diversity):
        row["diversity"] = {k: _mean_std([d[k] for d in diversity]) for k in diversity[0]}
    accuracy = [r["summary"].get("heldout_pref_acc_per_epoch") for r in results]
    if all(accuracy):
        row["reward_acc_per_epoch"] = [_mean_std([a[i]["all"] for a in accuracy]) for i in range(min(map(len, accuracy)))]
    if "teacher_model" in results[0]["summary"]:
        row["teacher_model"] = results[0]["summary"]["teacher_model"]
    row["teacher"] = results[0]["summary"]["teacher"]
    row["args"] = results[0]["args"]
    return row


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


# ------------------------------------------------------------------------------------------ ablations
def ablations(size: dict, runs_dir: str, progress) -> dict:
    seed = size["seeds"][0]
    out = {"online": {}, "beta": {}}
    offline = fit("configs/blackbox.yaml", [], os.path.join(runs_dir, "ablation", "offline"), seed, size, max(size["online"]))
    out["online"]["offline"] = _ablation_row(offline)
    progress.update(1)
    for iterations in size["online"]:
        progress.set_postfix_str(f"online, {iterations} iterations")
        run = fit("configs/blackbox.yaml", ["--config", "configs/online.yaml"],
                  os.path.join(runs_dir, "ablation", f"online{iterations}"), seed, size, iterations)
        out["online"][f"{iterations} online"] = _ablation_row(run)
        progress.update(1)
    for beta in size["betas"]:
        progress.set_postfix_str(f"beta {beta}")
        run = fit("configs/blackbox.yaml", [f"--model.objective.beta={beta}"], os.path.join(runs_dir, "ablation", f"beta{beta}"),
                  seed, size, size["epochs"])
        out["beta"][beta] = _ablation_row(run)
        progress.update(1)
    return out


def _ablation_row(run: dict) -> dict:
    summary = run["summary"]
    return {"mean": summary["student_final"]["mean"], "reward_acc": [h["all"] for h in summary.get("heldout_pref_acc_per_epoch", [])],
            "curve": run["curve"], "seconds": run["seconds"]}


# ------------------------------------------------------------------------------------------ PbKD vs SeqKD
def pbkd_quality(size: dict, runs_dir: str, progress) -> dict:
    """Issue 8's table: black-box PbKD variants and SeqKD from the same warmed-up student, over the size's seeds;
    SeqKD twice: for the same epochs, and for the same wall-clock time as the best PbKD row (``trainer.max_time``)."""
    p = size["pbkd"]
    sized = dict(size, overrides=size["overrides"] + p["overrides"])

    def runs(label: str, config: str, extra: list[str], epochs: int = p["epochs"]) -> dict:
        results = []
        for seed in size["seeds"]:
            progress.set_postfix_str(f"PbKD table: {label}, seed {seed}")
            variant = dict(sized, overrides=sized["overrides"] + [e for e in extra if e.startswith("--model.") or e.startswith("--trainer.")
                                                                  or e.startswith("--data.")])
            results.append(fit(config, extra, os.path.join(runs_dir, "pbkd", _slug(label), f"seed{seed}"), seed, variant, epochs))
            progress.update(1)
        row = _aggregate(results)
        history = [r["summary"].get("heldout_pref_acc_per_epoch", []) for r in results]
        epochs = min(map(len, history))
        for key, name in (("all", "reward_acc_per_epoch"), ("sample_ranking", "ranking_acc_per_epoch")):
            if epochs and all(key in h[i] for h in history for i in range(epochs)):
                row[name] = [_mean_std([h[i][key] for h in history]) for i in range(epochs)]
        return row

    rows = {"SeqKD, same epochs": runs("SeqKD, same epochs", "configs/baselines/seqkd.yaml", [])}
    for index in p["variants"]:
        label, extra = PBKD_VARIANTS[index]
        rows[label] = runs(label, "configs/blackbox.yaml", extra)
    best = max((label for label in rows if label != "SeqKD, same epochs"), key=lambda label: rows[label]["tasks"]["mean"][0])
    budget = max(1, round(rows[best]["seconds"][0]))
    label = f"SeqKD, same wall-clock as the best PbKD row ({budget} s)"
    # min_epochs: a budget shorter than one epoch still ends with a validation (Lightning stops at its end)
    rows[label] = runs(label, "configs/baselines/seqkd.yaml",
                       [f"--trainer.max_time=00:00:{budget // 60:02d}:{budget % 60:02d}", "--trainer.min_epochs=1"],
                       epochs=10 * p["epochs"])
    return {"rows": rows, "best": best, "epochs": p["epochs"], "overrides": p["overrides"],
            "variants": [PBKD_VARIANTS[i][0] for i in p["variants"]]}


def _per_epoch(pairs) -> str:
    return ", ".join(f"{m:.2f}" for m, _ in pairs) if pairs else "–"


# ------------------------------------------------------------------------------------------ speed
SPEED_METHODS = [m for m in METHODS if m[0] in ("SeqKD", "Black-box PbKD, offline", "White-box PbKD", "Forward KL", "GKD",
                                                 "MiniLLM", "X-KD, sequence-level")]


def step_speed(size: dict, runs_dir: str, progress) -> dict:
    """Training steps per second through Lightning against a hand-written loop over the same batches."""
    from lightning.pytorch import Callback

    class StepClock(Callback):
        def __init__(self):
            self.starts = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.starts.append(time.perf_counter())

        def on_train_epoch_end(self, trainer, module):
            self.starts.append(time.perf_counter())

    rows = {}
    warm, steps = 2, size["steps"]
    for name, config, extra in SPEED_METHODS:
        progress.set_postfix_str(f"speed: {name}")
        root = os.path.join(runs_dir, "speed", _slug(name))
        args = [*_run_args(config, extra, size, root, seed=0, epochs=1),
                f"--trainer.limit_train_batches={warm + steps}", "--trainer.limit_val_batches=0"]
        if _applies("--model.objective.critic_warmup_steps", config, extra):
            args.append("--model.objective.critic_warmup_steps=0")  # time student steps too, from the first batch
        cli = _quiet_cli(args, run=False)
        clock = StepClock()
        cli.trainer.callbacks.append(clock)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli.trainer.fit(cli.model, cli.datamodule)
        library = steps / (clock.starts[-1] - clock.starts[warm])
        manual = _hand_loop(cli.model, cli.datamodule, warm, steps)
        rows[name] = {"library_steps_per_s": library, "manual_steps_per_s": manual, "ratio": library / manual}
        progress.update(1)
    return rows


def _hand_loop(module, datamodule, warm: int, steps: int) -> float:
    """The same objective losses, optimizers (AdamW) and clipping in a plain loop: no Lightning, no logging."""
    objective, student, critic, players = module.objective, module.student, module.critic, module.players
    optimizers = {"student": torch.optim.AdamW([p for p in student.parameters()], lr=1e-4)}
    if critic is not None:
        optimizers["critic"] = torch.optim.AdamW([p for p in critic.parameters()], lr=1e-4)
    loader = datamodule.train_dataloader()
    paired = isinstance(loader, dict)
    batches = zip(loader["student"], loader["critic"]) if paired else ((b, b) for b in loader)

    def step(model, other, optimizer, loss_fn):
        for p in other.parameters() if other is not None else []:
            p.requires_grad_(False)  # what toggle_optimizer does: no gradient for the other player
        loss = loss_fn()["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for p in other.parameters() if other is not None else []:
            p.requires_grad_(True)

    start = None
    for index, (student_batch, critic_batch) in enumerate(batches):
        if index == warm:
            start = time.perf_counter()
        if index == warm + steps:
            break
        if critic is not None:  # `critic_steps` > 1: a list of batches, one critic step each, as the module does
            for batch in critic_batch if isinstance(critic_batch, list) else [critic_batch]:
                step(critic, student, optimizers["critic"], lambda: objective.critic_loss(players, batch, Share.whole(batch)))
        if objective.needs_samples:
            student.eval()  # as the module: on-policy steps score π_θ with dropout off
        student_batch = objective.prepare_student_batch(players, student_batch)
        step(student, critic, optimizers["student"],
             lambda: objective.student_loss(players, student_batch, Share.whole(student_batch), module.critic_heldout_acc))
    return steps / (time.perf_counter() - start)


def sampling_speed(size: dict) -> dict:
    """The data module's sampler (``generate``) against a plain ``model.generate`` loop, same prompts and settings."""
    from pbkd_lightning.data.generation import GenerationConfig, generate
    from pbkd_lightning.models import ModelSpec, load_causal_lm
    from pbkd_lightning.tasks import get_task

    quick = size is SIZES["quick"]
    spec = ModelSpec(layers=1, hidden=32, heads=2) if quick else ModelSpec()
    model, tokenizer = load_causal_lm(spec)
    prompts = [r["prompt"] for r in get_task("arithmetic").generate(16 if quick else 128, seed=7)]
    config = GenerationConfig(max_new_tokens=12 if quick else 40)
    samples, batch = 2 if quick else 4, 64

    def plain():
        tokenizer.padding_side = "left"
        tokens = 0
        for begin in range(0, len(prompts), batch):
            encoded = tokenizer(prompts[begin : begin + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**encoded, do_sample=True, temperature=1.0, top_p=None, top_k=None,
                                     max_new_tokens=config.max_new_tokens, num_return_sequences=samples,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)
            tokens += int((out[:, encoded["input_ids"].shape[1]:] != tokenizer.pad_token_id).sum())
        tokenizer.padding_side = "right"
        return tokens

    figures = {"library": [], "plain": []}
    for _ in range(3):  # alternate, best of three each: the machine's noise hits both
        torch.manual_seed(0)
        _, stats = generate(model, tokenizer, prompts, config, samples, batch)
        figures["library"].append(stats["tokens"] / stats["seconds"])
        torch.manual_seed(0)
        start = time.perf_counter()
        tokens = plain()
        figures["plain"].append(tokens / (time.perf_counter() - start))
    library, plain_rate = max(figures["library"]), max(figures["plain"])
    return {"library_tokens_per_s": library, "plain_tokens_per_s": plain_rate, "ratio": library / plain_rate}


def divergence_speed(size: dict) -> list[dict]:
    from benchmarks.divergence_memory import run_isolated

    rows, d = [], size["divergence"]
    for vocab in d["vocabs"]:
        naive = run_isolated("naive", d["batch"], d["tokens"], vocab, 2)
        chunked = run_isolated("chunked", d["batch"], d["tokens"], vocab, 2)
        rows.append({"vocab": vocab, "batch": d["batch"], "tokens": d["tokens"], "naive": naive, "chunked": chunked,
                     "time_ratio": chunked["seconds"] / naive["seconds"],
                     "memory_ratio": chunked["peak_extra_mb"] / naive["peak_extra_mb"]})
    return rows


def scaling(size: dict, progress) -> dict:
    from benchmarks.divergence_memory import run_isolated

    s, out = size["scaling"], {"tokens": [], "vocab": []}
    for tokens in s["tokens"]:
        out["tokens"].append({"x": tokens, **{v: run_isolated(v, s["batch"], tokens, s["vocab"], 2) for v in ("naive", "chunked")}})
        progress.update(1)
    for vocab in s["vocabs"]:
        out["vocab"].append({"x": vocab, **{v: run_isolated(v, s["batch"], s["at_tokens"], vocab, 2) for v in ("naive", "chunked")}})
        progress.update(1)
    return out


def gpu_section() -> dict:
    if not torch.cuda.is_available():
        return {"available": False, "note": "no CUDA device on this machine: the GPU section was skipped, not estimated"}
    return {"available": True, "device": torch.cuda.get_device_name(0),
            "note": "a CUDA device was found, but the GPU speed table is not implemented yet"}


# ------------------------------------------------------------------------------------------ report
def machine() -> dict:
    import lightning
    import transformers

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "memory_gib": round(memory, 1),
            "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "transformers": transformers.__version__, "commit": commit + (" (with uncommitted changes)" if dirty else "")}


def _pm(pair, digits=3) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def report(results: dict, mode: str) -> str:
    q, m = results["quality"], results["machine"]
    tasks = [t for t in next(iter(q.values()))["tasks"]]
    lines = [f"# Benchmark results ({mode})", "",
             f"Written by `{results['command']}`, started {m['date']}; every figure below comes from "
             + ("that run" if "--sections" not in results["command"] else "the run its section names below")
             + " (also in `results.json` next to this file).", "",
             f"Machine: {m['platform']}, {m['processor']}, {m['cpus']} CPUs, {m['memory_gib']} GiB. "
             f"Python {m['python']}, torch {m['torch']}, lightning {m['lightning']}, transformers {m['transformers']}. "
             f"Commit {m['commit']}. Total wall time {results['seconds'] / 60:.1f} min.", ""]
    runs = results.get("sections", {})
    if len({(v["date"], v["commit"]) for v in runs.values()}) > 1:  # `--sections` re-ran part of the suite
        lines += ["Not every section comes from the same run; each from (same machine and command):", ""]
        lines += [f"- {name}: started {v['date']}, commit {v['commit']}" for name, v in runs.items()]
        lines += [""]
    lines += [
             "## Quality", "",
             f"Held-out scores after {results['size']['epochs']} epoch(s) from the same warmed-up student, mean ± std over "
             f"seeds {results['size']['seeds']} (seed of the run and of the student's initialisation; same data and teacher). "
             "Best per column in **bold**.", ""]
    best = {t: max(row["tasks"][t][0] for row in q.values()) for t in tasks}
    lines.append("| method | " + " | ".join(tasks) + " | distinct-2 | self-BLEU | wall s / run |")
    lines.append("|---" * (len(tasks) + 4) + "|")
    first = next(iter(q.values()))
    lines.append("| task program (teacher responses) | " + " | ".join(f"{first['teacher'].get(t, float('nan')):.3f}" for t in tasks) + " | | | |")
    wb = next((row for row in q.values() if "teacher_model" in row), None)
    if wb:
        lines.append("| teacher model (white-box methods), greedy | " + " | ".join(f"{wb['teacher_model'].get(t, float('nan')):.3f}" for t in tasks) + " | | | |")
    lines.append(f"| student, untrained | {' | '.join('' for _ in tasks[:-1])} | {_pm(first['untrained'])} | | | |")
    lines.append(f"| student, after warm-up (start of every method) | {' | '.join('' for _ in tasks[:-1])} | {_pm(first['start'])} | | | |")
    for name, row in q.items():
        cells = []
        for t in tasks:
            text = _pm(row["tasks"][t])
            cells.append(f"**{text}**" if row["tasks"][t][0] == best[t] else text)
        div = row.get("diversity", {})
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pm(div['distinct_2']) if div else ''} | "
                     f"{_pm(div['self_bleu']) if div else ''} | {row['seconds'][0]:.0f} |")
    a = results["ablations"]
    lines += ["", "## Ablations (black-box PbKD, one seed)", "", "| variant | held-out mean | reward model held-out accuracy per epoch / iteration | wall s |",
              "|---|---|---|---|"]
    for label, row in a["online"].items():
        lines.append(f"| {label} | {row['mean']:.3f} | {', '.join(f'{x:.3f}' for x in row['reward_acc'])} | {row['seconds']:.0f} |")
    for beta, row in a["beta"].items():
        lines.append(f"| β = {beta} | {row['mean']:.3f} | {', '.join(f'{x:.3f}' for x in row['reward_acc'])} | {row['seconds']:.0f} |")
    accs = [x for row in a["online"].values() for x in row["reward_acc"]]
    if accs:
        lines.append(f"\nReward model at or above 90% in {sum(x >= 0.9 for x in accs)} of {len(accs)} epochs/iterations above (the goal is all).")
    lines += _pbkd_report(results)
    lines += ["", "Diversity against score (quality table, same runs):", "", "| method | held-out mean | distinct-2 | self-BLEU |", "|---|---|---|---|"]
    for name in ("X-KD, sequence-level", "X-KD, divergence-based", "GKD", "SeqKD"):
        row = q[name]
        lines.append(f"| {name} | {_pm(row['tasks']['mean'])} | {_pm(row['diversity']['distinct_2'])} | {_pm(row['diversity']['self_bleu'])} |")
    s = results["speed"]
    lines += ["", "## Speed", "", "Training steps per second: the library (Lightning, logging, manual optimization) against a "
              "hand-written loop doing the same losses, AdamW steps and clipping on the same batches, after 2 warm-up steps "
              f"({results['size']['steps']} steps each). Target ≥ 0.9×. Reverse KL, skew KL/RKL and TVD share forward KL's step code.", "",
              "| method | library steps/s | hand loop steps/s | ratio |", "|---|---|---|---|"]
    for name, row in s["steps"].items():
        lines.append(f"| {name} | {row['library_steps_per_s']:.2f} | {row['manual_steps_per_s']:.2f} | {row['ratio']:.2f} |")
    g = s["sampling"]
    lines += ["", "Student sampling for online pairs (the data module's `generate`) against a plain `model.generate` loop with the KV "
              "cache, same prompts, batch and settings, best of 3 each. Target ≥ 0.95×.", "",
              "| library tokens/s | plain tokens/s | ratio |", "|---|---|---|", f"| {g['library_tokens_per_s']:.0f} | {g['plain_tokens_per_s']:.0f} | {g['ratio']:.2f} |",
              "", "Chunked divergence (forward KL, forward + backward, float32) against the naive full-tensor formula, each in a fresh "
              "process; peak extra memory = peak RSS above the inputs. Targets: memory ≤ 0.35×, time ≤ 1.2×.", "",
              "| batch × tokens | vocabulary | naive s | chunked s | time × | naive MB | chunked MB | memory × |", "|---|---|---|---|---|---|---|---|"]
    for row in s["divergence"]:
        lines.append(f"| {row['batch']} × {row['tokens']} | {row['vocab']:,} | {row['naive']['seconds']:.2f} | {row['chunked']['seconds']:.2f} | "
                     f"{row['time_ratio']:.2f} | {row['naive']['peak_extra_mb']:.0f} | {row['chunked']['peak_extra_mb']:.0f} | {row['memory_ratio']:.2f} |")
    sc = results["scaling"]
    lines += ["", "## Scaling", "", f"Forward KL loss, forward + backward, batch {results['size']['scaling']['batch']}: "
              "time and peak extra memory as the sequence doubles (vocabulary "
              f"{results['size']['scaling']['vocab']:,}) and as the vocabulary grows ({results['size']['scaling']['at_tokens']} tokens). "
              "Plots: `plots/scaling.png`.", "", "| axis | value | naive s | chunked s | naive MB | chunked MB |", "|---|---|---|---|---|---|"]
    for axis in ("tokens", "vocab"):
        for row in sc[axis]:
            lines.append(f"| {axis} | {row['x']:,} | {row['naive']['seconds']:.2f} | {row['chunked']['seconds']:.2f} | "
                         f"{row['naive']['peak_extra_mb']:.0f} | {row['chunked']['peak_extra_mb']:.0f} |")
    lines += ["", "## GPU", "", results["gpu"]["note"] + ".", "", "## Exact commands", "",
              f"`{results['command']}`; each fit is `python -m pbkd_lightning fit` with the method's config and:", ""]
    for name, row in list(q.items()) + [(f"PbKD table: {label}", row) for label, row in results["pbkd"]["rows"].items()]:
        lines.append(f"- {name}: `{' '.join(a for a in row['args'] if 'cache_dir' not in a and 'default_root_dir' not in a)}`")
    lines += ["", "Plots: `plots/learning_curves.png`, `plots/quality.png`, `plots/ablations.png`, `plots/pbkd.png`, `plots/scaling.png`.", ""]
    return "\n".join(lines)


def _pbkd_report(results: dict) -> list[str]:
    """Issue 8's table: every black-box PbKD variant against SeqKD from the same checkpoint (docs/pbkd-quality.md)."""
    t = results["pbkd"]
    rows, seqkd = t["rows"], t["rows"]["SeqKD, same epochs"]
    tasks = [k for k in seqkd["tasks"] if k != "mean"]
    overrides = " ".join(t["overrides"])
    lines = ["", "## Black-box PbKD against SeqKD (issue 8)", "",
             f"From the same warmed-up student as every method, {t['epochs']} epoch(s) (online: one iteration per epoch), "
             f"overrides `{overrides}` on top of the quality section's; mean ± std over seeds {results['size']['seeds']}. "
             "Reward model: held-out preference accuracy (teacher vs the current student's samples, as the labeler decides) "
             "and ranking accuracy (does it order a held-out prompt's samples as the task's verifier does: what the "
             "student's group advantages rely on), each the mean over seeds at each epoch's end. Variants: "
             "`configs/blackbox.yaml` plus the overrides listed under Exact commands.", "",
             "| variant | " + " | ".join(tasks) + " | mean | Δ vs SeqKD | reward model pref. acc per epoch | ranking acc per epoch | wall s |",
             "|---" * (len(tasks) + 6) + "|"]
    for label, row in rows.items():
        delta = row["tasks"]["mean"][0] - seqkd["tasks"]["mean"][0]
        lines.append(f"| {label} | " + " | ".join(_pm(row["tasks"][k]) for k in tasks) + f" | {_pm(row['tasks']['mean'])} | "
                     f"{delta:+.3f} | {_per_epoch(row.get('reward_acc_per_epoch'))} | {_per_epoch(row.get('ranking_acc_per_epoch'))} | "
                     f"{row['seconds'][0]:.0f} |")
    best = rows[t["best"]]
    budget = next(label for label in rows if label.startswith("SeqKD, same wall-clock"))
    accs = [m for m, _ in best.get("reward_acc_per_epoch", [])]
    gap = best["tasks"]["mean"][0] - max(seqkd["tasks"]["mean"][0], rows[budget]["tasks"]["mean"][0])
    met = gap >= 0.03 and accs and min(accs) >= 0.9
    lines += ["", f"Best PbKD row: **{t['best']}**, {gap * 100:+.1f} points over the better SeqKD row; its reward model's "
              f"held-out accuracy {', '.join(f'{a:.2f}' for a in accs) or '–'} per epoch. Goal (≥ SeqKD + 3 points with the "
              f"reward model ≥ 0.90 at every epoch): **{'met' if met else 'not met'}** — see docs/pbkd-quality.md."]
    return lines


def plots(results: dict, folder: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    q = results["quality"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in q.items():
        ax.plot(range(len(row["curve"])), row["curve"], marker="o", label=name)
    ax.set(xlabel="epochs of distillation", ylabel="held-out mean score", title="Learning curves (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "learning_curves.png"), dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 5))
    names = list(q)
    ax.bar(range(len(names)), [q[n]["tasks"]["mean"][0] for n in names], yerr=[q[n]["tasks"]["mean"][1] for n in names], capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="held-out mean score", title="Quality (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "quality.png"), dpi=100)
    plt.close(fig)

    a = results["ablations"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, row in a["online"].items():
        left.plot(range(len(row["reward_acc"])), row["reward_acc"], marker="o", label=label)
    left.axhline(0.9, ls="--", c="grey")
    left.set(xlabel="epoch / iteration", ylabel="reward model held-out accuracy", title="Offline vs online")
    left.legend(fontsize=7)
    betas = list(a["beta"])
    right.plot([float(b) for b in betas], [a["beta"][b]["mean"] for b in betas], marker="o")
    right.set(xscale="log", xlabel="β", ylabel="held-out mean score", title="β of the Lagrangian")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "ablations.png"), dpi=100)
    plt.close(fig)

    rows = results["pbkd"]["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(rows)
    left.barh(range(len(labels)), [rows[n]["tasks"]["mean"][0] for n in labels], xerr=[rows[n]["tasks"]["mean"][1] for n in labels], capsize=3)
    left.set_yticks(range(len(labels)), labels, fontsize=6)
    left.axvline(rows["SeqKD, same epochs"]["tasks"]["mean"][0], ls="--", c="grey")
    left.set(xlabel="held-out mean score", title="PbKD variants vs SeqKD")
    for label, row in rows.items():
        if row.get("reward_acc_per_epoch"):
            right.plot(range(len(row["reward_acc_per_epoch"])), [m for m, _ in row["reward_acc_per_epoch"]], marker="o", label=label)
    right.axhline(0.9, ls="--", c="grey")
    right.set(xlabel="epoch / iteration", ylabel="reward model held-out pref. accuracy", title="Reward model quality")
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "pbkd.png"), dpi=100)
    plt.close(fig)

    sc = results["scaling"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, axis in enumerate(("tokens", "vocab")):
        xs = [r["x"] for r in sc[axis]]
        for variant in ("naive", "chunked"):
            axes[0][column].plot(xs, [r[variant]["seconds"] for r in sc[axis]], marker="o", label=variant)
            axes[1][column].plot(xs, [r[variant]["peak_extra_mb"] for r in sc[axis]], marker="o", label=variant)
        axes[0][column].set(xscale="log", xlabel=axis, ylabel="seconds")
        axes[1][column].set(xscale="log", xlabel=axis, ylabel="peak extra MB")
        axes[0][column].legend()
    fig.suptitle("Forward KL loss, forward + backward")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "scaling.png"), dpi=100)
    plt.close(fig)


SECTIONS = ("quality", "ablations", "pbkd", "speed", "scaling")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: the same tables in minutes")
    parser.add_argument("--out", default=OUT, help="folder for RESULTS.md, the JSON and plots/")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} to re-run; the others are kept from the "
                             "results.json already in --out, and RESULTS.md says which run each section comes from")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # configs are named relative to the repository root
    mode = "quick" if args.quick else "full"
    size = SIZES[mode]
    sections = [name for name in args.sections.split(",") if name]
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    previous = _previous_results(args.out, mode) if set(sections) != set(SECTIONS) else None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric", "pbkd_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the runs' own logs would bury the progress bar
    torch.set_num_threads(2)
    runs_dir = os.path.join(ROOT, "runs", f"bench-{mode}")
    counts = {"quality": len(METHODS) * len(size["seeds"]), "ablations": 1 + len(size["online"]) + len(size["betas"]),
              "pbkd": (len(size["pbkd"]["variants"]) + 2) * len(size["seeds"]), "speed": len(SPEED_METHODS),
              "scaling": len(size["scaling"]["tokens"]) + len(size["scaling"]["vocabs"])}
    start = time.perf_counter()
    results = {"mode": mode, "size": {k: v for k, v in size.items() if k not in ("overrides", "pbkd")}, "overrides": size["overrides"],
               "command": "make bench-quick" if args.quick else "make bench", "machine": machine()}  # commit as it starts
    if previous:
        results["command"] = f"python -m benchmarks.run{' --quick' if args.quick else ''} --sections {','.join(sections)}"
    provenance = dict(previous["sections"]) if previous else {}
    with tqdm(total=sum(counts[name] for name in sections), desc=f"bench ({mode})", unit="run", dynamic_ncols=True) as progress:
        for name in SECTIONS:
            if name not in sections:
                results[name] = previous[name]
                continue
            began = time.perf_counter()
            if name == "quality":
                results[name] = quality(size, runs_dir, progress)
            elif name == "ablations":
                results[name] = ablations(size, runs_dir, progress)
            elif name == "pbkd":
                results[name] = pbkd_quality(size, runs_dir, progress)
            elif name == "speed":
                results[name] = {"steps": step_speed(size, runs_dir, progress), "sampling": sampling_speed(size),
                                 "divergence": divergence_speed(size)}
            else:
                results[name] = scaling(size, progress)
            provenance[name] = {"date": results["machine"]["date"], "commit": results["machine"]["commit"],
                                "minutes": (time.perf_counter() - began) / 60}
    results["sections"] = provenance
    results["gpu"] = gpu_section()
    results["seconds"] = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    plots(results, os.path.join(args.out, "plots"))
    text = report(results, mode)
    with open(os.path.join(args.out, "RESULTS.md"), "w") as handle:
        handle.write(text)
    print(text)


def _previous_results(folder: str, mode: str) -> dict:
    """The results.json that sections not re-run are kept from (each section with the run it came from)."""
    path = os.path.join(folder, "results.json")
    if not os.path.exists(path):
        raise SystemExit(f"--sections re-runs part of the suite, but there is no {path} to keep the rest from")
    with open(path) as handle:
        previous = json.load(handle)
    if previous.get("mode") != mode:
        raise SystemExit(f"{path} is from a {previous.get('mode')} run, not {mode}: re-run every section")
    if "sections" not in previous:  # written before sections were recorded: one run made all of them
        machine = previous["machine"]
        previous["sections"] = {name: {"date": machine["date"], "commit": machine["commit"], "minutes": None}
                                for name in SECTIONS if name in previous}
    return previous


if __name__ == "__main__":
    main(sys.argv[1:])
