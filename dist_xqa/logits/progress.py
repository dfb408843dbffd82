"""The two small files through which producers and the student pace each other.

- `<store>/progress.json`, written by the student: `next`, the shard it reads now (the
  producers' look-ahead window starts there), and `committed`, the point its last
  checkpoint resumes from (nothing before it is read again).
- `<store>/<teacher>/heartbeat.json` (`heartbeat.<i>of<n>.json` for part i of a teacher
  produced by n ranks), written by each producer: what it is doing, where, and when it
  last said so; the student quotes them when it gives up waiting.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dist_xqa.logits.files import read_json, write_json
from dist_xqa.logits.order import ShardPlan

PROGRESS_NAME = "progress.json"
HEARTBEAT_NAME = "heartbeat.json"


class StoreTimeout(TimeoutError):
    """A role waited longer than its timeout for another role's files."""


@dataclass(frozen=True)
class StudentProgress:
    committed: int  # run-wide index the student's last checkpoint resumes from
    next: int  # run-wide index of the shard the student reads now


def read_progress(store_dir: str | Path, plan: ShardPlan) -> StudentProgress:
    """The student's progress; the start of the run when it has written none yet."""
    path = Path(store_dir) / PROGRESS_NAME
    data = read_json(path)
    if data is None:
        return StudentProgress(0, 0)
    try:
        return StudentProgress(
            *(plan.global_index(data[key]["epoch"], data[key]["position"]) for key in ("committed", "next"))
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a student progress file ({e!r})") from e


def write_progress(store_dir: str | Path, plan: ShardPlan, progress: StudentProgress) -> None:
    """Writes the student's progress atomically (as epoch/position pairs, for people too)."""
    data = {}
    for key in ("committed", "next"):
        epoch, position = plan.locate(getattr(progress, key))
        data[key] = {"epoch": epoch, "position": position}
    data["time"] = time.time()
    write_json(Path(store_dir) / PROGRESS_NAME, data)


@dataclass(frozen=True)
class Heartbeat:
    teacher: str
    epoch: int
    position: int
    state: str  # computing | committed | waiting | finished
    shards_written: int
    time: float
    pid: int


def heartbeat_path(store_dir: str | Path, teacher: str, part: tuple[int, int] = (0, 1)) -> Path:
    name = HEARTBEAT_NAME if part[1] == 1 else f"heartbeat.{part[0]}of{part[1]}.json"
    return Path(store_dir) / teacher / name


def write_heartbeat(store_dir: str | Path, teacher: str, epoch: int, position: int, state: str, shards_written: int,
                    part: tuple[int, int] = (0, 1)) -> None:
    """Records what producer `teacher` (its `part` (i, n)) is doing now, at (epoch,
    position) of the order."""
    beat = Heartbeat(teacher, epoch, position, state, shards_written, time.time(), os.getpid())
    write_json(heartbeat_path(store_dir, teacher, part), asdict(beat))


def describe_heartbeat(store_dir: str | Path, teacher: str) -> str:
    """One line per producer of `teacher` on its last heartbeat, or 'no heartbeat'."""
    paths = sorted((Path(store_dir) / teacher).glob("heartbeat*.json"))
    if not paths:
        return f"{teacher}: no heartbeat"
    lines = []
    for path in paths:
        try:
            data = read_json(path)
            beat = None if data is None else Heartbeat(**data)
        except (ValueError, TypeError) as e:
            lines.append(f"{teacher}: unreadable heartbeat {path} ({e})")
            continue
        if beat is None:  # removed since it was listed
            continue
        label = teacher if path.name == HEARTBEAT_NAME else f"{teacher} ({path.name})"
        lines.append(
            f"{label}: {beat.state} at epoch {beat.epoch} position {beat.position}, "
            f"{time.time() - beat.time:.1f} s ago (pid {beat.pid}, {beat.shards_written} shards written)"
        )
    return "; ".join(lines) or f"{teacher}: no heartbeat"
