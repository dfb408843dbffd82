"""The paper's sequential pipeline as trainer options: plan.teacher_schedule sequential
(each teacher alone on every rank, in order; every rank produces part of every teacher's
logits) and distill.precompute through the store's real files and processes (every shard
of every teacher written before the student's first read, then read from the cache in
every epoch, nothing computed twice); their start-up checks."""
from __future__ import annotations

import json
import math
import multiprocessing
import re
import time
import traceback
from pathlib import Path

import pytest

from dist_xqa.config import ConfigError, load_config
from dist_xqa.jobs import DISTILL_SET
from dist_xqa.prepared import Prepared
from dist_xqa.plan import plan_roles

from dist_xqa.logits import Producer, ShardPlan, StoreReader
from dist_xqa.logits.writer import serve
from dist_xqa.logits.shards import list_shards
from dist_xqa.waiting import FINISHED, WAITING, Heartbeat
from test_logit_store import TEACHERS, make_manifest, toy_logits
from test_logit_stream import student_heartbeat

EPOCHS = 3
LOOKAHEAD = 2
STALL_TIMEOUT_S = 60.0
PARTS = 2  # every teacher produced by two ranks, as plan.teacher_schedule sequential does
COMPUTE_S = 0.03  # a teacher forward takes a while: a student that did not wait would read early


def make_plan() -> ShardPlan:
    return ShardPlan(range(500, 541), shard_size=4, seed=5)  # 11 shards, the last one short


def rank_main(store: str, part: int, log: str) -> None:
    """A rank of the sequential plan: part `part` of every teacher's shards, precomputed
    one teacher after another, then served to the student until it finished; logs the
    teacher and the first feature id of every shard it computes."""
    plan = make_plan()

    def compute_for(teacher_index: int):
        def compute(feature_ids: list[int]):
            with open(log, "a") as f:
                f.write(f"{TEACHERS[teacher_index]} {feature_ids[0]}\n")
            time.sleep(COMPUTE_S)
            return toy_logits(teacher_index, feature_ids)
        return compute

    producers = [Producer(store, teacher, plan, compute_for(k), LOOKAHEAD, EPOCHS, poll=0.01,
                          manifest=make_manifest(plan), stall_timeout_s=STALL_TIMEOUT_S,
                          student_beats=lambda: [student_heartbeat(store)], part=(part, PARTS))
                 for k, teacher in enumerate(TEACHERS)]
    for producer in producers:
        producer.precompute()
    serve(producers, poll=0.01)


def student_main(store: str, result: str) -> None:
    """Waits for the precompute, notes which shard files exist then, and reads every epoch
    from a cache-mode store that evicts nothing (the trainer's settings for precompute)."""
    try:
        plan = make_plan()
        heartbeat = Heartbeat(student_heartbeat(store), "student")
        reader = StoreReader(store, list(TEACHERS), plan, make_manifest(plan), STALL_TIMEOUT_S, "cache",
                             lookahead=LOOKAHEAD, heartbeat=heartbeat)
        reader.wait_for_every_shard(beat=lambda: heartbeat.beat(state=WAITING))
        at_first_read = {t: sorted(list_shards(Path(store) / t)) for t in TEACHERS}
        wrong = []
        for epoch in range(EPOCHS):
            for position in range(len(plan)):
                ids, start, _ = reader.get(epoch, position)
                wrong += [[t, epoch, position] for k, t in enumerate(TEACHERS)
                          if not start[k].float().equal(toy_logits(k, ids.tolist())[0])]
                heartbeat.beat(plan.global_index(epoch, position))
                reader.commit_progress(epoch, position + 1)
        heartbeat.beat(state=FINISHED)
        outcome = {"at_first_read": at_first_read, "wrong": wrong}
    except Exception:
        outcome = {"error": traceback.format_exc()}
    Path(result).write_text(json.dumps(outcome))


def test_precompute_writes_every_shard_before_the_first_read_and_computes_each_once(tmp_path):
    plan = make_plan()
    store, result = tmp_path / "logits", tmp_path / "result.json"
    logs = [tmp_path / f"rank{part}.log" for part in range(PARTS)]
    ctx = multiprocessing.get_context("spawn")
    # the student starts first: it must wait for the store, not find it ready
    processes = [ctx.Process(target=student_main, args=(str(store), str(result)))]
    processes += [ctx.Process(target=rank_main, args=(str(store), part, str(log))) for part, log in enumerate(logs)]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join(120)
        assert [p.exitcode for p in processes] == [0] * len(processes)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    outcome = json.loads(result.read_text())
    assert "error" not in outcome, outcome["error"]
    every = list(range(len(plan)))
    assert outcome["at_first_read"] == {t: every for t in TEACHERS}, "the first read waits for every shard"
    assert outcome["wrong"] == []
    first_ids = {plan.features(s)[0]: s for s in every}
    computed = [line.split() for log in logs for line in log.read_text().splitlines()]
    for teacher in TEACHERS:
        shards = sorted(first_ids[int(first)] for t, first in computed if t == teacher)
        assert shards == every, f"{teacher}: each shard computed once over {EPOCHS} epochs"


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_the_sequential_schedule_trains_each_teacher_alone_on_every_rank_in_order(world_size):
    work = {"en": 1.0, "es": 3.0, "de": 2.0}  # unequal work: the balanced plan would reorder and pack them
    plan = plan_roles(world_size, work, teacher_schedule="sequential")
    every = tuple(range(world_size))
    assert [[(g.teacher, g.ranks) for g in round_] for round_ in plan.teacher_rounds] == \
        [[("en", every)], [("es", every)], [("de", every)]]
    assert plan.estimate.round_times == (1.0 / world_size, 3.0 / world_size, 2.0 / world_size)
    # phase 2: the student and every teacher's producer on every rank (each rank a part of each)
    assert plan.student.ranks == every and plan.producers_share_student_ranks
    assert [(p.teacher, p.ranks) for p in plan.producers] == [(t, every) for t in work]
    for rank in every:
        assert [g.teacher for g in plan.teacher_groups_for(rank)] == ["en", "es", "de"]


