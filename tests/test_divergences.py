"""Token-level divergences: against naive full-tensor formulas, torch's kl_div, and their properties."""

import pytest
import torch
import torch.nn.functional as F

from pbkd_lightning import losses as L

torch.manual_seed(0)
S = torch.randn(2, 6, 13, dtype=torch.double)
T = torch.randn(2, 6, 13, dtype=torch.double)
LABELS = torch.tensor([[5, 1, -100, 2, 3, 4], [-100, 1, 7, 1, 2, -100]])
MASK = LABELS != -100


def naive_kl(p_logits, q_logits):
    lp, lq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def naive(name, s, t, param=None, mask=None):
    ps, pt = s.softmax(-1), t.softmax(-1)
    if name == "forward_kl":
        rows = naive_kl(t, s)
    elif name == "reverse_kl":
        rows = naive_kl(s, t)
    elif name == "generalized_jsd":
        m = param * pt + (1 - param) * ps
        rows = param * (pt * (pt / m).log()).sum(-1) + (1 - param) * (ps * (ps / m).log()).sum(-1)
    elif name == "skew_kl":
        m = param * pt + (1 - param) * ps
        rows = (pt * (pt / m).log()).sum(-1)
    elif name == "skew_reverse_kl":
        m = param * ps + (1 - param) * pt
        rows = (ps * (ps / m).log()).sum(-1)
    else:
        rows = 0.5 * (pt - ps).abs().sum(-1)
    return rows[MASK if mask is None else mask].mean()


CASES = [
    ("forward_kl", {}, None),
    ("reverse_kl", {}, None),
    ("generalized_jsd", {"beta": 0.3}, 0.3),
    ("generalized_jsd", {"beta": 0.5}, 0.5),
    ("skew_kl", {"alpha": 0.1}, 0.1),
    ("skew_reverse_kl", {"alpha": 0.25}, 0.25),
    ("total_variation", {}, None),
]


