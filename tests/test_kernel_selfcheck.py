"""The kernels' first-use self-check (dist_xqa/kernels/selfcheck.py) in "checked" mode, run
through the Triton interpreter on CPU tensors: a kernel that fails to build or disagrees with
the reference is replaced by the reference for the rest of the process, with one warning and
no retry; a kernel that passes is used.

Broken kernels are real kernel runs made to fail, injected where the dispatcher looks the
kernel up: a tile width the Triton compiler rejects (non-power-of-2 `tl.arange`), and a
kernel computing the right thing of slightly wrong inputs (a mismatch, not an exception).
"""
from __future__ import annotations

import logging
from functools import partial

import pytest
import torch

from dist_xqa import kernels, losses
from dist_xqa.kernels import alignment, kd, selfcheck
from test_kernel_alignment import make_case as alignment_case
from test_kernel_kd import autograd_nodes, make_case as kd_case

LOGGER = "dist_xqa.kernels.selfcheck"
# The real kernels, before a test replaces them where the dispatcher looks them up.
KD_KERNEL, ALIGNMENT_KERNEL = kd.entropy_weighted_kd, alignment.alignment_entropy


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    selfcheck.reset()
    yield
    selfcheck.reset()


class Counting:
    """Wraps a kernel function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def kd_call(impl):
    """(loss, weights, row losses, grad) of one KD call on a fixed case through `impl`."""
    student, teachers, mask = kd_case(5, 40, 3, device="cpu")
    loss, weights, rows = kernels.entropy_weighted_kd(student, teachers, mask, return_row_losses=True, impl=impl)
    (grad,) = torch.autograd.grad(loss, student)
    return loss, weights, rows, grad


def alignment_call(impl):
    """(loss, grad h_t, grad h_s) of one alignment call on a fixed case through `impl`."""
    h_t, h_s, t_mask, s_mask = alignment_case(2, 9, 11, 20, device="cpu")
    loss = kernels.alignment_entropy(h_t, h_s, t_mask, s_mask, impl=impl)
    return (loss, *torch.autograd.grad(loss, (h_t, h_s)))


def kd_off_by_one_percent(student, teachers, mask, tau, *args):
    return KD_KERNEL(student, teachers, mask, tau * 1.01, *args)


def alignment_off_by_one_percent(h_t, h_s, t_mask, s_mask):
    return ALIGNMENT_KERNEL(h_t * 1.01, h_s, t_mask, s_mask)


def alignment_bad_tiles(h_t, h_s, t_mask, s_mask):
    # A kernel variant with a 48-row tile: the compiler rejects tl.arange(0, 48).
    choose = alignment.launch_meta
    alignment.launch_meta = lambda hidden, dtype: {part: dict(meta, BLOCK_I=48)
                                                   for part, meta in choose(hidden, dtype).items()}
    try:
        return ALIGNMENT_KERNEL(h_t, h_s, t_mask, s_mask)
    finally:
        alignment.launch_meta = choose


BROKEN = {  # id: (kernel name, module, attribute, broken variant, call, expected error text)
    "kd-build": ("kd", kd, "entropy_weighted_kd", partial(KD_KERNEL, block_l=3), kd_call,
                 "arange's range must be a power of 2"),
    "kd-mismatch": ("kd", kd, "entropy_weighted_kd", kd_off_by_one_percent, kd_call, "loss: Scalars are not close"),
    "alignment-build": ("alignment", alignment, "alignment_entropy", alignment_bad_tiles, alignment_call,
                        "arange's range must be a power of 2"),
    "alignment-mismatch": ("alignment", alignment, "alignment_entropy", alignment_off_by_one_percent,
                           alignment_call, "loss: Scalars are not close"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_failing_kernel_falls_back_to_the_reference_once(case, monkeypatch, caplog):
    name, module, attribute, variant, call, error = BROKEN[case]
    broken = Counting(variant)
    monkeypatch.setattr(module, attribute, broken)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        results = [call("checked") for _ in range(3)]
    expected = call("reference")
    for result in results:
        for got, want in zip(result, expected, strict=True):
            assert torch.equal(got, want), "after the failed check every call is the reference's"
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert f"kernel {name!r}" in message and error in message and "cpu" in message
    assert broken.calls == 1, "the failed kernel is not tried again"


@pytest.mark.parametrize("name, module, attribute, call, node", [
    ("kd", kd, "entropy_weighted_kd", kd_call, "_KDRowLossesBackward"),
    ("alignment", alignment, "alignment_entropy", alignment_call, "_AlignmentRowEntropyBackward"),
])
def test_a_passing_kernel_is_used(name, module, attribute, call, node, monkeypatch, caplog):
    kernel = Counting(getattr(module, attribute))
    monkeypatch.setattr(module, attribute, kernel)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        checked = [call("checked") for _ in range(2)]
    assert kernel.calls == 3, "one check, then the kernel on both calls"
    unchecked = call("triton")
    for result in checked:
        for got, want in zip(result, unchecked, strict=True):
            assert torch.equal(got, want)
    assert node in autograd_nodes(checked[0][0])
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.INFO]
    assert f"kernel {name!r} passed" in caplog.records[0].getMessage()


def test_a_bad_call_is_refused_without_disabling_the_kernel(monkeypatch, caplog):
    kernel = Counting(kd.entropy_weighted_kd)
    monkeypatch.setattr(kd, "entropy_weighted_kd", kernel)
    student, teachers, mask = kd_case(3, 8, 2, device="cpu")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with pytest.raises(ValueError, match="mask must be bool"):
            kernels.entropy_weighted_kd(student, teachers, mask.float(), impl="checked")
        assert kernel.calls == 0 and not caplog.records
        loss, _ = kernels.entropy_weighted_kd(student, teachers, mask, impl="checked")
    assert kernel.calls == 2 and "_KDRowLossesBackward" in autograd_nodes(loss)


def test_auto_on_cpu_tensors_takes_the_reference_unchecked(monkeypatch, caplog):
    kernel = Counting(kd.entropy_weighted_kd)
    monkeypatch.setattr(kd, "entropy_weighted_kd", kernel)
    student, teachers, mask = kd_case(3, 8, 2, device="cpu")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loss, weights = kernels.entropy_weighted_kd(student, teachers, mask)
    assert kernel.calls == 0 and not caplog.records
    ref_loss, ref_weights = losses.entropy_weighted_kd(student, teachers, mask)
    assert torch.equal(loss, ref_loss) and torch.equal(weights, ref_weights)


# --- one check per compiled variant ----------------------------------------------------------


class Recording(Counting):
    """Counts a kernel's calls and records the shapes and dtypes of the first tensor argument."""

    def __init__(self, fn):
        super().__init__(fn)
        self.inputs = []

    def __call__(self, first, *args, **kwargs):
        self.inputs.append((tuple(first.shape), first.dtype))
        return super().__call__(first, *args, **kwargs)