def test_the_balanced_schedule_is_the_default_plan():
    work = {"en": 1.0, "es": 3.0, "de": 2.0}
    assert plan_roles(2, work) == plan_roles(2, work, teacher_schedule="balanced")
    assert len(plan_roles(4, work).teacher_rounds) == 1


@pytest.mark.parametrize("overrides,message", [
    (["plan.teacher_schedule=paper"], "plan.teacher_schedule must be balanced or sequential, got 'paper'"),
    (["plan.teacher_schedule=sequential", "plan.producers=dedicated"],
     "plan.teacher_schedule sequential produces every teacher's logits on every rank: it needs plan.producers "
     "auto or shared"),
    (["distill.precompute=true", "distill.store_mode=window"], "distill.precompute keeps every shard of D for every epoch: it needs "
                                  "distill.store_mode cache (got 'window')"),
    (["distill.precompute=true", "distill.store_mode=cache", "strategy.name=skd"],
     "distill.precompute applies to strategy lbmrc's teacher logits, not to 'skd'"),
])
def test_bad_sequential_settings_are_refused_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


@pytest.mark.slow
def test_the_sequential_pipeline_end_to_end_on_two_cpu_ranks(tmp_path):
    """The trainer with both options: each teacher alone on both ranks, then the store
    precomputed by both ranks (each a part of every teacher), every shard written once and
    before the student's first step, and the student trained from it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from test_pipeline_e2e import launch

    run_dir = tmp_path / "run"
    launch(run_dir, "data.demo_articles=6", "model.max_length=96", "model.doc_stride=32", "teacher.epochs=1",
           "student.epochs=2", "plan.teacher_schedule=sequential", "distill.precompute=true",
           "distill.store_mode=cache")
    log = (run_dir / "logs" / "rank0.log").read_text()
    for number, teacher in enumerate(("en", "es", "de"), start=1):
        assert re.search(rf"round {number}  teacher/{teacher} +ranks 0-1 ", log), log
    shard_size = json.loads((run_dir / "logits" / "manifest.json").read_text())["shard_size"]
    n_shards = math.ceil(len(Prepared(run_dir).features(DISTILL_SET)) / shard_size)
    shard_files = {t: sorted((run_dir / "logits" / t).glob("shard_*.safetensors")) for t in TEACHERS}
    assert {t: len(files) for t, files in shard_files.items()} == {t: n_shards for t in TEACHERS}, "all of D kept"
    written = {t: sum(json.loads(p.read_text())["detail"]["shards_written"]
                      for p in (run_dir / "logits" / t).glob("heartbeat.*of2.json")) for t in TEACHERS}
    assert written == {t: len(files) for t, files in shard_files.items()}, "each shard computed once, both epochs"
    events = EventAccumulator(str(next((run_dir / "tb" / "student").glob("events.out.tfevents.*"))))
    events.Reload()
    first_step = min(e.wall_time for tag in events.Tags()["scalars"] for e in events.Scalars(tag))
    newest_shard = max(p.stat().st_mtime for files in shard_files.values() for p in files)
    assert newest_shard <= first_step, "the student's first step comes after the whole precompute"
    assert (run_dir / "student" / "DONE.json").exists()
    check_topk_benchmark_reads_the_store(run_dir, tmp_path)


def check_topk_benchmark_reads_the_store(run_dir: Path, tmp_path: Path) -> None:
    """benchmarks/topk.py --store on this finished run: each stored row is the teacher's
    logits on that row's feature (checked against the teacher's own forward), the masks
    are those features' answer positions, and the report holds the store's regime."""
    import importlib.util

    import torch

    from dist_xqa.inference import label_tensors, predict_logits
    from dist_xqa.models import load_trained

    spec = importlib.util.spec_from_file_location("topk_bench", Path(__file__).parents[1] / "benchmarks" / "topk.py")
    topk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(topk)
    mask, start, end, student, info = topk.store_regime(run_dir, 40)
    assert info["teachers"] == sorted(TEACHERS) and info["features"] == 40
    assert start.shape == end.shape == (len(TEACHERS), 40, mask.shape[1]) and student.shape == (80, mask.shape[1])
    distill = Prepared(run_dir).features(DISTILL_SET)
    row_of = {int(f): row for row, f in enumerate(distill["feature_id"])}
    ids, shards = [], list_shards(run_dir / "logits" / "en")
    for index in sorted(shards):
        ids += topk.read_shard(shards[index]).feature_ids.tolist()
    rows = [row_of[f] for f in ids[:40]]  # the store's first rows, in its order
    assert torch.equal(mask, label_tensors(distill, rows, torch.device("cpu"))[0])
    for t, teacher in enumerate(info["teachers"]):
        t_start, t_end = predict_logits(load_trained(run_dir / "teachers" / teacher), distill, 16, torch.device("cpu"), rows)
        torch.testing.assert_close(start[t][mask], torch.as_tensor(t_start)[mask], atol=0.05, rtol=0.01)
        torch.testing.assert_close(end[t][mask], torch.as_tensor(t_end)[mask], atol=0.05, rtol=0.01)
    report = topk.main(["--features", "64", "--seq-len", "96", "--store", f"run={run_dir}", "--store-features", "40",
                        "--out", str(tmp_path / "topk.json")])
    tv = {k: r["imp"]["target_tv_mean"] for k, r in report["regimes"]["store:run"]["k"].items()}
    assert tv["8"] > tv["64"] >= 0, tv
