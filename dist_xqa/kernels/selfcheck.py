"""First-use self-check of the fused Triton kernels, with a fallback to the reference.

The kernels have been tested through Triton's interpreter, which accepts programs a GPU
compiler rejects (and a compiler can miscompile what the interpreter runs). Triton compiles
one variant of a kernel per dtype, constexpr (the tiles, the KD mode) and class of its integer
and pointer arguments (1, divisible by 16, other: dist_xqa.kernels.launch), so a check of one
variant says nothing of another: the real I = J = 384 alignment variant is not the I = 37 one.
So in "checked" mode (what "auto" means on CUDA tensors, see dist_xqa.kernels.select_impl) the
first call of each variant (the kernel module's `variant` key) on a device first runs the
kernel on the caller's own inputs (KD: the whole call, a few rows; alignment: its first two
examples, which keep I, J, H and the strides, hence the variant) and compares the loss, its
side outputs and the gradients with the PyTorch reference (dist_xqa.losses) computed in float64
on the same values. A compile error, a failed launch or a mismatch beyond the tolerance below
makes that variant fall back to the reference for the rest of the process, with one warning
naming the kernel, the device, the variant and the error; the verdict is kept per (kernel,
device, variant), so a failing build is never retried and no run is lost to it, and each new
variant is checked once before it is used.

Tolerance: every output within TOLERANCE[dtype] x its largest reference entry (float32 1e-4,
float16 1e-2, bfloat16 5e-2): looser than the kernel tests' (tests/test_kernel_*.py), because
this catches a broken build (garbage, NaN, a wrong program), not the last bits of a good one.

Seam for tests: impl="checked" runs the check through the interpreter on CPU tensors, and the
dispatcher looks the kernel up at every call (dist_xqa.kernels.kd.entropy_weighted_kd,
dist_xqa.kernels.alignment.alignment_entropy), so a test replaces that attribute with a broken
variant; reset() forgets the verdicts.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from dist_xqa import losses

log = logging.getLogger(__name__)

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-4}
_verdicts: dict[tuple[str, str, tuple], bool] = {}


def passed(name: str, device: torch.device, variant: tuple, check: Callable[[], None]) -> bool:
    """Whether variant `variant` (pairs of what selects it and its value) of kernel `name` may
    run on `device`: runs `check` on its first call (per process) and remembers the outcome; a
    check that raises disables that variant there."""
    key = (name, str(device), variant)
    if key not in _verdicts:
        try:
            # The check differentiates in full precision whatever context the caller is in.
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                check()
        except Exception as e:  # any compile, launch or comparison failure means: do not use it
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            log.warning("Triton kernel %r failed its self-check on %s for %s (%s); using the PyTorch "
                        "reference for these calls for the rest of this process", name, device,
                        describe(variant), reason)
            _verdicts[key] = False
        else:
            log.info("Triton kernel %r passed its self-check on %s for %s", name, device, describe(variant))
            _verdicts[key] = True
    return _verdicts[key]


def describe(variant: tuple) -> str:
    return ", ".join(f"{what}={str(value).removeprefix('torch.')}" for what, value in variant)


def reset() -> None:
    """Forget every verdict: the next call of each kernel checks it again (tests)."""
    _verdicts.clear()


def _assert_close(what: str, got: Tensor, want: Tensor, dtype: torch.dtype) -> None:
    got, want = got.detach(), want.detach()
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=0.0, atol=TOLERANCE[dtype] * (scale or 1.0),
                               msg=lambda message: f"{what}: {message}")


def _alias(tensor: Tensor) -> Tensor:
    """The caller's tensor without its graph, on the caller's storage, so that the kernel sees
    the call's pointers (their alignment is part of the variant). Autograd refuses inference
    tensors (a caller in torch.inference_mode): those are copied."""
    return tensor.clone() if tensor.is_inference() else tensor.detach()


def _lowest_precision(*dtypes: torch.dtype) -> torch.dtype:
    return max(dtypes, key=TOLERANCE.__getitem__)


def check_kd(kernel: Callable, student: Tensor, teachers: Tensor, mask: Tensor, tau: float, mode: str,
             fixed_weights: Tensor | None, sign: float) -> None:
    """Runs `kernel` (entropy_weighted_kd's signature) on the caller's inputs against the
    float64 reference of the same values; raises on a mismatch. Compares the loss, weights,
    row losses and the gradient w.r.t. the student."""
    outputs = {}
    for name, fn, to in (("kernel", kernel, _alias), ("reference", losses.entropy_weighted_kd, Tensor.double)):
        s = to(student).requires_grad_(True)
        fixed = None if fixed_weights is None else to(fixed_weights)
        loss, weights, row_losses = fn(s, to(teachers), mask, tau, mode, fixed, sign, True)
        (grad,) = torch.autograd.grad(loss, s)
        outputs[name] = dict(loss=loss, weights=weights, row_losses=row_losses, grad=grad)
    dtype = _lowest_precision(student.dtype, teachers.dtype)
    for what, got in outputs["kernel"].items():
        _assert_close(what, got, outputs["reference"][what], dtype)


def check_alignment(kernel: Callable, h_t: Tensor, h_s: Tensor, t_mask: Tensor, s_mask: Tensor) -> None:
    """Runs `kernel` (alignment_entropy's signature) on the caller's first two examples (I, J,
    H and the strides, hence the compiled variant, are the call's) against the float64
    reference of the same values; raises on a mismatch. Compares the loss and the gradients
    w.r.t. both hidden states."""
    n = min(2, h_t.shape[0])
    masks = (t_mask[:n], s_mask[:n])
    outputs = {}
    for name, fn, to in (("kernel", kernel, _alias), ("reference", losses.alignment_entropy, Tensor.double)):
        a, b = (to(x[:n]).requires_grad_(True) for x in (h_t, h_s))
        loss = fn(a, b, *masks)
        grad_t, grad_s = torch.autograd.grad(loss, (a, b))
        outputs[name] = dict(loss=loss, grad_h_t=grad_t, grad_h_s=grad_s)
    for what, got in outputs["kernel"].items():
        _assert_close(what, got, outputs["reference"][what], h_t.dtype)
