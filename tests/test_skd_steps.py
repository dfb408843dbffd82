"""Self-distillation's bookkeeping around its loss (dist_xqa/roles/skd.py): how the rows of
a short shard are weighted in one optimizer step, which teacher snapshots are kept, and
what the disk estimate counts for them."""
from __future__ import annotations

from collections import defaultdict

import pytest

from dist_xqa.config import load_config
from dist_xqa.disk import saved_models
from dist_xqa.roles.skd import rank_micro_batches, remove_earlier_teachers, teacher_dir


def row_weights(shard_rows: int, group_size: int, grad_accum: int) -> dict[int, float]:
    """Each row's weight in the step's gradient, summed over every rank and micro-batch.
    DeepSpeed averages the gradient over the group's ranks and each rank's micro-batches
    (1 / (group_size * grad_accum)), and a micro-batch's loss is the mean over its rows."""
    weights: dict[int, float] = defaultdict(float)
    for rank in range(group_size):
        for rows, multiplier in rank_micro_batches(shard_rows, rank, group_size, grad_accum):
            for row in rows:
                weights[row] += multiplier / len(rows) / (group_size * grad_accum)
    return dict(weights)


@pytest.mark.parametrize("shard_rows,group_size,grad_accum", [
    (32, 2, 2),  # a full shard
    (5, 2, 4),   # a rank with fewer rows than micro-batches: its empty ones borrow a row
    (1, 2, 3),   # a rank without rows at all
    (7, 3, 2),
])
def test_every_row_of_a_shard_weighs_one_over_its_rows_once(shard_rows, group_size, grad_accum):
    weights = row_weights(shard_rows, group_size, grad_accum)
    assert sorted(weights) == list(range(shard_rows))
    for row, weight in weights.items():
        assert weight == pytest.approx(1 / shard_rows), (row, weights)


def test_every_rank_steps_every_micro_batch():
    """ZeRO's collectives need the same steps on every rank, rows or not."""
    for rank in range(2):
        assert len(rank_micro_batches(1, rank, 2, 3)) == 3
    borrowed = rank_micro_batches(1, 1, 2, 3)  # rank 1 holds none of the one row
    assert all(multiplier == 0 for _, multiplier in borrowed)


def test_a_checkpoint_removes_the_snapshots_no_resume_reads(tmp_path):
    cfg = load_config(None, ["strategy.name=skd", f"run_dir={tmp_path}"])
    for generation in range(3):
        teacher_dir(cfg, generation).mkdir(parents=True)
        (teacher_dir(cfg, generation) / "model.safetensors").write_bytes(b"w")
    assert remove_earlier_teachers(cfg, 2) == [teacher_dir(cfg, 0), teacher_dir(cfg, 1)]
    assert [p.name for p in teacher_dir(cfg, 0).parent.iterdir()] == ["teacher_gen2"]
    assert remove_earlier_teachers(cfg, 2) == []  # a second checkpoint of the epoch: nothing left to remove
    remove_earlier_teachers(cfg, 3)  # the last epoch's end: the finished student needs no teacher
    assert not any(teacher_dir(cfg, 0).parent.iterdir())


@pytest.mark.parametrize("overrides,models", [
    (["strategy.name=lbmrc"], 4),  # three teachers and the student
    (["strategy.name=skd", "strategy.skd.coefficient=map"], 2 + 1),  # phase 1, the student, its teacher snapshot
    (["strategy.name=skd", "strategy.skd.coefficient=none"], 2),  # no teacher, no snapshot
    (["strategy.name=xsta"], 1),
])
def test_the_disk_estimate_counts_skds_teacher_snapshot(overrides, models):
    cfg = load_config(None, overrides)
    if cfg.strategy.name == "skd" and not cfg.strategy.skd.phase1:
        models -= 1
    assert saved_models(cfg) == models
