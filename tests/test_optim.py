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


def test_adamw_is_torchs_fused_kernel_with_the_same_update_and_the_default_where_there_is_none():
    """`adamw` takes torch's fused AdamW (a kernel per tensor; the default on CPU loops a dozen operations per tensor),
    whose steps equal the default implementation's to float rounding; a device or dtype without the kernel gets the
    default."""
    from pbkd_lightning.optim import OptimizerConfig, build_optimizer

    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    theirs.load_state_dict(ours.state_dict())
    optimizer, _ = build_optimizer("adamw", ours, OptimizerConfig(lr=0.01, weight_decay=0.1), 10)
    reference = torch.optim.AdamW(theirs.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    assert optimizer.defaults["fused"] and not reference.defaults["fused"]
    for _ in range(20):
        x = torch.randn(4, 16)
        for model, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for mine, other in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(mine, other, rtol=1e-5, atol=1e-6) and not torch.equal(mine, torch.zeros_like(mine))

    class Complex(torch.nn.Module):  # a dtype the fused kernel does not take (torch would only say so at the first step)
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))

    model = Complex()
    optimizer, _ = build_optimizer("adamw", model, OptimizerConfig(), 10)
    assert not optimizer.defaults["fused"]
    model.weight.grad = torch.ones_like(model.weight)
    before = model.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.weight, before)
