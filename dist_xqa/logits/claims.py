"""Which producer computes a missing shard, when several may need it at once.

The producers of one run split a teacher's shards by part, but a store shared between
runs (`distill.store_dir`), or read through another plan than its layout, is needed by
producers that do not know each other. Before computing a shard, a producer claims it:
`<store>/<teacher>/shard_NNNNNN.claim`, created under the teacher directory's lock, names
the claimer's heartbeat file, pid and host. Others skip a shard while its claim is live,
so no row is computed twice; the claimer deletes its claim once the shard is committed
(or its computation failed).

A claim expires with its claimer's heartbeat, never by a wall-clock age: at once when the
heartbeat says its producer failed or stopped, or when the claimer's process is gone (on
the same host); otherwise once the heartbeat has not changed for `stall_timeout_s` on the
observer's own clock (a killed claimer on another host, or a hung one). An expired claim
is removed under the lock, so exactly one producer takes the shard over.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from dist_xqa.logits.manifest import locked
from dist_xqa.waiting import FAILED, STOPPED, Heartbeat, read_beat

CLAIMS_LOCK = ".claims.lock"


def claim_path(teacher_dir: Path, shard: int) -> Path:
    return teacher_dir / f"shard_{shard:06d}.claim"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def claimer_heartbeats(teacher_dir: Path, shards) -> list[Path]:
    """The heartbeat files of the producers (of any run) holding a claim on `shards`:
    a reader waiting for those shards waits on their progress too."""
    found = []
    for shard in shards:
        holder = Claims._holder(claim_path(Path(teacher_dir), shard))
        if holder and holder.get("heartbeat"):
            found.append(Path(holder["heartbeat"]))
    return found


class Claims:
    """A producer's claims on the shards of one teacher directory; `heartbeat` is the
    producer's own (named in its claims, so that others judge them by it)."""

    def __init__(self, teacher_dir: Path, heartbeat: Heartbeat, stall_timeout_s: float):
        self.dir = Path(teacher_dir)
        self.record = {"heartbeat": str(heartbeat.path.resolve()), "pid": os.getpid(), "host": socket.gethostname()}
        self.stall_timeout_s = stall_timeout_s
        self._seen: dict[Path, tuple[tuple, float]] = {}  # claim -> (its claimer's beat, first seen)

    def claim(self, shard: int) -> bool:
        """Takes `shard` for this producer; False while another producer's claim on it is live."""
        path = claim_path(self.dir, shard)
        with locked(self.dir, CLAIMS_LOCK):
            holder = self._holder(path)
            if holder is not None and holder != self.record and not self._expired(path, holder):
                return False
            path.write_text(json.dumps(self.record))  # under the lock: nobody reads it half-written
        self._seen.pop(path, None)
        return True

    def release(self, shard: int) -> None:
        claim_path(self.dir, shard).unlink(missing_ok=True)

    @staticmethod
    def _holder(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # not ours to judge: a foreign file is treated as expired
            return {}

    def _expired(self, path: Path, holder: dict) -> bool:
        if not holder:
            return True
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
            return True
        beat = read_beat(holder.get("heartbeat", ""))
        if beat is not None and beat.pid == holder.get("pid") and beat.state in (FAILED, STOPPED):
            return True
        key = None if beat is None else (beat.time, beat.step, beat.state, beat.pid)
        now = time.monotonic()
        seen = self._seen.get(path)
        if seen is None or seen[0] != key:  # first look, or the claimer's heartbeat moved
            self._seen[path] = (key, now)
            return False
        return now - seen[1] > self.stall_timeout_s
