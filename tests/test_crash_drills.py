"""Crash drills: nothing lost, nothing twice. The README's command on 4 CPU ranks (two
teachers, so that phase 2 has a student of 2 ranks and one dedicated producer rank per
teacher), the demo shrunk by overrides, with the student's step trace on
(dist_xqa/roles/trace.py). One rank is killed with SIGKILL at a chosen moment (the
launcher then stops the others), and the same command is run again: it must finish and
evaluate every model, and the student must have gone through exactly the steps of an
uninterrupted run (`reference`): the same features in the same order on every rank, the
same teachers' logits and bitwise the same losses, every feature of D once per epoch.

Bitwise equality holds on CPU with the same thread count in every run (OMP_NUM_THREADS,
ENV): a resumed run restores the model, the optimizer, the data position and each rank's
random state (dropout) from its checkpoint. The fast tests at the end check the trace
file itself."""
from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_xqa.logits.shards import TopKLogits
from dist_xqa.jobs import DISTILL_SET
from dist_xqa.prepared import Prepared
from dist_xqa.roles.student import MicroBatch
from dist_xqa.roles.trace import StepTrace, features_read, last_steps, read_trace, trace_path
from dist_xqa.waiting import read_beat
from tests.test_pipeline_e2e import QUICK, interrupt_job, launch

RANKS = 4
TEACHERS = ("en", "es")
STUDENT_RANKS = 2  # the plan for 4 ranks and 2 teachers: student 0-1, producers 2 and 3
# 27 student steps an epoch (D: 1678 features, 64 a step), a checkpoint every 10
DRILL = (*QUICK, f"strategy.teachers=[{','.join(TEACHERS)}]", "plan.producers=dedicated", "student.epochs=2",
         "student.micro_batch_size=32", "checkpoint.every=10", "run.trace_steps=true")
ENV = {"OMP_NUM_THREADS": "1"}  # the same thread count in every run: the same float sums


def run(run_dir: Path) -> None:
    launch(run_dir, *DRILL, ranks=RANKS, env=ENV)


def kill_rank_when(run_dir: Path, when: Callable[[], bool], heartbeat: Path) -> None:
    """Runs the drill's command into `run_dir` and, as soon as `when()` holds, sends SIGKILL
    to the one rank whose heartbeat file is `heartbeat` (its pid is in it)."""
    def kill(job) -> None:
        os.kill(read_beat(heartbeat).pid, signal.SIGKILL)

    code = interrupt_job(run_dir, *DRILL, when=when, kill=kill, ranks=RANKS, env=ENV)
    assert code != 0, "the job went on without the killed rank"
    assert not (run_dir / "student" / "DONE.json").exists(), "killed too late: the student had finished"


def traced_steps(run_dir: Path, rank: int = 0) -> list[dict]:
    """Every step record of a student rank's trace so far, in file order."""
    path = trace_path(run_dir, rank)
    return [step for _, steps in read_trace(path) for step in steps] if path.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The drills' uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run(run_dir)
    return run_dir


def assert_finished_as(run_dir: Path, reference: Path, models: tuple[str, ...] = ("student",)) -> None:
    """Every model is evaluated, and `models` have bitwise the reference's weights."""
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert sorted(summary) == ["student", *(f"teacher_{t}" for t in TEACHERS)]
    for model in models:
        path = Path(model) / "model.safetensors"
        got, want = load_file(run_dir / path), load_file(reference / path)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), f"{model}: other weights than the uninterrupted run's"


def difference(got: dict, want: dict | None) -> str:
    """How a step record differs from the reference's record of that step."""
    if want is None:
        return "a step the uninterrupted run did not take"
    parts = [f"{key} {got[key]} != {want[key]}" for key in ("epoch", "position") if got[key] != want[key]]
    if len(got["micro"]) != len(want["micro"]):
        parts.append(f"{len(got['micro'])} micro-batches != {len(want['micro'])}")
    for i, (a, b) in enumerate(zip(got["micro"], want["micro"])):
        parts += [f"micro-batch {i}: {key} {a[key]} != {b[key]}" for key in ("weight", "loss") if a[key] != b[key]]
        parts += [f"micro-batch {i}: other {key}" for key in ("features", "logits") if a[key] != b[key]]
    return "; ".join(parts)


