"""TensorBoard scalars and progress display. Only the designated rank of a role group
writes (its events file is named after the role, so concurrent groups never share one).

`progress` is the one progress display of the trainer (training loops, forward passes over
features): a tqdm bar on a terminal, plain log lines where output is a file (a Slurm log),
so a log never fills with carriage-return redraws."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from typing import Callable, TextIO

from tqdm.auto import tqdm

from dist_xqa.config import MonitorConfig
from dist_xqa.layout import RunLayout


class Monitor:
    """Scalars under `<run>/tb/<role>/`; a no-op on ranks that do not write. `every`
    (`monitor.every`): the logging interval of per-step scalars kept on the device
    (DeviceScalars) and of samples_per_second."""

    def __init__(self, run_dir: Path, role: str, enabled: bool, every: int = MonitorConfig.every):
        self.every = every
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # heavy: only where it writes
            self.writer = SummaryWriter(str(RunLayout(run_dir).tb(role)))
        else:
            self.writer = None
        self._last = time.perf_counter()
        self._samples = 0

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def throughput(self, samples: int, step: int) -> None:
        """samples_per_second, averaged over the last `every` steps."""
        self._samples += samples
        if step % self.every == 0:
            now = time.perf_counter()
            self.scalar("samples_per_second", self._samples / max(now - self._last, 1e-9), step)
            self._last, self._samples = now, 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- progress ------------------------------------------------------------------------------

PLAIN_EVERY_FRACTION = 10  # plain lines: at most about this many per run of `total` steps...
PLAIN_INTERVAL_S = 30.0  # ... and one at least this often while steps complete


def format_duration(seconds: float) -> str:
    """'29 s', '12 min 05 s', '3 h 07 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_rate(steps_per_second: float, unit: str = "step") -> str:
    """'1.8 steps/s', or '12 s/step' when slower than 0.1 steps/s."""
    units = unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")
    if steps_per_second >= 0.1:
        return f"{steps_per_second:.1f} {units}/s"
    if steps_per_second > 0:
        return f"{1 / steps_per_second:.0f} s/{unit}"
    return f"- {units}/s"


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


class PlainProgress:
    """Progress as plain lines, one `write` each ("<desc>: step 40/93, 1.8 steps/s, ETA 29 s"):
    every `every` steps or every `interval_s` seconds, whichever comes first, and a last line
    at `close`. The rate counts only the steps done since this display started (a resumed
    epoch starts at `initial`). Same interface as the tqdm bar: update, close, a context."""

    def __init__(self, total: int | None, desc: str, stream: TextIO, initial: int = 0, every: int | None = None,
                 interval_s: float = PLAIN_INTERVAL_S, unit: str = "step",
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.stream, self.unit, self.clock = total, desc, stream, unit, clock
        self.n = self._start_n = self._shown_n = initial
        if every is None:
            every = max(1, -(-total // PLAIN_EVERY_FRACTION)) if total else 100
        self.every, self.interval_s = max(1, every), interval_s
        self._t0 = self._shown_t = clock()
        self.closed = False

    def line(self) -> str:
        elapsed = self.clock() - self._t0
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        where = f"{self.unit} {self.n}/{self.total}" if self.total is not None else f"{self.unit} {self.n}"
        text = f"{self.desc}: {where}, {format_rate(rate, self.unit)}"
        if self.total is not None and self.n >= self.total:
            return f"{text}, done in {format_duration(elapsed)}"
        if self.total is not None and rate > 0:
            text += f", ETA {format_duration((self.total - self.n) / rate)}"
        return text

    def _show(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self._shown_n, self._shown_t = self.n, self.clock()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self._shown_n >= self.every or self.clock() - self._shown_t >= self.interval_s:
            self._show()

    def close(self) -> None:
        if not self.closed and self.n != self._shown_n:
            self._show()
        self.closed = True

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NoProgress:
    """The display of a rank that does not draw."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NoProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass


def display_position() -> int:
    """The terminal line a drawing process keeps its bar on: its local rank (ranks that
    share a terminal share a node), so two groups' bars never overwrite each other."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def progress(total: int | None, desc: str, enabled: bool = True, initial: int = 0, stream: TextIO | None = None,
             every: int | None = None, interval_s: float = PLAIN_INTERVAL_S, unit: str = "step",
             position: int | None = None, clock: Callable[[], float] = time.monotonic):
    """The progress display of one role group (call it with `enabled` on the group's first
    rank only): a tqdm bar on the line of this rank (`display_position`) when `stream`
    (default: stderr) is a terminal; otherwise a PlainProgress writing a line every `every`
    steps (default: about a tenth of `total`) or `interval_s` seconds."""
    if not enabled:
        return NoProgress()
    stream = sys.stderr if stream is None else stream
    if is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, file=stream, leave=False, unit=unit,
                    position=display_position() if position is None else position)
    return PlainProgress(total, desc, stream, initial=initial, every=every, interval_s=interval_s, unit=unit,
                         clock=clock)


class DeviceScalars:
    """Per-step scalars kept as device tensors and read (one host sync) at `flush`: the
    step itself never waits for the device to log a loss. `add` keeps one value a call;
    `add_each` one value for each of several tags, counted only where `present` (e.g. the
    KD loss by passage language, of the languages a micro-batch has). A tag's logged value
    is the mean of its values since the last flush."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor
        self.pending: dict[str, list] = {}
        self.grouped: dict[tuple[str, ...], list[tuple]] = {}

    def add(self, tag: str, value) -> None:
        self.pending.setdefault(tag, []).append(value.detach().float())

    def add_each(self, tags: tuple[str, ...], values, present=None) -> None:
        values = values.detach().float()
        self.grouped.setdefault(tuple(tags), []).append(
            (values, torch.ones_like(values) if present is None else present.float()))

    def due(self, step: int) -> bool:
        """Whether `step` is one that flushes (every `monitor.every` steps)."""
        return step % self.monitor.every == 0

    def flush(self, step: int) -> None:
        if self.monitor.writer is None:  # a rank that does not write never reads them
            self.pending.clear()
            self.grouped.clear()
            return
        if not (self.pending or self.grouped):
            return
        parts = []
        if self.pending:
            parts.append(torch.stack([torch.stack(v).mean() for v in self.pending.values()]))
        for tags, items in self.grouped.items():
            values, present = torch.stack([v for v, _ in items]), torch.stack([p for _, p in items])
            counts = present.sum(0)
            # a tag never present since the last flush is not logged: marked by a count of 0
            parts.append(torch.stack([(values * present).sum(0) / counts.clamp(min=1), counts]).flatten())
        flat = torch.cat(parts).tolist()  # the one host sync
        scalars = dict(zip(self.pending, flat))
        offset = len(self.pending)
        for tags in self.grouped:
            n = len(tags)
            means, counts = flat[offset:offset + n], flat[offset + n:offset + 2 * n]
            scalars.update((tag, mean) for tag, mean, count in zip(tags, means, counts) if count > 0)
            offset += 2 * n
        self.monitor.scalars(scalars, step)
        self.pending.clear()
        self.grouped.clear()
