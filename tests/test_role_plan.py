"""The role plan: a pure function, checked on many world shapes."""
from __future__ import annotations

import pytest

from dist_xqa.roles.plan import Role, plan_roles

LANGS = ["en", "es", "de", "ar", "hi", "vi", "zh"]
SHAPES = [(n, k) for n in (1, 2, 3, 4, 5, 7, 8, 16, 64) for k in (1, 2, 3, 4, 7)]


def check_invariants(plan, world_size, teachers):
    everyone = set(range(world_size))
    # phase 1: every teacher trained exactly once, groups of a round disjoint and together
    # covering every rank, each group a contiguous block
    trained = [g.teacher for round_ in plan.teacher_rounds for g in round_]
    assert sorted(trained) == sorted(teachers)
    for round_ in plan.teacher_rounds:
        ranks = [r for g in round_ for r in g.ranks]
        assert len(ranks) == len(set(ranks)), f"overlapping groups in {round_}"
        assert set(ranks) == everyone
        for g in round_:
            assert g.ranks == tuple(range(g.ranks[0], g.ranks[0] + g.size))
            assert g.role is Role.TEACHER and g.name == f"teacher/{g.teacher}"
        sizes = [g.size for g in round_]
        assert max(sizes) - min(sizes) <= 1
    round_sizes = [len(round_) for round_ in plan.teacher_rounds]
    assert max(round_sizes) - min(round_sizes) <= 1
    # phase 2: every teacher has producers, every rank works
    assert [p.teacher for p in plan.producers] == list(teachers)
    assert all(p.ranks for p in plan.producers)
    producer_ranks = {r for p in plan.producers for r in p.ranks}
    assert set(plan.student.ranks) | producer_ranks == everyone
    if plan.producers_share_student_ranks:
        assert set(plan.student.ranks) == everyone
    else:
        assert not producer_ranks & set(plan.student.ranks)
        assert plan.student.ranks == tuple(range(plan.student.size))  # rank 0 logs as a student
        flat = [r for p in plan.producers for r in p.ranks]
        assert len(flat) == len(set(flat)), "a dedicated producer rank serves one teacher"
    # canonical order: rounds, then the student; names unique
    groups = plan.all_groups()
    assert groups[-1] == plan.student
    assert len({g.name for g in groups}) == len(groups)
    for rank in range(world_size):
        mine = plan.groups_for(rank)
        assert [g for g in groups if rank in g.ranks] == list(mine)
        assert len(plan.teacher_groups_for(rank)) == len(plan.teacher_rounds)  # busy in every round


@pytest.mark.parametrize("world_size,k", SHAPES)
def test_invariants_hold_for_every_shape(world_size, k):
    teachers = LANGS[:k]
    check_invariants(plan_roles(world_size, teachers), world_size, teachers)


def test_fewer_ranks_than_teachers_time_share_in_rounds():
    plan = plan_roles(2, ["en", "es", "de"])
    assert [[(g.teacher, g.ranks) for g in r] for r in plan.teacher_rounds] == [
        [("en", (0,)), ("es", (1,))],
        [("de", (0, 1))],
    ]
    assert plan.producers_share_student_ranks
    assert plan.student.ranks == (0, 1)
    assert {p.teacher: p.ranks for p in plan.producers} == {"en": (0,), "es": (1,), "de": (0,)}
    assert plan.producer_teachers_for(0) == ("en", "de")


def test_one_rank_does_everything_one_after_another():
    plan = plan_roles(1, ["en", "es"])
    assert [[g.name for g in r] for r in plan.teacher_rounds] == [["teacher/en"], ["teacher/es"]]
    assert [g.name for g in plan.groups_for(0)] == ["teacher/en", "teacher/es", "student"]
    assert plan.producer_teachers_for(0) == ("en", "es")


def test_as_many_ranks_as_teachers_one_round_then_shared_producers():
    plan = plan_roles(3, ["en", "es", "de"])
    assert [[g.ranks for g in r] for r in plan.teacher_rounds] == [[(0,), (1,), (2,)]]
    assert plan.producers_share_student_ranks and plan.student.ranks == (0, 1, 2)
    assert [p.ranks for p in plan.producers] == [(0,), (1,), (2,)]


