"""The role plan: which ranks of the one torch.distributed world do what, per phase.

A pure function of (world size, each teacher's work, the `plan` keys): no
torch.distributed, no files, so every rank computes the same plan and tests can check
it for any world size. Times are estimated in one unit: the time one rank takes to train
one feature (a forward and a backward pass); a group of n ranks trains n features in it
(data parallelism assumed linear inside a group).

Phase 1 (teachers). Each teacher trains in its own group on disjoint, contiguous ranks
(a group of neighbouring ranks stays on one node where the sizes allow), all groups of a
round concurrently, every rank busy in every round. A teacher's work is the features it
trains (its branch set times the epochs): with `strategy.add_english` every other branch
adds the source-language branch to its own, so the source teacher has half the others'
work and equal groups would leave its ranks idle half the phase. The plan uses the
fewest rounds, ``ceil(K / N)`` (one when there are at least as many ranks as teachers):
more rounds of larger groups would only look faster under the linear model, which
ignores the gradient synchronisation every group pays per step and concurrent groups
overlap. Within that:
- a round's ranks go to its teachers in proportion to their work: one each, then every
  further rank to the group that would finish last (this minimises the round's time,
  the largest work / ranks of its groups);
- with several rounds, which teachers share a round is searched exactly (branch and
  bound, milliseconds for 11 teachers): the assignment with the smallest estimated
  phase time (the sum of the rounds' times: a round starts when the previous one has
  finished) wins; ties put the first teachers in the first round, so equal work gives
  the even split.
- with `teacher.global_batch_size`, a round whose proportional sizes do not all divide it
  takes the fastest sizes that do, where the ranks allow any (a group the global batch
  does not split over is refused at start-up); likewise a dedicated student's size
  divides `student.global_batch_size` where one can.

`teacher_schedule` sequential (the paper's pipeline, a baseline of benchmarks/pipeline.py)
replaces all of the above: every teacher is a round of its own on every rank, in plan
order, and phase 2 is shared with every teacher's producer on every rank (each rank
writes a part of each teacher's shards), so every phase uses every rank for one model at
a time.

Phase 2 (distillation). Producers run teacher inference over the distillation set and
write the logit store; the student group trains from it. Producers never talk to each
other (they only write files), so they need no process group. `producers` chooses:

- dedicated (``auto`` picks it when ``N >= K + student_min_ranks``): the student gets a
  contiguous block starting at rank 0 (so the rank that logs and shows progress is a
  student rank) and the remaining ranks are split evenly among the teachers (every
  teacher's logits cover the same set), each at least one. A producer rank makes
  logits ``producer_speed_ratio`` times as fast as a student rank trains (a forward
  against a forward + backward: 3 by default; measured, it is a producer's features/s
  over a student rank's), so with S student ranks and P_k producers of teacher k the
  student runs at ``min(S, ratio * min_k P_k)`` rank-units: the producers keep ahead of
  the student exactly when ``ratio * P_k >= S``. The plan takes the largest student
  they keep ahead of (the fastest student that never waits on the store; a larger one
  would wait, a smaller one would idle producer capacity), or, where even
  `student_min_ranks` outruns them, that smallest student. A ratio set below the
  measured one buys producer slack on purpose.
  Why dedicated ranks when there is room: the student's step then costs what plain
  fine-tuning costs (no teacher forward inside it, no teacher weights in its memory),
  which is what streaming the logits is for.
- shared (``auto`` picks it when there are fewer ranks): the student group spans every
  rank and the producer work is interleaved with student steps on the same ranks. With
  N >= K teacher k is produced by ranks ``{r : r % K == k}``; with N < K rank r produces
  teachers ``{k : k % N == r}``. Each rank then holds as few teacher models as possible
  and the teachers' load differs by at most one rank or one teacher per rank.

The phase-2 estimate is per epoch of the distillation set: dedicated, its features over
the student's speed; shared, the busiest rank's share of the student's steps plus its
producer work. `RolePlan.describe()` shows both phases' estimates.

Where a teacher has several producer ranks, they split its shards among themselves;
how is the producer's business, the plan only names the ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Sequence

PRODUCER_MODES = ("auto", "dedicated", "shared")  # the `plan.producers` key
TEACHER_SCHEDULES = ("balanced", "sequential")  # the `plan.teacher_schedule` key
DEFAULT_PRODUCER_SPEED_RATIO = 3.0  # a forward pass against a forward + backward


class Role(str, Enum):
    TEACHER = "teacher"
    STUDENT = "student"


@dataclass(frozen=True)
class RoleGroup:
    """A training group: one DeepSpeed engine over `ranks`, ZeRO partitioned inside it."""

    name: str  # unique in the plan: "teacher/<lang>" or "student"
    role: Role
    ranks: tuple[int, ...]
    teacher: str | None = None  # the teacher trained, for teacher groups

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class ProducerAssignment:
    """The ranks that run `teacher` over the distillation set and write its logit shards."""

    teacher: str
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class PlanEstimate:
    """The plan's estimated phase times, in the time one rank takes to train one feature."""

    teacher_work: Mapping[str, float]  # features (x epochs) each teacher trains
    round_times: tuple[float, ...]  # phase 1: each round's slowest group, work / ranks
    student_speed: float  # phase 2: features the student trains per unit of time
    distill_work: float | None  # phase 2: features (x epochs) the student trains, if known

    @property
    def phase1(self) -> float:
        return sum(self.round_times)

    @property
    def phase2(self) -> float | None:
        return None if self.distill_work is None else self.distill_work / self.student_speed


