"""Heartbeats and stall detection across real processes: a waiter waits as long as the
awaited role's heartbeat file moves (longer than the stall timeout), stops when it stops
(the role hangs or is killed) or says it failed, naming the role, its last step and its
log; a producer stops when its student dies; a stale progress file never makes a
producer think it is done."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import traceback
from pathlib import Path

import pytest

from dist_xqa.logits import Producer, ShardPlan, StoreReader
from dist_xqa.logits.progress import StudentProgress, heartbeat_path, write_progress
from dist_xqa.waiting import (FAILED, FINISHED, STOPPED, WAITING, Heartbeat, Preempted, StallWatch, Stalled,
                              install_stop_signal, read_beat, role_heartbeat, wait_for_run_files)
from test_logit_store import make_manifest, toy_logits

CTX = multiprocessing.get_context("spawn")
STALL_S = 1.0


def beater(path: str, role: str, log: str, seconds: float, then: str, done: str) -> None:
    """A role at work: beats every 0.1 s (a new step each time) until `seconds` after a
    waiter has started (its `<done>.waiting` file), then
    `then`: writes `done` and exits (finish), stops beating but lives (hang: a rank stuck
    in a collective), or raises inside its guard (fail)."""
    heartbeat = Heartbeat(path, role, interval_s=0.05, log=log)
    with heartbeat.guard():
        step, end = 0, None
        while end is None or time.monotonic() < end:
            step += 1
            heartbeat.beat(step)
            time.sleep(0.1)
            if end is None and Path(f"{done}.waiting").exists():
                end = time.monotonic() + seconds
        if then == "fail":
            raise RuntimeError("CUDA out of memory in step 7")
        if then == "hang":
            time.sleep(600)
        Path(done).write_text("saved")


def waiter(run_dir: str, done: str, stall_s: float, outcome: str) -> None:
    """The evaluator's wait for a model: wait_for_run_files, once the role has started
    (a spawned process takes seconds to import torch); writes what happened."""
    while not list(Path(run_dir).glob("heartbeats/*.json")):
        time.sleep(0.01)
    began = time.monotonic()
    Path(f"{done}.waiting").touch()
    try:
        wait_for_run_files(run_dir, [Path(done)], stall_s, "evaluator waiting for model teacher_es", poll_s=0.05)
        result = {"ok": True}
    except Stalled as e:
        result = {"ok": False, "message": str(e)}
    result["waited"] = time.monotonic() - began
    Path(outcome).write_text(json.dumps(result))


def start(target, *args) -> multiprocessing.Process:
    process = CTX.Process(target=target, args=tuple(str(a) if isinstance(a, Path) else a for a in args))
    process.start()
    return process


def outcome_of(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"ok": None, "message": "no outcome written"}


def wait_for_step(beat: Path, step: int, process: multiprocessing.Process) -> None:
    """Until the process behind `beat` has beaten `step` (spawned processes take seconds
    to import torch)."""
    deadline = time.monotonic() + 60
    while (found := read_beat(beat)) is None or found.step < step:
        assert process.is_alive() and time.monotonic() < deadline, f"{beat} never reached step {step}"
        time.sleep(0.02)


def stop(*processes: multiprocessing.Process) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join(10)


def test_a_moving_heartbeat_is_waited_for_longer_than_the_stall_timeout(tmp_path):
    beat, done, outcome = role_heartbeat(tmp_path, "teacher_es", 0), tmp_path / "DONE.json", tmp_path / "out.json"
    role = start(beater, beat, "teacher_es", tmp_path / "rank2.log", 4 * STALL_S, "finish", done)
    wait = start(waiter, tmp_path, done, STALL_S, outcome)
    try:
        wait.join(60)
        assert wait.exitcode == 0
    finally:
        stop(role, wait)
    result = outcome_of(outcome)
    assert result["ok"], result
    assert result["waited"] >= 3.5 * STALL_S, "healthy progress has no wall-clock limit"


@pytest.mark.parametrize("how", ["hang", "kill"])
def test_a_heartbeat_that_stops_ends_the_wait_naming_role_step_and_log(tmp_path, how):
    beat, done, outcome = role_heartbeat(tmp_path, "teacher_es", 0), tmp_path / "DONE.json", tmp_path / "out.json"
    role = start(beater, beat, "teacher_es", tmp_path / "rank2.log", 1.0 if how == "hang" else 600, "hang", done)
    wait = start(waiter, tmp_path, done, STALL_S, outcome)
    try:
        if how == "kill":
            wait_for_step(beat, 5, role)
            while not Path(f"{done}.waiting").exists():
                time.sleep(0.02)
            os.kill(role.pid, signal.SIGKILL)
        wait.join(60)
        assert wait.exitcode == 0
    finally:
        stop(role, wait)
    result, last = outcome_of(outcome), read_beat(beat)
    assert result["ok"] is False, result
    assert STALL_S < result["waited"] < 1.0 + STALL_S + 10
    message = result["message"]
    assert message.startswith("evaluator waiting for model teacher_es (missing [") and str(done) in message
    assert "no heartbeat has moved for" in message and "run.stall_timeout_s = 1" in message
    assert f"teacher_es: working at step {last.step}," in message and last.step > 3
    assert f"log {tmp_path / 'rank2.log'}" in message and f"pid {role.pid}" in message


def test_a_failed_role_ends_the_wait_at_once(tmp_path):
    beat, done, outcome = role_heartbeat(tmp_path, "teacher_es", 0), tmp_path / "DONE.json", tmp_path / "out.json"
    role = start(beater, beat, "teacher_es", tmp_path / "rank2.log", 2.0, "fail", done)
    wait = start(waiter, tmp_path, done, 60.0, outcome)
    try:
        wait.join(60)
    finally:
        stop(role, wait)
    result = outcome_of(outcome)
    assert result["ok"] is False and result["waited"] < 30, result
    assert "teacher_es failed" in result["message"] and "CUDA out of memory in step 7" in result["message"]
    assert read_beat(beat).state == FAILED


def test_a_failed_beat_left_by_an_earlier_run_is_not_news(tmp_path):
    beat = role_heartbeat(tmp_path, "teacher_es", 0)
    Heartbeat(beat, "teacher_es").fail(RuntimeError("the earlier run's crash"))
    time.sleep(0.05)
    watch = StallWatch(lambda: [beat], 5.0, "waiting")
    watch.check()  # the old failure does not stop a new wait
    Heartbeat(beat, "teacher_es").beat(1)
    assert not watch.finished(watch.check())
    Heartbeat(beat, "teacher_es").beat(2, FINISHED)
    assert watch.finished(watch.check())


def test_a_role_that_never_beat_stalls_after_the_timeout(tmp_path):
    watch = StallWatch(lambda: [], 0.2, "phase 2 waiting for the teachers", expected=["teacher_de"])
    watch.check()
    time.sleep(0.3)
    with pytest.raises(Stalled, match="phase 2 waiting for the teachers: no heartbeat has moved.*teacher_de: no heartbeat"):
        watch.check()


# --- producers and the student ----------------------------------------------------------


def make_plan() -> ShardPlan:
    return ShardPlan(range(100, 124), shard_size=4, seed=5)  # 6 shards


def producer_main(store: str, student_beat: str, stall_s: float, outcome: str) -> None:
    try:
        plan = make_plan()
        written = Producer(store, "en", plan, lambda ids: toy_logits(0, ids), lookahead=2, epochs=1, poll=0.02,
                           manifest=make_manifest(plan, teachers=("en",)), stall_timeout_s=stall_s,
                           student_beats=lambda: [Path(student_beat)]).run()
        result = {"ok": True, "written": written}
    except Exception as e:
        result = {"ok": False, "error": type(e).__name__, "message": str(e), "trace": traceback.format_exc()}
    Path(outcome).write_text(json.dumps(result))


def student_main(student_beat: str, then: str, go: str) -> None:
    """A student that beats a step every 0.1 s until `go` exists (its producer is up),
    then dies (hangs until killed from outside) or fails."""
    heartbeat = Heartbeat(student_beat, "student", interval_s=0.05, log="/run/logs/rank0.log")
    with heartbeat.guard():
        step = 0
        while not Path(go).exists():
            step += 1
            heartbeat.beat(step)
            time.sleep(0.1)
        if then == "fail":
            raise RuntimeError("loss is NaN")
        time.sleep(600)


@pytest.mark.parametrize("how", ["killed", "failed"])
def test_a_producer_stops_when_its_student_dies(tmp_path, how):
    store, student_beat, outcome = tmp_path / "store", tmp_path / "student.0.json", tmp_path / "out.json"
    go = tmp_path / "go"
    stall_s = STALL_S if how == "killed" else 60.0
    student = start(student_main, student_beat, "hang" if how == "killed" else "fail", go)
    producer = start(producer_main, store, student_beat, stall_s, outcome)
    try:
        wait_for_step(student_beat, 1, student)
        wait_for_step(heartbeat_path(store, "en"), 0, producer)  # the producer watches the student now
        go.touch()
        if how == "killed":
            os.kill(student.pid, signal.SIGKILL)
        producer.join(60)
        assert producer.exitcode == 0
    finally:
        stop(student, producer)
    result, last = outcome_of(outcome), read_beat(student_beat)
    assert result["ok"] is False and result["error"] == "StoreTimeout", result
    assert result["message"].startswith("producer en waiting for the student (student at epoch 0 position 0)")
    assert f"student: {last.state} at step {last.step}," in result["message"] and last.step >= 1
    assert "log /run/logs/rank0.log" in result["message"]
    assert ("no heartbeat has moved" if how == "killed" else "student failed") in result["message"]
    assert ("loss is NaN" in result["message"]) == (how == "failed")


def stopping_producer_main(store: str, student_beat: str, outcome: str) -> None:
    """A producer on a rank that gets SIGUSR1 (as under Slurm): it serves until the
    student says it stopped, then stops too."""
    install_stop_signal()
    try:
        plan = make_plan()
        Producer(store, "en", plan, lambda ids: toy_logits(0, ids), lookahead=2, epochs=1, poll=0.02,
                 manifest=make_manifest(plan, teachers=("en",)), stall_timeout_s=60.0,
                 student_beats=lambda: [Path(student_beat)]).run()
        result = {"ok": True}
    except Exception as e:
        result = {"ok": False, "error": type(e).__name__, "message": str(e)}
    Path(outcome).write_text(json.dumps(result))


def test_a_signalled_producer_keeps_serving_until_its_student_has_stopped(tmp_path):
    store, student_beat, outcome = tmp_path / "store", tmp_path / "student.0.json", tmp_path / "out.json"
    heartbeat = Heartbeat(student_beat, "student")
    heartbeat.beat(0)
    producer = start(stopping_producer_main, store, student_beat, outcome)
    try:
        # its signal handler is in place and the window of 2 shards written
        wait_for_step(heartbeat_path(store, "en"), 2, producer)
        os.kill(producer.pid, signal.SIGUSR1)
        time.sleep(1.0)
        assert producer.is_alive() and not outcome.exists(), "the student has not stopped yet"
        with heartbeat.guard():
            heartbeat.beat(1)
            raise Preempted("student: stopped by a signal at global step 1")
    except Preempted:
        producer.join(60)
    finally:
        stop(producer)
    assert read_beat(student_beat).state == "stopped"
    result = outcome_of(outcome)
    assert result == {"ok": False, "error": "Preempted",
                      "message": "producer en: stopped by a signal after the student"}, result


def test_a_stale_progress_file_never_finishes_a_producer(tmp_path):
    """The store holds an earlier run's progress (the whole epoch read and committed) but
    none of its shards: the producer still writes every shard the new student reads."""
    plan = make_plan()
    store, student_beat, outcome = tmp_path / "store", tmp_path / "student.0.json", tmp_path / "out.json"
    manifest = make_manifest(plan, teachers=("en",))
    Producer(store, "en", plan, lambda ids: toy_logits(0, ids), lookahead=2, epochs=1, manifest=manifest)
    write_progress(store, plan, StudentProgress(len(plan), len(plan)))
    heartbeat = Heartbeat(student_beat, "student")
    heartbeat.beat(0)
    producer = start(producer_main, store, student_beat, 30.0, outcome)
    try:
        # The producer has read the stale progress (and said so) before the student starts.
        wait_for_step(heartbeat_path(store, "en"), len(plan), producer)
        assert read_beat(heartbeat_path(store, "en")).state == "waiting"
        reader = StoreReader(store, ["en"], plan, manifest, 30.0, "window", lookahead=2, heartbeat=heartbeat)
        for position in range(len(plan)):
            assert reader.get(0, position).feature_ids.tolist() == plan.features(plan.order(0)[position])
            heartbeat.beat(position + 1)
        heartbeat.beat(state=FINISHED)
        producer.join(60)
    finally:
        stop(producer)
    result = outcome_of(outcome)
    assert result == {"ok": True, "written": len(plan)}, result


# --- what counts as progress -------------------------------------------------------------


def test_an_idle_beat_is_no_progress_where_progress_is_owed(tmp_path):
    """A role that rewrites an unchanged beat (it waits itself) is alive: a watch that
    counts idle beats waits on; one that needs progress stalls; a new step, state or
    detail is progress for both."""
    beat = tmp_path / "heartbeat.json"
    heartbeat = Heartbeat(beat, "producer en", interval_s=0.0)
    heartbeat.beat(4, WAITING, position=4)
    alive = StallWatch(lambda: [beat], 0.5, "waiting")
    owed = StallWatch(lambda: [beat], 0.5, "student waiting for shard 3", count_idle=False)
    for watch in (alive, owed):
        watch.check()
    end = time.monotonic() + 0.8
    while time.monotonic() < end:  # idle beats, rewritten unchanged
        heartbeat.beat(4, WAITING, position=4)
        alive.check()
        time.sleep(0.05)
    with pytest.raises(Stalled, match=r"student waiting for shard 3: no heartbeat has moved for .*"
                                      r"an idle beat rewritten unchanged being no progress.*producer en: waiting at step 4"):
        owed.check()
    owed = StallWatch(lambda: [beat], 0.5, "student waiting for shard 3", count_idle=False)
    for step in range(5, 12):  # a moving step keeps the wait alive past the stall timeout
        heartbeat.beat(step, "computing", position=step)
        owed.check()
        time.sleep(0.1)


def test_a_finished_beat_written_before_the_wait_began_still_finishes_it(tmp_path):
    """A producer started after its student finished (a cache-mode rerun) stops at once
    instead of waiting the stall timeout and failing a finished job; a `stopped` beat left
    by the preempted job is the point a requeued student resumes from, not a finish."""
    student_beat, store = tmp_path / "student.0.json", tmp_path / "store"
    plan = make_plan()

    def producer() -> Producer:
        return Producer(store, "en", plan, lambda ids: toy_logits(0, ids), lookahead=2, epochs=1, poll=0.02,
                        manifest=make_manifest(plan, teachers=("en",)), stall_timeout_s=30.0,
                        student_beats=lambda: [student_beat])

    Heartbeat(student_beat, "student").beat(12, STOPPED)
    time.sleep(0.05)
    stopped = producer()
    while stopped.step():  # the window
        pass
    assert not stopped.wait_for_student(), "an earlier job's stop does not end this job's producer"
    Heartbeat(student_beat, "student").beat(12, FINISHED)
    time.sleep(0.05)
    began = time.monotonic()
    assert producer().run() == 0, "the window of the finished job is on disk already"
    assert time.monotonic() - began < 10


def owing_reader_main(store: str, student_beat: str, position: int, stall_s: float, writer: bool,
                      outcome: str) -> None:
    """A student rank reading epoch 0 up to `position` (its heartbeat beats while it waits);
    writes what happened."""
    began = time.monotonic()
    try:
        plan = make_plan()
        reader = StoreReader(store, ["en"], plan, make_manifest(plan, teachers=("en",)), stall_s, "window",
                             lookahead=2, writer=writer, heartbeat=Heartbeat(student_beat, "student"))
        for p in range(position + 1):
            reader.get(0, p)
        result = {"ok": True}
    except Exception as e:
        result = {"ok": False, "error": type(e).__name__, "message": str(e)}
    result["waited"] = time.monotonic() - began
    Path(outcome).write_text(json.dumps(result))


def test_a_student_stalls_on_a_producer_that_only_beats_idle(tmp_path):
    """The student waits for a shard its producer believes it need not write (a
    non-writing student rank: nobody moves the progress file past the first window). The
    producer is alive and rewrites its idle beat every second, which is no progress: the
    student stops after the stall timeout, naming the producer's idle state."""
    store, student_beat, outcome = tmp_path / "store", tmp_path / "student.1.json", tmp_path / "out.json"
    producer = start(producer_main, store, student_beat, 60.0, tmp_path / "producer.json")
    reader = None
    try:
        Heartbeat(student_beat, "student").beat(0)  # the student is up before its producer watches it
        wait_for_step(heartbeat_path(store, "en"), 2, producer)  # the first window [0, 2) is written
        reader = start(owing_reader_main, store, student_beat, 3, STALL_S, False, outcome)
        reader.join(60)
        assert reader.exitcode == 0
        assert producer.is_alive(), "the producer was alive and beating all along"
    finally:
        stop(producer, *([reader] if reader else []))
    result = outcome_of(outcome)
    assert result["ok"] is False and result["error"] == "StoreTimeout", result
    assert STALL_S < result["waited"] < STALL_S + 20
    assert "an idle beat rewritten unchanged being no progress" in result["message"]
    assert "producer en: waiting at step 2" in result["message"]


