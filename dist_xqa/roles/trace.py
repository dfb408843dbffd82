"""The student's step trace (`run.trace_steps`): what each student rank trained on, step
by step, so that a run can be checked for nothing lost and nothing read twice, and a
resumed run compared with an uninterrupted one (tests/test_crash_drills.py).

Each student rank appends to `<run>/trace/student.<group rank>.jsonl`: first a line
marking the start of the process (`{"start": {...}}`: pid, wall time, the teachers in the
order of the logit checksums), then one line per optimizer step:

    {"step": global step (0-based: the step taken after `step` steps), "epoch": e,
     "position": p (in the epoch's shard order),
     "micro": [{"features": [feature ids of its rows], "weight": loss multiplier,
                "logits": [[crc32 of the row's start and end logits, per teacher] per row],
                "loss": the micro-batch's total loss, float.hex}, ...]}

A micro-batch of weight 0 stepped on a borrowed row (student.micro_batch_plan): its row
is not trained on. A resumed run appends a new start line and replays the steps after its
checkpoint, so a step may occur more than once: the last occurrence is the one the
finished model went through (`last_steps`).

Tracing reads the losses and the logits back to the host after each step (it syncs the
device); off, nothing of this runs.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from dist_xqa.layout import RunLayout
from dist_xqa.logits.shards import Logits, TopKLogits

def trace_path(run_dir: str | Path, group_rank: int) -> Path:
    return RunLayout(run_dir).trace_file(group_rank)


def _host_parts(logits: Logits) -> list[torch.Tensor]:
    """The tensors that hold `logits` ([K, B, ...]), on the host."""
    parts = [logits.values, logits.indices, logits.rest] if isinstance(logits, TopKLogits) else [logits]
    return [p.detach().cpu() for p in parts]


def logit_checksums(start: Logits, end: Logits) -> list[list[int]]:
    """Per row of a micro-batch, per teacher: crc32 of its start and end logits rows as
    stored (dense or top-k; their raw bytes, as numpy has no bfloat16), a cheap
    fingerprint to compare runs by."""
    parts = _host_parts(start) + _host_parts(end)
    teachers, rows = parts[0].shape[:2]
    return [[zlib.crc32(b"".join(p[k, b].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for p in parts))
             for k in range(teachers)] for b in range(rows)]


class StepTrace:
    """Appends the trace of one student rank (see the module doc)."""

    def __init__(self, path: str | Path, teachers: Sequence[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A process killed mid-write leaves a torn last line: end it, so that it stays
        # one unreadable line before this run's start line.
        torn = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        self._file = self.path.open("a", buffering=1)  # line-buffered: a killed run loses no full line
        if torn:
            self._file.write("\n")
        self._write({"start": {"pid": os.getpid(), "time": time.time(), "teachers": list(teachers)}})

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def record(self, step: int, epoch: int, position: int, micro: Sequence, losses: Sequence[torch.Tensor]) -> None:
        """Step `step` at `position` of `epoch`: its micro-batches (student.MicroBatch, with
        their teachers' logits) and each one's total loss (read here, after the step: the
        host waits for the device)."""
        self._write({"step": step, "epoch": epoch, "position": position, "micro": [
            {"features": m.feature_ids.tolist(), "weight": m.weight,
             "logits": logit_checksums(m.teacher_start, m.teacher_end), "loss": float(loss).hex()}
            for m, loss in zip(micro, losses, strict=True)]})

    def close(self) -> None:
        self._file.close()


def read_trace(path: str | Path) -> list[tuple[dict, list[dict]]]:
    """The runs recorded in a trace file, in order: (start record, step records). A line
    that is not JSON is accepted only as the last of a run (a process killed mid-write)."""
    runs: list[tuple[dict, list[dict]]] = []
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) or _starts_a_run(lines[number]):
                continue
            raise ValueError(f"{path}:{number}: not a trace record: {line[:80]!r}") from None
        if "start" in record:
            runs.append((record["start"], []))
        elif not runs:
            raise ValueError(f"{path}:{number}: a step record before any start record")
        else:
            runs[-1][1].append(record)
    return runs


def _starts_a_run(line: str) -> bool:
    try:
        return "start" in json.loads(line)
    except json.JSONDecodeError:
        return False


def last_steps(path: str | Path) -> dict[int, dict]:
    """Each step's last record: a resumed run's replay of a step replaces the earlier one."""
    return {record["step"]: record for _, steps in read_trace(path) for record in steps}


def features_read(run_dir: str | Path) -> dict[int, Counter]:
    """Per epoch, how often each feature was trained on over every student rank, from each
    step's last record (micro-batches of weight 0 stepped on a borrowed row: not counted)."""
    reads: dict[int, Counter] = {}
    for path in sorted(RunLayout(run_dir).trace.glob("*.jsonl")):
        for step in last_steps(path).values():
            for micro in step["micro"]:
                if micro["weight"] != 0:
                    reads.setdefault(step["epoch"], Counter()).update(micro["features"])
    return reads
