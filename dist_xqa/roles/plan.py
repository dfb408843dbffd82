"""The role plan: which ranks of the one torch.distributed world do what, per phase.

A pure function of (world size, teachers, student size floor, producer cost): no
torch.distributed, no files, so every rank computes the same plan and tests can check
it for any world size.

Phase 1 (teachers). Each teacher trains in its own group on disjoint, contiguous ranks
(a group of neighbouring ranks stays on one node where the sizes allow), all groups of a
round concurrently. With at least as many ranks as teachers there is one round and the
ranks are split as evenly as possible (sizes differ by at most one, the first teachers
get the extra ranks). With fewer ranks than teachers, teachers time-share the ranks:
``ceil(K / N)`` rounds, the teachers spread over the rounds as evenly as possible and
each round's ranks split evenly among its teachers, so no rank idles in any round. A
rank moves to its next round's group as soon as its current teacher is done; the
group's own collectives do the waiting, no world-wide barrier is needed.

Phase 2 (distillation). Producers run teacher inference over the distillation set and
write the logit store; the student group trains from it. Producers never talk to each
other (they only write files), so they need no process group.

- Dedicated producers, when ``N >= K + student_min_ranks``: the student gets a
  contiguous block starting at rank 0 (so the rank that logs and shows progress is a
  student rank) and the remaining ranks are split evenly among the teachers, each
  teacher at least one. The split maximises the student's steady-state throughput:
  a student rank trains ``r`` features/s and a producer rank makes ``r / producer_cost``
  features/s of one teacher's logits, so with S student ranks and P_k producers for
  teacher k the student runs at ``min(S, min_k P_k / producer_cost)`` rank-units. The
  default ``producer_cost`` 1/3 is one forward pass against a training step's
  forward + backward (same backbone for teachers and student). Among splits of equal
  throughput the one with fewer student ranks wins: the spare ranks become producer
  slack, so the store stays ahead of the student instead of the student waiting on it.
  One producer per teacher is enough only for small worlds: with K = 3 and cost 1/3 the
  producers need about half the ranks (P_k >= S / 3 for each of 3 teachers).
  Why dedicated ranks rather than always sharing: the student's step then costs what
  plain fine-tuning costs (no teacher forward inside it, no teacher weights in its
  memory), which is what streaming the logits is for. Sharing can use small worlds
  better (no rounding of ranks to roles); ``student_min_ranks=world_size`` forces it.
- Shared producers, when there are fewer ranks: the student group spans every rank and
  the producer work is interleaved with student steps on the same ranks. With N >= K
  ranks teacher k is produced by ranks ``{r : r % K == k}``; with N < K rank r produces
  teachers ``{k : k % N == r}``. Each rank then holds as few teacher models as possible
  and the teachers' load differs by at most one rank or one teacher per rank.

Where a teacher has several producer ranks, they split its shards among themselves;
how is the producer's business, the plan only names the ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Sequence


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
class RolePlan:
    world_size: int
    teachers: tuple[str, ...]
    teacher_rounds: tuple[tuple[RoleGroup, ...], ...]  # phase 1, rounds run one after another
    student: RoleGroup  # phase 2
    producers: tuple[ProducerAssignment, ...]  # phase 2, one per teacher, in teacher order
    producers_share_student_ranks: bool  # phase 2 producer work interleaved with student steps

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
        """A table for the run log: the groups of each phase, then what each rank does."""
        mode = ("producers share the student's ranks" if self.producers_share_student_ranks
                else "producers on dedicated ranks")
        lines = [f"role plan: {self.world_size} rank(s), {len(self.teachers)} teacher(s) "
                 f"({', '.join(self.teachers)})",
                 f"phase 1, teachers: {len(self.teacher_rounds)} round(s)"]
        for number, round_ in enumerate(self.teacher_rounds, start=1):
            for group in round_:
                lines.append(f"  round {number}  {group.name:<20} ranks {_ranks_str(group.ranks)}")
        lines.append(f"phase 2, distillation: {mode}")
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


def plan_roles(world_size: int, teachers: Sequence[str], student_min_ranks: int = 1,
               producer_cost: float = 1 / 3) -> RolePlan:
    """Build the role plan for `teachers` (in order) on `world_size` ranks (policy: see
    the module docstring). `student_min_ranks` is the smallest student group that may
    run beside dedicated producers; `producer_cost` is a teacher forward pass per
    feature relative to a student training step per feature."""
    _validate(world_size, teachers, student_min_ranks, producer_cost)
    names = tuple(teachers)
    if not names:  # a strategy without phase-1 models (X-STA): the student on every rank
        student = RoleGroup(name="student", role=Role.STUDENT, ranks=tuple(range(world_size)))
        return RolePlan(world_size=world_size, teachers=(), teacher_rounds=(), student=student,
                        producers=(), producers_share_student_ranks=True)
    rounds = _teacher_rounds(world_size, names)
    if world_size >= len(names) + student_min_ranks:
        student_size, producer_sizes = _dedicated_split(world_size, len(names), student_min_ranks, producer_cost)
        producer_blocks = _blocks(range(student_size, world_size), producer_sizes)
        producers = tuple(ProducerAssignment(t, block) for t, block in zip(names, producer_blocks))
        shared = False
    else:
        student_size = world_size
        producers = _shared_producers(world_size, names)
        shared = True
    student = RoleGroup(name="student", role=Role.STUDENT, ranks=tuple(range(student_size)))
    return RolePlan(world_size=world_size, teachers=names, teacher_rounds=rounds, student=student,
                    producers=producers, producers_share_student_ranks=shared)


def _validate(world_size: int, teachers: Sequence[str], student_min_ranks: int, producer_cost: float) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if isinstance(teachers, str):
        raise ValueError(f"teachers must be a list of names, got the string {teachers!r}")
    for name in teachers:
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise ValueError(f"teacher name {name!r} must be a non-empty string without '/'")
    duplicates = sorted({name for name in teachers if list(teachers).count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate teacher name(s) {duplicates}: each teacher is trained once")
    if isinstance(student_min_ranks, bool) or not isinstance(student_min_ranks, int) or student_min_ranks < 1:
        raise ValueError(f"student_min_ranks must be an integer >= 1, got {student_min_ranks!r}")
    if not producer_cost > 0:
        raise ValueError(f"producer_cost must be > 0, got {producer_cost!r}")


def _even_sizes(total: int, parts: int) -> list[int]:
    """`total` split into `parts` sizes that differ by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def _blocks(ranks: range, sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """Consecutive blocks of `ranks` with the given sizes."""
    blocks, start = [], 0
    for size in sizes:
        blocks.append(tuple(ranks[start:start + size]))
        start += size
    return blocks


def _teacher_rounds(world_size: int, teachers: tuple[str, ...]) -> tuple[tuple[RoleGroup, ...], ...]:
    rounds = []
    first = 0
    for count in _even_sizes(len(teachers), math.ceil(len(teachers) / world_size)):
        names = teachers[first:first + count]
        first += count
        blocks = _blocks(range(world_size), _even_sizes(world_size, count))
        rounds.append(tuple(RoleGroup(name=f"teacher/{name}", role=Role.TEACHER, ranks=block, teacher=name)
                            for name, block in zip(names, blocks)))
    return tuple(rounds)


def _dedicated_split(world_size: int, n_teachers: int, student_min_ranks: int,
                     producer_cost: float) -> tuple[int, list[int]]:
    """(student ranks, producer ranks per teacher) maximising the student's throughput;
    ties go to the smaller student (spare producers keep the store ahead)."""
    best: tuple[float, int] | None = None
    for student_size in range(student_min_ranks, world_size - n_teachers + 1):
        producer_sizes = _even_sizes(world_size - student_size, n_teachers)
        throughput = min(student_size, min(producer_sizes) / producer_cost)
        if best is None or throughput > best[0] + 1e-9:
            best = (throughput, student_size)
    assert best is not None  # the caller checked world_size >= n_teachers + student_min_ranks
    student_size = best[1]
    return student_size, _even_sizes(world_size - student_size, n_teachers)


def _shared_producers(world_size: int, teachers: tuple[str, ...]) -> tuple[ProducerAssignment, ...]:
    k = len(teachers)
    if world_size >= k:
        return tuple(ProducerAssignment(t, tuple(r for r in range(world_size) if r % k == i))
                     for i, t in enumerate(teachers))
    return tuple(ProducerAssignment(t, (i % world_size,)) for i, t in enumerate(teachers))


def _ranks_str(ranks: tuple[int, ...]) -> str:
    if len(ranks) > 1 and ranks == tuple(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))
