"""A producer: one teacher run over the distillation set in the student's order, a bounded
number of shards ahead of it.

The producer keeps no position of its own: at every step it reads the student's progress
and fills the first missing shard from the student's committed position to the end of
the window [next, next + lookahead). So a restarted producer resumes from what is on disk,
a shard kept from an earlier epoch (cache mode) is never recomputed, and a shard deleted
while still needed (or by the reader, as corrupted) is simply produced again. The
progress file never tells a producer it is done (it may be an earlier run's, or a
rolled-back student's): a producer stops when the student's heartbeat says it finished,
and with an error when that heartbeat stalls or says it failed.

Any plan. The producer writes the shards of the store's layout (the manifest's plan,
that of the student that created the store), which may differ from its student's plan (a
student of a sweep with another batch, seed or world size): for each shard of the
student's window it writes the layout shards holding its rows that are missing, each
claimed first (claims.py) so that two producers, of this run or of another sharing the
store, never compute the same rows. Rows already on disk are never computed again; a
student of the layout's own plan finds one layout shard per shard of its own, as before.
Every computed row is counted (`rows_computed`, the teacher forwards, in the heartbeat).

Where the pacing files go. The student's progress and the producers' heartbeats belong
to one run: they live in `stream_dir` (default: the store itself), so that runs sharing
a store (distill.store_dir) do not pace each other.

With `distill.precompute` (the paper's pipeline) a producer first writes its whole part of
the set (precompute()), with no look-ahead bound; the student starts once every part of
every teacher is on disk (StoreReader.wait_for_every_shard) and, the store evicting none,
no later step of a producer finds anything missing.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from dist_xqa.files import remove_temp_files
from dist_xqa.logits.claims import Claims
from dist_xqa.logits.manifest import Manifest, prepare_store
from dist_xqa.logits.order import ShardPlan
from dist_xqa.logits.progress import StoreTimeout, StudentProgress, heartbeat_path, producer_role, read_progress
from dist_xqa.logits.shards import ShardError, compress_topk, read_shard, shard_path, write_shard
from dist_xqa.waiting import WAITING, Heartbeat, Preempted, StallWatch, read_beat, stop_requested

ComputeLogits = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]
AnswerMask = Callable[[list[int]], torch.Tensor]  # feature ids -> bool [S, L]: positions that may hold an answer


class Producer:
    """Writes `teacher`'s shards for `epochs` epochs of `plan`, at most `lookahead` shards
    ahead of the student. Several producers of one teacher split its shards: `part`
    (i, n) writes the shards at run-wide indices i, i + n, i + 2n, ... `compute(feature_ids)` returns that teacher's (start, end) logits,
    each [len(feature_ids), L]. Creating a Producer creates or verifies the store's manifest
    (StoreMismatchError on a stale store unless `reset`, which wipes it). `student_beats()`
    lists the student's heartbeat files: run() and wait_for_student() watch them with
    `stall_timeout_s`. A top-k store (manifest.topk) needs `answer_mask`: the top k and the
    left-out mass are taken over the positions that may hold an answer, as the losses' are.
    `placebo_seed` (distill.placebo_shuffle, a control): each shard's logit rows are moved
    to other rows of the shard (placebo_rows), so the student sees logits of the same
    scale that carry no information about its features (the manifest's `placebo` seed).
    `stream_dir`: where this run's progress and producer heartbeats are (default: the store)."""

    def __init__(
        self,
        store_dir: str | Path,
        teacher: str,
        plan: ShardPlan,
        compute: ComputeLogits,
        lookahead: int,
        epochs: int,
        *,
        manifest: Manifest,
        poll: float = 0.05,
        stall_timeout_s: float | None = None,
        student_beats: Callable[[], Iterable[Path]] | None = None,
        reset: bool = False,
        part: tuple[int, int] = (0, 1),
        answer_mask: AnswerMask | None = None,
        stream_dir: str | Path | None = None,
    ):
        if lookahead < 1 or epochs < 1:
            raise ValueError(f"producer {teacher}: lookahead and epochs must be >= 1, got {lookahead} and {epochs}")
        if teacher not in manifest.teachers:
            raise ValueError(f"producer {teacher}: not a teacher of the store's manifest ({sorted(manifest.teachers)})")
        if not 0 <= part[0] < part[1]:
            raise ValueError(f"producer {teacher}: part {part[0]} of {part[1]} does not exist")
        if manifest.topk is not None and answer_mask is None:
            raise ValueError(f"producer {teacher}: a top-{manifest.topk} store needs answer_mask (the positions mask)")
        manifest.check_plan(plan)
        self.store = Path(store_dir)
        self.stream = Path(stream_dir) if stream_dir is not None else self.store
        self.teacher = teacher
        self.plan = plan
        self.compute = compute
        self.answer_mask = answer_mask
        self.lookahead = lookahead
        self.total = epochs * len(plan)
        self.poll = poll
        self.shards_written = 0
        self.rows_computed = 0  # teacher forwards: the rows this producer computed
        self.finished = False
        self.part, self.parts = part
        # The store's own manifest: its layout may be another student's plan.
        self.manifest = prepare_store(self.store, manifest, reset)
        self.layout = self.manifest.layout(plan)
        self._block = {f: b for b in range(len(self.layout)) for f in self.layout.features(b)}
        (self.store / teacher).mkdir(exist_ok=True)
        path = heartbeat_path(self.stream, teacher, part)
        # Temporaries an earlier run of this producer left when it was killed mid-write.
        # With several parts, or a store other runs share, only this producer's: they carry
        # the pid its heartbeat recorded (the others may be writing theirs right now).
        if self.parts == 1 and self.stream == self.store:
            remove_temp_files(self.store / teacher)
        elif (earlier := read_beat(path)) is not None:
            remove_temp_files(self.store / teacher, pid=earlier.pid)
        self.heartbeat = Heartbeat(path, producer_role(teacher, part))
        self.claims = Claims(self.store / teacher, self.heartbeat,
                             stall_timeout_s if stall_timeout_s is not None else float("inf"))
        self._student = (StallWatch(student_beats, stall_timeout_s, f"{self.heartbeat.role} waiting for the student",
                                    expected=["student"], error=StoreTimeout)
                         if student_beats is not None and stall_timeout_s is not None else None)
        self._verified: dict[int, tuple[int, int, int]] = {}  # shard -> file identity checked once
        self._progress = StudentProgress(0, 0)

    def blocks(self, shard: int) -> list[int]:
        """The layout shards holding the rows of the student's `shard` (itself when the
        student's plan is the layout)."""
        return sorted({self._block[f] for f in self.plan.features(shard)})

    def step(self) -> bool:
        """Produces the first missing layout shard of this part's shards (run-wide index
        modulo `parts`) from the student's committed position to the end of its window
        that no other producer has claimed, if any; returns whether it wrote one.
        `finished` tells whether, by the progress file, every shard of this part the
        student still needs is on disk (a hint: see the module doc)."""
        self._progress = read_progress(self.stream, self.plan)
        first = min(self._progress.committed, self._progress.next)
        stop = min(self.total, self._progress.next + self.lookahead)
        claimed = False  # a shard of the window that another producer computes now
        for index in range(first, stop):
            if index % self.parts != self.part:
                continue
            for block in self.blocks(self.plan.shard_at(index)):
                if self._has_valid(block):
                    continue
                # Between reading the progress and the scan, the student may have committed
                # past `index` and deleted its file; the progress read again tells.
                again = read_progress(self.stream, self.plan)
                if index < min(again.committed, again.next):
                    return False
                if self._produce(index, block):
                    return True
                claimed = True
        self.finished = stop == self.total and not claimed
        epoch, position = self.plan.locate(min(stop, self.total - 1))
        self.heartbeat.beat(stop, WAITING, epoch=epoch, position=position, shards_written=self.shards_written,
                            rows_computed=self.rows_computed)
        return False

    def precompute(self) -> int:
        """distill.precompute (the paper's pipeline): writes every shard of this part of the
        set once, now, whatever the student's progress (no look-ahead bound); a shard
        already valid on disk (a resumed run) is kept. Read from a cache-mode store that
        evicts nothing, they serve every epoch: step() then finds nothing missing. Returns
        the shards written."""
        written = self.shards_written
        for index in range(self.part, len(self.plan), self.parts):  # the first epoch's order, as step()
            for block in self.blocks(self.plan.shard_at(index)):
                if not self._has_valid(block):  # claimed by another producer: it writes it
                    self._produce(index, block)
        self.heartbeat.beat(len(self.plan), WAITING, force=True, precomputed=True,
                            shards_written=self.shards_written, rows_computed=self.rows_computed)
        return self.shards_written - written

    def wait_for_student(self) -> bool:
        """Between steps that found nothing to do: True once the student's heartbeat says
        it finished; StoreTimeout once it stalled for `stall_timeout_s` or failed."""
        epoch, position = self.plan.locate(min(self._progress.next, self.total - 1))
        watch = self._student_watch()
        return watch.finished(watch.check(f" (student at epoch {epoch} position {position})"))

    def _student_watch(self) -> StallWatch:
        if self._student is None:
            raise ValueError(f"{self.heartbeat.role}: waiting for the student needs student_beats and stall_timeout_s")
        return self._student

    def run(self) -> int:
        """serve() for this producer alone; returns the number of shards written."""
        serve([self], self.poll)
        return self.shards_written

    def _has_valid(self, shard: int) -> bool:
        path = shard_path(self.store, self.teacher, shard)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._verified.get(shard) == identity:
            return True
        try:
            read_shard(path, self.layout.features(shard), self.manifest.torch_dtype, self.manifest.topk)
        except ShardError:
            return False  # torn, corrupted or foreign: recompute and replace it
        self._verified[shard] = identity
        return True

    def _produce(self, index: int, shard: int) -> bool:
        """Claims, computes and commits layout shard `shard` (needed at run-wide `index`);
        False when another producer's live claim holds it, or it arrived meanwhile."""
        if not self.claims.claim(shard):
            return False
        try:
            if self._has_valid(shard):  # committed by the claim's earlier holder
                return False
            epoch, position = self.plan.locate(index)
            self.heartbeat.beat(index, "computing", epoch=epoch, position=position, shards_written=self.shards_written,
                                rows_computed=self.rows_computed)
            feature_ids = self.layout.features(shard)
            start, end = self.compute(feature_ids)
            self.rows_computed += len(feature_ids)
            if self.manifest.placebo is not None:
                rows = placebo_rows(len(feature_ids), self.manifest.placebo, shard)
                start, end = start[rows], end[rows]
            if self.manifest.topk is not None:  # over the receiving row's mask, as the student reads it
                mask = self.answer_mask(feature_ids)
                start, end = (compress_topk(x, mask, self.manifest.topk) for x in (start, end))
            path = shard_path(self.store, self.teacher, shard)
            write_shard(path, feature_ids, start, end, self.manifest.torch_dtype)
            st = path.stat()
            self._verified[shard] = (st.st_ino, st.st_size, st.st_mtime_ns)
            self.shards_written += 1
        finally:
            self.claims.release(shard)
        self.heartbeat.beat(index, "committed", epoch=epoch, position=position, shards_written=self.shards_written,
                            rows_computed=self.rows_computed)
        return True


def placebo_rows(n: int, seed: int, shard: int) -> torch.Tensor:
    """Row i of a placebo shard gets the logits of row placebo_rows[i]: a random cycle
    through the n rows (seeded by the run's seed and the shard), so that no row keeps its
    own logits (a plain permutation leaves about one row in place); one row stays itself."""
    cycle = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + shard))
    rows = torch.empty(n, dtype=torch.long)
    rows[cycle] = cycle.roll(1)
    return rows


def serve(producers: Sequence[Producer], poll: float = 0.05) -> None:
    """Steps `producers` (of one student) round-robin until the student has finished,
    sleeping `poll` seconds while none has anything to write; StoreTimeout when the
    student's heartbeat stalls or says it failed (see Producer.wait_for_student). Asked
    to stop (heartbeat.install_stop_signal), producers keep the student supplied until
    it has checkpointed and stopped, then raise Preempted."""
    first = producers[0]
    while True:
        if any([p.step() for p in producers]):  # a list: every producer steps each round
            first._student_watch().reset()  # time spent computing is not time spent waiting
            continue
        if first.wait_for_student():
            if stop_requested():
                raise Preempted(f"{first.heartbeat.role}: stopped by a signal after the student")
            return
        time.sleep(poll)
