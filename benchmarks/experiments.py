"""What ``make bench`` runs, as data: every experiment of every section, for each size (quick or full).

An experiment is either a fit through the CLI (its configs and overrides) or a measuring script (``measure``, a
``module:function`` called with ``params``; step speed also gets the fit's CLI arguments). ``benchmarks/runner.py``
runs them and ``benchmarks/report.py`` turns their records into RESULTS.md.
"""

from dataclasses import dataclass, field

SECTIONS = ("quality", "pbkd", "iterations", "outside", "speed", "trl", "scaling")


@dataclass(frozen=True)
class Experiment:
    name: str  # the row's label, unique within its section
    section: str
    configs: tuple[str, ...] = ()  # --config files relative to the repository root: the method's, then overlays
    overrides: tuple[str, ...] = ()  # the experiment's own, applied last
    shared_overrides: tuple[str, ...] = ()  # the size's: each applied where the method's parsed config has its key
    seeds: tuple[int, ...] = (0,)
    epochs: int = 1
    measure: str = ""  # "module:function" of a measuring script; empty: the experiment is a fit
    params: dict = field(default_factory=dict)  # the measuring function's arguments
    tags: dict = field(default_factory=dict)  # what the report groups and plots the row by
    same_wall_clock_as: str = ""  # "section/name": --trainer.max_time = that row's mean wall time over its seeds
    # "module:function" writing the fit's data files into a folder of the work folder, called as
    # function(folder, **data_params) before its runs; "{data}" in the overrides is that folder
    data: str = ""
    data_params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Size:
    name: str
    seeds: tuple[int, ...]  # every row's
    headline_seeds: tuple[int, ...]  # SeqKD's and the recommended black-box PbKD's, offline and online
    epochs: int
    overrides: tuple[str, ...]  # every fit, where the method's config has the key (e.g. model.teacher.* for white-box)
    online_iterations: tuple[int, ...]
    speed_steps: int  # timed training steps, after 2 warm-up steps
    sampling: dict  # benchmarks.sampling_speed:measure's arguments
    sampling_135m: dict  # the same, on the real 135M SmolLM2 (configs/smollm2.yaml's model)
    divergence: dict  # batch, tokens and vocabularies of the chunked-divergence check
    fused: dict  # scored rows and vocabularies of the fused projection + divergence check
    outside: dict  # training and held-out prompts of the task kept outside the project (benchmarks/outside_task.py)
    trl: dict  # vocabularies, warm-up and timed steps of the comparison with TRL's GKDTrainer
    scaling: dict  # batch; tokens (at vocabulary `vocab`) and vocabularies (at `at_tokens` tokens)


METHODS = [  # the quality table: (name, configs, overrides)
    ("SeqKD", ("configs/baselines/seqkd.yaml",), ()),
    ("Black-box PbKD, offline", ("configs/blackbox.yaml",), ()),
    ("Black-box PbKD, online", ("configs/blackbox.yaml", "configs/online.yaml"), ()),
    ("White-box PbKD", ("configs/whitebox.yaml",), ()),
    ("Forward KL", ("configs/baselines/fkl.yaml",), ()),
    ("Reverse KL", ("configs/baselines/rkl.yaml",), ()),
    ("GKD", ("configs/baselines/gkd.yaml",), ()),
    ("Skew KL", ("configs/baselines/skew_kl.yaml",), ()),
    ("Skew reverse KL", ("configs/baselines/skew_rkl.yaml",), ()),
    ("TVD", ("configs/baselines/tvd.yaml",), ()),
    ("MiniLLM", ("configs/baselines/minillm.yaml",), ()),
    ("X-KD, sequence-level", ("configs/xkd.yaml",), ()),
    ("X-KD, divergence-based", ("configs/xkd.yaml",), ("--model.objective.kd=generalized_jsd",)),
]

BASELINE = "SeqKD"  # every row's paired difference is taken against it
HEADLINE = ("SeqKD", "Black-box PbKD, offline", "Black-box PbKD, online")  # the mission's question: more seeds

# Reverse KL, skew KL/RKL and TVD share forward KL's step code, so they are not timed separately.
SPEED_METHODS = ("SeqKD", "Black-box PbKD, offline", "White-box PbKD", "Forward KL", "GKD", "MiniLLM", "X-KD, sequence-level")

