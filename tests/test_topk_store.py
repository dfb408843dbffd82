"""The top-k compressed logit store (`distill.store_topk`), with real files: the top-k form
and its reconstruction (dist_xqa/logits/shards.py), its shard files, the manifest that
refuses a store of another form, and producers -> reader -> KD loss over a whole epoch."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dist_xqa import kernels, losses
from dist_xqa.config import ConfigError, load_config, validate
from dist_xqa.logits import (
    Manifest,
    Producer,
    ShardError,
    ShardPlan,
    StoreMismatchError,
    StoreReader,
    read_shard,
    shard_path,
    write_shard,
)
from dist_xqa.logits.shards import TopKLogits, compress_topk, dense_logits, stack_logits
from test_logit_store import make_manifest, undetected_bit_flips

SEQ_LEN = 48
TEACHERS = ("en", "es", "de")


def answer_mask(feature_ids: list[int]) -> torch.Tensor:
    """Positions mask of toy features: CLS, question tokens 1..7 excluded, a context that
    ends at a feature-dependent point (padding after); feature ids divisible by 5 have only
    CLS and two context tokens, fewer than most k."""
    rows = []
    for f in feature_ids:
        end = 10 if f % 5 == 0 else SEQ_LEN - (f % 13)
        row = torch.zeros(SEQ_LEN, dtype=torch.bool)
        row[0] = True
        row[8:end] = True
        rows.append(row)
    return torch.stack(rows)


def teacher_logits(teacher_index: int, feature_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic peaked logits like a QA head's: noise, two answer candidates shared by
    the teachers (with teacher-specific confidence), and high logits on question tokens,
    which are not answer positions and must not take a top-k slot or any mass."""
    out = []
    for part in (0, 1):
        rows = []
        for f in feature_ids:
            gen = torch.Generator().manual_seed(1000 * f + 10 * teacher_index + part)
            row = 2 * torch.randn(SEQ_LEN, generator=gen)
            candidates = torch.Generator().manual_seed(f)
            for position in torch.randint(8, 10, (2,), generator=candidates) if f % 5 == 0 else \
                    torch.randint(8, SEQ_LEN - 12, (2,), generator=candidates):
                row[position] += 6 + 2 * teacher_index
            row[1:8] += 20
            rows.append(row)
        out.append(torch.stack(rows))
    return out[0], out[1]


def masked_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return losses.masked_log_softmax(logits, mask).exp()


# --- the form and its reconstruction --------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_through_a_file_keeps_the_distribution(tmp_path, k, dtype):
    ids = list(range(20))
    start, end = teacher_logits(0, ids)
    mask = answer_mask(ids)
    path = shard_path(tmp_path, "en", 0)
    write_shard(path, ids, compress_topk(start, mask, k), compress_topk(end, mask, k), dtype)
    data = read_shard(path, ids, dtype, topk=k)
    assert isinstance(data.start, TopKLogits) and data.start.shape == (20, SEQ_LEN)
    tol = dict(rtol=1e-2, atol=1e-4) if dtype == torch.float16 else dict(rtol=6e-2, atol=1e-3)
    for original, stored in ((start, data.start), (end, data.end)):
        p, q = masked_probs(original, mask), masked_probs(dense_logits(stored, mask), mask)
        idx = stored.indices.long()
        kept = idx >= 0
        assert mask.gather(-1, idx.clamp(min=0))[kept].all(), "only answer positions take a slot"
        assert torch.equal(kept.sum(-1), mask.sum(-1).clamp(max=k)), "k slots, or every valid position"
        torch.testing.assert_close(q.gather(-1, idx.clamp(min=0))[kept], p.gather(-1, idx.clamp(min=0))[kept], **tol)
        torch.testing.assert_close(q.sum(-1), torch.ones(20), rtol=0, atol=1e-5)
        assert torch.equal(q[~mask], torch.zeros_like(q[~mask])), "masked positions stay masked"
        # Empty slots write into an extra last column, dropped.
        kept_positions = torch.zeros(20, SEQ_LEN + 1, dtype=torch.bool).scatter_(-1, torch.where(kept, idx, SEQ_LEN), True)
        left_out = mask & ~kept_positions[:, :SEQ_LEN]
        # The left-out mass is the original's, spread evenly over the left-out valid positions.
        torch.testing.assert_close((q * left_out).sum(-1), (p * left_out).sum(-1), **tol)
        for row in range(20):
            spread = q[row][left_out[row]]
            assert spread.numel() == 0 or torch.allclose(spread, spread[0].expand_as(spread))
        few = torch.tensor([f % 5 == 0 for f in ids])
        if k >= 3:  # rows with CLS and two context tokens keep them all: nothing is left out
            assert torch.isinf(stored.rest[few]).all() and not left_out[few].any()
            torch.testing.assert_close(q[few], p[few], **tol)


