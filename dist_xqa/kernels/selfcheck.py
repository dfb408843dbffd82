"""First-use self-check of the fused Triton kernels, with a fallback to the reference.

The kernels have been tested through Triton's interpreter, which accepts programs a GPU
compiler rejects (and a compiler can miscompile what the interpreter runs). So in "checked"
mode (what "auto" means on CUDA tensors, see dist_xqa.kernels.select_impl) the first call of a
kernel on a device first runs it on a small synthetic batch with the caller's static shape
(L and K, or H), dtypes and options, so the same specialisation is compiled, and compares the
loss, its side outputs and the gradients with the PyTorch reference (dist_xqa.losses) computed
in float64. A compile error, a failed launch or a mismatch beyond the tolerance below makes
that kernel fall back to the reference for the rest of the process, with one warning naming
the kernel, the device and the error; the verdict is kept per (kernel, device), so a failing
build is never retried and no run is lost to it. Later calls with other dtypes or options
compile other specialisations unchecked.

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
_SEED = 1234
_verdicts: dict[tuple[str, str], bool] = {}


def passed(name: str, device: torch.device, check: Callable[[], None]) -> bool:
    """Whether kernel `name` may run on `device`: runs `check` on the first call (per
    process) and remembers the outcome; a check that raises disables the kernel there."""
    key = (name, str(device))
    if key not in _verdicts:
        try:
            # The check differentiates in full precision whatever context the caller is in.
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                check()
        except Exception as e:  # any compile, launch or comparison failure means: do not use it
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            log.warning("Triton kernel %r failed its self-check on %s (%s); using the PyTorch reference "
                        "for the rest of this process", name, device, reason)
            _verdicts[key] = False
        else:
            log.info("Triton kernel %r passed its self-check on %s", name, device)
            _verdicts[key] = True
    return _verdicts[key]


def reset() -> None:
    """Forget every verdict: the next call of each kernel checks it again (tests)."""
    _verdicts.clear()


def _assert_close(what: str, got: Tensor, want: Tensor, dtype: torch.dtype) -> None:
    got, want = got.detach(), want.detach()
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=0.0, atol=TOLERANCE[dtype] * (scale or 1.0),
                               msg=lambda message: f"{what}: {message}")


def _lowest_precision(*dtypes: torch.dtype) -> torch.dtype:
    return max(dtypes, key=TOLERANCE.__getitem__)


def check_kd(kernel: Callable, student: Tensor, teachers: Tensor, tau: float, mode: str, sign: float) -> None:
    """Runs `kernel` (entropy_weighted_kd's signature) on 4 random rows of the caller's L, K,
    dtypes and device (one row fully masked) against the float64 reference; raises on a
    mismatch. Compares the loss, weights, row losses and the gradient w.r.t. the student."""
    k, _, length = teachers.shape
    gen = torch.Generator().manual_seed(_SEED)
    rows = 4
    mask = torch.rand(rows, length, generator=gen) > 0.25
    mask[:, 0] = True
    mask[1] = False
    case_student = 2 * torch.randn(rows, length, generator=gen)
    case_teachers = 4 * torch.randn(k, rows, length, generator=gen)
    device = student.device
    mask = mask.to(device)
    outputs = {}
    for name, s_dtype, t_dtype, fn in (("kernel", student.dtype, teachers.dtype, kernel),
                                       ("reference", torch.float64, torch.float64, losses.entropy_weighted_kd)):
        s = case_student.to(device, s_dtype).requires_grad_(True)
        loss, weights, row_losses = fn(s, case_teachers.to(device, t_dtype), mask, tau, mode, None, sign, True)
        (grad,) = torch.autograd.grad(loss, s)
        outputs[name] = dict(loss=loss, weights=weights, row_losses=row_losses, grad=grad)
    dtype = _lowest_precision(student.dtype, teachers.dtype)
    for what, got in outputs["kernel"].items():
        _assert_close(what, got, outputs["reference"][what], dtype)


def check_alignment(kernel: Callable, h_t: Tensor) -> None:
    """Runs `kernel` (alignment_entropy's signature) on 2 random examples of 37 target and
    70 source tokens (more than one 64-token tile) with the caller's hidden size, dtype and
    device, padded, against the float64 reference; raises on a mismatch. Compares the loss
    and the gradients w.r.t. both hidden states."""
    hidden = h_t.shape[-1]
    gen = torch.Generator().manual_seed(_SEED)
    batch, n_t, n_s = 2, 37, 70
    case = [torch.randn(batch, n, hidden, generator=gen) for n in (n_t, n_s)]
    t_mask = torch.ones(batch, n_t, dtype=torch.bool)
    s_mask = torch.ones(batch, n_s, dtype=torch.bool)
    t_mask[1, 30:] = False
    s_mask[1, 50:] = False
    device = h_t.device
    masks = (t_mask.to(device), s_mask.to(device))
    outputs = {}
    for name, dtype, fn in (("kernel", h_t.dtype, kernel), ("reference", torch.float64, losses.alignment_entropy)):
        a, b = (x.to(device, dtype).requires_grad_(True) for x in case)
        loss = fn(a, b, *masks)
        grad_t, grad_s = torch.autograd.grad(loss, (a, b))
        outputs[name] = dict(loss=loss, grad_h_t=grad_t, grad_h_s=grad_s)
    for what, got in outputs["kernel"].items():
        _assert_close(what, got, outputs["reference"][what], h_t.dtype)
