"""Fused entropy-weighted KD kernel vs the reference (dist_xqa.losses), on odd shapes.

Runs the compiled kernel on CUDA when there is a GPU, else through the Triton interpreter on
the CPU. Tolerances: float32 inputs 1e-5 relative (+1e-6 absolute) on the loss, weights and
row losses, 1e-6 absolute on gradients (entries are O(1 / R)); float16 and bfloat16 inputs are
upcast to float32 the same way by both paths (the kernel converts every load), so the loss,
weights and row losses keep the float32 tolerance and only the rounding of the returned
gradient differs: float16 1e-3 relative, 1e-5 absolute; bfloat16 one unit in its last place
(8e-3 relative, 1e-6 absolute). bf16 on a GPU (`gpu` marker): 1e-5 on the loss and weights,
1e-2 relative on gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

# With CUDA the kernels are compiled for it; without, they run through the interpreter
# (chosen in tests/conftest.py before anything imports triton).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from dist_xqa import kernels, losses

FP32 = dict(rtol=1e-5, atol=1e-6)


def make_case(rows, length, k, *, dtype=torch.float32, seed=0, device=DEVICE, fully_masked=(1,)):
    """Student [R, L], teachers [K, R, L] and a mask like real features: CLS, some context
    tokens (question tokens in between are not answer positions), then padding."""
    gen = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(rows, length, generator=gen)
    teachers = 4 * torch.randn(k, rows, length, generator=gen)
    ends = torch.randint(1, length + 1, (rows,), generator=gen)
    positions = torch.arange(length)
    mask = (positions[None, :] < ends[:, None]) & (torch.rand(rows, length, generator=gen) > 0.25)
    mask[:, 0] = True  # CLS
    for row in fully_masked:
        if row < rows:
            mask[row] = False
    to = dict(device=device, dtype=dtype)
    return student.to(**to).requires_grad_(True), teachers.to(**to), mask.to(device)


def run_both(student, teachers, mask, **kwargs):
    """(loss, weights, rows, grad) for the Triton path and the reference."""
    results = []
    for impl in ("triton", "reference"):
        loss, weights, rows = kernels.entropy_weighted_kd(
            student, teachers, mask, return_row_losses=True, impl=impl, **kwargs
        )
        (grad,) = torch.autograd.grad(loss, student)
        results.append((loss, weights, rows, grad))
    return results


SHAPES = [  # (R, L, K)
    (3, 1, 1),
    (4, 7, 3),
    (5, 383, 5),
    (4, 385, 3),
    (3, 64, 5),
]


@pytest.mark.parametrize("rows, length, k", SHAPES)
@pytest.mark.parametrize("mode, sign", [("imp", -1.0), ("imp", 1.0), ("hyper", -1.0)])
def test_fp32_matches_reference(rows, length, k, mode, sign):
    # Row 1 is fully masked in every case (also at L = 1, where the others keep only CLS).
    student, teachers, mask = make_case(rows, length, k, fully_masked=(1,))
    assert not mask[1].any() and mask.any(-1).sum() == rows - 1
    (loss, weights, row_losses, grad), (ref_loss, ref_weights, ref_rows, ref_grad) = run_both(
        student, teachers, mask, tau=2.0, mode=mode, sign=sign
    )
    torch.testing.assert_close(loss, ref_loss, **FP32)
    torch.testing.assert_close(weights, ref_weights, **FP32)
    torch.testing.assert_close(row_losses, ref_rows, **FP32)
    torch.testing.assert_close(grad, ref_grad, **FP32)
    assert grad.dtype == student.dtype


@pytest.mark.parametrize("block_l", [16, 128])
def test_rows_spanning_several_tiles(block_l):
    # The online max/sum across tiles: rows longer than one tile, with tiles fully masked.
    student, teachers, mask = make_case(4, 385, 3)
    mask[2, 100:300] = False
    from dist_xqa.kernels import kd

    loss, weights, rows = kd.entropy_weighted_kd(student, teachers, mask, 2.0, "imp", None, -1.0,
                                                  True, block_l=block_l)
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_weights, ref_rows = losses.entropy_weighted_kd(student, teachers, mask,
                                                                 return_row_losses=True)
    (ref_grad,) = torch.autograd.grad(ref_loss, student)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    torch.testing.assert_close(weights, ref_weights, **FP32)
    torch.testing.assert_close(rows, ref_rows, **FP32)
    torch.testing.assert_close(grad, ref_grad, **FP32)


@pytest.mark.parametrize("n_rows, length, k", [(3, 1, 1), (4, 7, 5), (4, 97, 3), (3, 385, 3)])
@pytest.mark.parametrize("mode, sign", [("imp", -1.0), ("imp", 1.0), ("hyper", -1.0)])
def test_fp16_matches_reference(n_rows, length, k, mode, sign):
    student, teachers, mask = make_case(n_rows, length, k, dtype=torch.float16)
    (loss, weights, rows, grad), (ref_loss, ref_weights, ref_rows, ref_grad) = run_both(
        student, teachers, mask, mode=mode, sign=sign
    )
    torch.testing.assert_close(loss, ref_loss, **FP32)
    torch.testing.assert_close(weights, ref_weights, **FP32)
    torch.testing.assert_close(rows, ref_rows, **FP32)
    assert grad.dtype == torch.float16
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("n_rows, length, k", [(3, 1, 1), (4, 7, 5), (5, 383, 3), (4, 97, 8)])
@pytest.mark.parametrize("mode, sign", [("imp", -1.0), ("imp", 1.0), ("hyper", -1.0)])
@pytest.mark.parametrize("student_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32-student"])
def test_bf16_matches_reference(n_rows, length, k, mode, sign, student_dtype):
    # bf16 teachers (as the logit store may hold them) with a bf16 or a float32 student;
    # the loss, weights and row losses, and the gradient in the student's dtype.
    student, teachers, mask = make_case(n_rows, length, k, dtype=torch.bfloat16)
    student = student.detach().to(student_dtype).requires_grad_(True)
    (loss, weights, rows, grad), (ref_loss, ref_weights, ref_rows, ref_grad) = run_both(
        student, teachers, mask, mode=mode, sign=sign
    )
    torch.testing.assert_close(loss, ref_loss, **FP32)
    torch.testing.assert_close(weights, ref_weights, **FP32)
    torch.testing.assert_close(rows, ref_rows, **FP32)
    assert grad.dtype == student_dtype
    tolerance = dict(rtol=8e-3, atol=1e-6) if student_dtype == torch.bfloat16 else FP32
    torch.testing.assert_close(grad, ref_grad, **tolerance)


def test_logits_far_from_zero():
    # A common offset of hundreds on every logit: softmax, entropies and the loss are
    # unchanged in exact arithmetic, and the reference (log_softmax) stays exact to float32.
    # The kernel must too: it accumulates E[x - max], not E[x] (whose difference with lse
    # cancels ~eps * |x|, 1e-4 relative on the weights here before that was fixed).
    student, teachers, mask = make_case(4, 40, 3)
    far_student = (student.detach() + 500.0).requires_grad_(True)
    for mode, sign in (("imp", -1.0), ("imp", 1.0), ("hyper", -1.0)):
        (loss, weights, rows, grad), (ref_loss, ref_weights, ref_rows, ref_grad) = run_both(
            far_student, teachers + 500.0, mask, mode=mode, sign=sign
        )
        torch.testing.assert_close(loss, ref_loss, **FP32)
        torch.testing.assert_close(weights, ref_weights, **FP32)
        torch.testing.assert_close(rows, ref_rows, **FP32)
        torch.testing.assert_close(grad, ref_grad, **FP32)
    # ... and the offset really changes nothing (beyond float32 rounding of the inputs).
    near_loss, near_weights = kernels.entropy_weighted_kd(student, teachers, mask, impl="triton")
    far_loss, far_weights = kernels.entropy_weighted_kd(far_student, teachers + 500.0, mask,
                                                        impl="triton")
    torch.testing.assert_close(far_loss, near_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(far_weights, near_weights, rtol=1e-4, atol=1e-5)


def test_mixed_student_and_teacher_dtypes():
    student, teachers, mask = make_case(3, 33, 3)
    (loss, _, _, grad), (ref_loss, _, _, ref_grad) = run_both(student, teachers.half(), mask)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    torch.testing.assert_close(grad, ref_grad, **FP32)


def test_given_fixed_weights_and_temperature():
    student, teachers, mask = make_case(4, 20, 3)
    fixed = torch.tensor([0.6, 0.1, 0.3], device=DEVICE)
    (loss, weights, _, grad), (ref_loss, ref_weights, _, ref_grad) = run_both(
        student, teachers, mask, mode="hyper", fixed_weights=fixed, tau=1.0
    )
    torch.testing.assert_close(weights, fixed.expand(4, 3))
    torch.testing.assert_close(loss, ref_loss, **FP32)
    torch.testing.assert_close(grad, ref_grad, **FP32)


def test_loss_inside_a_larger_graph():
    # The KD loss is not the last op: its gradient is scaled per row by what follows, and the
    # student logits also feed another term.
    student, teachers, mask = make_case(4, 19, 3)
    grads = []
    for impl in ("triton", "reference"):
        loss, _, _ = kernels.entropy_weighted_kd(student * 1.5, teachers, mask, impl=impl,
                                                 return_row_losses=True)
        total = torch.cos(loss) * student.pow(2).mean() + 3 * loss
        (grad,) = torch.autograd.grad(total, student)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1], **FP32)


def test_all_rows_masked():
    student, teachers, mask = make_case(3, 8, 2)
    (loss, weights, rows, grad), _ = run_both(student, teachers, torch.zeros_like(mask))
    assert loss.item() == 0 and torch.equal(rows, torch.zeros_like(rows))
    torch.testing.assert_close(weights, torch.full((3, 2), 0.5, device=DEVICE))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_teachers_receive_no_gradient():
    student, teachers, mask = make_case(3, 8, 2)
    teachers.requires_grad_(True)
    loss, weights = kernels.entropy_weighted_kd(student, teachers, mask, impl="triton")
    loss.backward()
    assert teachers.grad is None and student.grad is not None and not weights.requires_grad


def test_hand_computed_tiny_case():
    # z = mean of the teachers = [2 ln3, 0] over the two valid positions; at tau = 2,
    # p_T = [3/4, 1/4] and p_S = softmax([0, ln3]) = [1/4, 3/4]. The masked third position
    # holds large logits that would change the result if they leaked in.
    ln3 = math.log(3.0)
    mask = torch.tensor([[True, True, False]], device=DEVICE)
    teachers = torch.tensor([[[4 * ln3, 0.0, 9.0]], [[0.0, 0.0, -9.0]]], device=DEVICE)
    student = torch.tensor([[0.0, 2 * ln3, 5.0]], device=DEVICE)
    loss, _ = kernels.entropy_weighted_kd(student, teachers, mask, tau=2.0, mode="hyper", impl="triton")
    expected = 4 * -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_bad_input_is_rejected_before_the_kernel():
    student, teachers, mask = make_case(3, 8, 2)
    with pytest.raises(ValueError, match="teachers must be"):
        kernels.entropy_weighted_kd(student, teachers[:, :2], mask, impl="triton")


# --- dispatch ---------------------------------------------------------------------------------


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.select_impl(cpu) == "reference"
    assert kernels.select_impl(cpu, "triton") == "triton"
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert kernels.select_impl(cpu) == "triton"
    assert kernels.select_impl(cpu, "reference") == "reference"
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="DIST_XQA_KERNELS must be one of"):
        kernels.select_impl(cpu)
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.select_impl(cpu, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        kernels.select_impl(cpu, "triton")


def autograd_nodes(tensor):
    """Names of every node in the autograd graph behind `tensor`."""
    # Visited by node, not by name: two distinct nodes of the same kind (two WhereBackward0)
    # both lead somewhere.
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {node.name() for node in seen}


def test_env_var_forces_the_path(monkeypatch):
    student, teachers, mask = make_case(3, 8, 2)
    results = {}
    for impl in ("triton", "reference"):
        monkeypatch.setenv(kernels.ENV_VAR, impl)
        results[impl] = kernels.entropy_weighted_kd(student, teachers, mask)[0]
    torch.testing.assert_close(results["triton"], results["reference"], **FP32)
    assert "_KDRowLossesBackward" in autograd_nodes(results["triton"])
    assert "_KDRowLossesBackward" not in autograd_nodes(results["reference"])


# --- heavier shapes and GPU-only checks ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("k, length", [(8, 512), (5, 1000)])
def test_large_shapes(k, length):
    student, teachers, mask = make_case(16, length, k, fully_masked=(3, 9))
    (loss, weights, rows, grad), (ref_loss, ref_weights, ref_rows, ref_grad) = run_both(
        student, teachers, mask
    )
    torch.testing.assert_close(loss, ref_loss, **FP32)
    torch.testing.assert_close(weights, ref_weights, **FP32)
    torch.testing.assert_close(grad, ref_grad, **FP32)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode, sign", [("imp", -1.0), ("imp", 1.0), ("hyper", -1.0)])
def test_cuda_matches_reference(dtype, mode, sign):
    student, teachers, mask = make_case(128, 385, 5, dtype=dtype, device="cuda", fully_masked=(3,))
    (loss, weights, rows, grad), (ref_loss, ref_weights, ref_rows, ref_grad) = run_both(
        student, teachers, mask, mode=mode, sign=sign
    )
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows, ref_rows, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-6)
