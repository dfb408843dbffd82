"""The role plan: a pure function, checked on many world shapes."""
from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest

from dist_xqa.config import ConfigError, load_config
from dist_xqa.plan import DEFAULT_PRODUCER_SPEED_RATIO, Role, plan_roles

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
        assert max(sizes) - min(sizes) <= 1  # equal work: the even split
        assert len(round_) <= world_size
    assert len(plan.teacher_rounds) == -(-len(teachers) // world_size)  # the fewest rounds
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
    # faster producers leave more ranks to the student
    fast = plan_roles(64, ["en", "es", "de"], producer_speed_ratio=10)
    assert fast.student.size > plan.student.size
    assert all(len(p.ranks) * 10 >= fast.student.size for p in fast.producers)


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
    rows = [line for line in text.splitlines() if " | " in line][1:]
    assert rows == ["      0 | teacher/en | student", "      1 | teacher/en | producer/en",
                    "      2 | teacher/es | producer/es", "      3 | teacher/de | producer/de"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(world_size=0, teachers=["en"]), "world_size"),
    (dict(world_size=2, teachers=["en", "es", "en"]), "duplicate teacher name(s) ['en']"),
    (dict(world_size=2, teachers="en"), "list of names"),
    (dict(world_size=2, teachers=["en", ""]), "non-empty"),
    (dict(world_size=2, teachers=["en/x"]), "without '/'"),
    (dict(world_size=2, teachers=["en"], student_min_ranks=0), "student_min_ranks"),
    (dict(world_size=2, teachers=["en"], producer_speed_ratio=0), "plan.producer_speed_ratio"),
    (dict(world_size=2, teachers=["en"], producers="sometimes"), "plan.producers must be one of auto"),
    (dict(world_size=3, teachers=["en", "es", "de"], producers="dedicated"),
     "cannot hold a student of plan.student_min_ranks=1 beside one producer for each of 3"),
    (dict(world_size=2, teachers={"en": 10, "es": 0}), "teacher 'es': work must be a positive number"),
    (dict(world_size=2, teachers={"en": 10, "es": float("nan")}), "teacher 'es': work"),
    (dict(world_size=2, teachers=["en"], distill_work=-1), "distill_work"),
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


# LBMRC with strategy.add_english: every other branch adds the source branch to its own,
# so the source teacher has half the others' features.
LBMRC_WORK = {"en": 1000, "es": 2000, "de": 2000}


def compositions(total, parts):
    """Every split of `total` ranks into `parts` groups of at least one."""
    if parts == 1:
        yield (total,)
        return
    for first in range(1, total - parts + 2):
        for rest in compositions(total - first, parts - 1):
            yield (first, *rest)


def brute_force_phase1(world_size, work):
    """The best phase-1 time over every assignment of the teachers to the fewest rounds
    (at most world_size teachers each) and every split of each round's ranks."""
    names, rounds = list(work), -(-len(work) // world_size)
    best = float("inf")
    for assignment in itertools.product(range(rounds), repeat=len(names)):
        members = [[work[t] for t, r in zip(names, assignment) if r == i] for i in range(rounds)]
        if all(0 < len(m) <= world_size for m in members):
            best = min(best, sum(min(max(w / n for w, n in zip(m, split))
                                     for split in compositions(world_size, len(m))) for m in members))
    return best


def plan_phase1_time(plan):
    """The phase time of the plan's own groups: each round lasts as long as its slowest."""
    return sum(max(plan.estimate.teacher_work[g.teacher] / g.size for g in round_) for round_ in plan.teacher_rounds)


def test_teacher_groups_get_ranks_in_proportion_to_their_work():
    plan = plan_roles(5, LBMRC_WORK)
    assert [(g.teacher, g.ranks) for g in plan.teacher_rounds[0]] == [("en", (0,)), ("es", (1, 2)), ("de", (3, 4))]
    sizes = {g.teacher: g.size for g in plan_roles(64, LBMRC_WORK).teacher_rounds[0]}
    assert sum(sizes.values()) == 64
    for teacher, work in LBMRC_WORK.items():
        assert abs(sizes[teacher] - 64 * work / 5000) < 1, sizes  # 12.8, 25.6, 25.6 ranks


def test_the_plan_beats_the_equal_split_on_unequal_work():
    # the equal split of 5 ranks, [2, 2, 1], leaves de alone on one rank: 2000 units
    equal_split = max(work / n for work, n in zip(LBMRC_WORK.values(), (2, 2, 1)))
    plan = plan_roles(5, LBMRC_WORK)
    assert plan.estimate.phase1 == plan_phase1_time(plan) == 1000 < equal_split == 2000
    assert plan_roles(5, list(LBMRC_WORK)).estimate.round_times == (1.0,)  # names alone: equal work


@pytest.mark.parametrize("seed", range(12))
def test_no_plan_of_the_fewest_rounds_is_faster(seed):
    rng = random.Random(seed)
    world_size, k = rng.randint(1, 5), rng.randint(1, 5)
    work = {LANGS[i]: rng.choice([1, 2, 3, 5, 8]) * rng.randint(1, 4) for i in range(k)}
    plan = plan_roles(world_size, work)
    check_groups_cover_every_rank(plan, world_size)
    assert plan.estimate.phase1 == pytest.approx(plan_phase1_time(plan))
    assert plan.estimate.phase1 == pytest.approx(brute_force_phase1(world_size, work)), (world_size, work)


def check_groups_cover_every_rank(plan, world_size):
    for round_ in plan.teacher_rounds:
        assert sorted(r for g in round_ for r in g.ranks) == list(range(world_size))


def test_fewer_ranks_than_teachers_put_the_large_teachers_in_one_round():
    plan = plan_roles(2, LBMRC_WORK)
    assert [[(g.teacher, g.ranks) for g in r] for r in plan.teacher_rounds] == [
        [("es", (0,)), ("de", (1,))],
        [("en", (0, 1))],
    ]
    assert plan.estimate.round_times == (2000, 500)
    # the equal-work rounds (en with es, then de on both ranks) would take 2000 + 1000
    assert plan_roles(2, list(LBMRC_WORK)).teacher_rounds[0][0].teacher == "en"
    assert plan.estimate.phase1 == 2500 < 2000 + 1000


def test_describe_shows_the_estimated_times():
    text = plan_roles(5, LBMRC_WORK, distill_work=9000).describe()
    assert "phase 1, teachers: 1 round(s), estimated time 1,000.0 (ranks busy 100% of it)" in text
    assert "teacher/es           ranks 1-2      work 2,000  time 1,000.0" in text
    # 5 ranks: a student of 2 and one producer per teacher (3 x 1 >= 2): 9000 / 2
    assert "student speed 2.00 features per unit, estimated time 4,500.0" in text
    shared = plan_roles(2, LBMRC_WORK, distill_work=9000)
    # rank 0 trains half of each feature and makes en's and de's logits (1/3 each)
    assert shared.estimate.student_speed == pytest.approx(1 / (1 / 2 + 2 / 3))
    assert f"estimated time {9000 * (1 / 2 + 2 / 3):,.1f}" in shared.describe()


@pytest.mark.parametrize("ratio", [1.0, 1.5, 3.0, 10.0])
@pytest.mark.parametrize("world_size", [4, 8, 16, 64])
def test_dedicated_producers_keep_ahead_of_the_student(world_size, ratio):
    plan = plan_roles(world_size, LBMRC_WORK, producer_speed_ratio=ratio)
    assert not plan.producers_share_student_ranks
    assert all(ratio * len(p.ranks) >= plan.student.size for p in plan.producers)
    # and it is the largest such student: one rank more and some teacher's producers fall behind
    fed = [s for s in range(1, world_size - 2)
           if ratio * min(len(b) for b in np.array_split(range(world_size - s), 3)) >= s]
    assert plan.student.size == plan.estimate.student_speed == max(fed)


def test_producer_mode_is_a_choice():
    assert not plan_roles(4, LBMRC_WORK).producers_share_student_ranks  # auto: room for dedicated ones
    shared = plan_roles(4, LBMRC_WORK, producers="shared")
    assert shared.producers_share_student_ranks and shared.student.ranks == (0, 1, 2, 3)
    assert plan_roles(3, LBMRC_WORK).producers_share_student_ranks  # auto: no room


@pytest.mark.parametrize("override,message", [
    ("plan.producers=sometimes", "plan.producers must be auto, dedicated or shared"),
    ("plan.producer_speed_ratio=0", "plan.producer_speed_ratio must be positive"),
    ("plan.student_min_ranks=0", "plan.student_min_ranks must be at least 1"),
    ("plan.producer_ratio=2", "unknown config key 'plan.producer_ratio'"),
])
def test_invalid_plan_keys_are_refused_at_start_up(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_plan_key_defaults_are_the_plans():
    plan = load_config(None, []).plan
    assert (plan.student_min_ranks, plan.producers) == (1, "auto")
    assert plan.producer_speed_ratio == DEFAULT_PRODUCER_SPEED_RATIO


def fastest_dividing_round(world_size, work, global_batch):
    """Brute force, independent of the planner: the smallest round time max(work / size)
    over every way to give all the ranks to the groups in sizes that divide the global
    batch; None when there is none."""
    divisors = [d for d in range(1, world_size + 1) if global_batch % d == 0]
    times = [max(w / s for w, s in zip(work, sizes)) for sizes in itertools.product(divisors, repeat=len(work))
             if sum(sizes) == world_size]
    return min(times, default=None)


@pytest.mark.parametrize("global_batch", [4, 6, 9, 12, 30, 32])
@pytest.mark.parametrize("world_size", range(3, 13))
def test_teacher_groups_divide_the_global_batch_where_the_ranks_allow(world_size, global_batch):
    work = {"en": 1.0, "es": 2.0, "de": 2.0}  # the source teacher has half the others' work
    plan = plan_roles(world_size, work, teacher_global_batch=global_batch)
    assert len(plan.teacher_rounds) == 1
    assert sorted(r for g in plan.teacher_rounds[0] for r in g.ranks) == list(range(world_size)), "every rank busy"
    free = plan_roles(world_size, work)
    sizes = [g.size for g in plan.teacher_rounds[0]]
    best = fastest_dividing_round(world_size, list(work.values()), global_batch)
    if all(global_batch % g.size == 0 for g in free.teacher_rounds[0]):
        assert plan == free, "sizes that already divide the global batch are kept"
    elif best is None:
        assert plan == free, "no dividing sizes: the proportional plan (refused at start-up, naming the group)"
    else:
        assert all(global_batch % n == 0 for n in sizes), sizes
        assert plan.estimate.round_times[0] == pytest.approx(best), "the fastest of the dividing plans"
        assert max(w / n for w, n in zip(work.values(), sizes)) == pytest.approx(best)


def test_a_plan_the_global_batch_splits_over_is_chosen_instead_of_being_refused():
    from dist_xqa import train

    cfg = load_config(None, ["teacher.global_batch_size=12", "student.global_batch_size=4"])
    work = {"en": 1.0, "es": 2.0, "de": 2.0}
    free = plan_roles(12, work)
    assert [g.size for g in free.teacher_rounds[0]] == [3, 5, 4] and free.student.size == 6
    assert "does not split over the 5 ranks of group teacher/es" in train._batch_error(cfg, free, student=True)
    plan = plan_roles(12, work, teacher_global_batch=12, student_global_batch=4)
    assert [g.size for g in plan.teacher_rounds[0]] == [2, 4, 6]
    assert plan.estimate.round_times == free.estimate.round_times == (0.5,), "as fast: the slowest group 2 / 4"
    assert plan.student.size == 4, "the largest dedicated student of a size dividing 4"
    assert train._batch_error(cfg, plan, student=True) is None