# Black-box PbKD variants (docs/pbkd-quality.md): (label, configs, overrides); configs/blackbox.yaml holds the
# recommended defaults, whose offline and online rows are the quality table's.
BLACKBOX = ("configs/blackbox.yaml",)
PBKD_VARIANTS = [
    ("paper: scalar head (last token), teacher labels, 1 critic step", BLACKBOX,
     ("--model.critic.kind=scalar", "--model.objective.critic_steps=1", "--data.sample_pairs=false", "--model.objective.critic_trust=always")),
    ("implicit reward, 1 critic step", BLACKBOX,
     ("--model.objective.critic_steps=1", "--data.sample_pairs=false", "--model.objective.critic_trust=always")),
    ("implicit, 4 critic steps, sample pairs, no gate", BLACKBOX,
     ("--model.objective.critic_steps=4", "--data.sample_pairs=true", "--model.objective.critic_trust=always")),
]
WALL_CLOCK_OF = "quality/Black-box PbKD, offline"  # the SeqKD row given the same wall-clock budget

# The method ordering again on a task outside the project (benchmarks/outside_task.py), through the CLI as a user
# runs it: JSONL prompts and a response-file teacher. Black-box methods only: a response file has no probabilities.
OUTSIDE_METHODS = ("SeqKD", "Black-box PbKD, offline", "Black-box PbKD, online", "X-KD, sequence-level")
OUTSIDE_DATA = ("--data.train_file={data}/train.jsonl", "--data.val_file={data}/val.jsonl",
                "--data.teacher=pbkd_lightning.data.ResponseFileTeacher", "--data.teacher.path={data}/teacher.jsonl")

SIZES = {
    # Toy size: every table and plot, in minutes.
    "quick": Size(
        name="quick", seeds=(0, 1, 2), headline_seeds=(0, 1, 2), epochs=1, online_iterations=(1, 2), speed_steps=3,
        overrides=(
            "--model.student.layers=1", "--model.student.hidden=32", "--model.student.heads=2",
            "--model.teacher.layers=1", "--model.teacher.hidden=64", "--model.teacher.heads=2", "--model.teacher.train_steps=20",
            "--model.warmup.steps=5", "--data.train_size=8", "--data.val_size=4", "--data.samples_per_prompt=2",
            "--data.batch_size=4", "--data.critic_batch_size=8", "--data.generation.max_new_tokens=12",
            "--model.val_generation.max_new_tokens=12", "--model.objective.critic_warmup_steps=0",
        ),
        sampling=dict(tiny=True, prompts=16, max_new_tokens=12, samples=2),
        sampling_135m=dict(tiny=False, prompts=4, max_new_tokens=4, samples=2, batch=4, smollm2=True),
        divergence=dict(batch=2, tokens=64, vocabs=(4096, 16384)),
        outside=dict(train_size=16, val_size=16),
        fused=dict(rows=64, vocabs=(4096,)),
        trl=dict(vocabs=(1024,), warm=1, steps=2),
        scaling=dict(batch=2, tokens=(32, 64, 128), vocab=4096, vocabs=(1024, 4096, 16384), at_tokens=64),
    ),
    # The testbed as configs/ define it (the pool, 500 held-out prompts per task, the default models): what users run.
    "full": Size(
        name="full", seeds=(0, 1, 2), headline_seeds=(0, 1, 2, 3, 4), epochs=4, online_iterations=(1, 3, 5), speed_steps=60,
        overrides=(),
        sampling=dict(tiny=False, prompts=128, max_new_tokens=40, samples=4, compiled=True),
        sampling_135m=dict(tiny=False, prompts=32, max_new_tokens=40, samples=4, batch=32, smollm2=True, compiled=True),
        divergence=dict(batch=4, tokens=512, vocabs=(32000, 151936)),
        outside=dict(train_size=20000, val_size=500),
        fused=dict(rows=1792, vocabs=(32000, 151936)),  # batch 4 × 512 tokens, 1/8 of them prompt
        trl=dict(vocabs=(8192, 49152), warm=2, steps=10),
        scaling=dict(batch=4, tokens=(128, 256, 512, 1024), vocab=32000, vocabs=(8192, 32000, 65536, 151936), at_tokens=512),
    ),
}