def test_one_spare_rank_gives_dedicated_producers_one_each():
    plan = plan_roles(4, ["en", "es", "de"])
    assert [g.ranks for g in plan.teacher_rounds[0]] == [(0, 1), (2,), (3,)]
    assert not plan.producers_share_student_ranks
    assert plan.student.ranks == (0,)
    assert [p.ranks for p in plan.producers] == [(1,), (2,), (3,)]


def test_many_ranks_balance_student_against_producers():
    # 64 ranks, 3 teachers, a forward costing a third of a training step: 31 student
    # ranks need ceil(31/3) = 11 producers per teacher, 31 + 33 = 64
    plan = plan_roles(64, ["en", "es", "de"])
    assert [g.size for g in plan.teacher_rounds[0]] == [22, 21, 21]
    assert plan.student.size == 31
    assert [len(p.ranks) for p in plan.producers] == [11, 11, 11]
    # cheaper producers leave more ranks to the student
    cheap = plan_roles(64, ["en", "es", "de"], producer_cost=1 / 10)
    assert cheap.student.size > plan.student.size
    assert all(len(p.ranks) >= cheap.student.size / 10 for p in cheap.producers)


def test_equal_throughput_prefers_producer_slack():
    # 8 ranks, 3 teachers: a student of 3 with producers [2, 2, 1] and a student of 4
    # with [2, 1, 1] both run at 3 rank-units; the smaller student keeps the store ahead
    plan = plan_roles(8, ["en", "es", "de"])
    assert plan.student.size == 3
    assert [len(p.ranks) for p in plan.producers] == [2, 2, 1]


def test_student_min_ranks_switches_to_shared_producers():
    assert not plan_roles(5, ["en", "es"], student_min_ranks=3).producers_share_student_ranks
    plan = plan_roles(5, ["en", "es"], student_min_ranks=4)
    assert plan.producers_share_student_ranks and plan.student.ranks == (0, 1, 2, 3, 4)
    assert [p.ranks for p in plan.producers] == [(0, 2, 4), (1, 3)]


def test_describe_names_every_group_and_rank():
    plan = plan_roles(4, ["en", "es", "de"])
    text = plan.describe()
    for name in ("teacher/en", "teacher/es", "teacher/de", "student", "producer/en", "producer/de"):
        assert name in text
    assert "0-1" in text and "dedicated" in text
    rows = [line for line in text.splitlines() if "|" in line][1:]
    assert rows == ["      0 | teacher/en | student", "      1 | teacher/en | producer/en",
                    "      2 | teacher/es | producer/es", "      3 | teacher/de | producer/de"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(world_size=0, teachers=["en"]), "world_size"),
    (dict(world_size=2, teachers=["en", "es", "en"]), "duplicate teacher name(s) ['en']"),
    (dict(world_size=2, teachers="en"), "list of names"),
    (dict(world_size=2, teachers=["en", ""]), "non-empty"),
    (dict(world_size=2, teachers=["en/x"]), "without '/'"),
    (dict(world_size=2, teachers=["en"], student_min_ranks=0), "student_min_ranks"),
    (dict(world_size=2, teachers=["en"], producer_cost=0), "producer_cost"),
])
def test_bad_input_is_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError) as err:
        plan_roles(**kwargs)
    assert message in str(err.value)


def test_without_teachers_the_student_takes_every_rank():
    """X-STA has no phase-1 models: no teacher round, no producer, the student on all ranks."""
    plan = plan_roles(3, [])
    assert plan.teacher_rounds == () and plan.producers == ()
    assert plan.student.ranks == (0, 1, 2)
    assert all(plan.teacher_groups_for(rank) == () for rank in range(3))
    assert "0 teacher(s)" in plan.describe()


def test_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 4 is outside the world of 4"):
        plan_roles(4, ["en"]).groups_for(4)