def assert_same_student_steps(run_dir: Path, reference: Path) -> None:
    """Every step record of every student rank, in every run into `run_dir` (the killed
    one and its replays included), equals the reference's record of that step: the same
    features in the same order (the shard order after resuming included), the same
    teachers' logits, bitwise the same loss; and no step of the reference is missing."""
    for rank in range(STUDENT_RANKS):
        want = last_steps(trace_path(reference, rank))
        for number, (_, steps) in enumerate(read_trace(trace_path(run_dir, rank)), 1):
            for step in steps:
                assert step == want.get(step["step"]), \
                    f"student rank {rank}, run {number}, step {step['step']}: {difference(step, want.get(step['step']))}"
        assert sorted(last_steps(trace_path(run_dir, rank))) == sorted(want), f"student rank {rank}: steps lost"


def assert_every_feature_once_per_epoch(run_dir: Path) -> None:
    """Counted from the trace (each step's last record, on every student rank): each epoch
    trains on every feature of D exactly once, each row with the logits of every teacher."""
    features = Counter(int(f) for f in Prepared(run_dir).features(DISTILL_SET)["feature_id"])
    read = features_read(run_dir)
    assert sorted(read) == [0, 1]
    for epoch, counts in read.items():
        assert counts == features, (f"epoch {epoch}: read more than once {sorted(counts - features)[:5]}, "
                                    f"never read {sorted(features - counts)[:5]}")
    for rank in range(STUDENT_RANKS):
        for step in last_steps(trace_path(run_dir, rank)).values():
            assert all(len(row) == len(TEACHERS) for micro in step["micro"] for row in micro["logits"]), \
                f"student rank {rank}, step {step['step']}: a row without every teacher's logits"


@pytest.mark.drill
def test_a_killed_student_rank_resumes_step_for_step(reference, tmp_path):
    """Student rank 0 is killed in its second epoch, at least two steps after a checkpoint
    taken inside that epoch: the rerun resumes from the checkpoint, replays those steps and
    goes on exactly as the uninterrupted run."""
    run_dir = tmp_path / "run"
    latest = run_dir / "checkpoints" / "student" / "latest"

    def past_a_mid_epoch_checkpoint() -> bool:
        steps = traced_steps(run_dir)
        try:
            saved = int(latest.read_text().removeprefix("step"))
        except (FileNotFoundError, ValueError):  # not yet, or being written
            return False
        by_step = {s["step"]: s for s in steps}
        return saved - 1 in by_step and by_step[saved - 1]["epoch"] == 1 and steps[-1]["step"] >= saved + 1

    kill_rank_when(run_dir, past_a_mid_epoch_checkpoint, run_dir / "heartbeats" / "student.0.json")
    run(run_dir)

    for rank in range(STUDENT_RANKS):
        (_, killed), (_, resumed) = read_trace(trace_path(run_dir, rank))
        assert killed[0]["step"] == 0 and resumed[0]["epoch"] == 1 and resumed[0]["position"] > 0, \
            f"rank {rank} did not resume inside epoch 2: {resumed[0]['step']}"
        assert resumed[0]["step"] < killed[-1]["step"], f"rank {rank}: no step after the checkpoint was replayed"
    assert_same_student_steps(run_dir, reference)
    assert_every_feature_once_per_epoch(run_dir)
    assert_finished_as(run_dir, reference)


@pytest.mark.drill
def test_a_killed_dedicated_producer_rank_is_rerun(reference, tmp_path):
    """The producer rank of one teacher (a dedicated rank: the student never runs it) is
    killed in the student's first epoch; the rerun produces the missing shards again and
    the student goes through the uninterrupted run's steps."""
    run_dir = tmp_path / "run"

    def mid_first_epoch() -> bool:
        steps = traced_steps(run_dir)
        return bool(steps) and steps[-1]["step"] >= 15 and steps[-1]["epoch"] == 0

    kill_rank_when(run_dir, mid_first_epoch, run_dir / "logits" / TEACHERS[1] / "heartbeat.json")
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "producers on dedicated ranks" in log
    run(run_dir)

    assert_same_student_steps(run_dir, reference)
    assert_every_feature_once_per_epoch(run_dir)
    assert_finished_as(run_dir, reference)