@pytest.mark.parametrize("name, kwargs, param", CASES)
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_matches_naive_formula(name, kwargs, param, chunk_size):
    value = getattr(L, name)(S, T, LABELS, chunk_size=chunk_size, **kwargs)
    torch.testing.assert_close(value, naive(name, S, T, param), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, kwargs, param", CASES)
@pytest.mark.parametrize("upstream", [1.0, 0.3])
def test_gradients_match_autograd_of_the_naive_formula(name, kwargs, param, upstream):
    # float64 autograd through the naive formula is the reference; gradcheck itself needs repeated
    # backward passes, which the chunked loss refuses by design (it hands its buffer on).
    student, reference = S.clone().requires_grad_(), S.clone().requires_grad_()
    (upstream * getattr(L, name)(student, T, LABELS, chunk_size=3, **kwargs)).backward()
    (upstream * naive(name, reference, T, param)).backward()
    torch.testing.assert_close(student.grad, reference.grad, rtol=1e-7, atol=1e-10)
    assert (student.grad[~MASK] == 0).all()  # unscored positions get no gradient


def test_finite_differences_agree_with_the_gradient():
    student = S.clone().requires_grad_()
    L.generalized_jsd(student, T, LABELS, beta=0.3).backward()
    direction = torch.randn_like(S)
    eps = 1e-6
    numeric = (L.generalized_jsd(S + eps * direction, T, LABELS, beta=0.3)
               - L.generalized_jsd(S - eps * direction, T, LABELS, beta=0.3)) / (2 * eps)
    assert numeric.item() == pytest.approx((student.grad * direction).sum().item(), rel=1e-6)


def test_a_second_backward_is_refused_not_wrong():
    student = S.clone().requires_grad_()
    loss = L.forward_kl(student, T, LABELS)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


@pytest.mark.parametrize("name, kwargs, param", CASES)
def test_zero_on_identical_inputs_and_zero_when_nothing_is_scored(name, kwargs, param):
    assert getattr(L, name)(S, S, LABELS, **kwargs).abs().item() < 1e-12
    student = S.clone().requires_grad_()
    empty = getattr(L, name)(student, T, torch.full_like(LABELS, -100), **kwargs)
    empty.backward()
    assert empty.item() == 0.0 and not torch.isnan(student.grad).any()


def test_jsd_endpoints_are_the_kl_directions_as_torch_computes_them():
    lp_s, lp_t = F.log_softmax(S, -1), F.log_softmax(T, -1)
    forward = F.kl_div(lp_s, lp_t, reduction="none", log_target=True).sum(-1)[MASK].mean()
    reverse = F.kl_div(lp_t, lp_s, reduction="none", log_target=True).sum(-1)[MASK].mean()
    torch.testing.assert_close(L.generalized_jsd(S, T, LABELS, beta=0.0), forward)
    torch.testing.assert_close(L.generalized_jsd(S, T, LABELS, beta=1.0), reverse)
    torch.testing.assert_close(L.forward_kl(S, T, LABELS), forward)
    torch.testing.assert_close(L.reverse_kl(S, T, LABELS), reverse)


def test_jsd_is_symmetric_at_one_half():
    torch.testing.assert_close(L.generalized_jsd(S, T, LABELS, beta=0.5), L.generalized_jsd(T, S, LABELS, beta=0.5))


def test_temperature_softens_both_and_can_scale_by_its_square():
    value = L.forward_kl(S, T, LABELS, temperature=2.0)
    torch.testing.assert_close(value, naive("forward_kl", S / 2, T / 2))
    torch.testing.assert_close(L.forward_kl(S, T, LABELS, temperature=2.0, scale_by_temperature=True), 4 * value)


def sparse(teacher_logits, k):
    logprobs = F.log_softmax(teacher_logits, -1)
    top, indices = logprobs.topk(k, dim=-1)
    return L.SparseTeacher(top, indices, (1 - top.exp().sum(-1)).clamp(min=0))


@pytest.mark.parametrize("name, kwargs, param", CASES)
def test_sparse_teacher_with_k_equal_to_vocabulary_equals_dense(name, kwargs, param):
    torch.testing.assert_close(
        getattr(L, name)(S, sparse(T, 13), LABELS, **kwargs), getattr(L, name)(S, T, LABELS, **kwargs), rtol=1e-6, atol=1e-6
    )


def test_sparse_teacher_compares_on_top_k_plus_the_rest():
    k = 3
    teacher = sparse(T, k)
    ls = F.log_softmax(S, -1)
    top_s = ls.gather(-1, teacher.indices).exp()
    p_t = torch.cat([teacher.logprobs.exp(), teacher.leftover[..., None]], -1)
    p_s = torch.cat([top_s, 1 - top_s.sum(-1, keepdim=True)], -1)
    expected = (p_t * (p_t / p_s).log()).sum(-1)[MASK].mean()
    torch.testing.assert_close(L.forward_kl(S, teacher, LABELS), expected)
    with pytest.raises(ValueError, match="temperature 1"):
        L.forward_kl(S, teacher, LABELS, temperature=2.0)


def test_bf16_logits_are_scored_in_float32_and_get_bf16_gradients():
    student = S.float().bfloat16().requires_grad_()
    value = L.forward_kl(student, T.float().bfloat16(), LABELS)
    assert value.dtype == torch.float32
    value.backward()
    assert student.grad.dtype == torch.bfloat16
    torch.testing.assert_close(value, naive("forward_kl", S.float().bfloat16().float(), T.float().bfloat16().float()).float(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [{"beta": -0.1}, {"beta": 1.5}])
def test_out_of_range_parameters_are_refused(bad):
    with pytest.raises(ValueError, match="beta"):
        L.generalized_jsd(S, T, LABELS, **bad)


# The fused projection: hidden states and head weights in, the same divergence and gradients out.
HIDDEN, WEIGHT, BIAS = torch.randn(9, 5, dtype=torch.double), torch.randn(13, 5, dtype=torch.double), torch.randn(13, dtype=torch.double)
TEACHER_HIDDEN, TEACHER_WEIGHT = torch.randn(9, 7, dtype=torch.double), torch.randn(13, 7, dtype=torch.double)


def naive_rows(name, s, t, param):
    """The naive formula over R rows (all scored)."""
    return naive(name, s, t, param, mask=torch.ones(s.shape[:-1], dtype=torch.bool))


@pytest.mark.parametrize("name, kwargs, param", CASES)
@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("teacher_kind", ["head", "dense"])
def test_the_fused_projection_gives_the_naive_loss_and_its_gradients_to_hidden_weight_and_bias(name, kwargs, param, chunk_size, teacher_kind):
    student = [t.clone().requires_grad_() for t in (HIDDEN, WEIGHT, BIAS)]
    reference = [t.clone().requires_grad_() for t in (HIDDEN, WEIGHT, BIAS)]
    teacher_logits = TEACHER_HIDDEN @ TEACHER_WEIGHT.T
    teacher = L.HeadRows(TEACHER_HIDDEN, TEACHER_WEIGHT) if teacher_kind == "head" else teacher_logits
    tau = 1.7 if teacher_kind == "dense" else 1.0
    fused = L.fused_divergence(name, L.HeadRows(*student), teacher, param or 0.0, temperature=tau, chunk_size=chunk_size)
    expected = naive_rows(name, (reference[0] @ reference[1].T + reference[2]) / tau, teacher_logits / tau, param)
    torch.testing.assert_close(fused, expected.detach(), rtol=1e-10, atol=1e-12)
    (0.7 * fused).backward()
    (0.7 * expected).backward()
    for got, want in zip(student, reference):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name, kwargs, param", CASES)
def test_probabilities_that_underflow_to_zero_need_no_mask_when_both_heads_project_and_keep_it_for_a_dense_teacher(name, kwargs, param):
    """Both models projected by their heads: the closed form skips the p = 0 mask (finite logits give finite
    log-probabilities, and 0 · finite = 0), and on float32 logits spread so wide that most probabilities are exactly 0
    it gives the masked form's value and gradients. A dense teacher may hold -inf (a cut vocabulary): it keeps the
    mask, and the loss stays finite."""
    torch.manual_seed(3)
    hidden, weight = torch.randn(6, 8) * 30, torch.randn(40, 8) * 30  # logit spreads of thousands: p = 0 in float32
    teacher_hidden, teacher_weight = torch.randn(6, 5) * 30, torch.randn(40, 5) * 30
    logits, teacher_logits = hidden @ weight.T, teacher_hidden @ teacher_weight.T
    assert (F.softmax(logits, -1) == 0).float().mean() > 0.5 and (F.softmax(teacher_logits, -1) == 0).float().mean() > 0.5
    masked = L._dense_value_and_grad(name, logits, teacher_logits, param or 0.0, 1.0, finite=False)
    unmasked = L._dense_value_and_grad(name, logits, teacher_logits, param or 0.0, 1.0, finite=True)
    assert torch.isfinite(masked[0]) and torch.isfinite(masked[1]).all()
    torch.testing.assert_close(unmasked, masked, rtol=0, atol=0)
    student = L.HeadRows(hidden.clone().requires_grad_(), weight.clone().requires_grad_())
    through_heads = L.fused_divergence(name, student, L.HeadRows(teacher_hidden, teacher_weight), param or 0.0)
    torch.testing.assert_close(through_heads, masked[0] / 6)
    cut = teacher_logits.clone()
    cut[:, 30:] = float("-inf")  # a dense teacher over a smaller vocabulary
    dense = L.fused_divergence(name, L.HeadRows(hidden.clone().requires_grad_(), weight.clone().requires_grad_()), cut, param or 0.0)
    assert not torch.isnan(dense) and (torch.isfinite(dense) or name == "reverse_kl")  # π_S > 0 where p_T = 0: RKL is ∞


def test_the_fused_projection_agrees_with_finite_differences_and_the_unfused_loss_in_float32():
    torch.manual_seed(1)
    hidden, weight = torch.randn(6, 4, dtype=torch.double), torch.randn(11, 4, dtype=torch.double)
    teacher = torch.randn(6, 11, dtype=torch.double)
    fused = lambda h, w: L.fused_divergence("generalized_jsd", L.HeadRows(h, w), teacher, 0.4, temperature=1.3, chunk_size=4)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused(h, w)
    loss.backward(retain_graph=True)
    directions, eps = (torch.randn_like(hidden), torch.randn_like(weight)), 1e-6
    numeric = (fused(hidden + eps * directions[0], weight + eps * directions[1])
               - fused(hidden - eps * directions[0], weight - eps * directions[1])) / (2 * eps)
    analytic = (h.grad * directions[0]).sum() + (w.grad * directions[1]).sum()
    assert numeric.item() == pytest.approx(analytic.item(), rel=1e-6)
    with pytest.raises(RuntimeError, match="one backward pass"):  # its buffers are handed on, not kept
        loss.backward()
    # float32, a sparse (top-k) teacher, T² scaling: equal to the unfused chunked loss to 1e-5
    h32, w32 = hidden.float().detach().requires_grad_(), weight.float().detach().requires_grad_()
    logits = (h32 @ w32.T)
    top = F.log_softmax(teacher.float(), -1).topk(4, -1)
    sparse = L.SparseTeacher(top.values, top.indices, 1 - top.values.exp().sum(-1))
    value = L.fused_divergence("forward_kl", L.HeadRows(h32, w32), sparse, chunk_size=5, scale_by_temperature=True)
    unfused = L.forward_kl(logits[None], L.SparseTeacher(*(t[None] for t in sparse)), torch.zeros(1, 6), scale_by_temperature=True)
    torch.testing.assert_close(value, unfused, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(value, (h32, w32))
    want = torch.autograd.grad(unfused, (h32, w32))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, param, in_place", [("forward_kl", 0.0, True), ("generalized_jsd", 0.5, True),
                                                     ("generalized_jsd", 0.0, False), ("reverse_kl", 0.0, False)])
def test_the_fused_projection_never_holds_all_rows_logits_and_refuses_bad_settings(monkeypatch, name, param, in_place):
    """Each chunk's logits are the only ones formed: each head projects at most chunk_size rows at a time, through
    F.linear on the general path or into the reused buffers on the in-place one."""
    seen = {"linear": [], "into": []}
    real_linear, real_into = F.linear, L._project_into

    def spy_linear(x, w, b=None):
        seen["linear"].append(x.shape[0])
        return real_linear(x, w, b)

    def spy_into(out, x, w, b):
        assert out.shape == (x.shape[0], w.shape[0])
        seen["into"].append(x.shape[0])
        return real_into(out, x, w, b)

    monkeypatch.setattr(F, "linear", spy_linear)
    monkeypatch.setattr(L, "_project_into", spy_into)
    hidden, weight = torch.randn(10, 4, requires_grad=True), torch.randn(50, 4, requires_grad=True)
    L.fused_divergence(name, L.HeadRows(hidden, weight), L.HeadRows(torch.randn(10, 3), torch.randn(50, 3)), param,
                       chunk_size=4).backward()
    used, unused = (seen["into"], seen["linear"]) if in_place else (seen["linear"], seen["into"])
    assert used and max(used) == 4 and sum(used) == 20 and not unused  # 3 chunks of each model: 4 + 4 + 2 rows
    assert hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0
    monkeypatch.undo()
    head = L.HeadRows(hidden.detach(), weight.detach())
    for kwargs, message in [({"divergence": "kl"}, "unknown divergence"), ({"parameter": 1.5, "divergence": "skew_kl"}, "alpha"),
                            ({"temperature": 0.0}, "temperature")]:
        with pytest.raises(ValueError, match=message):
            L.fused_divergence(**{"divergence": "forward_kl", "student": head, "teacher": torch.randn(10, 50), **kwargs})


@pytest.mark.parametrize("name, param", [("forward_kl", 0.0), ("generalized_jsd", 0.3), ("generalized_jsd", 0.5)])
def test_the_in_place_fused_loss_equals_the_naive_one_with_a_temperature_a_bias_and_uneven_chunks(name, param):
    """Both heads projecting: forward KL and the JSD take the in-place path (reused buffers); at τ = 1.7 with a
    student bias and chunks of 4, 4, 1 rows it gives the naive loss and gradients in float64, and in float32 the
    general path's to 1e-5 (where the JSD recovers p_S from log p_S − log M and log M)."""
    assert L._in_place_buffers(name, L.HeadRows(TEACHER_HIDDEN, TEACHER_WEIGHT), WEIGHT, param) == (3 if name == "forward_kl" else 4)
    student = [t.clone().requires_grad_() for t in (HIDDEN, WEIGHT, BIAS)]
    reference = [t.clone().requires_grad_() for t in (HIDDEN, WEIGHT, BIAS)]
    fused = L.fused_divergence(name, L.HeadRows(*student), L.HeadRows(TEACHER_HIDDEN, TEACHER_WEIGHT), param,
                               temperature=1.7, chunk_size=4)
    expected = naive_rows(name, (reference[0] @ reference[1].T + reference[2]) / 1.7, TEACHER_HIDDEN @ TEACHER_WEIGHT.T / 1.7, param)
    torch.testing.assert_close(fused, expected.detach(), rtol=1e-10, atol=1e-12)
    fused.backward()
    expected.backward()
    for got, want in zip(student, reference):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-8, atol=1e-12)
    torch.manual_seed(4)
    hidden, weight = torch.randn(37, 16), torch.randn(3000, 16)
    teacher = L.HeadRows(torch.randn(37, 24), torch.randn(3000, 24) / 2)
    in_place = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    general = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    value = L.fused_divergence(name, L.HeadRows(*in_place), teacher, param, temperature=1.7, chunk_size=8)
    dense = L.fused_divergence(name, L.HeadRows(*general), teacher.logits(), param, temperature=1.7, chunk_size=8)
    torch.testing.assert_close(value, dense, rtol=1e-5, atol=1e-7)
    value.backward()
    dense.backward()
    for got, want in zip(in_place, general):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-8)


