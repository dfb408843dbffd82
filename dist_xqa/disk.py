"""The run's peak disk use, estimated at start-up, so that a run that cannot fit stops
before it trains for hours and fails writing a checkpoint.

`estimate_peak` is a pure function of the run's sizes; `check_disk` (rank 0, after data
preparation) gathers them from the config and the prepared data, compares the bytes still
to be written with the free space of the run directory, and refuses the run with every
figure when they do not fit (`run.check_disk: false` skips the check).

What is counted, all of it kept to the run's end unless said:
- checkpoints: every training group (each phase-1 model, the student) keeps its newest
  `checkpoint.keep` DeepSpeed checkpoints, and writes the next one before it removes the
  oldest: keep + 1 at the peak. A checkpoint holds the module weights and the optimizer
  state, CHECKPOINT_BYTES_PER_PARAM bytes a parameter whatever the ZeRO stage (the
  partitions of the ranks add up to the whole);
- the logit store (LBMRC and SKD's teachers): window mode holds the lookahead window of
  shards plus the one being read, for every teacher; cache mode every shard of the set,
  at most `distill.disk_budget_gb` (the reader evicts above it). A row is the feature id
  and its start and end logits, dense or top-k (`distill.store_topk`);
- the models: each trained model in Hugging Face format, float32, and a second copy while
  one is replaced (saved whole before the old one goes); self-distillation's teacher
  snapshot counts as one more (one generation is kept at a time: dist_xqa.roles.skd);
- the prepared data, as measured on disk.
Models borrowed from another run (phase1_from) are not this run's to write; a store shared
between runs (distill.store_dir) counts once: the bytes it already holds count as present.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dist_xqa.jobs import STUDENT_SETS, borrowed, model_dirs, phase1_jobs

log = logging.getLogger(__name__)

# fp32 master weights + Adam's two moments (12 bytes), and the module's own weights (at
# most 4: float32; 2 in half precision): counted at the most. Measured on the CPU demo
# (ZeRO-2, 2 ranks, 406k parameters): 16.08, the rest being the files' own overhead.
CHECKPOINT_BYTES_PER_PARAM = 16
MODEL_BYTES_PER_PARAM = 4  # save_pretrained of the float32 module
LOGIT_BYTES = {"float16": 2, "bfloat16": 2}
FEATURE_ID_BYTES = 8  # int64
TOPK_INDEX_BYTES = 2  # int16
TOPK_REST_BYTES = 4  # float32 log-sum-exp of the logits left out


@dataclass(frozen=True)
class DiskEstimate:
    """Peak bytes by item, in the order they are reported."""

    items: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.items.values())

    def describe(self, present: int, free: int) -> str:
        lines = [f"  {name:<40} {_gb(size):>10}" for name, size in self.items.items()]
        lines += [f"  {'peak of the run':<40} {_gb(self.total):>10}",
                  f"  {'already in the run directory':<40} {_gb(present):>10}",
                  f"  {'still to write':<40} {_gb(max(0, self.total - present)):>10}",
                  f"  {'free in the run directory':<40} {_gb(free):>10}"]
        return "\n".join(lines)


def logit_row_bytes(max_length: int, logits_dtype: str, store_topk: int | None) -> int:
    """Bytes of one feature's logits in a shard (dist_xqa/logits/shards.py)."""
    value = LOGIT_BYTES[logits_dtype]
    if store_topk is None:
        per_part = max_length * value
    else:
        per_part = store_topk * (value + TOPK_INDEX_BYTES) + TOPK_REST_BYTES
    return FEATURE_ID_BYTES + 2 * per_part  # start and end


def estimate_peak(*, parameters: int, groups: int, keep: int, models: int, store_teachers: int,
                  store_features: int, shard_rows: int, lookahead_shards: int, store_mode: str,
                  disk_budget_bytes: int, row_bytes: int, prepared_bytes: int) -> DiskEstimate:
    """The peak bytes of a run (what is counted: the module docstring). `groups` train
    with checkpoints, `models` are saved; `store_teachers` teachers write logits of
    `store_features` features in shards of `shard_rows`."""
    checkpoint = parameters * CHECKPOINT_BYTES_PER_PARAM
    if store_mode == "window":
        rows = min(store_features, (lookahead_shards + 1) * shard_rows)
        store = store_teachers * rows * row_bytes
    else:
        store = min(store_teachers * store_features * row_bytes, disk_budget_bytes)
    return DiskEstimate({
        f"checkpoints ({groups} group(s) x {keep + 1})": groups * (keep + 1) * checkpoint,
        f"logit store ({store_teachers} teacher(s), {store_mode})": store,
        f"models ({models}, one replaced at a time)": (models + 1) * parameters * MODEL_BYTES_PER_PARAM
        if models else 0,
        "prepared data": prepared_bytes,
    })