@dataclass(frozen=True)
class RolePlan:
    world_size: int
    teachers: tuple[str, ...]
    teacher_rounds: tuple[tuple[RoleGroup, ...], ...]  # phase 1, rounds run one after another
    student: RoleGroup  # phase 2
    producers: tuple[ProducerAssignment, ...]  # phase 2, one per teacher, in teacher order
    producers_share_student_ranks: bool  # phase 2 producer work interleaved with student steps
    estimate: PlanEstimate

    def all_groups(self) -> tuple[RoleGroup, ...]:
        """Every training group in the canonical order (rounds in order, teachers in plan
        order within a round, then the student): every rank creates the process groups in
        exactly this order, as torch.distributed requires."""
        return tuple(group for round_ in self.teacher_rounds for group in round_) + (self.student,)

    def groups_for(self, rank: int) -> tuple[RoleGroup, ...]:
        """The training groups `rank` belongs to, in the order it runs them."""
        self._check_rank(rank)
        return tuple(group for group in self.all_groups() if rank in group.ranks)

    def teacher_groups_for(self, rank: int) -> tuple[RoleGroup, ...]:
        """The phase-1 groups of `rank`, one per round it takes part in, in round order."""
        return tuple(group for group in self.groups_for(rank) if group.role is Role.TEACHER)

    def producer_teachers_for(self, rank: int) -> tuple[str, ...]:
        """The teachers whose logits `rank` produces in phase 2."""
        self._check_rank(rank)
        return tuple(p.teacher for p in self.producers if rank in p.ranks)

    def describe(self) -> str:
        """A table for the run log: the groups of each phase with their work and estimated
        time, then what each rank does."""
        est = self.estimate
        mode = ("producers share the student's ranks" if self.producers_share_student_ranks
                else "producers on dedicated ranks")
        lines = [f"role plan: {self.world_size} rank(s), {len(self.teachers)} teacher(s) "
                 f"({', '.join(self.teachers)}); times in units of one rank training one feature"]
        if self.teachers:
            busy = sum(est.teacher_work.values()) / (self.world_size * est.phase1)
            lines.append(f"phase 1, teachers: {len(self.teacher_rounds)} round(s), estimated time "
                         f"{est.phase1:,.1f} (ranks busy {busy:.0%} of it)")
        else:
            lines.append("phase 1, teachers: none")
        for number, (round_, time) in enumerate(zip(self.teacher_rounds, est.round_times), start=1):
            for group in round_:
                work = est.teacher_work[group.teacher]
                lines.append(f"  round {number}  {group.name:<20} ranks {_ranks_str(group.ranks):<8} "
                             f"work {work:,.0f}  time {work / group.size:,.1f}")
            lines.append(f"  round {number}  time {time:,.1f} (its slowest group)")
        phase2 = "" if est.phase2 is None else f", estimated time {est.phase2:,.1f}"
        lines.append(f"phase 2, distillation: {mode}; student speed {est.student_speed:.2f} "
                     f"features per unit{phase2}")
        lines.append(f"  {self.student.name:<28} ranks {_ranks_str(self.student.ranks)}")
        for producer in self.producers:
            lines.append(f"  {'producer/' + producer.teacher:<28} ranks {_ranks_str(producer.ranks)}")
        lines.append("per rank (neighbouring ranks with the same work on one line):")
        rows: list[tuple[list[int], str]] = []
        for rank in range(self.world_size):
            phase1 = " then ".join(g.name for g in self.teacher_groups_for(rank))
            phase2 = ([self.student.name] if rank in self.student.ranks else []) + \
                [f"producer/{t}" for t in self.producer_teachers_for(rank)]
            work = f"{phase1} | {' + '.join(phase2)}"
            if rows and rows[-1][1] == work:
                rows[-1][0].append(rank)
            else:
                rows.append(([rank], work))
        labels = [_ranks_str(tuple(ranks)) for ranks, _ in rows]
        width = max(len("ranks"), *map(len, labels))
        lines.append(f"  {'ranks':>{width}} | phase 1 | phase 2")
        lines.extend(f"  {label:>{width}} | {work}" for label, (_, work) in zip(labels, rows))
        return "\n".join(lines)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} rank(s)")


