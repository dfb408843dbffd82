"""The student's side of the logit store: wait for, verify and stack the K teachers'
logits of each shard; report progress; delete shards that will not be read again soon.

Clean-up rule. Producers fill the window [next, next + lookahead) of the run-wide order
and skip shards whose file exists, so a file the window still needs must survive; so must
every shard from the last checkpoint on (`committed`), which a resumed student reads
again. A shard is needed when its next read at or after min(committed, next) comes before
next + lookahead. Each epoch reads every shard once in a new order, so in window mode an
unneeded shard is deleted and recomputed in its next epoch (bounded disk, one teacher
forward per epoch); in cache mode it is kept for the next epoch, and only over
`disk_budget_bytes` are unneeded shards evicted, the one read furthest ahead first.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from dist_xqa.logits.manifest import MANIFEST_NAME, Manifest, read_manifest
from dist_xqa.logits.order import ShardPlan
from dist_xqa.logits.progress import StoreTimeout, StudentProgress, describe_heartbeat, read_progress, write_progress
from dist_xqa.logits.shards import ShardError, list_shards, read_shard, shard_path

MODES = ("window", "cache")
_FIRST_BACKOFF_S = 0.005
_MAX_BACKOFF_S = 0.25


class ShardLogits(NamedTuple):
    feature_ids: torch.Tensor  # int64 [S], the plan's features of the shard, in row order
    start: torch.Tensor  # [K, S, L], teachers in the reader's order
    end: torch.Tensor  # [K, S, L]


@dataclass(frozen=True)
class StreamStats:
    bytes_on_disk: int  # shard files of the reader's teachers
    lookahead_shards: int  # shards after the current one ready for every teacher (capped at lookahead)
    wait_seconds: float  # total time get() waited for files


class StoreReader:
    """Reads shards for `teachers` from the store at `store_dir` in `plan`'s order.

    `lookahead` must be the producers' look-ahead (it bounds what clean-up may delete).
    Exactly one reader per student, the `writer` (data-parallel rank 0), writes progress
    and deletes shards; the others only read."""

    def __init__(
        self,
        store_dir: str | Path,
        teachers: Sequence[str],
        plan: ShardPlan,
        manifest: Manifest,
        timeout_s: float,
        mode: str,
        disk_budget_bytes: int | None = None,
        *,
        lookahead: int,
        writer: bool = True,
    ):
        if mode not in MODES:
            raise ValueError(f"logit store mode must be one of {MODES}, got {mode!r}")
        if mode == "window" and disk_budget_bytes is not None:
            raise ValueError("disk_budget_bytes applies to cache mode only (window mode keeps only the window)")
        unknown = [t for t in teachers if t not in manifest.teachers]
        if not teachers or unknown:
            raise ValueError(f"teachers {list(teachers)} must be a non-empty subset of the manifest's {sorted(manifest.teachers)}")
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        manifest.check_plan(plan)
        self.store = Path(store_dir)
        self.teachers = list(teachers)
        self.plan = plan
        self.manifest = manifest
        self.timeout_s = timeout_s
        self.mode = mode
        self.disk_budget_bytes = disk_budget_bytes
        self.lookahead = lookahead
        self.writer = writer
        self._progress = read_progress(self.store, plan) if writer else StudentProgress(0, 0)
        self._current: int | None = None
        self._wait_seconds = 0.0

    def get(self, epoch: int, position: int, while_waiting: Callable[[], bool] | None = None) -> ShardLogits:
        """The K teachers' logits of the shard at `position` of `epoch`'s order, waiting
        (exponential backoff) until every teacher's file is there; StoreTimeout after
        `timeout_s`. `while_waiting` is called instead of sleeping when given, and a True
        result (it did work, e.g. a time-shared producer step) re-checks at once."""
        if not 0 <= position < len(self.plan):
            raise ValueError(f"position {position} is outside the plan's {len(self.plan)} shards per epoch")
        index = self.plan.global_index(epoch, position)
        shard = self.plan.shard_at(index)
        self._current = index
        if self.writer:
            self._progress = StudentProgress(self._progress.committed, index)
        reported = not self.writer
        began = time.monotonic()
        deadline, backoff = began + self.timeout_s, _FIRST_BACKOFF_S
        waiting_since = None  # wait time counts from the first check that found a file missing
        try:
            while True:
                missing = self._missing(shard)
                # The progress file goes into the store once a producer has created it
                # (with its manifest): a store directory is never started by the student.
                if not reported and missing != [MANIFEST_NAME]:
                    write_progress(self.store, self.plan, self._progress)
                    reported = True
                if not missing:
                    break
                now = time.monotonic()
                waiting_since = waiting_since or now
                if now >= deadline:
                    raise StoreTimeout(self._timeout_message(epoch, position, shard, missing))
                if while_waiting is not None and while_waiting():
                    continue
                time.sleep(min(backoff, deadline - now))
                backoff = min(2 * backoff, _MAX_BACKOFF_S)
        finally:
            if waiting_since is not None:
                self._wait_seconds += time.monotonic() - waiting_since
        expected = self.plan.features(shard)
        shards = [read_shard(shard_path(self.store, t, shard), expected, self.manifest.torch_dtype) for t in self.teachers]
        lengths = {t: data.start.shape[1] for t, data in zip(self.teachers, shards)}
        if len(set(lengths.values())) > 1:
            raise ShardError(f"logit store {self.store}: shard {shard} has different sequence lengths by teacher: {lengths}")
        return ShardLogits(
            shards[0].feature_ids,
            torch.stack([data.start for data in shards]),
            torch.stack([data.end for data in shards]),
        )

    def _missing(self, shard: int) -> list[str]:
        """What get() still waits for: the manifest, or teachers whose file is absent.
        A manifest that is present but differs raises StoreMismatchError at once."""
        found = read_manifest(self.store)
        if found is None:
            return [MANIFEST_NAME]
        self.manifest.check_matches(found, f"logit store {self.store}")
        return [t for t in self.teachers if not shard_path(self.store, t, shard).exists()]

    def _timeout_message(self, epoch: int, position: int, shard: int, missing: list[str]) -> str:
        if missing == [MANIFEST_NAME]:
            what = f"its {MANIFEST_NAME} (no producer has created the store)"
        else:
            what = f"teacher(s) {', '.join(missing)}"
        beats = "; ".join(describe_heartbeat(self.store, t) for t in self.teachers)
        return (
            f"logit store {self.store}: timed out after {self.timeout_s:.1f} s waiting for shard {shard} "
            f"(epoch {epoch}, position {position}) from {what}; producer heartbeats: {beats}"
        )

    def commit_progress(self, epoch: int, position: int) -> None:
        """Records that the student's latest checkpoint resumes at (epoch, position)
        (position == len(plan): the epoch is done), then deletes shards no longer needed."""
        if not self.writer:
            raise RuntimeError("only the writer reader (student rank 0) commits progress")
        committed = self.plan.global_index(epoch, position)
        self._progress = StudentProgress(committed, max(self._progress.next, committed))
        write_progress(self.store, self.plan, self._progress)
        self._clean_up()

    def _clean_up(self) -> None:
        on_disk: dict[int, list[Path]] = {}
        for teacher in self.teachers:
            for shard, path in list_shards(self.store / teacher).items():
                on_disk.setdefault(shard, []).append(path)
        low = min(self._progress.committed, self._progress.next)
        high = self._progress.next + self.lookahead
        next_reads = {shard: self.plan.next_use(shard, low) for shard in on_disk}
        unneeded = {shard: read for shard, read in next_reads.items() if read >= high}
        if self.mode == "window":
            evict = list(unneeded)
        else:
            evict = []
            if self.disk_budget_bytes is not None:
                excess = _size(p for paths in on_disk.values() for p in paths) - self.disk_budget_bytes
                for shard in sorted(unneeded, key=unneeded.get, reverse=True):
                    if excess <= 0:
                        break
                    evict.append(shard)
                    excess -= _size(on_disk[shard])
        for shard in evict:
            for path in on_disk[shard]:
                path.unlink(missing_ok=True)

    def stats(self) -> StreamStats:
        """Bytes on disk, ready look-ahead and total wait, for monitoring."""
        sizes = _size(p for t in self.teachers for p in list_shards(self.store / t).values())
        ahead = 0
        if self._current is not None:
            for index in range(self._current + 1, self._current + 1 + self.lookahead):
                shard = self.plan.shard_at(index)
                if not all(shard_path(self.store, t, shard).exists() for t in self.teachers):
                    break
                ahead += 1
        return StreamStats(sizes, ahead, self._wait_seconds)


def _size(paths: Iterable[Path]) -> int:
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # deleted since it was listed
            pass
    return total