def directory_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # removed while walking (another role's clean-up)
                pass
    return total


def count_parameters(cfg, tokenizer) -> int:
    """The model's parameters, built on the meta device: no memory, no download of weights
    (a named model's config only), and the global RNG left as it was."""
    import torch
    from transformers import AutoConfig, AutoModelForQuestionAnswering

    from dist_xqa.models import build_model

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        if cfg.name == "tiny":
            model = build_model(cfg, tokenizer, seed=0)
        else:
            model = AutoModelForQuestionAnswering.from_config(AutoConfig.from_pretrained(cfg.name))
    return sum(p.numel() for p in model.parameters())


def saved_models(cfg) -> int:
    """The models a run keeps in Hugging Face format at its peak: its phase-1 models, the
    student, and self-distillation's snapshot of the current teacher generation."""
    snapshot = cfg.strategy.name == "skd" and cfg.strategy.skd.coefficient != "none"
    return len(own_models(cfg)) + snapshot


def own_models(cfg) -> list:
    """The models this run writes: not those it borrows from another run (phase1_from)."""
    return [d for d in model_dirs(cfg) if not borrowed(cfg, d)]


def store_size(cfg, prepared) -> tuple[int, int]:
    """(teachers, features) whose logits the run's store holds: LBMRC's K teachers over D,
    SKD's frozen copy over its training set, (0, 0) for the other strategies."""
    if cfg.strategy.name == "lbmrc":
        return len(phase1_jobs(cfg)), len(prepared.features(STUDENT_SETS["lbmrc"]))
    if cfg.strategy.name == "skd" and cfg.strategy.skd.coefficient != "none":  # its own logits, one teacher
        return 1, len(prepared.features(STUDENT_SETS["skd"]))
    return 0, 0


def check_precompute_budget(cfg, prepared) -> None:
    """distill.precompute keeps every shard of D to the end (the reader evicts none): refuse
    a run whose distill.disk_budget_gb cannot hold them, with the size it needs."""
    from dist_xqa.config import ConfigError

    kd = cfg.distill
    if not kd.precompute:
        return
    teachers, features = store_size(cfg, prepared)
    need = teachers * features * logit_row_bytes(cfg.model.max_length, kd.logits_dtype, kd.store_topk)
    if need > kd.disk_budget_gb * 2**30:
        raise ConfigError(f"distill.precompute keeps the logits of all of D: {teachers} teacher(s) x {features} "
                          f"features take {_gb(need)}, over distill.disk_budget_gb = {kd.disk_budget_gb:g}: raise "
                          f"distill.disk_budget_gb to at least {need / 2**30:.3g}, set distill.store_topk, or set "
                          "distill.precompute: false (streamed)")


def check_disk(cfg, prepared) -> DiskEstimate:
    """Estimate this run's peak disk use on the world of this rank (one rank outside
    torch.distributed) and raise ConfigError with the figures when the rest of it does
    not fit the run directory's free space."""
    import torch.distributed as dist

    from dist_xqa.config import ConfigError

    trained = len(own_models(cfg))  # the phase-1 models and the student
    kd = cfg.distill
    store_teachers, store_features = store_size(cfg, prepared)
    student = cfg.student
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    # a shard is one student step: the global batch (at most the whole world's micro-batches)
    shard_rows = student.global_batch_size or student.micro_batch_size * student.grad_accum * world_size
    estimate = estimate_peak(
        parameters=count_parameters(cfg.model, prepared.tokenizer()), groups=trained,
        keep=cfg.checkpoint.keep, models=saved_models(cfg), store_teachers=store_teachers, store_features=store_features,
        shard_rows=shard_rows, lookahead_shards=kd.lookahead_shards, store_mode=kd.store_mode,
        disk_budget_bytes=int(kd.disk_budget_gb * 2**30),
        row_bytes=logit_row_bytes(cfg.model.max_length, kd.logits_dtype, kd.store_topk),
        prepared_bytes=directory_bytes(prepared.root))
    # A shared store (distill.store_dir) is counted once over the runs sharing it: what it
    # holds already is written by no later run.
    present = directory_bytes(cfg.run_path) + (directory_bytes(Path(kd.store_dir)) if kd.store_dir else 0)
    free = shutil.disk_usage(cfg.run_path).free
    table = estimate.describe(present, free)
    if estimate.total - present > free:
        raise ConfigError(f"run_dir {cfg.run_path} has too little free space for this run:\n{table}\n"
                          "free space there, choose another run_dir, lower checkpoint.keep, use "
                          "distill.store_mode window or distill.store_topk, or set run.check_disk: false "
                          "to run anyway")
    log.info("disk use estimate (run.check_disk):\n%s", table)
    return estimate


def _gb(size: int) -> str:
    return f"{size / 2**30:,.2f} GiB"
