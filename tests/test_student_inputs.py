"""The student's step inputs and scalars (dist_xqa/roles/student.py StudentInputs,
ShardBatches, StudentScalars; dist_xqa/logits/reader.py ReadAhead; dist_xqa/monitor.py
DeviceScalars): the read-ahead thread gives the student exactly the rows and teacher
logits the step-by-step assembly gave, its errors (a stalled producer's included) are
raised in the student's thread, and a real student loop reads nothing back to the host
except at its logging (and stop-check) steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from dist_xqa.inference import label_tensors, model_inputs
from dist_xqa.logits import Producer, ShardPlan, StoreReader
from dist_xqa.logits.order import rank_rows
from dist_xqa.logits.progress import StoreTimeout
from dist_xqa.logits.reader import ReadAhead
from dist_xqa.monitor import DeviceScalars, Monitor
from dist_xqa.roles.student import ShardBatches, StudentInputs, micro_batch_plan
from test_logit_store import SEQ_LEN, TEACHERS, make_manifest, toy_logits

ROOT = Path(__file__).resolve().parents[1]
LANGS = ["de", "en", "es"]


def toy_features(n: int, first_id: int = 1000) -> Dataset:
    """n features of length SEQ_LEN with distinct tokens, masks and labels (inside the
    mask) per row."""
    rng = np.random.default_rng(3)
    mask = rng.random((n, SEQ_LEN)) < 0.6
    mask[:, 0] = True
    start = np.array([rng.choice(np.flatnonzero(row)) for row in mask])
    end = np.array([rng.choice(np.flatnonzero(row[s:])) + s for row, s in zip(mask, start)])
    return Dataset.from_dict({
        "feature_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "input_ids": rng.integers(5, 50, (n, SEQ_LEN)), "attention_mask": np.ones((n, SEQ_LEN), np.int64),
        "token_type_ids": rng.integers(0, 2, (n, SEQ_LEN)), "answer_mask": mask.astype(np.int8),
        "start_positions": start, "end_positions": end,
        "context_lang": [LANGS[i % 3] for i in range(n)],
    })


def fill_store(store: Path, plan: ShardPlan, teachers=TEACHERS) -> None:
    """Every shard of one epoch, written by real producers of the toy teachers."""
    for k, teacher in enumerate(TEACHERS):
        if teacher in teachers:
            producer = Producer(store, teacher, plan, lambda ids, k=k: toy_logits(k, ids), len(plan), 1,
                                manifest=make_manifest(plan))
            while producer.step():
                pass


def test_the_read_ahead_gives_the_rows_and_logits_of_the_step_by_step_assembly(tmp_path):
    """Every rank of a group of 3, 2 micro-batches a step, a short last shard (a rank
    without rows steps on a borrowed row with weight 0): the same tensors as the former
    per-step assembly (model_inputs, label_tensors, the shard's logit columns)."""
    features = toy_features(10)
    ids = [int(f) for f in features["feature_id"]]
    row_of = {f: i for i, f in enumerate(ids)}
    plan = ShardPlan(ids, shard_size=4, seed=5)  # shards of 4, 4, 2
    fill_store(tmp_path, plan)
    size, grad_accum = 3, 2
    for rank in range(size):
        reader = StoreReader(tmp_path, list(TEACHERS), plan, make_manifest(plan), 30.0, "window",
                             lookahead=len(plan), writer=rank == 0)
        inputs = StudentInputs(lambda epoch: ShardBatches(features, plan, epoch, rank, size, grad_accum, LANGS),
                               reader, torch.device("cpu"), workers=0)
        try:
            for position in range(len(plan)):
                got = inputs.get(0, position)
                shard = plan.features(plan.shard_at(plan.global_index(0, position)))
                part = rank_rows(len(shard), rank, size)
                mine = [row_of[f] for f in shard[part]] or [row_of[shard[0]]]
                offset = part.start if len(shard[part]) else 0
                expected = micro_batch_plan(len(shard[part]), len(shard), size, grad_accum)
                assert got.position == position and got.rows == len(shard)
                assert [m.weight for m in got.micro] == [w for _, w in expected]
                for m, (micro, _) in zip(got.micro, expected):
                    rows = [mine[i] for i in micro]
                    want = model_inputs(features, rows, torch.device("cpu"))
                    assert m.inputs.keys() == want.keys()
                    for key in want:
                        assert torch.equal(m.inputs[key], want[key]) and m.inputs[key].dtype == want[key].dtype
                    for a, b in zip((m.mask, m.start, m.end), label_tensors(features, rows, torch.device("cpu"))):
                        assert torch.equal(a, b) and a.dtype == b.dtype
                    assert [LANGS[c] for c in m.langs.tolist()] == [features[r]["context_lang"] for r in rows]
                    for k in range(len(TEACHERS)):
                        start, end = toy_logits(k, [ids[r] for r in rows])
                        assert torch.equal(m.teacher_start[k].float(), start)
                        assert torch.equal(m.teacher_end[k].float(), end)
                    assert m.shard_rows.tolist() == [offset + i for i in micro]
        finally:
            inputs.close()


def test_an_error_in_the_read_ahead_thread_is_raised_by_the_consumer():
    def produce(idle):
        yield 1
        yield 2
        raise ValueError("shard 3 is broken")

    with ReadAhead(produce, depth=1) as ahead:
        assert [ahead.next(), ahead.next()] == [1, 2]
        with pytest.raises(ValueError, match="shard 3 is broken"):
            ahead.next()
        with pytest.raises(StopIteration):
            ahead.next()


def test_a_stalled_producer_stops_the_student_naming_it_and_the_thread_ends(tmp_path):
    """Teacher de's producer never writes: the read-ahead's wait gives up after the stall
    timeout with the producer's role in the message, raised by the student's get, while
    the student's thread keeps beating (while_waiting) meanwhile; then no thread is left."""
    features = toy_features(8)
    plan = ShardPlan([int(f) for f in features["feature_id"]], shard_size=4, seed=5)
    fill_store(tmp_path, plan, teachers=("en", "es"))
    reader = StoreReader(tmp_path, list(TEACHERS), plan, make_manifest(plan), 0.5, "window",
                         lookahead=len(plan))
    inputs = StudentInputs(lambda epoch: ShardBatches(features, plan, epoch, 0, 1, 1, LANGS), reader,
                           torch.device("cpu"), workers=0)
    waits = []

    def waiting() -> bool:
        waits.append(1)
        return False  # did no work

    try:
        with pytest.raises(StoreTimeout, match="teacher\\(s\\) de.*producer de: no heartbeat"):
            inputs.get(0, 0, while_waiting=waiting)
    finally:
        inputs.close()
    assert waits, "the student's thread ran while_waiting (its heartbeat) during the wait"
    assert not [t for t in threading.enumerate() if t.name.startswith("student read-ahead")]


def test_closing_stops_a_thread_that_waits_for_a_shard(tmp_path):
    features = toy_features(8)
    plan = ShardPlan([int(f) for f in features["feature_id"]], shard_size=4, seed=5)
    fill_store(tmp_path, plan, teachers=("en", "es"))
    reader = StoreReader(tmp_path, list(TEACHERS), plan, make_manifest(plan), 600.0, "window",
                         lookahead=len(plan))

    def produce(idle):
        yield reader.get(0, 0, while_waiting=idle)

    ahead = ReadAhead(produce, depth=1, name="waiting read-ahead")
    ahead.close()  # within one poll of the reader's wait, not after the 600 s stall timeout
    assert "waiting read-ahead" not in [t.name for t in threading.enumerate()]


def logged(run_dir: Path, role: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tb" / role))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_device_scalars_log_the_mean_since_the_last_flush_of_present_values_only(tmp_path):
    monitor = Monitor(tmp_path, "student", enabled=True, every=2)
    scalars = DeviceScalars(monitor)
    tags = ("kd/de", "kd/en", "kd/es")
    scalars.add("nll", torch.tensor(1.0))
    scalars.add("nll", torch.tensor(3.0))
    scalars.add_each(tags, torch.tensor([1.0, 2.0, 0.0]), torch.tensor([True, True, False]))
    scalars.add_each(tags, torch.tensor([5.0, 0.0, 0.0]), torch.tensor([True, False, False]))
    assert scalars.due(4) and not scalars.due(3)
    scalars.flush(4)
    scalars.add("nll", torch.tensor(7.0))
    scalars.flush(6)
    monitor.close()
    assert logged(tmp_path, "student") == {"nll": [(4, 2.0), (6, 7.0)], "kd/de": [(4, 3.0)], "kd/en": [(4, 2.0)]}


def test_a_student_loop_reads_back_to_the_host_only_at_logging_and_stop_check_steps(tmp_path):
    """A real student loop (DeepSpeed engine, GroupLoop, StudentTrainStep over a filled
    store, in a subprocess: tests/student_sync_worker.py) with every host read (item, cpu,
    tolist, numpy, bool/float/int of a tensor...) made from the project's code recorded by
    step."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = tmp_path / "syncs.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "student_sync_worker.py"), str(tmp_path), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    every, stop_every, steps = result["every"], result["stop_check_every"], result["steps"]
    by_step = {int(step): origins for step, origins in result["syncs"].items()}
    assert set(by_step) <= set(range(steps))
    for step in range(steps):
        # the span-label check reads its verdict only for CPU tensors (on an accelerator
        # it is asserted on the device): the one read a CPU step keeps
        origins = [o for o in by_step.get(step, []) if o != "dist_xqa/losses.py:_check_span_labels"]
        expected = []
        if step % every == 0:
            expected.append("dist_xqa/monitor.py:flush")
        if (step + 1) % stop_every == 0:  # the loop checks after the step, at the new global step
            expected.append("dist_xqa/roles/loop.py:_stop_agreed")
        assert sorted(origins) == sorted(expected), f"step {step}"
    scalars = result["logged"]
    branches = {f"student/kd_by_branch/{lang}" for lang in LANGS}
    weights = {f"student/teacher_weight/{t}" for t in TEACHERS}
    flushes = [0, every, 2 * every]
    for tag in {"student/nll", "student/kd", "student/lr"} | weights:
        assert [step for step, _ in scalars[tag]] == flushes, tag
    for tag in branches:  # logged at the flushes whose steps had rows of the branch's language
        assert scalars[tag] and {step for step, _ in scalars[tag]} <= set(flushes), tag
    for step in range(len(scalars["student/nll"])):
        # the mean teacher weights of every flush are a distribution over the teachers
        assert sum(dict(scalars[t])[scalars["student/nll"][step][0]] for t in weights) == pytest.approx(1.0)
