"""The start-up disk estimate: its arithmetic on known sizes, its logit row size against a
real shard file, and the check on a really prepared run directory (refused with the
figures when the run cannot fit, skipped with run.check_disk: false)."""
from __future__ import annotations

import re
import shutil

import pytest
import torch

from dist_xqa.config import ConfigError, load_config
from dist_xqa.disk import (CHECKPOINT_BYTES_PER_PARAM, MODEL_BYTES_PER_PARAM, check_disk, check_precompute_budget,
                           count_parameters, directory_bytes, estimate_peak, logit_row_bytes, store_size)
from dist_xqa.logits.shards import compress_topk, write_shard
from dist_xqa.models import build_model
from dist_xqa.prepare import prepare
from dist_xqa.prepared import Prepared

GIB = 2**30
SIZES = dict(parameters=1_000_000, groups=4, keep=2, models=4, store_teachers=3, store_features=10_000,
             shard_rows=32, lookahead_shards=8, store_mode="window", disk_budget_bytes=10 * GIB,
             row_bytes=1000, prepared_bytes=5_000)


def test_every_item_is_counted_at_its_peak():
    items = list(estimate_peak(**SIZES).items.values())
    checkpoints, store, models, prepared = items
    assert checkpoints == 4 * 3 * 16_000_000  # keep 2 + the one written before the oldest goes
    assert store == 3 * 9 * 32 * 1000  # the window of 8 shards ahead + the one being read, per teacher
    assert models == 5 * 4_000_000  # four models, one of them twice while it is replaced
    assert prepared == 5_000
    assert estimate_peak(**SIZES).total == sum(items)
    assert CHECKPOINT_BYTES_PER_PARAM == 16 and MODEL_BYTES_PER_PARAM == 4


def test_the_store_is_bounded_by_its_mode():
    # the window never holds more than the whole set
    small = estimate_peak(**{**SIZES, "store_features": 100})
    assert list(small.items.values())[1] == 3 * 100 * 1000
    # cache mode keeps every shard, up to the budget the reader evicts above
    cache = estimate_peak(**{**SIZES, "store_mode": "cache"})
    assert list(cache.items.values())[1] == 3 * 10_000 * 1000
    capped = estimate_peak(**{**SIZES, "store_mode": "cache", "disk_budget_bytes": 1_000_000})
    assert list(capped.items.values())[1] == 1_000_000
    # no logit store (baselines), no model: nothing counted for them
    none = estimate_peak(**{**SIZES, "store_teachers": 0, "models": 0})
    assert list(none.items.values())[1:3] == [0, 0]


@pytest.mark.parametrize("topk", [None, 4])
def test_logit_row_bytes_match_a_real_shard(tmp_path, topk):
    rows, length = 64, 96
    start, end = torch.randn(rows, length), torch.randn(rows, length)
    if topk:
        mask = torch.ones(rows, length, dtype=torch.bool)
        start, end = compress_topk(start, mask, topk), compress_topk(end, mask, topk)
    size = write_shard(tmp_path / "shard_000000.safetensors", range(rows), start, end)
    header = size - rows * logit_row_bytes(length, "float16", topk)
    assert 0 < header < 1024, f"{size} bytes for {rows} rows"  # the rest is the safetensors header


def test_top_k_rows_are_smaller():
    assert logit_row_bytes(384, "float16", None) == 8 + 2 * 384 * 2
    assert logit_row_bytes(384, "float16", 16) == 8 + 2 * (16 * 4 + 4)


def test_describe_lists_each_item_and_the_free_space():
    text = estimate_peak(**SIZES).describe(present=GIB, free=3 * GIB)
    for name in ("checkpoints (4 group(s) x 3)", "logit store (3 teacher(s), window)", "models (4",
                 "prepared data", "peak of the run", "already in the run directory", "free in the run directory"):
        assert name in text
    assert re.search(r"free in the run directory\s+3\.00 GiB", text)


