"""The two small files through which producers and the student pace each other.

- `<store>/progress.json`, written by the student: `next`, the shard it reads now (the
  producers' look-ahead window starts there), and `committed`, the point its last
  checkpoint resumes from (nothing before it is read again).
- `<store>/<teacher>/heartbeat.json` (`heartbeat.<i>of<n>.json` for part i of a teacher
  produced by n ranks), each producer's heartbeat (dist_xqa/waiting.py): the student waits
  for a shard as long as the heartbeat of the part that owes it makes progress (a new step:
  a part's idle beat, or another part's beat, is none).
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dist_xqa.files import read_json, write_json
from dist_xqa.logits.order import ShardPlan
from dist_xqa.waiting import Stalled

PROGRESS_NAME = "progress.json"
HEARTBEAT_NAME = "heartbeat.json"
PRODUCER_HEARTBEATS = "*/heartbeat*.json"  # every producer's, under the stream folder
# A run's own pacing files in its stream folder (layout.stream), apart from the logits.
PACING_GLOBS = (PROGRESS_NAME, PRODUCER_HEARTBEATS)
_PART_NAME = re.compile(r"heartbeat\.(\d+)of(\d+)\.json")


class StoreTimeout(Stalled):
    """The other side of the store (producers or student) stopped beating or failed."""


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


def producer_role(teacher: str, part: tuple[int, int] = (0, 1)) -> str:
    return f"producer {teacher}" if part[1] == 1 else f"producer {teacher} part {part[0]} of {part[1]}"


def heartbeat_path(store_dir: str | Path, teacher: str, part: tuple[int, int] = (0, 1)) -> Path:
    name = HEARTBEAT_NAME if part[1] == 1 else f"heartbeat.{part[0]}of{part[1]}.json"
    return Path(store_dir) / teacher / name


def producer_heartbeats(store_dir: str | Path, teacher: str) -> list[Path]:
    """The heartbeat files of every producer (part) of `teacher`."""
    return sorted((Path(store_dir) / teacher).glob("heartbeat*.json"))


def owner_heartbeats(store_dir: str | Path, teacher: str, indices: Iterable[int]) -> list[Path]:
    """The heartbeat files of the parts of `teacher` that write the shards at run-wide
    `indices` (part i of n writes the indices equal to i modulo n), as they are on disk.
    The number of parts is read from the files' names, since the reader does not know it;
    files of two layouts (a rerun on another number of ranks) are all watched, as the
    stale one never moves."""
    wanted = set(indices)
    owners = []
    for path in producer_heartbeats(store_dir, teacher):
        part = _PART_NAME.fullmatch(path.name)
        if part is None or any(index % int(part[2]) == int(part[1]) for index in wanted):
            owners.append(path)
    return owners
