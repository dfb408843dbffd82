"""Loss kernels, the same API on every device.

On CUDA tensors these run fused Triton kernels (kd.py, alignment.py) once the compiled
variant a call needs (its dtypes, mode, tiles and shape classes) has passed its first-use
self-check on the caller's inputs (selfcheck.py; on failure, the reference with one warning);
elsewhere the PyTorch reference in dist_xqa.losses, which is also their specification. The
environment variable DIST_XQA_KERNELS=checked|triton|reference, or the `impl` argument,
forces a path ("triton": the kernel, unchecked); with TRITON_INTERPRET=1 the Triton paths run
on CPU tensors (slowly: tests only). The kernels are compiled ahead of time for sm_80 and
sm_90 by dist_xqa.kernels.aot (tests/test_kernel_aot.py), which needs no GPU.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import triton
from torch import Tensor

from dist_xqa import losses
from dist_xqa.kernels import selfcheck

IMPLS = ("auto", "checked", "triton", "reference")
ENV_VAR = "DIST_XQA_KERNELS"


def select_impl(tensor: Tensor, impl: str | None = None) -> str:
    """Which path a call on `tensor` takes: "checked", "triton" or "reference".

    `impl` wins over DIST_XQA_KERNELS, which wins over "auto": "checked" on CUDA tensors,
    "reference" elsewhere. "checked" runs the Triton kernel once its self-check on the device
    has passed (the reference otherwise); "triton" runs it unchecked (kernel tests, benchmarks).
    """
    choice = impl or os.environ.get(ENV_VAR) or "auto"
    if choice not in IMPLS:
        source = "impl" if impl else ENV_VAR
        raise ValueError(f"{source} must be one of {IMPLS}, got {choice!r}")
    if choice == "auto":
        return "checked" if tensor.is_cuda else "reference"
    if choice in ("checked", "triton") and not (tensor.is_cuda or triton.knobs.runtime.interpret):
        raise ValueError("the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU")
    return choice


def _kernel_module(name: str) -> ModuleType:
    # Imported on first use: triton decides between compiler and interpreter when a kernel is
    # defined, so TRITON_INTERPRET must be read after the caller has set it.
    return importlib.import_module(f"dist_xqa.kernels.{name}")


def entropy_weighted_kd(
    student: Tensor,
    teachers: Tensor,
    mask: Tensor,
    tau: float = 2.0,
    mode: str = "imp",
    fixed_weights: Tensor | None = None,
    sign: float = -1.0,
    return_row_losses: bool = False,
    impl: str | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Entropy-weighted teacher aggregation + tempered KD loss (see losses.entropy_weighted_kd).

    student [R, L] (start and end rows stacked), teachers [K, R, L], mask [R, L] bool.
    Weights: "hyper" -> fixed_weights (default 1/K); "imp" -> softmax over k of sign * H_k,
    H_k the entropy of softmax(teachers[k]) at temperature 1 over valid positions. With
    z = sum_k w_k teachers[k], p_T = softmax(z / tau) and p_S = softmax(student / tau) over
    valid positions, loss = mean over rows with a valid position of tau^2 * (-sum p_T log p_S).
    Returns (loss, weights [R, K], detached) and, with return_row_losses, the detached per-row
    losses [R] (0 for rows with no valid position). Differentiable w.r.t. the student only.
    """
    path = select_impl(student, impl)
    if path != "reference":
        losses.check_kd_inputs(student, teachers, mask, tau, mode, fixed_weights)  # a bad call is no kernel failure
        module = _kernel_module("kd")
        kernel = module.entropy_weighted_kd
        if path == "triton" or selfcheck.passed(
            "kd", student.device, module.variant(student, teachers, mask, mode),
            lambda: selfcheck.check_kd(kernel, student, teachers, mask, tau, mode, fixed_weights, sign),
        ):
            return kernel(student, teachers, mask, tau, mode, fixed_weights, sign, return_row_losses)
    return losses.entropy_weighted_kd(student, teachers, mask, tau, mode, fixed_weights, sign, return_row_losses)


def alignment_entropy(
    h_t: Tensor, h_s: Tensor, t_mask: Tensor, s_mask: Tensor, impl: str | None = None
) -> Tensor:
    """X-STA token-alignment entropy (see losses.alignment_entropy); differentiable in h_t, h_s.

    h_t [B, I, H], h_s [B, J, H], t_mask [B, I] and s_mask [B, J] bool. With
    a_ij = softmax over valid j of h_t[i] . h_s[j] / sqrt(H), the loss is the batch mean of the
    mean over valid target tokens i of -sum_j a_ij log a_ij: the paper's form (Cao et al. 2023),
    which is the spec. The public X-STA code differs: it averages the alignment probabilities
    over attention heads before taking the entropy, and includes padded query rows in the
    mean. Examples with no valid target row (or no valid source token) are left out.
    """
    path = select_impl(h_t, impl)
    if path != "reference":
        losses.check_alignment_inputs(h_t, h_s, t_mask, s_mask)  # a bad call is no kernel failure
        module = _kernel_module("alignment")
        kernel = module.alignment_entropy
        if path == "triton" or selfcheck.passed(
            "alignment", h_t.device, module.variant(h_t, h_s, s_mask),
            lambda: selfcheck.check_alignment(kernel, h_t, h_s, t_mask, s_mask),
        ):
            return kernel(h_t, h_s, t_mask, s_mask)
    return losses.alignment_entropy(h_t, h_s, t_mask, s_mask)


__all__ = ["ENV_VAR", "IMPLS", "alignment_entropy", "entropy_weighted_kd", "select_impl"]
