"""Reference losses of LBMRC distillation and X-STA alignment, in plain PyTorch.

This module is the specification. The trainer calls it, and the fused Triton kernels in
dist_xqa.kernels are tested against it. Notation follows the papers:

- Liu et al. 2020 (LBMRC): span NLL at temperature 1; teachers' start (and, separately, end)
  logits aggregated as z = sum_k w_k z^k, with w either fixed ("hyper") or per instance from
  each teacher's entropy ("imp", Eq. 7); the student learns from
  tau^2 * CE(softmax(z / tau), softmax(z_student / tau)) (Eq. 4, cross-entropy form).
- Cao et al. 2023 (X-STA): L_alignT = -1/I sum_i sum_j a_ij log a_ij with
  a = softmax(h_T h_S^T / sqrt(H)).

Every softmax is taken over the positions a boolean mask allows (True = the position may hold
an answer: context tokens and CLS) and computed in float32 (float64 stays float64), whatever the
input precision. Rows with no valid position contribute nothing to any loss.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

KD_MODES = ("imp", "hyper")


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The precision the losses are computed in: float32, or float64 for float64 inputs."""
    return torch.promote_types(tensor.dtype, torch.float32)


def masked_log_softmax(logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-softmax of `logits / temperature` over the last dim, restricted to `mask`.

    `mask` broadcasts against `logits`. Positions outside the mask get probability exactly 0.
    Masked positions are filled with the most negative finite value rather than -inf, so a
    row with no valid position comes out uniform and finite: neither the forward nor the
    backward ever produces NaN, and every loss below drops such rows.
    """
    x = logits.to(compute_dtype(logits)) / temperature
    x = x.masked_fill(~mask, torch.finfo(x.dtype).min)
    return torch.log_softmax(x, dim=-1)


def masked_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Entropy -sum_j p_j log p_j of softmax(logits) over valid positions (last dim).

    A row with no valid position has entropy 0.
    """
    log_p = masked_log_softmax(logits, mask)
    # torch.where, not a product with the mask: it keeps masked terms out of the gradient too.
    return -torch.where(mask, log_p.exp() * log_p, 0.0).sum(-1)


def mean_over_valid_rows(values: Tensor, row_valid: Tensor) -> Tensor:
    """Mean of `values` over the rows where `row_valid` is True; 0 when there is none."""
    total = torch.where(row_valid, values, 0.0).sum()
    return total / row_valid.sum().clamp(min=1)


def mean_of_row_means(values: Tensor, valid: Tensor) -> Tensor:
    """Mean over the batch (dim 0) of the mean over valid rows (dim 1) of `values` [B, I].

    Examples with no valid row are left out of the batch mean.
    """
    count = valid.sum(-1)
    per_example = torch.where(valid, values, 0.0).sum(-1) / count.clamp(min=1)
    return mean_over_valid_rows(per_example, count > 0)


# --- span NLL ------------------------------------------------------------------------------


def _check_span_labels(name: str, positions: Tensor, mask: Tensor) -> None:
    rows, length = mask.shape
    if positions.shape != (rows,):
        raise ValueError(f"span_nll: {name} has shape {tuple(positions.shape)}, expected ({rows},)")
    in_range = (positions >= 0) & (positions < length)
    allowed = mask.gather(-1, positions.clamp(0, length - 1)[:, None]).squeeze(-1)
    bad = mask.any(-1) & ~(in_range & allowed)
    if not bad.is_cpu:  # on an accelerator: asserted on the device, no host sync per training step
        torch._assert_async(~bad.any(), f"span_nll: a {name} label is not a valid position of its row")
        return
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"span_nll: {name}[{row}] = {int(positions[row])} is not a valid position of row {row} "
            "(labels must point at a context token or CLS inside the mask)"
        )


def span_nll(
    start_logits: Tensor, end_logits: Tensor, mask: Tensor, start_pos: Tensor, end_pos: Tensor
) -> Tensor:
    """Span extraction loss: NLL of the labelled start and end positions.

    Softmax at temperature 1 over valid positions; each part is the mean over rows with a
    valid position, and the loss is the average of the start and end parts (as Hugging Face's
    question-answering heads average them). Labels must be valid positions of their row.
    """
    if start_logits.shape != mask.shape or end_logits.shape != mask.shape:
        raise ValueError(
            f"span_nll: start/end logits {tuple(start_logits.shape)}/{tuple(end_logits.shape)} "
            f"must match mask {tuple(mask.shape)}"
        )
    _check_span_labels("start_pos", start_pos, mask)
    _check_span_labels("end_pos", end_pos, mask)
    row_valid = mask.any(-1)
    length = mask.shape[-1]

    def nll(logits: Tensor, positions: Tensor) -> Tensor:
        log_p = masked_log_softmax(logits, mask)
        picked = log_p.gather(-1, positions.clamp(0, length - 1)[:, None]).squeeze(-1)
        return mean_over_valid_rows(-picked, row_valid)

    return (nll(start_logits, start_pos) + nll(end_logits, end_pos)) / 2


