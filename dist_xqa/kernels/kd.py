"""Fused entropy-weighted teacher aggregation + tempered KD loss (Triton).

Reference: dist_xqa.losses.entropy_weighted_kd. One program per row reads the row's K teacher
logits and the student logits and, with online (running max / running sum) softmax
statistics, computes

  pass 1: each teacher's entropy at temperature 1 (imp mode) and the student's
          log-normaliser at temperature tau -> the teacher weights;
  pass 2: the aggregated logits z = sum_k w_k z^k on the fly, their log-normaliser at tau
          and E_{p_T}[student / tau] -> the row loss tau^2 * (lse_S - E_{p_T}[student / tau]);
  pass 3: the gradient of the row loss w.r.t. the student, tau * (p_S - p_T), written in
          the forward so that the backward only scales it.

Every expectation is accumulated relative to the running max (E[x - m], rescaled when m
moves) and every probability is exp((x - m) - log s), never x - lse: with logits far from 0
(a common offset of hundreds) the uncentred forms lose ~eps * |x| to cancellation, the
reference's log_softmax does not.

No [K, R, L] softmax (or any other K-sized intermediate) reaches memory; all arithmetic is
float32 whatever the input precision. When a row fits one tile (L <= BLOCK_L, the usual case)
each pass is a single step and passes 2-3 re-read the row from cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dist_xqa import losses
from dist_xqa.kernels.launch import Launch, int_class, pointer_class

# Masked scores are set to this finite value, not -inf: the running max of a tile with no
# valid position stays finite, so exp(m_old - m_new) is never exp(-inf + inf) = NaN.
_NEG = tl.constexpr(-1.0e30)
# Upper bound on the elements of one [BLOCK_K, BLOCK_L] teacher tile.
_MAX_TILE = 4096


@triton.jit
def _kd_rows_kernel(
    student_ptr,
    teachers_ptr,
    mask_ptr,
    row_loss_ptr,
    weights_ptr,  # [R, K] float32; read in hyper mode (arrives filled), written in imp mode
    grad_ptr,  # [R, L] float32: d row_loss / d student
    L,
    K,
    teacher_stride,  # elements between teachers[k] and teachers[k + 1]
    tau,
    sign,
    IMP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    offsets = tl.arange(0, BLOCK_L)
    student_row = student_ptr + row * L
    mask_row = mask_ptr + row * L
    teacher_rows = teachers_ptr + ks[:, None].to(tl.int64) * teacher_stride + row * L
    inv_tau = 1.0 / tau

    # Pass 1: teachers' entropies H = log s - E[x - m] (online over L) and the student's
    # running max and sum at tau.
    n_valid = 0
    s_max = _NEG
    s_sum = 0.0
    t_max = tl.full([BLOCK_K], _NEG, tl.float32)
    t_sum = tl.zeros([BLOCK_K], tl.float32)
    t_dot = tl.zeros([BLOCK_K], tl.float32)  # sum exp(x - t_max) * (x - t_max)
    for start in range(0, L, BLOCK_L):
        cols = start + offsets
        valid = tl.load(mask_row + cols, mask=cols < L, other=0) != 0
        n_valid += tl.sum(valid.to(tl.int32), 0)
        x_s = tl.load(student_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_tau
        x_s = tl.where(valid, x_s, _NEG)
        new_max = tl.maximum(s_max, tl.max(x_s, 0))
        s_sum = s_sum * tl.exp(s_max - new_max) + tl.sum(tl.where(valid, tl.exp(x_s - new_max), 0.0), 0)
        s_max = new_max
        if IMP:
            tile_ok = k_ok[:, None] & valid[None, :]
            x_t = tl.load(teacher_rows + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            x_t = tl.where(tile_ok, x_t, _NEG)
            new_t_max = tl.maximum(t_max, tl.max(x_t, 1))
            e = tl.where(tile_ok, tl.exp(x_t - new_t_max[:, None]), 0.0)
            shift = t_max - new_t_max  # <= 0; finite (t_sum is 0 while t_max is _NEG)
            rescale = tl.exp(shift)
            t_dot = (t_dot + shift * t_sum) * rescale + tl.sum(e * (x_t - new_t_max[:, None]), 1)
            t_sum = t_sum * rescale + tl.sum(e, 1)
            t_max = new_t_max
    row_ok = n_valid > 0

    if IMP:
        t_sum_safe = tl.where(k_ok & row_ok, t_sum, 1.0)
        entropy = tl.where(row_ok, tl.log(t_sum_safe) - t_dot / t_sum_safe, 0.0)
        score = tl.where(k_ok, sign * entropy, _NEG)
        e_w = tl.where(k_ok, tl.exp(score - tl.max(score, 0)), 0.0)
        w = e_w / tl.sum(e_w, 0)
        tl.store(weights_ptr + row * K + ks, w, mask=k_ok)
    else:
        w = tl.load(weights_ptr + row * K + ks, mask=k_ok, other=0.0)

    # Pass 2: aggregated logits z / tau: their max and sum, and E_{p_T}[x_s / tau - s_max].
    z_max = _NEG
    z_sum = 0.0
    z_dot = 0.0  # sum exp(z - z_max) * (x_s - s_max)
    for start in range(0, L, BLOCK_L):
        cols = start + offsets
        valid = tl.load(mask_row + cols, mask=cols < L, other=0) != 0
        tile_ok = k_ok[:, None] & valid[None, :]
        x_t = tl.load(teacher_rows + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        z = tl.where(valid, tl.sum(w[:, None] * x_t, 0) * inv_tau, _NEG)
        x_s = tl.load(student_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_tau
        new_max = tl.maximum(z_max, tl.max(z, 0))
        e = tl.where(valid, tl.exp(z - new_max), 0.0)
        rescale = tl.exp(z_max - new_max)
        z_sum = z_sum * rescale + tl.sum(e, 0)
        z_dot = z_dot * rescale + tl.sum(e * (x_s - s_max), 0)
        z_max = new_max
    # Rows with no valid position: log-sums 0 (finite); their loss and gradient are 0.
    s_log = tl.log(tl.where(row_ok, s_sum, 1.0))
    z_log = tl.log(tl.where(row_ok, z_sum, 1.0))
    # CE(p_T, p_S) = -sum p_T log p_S = lse_S - E_{p_T}[x_s / tau]
    #             = log s_S - E_{p_T}[x_s / tau - s_max]   (centred: no cancellation)
    row_loss = tl.where(row_ok, tau * tau * (s_log - z_dot / tl.where(row_ok, z_sum, 1.0)), 0.0)
    tl.store(row_loss_ptr + row, row_loss)

    # Pass 3: d row_loss / d student = tau^2 * (1 / tau) * (p_S - p_T) on valid positions.
    for start in range(0, L, BLOCK_L):
        cols = start + offsets
        in_row = cols < L
        valid = tl.load(mask_row + cols, mask=in_row, other=0) != 0
        tile_ok = k_ok[:, None] & valid[None, :]
        x_t = tl.load(teacher_rows + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        z = tl.sum(w[:, None] * x_t, 0) * inv_tau
        x_s = tl.load(student_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_tau
        # Centred scores, 0 off the mask: no exp overflow there (rows with none have max _NEG).
        x_c = tl.where(valid, x_s - s_max, 0.0)
        z_c = tl.where(valid, z - z_max, 0.0)
        grad = tau * (tl.exp(x_c - s_log) - tl.exp(z_c - z_log))
        tl.store(grad_ptr + row * L + cols, tl.where(valid, grad, 0.0), mask=in_row)


def launch_meta(k: int, length: int, mode: str, block_l: int | None = None) -> dict:
    """The kernel's constexprs and warps for K teachers and rows of `length`: the one choice of
    tiles, made here for the launcher, the self-check's variant key and the ahead-of-time
    compile (dist_xqa.kernels.aot). A [BLOCK_K, BLOCK_L] teacher tile of at most _MAX_TILE
    elements: a whole row of up to 512 positions in one step for K <= 8. The kernel keeps
    nothing in shared memory but its reductions' scratch (at most 8 KB compiled for sm_80 and
    sm_90, benchmarks/RESULTS.md), so no K or L is refused."""
    block_k = triton.next_power_of_2(k)
    if block_l is None:
        block_l = min(triton.next_power_of_2(length), max(16, _MAX_TILE // block_k))
    return dict(IMP=mode == "imp", BLOCK_K=block_k, BLOCK_L=block_l,
                num_warps=4 if block_k * block_l <= 2048 else 8)


def variant(student: Tensor, teachers: Tensor, mask: Tensor, mode: str, block_l: int | None = None) -> tuple:
    """Which compiled variant of the kernel a call runs (see dist_xqa.kernels.launch): the
    dtypes, launch_meta, and Triton's classes of the integer arguments and pointers."""
    k, rows, length = teachers.shape
    return (("student", student.dtype), ("teachers", teachers.dtype),
            *launch_meta(k, length, mode, block_l).items(),
            ("L", int_class(length)), ("K", int_class(k)), ("teacher_stride", int_class(rows * length)),
            *((f"{name} pointer", pointer_class(t)) for name, t in (("student", student), ("teachers", teachers),
                                                                   ("mask", mask))))