def part_main(store: str, part: int, student_beat: str, compute_s: float, outcome: str) -> None:
    """Part `part` of 2 of teacher en's producer; each shard takes `compute_s`."""
    def compute(ids: list[int]):
        time.sleep(compute_s)
        return toy_logits(0, ids)

    try:
        plan = make_plan()
        Producer(store, "en", plan, compute, lookahead=2, epochs=1, poll=0.02,
                 manifest=make_manifest(plan, teachers=("en",)), stall_timeout_s=60.0,
                 student_beats=lambda: [Path(student_beat)], part=(part, 2)).run()
        result = {"ok": True}
    except Exception as e:
        result = {"ok": False, "error": type(e).__name__, "message": str(e)}
    Path(outcome).write_text(json.dumps(result))


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_dead_part_of_a_teacher_stops_the_student_while_the_other_part_beats(tmp_path, how):
    """Teacher en is produced by two parts (odd and even run-wide shards). Part 1 is
    killed (or stops for good) after its first shard; part 0 lives on, beating. The
    student stops once it waits for a shard of part 1, naming part 1 alone."""
    store, student_beat, outcome = tmp_path / "store", tmp_path / "student.0.json", tmp_path / "out.json"
    stall_s = 3.0
    Heartbeat(student_beat, "student").beat(0)
    parts = [start(part_main, store, 0, student_beat, 0.1, tmp_path / "part0.json"),
             start(part_main, store, 1, student_beat, 0.1 if how == "kill" else 600.0, tmp_path / "part1.json")]
    reader = None
    try:
        for part in (0, 1):
            wait_for_step(heartbeat_path(store, "en", (part, 2)), part, parts[part])
        if how == "kill":
            part1 = heartbeat_path(store, "en", (1, 2))
            while (beat := read_beat(part1)) is None or beat.detail.get("shards_written", 0) < 1:
                assert parts[1].is_alive()
                time.sleep(0.01)
            os.kill(parts[1].pid, signal.SIGKILL)
        reader = start(owing_reader_main, store, student_beat, 5, stall_s, True, outcome)
        reader.join(120)
        assert reader.exitcode == 0
        assert parts[0].is_alive(), "part 0 beat all along"
    finally:
        stop(*parts, *([reader] if reader else []))
    result = outcome_of(outcome)
    assert result["ok"] is False and result["error"] == "StoreTimeout", result
    assert result["waited"] < stall_s + 60
    message = result["message"]
    assert "from teacher(s) en: no heartbeat has moved" in message
    assert "producer en part 1 of 2: " in message and "producer en part 0 of 2" not in message
    assert f"pid {parts[1].pid}" in message
