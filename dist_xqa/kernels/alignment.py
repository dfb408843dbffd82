"""Fused X-STA token-alignment entropy, flash-attention style (Triton).

Reference: dist_xqa.losses.alignment_entropy. For target rows i and source tokens j,
x_ij = h_t[i] . h_s[j] / sqrt(H) and a_i = softmax over valid j of x_i.

Forward: a program owns a block of target rows and loops over source blocks, computing score
tiles with tl.dot and keeping a running max m, sum s = sum e^(x - m) and
t = sum e^(x - m) (x - m) (rescaled when m moves), so that H_i = log s - t / s: that is
lse_i - E_{a_i}[x] without the cancellation of that form, which loses ~eps * |m|. It stores
H_i, m_i, log s_i and c_i = t_i / s_i per row.

Backward: dH_i/dx_ij = -a_ij (x_ij - E_i). Two kernels recompute the score tiles blockwise
from h_t, h_s and the stored row statistics, centred the same way (a_ij = exp((x_ij - m_i) -
log s_i), x_ij - E_i = (x_ij - m_i) - c_i): one accumulates dh_t over source blocks, the other
dh_s over target blocks (no atomics, deterministic). Each program owns BLOCK_HO columns of
the gradient it writes, so wide hidden sizes (768) split over several programs, each
recomputing the scores: the trade keeps the accumulator in registers.

Memory is O(B (I + J) H): no [B, I, J] tensor is ever materialised.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from dist_xqa import losses
from dist_xqa.kernels.launch import Launch, int_class, pointer_class

# Masked scores are set to this finite value, not -inf: the running max of a tile with no
# valid position stays finite, so exp(m_old - m_new) is never exp(-inf + inf) = NaN.
_NEG = tl.constexpr(-1.0e30)


@triton.jit
def _score_tile(
    a_ptr, b_ptr, a_idx, b_idx, a_ok, b_ok, H, stride_a, stride_b, scale,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """scale * a[a_idx] @ b[b_idx]^T as a float32 [BLOCK_A, BLOCK_B] tile (rows out of range: 0)."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        a = tl.load(a_ptr + a_idx[:, None] * stride_a + hs[None, :],
                    mask=a_ok[:, None] & h_ok[None, :], other=0.0)
        b_t = tl.load(b_ptr + b_idx[None, :] * stride_b + hs[:, None],
                      mask=b_ok[None, :] & h_ok[:, None], other=0.0)
        acc = tl.dot(a, b_t, acc, input_precision=DOT_PRECISION)
    return acc * scale