def plan(
    student: Tensor,
    teachers: Tensor,
    mask: Tensor,
    tau: float,
    mode: str,
    fixed_weights: Tensor | None,
    sign: float,
    block_l: int | None,
) -> tuple[list[Launch], tuple[Tensor, Tensor, Tensor]]:
    """The kernel's launch (none for no rows) and the tensors it fills: (row losses [R] fp32,
    weights [R, K] fp32, d rows / d student [R, L] fp32)."""
    k, rows, length = teachers.shape
    student = student.contiguous()
    teachers = teachers.contiguous()
    mask_bytes = mask.contiguous().view(torch.uint8)
    device = student.device
    row_loss = torch.empty(rows, device=device, dtype=torch.float32)
    grad = torch.empty(rows, length, device=device, dtype=torch.float32)
    if mode == "hyper":
        weights = losses.teacher_weights(teachers, mask, "hyper", fixed_weights).float().contiguous()
    else:
        weights = torch.empty(rows, k, device=device, dtype=torch.float32)
    args = (student, teachers, mask_bytes, row_loss, weights, grad,
            length, k, rows * length, float(tau), float(sign))
    launches = [Launch(_kd_rows_kernel, (rows,), args, launch_meta(k, length, mode, block_l))] if rows > 0 else []
    return launches, (row_loss, weights, grad)


