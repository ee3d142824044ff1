"""GKD through this library against TRL's ``GKDTrainer``, side by side: the same tiny models and data, built offline.

    python -m benchmarks.against_trl                 # vocabularies 8,192 and 49,152, off- and on-policy
    python -m benchmarks.against_trl --quick         # vocabulary 1,024, a few steps: a smoke test

Needs the optional ``bench`` extra (``pip install -e '.[bench]'``: TRL; ``make bench`` installs it); without TRL the
section is skipped and says so.

The models are random Qwen2 configurations (teacher 4 layers × 256, student 2 × 128) over a word-level tokenizer
with a chat template; the data is 256 chat examples of about 130 tokens (a 64-word question, a 64-word answer
and its end token). Both sides: batch 8, generalized JSD with β = 0.5 at temperature 1, AdamW at 1e-4 with a
linear schedule to 0 and no warm-up, gradient clipping at 1, on-policy samples of up to 72 new tokens at
temperature 1 with no top-k/top-p, float32, 2 threads. Each measurement is its own process (its peak RSS is its
own): steps per second from the end of the warm-up steps, and the scored tokens per step. Then a few more steps
run off the clock under torch's FlopCounterMode: each side's FLOPs per step, its achieved FLOP/s and their fraction of
the best float32 1024³ matmul measured in the same process. The equal-math check takes one batch through both losses
in float64 and compares the loss and the student's gradient.
"""

import argparse
import json
import os
import random
import time

from benchmarks.divergence_memory import peak_mb, run_isolated  # VmHWM: ru_maxrss carries the forking parent's peak

SIZES = {"full": dict(vocabs=(8192, 49152), warm=2, steps=10), "quick": dict(vocabs=(1024,), warm=1, steps=2)}
GOALS = {8192: 4.0, 49152: 8.0}  # the speed issue's goals: library steps/s over TRL's, off- and on-policy
FLOP_STEPS = 2  # steps after the timed ones whose FLOPs are counted, off the clock (the counter slows a step)
EXAMPLES, WORDS_PER_TURN, MAX_NEW_TOKENS, BATCH, LR = 256, 64, 72, 8, 1e-4
SPECIALS = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{% if m['role'] == 'assistant' %} <eos>{% endif %} "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def trl_available() -> bool:
    try:
        import trl.experimental.gkd  # noqa: F401
    except ImportError:
        return False
    return True


def build(folder: str, vocab: int, seed: int = 0) -> dict:
    """Tokenizer, random teacher and student, train/val chat files under ``folder`` (built once)."""
    # the tokenizer in a folder of its own: next to a Qwen2 config.json, AutoTokenizer would rebuild it as Qwen2's BPE
    paths = {name: os.path.join(folder, name) for name in ("tokenizer", "teacher", "student", "train.jsonl", "val.jsonl")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = [f"w{i}" for i in range(vocab - len(SPECIALS))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                        model_max_length=512)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(paths["tokenizer"])
    for name, (layers, hidden, init_seed) in {"teacher": (4, 256, seed + 1), "student": (2, 128, seed)}.items():
        torch.manual_seed(init_seed)
        config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
                             pad_token_id=0, eos_token_id=2, bos_token_id=None)
        model = Qwen2ForCausalLM(config)
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 0
        model.save_pretrained(paths[name])
    draw = random.Random(seed)
    for split, count in (("train.jsonl", EXAMPLES), ("val.jsonl", 8)):
        with open(paths[split], "w") as handle:
            for _ in range(count):
                question, answer = (" ".join(draw.choices(words, k=WORDS_PER_TURN)) for _ in range(2))
                handle.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                      {"role": "assistant", "content": answer}]}) + "\n")
    return paths


def library_args(paths: dict, root: str, policy: str, steps: int) -> list[str]:
    """This library's fit of the same GKD: the student and teacher folders, the chat file, the same optimizer."""
    return [
        "--config", "configs/baselines/gkd.yaml", f"--trainer.default_root_dir={root}", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.log_every_n_steps=1", "--trainer.max_epochs=1", f"--trainer.limit_train_batches={steps}",
        "--trainer.limit_val_batches=0", "--trainer.reload_dataloaders_every_n_epochs=0",
        f"--model.student.path={paths['student']}", f"--model.student.tokenizer={paths['tokenizer']}",
        f"--model.teacher.path={paths['teacher']}", f"--model.teacher.tokenizer={paths['tokenizer']}", "--model.warmup.steps=0",
        f"--model.objective.init_args.on_policy_fraction={1.0 if policy == 'on' else 0.0}", "--model.objective.init_args.beta=0.5",
        f"--model.student_optimizer.lr={LR}", "--model.student_optimizer.schedule=linear", "--model.student_optimizer.warmup_steps=0",
        "--model.student_optimizer.grad_clip=1.0", "--model.num_threads=2", "--model.save_student=false", "--model.samples_to_show=0",
        f"--data.train_file={paths['train.jsonl']}", f"--data.val_file={paths['val.jsonl']}", "--data.format=chat",
        f"--data.batch_size={BATCH}", "--data.prompts_per_epoch=null", "--data.max_prompt_tokens=96",
        f"--data.generation.max_new_tokens={MAX_NEW_TOKENS}", "--data.generation.temperature=1.0",
        "--data.generation.top_k=0", "--data.generation.top_p=1.0",
    ]


