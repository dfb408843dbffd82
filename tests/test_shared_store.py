"""One teacher pass, many students: a store filled through one shard plan is read by
students of any other (batch, seed, world size) by feature id, and several students in
different run directories fill one store concurrently with real processes, each row
computed once, a killed producer's claim taken over."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import torch

from dist_xqa.logits import Manifest, Producer, ShardPlan, StoreReader, rank_rows, read_manifest
from dist_xqa.logits.progress import heartbeat_path
from dist_xqa.logits.shards import list_shards
from dist_xqa.waiting import read_beat

SEQ_LEN = 8
TEACHERS = ("en", "es")
FEATURES = list(range(300, 420))  # 120 features


def exact_logits(teacher_index: int, feature_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits naming their teacher, feature and token, exact in float16."""
    ids = torch.tensor(feature_ids, dtype=torch.float32)[:, None]
    start = 8 * (ids - 300) + torch.arange(SEQ_LEN, dtype=torch.float32)[None, :] + 1000 * teacher_index
    return start, -start


def manifest_of(plan: ShardPlan) -> Manifest:
    return Manifest.for_plan(plan, tokenizer="toy", teachers={t: f"ckpt-{t}" for t in TEACHERS})


def fill(store: Path, stream: Path, plan: ShardPlan, compute=exact_logits) -> dict[str, Producer]:
    """Runs one producer per teacher for one epoch of `plan` until every shard it needs is
    on disk (no student: the whole epoch is the window)."""
    producers = {t: Producer(store, t, plan, lambda ids, i=i: compute(i, ids), lookahead=len(plan), epochs=1,
                             manifest=manifest_of(plan), stream_dir=stream) for i, t in enumerate(TEACHERS)}
    for producer in producers.values():
        while producer.step() or not producer.finished:
            time.sleep(0.01)
    return producers


def store_files(store: Path) -> dict[str, str]:
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for t in TEACHERS for p in list_shards(store / t).values()}


def test_a_student_on_3_ranks_at_batch_48_reads_a_store_filled_at_batch_32_and_computes_nothing(tmp_path):
    store = tmp_path / "store"
    first = ShardPlan(FEATURES, shard_size=32, seed=0)  # 2 ranks x 16
    made = fill(store, tmp_path / "run1" / "logits", first)
    assert sum(p.rows_computed for p in made.values()) == len(TEACHERS) * len(FEATURES)
    files = store_files(store)

    second = ShardPlan(list(reversed(FEATURES)), shard_size=48, seed=7)  # 3 ranks x 16, another seed
    again = fill(store, tmp_path / "run2" / "logits", second)
    assert all(p.rows_computed == 0 for p in again.values()), "every row is in the store already"
    assert store_files(store) == files and read_manifest(store).shard_size == 32, "the store is left as it was"

    readers = [StoreReader(store, list(TEACHERS), second, manifest_of(second), 5.0, "cache", lookahead=2,
                           writer=rank == 0, stream_dir=tmp_path / "run2" / "logits") for rank in range(3)]
    seen = []
    for epoch in range(2):
        for position in range(len(second)):
            shard = second.shard_at(second.global_index(epoch, position))
            for rank, reader in enumerate(readers):
                logits = reader.get(epoch, position)
                assert logits.feature_ids.tolist() == second.features(shard)
                mine = rank_rows(len(second.features(shard)), rank, 3)
                ids = logits.feature_ids[mine].tolist()
                for k in range(len(TEACHERS)):
                    start, end = exact_logits(k, ids)
                    assert torch.equal(logits.start[k, mine].float(), start)
                    assert torch.equal(logits.end[k, mine].float(), end)
                seen += ids
        readers[0].commit_progress(epoch, len(second))
    assert sorted(seen) == sorted(FEATURES * 2), "each rank its rows, every feature once an epoch"
    assert store_files(store) == files, "a student of another plan deletes nothing"


def test_a_student_of_another_plan_computes_only_the_missing_layout_shards(tmp_path):
    store = tmp_path / "store"
    first = ShardPlan(FEATURES, shard_size=32, seed=0)
    fill(store, tmp_path / "run1" / "logits", first)
    layout = list_shards(store / "en")
    gone = sorted(layout)[:2]
    for t in TEACHERS:
        for shard in gone:
            list_shards(store / t)[shard].unlink()
    again = fill(store, tmp_path / "run2" / "logits", ShardPlan(FEATURES, shard_size=48, seed=3))
    assert {t: p.rows_computed for t, p in again.items()} == {t: sum(len(first.features(s)) for s in gone)
                                                              for t in TEACHERS}
    assert set(list_shards(store / "en")) == set(layout)


# --- several students sharing one store, with real processes -----------------------------


def _student_producers(store: str, stream: str, shard_size: int, seed: int, log: str, hang_on_first: bool) -> None:
    """One run's producers (one process): fills one epoch of its own plan, computing slowly
    so that the runs contend; logs every feature id it computes. `hang_on_first`: blocks
    forever in its first computation (to be killed holding a claim)."""
    plan = ShardPlan(FEATURES, shard_size=shard_size, seed=seed)

    def compute(teacher_index: int, ids: list[int]):
        with open(log, "a") as f:
            f.write(json.dumps([teacher_index, ids]) + "\n")
        if hang_on_first:
            Path(log + ".claimed").touch()
            time.sleep(3600)
        time.sleep(0.02)
        return exact_logits(teacher_index, ids)

    fill(Path(store), Path(stream), plan, compute)


def computed(log: Path) -> list[tuple[int, int]]:
    """(teacher, feature id) of every row a process computed."""
    if not log.exists():
        return []
    return [(k, f) for line in log.read_text().splitlines() for k, ids in [json.loads(line)] for f in ids]


