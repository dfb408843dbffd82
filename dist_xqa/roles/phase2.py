"""LBMRC's phase 2 on every rank. Phases and roles meet only through files: phase 2
starts once every teacher's DONE.json is there (waiting as long as the teachers' heartbeats
move), fixes the shard plan over the distillation set D (one shard = one student step, the
student's global batch) and the store's manifest (what the logits are computed from),
builds this rank's producers (roles/producer.py) (with `distill.precompute`, has them
write their whole part of the store first, the paper's pipeline), then trains the student on a student
rank (roles/student.py) or, on a dedicated producer rank, serves its producers until the
student's heartbeat says it finished.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dist_xqa.config import RunConfig, batch_for_group
from dist_xqa.distributed import TrainingGroup
from dist_xqa.logits import Manifest, ShardPlan, hash_checkpoint
from dist_xqa.jobs import DISTILL_SET, phase1_dirs, store_options
from dist_xqa.layout import RunLayout
from dist_xqa.logits.writer import serve
from dist_xqa.prepared import Prepared
from dist_xqa.plan import RolePlan
from dist_xqa.roles.producer import check_teacher_tokenizers, rank_producers
from dist_xqa.roles.student import train_student
from dist_xqa.waiting import wait_for_run_files

TEACHER_WAIT_POLL_S = 2.0


def run_phase2(cfg: RunConfig, prepared: Prepared, ds_config: dict, plan: RolePlan,
               groups: dict[str, TrainingGroup], device: torch.device) -> None:
    layout = RunLayout(cfg.run_path)
    if layout.done(layout.student).exists():
        return
    rank = dist.get_rank()
    teachers = list(plan.teachers)
    teacher_dirs = {t: phase1_dirs(cfg)[t] for t in teachers}  # this run's, or phase1_from's
    # Phase 1 and 2 meet through files: every teacher must be saved.
    wait_for_run_files(cfg.run_path, [layout.done(d) for d in teacher_dirs.values()], cfg.run.stall_timeout_s,
                       "phase 2 waiting for the teachers", roles="teacher_*",
                       expected=[layout.model_name(d) for d in teacher_dirs.values()], poll_s=TEACHER_WAIT_POLL_S)
    check_teacher_tokenizers(teacher_dirs, prepared.settings)

    scfg = batch_for_group(cfg.student, plan.student.size)
    features = prepared.features(DISTILL_SET)
    feature_ids = [int(f) for f in features["feature_id"]]
    row_of = {f: i for i, f in enumerate(feature_ids)}
    shard_plan = ShardPlan(feature_ids, scfg.micro_batch_size * scfg.grad_accum * plan.student.size, cfg.seed)
    manifest = Manifest.for_plan(shard_plan, prepared.settings.fingerprint(),
                                 {t: hash_checkpoint(d) for t, d in teacher_dirs.items()}, **store_options(cfg))
    producers = rank_producers(cfg, plan, rank, teacher_dirs, features, row_of, shard_plan, manifest, scfg.epochs,
                               device)
    if cfg.distill.precompute:  # the paper's pipeline: every shard of D before the student's first step
        for producer in producers:
            producer.precompute()
    if rank in plan.student.ranks:
        train_student(cfg, prepared, ds_config, groups[plan.student.name], device, features,
                      shard_plan, manifest, teachers, producers)
    else:  # a dedicated producer rank: until the student's heartbeat says it finished
        serve(producers)
