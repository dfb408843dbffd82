"""Preemption (SIGTERM) and Slurm's warning (SIGUSR1) reach a training group at any point,
also during its end-of-epoch dev evaluation, which at full scale outlasts a signal's lead
time: the group agrees on the stop between evaluation batches, checkpoints the epoch's
finished steps and exits 0; the same command then evaluates that epoch again and goes on.
A real two-rank gloo world under torchrun (tests/loop_worker.py) and a real signal."""
from __future__ import annotations

import json
import os
import signal

import pytest

from test_group_engines import ROOT, run_world, signal_loop_worker, tags_on_disk

EVAL_ROWS = 200  # 25 batches of 4 per rank
STEPS = 3


@pytest.mark.slow
def test_sigterm_during_the_dev_evaluation_checkpoints_and_the_rerun_evaluates_again(tmp_path):
    loop_worker = ROOT / "tests" / "loop_worker.py"
    args = ["--epochs", "2", "--steps", str(STEPS), "--every", "1000", "--eval-rows", str(EVAL_ROWS)]
    # once the first epoch's evaluation is under way: its heartbeat counts batches
    returncode, output, beat = signal_loop_worker(tmp_path, [*args, "--eval-sleep", "0.2"],
                                                  lambda b: b.get("detail", {}).get("batches", 0) >= 2, signal.SIGTERM)
    assert returncode == 0, output[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for record in records:
        assert record["preempted"].startswith("student: stopped by a signal during the evaluation of epoch 1 "
                                              f"(global step {STEPS})"), record
        assert record["evaluations"] == [], "the evaluation was cut short"
        assert 2 <= record["eval_batches"] < EVAL_ROWS // 2 // 4, "it stopped between batches, not at the end"
        assert record["saves"][-1][0] == STEPS
    assert records[0]["eval_batches"] == records[1]["eval_batches"], "the group agreed on one batch"
    assert tags_on_disk(tmp_path / "ckpt") == [f"step{STEPS}"]
    assert json.loads(beat.read_text())["state"] == "stopped"

    # The requeued job resumes after the epoch's steps: it evaluates epoch 1 again, whole.
    run_world(2, tmp_path, *args, worker=loop_worker, timeout=600)
    resumed = json.loads((tmp_path / "rank0.json").read_text())
    assert resumed["resumed_from"] == f"step{STEPS}"
    assert resumed["evaluations"] == [[0, EVAL_ROWS], [1, EVAL_ROWS]]
    assert resumed["final"]["epoch"] == 2 and resumed["final"]["global_step"] == 2 * STEPS


@pytest.mark.parametrize("signum,requeue", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_the_requeue_marker_follows_the_time_limits_signal_only(tmp_path, monkeypatch, signum, requeue):
    """Both signals stop the run cleanly (exit 0); only USR1 (the time limit) asks the
    Slurm script to requeue: after SIGTERM Slurm requeues a preempted job itself, and a
    cancelled one must stay cancelled."""
    from dist_xqa import train, waiting

    def stopped_run(*_):
        os.kill(os.getpid(), signum)
        raise waiting.Preempted("student: stopped by a signal at global step 3")

    marker = tmp_path / "requeue"
    monkeypatch.setenv(train.REQUEUE_MARKER, str(marker))
    monkeypatch.setattr(train, "run", stopped_run)
    handlers = {s: signal.getsignal(s) for s in waiting.STOP_SIGNALS}
    try:
        train.main([f"run_dir={tmp_path / 'run'}"])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        waiting._stop.clear()
        waiting._stop_signals.clear()
    assert marker.exists() == requeue