def measure_library(folder: str, vocab: int, policy: str, warm: int, steps: int) -> dict:
    from lightning.pytorch import Callback
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.runner import quiet_cli

    class Clock(Callback):
        def __init__(self):
            self.starts, self.scored, self.counter = [], [], FlopCounterMode(display=False)

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.starts.append(time.perf_counter())
            if batch_idx == warm + steps:  # the clock has stopped: count the remaining steps' FLOPs
                self.counter.__enter__()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.scored.append(float(module.last_step_means["student/scored_tokens"]))  # logged every batch here

        def on_train_epoch_end(self, trainer, module):
            self.counter.__exit__(None, None, None)

    paths = build(folder, vocab)
    cli = quiet_cli(library_args(paths, os.path.join(folder, f"library-{policy}"), policy, warm + steps + FLOP_STEPS), run=False)
    clock = Clock()
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, cli.datamodule)
    return _figures(clock.starts, clock.scored, clock.counter.get_total_flops(), warm, steps)


def _figures(starts: list[float], scored: list[float], flops: int, warm: int, steps: int) -> dict:
    """One side's figures: ``starts`` of every step (timed ones from index ``warm``), the scored tokens of every step,
    the FLOPs counted over the ``FLOP_STEPS`` steps after the timed ones."""
    from benchmarks.step_speed import matmul_peak_flops

    rate, per_step, peak = steps / (starts[warm + steps] - starts[warm]), flops / FLOP_STEPS, matmul_peak_flops()
    return {"steps_per_s": rate, "scored_tokens_per_step": sum(scored[warm : warm + steps]) / steps, "peak_rss_mb": peak_mb(),
            "flops_per_step": per_step, "flops_per_s": per_step * rate, "matmul_peak_flops_per_s": peak,
            "fraction_of_peak": per_step * rate / peak}