def test_reconstruction_feeds_the_kd_loss_and_the_fused_kernel():
    ids = list(range(12))
    mask = answer_mask(ids)
    teachers = [teacher_logits(k, ids)[0] for k in range(3)]
    stored = torch.stack([dense_logits(compress_topk(t, mask, 8), mask) for t in teachers])
    student = torch.randn(12, SEQ_LEN, requires_grad=True)
    results = {}
    for impl in ("reference", "triton"):  # the kernel path, unchanged, on the reconstruction
        loss, weights = kernels.entropy_weighted_kd(student, stored, mask, impl=impl)
        results[impl] = (loss, weights, *torch.autograd.grad(loss, student))
    for got, want in zip(results["triton"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The imp entropy of the reconstruction is that of the kept probabilities plus the
    # left-out mass spread evenly: computed by hand for one row.
    probs = masked_probs(teachers[1][3], mask[3])
    kept = probs.topk(8).values
    rest, n_left = 1 - kept.sum(), int(mask[3].sum()) - 8
    expected = -(kept * kept.log()).sum() - rest * math.log(rest / n_left)
    got = losses.masked_entropy(stored[1, 3], mask[3])
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


def test_topk_form_selects_rows_and_stacks_like_tensors():
    ids = list(range(6))
    mask = answer_mask(ids)
    forms = [compress_topk(teacher_logits(k, ids)[0], mask, 4) for k in range(3)]
    stacked = stack_logits(forms)
    assert stacked.shape == (3, 6, SEQ_LEN)
    rows = torch.tensor([4, 1])
    picked = dense_logits(stacked[:, rows], mask[rows])
    assert torch.equal(picked, torch.stack([dense_logits(f, mask)[rows] for f in forms]))


def test_topk_shards_are_smaller_by_the_stated_bytes_per_row(tmp_path):
    ids = list(range(32))
    start, end = teacher_logits(0, ids)
    mask = answer_mask(ids)

    def data_bytes(path: Path) -> int:
        raw = path.read_bytes()
        return len(raw) - 8 - int.from_bytes(raw[:8], "little")

    write_shard(tmp_path / "dense.safetensors", ids, start, end)
    assert data_bytes(tmp_path / "dense.safetensors") == 32 * (8 + 2 * 2 * SEQ_LEN)
    for k in (4, 16):
        write_shard(tmp_path / f"top{k}.safetensors", ids, compress_topk(start, mask, k), compress_topk(end, mask, k))
        assert data_bytes(tmp_path / f"top{k}.safetensors") == 32 * (8 + 2 * (4 * k + 4))


def test_every_flipped_bit_of_a_topk_shard_is_detected(tmp_path):
    ids = [5, 6, 7]
    start, end = teacher_logits(0, ids)
    path = tmp_path / "shard_000000.safetensors"
    write_shard(path, ids, compress_topk(start, answer_mask(ids), 2), compress_topk(end, answer_mask(ids), 2))
    assert undetected_bit_flips(path) == []


def test_a_shard_of_the_other_form_is_refused(tmp_path):
    ids = [1, 2, 3]
    start, end = teacher_logits(0, ids)
    mask = answer_mask(ids)
    dense, top8 = tmp_path / "dense.safetensors", tmp_path / "top8.safetensors"
    write_shard(dense, ids, start, end)
    write_shard(top8, ids, compress_topk(start, mask, 8), compress_topk(end, mask, 8))
    with pytest.raises(ShardError, match="holds dense logits, the store's manifest says top-8"):
        read_shard(dense, ids, torch.float16, topk=8)
    with pytest.raises(ShardError, match="holds top-8 logits, the store's manifest says top-16"):
        read_shard(top8, ids, torch.float16, topk=16)
    with pytest.raises(ShardError, match="holds top-8 logits, the store's manifest says dense"):
        read_shard(top8, ids, torch.float16, topk=None)
    with pytest.raises(ValueError, match="both dense or both top-k"):
        write_shard(dense, ids, compress_topk(start, mask, 8), end)


# --- manifest and config -----------------------------------------------------------------------


def test_a_store_written_dense_is_refused_by_a_topk_student(tmp_path):
    plan = ShardPlan(range(100, 124), shard_size=8, seed=1)
    dense = make_manifest(plan, teachers=("en",))
    top16 = make_manifest(plan, teachers=("en",), topk=16)
    producer = Producer(tmp_path, "en", plan, lambda f: teacher_logits(0, f), lookahead=1, epochs=1, manifest=dense)
    assert producer.step()
    reader = StoreReader(tmp_path, ["en"], plan, top16, 5.0, "window", lookahead=1)
    with pytest.raises(StoreMismatchError, match=r"topk \(None != expected 16\)"):
        reader.get(0, 0)
    with pytest.raises(StoreMismatchError, match=r"topk \(None != expected 16\)"):
        Producer(tmp_path, "en", plan, lambda f: teacher_logits(0, f), lookahead=1, epochs=1, manifest=top16,
                 answer_mask=answer_mask)
    with pytest.raises(ValueError, match="top-16 store needs answer_mask"):
        Producer(tmp_path, "en", plan, lambda f: teacher_logits(0, f), lookahead=1, epochs=1, manifest=top16)
    with pytest.raises(ValueError, match="topk must be null"):
        make_manifest(plan, topk=0)
    old = {k: v for k, v in dense.to_json().items() if k != "topk"}  # a manifest from before top-k
    assert Manifest.from_json(old, "old manifest") == dense


def test_config_refuses_a_topk_below_one():
    cfg = load_config()
    assert cfg.distill.store_topk is None, "dense by default"
    cfg.distill.store_topk = 0
    with pytest.raises(ConfigError, match="distill.store_topk"):
        validate(cfg)


# --- end to end -----------------------------------------------------------------------------


def test_producers_to_student_loss_through_a_topk_store(tmp_path):
    """Three producers write a top-8 store for two epochs (stepped between the student's
    reads, as on time-shared ranks); the student reads every shard and computes the KD loss
    on what it read. Every row must be its own teacher's compressed logits, the loss must be
    the one of the compressed distribution, and the files must be the top-k ones."""
    plan = ShardPlan(range(200, 237), shard_size=6, seed=4)  # 7 shards, the last one short
    manifest = make_manifest(plan, topk=8)
    producers = [Producer(tmp_path, t, plan, lambda f, k=k: teacher_logits(k, f), 2, 2, manifest=manifest,
                          answer_mask=answer_mask) for k, t in enumerate(TEACHERS)]
    reader = StoreReader(tmp_path, list(TEACHERS), plan, manifest, 5.0, "window", lookahead=2)
    student = torch.Generator().manual_seed(0)
    seen = []
    for epoch in range(2):
        for position in range(len(plan)):
            while any(p.step() for p in producers):
                pass
            shard = reader.get(epoch, position)
            ids = shard.feature_ids.tolist()
            assert ids == plan.features(plan.order(epoch)[position])
            assert isinstance(shard.start, TopKLogits) and shard.start.values.shape == (3, len(ids), 8)
            mask = answer_mask(ids)
            got = [dense_logits(part, mask) for part in (shard.start, shard.end)]
            for k in range(len(TEACHERS)):
                for part, original in enumerate(teacher_logits(k, ids)):
                    want = dense_logits(compress_topk(original, mask, 8), mask)
                    torch.testing.assert_close(masked_probs(got[part][k], mask), masked_probs(want, mask),
                                               rtol=1e-2, atol=1e-4)
            logits = torch.randn(len(ids), SEQ_LEN, generator=student)
            labels = torch.zeros(len(ids), dtype=torch.long)  # CLS: a valid position of every row
            loss = losses.student_loss(logits, logits, got[0], got[1], mask, labels, labels)
            exact = losses.student_loss(logits, logits, *(torch.stack(
                [dense_logits(compress_topk(teacher_logits(k, ids)[part], mask, 8), mask) for k in range(3)])
                for part in (0, 1)), mask, labels, labels)
            torch.testing.assert_close(loss.kd, exact.kd, rtol=2e-3, atol=0)
            seen.append(ids)
            reader.commit_progress(epoch, position + 1)
    assert sorted(sum(seen[: len(plan)], [])) == list(range(200, 237))
    for teacher in TEACHERS:
        for path in (tmp_path / teacher).glob("shard_*.safetensors"):
            assert read_shard(path, topk=8).start.values.shape[1] == 8