# --- entropy-weighted teacher aggregation + tempered KD --------------------------------------


def check_kd_inputs(
    student: Tensor,
    teachers: Tensor,
    mask: Tensor,
    tau: float,
    mode: str,
    fixed_weights: Tensor | None,
) -> None:
    """Raise ValueError naming the argument when the KD inputs do not fit together."""
    if student.dim() != 2 or not student.is_floating_point():
        raise ValueError(f"entropy_weighted_kd: student must be float [R, L], got {student.dtype} "
                         f"{tuple(student.shape)}")
    if teachers.dim() != 3 or teachers.shape[1:] != student.shape or teachers.shape[0] < 1:
        raise ValueError(f"entropy_weighted_kd: teachers must be [K, R, L] with [R, L] = "
                         f"{tuple(student.shape)}, got {tuple(teachers.shape)}")
    if mask.dtype != torch.bool or mask.shape != student.shape:
        raise ValueError(f"entropy_weighted_kd: mask must be bool {tuple(student.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if not tau > 0:
        raise ValueError(f"entropy_weighted_kd: tau must be > 0, got {tau}")
    if mode not in KD_MODES:
        raise ValueError(f"entropy_weighted_kd: mode must be one of {KD_MODES}, got {mode!r}")
    if fixed_weights is not None:
        if mode != "hyper":
            raise ValueError("entropy_weighted_kd: fixed_weights is only used with mode='hyper'")
        if fixed_weights.shape != teachers.shape[:1]:
            raise ValueError(f"entropy_weighted_kd: fixed_weights must be [{teachers.shape[0]}], "
                             f"got {tuple(fixed_weights.shape)}")


def teacher_weights(
    teachers: Tensor,
    mask: Tensor,
    mode: str = "imp",
    fixed_weights: Tensor | None = None,
    sign: float = -1.0,
) -> Tensor:
    """Per-row teacher weights [R, K] for teachers [K, R, L].

    hyper: the fixed weights [K] (default 1/K) on every row.
    imp: w_k = softmax_k(sign * H_k), H_k the entropy ("impurity") of softmax(teachers[k]) at
    temperature 1 over valid positions. sign = -1 weights confident (low-entropy) teachers
    more; sign = +1 is the paper's printed Eq. 7. Rows with no valid position have H_k = 0 for
    every k, hence uniform weights.
    """
    k, rows, _ = teachers.shape
    dtype = compute_dtype(teachers)
    if mode == "hyper":
        fixed = fixed_weights if fixed_weights is not None else torch.full((k,), 1.0 / k)
        return fixed.to(device=teachers.device, dtype=dtype).expand(rows, k).clone()
    entropy = masked_entropy(teachers.detach(), mask)  # [K, R]
    return torch.softmax(sign * entropy.T, dim=-1)


def aggregate_teachers(teachers: Tensor, weights: Tensor) -> Tensor:
    """Aggregated teacher logits z[r] = sum_k weights[r, k] * teachers[k, r]: [R, L]."""
    return torch.einsum("rk,krl->rl", weights, teachers.to(weights.dtype))


def kd_row_losses(student: Tensor, aggregated: Tensor, mask: Tensor, tau: float) -> Tensor:
    """Per-row tempered KD loss tau^2 * CE(softmax(z / tau), softmax(student / tau)): [R].

    Both softmaxes run over valid positions; a row with no valid position has loss 0.
    """
    log_p_student = masked_log_softmax(student, mask, tau)
    p_teacher = masked_log_softmax(aggregated, mask, tau).exp()
    cross_entropy = -torch.where(mask, p_teacher * log_p_student, 0.0).sum(-1)
    return tau * tau * cross_entropy


def entropy_weighted_kd(
    student: Tensor,
    teachers: Tensor,
    mask: Tensor,
    tau: float = 2.0,
    mode: str = "imp",
    fixed_weights: Tensor | None = None,
    sign: float = -1.0,
    return_row_losses: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """KD loss of student logits [R, L] against K aggregated teachers [K, R, L].

    Returns (loss, weights[R, K]) and, with return_row_losses, the per-row losses [R] (0 for
    rows with no valid position). loss is the mean of the row losses over rows with at least
    one valid position. Teachers are data: no gradient flows to them; weights and row losses
    are detached.
    """
    check_kd_inputs(student, teachers, mask, tau, mode, fixed_weights)
    teachers = teachers.detach()
    weights = teacher_weights(teachers, mask, mode, fixed_weights, sign)
    rows = kd_row_losses(student, aggregate_teachers(teachers, weights), mask, tau)
    loss = mean_over_valid_rows(rows, mask.any(-1))
    if return_row_losses:
        return loss, weights, rows.detach()
    return loss, weights


class StudentLoss(NamedTuple):
    """The student's training loss and its parts (weights and kd_rows: start rows, then end)."""

    total: Tensor  # lambda1 * nll + lambda2 * kd
    nll: Tensor
    kd: Tensor
    weights: Tensor  # [2R, K], detached
    kd_rows: Tensor  # [2R], detached; 0 for rows with no valid position


def student_loss(
    start_logits: Tensor,
    end_logits: Tensor,
    teacher_start: Tensor,
    teacher_end: Tensor,
    mask: Tensor,
    start_pos: Tensor,
    end_pos: Tensor,
    *,
    lambda1: float = 0.5,
    lambda2: float = 0.5,
    tau: float = 2.0,
    mode: str = "imp",
    fixed_weights: Tensor | None = None,
    sign: float = -1.0,
    kd_fn: Callable[..., tuple[Tensor, ...]] = entropy_weighted_kd,
) -> StudentLoss:
    """L = lambda1 * NLL(labels) + lambda2 * KD, the LBMRC student objective.

    Student logits [R, L], teacher logits [K, R, L], one positions mask [R, L]. Start and end
    rows are stacked into one KD call, so the KD mean is the average of its start and end
    parts, like the NLL. `kd_fn` computes the KD term with entropy_weighted_kd's signature;
    pass dist_xqa.kernels.entropy_weighted_kd to run the fused kernel on CUDA.
    """
    nll = span_nll(start_logits, end_logits, mask, start_pos, end_pos)
    kd, weights, kd_rows = kd_fn(
        torch.cat([start_logits, end_logits]),
        torch.cat([teacher_start, teacher_end], dim=1),
        torch.cat([mask, mask]),
        tau=tau,
        mode=mode,
        fixed_weights=fixed_weights,
        sign=sign,
        return_row_losses=True,
    )
    return StudentLoss(lambda1 * nll + lambda2 * kd, nll, kd, weights, kd_rows)


# --- X-STA token-alignment entropy ----------------------------------------------------------


def check_alignment_inputs(h_t: Tensor, h_s: Tensor, t_mask: Tensor, s_mask: Tensor) -> None:
    """Raise ValueError naming the argument when the alignment inputs do not fit together."""
    if h_t.dim() != 3 or h_s.dim() != 3 or h_t.shape[0] != h_s.shape[0] or h_t.shape[2] != h_s.shape[2]:
        raise ValueError(f"alignment_entropy: h_t [B, I, H] and h_s [B, J, H] disagree: "
                         f"{tuple(h_t.shape)} vs {tuple(h_s.shape)}")
    if not (h_t.is_floating_point() and h_t.dtype == h_s.dtype):
        raise ValueError(f"alignment_entropy: h_t and h_s must share one float dtype, got "
                         f"{h_t.dtype} and {h_s.dtype}")
    for name, m, h in (("t_mask", t_mask, h_t), ("s_mask", s_mask, h_s)):
        if m.dtype != torch.bool or m.shape != h.shape[:2]:
            raise ValueError(f"alignment_entropy: {name} must be bool {tuple(h.shape[:2])}, got "
                             f"{m.dtype} {tuple(m.shape)}")


def alignment_row_entropy(h_t: Tensor, h_s: Tensor, s_mask: Tensor) -> Tensor:
    """H_i = -sum_j a_ij log a_ij for every target token i: [B, I].

    a_i = softmax over valid source tokens j of h_t[i] . h_s[j] / sqrt(H). Materialises the
    [B, I, J] scores: this is the spec, the fused kernel never does.
    """
    dtype = compute_dtype(h_t)
    scores = torch.bmm(h_t.to(dtype), h_s.to(dtype).transpose(1, 2)) / math.sqrt(h_t.shape[-1])
    return masked_entropy(scores, s_mask[:, None, :])


def alignment_rows_valid(t_mask: Tensor, s_mask: Tensor) -> Tensor:
    """Target rows that count in the loss: valid themselves, with some valid source token."""
    return t_mask & s_mask.any(-1, keepdim=True)


def alignment_entropy(h_t: Tensor, h_s: Tensor, t_mask: Tensor, s_mask: Tensor) -> Tensor:
    """X-STA's alignment penalty L_alignT = -1/I sum_i sum_j a_ij log a_ij.

    h_t [B, I, H] target-language and h_s [B, J, H] source-language hidden states; boolean
    masks mark real tokens. The loss is the mean over the batch of the mean over valid target
    tokens i of H_i (see alignment_row_entropy), the paper's form. X-STA's public code
    differs: it averages the alignment probabilities over attention heads before taking the
    entropy, and includes padded query rows in the 1/I mean. Differentiable w.r.t. both
    hidden states.
    """
    check_alignment_inputs(h_t, h_s, t_mask, s_mask)
    rows = alignment_row_entropy(h_t, h_s, s_mask)
    return mean_of_row_means(rows, alignment_rows_valid(t_mask, s_mask))