def plan_roles(world_size: int, teachers: Sequence[str] | Mapping[str, float], student_min_ranks: int = 1,
               producer_speed_ratio: float = DEFAULT_PRODUCER_SPEED_RATIO, producers: str = "auto",
               distill_work: float | None = None, teacher_schedule: str = "balanced",
               teacher_global_batch: int | None = None, student_global_batch: int | None = None) -> RolePlan:
    """Build the role plan on `world_size` ranks (policy: see the module docstring).

    `teachers`: the teacher names in order (equal work) or a mapping name -> work (the
    features it trains, times its epochs). `student_min_ranks`, `producer_speed_ratio`,
    `producers` and `teacher_schedule` are the `plan` config keys; `distill_work` (the student's features
    times its epochs) only feeds the phase-2 time estimate. `teacher_global_batch`,
    `student_global_batch` (teacher.global_batch_size, student.global_batch_size): group
    sizes that divide them are preferred where the ranks allow any (train.py refuses a
    plan with a group that does not divide its role's global batch)."""
    work = dict(teachers) if isinstance(teachers, Mapping) else {name: 1.0 for name in _names(teachers)}
    _validate(world_size, work, student_min_ranks, producer_speed_ratio, producers, distill_work, teacher_schedule)
    names = tuple(work)
    if not names:  # a strategy without phase-1 models (X-STA): the student on every rank
        student = RoleGroup(name="student", role=Role.STUDENT, ranks=tuple(range(world_size)))
        estimate = PlanEstimate({}, (), float(world_size), distill_work)
        return RolePlan(world_size=world_size, teachers=(), teacher_rounds=(), student=student,
                        producers=(), producers_share_student_ranks=True, estimate=estimate)
    sequential = teacher_schedule == "sequential"
    if sequential:  # one teacher at a time on every rank, in plan order
        every = tuple(range(world_size))
        rounds = tuple((RoleGroup(name=f"teacher/{t}", role=Role.TEACHER, ranks=every, teacher=t),) for t in names)
        round_times = tuple(work[t] / world_size for t in names)
    else:
        rounds, round_times = _teacher_rounds(world_size, work, teacher_global_batch)
    dedicated = not sequential and (producers == "dedicated" or
                                    (producers == "auto" and world_size >= len(names) + student_min_ranks))
    if dedicated:
        student_size, producer_sizes = _dedicated_split(world_size, len(names), student_min_ranks,
                                                        producer_speed_ratio, student_global_batch)
        producer_blocks = _blocks(range(student_size, world_size), producer_sizes)
        assignments = tuple(ProducerAssignment(t, block) for t, block in zip(names, producer_blocks))
        speed = _dedicated_speed(student_size, producer_sizes, producer_speed_ratio)
    else:
        student_size = world_size
        assignments = (tuple(ProducerAssignment(t, tuple(range(world_size))) for t in names) if sequential
                       else _shared_producers(world_size, names))
        speed = _shared_speed(world_size, assignments, producer_speed_ratio)
    student = RoleGroup(name="student", role=Role.STUDENT, ranks=tuple(range(student_size)))
    return RolePlan(world_size=world_size, teachers=names, teacher_rounds=rounds, student=student,
                    producers=assignments, producers_share_student_ranks=not dedicated,
                    estimate=PlanEstimate(work, round_times, speed, distill_work))


