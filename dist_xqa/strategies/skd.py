"""Self-knowledge distillation with mAP@k coefficients (Carrino et al. 2023).

The student is trained on cross-lingually sampled question x passage pairs against a frozen
copy of itself (the teacher, refreshed at each epoch boundary) with

    L = alpha_ce * sum_{s in start, end} CE^s + alpha_kl * sum_{s in start, end} KL(p_teacher^s || p_student^s)

(the paper's Eq. 6, alpha_ce = 1), each KL between distributions at temperature t (default
2), each CE the NLL of the gold position at temperature 1. alpha_kl is a fixed number or the
teacher's mAP@k on the gold span, computed per batch from the teacher's logits (see
`map_at_k`): a teacher that ranks the gold span badly is trusted less.

Paper vs. public code (ccasimiro88/self-distillation-gxlt-qa), each difference an option:
- the code multiplies the KL by t^2 (`tau_squared=True`); the paper does not (default);
- the code averages the start and end parts of both terms (`start_end="mean"`: Hugging
  Face's QA head averages the CEs, the code the KLs); the paper sums both (default). Either
  way CE and KL are reduced alike, so alpha_kl weighs the KL against the CE as Eq. 6 does;
- the code's "mAP@k" counts the first hit only in [gold - 5, gold + 4], i.e. MRR@10
  (`variant="mrr"`); the paper's mAP@k sums the precision at every hit (default).

Every softmax and every ranking is restricted to the positions mask of the features (the
context tokens and CLS): the public code ranks all positions, question tokens and padding
included. All the functions here stay on the device: no `.item()`, no host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dist_xqa.losses import masked_log_softmax, mean_over_valid_rows, span_nll

MAP_VARIANTS = ("map", "mrr")
MAP_REDUCTIONS = ("batch", "example")
START_END = ("sum", "mean")
CLS_INDEX = 0  # the features put CLS at position 0 (dist_xqa.data.features)


def _ranked_hits(logits: Tensor, mask: Tensor, gold: Tensor, k: int, delta: int, variant: str) -> Tensor:
    """hit[r, j]: is the teacher's rank-(j+1) position of row r a hit? [R, min(k, L)] bool.

    A hit is a valid position near the gold one: within +-delta (map, the paper) or in
    [gold - delta, gold + delta - 1] (mrr, the public code's `range(pos - 5, pos + 5)`).
    CLS is never a hit for a row whose gold position is in the context: CLS means "no answer
    in this window", however close to the gold token it sits. A row labelled CLS (its window
    does not hold the answer) has exactly one relevant position, CLS itself: the +-delta
    window has no meaning across the question / context boundary.
    """
    masked = logits.detach().masked_fill(~mask, torch.finfo(logits.dtype).min)
    ranked = masked.topk(min(k, logits.shape[-1]), dim=-1).indices  # [R, k]
    valid = mask.gather(-1, ranked)  # a masked position ranked into the top k (short rows) never counts
    offset = ranked - gold[:, None]
    near = offset.abs() <= delta if variant == "map" else (offset >= -delta) & (offset < delta)
    labelled_cls = (gold == CLS_INDEX)[:, None]
    is_cls = ranked == CLS_INDEX
    return valid & torch.where(labelled_cls, is_cls, near & ~is_cls)


def average_precision_at_k(
    logits: Tensor, mask: Tensor, gold: Tensor, k: int = 10, delta: int = 5, variant: str = "map"
) -> Tensor:
    """Per-row score of the teacher's top-k ranking of one span end (start or end): [R].

    map (the paper): sum_{j<=k} P(j) * delta_j / (2 * delta), with delta_j = 1 when the rank-j
    prediction is a hit (see _ranked_hits) and P(j) the precision at rank j, the fraction of
    hits among the top j predictions (the P(j) of average precision, AP = 1/m sum_j P(j) rel(j),
    with m = 2 * delta relevant positions). With k = 2 * delta = 10 the score lies in [0, 1]
    and is 1 when all top-10 predictions lie within +-5 tokens of the gold position.
    A CLS-labelled row has m = 1 (CLS is its only relevant position): its score is 1 / (rank
    of CLS), 0 when CLS is not in the top k.
    mrr (the public code): 1 / (rank of the first hit), 0 when there is none in the top k.
    Rows with no valid position score 0. Temperature does not change a ranking: none is taken.
    """
    if variant not in MAP_VARIANTS:
        raise ValueError(f"variant must be one of {MAP_VARIANTS}, got {variant!r}")
    if k < 1 or delta < 1:
        raise ValueError(f"k and delta must be >= 1, got k={k}, delta={delta}")
    hits = _ranked_hits(logits, mask, gold, k, delta, variant).to(torch.float32)
    rank = torch.arange(1, hits.shape[-1] + 1, device=hits.device, dtype=torch.float32)
    hits_so_far = hits.cumsum(-1)
    if variant == "mrr":
        return (hits * (hits_so_far == 1) / rank).sum(-1)
    precision = hits_so_far / rank
    relevant = torch.where(gold == CLS_INDEX, 1.0, 2.0 * delta)
    return (precision * hits).sum(-1) / relevant


def map_at_k(
    teacher_start: Tensor,
    teacher_end: Tensor,
    mask: Tensor,
    start_pos: Tensor,
    end_pos: Tensor,
    *,
    k: int = 10,
    delta: int = 5,
    variant: str = "map",
    reduction: str = "batch",
) -> Tensor:
    """The mAP@k coefficient alpha_kl of a batch: start and end scores averaged.

    reduction "batch" (the paper, and the public code): one scalar, the mean over rows with a
    valid position. "example": one coefficient per row [R] (0 for rows with no valid
    position), weighting each row's own KL. Detached: the coefficient is data, not a path for
    gradients.
    """
    if reduction not in MAP_REDUCTIONS:
        raise ValueError(f"reduction must be one of {MAP_REDUCTIONS}, got {reduction!r}")
    per_row = (
        average_precision_at_k(teacher_start, mask, start_pos, k, delta, variant)
        + average_precision_at_k(teacher_end, mask, end_pos, k, delta, variant)
    ) / 2
    if reduction == "example":
        return per_row
    return mean_over_valid_rows(per_row, mask.any(-1))


def kl_rows(student: Tensor, teacher: Tensor, mask: Tensor, tau: float) -> Tensor:
    """KL(softmax(teacher / tau) || softmax(student / tau)) over valid positions, per row: [R].

    0 for rows with no valid position. The teacher is data (detached).
    """
    log_p_student = masked_log_softmax(student, mask, tau)
    log_p_teacher = masked_log_softmax(teacher.detach(), mask, tau)
    return torch.where(mask, log_p_teacher.exp() * (log_p_teacher - log_p_student), 0.0).sum(-1)


class SkdLoss(NamedTuple):
    """The SKD loss and its parts, for logging (student/loss/<part>, student/alpha_kl)."""

    total: Tensor  # alpha_ce * ce + mean(alpha_kl * kl_row)
    ce: Tensor  # start and end CEs, summed or averaged as the KLs are
    kl: Tensor  # the unweighted KL term (t^2 included when asked)
    alpha_kl: Tensor  # the coefficient's batch mean, detached


def skd_loss(
    start_logits: Tensor,
    end_logits: Tensor,
    teacher_start: Tensor,
    teacher_end: Tensor,
    mask: Tensor,
    start_pos: Tensor,
    end_pos: Tensor,
    *,
    alpha_ce: float = 1.0,
    alpha_kl: float | Tensor = 1.0,
    tau: float = 2.0,
    tau_squared: bool = False,
    start_end: str = "sum",
) -> SkdLoss:
    """alpha_ce * sum_{start,end} CE + alpha_kl * sum_{start,end} KL(p_teacher || p_student),
    the KL at temperature tau (Eq. 6).

    Logits [R, L], mask [R, L] (context and CLS), gold positions [R]. alpha_kl: a number, a
    scalar tensor (map_at_k with reduction "batch") or a per-row tensor [R] (reduction
    "example"). Each term is the mean over rows with a valid position of the rows' start +
    end parts; start_end="mean" (the public code) averages the two parts of both terms
    instead, which halves the loss and leaves alpha_kl's balance unchanged. The KL is
    multiplied by tau^2 with tau_squared (the public code; the paper has none).
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if start_end not in START_END:
        raise ValueError(f"start_end must be one of {START_END}, got {start_end!r}")
    ce = span_nll(start_logits, end_logits, mask, start_pos, end_pos)  # the start and end NLLs' average
    per_row = kl_rows(start_logits, teacher_start, mask, tau) + kl_rows(end_logits, teacher_end, mask, tau)
    if start_end == "sum":
        ce = 2 * ce
    else:
        per_row = per_row / 2
    if tau_squared:
        per_row = per_row * tau * tau
    row_valid = mask.any(-1)
    alpha = torch.as_tensor(alpha_kl, dtype=per_row.dtype, device=per_row.device).detach()
    kl = mean_over_valid_rows(per_row, row_valid)
    weighted = mean_over_valid_rows(alpha * per_row, row_valid)
    alpha_mean = mean_over_valid_rows(alpha.expand_as(per_row), row_valid)
    return SkdLoss(alpha_ce * ce + weighted, ce, kl, alpha_mean)
