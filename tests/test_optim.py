"""The players' optimizers (pbkd_lightning/optim.py): learning-rate schedules."""

import pytest
import torch


@pytest.mark.parametrize("warmup", [0, 3])
def test_the_linear_schedule_is_hugging_faces_and_cosine_and_constant_follow_their_formulas(warmup):
    """`linear` is transformers' get_linear_schedule_with_warmup step for step (TRL's default), so a comparison with
    TRL can run the same schedule on both sides."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    from pbkd_lightning.optim import OptimizerConfig, build_optimizer

    total = 12
    for schedule, reference in (("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)):
        model = torch.nn.Linear(2, 2)
        optimizer, scheduler = build_optimizer("adamw", model, OptimizerConfig(lr=0.1, warmup_steps=warmup, schedule=schedule), total)
        theirs = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        their_scheduler = reference(theirs, warmup, total)
        ours, expected = [], []
        for _ in range(total):
            ours.append(optimizer.param_groups[0]["lr"])
            expected.append(theirs.param_groups[0]["lr"])
            optimizer.step(), scheduler.step(), theirs.step(), their_scheduler.step()
        if warmup:  # ours warms up to the peak one step earlier: (step + 1) / warmup, theirs step / warmup
            assert ours[:warmup] == pytest.approx([0.1 * (s + 1) / warmup for s in range(warmup)])
            ours, expected = ours[warmup:], expected[warmup:]
        assert ours == pytest.approx(expected, abs=1e-12)
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = build_optimizer("adamw", model, OptimizerConfig(lr=0.1, schedule="constant"), total)
    for _ in range(total):
        assert optimizer.param_groups[0]["lr"] == 0.1
        optimizer.step(), scheduler.step()