def _names(teachers: Sequence[str]) -> Sequence[str]:
    if isinstance(teachers, str):
        raise ValueError(f"teachers must be a list of names, got the string {teachers!r}")
    duplicates = sorted({name for name in teachers if list(teachers).count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate teacher name(s) {duplicates}: each teacher is trained once")
    return teachers


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _validate(world_size: int, work: Mapping[str, float], student_min_ranks: int,
              producer_speed_ratio: float, producers: str, distill_work: float | None,
              teacher_schedule: str) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    for name, amount in work.items():
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise ValueError(f"teacher name {name!r} must be a non-empty string without '/'")
        if not _positive_number(amount):
            raise ValueError(f"teacher {name!r}: work must be a positive number of features, got {amount!r}")
    if distill_work is not None and not _positive_number(distill_work):
        raise ValueError(f"distill_work must be a positive number of features, got {distill_work!r}")
    if isinstance(student_min_ranks, bool) or not isinstance(student_min_ranks, int) or student_min_ranks < 1:
        raise ValueError(f"plan.student_min_ranks must be an integer >= 1, got {student_min_ranks!r}")
    if not _positive_number(producer_speed_ratio):
        raise ValueError(f"plan.producer_speed_ratio must be a positive number, got {producer_speed_ratio!r}")
    if producers not in PRODUCER_MODES:
        raise ValueError(f"plan.producers must be one of {', '.join(PRODUCER_MODES)}, got {producers!r}")
    if teacher_schedule not in TEACHER_SCHEDULES:
        raise ValueError(f"plan.teacher_schedule must be one of {', '.join(TEACHER_SCHEDULES)}, "
                         f"got {teacher_schedule!r}")
    if teacher_schedule == "sequential" and producers == "dedicated":
        raise ValueError("plan.teacher_schedule sequential produces every teacher's logits on every rank: "
                         "it needs plan.producers auto or shared, not dedicated")
    if producers == "dedicated" and work and world_size < len(work) + student_min_ranks:
        raise ValueError(
            f"plan.producers is dedicated, but {world_size} rank(s) cannot hold a student of "
            f"plan.student_min_ranks={student_min_ranks} beside one producer for each of {len(work)} "
            f"teacher(s): use plan.producers auto or shared, or {len(work) + student_min_ranks} ranks")


def _blocks(ranks: range, sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """Consecutive blocks of `ranks` with the given sizes."""
    blocks, start = [], 0
    for size in sizes:
        blocks.append(tuple(ranks[start:start + size]))
        start += size
    return blocks


def _even_sizes(total: int, parts: int) -> list[int]:
    """`total` split into `parts` sizes that differ by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def _proportional_sizes(world_size: int, work: Sequence[float]) -> list[int]:
    """`world_size` ranks split among groups with `work`: one each, then every further
    rank to the group that would finish last (the first of equals). Optimal for the
    round's time max(work / ranks): only a rank given to the last group can shorten it."""
    sizes = [1] * len(work)
    for _ in range(world_size - len(work)):
        slowest = max(range(len(work)), key=lambda i: (work[i] / sizes[i], -i))
        sizes[slowest] += 1
    return sizes


def _dividing_sizes(world_size: int, work: Sequence[float], global_batch: int) -> list[int] | None:
    """The group sizes of a round on all `world_size` ranks that all divide `global_batch`
    with the smallest round time max(work / ranks), or None when no such sizes exist. The
    candidate times are the work / size pairs, tried from the fastest: at a time, each
    group needs a dividing size at least as large as makes it that fast, and the sizes
    must add up to the ranks (subset sums, group by group)."""
    allowed = [d for d in range(1, world_size + 1) if global_batch % d == 0]
    for time in sorted({w / d for w in work for d in allowed}):
        options = [[d for d in allowed if w / d <= time * (1 + 1e-12)] for w in work]
        reach = [{0}]  # reach[i]: the rank counts the first i groups can add up to
        for choice in options:
            reach.append({s + d for s in reach[-1] for d in choice if s + d <= world_size})
        if world_size in reach[-1]:
            sizes, rest = [], world_size
            for i in reversed(range(len(work))):  # back from the total, the largest fitting size first
                size = max(d for d in options[i] if rest - d in reach[i])
                sizes.append(size)
                rest -= size
            return sizes[::-1]
    return None


def _round_time(world_size: int, work: Sequence[float], global_batch: int | None = None
                ) -> tuple[float, list[int]]:
    """A round's estimated time on `world_size` ranks and its group sizes: proportional to
    the work, or, where those sizes do not all divide `global_batch` (the teachers' global
    batch, which train.py would refuse to split), the fastest sizes that do, if any."""
    sizes = _proportional_sizes(world_size, work)
    if global_batch is not None and any(global_batch % n for n in sizes):
        sizes = _dividing_sizes(world_size, work, global_batch) or sizes
    return max(w / n for w, n in zip(work, sizes)), sizes


def _teacher_rounds(world_size: int, work: Mapping[str, float], global_batch: int | None = None
                    ) -> tuple[tuple[tuple[RoleGroup, ...], ...], tuple[float, ...]]:
    """Phase 1's rounds and their estimated times (see the module docstring): a branch and
    bound over every way to put the teachers into the fewest rounds of at most
    `world_size` teachers. Teachers are placed largest first (equal work in plan order),
    each in an open round before a new one, and a teacher of the same work as the one
    before never goes to an earlier round (the two are interchangeable), so among equal
    times the first teachers share the first round. A partial assignment is dropped once
    a lower bound of its time reaches the best found: a round takes at least its largest
    work over the ranks left to it when its other teachers have one each, and at least
    its work over all ranks; work not yet placed first fills the rounds' idle rank time."""
    n = world_size
    names = sorted(work, key=lambda name: -work[name])  # stable: equal work keeps plan order
    n_rounds = math.ceil(len(names) / n)
    rounds: list[list[str]] = []
    placed_in: list[int] = []  # the round of each placed teacher
    best: list = [math.inf, None]

    def bound(unplaced: float) -> float:
        total, idle = 0.0, 0.0
        for round_ in rounds:
            largest = max(work[t] for t in round_) / (n - len(round_) + 1)
            spread = sum(work[t] for t in round_) / n
            total += max(largest, spread)
            idle += max(0.0, largest - spread)
        return total + max(0.0, unplaced / n - idle)

    def place(i: int, unplaced: float) -> None:
        if bound(unplaced) >= best[0] * (1 - 1e-12):
            return
        if i == len(names):
            time = sum(_round_time(n, [work[t] for t in r], global_batch)[0] for r in rounds)
            if len(rounds) == n_rounds and time < best[0] * (1 - 1e-12):
                best[:] = [time, [list(r) for r in rounds]]
            return
        if len(names) - i > sum(n - len(r) for r in rounds) + n * (n_rounds - len(rounds)):
            return  # the rest cannot fit
        name = names[i]
        first = placed_in[-1] if i and work[names[i - 1]] == work[name] else 0
        for index in range(first, len(rounds) + 1):
            if index == n_rounds or (index < len(rounds) and len(rounds[index]) == n):
                continue
            if index == len(rounds):
                rounds.append([])
            rounds[index].append(name)
            placed_in.append(index)
            place(i + 1, unplaced - work[name])
            placed_in.pop()
            rounds[index].pop()
            if not rounds[index]:
                rounds.pop()

    place(0, sum(work.values()))
    groups, times = [], []
    for round_ in best[1]:
        round_.sort(key=list(work).index)  # plan order inside a round
        time, sizes = _round_time(n, [work[t] for t in round_], global_batch)
        times.append(time)
        groups.append(tuple(RoleGroup(name=f"teacher/{t}", role=Role.TEACHER, ranks=block, teacher=t)
                            for t, block in zip(round_, _blocks(range(n), sizes))))
    return tuple(groups), tuple(times)


def _dedicated_speed(student_size: int, producer_sizes: Sequence[int], ratio: float) -> float:
    """The student's speed: its ranks, unless the slowest teacher's producers are slower."""
    return min(student_size, ratio * min(producer_sizes))


def _dedicated_split(world_size: int, n_teachers: int, student_min_ranks: int,
                     ratio: float, global_batch: int | None = None) -> tuple[int, list[int]]:
    """(student ranks, producer ranks per teacher): the largest student whose producers
    keep ahead of it (ratio x producers >= student ranks for every teacher); where even
    the smallest allowed student outruns them, that smallest one (the fastest then).
    With the student's `global_batch`, only student sizes that divide it, where any do."""
    sizes = range(student_min_ranks, world_size - n_teachers + 1)
    sizes = [n for n in sizes if global_batch is None or global_batch % n == 0] or list(sizes)
    student_size = sizes[0]
    for size in sizes[1:]:
        if ratio * min(_even_sizes(world_size - size, n_teachers)) >= size:
            student_size = size
    return student_size, _even_sizes(world_size - student_size, n_teachers)


def _shared_producers(world_size: int, teachers: tuple[str, ...]) -> tuple[ProducerAssignment, ...]:
    k = len(teachers)
    if world_size >= k:
        return tuple(ProducerAssignment(t, tuple(r for r in range(world_size) if r % k == i))
                     for i, t in enumerate(teachers))
    return tuple(ProducerAssignment(t, (i % world_size,)) for i, t in enumerate(teachers))


def _shared_speed(world_size: int, assignments: Sequence[ProducerAssignment], ratio: float) -> float:
    """The student's speed when every rank also produces: per feature of the set, a rank
    trains 1 / N of it and makes its teachers' logits for 1 / (producers of each) of it;
    the busiest rank sets the pace."""
    load = [1 / world_size + sum(1 / (ratio * len(p.ranks)) for p in assignments if rank in p.ranks)
            for rank in range(world_size)]
    return 1 / max(load)


def _ranks_str(ranks: tuple[int, ...]) -> str:
    if len(ranks) > 1 and ranks == tuple(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))
