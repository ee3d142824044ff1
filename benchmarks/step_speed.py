"""Training steps per second through Lightning against a hand-written loop over the same batches, step for step.

    python -m benchmarks.step_speed --steps 20 -- --config configs/blackbox.yaml --model.objective.critic_warmup_steps=0

Both run one method as its CLI arguments build it: the library's ``trainer.fit`` over ``warm + steps`` batches (what
happens once an epoch, e.g. saving last.ckpt, is not a step), and a plain loop doing the same objective losses, AdamW
steps and clipping on batches from the same data module (no Lightning, no logging). The two alternate: after each of
the library's steps the hand loop takes one of its own on the same models, so a slow spell of this 2-core machine
(another process, a descheduled thread, the CPU's clock) falls on both sides alike instead of on whichever ran second.
Each side's step time is the interval from one batch's start to the next's (the step, the loop's own work and the next
batch's fetch; the library's interval less the hand step taken inside it); the ratio is of the two medians over the
timed steps, and the ratio of the means is reported beside it.
"""

import argparse
import contextlib
import copy
import io
import json
import math
import random
import statistics
import time

import torch

from pbkd_lightning.objectives.base import Share


def measure(cli_args: list[str], warm: int, steps: int) -> dict:
    """``cli_args``: a fit's arguments (without ``fit``); its epoch is cut to ``warm + steps + 1`` batches, no
    validation (the last batch only ends the last timed interval, as each batch's start ends the one before)."""
    from lightning.pytorch import Callback

    from benchmarks.runner import quiet_cli

    class Alternate(Callback):
        """Times the library's batches and, after each, takes and times one hand-loop step."""

        def __init__(self):
            self.starts, self.inside, self.hand = [], [], None

        def on_train_start(self, trainer, module):
            self.hand = HandLoop(module, trainer.datamodule)

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx < warm + steps:  # the hand loop warms up beside the library too
                self.inside.append(self.hand.timed_step())

    cli = quiet_cli([*cli_args, f"--trainer.limit_train_batches={warm + steps + 1}", "--trainer.limit_val_batches=0",
                     "--trainer.max_epochs=1", "--trainer.min_epochs=1"], run=False)
    clock = Alternate()
    cli.trainer.callbacks.append(clock)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli.trainer.fit(cli.model, cli.datamodule)
    if len(clock.starts) < warm + steps + 1:
        raise ValueError(f"an epoch holds {len(clock.starts)} batches, and {warm + steps + 1} are needed (warm + steps + 1): "
                         "time fewer steps or give the epoch more prompts")
    # step i's interval: its start to the next batch's start, less the hand step taken between them
    library_intervals = [b - a - h for a, b, h in zip(clock.starts, clock.starts[1:], clock.inside)][warm:]
    manual_intervals = clock.hand.intervals[warm:]
    library, library_mean = interval_rates(library_intervals)
    manual, manual_mean = interval_rates(manual_intervals)
    flops = clock.hand.flops_per_step(min(steps, FLOP_STEPS))
    peak = matmul_peak_flops()
    return {"library_steps_per_s": library, "manual_steps_per_s": manual, "ratio": library / manual,
            "library_mean_steps_per_s": library_mean, "manual_mean_steps_per_s": manual_mean, "ratio_of_means": library_mean / manual_mean,
            "flops_per_step": flops, "library_flops_per_s": flops * library, "matmul_peak_flops_per_s": peak,
            "fraction_of_peak": flops * library / peak, "interleaved": True}


def interval_rates(intervals: list[float]) -> tuple[float, float]:
    """Steps per second from step times: by the median step time and by the mean."""
    return 1 / statistics.median(intervals), len(intervals) / sum(intervals)


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


