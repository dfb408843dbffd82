"""The reference losses (dist_xqa.losses): hand-computed values, masking, gradchecks."""

from __future__ import annotations

import math

import pytest
import torch

from dist_xqa import losses

LN3 = math.log(3.0)


def _entropy(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs)


# --- hand-computed values on a tiny case ------------------------------------------------------
# One row, three positions, the last one masked out and holding a large logit that would change
# every result if it leaked into a softmax.
MASK = torch.tensor([[True, True, False]])
TEACHERS = torch.tensor([[[4 * LN3, 0.0, 9.0]], [[0.0, 0.0, -9.0]]])  # [K=2, R=1, L=3]
STUDENT = torch.tensor([[0.0, 2 * LN3, 5.0]])


def test_masked_log_softmax_ignores_masked_positions():
    log_p = losses.masked_log_softmax(torch.tensor([[0.0, LN3, 50.0]]), MASK)
    assert torch.allclose(log_p[0, :2].exp(), torch.tensor([0.25, 0.75]))
    assert log_p[0, 2].exp() == 0


def test_hyper_kd_hand_computed():
    # z = (t1 + t2) / 2 = [2 ln3, 0]; at tau = 2: p_T = [3/4, 1/4], p_S = softmax([0, ln3]) = [1/4, 3/4]
    loss, weights = losses.entropy_weighted_kd(STUDENT, TEACHERS, MASK, tau=2.0, mode="hyper")
    cross_entropy = -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))
    assert loss.item() == pytest.approx(4 * cross_entropy, rel=1e-6)
    assert torch.equal(weights, torch.tensor([[0.5, 0.5]]))


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_imp_weights_hand_computed(sign):
    # teacher 1 over [4 ln3, 0]: p = [81/82, 1/82]; teacher 2 over [0, 0]: uniform.
    h1, h2 = _entropy([81 / 82, 1 / 82]), math.log(2)
    w1 = 1 / (1 + math.exp(sign * (h2 - h1)))
    _, weights = losses.entropy_weighted_kd(STUDENT, TEACHERS, MASK, mode="imp", sign=sign)
    assert weights[0].tolist() == pytest.approx([w1, 1 - w1], rel=1e-6)
    # sign -1: the confident (low-entropy) teacher counts more; +1 (printed Eq. 7): the reverse.
    assert (weights[0, 0] > weights[0, 1]) == (sign < 0)


def _independent_imp_kd(student, teachers, mask, tau, sign):
    """The imp KD loss and weights written out row by row from the method's definition, with
    no code from dist_xqa: only the valid positions of a row enter any softmax."""
    k, rows, _ = teachers.shape
    weights, row_losses = torch.zeros(rows, k, dtype=torch.float64), []
    for r in range(rows):
        valid = mask[r]
        if not valid.any():
            weights[r] = 1.0 / k
            continue
        entropy = torch.zeros(k, dtype=torch.float64)
        for t in range(k):
            z = teachers[t, r][valid].double()
            p = torch.exp(z - z.max())
            p = p / p.sum()
            entropy[t] = -(p * torch.log(p)).sum()
        e = torch.exp(sign * entropy - (sign * entropy).max())
        weights[r] = e / e.sum()
        z = sum(weights[r, t] * teachers[t, r][valid].double() for t in range(k)) / tau
        p_teacher = torch.exp(z - z.max())
        p_teacher = p_teacher / p_teacher.sum()
        s = student[r][valid].detach().double() / tau
        log_p_student = s - s.max() - torch.log(torch.exp(s - s.max()).sum())
        row_losses.append(-tau * tau * (p_teacher * log_p_student).sum())
    loss = torch.stack(row_losses).mean() if row_losses else torch.tensor(0.0, dtype=torch.float64)
    return loss, weights


