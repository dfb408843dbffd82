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

Any plan. The student reads its rows by feature id from the store's layout (the
manifest's shard plan, that of the student that created the store): a student of that
plan reads one layout shard per step, as ever; one of another plan (batch, seed, world
size) gathers each step's rows from the layout shards that hold them (kept in a small
cache of decoded shards, GATHER_CACHE_SHARDS). Such a student deletes nothing: the layout's
shards serve rows of many of its steps, and a shared store (distill.store_dir) other
students (config.py keeps a shared store in cache mode).

ReadAhead runs the reads (and whatever else prepares a step) on a side thread a bounded
number of steps ahead of the student, so that a step never waits on file reads; the
thread never beats a heartbeat (waiting.py: beats come from the work loop), the
student's main thread does while it waits for the thread, and the thread's errors (a
stalled producer's StoreTimeout included) are raised in the main thread.
"""
from __future__ import annotations

import logging
import queue
from collections import OrderedDict
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

import torch

from dist_xqa.logits.claims import claimer_heartbeats
from dist_xqa.logits.manifest import MANIFEST_NAME, Manifest, read_manifest
from dist_xqa.logits.order import ShardPlan
from dist_xqa.logits.progress import (StoreTimeout, StudentProgress, owner_heartbeats, producer_heartbeats,
                                      producer_role, write_progress)
from dist_xqa.logits.shards import (Logits, ShardData, ShardError, TopKLogits, gather_rows, list_shards, read_shard,
                                    shard_path, stack_logits)
from dist_xqa.waiting import WAITING, Heartbeat, StallWatch

log = logging.getLogger(__name__)
MODES = ("window", "cache")
# A shard that fails verification is deleted and produced again; this many times in a
# row means the producer itself writes bad shards, which no retry fixes.
MAX_BAD_SHARD_RETRIES = 3
GATHER_CACHE_SHARDS = 256  # decoded layout shards a reader of another plan keeps (LRU)
_FIRST_BACKOFF_S = 0.005
_MAX_BACKOFF_S = 0.25


class ShardLogits(NamedTuple):
    feature_ids: torch.Tensor  # int64 [S], the plan's features of the shard, in row order
    # [K, S, L], teachers in the reader's order; a top-k store's in top-k form (shards.py:
    # dense_logits reconstructs them on the student's device)
    start: Logits
    end: Logits


@dataclass(frozen=True)
class StreamStats:
    bytes_on_disk: int  # shard files of the reader's teachers
    lookahead_shards: int  # shards after the current one ready for every teacher (capped at lookahead)
    wait_seconds: float  # total time get() waited for files


class StoreReader:
    """Reads shards for `teachers` from the store at `store_dir` in `plan`'s order.

    `lookahead` must be the producers' look-ahead (it bounds what clean-up may delete).
    Exactly one reader per student, the `writer` (data-parallel rank 0), writes progress
    and deletes shards; the others only read. get() waits as long as the heartbeat of a
    producer it lacks moves, up to `stall_timeout_s` without movement; while it waits it
    beats `heartbeat` (the student's), so that producers know the student is alive.
    `stream_dir`: where this run's progress and its producers' heartbeats are (default:
    the store)."""

    def __init__(
        self,
        store_dir: str | Path,
        teachers: Sequence[str],
        plan: ShardPlan,
        manifest: Manifest,
        stall_timeout_s: float,
        mode: str,
        disk_budget_bytes: int | None = None,
        *,
        lookahead: int,
        writer: bool = True,
        heartbeat: Heartbeat | None = None,
        stream_dir: str | Path | None = None,
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
        self.stream = Path(stream_dir) if stream_dir is not None else self.store
        self.teachers = list(teachers)
        self.plan = plan
        self.manifest = manifest
        self.stall_timeout_s = stall_timeout_s
        self.heartbeat = heartbeat
        self.mode = mode
        self.disk_budget_bytes = disk_budget_bytes
        self.lookahead = lookahead
        self.writer = writer
        # The student resumes from its checkpoint at its first get(), whatever an earlier
        # run or a rolled-back student left in progress.json: get() sets `committed` then.
        self._progress: StudentProgress | None = None
        # get() may run on a ReadAhead thread while the main thread commits progress
        self._progress_lock = threading.Lock()
        self._current: int | None = None
        self._wait_seconds = 0.0
        self._layout: ShardPlan | None = None  # the store's, once its manifest is read
        self._block: dict[int, int] = {}  # feature id -> layout shard
        self._cache: OrderedDict[tuple[str, int], tuple[tuple, ShardData]] = OrderedDict()

    def get(self, epoch: int, position: int, while_waiting: Callable[[], bool] | None = None) -> ShardLogits:
        """The K teachers' logits of the shard at `position` of `epoch`'s order, waiting
        (exponential backoff) until every teacher's file is there, as long as the missing
        producers' heartbeats move (StoreTimeout once they stall or fail). A file that
        fails verification is deleted by the writer and waited for again: its producer
        writes it anew. `while_waiting` is called instead of sleeping when given, and a
        True result (it did work, e.g. a time-shared producer step) re-checks at once."""
        if not 0 <= position < len(self.plan):
            raise ValueError(f"position {position} is outside the plan's {len(self.plan)} shards per epoch")
        index = self.plan.global_index(epoch, position)
        shard = self.plan.shard_at(index)
        self._current = index
        if self.writer:
            with self._progress_lock:
                committed = index if self._progress is None else self._progress.committed
                self._progress = StudentProgress(committed, index)
        reported = not self.writer
        backoff, bad_reads = _FIRST_BACKOFF_S, 0
        watching, watch = None, None  # the teachers (or the manifest) watched, and the watch
        waiting_since = None  # wait time counts from the first check that found a file missing
        try:
            while True:
                missing = self._missing(shard)
                # The progress file goes into the store once a producer has created it
                # (with its manifest): a store directory is never started by the student.
                if not reported and missing != [MANIFEST_NAME]:
                    with self._progress_lock:
                        write_progress(self.stream, self.plan, self._progress)
                    reported = True
                if not missing:
                    shards, missing = self._read(shard)
                    if not missing:
                        break
                    bad_reads += self.writer  # others wait for the writer's deletion and the new file
                    if bad_reads > MAX_BAD_SHARD_RETRIES:
                        raise ShardError(f"logit store {self.store}: shard {shard} of teacher(s) {', '.join(missing)} "
                                         f"failed verification {bad_reads} times in a row")
                now = time.monotonic()
                waiting_since = waiting_since or now
                if missing != watching:  # a file arrived (progress) or the first wait: watch anew
                    watching, watch = missing, self._watch(f"shard {shard} (epoch {epoch}, position {position})",
                                                           missing, [index],
                                                           self.blocks(shard) if missing != [MANIFEST_NAME] else ())
                watch.check(self._what(missing))
                if self.heartbeat is not None:
                    self.heartbeat.beat(state=WAITING, epoch=epoch, position=position, shard=shard)
                if while_waiting is not None and while_waiting():
                    continue
                time.sleep(backoff)
                backoff = min(2 * backoff, _MAX_BACKOFF_S)
        finally:
            if waiting_since is not None:
                self._wait_seconds += time.monotonic() - waiting_since
        lengths = {t: data.start.shape[1] for t, data in zip(self.teachers, shards)}
        if len(set(lengths.values())) > 1:
            raise ShardError(f"logit store {self.store}: shard {shard} has different sequence lengths by teacher: {lengths}")
        return ShardLogits(
            shards[0].feature_ids,
            stack_logits([data.start for data in shards]),
            stack_logits([data.end for data in shards]),
        )

    def _missing(self, shard: int | None) -> list[str]:
        """What get() still waits for: the manifest, or teachers lacking a layout shard
        of the rows of `shard` (None: the manifest alone). A manifest that is present but
        differs in its key raises StoreMismatchError at once."""
        found = read_manifest(self.store)
        if found is None:
            return [MANIFEST_NAME]
        self.manifest.check_matches(found, f"logit store {self.store}")
        if self._layout is None:
            self._layout = found.layout(self.plan)
            self._block = {f: b for b in range(len(self._layout)) for f in self._layout.features(b)}
        if shard is None:
            return []
        blocks = self.blocks(shard)
        return [t for t in self.teachers if not all(shard_path(self.store, t, b).exists() for b in blocks)]

    def blocks(self, shard: int) -> list[int]:
        """The store's layout shards holding the rows of `shard` (itself when this
        student's plan is the layout); the manifest must have been read (_missing)."""
        return sorted({self._block[f] for f in self.plan.features(shard)})

    @property
    def gathers(self) -> bool:
        """Whether this student's plan differs from the store's layout (rows gathered)."""
        return self._layout is not None and self._layout is not self.plan

    def _read(self, shard: int) -> tuple[list[ShardData], list[str]]:
        """The rows of `shard`, by teacher, from verified layout files, and the teachers
        one of whose files failed verification (the writer deletes those: a producer sees
        them missing and writes them again; other readers wait for the new file)."""
        shards, bad = [], []
        for teacher in self.teachers:
            parts = []
            for block in self.blocks(shard):
                path = shard_path(self.store, teacher, block)
                try:
                    parts.append(self._read_block(teacher, block, path))
                except ShardError as e:
                    bad.append(teacher)
                    if self.writer:
                        log.warning("logit store %s: deleting %s to have it produced again: %s", self.store, path, e)
                        path.unlink(missing_ok=True)
                    break
            else:
                shards.append(gather_rows(parts, self.plan.features(shard)))
        return shards, bad

    def _read_block(self, teacher: str, block: int, path: Path) -> ShardData:
        """Layout shard `block` of `teacher`, verified; kept decoded (LRU) when this
        student gathers rows from it for several steps."""
        if not self.gathers:
            return read_shard(path, self._layout.features(block), self.manifest.torch_dtype, self.manifest.topk)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ShardError(f"logit shard {path}: does not exist") from None
        identity, key = (st.st_ino, st.st_size, st.st_mtime_ns), (teacher, block)
        cached = self._cache.get(key)
        if cached is not None and cached[0] == identity:
            self._cache.move_to_end(key)
            return cached[1]
        data = read_shard(path, self._layout.features(block), self.manifest.torch_dtype, self.manifest.topk)
        self._cache[key] = (identity, data)
        if len(self._cache) > GATHER_CACHE_SHARDS:
            self._cache.popitem(last=False)
        return data

    def _watch(self, waiting_for: str, missing: list[str], indices: list[int], blocks=()) -> StallWatch:
        """Watches the producer parts of the `missing` teachers that owe the shards at the
        run-wide `indices` (every producer of every teacher while the store has no
        manifest), and whoever holds a claim on the awaited layout shards `blocks` (in a
        shared store, maybe another run's producer: this run's owner then idles). Only a
        part's progress counts: another part's beats, or the owner's idle beats (it
        believes it has nothing to write), do not keep the wait alive."""
        if missing == [MANIFEST_NAME]:
            teachers = self.teachers
            paths = lambda: [p for t in teachers for p in producer_heartbeats(self.stream, t)]  # noqa: E731
        else:
            teachers = missing
            paths = lambda: [p for t in teachers for p in  # noqa: E731
                             owner_heartbeats(self.stream, t, indices) + claimer_heartbeats(self.store / t, blocks)]
        return StallWatch(paths, self.stall_timeout_s, f"logit store {self.store}: {waiting_for}",
                          expected=[producer_role(t) for t in teachers], error=StoreTimeout, count_idle=False)

    def wait_for_every_shard(self, beat: Callable[[], None] | None = None) -> None:
        """distill.precompute: returns once every shard of the plan is on disk for every
        teacher of the reader, so the student's first read comes after the whole precompute.
        Waits (polling every _MAX_BACKOFF_S, calling `beat`: the student's heartbeat) as long
        as shards arrive or the producer parts that owe the missing ones make progress;
        StoreTimeout once they stall or fail. Verification is left to get()."""
        watching, watch = None, None
        while True:
            missing = self._missing(None)
            every = set(range(len(self._layout))) if self._layout is not None else set()
            absent = every
            if missing != [MANIFEST_NAME]:
                on_disk = {t: set(list_shards(self.store / t)) for t in self.teachers}
                missing = [t for t in self.teachers if not every <= on_disk[t]]
                absent = {s for t in missing for s in every - on_disk[t]}
            if not missing:
                return
            if (missing, absent) != watching:  # a shard arrived (progress) or the first wait: watch anew
                # Producers precompute in the first epoch's order: the run-wide indices of
                # the absent shards there say which parts owe them.
                owed = [i for i, shard in enumerate(self.plan.order(0))
                        if self._layout is None or absent.intersection(self.blocks(shard))]
                watching, watch = (missing, absent), self._watch("the precompute of every shard", missing, owed,
                                                                 sorted(absent))
            watch.check(self._what(missing))
            if beat is not None:
                beat()
            time.sleep(_MAX_BACKOFF_S)

    @staticmethod
    def _what(missing: list[str]) -> str:
        if missing == [MANIFEST_NAME]:
            return f" from its {MANIFEST_NAME} (no producer has created the store)"
        return f" from teacher(s) {', '.join(missing)}"

    def commit_progress(self, epoch: int, position: int) -> None:
        """Records that the student's latest checkpoint resumes at (epoch, position)
        (position == len(plan): the epoch is done), then deletes shards no longer needed."""
        if not self.writer:
            raise RuntimeError("only the writer reader (student rank 0) commits progress")
        committed = self.plan.global_index(epoch, position)
        with self._progress_lock:
            self._progress = StudentProgress(committed, max(self._progress.next if self._progress else 0, committed))
            write_progress(self.stream, self.plan, self._progress)
            progress = self._progress
        self._clean_up(progress)

    def _clean_up(self, progress: StudentProgress) -> None:
        if self._layout is None or self.gathers:  # layout shards serve many of its steps: kept
            return
        on_disk: dict[int, list[Path]] = {}
        for teacher in self.teachers:
            for shard, path in list_shards(self.store / teacher).items():
                on_disk.setdefault(shard, []).append(path)
        low = min(progress.committed, progress.next)
        high = progress.next + self.lookahead
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
                if not all(shard_path(self.store, t, b).exists() for t in self.teachers for b in self.blocks(shard)):
                    break
                ahead += 1
        return StreamStats(sizes, ahead, self._wait_seconds)


def logits_to(logits: Logits, device: torch.device) -> Logits:
    """Teacher logits moved to `device` in their stored form (dense or top-k); from pinned
    memory without blocking the host."""
    pin = device.type == "cuda"

    def move(t: torch.Tensor) -> torch.Tensor:
        return (t.pin_memory() if pin else t).to(device, non_blocking=pin)

    if isinstance(logits, torch.Tensor):
        return move(logits)
    return TopKLogits(move(logits.values), move(logits.indices), move(logits.rest), logits.length)


T = TypeVar("T")
_POLL_S = 0.05  # how often a blocked side of ReadAhead looks whether the other closed or woke it
_CLOSE_TIMEOUT_S = 30.0


class ReadAheadClosed(Exception):
    """Raised inside a ReadAhead's thread (by `idle`) once the consumer has closed it."""


class ReadAhead(Generic[T]):
    """The items of `produce(idle)` (an iterator) computed on a side thread, at most
    `depth` ahead of the consumer, who takes them in order with `next()`. An exception
    in the thread is raised by the `next()` that would have returned the item it failed
    on (with the thread's traceback). `idle` is for waits inside `produce` (StoreReader.get's
    `while_waiting`): it raises ReadAheadClosed once the consumer has closed the read-ahead
    (so a wait for a stalled producer ends with the consumer, not after the stall
    timeout), and returns True early when the consumer woke it (it produced something the
    thread may be waiting for). Use as a context manager, or call close()."""

    def __init__(self, produce: Callable[[Callable[[], bool]], Iterator[T]], depth: int, name: str = "read-ahead"):
        if depth < 1:
            raise ValueError(f"read-ahead depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._woken = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()

    def idle(self) -> bool:
        if self._closed.is_set():
            raise ReadAheadClosed()
        woken = self._woken.wait(_POLL_S)
        self._woken.clear()
        if self._closed.is_set():
            raise ReadAheadClosed()
        return woken

    def _put(self, entry: tuple[bool, object]) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, produce: Callable[[Callable[[], bool]], Iterator[T]]) -> None:
        try:
            for item in produce(self.idle):
                if not self._put((True, item)):
                    return
        except ReadAheadClosed:
            return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((False, error))
            return
        self._put((False, StopIteration()))

    def next(self, while_waiting: Callable[[], bool] | None = None) -> T:
        """The next item. While it is not ready, calls `while_waiting()` (the consumer's
        heartbeat, time-shared producer steps) about every 50 ms; a True result (it did work
        the thread may wait for) wakes the thread's `idle`. StopIteration after the last."""
        if self._done:
            raise StopIteration
        while True:
            try:
                ok, value = self._queue.get_nowait()
                break
            except queue.Empty:
                pass
            if not self._thread.is_alive() and self._queue.empty():
                raise RuntimeError("read-ahead thread ended without a result")
            if while_waiting is not None and while_waiting():
                self._woken.set()
                continue
            try:
                ok, value = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                continue
        if not ok:
            self._done = True
            raise value
        return value

    def close(self) -> None:
        """Stops the thread (it may be waiting in `produce`, or blocked on a full queue)."""
        self._closed.set()
        self._done = True
        deadline = time.monotonic() + _CLOSE_TIMEOUT_S
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:  # make room for a blocked put
                self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                pass
        if self._thread.is_alive():  # busy outside `idle` (a daemon thread: it dies with the process)
            log.warning("%s: thread still busy %.0f s after close; left behind", self._thread.name, _CLOSE_TIMEOUT_S)

    def __enter__(self) -> "ReadAhead[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _size(paths: Iterable[Path]) -> int:
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # deleted since it was listed
            pass
    return total
