"""The student's micro-batches of one shard (dist_xqa/roles/student.py micro_batch_plan):
whatever the shard's length, the group size and the accumulation, every row of the shard
counts exactly once with weight 1 / rows in the group's gradient, every rank takes the
same number of micro-steps, and a rank without rows contributes zero gradient."""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from dist_xqa.logits.order import rank_rows
from dist_xqa.losses import student_loss
from dist_xqa.roles.student import micro_batch_plan


def group_weights(shard_rows: int, group_size: int, grad_accum: int) -> dict[int, float]:
    """Each row's weight in the gradient DeepSpeed forms: a micro-batch's loss is the
    mean over its rows times the plan's multiplier, divided by grad_accum in backward,
    averaged over the group's ranks."""
    weights: dict[int, float] = defaultdict(float)
    for rank in range(group_size):
        rows = list(range(shard_rows))[rank_rows(shard_rows, rank, group_size)]
        plan = micro_batch_plan(len(rows), shard_rows, group_size, grad_accum)
        assert len(plan) == grad_accum, "every rank of the group takes the same micro-steps"
        for micro, multiplier in plan:
            assert len(micro) >= 1, "every micro-step runs a forward (ZeRO-3 gathers in it)"
            # a rank without rows runs on a borrowed row: it must weigh nothing
            row_ids = [rows[i] for i in micro] if rows else [0]
            for row in row_ids:
                weights[row] += multiplier / len(micro) / grad_accum / group_size
    return dict(weights)


@pytest.mark.parametrize("shard_rows,group_size,grad_accum", [
    (16, 2, 2),  # a full shard: multiplier 1 everywhere
    (5, 2, 4),  # a short last shard: micro-batches without rows
    (1, 2, 1),  # a rank without rows
    (3, 4, 2),  # ranks without rows and empty micro-batches
    (7, 3, 3),
])
def test_every_row_of_a_shard_counts_once_with_equal_weight(shard_rows, group_size, grad_accum):
    weights = group_weights(shard_rows, group_size, grad_accum)
    assert sorted(weights) == list(range(shard_rows))
    for row, weight in weights.items():
        assert weight == pytest.approx(1 / shard_rows), f"row {row}"


def test_a_full_shard_keeps_the_plain_mean():
    assert [m for _, m in micro_batch_plan(8, 16, 2, 2)] == [1.0, 1.0]
    assert [(list(micro), m) for micro, m in micro_batch_plan(0, 1, 2, 2)] == [([0], 0.0), ([0], 0.0)]


def test_the_multiplier_turns_micro_batch_means_into_the_shard_mean():
    """The plan relies on student_loss being a mean over its rows: the weighted micro-batch
    losses of one rank (group of one) add up to the loss of the whole shard."""
    torch.manual_seed(0)
    rows, length, teachers, grad_accum = 5, 12, 3, 3
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[:, :2] = False
    mask[:, 0] = True  # CLS
    inputs = (torch.randn(rows, length), torch.randn(rows, length), torch.randn(teachers, rows, length),
              torch.randn(teachers, rows, length))
    start, end = torch.randint(2, length, (rows,)), torch.randint(2, length, (rows,))

    def loss(index):
        s, e, ts, te = inputs
        return student_loss(s[index], e[index], ts[:, index], te[:, index], mask[index], start[index],
                            end[index]).total

    whole = loss(torch.arange(rows))
    accumulated = sum(multiplier * loss(torch.as_tensor(micro)) / grad_accum
                      for micro, multiplier in micro_batch_plan(rows, rows, 1, grad_accum))
    torch.testing.assert_close(accumulated, whole)