@pytest.mark.parametrize("sign", [-1.0, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_imp_kd_uses_the_entropy_weights(sign, tau):
    # Masked positions hold large values: they would change both the entropies and the
    # aggregated distribution if they leaked into a softmax.
    student, teachers, mask = _random_kd_case(rows=7, length=9, k=3, seed=3)
    mask[2] = False
    teachers = torch.where(mask, teachers, 12.0)
    student = torch.where(mask, student.detach(), -7.0)
    expected_loss, expected_weights = _independent_imp_kd(student, teachers, mask, tau, sign)
    # the case discriminates: the weights are far from uniform (beyond the tolerance below)
    assert (expected_weights[mask.any(-1)] - 1 / 3).abs().max() > 0.05
    loss, weights = losses.entropy_weighted_kd(student, teachers, mask, tau=tau, mode="imp", sign=sign)
    assert torch.allclose(weights.double(), expected_weights, atol=1e-5)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)


def test_imp_kd_hand_computed():
    # teacher 1 over [4 ln3, 0] has entropy h1 < ln 2 = entropy of teacher 2 (uniform); at
    # sign -1: w1 = 1 / (1 + exp(h1 - ln 2)); z = [w1 * 4 ln3, 0]; p_S = softmax([0, 2 ln3]).
    h1 = _entropy([81 / 82, 1 / 82])
    w1 = 1 / (1 + math.exp(h1 - math.log(2)))
    loss, weights = losses.entropy_weighted_kd(STUDENT, TEACHERS, MASK, tau=1.0, mode="imp")
    assert weights[0, 0].item() == pytest.approx(w1, rel=1e-6)
    e = math.exp(w1 * 4 * LN3)
    p_t = [e / (e + 1), 1 / (e + 1)]
    p_s = [0.1, 0.9]
    expected = -(p_t[0] * math.log(p_s[0]) + p_t[1] * math.log(p_s[1]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_span_nll_hand_computed():
    start = torch.tensor([[0.0, LN3, 99.0]])
    end = torch.tensor([[LN3, 0.0, 99.0]])
    nll = losses.span_nll(start, end, MASK, torch.tensor([1]), torch.tensor([1]))
    assert nll.item() == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2, rel=1e-6)


def test_alignment_entropy_hand_computed():
    # example 0: target row 0 attends to sources [0, ln3] -> a = [1/4, 3/4]; source 2 is padding
    # with a huge score, target row 1 is padding. Example 1 has no valid target row: left out.
    h_t = torch.tensor([[[1.0], [7.0]], [[1.0], [1.0]]])
    h_s = torch.tensor([[[0.0], [LN3], [40.0]], [[0.0], [1.0], [2.0]]])
    t_mask = torch.tensor([[True, False], [False, False]])
    s_mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = losses.alignment_entropy(h_t, h_s, t_mask, s_mask)
    assert loss.item() == pytest.approx(_entropy([0.25, 0.75]), rel=1e-6)


def test_alignment_entropy_averages_rows_then_examples():
    torch.manual_seed(0)
    h_t, h_s = torch.randn(2, 4, 8), torch.randn(2, 5, 8)
    t_mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    s_mask = torch.ones(2, 5, dtype=torch.bool)
    rows = losses.alignment_row_entropy(h_t, h_s, s_mask)
    expected = (rows[0, :3].mean() + rows[1, 0]) / 2
    assert torch.allclose(losses.alignment_entropy(h_t, h_s, t_mask, s_mask), expected)


# --- masking ----------------------------------------------------------------------------------


def _random_kd_case(rows=6, length=9, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, length, generator=gen, requires_grad=True)
    teachers = 3 * torch.randn(k, rows, length, generator=gen)
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return student, teachers, mask


@pytest.mark.parametrize("mode", ["imp", "hyper"])
def test_fully_masked_rows_contribute_nothing(mode):
    student, teachers, mask = _random_kd_case()
    mask[[1, 4]] = False
    loss, weights, rows = losses.entropy_weighted_kd(student, teachers, mask, mode=mode,
                                                     return_row_losses=True)
    keep = mask.any(-1)
    sub_loss, sub_weights = losses.entropy_weighted_kd(student[keep], teachers[:, keep], mask[keep], mode=mode)
    assert torch.allclose(loss, sub_loss)
    assert torch.allclose(weights[keep], sub_weights)
    assert torch.equal(rows[~keep], torch.zeros(2))
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[~keep], torch.zeros(2, student.shape[1]))
    assert torch.equal(grad[~mask], torch.zeros(int((~mask).sum())))


def test_all_rows_masked_gives_zero_loss_with_a_graph():
    student, teachers, mask = _random_kd_case()
    loss, _ = losses.entropy_weighted_kd(student, teachers, torch.zeros_like(mask))
    assert loss.item() == 0
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_padding_values_do_not_change_the_losses():
    student, teachers, mask = _random_kd_case()
    noisy_student = torch.where(mask, student.detach(), 1e4)
    noisy_teachers = torch.where(mask, teachers, -1e4)
    for mode in ("imp", "hyper"):
        a, wa = losses.entropy_weighted_kd(student, teachers, mask, mode=mode)
        b, wb = losses.entropy_weighted_kd(noisy_student, noisy_teachers, mask, mode=mode)
        assert torch.allclose(a, b) and torch.allclose(wa, wb)


def test_teachers_receive_no_gradient():
    student, teachers, mask = _random_kd_case()
    teachers.requires_grad_(True)
    loss, weights = losses.entropy_weighted_kd(student, teachers, mask)
    loss.backward()
    assert teachers.grad is None and not weights.requires_grad


# --- student loss -----------------------------------------------------------------------------


def test_student_loss_combines_nll_and_stacked_kd():
    student, teachers, mask = _random_kd_case(rows=4, length=7)
    end = torch.randn(4, 7)
    teacher_end = torch.randn(3, 4, 7)
    start_pos = torch.zeros(4, dtype=torch.long)
    end_pos = mask.sum(-1) - 1
    out = losses.student_loss(student, end, teachers, teacher_end, mask, start_pos, end_pos,
                              lambda1=0.3, lambda2=0.7, tau=2.0, mode="imp")
    kd_start, w_start = losses.entropy_weighted_kd(student, teachers, mask)
    kd_end, w_end = losses.entropy_weighted_kd(end, teacher_end, mask)
    nll = losses.span_nll(student, end, mask, start_pos, end_pos)
    assert torch.allclose(out.kd, (kd_start + kd_end) / 2)
    assert torch.allclose(out.nll, nll)
    assert torch.allclose(out.total, 0.3 * nll + 0.7 * out.kd)
    assert torch.allclose(out.weights, torch.cat([w_start, w_end]))
    assert out.kd_rows.shape == (8,) and not out.kd_rows.requires_grad


def test_student_loss_uses_the_given_kd_function():
    student, teachers, mask = _random_kd_case(rows=2, length=5)
    calls = []

    def kd_fn(*args, **kwargs):
        calls.append(args[0].shape)
        return losses.entropy_weighted_kd(*args, **kwargs)

    pos = torch.zeros(2, dtype=torch.long)
    losses.student_loss(student, student, teachers, teachers, mask, pos, pos, kd_fn=kd_fn)
    assert calls == [torch.Size([4, 5])]


# --- bad input --------------------------------------------------------------------------------


def test_span_label_outside_the_mask_is_named():
    start = torch.zeros(2, 4)
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    with pytest.raises(ValueError, match=r"end_pos\[0\] = 2"):
        losses.span_nll(start, start, mask, torch.tensor([0, 0]), torch.tensor([2, 2]))
    # rows with no valid position carry no label to check
    mask[0] = False
    losses.span_nll(start, start, mask, torch.tensor([0, 0]), torch.tensor([9, 2]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="mean"), "mode must be one of"),
        (dict(tau=0.0), "tau must be > 0"),
        (dict(mode="imp", fixed_weights=torch.ones(3)), "only used with mode='hyper'"),
        (dict(mode="hyper", fixed_weights=torch.ones(2)), r"fixed_weights must be \[3\]"),
    ],
)
def test_bad_kd_arguments_are_named(kwargs, message):
    student, teachers, mask = _random_kd_case()
    with pytest.raises(ValueError, match=message):
        losses.entropy_weighted_kd(student, teachers, mask, **kwargs)


