"""The placebo control (distill.placebo_shuffle): a producer writes each shard with its
teacher logit rows moved to other rows of the shard, so the student distils from logits of
the same scale that carry no information about its features; without the option the
stored rows are the teacher's own. Also the config side of both controls (placebo,
lambda_kd = 0)."""
from __future__ import annotations

import pytest
import torch

from dist_xqa.config import ConfigError, load_config
from dist_xqa.logits import Manifest, Producer, ShardPlan, read_shard, shard_path

SEQ_LEN = 6
FEATURES = list(range(100, 112))  # 12 features in shards of 5: two full shards and one of 2


def teacher_logits(feature_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows that name their feature (exact in float16)."""
    ids = torch.tensor(feature_ids, dtype=torch.float32)[:, None] - 100
    start = 8 * ids + torch.arange(SEQ_LEN, dtype=torch.float32)[None, :]
    return start, -start


def stored_shards(store, placebo_seed: int | None) -> dict[int, tuple[list[int], torch.Tensor, torch.Tensor]]:
    plan = ShardPlan(FEATURES, shard_size=5, seed=3)
    manifest = Manifest.for_plan(plan, tokenizer="toy", teachers={"en": "ckpt-en"}, dtype="float16",
                                 placebo=placebo_seed)
    producer = Producer(store, "en", plan, teacher_logits, lookahead=len(plan), epochs=1, manifest=manifest)
    while producer.step():
        pass
    out = {}
    for shard in range(len(plan)):
        ids = plan.features(shard)
        data = read_shard(shard_path(store, "en", shard), ids, torch.float16, None)
        out[shard] = (ids, data.start.float(), data.end.float())
    return out


def test_without_placebo_each_row_holds_its_own_features_logits(tmp_path):
    for ids, start, end in stored_shards(tmp_path, None).values():
        real_start, real_end = teacher_logits(ids)
        assert torch.equal(start, real_start) and torch.equal(end, real_end)


def test_placebo_rows_are_a_permutation_of_the_real_rows_none_in_place(tmp_path):
    shards = stored_shards(tmp_path / "a", placebo_seed=7)
    assert len(shards) == 3
    for ids, start, end in shards.values():
        real_start, _ = teacher_logits(ids)
        # every real row appears exactly once (the same loss scale) ...
        source = [next(j for j in range(len(ids)) if torch.equal(row, real_start[j])) for row in start]
        assert sorted(source) == list(range(len(ids)))
        # ... but no row holds its own feature's logits (no information)
        assert all(src != i for i, src in enumerate(source))
        assert torch.equal(end, -start)  # start and end rows move together
    again = stored_shards(tmp_path / "b", placebo_seed=7)
    other = stored_shards(tmp_path / "c", placebo_seed=8)
    assert all(torch.equal(shards[s][1], again[s][1]) for s in shards)  # seeded
    assert any(not torch.equal(shards[s][1], other[s][1]) for s in shards if len(shards[s][0]) > 2)


def test_config_accepts_both_controls_and_refuses_what_means_nothing():
    assert load_config(None, ["distill.lambda_kd=0"]).distill.lambda_kd == 0.0
    assert load_config(None, ["distill.placebo_shuffle=true"]).distill.placebo_shuffle
    with pytest.raises(ConfigError, match="distill.lambda_nll and distill.lambda_kd"):
        load_config(None, ["distill.lambda_kd=0", "distill.lambda_nll=0"])
    with pytest.raises(ConfigError, match="distill.lambda_nll and distill.lambda_kd"):
        load_config(None, ["distill.lambda_kd=-0.5"])
    with pytest.raises(ConfigError, match="distill.placebo_shuffle"):
        load_config(None, ["distill.placebo_shuffle=true", "strategy.name=mixmrc"])