QUICK = ["data.demo_articles=6", "model.max_length=96", "model.doc_stride=32"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A really prepared demo run directory (the check off while it is made)."""
    path = tmp_path_factory.mktemp("disk") / "run"
    prepare(load_config(None, [*QUICK, f"run_dir={path}", "run.check_disk=false"]))
    return path


def test_a_run_that_fits_passes_and_counts_what_is_there(run_dir):
    cfg = load_config(None, [*QUICK, f"run_dir={run_dir}"])
    estimate = check_disk(cfg, Prepared(run_dir))
    assert estimate.items["prepared data"] == directory_bytes(run_dir / "prepared") > 0
    # four groups (3 teachers, the student) of the tiny model
    assert estimate.items["checkpoints (4 group(s) x 3)"] > 0


def test_a_run_that_cannot_fit_is_refused_with_the_figures(run_dir):
    free = shutil.disk_usage(run_dir).free
    # a checkpoint per group is kept for so many steps that the run needs more than is free
    cfg = load_config(None, [*QUICK, f"run_dir={run_dir}", f"checkpoint.keep={free // 10**5}"])
    with pytest.raises(ConfigError) as err:
        prepare(cfg)  # the prepared data is reused; the check runs at the end of preparation
    message = str(err.value)
    assert "too little free space" in message and "run.check_disk: false" in message
    for name in ("checkpoints (4 group(s)", "logit store", "models", "prepared data", "free in the run directory"):
        assert name in message
    # the figure given for free space is the run directory's
    shown = float(re.search(r"free in the run directory\s+([\d,.]+) GiB", message).group(1).replace(",", ""))
    assert shown == pytest.approx(free / GIB, rel=0.01)
    # the key skips the check
    prepare(load_config(None, [*QUICK, f"run_dir={run_dir}", f"checkpoint.keep={free // 10**5}",
                               "run.check_disk=false"]))


def test_precompute_needs_a_budget_that_holds_all_of_D(run_dir):
    prepared = Prepared(run_dir)
    teachers, features = store_size(load_config(None, [*QUICK, f"run_dir={run_dir}"]), prepared)
    base = [*QUICK, f"run_dir={run_dir}", "distill.precompute=true", "distill.store_mode=cache"]
    cfg = load_config(None, base)
    need = teachers * features * logit_row_bytes(cfg.model.max_length, "float16", None)
    check_precompute_budget(load_config(None, base + [f"distill.disk_budget_gb={need / GIB}"]), prepared)  # fits
    with pytest.raises(ConfigError, match=r"distill\.precompute keeps the logits of all of D: 3 teacher\(s\) x "
                                          rf"{features} features .* raise distill\.disk_budget_gb to at least"):
        check_precompute_budget(load_config(None, base + [f"distill.disk_budget_gb={need * 0.99 / GIB}"]), prepared)
    check_precompute_budget(load_config(None, [*QUICK, f"run_dir={run_dir}", "distill.store_mode=cache",
                                               "distill.disk_budget_gb=0.000001"]), prepared)  # streamed: no check


def test_parameters_are_counted_on_the_meta_device_without_touching_the_rng(run_dir):
    cfg = load_config(None, [*QUICK, f"run_dir={run_dir}"])
    tokenizer = Prepared(run_dir).tokenizer()
    state = torch.get_rng_state()
    counted = count_parameters(cfg.model, tokenizer)
    assert torch.equal(torch.get_rng_state(), state)  # rank 0 seeds its training later
    assert counted == sum(p.numel() for p in build_model(cfg.model, tokenizer, seed=0).parameters())


def test_borrowed_models_are_not_this_runs_to_write(tmp_path):
    from dist_xqa.config import load_config
    from dist_xqa.disk import saved_models

    own = load_config(None, [f"run_dir={tmp_path / 'a'}"])
    borrowing = load_config(None, [f"run_dir={tmp_path / 'b'}", f"phase1_from={tmp_path / 'a'}"])
    assert saved_models(own) == 4 and saved_models(borrowing) == 1  # 3 teachers + the student; the student alone
