"""Training steps per second through Lightning against a hand-written loop over the same batches.

    python -m benchmarks.step_speed --steps 20 -- --config configs/blackbox.yaml --model.objective.critic_warmup_steps=0

Both run one method as its CLI arguments build it: the library's ``trainer.fit`` over ``warm + steps`` batches (what
happens once an epoch, e.g. saving last.ckpt, is not a step), then a plain loop doing the same objective losses, AdamW
steps and clipping on batches from the same data module (no Lightning, no logging). Each side's step time is the
interval from one batch's start to the next's (the step, the loop's own work and the next batch's fetch); the ratio is
of the two medians over the timed steps, which a descheduled step or another process's burst on this 2-core machine
moves little, and the ratio of the means is reported beside it.
"""

import argparse
import contextlib
import io
import json
import random
import statistics
import time

import torch

from pbkd_lightning.objectives.base import Share


def measure(cli_args: list[str], warm: int, steps: int) -> dict:
    """``cli_args``: a fit's arguments (without ``fit``); its epoch is cut to ``warm + steps`` batches, no validation."""
    from lightning.pytorch import Callback

    from benchmarks.runner import quiet_cli

    class StepClock(Callback):
        def __init__(self):
            self.starts, self.ends = [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())

    # one epoch: the clock runs from the first batch after the warm-up steps to the end of the last one
    cli = quiet_cli([*cli_args, f"--trainer.limit_train_batches={warm + steps}", "--trainer.limit_val_batches=0",
                     "--trainer.max_epochs=1", "--trainer.min_epochs=1"], run=False)
    clock = StepClock()
    cli.trainer.callbacks.append(clock)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli.trainer.fit(cli.model, cli.datamodule)
    library, library_mean = step_rates(clock.starts[warm:] + clock.ends[-1:])
    (manual, manual_mean), flops = hand_loop(cli.model, cli.datamodule, warm, steps)
    peak = matmul_peak_flops()
    return {"library_steps_per_s": library, "manual_steps_per_s": manual, "ratio": library / manual,
            "library_mean_steps_per_s": library_mean, "manual_mean_steps_per_s": manual_mean, "ratio_of_means": library_mean / manual_mean,
            "flops_per_step": flops, "library_flops_per_s": flops * library, "matmul_peak_flops_per_s": peak,
            "fraction_of_peak": flops * library / peak}


def step_rates(starts: list[float]) -> tuple[float, float]:
    """Steps per second from the start times of consecutive steps (the last entry: the end of the last step): by the
    median step time and by the mean."""
    intervals = [b - a for a, b in zip(starts, starts[1:])]
    return 1 / statistics.median(intervals), len(intervals) / (starts[-1] - starts[0])


def matmul_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` float32 ``n × n`` matmuls on this machine's torch threads: the peak that
    the steps' achieved FLOP/s are put against, measured in the same run."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


FLOP_STEPS = 8
"""Steps whose FLOPs are counted (torch's FlopCounterMode, off the clock) and averaged per step."""


def hand_loop(module, datamodule, warm: int, steps: int) -> tuple[tuple[float, float], float]:
    """The same objective losses, optimizers (AdamW) and clipping in a plain loop; returns its steps per second (by the
    median step and by the mean, :func:`step_rates`) and the mean FLOPs of a step (critic and student steps, sampling
    included) over ``FLOP_STEPS`` more steps."""
    from torch.utils.flop_counter import FlopCounterMode

    objective, student, critic, players = module.objective, module.student, module.critic, module.players
    optimizers = {"student": torch.optim.AdamW([p for p in student.parameters()], lr=1e-4)}
    if critic is not None:
        optimizers["critic"] = torch.optim.AdamW([p for p in critic.parameters()], lr=1e-4)
    # the batches of the epoch the library was timed on (epoch 0): after its fit the trainer counts one epoch done,
    # and an offline PbKD run sampled for its epochs only
    progress = module.trainer.fit_loop.epoch_progress.current
    done, progress.completed = progress.completed, 0
    try:
        loader = datamodule.train_dataloader()
    finally:
        progress.completed = done
    def batches():  # (student batch, critic batch) pairs, a fresh pass over the loader each call
        return zip(loader["student"], loader["critic"]) if isinstance(loader, dict) else ((b, b) for b in loader)

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

    def one_step(student_batch, critic_batch):
        if critic is not None:  # `critic_steps` > 1: a list of batches, one critic step each, as the module does
            for batch in critic_batch if isinstance(critic_batch, list) else [critic_batch]:
                step(critic, student, optimizers["critic"], lambda: objective.critic_loss(players, batch, Share.whole(batch)))
        if objective.needs_samples:
            student.eval()  # as the module: on-policy steps score π_θ with dropout off
        student_batch = objective.prepare_student_batch(players, student_batch)
        step(student, critic, optimizers["student"],
             lambda: objective.student_loss(players, student_batch, Share.whole(student_batch), module.critic_heldout_acc))

    def fresh_pass():
        """Each pass starts as the library's epoch did: GKD's λ coin from the objective's seed, and no reference
        log-probs kept from another pass (the module forgets them at an epoch's start)."""
        if hasattr(objective, "_draws"):
            objective._draws = random.Random(objective.seed)
        players.forget_reference_logprobs()

    fresh_pass()
    starts = []  # as the library's clock: each timed step's start, after its batch was fetched
    for index, (student_batch, critic_batch) in enumerate(batches()):
        if index >= warm:
            starts.append(time.perf_counter())
        one_step(student_batch, critic_batch)
        if index == warm + steps - 1:
            starts.append(time.perf_counter())
            break
    # FLOPs: the mean of a few more steps (a fresh pass, the same draws) under the counter, off the clock
    counted, counter = min(steps, FLOP_STEPS), FlopCounterMode(display=False)
    fresh_pass()
    with counter:
        for _, pair in zip(range(counted), batches()):
            one_step(*pair)
    return step_rates(starts), counter.get_total_flops() / counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("cli_args", nargs=argparse.REMAINDER, help="after --: the fit's CLI arguments")
    args = parser.parse_args()
    cli_args = args.cli_args[1:] if args.cli_args[:1] == ["--"] else args.cli_args
    print(json.dumps(measure(cli_args, args.warm, args.steps)))


if __name__ == "__main__":
    main()