def measure_trl(folder: str, vocab: int, policy: str, warm: int, steps: int) -> dict:
    import datasets
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    torch.set_num_threads(2)
    paths = build(folder, vocab)
    starts, scored, counter = [], [], FlopCounterMode(display=False)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            starts.append(time.perf_counter())
            if len(starts) == warm + steps + 1:  # as the library's clock: the remaining steps' FLOPs, off the clock
                counter.__enter__()

        def on_train_end(self, args, state, control, **kwargs):
            counter.__exit__(None, None, None)

    class CountingGKD(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            scored.append(int((inputs["labels"][:, 1:] != -100).sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = GKDConfig(output_dir=os.path.join(folder, f"trl-{policy}"), per_device_train_batch_size=BATCH, max_steps=warm + steps + FLOP_STEPS,
                     learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                     lmbda=1.0 if policy == "on" else 0.0, beta=0.5, temperature=1.0, max_new_tokens=MAX_NEW_TOKENS,
                     use_cpu=True, report_to=[], save_strategy="no", logging_steps=10_000, dataloader_num_workers=0,
                     disable_tqdm=True, seed=0, bf16=False, fp16=False)
    trainer = CountingGKD(model=AutoModelForCausalLM.from_pretrained(paths["student"]),
                          teacher_model=AutoModelForCausalLM.from_pretrained(paths["teacher"]), args=args,
                          train_dataset=datasets.load_dataset("json", data_files=paths["train.jsonl"], split="train"),
                          processing_class=AutoTokenizer.from_pretrained(paths["tokenizer"]), callbacks=[Clock()])
    trainer.train()
    return _figures(starts, scored, counter.get_total_flops(), warm, steps)


def equal_math(folder: str, vocab: int) -> dict:
    """One batch of 8 examples through TRL's ``generalized_jsd_loss`` on its collator's batch and through this
    library's GKD objective on its own encoding of the same examples, both models in float64, at β = 0.5 and 0.1:
    the largest relative difference of the loss and of the student's gradient (they must be ≤ 1e-7)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    from pbkd_lightning.data.collate import StudentCollate
    from pbkd_lightning.data.generation import GenerationConfig
    from pbkd_lightning.objectives import DivergenceKD
    from pbkd_lightning.objectives.base import Share
    from pbkd_lightning.players import Players
    from pbkd_lightning.sequences import Encoder

    paths = build(folder, vocab)
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    student = AutoModelForCausalLM.from_pretrained(paths["student"]).double()
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"]).double().requires_grad_(False)
    with open(paths["train.jsonl"]) as handle:
        examples = [json.loads(line) for _, line in zip(range(BATCH), handle)]

    batch = DataCollatorForChatML(tokenizer=tokenizer)(examples)
    encoder = Encoder(tokenizer, 96, MAX_NEW_TOKENS)
    players = Players(student, tokenizer, GenerationConfig(), encoder, teacher=teacher, vocabulary=vocab)
    items = [{"prompt": e["messages"][0]["content"], "teacher": e["messages"][1]["content"], "row": None} for e in examples]
    ours_batch = StudentCollate(encoder)(items)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = {"scored_tokens": [int((batch["labels"][:, 1:] != -100).sum()), int(ours_batch.teacher.num_scored)],
           "loss_rel_diff": 0.0, "grad_rel_diff": 0.0}
    for beta in (0.5, 0.1):  # an asymmetric β too: a swapped convention would pass at 0.5
        student.zero_grad()
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = GKDTrainer.generalized_jsd_loss(logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:], beta=beta)
        theirs.backward()
        their_grad = torch.cat([p.grad.flatten() for p in student.parameters()])
        student.zero_grad()
        ours = DivergenceKD("generalized_jsd", beta=beta).student_loss(players, ours_batch, Share.whole(ours_batch))["loss"]
        ours.backward()
        our_grad = torch.cat([p.grad.flatten() for p in student.parameters()])
        theirs, ours = float(theirs.detach()), float(ours.detach())
        out[f"loss_trl_beta{beta}"], out[f"loss_library_beta{beta}"] = theirs, ours
        out["loss_rel_diff"] = max(out["loss_rel_diff"], abs(theirs - ours) / abs(theirs))
        out["grad_rel_diff"] = max(out["grad_rel_diff"], float((their_grad - our_grad).norm() / their_grad.norm()))
    return out


ISOLATED_ENV = {"OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}


def isolated(function: str, **arguments) -> dict:
    """``function(**arguments)`` of this file in a fresh process (its peak RSS and threads its own)."""
    return run_isolated(f"benchmarks.against_trl:{function}", arguments, ISOLATED_ENV)


def compare(vocab: int, warm: int, steps: int, folder: str = "runs/bench-trl") -> dict:
    """One vocabulary: the equal-math check, then off- and on-policy steps on both sides, interleaved."""
    if not trl_available():
        return {"vocab": vocab, "skipped": "TRL is not installed (pip install -e '.[bench]')"}
    folder = os.path.abspath(os.path.join(folder, f"vocab-{vocab}"))
    row = {"vocab": vocab, "equal_math": isolated("equal_math", folder=folder, vocab=vocab)}
    for policy in ("off", "on"):
        sizes = dict(folder=folder, vocab=vocab, policy=policy, warm=warm, steps=steps)
        library, trl = isolated("measure_library", **sizes), isolated("measure_trl", **sizes)
        row[policy] = {"library": library, "trl": trl, "ratio": library["steps_per_s"] / trl["steps_per_s"],
                       "memory_ratio": library["peak_rss_mb"] / trl["peak_rss_mb"]}
        if vocab in GOALS:  # what the goal asks of the machine: the library's FLOPs at GOALS × TRL's steps/s, of its peak
            row[policy]["goal"] = GOALS[vocab]
            row[policy]["goal_fraction_of_peak"] = (GOALS[vocab] * trl["steps_per_s"] * library["flops_per_step"]
                                                    / library["matmul_peak_flops_per_s"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="vocabulary 1,024 and a few steps")
    parser.add_argument("--folder", default="runs/bench-trl", help="where the models, data and runs go")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    if not trl_available():
        print("TRL is not installed: the comparison is skipped (pip install -e '.[bench]')")
        return
    rows = []
    print(f"{'vocab':>7} {'policy':>6} {'library steps/s':>16} {'TRL steps/s':>12} {'×':>6} {'library MB':>11} {'TRL MB':>7} "
          f"{'scored/step':>12} {'GFLOP/step':>13} {'of peak':>11} {'goal needs':>10}  equal math (loss, gradient rel. diff)")
    for vocab in size["vocabs"]:
        row = compare(vocab, size["warm"], size["steps"], args.folder)
        rows.append(row)
        check = row["equal_math"]
        for policy in ("off", "on"):
            r = row[policy]
            print(f"{vocab:>7} {policy:>6} {r['library']['steps_per_s']:>16.2f} {r['trl']['steps_per_s']:>12.2f} {r['ratio']:>6.2f} "
                  f"{r['library']['peak_rss_mb']:>11.0f} {r['trl']['peak_rss_mb']:>7.0f} "
                  f"{r['library']['scored_tokens_per_step']:>5.0f}/{r['trl']['scored_tokens_per_step']:<6.0f} "
                  f"{r['library']['flops_per_step'] / 1e9:>6.2f}/{r['trl']['flops_per_step'] / 1e9:<6.2f} "
                  f"{r['library']['fraction_of_peak']:>5.0%}/{r['trl']['fraction_of_peak']:<5.0%} "
                  f"{r['goal_fraction_of_peak'] if 'goal' in r else float('nan'):>10.0%}  "
                  f"{check['loss_rel_diff']:.1e}, {check['grad_rel_diff']:.1e}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