def experiments(size: Size) -> list[Experiment]:
    """Every experiment of ``size``, in the order they run (a same-wall-clock row after the row it is timed against)."""
    shared = size.overrides
    out = [Experiment(name, "quality", configs, overrides, shared, size.headline_seeds if name in HEADLINE else size.seeds,
                      size.epochs, tags={"baseline": name == BASELINE}) for name, configs, overrides in METHODS]

    out += [Experiment(label, "pbkd", configs, overrides, shared, size.seeds, size.epochs) for label, configs, overrides in PBKD_VARIANTS]
    # min_epochs: a budget shorter than one epoch still ends with a validation (Lightning stops at its end)
    out.append(Experiment(f"SeqKD, same wall-clock as {WALL_CLOCK_OF.split('/')[1]}", "pbkd", ("configs/baselines/seqkd.yaml",),
                          ("--trainer.min_epochs=1",), shared, size.headline_seeds, 10 * size.epochs,
                          same_wall_clock_as=WALL_CLOCK_OF, tags={"baseline": True}))

    # One run of each as long as the longest count: an online run's first n iterations do not depend on how many
    # follow (constant learning rate, a new prompt window per epoch; tests/test_module.py checks it), so the report
    # reads n iterations off the held-out score after epoch n. Offline, epoch n of the long run (its samples were
    # drawn for all epochs at the start).
    last = max(size.online_iterations)
    out.append(Experiment(f"offline, {last} epochs", "iterations", BLACKBOX, (), shared, size.seeds, last, tags={"iterations": 0}))
    out.append(Experiment(f"online, {last} iterations", "iterations", BLACKBOX + ("configs/online.yaml",), (), shared,
                          size.seeds, last, tags={"iterations": last}))

    out += [Experiment(name, "outside", configs, overrides + OUTSIDE_DATA, shared, size.seeds, size.epochs,
                       data="benchmarks.outside_task:write", data_params=size.outside, tags={"baseline": name == BASELINE})
            for name, configs, overrides in METHODS if name in OUTSIDE_METHODS]

    for name, configs, overrides in METHODS:
        if name in SPEED_METHODS:  # critic_warmup_steps=0: student steps are timed too, from the first batch
            out.append(Experiment(name, "speed", configs, overrides, shared + ("--model.objective.critic_warmup_steps=0",),
                                  measure="benchmarks.step_speed:measure", params={"warm": 2, "steps": size.speed_steps}))
    out.append(Experiment("sampling", "speed", measure="benchmarks.sampling_speed:measure", params=size.sampling))
    # one sample per prompt: greedy validation and on-policy GKD decode this way
    out.append(Experiment("sampling, one sample per prompt", "speed", measure="benchmarks.sampling_speed:measure",
                          params=dict(size.sampling, samples=1)))
    out.append(Experiment("sampling, SmolLM2-135M", "speed", measure="benchmarks.sampling_speed:measure", params=size.sampling_135m))
    d = size.divergence
    out += [Experiment(f"divergence, vocabulary {vocab}", "speed", measure="benchmarks.divergence_memory:compare",
                       params={"batch": d["batch"], "tokens": d["tokens"], "vocab": vocab}) for vocab in d["vocabs"]]
    out += [Experiment(f"fused divergence, vocabulary {vocab}", "speed", measure="benchmarks.divergence_memory:compare_fused",
                       params={"rows": size.fused["rows"], "vocab": vocab}) for vocab in size.fused["vocabs"]]

    # needs the bench extra (TRL); a machine without it records the row as skipped
    out += [Experiment(f"vocabulary {vocab}", "trl", measure="benchmarks.against_trl:compare",
                       params={"vocab": vocab, "warm": size.trl["warm"], "steps": size.trl["steps"]}) for vocab in size.trl["vocabs"]]

    s = size.scaling
    out += [Experiment(f"tokens {tokens}", "scaling", measure="benchmarks.divergence_memory:compare",
                       params={"batch": s["batch"], "tokens": tokens, "vocab": s["vocab"]}, tags={"axis": "tokens", "x": tokens})
            for tokens in s["tokens"]]
    out += [Experiment(f"vocabulary {vocab}", "scaling", measure="benchmarks.divergence_memory:compare",
                       params={"batch": s["batch"], "tokens": s["at_tokens"], "vocab": vocab}, tags={"axis": "vocab", "x": vocab})
            for vocab in s["vocabs"]]
    return out
