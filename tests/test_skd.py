"""Self-knowledge distillation pieces: mAP@k on hand-computed rankings, the SKD loss, and
cross-lingual sampling re-drawn each epoch."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from dist_xqa.data.builders import cross_lingual_sampling
from dist_xqa.strategies.skd import average_precision_at_k, kl_rows, map_at_k, skd_loss
from tests.test_builders import parallel_set

L = 40
QUESTION = range(1, 8)  # question tokens: never valid answer positions


def positions_mask(rows: int = 1) -> torch.Tensor:
    mask = torch.ones(rows, L, dtype=torch.bool)
    mask[:, list(QUESTION)] = False
    return mask


def ranked(*order: int) -> torch.Tensor:
    """Logits [1, L] whose descending order starts with `order`, the rest far below."""
    logits = -torch.arange(L, dtype=torch.float32) / L - 50.0
    for i, position in enumerate(order):
        logits[position] = 100.0 - i
    return logits[None]


def ap(logits, gold, variant="map", mask=None, k=10, delta=5) -> float:
    mask = positions_mask() if mask is None else mask
    return float(average_precision_at_k(logits, mask, torch.tensor([gold]), k, delta, variant))


# Ranking of a start: hits within +-5 of gold 20 at ranks 1, 3, 4, 6 and 10.
START = ranked(20, 30, 22, 16, 35, 24, 9, 10, 11, 25)
START_MAP = (1 / 1 + 2 / 3 + 3 / 4 + 4 / 6 + 5 / 10) / 10


def test_map_sums_the_precision_at_every_hit_over_two_delta():
    assert ap(START, 20) == pytest.approx(START_MAP)
    # every top-10 prediction inside the window: the coefficient reaches 1
    assert ap(ranked(*range(15, 26)), 20) == pytest.approx(1.0)
    assert ap(ranked(*range(30, 40)), 20) == 0.0


def test_mrr_variant_counts_the_first_hit_in_gold_minus_5_to_gold_plus_4():
    # gold 26: 31 is within +-5 (map) but outside [21, 30] (the public code's range)
    end = ranked(31, 21, 26, 38, 39, 8, 9, 10, 11, 12)
    assert ap(end, 26, "mrr") == pytest.approx(1 / 2)
    assert ap(end, 26, "map") == pytest.approx((1 + 2 / 2 + 3 / 3) / 10)
    assert ap(START, 20, "mrr") == pytest.approx(1.0)


def test_masked_positions_are_never_ranked_and_cls_is_no_answer_hit():
    # a question token ranked first by the teacher is not a prediction at all
    assert ap(ranked(3, 20, 30, 22, 16, 35, 24, 9, 10, 11, 25), 20) == pytest.approx(START_MAP)
    # a short question (tokens 1-2): CLS is 4 tokens from gold 4 but is no hit
    short_question = torch.ones(1, L, dtype=torch.bool)
    short_question[0, [1, 2]] = False
    top = ranked(0, 4, 30, 31, 32, 33, 34, 35, 36, 37)
    assert ap(top, 4, mask=short_question) == pytest.approx((1 / 2) / 10)
    assert ap(top, 4, "mrr", mask=short_question) == pytest.approx(1 / 2)


def test_a_cls_labelled_window_has_cls_as_its_only_relevant_position():
    assert ap(ranked(15, 0, 16, 17), 0) == pytest.approx(1 / 2)  # 1 / rank of CLS
    assert ap(ranked(15, 0, 16, 17), 0, "mrr") == pytest.approx(1 / 2)
    assert ap(ranked(0, 8, 9, 10), 0) == pytest.approx(1.0)  # context tokens near CLS are no hits
    assert ap(ranked(*range(20, 30)), 0) == 0.0


def test_k_longer_than_the_valid_positions_counts_only_valid_ones():
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[0, [0, 20, 21]] = True
    assert ap(ranked(20, 0, 21), 20, mask=mask) == pytest.approx((1 + 2 / 3) / 10)
    assert ap(ranked(20), 20, mask=torch.zeros(1, L, dtype=torch.bool)) == 0.0


def test_map_at_k_averages_start_and_end_then_the_batch_or_keeps_each_example():
    end = ranked(31, 21, 26, 38, 39, 8, 9, 10, 11, 12)
    teacher_start = torch.cat([START, ranked(*range(15, 26))])
    teacher_end = torch.cat([end, ranked(*range(30, 40))])
    mask = positions_mask(2)
    gold_start, gold_end = torch.tensor([20, 20]), torch.tensor([26, 20])
    row0 = (START_MAP + 0.3) / 2
    row1 = (1.0 + 0.0) / 2
    per_example = map_at_k(teacher_start, teacher_end, mask, gold_start, gold_end, reduction="example")
    assert per_example.tolist() == pytest.approx([row0, row1])
    batch = map_at_k(teacher_start, teacher_end, mask, gold_start, gold_end)
    assert batch.shape == () and float(batch) == pytest.approx((row0 + row1) / 2)
    mrr = map_at_k(teacher_start, teacher_end, mask, gold_start, gold_end, variant="mrr")
    assert float(mrr) == pytest.approx(((1 + 0.5) / 2 + (1 + 0) / 2) / 2)
    # a row with no valid position is left out of the batch mean
    mask[1] = False
    assert float(map_at_k(teacher_start, teacher_end, mask, gold_start, gold_end)) == pytest.approx(row0)


def test_map_at_k_is_detached_and_checks_its_options():
    logits = START.clone().requires_grad_(True)
    out = map_at_k(logits, logits, positions_mask(), torch.tensor([20]), torch.tensor([20]))
    assert not out.requires_grad
    with pytest.raises(ValueError, match="variant"):
        ap(START, 20, "ndcg")
    with pytest.raises(ValueError, match="reduction"):
        map_at_k(START, START, positions_mask(), torch.tensor([20]), torch.tensor([20]), reduction="row")


# --- the SKD loss ----------------------------------------------------------------------------


def two_position_case():
    """Student uniform over 2 valid positions; teacher softmax(z / 2) = [3/4, 1/4]."""
    mask = torch.tensor([[True, True, False]])
    student = torch.zeros(1, 3, requires_grad=True)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0, 9.0]])
    expected_kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    return mask, student, teacher, expected_kl


def test_kl_is_teacher_to_student_at_the_temperature_over_valid_positions():
    mask, student, teacher, expected = two_position_case()
    assert float(kl_rows(student, teacher, mask, tau=2.0).detach()) == pytest.approx(expected)
    assert float(kl_rows(teacher, teacher, mask, tau=2.0)) == pytest.approx(0.0, abs=1e-7)


def test_skd_loss_sums_ce_and_kl_over_start_and_end_as_eq_6_by_default():
    """Eq. 6: L = sum_{start,end} CE + alpha * sum_{start,end} KL, both at their own
    temperature (CE at 1, KL at t = 2), no t^2."""
    mask = torch.tensor([[True, True, False]])
    student_start = torch.zeros(1, 3, requires_grad=True)  # p = [1/2, 1/2] at any temperature
    student_end = torch.tensor([[math.log(3.0), 0.0, 0.0]], requires_grad=True)  # p = [3/4, 1/4] at t = 1
    teacher_start = torch.tensor([[2 * math.log(3.0), 0.0, 9.0]])  # p = [3/4, 1/4] at t = 2
    teacher_end = torch.tensor([[0.0, 0.0, 9.0]])  # p = [1/2, 1/2] at t = 2
    gold_start, gold_end = torch.tensor([0]), torch.tensor([1])
    ce = math.log(2.0) + math.log(4.0)  # -log 1/2 (start) - log 1/4 (end)
    kl_start = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    s = math.sqrt(3.0)  # student end at t = 2: softmax([log 3 / 2, 0]) = [s, 1] / (1 + s)
    kl_end = 0.5 * math.log(0.5 * (1 + s) / s) + 0.5 * math.log(0.5 * (1 + s))
    kl = kl_start + kl_end
    args = (student_start, student_end, teacher_start, teacher_end, mask, gold_start, gold_end)
    out = skd_loss(*args, alpha_kl=0.8)
    assert out.ce.item() == pytest.approx(ce)
    assert out.kl.item() == pytest.approx(kl)
    assert out.total.item() == pytest.approx(ce + 0.8 * kl)
    assert out.alpha_kl.item() == pytest.approx(0.8)
    # the public code averages both terms: half the loss, the KL's share of it unchanged
    code = skd_loss(*args, alpha_kl=0.8, start_end="mean")
    assert (code.ce.item(), code.kl.item()) == pytest.approx((ce / 2, kl / 2))
    assert code.total.item() == pytest.approx((ce + 0.8 * kl) / 2)
    squared = skd_loss(*args, alpha_ce=0.5, alpha_kl=0.8, tau_squared=True, start_end="mean")
    assert squared.total.item() == pytest.approx(0.5 * ce / 2 + 0.8 * 4 * kl / 2)  # t^2 = 4 on the KL alone
    out.total.backward()
    assert student_start.grad[0, 2] == 0 and student_end.grad[0, 2] == 0


def test_skd_loss_is_cross_entropy_alone_when_teacher_equals_student():
    torch.manual_seed(0)
    logits = torch.randn(3, L)
    mask = positions_mask(3)
    gold = torch.tensor([0, 20, 30])
    out = skd_loss(logits, logits, logits, logits, mask, gold, gold)
    assert out.kl.item() == pytest.approx(0.0, abs=1e-6)
    assert out.total.item() == pytest.approx(out.ce.item())


def test_per_example_coefficients_weight_each_rows_kl():
    mask, student, teacher, kl = two_position_case()
    mask, student, teacher = mask.repeat(2, 1), student.detach().repeat(2, 1), teacher.repeat(2, 1)
    teacher[1] = 0.0  # row 1: teacher == student, KL 0
    gold = torch.tensor([0, 1])
    out = skd_loss(student, student, teacher, teacher, mask, gold, gold, alpha_ce=0.0,
                   alpha_kl=torch.tensor([0.5, 1.0]))
    assert out.total.item() == pytest.approx(0.5 * 2 * kl / 2)
    assert out.alpha_kl.item() == pytest.approx(0.75)


# --- cross-lingual sampling, re-drawn each epoch ------------------------------------------------


def test_cross_lingual_sampling_counts_hold_in_every_epoch_and_the_draw_changes():
    ps = parallel_set(n_ids=30)
    draws = []
    for epoch in range(3):
        sampled = cross_lingual_sampling(ps, n=1, seed=1000 + epoch)
        assert len(sampled) == 30 * (1 + 1) ** 2
        assert set(Counter(ex.id for ex in sampled).values()) == {4}
        pairs = Counter((ex.question_lang, ex.context_lang) for ex in sampled)
        assert pairs[("en", "en")] == 30
        assert pairs[("es", "es")] + pairs[("de", "de")] == 30
        draws.append({ex.key for ex in sampled})
        assert {ex.key for ex in cross_lingual_sampling(ps, n=1, seed=1000 + epoch)} == draws[-1]
    assert draws[0] != draws[1] and draws[1] != draws[2]



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant, reduction", [("map", "batch"), ("mrr", "example")])
def test_the_coefficient_and_the_kl_run_on_the_device_without_a_host_sync(variant, reduction):
    torch.manual_seed(0)
    student = torch.randn(64, 384, device="cuda", requires_grad=True)
    teacher = torch.randn(64, 384, device="cuda")
    mask = torch.ones(64, 384, dtype=torch.bool, device="cuda")
    mask[:, 1:20] = False
    gold = torch.randint(20, 384, (64,), device="cuda")
    gold[:8] = 0  # CLS-labelled windows
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        alpha = map_at_k(teacher, teacher, mask, gold, gold, variant=variant, reduction=reduction)
        kl_rows(student, teacher, mask, tau=2.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # (span_nll's label check in skd_loss does synchronise: it raises on a bad label)
    loss = skd_loss(student, student, teacher, teacher, mask, gold, gold, alpha_kl=alpha)
    cpu = map_at_k(teacher.cpu(), teacher.cpu(), mask.cpu(), gold.cpu(), gold.cpu(), variant=variant,
                   reduction=reduction)
    torch.testing.assert_close(alpha.cpu(), cpu)
    loss.total.backward()
    assert student.grad is not None


# --- phase 2 helpers: the epoch's sample as feature rows, the coefficient, generations -----------


def test_epoch_rows_select_every_window_of_the_epochs_sample():
    from datasets import Dataset

    from dist_xqa.data.builders import mixmrc
    from dist_xqa.roles.skd import epoch_rows, epoch_seed, feature_keys, source_parallel_set

    ps = parallel_set(n_ids=12)
    pairs = mixmrc(ps)
    windows = [1 + i % 2 for i in range(len(pairs))]  # every other example has two windows
    keys = [ex.key for ex, n in zip(pairs, windows) for _ in range(n)]
    features = Dataset.from_dict({"example_id": [k[0] for k in keys], "question_lang": [k[1] for k in keys],
                                  "context_lang": [k[2] for k in keys]})
    assert feature_keys(features) == keys
    rebuilt = source_parallel_set(pairs, ["en", "es", "de"])
    assert rebuilt.ids == ps.ids and rebuilt.languages == ps.languages
    assert epoch_seed(0, 1) != epoch_seed(1, 0) and epoch_seed(0, 1) == epoch_seed(0, 1)
    for epoch in range(2):
        rows = epoch_rows(keys, rebuilt, 1, seed=0, epoch=epoch, source_lang="en")
        sampled = {ex.key for ex in cross_lingual_sampling(ps, 1, epoch_seed(0, epoch))}
        assert {keys[r] for r in rows} == sampled
        assert len(rows) == sum(n for ex, n in zip(pairs, windows) if ex.key in sampled)
    assert epoch_rows(keys, rebuilt, 1, 0, 0, "en") != epoch_rows(keys, rebuilt, 1, 0, 1, "en")
    assert len(epoch_rows(keys, rebuilt, None, 0, 0, "en")) == len(keys)  # every target language


def test_kl_coefficient_follows_the_config():
    from dist_xqa.config import SkdConfig
    from dist_xqa.roles.skd import kl_coefficient

    gold = torch.tensor([20])
    args = (START, START, positions_mask(), gold, gold)
    assert kl_coefficient(SkdConfig(coefficient="fixed", alpha_kl=0.7), *args) == 0.7
    assert kl_coefficient(SkdConfig(coefficient="none"), *args) == 0.0
    assert float(kl_coefficient(SkdConfig(), *args)) == pytest.approx(START_MAP)
    assert float(kl_coefficient(SkdConfig(coefficient="mrr"), *args)) == pytest.approx(1.0)
    assert kl_coefficient(SkdConfig(map_reduction="example"), *args).shape == (1,)


def test_a_store_of_another_teacher_generation_is_refused(tmp_path):
    from dist_xqa.logits import Manifest, ShardPlan, StoreMismatchError, StoreReader, prepare_store, read_manifest

    plan = ShardPlan(range(8), 4, seed=0)

    def manifest(generation: int) -> Manifest:
        return Manifest.for_plan(plan, "tok", {"self": "hash"}, generation=generation)

    prepare_store(tmp_path, manifest(0))
    with pytest.raises(StoreMismatchError, match=r"generation \(0 != expected 1\)"):
        prepare_store(tmp_path, manifest(1))
    reader = StoreReader(tmp_path, ["self"], plan, manifest(1), 5.0, "window", lookahead=2)
    with pytest.raises(StoreMismatchError, match="generation"):
        reader.get(0, 0)
    prepare_store(tmp_path, manifest(1), reset=True)  # a new generation starts: the old store is stale
    assert read_manifest(tmp_path).generation == 1


# --- phase 2 end to end on 2 CPU ranks (slow) -----------------------------------------------------
# Phase 2 alone: a worker (this file run as a script under torchrun) builds the role plan
# with the student on every rank, the groups, and calls run_skd on data prepared as for
# strategy mixmrc (whose sets phase 2 reads), so a test can stop the student at an epoch
# boundary. The strategy through the users' entry point: tests/test_strategies_e2e.py.

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve()
SMOKE = ["data.demo_articles=12", "student.epochs=2", "student.micro_batch_size=8", "distill.lookahead_shards=2"]


def worker_config(run_dir: Path, *overrides: str):
    from dist_xqa.config import load_config

    return load_config(None, [f"run_dir={run_dir}", *SMOKE, *overrides])


def launch_worker(worker: Path, run_dir: Path, prepared_as: str, *overrides: str) -> None:
    """Prepares `run_dir` as strategy `prepared_as` would (the sets the worker reads), then
    runs `worker` (a test module run as a script) on 2 CPU ranks under torchrun."""
    from dist_xqa.config import load_config
    from dist_xqa.prepare import prepare

    prepare(load_config(None, [f"run_dir={run_dir}", *SMOKE, f"strategy.name={prepared_as}"]))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT)}  # the worker imports this module's helpers (tests.*)
    command = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
               str(worker), str(run_dir), *overrides]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list] = {}
    for events in tb_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend(accumulator.Scalars(tag))
    # in step order: a resumed run writes its own event file, listed in no particular order
    return {tag: [e.value for e in sorted(events, key=lambda e: (e.step, e.wall_time))] for tag, events in found.items()}


@pytest.mark.slow
def test_phase2_self_distils_through_the_store_one_generation_per_epoch(tmp_path):
    from dist_xqa.logits import read_manifest

    launch_worker(WORKER, tmp_path, "mixmrc")
    assert (tmp_path / "student" / "DONE.json").exists()
    # each checkpoint removes the snapshots no resume reads: none is left once the student finished
    assert not list((tmp_path / "skd").glob("teacher_gen*"))
    manifest = read_manifest(tmp_path / "logits")
    assert manifest.generation == 1 and set(manifest.teachers) == {"self"}
    logged = scalars(tmp_path / "tb")
    for tag in ("student/loss/total", "student/loss/ce", "student/loss/kl", "student/alpha_kl"):
        assert logged.get(tag), tag
    assert all(0 <= a <= 1 for a in logged["student/alpha_kl"])
    assert max(logged["student/loss/kl"]) > 0


@pytest.mark.slow
def test_a_student_stopped_at_the_epoch_boundary_resumes_with_the_next_generation(tmp_path):
    from dist_xqa.logits import hash_checkpoint, read_manifest

    launch_worker(WORKER, tmp_path, "mixmrc", "student.epochs=1")  # stops exactly at the boundary of epoch 1
    boundary = hash_checkpoint(tmp_path / "student")  # the weights after epoch 1, saved as a generation is
    assert read_manifest(tmp_path / "logits").generation == 0
    (tmp_path / "student" / "DONE.json").unlink()
    launch_worker(WORKER, tmp_path, "mixmrc")  # student.epochs=2: resumes from the boundary checkpoint
    manifest = read_manifest(tmp_path / "logits")
    assert manifest.generation == 1  # the old generation's store is gone
    assert manifest.teachers == {"self": boundary}  # generation 1 = the boundary


if __name__ == "__main__":  # the torchrun worker of the slow tests above
    import torch.distributed as dist

    from dist_xqa.distributed import init_distributed, load_ds_config, make_groups
    from dist_xqa.prepared import Prepared
    from dist_xqa.plan import plan_roles
    from dist_xqa.roles.skd import PHASE1_JOB, run_skd

    cfg = worker_config(Path(sys.argv[1]), "strategy.name=skd", "strategy.skd.phase1=false", *sys.argv[2:])
    ctx = init_distributed()
    plan = plan_roles(ctx.world_size, [PHASE1_JOB], student_min_ranks=ctx.world_size)
    groups = make_groups(plan)
    run_skd(cfg, Prepared(cfg.run_path), load_ds_config(ROOT / "ds_configs" / "zero2.json"), plan, groups,
            ctx.device)
    dist.barrier()