def test_bad_kd_shapes_are_named():
    student, teachers, mask = _random_kd_case()
    with pytest.raises(ValueError, match="teachers must be"):
        losses.entropy_weighted_kd(student, teachers[:, :2], mask)
    with pytest.raises(ValueError, match="mask must be bool"):
        losses.entropy_weighted_kd(student, teachers, mask.float())
    with pytest.raises(ValueError, match="s_mask must be bool"):
        losses.alignment_entropy(torch.randn(1, 2, 4), torch.randn(1, 3, 4),
                                 torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool))


def test_hyper_uses_the_given_fixed_weights():
    student, teachers, mask = _random_kd_case()
    fixed = torch.tensor([0.2, 0.0, 0.8])
    loss, weights = losses.entropy_weighted_kd(student, teachers, mask, mode="hyper", fixed_weights=fixed)
    aggregated = 0.2 * teachers[0] + 0.8 * teachers[2]
    rows = losses.kd_row_losses(student, aggregated, mask, 2.0)
    assert torch.allclose(loss, rows.mean())
    assert torch.equal(weights, fixed.expand(6, 3))


# --- float64 gradchecks -----------------------------------------------------------------------


@pytest.mark.parametrize("mode, sign", [("imp", -1.0), ("imp", 1.0), ("hyper", -1.0)])
def test_gradcheck_kd(mode, sign):
    student, teachers, mask = _random_kd_case(rows=4, length=6)
    mask[2] = False
    student = student.detach().double().requires_grad_(True)
    teachers = teachers.double()
    torch.autograd.gradcheck(
        lambda s: losses.entropy_weighted_kd(s, teachers, mask, tau=2.0, mode=mode, sign=sign)[0],
        (student,),
    )


def test_gradcheck_span_nll():
    student, _, mask = _random_kd_case(rows=4, length=6)
    student = student.detach().double().requires_grad_(True)
    end = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    pos = torch.zeros(4, dtype=torch.long)
    torch.autograd.gradcheck(lambda s, e: losses.span_nll(s, e, mask, pos, pos), (student, end))


def test_gradcheck_alignment_entropy():
    # I != J, H = 6 (not a power of two), padded rows and columns; example 2 has no valid
    # source token, so all its target rows drop out (zero gradient, still finite).
    torch.manual_seed(1)
    h_t = torch.randn(3, 5, 6, dtype=torch.double, requires_grad=True)
    h_s = torch.randn(3, 4, 6, dtype=torch.double, requires_grad=True)
    t_mask = torch.tensor([[True] * 4 + [False], [True] * 2 + [False] * 3, [True] * 5])
    s_mask = torch.tensor([[True] * 3 + [False], [True] * 4, [False] * 4])
    torch.autograd.gradcheck(lambda a, b: losses.alignment_entropy(a, b, t_mask, s_mask), (h_t, h_s))
