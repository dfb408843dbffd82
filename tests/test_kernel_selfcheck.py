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
    tiles = alignment._tiles
    alignment._tiles = lambda hidden: dict(tiles(hidden), BLOCK_I=48)
    try:
        return ALIGNMENT_KERNEL(h_t, h_s, t_mask, s_mask)
    finally:
        alignment._tiles = tiles


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
