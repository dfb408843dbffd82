"""One heartbeat and one stall rule for every wait between roles (DESIGN.md section 2,
"Roles talk only through files").

A role at work writes a heartbeat file (role, step, state, pid, host, log file, time) as
it makes progress. A rank waiting for another role's files watches that role's heartbeat
files and waits as long as one of them keeps moving; it stops with `Stalled` when none
has moved for `stall_timeout_s` (the config's `run.stall_timeout_s`), or at once when
one says its role failed. The message names the role, its last step and its log file.
Healthy progress has no wall-clock limit.

What counts as moving depends on what the watched role does while it waits itself. A role
that waits rewrites an unchanged beat every second (an idle beat). Where the waiter waits
for work the watched role owes (the student for a producer part's shard), an idle beat is
no progress: the beat must change (a new step, state or detail), or a part that believes
it has nothing to do, or a dead part behind a live one, would be waited for forever
(`count_idle=False`). Where the watched role's own wait is itself watched (a producer
watching its student, which watches its producers; the run's waits for a model), a
rewritten beat is a sign of life and counts: that role stops with an error when what it
waits for stalls, so the chain cannot wait forever, and a long healthy wait (a student
waiting for a precompute) does not read as a stall.

Heartbeats are written from the work loop itself, never from a background thread: a
process that died or hangs in a collective stops beating, which is what a waiter must see.
Movement is judged on the waiter's own monotonic clock (any change of the file's beat),
so clocks of different hosts need not agree for it. Exit markers (a `failed`, `finished` or
`stopped` beat) count only when written after the wait began, by the wall clock: a marker
left by an earlier run in the same run directory is not news (hosts' clocks are assumed
NTP-synchronised; a marker missed through skew is still caught by the stall rule). A
`finished` beat counts whenever it was written: a role that finished before the waiter
started (a producer started after its student finished, on a cache-mode rerun) stays
finished; a rerun that redoes the role removes its heartbeats (dist_xqa/stages.py).

Stopping: `install_stop_signal()` makes SIGUSR1 (Slurm's warning before the time limit)
and SIGTERM (preemption; Slurm's KillWait before SIGKILL) a request to stop; every wait
here then raises `Preempted`, and GroupLoop checkpoints and raises it (its heartbeat says
`stopped`), so that a requeued job resumes.

Where the files are: a training group's ranks write `<run>/heartbeats/<role>.<group
rank>.json` (`role_heartbeat`); producers write theirs in the logit store
(logits/progress.py).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dist_xqa.files import read_json, write_json
from dist_xqa.layout import RunLayout

WORKING, WAITING, FINISHED, FAILED, STOPPED = "working", "waiting", "finished", "failed", "stopped"
BEAT_INTERVAL_S = 1.0  # a role rewrites an unchanged beat at most this often


class Stalled(TimeoutError):
    """The role a rank waits for stopped beating for the stall timeout, or failed."""


class Preempted(Exception):
    """The job is being stopped (SIGUSR1): the rank has checkpointed, if it trains, and
    exits so that the requeued job resumes."""


_stop = threading.Event()
_stop_signals: list[int] = []  # the signals that asked to stop, in order


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def _request_stop(signum: int, _frame) -> None:
    _stop_signals.append(signum)
    _stop.set()


def install_stop_signal(signums: Sequence[int] = STOP_SIGNALS) -> None:
    """From now on each of `signums` asks this process to stop at its next safe point
    (main thread only)."""
    for signum in signums:
        signal.signal(signum, _request_stop)


def stop_requested() -> bool:
    return _stop.is_set()


def stop_signal() -> int | None:
    """The first signal that asked this process to stop (None: none did)."""
    return _stop_signals[0] if _stop_signals else None


@dataclass(frozen=True)
class Beat:
    role: str
    step: int
    state: str  # working | waiting | finished | failed (or a role's own word)
    pid: int
    host: str
    log: str | None  # the log file of the process that beats
    time: float  # wall clock of the beat (for people; waiters use their own clock)
    detail: dict[str, Any] = field(default_factory=dict)

    def describe(self, now: float | None = None) -> str:
        age = (time.time() if now is None else now) - self.time
        extra = "".join(f", {k} {v}" for k, v in sorted(self.detail.items()))
        return (f"{self.role}: {self.state} at step {self.step}{extra}, last beat {age:.1f} s ago "
                f"(pid {self.pid} on {self.host}, log {self.log or 'none'})")


def read_beat(path: str | Path) -> Beat | None:
    """The beat in `path`; None when it does not exist (or is not a heartbeat)."""
    try:
        data = read_json(Path(path))
        return None if data is None else Beat(**data)
    except (ValueError, TypeError):
        return None  # beats are written atomically: only a foreign file gets here


def current_log_file() -> str | None:
    """The file this process logs to (train.py's per-rank log), if any."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def role_heartbeat(run_dir: str | Path, role: str, group_rank: int) -> Path:
    """The heartbeat file of rank `group_rank` of role group `role` (teacher_en, student...)."""
    return RunLayout(run_dir).heartbeat(role, group_rank)


def role_heartbeats(run_dir: str | Path, pattern: str = "*") -> list[Path]:
    """The heartbeat files of the run's roles whose name matches `pattern` (a glob)."""
    layout = RunLayout(run_dir)
    return sorted(layout.root.glob(layout.heartbeat_glob(pattern)))


class Heartbeat:
    """Writes `role`'s heartbeat to `path`: `beat()` on every unit of progress; the file
    is rewritten when the state changes or `interval_s` after the last write (a beat per
    training step would cost a file write per step for nothing)."""

    def __init__(self, path: str | Path, role: str, interval_s: float = BEAT_INTERVAL_S, log: str | None = None):
        self.path = Path(path)
        self.role = role
        self.interval_s = interval_s
        self.log = log if log is not None else current_log_file()
        self.step = 0
        self.state = ""
        self._written = -float("inf")

    def beat(self, step: int | None = None, state: str = WORKING, force: bool = False, **detail: Any) -> None:
        self.step = self.step if step is None else step
        now = time.monotonic()
        if not (force or state != self.state or now - self._written >= self.interval_s):
            return
        self.state, self._written = state, now
        beat = Beat(self.role, self.step, state, os.getpid(), socket.gethostname(), self.log, time.time(), detail)
        write_json(self.path, asdict(beat))

    def fail(self, error: BaseException) -> None:
        """The exit marker: waiters stop at once instead of after the stall timeout."""
        self.beat(state=FAILED, force=True, error=f"{type(error).__name__}: {error}"[:500])

    @contextmanager
    def guard(self) -> Iterator["Heartbeat"]:
        """`with heartbeat.guard(): ...` marks the role failed when the block raises
        (stopped when it raises Preempted)."""
        try:
            yield self
        except Preempted:
            self.beat(state=STOPPED, force=True)
            raise
        except BaseException as error:
            self.fail(error)
            raise


class StallWatch:
    """Watches the heartbeat files `paths()` (re-listed at every check) of the roles a
    rank waits for. `check()` raises Stalled when no beat has moved for
    `stall_timeout_s` since the watch began or since the last move, or when a beat
    written after the watch began says `failed`. A beat moves when it is rewritten, or,
    with `count_idle=False`, only when its step, state, detail or process changes (see
    the module doc). `expected` names roles that should be beating: a role with no file
    is reported as such. `error` is the Stalled subclass raised."""

    def __init__(self, paths: Callable[[], Iterable[Path]], stall_timeout_s: float, waiting_for: str,
                 expected: Sequence[str] = (), error: type[Stalled] = Stalled, count_idle: bool = True):
        if stall_timeout_s <= 0:
            raise ValueError(f"stall timeout must be positive, got {stall_timeout_s}")
        self.paths = paths
        self.stall_timeout_s = stall_timeout_s
        self.waiting_for = waiting_for
        self.expected = list(expected)
        self.error = error
        self.count_idle = count_idle
        self._began_wall = time.time()
        self._moved = time.monotonic()
        self._seen: dict[Path, tuple] = {}

    def reset(self) -> None:
        """Restarts the stall clock (the waiter was busy, not waiting)."""
        self._moved = time.monotonic()

    def beats(self) -> dict[Path, Beat]:
        found = {}
        for path in self.paths():
            beat = read_beat(path)
            if beat is not None:
                found[Path(path)] = beat
        return found

    def check(self, missing: str = "") -> dict[Path, Beat]:
        """Raises Stalled (see the class); returns the beats it read. `missing` says what
        the waiter still lacks, for the message."""
        now = time.monotonic()
        beats = self.beats()
        for path, beat in beats.items():
            key = (beat.step, beat.state, beat.pid, json.dumps(beat.detail, sort_keys=True, default=str))
            if self.count_idle:
                key += (beat.time,)
            if self._seen.get(path) != key:
                self._seen[path] = key
                self._moved = now
            # A failed beat from an earlier run of this run directory is not this run's news.
            if beat.state == FAILED and beat.time >= self._began_wall:
                raise self.error(f"{self.waiting_for}{missing}: {beat.role} failed: {self._describe(beats)}")
        if now - self._moved > self.stall_timeout_s:
            idle = "" if self.count_idle else ", an idle beat rewritten unchanged being no progress"
            raise self.error(f"{self.waiting_for}{missing}: no heartbeat has moved for {now - self._moved:.1f} s "
                             f"(run.stall_timeout_s = {self.stall_timeout_s:g}{idle}); "
                             f"last heartbeats: {self._describe(beats)}")
        return beats

    def finished(self, beats: dict[Path, Beat]) -> bool:
        """Whether one of `beats` (from check()) says that its role has finished (even
        before the watch began: see the module doc), or since the watch began that it
        stopped, to be resumed by a requeued job (an earlier job's `stopped` is the
        point this job resumes from, not news)."""
        return any(beat.state == FINISHED or (beat.state == STOPPED and beat.time >= self._began_wall)
                   for beat in beats.values())

    def _describe(self, beats: dict[Path, Beat]) -> str:
        now = time.time()
        lines = [beat.describe(now) for beat in beats.values()]
        roles = {beat.role for beat in beats.values()}
        lines += [f"{role}: no heartbeat" for role in self.expected if not any(r.startswith(role) for r in roles)]
        return "; ".join(lines) or "no heartbeat at all"


def wait_until(ready: Callable[[], bool], watch: StallWatch, what: Callable[[], str] = lambda: "",
               poll_s: float = 1.0) -> None:
    """Blocks until `ready()`, as long as `watch` sees progress; `what()` describes what
    is still missing in the Stalled message."""
    while not ready():
        if stop_requested():
            raise Preempted(f"{watch.waiting_for}: stopped by a signal while waiting")
        watch.check(what())
        time.sleep(poll_s)


def wait_for_files(paths: Sequence[Path], watch: StallWatch, poll_s: float = 1.0) -> None:
    """Blocks until every path exists (another role writes them) while `watch` sees the
    writers beat; Stalled naming the missing files and the stalled role otherwise."""
    missing = lambda: [str(p) for p in paths if not Path(p).exists()]  # noqa: E731
    wait_until(lambda: not missing(), watch, lambda: f" (missing {missing()})", poll_s)


def wait_for_run_files(run_dir: str | Path, paths: Sequence[Path], stall_timeout_s: float, waiting_for: str,
                       roles: str = "*", expected: Sequence[str] = (), poll_s: float = 1.0) -> None:
    """Waits for files written by the run's role groups, as long as the heartbeat of
    any role matching `roles` (a glob over role names) moves: the role that writes a
    file may not have started yet while the ranks it will run on train another role.
    `expected`: roles named in the message when they have no heartbeat at all."""
    watch = StallWatch(lambda: role_heartbeats(run_dir, roles), stall_timeout_s, waiting_for, expected)
    wait_for_files(paths, watch, poll_s)