@triton.jit
def _alignment_fwd_kernel(
    ht_ptr, hs_ptr, smask_ptr, entropy_ptr, max_ptr, logs_ptr, cmean_ptr,
    I, J, H, scale,
    stride_tb, stride_ti, stride_sb, stride_sj,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = i_block * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok = rows < I
    ht = ht_ptr + b * stride_tb
    hs = hs_ptr + b * stride_sb
    m = tl.full([BLOCK_I], _NEG, tl.float32)
    s = tl.zeros([BLOCK_I], tl.float32)
    t = tl.zeros([BLOCK_I], tl.float32)  # sum e^(x - m) * (x - m)
    for j0 in range(0, J, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_in = cols < J
        col_ok = tl.load(smask_ptr + b * J + cols, mask=col_in, other=0) != 0
        x = _score_tile(ht, hs, rows, cols, row_ok, col_in, H, stride_ti, stride_sj, scale,
                        BLOCK_I, BLOCK_J, BLOCK_H, DOT_PRECISION)
        x = tl.where(col_ok[None, :], x, _NEG)
        m_new = tl.maximum(m, tl.max(x, 1))
        e = tl.where(col_ok[None, :], tl.exp(x - m_new[:, None]), 0.0)
        shift = m - m_new  # <= 0; finite (s is 0 while m is _NEG)
        rescale = tl.exp(shift)
        t = (t + shift * s) * rescale + tl.sum(e * (x - m_new[:, None]), 1)
        s = s * rescale + tl.sum(e, 1)
        m = m_new
    # H_i = log s - E[x - m], centred: lse - E[x] would lose ~eps * |m| to cancellation.
    # Rows with no valid source token: entropy 0 and statistics 0 (finite; their gradient is 0).
    has = s > 0
    s_safe = tl.where(has, s, 1.0)
    log_s = tl.log(s_safe)
    centred_mean = tl.where(has, t / s_safe, 0.0)
    out = b * I + rows
    tl.store(entropy_ptr + out, log_s - centred_mean, mask=row_ok)
    tl.store(max_ptr + out, tl.where(has, m, 0.0), mask=row_ok)
    tl.store(logs_ptr + out, log_s, mask=row_ok)
    tl.store(cmean_ptr + out, centred_mean, mask=row_ok)


@triton.jit
def _alignment_bwd_dht_kernel(
    ht_ptr, hs_ptr, smask_ptr, dent_ptr, max_ptr, logs_ptr, cmean_ptr, out_scale_ptr, dht_ptr,
    I, J, H, scale,
    stride_tb, stride_ti, stride_sb, stride_sj,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HO: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dh_t[i] = out_scale * sum_j g_ij h_s[j], g_ij = dent_i a_ij (x_ij - E_i)."""
    i_block = tl.program_id(0)
    ho = tl.program_id(1) * BLOCK_HO + tl.arange(0, BLOCK_HO)
    b = tl.program_id(2).to(tl.int64)
    ho_ok = ho < H
    rows = i_block * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok = rows < I
    ht = ht_ptr + b * stride_tb
    hs = hs_ptr + b * stride_sb
    row_max = tl.load(max_ptr + b * I + rows, mask=row_ok, other=0.0)
    log_s = tl.load(logs_ptr + b * I + rows, mask=row_ok, other=0.0)
    cmean = tl.load(cmean_ptr + b * I + rows, mask=row_ok, other=0.0)
    dent = tl.load(dent_ptr + b * I + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_I, BLOCK_HO], tl.float32)
    for j0 in range(0, J, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        col_in = cols < J
        col_ok = tl.load(smask_ptr + b * J + cols, mask=col_in, other=0) != 0
        x = _score_tile(ht, hs, rows, cols, row_ok, col_in, H, stride_ti, stride_sj, scale,
                        BLOCK_I, BLOCK_J, BLOCK_H, DOT_PRECISION)
        xc = tl.where(col_ok[None, :], x - row_max[:, None], 0.0)
        a = tl.where(col_ok[None, :], tl.exp(xc - log_s[:, None]), 0.0)
        g = dent[:, None] * a * (xc - cmean[:, None])
        v = tl.load(hs + cols[:, None] * stride_sj + ho[None, :],
                    mask=col_in[:, None] & ho_ok[None, :], other=0.0)
        acc = tl.dot(g.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    acc = acc * tl.load(out_scale_ptr)
    tl.store(dht_ptr + b * stride_tb + rows[:, None] * stride_ti + ho[None, :],
             acc.to(dht_ptr.dtype.element_ty), mask=row_ok[:, None] & ho_ok[None, :])


@triton.jit
def _alignment_bwd_dhs_kernel(
    ht_ptr, hs_ptr, smask_ptr, dent_ptr, max_ptr, logs_ptr, cmean_ptr, out_scale_ptr, dhs_ptr,
    I, J, H, scale,
    stride_tb, stride_ti, stride_sb, stride_sj,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HO: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dh_s[j] = out_scale * sum_i g_ij h_t[i], on transposed score tiles x^T [BLOCK_J, BLOCK_I]."""
    j_block = tl.program_id(0)
    ho = tl.program_id(1) * BLOCK_HO + tl.arange(0, BLOCK_HO)
    b = tl.program_id(2).to(tl.int64)
    ho_ok = ho < H
    cols = j_block * BLOCK_J + tl.arange(0, BLOCK_J)
    col_in = cols < J
    col_ok = tl.load(smask_ptr + b * J + cols, mask=col_in, other=0) != 0
    ht = ht_ptr + b * stride_tb
    hs = hs_ptr + b * stride_sb
    acc = tl.zeros([BLOCK_J, BLOCK_HO], tl.float32)
    for i0 in range(0, I, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        row_ok = rows < I
        row_max = tl.load(max_ptr + b * I + rows, mask=row_ok, other=0.0)
        log_s = tl.load(logs_ptr + b * I + rows, mask=row_ok, other=0.0)
        cmean = tl.load(cmean_ptr + b * I + rows, mask=row_ok, other=0.0)
        dent = tl.load(dent_ptr + b * I + rows, mask=row_ok, other=0.0)
        x_t = _score_tile(hs, ht, cols, rows, col_in, row_ok, H, stride_sj, stride_ti, scale,
                          BLOCK_J, BLOCK_I, BLOCK_H, DOT_PRECISION)
        xc_t = tl.where(col_ok[:, None], x_t - row_max[None, :], 0.0)
        a_t = tl.where(col_ok[:, None], tl.exp(xc_t - log_s[None, :]), 0.0)
        g_t = dent[None, :] * a_t * (xc_t - cmean[None, :])
        q = tl.load(ht + rows[:, None] * stride_ti + ho[None, :],
                    mask=row_ok[:, None] & ho_ok[None, :], other=0.0)
        acc = tl.dot(g_t.to(q.dtype), q, acc, input_precision=DOT_PRECISION)
    acc = acc * tl.load(out_scale_ptr)
    tl.store(dhs_ptr + b * stride_sb + cols[:, None] * stride_sj + ho[None, :],
             acc.to(dhs_ptr.dtype.element_ty), mask=col_in[:, None] & ho_ok[None, :])


def launch_meta(hidden: int, dtype: torch.dtype) -> dict[str, dict]:
    """Constexprs and warps of the forward and of both backward kernels for hidden size
    `hidden` and inputs of `dtype`: the one choice of tiles, made here for the launcher, the
    self-check's variant key and the ahead-of-time compile (dist_xqa.kernels.aot).

    Every tl.dot dimension stays >= 16 (GPUs reject smaller dot tiles). GPU values are first
    choices, not timed on hardware; the compiled variants all fit an A100's shared memory
    (benchmarks/RESULTS.md, ptxas table). float32 inputs take exact (FMA, not tensor-core)
    products, which need more registers: with 256 gradient columns per program the backward
    spilled ~600 bytes per thread on sm_80 and sm_90, with 128 it spills none. The
    interpreter runs each program in numpy, where larger tiles mean fewer Python steps.
    """
    width = max(16, triton.next_power_of_2(hidden))
    if triton.knobs.runtime.interpret:
        tiles = dict(BLOCK_I=64, BLOCK_J=64, BLOCK_H=min(width, 128), BLOCK_HO=min(width, 128))
    else:
        tiles = dict(BLOCK_I=64, BLOCK_J=64, BLOCK_H=min(width, 64),
                     BLOCK_HO=min(width, 128 if dtype == torch.float32 else 256))
    # float32 inputs get exact float32 products (as torch.bmm without TF32 does); for
    # 16-bit inputs the setting does not apply.
    precision = "ieee" if dtype == torch.float32 else "tf32"
    forward = {name: tiles[name] for name in ("BLOCK_I", "BLOCK_J", "BLOCK_H")}
    return dict(forward=dict(forward, DOT_PRECISION=precision, num_warps=4),
                backward=dict(tiles, DOT_PRECISION=precision, num_warps=8))


def variant(h_t: Tensor, h_s: Tensor, s_mask: Tensor) -> tuple:
    """Which compiled variants of the three kernels a call runs (see dist_xqa.kernels.launch):
    the dtype, launch_meta, and Triton's classes of the integer arguments and pointers."""
    batch, n_t, hidden = h_t.shape
    n_s = h_s.shape[1]
    meta = launch_meta(hidden, h_t.dtype)
    return (("dtype", h_t.dtype), *((f"forward {k}", v) for k, v in meta["forward"].items()),
            *((f"backward {k}", v) for k, v in meta["backward"].items()),
            # I, J, H, then the contiguous strides I * H, H, J * H (H again)
            *((name, int_class(v)) for name, v in (("I", n_t), ("J", n_s), ("H", hidden),
                                                     ("I*H", n_t * hidden), ("J*H", n_s * hidden))),
            *((f"{name} pointer", pointer_class(t)) for name, t in (("h_t", h_t), ("h_s", h_s), ("s_mask", s_mask))))


def forward_plan(h_t: Tensor, h_s: Tensor, s_mask: Tensor) -> tuple[list[Launch], tuple[Tensor, ...]]:
    """The forward kernel's launch (none when there is no row) and (h_t, h_s and s_mask as
    the kernels take them, the row entropy, max, log-sum and centred mean [B, I] fp32)."""
    h_t, h_s = h_t.contiguous(), h_s.contiguous()
    s_mask = s_mask.contiguous().view(torch.uint8)
    batch, n_t, hidden = h_t.shape
    n_s = h_s.shape[1]
    entropy, row_max, log_s, cmean = (
        torch.empty(batch, n_t, device=h_t.device, dtype=torch.float32) for _ in range(4)
    )
    meta = launch_meta(hidden, h_t.dtype)["forward"]
    launches = []
    if entropy.numel() > 0:
        grid = (triton.cdiv(n_t, meta["BLOCK_I"]), batch)
        args = (h_t, h_s, s_mask, entropy, row_max, log_s, cmean, n_t, n_s, hidden, 1.0 / math.sqrt(hidden),
                h_t.stride(0), h_t.stride(1), h_s.stride(0), h_s.stride(1))
        launches.append(Launch(_alignment_fwd_kernel, grid, args, meta))
    return launches, (h_t, h_s, s_mask, entropy, row_max, log_s, cmean)


def backward_plan(
    h_t: Tensor, h_s: Tensor, s_mask: Tensor, row_max: Tensor, log_s: Tensor, cmean: Tensor,
    d_entropy: Tensor, needs_grad: tuple[bool, bool],
) -> tuple[list[Launch], Tensor | None, Tensor | None]:
    """The backward kernels' launches for the gradients `needs_grad` asks for (h_t, h_s), and
    those gradients (None where not asked), all from forward_plan's tensors."""
    batch, n_t, hidden = h_t.shape
    n_s = h_s.shape[1]
    meta = launch_meta(hidden, h_t.dtype)["backward"]
    # g_ij carries the upstream gradient, which is tiny (1 / (B * I)) and would underflow
    # in float16 on its way into tl.dot. So the kernels use dH / max|dH| and multiply the
    # accumulated result back by out_scale = -max|dH| / sqrt(H).
    d_entropy = d_entropy.float().contiguous()
    peak = d_entropy.abs().amax() if d_entropy.numel() else d_entropy.new_zeros(())
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    d_normalised = d_entropy / peak
    out_scale = (-peak / math.sqrt(hidden)).reshape(1)
    args = (h_t, h_s, s_mask, d_normalised, row_max, log_s, cmean, out_scale)
    shape_args = (n_t, n_s, hidden, 1.0 / math.sqrt(hidden),
                  h_t.stride(0), h_t.stride(1), h_s.stride(0), h_s.stride(1))
    n_ho = triton.cdiv(hidden, meta["BLOCK_HO"])
    launches, d_ht, d_hs = [], None, None
    if needs_grad[0]:
        d_ht = torch.zeros_like(h_t)
        if d_ht.numel() > 0:
            grid = (triton.cdiv(n_t, meta["BLOCK_I"]), n_ho, batch)
            launches.append(Launch(_alignment_bwd_dht_kernel, grid, (*args, d_ht, *shape_args), meta))
    if needs_grad[1]:
        d_hs = torch.zeros_like(h_s)
        if d_hs.numel() > 0 and n_t > 0:
            grid = (triton.cdiv(n_s, meta["BLOCK_J"]), n_ho, batch)
            launches.append(Launch(_alignment_bwd_dhs_kernel, grid, (*args, d_hs, *shape_args), meta))
    return launches, d_ht, d_hs


class _AlignmentRowEntropy(torch.autograd.Function):
    """(h_t [B, I, H], h_s [B, J, H], s_mask [B, J]) -> H_i [B, I] float32."""

    @staticmethod
    def forward(ctx, h_t, h_s, s_mask):
        launches, (h_t, h_s, s_mask, entropy, row_max, log_s, cmean) = forward_plan(h_t, h_s, s_mask)
        for launch in launches:
            launch.run()
        ctx.save_for_backward(h_t, h_s, s_mask, row_max, log_s, cmean)
        return entropy

    @staticmethod
    def backward(ctx, d_entropy):
        launches, d_ht, d_hs = backward_plan(*ctx.saved_tensors, d_entropy, ctx.needs_input_grad[:2])
        for launch in launches:
            launch.run()
        return d_ht, d_hs, None


def alignment_entropy(h_t: Tensor, h_s: Tensor, t_mask: Tensor, s_mask: Tensor) -> Tensor:
    """The fused counterpart of dist_xqa.losses.alignment_entropy (same arguments and result).

    The paper's form, not the public X-STA code's (which averages the probabilities over
    attention heads before the entropy and counts padded query rows): see that docstring.
    """
    losses.check_alignment_inputs(h_t, h_s, t_mask, s_mask)
    rows = _AlignmentRowEntropy.apply(h_t, h_s, s_mask)
    return losses.mean_of_row_means(rows, losses.alignment_rows_valid(t_mask, s_mask))
