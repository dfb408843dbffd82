"""World-size-invariant batches: `teacher.global_batch_size` / `student.global_batch_size`
give every role group the same rows per optimizer step on any number of ranks
(config.batch_for_group), and a plan whose group a global batch does not split over is
refused at start-up, naming the group."""
from __future__ import annotations

import pytest

from dist_xqa import train
from dist_xqa.config import ConfigError, TrainConfig, batch_for_group, load_config
from dist_xqa.plan import plan_roles


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


def test_a_rerun_on_another_number_of_ranks_without_a_global_batch_is_refused_naming_the_batch(tmp_path):
    """With null global batch sizes a step's rows are micro x accum x the group's ranks:
    the stage records hold them (real record files), and a rerun whose role plan changes
    them is refused for every stage not yet finished, naming the key and the --redo."""
    import json

    from dist_xqa import stages

    cfg = load_config(None, [f"run_dir={tmp_path}", "teacher.grad_accum=2"])
    assert cfg.teacher.global_batch_size is None and cfg.student.global_batch_size is None
    on_four, on_two = plan_roles(4, ["en", "es", "de"]), plan_roles(2, ["en", "es", "de"])
    sizes4 = {g.name: g.size for r in on_four.teacher_rounds for g in r}
    sizes2 = {g.name: g.size for r in on_two.teacher_rounds for g in r}
    assert sizes4["teacher/en"] != sizes2["teacher/en"] and on_four.student.size != on_two.student.size
    made = stages.effective_batches(cfg, on_four, student=True)
    assert made == {"teachers": {name: 16 * 2 * size for name, size in sizes4.items()},
                    "distill": {"student": 16 * on_four.student.size}}
    stages.record(cfg, "teachers", made["teachers"])
    stages.record(cfg, "distill", made["distill"])
    record = json.loads((tmp_path / "stages" / "teachers.json").read_text())["settings"]
    assert record["teacher.global_batch_size (null: rows per step of teacher/en)"] == 32 * sizes4["teacher/en"]

    stages.check_rerun(cfg, set())  # the settings known before the plan still match
    assert stages.batch_change(cfg, made) is None, "the same ranks: the same batches"
    refusal = stages.batch_change(cfg, stages.effective_batches(cfg, on_two, student=True))
    assert (f"  teachers: teacher.global_batch_size (null: rows per step of teacher/en): "
            f"{32 * sizes4['teacher/en']} -> {32 * sizes2['teacher/en']}\n") in refusal
    assert "--redo teachers to remove" in refusal and "set teacher/student.global_batch_size" in refusal

    for lang in ("en", "es", "de"):  # phase 1 finished: its batches are history
        (tmp_path / "teachers" / lang).mkdir(parents=True)
        (tmp_path / "teachers" / lang / "DONE.json").write_text("{}")
    refusal = stages.batch_change(cfg, stages.effective_batches(cfg, on_two, student=True))
    assert "teachers:" not in refusal and "--redo distill to remove" in refusal
    assert (f"  distill: student.global_batch_size (null: rows per step of student): "
            f"{16 * on_four.student.size} -> {16 * on_two.student.size}\n") in refusal

    fixed = load_config(None, [f"run_dir={tmp_path}", "teacher.grad_accum=2", "student.global_batch_size=16"])
    assert stages.effective_batches(fixed, on_two, student=True) == {
        "teachers": {name: 32 * size for name, size in sizes2.items()}}, "a set global batch is a key of its own"
    assert stages.effective_batches(cfg, on_two, student=False).keys() == {"teachers"}


def test_records_made_before_effective_batches_are_not_compared(tmp_path):
    from dist_xqa import stages

    cfg = load_config(None, [f"run_dir={tmp_path}"])
    stages.record(cfg, "teachers")
    stages.record(cfg, "distill")
    assert stages.batch_change(cfg, stages.effective_batches(cfg, plan_roles(2, ["en", "es", "de"]), True)) is None
