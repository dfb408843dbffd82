"""A producer: one teacher run over the distillation set in the student's order, a bounded
number of shards ahead of it.

The producer keeps no position of its own: at every step it reads the student's progress
and fills the first missing shard of the window [next, next + lookahead). So a restarted
producer resumes from what is on disk, a shard kept from an earlier epoch (cache mode) is
never recomputed, and a shard deleted while still needed is simply produced again.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from dist_xqa.logits.files import remove_temp_files
from dist_xqa.logits.manifest import Manifest, prepare_store
from dist_xqa.logits.order import ShardPlan
from dist_xqa.logits.progress import PROGRESS_NAME, StoreTimeout, StudentProgress, read_progress, write_heartbeat
from dist_xqa.logits.shards import ShardError, read_shard, shard_path, write_shard

# Waiting producers refresh their heartbeat this often (seconds); busy ones on every shard.
HEARTBEAT_INTERVAL_S = 1.0

ComputeLogits = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]


class Producer:
    """Writes `teacher`'s shards for `epochs` epochs of `plan`, at most `lookahead` shards
    ahead of the student. Several producers of one teacher split its shards: `part`
    (i, n) writes the shards at run-wide indices i, i + n, i + 2n, ... `compute(feature_ids)` returns that teacher's (start, end) logits,
    each [len(feature_ids), L]. Creating a Producer creates or verifies the store's manifest
    (StoreMismatchError on a stale store unless `reset`, which wipes it)."""

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
        timeout_s: float | None = None,
        reset: bool = False,
        part: tuple[int, int] = (0, 1),
    ):
        if lookahead < 1 or epochs < 1:
            raise ValueError(f"producer {teacher}: lookahead and epochs must be >= 1, got {lookahead} and {epochs}")
        if teacher not in manifest.teachers:
            raise ValueError(f"producer {teacher}: not a teacher of the store's manifest ({sorted(manifest.teachers)})")
        if not 0 <= part[0] < part[1]:
            raise ValueError(f"producer {teacher}: part {part[0]} of {part[1]} does not exist")
        manifest.check_plan(plan)
        self.store = Path(store_dir)
        self.teacher = teacher
        self.plan = plan
        self.manifest = manifest
        self.compute = compute
        self.lookahead = lookahead
        self.total = epochs * len(plan)
        self.poll = poll
        self.timeout_s = timeout_s
        self.shards_written = 0
        self.finished = False
        self.part, self.parts = part
        prepare_store(self.store, manifest, reset)
        (self.store / teacher).mkdir(exist_ok=True)
        if self.parts == 1:
            # Temporaries left by an earlier run of this producer killed mid-write. With
            # several parts another part may be writing one right now: they are left (a
            # temporary is never read, only its disk space is lost).
            remove_temp_files(self.store / teacher)
        self._verified: dict[int, tuple[int, int, int]] = {}  # shard -> file identity checked once
        self._progress = StudentProgress(0, 0)
        self._last_beat: tuple[str, int, float] = ("", -1, 0.0)

    def step(self) -> bool:
        """Produces the first missing shard of the student's window that is this part's
        (run-wide index modulo `parts`), if any; returns whether it wrote one. Sets
        `finished` once every shard of this part the student still needs is on disk."""
        self._progress = read_progress(self.store, self.plan)
        stop = min(self.total, self._progress.next + self.lookahead)
        for index in range(self._progress.next, stop):
            if index % self.parts != self.part:
                continue
            shard = self.plan.shard_at(index)
            if not self._has_valid(shard):
                # Between reading the progress and the scan, the student may have read past
                # `index` and deleted its file; the progress read again after the scan tells.
                if read_progress(self.store, self.plan).next > index:
                    return False
                self._produce(index, shard)
                return True
        self.finished = stop == self.total
        if self.finished:
            self._beat("finished", self.total - 1)
        else:
            self._beat("waiting", stop)
        return False

    def run(self) -> int:
        """Steps until finished, sleeping `poll` seconds while the window is full; returns
        the number of shards written. With `timeout_s`, raises StoreTimeout when the
        student makes no progress for that long while the window is full."""
        seen, since = None, time.monotonic()
        while True:
            if self.step():
                seen = None  # time spent computing is not time spent waiting
                continue
            if self.finished:
                return self.shards_written
            now = time.monotonic()
            if self._progress != seen:
                seen, since = self._progress, now
            elif self.timeout_s is not None and now - since > self.timeout_s:
                epoch, position = self.plan.locate(seen.next)
                raise StoreTimeout(
                    f"producer {self.teacher}: the student has stayed at epoch {epoch} position {position} for "
                    f"{now - since:.0f} s with the look-ahead window full (see {self.store / PROGRESS_NAME})"
                )
            time.sleep(self.poll)

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
            read_shard(path, self.plan.features(shard), self.manifest.torch_dtype)
        except ShardError:
            return False  # torn, corrupted or foreign: recompute and replace it
        self._verified[shard] = identity
        return True

    def _produce(self, index: int, shard: int) -> None:
        self._beat("computing", index, force=True)
        feature_ids = self.plan.features(shard)
        start, end = self.compute(feature_ids)
        path = shard_path(self.store, self.teacher, shard)
        write_shard(path, feature_ids, start, end, self.manifest.torch_dtype)
        st = path.stat()
        self._verified[shard] = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.shards_written += 1
        self._beat("committed", index, force=True)

    def _beat(self, state: str, index: int, force: bool = False) -> None:
        now = time.monotonic()
        last_state, last_index, last_time = self._last_beat
        if force or (state, index) != (last_state, last_index) or now - last_time >= HEARTBEAT_INTERVAL_S:
            epoch, position = self.plan.locate(index)
            write_heartbeat(self.store, self.teacher, epoch, position, state, self.shards_written,
                            part=(self.part, self.parts))
            self._last_beat = (state, index, now)
