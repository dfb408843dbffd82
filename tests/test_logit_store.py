"""The logit store with real files: shard plan, atomic self-checking shards, manifest,
producer resume, the student's reader and its clean-up, in one process (producers
stepped between reads, as on time-shared ranks). The multi-process run is in
test_logit_stream.py."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from dist_xqa.logits import (
    Manifest,
    Producer,
    ShardError,
    ShardPlan,
    StoreMismatchError,
    StoreReader,
    StoreTimeout,
    hash_checkpoint,
    prepare_store,
    rank_rows,
    read_manifest,
    read_shard,
    shard_path,
    write_shard,
)
from dist_xqa.logits.progress import heartbeat_path, producer_role
from dist_xqa.logits.shards import list_shards
from dist_xqa.waiting import Heartbeat

SEQ_LEN = 8
TEACHERS = ("en", "es", "de")


def toy_logits(teacher_index: int, feature_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic logits that name their teacher, feature and token (small integers,
    exact in float16 and bfloat16)."""
    ids = torch.tensor(feature_ids, dtype=torch.float32)[:, None]
    tokens = torch.arange(SEQ_LEN, dtype=torch.float32)[None, :]
    start = 32 * teacher_index + (ids % 16) + tokens
    return start, -start


def make_manifest(plan: ShardPlan, teachers=TEACHERS, **changes) -> Manifest:
    checkpoints = teachers if isinstance(teachers, dict) else {t: f"ckpt-{t}" for t in teachers}
    fields = dict(tokenizer="toy-tokenizer/384/128", teachers=checkpoints, dtype="float16")
    fields.update(changes)
    return Manifest.for_plan(plan, **fields)