def test_the_in_place_path_leaves_its_inputs_alone_copies_other_dtypes_and_is_left_for_float16_and_autocast():
    """The teacher's tensors are the same after the loss; bfloat16 heads project through F.linear into the float32
    buffers and give the general path's loss; float16 (may overflow to -inf) and autocast (products with out= are
    not autocast) take the general path."""
    teacher = L.HeadRows(TEACHER_HIDDEN.clone(), TEACHER_WEIGHT.clone())
    L.fused_divergence("generalized_jsd", L.HeadRows(HIDDEN.clone().requires_grad_(), WEIGHT.clone()), teacher, 0.5).backward()
    assert torch.equal(teacher.hidden, TEACHER_HIDDEN) and torch.equal(teacher.weight, TEACHER_WEIGHT)
    torch.manual_seed(5)
    hidden, weight = torch.randn(20, 8, dtype=torch.bfloat16), torch.randn(300, 8, dtype=torch.bfloat16)
    teacher = L.HeadRows(torch.randn(20, 12, dtype=torch.bfloat16), torch.randn(300, 12, dtype=torch.bfloat16))
    for name, param in (("forward_kl", 0.0), ("generalized_jsd", 0.3)):
        assert L._in_place_buffers(name, teacher, weight, param) > 0
        in_place = L.fused_divergence(name, L.HeadRows(hidden, weight), teacher, param, chunk_size=7)
        general = L.fused_divergence(name, L.HeadRows(hidden, weight), teacher.logits(), param, chunk_size=7)
        torch.testing.assert_close(in_place, general, rtol=1e-5, atol=1e-6)
    assert L._in_place_buffers("forward_kl", L.HeadRows(TEACHER_HIDDEN.half(), TEACHER_WEIGHT.half()), WEIGHT, 0.0) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert L._in_place_buffers("forward_kl", L.HeadRows(TEACHER_HIDDEN, TEACHER_WEIGHT), WEIGHT, 0.0) == 0
    assert L._in_place_buffers("forward_kl", L.HeadRows(TEACHER_HIDDEN, TEACHER_WEIGHT), WEIGHT, 0.0) == 3


