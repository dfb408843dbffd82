"""The logit stream across real processes: K = 3 producer processes and one student
process that talk only through the store's files (shards, progress, heartbeats), for two
epochs with a small look-ahead; one producer is killed mid-run and restarted. Producers
stop when the student's heartbeat says it finished."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import traceback
from pathlib import Path

import torch

from dist_xqa.logits import Producer, ShardPlan, StoreReader
from dist_xqa.logits.shards import list_shards
from dist_xqa.waiting import FINISHED, Heartbeat
from test_logit_store import TEACHERS, make_manifest, needed_shards, toy_logits

EPOCHS = 2
LOOKAHEAD = 2
COMMIT_EVERY = 3  # the student checkpoints every third shard
KILLED = "es"
KILLED_AT_CALL = 4  # the killed producer hangs inside its fourth teacher forward
STALL_TIMEOUT_S = 60.0


def student_heartbeat(store: str) -> Path:
    return Path(store).parent / "heartbeats" / "student.0.json"  # outside the store, as in a run


def make_plan() -> ShardPlan:
    return ShardPlan(range(1000, 1045), shard_size=4, seed=11)  # 12 shards, the last one short


def producer_main(store: str, teacher_index: int, log: str, hang_at_call: int | None, hanging: str, go: str | None) -> None:
    """A producer process: toy teacher `teacher_index`; logs the first feature id of every
    shard it computes; with `hang_at_call`, stops for good inside that call. With `go`, it
    starts producing only once that file exists (a replacement started in advance, so
    that its start-up overlaps the run)."""
    while go is not None and not Path(go).exists():
        time.sleep(0.02)
    plan = make_plan()
    calls = 0

    def compute(feature_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal calls
        calls += 1
        with open(log, "a") as f:
            f.write(f"{feature_ids[0]}\n")
        if calls == hang_at_call:
            Path(hanging).touch()
            time.sleep(600)
        return toy_logits(teacher_index, feature_ids)

    teacher = TEACHERS[teacher_index]
    Producer(store, teacher, plan, compute, LOOKAHEAD, EPOCHS, poll=0.01, manifest=make_manifest(plan),
             stall_timeout_s=STALL_TIMEOUT_S, student_beats=lambda: [student_heartbeat(store)]).run()


def student_main(store: str, result: str) -> None:
    """The student process: reads every shard of both epochs, checks each row against the
    toy teachers and the files on disk against the look-ahead bound, checkpoints every few
    shards, and writes what it saw to `result`."""
    try:
        plan = make_plan()
        heartbeat = Heartbeat(student_heartbeat(store), "student")
        reader = StoreReader(store, list(TEACHERS), plan, make_manifest(plan), STALL_TIMEOUT_S, "window",
                             lookahead=LOOKAHEAD, heartbeat=heartbeat)
        read, wrong_rows, beyond_window, committed = [], [], [], 0
        for epoch in range(EPOCHS):
            for position in range(len(plan)):
                ids, start, end = reader.get(epoch, position)
                current = plan.global_index(epoch, position)
                for k in range(len(TEACHERS)):
                    expected_start, expected_end = toy_logits(k, ids.tolist())
                    if not (torch.equal(start[k].float(), expected_start) and torch.equal(end[k].float(), expected_end)):
                        wrong_rows.append([TEACHERS[k], epoch, position])
                allowed = needed_shards(plan, committed, current, LOOKAHEAD)
                for teacher in TEACHERS:
                    extra = set(list_shards(Path(store) / teacher)) - allowed
                    if extra:
                        beyond_window.append([teacher, epoch, position, sorted(extra)])
                read.append([epoch, position, ids.tolist()])
                heartbeat.beat(current)
                if (position + 1) % COMMIT_EVERY == 0 or position + 1 == len(plan):
                    reader.commit_progress(epoch, position + 1)
                    committed = plan.global_index(epoch, position + 1)
        heartbeat.beat(state=FINISHED)
        outcome = {"read": read, "wrong_rows": wrong_rows, "beyond_window": beyond_window}
    except Exception:
        outcome = {"error": traceback.format_exc()}
    Path(result).write_text(json.dumps(outcome))


def student_outcome(result: Path) -> dict:
    return json.loads(result.read_text()) if result.exists() else {"error": "the student wrote no result"}


def test_three_producers_and_a_student_through_files(tmp_path):
    plan = make_plan()
    store, result = tmp_path / "store", tmp_path / "result.json"
    hanging, killed = tmp_path / "hanging", tmp_path / "killed"
    logs = {(t, run): tmp_path / f"{t}.{run}.log" for t in TEACHERS for run in (1, 2)}
    ctx = multiprocessing.get_context("spawn")

    def producer(teacher: str, run: int, hang_at_call: int | None, go: Path | None):
        args = (str(store), TEACHERS.index(teacher), str(logs[teacher, run]), hang_at_call, str(hanging), go and str(go))
        return ctx.Process(target=producer_main, args=args)

    producers = {t: producer(t, 1, KILLED_AT_CALL if t == KILLED else None, None) for t in TEACHERS}
    student = ctx.Process(target=student_main, args=(str(store), str(result)))
    restarted = producer(KILLED, 2, None, go=killed)
    processes = [*producers.values(), student, restarted]
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + 90
        while not hanging.exists():
            alive = producers[KILLED].is_alive() and student.is_alive()
            assert alive and time.monotonic() < deadline, f"the producer never reached its hang: {student_outcome(result)}"
            time.sleep(0.02)
        os.kill(producers[KILLED].pid, signal.SIGKILL)
        producers[KILLED].join(10)
        killed.touch()
        student.join(150)
        for process in [p for t, p in producers.items() if t != KILLED] + [restarted]:
            process.join(30)
        assert [p.exitcode for p in processes] == [0, -signal.SIGKILL, 0, 0, 0]
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()

    outcome = student_outcome(result)
    assert "error" not in outcome, outcome["error"]
    assert outcome["wrong_rows"] == [], "every row carries the logits of all K teachers for its feature"
    assert outcome["beyond_window"] == [], "no producer ran more than the look-ahead ahead of the student"
    for epoch in range(EPOCHS):
        ids = [row for e, _, row in outcome["read"] if e == epoch]
        assert ids == [plan.features(s) for s in plan.order(epoch)], "the plan's order, every feature once"

    first_ids = {plan.features(s)[0]: s for s in range(len(plan))}
    computed = {key: [first_ids[int(line)] for line in path.read_text().split()] for key, path in logs.items() if path.exists()}
    total = EPOCHS * len(plan)
    for teacher in TEACHERS:
        if teacher != KILLED:
            assert total - LOOKAHEAD <= len(computed[teacher, 1]) <= total
    before_kill, after_restart = computed[KILLED, 1], computed[KILLED, 2]
    assert len(before_kill) == KILLED_AT_CALL
    assert after_restart[0] == before_kill[-1], "the restarted producer resumes at the shard it was killed in"
    assert len(before_kill) - 1 + len(after_restart) <= total, "no committed shard is computed again"