def checks_logged(caplog, name):
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and f"kernel {name!r} passed its self-check" in r.getMessage()]


def test_each_kd_variant_is_checked_once_on_the_callers_inputs(monkeypatch, caplog):
    # L = 40 and L = 48 compile to different variants (48 is divisible by 16: Triton
    # specialises on it), as do float32 and float16 inputs: three checks, each on the
    # caller's own shapes; the repeated call of a checked variant runs the kernel alone.
    kernel = Recording(kd.entropy_weighted_kd)
    monkeypatch.setattr(kd, "entropy_weighted_kd", kernel)
    calls = [(5, 40, 3, torch.float32), (6, 48, 3, torch.float32), (7, 40, 3, torch.float32),
             (5, 40, 3, torch.float16)]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for rows, length, k, dtype in calls:
            student, teachers, mask = kd_case(rows, length, k, dtype=dtype, device="cpu")
            loss, _ = kernels.entropy_weighted_kd(student, teachers, mask, impl="checked")
            assert "_KDRowLossesBackward" in autograd_nodes(loss)
    assert kernel.inputs == [((5, 40), torch.float32)] * 2 + [((6, 48), torch.float32)] * 2 + [
        ((7, 40), torch.float32)] + [((5, 40), torch.float16)] * 2
    messages = checks_logged(caplog, "kd")
    assert len(messages) == 3
    assert "L=any" in messages[0] and "L=16" in messages[1] and "student=float16" in messages[2]


def test_each_alignment_variant_is_checked_once_on_the_callers_shapes(monkeypatch, caplog):
    # I = J = 9 and I = J = 16 are two variants; the check takes the caller's first two
    # examples at the caller's I, J and H.
    kernel = Recording(alignment.alignment_entropy)
    monkeypatch.setattr(alignment, "alignment_entropy", kernel)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for batch, n in ((3, 9), (3, 16), (2, 16)):
            h_t, h_s, t_mask, s_mask = alignment_case(batch, n, n, 20, device="cpu")
            kernels.alignment_entropy(h_t, h_s, t_mask, s_mask, impl="checked").backward()
    assert kernel.inputs == [((2, 9, 20), torch.float32), ((3, 9, 20), torch.float32),
                             ((2, 16, 20), torch.float32), ((3, 16, 20), torch.float32),
                             ((2, 16, 20), torch.float32)]
    messages = checks_logged(caplog, "alignment")
    assert len(messages) == 2 and "I=any" in messages[0] and "I=16" in messages[1]


def test_a_failing_variant_falls_back_alone(monkeypatch, caplog):
    # A kernel that is wrong only for rows of a multiple of 16 positions (as a miscompiled
    # specialisation would be): those calls get the reference after one warning, the other
    # variant keeps the kernel.
    def wrong_when_divisible(student, teachers, mask, tau, *args):
        return KD_KERNEL(student, teachers, mask, tau * (1.01 if student.shape[1] % 16 == 0 else 1.0), *args)

    kernel = Counting(wrong_when_divisible)
    monkeypatch.setattr(kd, "entropy_weighted_kd", kernel)
    results = {}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for length in (48, 40, 48, 40):
            student, teachers, mask = kd_case(4, length, 3, device="cpu")
            loss, _ = kernels.entropy_weighted_kd(student, teachers, mask, impl="checked")
            results.setdefault(length, []).append(loss)
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "L=16" in warnings[0] and "loss: Scalars are not close" in warnings[0]
    assert kernel.calls == 1 + 3, "48: the failed check only; 40: a check, then the kernel twice"
    for length, got in results.items():
        student, teachers, mask = kd_case(4, length, 3, device="cpu")
        want = losses.entropy_weighted_kd(student, teachers, mask)[0]
        fused = length == 40
        for loss in got:
            torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
            assert ("_KDRowLossesBackward" in autograd_nodes(loss)) == fused