def test_the_fused_chunks_are_even_and_take_the_in_place_paths_larger_budget():
    assert L._fused_chunk_rows(520, 8192, in_place=False) == 260  # two chunks of 260, not 512 and 8
    assert L._fused_chunk_rows(520, 8192, in_place=True) == 130  # at most 160 rows: four chunks of 130
    assert L._fused_chunk_rows(520, 49152, in_place=True) == 130
    assert L._fused_chunk_rows(1792, 151936, in_place=True) == 55  # 2**23 // 151,936 = 55 rows at most: 33 chunks
    assert L._fused_chunk_rows(10, 151936, in_place=False) == 10
    assert L._fused_chunk_rows(100, 10**7, in_place=False) == 25  # 32 rows at least gives 4 chunks: 4 of 25


def test_a_divergence_without_a_closed_form_gradient_is_fused_through_autograd_with_the_same_result(monkeypatch):
    """A new row function needs no hand-written gradient: the fused loss falls back to autograd of its rows."""
    teacher = L.HeadRows(TEACHER_HIDDEN, TEACHER_WEIGHT)
    results = {}
    for closed_form in (True, False):
        if not closed_form:
            monkeypatch.setattr(L, "CLOSED_FORM_GRADIENTS", ())
        for name, _, param in CASES:
            student = [t.clone().requires_grad_() for t in (HIDDEN, WEIGHT)]
            value = L.fused_divergence(name, L.HeadRows(*student), teacher, param or 0.0, temperature=1.3, chunk_size=4)
            value.backward()
            results[closed_form, name, param] = (value.detach(), *(t.grad for t in student))
    for (closed_form, name, param), got in results.items():
        for a, b in zip(got, results[True, name, param]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_skew_divergences_at_the_ends_of_their_interval_are_the_plain_ones_or_zero(alpha):
    """α = 0: skew KL is forward KL and skew reverse KL is reverse KL; α = 1: both are 0 (the mixture is the first side)."""
    for name, plain in (("skew_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
        value = getattr(L, name)(S, T, LABELS, alpha=alpha)
        expected = getattr(L, plain)(S, T, LABELS) if alpha == 0.0 else torch.zeros((), dtype=S.dtype)
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
        fused = L.fused_divergence(name, L.HeadRows(HIDDEN, WEIGHT), TEACHER_HIDDEN @ TEACHER_WEIGHT.T, alpha)
        assert torch.isfinite(fused)
