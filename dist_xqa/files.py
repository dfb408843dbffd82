"""Atomic file writes: a reader sees a file either absent or complete.

Every file the roles exchange (shards, the manifest, the student's progress, heartbeats,
DONE and stage records, the prepared data's records) is written to a temporary name in its
own directory and renamed over the final name, so a writer killed at any point leaves at
most a hidden temporary file behind.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Writes `data` to `path` atomically: temporary file in the same directory, flush,
    fsync (when `durable`), then os.replace. Files that only steer timing (progress,
    heartbeats) skip the fsyncs: losing one to a machine crash costs nothing."""
    path = Path(path)
    # The leading dot keeps the temporary out of every `shard_*` / `*.json` listing.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Makes the rename itself durable. Some filesystems refuse fsync on a directory;
    there the rename is as durable as that filesystem makes it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any, durable: bool = False) -> None:
    """Writes `obj` as JSON to `path` atomically (creating its directory)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), durable)


def read_json(path: Path) -> Any | None:
    """The JSON value in `path`, or None when the file does not exist."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def remove_temp_files(directory: Path, pid: int | None = None) -> list[Path]:
    """Removes the temporaries left in `directory` by writers that died before renaming
    (only those of process `pid` when given: the directory's other writers may be
    writing theirs now); returns what it removed."""
    pattern = f".*.{pid}.*{TEMP_SUFFIX}" if pid is not None else f".*{TEMP_SUFFIX}"
    removed = sorted(Path(directory).glob(pattern))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
