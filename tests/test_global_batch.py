"""World-size-invariant batches: `teacher.global_batch_size` / `student.global_batch_size`
give every role group the same rows per optimizer step on any number of ranks
(config.batch_for_group), and a plan whose group a global batch does not split over is
refused at start-up, naming the group."""
from __future__ import annotations

import pytest

from dist_xqa import train
from dist_xqa.config import ConfigError, TrainConfig, batch_for_group, load_config
from dist_xqa.roles.plan import plan_roles


def test_without_a_global_batch_the_group_multiplies_the_per_rank_batch():
    train_cfg = TrainConfig(micro_batch_size=8, grad_accum=2)
    assert batch_for_group(train_cfg, 4) is train_cfg


@pytest.mark.parametrize("global_batch,micro_max,size,micro,accum", [
    (48, 16, 1, 16, 3),
    (48, 16, 2, 12, 2),  # 24 rows a rank: 16 does not divide them, 12 does
    (48, 16, 3, 16, 1),
    (48, 16, 4, 12, 1),
    (48, 16, 16, 3, 1),
    (32, 5, 2, 4, 4),
    (7, 16, 7, 1, 1),
    (13, 4, 1, 1, 13),  # a prime: one row per micro-batch
])
def test_the_global_batch_is_split_into_the_largest_micro_batches_allowed(global_batch, micro_max, size, micro,
                                                                           accum):
    train_cfg = TrainConfig(micro_batch_size=micro_max, global_batch_size=global_batch, lr=3e-5)
    got = batch_for_group(train_cfg, size)
    assert (got.micro_batch_size, got.grad_accum) == (micro, accum)
    assert got.lr == 3e-5 and got.global_batch_size == global_batch, "the other keys are kept"


@pytest.mark.parametrize("size", range(1, 33))
def test_every_group_size_that_divides_the_global_batch_steps_on_the_same_rows(size):
    train_cfg = TrainConfig(micro_batch_size=6, global_batch_size=96)
    if 96 % size:
        with pytest.raises(ValueError, match="96 does not split over"):
            batch_for_group(train_cfg, size)
        return
    got = batch_for_group(train_cfg, size)
    assert got.micro_batch_size * got.grad_accum * size == 96
    assert got.micro_batch_size <= 6
    per_rank = 96 // size
    assert got.micro_batch_size == max(m for m in range(1, 7) if per_rank % m == 0)


@pytest.mark.parametrize("override,message", [
    ("teacher.global_batch_size=0", "teacher.global_batch_size must be null or at least 1"),
    ("student.global_batch_size=-4", "student.global_batch_size must be null or at least 1"),
    ("student.global_batch_size=32 student.grad_accum=4",
     "student.grad_accum is derived from student.global_batch_size"),
])
def test_bad_global_batches_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override.split())


def test_a_teacher_group_the_global_batch_does_not_split_over_is_refused_naming_it():
    cfg = load_config(None, ["teacher.global_batch_size=33"])
    plan = plan_roles(2, ["en"])
    assert [g.size for r in plan.teacher_rounds for g in r] == [2]
    error = train._batch_error(cfg, plan, student=True)
    assert error.startswith("teacher.global_batch_size 33 does not split over the 2 ranks of group teacher/en")
    assert "teacher/en: 2" in error and "e.g. 32 or 34" in error
    assert train._batch_error(load_config(None, ["teacher.global_batch_size=34"]), plan, student=True) is None


def test_the_suggestion_fits_every_teacher_group_of_the_plan():
    plan = plan_roles(5, ["en", "es", "de"])
    sizes = sorted(g.size for r in plan.teacher_rounds for g in r)
    assert len(set(sizes)) > 1, "groups of different sizes"
    error = train._batch_error(load_config(None, ["teacher.global_batch_size=1"]), plan, student=True)
    suggestion = int(error.rsplit("e.g. ", 1)[1].split()[0])
    assert all(suggestion % size == 0 for size in sizes), error
    for g in (g for r in plan.teacher_rounds for g in r):
        assert f"{g.name}: {g.size}" in error


def test_the_student_group_is_checked_only_for_strategies_with_a_student():
    plan = plan_roles(2, ["en", "es", "de"])
    size = plan.student.size
    odd = size * 8 + 1 if size > 1 else None
    if odd is None:
        pytest.skip("a one-rank student group takes any global batch")
    cfg = load_config(None, [f"student.global_batch_size={odd}"])
    assert f"student.global_batch_size {odd} does not split over the {size} ranks of group student" in \
        train._batch_error(cfg, plan, student=True)
    assert train._batch_error(cfg, plan, student=False) is None