class CountingCompute:
    """A teacher's compute function that records which features it was asked for."""

    def __init__(self, teacher_index: int):
        self.teacher_index = teacher_index
        self.calls: list[list[int]] = []

    def __call__(self, feature_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(list(feature_ids))
        return toy_logits(self.teacher_index, feature_ids)


def shard_bytes(tmp_path: Path, plan: ShardPlan) -> int:
    """Bytes on disk of one full shard for all teachers (shards of equal shape have equal size)."""
    probe = tmp_path / "probe.safetensors"
    size = write_shard(probe, plan.features(0), *toy_logits(0, plan.features(0)))
    probe.unlink()
    return len(TEACHERS) * size


def needed_shards(plan: ShardPlan, committed: int, current: int, lookahead: int) -> set[int]:
    """Shards the store may hold while the student reads run-wide index `current` with its
    last checkpoint at `committed`: those read from min(committed, current) up to the
    window's end."""
    return {plan.shard_at(i) for i in range(min(committed, current), current + lookahead)}


# --- plan ------------------------------------------------------------------------------


def test_plan_fixes_shard_contents_and_permutes_shards_per_epoch():
    ids = list(range(100, 147))
    plan = ShardPlan(ids, shard_size=5, seed=3)
    assert len(plan) == 10
    contents = [plan.features(s) for s in range(len(plan))]
    assert sorted(f for c in contents for f in c) == ids
    assert [len(c) for c in contents] == [5] * 9 + [2]
    assert contents != [ids[i : i + 5] for i in range(0, 47, 5)], "contents are a seeded shuffle"
    orders = [plan.order(e) for e in range(4)]
    assert all(sorted(o) == list(range(10)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4
    again = ShardPlan(ids, shard_size=5, seed=3)
    assert [again.features(s) for s in range(10)] == contents and again.order(2) == orders[2]
    assert ShardPlan(ids, shard_size=5, seed=4).order(0) != orders[0]
    for index in range(0, 40, 3):
        epoch, position = plan.locate(index)
        assert plan.shard_at(index) == orders[epoch][position]
        for shard in range(10):
            use = plan.next_use(shard, index)
            assert use >= index and plan.shard_at(use) == shard
            assert all(plan.shard_at(i) != shard for i in range(index, use))


def test_plan_refuses_bad_input():
    with pytest.raises(ValueError, match="more than once: \\[7\\]"):
        ShardPlan([1, 7, 7], shard_size=2, seed=0)
    with pytest.raises(ValueError, match="no features"):
        ShardPlan([], shard_size=2, seed=0)
    with pytest.raises(IndexError, match="shard 2 is not in the plan"):
        ShardPlan([1, 2, 3], shard_size=2, seed=0).features(2)


@pytest.mark.parametrize("rows,world", [(10, 3), (2, 4), (8, 2), (1, 1)])
def test_rank_rows_split_a_shard_into_disjoint_parts_covering_it(rows, world):
    parts = [list(range(rows))[rank_rows(rows, rank, world)] for rank in range(world)]
    assert sum(parts, []) == list(range(rows))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


# --- shards ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_shard_round_trip(tmp_path, dtype):
    start, end = toy_logits(1, [4, 9, 2])
    path = shard_path(tmp_path, "en", 3)
    size = write_shard(path, [4, 9, 2], start, end, dtype)
    assert path.name == "shard_000003.safetensors" and path.stat().st_size == size
    data = read_shard(path, [4, 9, 2], dtype)
    assert data.feature_ids.tolist() == [4, 9, 2]
    assert data.start.dtype == dtype and torch.equal(data.start.float(), start) and torch.equal(data.end.float(), end)
    assert list(path.parent.iterdir()) == [path], "no temporary file is left behind"


def test_truncated_shard_under_the_final_name_is_refused(tmp_path):
    good = shard_path(tmp_path, "en", 0)
    write_shard(good, [1, 2, 3], *toy_logits(0, [1, 2, 3]))
    raw = good.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    torn = shard_path(tmp_path, "es", 0)
    torn.parent.mkdir()
    for cut in sorted({0, 5, 8, header_end // 2, header_end, header_end + 1, (header_end + len(raw)) // 2, len(raw) - 1}):
        torn.write_bytes(raw[:cut])
        with pytest.raises(ShardError, match=str(torn)):
            read_shard(torn)


def undetected_bit_flips(path) -> list[int]:
    """Offsets of `path` whose flipped low bit read_shard accepts (each refusal names the file)."""
    raw = path.read_bytes()
    undetected = []
    for offset in range(len(raw)):
        flipped = bytearray(raw)
        flipped[offset] ^= 0x01
        path.write_bytes(bytes(flipped))
        try:
            read_shard(path)
        except ShardError as e:
            assert str(path) in str(e)
        else:
            undetected.append(offset)
    path.write_bytes(raw)
    return undetected


def test_every_flipped_bit_is_detected(tmp_path):
    path = shard_path(tmp_path, "en", 0)
    write_shard(path, [1, 2, 3], *toy_logits(0, [1, 2, 3]))
    raw = path.read_bytes()
    assert undetected_bit_flips(path) == []
    data_byte = len(raw) - 3
    flipped = bytearray(raw)
    flipped[data_byte] ^= 0x40
    path.write_bytes(bytes(flipped))
    with pytest.raises(ShardError, match="checksum mismatch"):
        read_shard(path)


def test_shard_of_other_features_or_dtype_is_refused(tmp_path):
    path = shard_path(tmp_path, "en", 0)
    write_shard(path, [1, 2, 3], *toy_logits(0, [1, 2, 3]))
    with pytest.raises(ShardError, match="differ first at row 1"):
        read_shard(path, [1, 5, 3])
    with pytest.raises(ShardError, match="bfloat16"):
        read_shard(path, [1, 2, 3], torch.bfloat16)


def _write_then_hang_in_fsync(path: str, marker: str) -> None:
    """Child process: write a shard but stop for good in the fsync before the rename,
    after telling the parent (which then kills it)."""

    def hang(fd: int) -> None:
        Path(marker).touch()
        time.sleep(600)

    os.fsync = hang
    write_shard(Path(path), list(range(64)), *toy_logits(0, list(range(64))))


def test_writer_killed_mid_write_leaves_no_visible_shard(tmp_path):
    plan = ShardPlan(range(64), shard_size=64, seed=0)
    manifest = make_manifest(plan, teachers=("en",))
    store = tmp_path / "store"
    prepare_store(store, manifest)
    path = shard_path(store, "en", 0)
    path.parent.mkdir()
    marker = tmp_path / "writing"
    child = multiprocessing.get_context("spawn").Process(target=_write_then_hang_in_fsync, args=(str(path), str(marker)))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.is_alive() and time.monotonic() < deadline, "the writer never reached its fsync"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == -signal.SIGKILL
    assert not path.exists() and list_shards(path.parent) == {}
    leftovers = [p for p in path.parent.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".shard_000000") and leftovers[0].stat().st_size > 0
    with pytest.raises(ShardError, match="does not exist"):
        read_shard(path)
    reader = StoreReader(store, ["en"], plan, manifest, 0.05, "window", lookahead=1)
    producer = Producer(store, "en", plan, CountingCompute(0), lookahead=1, epochs=1, manifest=manifest)
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir()), "the restarted producer clears temporaries"
    with pytest.raises(StoreTimeout):
        reader.get(0, 0)
    assert producer.step() and reader.get(0, 0).feature_ids.tolist() == plan.features(0)


def _produce_then_hang_in_fsync(store: str, part: int, marker: str) -> None:
    """Child process: producer part `part` of 2 that stops for good in the fsync of its
    first shard, before the rename, after telling the parent."""
    plan = ShardPlan(range(16), shard_size=4, seed=0)
    producer = Producer(store, "en", plan, CountingCompute(0), lookahead=2, epochs=1,
                        manifest=make_manifest(plan, teachers=("en",)), part=(part, 2))

    def hang(fd: int) -> None:
        Path(marker).touch()
        time.sleep(600)

    os.fsync = hang
    producer.step()


def test_a_restarted_producer_part_removes_its_own_torn_temporaries_only(tmp_path):
    """Part 1 of 2 is killed mid-write while part 0 is still writing: the restarted part 1
    removes the temporary its earlier process left (its pid is in its heartbeat), and
    leaves part 0's, which is still being written."""
    plan = ShardPlan(range(16), shard_size=4, seed=0)
    store, ctx = tmp_path / "store", multiprocessing.get_context("spawn")
    children = {}
    try:
        for part in (0, 1):
            marker = tmp_path / f"writing{part}"
            children[part] = ctx.Process(target=_produce_then_hang_in_fsync, args=(str(store), part, str(marker)))
            children[part].start()
            deadline = time.monotonic() + 60
            while not marker.exists():
                assert children[part].is_alive() and time.monotonic() < deadline, f"part {part} never wrote"
                time.sleep(0.02)
        os.kill(children[1].pid, signal.SIGKILL)
        children[1].join(10)
        temporaries = lambda: {p.name.split(".")[3] for p in (store / "en").glob(".shard_*.tmp")}  # noqa: E731
        assert temporaries() == {str(children[0].pid), str(children[1].pid)}
        Producer(store, "en", plan, CountingCompute(0), lookahead=2, epochs=1,
                 manifest=make_manifest(plan, teachers=("en",)), part=(1, 2))
        assert temporaries() == {str(children[0].pid)}, "only the killed part's temporary is removed"
    finally:
        for child in children.values():
            child.kill()
            child.join(10)


# --- manifest --------------------------------------------------------------------------


def test_the_layout_is_no_part_of_the_key_a_student_of_any_plan_matches():
    """Shard size and seed are the store's layout, not what the logits depend on; the
    features are a set (their order in D is no part of it either)."""
    expected = make_manifest(ShardPlan(range(30), shard_size=4, seed=0))
    expected.check_matches(make_manifest(ShardPlan(reversed(range(30)), shard_size=7, seed=5)))


@pytest.mark.parametrize(
    "changes,named",
    [
        (dict(plan_ids=range(1, 31)), "distillation set features"),
        (dict(tokenizer="other-tokenizer/512/128"), "tokenizer"),
        (dict(teachers={"en": "ckpt-en", "es": "retrained", "de": "ckpt-de"}), "teacher 'es' checkpoint"),
        (dict(teachers={"en": "ckpt-en", "es": "ckpt-es"}), "teacher 'de' missing"),
        (dict(placebo=3), "placebo"),
        (dict(dtype="bfloat16"), "dtype"),
        (dict(generation=1), "generation"),
    ],
)
def test_manifest_mismatch_names_the_differing_part(changes, named):
    plan = ShardPlan(range(30), shard_size=4, seed=0)
    expected = make_manifest(plan)
    changes = dict(changes)
    other_plan = ShardPlan(
        changes.pop("plan_ids", range(30)), changes.pop("shard_size", 4), changes.pop("seed", 0)
    )
    found = make_manifest(other_plan, **changes)
    with pytest.raises(StoreMismatchError, match=named) as caught:
        expected.check_matches(found)
    assert str(caught.value).count(";") == 0, "only the differing part is named"
    expected.check_matches(make_manifest(plan))


def test_producer_refuses_a_stale_store_unless_reset(tmp_path):
    plan = ShardPlan(range(30), shard_size=4, seed=0)
    old = make_manifest(plan)
    Producer(tmp_path, "en", plan, CountingCompute(0), lookahead=2, epochs=1, manifest=old).step()
    assert read_manifest(tmp_path) == old
    new = make_manifest(plan, teachers={"en": "ckpt-en-v2", "es": "ckpt-es", "de": "ckpt-de"})
    with pytest.raises(StoreMismatchError, match="teacher 'en' checkpoint.*reset"):
        Producer(tmp_path, "en", plan, CountingCompute(0), lookahead=2, epochs=1, manifest=new)
    assert list_shards(tmp_path / "en"), "a refused store is left as it was"
    Producer(tmp_path, "es", plan, CountingCompute(1), lookahead=2, epochs=1, manifest=old)  # same manifest: accepted
    Producer(tmp_path, "en", plan, CountingCompute(0), lookahead=2, epochs=1, manifest=new, reset=True)
    assert read_manifest(tmp_path) == new and not list_shards(tmp_path / "en") and not (tmp_path / "es").exists()


def test_student_waiting_for_an_unstarted_store_says_so(tmp_path):
    plan = ShardPlan(range(8), shard_size=4, seed=0)
    reader = StoreReader(tmp_path / "store", ["en"], plan, make_manifest(plan), 0.05, "window", lookahead=1)
    with pytest.raises(StoreTimeout, match="its manifest.json \\(no producer has created the store\\).*en: no heartbeat"):
        reader.get(0, 0)
    assert not (tmp_path / "store").exists(), "the student never creates the store"


def test_store_with_files_but_no_manifest_is_refused(tmp_path):
    plan = ShardPlan(range(8), shard_size=4, seed=0)
    write_shard(shard_path(tmp_path, "en", 0), plan.features(0), *toy_logits(0, plan.features(0)))
    with pytest.raises(StoreMismatchError, match="no manifest.json"):
        prepare_store(tmp_path, make_manifest(plan))


def test_student_refuses_a_store_whose_manifest_differs(tmp_path):
    plan = ShardPlan(range(30), shard_size=4, seed=0)
    producer = Producer(tmp_path, "en", plan, CountingCompute(0), lookahead=2, epochs=1, manifest=make_manifest(plan))
    producer.step()
    stale = StoreReader(tmp_path, ["en"], plan, make_manifest(plan, tokenizer="other"), 5.0, "window", lookahead=2)
    with pytest.raises(StoreMismatchError, match="tokenizer"):
        stale.get(0, 0)


def test_hash_checkpoint_follows_the_weight_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights-1")
    (tmp_path / "config.json").write_text("{}")
    first = hash_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"note": 1}')
    assert hash_checkpoint(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"weights-2")
    assert hash_checkpoint(tmp_path) != first
    with pytest.raises(FileNotFoundError, match="no model weight files"):
        hash_checkpoint(tmp_path / "config.json")


# --- producer and reader ---------------------------------------------------------------


def test_stall_names_the_missing_teacher_shard_and_its_producers_last_beat(tmp_path):
    plan = ShardPlan(range(30), shard_size=4, seed=0)
    manifest = make_manifest(plan)
    en = Producer(tmp_path, "en", plan, CountingCompute(0), lookahead=1, epochs=1, manifest=manifest)
    de = Producer(tmp_path, "de", plan, CountingCompute(2), lookahead=1, epochs=1, manifest=manifest)
    assert en.step() and de.step() and not en.step()
    # The es producer said it was computing the shard, then stopped beating.
    Heartbeat(heartbeat_path(tmp_path, "es"), producer_role("es"), log="/run/logs/rank2.log").beat(
        0, "computing", epoch=0, position=0)
    reader = StoreReader(tmp_path, list(TEACHERS), plan, manifest, 0.2, "window", lookahead=1)
    began = time.monotonic()
    with pytest.raises(StoreTimeout) as caught:
        reader.get(0, 0)
    assert time.monotonic() - began >= 0.2
    message = str(caught.value)
    assert f"shard {plan.order(0)[0]} (epoch 0, position 0) from teacher(s) es: no heartbeat has moved" in message
    assert "producer es: computing at step 0, epoch 0, position 0" in message
    assert "log /run/logs/rank2.log" in message and f"pid {os.getpid()}" in message
    assert "producer en" not in message, "only the producers the student waits for are named"


def test_producers_stop_at_the_lookahead_window(tmp_path):
    plan = ShardPlan(range(40), shard_size=4, seed=2)
    manifest = make_manifest(plan)
    producers = [Producer(tmp_path, t, plan, CountingCompute(k), 3, 2, manifest=manifest) for k, t in enumerate(TEACHERS)]
    reader = StoreReader(tmp_path, list(TEACHERS), plan, manifest, 5.0, "window", lookahead=3)
    for position in (0, 1):
        reader.get(0, position, while_waiting=lambda: sum(p.step() for p in producers) > 0)
        while sum(p.step() for p in producers):
            pass
        window = {plan.order(0)[q] for q in range(position, position + 3)}
        behind = {plan.order(0)[q] for q in range(position)}  # read, but no checkpoint yet
        assert all(set(list_shards(tmp_path / t)) == window | behind for t in TEACHERS)
        assert reader.stats().lookahead_shards == 2
    reader.commit_progress(0, 2)
    assert all(set(list_shards(tmp_path / t)) == {plan.order(0)[q] for q in (2, 3)} for t in TEACHERS)
    assert sum(p.step() for p in producers) == 3 and reader.stats().lookahead_shards == 3


def test_a_shard_failing_its_checksum_is_deleted_and_produced_again(tmp_path):
    plan = ShardPlan(range(30), shard_size=4, seed=0)
    manifest = make_manifest(plan, teachers=("en",))
    compute = CountingCompute(0)
    producer = Producer(tmp_path, "en", plan, compute, lookahead=1, epochs=1, manifest=manifest)
    assert producer.step()
    path = shard_path(tmp_path, "en", plan.order(0)[0])
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="checksum mismatch"):
        read_shard(path, plan.features(plan.order(0)[0]))
    # Another student rank never deletes (it could delete the good file written since).
    other = StoreReader(tmp_path, ["en"], plan, manifest, 0.3, "window", lookahead=1, writer=False)
    with pytest.raises(StoreTimeout, match="from teacher\\(s\\) en"):
        other.get(0, 0)
    assert path.exists()
    reader = StoreReader(tmp_path, ["en"], plan, manifest, 5.0, "window", lookahead=1)
    shard = reader.get(0, 0, while_waiting=producer.step)
    assert shard.feature_ids.tolist() == plan.features(plan.order(0)[0])
    assert torch.equal(shard.start[0].float(), toy_logits(0, plan.features(plan.order(0)[0]))[0])
    assert len(compute.calls) == 2, "the deleted shard was computed once more"


def test_a_producer_writing_bad_shards_is_not_retried_forever(tmp_path):
    plan = ShardPlan(range(30), shard_size=4, seed=0)
    manifest = make_manifest(plan, teachers=("en",))
    wrong = Producer(tmp_path, "en", plan, lambda ids: toy_logits(0, [i + 1 for i in ids]), lookahead=1, epochs=1,
                     manifest=manifest)
    wrong.layout = ShardPlan(range(1, 31), shard_size=4, seed=0)  # writes another plan's feature ids
    reader = StoreReader(tmp_path, ["en"], plan, manifest, 5.0, "window", lookahead=1)
    with pytest.raises(ShardError, match="failed verification 4 times in a row"):
        reader.get(0, 0, while_waiting=wrong.step)


def test_restarted_producer_resumes_after_the_last_committed_shard(tmp_path):
    plan = ShardPlan(range(30), shard_size=4, seed=0)
    manifest = make_manifest(plan, teachers=("en",))

    class Crash(Exception):
        pass

    def crashing(feature_ids):
        if len(calls) == 2:
            raise Crash
        calls.append(feature_ids)
        return toy_logits(0, feature_ids)

    calls: list[list[int]] = []
    crashed = Producer(tmp_path, "en", plan, crashing, lookahead=4, epochs=1, manifest=manifest)
    with pytest.raises(Crash):
        while crashed.step():
            pass
    assert calls == [plan.features(plan.shard_at(i)) for i in range(2)]
    # A torn file under a committed name (e.g. a disk fault) is recomputed, not trusted.
    torn = shard_path(tmp_path, "en", plan.shard_at(1))
    torn.write_bytes(torn.read_bytes()[:50])
    resumed = CountingCompute(0)
    producer = Producer(tmp_path, "en", plan, resumed, lookahead=4, epochs=1, manifest=manifest)
    while producer.step():
        pass
    assert resumed.calls == [plan.features(plan.shard_at(i)) for i in (1, 2, 3)]
    assert not producer.finished, "the window is full; the rest waits for the student"
    for index in range(4):
        read_shard(shard_path(tmp_path, "en", plan.shard_at(index)), plan.features(plan.shard_at(index)))


def _read_run(tmp_path, plan, mode, epochs, lookahead, commit_every=1, disk_budget_bytes=None):
    """The student reads `epochs` epochs with all producers stepped in this process;
    returns per-teacher compute counts, the bytes on disk after each commit and the reader,
    and checks every row, the plan's order and the look-ahead bound on the way."""
    manifest = make_manifest(plan)
    computes = [CountingCompute(k) for k in range(len(TEACHERS))]
    producers = [
        Producer(tmp_path, t, plan, c, lookahead, epochs, manifest=manifest) for t, c in zip(TEACHERS, computes)
    ]
    # In-process producers only run when stepped, and a finished producer is never stepped
    # again (its process would have exited): a shard deleted too early is then never
    # recomputed and the read times out. Every producer steps, no short-circuit.
    step_all = lambda: sum(p.step() for p in producers if not p.finished) > 0  # noqa: E731
    reader = StoreReader(tmp_path, list(TEACHERS), plan, manifest, 5.0, mode, disk_budget_bytes, lookahead=lookahead)
    committed, sizes = 0, []
    for epoch in range(epochs):
        seen = []
        for position in range(len(plan)):
            ids, start, end = reader.get(epoch, position, while_waiting=step_all)
            while step_all():  # producers run ahead as far as the look-ahead lets them
                pass
            shard = plan.order(epoch)[position]
            assert ids.tolist() == plan.features(shard)
            for k in range(len(TEACHERS)):
                expected_start, expected_end = toy_logits(k, ids.tolist())
                assert torch.equal(start[k].float(), expected_start) and torch.equal(end[k].float(), expected_end)
            seen += ids.tolist()
            current = plan.global_index(epoch, position)
            for teacher in TEACHERS:
                on_disk = set(list_shards(tmp_path / teacher))
                if mode == "window":
                    assert on_disk <= needed_shards(plan, committed, current, lookahead), (teacher, epoch, position)
            if (position + 1) % commit_every == 0 or position + 1 == len(plan):
                reader.commit_progress(epoch, position + 1)
                committed = plan.global_index(epoch, position + 1)
                sizes.append(reader.stats().bytes_on_disk)
        assert sorted(seen) == sorted(plan.feature_ids), "every feature exactly once per epoch"
    return [len(c.calls) for c in computes], sizes, reader


def test_window_mode_recomputes_each_epoch_within_bounded_disk(tmp_path):
    plan = ShardPlan(range(40), shard_size=4, seed=1)
    counts, sizes, reader = _read_run(tmp_path / "store", plan, "window", epochs=2, lookahead=3, commit_every=2)
    # Each epoch needs every shard; only a shard whose next read falls in the window at the
    # epoch boundary is reused.
    assert all(2 * len(plan) - 3 <= c <= 2 * len(plan) for c in counts)
    # Right after a checkpoint at C only the window [C, C + lookahead) is kept.
    assert max(sizes) <= 3 * shard_bytes(tmp_path, plan)
    stats = reader.stats()
    assert stats.wait_seconds > 0 and stats.bytes_on_disk == sum(
        p.stat().st_size for t in TEACHERS for p in list_shards(tmp_path / "store" / t).values()
    )


def test_cache_mode_computes_each_shard_once(tmp_path):
    plan = ShardPlan(range(40), shard_size=4, seed=1)
    counts, sizes, _ = _read_run(tmp_path, plan, "cache", epochs=2, lookahead=3)
    assert counts == [len(plan)] * len(TEACHERS)
    assert all(len(list_shards(tmp_path / t)) == len(plan) for t in TEACHERS)


def test_cache_mode_evicts_down_to_its_disk_budget(tmp_path):
    plan = ShardPlan(range(40), shard_size=4, seed=1)
    budget = 6 * shard_bytes(tmp_path, plan)
    counts, sizes, _ = _read_run(tmp_path / "store", plan, "cache", epochs=2, lookahead=2, disk_budget_bytes=budget)
    assert max(sizes) <= budget
    assert all(len(plan) < c < 2 * len(plan) for c in counts), "kept shards are reused, evicted ones recomputed"


def test_resumed_student_finds_every_shard_from_its_checkpoint_on(tmp_path):
    plan = ShardPlan(range(40), shard_size=4, seed=1)
    manifest = make_manifest(plan, teachers=("en",))
    producer = Producer(tmp_path, "en", plan, CountingCompute(0), lookahead=5, epochs=1, manifest=manifest)
    first = StoreReader(tmp_path, ["en"], plan, manifest, 5.0, "window", lookahead=5)
    for position in range(6):
        first.get(0, position, while_waiting=producer.step)
    while producer.step():
        pass
    assert producer.finished, "every shard the run still needs is on disk"
    # The checkpoint of position 3 lands after the student has read on to position 5;
    # then it crashes and resumes from that checkpoint, with no producer left.
    first.commit_progress(0, 3)
    resumed = StoreReader(tmp_path, ["en"], plan, manifest, 0.5, "window", lookahead=5)
    got = [resumed.get(0, p).feature_ids.tolist() for p in range(3, len(plan))]
    assert got == [plan.features(s) for s in plan.order(0)[3:]]


@pytest.mark.parametrize("before, after", [("window", "cache"), ("cache", "window")])
def test_a_student_resumed_under_the_other_store_mode_reads_every_row(tmp_path, before, after):
    """distill.store_mode changes how a run goes, not what it computes (stages.OPERATIONAL),
    so a student stopped in one mode may resume in the other. Fresh producers then fill
    whatever the new mode's window lacks: every row is read right, cache mode computes no
    shard twice after the switch, and window mode is back within its bound."""
    plan = ShardPlan(range(40), shard_size=4, seed=1)
    lookahead, epochs, stop_at = 3, 2, 6  # stopped (and checkpointed) at position 6 of epoch 0
    manifest = make_manifest(plan)

    def read(mode: str, start: int, stop: int) -> list[CountingCompute]:
        computes = [CountingCompute(k) for k in range(len(TEACHERS))]
        producers = [Producer(tmp_path, t, plan, c, lookahead, epochs, manifest=manifest)
                     for t, c in zip(TEACHERS, computes)]
        step_all = lambda: sum(p.step() for p in producers if not p.finished) > 0  # noqa: E731
        reader = StoreReader(tmp_path, list(TEACHERS), plan, manifest, 5.0, mode, lookahead=lookahead)
        for index in range(start, stop):
            epoch, position = plan.locate(index)
            ids, start_logits, end_logits = reader.get(epoch, position, while_waiting=step_all)
            while step_all():
                pass
            assert ids.tolist() == plan.features(plan.order(epoch)[position])
            for k in range(len(TEACHERS)):
                assert torch.equal(start_logits[k].float(), toy_logits(k, ids.tolist())[0]), (mode, index, k)
            reader.commit_progress(epoch, position + 1)
            if mode == "window":
                for teacher in TEACHERS:
                    assert set(list_shards(tmp_path / teacher)) <= needed_shards(plan, index + 1, index + 1, lookahead)
        return computes

    read(before, 0, stop_at)
    resumed = read(after, stop_at, epochs * len(plan))
    if after == "cache":
        for compute in resumed:
            computed = [tuple(ids) for ids in compute.calls]
            assert len(computed) == len(set(computed)), "a shard computed twice after the switch to cache mode"
        assert all(len(list_shards(tmp_path / t)) == len(plan) for t in TEACHERS)
    else:  # the shards cache mode kept are reused where the window reaches them, not recomputed
        assert all(len(c.calls) < (epochs * len(plan)) - stop_at for c in resumed)


def test_several_producers_of_one_teacher_split_its_shards(tmp_path):
    """Two producer ranks of one teacher write disjoint shards (alternate run-wide
    indices) that together are every shard the student reads, each once per epoch."""
    plan = ShardPlan(range(30), shard_size=4, seed=1)
    manifest = make_manifest(plan, teachers=("en",))
    parts = [CountingCompute(0), CountingCompute(0)]
    producers = [Producer(tmp_path, "en", plan, parts[i], lookahead=4, epochs=2, manifest=manifest, part=(i, 2))
                 for i in range(2)]
    reader = StoreReader(tmp_path, ["en"], plan, manifest, 5.0, "window", lookahead=4)
    read = []
    for epoch in range(2):
        for position in range(len(plan)):
            logits = reader.get(epoch, position, while_waiting=lambda: sum(p.step() for p in producers) > 0)
            read.append(logits.feature_ids.tolist())
            reader.commit_progress(epoch, position + 1)
    while sum(p.step() for p in producers):
        pass
    assert all(p.finished for p in producers)
    assert read == [plan.features(plan.shard_at(i)) for i in range(2 * len(plan))]
    # Each part computes only shards at its own run-wide indices, nothing twice; a shard
    # still on disk from epoch 0 when epoch 1 reads it is not recomputed.
    for i, part in enumerate(parts):
        assert part.calls and all(call in read[i::2] for call in part.calls)
    assert len(parts[0].calls) + len(parts[1].calls) <= len(read)
    assert {p.name for p in (tmp_path / "en").glob("heartbeat*.json")} == {"heartbeat.0of2.json",
                                                                          "heartbeat.1of2.json"}
    with pytest.raises(ValueError, match="part 2 of 2"):
        Producer(tmp_path, "en", plan, parts[0], lookahead=4, epochs=2, manifest=manifest, part=(2, 2))


def test_no_wait_is_counted_while_the_store_is_ahead(tmp_path):
    plan = ShardPlan(range(40), shard_size=4, seed=3)
    manifest = make_manifest(plan)
    producers = [Producer(tmp_path, t, plan, CountingCompute(k), 2, 1, manifest=manifest) for k, t in enumerate(TEACHERS)]
    reader = StoreReader(tmp_path, list(TEACHERS), plan, manifest, 5.0, "window", lookahead=2)
    reader.get(0, 0, while_waiting=lambda: sum(p.step() for p in producers) > 0)  # the store starts empty
    waited = reader.stats().wait_seconds
    assert waited > 0
    for position in range(1, len(plan)):
        while sum(p.step() for p in producers):  # the producers fill the window first
            pass
        reader.get(0, position)
        reader.commit_progress(0, position)
    assert reader.stats().wait_seconds == waited