@pytest.mark.drill
def test_a_killed_teacher_rank_is_rerun(reference, tmp_path):
    """A rank of one teacher's group is killed in phase 1 after the group's first
    checkpoint; the rerun resumes that teacher and trains every model as the
    uninterrupted run did."""
    run_dir = tmp_path / "run"
    teacher = f"teacher_{TEACHERS[1]}"
    latest = run_dir / "checkpoints" / teacher / "latest"
    kill_rank_when(run_dir, latest.exists, run_dir / "heartbeats" / f"{teacher}.0.json")
    assert not (run_dir / "teachers" / TEACHERS[1] / "DONE.json").exists(), "killed too late: the teacher had finished"
    run(run_dir)

    logs = "".join(path.read_text() for path in (run_dir / "logs").glob("rank*.log"))  # the group's ranks log it
    assert f"{TEACHERS[1]}: resumed from" in logs
    assert_finished_as(run_dir, reference, models=("student", *(f"teachers/{t}" for t in TEACHERS)))
    assert_same_student_steps(run_dir, reference)


def step_micro(rows: list[int], weight: float = 1.0, topk: bool = False) -> MicroBatch:
    """A micro-batch of `rows` (feature ids) with 2 teachers' logits (bfloat16: no numpy
    dtype), each row's its own, dense or in top-k form."""
    n, length = len(rows), 3
    start = torch.arange(2 * n * length, dtype=torch.bfloat16).reshape(2, n, length)
    end = -start
    if topk:
        start, end = (TopKLogits(x[..., :2], torch.zeros(2, n, 2, dtype=torch.int16), x[..., 2].float(), length)
                      for x in (start, end))
    labels = torch.zeros(n, dtype=torch.long)
    return MicroBatch({"input_ids": torch.ones(n, length, dtype=torch.long)}, torch.ones(n, length, dtype=torch.bool),
                      labels, labels, labels, torch.arange(n), weight, torch.tensor(rows), start, end)


def test_a_resumed_trace_keeps_the_last_record_of_each_step(tmp_path):
    """A run killed mid-line, then a resumed run that replays step 1: the torn line is
    skipped, both runs are read with their start records, the last record of each step
    wins (and is the one counted as read), and losses and logit checksums come back
    exactly."""
    path = tmp_path / "trace" / "student.0.jsonl"
    first = StepTrace(path, ["en", "es"])
    first.record(0, 0, 0, [step_micro([7, 8])], [torch.tensor(0.1)])
    first.record(1, 0, 1, [step_micro([9]), step_micro([9], weight=0.0)], [torch.tensor(0.2), torch.tensor(0.3)])
    first.close()
    with path.open("a") as torn:
        torn.write('{"step": 2, "epo')  # SIGKILL mid-write
    second = StepTrace(path, ["en", "es"])
    second.record(1, 0, 1, [step_micro([9]), step_micro([9], weight=0.0)], [torch.tensor(0.25), torch.tensor(0.3)])
    second.close()

    runs = read_trace(path)
    assert [start["teachers"] for start, _ in runs] == [["en", "es"]] * 2
    assert [[s["step"] for s in steps] for _, steps in runs] == [[0, 1], [1]]
    steps = last_steps(path)
    assert sorted(steps) == [0, 1]
    assert float.fromhex(steps[1]["micro"][0]["loss"]) == float(torch.tensor(0.25))
    assert steps[0]["micro"][0]["features"] == [7, 8] and steps[1]["micro"][1]["weight"] == 0.0
    assert runs[0][1][1] != steps[1]
    # the replayed step counts once; the borrowed row (weight 0) not at all
    assert features_read(tmp_path) == {0: Counter({7: 1, 8: 1, 9: 1})}
    logits = steps[0]["micro"][0]["logits"]
    assert len(logits) == 2 and all(len(row) == 2 for row in logits)  # 2 rows x 2 teachers
    assert len({c for row in logits for c in row}) == 4  # different logits, different checksums


def test_a_line_torn_inside_a_run_is_an_error(tmp_path):
    path = tmp_path / "student.0.jsonl"
    trace = StepTrace(path, ["en"])
    trace.record(0, 0, 0, [step_micro([1, 2], topk=True)], [torch.tensor(1.0)])
    trace.close()
    logits = last_steps(path)[0]["micro"][0]["logits"]
    assert len({c for row in logits for c in row}) == 4  # 2 rows x 2 teachers, in top-k form
    path.write_text(path.read_text() + '{"step": 1\n' + path.read_text().splitlines()[1] + "\n")
    with pytest.raises(ValueError, match=r"student.0.jsonl:3: not a trace record"):
        read_trace(path)