class HandLoop:
    """The same objective losses, optimizers, schedules and clipping in a plain loop, on the module's own models: its
    own optimizers (from the module's own ``configure_optimizers``), its own copy of the objective's draws (GKD's λ coin) and of the
    players' kept reference log-probs, its own count of batches (critic-only batches first, as the module), and its own
    pass over the epoch's batches, so it does neither more nor less work than the library's steps."""

    def __init__(self, module, datamodule):
        self.objective = copy.copy(module.objective)
        self.players = copy.copy(module.players)
        self.players._reference_logprobs = {}
        self.student, self.critic, self.module = module.student, module.critic, module
        self.precision = module.trainer.precision_plugin  # its autocast, as Lightning runs the training step under it
        self.configs = {"student": module.student_optimizer_config, "critic": module.critic_optimizer_config}
        optimizers, schedules = module.configure_optimizers()  # new ones over the same models, the critic's first
        roles = ("critic", "student") if self.critic is not None else ("student",)
        self.optimizers = dict(zip(roles, zip(optimizers, schedules)))  # role -> (optimizer, schedule)
        # the batches of the epoch the library is timed on (epoch 0); the loader resets the global seed as the
        # library's did, and builds nothing a second time (an offline run's samples are the epoch's)
        self.loader = datamodule.train_dataloader()
        self.intervals = []
        self._fresh_pass()

    def _fresh_pass(self) -> None:
        """Each pass starts as the library's epoch did: the objective's draws from its seed, no reference log-probs
        kept from another pass (the module forgets them at an epoch's start)."""
        if hasattr(self.objective, "_draws"):
            self.objective._draws = random.Random(self.objective.seed)
        self.players.forget_reference_logprobs()
        self.batches_seen = 0
        loader = self.loader
        self.batches = iter(zip(loader["student"], loader["critic"]) if isinstance(loader, dict) else ((b, b) for b in loader))

    def timed_step(self) -> float:
        """One step (its batch's fetch, then the step): returns its seconds, which are also kept in ``intervals``."""
        start = time.perf_counter()
        self.one_step(*next(self.batches))
        self.intervals.append(time.perf_counter() - start)
        return self.intervals[-1]

    def _step(self, role, model, other, loss_fn) -> None:
        (optimizer, schedule), clip = self.optimizers[role], self.configs[role].grad_clip
        frozen = [p for p in other.parameters() if p.requires_grad] if other is not None else []
        for p in frozen:
            p.requires_grad_(False)  # what toggle_optimizer does: no gradient for the other player (and back after)
        optimizer.zero_grad(set_to_none=True)
        loss_fn()["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip if clip > 0 else math.inf)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        for p in frozen:
            p.requires_grad_(True)

    def one_step(self, student_batch, critic_batch) -> None:
        with self.precision.forward_context():
            self._one_step(student_batch, critic_batch)
        self.batches_seen += 1

    def _one_step(self, student_batch, critic_batch) -> None:
        objective, players, student, critic = self.objective, self.players, self.student, self.critic
        if critic is not None:  # `critic_steps` > 1: a list of batches, one critic step each, as the module does
            for batch in critic_batch if isinstance(critic_batch, list) else [critic_batch]:
                self._step("critic", critic, student, lambda: objective.critic_loss(players, batch, Share.whole(batch)))
        if self.batches_seen < objective.critic_warmup_steps:
            return  # the module's critic-only batches
        mode = student.training if objective.needs_samples else None
        if mode is not None:
            student.eval()  # as the module: on-policy steps score π_θ with dropout off
        try:
            student_batch = objective.prepare_student_batch(players, student_batch)
            self._step("student", student, critic,
                       lambda: objective.student_loss(players, student_batch, Share.whole(student_batch), self.module.critic_heldout_acc))
        finally:
            if mode is not None:
                student.train(mode)

    def flops_per_step(self, counted: int) -> float:
        """The mean FLOPs of a step (critic and student steps, sampling included) over ``counted`` steps of a fresh
        pass (the same draws), under torch's FlopCounterMode, off the clock."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        self._fresh_pass()
        with counter:
            for _ in range(counted):
                self.one_step(*next(self.batches))
        return counter.get_total_flops() / counted


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