def check_complete(store: Path) -> None:
    layout = read_manifest(store).layout(ShardPlan(FEATURES, 1, 0))
    reader = StoreReader(store, list(TEACHERS), layout, manifest_of(layout), 5.0, "cache", lookahead=1)
    for position in range(len(layout)):
        logits = reader.get(0, position)
        for k in range(len(TEACHERS)):
            assert torch.equal(logits.start[k].float(), exact_logits(k, logits.feature_ids.tolist())[0])
    assert not list(store.glob("*/*.claim")), "every claim is released"


def test_three_students_in_different_runs_fill_one_store_concurrently_each_row_once(tmp_path):
    store, ctx = tmp_path / "store", multiprocessing.get_context("fork")
    runs = [(tmp_path / f"run{i}", size, seed) for i, (size, seed) in enumerate([(32, 0), (48, 1), (20, 2)])]
    procs = [ctx.Process(target=_student_producers, args=(str(store), str(run / "logits"), size, seed,
                                                          str(run / "computed.jsonl"), False))
             for run, size, seed in runs]
    for run, _, _ in runs:
        run.mkdir()
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = [row for run, _, _ in runs for row in computed(run / "computed.jsonl")]
    assert sorted(rows) == sorted((k, f) for k in range(len(TEACHERS)) for f in FEATURES), \
        "every row of every teacher computed exactly once, whichever run computed it"
    for run, _, _ in runs:  # each run's own pacing files, none in the shared store
        beats = [read_beat(heartbeat_path(run / "logits", t)) for t in TEACHERS]
        assert all(b is not None for b in beats)
    assert sum(read_beat(heartbeat_path(run / "logits", t)).detail["rows_computed"]
               for run, _, _ in runs for t in TEACHERS) == len(rows), "the counted forwards are the rows computed"
    assert not list(store.glob("*/heartbeat*")) and not (store / "progress.json").exists()
    check_complete(store)


def test_a_killed_producers_claim_expires_with_its_process_and_another_run_takes_the_shard_over(tmp_path):
    store, ctx = tmp_path / "store", multiprocessing.get_context("fork")
    killed, survivor = tmp_path / "killed", tmp_path / "survivor"
    killed.mkdir(), survivor.mkdir()
    victim = ctx.Process(target=_student_producers, args=(str(store), str(killed / "logits"), 32, 0,
                                                          str(killed / "computed.jsonl"), True))
    victim.start()
    deadline = time.monotonic() + 60
    while not (killed / "computed.jsonl.claimed").exists():
        assert time.monotonic() < deadline and victim.is_alive()
        time.sleep(0.02)
    assert list(store.glob("*/*.claim")), "the victim holds a claim"
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    _student_producers(str(store), str(survivor / "logits"), 48, 1, str(survivor / "computed.jsonl"), False)
    claimed = computed(killed / "computed.jsonl")
    assert set(claimed) <= set(computed(survivor / "computed.jsonl")), "the killed claim's rows were computed anew"
    assert len(computed(survivor / "computed.jsonl")) == len(TEACHERS) * len(FEATURES)
    check_complete(store)


def test_a_student_waits_on_another_runs_producer_that_claimed_its_shard(tmp_path):
    """In a shared store the shard a student awaits may be claimed by another run's
    producer; this run's own owner then has nothing to write. The wait lives on the
    claimer's progress, and stalls once the claimer stops moving."""
    import threading

    import pytest

    from dist_xqa.logits.claims import Claims
    from dist_xqa.logits.manifest import prepare_store
    from dist_xqa.logits.progress import StoreTimeout
    from dist_xqa.waiting import Heartbeat

    STALL_S = 2.0  # noqa: N806
    store, plan = tmp_path / "store", ShardPlan(FEATURES, shard_size=32, seed=0)
    prepare_store(store, manifest_of(plan))
    (store / "en").mkdir()  # as a producer of the teacher finds it
    first = plan.shard_at(plan.global_index(0, 0))
    claimer = Heartbeat(tmp_path / "other_run" / "logits" / "en" / "heartbeat.json", "producer/en")
    claims = Claims(store / "en", claimer, stall_timeout_s=30.0)
    assert claims.claim(first)

    def reader() -> StoreReader:
        return StoreReader(store, ["en"], plan, manifest_of(plan), STALL_S, "cache", lookahead=1,
                           stream_dir=tmp_path / "this_run" / "logits")

    def other_run(beats: int, then_fill: bool) -> None:
        for step in range(beats):  # computing: its step moves, several times the stall timeout
            claimer.beat(step, force=True)
            time.sleep(0.2)
        if then_fill:
            claims.release(first)
            fill(store, tmp_path / "other_run" / "logits", plan)

    # 5 s of waiting under a 2 s stall timeout; its own filling producers then hold claims
    # of their own and beat as they compute
    worker = threading.Thread(target=other_run, args=(25, True))
    worker.start()
    logits = reader().get(0, 0)
    worker.join()
    assert logits.feature_ids.tolist() == plan.features(first)

    # the same wait on a claimer that stopped moving: a stall naming the store
    stalled = tmp_path / "stalled"
    prepare_store(stalled, manifest_of(plan))
    (stalled / "en").mkdir()
    Claims(stalled / "en", claimer, stall_timeout_s=30.0).claim(first)
    claimer.beat(99, force=True)
    late = StoreReader(stalled, ["en"], plan, manifest_of(plan), STALL_S, "cache", lookahead=1,
                       stream_dir=tmp_path / "this_run2" / "logits")
    with pytest.raises(StoreTimeout, match="no heartbeat has moved"):
        late.get(0, 0)