class _KDRowLosses(torch.autograd.Function):
    """student [R, L] -> per-row KD losses [R]; the gradient comes from the forward kernel."""

    @staticmethod
    def forward(ctx, student, teachers, mask, tau, mode, fixed_weights, sign, block_l):
        launches, (row_loss, weights, grad) = plan(student, teachers, mask, tau, mode, fixed_weights, sign, block_l)
        for launch in launches:
            launch.run()
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        ctx.mark_non_differentiable(weights)
        return row_loss, weights

    @staticmethod
    def backward(ctx, grad_rows, _grad_weights):
        (grad,) = ctx.saved_tensors
        grad_student = (grad * grad_rows[:, None]).to(ctx.student_dtype)
        return grad_student, None, None, None, None, None, None, None


def entropy_weighted_kd(
    student: Tensor,
    teachers: Tensor,
    mask: Tensor,
    tau: float = 2.0,
    mode: str = "imp",
    fixed_weights: Tensor | None = None,
    sign: float = -1.0,
    return_row_losses: bool = False,
    block_l: int | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """The fused counterpart of dist_xqa.losses.entropy_weighted_kd (same arguments and results).

    `block_l` overrides the tile width along L (tests use it to exercise the multi-tile path).
    """
    losses.check_kd_inputs(student, teachers, mask, tau, mode, fixed_weights)
    rows, weights = _KDRowLosses.apply(
        student, teachers.detach(), mask, tau, mode, fixed_weights, sign, block_l
    )
    loss = losses.mean_over_valid_rows(rows, mask.any(-1))
    if return_row_losses:
        return loss, weights, rows.detach()
    return loss, weights
